"""The decoder-only Transformer: embeddings, a stack of blocks, final norm and LM head.

Every architecture is a composition of orthogonal choices from ModelConfig (norm kind and
placement, position kind, attention, MLP kind); presets are YAML files in configs/models/.
Shapes: B batch, T sequence, C d_model, V vocabulary.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from evoformer.config.schema import ModelConfig
from evoformer.model.attention import Attention, KVCache
from evoformer.model.mlp import build_mlp
from evoformer.model.norms import build_norm
from evoformer.model.positions import RotaryEmbedding


class Block(nn.Module):
    """One transformer layer: attention and MLP sub-layers with pre- or post-norm residuals."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.pre_norm = cfg.norm.placement == "pre"
        self.dropout = cfg.dropout
        self.attn_norm = build_norm(cfg.norm, cfg.d_model)
        self.attn = Attention(cfg.attention, cfg.d_model)
        self.mlp_norm = build_norm(cfg.norm, cfg.d_model)
        self.mlp = build_mlp(cfg.mlp, cfg.d_model)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout, self.training) if self.dropout else x

    def forward(self, x_BTC, rope=None, cache: KVCache | None = None) -> torch.Tensor:
        if self.pre_norm:
            x_BTC = x_BTC + self._drop(self.attn(self.attn_norm(x_BTC), rope, cache))
            return x_BTC + self._drop(self.mlp(self.mlp_norm(x_BTC)))
        x_BTC = self.attn_norm(x_BTC + self._drop(self.attn(x_BTC, rope, cache)))
        return self.mlp_norm(x_BTC + self._drop(self.mlp(x_BTC)))


class Transformer(nn.Module):
    """Decoder-only language model; ``forward(input_ids [B, T]) -> logits [B, T, V]``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = (
            nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.position.kind == "learned" else None
        )
        head_dim = cfg.attention.head_dim or cfg.d_model // cfg.attention.n_heads
        self.rope = (
            RotaryEmbedding(head_dim, cfg.max_seq_len, cfg.position)
            if cfg.position.kind == "rope"
            else None
        )
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        # Post-norm stacks end normalised already; pre-norm needs a final norm before the head.
        self.norm = build_norm(cfg.norm, cfg.d_model) if cfg.norm.placement == "pre" else None
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, False)
        self.activation_checkpointing = False

    # -- weights ---------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Deterministic init from ``seed``: each tensor draws from its own generator keyed by
        its name, so the result does not depend on device, construction order or which layers a
        rank holds (pipeline stages, tensor shards are cut from the same global weights)."""
        std = self.cfg.init.std
        residual_std = (
            std / math.sqrt(2 * self.cfg.n_layers) if self.cfg.init.scaled_residual else std
        )
        for module in self.modules():
            if hasattr(module, "reset_parameters") and not isinstance(
                module, (nn.Linear, nn.Embedding)
            ):
                module.reset_parameters()
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                s = residual_std if getattr(module, "is_residual_out", False) else std
                _normal_(module.weight, s, seed, f"{name}.weight")
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed.weight.numel()
            if self.pos_embed is not None:
                n -= self.pos_embed.weight.numel()
        return n

    # -- forward ---------------------------------------------------------------------------

    def new_caches(self, batch: int, max_len: int) -> list[KVCache]:
        p = self.embed.weight
        return [layer.attn.new_cache(batch, max_len, p.device, p.dtype) for layer in self.layers]

    def forward(self, input_ids: torch.Tensor, caches: list[KVCache] | None = None) -> torch.Tensor:
        B, T = input_ids.shape
        start = caches[0].length if caches else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} exceeds max_seq_len={self.cfg.max_seq_len}")
        positions = torch.arange(start, start + T, device=input_ids.device)
        x_BTC = self.embed(input_ids)
        if self.pos_embed is not None:
            x_BTC = x_BTC + self.pos_embed(positions)
        if self.cfg.dropout:
            x_BTC = F.dropout(x_BTC, self.cfg.dropout, self.training)
        rope = self.rope(positions) if self.rope is not None else None
        for i, layer in enumerate(self.layers):
            cache = caches[i] if caches else None
            if self.activation_checkpointing and self.training and cache is None:
                x_BTC = checkpoint(layer, x_BTC, rope, use_reentrant=False)
            else:
                x_BTC = layer(x_BTC, rope, cache)
        if self.norm is not None:
            x_BTC = self.norm(x_BTC)
        weight = self.embed.weight if self.head is None else self.head.weight
        return F.linear(x_BTC, weight)


def _normal_(t: torch.Tensor, std: float, seed: int, name: str) -> None:
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    t.copy_(torch.empty(t.shape, dtype=torch.float32).normal_(0.0, std, generator=g))


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", seed: int | None = 0):
    """Build on the meta device (no allocation), then materialise on ``device`` and initialise
    from ``seed`` (``seed=None`` leaves the memory uninitialised, e.g. before loading weights)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    if model.rope is not None:
        model.rope.reset_parameters()
    if seed is not None:
        model.init_weights(seed)
    return model


def lm_loss(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32 (targets < 0 are ignored)."""
    return F.cross_entropy(
        logits_BTV.float().reshape(-1, logits_BTV.shape[-1]),
        targets_BT.reshape(-1),
        ignore_index=-1,
    )
