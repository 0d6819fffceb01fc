"""Global gradient-norm clipping that counts every parameter exactly once across TP and DP.

After the data-parallel all-reduce every DP rank holds the same (averaged) gradients, so DP adds
nothing to the sum (under FSDP2 each dp rank holds a disjoint shard of every gradient as a
DTensor, and the DTensor norm sums the shards once over dp). Across the tensor-parallel group a
parameter is either *sharded* (tagged ``param.tp_dim`` by the parallel layers: each rank holds a
disjoint slice, so the squared norms are summed over TP) or *replicated* (every rank holds the
same full gradient, after ``sync_sequence_parallel_grads`` for the partial ones: counted once,
i.e. not summed). Summing everything over TP, or only local norms, is the bug class of Megatron
issue #7452: the clip coefficient, hence every update, then depends on the layout. Vocabulary
padding rows of sharded tables have zero gradients and add nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from evoformer.parallel.collectives import all_reduce_, group_size


def grad_norm(
    parameters: Iterable[torch.Tensor], tp_group: dist.ProcessGroup | None
) -> torch.Tensor:
    """The L2 norm of all gradients of the model whose local parameters are ``parameters``, as
    one process holding the whole model would compute it (fp32). A collective over
    ``tp_group`` (one all-reduce of a scalar) when tp > 1."""
    params = [p for p in parameters if p.grad is not None]
    sharded = [p.grad for p in params if _is_sharded(p)]
    replicated = [p.grad for p in params if not _is_sharded(p)]
    device = params[0].grad.device if params else torch.device("cpu")
    sq_sharded = _sum_of_squares(sharded, device)
    if group_size(tp_group) > 1:
        all_reduce_(sq_sharded, tp_group)
    return (sq_sharded + _sum_of_squares(replicated, device)).sqrt()


def clip_grad_norm_(
    parameters: Iterable[torch.Tensor], max_norm: float, tp_group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Scale the gradients in place so their global norm (``grad_norm``) is at most
    ``max_norm``; returns the norm before clipping. With tp = 1 this is exactly
    ``torch.nn.utils.clip_grad_norm_``."""
    parameters = list(parameters)
    if group_size(tp_group) == 1:
        grads = [p.grad for p in parameters if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads)
        if isinstance(total, DTensor):
            # FSDP2: each rank holds disjoint dim-0 shards of every gradient; DTensor's norm
            # reduces the shards' squares over dp (each element counted once) and comes back
            # Replicate (full_tensor is then free) or, on other versions, Partial.
            total = total.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
        return total
    total = grad_norm(parameters, tp_group)
    grads = [p.grad for p in parameters if p.grad is not None]
    if grads:
        # torch's rule: multiply by min(1, max_norm / (norm + 1e-6)), always (no host sync).
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, coef.to(grads[0].device))
    return total


def _is_sharded(p: torch.Tensor) -> bool:
    return getattr(p, "tp_dim", None) is not None


def _sum_of_squares(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    norms = torch._foreach_norm(grads)
    return torch.stack([n.float() for n in norms]).pow(2).sum()
