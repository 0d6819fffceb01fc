"""Data-parallel strategies: one interface over DDP, FSDP2 and DeepSpeed.

A strategy owns how the replicas of the model cooperate: it wraps the model, builds the
optimizer, runs backward, synchronises and clips gradients, steps, and saves/loads the model and
optimizer state. The trainer calls only this interface and never branches on ``zero.backend``::

    strategy = build_strategy(cfg, dims, groups, device)
    strategy.setup(model)                      # wrap/shard, then build the optimizer
                                               # (engine.parallelize does this, in order)
    for i, batch in enumerate(micro_batches):
        with strategy.micro_batch(last=i == n - 1), strategy.autocast():
            out = strategy.module(batch ...)
        strategy.backward(out.loss / n)
    result = strategy.step(lr, max_norm)       # grad norm, skipped?, metrics

Precision (autocast / loss scaling) sits behind ``autocast`` and ``backward``/``step`` too, so
fp16's skipped steps are the strategy's business and the loop stays the same.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from evoformer.checkpoint import (
    WEIGHTS_ONLY,
    PendingSave,
    begin_save,
    load_checkpoint,
    read_trainer_state,
)
from evoformer.config import Config
from evoformer.distributed import ParallelDims
from evoformer.distributed.dims import ParallelGroups
from evoformer.engine.fp8 import FP8Training
from evoformer.engine.grad_norm import ClipScope, clip_grad_norm_
from evoformer.engine.optim import build_optimizer, set_lr
from evoformer.engine.precision import LossScaler, found_overflow
from evoformer.engine.precision import autocast as precision_autocast
from evoformer.errors import UserError
from evoformer.model import Transformer
from evoformer.parallel.expert import expert_parallel_params, reduce_expert_grads
from evoformer.parallel.layers import sequence_parallel_params, sync_sequence_parallel_grads
from evoformer.parallel.sharding import to_local


@dataclasses.dataclass
class StepResult:
    """What one optimizer step reports: the gradient norm before clipping (as one process
    holding the whole model computes it), whether the update was skipped (fp16 overflow), and
    strategy metrics for ``metrics.jsonl`` (e.g. the loss scale)."""

    grad_norm: float
    skipped: bool = False
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    # Not applied because the gradients were not finite (bf16/fp32; fp16 overflows are the
    # loss scaler's business) or because the caller asked (a non-finite or spiking loss).
    nonfinite: bool = False


class Strategy:
    """Plain torch on one data-parallel rank (dp = 1, any tp); the base of the others.

    Subclasses override ``_wrap`` (and whatever else differs). ``model`` is always the bare
    ``Transformer`` (its modules hold per-step state such as MoE statistics); ``module`` is what
    the forward pass calls (the DDP wrapper, the DeepSpeed engine, or the model itself)."""

    name = "single"
    model: Transformer
    optimizer: torch.optim.Optimizer

    def __init__(
        self, cfg: Config, dims: ParallelDims, groups: ParallelGroups, device: torch.device
    ) -> None:
        self.cfg = cfg
        self.dims = dims
        self.groups = groups
        self.device = device
        # model and optimizer are set by setup(), before anything else is called.
        self.module: torch.nn.Module | None = None
        self.tp_mesh = groups.submesh("tp") if dims.tp > 1 else None
        # Expert-parallel shards are stored as global tensors over this mesh (checkpoint.io).
        self.ep_mesh = None
        if dims.ep > 1:
            mesh = groups.mesh
            assert mesh is not None  # built with the groups whenever a dimension is > 1
            self.ep_mesh = mesh["ep", "tp"] if dims.tp > 1 else groups.submesh("ep")
        self.partial_grad_params: list[torch.nn.Parameter] = []
        # fp16 only: bf16 and fp32 have the exponent range to need no scaling.
        self.scaler = LossScaler.from_config(cfg.loss_scale) if cfg.precision == "fp16" else None
        self.fp8 = None  # engine.fp8.FP8Training when the model's linears were swapped
        # Which groups the gradient norm spans (engine.parallelize widens it for pipelines).
        self.clip_scope = ClipScope(groups.tp_group, groups.ep_group)
        self.parts: list[torch.nn.Module] = []

    # -- building ------------------------------------------------------------------------------

    def setup(
        self,
        model: Transformer,
        parts: list[torch.nn.Module] | None = None,
        fp8: FP8Training | None = None,
    ) -> None:
        """Wrap or shard ``model`` for this strategy and build the optimizer over the result.
        ``parts`` (pipeline parallelism): the stage modules this rank runs, each sharing
        ``model``'s submodules; they are wrapped one by one (``self.parts``) instead of
        ``model``, which keeps the full-model names for the optimizer and checkpoints.
        ``fp8``: the FP8 conversion already applied to ``model`` (its autocast and its
        after-step hook run with the strategy's)."""
        self.model = model
        self.fp8 = fp8
        # Replicated parameters whose gradient each TP rank holds only a share of.
        self.partial_grad_params = sequence_parallel_params(model)
        if parts:
            self.parts = [self._wrap(part) for part in parts]
            self.module = None
        else:
            self.module = self._wrap(model)
        self.optimizer = build_optimizer(model, self.cfg.optim, self.groups.tp_group)

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def describe(self) -> str:
        """A few words for the start-up banner."""
        return ""

    # -- one step ------------------------------------------------------------------------------

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward and backward: gradients are synchronised
        across data-parallel ranks only on the ``last`` micro-batch of a step."""
        return contextlib.nullcontext()

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context of the forward pass: autocast to bf16/fp16 (see ``engine.precision``) and,
        with ``fp8.backend=te``, Transformer Engine's ``fp8_autocast``."""
        stack = contextlib.ExitStack()
        stack.enter_context(self._precision_autocast())
        if self.fp8 is not None:
            stack.enter_context(self.fp8.autocast())
        return stack

    def _precision_autocast(self) -> contextlib.AbstractContextManager:
        return precision_autocast(self.cfg.precision, self.device)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of ``loss`` (multiplied by the loss scale under fp16)."""
        if self.scaler is not None:
            loss = self.scaler.scale_loss(loss)
        loss.backward()

    def step(self, lr: float, max_norm: float, skip: bool = False) -> StepResult:
        """Finish the gradients (TP partial sums), clip to ``max_norm`` (<= 0: no clipping) by
        the global norm, update with learning rate ``lr``, and zero the gradients.

        The update is not applied (``nonfinite``) when the global gradient norm is not finite
        -- the norm is the same on every rank, so all ranks skip together -- or when ``skip``
        (the caller's decision, the same on every rank: a non-finite or spiking loss)."""
        set_lr(self.optimizer, lr)
        sync_sequence_parallel_grads(self.partial_grad_params, self.groups.tp_group)
        self._sync_expert_grads()
        params = list(self.model.parameters())
        if self.scaler is not None:
            self.scaler.unscale_(params)  # the norm and the clipping see true gradients
        norm = clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"), self.clip_scope)
        if skip or (self.scaler is None and found_overflow(norm, self.groups.tp_group)):
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(grad_norm=norm.item(), skipped=True, nonfinite=True)
        if self.scaler is None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.fp8 is not None:
                self.fp8.after_optimizer_step()
            return StepResult(grad_norm=norm.item())
        # fp16: the norm is global (see engine.precision), so every rank skips together.
        scale = self.scaler.scale
        overflow = found_overflow(norm, self.groups.tp_group)
        if not overflow:
            self.optimizer.step()
            if self.fp8 is not None:
                self.fp8.after_optimizer_step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.update(overflow)
        metrics = {"loss_scale": scale, "skipped_steps": float(self.scaler.skipped_steps)}
        return StepResult(grad_norm=norm.item(), skipped=overflow, metrics=metrics)

    def _sync_expert_grads(self) -> None:
        """Reduce the expert-parallel gradients the wrapper leaves alone (DDP ignores them)."""

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Strategy state that must survive a resume (JSON-serialisable; e.g. the loss scale)."""
        return {} if self.scaler is None else {"loss_scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and "loss_scaler" in state:
            self.scaler.load_state_dict(state["loss_scaler"])

    def save_checkpoint(
        self, ckpt_root: Path, step: int, trainer_state: dict[str, Any], **kwargs: Any
    ) -> Path:
        """Save model + optimizer (+ this strategy's state) atomically; see
        ``checkpoint.save_checkpoint`` for ``kwargs``."""
        return self.begin_save(ckpt_root, step, trainer_state, **kwargs).commit()

    def begin_save(
        self,
        ckpt_root: Path,
        step: int,
        trainer_state: dict[str, Any],
        background: bool = False,
        **kwargs: Any,
    ) -> PendingSave:
        """Start a save; ``commit()`` on the result completes it (``checkpoint.begin_save``).
        ``background``: the shards are written on a thread (DCP's async_save) over a gloo group
        of their own, so their collectives never interleave with the training loop's."""
        trainer_state = {**trainer_state, "strategy": self.state_dict()}
        group = self._checkpoint_group() if background else None
        return begin_save(
            ckpt_root,
            step,
            self.model,
            self.optimizer,
            trainer_state=trainer_state,
            tp_mesh=self.tp_mesh,
            ep_mesh=self.ep_mesh,
            background=background,
            process_group=group,
            **kwargs,
        )

    def _checkpoint_group(self) -> dist.ProcessGroup | None:
        """The background writer's process group (created on first use; collective)."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        if getattr(self, "_ckpt_group", None) is None:
            # new_group returns an int placeholder on ranks outside the group: never here
            self._ckpt_group = cast(dist.ProcessGroup, dist.new_group(backend="gloo"))
        return self._ckpt_group

    def load_checkpoint(self, ckpt: Path, weights_only: bool = False) -> dict[str, Any]:
        """Restore model + optimizer + RNG in place; returns the trainer state. A checkpoint of
        weights only (``weights_only`` in its trainer state: ``import-hf``), or any checkpoint
        when ``weights_only`` (``checkpoint.init_from``), loads the weights and leaves the fresh
        optimizer and RNG alone."""
        saved = read_trainer_state(ckpt)
        if weights_only or saved.get(WEIGHTS_ONLY):
            load_checkpoint(
                ckpt,
                self.model,
                None,
                restore_rng=False,
                tp_mesh=self.tp_mesh,
                ep_mesh=self.ep_mesh,
            )
            return saved
        if saved.get("strategy", {}).get("backend") == "deepspeed":
            raise UserError(
                f"checkpoint {ckpt} holds DeepSpeed's optimizer state (zero.backend=deepspeed); "
                "resume it with zero.backend=deepspeed (load_model / export-hf read its weights)"
            )
        state = load_checkpoint(
            ckpt,
            self.model,
            self.optimizer,
            tp_mesh=self.tp_mesh,
            ep_mesh=self.ep_mesh,
            rng_rank=self.dims.rank - self.dims.tp_rank,  # one RNG state per TP group
        )
        self.load_state_dict(state.get("strategy", {}))
        return state

    def local_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(kind, tensor) for what this rank holds: ``param`` and ``optim`` (between steps),
        and ``grad`` while gradients exist (after backward, before the step zeroes them).
        ``engine.memory`` counts memory through this; a strategy that keeps gradients or
        parameters elsewhere (flat buffers, another precision) yields those instead."""
        for p in self.model.parameters():
            yield "param", to_local(p)
            if p.grad is not None:
                yield "grad", to_local(p.grad)
        for state in self.optimizer.state.values():
            for v in state.values():
                if torch.is_tensor(v) and v.dim() > 0:
                    yield "optim", to_local(v)


class DDPStrategy(Strategy):
    """ZeRO stage 0: every dp rank holds everything; DDP all-reduces (averages) gradients over
    the data-parallel group only, once per step (``no_sync`` on earlier micro-batches)."""

    name = "ddp"

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        # Expert-parallel shards differ between the ranks of an ep group: DDP must neither
        # broadcast nor average them over dp; _sync_expert_grads reduces them over edp.
        ignore = [name for name, _ in expert_parallel_params(model)]  # names inside `model`
        if ignore:
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
        # From the whole model: pipeline stages are wrapped one by one.
        self.expert_params = [p for _, p in expert_parallel_params(self.model)]
        self.ddp = DistributedDataParallel(
            model,
            device_ids=None if self.device.type == "cpu" else [self.device.index],
            process_group=self.groups.dp_group,
        )
        return self.ddp

    def _sync_expert_grads(self) -> None:
        if self.expert_params:
            # The loss is the mean over dp ranks; an expert's gradient already sums every ep
            # rank's tokens (all-to-all backward), so sum it over its edp replicas and divide
            # by dp -- what DDP's average does for the dense gradients.
            # (Under cp the replicas are edp x cp and the mean is over dp x cp.)
            reduce_expert_grads(self.expert_params, self.groups.edp_group, self.dims.replicas)

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last else self.ddp.no_sync()


class FSDP2Strategy(Strategy):
    """ZeRO stages 1-3 through FSDP2 over the data-parallel mesh (see ``engine.fsdp``)."""

    name = "fsdp2"

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        from evoformer.engine.fsdp import apply_fsdp2
        from evoformer.engine.precision import fsdp_mp_policy

        root, dp_dims, fsdp_mesh = self._fsdp_meshes()
        expert_mesh = None
        if self.dims.ep > 1:
            # Experts are sharded over their replicas (edp) only; checkpoints store them
            # through (edp, ep) as the global [E, ...] tensors.
            expert_mesh = self.groups.submesh("edp")
            self.ep_mesh = root["edp", "ep"]
        # FSDP2 replaces the parameters by DTensor shards: before the optimizer sees them.
        apply_fsdp2(
            model,
            fsdp_mesh,
            self.cfg.zero.stage,
            mp_policy=fsdp_mp_policy(self.cfg.precision),
            tp_size=self.dims.tp,
            expert_mesh=expert_mesh,
        )
        # From the whole model (pipeline stages are wrapped one by one; the last call sees all).
        self.expert_params = [p for _, p in expert_parallel_params(self.model)]
        if self.dims.tp > 1:
            # The new parameters carry the SP tags again (all of them, from the whole model:
            # pipeline stages are wrapped one by one); checkpoints store the dp shards of TP
            # shards through the (dp..., tp) mesh as slices of the global tensors.
            self.partial_grad_params = sequence_parallel_params(self.model)
            self.tp_mesh = root[(*dp_dims, "tp")]
        return model

    def _fsdp_meshes(self) -> tuple:
        """(root mesh, its data-parallel dim names, the mesh FSDP2 shards over), built once:
        ``dp``, or for HSDP (``zero.replicate`` > 1) dp split into (dp_replicate, dp_shard)."""
        if getattr(self, "_meshes", None) is None:
            replicate = self.cfg.zero.replicate
            if replicate > 1:
                root, dims = self.groups.hsdp_mesh(replicate), ("dp_replicate", "dp_shard")
                self._meshes = (root, dims, root[dims])
            elif self.dims.cp > 1:  # shard over dp x cp (torchtitan's dp_shard_cp)
                self._meshes = (self.groups.mesh, ("dp_cp",), self.groups.submesh("dp_cp"))
            else:
                self._meshes = (self.groups.mesh, ("dp",), self.groups.submesh("dp"))
        return self._meshes

    def _precision_autocast(self) -> contextlib.AbstractContextManager:
        # The mixed-precision policy casts the gathered parameters: no autocast on top.
        return contextlib.nullcontext()

    def _sync_expert_grads(self) -> None:
        # FSDP2 averaged the expert gradients over edp; the dp mean needs a further 1/ep (each
        # already sums its ep group's tokens: see engine.fsdp.shard_experts).
        grads = [to_local(p.grad) for p in self.expert_params if p.grad is not None]
        if grads:
            torch._foreach_div_(grads, float(self.dims.ep))

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        # Reduce-scatter the accumulated gradients once, on the last micro-batch.
        cast(FSDPModule, self.model).set_requires_gradient_sync(last)  # fully_shard made it one
        return contextlib.nullcontext()

    def describe(self) -> str:
        hsdp = f", HSDP {self.cfg.zero.replicate} replicas" if self.cfg.zero.replicate > 1 else ""
        return f"fsdp2 stage {self.cfg.zero.stage}{hsdp}"


def build_strategy(
    cfg: Config, dims: ParallelDims, groups: ParallelGroups, device: torch.device
) -> Strategy:
    """The strategy for ``zero.backend``; with one data-parallel rank there is nothing to
    replicate or shard, and the model trains as plain torch."""
    backend = cfg.zero.backend
    if backend == "deepspeed":  # also at dp = 1: offload, and DeepSpeed's own checkpoints
        from evoformer.engine.deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy(cfg, dims, groups, device)
    if dims.replicas == 1:  # dp x cp: context-parallel ranks reduce gradients like replicas
        cls: type[Strategy] = Strategy
    elif backend == "fsdp2":
        cls = FSDP2Strategy
    else:
        cls = DDPStrategy
    return cls(cfg, dims, groups, device)
