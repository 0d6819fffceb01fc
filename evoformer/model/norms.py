"""Normalisation layers: LayerNorm (GPT-2) and RMSNorm (LLaMA onward, Gemma's unit offset)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from evoformer.config.schema import NormConfig
from evoformer.parallel.collectives import sum_across_parallel_region


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


def sharded_rms_norm(
    xs: list[torch.Tensor],
    norms: list[RMSNorm],
    widths: list[int],
    group: dist.ProcessGroup | None,
) -> list[torch.Tensor]:
    """RMSNorm of tensors whose last dim is split over ``group`` (OLMo 2's QK-norm over a
    head-sharded projection): each ``xs[i]`` holds this rank's slice of a ``widths[i]``-wide
    vector and ``norms[i]`` the matching slice of the gain. The local sums of squares of all
    inputs go through one all-reduce (forward and backward: every shard's gradient of the
    statistic is partial); the result equals ``norms[i]`` on the gathered tensor, with the same
    dtype handling as :class:`RMSNorm`."""
    ss = torch.cat([x.float().pow(2).sum(-1, keepdim=True) for x in xs], dim=-1)
    ss = sum_across_parallel_region(ss, group)
    out = []
    for i, (x, norm, width) in enumerate(zip(xs, norms, widths, strict=True)):
        y = x.float() * torch.rsqrt(ss[..., i : i + 1] / width + norm.eps)
        if norm.unit_offset:
            out.append((y * (1.0 + norm.weight.float())).to(x.dtype))
        elif x.dtype == torch.float32:
            out.append(y * norm.weight)
        else:
            out.append(norm.weight * y.to(x.dtype))
    return out


def build_norm(cfg: NormConfig, dim: int) -> nn.Module:
    """The norm layer a NormConfig asks for."""
    if cfg.kind == "rmsnorm":
        return RMSNorm(dim, cfg.eps, cfg.unit_offset)
    if cfg.kind == "layernorm":
        return LayerNorm(dim, cfg.eps, cfg.bias)
    raise ValueError(f"unknown norm kind {cfg.kind!r}")
