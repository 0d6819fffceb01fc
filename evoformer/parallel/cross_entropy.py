"""Cross-entropy over a vocabulary split across the tensor-parallel group.

Each rank holds logits for a contiguous slice of the (padded) vocabulary; the full ``[N, V]``
logits never exist on one rank. Forward: an all-reduce (max) of the per-row maximum, then one
all-reduce (sum) of the stacked per-row sum-of-exponentials and target logit -- Megatron issues
those two sums separately; stacking them saves a collective. Backward needs no communication:
each rank's gradient is its slice of ``softmax - onehot``.

Shapes: B batch, T sequence, N = B*T rows, V local vocabulary columns.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from evoformer.parallel.collectives import all_reduce_, reduce_from_parallel_region


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_NV, targets_N, group, vocab_start: int, vocab_end: int):
        n_real = vocab_end - vocab_start
        if not 0 <= n_real <= logits_NV.shape[1]:
            raise ValueError(
                f"vocab range [{vocab_start}, {vocab_end}) does not fit the local logits' "
                f"{logits_NV.shape[1]} columns"
            )
        x_NV = logits_NV.float()
        if n_real:
            max_N = x_NV[:, :n_real].amax(dim=1)
        else:  # a shard of padding only
            max_N = x_NV.new_full((x_NV.shape[0],), float("-inf"))
        all_reduce_(max_N, group, dist.ReduceOp.MAX)

        e_NV = torch.exp(x_NV - max_N.unsqueeze(1))
        e_NV[:, n_real:] = 0.0  # padded columns are not part of the vocabulary
        valid_N = targets_N >= 0
        mine_N = valid_N & (targets_N >= vocab_start) & (targets_N < vocab_end)
        t_N1 = (targets_N - vocab_start).clamp(0, max(n_real - 1, 0)).unsqueeze(1)
        target_logit_N = torch.where(mine_N, x_NV.gather(1, t_N1).squeeze(1), 0.0)
        sums_2N = torch.stack([e_NV.sum(dim=1), target_logit_N])
        all_reduce_(sums_2N, group)
        sum_exp_N, target_logit_N = sums_2N

        nll_N = torch.log(sum_exp_N) + max_N - target_logit_N
        n = valid_N.sum()
        loss = torch.where(valid_N, nll_N, 0.0).sum() / n

        e_NV.div_(sum_exp_N.unsqueeze(1))  # this rank's slice of the softmax
        ctx.save_for_backward(e_NV, t_N1, mine_N, valid_N, n)
        ctx.logits_dtype = logits_NV.dtype
        ctx.consumed = False
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        if ctx.consumed:
            raise RuntimeError(
                "vocab_parallel_cross_entropy: its backward reuses the saved softmax in place "
                "and can run only once per forward (retain_graph=True is not supported)"
            )
        ctx.consumed = True
        probs_NV, t_N1, mine_N, valid_N, n = ctx.saved_tensors
        grad_NV = probs_NV.scatter_add_(1, t_N1, -mine_N.unsqueeze(1).to(probs_NV.dtype))
        grad_NV.mul_((valid_N.to(probs_NV.dtype) * (grad / n)).unsqueeze(1))
        return grad_NV.to(ctx.logits_dtype), None, None, None, None


def vocab_parallel_cross_entropy(
    logits_local_BTV: torch.Tensor,
    targets_BT: torch.Tensor,
    group: dist.ProcessGroup | None,
    vocab_start: int,
    vocab_end: int,
) -> torch.Tensor:
    """Mean next-token cross-entropy over the full vocabulary, computed in fp32 from this
    rank's vocabulary shard (targets < 0 are ignored).

    ``logits_local_BTV`` holds this rank's columns; its first ``vocab_end - vocab_start`` columns
    are the real tokens ``[vocab_start, vocab_end)``, any further columns are vocabulary padding
    and are excluded (pass ``layer.vocab_start`` / ``layer.vocab_end`` of a
    ``VocabParallelLMHead`` or ``VocabParallelEmbedding``). ``targets_BT`` are global token ids,
    the same on every rank of ``group``. Every rank returns the same loss. With ``group=None``
    and the range ``[0, V)`` it equals ``F.cross_entropy(logits.float(), targets,
    ignore_index=-1)``.
    """
    logits_NV = logits_local_BTV.reshape(-1, logits_local_BTV.shape[-1])
    return _VocabParallelCrossEntropy.apply(
        logits_NV, targets_BT.reshape(-1), group, vocab_start, vocab_end
    )


def vocab_parallel_z_loss(
    logits_local_BTV: torch.Tensor,
    targets_BT: torch.Tensor,
    group: dist.ProcessGroup | None,
    n_real: int,
) -> torch.Tensor:
    """Mean over the scored tokens of ``logsumexp(logits)^2`` over the full vocabulary (the
    PaLM/OLMo z-loss, which keeps the softmax normaliser near 1), in fp32 from this rank's
    shard: its first ``n_real`` columns are real tokens. Every rank returns the same value and
    backpropagates into its own columns."""
    x_NV = logits_local_BTV.reshape(-1, logits_local_BTV.shape[-1])[:, :n_real].float()
    valid_N = targets_BT.reshape(-1) >= 0
    with torch.no_grad():
        max_N = x_NV.amax(dim=1) if n_real else x_NV.new_full((x_NV.shape[0],), float("-inf"))
        all_reduce_(max_N, group, dist.ReduceOp.MAX)
    sum_N = reduce_from_parallel_region(torch.exp(x_NV - max_N[:, None]).sum(dim=1), group)
    lse_N = torch.log(sum_N) + max_N
    return torch.where(valid_N, lse_N.square(), 0.0).sum() / valid_N.sum().clamp(min=1)
