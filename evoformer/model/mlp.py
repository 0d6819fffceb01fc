"""Feed-forward blocks: the GPT-2 two-matrix MLP and the gated SwiGLU (LLaMA) / GeGLU (Gemma) /
clamped SwiGLU (gpt-oss).

Tensor parallelism splits the hidden dim: up (and gate) column-parallel, down row-parallel; the
input enters the TP region once for both column layers, so a block costs Megatron's one
all-reduce forward and one backward (SP: all-gather + reduce-scatter each way).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from evoformer.config.schema import MLPConfig
from evoformer.parallel.context import ParallelContext

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu2": lambda x: torch.square(F.relu(x)),  # squared ReLU (Primer; Nemotron-H)
}


def activation_fn(cfg: MLPConfig):
    """The activation an MLPConfig asks for (``default`` resolved per MLP kind by the config)."""
    return ACTIVATIONS[cfg.resolved_activation]


def clamped_swiglu(
    gate: torch.Tensor, up: torch.Tensor, limit: float, alpha: float
) -> torch.Tensor:
    """gpt-oss's gated unit: the gate clamped above at ``limit`` (not below: large negative
    gates still switch the unit off), the linear part clamped to +-``limit`` and offset by 1,
    ``(up + 1) * gate * sigmoid(alpha * gate)``. The clamps bound the activations the model was
    trained with; ``alpha = 1.702`` makes ``x * sigmoid(alpha x)`` the sigmoid GELU."""
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def glu_fn(cfg: MLPConfig):
    """``glu(gate, up)``, the hidden activation of a gated MLP: ``act(gate) * up`` (SwiGLU,
    GeGLU) or :func:`clamped_swiglu`. Elementwise, so tensor-parallel column shards apply it
    on their own."""
    if cfg.kind == "clamped_swiglu":
        limit, alpha = cfg.swiglu_limit, cfg.swiglu_alpha
        return lambda gate, up: clamped_swiglu(gate, up, limit, alpha)
    act = activation_fn(cfg)
    return lambda gate, up: act(gate) * up


def _check_split(hidden: int, tp: int) -> None:
    if hidden % tp:
        raise ValueError(f"tensor parallelism: tp={tp} must divide the MLP hidden size {hidden}")


class MLP(nn.Module):
    """down(act(up(x)))."""

    def __init__(self, cfg: MLPConfig, d_model: int, ctx: ParallelContext | None = None) -> None:
        super().__init__()
        self.ctx = ctx = ctx or ParallelContext()
        _check_split(cfg.hidden, ctx.tp)
        self.act = activation_fn(cfg)
        self.up_proj = ctx.column(d_model, cfg.hidden, cfg.bias, explicit_comm=True)
        self.down_proj = ctx.row(cfg.hidden, d_model, cfg.bias)
        # nn.Module's stub lets __setattr__ take tensors and modules only; a plain flag is fine.
        self.down_proj.is_residual_out = True  # pyright: ignore[reportArgumentType]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ctx.tp > 1:
            x = self.ctx.enter(x)
        return self.down_proj(self.act(self.up_proj(x)))


class GatedMLP(nn.Module):
    """down(glu(gate(x), up(x))): SwiGLU with silu, GeGLU with gelu, or gpt-oss's clamped SwiGLU.

    ``partial_output=True`` (an MoE's shared experts): under TP the caller enters the region
    and reduces the output, together with the routed experts'."""

    def __init__(
        self,
        cfg: MLPConfig,
        d_model: int,
        ctx: ParallelContext | None = None,
        partial_output: bool = False,
    ) -> None:
        super().__init__()
        self.ctx = ctx = ctx or ParallelContext()
        _check_split(cfg.hidden, ctx.tp)
        self.partial_output = partial_output
        self.glu = glu_fn(cfg)
        self.gate_proj = ctx.column(d_model, cfg.hidden, cfg.bias, explicit_comm=True)
        self.up_proj = ctx.column(d_model, cfg.hidden, cfg.bias, explicit_comm=True)
        self.down_proj = ctx.row(cfg.hidden, d_model, cfg.bias, explicit_comm=partial_output)
        # nn.Module's stub lets __setattr__ take tensors and modules only; a plain flag is fine.
        self.down_proj.is_residual_out = True  # pyright: ignore[reportArgumentType]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ctx.tp > 1 and not self.partial_output:
            x = self.ctx.enter(x)
        return self.down_proj(self.glu(self.gate_proj(x), self.up_proj(x)))


def build_mlp(cfg: MLPConfig, d_model: int, ctx: ParallelContext | None = None) -> nn.Module:
    """The dense feed-forward block an MLPConfig asks for."""
    if cfg.gated:
        return GatedMLP(cfg, d_model, ctx)
    if cfg.kind == "gelu":
        return MLP(cfg, d_model, ctx)
    raise ValueError(f"unknown mlp kind {cfg.kind!r}")
