"""Multi-head latent attention (DeepSeek-V2/V3), computed as HF's ``DeepseekV3Attention``.

Keys and values are expanded per head from one compressed latent per token; a decoupled RoPE
key, shared by all heads, carries the position. The decoding cache holds only the latent and
that key: ``kv_lora_rank + qk_rope_head_dim`` values per token and layer.

Shapes: B batch, T new tokens, S cached + new tokens, H heads, L kv_lora_rank, R
qk_rope_head_dim, N qk_nope_head_dim, V v_head_dim, C d_model.

RoPE rotates the two halves of q_pe / k_pe (``positions.apply_rope``). DeepSeek's checkpoints
rotate interleaved pairs instead (HF ``rope_interleave``); that is the same function after a
fixed permutation of the rope rows of ``q_b_proj``/``q_proj`` and ``kv_a_proj``, which the HF
converter applies to the weights.

Tensor parallelism splits the heads: the down-projections (``q_a_proj``, ``kv_a_proj``) and
latent norms stay replicated (small), the up-projections (``q_b_proj``/``q_proj``,
``kv_b_proj``) are column-parallel and ``o_proj`` row-parallel. The latents (q latent, KV latent
and the shared RoPE key) enter the TP region together, so backward all-reduces one
``[B, T, q_lora_rank + kv_lora_rank + R]`` gradient instead of ``[B, T, C]``, and the replicated
weights before it get complete gradients. Under sequence parallelism the down-projections run on
the sequence shard and the small latent is what gets all-gathered.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from evoformer.model.documents import Documents, document_attention
from evoformer.model.layout import LatentAttentionSpec
from evoformer.model.norms import RMSNorm
from evoformer.model.positions import apply_rope
from evoformer.model.qk_clip import QKClip, scale_head_rows
from evoformer.parallel.context import ParallelContext
from evoformer.parallel.sharding import mark_partial_grad

# DeepSeek's latent norms use a fixed epsilon, whatever rms_norm_eps says.
LATENT_NORM_EPS = 1e-6


class LatentCache:
    """Decoding cache of one MLA layer: the normalised KV latent and the rotated shared key."""

    def __init__(
        self, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int, device, dtype
    ) -> None:
        self.latent_BSL = torch.zeros(batch, max_len, kv_lora_rank, device=device, dtype=dtype)
        self.k_pe_BSR = torch.zeros(batch, max_len, rope_dim, device=device, dtype=dtype)
        self.length = 0

    def append(
        self, latent_BTL: torch.Tensor, k_pe_BTR: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + latent_BTL.shape[1]
        if end > self.latent_BSL.shape[1]:
            raise ValueError(f"MLA cache holds {self.latent_BSL.shape[1]} positions, asked {end}")
        self.latent_BSL[:, start:end] = latent_BTL
        self.k_pe_BSR[:, start:end] = k_pe_BTR
        self.length = end
        return self.latent_BSL[:, :end], self.k_pe_BSR[:, :end]

    def bytes_per_token(self) -> int:
        """Cache bytes one token of one sequence takes in this layer."""
        return self.latent_BSL[0, 0].nbytes + self.k_pe_BSR[0, 0].nbytes


class MultiHeadLatentAttention(nn.Module):
    """MLA: ``q_lora_rank > 0`` factorises the query (q_a_proj -> RMSNorm -> q_b_proj, else one
    q_proj); ``kv_a_proj`` gives the latent and the shared RoPE key; ``kv_b_proj`` expands the
    normalised latent into per-head no-position keys and values.

    Without a cache (training, scoring) keys and values are expanded and attended by SDPA. With
    a cache, ``kv_b_proj`` is absorbed into the query and the output instead, so attention runs
    on the cached latent directly and per-head keys are never materialised."""

    def __init__(self, a: LatentAttentionSpec, ctx: ParallelContext | None = None) -> None:
        super().__init__()
        self.ctx = ctx = ctx or ParallelContext()
        self.tp = ctx.tp
        if a.n_heads % self.tp:
            raise ValueError(f"tensor parallelism: tp={self.tp} must divide n_heads={a.n_heads}")
        self.n_heads = a.n_heads // self.tp  # this rank's heads
        self.q_lora_rank, self.kv_lora_rank = a.q_lora_rank, a.kv_lora_rank
        self.nope_dim, self.rope_dim = a.nope_dim, a.rope_dim
        self.v_dim = a.v_dim
        self.qk_dim = self.nope_dim + self.rope_dim
        self.scale = a.scale
        self.dropout = a.dropout
        self.qk_clip: QKClip | None = None  # optim.qk_clip, attached by engine.parallelize
        C, H = a.d_model, a.n_heads
        if self.q_lora_rank > 0:
            self.q_a_proj = nn.Linear(C, self.q_lora_rank, bias=a.bias)
            self.q_a_norm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = ctx.column(self.q_lora_rank, H * self.qk_dim, False, explicit_comm=True)
        else:  # enters the TP region on its own (the latents do separately)
            self.q_proj = ctx.column(C, H * self.qk_dim, False)
        self.kv_a_proj = nn.Linear(C, self.kv_lora_rank + self.rope_dim, bias=a.bias)
        self.kv_a_norm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS)
        kv_out = H * (self.nope_dim + self.v_dim)
        self.kv_b_proj = ctx.column(self.kv_lora_rank, kv_out, False, explicit_comm=True)
        self.o_proj = ctx.row(H * self.v_dim, C, a.bias)
        self.o_proj.is_residual_out = True  # pyright: ignore[reportArgumentType]
        if ctx.sp:  # replicated layers on the sequence shard: partial gradients
            for name in ("q_a_proj", "q_a_norm", "kv_a_proj", "kv_a_norm"):
                if hasattr(self, name):
                    mark_partial_grad(getattr(self, name), "weight", "bias")

    def new_cache(self, batch: int, max_len: int, device, dtype) -> LatentCache:
        return LatentCache(batch, max_len, self.kv_lora_rank, self.rope_dim, device, dtype)

    def forward(
        self,
        x_BTC: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: LatentCache | None = None,
        docs: Documents | None = None,
    ) -> torch.Tensor:
        """``docs``: attend within documents only (packed training windows; no cache)."""
        if self.tp > 1:
            q, latent_BTL, k_pe_BTR = self._project_tp(x_BTC)
        else:
            if self.q_lora_rank > 0:
                q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x_BTC)))
            else:
                q = self.q_proj(x_BTC)
            kv_a = self.kv_a_proj(x_BTC)
            latent_BTL, k_pe_BTR = kv_a.split([self.kv_lora_rank, self.rope_dim], -1)
            latent_BTL = self.kv_a_norm(latent_BTL)
        B, T, _ = q.shape
        q_BHTD = q.view(B, T, self.n_heads, self.qk_dim).transpose(1, 2)
        q_nope_BHTN, q_pe_BHTR = q_BHTD.split([self.nope_dim, self.rope_dim], dim=-1)
        k_pe_B1TR = k_pe_BTR.unsqueeze(1)
        if rope is not None:
            q_pe_BHTR, k_pe_B1TR = apply_rope(q_pe_BHTR, *rope), apply_rope(k_pe_B1TR, *rope)
        if cache is None:
            out_BHTV = self._attend(q_nope_BHTN, q_pe_BHTR, latent_BTL, k_pe_B1TR, docs)
        else:
            past = cache.length
            latent_BSL, k_pe_BSR = cache.append(latent_BTL, k_pe_B1TR.squeeze(1))
            out_BHTV = self._attend_latent(q_nope_BHTN, q_pe_BHTR, latent_BSL, k_pe_BSR, past)
        return self.o_proj(out_BHTV.transpose(1, 2).reshape(B, T, self.n_heads * self.v_dim))

    def end_of_step(self) -> dict[str, float]:
        """QK-clip after the optimizer step (Kimi K2's split: q_nope and k_nope by sqrt(gamma),
        q_rope by gamma, the shared rotary key untouched). Collective over dp and tp."""
        if self.qk_clip is None:
            return {}
        gamma_H, stats = self.qk_clip.finish()
        if gamma_H is not None:
            q = self.q_b_proj if self.q_lora_rank > 0 else self.q_proj
            root, nope = gamma_H.sqrt(), slice(0, self.nope_dim)
            scale_head_rows(q, root, self.qk_dim, nope)
            scale_head_rows(q, gamma_H, self.qk_dim, slice(self.nope_dim, self.qk_dim))
            scale_head_rows(self.kv_b_proj, root, self.nope_dim + self.v_dim, nope)
        return stats

    def _project_tp(self, x_BTC: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(q of this rank's heads, normalised KV latent, shared RoPE key), the latents entering
        the TP region in one piece (SP: gathered along T from the sequence shard)."""
        kv_latent, k_pe = self.kv_a_proj(x_BTC).split([self.kv_lora_rank, self.rope_dim], -1)
        parts = [self.kv_a_norm(kv_latent), k_pe]
        if self.q_lora_rank > 0:
            parts.insert(0, self.q_a_norm(self.q_a_proj(x_BTC)))
        latents = self.ctx.enter(torch.cat(parts, dim=-1))
        if self.q_lora_rank > 0:
            q_latent, kv_latent, k_pe = latents.split(
                [self.q_lora_rank, self.kv_lora_rank, self.rope_dim], -1
            )
            return self.q_b_proj(q_latent), kv_latent, k_pe
        kv_latent, k_pe = latents.split([self.kv_lora_rank, self.rope_dim], -1)
        return self.q_proj(x_BTC), kv_latent, k_pe

    def _attend(
        self, q_nope_BHTN, q_pe_BHTR, latent_BSL, k_pe_B1SR, docs: Documents | None = None
    ) -> torch.Tensor:
        """Causal attention over per-head keys/values expanded from the latent (within each
        document of ``docs`` when given)."""
        B, H, T, _ = q_nope_BHTN.shape
        S = latent_BSL.shape[1]
        kv = self.kv_b_proj(latent_BSL).view(B, S, H, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope_BHSN, v_BHSV = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k_BHSD = torch.cat([k_nope_BHSN, k_pe_B1SR.expand(B, H, S, self.rope_dim)], dim=-1)
        q_BHTD = torch.cat([q_nope_BHTN, q_pe_BHTR], dim=-1)
        if self.ctx.cp > 1:  # context parallelism: K/V expanded per head travel (not the latent)
            from evoformer.model.attention import cp_attention  # attention imports this module

            return (
                cp_attention(self, q_BHTD, k_BHSD, v_BHSV, None, docs)
                .view(B, T, H, self.v_dim)
                .transpose(1, 2)
            )
        dropout = self.dropout if self.training else 0.0
        if self.qk_clip is not None and self.training:
            self.qk_clip.observe(q_BHTD, k_BHSD, self.scale, None, docs)
        if docs is not None:
            return document_attention(q_BHTD, k_BHSD, v_BHSV, docs, None, self.scale, dropout)
        return F.scaled_dot_product_attention(
            q_BHTD, k_BHSD, v_BHSV, is_causal=T > 1, dropout_p=dropout, scale=self.scale
        )

    def _attend_latent(self, q_nope_BHTN, q_pe_BHTR, latent_BSL, k_pe_BSR, past: int):
        """The same attention with kv_b_proj absorbed: q_nope . (W_uk c) = (W_uk^T q_nope) . c,
        and the values' W_uv applied after the weighted sum of latents."""
        B, H, T, _ = q_nope_BHTN.shape
        S = latent_BSL.shape[1]
        w_HXL = cast(torch.Tensor, self.kv_b_proj.weight).view(
            H, self.nope_dim + self.v_dim, self.kv_lora_rank
        )
        w_uk_HNL, w_uv_HVL = w_HXL.split([self.nope_dim, self.v_dim], dim=1)
        q_lat_BHTL = torch.einsum("bhtn,hnl->bhtl", q_nope_BHTN, w_uk_HNL)
        q_BHTD = torch.cat([q_lat_BHTL, q_pe_BHTR], dim=-1)
        k_B1SD = torch.cat([latent_BSL, k_pe_BSR], dim=-1).unsqueeze(1)
        D = k_B1SD.shape[-1]
        k_BHSD = k_B1SD.expand(B, H, S, D)
        v_BHSL = latent_BSL.unsqueeze(1).expand(B, H, S, self.kv_lora_rank)
        # New query i sits at position past + i.
        mask = torch.ones(T, S, dtype=torch.bool, device=q_BHTD.device).tril(diagonal=past)
        o_BHTL = F.scaled_dot_product_attention(
            q_BHTD, k_BHSD, v_BHSL, attn_mask=mask, scale=self.scale
        )
        return torch.einsum("bhtl,hvl->bhtv", o_BHTL, w_uv_HVL)
