"""How a parameter is split across ranks: one typed spec per parameter, and everything derived
from it (global shapes, this rank's piece of a global tensor, DTensor views for checkpoints).

A parameter is this rank's piece of one global (single-device) tensor. :class:`ShardSpec` says
how: ``tp`` -- the tensor dim split into equal slices over the tensor-parallel group and its
global unpadded length (the last slices may end in zero padding: a vocabulary table);
``ep`` -- the dim of stacked experts split over the expert-parallel group, with ``ep_rank``, the
slice this rank holds; ``partial_grad`` -- a replicated parameter whose gradient is partial on
each TP rank and is summed over the group before the step (Megatron's ``sequence_parallel``).
A parameter without a spec is replicated with a full gradient.

Attaching and reading go through :func:`set_shard_spec` / :func:`shard_spec` (and the
``mark_*`` helpers layers call at construction); nothing else touches where the spec is kept.
Anything that builds new Parameter objects (``.to_empty()`` from the meta device, FSDP2's
``fully_shard``) drops it: take :func:`shard_specs` of the module before and :func:`retag` it
after (modules deriving from :class:`KeepShardSpecs` do that around ``.to()`` / ``.to_empty()``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

# The spec rides on the parameter object as one attribute private to this module: it then
# travels wherever the object goes (DeepSpeed partitions parameters in place, pickling keeps
# it), exactly as far as the per-parameter tags it replaces did. A WeakKeyDictionary would be
# lost on pickling and cannot key tensors (their ``==`` is elementwise).
_ATTR = "_evoformer_shard_spec"


@dataclasses.dataclass(frozen=True)
class Split:
    """Tensor dim ``dim`` cut into equal contiguous slices, one per rank of a group, in rank
    order; ``length`` is the dim's global length (slices past it hold zero padding)."""

    dim: int
    length: int


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """How one parameter is split (see the module docstring); the default is replicated."""

    tp: Split | None = None
    ep: Split | None = None
    ep_rank: int = 0
    partial_grad: bool = False

    @property
    def is_tp_sharded(self) -> bool:
        return self.tp is not None

    @property
    def is_expert(self) -> bool:
        return self.ep is not None

    def full_shape(self, shape: torch.Size | tuple[int, ...]) -> torch.Size:
        """``shape`` (a local shape) with the TP and expert dims at their global lengths."""
        out = list(shape)
        for split in (self.tp, self.ep):
            if split is not None:
                out[split.dim] = split.length
        return torch.Size(out)


# -- attach and read ---------------------------------------------------------------------------


def shard_spec(p: torch.Tensor) -> ShardSpec | None:
    """``p``'s spec, or None: replicated, full gradient."""
    return getattr(p, _ATTR, None)


def set_shard_spec(p: torch.Tensor, spec: ShardSpec | None) -> None:
    """Attach ``spec`` to ``p`` (None, or the replicated default, removes it)."""
    if spec is None or spec == ShardSpec():
        if hasattr(p, _ATTR):
            delattr(p, _ATTR)
        return
    setattr(p, _ATTR, spec)


def update_shard_spec(p: torch.Tensor, **changes: Any) -> None:
    """Replace some fields of ``p``'s spec (starting from replicated)."""
    set_shard_spec(p, dataclasses.replace(shard_spec(p) or ShardSpec(), **changes))


def mark_sharded(module: nn.Module, name: str, dim: int, full_size: int) -> None:
    """``module.<name>`` holds this rank's TP slice along ``dim`` of a global tensor of length
    ``full_size`` there (used by the parallel layers, and by modules that are not: stacked MoE
    experts, a QK-norm over a head-sharded projection). A missing (None) parameter is skipped."""
    p = getattr(module, name, None)
    if p is not None:
        update_shard_spec(p, tp=Split(dim, full_size))


def mark_partial_grad(module: nn.Module, *names: str) -> None:
    """The replicated parameters ``names`` of ``module`` get partial gradients on each TP rank:
    parameters used on sequence shards, replicated parameters each rank uses for only its own
    heads (K/V projections shared by fewer KV heads than tp, per-head QK-norm weights) or whose
    output feeds only a partial sum (an MoE router). ``sync_sequence_parallel_grads`` sums them."""
    for name in names:
        p = getattr(module, name, None)
        if p is not None:
            update_shard_spec(p, partial_grad=True)


def mark_expert_sharded(module: nn.Module, name: str, dim: int, full_size: int, rank: int) -> None:
    """``module.<name>`` holds ep rank ``rank``'s equal slice of dim ``dim`` of a global stacked
    tensor of ``full_size`` experts there."""
    p = getattr(module, name, None)
    if p is not None:
        update_shard_spec(p, ep=Split(dim, full_size), ep_rank=rank)


def is_tp_sharded(p: torch.Tensor) -> bool:
    """Whether ranks of the TP group hold disjoint slices of ``p``."""
    spec = shard_spec(p)
    return spec is not None and spec.is_tp_sharded


def is_expert_parallel(p: torch.Tensor) -> bool:
    """Whether ranks of the ep group hold different experts of ``p``."""
    spec = shard_spec(p)
    return spec is not None and spec.is_expert


def has_partial_grad(p: torch.Tensor) -> bool:
    """Whether ``p``'s gradient must be summed over the TP group (see :func:`mark_partial_grad`)."""
    spec = shard_spec(p)
    return spec is not None and spec.partial_grad


def tp_split(p: torch.Tensor) -> Split | None:
    """The dim of ``p`` split over TP and its global length, or None (replicated over TP)."""
    spec = shard_spec(p)
    return None if spec is None else spec.tp


# -- re-attach after something builds new Parameter objects ------------------------------------


def shard_specs(module: nn.Module) -> dict[str, ShardSpec]:
    """``{parameter name: spec}`` of every parameter of ``module`` that has one."""
    specs = {}
    for name, p in module.named_parameters():
        spec = shard_spec(p)
        if spec is not None:
            specs[name] = spec
    return specs


def retag(module: nn.Module, specs: dict[str, ShardSpec]) -> None:
    """Attach ``specs`` (from :func:`shard_specs`) to ``module``'s current parameters by name:
    after ``.to_empty()`` or ``fully_shard`` put new Parameter objects under the same names."""
    params = dict(module.named_parameters())
    for name, spec in specs.items():
        if name in params:
            set_shard_spec(params[name], spec)


class KeepShardSpecs(nn.Module):
    """A module whose ``.to()`` / ``.to_empty()`` keep its parameters' specs: from the meta
    device they build new Parameter objects, which carry none."""

    def _apply(self, fn, recurse: bool = True):
        specs = shard_specs(self)
        out = super()._apply(fn, recurse)
        retag(self, specs)
        return out


# -- shapes and pieces of global tensors -------------------------------------------------------


def full_shape(p: torch.Tensor) -> torch.Size:
    """The global (single-device, unpadded) shape of parameter ``p``: TP and expert dims at
    their global lengths; a DeepSpeed ZeRO-3 partition at its unpartitioned shape."""
    shape = getattr(p, "ds_shape", p.shape)  # DeepSpeed's own attribute on its partitions
    spec = shard_spec(p)
    return torch.Size(shape) if spec is None else spec.full_shape(shape)


def shard_tensor(full: torch.Tensor, dim: int, local: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s slice of ``local`` entries along ``dim`` of a global tensor, as the
    parallel layers hold it: equal slices in rank order, zero padding past the global length."""
    start = rank * local
    shape = list(full.shape)
    shape[dim] = local
    n = max(0, min(local, full.shape[dim] - start))
    if n == local:
        return full.narrow(dim, start, local).clone()
    out = full.new_zeros(shape)
    if n:
        out.narrow(dim, 0, n).copy_(full.narrow(dim, start, n))
    return out


def local_piece(full: torch.Tensor, p: torch.Tensor, tp_rank: int = 0) -> torch.Tensor:
    """This rank's piece of ``full``, the global tensor of parameter ``p``: its experts, then
    (on TP rank ``tp_rank``) its TP slice; ``full`` itself for a replicated parameter."""
    spec = shard_spec(p)
    if spec is None:
        return full
    if spec.ep is not None:
        n = p.shape[spec.ep.dim]
        full = full.narrow(spec.ep.dim, spec.ep_rank * n, n)
    if spec.tp is not None:
        full = shard_tensor(full, spec.tp.dim, p.shape[spec.tp.dim], tp_rank)
    return full


def to_local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view: writes reach the DTensor), else ``t`` itself."""
    # Imported here: torch.distributed.tensor costs about a second, and most callers (one
    # process, DDP) never hold a DTensor.
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


# -- DTensor views of the global tensors (checkpoints) -----------------------------------------


def tp_global_view(t: torch.Tensor, split: Split, mesh: Any) -> Any:
    """A DTensor over ``mesh`` (tp its last dim) of the unpadded global tensor whose local piece
    is ``t``: this rank's TP shard of a parameter split as ``split`` (or one of its Adam moments),
    or, under FSDP2 x TP, its DTensor shard over the dp dims (:func:`_nested_global_view`).

    The parallel layers keep equal-size shards with padding at the end, which is torch.chunk's
    split: exactly DTensor's ``Shard(dim)`` for the unpadded length."""
    from torch.distributed.tensor import DTensor, Shard

    if isinstance(t, DTensor):
        return _nested_global_view(t, split, mesh)
    rank = mesh.get_local_rank(mesh.ndim - 1)
    local = t.shape[split.dim]
    valid = max(0, min(local, split.length - rank * local))
    shape = list(t.shape)
    shape[split.dim] = split.length
    return _from_local(t.narrow(split.dim, 0, valid), mesh, [Shard(split.dim)], shape)


def ep_global_view(t: torch.Tensor, spec: ShardSpec, mesh: Any) -> Any:
    """A DTensor over ``mesh`` of the global stacked tensor (all experts) whose local piece is
    ``t``, this rank's experts. ``mesh``: ``ep``; ``("ep", "tp")`` when the experts are also
    split over TP (``Shard(tp.dim)`` on tp); under FSDP2 ``("edp", "ep")``, where ``t`` is a
    DTensor over ``edp`` holding a shard of this rank's experts, nested inside the ep split
    exactly as FSDP2 shards nest inside a TP split (:func:`_nested_global_view`)."""
    from torch.distributed.tensor import DTensor, Shard

    ep, tp = spec.ep, spec.tp
    assert ep is not None, "ep_global_view of a parameter that is not expert-parallel"
    if isinstance(t, DTensor):
        return _nested_global_view(t, ep, mesh)
    placements = [Shard(ep.dim)]
    shape = [ep.length if d == ep.dim else n for d, n in enumerate(t.shape)]
    if tuple(mesh.mesh_dim_names or ())[-1:] == ("tp",):
        assert tp is not None  # an ("ep", "tp") mesh is used for TP-split experts only
        placements.append(Shard(tp.dim))
        shape[tp.dim] *= mesh.size(1)  # experts' hidden splits evenly (validated)
    return _from_local(t, mesh, placements, shape)


def _nested_global_view(t: Any, split: Split, mesh: Any) -> Any:
    """The DTensor over ``mesh = (*dp dims, last)`` of the unpadded global tensor whose local
    piece is this rank's FSDP2 shard ``t`` (a DTensor over the dp dims whose global shape is
    this rank's slice of the ``last``-dim split ``split``, padding at the end).

    The placements are FSDP2's on the dp dims plus ``Shard(split.dim)`` on ``last``. When FSDP2
    shards the same dim, the dp split nests inside the outer one (rows ``rank * slice + FSDP
    offset``): DTensor's ``_StridedShard(dim, split_factor=size)`` on the dp dim, which is how
    torch describes FSDP2 over DTensor TP. The piece is checked against what DTensor computes
    for those placements, so a layout they cannot describe fails loudly instead of saving
    misplaced rows (``engine.fsdp.tp_shard_placement`` avoids the one known case)."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    from torch.distributed.tensor.placement_types import _StridedShard

    dim, length = split.dim, split.length
    names = tuple(mesh.mesh_dim_names or ())
    if names[:-1] != tuple(t.device_mesh.mesh_dim_names or ()):
        raise RuntimeError(
            f"checkpoint mesh {names} does not extend the FSDP2 mesh "
            f"{t.device_mesh.mesh_dim_names} by tp"
        )
    tp, tp_rank = mesh.size(mesh.ndim - 1), mesh.get_local_rank(mesh.ndim - 1)
    tp_len = t.shape[dim]
    local = to_local(t.detach())
    size, offset = (
        list(x) for x in compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    )
    if list(local.shape) != size:
        raise RuntimeError(f"FSDP2 shard {tuple(local.shape)} is not DTensor's {size}")
    offset[dim] += tp_rank * tp_len
    size[dim] = max(0, min(size[dim], length - offset[dim]))  # drop TP padding rows
    placements = [
        _StridedShard(dim, split_factor=tp) if pl.is_shard(dim) else pl for pl in t.placements
    ] + [Shard(dim)]
    shape = list(t.shape)
    shape[dim] = length
    want_size, want_offset = compute_local_shape_and_global_offset(shape, mesh, placements)
    if list(want_size) != size or (0 not in size and list(want_offset) != offset):
        raise RuntimeError(
            f"FSDP2 x TP shard of a {tuple(shape)} tensor (dim {dim} split over tp) at offset "
            f"{offset} size {size} is not expressible as {placements} ({list(want_offset)}, "
            f"{list(want_size)})"
        )
    return _from_local(local.narrow(dim, 0, size[dim]), mesh, placements, shape)


def _from_local(local: torch.Tensor, mesh: Any, placements: list, shape: list[int]) -> Any:
    from torch.distributed.tensor import DTensor

    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(
        local, mesh, placements, run_check=False, shape=torch.Size(shape), stride=stride
    )
