"""Autograd-aware collectives over an explicit process group (Megatron's f / g operators).

Every function takes the group it talks to. ``group=None`` (or a group of size 1) means "no
parallelism": the function is the identity and adds no autograd node. It never means the
default world group, so a layer built without a group cannot silently talk to every rank.

Dims: the tensor-parallel (hidden) dim is the last one; the sequence dim is ``SEQ_DIM = 1``
because activations are batch-first ``[B, T, C]``. (Megatron keeps ``[T, B, C]`` so sequence
gathers are along the contiguous dim 0; batch-first costs one transposing copy per sequence
collective here, and keeps every block's code in the layout HF and SDPA use.)

Communication primitives are out of place (the input is cloned before an in-place all-reduce):
an autograd function may receive a gradient tensor that another branch also holds (``AddBackward``
passes one tensor to both inputs), so reducing it in place would corrupt that branch.

``count_collectives()`` lets tests count calls by kind (``all_reduce``, ``all_gather``,
``reduce_scatter``); a reduce-scatter done through the gloo fallback still counts as one
``reduce_scatter`` -- the count is of logical collectives, i.e. of the communication scheme.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import torch
import torch.distributed as dist

SEQ_DIM = 1

# Stack of active counters (tests only; appended/removed by count_collectives). Not a process
# group global: it records, it never decides which ranks talk.
_COUNTERS: list[Counter] = []
# backend name -> whether its native reduce-scatter works (filled on first use).
_NATIVE_REDUCE_SCATTER: dict[str, bool] = {}

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@contextlib.contextmanager
def count_collectives() -> Iterator[Counter]:
    """Count the collectives issued through this module (by kind) inside the ``with`` block.

    >>> with count_collectives() as n:
    ...     loss = model(x).sum(); loss.backward()
    >>> n["all_reduce"], n["all_gather"], n["reduce_scatter"]
    """
    counter: Counter = Counter()
    _COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _COUNTERS.remove(counter)


def _record(kind: str) -> None:
    for counter in _COUNTERS:
        counter[kind] += 1


def group_size(group: dist.ProcessGroup | None) -> int:
    """Size of ``group``; 1 for ``None``."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    """This process's rank inside ``group``; 0 for ``None``."""
    return 0 if group is None else dist.get_rank(group)


# -- primitives (no autograd) ----------------------------------------------------------------


def all_reduce_(
    x: torch.Tensor,
    group: dist.ProcessGroup | None,
    op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
) -> torch.Tensor:
    """In-place all-reduce of a tensor the caller owns; returns it."""
    if group_size(group) > 1:
        _record("all_reduce")
        dist.all_reduce(x, op=op, group=group)
    return x


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    return all_reduce_(x.clone(memory_format=torch.contiguous_format), group)


def _split(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """This rank's contiguous chunk of ``x`` along ``dim`` (no communication)."""
    size, rank = group_size(group), group_rank(group)
    if x.shape[dim] % size:
        raise ValueError(
            f"dim {dim} of size {x.shape[dim]} does not split evenly over {size} ranks"
        )
    n = x.shape[dim] // size
    return x.narrow(dim, rank * n, n).contiguous()


def _all_gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` (rank order)."""
    size = group_size(group)
    _record("all_gather")
    x0 = x.movedim(dim, 0).contiguous()
    out = x0.new_empty((size * x0.shape[0], *x0.shape[1:]))
    _all_gather_single(out, x0, group=group)
    return out.movedim(0, dim).contiguous() if dim % x.dim() else out


def _reduce_scatter(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Sum over ranks, then keep this rank's chunk along ``dim``."""
    size = group_size(group)
    if x.shape[dim] % size:
        raise ValueError(
            f"reduce-scatter: dim {dim} of size {x.shape[dim]} does not split over {size} ranks"
        )
    backend = str(dist.get_backend(group))
    if _NATIVE_REDUCE_SCATTER.get(backend, True):
        x0 = x.movedim(dim, 0).contiguous()
        out = x0.new_empty((x0.shape[0] // size, *x0.shape[1:]))
        try:
            _reduce_scatter_single(out, x0, group=group)
        except (RuntimeError, NotImplementedError) as e:
            # Older gloo builds have no reduce-scatter; the check fails on every rank alike
            # before any data moves, so falling back is safe and is remembered per backend.
            if "support" not in str(e).lower():
                raise
            _NATIVE_REDUCE_SCATTER[backend] = False
        else:
            _NATIVE_REDUCE_SCATTER[backend] = True
            _record("reduce_scatter")
            return out.movedim(0, dim).contiguous() if dim % x.dim() else out
    return _reduce_scatter_via_all_reduce(x, group, dim)


def _reduce_scatter_via_all_reduce(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """The gloo fallback: all-reduce the whole tensor, keep this rank's slice.

    Same result as a reduce-scatter; moves about twice the bytes, which only matters off CPU,
    where NCCL has the native one. Counted as one ``reduce_scatter``.
    """
    _record("reduce_scatter")
    full = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(full, group=group)
    return _split(full, group, dim)


# -- autograd functions --------------------------------------------------------------------


class _CopyToParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _AllReduceBothWays(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _GatherFromParallelRegion(torch.autograd.Function):
    """Forward all-gather along ``dim``; backward keeps this rank's chunk of the gradient."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.group, ctx.dim), None, None


class _ScatterToParallelRegion(torch.autograd.Function):
    """Forward keeps this rank's chunk along ``dim``; backward all-gathers the gradient."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _split(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group, ctx.dim), None, None


class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    """Forward all-gather along the sequence; backward reduce-scatter (the consumer is a
    tensor-parallel op, so each rank holds a partial gradient of the gathered tensor) or, with
    ``reduce_grad=False`` (replicated consumer), just this rank's chunk."""

    @staticmethod
    def forward(ctx, x, group, dim, reduce_grad):
        ctx.group, ctx.dim, ctx.reduce_grad = group, dim, reduce_grad
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        if ctx.reduce_grad:
            return _reduce_scatter(grad, ctx.group, ctx.dim), None, None, None
        return _split(grad, ctx.group, ctx.dim), None, None, None


class _ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _reduce_scatter(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group, ctx.dim), None, None


# -- public API ------------------------------------------------------------------------------


def copy_to_parallel_region(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Megatron's ``f``: identity forward, all-reduce of the gradient backward.

    Put in front of a column-parallel matmul whose input is replicated over ``group``.
    """
    if group_size(group) == 1:
        return x
    return _CopyToParallelRegion.apply(x, group)


def reduce_from_parallel_region(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Megatron's ``g``: all-reduce (sum) forward, identity backward.

    Sums the partial outputs of a row-parallel matmul.
    """
    if group_size(group) == 1:
        return x
    return _ReduceFromParallelRegion.apply(x, group)


def sum_across_parallel_region(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """All-reduce (sum) forward *and* backward: for a statistic summed over the shards and then
    used by every shard, so each rank's gradient of the sum is partial -- e.g. the sum of
    squares of an RMSNorm over a head-sharded projection (OLMo 2's full QK-norm)."""
    if group_size(group) == 1:
        return x
    return _AllReduceBothWays.apply(x, group)


def gather_from_parallel_region(
    x: torch.Tensor, group: dist.ProcessGroup | None, dim: int = -1
) -> torch.Tensor:
    """All-gather along ``dim`` (default the last, hidden dim); backward takes this rank's chunk."""
    if group_size(group) == 1:
        return x
    return _GatherFromParallelRegion.apply(x, group, dim % x.dim())


def scatter_to_parallel_region(
    x: torch.Tensor, group: dist.ProcessGroup | None, dim: int = -1
) -> torch.Tensor:
    """Keep this rank's chunk along ``dim`` (default last); backward all-gathers the gradient."""
    if group_size(group) == 1:
        return x
    return _ScatterToParallelRegion.apply(x, group, dim % x.dim())


def gather_from_sequence_parallel_region(
    x: torch.Tensor,
    group: dist.ProcessGroup | None,
    dim: int = SEQ_DIM,
    reduce_grad: bool = True,
) -> torch.Tensor:
    """Sequence parallelism's entry into a TP region: all-gather along the sequence forward;
    reduce-scatter backward (``reduce_grad=False``: split backward, for a replicated consumer
    such as the final norm's output going to an un-sharded head)."""
    if group_size(group) == 1:
        return x
    return _GatherFromSequenceParallelRegion.apply(x, group, dim % x.dim(), reduce_grad)


def reduce_scatter_to_sequence_parallel_region(
    x: torch.Tensor, group: dist.ProcessGroup | None, dim: int = SEQ_DIM
) -> torch.Tensor:
    """Sequence parallelism's exit from a TP region: sum the partial outputs and keep this
    rank's sequence chunk forward; all-gather the gradient backward."""
    if group_size(group) == 1:
        return x
    return _ReduceScatterToSequenceParallelRegion.apply(x, group, dim % x.dim())


def scatter_to_sequence_parallel_region(
    x: torch.Tensor, group: dist.ProcessGroup | None, dim: int = SEQ_DIM
) -> torch.Tensor:
    """Enter a sequence-parallel region from a replicated tensor: keep this rank's sequence
    chunk forward; all-gather the gradient backward."""
    return scatter_to_parallel_region(x, group, dim)
