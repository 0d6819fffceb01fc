"""Multi-head attention with grouped KV heads (MHA / GQA / MQA) through SDPA, with a KV cache.

Variants, each a config choice: q/k/v biases (Qwen2), QK-norm per head (Qwen3, Gemma 3) or over
the whole projection (OLMo 2), sliding windows (Mistral; Gemma 3's local layers), ALiBi biases
(BLOOM, MPT), an explicit softmax scale (Gemma's query_pre_attn_scalar) and attention sinks
(gpt-oss: ``model/sinks.py``, on every path below). The default path (no window, no ALiBi, no
sinks) hands SDPA ``is_causal=True`` and builds no mask at all.

Tensor parallelism (``ctx.tp > 1``) splits the heads: q/k/v are column-parallel (this rank's
``n_heads / tp`` query heads and their KV heads), o_proj row-parallel. With fewer KV heads than
tp the k/v projections stay replicated and each rank computes the one KV head its query heads
read; their weight gradients are partial and summed over TP with the sequence-parallel ones.

Shapes: B batch, T new tokens, S cached + new tokens, H query heads, K kv heads, D head dim
(on this rank: H and K are its local heads under tensor parallelism).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn

from evoformer.config.schema import ModelConfig
from evoformer.model.documents import Documents, document_attention
from evoformer.model.layout import AttentionSpec, LayerSpec, attention_spec
from evoformer.model.norms import RMSNorm, sharded_rms_norm
from evoformer.model.positions import alibi_slopes, apply_rope
from evoformer.model.qk_clip import QKClip, scale_head_rows
from evoformer.model.sdpa import attend, expand_kv
from evoformer.model.sinks import sdpa_with_sinks
from evoformer.parallel.context import ParallelContext
from evoformer.parallel.context_parallel import context_attention
from evoformer.parallel.sharding import mark_partial_grad, mark_sharded

if TYPE_CHECKING:  # mla imports this module
    from evoformer.model.mla import LatentCache, MultiHeadLatentAttention


class KVCache:
    """Preallocated keys/values of one layer for incremental decoding.

    Sliding-window layers keep every position too: the mask hides the ones outside the window,
    so cached and uncached decoding compute the same function.
    """

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


if TYPE_CHECKING:
    LayerCache = KVCache | LatentCache  # what one layer's attention decodes with


# -- masks and biases -------------------------------------------------------------------------


def causal_window_mask(
    T: int, S: int, window: int | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """[T, S] bool, True where new token t may attend key s. The T new tokens are the last of
    the S positions (query t sits at q = S - T + t); it sees keys ``q - window < s <= q``, i.e.
    itself and the ``window - 1`` tokens before it (HF: ``kv_idx > q_idx - sliding_window``)."""
    dist_TS = _distance(T, S, device)
    allowed = dist_TS >= 0
    if window is not None:
        allowed &= dist_TS < window
    return allowed


def alibi_bias(
    n_heads: int,
    T: int,
    S: int,
    window: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    heads: tuple[int, int] | None = None,
) -> torch.Tensor:
    """[H, T, S] additive ALiBi scores: ``-slope_h * (q - s)`` where allowed, ``-inf`` elsewhere
    (causal, and outside the window if any). Built in fp32, then cast to the scores' dtype.
    ``heads=(start, end)`` keeps only those of the ``n_heads`` slopes (a tensor-parallel shard)."""
    dist_TS = _distance(T, S, device)
    slopes_H = alibi_slopes(n_heads).to(device=device, dtype=torch.float32)
    if heads is not None:
        slopes_H = slopes_H[heads[0] : heads[1]]
    bias = -slopes_H[:, None, None] * dist_TS.to(torch.float32)
    allowed = causal_window_mask(T, S, window, device)
    return bias.masked_fill(~allowed, float("-inf")).to(dtype)


def _distance(T: int, S: int, device) -> torch.Tensor:
    q_T = torch.arange(S - T, S, device=device)
    return q_T[:, None] - torch.arange(S, device=device)[None, :]


# Block.forward carries no per-forward context, so layers share masks through these memos: one
# build per distinct (shape, window, offset) serves every layer of a forward pass, and the
# training shape is built once per run. Masks made under inference_mode are inference tensors
# that autograd may not save, hence the flag in the key.
@functools.lru_cache(maxsize=8)
def _shared_mask(T: int, S: int, window: int | None, device, _inference: bool) -> torch.Tensor:
    return causal_window_mask(T, S, window, device)


@functools.lru_cache(maxsize=4)
def _shared_alibi(
    n_heads: int,
    heads: tuple[int, int],
    T: int,
    S: int,
    window: int | None,
    dtype,
    device,
    _inference: bool,
) -> torch.Tensor:
    return alibi_bias(n_heads, T, S, window, dtype, device, heads)


# -- attention --------------------------------------------------------------------------------


class Attention(nn.Module):
    """Causal self-attention; ``n_kv_heads < n_heads`` shares each KV head across a group."""

    def __init__(self, a: AttentionSpec, ctx: ParallelContext | None = None) -> None:
        super().__init__()
        self.ctx = ctx = ctx or ParallelContext()
        self.tp = tp = ctx.tp
        H, K = a.n_heads, a.kv_heads
        self.head_dim = D = a.head_dim
        if H % tp or (K % tp and tp % K):
            raise ValueError(
                f"tensor parallelism: tp={tp} must divide n_heads={H}, and divide or be a "
                f"multiple of n_kv_heads={K}"
            )
        self.n_heads = H // tp  # this rank's query heads
        self.head_start = ctx.tp_rank * self.n_heads  # their global index (ALiBi slopes)
        self.total_heads = H
        # KV heads with tp > K: every rank keeps the full (replicated) k/v projections and
        # computes the single KV head its query heads read.
        self.kv_head = None if K % tp == 0 else ctx.tp_rank * K // tp
        self.n_kv_heads = K // tp if self.kv_head is None else 1
        self.dropout = a.dropout
        self.scale = a.scale
        self.window = a.window
        self.alibi = a.alibi
        self.sdpa_kernel = a.sdpa_kernel
        self.qk_norm = a.qk_norm
        self.qk_clip: QKClip | None = None  # optim.qk_clip, attached by engine.parallelize
        qkv_bias = a.qkv_bias
        C, q_out, kv_out = a.d_model, H * D, K * D
        # Gated attention (Qwen3-Next): q_proj also yields each head's output gate, stored
        # per head as [q_h | gate_h], so a head-split shard keeps its heads' gates.
        self.output_gate = a.output_gate
        q_rows = 2 * q_out if a.output_gate else q_out
        self.q_proj = ctx.column(C, q_rows, qkv_bias, explicit_comm=True)
        if self.kv_head is None:
            self.k_proj = ctx.column(C, kv_out, qkv_bias, explicit_comm=True)
            self.v_proj = ctx.column(C, kv_out, qkv_bias, explicit_comm=True)
        else:
            self.k_proj = nn.Linear(C, kv_out, bias=qkv_bias)
            self.v_proj = nn.Linear(C, kv_out, bias=qkv_bias)
            for proj in (self.k_proj, self.v_proj):
                mark_partial_grad(proj, "weight", "bias")
        self.o_proj = ctx.row(q_out, C, a.bias)
        self.o_proj.is_residual_out = True  # pyright: ignore[reportArgumentType]
        self.sinks: nn.Parameter | None = None
        if a.sinks:  # one logit per query head, split with the heads under TP
            self.sinks = nn.Parameter(torch.empty(self.n_heads))
            if tp > 1:
                mark_sharded(self, "sinks", 0, H)
        if a.qk_norm != "none":
            # RMSNorm in every model that has one; Gemma's unit offset follows model.norm.
            q_dim, k_dim = (D, D) if a.qk_norm == "head" else (q_out, kv_out)
            self.q_width, self.k_width = q_dim, k_dim
            k_sharded = a.qk_norm == "full" and self.kv_head is None
            q_local = q_dim // tp if a.qk_norm == "full" else q_dim
            k_local = k_dim // tp if k_sharded else k_dim
            self.q_norm = RMSNorm(q_local, a.norm_eps, a.norm_unit_offset)
            self.k_norm = RMSNorm(k_local, a.norm_eps, a.norm_unit_offset)
            if tp > 1:
                # Full norm: the gain is sharded like the projection; per-head norm (and the
                # full k norm over replicated KV heads): one gain, used for this rank's heads.
                for norm, sharded, width in (
                    (self.q_norm, a.qk_norm == "full", q_dim),
                    (self.k_norm, k_sharded, k_dim),
                ):
                    if sharded:
                        mark_sharded(norm, "weight", 0, width)
                    else:
                        mark_partial_grad(norm, "weight")

    def reset_parameters(self) -> None:
        if self.sinks is not None:
            self.sinks.zero_()  # exp(0) = one extra unit of denominator to start from

    def new_cache(self, batch: int, max_len: int, device, dtype) -> KVCache:
        return KVCache(batch, self.n_kv_heads, max_len, self.head_dim, device, dtype)

    def forward(
        self,
        x_BTC: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
        docs: Documents | None = None,
    ) -> torch.Tensor:
        """``docs``: attend within documents only (packed training windows; no cache)."""
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        if self.tp > 1:
            x_BTC = self.ctx.enter(x_BTC)  # once for q, k and v (SP: gathers the sequence)
            q, k, v = self._project_tp(x_BTC)
        else:
            q, k, v = self.q_proj(x_BTC), self.k_proj(x_BTC), self.v_proj(x_BTC)
            if self.qk_norm == "full":  # OLMo 2: over the whole projection, before head split
                q, k = self.q_norm(q), self.k_norm(k)
        B, T, _ = x_BTC.shape
        gate = None
        if self.output_gate:
            q_gate = q.view(B, T, H, 2 * D)
            q, gate = q_gate[..., :D], q_gate[..., D:].reshape(B, T, H * D)
        q = q.reshape(B, T, H, D).transpose(1, 2)
        k = k.view(B, T, K, D).transpose(1, 2)
        v = v.view(B, T, K, D).transpose(1, 2)
        if self.qk_norm == "head":  # Qwen3, Gemma 3: each head on its own, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.ctx.cp > 1:  # this rank's chunks of a context-parallel sequence
            return self._gated_o_proj(cp_attention(self, q, k, v, cache, docs), gate)
        past = cache.length if cache is not None else 0
        if cache is not None:
            k, v = cache.append(k, v)
        S = k.shape[2]
        mask = None
        if self.alibi:
            inference = torch.is_inference_mode_enabled()
            heads = (self.head_start, self.head_start + H)
            mask = _shared_alibi(
                self.total_heads, heads, T, S, self.window, q.dtype, q.device, inference
            )
        elif self.window is not None and S > self.window:
            mask = _shared_mask(T, S, self.window, q.device, torch.is_inference_mode_enabled())
        elif past and T > 1:
            # Several new tokens after a prefill: new token t sits at position past + t.
            mask = _shared_mask(T, S, None, q.device, torch.is_inference_mode_enabled())
        dropout = self.dropout if self.training else 0.0
        if self.qk_clip is not None and self.training and past == 0:
            self.qk_clip.observe(q, expand_kv(k, H), self.scale, self.window, docs)
        if docs is not None:
            # Expand KV heads to the query heads (as HF's repeat_kv): every path takes it.
            k, v = expand_kv(k, H), expand_kv(v, H)
            out = document_attention(
                q, k, v, docs, mask, self.scale, dropout, self.window, sinks_H=self.sinks
            )
            return self._output(out, gate)
        # Without a mask: plain causal from the start, or one new token that sees everything.
        causal = mask is None and past == 0 and T > 1
        if self.sinks is not None:
            k, v = expand_kv(k, H), expand_kv(v, H)
            out = sdpa_with_sinks(q, k, v, self.sinks, mask, causal, dropout, self.scale)
        else:
            out = attend(
                q,
                k,
                v,
                mask=mask,
                causal=causal,
                dropout=dropout,
                scale=self.scale,
                kernel=self.sdpa_kernel,
            )
        return self._output(out, gate)

    def _output(self, out_BHTD: torch.Tensor, gate_BTX: torch.Tensor | None) -> torch.Tensor:
        """o_proj of the heads' outputs, gated by sigmoid(gate) first when configured."""
        B, H, T, D = out_BHTD.shape
        return self._gated_o_proj(out_BHTD.transpose(1, 2).reshape(B, T, H * D), gate_BTX)

    def _gated_o_proj(self, out_BTX: torch.Tensor, gate_BTX: torch.Tensor | None) -> torch.Tensor:
        if gate_BTX is not None:
            out_BTX = out_BTX * torch.sigmoid(gate_BTX)
        return self.o_proj(out_BTX)

    def end_of_step(self) -> dict[str, float]:
        """QK-clip after the optimizer step (``model.qk_clip``): collective over dp and tp."""
        if self.qk_clip is None:
            return {}
        gamma_H, stats = self.qk_clip.finish()
        if gamma_H is not None:
            D = self.head_dim
            if self.n_kv_heads == self.n_heads and self.kv_head is None:  # MHA: split the factor
                root = gamma_H.sqrt()
                scale_head_rows(self.q_proj, root, D, slice(None))
                scale_head_rows(self.k_proj, root, D, slice(None))
            else:  # shared key heads: the query rows carry it all
                scale_head_rows(self.q_proj, gamma_H, D, slice(None))
        return stats

    def _project_tp(self, x_BTC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of this rank's heads from the (entered) input, QK-norm "full" applied."""
        q = self.q_proj(x_BTC)
        group = self.ctx.tp_group
        if self.kv_head is None:
            k, v = self.k_proj(x_BTC), self.v_proj(x_BTC)
            if self.qk_norm == "full":  # one all-reduce carries both statistics
                q, k = sharded_rms_norm(
                    [q, k], [self.q_norm, self.k_norm], [self.q_width, self.k_width], group
                )
            return q, k, v
        rows = slice(self.kv_head * self.head_dim, (self.kv_head + 1) * self.head_dim)
        if self.qk_norm == "full":
            # The k statistic spans every KV head: project them all (replicated), keep ours.
            k = self.k_norm(self.k_proj(x_BTC))[..., rows]
            (q,) = sharded_rms_norm([q], [self.q_norm], [self.q_width], group)
        else:
            k = _linear_rows(x_BTC, cast(nn.Linear, self.k_proj), rows)  # replicated: Linear
        return q, k, _linear_rows(x_BTC, cast(nn.Linear, self.v_proj), rows)


def _linear_rows(x: torch.Tensor, linear: nn.Linear, rows: slice) -> torch.Tensor:
    """``linear(x)[..., rows]`` computing only those output rows."""
    bias = None if linear.bias is None else linear.bias[rows]
    return F.linear(x, linear.weight[rows], bias)


def cp_attention(
    attn: Attention | MultiHeadLatentAttention, q_BHTD, k_BKTD, v_BKTV, cache, docs
) -> torch.Tensor:
    """Attention of ``attn``'s layer under context parallelism (``parallel.cp``): this rank's
    two sequence chunks attend over the whole sequence through the cp group; [B, T, H * V]."""
    if cache is not None:
        raise ValueError("context parallelism (parallel.cp > 1) is for training: no KV cache")
    slopes = None
    if isinstance(attn, Attention) and attn.alibi:
        first = attn.head_start
        slopes = alibi_slopes(attn.total_heads)[first : first + q_BHTD.shape[1]].to(q_BHTD.device)
    ctx = attn.ctx
    out_BHTV = context_attention(
        q_BHTD,
        k_BKTD,
        v_BKTV,
        ctx.cp_group,
        ctx.cp_kind,
        attn.scale,
        getattr(attn, "window", None),
        slopes,
        docs.ids if docs is not None else None,
    )
    B, H, T, V = out_BHTV.shape
    return out_BHTV.transpose(1, 2).reshape(B, T, H * V)


def build_attention(
    cfg: ModelConfig, spec: LayerSpec, ctx: ParallelContext | None = None
) -> Attention | MultiHeadLatentAttention:
    """The attention sub-layer of the block ``spec`` describes."""
    sub = attention_spec(cfg, spec)
    if isinstance(sub, AttentionSpec):
        return Attention(sub, ctx)
    from evoformer.model.mla import MultiHeadLatentAttention

    return MultiHeadLatentAttention(sub, ctx)
