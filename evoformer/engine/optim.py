"""AdamW with parameter groups, and learning-rate schedules as pure functions of the step.

Because the schedule is a function of the step alone, resuming needs no scheduler state.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from evoformer.config.schema import OptimConfig
from evoformer.parallel.layers import VocabParallelEmbedding


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; do not decay norms, biases or embeddings (their scale is meaningful)."""
    decay, no_decay = [], []
    embeddings = {
        id(m.weight)
        for m in model.modules()
        if isinstance(m, (nn.Embedding, VocabParallelEmbedding))
    }
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # Stacked expert biases (gpt-oss, [E, H]) are biases too, whatever their rank.
        if p.ndim < 2 or name.endswith("bias") or id(p) in embeddings:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def muon_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Muon's hidden matrices (every weight of >= 2 dims but the embeddings and the LM head),
    and AdamW's rest, decayed as ``param_groups`` decays them."""
    head = getattr(model, "head", None)
    adam_only = {id(p) for p in (getattr(head, "weight", None),) if p is not None}
    groups = param_groups(model, weight_decay)
    decay, no_decay = groups
    muon = [p for p in decay["params"] if id(p) not in adam_only]
    return [
        {"params": muon, "weight_decay": weight_decay, "muon": True},
        {
            "params": [p for p in decay["params"] if id(p) in adam_only],
            "weight_decay": weight_decay,
        },
        {"params": no_decay["params"], "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, tp_group: dist.ProcessGroup | None = None
) -> torch.optim.Optimizer:
    """``optim.name``: AdamW over ``param_groups``, or Muon (``engine.muon``; ``tp_group`` is
    where tensor-parallel slices of a matrix are gathered). The learning rate is set every
    step by ``lr_at``."""
    if cfg.name == "muon":
        from evoformer.engine.muon import Muon

        return Muon(
            muon_param_groups(model, cfg.weight_decay),
            lr=cfg.lr,
            momentum=cfg.muon_momentum,
            nesterov=cfg.muon_nesterov,
            ns_steps=cfg.muon_ns_steps,
            ns_coefficients=(
                cfg.muon_ns_coefficients[0],
                cfg.muon_ns_coefficients[1],
                cfg.muon_ns_coefficients[2],
            ),
            lr_scale=cfg.muon_lr_scale,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            tp_group=tp_group,
        )
    params = [p for p in model.parameters() if p.requires_grad]
    # The fused kernel (CPU and CUDA) is the fastest AdamW torch has; same update rule.
    fused = bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params
    )
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=fused,
    )


def lr_at(step: int, max_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then the schedule."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "cosine":
        span = max(1, max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "wsd":
        # warmup-stable-decay: hold the peak, then decay linearly over the last decay_fraction.
        decay_steps = max(1, int(round(max_steps * cfg.decay_fraction)))
        decay_start = max_steps - decay_steps
        if step < decay_start:
            return peak
        progress = min(1.0, (step - decay_start) / decay_steps)
        return peak + (floor - peak) * progress
    raise ValueError(f"unknown schedule {cfg.schedule!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
