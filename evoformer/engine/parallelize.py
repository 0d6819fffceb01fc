"""How a model becomes the distributed, training model: one function, in order.

``parallelize`` reads top to bottom as the steps a rank takes; each step is one call into the
package that owns it:

0. build this rank's model -- all layers (``model.build_model``), or only its pipeline stages
   (``engine.pipeline.build_pipeline_model``) -- tensor-parallel from construction
   (``parallel.layers``: TP is part of the model definition, not a wrapper);
1. FP8: swap the linear layers for FP8 ones (``engine.fp8``), before anything wraps or shards
   them (FSDP2 then shards the swapped modules);
2. activation checkpointing of the chosen blocks (``model.checkpointing``), from outside the
   model; then the optimizer-side terms the model computes (the z-loss weight, QK-clip
   trackers on the attention layers);
3. compile each block, or the whole model (``train.compile_scope``; lazily: traced at its
   first forward, so after the wrapping below);
4. data parallelism: the strategy wraps or shards the model (DDP, FSDP2, DeepSpeed) and builds
   the optimizer over the result (``engine.strategy``);
5. the step runner: for pp > 1 the pipeline schedule over the wrapped stage chunks
   (``engine.pipeline``), else micro-batches through the wrapped model (``engine.runner``).
"""

from __future__ import annotations

import dataclasses
from typing import cast

import torch

from evoformer.config import Config
from evoformer.distributed import ParallelDims
from evoformer.distributed.dims import ParallelGroups
from evoformer.engine.runner import LocalRunner, StepRunner
from evoformer.engine.strategy import Strategy, build_strategy
from evoformer.model import Block, Transformer, build_model
from evoformer.model.attention import Attention
from evoformer.model.checkpointing import apply_activation_checkpointing
from evoformer.model.qk_clip import QKClip
from evoformer.model.stages import TransformerStage


@dataclasses.dataclass
class ParallelModel:
    """A rank's training model: the bare ``model`` (its modules hold per-step state; the
    optimizer and checkpoints see its full-model names), the ``strategy`` that wraps it and
    steps the optimizer, and the ``runner`` that runs a step's micro-batches through it."""

    model: Transformer
    strategy: Strategy
    runner: StepRunner


def parallelize(
    cfg: Config,
    dims: ParallelDims,
    groups: ParallelGroups,
    device: torch.device,
    n_microbatches: int,
    document_eod: int | None = None,
) -> ParallelModel:
    """Build this rank's model for ``cfg`` and make it distributed, in the order of the module
    docstring. ``n_microbatches``: micro-batches per step on this rank (the pipeline schedule
    is built for that many). ``document_eod`` (data.document_masking): the end-of-document id
    from which the runner derives each window's documents."""
    # 0. This rank's model, initialised from the seed as one process would.
    if dims.pp > 1:
        from evoformer.engine.pipeline import build_pipeline_model

        model: Transformer = build_pipeline_model(cfg, dims, groups, device)
    else:
        model = build_model(
            cfg.model,
            device=device,
            seed=cfg.run.seed,
            groups=groups,
            sequence_parallel=cfg.parallel.sequence_parallel,
        )
    # 1. FP8 module swaps.
    fp8 = None
    if cfg.fp8.enabled:
        from evoformer.engine.fp8 import setup_fp8

        fp8 = setup_fp8(model, cfg.fp8, fsdp=cfg.zero.backend == "fsdp2")
    # 2. Activation checkpointing, by global layer index (a stage checkpoints what the whole
    #    model would).
    apply_activation_checkpointing(
        model.layers, cfg.activation_checkpointing, cfg.activation_checkpointing_every
    )
    # 2b. Optimizer-side terms on the model: the z-loss weight (optim.z_loss), and QK-clip
    #     trackers on the attention layers (optim.qk_clip), clipping after each step.
    model.z_loss_weight = cfg.optim.z_loss
    if cfg.optim.qk_clip > 0:
        attach_qk_clip(model, cfg.optim.qk_clip, groups)
    # 3. Compile, in place: parameter names (and checkpoints) do not change.
    mode = {} if cfg.train.compile_mode == "default" else {"mode": cfg.train.compile_mode}
    if cfg.train.compile and cfg.train.compile_scope == "model":
        model.compile(**mode)  # one graph; validation keeps it to pp = 1 under DDP
    elif cfg.train.compile:
        for block in model.modules():
            if isinstance(block, Block):
                block.compile(**mode)
    # 4. Data parallelism (wraps the stage chunks one by one under pp > 1).
    strategy = build_strategy(cfg, dims, groups, device)
    chunks = getattr(model, "chunks", None)
    strategy.setup(model, parts=chunks, fp8=fp8)
    # 5. The step runner.
    if dims.pp > 1:
        from evoformer.engine.pipeline import PipelineRunner

        stage = cast(TransformerStage, model)  # built by build_pipeline_model in step 0
        pipeline = PipelineRunner(
            cfg, dims, groups, device, stage, strategy, n_microbatches, document_eod
        )
        strategy.clip_scope = pipeline.clip_scope  # the norm spans the stages
        return ParallelModel(model, strategy, pipeline)
    return ParallelModel(model, strategy, LocalRunner(model, strategy, document_eod))


def attach_qk_clip(model: Transformer, threshold: float, groups: ParallelGroups) -> None:
    """Give each block's attention a ``QKClip`` tracker (``model.qk_clip``): it records the
    step's largest logit per head and clips after the optimizer step (``end_of_step``)."""
    for block in model.modules():
        # Hybrid blocks: only attention layers have logits to clip (DeltaNet / Mamba-2 none).
        if isinstance(block, Block) and block.spec.mixer == "attention":
            attn = cast(Attention, block.attn)
            attn.qk_clip = QKClip(
                threshold, f"L{block.layer_idx}", groups.dp_group, groups.tp_group
            )
