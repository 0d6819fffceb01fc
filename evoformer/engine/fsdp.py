"""ZeRO through PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``) over the data-parallel mesh.

Each transformer block is one FSDP unit (one all-gather / reduce-scatter per block), and the root
module holds what is left (embeddings, final norm, LM head). Every parameter becomes a DTensor
sharded on dim 0 over the ``dp`` mesh dimension; gradients are reduce-scattered (averaged), so
each rank keeps and updates only its shard of the parameters, gradients and AdamW state.

Stages, in FSDP2 terms:

- stage 3: ``reshard_after_forward=True``: parameters are freed after each block's forward and
  all-gathered again for its backward (params, grads, optimizer state all sharded between uses).
- stage 2: ``reshard_after_forward=False``: a block's gathered parameters stay from its forward
  until its backward (one all-gather per step instead of two); grads and optimizer state sharded.
- stage 1: FSDP2 has no mode that shards only the optimizer state, so stage 1 is run as stage 2:
  it shards *more* than ZeRO-1 promises (gradients and, at rest, parameters too), never less.

Gradient accumulation: non-final micro-batches run with ``set_requires_gradient_sync(False)``,
so the unsharded gradients accumulate locally and are reduce-scattered once, on the last one.

2-D (FSDP2 x TP): our TP layers keep plain-tensor TP shards (``ShardSpec.tp``); FSDP2 shards
each rank's TP shard once more over ``dp`` (``Shard(0)``), so a rank holds 1/(tp*dp) of a
sharded weight. The gathered parameters FSDP2 hands the forward are the plain TP shards, so the
layers and their explicit TP collectives run unchanged. A vocabulary table whose TP split pads
(vocab not divisible by tp) is sharded on dim 1 instead, so that its dp shards stay exactly
describable as slices of the unpadded global table (checkpoints store that; see
``checkpoint.io``). The shard specs are re-attached to the new DTensor parameters.

HSDP: ``apply_fsdp2`` with a 2-D ``("dp_replicate", "dp_shard")`` mesh shards within groups of
``dp_shard`` ranks and all-reduces gradients between the ``dp_replicate`` replicas (FSDP2's
own HSDP); the strategy builds that mesh from ``zero.replicate``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import cast

import torch
from torch.distributed.device_mesh import DeviceMesh


def reshard_after_forward(stage: int) -> bool:
    """FSDP2's one switch between the stages (see the module docstring)."""
    if stage not in (1, 2, 3):
        raise ValueError(f"FSDP2 stage must be 1, 2 or 3, got {stage}")
    return stage == 3


def apply_fsdp2(
    model: torch.nn.Module,
    dp_mesh: DeviceMesh,
    stage: int,
    mp_policy=None,
    tp_size: int = 1,
    expert_mesh: DeviceMesh | None = None,
) -> torch.nn.Module:
    """Shard ``model`` in place: one FSDP unit per block in ``model.layers``, then the root.
    Returns the same module (its class is swapped for an FSDP subclass). ``mp_policy``: a
    ``MixedPrecisionPolicy`` for every unit (``engine.precision.fsdp_mp_policy``; None = fp32).
    ``dp_mesh``: the 1-D ``dp`` mesh, or 2-D ``("dp_replicate", "dp_shard")`` for HSDP.
    ``tp_size`` > 1: the model's TP-split parameters are TP shards (2-D FSDP x TP).
    ``expert_mesh``: expert parallelism (see ``shard_experts``)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from evoformer.parallel.sharding import retag, shard_specs

    # FSDP2 puts new DTensor Parameters in place of ours, which carry no spec; the strategy,
    # clipping and checkpoints read the specs, re-attached by name at the end.
    specs = shard_specs(model)
    reshard = reshard_after_forward(stage)
    if mp_policy is not None:
        fully_shard = functools.partial(fully_shard, mp_policy=mp_policy)
    if tp_size > 1:
        shard_size = dp_mesh.size(dp_mesh.ndim - 1)
        placement = tp_shard_placement(tp_size, shard_size)
        fully_shard = functools.partial(fully_shard, shard_placement_fn=placement)
    layers = model.layers
    # A pipeline stage keys its blocks by global layer index (a ModuleDict).
    blocks = layers.values() if isinstance(layers, torch.nn.ModuleDict) else layers
    layers = list(cast(Iterable[torch.nn.Module], blocks))
    if expert_mesh is not None:  # innermost first: the blocks then skip the expert parameters
        shard_experts(model, expert_mesh, reshard, fully_shard)
    for i, block in enumerate(layers):
        # The last block's parameters are needed again at once by backward: never reshard them.
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard and i < len(layers) - 1)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard)
    # Prefetching is explicit rather than left to the default heuristics: the next block's
    # all-gather is issued during the current block's forward, and the previous block's during
    # backward.
    sharded = cast(list[FSDPModule], layers)  # fully_shard made each block one
    for i, block in enumerate(sharded):
        if i + 1 < len(sharded):
            block.set_modules_to_forward_prefetch([sharded[i + 1]])
        if i > 0:
            block.set_modules_to_backward_prefetch([sharded[i - 1]])
    retag(model, specs)
    return model


def shard_experts(model: torch.nn.Module, edp_mesh: DeviceMesh, reshard: bool, fully_shard) -> None:
    """Expert parallelism: one FSDP unit per module holding expert-parallel shards (the stacked
    experts of an MoE layer), sharded over ``edp_mesh`` -- the ranks holding the same experts --
    never over the whole dp group, whose ep ranks hold different experts. FSDP2 averages their
    gradients over edp; the strategy then divides them by ep (``FSDP2Strategy``), since the
    loss is the dp mean and each expert gradient already sums its ep group's tokens.
    (``set_gradient_divide_factor(dp)`` would say the same in one place, but it reduces with
    a pre-multiplied sum, which gloo lacks.)"""
    from evoformer.parallel.sharding import is_expert_parallel

    holders = [
        m for m in model.modules() if any(map(is_expert_parallel, m.parameters(recurse=False)))
    ]
    for m in holders:
        fully_shard(m, mesh=edp_mesh, reshard_after_forward=reshard)


def tp_shard_placement(tp_size: int, shard_size: int):
    """``shard_placement_fn`` for FSDP2 over TP shards: ``Shard(0)`` (FSDP2's default, its
    fastest all-gather) except for a TP shard padded past the global length along dim 0 (a
    vocabulary table with vocab % tp != 0), which gets ``Shard(1)`` when its columns divide
    evenly over the ``shard_size`` ranks (FSDP2 pads only dim 0). Sharding padded rows again on
    dim 0 would give dp shards that no DTensor placement of the unpadded table describes, and
    checkpoints store the unpadded table; a padded table whose columns do not divide is
    refused here, before training, rather than at the first checkpoint."""
    from torch.distributed.tensor import Shard

    from evoformer.errors import UserError
    from evoformer.parallel.sharding import tp_split

    def placement(p: torch.nn.Parameter):
        split = tp_split(p)
        if split is None or split.dim != 0 or p.shape[0] * tp_size == split.length:
            return None  # not a padded vocabulary: FSDP2's default, Shard(0)
        if p.ndim > 1 and p.shape[1] % shard_size == 0:
            return Shard(1)
        raise UserError(
            f"config: a vocabulary of {split.length} is padded over parallel.tp={tp_size} and "
            f"its {p.shape[1] if p.ndim > 1 else 1} columns do not divide over the "
            f"{shard_size} FSDP2 shards: use a vocab_size divisible by tp"
        )

    return placement
