"""Hybrid models (Gated DeltaNet / Mamba-2 beside attention) train like one process (gloo, fp32).

For the tiny Qwen3-Next twin (DeltaNet x3 + gated attention, MoE with a gated shared expert) and
the tiny Nemotron-H twin (Mamba-2, squared-ReLU MLP and attention blocks): 10 steps under tp=2
(the mixers' heads, conv channels and states split; with and without sequence parallelism),
dp=2 with FSDP2 ZeRO-3, and pp=2 give the
per-step losses of one process within 1e-5 relative; tp=2 also ends with the same weights, and
its step-5 checkpoint resumes on one process on the one-process losses. Full activation
checkpointing recomputes the mixers exactly.
"""

from __future__ import annotations

import pytest
import torch

from evoformer.config import load_config
from evoformer.distributed.testing import run_distributed
from evoformer.engine import Trainer
from evoformer.model import Block
from evoformer.parallel.layers import gather_full_params
from tests.conftest import REPO
from tests.engine.parity import max_rel, parity_run

STEPS = 10
LOSS_RTOL = 1e-5
# Final weights: as tests/engine/test_tp_training.py argues (AdamW amplifies TP's rounding).
WEIGHT_RTOL, WEIGHT_ATOL = 1e-4, 2e-4
FAMILIES = ("qwen3-next", "nemotron-h")
COMMON = [
    *parity_run(STEPS),
    # Two chunks per 32-token sequence, so the chunk-to-chunk state passing is trained too.
    "model.deltanet.chunk_size=16",
    "model.mamba.chunk_size=16",
]
LAYOUTS = {
    "tp2": ["parallel.tp=2", "checkpoint.save_every=5"],
    "tp2-sp": ["parallel.tp=2", "parallel.sequence_parallel=true"],
    "dp2-fsdp2-z3": ["zero.backend=fsdp2", "zero.stage=3"],
    "pp2": ["parallel.pp=2"],
}


def _cfg(family: str, out_dir, *overrides: str):
    return load_config(
        [str(REPO / f"configs/models/tiny/{family}.yaml")],
        [*COMMON, f"run.output_dir={out_dir}", *overrides],
    )


def _train(rank: int, world: int, family: str, root: str) -> dict:
    out = {}
    for name, overrides in LAYOUTS.items():
        trainer = Trainer(_cfg(family, f"{root}/{name}", *overrides))
        result = trainer.train()
        weights = None
        if name == "tp2":
            weights = gather_full_params(trainer.model, trainer.groups.tp_group)
        out[name] = {"losses": result.losses, "weights": weights if rank == 0 else None}
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_hybrid_layouts_train_like_one_process(family: str, tmp_path) -> None:
    one = Trainer(_cfg(family, tmp_path / "one"))
    ref = one.train().losses
    runs = run_distributed(_train, 2, family, str(tmp_path), timeout=240)[0]
    report = {name: max_rel(run["losses"], ref) for name, run in runs.items()}
    print(f"\n{family}: max relative loss difference vs one process: {report}")
    assert max(report.values()) <= LOSS_RTOL, report
    for name, p in one.model.named_parameters():
        got = runs["tp2"]["weights"][name]
        torch.testing.assert_close(
            got, p.detach(), rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL, msg=f"tp2 {name}"
        )
    # The tp=2 checkpoint on one process: DCP reshards the mixers' head-split tensors.
    ckpt = tmp_path / "tp2/checkpoints/step_5"
    resumed = Trainer(_cfg(family, tmp_path / "resumed", f"checkpoint.load={ckpt}")).train()
    assert sorted(resumed.losses) == list(range(6, STEPS + 1))
    assert max_rel(resumed.losses, {s: ref[s] for s in resumed.losses}) <= LOSS_RTOL


@pytest.mark.parametrize("family", FAMILIES)
def test_activation_checkpointing_recomputes_the_mixers(family: str, tmp_path) -> None:
    plain = Trainer(_cfg(family, tmp_path / "plain", "train.max_steps=3")).train().losses
    full = Trainer(
        _cfg(family, tmp_path / "ac", "train.max_steps=3", "activation_checkpointing=full")
    ).train()
    assert max_rel(full.losses, plain) <= 1e-6


def test_qk_clip_tracks_only_the_attention_layers(tmp_path) -> None:
    """``optim.qk_clip`` on a hybrid: the attention block gets a tracker, the recurrent and
    MLP-only blocks have no logits to clip."""
    cfg = _cfg("nemotron-h", tmp_path, "train.max_steps=2", "optim.name=muon", "optim.qk_clip=50")
    trainer = Trainer(cfg)
    losses = trainer.train().losses
    assert sorted(losses) == [1, 2]
    blocks = [b for b in trainer.model.modules() if isinstance(b, Block)]
    tracked = [b.spec.mixer for b in blocks if getattr(b.attn, "qk_clip", None) is not None]
    assert tracked == ["attention"]
