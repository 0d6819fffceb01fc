"""Multi-head attention with grouped KV heads (MHA / GQA / MQA) through SDPA, with a KV cache.

Shapes: B batch, T new tokens, S cached + new tokens, H query heads, K kv heads, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from evoformer.config.schema import AttentionConfig, ModelConfig
from evoformer.model.positions import apply_rope


class KVCache:
    """Preallocated keys/values of one layer for incremental decoding."""

    def __init__(self, batch: int, n_kv: int, max_len: int, head_dim: int, device, dtype) -> None:
        self.k_BKSD = torch.zeros(batch, n_kv, max_len, head_dim, device=device, dtype=dtype)
        self.v_BKSD = torch.zeros_like(self.k_BKSD)
        self.length = 0

    def append(self, k_BKTD: torch.Tensor, v_BKTD: torch.Tensor) -> tuple[torch.Tensor, ...]:
        start, end = self.length, self.length + k_BKTD.shape[2]
        if end > self.k_BKSD.shape[2]:
            raise ValueError(f"KV cache holds {self.k_BKSD.shape[2]} positions, asked for {end}")
        self.k_BKSD[:, :, start:end] = k_BKTD
        self.v_BKSD[:, :, start:end] = v_BKTD
        self.length = end
        return self.k_BKSD[:, :, :end], self.v_BKSD[:, :, :end]


class Attention(nn.Module):
    """Causal self-attention; ``n_kv_heads < n_heads`` shares each KV head across a group."""

    def __init__(self, cfg: AttentionConfig, d_model: int) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.head_dim or d_model // cfg.n_heads
        self.dropout = cfg.dropout
        q_out, kv_out = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(d_model, q_out, bias=cfg.bias)
        self.k_proj = nn.Linear(d_model, kv_out, bias=cfg.bias)
        self.v_proj = nn.Linear(d_model, kv_out, bias=cfg.bias)
        self.o_proj = nn.Linear(q_out, d_model, bias=cfg.bias)
        self.o_proj.is_residual_out = True

    def new_cache(self, batch: int, max_len: int, device, dtype) -> KVCache:
        return KVCache(batch, self.n_kv_heads, max_len, self.head_dim, device, dtype)

    def forward(
        self,
        x_BTC: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        B, T, _ = x_BTC.shape
        q = self.q_proj(x_BTC).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x_BTC).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x_BTC).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        past = cache.length if cache is not None else 0
        if cache is not None:
            k, v = cache.append(k, v)
        if self.n_kv_heads != self.n_heads:
            # Expand KV heads to the query heads (as HF's repeat_kv): every SDPA backend takes it.
            rep = self.n_heads // self.n_kv_heads
            S = k.shape[2]
            k = k[:, :, None].expand(B, self.n_kv_heads, rep, S, self.head_dim)
            v = v[:, :, None].expand(B, self.n_kv_heads, rep, S, self.head_dim)
            k = k.reshape(B, self.n_heads, S, self.head_dim)
            v = v.reshape(B, self.n_heads, S, self.head_dim)
        dropout = self.dropout if self.training else 0.0
        if past == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, dropout_p=dropout)
        else:
            # Decoding after a prefill: new query i sits at position past + i.
            S = k.shape[2]
            mask = torch.ones(T, S, dtype=torch.bool, device=x_BTC.device).tril(diagonal=past)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.o_proj(out)


def is_local_layer(cfg: AttentionConfig, layer_idx: int) -> bool:
    """Whether block ``layer_idx`` uses the sliding window (all layers unless ``global_every``
    makes every N-th one global, as Gemma 3's 5 local : 1 global pattern)."""
    if cfg.sliding_window is None:
        return False
    if cfg.global_every <= 0:
        return True
    return (layer_idx + 1) % cfg.global_every != 0


def build_attention(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    """The attention sub-layer of block ``layer_idx``."""
    if cfg.attention.kind == "mla":
        from evoformer.model.mla import MultiHeadLatentAttention

        return MultiHeadLatentAttention(cfg, layer_idx)
    return Attention(cfg.attention, cfg.d_model)
