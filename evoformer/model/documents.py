"""Document masking for packed sequences: positions that restart per document, and attention
that never crosses a document boundary.

A training window packs several documents back to back. ``Documents`` describes which tokens
of a batch belong together: ``document_ids`` [B, T], where a document is a run of equal
consecutive ids. Inside a window a token attends only to earlier tokens of its own run, and its
position (RoPE, learned embeddings) counts from the start of the run, so every token sees what
it would see if its document were run alone.

The attention itself (``document_attention``) has two exact implementations:

- per document (CPU, and wherever flex does not apply): each run is its own causal SDPA call on
  the slices of q/k/v -- the same kernel on the same numbers as the document alone -- and the
  cross-document blocks a dense mask would still compute are skipped. Sliding windows and ALiBi
  are sliced from the full-window mask or bias, whose diagonal blocks equal the document-alone
  ones.
- ``flex_attention`` with a block mask (CUDA): one compiled kernel for the whole batch that
  skips the empty blocks, no host sync; for plain and sliding-window attention without dropout
  (ALiBi and attention dropout take the per-document path). On CPU flex runs forward only (its
  backward is not implemented there), so training never takes it.

Shapes: B batch, H heads, T sequence, D head dim (V value head dim).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from evoformer.model.sinks import sdpa_with_sinks


class Documents:
    """The document structure of a batch (``document_ids`` [B, T], any integer dtype)."""

    def __init__(self, document_ids_BT: torch.Tensor) -> None:
        if document_ids_BT.dim() != 2:
            raise ValueError(f"document_ids must be [B, T], got shape {document_ids_BT.shape}")
        self.ids = document_ids_BT
        B, T = document_ids_BT.shape
        starts_BT = torch.ones(B, T, dtype=torch.bool, device=document_ids_BT.device)
        starts_BT[:, 1:] = document_ids_BT[:, 1:] != document_ids_BT[:, :-1]
        self.starts = starts_BT
        idx_BT = torch.arange(T, device=document_ids_BT.device).expand(B, T)
        first_BT = torch.where(starts_BT, idx_BT, 0).cummax(dim=1).values
        self.positions = idx_BT - first_BT  # [B, T], 0 at each document's first token
        self._segments: list[tuple[tuple[int, int], ...]] | None = None
        self._block_masks: dict[tuple[int | None, int], Any] = {}

    @property
    def segments(self) -> list[tuple[tuple[int, int], ...]]:
        """Per row, the (start, end) of each document run (one host sync, then cached)."""
        if self._segments is None:
            T = self.ids.shape[1]
            rows = self.starts.cpu().tolist()
            segments = []
            for row in rows:
                first = [t for t, s in enumerate(row) if s]
                segments.append(tuple(zip(first, first[1:] + [T])))
            self._segments = segments
        return self._segments

    def block_mask(self, window: int | None, heads: int) -> Any:
        """flex_attention's block mask of causal attention inside documents (within
        ``window`` tokens when given), built once per forward and window."""
        key = (window, heads)
        if key not in self._block_masks:
            from torch.nn.attention.flex_attention import create_block_mask

            ids = self.ids

            def mask_mod(b, h, q, kv):
                allowed = (ids[b, q] == ids[b, kv]) & (q >= kv)
                return allowed & (q - kv < window) if window is not None else allowed

            B, T = ids.shape
            self._block_masks[key] = create_block_mask(
                mask_mod, B, None, T, T, device=str(ids.device)
            )
        return self._block_masks[key]

    def prefix(self, n: int) -> Documents:
        """The first ``n`` positions (MTP depth k runs on T - k of them)."""
        return Documents(self.ids[:, :n])


def document_attention(
    q_BHTD: torch.Tensor,
    k_BHTD: torch.Tensor,
    v_BHTV: torch.Tensor,
    docs: Documents,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    window: int | None = None,
    flex: bool | None = None,
    sinks_H: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention within each document of ``docs``: [B, H, T, V].

    ``mask``: the full window's additive bias or boolean mask ([T, T] or [H, T, T]: a sliding
    window of ``window`` tokens, ALiBi) when plain causal is not enough. ``flex``: use
    ``flex_attention`` (default: on CUDA when the attention is plain or windowed, no dropout,
    no sinks). ``sinks_H``: per-head sink logits (``model/sinks.py``), in every document's
    softmax.
    """
    alibi = mask is not None and mask.dtype != torch.bool
    if flex is None:
        flex = q_BHTD.is_cuda and not alibi and dropout_p == 0.0 and sinks_H is None
    if flex:
        if alibi or dropout_p or sinks_H is not None:
            raise ValueError("the flex path takes no ALiBi bias, attention dropout or sinks")
        block_mask = docs.block_mask(window, q_BHTD.shape[1])
        return _flex(q_BHTD.is_cuda)(q_BHTD, k_BHTD, v_BHTV, block_mask=block_mask, scale=scale)
    return _per_document(q_BHTD, k_BHTD, v_BHTV, docs, mask, scale, dropout_p, sinks_H)


@functools.cache
def _flex(compiled: bool) -> Callable[..., Any]:
    from torch.nn.attention.flex_attention import flex_attention

    # Compiled, flex generates one fused kernel; eager (CPU forward, tests) it materialises
    # the scores and is for checking only.
    return torch.compile(flex_attention) if compiled else flex_attention


def _per_document(
    q_BHTD: torch.Tensor,
    k_BHTD: torch.Tensor,
    v_BHTV: torch.Tensor,
    docs: Documents,
    mask: torch.Tensor | None,
    scale: float | None,
    dropout_p: float,
    sinks_H: torch.Tensor | None = None,
) -> torch.Tensor:
    """One SDPA call per document run (each using its diagonal block of ``mask``); rows with
    the same runs are computed together, so a batch without boundaries costs one call."""
    sdpa: Callable[..., torch.Tensor] = F.scaled_dot_product_attention
    if sinks_H is not None:
        sdpa = functools.partial(sdpa_with_sinks, sinks_H=sinks_H)

    def attend(rows: slice, start: int, end: int) -> torch.Tensor:
        q, k, v = (x[rows, :, start:end] for x in (q_BHTD, k_BHTD, v_BHTV))
        if mask is None:
            return sdpa(q, k, v, is_causal=end - start > 1, dropout_p=dropout_p, scale=scale)
        block = mask[..., start:end, start:end]
        return sdpa(q, k, v, attn_mask=block, dropout_p=dropout_p, scale=scale)

    segments = docs.segments
    if all(s == segments[0] for s in segments):
        whole = slice(None)
        parts = [attend(whole, s, e) for s, e in segments[0]]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    rows = []
    for b, runs in enumerate(segments):
        parts = [attend(slice(b, b + 1), s, e) for s, e in runs]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    return torch.cat(rows, dim=0)
