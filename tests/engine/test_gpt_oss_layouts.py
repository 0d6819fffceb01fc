"""gpt-oss-tiny (attention sinks, q/k/v/o biases, biased router and experts, clamped SwiGLU)
trains under tp=2 (the sinks and the experts' gate/up biases split with the heads and hidden
dim, the down bias added once), tp=2 + SP and ep=2 like one process: 8 steps of per-step losses
within 1e-5 relative, and the same final sinks and expert biases."""

from __future__ import annotations

import torch

from evoformer.config import load_config
from evoformer.distributed.testing import run_distributed
from evoformer.engine import Trainer
from evoformer.parallel.layers import gather_full_params
from tests.conftest import REPO
from tests.engine.parity import max_rel

STEPS = 8
COMMON = [
    "data.source=synthetic",
    "train.seq_len=32",  # past the window of 16
    "train.global_batch_size=4",
    "train.micro_batch_size=2",
    f"train.max_steps={STEPS}",
    "train.log_every=1",
    "run.progress=off",
    "optim.warmup_steps=2",
    "optim.lr=3e-3",
    "checkpoint.save_final=false",
]
LAYOUTS = {
    "tp2": ["parallel.tp=2"],
    "tp2-sp": ["parallel.tp=2", "parallel.sequence_parallel=true"],
    "ep2": ["parallel.ep=2"],
}
WATCHED = ("sinks", "gate_proj_bias", "up_proj_bias", "down_proj_bias", "router.bias")


def _cfg(out_dir, *overrides: str):
    return load_config(
        [str(REPO / "configs/models/tiny/gpt-oss.yaml")],
        [*COMMON, f"run.output_dir={out_dir}", *overrides],
    )


def _train(rank: int, world: int, root: str) -> dict:
    out = {}
    for name, overrides in LAYOUTS.items():
        trainer = Trainer(_cfg(f"{root}/{name}", *overrides))
        losses = trainer.train().losses
        weights = gather_full_params(trainer.model, trainer.groups.tp_group)
        if trainer.groups.ep_group is not None:  # experts: gather this rank's share
            weights = {n: w for n, w in weights.items() if "experts" not in n}
        out[name] = {"losses": losses, "weights": weights if rank == 0 else None}
    return out


def test_gpt_oss_layouts_train_like_one_process(tmp_path) -> None:
    one = Trainer(_cfg(tmp_path / "one"))
    ref = one.train().losses
    runs = run_distributed(_train, 2, str(tmp_path), timeout=240)[0]
    report = {name: max_rel(run["losses"], ref) for name, run in runs.items()}
    print(f"\ngpt-oss-tiny max relative loss difference over {STEPS} steps: {report}")
    assert max(report.values()) <= 1e-5, report
    checked = 0
    for name, run in runs.items():
        for pname, p in one.model.named_parameters():
            if pname.endswith(WATCHED) and pname in run["weights"]:
                torch.testing.assert_close(
                    run["weights"][pname], p.detach(), rtol=1e-4, atol=2e-4, msg=f"{name} {pname}"
                )
                checked += 1
    assert checked >= 2 * 2 * 5  # the two TP layouts: every watched tensor of both layers
