"""Attention sinks (gpt-oss): a learned logit per head that joins every query's softmax
denominator without contributing a value, so a head can put weight on "nothing":

    p_ts = exp(l_ts) / (exp(s_h) + sum_s' exp(l_ts'))      out_t = sum_s p_ts v_s

Exactly that is SDPA over one extra key/value pair: a zero key and a zero value whose score is
the additive mask's entry ``s_h``. So the sink rides on whatever attention is asked for -- plain
causal, a sliding window, ALiBi, a document's diagonal block, a decoding step against a cache --
by turning its mask (or ``is_causal``) into an additive bias [.., H, T, S] and appending the sink
column; SDPA's autograd gives the sink its gradient through the mask. The price is a materialised
bias of H x T x (S + 1) (the flash kernels take no per-head logit; a fused sink kernel is for the
GPU backends). Dropout drops the sink's zero-value column to no effect, as in HF, where the
sink's probability is removed before dropout.

Shapes: B batch, H heads, T queries, S keys, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sdpa_with_sinks(
    q_BHTD: torch.Tensor,
    k_BHSD: torch.Tensor,
    v_BHSD: torch.Tensor,
    sinks_H: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with the per-head sink logits ``sinks_H`` in the
    softmax denominator; ``attn_mask`` (bool or additive, [T, S], [H, T, S] or [B, H, T, S])
    and ``is_causal`` (top-left aligned, as SDPA's) mean what they mean there."""
    B, H, T, D = q_BHTD.shape
    S = k_BHSD.shape[2]
    dtype = q_BHTD.dtype
    if attn_mask is None:
        allowed_TS = torch.ones(T, S, dtype=torch.bool, device=q_BHTD.device)
        attn_mask = allowed_TS.tril() if is_causal else allowed_TS
    if attn_mask.dtype == torch.bool:
        bias = torch.zeros(attn_mask.shape, dtype=dtype, device=q_BHTD.device)
        bias = bias.masked_fill(~attn_mask, float("-inf"))
    else:
        bias = attn_mask.to(dtype)
    while bias.dim() < 4:
        bias = bias.unsqueeze(0)
    bias = bias.expand(bias.shape[0], H, T, S)
    sink = sinks_H.to(dtype).view(1, H, 1, 1).expand(bias.shape[0], H, T, 1)
    bias_BHTS1 = torch.cat([bias, sink], dim=-1)
    k = torch.cat([k_BHSD, k_BHSD.new_zeros(B, H, 1, D)], dim=2)
    v = torch.cat([v_BHSD, v_BHSD.new_zeros(B, H, 1, v_BHSD.shape[-1])], dim=2)
    return F.scaled_dot_product_attention(
        q_BHTD, k, v, attn_mask=bias_BHTS1, dropout_p=dropout_p, scale=scale
    )
