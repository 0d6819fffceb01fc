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
Tensor parallelism is not composed with FSDP2 yet (validation requires parallel.tp=1).
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh


def reshard_after_forward(stage: int) -> bool:
    """FSDP2's one switch between the stages (see the module docstring)."""
    if stage not in (1, 2, 3):
        raise ValueError(f"FSDP2 stage must be 1, 2 or 3, got {stage}")
    return stage == 3


def apply_fsdp2(model: torch.nn.Module, dp_mesh: DeviceMesh, stage: int) -> torch.nn.Module:
    """Shard ``model`` in place: one FSDP unit per block in ``model.layers``, then the root.
    Returns the same module (its class is swapped for an FSDP subclass)."""
    from torch.distributed.fsdp import fully_shard

    reshard = reshard_after_forward(stage)
    layers = list(model.layers)
    for i, block in enumerate(layers):
        # The last block's parameters are needed again at once by backward: never reshard them.
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard and i < len(layers) - 1)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard)
    # Prefetching is explicit rather than left to the default heuristics: the next block's
    # all-gather is issued during the current block's forward, and the previous block's during
    # backward.
    for i, block in enumerate(layers):
        if i + 1 < len(layers):
            block.set_modules_to_forward_prefetch([layers[i + 1]])
        if i > 0:
            block.set_modules_to_backward_prefetch([layers[i - 1]])
    return model
