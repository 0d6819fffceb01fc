"""Global gradient-norm clipping that counts every parameter exactly once across TP and DP.

After the data-parallel all-reduce every DP rank holds the same (averaged) gradients, so DP adds
nothing to the sum (under FSDP2 each dp rank holds a disjoint shard of every gradient as a
DTensor, and the DTensor norm sums the shards once over dp). Across the tensor-parallel group a
parameter is either *sharded* (its ``ShardSpec`` has a ``tp`` split, given by the parallel
layers: each rank holds a disjoint slice, so the squared norms are summed over TP) or
*replicated* (every rank holds the same full gradient, after ``sync_sequence_parallel_grads``
for the partial ones: counted once, i.e. not summed). Summing everything over TP, or only local
norms, is the bug class of Megatron issue #7452: the clip coefficient, hence every update, then
depends on the layout. Vocabulary padding rows of sharded tables have zero gradients and add
nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from evoformer.parallel.collectives import all_reduce_, group_size
from evoformer.parallel.sharding import is_expert_parallel, is_tp_sharded, to_local


def grad_norm(
    parameters: Iterable[torch.Tensor], tp_group: dist.ProcessGroup | None
) -> torch.Tensor:
    """The L2 norm of all gradients of the model whose local parameters are ``parameters``, as
    one process holding the whole model would compute it (fp32). A collective over
    ``tp_group`` (one all-reduce of a scalar) when tp > 1.

    FSDP2 on top of TP (gradients are DTensors holding dim-0 or dim-1 shards of the TP-local
    gradient): each shard's squares are first summed over the mesh dimensions it is sharded on
    (``dp``, or ``dp_shard`` under HSDP; never the replicate dimension), then the TP rule above
    applies to the result."""
    grads = [(p, p.grad) for p in parameters if p.grad is not None]
    sharded = [g for p, g in grads if is_tp_sharded(p)]
    replicated = [g for p, g in grads if not is_tp_sharded(p)]
    device = grads[0][1].device if grads else torch.device("cpu")
    sq_sharded = _sum_of_squares_over_shards(sharded, device)
    if group_size(tp_group) > 1:
        all_reduce_(sq_sharded, tp_group)
    return (sq_sharded + _sum_of_squares_over_shards(replicated, device)).sqrt()


@dataclasses.dataclass(frozen=True)
class ClipScope:
    """Over which process groups the global gradient norm is taken: the model-parallel groups
    whose ranks hold disjoint pieces of the model (``tp_group``, expert-parallel ``ep_group``,
    pipeline ``pp_group``), and ``not_counted``: this rank's copies of weights another stage
    counts (a tied embedding on the last pipeline stage). Data parallelism adds nothing (see the
    module docstring). The default is one process holding the whole model."""

    tp_group: dist.ProcessGroup | None = None
    ep_group: dist.ProcessGroup | None = None
    pp_group: dist.ProcessGroup | None = None
    not_counted: tuple[torch.Tensor, ...] = ()


def total_grad_norm(parameters: Iterable[torch.Tensor], scope: ClipScope) -> torch.Tensor:
    """The global gradient norm over ``scope``, as one process holding the whole model would
    compute it. With every group of size 1 this is exactly ``torch.nn.utils``' norm."""
    parameters = list(parameters)
    if scope.pp_group is not None and group_size(scope.pp_group) > 1:
        return pipeline_grad_norm(
            parameters, scope.tp_group, scope.ep_group, scope.pp_group, scope.not_counted
        )
    if group_size(scope.ep_group) > 1:
        return expert_parallel_grad_norm(parameters, scope.tp_group, scope.ep_group)
    if group_size(scope.tp_group) > 1:
        return grad_norm(parameters, scope.tp_group)
    total = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    if isinstance(total, DTensor):
        # FSDP2: each rank holds disjoint dim-0 shards of every gradient; DTensor's norm reduces
        # the shards' squares over dp (each element counted once) and comes back Replicate
        # (full_tensor is then free) or, on other versions, Partial.
        total = total.full_tensor()
    return total


def clip_grad_norm_(
    parameters: Iterable[torch.Tensor], max_norm: float, scope: ClipScope = ClipScope()
) -> torch.Tensor:
    """Scale the gradients in place so their global norm (``total_grad_norm`` over ``scope``)
    is at most ``max_norm``; returns the norm before clipping. With one process this is exactly
    ``torch.nn.utils.clip_grad_norm_``."""
    parameters = list(parameters)
    total = total_grad_norm(parameters, scope)
    # FSDP2 DTensor gradients are scaled through their local shards (a plain scalar factor).
    grads = [to_local(p.grad) for p in parameters if p.grad is not None]
    if grads:
        # torch's rule: multiply by min(1, max_norm / (norm + 1e-6)), always (no host sync).
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, coef.to(grads[0].device))
    return total


def _sum_of_squares(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    norms = torch._foreach_norm(grads)
    return torch.stack([n.float() for n in norms]).pow(2).sum()


def _sum_of_squares_over_shards(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Sum of squares of ``grads`` counting each element once over the data-parallel mesh:
    plain tensors as they are; DTensors (FSDP2) from their local shards, all-reduced over each
    mesh dimension they are sharded on. Buckets are keyed by those dimensions (the same on
    every rank: FSDP2 gives every parameter a gradient), so every rank issues the same
    collectives in the same order."""
    plain = [g for g in grads if not isinstance(g, DTensor)]
    total = _sum_of_squares(plain, device)
    buckets: dict[tuple, tuple[list, list[torch.Tensor]]] = {}
    for g in grads:
        if isinstance(g, DTensor):
            mesh = g.device_mesh
            dims = tuple(i for i, pl in enumerate(g.placements) if pl.is_shard())
            key = (mesh.mesh_dim_names, dims)
            groups = [mesh.get_group(i) for i in dims]
            buckets.setdefault(key, (groups, []))[1].append(to_local(g))
    return total + _reduce_buckets(buckets, device)


def _reduce_buckets(
    buckets: dict[tuple, tuple[list, list[torch.Tensor]]], device: torch.device
) -> torch.Tensor:
    """Sum of squares of every bucket's gradients, each all-reduced over its bucket's groups;
    buckets in a fixed key order, so every rank issues the same collectives."""
    total = torch.zeros((), dtype=torch.float32, device=device)
    for key in sorted(buckets, key=repr):
        groups, grads = buckets[key]
        sq = _sum_of_squares(grads, device)
        for group in groups:
            if group_size(group) > 1:
                all_reduce_(sq, group)
        total = total + sq
    return total


# -- expert parallelism ------------------------------------------------------------------------


def expert_parallel_grad_norm(
    parameters: Iterable[torch.Tensor],
    tp_group: dist.ProcessGroup | None,
    ep_group: dist.ProcessGroup | None,
) -> torch.Tensor:
    """The global gradient norm when some parameters are expert-parallel shards (their spec has
    an ``ep`` split: each rank of ``ep_group`` holds different experts). Each parameter's squares
    are summed over exactly the groups whose ranks hold disjoint pieces of it: the ep group
    (``ep``), the TP group (``tp``) and, for an FSDP2 DTensor, its mesh (dp for dense
    parameters, edp for experts); over every other group it is replicated and counted once.
    Parameters are bucketed by that set of groups (the same buckets on every rank, whichever
    gradients exist, so every rank issues the same collectives)."""
    params = list(parameters)
    device = next((p.grad.device for p in params if p.grad is not None), torch.device("cpu"))
    buckets: dict[tuple, tuple[list, list[torch.Tensor]]] = {}
    for p in params:
        groups, key = [], []
        if isinstance(p, DTensor):
            mesh = p.device_mesh
            groups.append(mesh.get_group())
            key.append(mesh.mesh_dim_names[0] if mesh.mesh_dim_names else "fsdp")
        if is_expert_parallel(p):
            groups.append(ep_group)
            key.append("ep")
        if is_tp_sharded(p):
            groups.append(tp_group)
            key.append("tp")
        bucket = buckets.setdefault(tuple(key), (groups, []))
        if p.grad is not None:
            bucket[1].append(to_local(p.grad))
    return _reduce_buckets(buckets, device).sqrt()


# -- pipeline parallelism ----------------------------------------------------------------------


def pipeline_grad_norm(
    parameters: Iterable[torch.Tensor],
    tp_group: dist.ProcessGroup | None,
    ep_group: dist.ProcessGroup | None,
    pp_group: dist.ProcessGroup,
    not_counted: Iterable[torch.Tensor] = (),
) -> torch.Tensor:
    """The global gradient norm when each pipeline stage holds different layers: every stage
    computes the squared norm of its own parameters by the TP / EP / FSDP2 rules above, leaving
    out ``not_counted`` (weights held by two stages, such as a tied embedding, whose gradient is
    counted on one of them), and the squares are summed over ``pp_group``."""
    skip = {id(p) for p in not_counted}
    counted = [p for p in parameters if id(p) not in skip]
    if group_size(ep_group) > 1:
        local = expert_parallel_grad_norm(counted, tp_group, ep_group)
    else:
        local = grad_norm(counted, tp_group)
    sq = local.float().pow(2)
    all_reduce_(sq, pp_group)
    return sq.sqrt()
