"""LM head and cross-entropy fused and chunked: the ``[N, V]`` logits exist one chunk at a time.

The plain path (``F.linear`` to the logits, then the fused-softmax cross-entropy) holds the full
logits and their fp32 softmax from the forward to the backward: at 8192 tokens and a 128K
vocabulary that is 2 GiB of bf16 logits plus 4 GiB of fp32 probabilities, more than all the
activations of a transformer block. Here the forward walks over chunks of ``chunk`` rows: each
chunk's logits are computed, turned into its share of the loss (and of the z-loss), and -- when
a gradient is wanted -- straight into its gradient, ``d_logits = softmax - onehot`` (+ the z-loss
term), which is multiplied back into ``dH`` (rows of this chunk) and accumulated into ``dW`` in
fp32; then the chunk is dropped. The backward only scales the kept ``dH`` / ``dW`` by the
incoming gradient (Liger's fused-linear-cross-entropy scheme, in plain PyTorch: the matmuls are
the GPU's own GEMMs, the elementwise work is what torch.compile or eager does with it).

Under tensor parallelism each rank holds a vocabulary shard of the head: each chunk needs the
row maximum and the sum of exponentials / target logit over the whole vocabulary, two
all-reduces of ``[chunk]`` vectors, exactly as in ``vocab_parallel_cross_entropy``; the
gradient of ``H`` is this rank's partial sum, all-reduced by the ``copy_to_parallel_region`` /
sequence-parallel gather in front (``fused_vocab_parallel_loss``).

Shapes: N rows (tokens), C hidden width, V local vocabulary columns, R rows of one chunk.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from evoformer.parallel.collectives import (
    all_reduce_,
    copy_to_parallel_region,
    gather_from_sequence_parallel_region,
)


def _compute_dtype(h: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear(h, w)`` would compute in here (autocast's, else the inputs')."""
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return torch.promote_types(h.dtype, w.dtype)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """``(loss, ce, z)``: ``loss = ce + z_weight * z``, differentiable in ``h`` and ``weight``;
    ``ce`` (mean cross-entropy) and ``z`` (mean ``logsumexp^2``) are detached metrics."""

    @staticmethod
    def forward(
        ctx,
        h_NC: torch.Tensor,
        weight_VC: torch.Tensor,
        targets_N: torch.Tensor,
        group: dist.ProcessGroup | None,
        vocab_start: int,
        vocab_end: int,
        z_weight: float,
        chunk: int,
    ):
        n_real = vocab_end - vocab_start
        if not 0 <= n_real <= weight_VC.shape[0]:
            raise ValueError(
                f"vocab range [{vocab_start}, {vocab_end}) does not fit the local head's "
                f"{weight_VC.shape[0]} rows"
            )
        want_dh, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dtype = _compute_dtype(h_NC, weight_VC)
        w_VC = weight_VC.to(dtype)  # cast once, not once per chunk as autocast would
        N = h_NC.shape[0]
        valid_N = targets_N >= 0
        n = valid_N.sum()
        n_z = n.clamp(min=1)
        ce_sum = torch.zeros((), dtype=torch.float32, device=h_NC.device)
        z_sum = torch.zeros_like(ce_sum)
        dh_NC = torch.empty_like(h_NC) if want_dh else None
        dw_VC = torch.zeros(weight_VC.shape, dtype=torch.float32, device=h_NC.device)
        dw_VC = dw_VC if want_dw else None
        # The matmuls run in the compute dtype chosen above; autocast would re-cast per call.
        device_type = h_NC.device.type
        no_autocast = (
            torch.autocast(device_type, enabled=False)
            if torch.is_autocast_enabled(device_type)
            else contextlib.nullcontext()
        )
        with no_autocast:
            for r0 in range(0, N, chunk):
                r1 = min(r0 + chunk, N)
                hc_RC = h_NC[r0:r1].to(dtype)
                x_RV = (hc_RC @ w_VC.t()).float()
                t_R, ok_R = targets_N[r0:r1], valid_N[r0:r1]
                if n_real:
                    max_R = x_RV[:, :n_real].amax(dim=1)
                else:  # a shard of padding only
                    max_R = x_RV.new_full((r1 - r0,), float("-inf"))
                all_reduce_(max_R, group, dist.ReduceOp.MAX)
                x_RV.sub_(max_R.unsqueeze(1))  # logits - max, in place: one [R, V] buffer
                mine_R = ok_R & (t_R >= vocab_start) & (t_R < vocab_end)
                t_R1 = (t_R - vocab_start).clamp(0, max(n_real - 1, 0)).unsqueeze(1)
                tgt_R = torch.where(mine_R, x_RV.gather(1, t_R1).squeeze(1), 0.0)
                e_RV = x_RV.exp_()  # from here on the exponentials, then the gradient
                e_RV[:, n_real:] = 0.0  # padded columns are not part of the vocabulary
                sums_2R = torch.stack([e_RV.sum(dim=1), tgt_R])
                all_reduce_(sums_2R, group)
                sum_exp_R, tgt_R = sums_2R  # the target's (logit - max), summed over ranks
                log_sum_R = torch.log(sum_exp_R)
                lse_R = log_sum_R + max_R
                ce_sum += torch.where(ok_R, log_sum_R - tgt_R, 0.0).sum()
                if z_weight:
                    z_sum += torch.where(ok_R, lse_R.square(), 0.0).sum()
                if dh_NC is not None or dw_VC is not None:
                    _chunk_grads(
                        e_RV,
                        sum_exp_R,
                        lse_R,
                        ok_R,
                        mine_R,
                        t_R1,
                        n,
                        n_z,
                        z_weight,
                        dtype,
                        hc_RC,
                        w_VC,
                        dh_NC[r0:r1] if dh_NC is not None else None,
                        dw_VC,
                    )
                del x_RV, e_RV  # free this chunk before the next one is computed
        ce = ce_sum / n
        z = z_sum / n_z
        loss = ce + z_weight * z if z_weight else ce.clone()
        ctx.save_for_backward(dh_NC, dw_VC)
        ctx.w_dtype = weight_VC.dtype
        ctx.mark_non_differentiable(ce, z)
        return loss, ce, z

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_z):
        dh_NC, dw_VC = ctx.saved_tensors
        dh = None if dh_NC is None else dh_NC * grad_loss.to(dh_NC.dtype)
        dw = None if dw_VC is None else (dw_VC * grad_loss).to(ctx.w_dtype)
        return dh, dw, None, None, None, None, None, None


def _chunk_grads(
    e_RV, sum_exp_R, lse_R, ok_R, mine_R, t_R1, n, n_z, z_weight, dtype, hc_RC, w_VC, dh_RC, dw_VC
) -> None:
    """One chunk's share of the gradients: ``e_RV`` (the exponentials, overwritten with
    ``d loss / d logits``) times the weight into ``dh_RC``, and into the fp32 ``dw_VC``."""
    # d loss / d logits = (softmax - onehot) / n  +  z_weight * 2 lse softmax / n_z
    coef_R = torch.where(ok_R, 1.0 / n, 0.0)
    if z_weight:
        coef_R = coef_R + torch.where(ok_R, 2.0 * z_weight * lse_R / n_z, 0.0)
    g_RV = e_RV.mul_((coef_R / sum_exp_R).unsqueeze(1))
    g_RV.scatter_add_(1, t_R1, -torch.where(mine_R, 1.0 / n, 0.0).unsqueeze(1))
    g_RV = g_RV.to(dtype)  # the matmuls run in the compute dtype, as the plain backward's
    if dh_RC is not None:
        if dh_RC.dtype == dtype:
            torch.mm(g_RV, w_VC, out=dh_RC)
        else:
            dh_RC.copy_(g_RV @ w_VC)
    if dw_VC is not None:
        if dtype == torch.float32:
            dw_VC.addmm_(g_RV.t(), hc_RC)
        else:
            dw_VC.add_(g_RV.t() @ hc_RC)


def fused_linear_cross_entropy(
    h_NC: torch.Tensor,
    weight_VC: torch.Tensor,
    targets_N: torch.Tensor,
    *,
    chunk: int,
    group: dist.ProcessGroup | None = None,
    vocab_start: int = 0,
    vocab_end: int | None = None,
    z_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, ce, z)`` of ``logits = h @ weight.T`` without materialising the logits.

    ``ce``: mean cross-entropy over rows whose target is >= 0 (global token ids); ``z``: mean
    ``logsumexp(logits)^2`` over the same rows (PaLM's z-loss); ``loss = ce + z_weight * z`` is
    the one differentiable output. ``weight_VC``: this rank's rows of the head (its first
    ``vocab_end - vocab_start`` rows are the real tokens ``[vocab_start, vocab_end)``, the rest
    padding); ``group``: the tensor-parallel group the vocabulary is split over (None = whole
    vocabulary here). ``chunk``: rows per chunk. The gradient of ``h`` is this rank's partial
    sum (see ``fused_vocab_parallel_loss`` for the all-reduce in front)."""
    if chunk <= 0:
        raise ValueError(f"chunk must be > 0, got {chunk}")
    end = weight_VC.shape[0] if vocab_end is None else vocab_end
    out = _FusedLinearCrossEntropy.apply(
        h_NC, weight_VC, targets_N, group, vocab_start, end, float(z_weight), chunk
    )
    return out[0], out[1], out[2]


def fused_vocab_parallel_loss(
    hidden_BTC: torch.Tensor,
    weight_VC: torch.Tensor,
    targets_BT: torch.Tensor,
    group: dist.ProcessGroup | None,
    vocab_start: int,
    vocab_end: int,
    *,
    chunk: int,
    sequence_parallel: bool = False,
    z_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training loss of ``vocab_parallel_logits`` + ``vocab_parallel_cross_entropy`` (+ the
    z-loss), fused and chunked: ``(loss, ce, z)`` as in ``fused_linear_cross_entropy``.

    ``hidden_BTC``: normalised hidden states, replicated over ``group`` (``sequence_parallel``:
    this rank's sequence shard, all-gathered here as the column-parallel head would)."""
    if sequence_parallel:
        hidden_BTC = gather_from_sequence_parallel_region(hidden_BTC, group)
    else:
        hidden_BTC = copy_to_parallel_region(hidden_BTC, group)
    h_NC = hidden_BTC.reshape(-1, hidden_BTC.shape[-1])
    return fused_linear_cross_entropy(
        h_NC,
        weight_VC,
        targets_BT.reshape(-1),
        chunk=chunk,
        group=group,
        vocab_start=vocab_start,
        vocab_end=vocab_end,
        z_weight=z_weight,
    )
