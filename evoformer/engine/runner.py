"""Step runners: how one optimizer step's micro-batches go through the model.

The trainer loop is the same whatever the layout; what differs is behind one interface,
``StepRunner``, with two implementations:

- ``LocalRunner`` (this file): the rank holds every layer; each micro-batch runs forward and
  backward through the strategy's module, gradients synchronised on the last one.
- ``engine.pipeline.PipelineRunner``: the rank holds pipeline stages; the schedule runs the
  micro-batches through them, and the cross-stage pieces (the tied embedding's gradient, loss
  terms and statistics that live on one stage) are finished here, not in the trainer.

Both return the step's loss terms as means over the micro-batches (``ce_loss`` always;
``mtp_loss``, ``aux_loss`` when the model has them), the same on every rank of a model-parallel
group; the trainer then averages them over dp and asks the strategy to step.
"""

from __future__ import annotations

import abc
from contextlib import nullcontext
from typing import cast

import torch

from evoformer.data.dataset import document_ids_from_eod
from evoformer.engine.memory import MemoryMeter
from evoformer.engine.strategy import Strategy
from evoformer.model import Transformer, lm_loss
from evoformer.parallel.sharding import full_shape


class StepRunner(abc.ABC):
    """Forward/backward over a step's micro-batches, evaluation, parameter count and end-of-step
    statistics for one layout; ``model`` is this rank's bare model (all its layers, or its
    pipeline stages) whose modules hold per-step state."""

    model: Transformer
    # data.document_masking: the end-of-document id that splits a window into documents
    document_eod: int | None = None

    def document_ids(self, inputs_BT: torch.Tensor) -> torch.Tensor | None:
        """The ``document_ids`` of model inputs under document masking, else None."""
        if self.document_eod is None:
            return None
        return document_ids_from_eod(inputs_BT, self.document_eod)

    @abc.abstractmethod
    def forward_backward(
        self, batches: list[torch.Tensor], memory: MemoryMeter | None = None
    ) -> dict[str, torch.Tensor]:
        """Forward and backward of this rank's micro-batches ([B, T+1] token windows) under the
        strategy's autocast; gradients are complete (data-parallel reduced, cross-stage summed)
        when it returns. The mean of each loss term over the micro-batches."""

    @abc.abstractmethod
    def evaluate_loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss of one [B, T+1] batch, forward only; every rank of the
        model-parallel groups calls it and receives the loss."""

    @abc.abstractmethod
    def num_params(self) -> int:
        """Parameters of the whole model (a rank holds only its shards and stages)."""

    def end_of_step(self) -> dict[str, float]:
        """Per-step statistics of modules with per-step state (MoE load, aux-loss-free router
        biases), which update once they have seen the whole step's micro-batches."""
        stats: dict[str, float] = {}
        for m in self.model.modules():
            end_of_step = getattr(m, "end_of_step", None)
            if end_of_step is not None:
                stats.update(end_of_step())
        return stats


def global_numel(p: torch.Tensor) -> int:
    """Elements of parameter ``p`` in the whole model: the TP- and EP-sharded dimensions at
    their full size, DeepSpeed ZeRO-3's partitions at their unpartitioned shape."""
    return full_shape(p).numel()


class LocalRunner(StepRunner):
    """Every layer on this rank: micro-batch after micro-batch through ``strategy.module``."""

    def __init__(
        self, model: Transformer, strategy: Strategy, document_eod: int | None = None
    ) -> None:
        self.model = model
        self.strategy = strategy
        self.document_eod = document_eod

    def forward_backward(
        self, batches: list[torch.Tensor], memory: MemoryMeter | None = None
    ) -> dict[str, torch.Tensor]:
        strategy, n = self.strategy, len(batches)
        sums: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(batches):
            with strategy.micro_batch(last=i == n - 1):
                measured = memory.forward(self.model, first=i == 0) if memory else nullcontext()
                module = cast(torch.nn.Module, strategy.module)  # the whole model: set
                x = batch[:, :-1]
                with strategy.autocast(), measured:
                    out = module(x, targets=batch[:, 1:], document_ids=self.document_ids(x))
                strategy.backward(out.loss / n)
            for name, value in out.metrics.items():
                sums[name] = sums.get(name, 0.0) + value.float() / n
        return sums

    @torch.no_grad()
    def evaluate_loss(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch[:, :-1]
        with self.strategy.autocast():
            return lm_loss(self.model(x, document_ids=self.document_ids(x)), batch[:, 1:])

    def num_params(self) -> int:
        return sum(global_numel(p) for p in self.model.parameters())
