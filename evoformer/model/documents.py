"""Document masking for packed sequences: positions that restart per document, and attention
that never crosses a document boundary.

A training window packs several documents back to back. ``Documents`` describes which tokens
of a batch belong together: ``document_ids`` [B, T], where a document is a run of equal
consecutive ids. Inside a window a token attends only to earlier tokens of its own run, and its
position (RoPE, learned embeddings) counts from the start of the run, so every token sees what
it would see if its document were run alone.

The attention itself is computed per document (``document_attention``): each run is its own
causal SDPA call on the slices of q/k/v, which is exact (the same kernel on the same numbers as
the document alone) and skips the cross-document blocks a dense mask would still compute.
Sliding windows and ALiBi are sliced from the full-window mask or bias, whose values inside a
diagonal block equal those of the document alone.

Shapes: B batch, H heads, T sequence, D head dim (V value head dim).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


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
) -> torch.Tensor:
    """Causal SDPA within each document of ``docs``: [B, H, T, V].

    ``mask``: the full window's additive bias or boolean mask ([T, T] or [H, T, T]: a sliding
    window, ALiBi) when plain causal is not enough; each document uses its diagonal block.
    Rows with the same runs are computed together, so a batch without boundaries costs one call.
    """
    sdpa: Callable[..., torch.Tensor] = F.scaled_dot_product_attention

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
