"""Expert parallelism: token dispatch to the experts' ranks by all-to-all, and the expert
parameters' sharding metadata.

Layout. ``parallel.ep = P`` splits each MoE layer's E routed experts over the P ranks of the
``ep`` group (carved out of data parallelism, see ``distributed.dims``): ep rank r holds experts
``[r * E/P, (r + 1) * E/P)``. Each rank routes its own tokens (the router, shared experts and
everything else are replicated as under plain data parallelism), so routing is exactly that of
one process on the same tokens; only the routed token copies travel.

Dispatch (:class:`AllToAllDispatcher`), per MoE layer and micro-batch:

1. sort this rank's N x K token copies by global expert (:class:`LocalDispatcher`; with a
   capacity, drop each expert's copies past it -- before anything travels);
2. exchange the per-expert counts (one ``all_to_all_single`` of E integers), so every rank knows
   how many rows it receives from each source for each local expert (the variable splits);
3. ``all_to_all_single`` of the rows (variable splits, no padding); they arrive grouped by
   (source rank, local expert) and are permuted into contiguous local-expert order for the
   grouped GEMM;
4. after the experts, the inverse permutation and the reverse all-to-all bring each output back
   to the rank and position it came from, where the weighted sum over the K copies is taken
   exactly as on one process.

Backward is the reverse all-to-all of the gradients (``torch.distributed.nn.functional``'s
autograd all-to-all). The experts of one rank then hold the gradient summed over every source
rank's tokens.

Capacity under EP (``moe.capacity_factor > 0``): the capacity is per expert and per source
rank's micro-batch, ``ceil(capacity_factor * N_local * K / E)``, enforced on the source rank
before dispatch (the first copies in token order are kept). It is therefore the same as without
EP at the same data-parallel size -- and, because a data-parallel rank's micro-batch is one of
the micro-batches one process would run, the same tokens are dropped as on one process. An
expert receives at most ``P * capacity`` rows per micro-batch.

Expert tensor parallelism: with tp > 1 the experts stay split along their hidden dim over the
TP group as without EP (gate/up column-, down row-parallel; the MoE layer reduces the partial
outputs once). The ep group links ranks with the same tp rank, so each TP rank all-to-alls the
(identical) routed tokens of its TP group to its counterpart ranks and computes its hidden slice
of every received row: no token is computed twice, and routing stays replicated over TP.

Parameters: an expert-parallel parameter holds ``num_experts / P`` rows of the expert dim of
the global stacked tensor; ``sharding.mark_expert_sharded`` records that in its ``ShardSpec``
(``ep``, ``ep_rank``) so that initialisation cuts it from the global tensor drawn from the seed,
checkpoints store the global tensor, gradient clipping sums its squares over the ep group, and
data parallelism reduces its gradient over the ``edp`` group only.

Shapes: N tokens, C d_model, E experts (global), L = E / P local experts, K copies per token,
M token copies (sent or received), P ep size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from evoformer.parallel.collectives import group_rank, group_size
from evoformer.parallel.sharding import is_expert_parallel

# -- expert-parallel parameters ----------------------------------------------------------------


def expert_parallel_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every expert-parallel shard of ``model``."""
    return [(n, p) for n, p in model.named_parameters() if is_expert_parallel(p)]


# -- the collective ----------------------------------------------------------------------------


class _AllToAll(torch.autograd.Function):
    """Rows ``x[sum(send[:r]) : sum(send[:r+1])]`` go to rank r of ``group``; the rows from
    each rank arrive concatenated in rank order. Backward: the same exchange reversed."""

    @staticmethod
    def forward(ctx, x_MC, send: list[int], recv: list[int], group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x_MC.new_empty(sum(recv), *x_MC.shape[1:])
        dist.all_to_all_single(out, x_MC.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_MC):
        return _AllToAll.apply(grad_MC, ctx.recv, ctx.send, ctx.group), None, None, None


def all_to_all(
    x_MC: torch.Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup
) -> torch.Tensor:
    """Autograd-aware variable-split all-to-all along dim 0: ``send[r]`` rows of ``x`` to rank
    r, ``recv[r]`` rows from rank r (rank order), over ``group``."""
    return _AllToAll.apply(x_MC, send, recv, group)


# -- dispatch ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Dispatched:
    """What ``combine`` needs to undo a dispatch, and the counts the MoE layer reports."""

    order_M: torch.Tensor  # flat (token * K + slot) index of each kept copy, sorted by expert
    selected_E: torch.Tensor  # copies each (global) expert was chosen for, before any drop
    kept_E: torch.Tensor  # copies each (global) expert keeps from this rank after the drop
    # Expert parallelism only: the all-to-all splits and the local-expert permutation.
    send_splits: list[int] | None = None
    recv_splits: list[int] | None = None
    unsort_M: torch.Tensor | None = None


class LocalDispatcher:
    """Token dispatch on one rank: sort the N x K token copies by expert so each expert's rows
    are contiguous, and put the expert outputs back, weighted, after the GEMMs."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    @property
    def num_local_experts(self) -> int:
        return self.num_experts

    def dispatch(
        self, x_NC: torch.Tensor, experts_NK: torch.Tensor, capacity: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, Dispatched]:
        """(token copies sorted by expert [M, C], copies per local expert, undo information).
        With ``capacity``, each expert keeps only its first ``capacity`` copies (token order)."""
        K = experts_NK.shape[1]
        flat = experts_NK.reshape(-1)
        order = flat.argsort(stable=True)
        selected = torch.bincount(flat, minlength=self.num_experts)
        counts = selected
        if capacity is not None:
            first_E = selected.cumsum(0) - selected
            rank_M = torch.arange(order.numel(), device=order.device) - first_E[flat[order]]
            order = order[rank_M < capacity]
            counts = selected.clamp(max=capacity)
        return x_NC[order // K], counts, Dispatched(order, selected, counts)

    def combine(self, y_MC: torch.Tensor, d: Dispatched, weights_NK: torch.Tensor) -> torch.Tensor:
        """Sum over each token's K expert outputs, weighted [N, C]; dropped copies count 0."""
        N, K = weights_NK.shape
        # Scatter back to (token, slot) order, then a batched weighted sum: deterministic, unlike
        # an index_add over tokens.
        y_NKC = y_MC.new_zeros(N * K, y_MC.shape[1]).index_copy(0, d.order_M, y_MC)
        w_N1K = weights_NK.to(y_MC.dtype).unsqueeze(1)
        return torch.bmm(w_N1K, y_NKC.view(N, K, -1)).squeeze(1)


class AllToAllDispatcher(LocalDispatcher):
    """Expert-parallel dispatch over ``group`` (the ep group): this rank's copies go to the ranks
    holding their experts and come back after the expert GEMMs (see the module docstring).
    ``dispatch`` returns the rows of this rank's local experts, from every source rank, sorted
    by local expert, with the counts per local expert; ``combine`` returns this rank's tokens.
    A collective over ``group``: every rank must dispatch the same number of times."""

    def __init__(self, num_experts: int, group: dist.ProcessGroup) -> None:
        super().__init__(num_experts)
        self.group = group
        self.ep = group_size(group)
        self.ep_rank = group_rank(group)
        if num_experts % self.ep:
            raise ValueError(
                f"expert parallelism: parallel.ep={self.ep} must divide model.moe.num_experts="
                f"{num_experts}"
            )

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.ep

    def dispatch(
        self, x_NC: torch.Tensor, experts_NK: torch.Tensor, capacity: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, Dispatched]:
        xs_MC, kept_E, d = super().dispatch(x_NC, experts_NK, capacity)
        P, L = self.ep, self.num_local_experts
        # Counts first: recv_PL[s, l] = copies source rank s sends to my local expert l.
        recv_PL = torch.empty(P, L, dtype=kept_E.dtype, device=kept_E.device)
        dist.all_to_all_single(recv_PL, kept_E.contiguous(), group=self.group)
        # One host sync for both splits (the all-to-all needs them on the host anyway).
        splits = torch.cat([kept_E.view(P, L).sum(1), recv_PL.sum(1)]).tolist()
        send, recv = splits[:P], splits[P:]
        got_MC = all_to_all(xs_MC, send, recv, self.group)
        # Arrived grouped by (source, local expert): regroup by (local expert, source).
        local_id = torch.arange(L, device=recv_PL.device).repeat(P)
        local_M = local_id.repeat_interleave(recv_PL.reshape(-1))
        sort_M = local_M.argsort(stable=True)
        unsort_M = torch.empty_like(sort_M)
        unsort_M[sort_M] = torch.arange(sort_M.numel(), device=sort_M.device)
        d.send_splits, d.recv_splits, d.unsort_M = send, recv, unsort_M
        return got_MC[sort_M], recv_PL.sum(0), d

    def combine(self, y_MC: torch.Tensor, d: Dispatched, weights_NK: torch.Tensor) -> torch.Tensor:
        back = y_MC[d.unsort_M]  # (source, local expert) order again
        assert d.recv_splits is not None and d.send_splits is not None  # set by dispatch
        mine_MC = all_to_all(back, d.recv_splits, d.send_splits, self.group)
        return super().combine(mine_MC, d, weights_NK)


def build_dispatcher(num_experts: int, ep_group: dist.ProcessGroup | None) -> LocalDispatcher:
    """:class:`AllToAllDispatcher` over ``ep_group`` when it has more than one rank, else the
    local one."""
    if ep_group is not None and group_size(ep_group) > 1:
        return AllToAllDispatcher(num_experts, ep_group)
    return LocalDispatcher(num_experts)


# -- data parallelism over expert replicas -----------------------------------------------------


@torch.no_grad()
def reduce_expert_grads(
    params: Sequence[torch.Tensor], edp_group: dist.ProcessGroup | None, divide_by: int
) -> None:
    """Sum the gradients of expert-parallel ``params`` over ``edp_group`` (the ranks holding the
    same experts) and divide by ``divide_by`` (the data-parallel size: the loss is the mean over
    the dp ranks, and each expert gradient already sums the tokens of its whole ep group). One
    flattened all-reduce; a parameter without a gradient (its experts saw no token anywhere)
    takes part with zeros, so every rank issues the same collective."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    if group_size(edp_group) > 1:
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=edp_group)
        for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)
    torch._foreach_div_(grads, float(divide_by))
