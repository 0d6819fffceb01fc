from __future__ import annotations

import numpy as np
import pytest
import torch

from evoformer.data import EvalBatches, GlobalBatchSampler, SyntheticDataset, get_batch
from evoformer.data import sampler as sampler_mod
from evoformer.errors import UserError


def test_deterministic_and_seeded() -> None:
    a = GlobalBatchSampler(1000, 32, seed=5)
    b = GlobalBatchSampler(1000, 32, seed=5)
    # b is asked in a different order and from a cold cache: same answers
    expected = [a.global_batch(s) for s in range(40)]
    for s in [39, 0, 17, 31, 3]:
        np.testing.assert_array_equal(b.global_batch(s), expected[s])
    assert expected[0].dtype == np.int64 and expected[0].shape == (32,)
    assert not np.array_equal(GlobalBatchSampler(1000, 32, seed=6).global_batch(0), expected[0])
    # the same as drawing the epoch permutation directly
    perm0 = np.random.default_rng([5, 0]).permutation(1000)
    np.testing.assert_array_equal(np.concatenate(expected[:31]), perm0[: 31 * 32])


@pytest.mark.parametrize("micro", [1, 2])
def test_ranks_cover_the_global_batch_at_any_dp(micro: int) -> None:
    sampler = GlobalBatchSampler(500, 16, seed=1)
    for step in [0, 1, 31, 32, 100]:
        global_batch = sampler.global_batch(step)
        for dp in [1, 2, 4]:
            parts = [
                mb for rank in range(dp) for mb in sampler.micro_batches(step, rank, dp, micro)
            ]
            assert all(len(mb) == micro for mb in parts)
            assert len(parts) == 16 // micro
            # rank-major concatenation is exactly the global batch, in order
            np.testing.assert_array_equal(np.concatenate(parts), global_batch)
    # a fresh sampler (another process, another dp size) gives rank 1 of dp=2 the same slice
    other = GlobalBatchSampler(500, 16, seed=1)
    np.testing.assert_array_equal(
        np.concatenate(other.micro_batches(7, 1, 2, 4)), sampler.global_batch(7)[8:]
    )


def test_divisibility_errors() -> None:
    sampler = GlobalBatchSampler(100, 12, seed=0)
    with pytest.raises(ValueError, match="not divisible by data-parallel size 5"):
        sampler.micro_batches(0, 0, 5, 1)
    with pytest.raises(ValueError, match="micro_batch_size 4"):
        sampler.micro_batches(0, 0, 2, 4)
    with pytest.raises(ValueError, match="dp_rank"):
        sampler.micro_batches(0, 2, 2, 2)


def test_epoch_boundary() -> None:
    n, g = 10, 4
    sampler = GlobalBatchSampler(n, g, seed=3)
    stream = np.concatenate([sampler.global_batch(s) for s in range(10)])  # 40 = 4 epochs
    for e in range(4):
        epoch = stream[e * n : (e + 1) * n]
        assert sorted(epoch.tolist()) == list(range(n))  # each sample once per epoch
        np.testing.assert_array_equal(epoch, np.random.default_rng([3, e]).permutation(n))
    # step 2 covers positions 8..11: two samples from epoch 0 and two from epoch 1
    np.testing.assert_array_equal(sampler.global_batch(2), stream[8:12])
    assert sampler.epoch(5) == 2.0
    # a global batch larger than the dataset spans several epochs
    big = GlobalBatchSampler(3, 8, seed=0).global_batch(0)
    assert sorted(big[:3].tolist()) == [0, 1, 2] and sorted(big[3:6].tolist()) == [0, 1, 2]


def test_huge_dataset_uses_a_lazy_permutation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sampler_mod, "_MATERIALISE_MAX", 64)
    n = 1000
    sampler = GlobalBatchSampler(n, 100, seed=9)
    epoch0 = np.concatenate([sampler.global_batch(s) for s in range(10)])
    assert sorted(epoch0.tolist()) == list(range(n))  # a true permutation
    assert not np.array_equal(epoch0, np.arange(n))
    epoch1 = np.concatenate([sampler.global_batch(s) for s in range(10, 20)])
    assert sorted(epoch1.tolist()) == list(range(n)) and not np.array_equal(epoch0, epoch1)
    # a billion samples cost no memory up front
    huge = GlobalBatchSampler(10**9, 8, seed=0)
    batch = huge.global_batch(123456)
    assert batch.min() >= 0 and batch.max() < 10**9 and len(set(batch.tolist())) == 8
    np.testing.assert_array_equal(batch, GlobalBatchSampler(10**9, 8, seed=0).global_batch(123456))


def test_state_dict() -> None:
    sampler = GlobalBatchSampler(100, 8, seed=4)
    state = sampler.state_dict()
    assert state == {"seed": 4, "num_samples": 100, "global_batch_size": 8}
    resumed = GlobalBatchSampler(100, 8, seed=999)
    resumed.load_state_dict(state)
    np.testing.assert_array_equal(resumed.global_batch(20), sampler.global_batch(20))
    with pytest.raises(UserError, match="trained on 100 samples, this run's dataset has 101"):
        GlobalBatchSampler(101, 8, seed=4).load_state_dict(state)
    with pytest.raises(UserError, match="global_batch_size=8, this run has 16"):
        GlobalBatchSampler(100, 16, seed=4).load_state_dict(state)


def test_eval_batches_fixed_and_clipped() -> None:
    ds = SyntheticDataset(100, 8, seed=0, length=10)
    ev = EvalBatches(ds, micro_batch_size=4, n_batches=8)
    batches = list(ev)
    assert [b.shape[0] for b in batches] == [4, 4, 2]  # clipped to the 10 windows
    assert torch.equal(torch.cat(batches), get_batch(ds, range(10)))
    assert all(torch.equal(x, y) for x, y in zip(batches, list(ev), strict=True))
    first = list(EvalBatches(ds, 2, 2))
    assert len(first) == 2 and torch.equal(torch.cat(first), get_batch(ds, range(4)))
    # data-parallel eval: ranks split the same batches between them
    shards = [list(EvalBatches(ds, 4, 8, dp_rank=r, dp_size=2)) for r in range(2)]
    assert [len(s) for s in shards] == [2, 1]
    assert torch.equal(shards[1][0], batches[1]) and torch.equal(shards[0][1], batches[2])
