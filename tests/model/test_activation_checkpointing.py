"""Activation checkpointing (none | full | selective, every N blocks) changes memory, not numbers.

One process: for a dense model (tiny LLaMA, 4 blocks, residual dropout on so recomputed dropout
must draw the same masks) and MoE models (Mixtral-tiny; DeepSeek-V3-tiny with MLA, shared
experts and MTP), the loss and every gradient of full, selective and every-2 checkpointing equal
those without checkpointing (bitwise here; the bound asserted is 1e-6), and so do the MoE load
statistics (observed again by the recompute, but reported as ratios). The activation bytes a
forward keeps for backward (``engine.memory.measure_forward``) fall none > selective > full.
Under the real trainer, tp=2 with sequence parallelism and dropout, and FSDP2 stage 3 at dp=2,
train 3 steps to the same losses in every mode.
"""

from __future__ import annotations

import pytest
import torch

from evoformer.config import load_config
from evoformer.distributed.testing import run_distributed
from evoformer.engine import Trainer
from evoformer.engine.memory import measure_forward
from evoformer.errors import UserError
from evoformer.model import build_model
from evoformer.model.checkpointing import apply_activation_checkpointing
from tests.conftest import REPO

MODES = {
    "full": ("full", 1),
    "selective": ("selective", 1),
    "full-every-2": ("full", 2),
    "selective-every-2": ("selective", 2),
}
MODELS = {
    "llama": ("llama", ["model.n_layers=4", "model.dropout=0.1"]),
    "mixtral": ("mixtral", ["model.dropout=0.1"]),
    "deepseek-v3": ("deepseek-v3", []),
}
TOL = 1e-6


def _model_cfg(name: str):
    file, overrides = MODELS[name]
    return load_config([str(REPO / f"configs/models/tiny/{file}.yaml")], overrides).model


def _loss_and_grads(cfg, mode: str, every: int, ids: torch.Tensor):
    model = build_model(cfg, seed=3)
    model.train()
    apply_activation_checkpointing(model.layers, mode, every)
    torch.manual_seed(11)  # dropout masks
    out = model(ids[:, :-1], targets=ids[:, 1:])
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    # MoE load statistics see the recompute too; every reported number is a ratio over calls.
    stats = {}
    for m in model.modules():
        if hasattr(m, "end_of_step"):
            stats.update(m.end_of_step())
    return out.loss.detach(), grads, stats


@pytest.mark.parametrize("name", list(MODELS))
def test_checkpointing_gives_the_same_loss_and_gradients(name):
    cfg = _model_cfg(name)
    ids = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    ref_loss, ref_grads, ref_stats = _loss_and_grads(cfg, "none", 1, ids)
    assert len(ref_grads) == sum(1 for _ in build_model(cfg, seed=3).parameters())
    assert bool(ref_stats) == (cfg.moe.num_experts > 0)
    for label, (mode, every) in MODES.items():
        loss, grads, stats = _loss_and_grads(cfg, mode, every, ids)
        assert stats == ref_stats, label
        assert abs(loss.item() - ref_loss.item()) <= TOL * abs(ref_loss.item()), label
        assert grads.keys() == ref_grads.keys(), label
        worst = max((grads[n] - g).abs().max().item() for n, g in ref_grads.items())
        assert worst <= TOL, (label, worst)


def _activation_bytes(cfg, mode: str, every: int = 1) -> int:
    model = build_model(cfg, seed=0)
    model.train()
    apply_activation_checkpointing(model.layers, mode, every)
    ids = torch.randint(0, cfg.vocab_size, (4, 33), generator=torch.Generator().manual_seed(0))
    with measure_forward(model, torch.device("cpu")) as result:
        out = model(ids[:, :-1], targets=ids[:, 1:])
    out.loss.backward()
    return result[0]


@pytest.mark.parametrize("name", ["llama", "mixtral"])
def test_activation_bytes_fall_none_selective_full(name):
    cfg = _model_cfg(name)
    got = {
        "none": _activation_bytes(cfg, "none"),
        "selective": _activation_bytes(cfg, "selective"),
        "full-every-2": _activation_bytes(cfg, "full", 2),
        "full": _activation_bytes(cfg, "full"),
    }
    print(f"\n{name} activation bytes (batch 4 x 32): {got}")
    assert got["none"] > got["selective"] > got["full"] > 0
    assert got["none"] > got["full-every-2"] > got["full"]
    # Full checkpointing keeps one [B, T, C] fp32 tensor per block besides the head's tensors.
    blocks = got["none"] - got["full"]
    assert blocks > 0.5 * got["none"], got


def test_bad_settings_are_refused():
    llama = str(REPO / "configs/models/tiny/llama.yaml")
    with pytest.raises(UserError, match="activation_checkpointing='x'"):
        load_config([llama], ["activation_checkpointing=x"])
    with pytest.raises(UserError, match="activation_checkpointing_every=0"):
        load_config([llama], ["activation_checkpointing_every=0"])


# -- under the trainer: tp=2 + SP + dropout, FSDP2 stage 3 ----------------------------------

COMMON = [
    "data.source=synthetic",
    "train.seq_len=32",
    "train.global_batch_size=4",
    "train.micro_batch_size=2",
    "train.max_steps=3",
    "train.log_every=1",
    "run.progress=off",
    "optim.warmup_steps=1",
    "optim.lr=3e-3",
    "checkpoint.save_final=false",
]
LAYOUTS = {
    "tp2-sp-dropout": ["parallel.tp=2", "parallel.sequence_parallel=true", "model.dropout=0.1"],
    "fsdp2-3": ["zero.backend=fsdp2", "zero.stage=3"],
}


def _train_modes(rank: int, world: int, root: str) -> dict:
    out = {}
    for layout, overrides in LAYOUTS.items():
        for mode in ("none", "full", "selective"):
            cfg = load_config(
                [str(REPO / "configs/models/tiny/llama.yaml")],
                [
                    *COMMON,
                    *overrides,
                    f"activation_checkpointing={mode}",
                    f"run.output_dir={root}/{layout}-{mode}",
                ],
            )
            trainer = Trainer(cfg)
            out[(layout, mode)] = (trainer.train().losses, trainer.memory.stats.activations)
    return out


def test_checkpointing_under_tp_sp_and_fsdp2(tmp_path):
    got = run_distributed(_train_modes, 2, str(tmp_path), timeout=180)[0]
    for layout in LAYOUTS:
        ref, ref_act = got[(layout, "none")]
        assert sorted(ref) == [1, 2, 3]
        for mode in ("full", "selective"):
            losses, act = got[(layout, mode)]
            worst = max(abs(losses[s] - ref[s]) / ref[s] for s in ref)
            assert worst <= TOL, (layout, mode, worst)
            assert act < ref_act, (layout, mode, act, ref_act)
        assert got[(layout, "full")][1] < got[(layout, "selective")][1], layout
