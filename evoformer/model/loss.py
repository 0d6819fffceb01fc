"""The language-model loss: mean next-token cross-entropy with a fused softmax backward.

Shapes: N tokens, V vocabulary.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


class _CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy over the rows whose target is >= 0, computed in fp32.

    Same value and gradient as ``F.cross_entropy(logits.float(), targets, ignore_index=-1)`` to
    fp32 rounding, but cheaper: ``log_softmax`` + ``nll_loss`` exponentiate the [N, V] logits
    twice (forward, and again in the log-softmax backward) and zero-fill a fresh [N, V] gradient;
    here the forward's softmax is kept and turned into the gradient, softmax - onehot, in place.
    On the CPU reference model that halves the loss's share of a training step.
    """

    @staticmethod
    def forward(ctx, logits_NV: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
        probs_NV = torch.softmax(logits_NV, dim=-1, dtype=torch.float32)
        valid_N = targets_N >= 0
        t_N1 = targets_N.clamp(min=0).unsqueeze(1)
        # -log p[target] would lose the rows whose target probability underflows; anchoring on
        # the most likely token (p >= 1/V, never underflows) keeps the loss exact without a
        # data-dependent branch: logsumexp = max - log p[argmax].
        max_N, argmax_N = logits_NV.max(dim=-1)
        p_max_N = probs_NV.gather(1, argmax_N.unsqueeze(1)).squeeze(1)
        logit_t_N = logits_NV.gather(1, t_N1).squeeze(1)
        nll_N = (max_N.float() - logit_t_N.float()) - torch.log(p_max_N)
        n = valid_N.sum()
        loss = torch.where(valid_N, nll_N, 0.0).sum() / n
        ctx.save_for_backward(probs_NV, t_N1, valid_N, n)
        ctx.logits_dtype = logits_NV.dtype
        ctx.consumed = False
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        if ctx.consumed:
            raise RuntimeError(
                "lm_loss: its backward reuses the saved softmax in place and can run only once "
                "per forward (retain_graph=True is not supported)"
            )
        ctx.consumed = True
        probs_NV, t_N1, valid_N, n = ctx.saved_tensors
        valid_N1 = valid_N.unsqueeze(1).to(probs_NV.dtype)
        grad_NV = probs_NV.scatter_add_(1, t_N1, -valid_N1)  # softmax - onehot(target)
        grad_NV.mul_(valid_N1 * (grad / n))  # ignored rows get zero gradient
        return grad_NV.to(ctx.logits_dtype), None


def lm_loss(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32 (targets < 0 are ignored)."""
    return _CrossEntropy.apply(logits_BTV.reshape(-1, logits_BTV.shape[-1]), targets_BT.reshape(-1))
