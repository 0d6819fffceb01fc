"""QK-clip (MuonClip, Kimi K2): keep every head's attention logits below a threshold.

During a training step each attention layer records, per query head, the largest pre-softmax
logit ``scale * q . k`` its forward computed (causal, inside the window and the document, as
the attention itself). After the optimizer step the maxima are reduced over the data-parallel
replicas (so every replica clips alike) and each head whose maximum ``m`` exceeds the
threshold ``tau`` has its query/key projections scaled so that the same inputs would give
logits of at most ``tau``: with ``gamma = tau / m``,

- MHA (one key head per query head): the head's query and key rows each by ``sqrt(gamma)``;
- GQA/MQA (a key head shared by several query heads): the query rows by ``gamma``;
- MLA: the head's ``q_nope`` and ``k_nope`` rows by ``sqrt(gamma)``, its ``q_rope`` rows by
  ``gamma``, and the shared rotary key untouched (Kimi K2's split).

Biases scale with their rows. Under tensor parallelism each rank owns its heads' rows and clips
them; the logged maximum is over every head (``qk/L<layer>/max_logit``). QK-norm would undo the
scaling (the norm comes after the projection), so configs with it are refused.

Shapes: B batch, H heads, T queries, S keys, D head dim.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.distributed as dist

from evoformer.model.documents import Documents

_CHUNK = 256  # queries per block of the logit maximum (bounds the [B, H, chunk, S] scores)


@torch.no_grad()
def max_attention_logits(
    q_BHTD: torch.Tensor,
    k_BHSD: torch.Tensor,
    scale: float | None,
    window: int | None = None,
    docs: Documents | None = None,
) -> torch.Tensor:
    """Per query head, the largest causal attention logit [H] (fp32; T == S, training)."""
    B, H, T, D = q_BHTD.shape
    s = scale if scale is not None else 1.0 / math.sqrt(D)
    k = k_BHSD.float()
    keys = torch.arange(T, device=q_BHTD.device)
    out = torch.full((H,), float("-inf"), device=q_BHTD.device)
    for t0 in range(0, T, _CHUNK):
        t1 = min(T, t0 + _CHUNK)
        logits = torch.einsum("bhtd,bhsd->bhts", q_BHTD[:, :, t0:t1].float(), k) * s
        queries = keys[t0:t1, None]
        allowed = keys[None, :] <= queries
        if window is not None:
            allowed = allowed & (queries - keys[None, :] < window)
        mask = allowed[None, None]
        if docs is not None:
            ids = docs.ids
            same = ids[:, t0:t1, None] == ids[:, None, :]
            mask = mask & same[:, None]
        logits = logits.masked_fill(~mask, float("-inf"))
        out = torch.maximum(out, logits.amax(dim=(0, 2, 3)))
    return out


class QKClip:
    """One attention layer's tracker: ``observe`` in forward, ``finish`` after the step."""

    def __init__(
        self,
        threshold: float,
        name: str,
        dp_group: dist.ProcessGroup | None,
        tp_group: dist.ProcessGroup | None,
    ) -> None:
        self.threshold = threshold
        self.name = name
        self.dp_group, self.tp_group = dp_group, tp_group
        self.max_H: torch.Tensor | None = None

    def observe(self, q_BHTD, k_BHSD, scale, window=None, docs=None) -> None:
        m = max_attention_logits(q_BHTD, k_BHSD, scale, window, docs)
        self.max_H = m if self.max_H is None else torch.maximum(self.max_H, m)

    def finish(self) -> tuple[torch.Tensor | None, dict[str, float]]:
        """(per-head factor ``gamma`` <= 1, or None when nothing to clip; the metrics).
        Collective over the dp and tp groups."""
        m, self.max_H = self.max_H, None
        if m is None:
            return None, {}
        if self.dp_group is not None and dist.get_world_size(self.dp_group) > 1:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=self.dp_group)
        top = m.max().reshape(1)
        if self.tp_group is not None and dist.get_world_size(self.tp_group) > 1:
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=self.tp_group)
        stats = {f"qk/{self.name}/max_logit": top.item()}
        gamma = (self.threshold / m).clamp(max=1.0)
        return (gamma if bool((gamma < 1).any()) else None), stats


@torch.no_grad()
def scale_head_rows(
    linear: torch.nn.Module, factor_H: torch.Tensor, rows_per_head: int, rows: slice
) -> None:
    """Multiply rows ``rows`` (within each head's ``rows_per_head``) of ``linear``'s weight
    (and bias) by the head's factor."""
    weight = cast(torch.Tensor, linear.weight)
    H = factor_H.numel()
    w = weight.view(H, rows_per_head, -1)
    w[:, rows] *= factor_H.to(w.dtype)[:, None, None]
    bias = getattr(linear, "bias", None)
    if bias is not None:
        b = bias.view(H, rows_per_head)
        b[:, rows] *= factor_H.to(b.dtype)[:, None]
