"""Data-parallel strategies: one interface over DDP, FSDP2 and DeepSpeed.

A strategy owns how the replicas of the model cooperate: it wraps the model, builds the
optimizer, runs backward, synchronises and clips gradients, steps, and saves/loads the model and
optimizer state. The trainer calls only this interface and never branches on ``zero.backend``::

    strategy = build_strategy(cfg, dims, groups, device)
    strategy.setup(model)                      # wrap/shard, then build the optimizer
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
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from evoformer.checkpoint import load_checkpoint, save_checkpoint
from evoformer.config import Config
from evoformer.distributed import ParallelDims
from evoformer.distributed.dims import ParallelGroups
from evoformer.engine.grad_norm import clip_grad_norm_
from evoformer.engine.optim import build_optimizer, set_lr
from evoformer.model import Transformer
from evoformer.parallel.layers import sequence_parallel_params, sync_sequence_parallel_grads


@dataclasses.dataclass
class StepResult:
    """What one optimizer step reports: the gradient norm before clipping (as one process
    holding the whole model computes it), whether the update was skipped (fp16 overflow), and
    strategy metrics for ``metrics.jsonl`` (e.g. the loss scale)."""

    grad_norm: float
    skipped: bool = False
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)


class Strategy:
    """Plain torch on one data-parallel rank (dp = 1, any tp); the base of the others.

    Subclasses override ``_wrap`` (and whatever else differs). ``model`` is always the bare
    ``Transformer`` (its modules hold per-step state such as MoE statistics); ``module`` is what
    the forward pass calls (the DDP wrapper, the DeepSpeed engine, or the model itself)."""

    name = "single"

    def __init__(self, cfg: Config, dims: ParallelDims, groups: ParallelGroups,
                 device: torch.device) -> None:  # fmt: skip
        self.cfg = cfg
        self.dims = dims
        self.groups = groups
        self.device = device
        self.model: Transformer | None = None
        self.module: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.tp_mesh = groups.submesh("tp") if dims.tp > 1 else None
        self.partial_grad_params: list[torch.nn.Parameter] = []

    # -- building ------------------------------------------------------------------------------

    def setup(self, model: Transformer) -> None:
        """Wrap or shard ``model`` for this strategy and build the optimizer over the result."""
        self.model = model
        # Replicated parameters whose gradient each TP rank holds only a share of.
        self.partial_grad_params = sequence_parallel_params(model)
        self.module = self._wrap(model)
        self.optimizer = build_optimizer(model, self.cfg.optim)

    def _wrap(self, model: Transformer) -> torch.nn.Module:
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
        if self.cfg.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, lr: float, max_norm: float) -> StepResult:
        """Finish the gradients (TP partial sums), clip to ``max_norm`` (<= 0: no clipping) by
        the global norm, update with learning rate ``lr``, and zero the gradients."""
        set_lr(self.optimizer, lr)
        sync_sequence_parallel_grads(self.partial_grad_params, self.groups.tp_group)
        norm = clip_grad_norm_(
            self.model.parameters(), max_norm if max_norm > 0 else float("inf"),
            self.groups.tp_group,
        )  # fmt: skip
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(grad_norm=norm.item())

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Strategy state that must survive a resume (JSON-serialisable; e.g. the loss scale)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def save_checkpoint(self, ckpt_root: Path, step: int, trainer_state: dict[str, Any],
                        **kwargs: Any) -> Path:  # fmt: skip
        """Save model + optimizer (+ this strategy's state) atomically; see
        ``checkpoint.save_checkpoint`` for ``kwargs``."""
        trainer_state = {**trainer_state, "strategy": self.state_dict()}
        return save_checkpoint(
            ckpt_root, step, self.model, self.optimizer, trainer_state=trainer_state,
            tp_mesh=self.tp_mesh, **kwargs,
        )  # fmt: skip

    def load_checkpoint(self, ckpt: Path) -> dict[str, Any]:
        """Restore model + optimizer + RNG in place; returns the trainer state."""
        state = load_checkpoint(
            ckpt, self.model, self.optimizer, tp_mesh=self.tp_mesh,
            rng_rank=self.dims.rank - self.dims.tp_rank,  # one RNG state per TP group
        )  # fmt: skip
        self.load_state_dict(state.get("strategy", {}))
        return state

    def local_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(kind, tensor) for what this rank holds: ``param`` and ``optim`` (between steps),
        and ``grad`` while gradients exist (after backward, before the step zeroes them).
        ``engine.memory`` counts memory through this; a strategy that keeps gradients or
        parameters elsewhere (flat buffers, another precision) yields those instead."""
        from torch.distributed.tensor import DTensor

        def local(t: torch.Tensor) -> torch.Tensor:
            return t.to_local() if isinstance(t, DTensor) else t

        for p in self.model.parameters():
            yield "param", local(p)
            if p.grad is not None:
                yield "grad", local(p.grad)
        for state in self.optimizer.state.values():
            for v in state.values():
                if torch.is_tensor(v) and v.dim() > 0:
                    yield "optim", local(v)


class DDPStrategy(Strategy):
    """ZeRO stage 0: every dp rank holds everything; DDP all-reduces (averages) gradients over
    the data-parallel group only, once per step (``no_sync`` on earlier micro-batches)."""

    name = "ddp"

    def _wrap(self, model: Transformer) -> torch.nn.Module:
        self.ddp = DistributedDataParallel(
            model, device_ids=None if self.device.type == "cpu" else [self.device.index],
            process_group=self.groups.dp_group,
        )  # fmt: skip
        return self.ddp

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last else self.ddp.no_sync()


class FSDP2Strategy(Strategy):
    """ZeRO stages 1-3 through FSDP2 over the data-parallel mesh (see ``engine.fsdp``)."""

    name = "fsdp2"

    def _wrap(self, model: Transformer) -> torch.nn.Module:
        from evoformer.engine.fsdp import apply_fsdp2

        # FSDP2 replaces the parameters by DTensor shards: before the optimizer sees them.
        apply_fsdp2(model, self.groups.submesh("dp"), self.cfg.zero.stage)
        return model

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        # Reduce-scatter the accumulated gradients once, on the last micro-batch.
        self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def describe(self) -> str:
        return f"fsdp2 stage {self.cfg.zero.stage}"


def build_strategy(cfg: Config, dims: ParallelDims, groups: ParallelGroups,
                   device: torch.device) -> Strategy:  # fmt: skip
    """The strategy for ``zero.backend``; with one data-parallel rank there is nothing to
    replicate or shard, and the model trains as plain torch."""
    backend = cfg.zero.backend
    if dims.dp == 1:
        cls: type[Strategy] = Strategy
    elif backend == "fsdp2":
        cls = FSDP2Strategy
    else:
        cls = DDPStrategy
    return cls(cfg, dims, groups, device)
