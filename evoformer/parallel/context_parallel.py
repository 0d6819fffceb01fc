"""Context parallelism: every sequence split over the cp group, attention across the split.

Layout. A sequence of T tokens is cut into 2 * cp equal chunks; cp rank i holds chunks i and
2 * cp - 1 - i (``shard_sequence``). Under causal attention chunk c attends to chunks 0..c, so a
rank holding one early and one late chunk does the same work as every other rank (the load
balancing of Megatron's and torchtitan's context parallelism). Token ids, targets and document
ids are tiny, so every cp rank receives the whole micro-batch and the model keeps its own
chunks; positions (RoPE, learned embeddings, document starts) are taken from the full sequence,
so a chunk's positions are exactly what one process gives those tokens.

Attention, ``context_attention`` (``parallel.cp_kind``):

- ``ring``: the K/V of each rank travel once around the cp group (``cp - 1`` point-to-point
  steps, each started before the local block is computed so the transfer overlaps it). Each
  (query chunk, key chunk) block with a mask from the tokens' global positions (sliding window,
  documents, ALiBi) is computed in fp32 math; unmasked and plain causal blocks go through the
  CPU flash kernel when the head dims allow (``_fused_available``; on CUDA the math path runs
  for now); blocks that the causal mask or the window makes empty are skipped; the partial
  results are merged by their log-sum-exp (online softmax). The backward
  (``_RingAttention.backward``) sends K/V around again, recomputes each block's probabilities
  from the saved log-sum-exp (flash-attention style: no [T, T] is kept), and sends the K/V
  gradients along with them, back to their owner after ``cp`` steps.
  GQA keys travel un-expanded (K heads, not H).
- ``alltoall`` (Ulysses): one all-to-all turns [B, H, T/cp] into [B, H/cp, T] for q, k and v
  (KV heads expanded first when they do not divide by cp), attention runs on the whole
  sequence for H/cp heads (SDPA), and one all-to-all turns the output back.

Both are written on ``torch.distributed`` point-to-point and all-to-all, so the same code runs
on gloo (the CPU parity tests) and NCCL. torch's experimental ``context_parallel`` is not used:
it rewrites SDPA calls on DTensors and covers neither gloo, nor MLA's value head dim, nor
document masks.

Shapes: B batch, H query heads, K kv heads, G = H / K, T local tokens (two chunks of N),
S the whole sequence, D query/key head dim, V value head dim.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from evoformer.parallel.collectives import group_rank, group_size


def chunk_ids(cp: int, rank: int) -> tuple[int, int]:
    """The two chunks of the 2 * cp that cp rank ``rank`` holds."""
    return rank, 2 * cp - 1 - rank


def shard_sequence(x: torch.Tensor, dim: int, cp: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s two chunks of the full-sequence ``x`` along ``dim``, concatenated."""
    n = x.shape[dim]
    if n % (2 * cp):
        raise ValueError(
            f"context parallelism: sequence length {n} is not divisible by 2*cp = {2 * cp}"
        )
    chunks = x.chunk(2 * cp, dim)
    a, b = chunk_ids(cp, rank)
    return torch.cat([chunks[a], chunks[b]], dim)


def local_positions(T: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """[T] global positions of the ``T`` local tokens of rank ``rank``."""
    N = T // 2
    a, b = chunk_ids(cp, rank)
    return torch.cat([torch.arange(a * N, a * N + N), torch.arange(b * N, b * N + N)]).to(device)


@torch.no_grad()
def gather_sequence(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """The full sequence from every rank's two chunks (forward only: logits for inference)."""
    cp = group_size(group)
    if cp == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(cp)]
    dist.all_gather(parts, x.contiguous(), group=group)
    halves = [p.chunk(2, dim) for p in parts]
    ordered = [halves[c][0] for c in range(cp)] + [halves[c][1] for c in reversed(range(cp))]
    return torch.cat(ordered, dim)


def context_attention(
    q_BHTD: torch.Tensor,
    k_BKTD: torch.Tensor,
    v_BKTV: torch.Tensor,
    group: dist.ProcessGroup | None,
    kind: str = "ring",
    scale: float | None = None,
    window: int | None = None,
    slopes_H: torch.Tensor | None = None,
    doc_ids_BS: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of this rank's two chunks over the whole sequence: [B, H, T, V].

    ``q`` / ``k`` / ``v``: this rank's tokens (RoPE applied with their global positions), K kv
    heads un-expanded. ``window``: sliding window in tokens; ``slopes_H``: ALiBi slopes of the
    H heads; ``doc_ids_BS``: document ids of the *whole* sequence (attention stays inside runs
    of equal ids). ``scale`` defaults to 1 / sqrt(D)."""
    scale = q_BHTD.shape[-1] ** -0.5 if scale is None else scale
    if kind == "ring":
        out = _RingAttention.apply(
            q_BHTD, k_BKTD, v_BKTV, group, scale, window, slopes_H, doc_ids_BS
        )
        return out  # pyright: ignore[reportReturnType]
    if kind == "alltoall":
        return ulysses_attention(q_BHTD, k_BKTD, v_BKTV, group, scale, window, slopes_H, doc_ids_BS)
    raise ValueError(f"unknown context-parallel attention {kind!r} (ring | alltoall)")


def cp_loss_weight(local_BT: torch.Tensor, full_BS: torch.Tensor, cp: int) -> torch.Tensor | float:
    """What turns this rank's mean loss over ``local_BT`` (its chunks of the targets ``full_BS``;
    < 0 ignored) into its share of the global mean, times cp: ``cp * n_local / n_global``
    (exactly 1 when every rank holds as many scored tokens)."""
    if cp == 1:
        return 1.0
    n_local = (local_BT >= 0).sum()
    return n_local * cp / (full_BS >= 0).sum().clamp(min=1)


# -- masks ------------------------------------------------------------------------------------


def attention_bias(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    window: int | None = None,
    slopes_H: torch.Tensor | None = None,
    ids_q_BT: torch.Tensor | None = None,
    ids_k_BT: torch.Tensor | None = None,
) -> torch.Tensor:
    """Additive fp32 scores bias [B|1, H|1, Tq, Tk] of queries at ``q_pos`` over keys at
    ``k_pos``: 0 where allowed (causal, inside the window, same document), -inf elsewhere, plus
    ALiBi's ``-slope_h * (q - k)`` when ``slopes_H`` is given."""
    dist_QK = q_pos[:, None] - k_pos[None, :]
    allowed = dist_QK >= 0
    if window is not None:
        allowed &= dist_QK < window
    allowed = allowed[None, None]
    if ids_q_BT is not None and ids_k_BT is not None:
        allowed = allowed & (ids_q_BT[:, None, :, None] == ids_k_BT[:, None, None, :])
    bias = torch.zeros(allowed.shape, dtype=torch.float32, device=q_pos.device)
    bias = bias.masked_fill(~allowed, float("-inf"))
    if slopes_H is not None:
        alibi = -slopes_H.float()[None, :, None, None] * dist_QK.float()[None, None]
        bias = bias + alibi
    return bias


def _block_needed(qc: int, kc: int, N: int, window: int | None) -> bool:
    """Whether query chunk ``qc`` sees anything of key chunk ``kc`` (causal, window)."""
    if kc > qc:
        return False
    return window is None or (qc - kc) * N - (N - 1) < window


def _needs_mask(qc: int, kc: int, N: int, window, slopes, ids) -> bool:
    if qc == kc or slopes is not None or ids is not None:
        return True
    return window is not None and (qc - kc) * N + (N - 1) >= window


# -- ring -------------------------------------------------------------------------------------


class _Ring:
    """The cp group's ring: this rank, its neighbours, and one exchange step."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.cp, self.rank = group_size(group), group_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.cp) if group else 0
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.cp) if group else 0

    def start(self, send: torch.Tensor) -> tuple[list, torch.Tensor]:
        """Send ``send`` to the next rank and receive the previous rank's (asynchronously)."""
        recv = torch.empty_like(send)
        ops = [
            dist.P2POp(dist.isend, send, self.next, self.group),
            dist.P2POp(dist.irecv, recv, self.prev, self.group),
        ]
        return dist.batch_isend_irecv(ops), recv

    @staticmethod
    def finish(pending: tuple[list, torch.Tensor]) -> torch.Tensor:
        for req in pending[0]:
            req.wait()
        return pending[1]


def _pack(*xs: torch.Tensor) -> torch.Tensor:
    return torch.cat([x.reshape(-1) for x in xs])


def _unpack(buf: torch.Tensor, *shapes: torch.Size) -> list[torch.Tensor]:
    out, start = [], 0
    for shape in shapes:
        out.append(buf[start : start + shape.numel()].view(shape))
        start += shape.numel()
    return out


class _Blocks:
    """The (query chunk, key chunk) blocks of one rank's queries against one source's keys."""

    def __init__(self, T, cp, rank, window, slopes_H, doc_ids_BS, device) -> None:
        self.N, self.cp, self.window = T // 2, cp, window
        self.mine = chunk_ids(cp, rank)
        self.slopes, self.ids, self.device = slopes_H, doc_ids_BS, device

    def pairs(self, src: int):
        """(query slice, key slice, bias or None, causal) of every non-empty block; ``causal``:
        the diagonal block of plain causal attention (``bias`` None: a fused kernel can take
        it with ``is_causal``)."""
        N = self.N
        plain = self.window is None and self.slopes is None and self.ids is None
        for qi, qc in enumerate(self.mine):
            for ki, kc in enumerate(chunk_ids(self.cp, src)):
                if not _block_needed(qc, kc, N, self.window):
                    continue
                bias, causal = None, plain and qc == kc
                if not causal and _needs_mask(qc, kc, N, self.window, self.slopes, self.ids):
                    bias = self._bias(qc, kc)
                yield slice(qi * N, qi * N + N), slice(ki * N, ki * N + N), bias, causal

    def causal_bias(self) -> torch.Tensor:
        """The diagonal block's causal mask as an additive bias [1, 1, 1, N, N]."""
        pos = torch.arange(self.N, device=self.device)
        return attention_bias(pos, pos).unsqueeze(2)

    def _bias(self, qc: int, kc: int) -> torch.Tensor:
        N = self.N
        q_pos = torch.arange(qc * N, qc * N + N, device=self.device)
        k_pos = torch.arange(kc * N, kc * N + N, device=self.device)
        ids_q = ids_k = None
        if self.ids is not None:
            ids_q, ids_k = self.ids[:, q_pos], self.ids[:, k_pos]
        bias = attention_bias(q_pos, k_pos, self.window, self.slopes, ids_q, ids_k)
        # [b, 1, 1, Tq, Tk] for every head; ALiBi's [b, H, Tq, Tk] is grouped in _scores
        return bias.unsqueeze(2) if self.slopes is None else bias


def _fused_available(q_BHTD: torch.Tensor, v_dim: int) -> bool:
    """Whether unmasked and causal blocks can run in a fused kernel that returns the
    log-sum-exp: the CPU flash kernel (same q/k/v head dim). Elsewhere (CUDA, MLA's value dim)
    every block is fp32 math."""
    return q_BHTD.device.type == "cpu" and q_BHTD.shape[-1] == v_dim


def _heads(x_BKGND: torch.Tensor) -> torch.Tensor:
    B, K, G, N, D = x_BKGND.shape
    return x_BKGND.reshape(B, K * G, N, D)


def _expand(x_BKND: torch.Tensor, G: int) -> torch.Tensor:
    B, K, N, D = x_BKND.shape
    return x_BKND[:, :, None].expand(B, K, G, N, D).reshape(B, K * G, N, D)


def _fused_block(q, k, v, qs, ks, causal: bool, scale: float):
    """(output [B, K, G, N, V], log-sum-exp [B, K, G, N]) of one block in the fused kernel."""
    B, K, G = q.shape[:3]
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        _heads(q[..., qs, :]).contiguous(),
        _expand(k[..., ks, :], G).contiguous(),
        _expand(v[..., ks, :], G).contiguous(),
        0.0,
        causal,
        scale=scale,
    )
    return o.view(B, K, G, *o.shape[2:]), lse.view(B, K, G, -1)


def _fused_block_backward(dO, q, k, v, out, lse, qs, ks, causal: bool, scale: float):
    """(dq [B, K, G, N, D], dk, dv [B, K, N, ...]) of one block: the fused kernel's backward
    given the *merged* output and log-sum-exp, which is exactly this block's share."""
    B, K, G = q.shape[:3]
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        _heads(dO[..., qs, :]).contiguous(),
        _heads(q[..., qs, :]).contiguous(),
        _expand(k[..., ks, :], G).contiguous(),
        _expand(v[..., ks, :], G).contiguous(),
        _heads(out[..., qs, :]).contiguous(),
        lse[..., qs].reshape(B, K * G, -1).contiguous(),
        0.0,
        causal,
        scale=scale,
    )
    N = dq.shape[2]
    return (
        dq.view(B, K, G, N, -1),
        dk.view(B, K, G, N, -1).sum(2),
        dv.view(B, K, G, N, -1).sum(2),
    )


def _scores(q_BKGND, k_BKND, bias, scale: float) -> torch.Tensor:
    s = torch.matmul(q_BKGND, k_BKND.unsqueeze(2).transpose(-1, -2)) * scale
    if bias is not None:
        if bias.dim() == 4:  # per-head (ALiBi) [b, H, Tq, Tk]
            b, _, Tq, Tk = bias.shape
            bias = bias.view(b, s.shape[1], s.shape[2], Tq, Tk)
        s = s + bias
    return s


class _RingAttention(torch.autograd.Function):
    """Ring attention with its own backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, q_BHTD, k_BKTD, v_BKTV, group, scale, window, slopes_H, doc_ids_BS):
        # fp32 blocks whatever the autocast around the model (bf16 / fp16 q, k, v come in and
        # the output leaves in their dtype)
        with torch.autocast(q_BHTD.device.type, enabled=False):
            return _RingAttention._forward(
                ctx, q_BHTD, k_BKTD, v_BKTV, group, scale, window, slopes_H, doc_ids_BS
            )

    @staticmethod
    def _forward(ctx, q_BHTD, k_BKTD, v_BKTV, group, scale, window, slopes_H, doc_ids_BS):
        ring = _Ring(group)
        B, H, T, D = q_BHTD.shape
        K, Vd = k_BKTD.shape[1], v_BKTV.shape[-1]
        if T % 2:
            raise ValueError(f"ring attention: {T} local tokens are not two equal chunks")
        blocks = _Blocks(T, ring.cp, ring.rank, window, slopes_H, doc_ids_BS, q_BHTD.device)
        fused = _fused_available(q_BHTD, Vd)
        q = q_BHTD.float().view(B, K, H // K, T, D)
        m = torch.full((B, K, H // K, T), float("-inf"), device=q.device)
        l_ = torch.zeros_like(m)
        acc = torch.zeros(B, K, H // K, T, Vd, device=q.device)
        shapes = (k_BKTD.shape, v_BKTV.shape)
        kv = _pack(k_BKTD, v_BKTV)
        for step in range(ring.cp):
            pending = ring.start(kv) if step < ring.cp - 1 else None
            k, v = (x.float() for x in _unpack(kv, *shapes))
            src = (ring.rank - step) % ring.cp
            for qs, ks, bias, causal in blocks.pairs(src):
                if bias is None and fused:  # the block's normalised output and log-sum-exp
                    o_blk, lse_blk = _fused_block(q, k, v, qs, ks, causal, scale)
                    m_old = m[..., qs]
                    m_new = torch.maximum(m_old, lse_blk)
                    alpha, beta = torch.exp(m_old - m_new), torch.exp(lse_blk - m_new)
                    l_[..., qs] = l_[..., qs] * alpha + beta
                    acc[..., qs, :] = acc[..., qs, :] * alpha[..., None] + o_blk * beta[..., None]
                    m[..., qs] = m_new
                    continue
                if causal:
                    bias = blocks.causal_bias()
                s = _scores(q[..., qs, :], k[..., ks, :], bias, scale)
                m_old = m[..., qs]
                m_new = torch.maximum(m_old, s.amax(-1))
                m_safe = torch.where(torch.isinf(m_new), 0.0, m_new)
                alpha = torch.exp(m_old - m_safe)
                p = torch.exp(s - m_safe[..., None])
                l_[..., qs] = l_[..., qs] * alpha + p.sum(-1)
                acc[..., qs, :] = acc[..., qs, :] * alpha[..., None] + torch.matmul(
                    p, v[..., ks, :].unsqueeze(2)
                )
                m[..., qs] = m_new
            if pending is not None:
                kv = ring.finish(pending)
        out = acc / l_[..., None]
        lse = m + torch.log(l_)
        ctx.save_for_backward(q_BHTD, k_BKTD, v_BKTV, out, lse)
        ctx.args = (group, scale, window, slopes_H, doc_ids_BS)
        return out.view(B, H, T, Vd).to(q_BHTD.dtype)

    @staticmethod
    def backward(ctx, grad_BHTV):
        with torch.autocast(grad_BHTV.device.type, enabled=False):
            return _RingAttention._backward(ctx, grad_BHTV)

    @staticmethod
    def _backward(ctx, grad_BHTV):
        q_BHTD, k_BKTD, v_BKTV, out, lse = ctx.saved_tensors
        group, scale, window, slopes_H, doc_ids_BS = ctx.args
        ring = _Ring(group)
        B, H, T, D = q_BHTD.shape
        K = k_BKTD.shape[1]
        blocks = _Blocks(T, ring.cp, ring.rank, window, slopes_H, doc_ids_BS, q_BHTD.device)
        fused = _fused_available(q_BHTD, v_BKTV.shape[-1])
        q = q_BHTD.float().view(B, K, H // K, T, D)
        dO = grad_BHTV.float().reshape(out.shape)
        delta = (dO * out).sum(-1)  # [B, K, G, T]
        dq = torch.zeros_like(q)
        shapes = (k_BKTD.shape, v_BKTV.shape)
        kv = _pack(k_BKTD, v_BKTV)
        dkv = torch.zeros(kv.numel(), dtype=torch.float32, device=q.device)
        for step in range(ring.cp):
            pending = ring.start(kv) if step < ring.cp - 1 else None
            k, v = (x.float() for x in _unpack(kv, *shapes))
            dk, dv = _unpack(dkv, *shapes)
            src = (ring.rank - step) % ring.cp
            for qs, ks, bias, causal in blocks.pairs(src):
                if bias is None and fused:
                    dq_b, dk_b, dv_b = _fused_block_backward(
                        dO, q, k, v, out, lse, qs, ks, causal, scale
                    )
                    dq[..., qs, :] += dq_b
                    dk[..., ks, :] += dk_b
                    dv[..., ks, :] += dv_b
                    continue
                if causal:
                    bias = blocks.causal_bias()
                s = _scores(q[..., qs, :], k[..., ks, :], bias, scale)
                p = torch.exp(s - lse[..., qs, None])
                dO_q = dO[..., qs, :]
                dv[..., ks, :] += torch.matmul(p.transpose(-1, -2), dO_q).sum(2)
                dp = torch.matmul(dO_q, v[..., ks, :].unsqueeze(2).transpose(-1, -2))
                ds = p * (dp - delta[..., qs, None])
                dq[..., qs, :] += torch.matmul(ds, k[..., ks, :].unsqueeze(2)) * scale
                dk[..., ks, :] += torch.matmul(ds.transpose(-1, -2), q[..., qs, :]).sum(2) * scale
            if ring.cp > 1:
                # the K/V gradients follow their K/V; after cp steps they are back home
                dkv = ring.finish(ring.start(dkv))
            if pending is not None:
                kv = ring.finish(pending)
        dk, dv = _unpack(dkv, *shapes)
        return (
            dq.view(B, H, T, D).to(q_BHTD.dtype),
            dk.to(k_BKTD.dtype),
            dv.to(v_BKTV.dtype),
            None,
            None,
            None,
            None,
            None,
        )


def ring_step_bytes(k_BKTD: torch.Size, v_BKTV: torch.Size, element_size: int) -> int:
    """Bytes one ring step sends per rank in the forward (its K and V); the backward sends
    these again plus the fp32 K/V gradients."""
    return (k_BKTD.numel() + v_BKTV.numel()) * element_size


# -- all-to-all (Ulysses) ---------------------------------------------------------------------


class _AllToAll(torch.autograd.Function):
    """Equal-split all-to-all along dim 0 ([cp, ...]); its backward is the same exchange."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()  # then empty_like is contiguous too (it keeps permuted strides)
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


def _seq_to_heads(x_BHTD: torch.Tensor, group, cp: int) -> torch.Tensor:
    """[B, H, T, D] (two chunks) -> [B, H/cp, S, D] (the whole sequence in order)."""
    B, H, T, D = x_BHTD.shape
    N = T // 2
    send = x_BHTD.view(B, cp, H // cp, T, D).transpose(0, 1)
    got = _AllToAll.apply(send.contiguous(), group)  # [cp (source rank), B, h, T, D]
    got = got.view(cp, B, H // cp, 2, N, D)  # pyright: ignore[reportAttributeAccessIssue]
    first = got[:, :, :, 0].permute(1, 2, 0, 3, 4)  # chunks 0..cp-1: sources in order
    second = got[:, :, :, 1].flip(0).permute(1, 2, 0, 3, 4)  # chunks cp..2cp-1: reversed
    return torch.cat([first, second], dim=2).reshape(B, H // cp, 2 * cp * N, D)


def _heads_to_seq(x_BhSV: torch.Tensor, group, cp: int) -> torch.Tensor:
    """The inverse of ``_seq_to_heads``: [B, H/cp, S, V] -> [B, H, T, V]."""
    B, h, S, Vd = x_BhSV.shape
    N = S // (2 * cp)
    chunks = x_BhSV.view(B, h, 2 * cp, N, Vd)
    first, second = chunks[:, :, :cp], chunks[:, :, cp:].flip(2)  # by destination rank
    send = torch.stack([first, second], dim=3).permute(2, 0, 1, 3, 4, 5)  # [cp, B, h, 2, N, V]
    got = _AllToAll.apply(send.reshape(cp, B, h, 2 * N, Vd).contiguous(), group)
    return got.transpose(0, 1).reshape(B, cp * h, 2 * N, Vd)  # pyright: ignore


def ulysses_attention(q_BHTD, k_BKTD, v_BKTV, group, scale, window, slopes_H, doc_ids_BS):
    """All-to-all context parallelism (see the module docstring)."""
    cp, rank = group_size(group), group_rank(group)
    H, K = q_BHTD.shape[1], k_BKTD.shape[1]
    if H % cp:
        raise ValueError(f"cp_kind=alltoall: {H} heads are not divisible by cp={cp}")
    if K % cp:  # every head group needs its own KV heads: expand them to the query heads
        k_BKTD = k_BKTD.repeat_interleave(H // K, dim=1)
        v_BKTV = v_BKTV.repeat_interleave(H // K, dim=1)
    q, k, v = (_seq_to_heads(x, group, cp) for x in (q_BHTD, k_BKTD, v_BKTV))
    h = H // cp
    slopes = slopes_H[rank * h : (rank + 1) * h] if slopes_H is not None else None
    out = dense_attention(q, k, v, scale, window, slopes, doc_ids_BS)
    return _heads_to_seq(out, group, cp)


def dense_attention(q_BHSD, k_BKSD, v_BKSV, scale, window=None, slopes_H=None, doc_ids_BS=None):
    """Causal SDPA over a whole sequence with the masks of ``attention_bias``."""
    B, H, S, _ = q_BHSD.shape
    K = k_BKSD.shape[1]
    if K != H:
        k_BKSD = k_BKSD.repeat_interleave(H // K, dim=1)
        v_BKSV = v_BKSV.repeat_interleave(H // K, dim=1)
    if window is None and slopes_H is None and doc_ids_BS is None:
        return F.scaled_dot_product_attention(q_BHSD, k_BKSD, v_BKSV, is_causal=True, scale=scale)
    pos = torch.arange(S, device=q_BHSD.device)
    bias = attention_bias(pos, pos, window, slopes_H, doc_ids_BS, doc_ids_BS).to(q_BHSD.dtype)
    return F.scaled_dot_product_attention(q_BHSD, k_BKSD, v_BKSV, attn_mask=bias, scale=scale)
