"""Normalisation layers: LayerNorm (GPT-2) and RMSNorm (LLaMA onward)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from evoformer.config.schema import NormConfig


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 whatever the input dtype (as HF LLaMA does)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        y = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps)
        return self.weight * y.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class LayerNorm(nn.Module):
    """Standard LayerNorm, optionally without the additive bias."""

    def __init__(self, dim: int, eps: float, bias: bool) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


def build_norm(cfg: NormConfig, dim: int) -> nn.Module:
    """The norm layer a NormConfig asks for."""
    if cfg.kind == "rmsnorm":
        return RMSNorm(dim, cfg.eps)
    if cfg.kind == "layernorm":
        return LayerNorm(dim, cfg.eps, cfg.bias)
    raise ValueError(f"unknown norm kind {cfg.kind!r}")
