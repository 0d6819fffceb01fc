"""Normalisation layers: LayerNorm (GPT-2) and RMSNorm (LLaMA onward, Gemma's unit offset)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from evoformer.config.schema import NormConfig


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in fp32 whatever the input dtype (as HF LLaMA does).

    With ``unit_offset`` (Gemma) the gain is ``1 + weight``, the weight starts at zero, and the
    whole product is taken in fp32 before rounding back (Gemma scales before the downcast,
    LLaMA after).
    """

    def __init__(self, dim: int, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.unit_offset:
            gain = 1.0 + self.weight.float()
            return F.rms_norm(x.float(), (x.shape[-1],), gain, self.eps).to(x.dtype)
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        y = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps)
        return self.weight * y.to(x.dtype)

    def reset_parameters(self) -> None:
        (nn.init.zeros_ if self.unit_offset else nn.init.ones_)(self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}" + (
            ", unit_offset" if self.unit_offset else ""
        )


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
        return RMSNorm(dim, cfg.eps, cfg.unit_offset)
    if cfg.kind == "layernorm":
        return LayerNorm(dim, cfg.eps, cfg.bias)
    raise ValueError(f"unknown norm kind {cfg.kind!r}")
