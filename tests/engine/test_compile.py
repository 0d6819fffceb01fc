"""``train.compile``: compiled blocks train like eager ones and keep the parameter names.

Tiny LLaMA, one process, 4 steps, fp32. Inductor reorders fp32 arithmetic, so losses agree
within 1e-5 relative rather than bitwise; activation checkpointing (full) recomputes through the
compiled block and gives the same losses. Checkpoints of a compiled run hold the same names as an
eager run's (``Module.compile`` compiles in place, no ``_orig_mod`` prefix).
"""

from __future__ import annotations

import torch

from evoformer.config import load_config
from evoformer.engine import Trainer
from tests.conftest import REPO
from tests.engine.parity import max_rel

COMMON = [
    "data.source=synthetic",
    "train.seq_len=32",
    "train.global_batch_size=4",
    "train.micro_batch_size=2",
    "train.max_steps=4",
    "train.log_every=1",
    "run.progress=off",
    "optim.warmup_steps=1",
    "optim.lr=3e-3",
    "checkpoint.save_final=false",
]


def _train(out_dir, *overrides: str) -> tuple[dict[int, float], Trainer]:
    cfg = load_config(
        [str(REPO / "configs/models/tiny/llama.yaml")],
        [*COMMON, f"run.output_dir={out_dir}", *overrides],
    )
    trainer = Trainer(cfg)
    return trainer.train().losses, trainer


def test_compiled_blocks_train_like_eager(tmp_path):
    torch._dynamo.reset()
    eager, eager_trainer = _train(tmp_path / "eager")
    compiled, trainer = _train(tmp_path / "compiled", "train.compile=true")
    assert all(block._compiled_call_impl is not None for block in trainer.model.layers)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # really traced
    assert sorted(trainer.model.state_dict()) == sorted(eager_trainer.model.state_dict())
    rel = max_rel(compiled, eager)
    print(f"\ncompiled vs eager, 4 steps: max relative loss difference {rel:.1e}")
    assert rel <= 1e-5
    # Recompute through the compiled block (activation checkpointing) changes nothing further.
    recomputed, _ = _train(tmp_path / "ckpt", "train.compile=true", "activation_checkpointing=full")
    assert max_rel(recomputed, eager) <= 1e-5
