"""Helpers shared by the HuggingFace parity tests."""

from __future__ import annotations

import torch


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|: the parity metric (limit 1e-5 in fp32)."""
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def randomise(model: torch.nn.Module, seed: int, norm_centre: float = 1.0) -> None:
    """Every weight random (norm gains around ``norm_centre``: 1, or 0 for unit-offset norms;
    DeepSeek's router correction bias too), so a mis-mapped tensor cannot hide behind an init of
    ones or zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and "bias" not in name:
                p.copy_(norm_centre + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.05 * noise)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
