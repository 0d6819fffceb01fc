"""ZeRO through FSDP2 (``zero.backend=fsdp2``) trains like DDP and one process (gloo, fp32).

Tiny LLaMA, 10 steps, global batch 8 of micro-batches of 2: one process accumulates 4
micro-batches per step, each of the 2 dp ranks 2 (so ``set_requires_gradient_sync(False)`` is
exercised on every step). Stages 1, 2 and 3 give the per-step losses of one process and of DDP
within 1e-5 relative; runs stopped at step 5 resume bit-exactly at every stage; under stage 3 each
rank holds half of the parameter and AdamW-state bytes.
"""

from __future__ import annotations

import pytest

from evoformer.config import load_config
from evoformer.config.validate import validate
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
LAYOUTS = {
    "ddp": [],
    "fsdp2-1": ["zero.backend=fsdp2", "zero.stage=1"],
    "fsdp2-2": ["zero.backend=fsdp2", "zero.stage=2"],
    "fsdp2-3": ["zero.backend=fsdp2", "zero.stage=3"],
}


def _cfg(out_dir, *overrides: str):
    return load_config(
        [str(REPO / "configs/models/tiny/llama.yaml")],
        [*COMMON, f"run.output_dir={out_dir}", *overrides],
    )


def _train(rank: int, world: int, root: str) -> dict:
    out = {}
    for name, overrides in LAYOUTS.items():
        trainer = Trainer(_cfg(f"{root}/{name}", *overrides))
        result = trainer.train()
        out[name] = {"losses": result.losses, "bytes": model_state_bytes(trainer)}
    return out


def test_fsdp2_stages_train_like_ddp_and_one_process(tmp_path):
    ref = Trainer(_cfg(tmp_path / "one")).train().losses
    ranks = run_distributed(_train, 2, str(tmp_path), timeout=120)
    report = {name: max_rel(run["losses"], ref) for name, run in ranks[0].items()}
    report |= {
        f"{name} vs ddp": max_rel(run["losses"], ranks[0]["ddp"]["losses"])
        for name, run in ranks[0].items()
        if name != "ddp"
    }
    print(
        "\nmax relative loss difference vs one process over 10 steps: "
        + ", ".join(f"{k} {v:.1e}" for k, v in report.items())
    )
    assert max(report.values()) <= LOSS_RTOL, report
    # The logged norm (before clipping) counts every sharded gradient element once.
    want = grad_norms(tmp_path / "one")
    assert len(want) == STEPS
    for name in LAYOUTS:
        assert grad_norms(tmp_path / name) == pytest.approx(want, rel=1e-5), name
    # The dp ranks report the same (all-reduced) losses.
    for name in LAYOUTS:
        assert ranks[1][name]["losses"] == ranks[0][name]["losses"], name
    # Stage 3 at rest: each of the 2 ranks holds half the parameters and AdamW state of DDP
    # (dim-0 shards are padded to equal length, a few rows at most).
    for rank_out in ranks:
        full, sharded = rank_out["ddp"]["bytes"], rank_out["fsdp2-3"]["bytes"]
        print(f"per-rank bytes ddp {full}, fsdp2 stage 3 {sharded}")
        for kind in ("params", "optim"):
            assert full[kind] > 0
            assert abs(sharded[kind] / full[kind] - 0.5) <= 0.05, (kind, full, sharded)
    total = sum(r["fsdp2-3"]["bytes"]["params"] for r in ranks)
    assert total == pytest.approx(ranks[0]["ddp"]["bytes"]["params"], rel=0.01)


def _stop_and_resume(rank: int, world: int, root: str) -> dict:
    out = {}
    for stage in (1, 2, 3):
        layout = LAYOUTS[f"fsdp2-{stage}"]
        full = Trainer(_cfg(f"{root}/full{stage}", *layout, "checkpoint.save_every=5")).train()
        resumed = Trainer(
            _cfg(
                f"{root}/resumed{stage}",
                *layout,
                f"checkpoint.load={root}/full{stage}/checkpoints/step_5",
            )
        ).train()
        out[stage] = {"full": full.losses, "resumed": resumed.losses}
    return out


def test_fsdp2_checkpoints_resume_exactly_at_every_stage(tmp_path):
    got = run_distributed(_stop_and_resume, 2, str(tmp_path), timeout=240)[0]
    for stage, run in got.items():
        full, resumed = run["full"], run["resumed"]
        assert sorted(resumed) == list(range(6, STEPS + 1)), stage
        assert all(resumed[s] == full[s] for s in resumed), (stage, full, resumed)  # exact


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["zero.backend=fsdp2", "zero.stage=0"], "needs zero.stage 1, 2 or 3"),
        (["zero.stage=3"], "zero.backend=ddp does not shard"),
    ],
)
def test_unsupported_zero_settings_are_refused(overrides, message, tmp_path):
    with pytest.raises(UserError, match=message):
        validate(_cfg(tmp_path, *overrides))
