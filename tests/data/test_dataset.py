from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from evoformer.data import (
    ConcatDataset,
    PackedDataset,
    SyntheticDataset,
    TokenStore,
    get_batch,
    write_token_store,
)
from evoformer.errors import UserError

EOD = 2


def _store(tmp_path: Path, docs: list[list[int]], name: str = "d.tok") -> TokenStore:
    return TokenStore(write_token_store(tmp_path / name, docs, 1000, eod_id=EOD))


def _reference_stream(docs: list[list[int]]) -> np.ndarray:
    """The naive packing: every document followed by EOD, all concatenated."""
    return np.array([t for d in docs for t in [*d, EOD]], dtype=np.int64)


def _random_docs(seed: int, n: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    # lengths from 0 (an empty document: just an EOD) to longer than a window
    return [rng.integers(3, 1000, size=rng.integers(0, 40)).tolist() for _ in range(n)]


@pytest.mark.parametrize("seq_len", [1, 7, 16, 64])
def test_windows_match_naive_stream(tmp_path: Path, seq_len: int) -> None:
    docs = _random_docs(seq_len, 60)
    stream = _reference_stream(docs)
    ds = PackedDataset(_store(tmp_path, docs), seq_len)
    assert len(ds) == (len(stream) - 1) // seq_len
    assert ds.stream_len == len(stream)
    for i in range(len(ds)):
        x = ds[i]
        assert x.dtype == torch.long and x.shape == (seq_len + 1,)
        np.testing.assert_array_equal(x.numpy(), stream[i * seq_len : i * seq_len + seq_len + 1])
    # the last window ends inside the stream, one more would not fit
    assert len(ds) * seq_len + 1 <= len(stream) < (len(ds) + 1) * seq_len + 1
    np.testing.assert_array_equal(ds[-1].numpy(), ds[len(ds) - 1].numpy())
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_doc_subset_matches_naive_stream(tmp_path: Path) -> None:
    docs = _random_docs(5, 50)
    ids = [7, 3, 3, 40, 0, 22, 49]  # any order, repeats allowed
    ds = PackedDataset(_store(tmp_path, docs), 8, doc_ids=ids)
    stream = _reference_stream([docs[i] for i in ids])
    assert ds.n_docs == 7 and ds.n_tokens == sum(len(docs[i]) for i in ids)
    got = np.concatenate([ds[i].numpy()[:-1] for i in range(len(ds))])
    np.testing.assert_array_equal(got, stream[: len(got)])


def test_too_small_corpus(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"corpus too small/empty: .*small.tok gives 3 tokens"):
        PackedDataset(_store(tmp_path, [[5, 6, 7]], "small.tok"), 4)
    # 3 tokens + EOD = 4 stream tokens: exactly one window of seq_len 3
    assert len(PackedDataset(_store(tmp_path, [[5, 6, 7]], "ok.tok"), 3)) == 1
    with pytest.raises(UserError, match="corpus too small/empty"):
        PackedDataset(_store(tmp_path, [[], []], "empty.tok"), 1)


def test_get_batch_and_pickle(tmp_path: Path) -> None:
    docs = _random_docs(1, 30)
    ds = PackedDataset(_store(tmp_path, docs), 8)
    batch = get_batch(ds, np.array([3, 0, 3]))
    assert batch.shape == (3, 9) and batch.dtype == torch.long
    assert torch.equal(batch[0], ds[3]) and torch.equal(batch[1], ds[0])
    assert get_batch(ds, []).shape == (0, 9)
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(get_batch(clone, [1, 2]), get_batch(ds, [1, 2]))


def test_concat(tmp_path: Path) -> None:
    a = PackedDataset(_store(tmp_path, _random_docs(1, 20), "a.tok"), 8)
    b = PackedDataset(_store(tmp_path, _random_docs(2, 20), "b.tok"), 8)
    cat = ConcatDataset([a, b])
    assert len(cat) == len(a) + len(b)
    assert torch.equal(cat[0], a[0]) and torch.equal(cat[len(a)], b[0])
    assert torch.equal(cat[-1], b[len(b) - 1])
    assert torch.equal(get_batch(cat, [len(a) - 1, len(a)]), torch.stack([a[-1], b[0]]))


def test_synthetic_is_deterministic_and_order_free() -> None:
    ds = SyntheticDataset(vocab_size=50, seq_len=16, seed=7)
    assert len(ds) == 10**9
    forward = [ds[i] for i in range(5)]
    again = SyntheticDataset(50, 16, 7)
    backward = [again[i] for i in reversed(range(5))][::-1]
    for x, y in zip(forward, backward, strict=True):
        assert torch.equal(x, y)
    assert forward[0].shape == (17,) and forward[0].dtype == torch.long
    assert int(forward[0].min()) >= 0 and int(forward[0].max()) < 50
    assert not torch.equal(forward[0], forward[1])
    assert not torch.equal(SyntheticDataset(50, 16, 8)[0], forward[0])
    assert torch.equal(get_batch(ds, [4, 0]), torch.stack([forward[4], forward[0]]))
    # all ids appear at about the uniform rate
    counts = np.bincount(get_batch(ds, range(200)).flatten().numpy(), minlength=50)
    assert counts.min() > 0.5 * counts.mean() and counts.max() < 1.5 * counts.mean()
    assert torch.equal(SyntheticDataset(50, 16, -3)[2], SyntheticDataset(50, 16, -3)[2])
    with pytest.raises(IndexError):
        SyntheticDataset(50, 16, 0, length=4)[4]
