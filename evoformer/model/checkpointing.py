"""Activation checkpointing of transformer blocks: ``none | full | selective``, every N blocks.

- ``full``: a checkpointed block keeps only its input; backward runs its forward again
  (``torch.utils.checkpoint``, non-reentrant). Memory per block: one [B, T, C] tensor, at the
  price of a second forward of the block (~33 % more compute).
- ``selective``: an op-level policy (``create_selective_checkpoint_contexts``, the torchtitan
  "op" mode): the outputs of the expensive ops -- matrix multiplies (``mm``, ``addmm``, ``bmm``,
  grouped expert GEMMs) and attention (every SDPA kernel) -- are saved; everything else
  (norms, RoPE, activations and gating, dropout, residual adds, routing glue) is recomputed in
  backward. This drops the cheap-to-recompute but memory-heavy tensors (normalised inputs, the
  rotated q/k, SwiGLU's silu and product) while recomputing almost no FLOPs.
- ``every`` (``activation_checkpointing_every``): checkpoint blocks 0, N, 2N, ... only, trading
  memory for compute in between.

Applied from outside the model (``apply_activation_checkpointing``, called by
``engine.parallelize``): the blocks chosen get a checkpointed ``forward``; the model classes know
nothing of it, and parameter names do not change (no wrapper module). Only training forwards
without a KV cache recompute; evaluation and generation run the plain block.

Correctness under every layout: RNG is preserved (``preserve_rng_state``), so recomputed dropout
draws the same masks; tensor-parallel collectives inside a block are re-issued during the
recompute on every TP rank in the same order (Megatron's full recompute does the same), and
FSDP2's per-block all-gather in backward happens before the recompute needs the weights. MoE
statistics observed twice (forward and recompute) are all normalised by their call count, so the
reported loads and the aux-loss-free bias update are unchanged.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

MODES = ("none", "full", "selective")


def _save_ops() -> frozenset:
    aten = torch.ops.aten
    names = [
        "mm",
        "addmm",
        "bmm",
        "baddbmm",
        "_grouped_mm",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_flash_attention_forward",
        "_efficient_attention_forward",
    ]
    ops = set()
    for name in names:
        packet = getattr(aten, name, None)  # some kernels exist only in some builds
        if packet is not None:
            ops.update(getattr(packet, o) for o in packet.overloads())
    return frozenset(ops)


@functools.cache
def save_ops() -> frozenset:
    """The aten op overloads whose outputs the selective policy keeps."""
    return _save_ops()


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op in save_ops():
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_selective_policy)


def normalize_mode(mode: str | bool | None) -> str:
    """``True`` (the old switch) is ``full``; ``False`` / ``None`` is ``none``."""
    if mode is True:
        return "full"
    if mode in (False, None):
        return "none"
    if mode not in MODES:
        raise ValueError(f"activation checkpointing must be one of {', '.join(MODES)}: {mode!r}")
    return mode


def is_checkpointed(mode: str, every: int, layer_idx: int) -> bool:
    """Whether block ``layer_idx`` (position in this model's stack) is checkpointed."""
    return mode != "none" and layer_idx % max(every, 1) == 0


def checkpoint_block(block: Callable[..., torch.Tensor], mode: str, *args) -> torch.Tensor:
    """Run ``block(*args)`` under ``full`` or ``selective`` checkpointing."""
    if mode == "selective":
        return checkpoint(block, *args, use_reentrant=False, context_fn=_selective_context)
    return checkpoint(block, *args, use_reentrant=False)


def apply_activation_checkpointing(layers: nn.Module, mode: str | bool | None, every: int) -> int:
    """Checkpoint the blocks of ``layers`` (a stack keyed by global layer index: the model's
    ``ModuleList``, or a pipeline stage's ``ModuleDict``) that ``mode`` / ``every`` select, so a
    stage checkpoints the same blocks as the whole model. Returns how many were wrapped."""
    mode = normalize_mode(mode)
    wrapped = 0
    for key, block in layers.named_children():
        if is_checkpointed(mode, every, int(key)):
            forward = functools.partial(_checkpointed_forward, mode=mode)
            # A bound method on the instance: copies of the block rebind it to themselves.
            block.forward = types.MethodType(forward, block)
            wrapped += 1
    return wrapped


def _checkpointed_forward(block: nn.Module, x, rope=None, cache=None, docs=None, *, mode: str):
    plain = functools.partial(type(block).forward, block)
    if block.training and cache is None:
        return checkpoint_block(plain, mode, x, rope, None, docs)
    return plain(x, rope, cache, docs)
