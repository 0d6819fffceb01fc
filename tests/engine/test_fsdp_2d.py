"""FSDP2 composed with tensor parallelism (2-D) and HSDP train like one process (gloo, fp32).

Tiny LLaMA, 10 steps, global batch 8 of micro-batches of 2, grad clip 0.5 (active on every
step). World 4: tp=2 x dp=2 under fsdp2 stages 1 (with sequence parallelism), 2 and 3 (with
SP), and HSDP (tp=1, 2 replicas x 2 shards, stage 3) give the per-step losses and the logged
gradient norms of one process within 1e-5 relative. Under stage 3 at tp2 x dp2 each rank holds
about 1/4 of one process's parameter and AdamW bytes. Checkpoints: a tp2 x dp2 stage-3 run
stopped at step 5 resumes bit-exactly, and the same checkpoint loads on one process (stored as
the global, unpadded tensors) and continues with the uninterrupted run's losses within 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from evoformer.config import load_config
from evoformer.config.validate import validate
from evoformer.distributed import ParallelDims
from evoformer.distributed.dims import ParallelGroups
from evoformer.distributed.testing import run_distributed
from evoformer.engine import Trainer
from evoformer.errors import UserError
from tests.conftest import REPO
from tests.engine.parity import grad_norms, max_rel, model_state_bytes, parity_run

STEPS = 10
LOSS_RTOL = 1e-5
COMMON = [
    *parity_run(STEPS),
    "optim.grad_clip=0.5",  # below the ~0.85 norms: clipping acts on every step
]
TP2 = ["zero.backend=fsdp2", "parallel.tp=2"]
SP = ["parallel.sequence_parallel=true"]
LAYOUTS = {
    "tp2xdp2-fsdp2-1-sp": [*TP2, "zero.stage=1", *SP],
    "tp2xdp2-fsdp2-2": [*TP2, "zero.stage=2"],
    "tp2xdp2-fsdp2-3-sp": [*TP2, "zero.stage=3", *SP],
    "hsdp-2x2-3": ["zero.backend=fsdp2", "zero.stage=3", "zero.replicate=2"],
}
RESUME = LAYOUTS["tp2xdp2-fsdp2-3-sp"]


def _cfg(out_dir, *overrides: str):
    return load_config(
        [str(REPO / "configs/models/tiny/llama.yaml")],
        [*COMMON, f"run.output_dir={out_dir}", *overrides],
    )


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    """The reference: one process, 4 micro-batches per step; bytes of its model state."""
    out = tmp_path_factory.mktemp("one")
    trainer = Trainer(_cfg(out, "checkpoint.save_every=5"))
    result = trainer.train()
    return {"losses": result.losses, "dir": out, "bytes": model_state_bytes(trainer)}


def _train(rank: int, world: int, root: str) -> dict:
    out = {}
    for name, overrides in LAYOUTS.items():
        trainer = Trainer(_cfg(f"{root}/{name}", *overrides))
        out[name] = {"losses": trainer.train().losses, "bytes": model_state_bytes(trainer)}
    return out


def test_fsdp2_2d_and_hsdp_train_like_one_process(one_process, tmp_path):
    ranks = run_distributed(_train, 4, str(tmp_path), timeout=240)
    ref = one_process["losses"]
    assert sorted(ref) == list(range(1, STEPS + 1))
    report = {name: max_rel(run["losses"], ref) for name, run in ranks[0].items()}
    print(
        "\nmax relative loss difference vs one process over 10 steps: "
        + ", ".join(f"{k} {v:.1e}" for k, v in report.items())
    )
    assert max(report.values()) <= LOSS_RTOL, report
    # Every rank reports the same (dp-averaged) losses.
    for name in LAYOUTS:
        for rank_out in ranks[1:]:
            assert rank_out[name]["losses"] == ranks[0][name]["losses"], name
    # The logged norm (before clipping) counts each element once across dp shards, tp shards
    # and replicated parameters: a double count or a missing reduction moves it by >= 10 %.
    want = grad_norms(one_process["dir"])
    assert len(want) == STEPS
    for name in LAYOUTS:
        assert grad_norms(tmp_path / name) == pytest.approx(want, rel=1e-5), name
    # Stage 3 at tp2 x dp2: a rank holds a dp half of a TP half of each sharded weight and a dp
    # half of each replicated one (norms), so ~1/4 of one process's bytes; the 4 ranks together
    # hold exactly one copy of the TP-sharded model (replicated tensors twice: one per TP rank).
    one = one_process["bytes"]
    for rank_out in ranks:
        got = rank_out["tp2xdp2-fsdp2-3-sp"]["bytes"]
        print(f"per-rank bytes one process {one}, fsdp2 stage 3 tp2 x dp2 {got}")
        for kind in ("params", "optim"):
            assert abs(got[kind] / one[kind] - 0.25) <= 0.02, (kind, one, got)
        assert got["optim"] == 2 * got["params"]  # AdamW: exp_avg and exp_avg_sq
    hsdp = [r["hsdp-2x2-3"]["bytes"]["params"] for r in ranks]
    print(f"per-rank parameter bytes HSDP 2 x 2 stage 3: {hsdp}")
    assert all(abs(b / one["params"] - 0.5) <= 0.01 for b in hsdp), hsdp  # 2 shards


def _stop_and_resume(rank: int, world: int, root: str) -> dict:
    full = Trainer(_cfg(f"{root}/full", *RESUME, "checkpoint.save_every=5")).train()
    resumed = Trainer(
        _cfg(f"{root}/resumed", *RESUME, f"checkpoint.load={root}/full/checkpoints/step_5")
    ).train()
    return {"full": full.losses, "resumed": resumed.losses}


def test_fsdp2_2d_checkpoint_resumes_exactly_and_loads_on_one_process(one_process, tmp_path):
    got = run_distributed(_stop_and_resume, 4, str(tmp_path), timeout=240)[0]
    full, resumed = got["full"], got["resumed"]
    assert sorted(resumed) == list(range(6, STEPS + 1))
    assert all(resumed[s] == full[s] for s in resumed), (full, resumed)  # bit-exact
    # The tp2 x dp2 checkpoint holds the global tensors (and AdamW state): one process resumes
    # from it and continues as the uninterrupted 4-rank run did.
    ckpt = tmp_path / "full/checkpoints/step_5"
    one = Trainer(_cfg(tmp_path / "one-from-2d", f"checkpoint.load={ckpt}")).train().losses
    assert sorted(one) == list(range(6, STEPS + 1))
    assert abs(one[6] - full[6]) / full[6] <= LOSS_RTOL, (one[6], full[6])
    assert max_rel(one, {s: full[s] for s in one}) <= LOSS_RTOL
    assert max_rel(one, {s: one_process["losses"][s] for s in one}) <= LOSS_RTOL


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["zero.backend=fsdp2", "zero.stage=3", "zero.replicate=0"], "must be >= 1"),
        (["zero.replicate=2"], "HSDP .* needs zero.backend=fsdp2"),
    ],
)
def test_bad_hsdp_settings_are_refused(overrides, message, tmp_path):
    with pytest.raises(UserError, match=message):
        validate(_cfg(tmp_path, *overrides))


def test_hsdp_replicas_must_divide_dp():
    dims = ParallelDims(world_size=8, rank=0, local_rank=0, tp=2)  # dp = 4
    groups = ParallelGroups(dims, None, None, None, (0,), (0,))
    with pytest.raises(UserError, match=r"zero.replicate=3 must divide the data-parallel size 4"):
        groups.hsdp_mesh(3)


def test_padded_vocab_shards_are_fsdp_sharded_on_dim_1():
    """A TP-padded table (vocab 511 over tp 2: 256 rows each, the last padded) must not be
    dp-sharded on the padded dim; full-length TP shards and replicated tensors keep Shard(0)."""
    from torch.distributed.tensor import Shard

    from evoformer.engine.fsdp import tp_shard_placement
    from evoformer.parallel.sharding import ShardSpec, Split, set_shard_spec

    def param(shape, tp_dim=None, full=None):
        p = torch.nn.Parameter(torch.empty(shape))
        set_shard_spec(p, ShardSpec(tp=Split(tp_dim, full)) if tp_dim is not None else None)
        return p

    placement = tp_shard_placement(tp_size=2, shard_size=2)
    assert placement(param((256, 64), 0, 511)) == Shard(1)
    assert placement(param((256, 64), 0, 512)) is None  # column / even vocab: Shard(0)
    assert placement(param((64, 32), 1, 64)) is None  # row-parallel: dims differ already
    assert placement(param((64,))) is None  # replicated norm
    with pytest.raises(UserError, match="vocabulary of 511 is padded over parallel.tp=2"):
        tp_shard_placement(2, 3)(param((256, 64), 0, 511))  # 64 columns over 3 shards
