"""Feed-forward blocks: the GPT-2 two-matrix MLP and the gated SwiGLU (LLaMA) / GeGLU (Gemma)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from evoformer.config.schema import MLPConfig, ModelConfig

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


# What ``activation: default`` means per MLP kind (GeGLU: Gemma's gelu_pytorch_tanh).
DEFAULT_ACTIVATION = {"gelu": "gelu_tanh", "swiglu": "silu", "geglu": "gelu_tanh"}


def _activation(cfg: MLPConfig):
    name = DEFAULT_ACTIVATION[cfg.kind] if cfg.activation == "default" else cfg.activation
    return ACTIVATIONS[name]


class MLP(nn.Module):
    """down(act(up(x)))."""

    def __init__(self, cfg: MLPConfig, d_model: int) -> None:
        super().__init__()
        self.act = _activation(cfg)
        self.up_proj = nn.Linear(d_model, cfg.hidden, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.hidden, d_model, bias=cfg.bias)
        self.down_proj.is_residual_out = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU with silu, GeGLU with gelu."""

    def __init__(self, cfg: MLPConfig, d_model: int) -> None:
        super().__init__()
        self.act = _activation(cfg)
        self.gate_proj = nn.Linear(d_model, cfg.hidden, bias=cfg.bias)
        self.up_proj = nn.Linear(d_model, cfg.hidden, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.hidden, d_model, bias=cfg.bias)
        self.down_proj.is_residual_out = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def build_mlp(cfg: MLPConfig, d_model: int) -> nn.Module:
    """The dense feed-forward block an MLPConfig asks for."""
    if cfg.kind in ("swiglu", "geglu"):
        return GatedMLP(cfg, d_model)
    if cfg.kind == "gelu":
        return MLP(cfg, d_model)
    raise ValueError(f"unknown mlp kind {cfg.kind!r}")


def is_moe_layer(cfg: ModelConfig, layer_idx: int) -> bool:
    """DeepSeek-style layout: the first ``first_k_dense`` layers stay dense, then every
    ``layer_freq``-th layer is MoE."""
    moe = cfg.moe
    if moe.num_experts <= 0 or layer_idx < moe.first_k_dense:
        return False
    return (layer_idx - moe.first_k_dense) % moe.layer_freq == 0


def build_ffn(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    """The feed-forward sub-layer of block ``layer_idx``: a dense MLP or a mixture of experts."""
    if is_moe_layer(cfg, layer_idx):
        from evoformer.model.moe import MoE

        return MoE(cfg)
    return build_mlp(cfg.mlp, cfg.d_model)
