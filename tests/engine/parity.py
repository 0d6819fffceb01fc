"""What the layout-parity tests compare: per-step losses, logged gradient norms, router biases,
and the bytes of model state a rank holds."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor


def parity_run(steps: int, *, seq_len: int = 32, global_batch: int = 8) -> list[str]:
    """The overrides a layout-parity run starts from: synthetic data, micro-batches of 2
    sequences, every step logged, AdamW at lr 3e-3 after 2 warm-up steps, no final checkpoint."""
    return [
        "data.source=synthetic",
        f"train.seq_len={seq_len}",
        f"train.global_batch_size={global_batch}",
        "train.micro_batch_size=2",
        f"train.max_steps={steps}",
        "train.log_every=1",
        "run.progress=off",
        "optim.warmup_steps=2",
        "optim.lr=3e-3",
        "checkpoint.save_final=false",
    ]


def max_rel(got: dict[int, float], want: dict[int, float]) -> float:
    """Largest relative per-step loss difference; both runs must log the same steps."""
    assert want and sorted(got) == sorted(want), (sorted(got), sorted(want))
    return max(abs(got[s] - want[s]) / abs(want[s]) for s in want)


def grad_norms(run_dir: str | Path) -> list[float]:
    """The logged gradient norms (before clipping) of a run, in step order."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r["grad_norm"] for r in map(json.loads, lines) if "grad_norm" in r]


def router_biases(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The aux-loss-free selection biases (DeepSeek-V3), updated from each step's loads."""
    return {n: b.clone() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")}


def local_bytes(t: torch.Tensor) -> int:
    """Bytes this rank stores for ``t`` (its shard when ``t`` is a DTensor)."""
    t = t.to_local() if isinstance(t, DTensor) else t
    return t.numel() * t.element_size()


def model_state_bytes(trainer) -> dict[str, int]:
    """What a rank holds at rest between steps: parameters and AdamW moments."""
    params = sum(local_bytes(p) for p in trainer.model.parameters())
    optim = sum(
        local_bytes(v)
        for state in trainer.optimizer.state.values()
        for v in state.values()
        if torch.is_tensor(v) and v.dim() > 0
    )
    return {"params": params, "optim": optim}
