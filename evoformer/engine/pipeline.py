"""Pipeline parallelism through ``torch.distributed.pipelining``.

Each pp rank holds one ``TransformerStage`` (``model.stages``) with one ``StageChunk`` per
virtual stage; every chunk, wrapped by the data-parallel strategy (DDP or FSDP2, one wrapper per
chunk), becomes a ``PipelineStage`` over ``groups.pp_group``, and the schedule from
``parallel.pp_schedule`` runs the rank's micro-batches (global batch / (dp x micro batch)):

- ``gpipe``: all forwards, then all backwards; ``1f1b``: one forward, one backward in steady
  state (same bubble, less activation memory). Bubble fraction (p-1)/(m+p-1).
- ``interleaved``: interleaved 1F1B over v virtual stages per rank; bubble (p-1)/(v*m+p-1).
- ``zero_bubble``: interleaved zero bubble (ZB1P): backward split into input-grad and
  weight-grad halves, the weight halves fill the bubble.
- ``zbv``: zero bubble on a V-shaped placement (2 stages per rank, rank 0 holds first and last).

Numbers as one process: the last stage's loss per micro-batch is ``(CE + w*MTP + aux) / m``,
exactly the trainer's, backpropagated by the schedule (``scale_grads=False``); MoE aux losses of
earlier stages ride backward on their stage output with gradient 1/m. Loss metrics are summed
over pp (each stage contributes its own terms) so every rank reports them. Tied embeddings (and
the embedding MTP needs on the last stage) have their gradients summed over the first and last
stage's ranks before clipping, and are counted once in the gradient norm.

Evaluation runs forward-only: micro-batch by micro-batch through the stages with point-to-point
sends over the pp group.
"""

from __future__ import annotations

import dataclasses
from typing import cast

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.nn.parallel import DistributedDataParallel

from evoformer.config import Config
from evoformer.distributed import ParallelDims
from evoformer.distributed.dims import ParallelGroups
from evoformer.engine.grad_norm import ClipScope
from evoformer.engine.memory import MemoryMeter
from evoformer.engine.runner import StepRunner, global_numel
from evoformer.engine.strategy import Strategy
from evoformer.errors import UserError
from evoformer.model.layout import layer_spec
from evoformer.model.stages import TransformerStage, build_stage_model, split_layers, stage_ranks
from evoformer.parallel.expert import expert_parallel_params
from evoformer.parallel.sharding import to_local


@dataclasses.dataclass(frozen=True)
class ScheduleSpec:
    """A ``parallel.pp_schedule`` choice: the torch class and whether it takes several stages
    per rank (how many, and their placement: ``ParallelConfig.stages_per_rank``,
    ``stage_placement``)."""

    cls_name: str
    multi: bool
    split_backward: bool = False  # zero bubble: input- and weight-gradient passes apart


SCHEDULES = {
    "gpipe": ScheduleSpec("ScheduleGPipe", False),
    "1f1b": ScheduleSpec("Schedule1F1B", False),
    "interleaved": ScheduleSpec("ScheduleInterleaved1F1B", True),
    "zero_bubble": ScheduleSpec("ScheduleInterleavedZeroBubble", True, split_backward=True),
    "zbv": ScheduleSpec("ScheduleZBVZeroBubble", True, split_backward=True),
}


def _needs_shared_embed(cfg: Config) -> bool:
    return cfg.model.tie_embeddings or cfg.model.mtp.depth > 0


def build_pipeline_model(
    cfg: Config, dims: ParallelDims, groups: ParallelGroups, device: torch.device
) -> TransformerStage:
    """This pp rank's stage model (its chunks in ``.chunks``), initialised like one process."""
    p = cfg.parallel
    S = p.pp * p.stages_per_rank
    stages = split_layers(cfg.model, S, cfg.train.seq_len, p.pp_layers)
    placement = stage_ranks(S, p.pp, p.stage_placement)
    mine = [s for s in range(S) if placement[s] == dims.pp_rank]
    model = build_stage_model(
        cfg.model,
        stages,
        mine,
        device=device,
        seed=cfg.run.seed,
        groups=groups,
        sequence_parallel=p.sequence_parallel,
    )
    model.pp_stages, model.pp_placement = stages, placement
    return model


class PipelineRunner(StepRunner):
    """The step runner for pp > 1: one training step's micro-batches through the pipeline
    schedule, evaluation forward-only, and the cross-stage pieces of a step (tied gradients,
    loss terms and statistics of every stage, the gradient norm's scope)."""

    def __init__(
        self,
        cfg: Config,
        dims: ParallelDims,
        groups: ParallelGroups,
        device: torch.device,
        model: TransformerStage,
        strategy: Strategy,
        n_microbatches: int,
        document_eod: int | None = None,
    ) -> None:
        """``strategy`` (engine.strategy, set up with ``parts=model.chunks``) holds the wrapped
        chunks; its autocast and loss scale apply to the schedule's forwards and backwards.
        ``document_eod``: data.document_masking's end-of-document id (``StepRunner``)."""
        import torch.distributed.pipelining as pipelining

        parts = strategy.parts
        self.strategy = strategy
        self.scaler = strategy.scaler  # fp16: the schedule's backward runs on the scaled loss

        self.cfg, self.dims, self.groups, self.device = cfg, dims, groups, device
        self.document_eod = document_eod
        self.model = model
        self.chunks = model.chunks
        self.n_micro = n_microbatches
        self.pp_group = groups.pp_group
        self.pp_ranks = groups.pp_ranks
        self.placement: list[int] = model.pp_placement
        S = len(self.placement)
        spec = SCHEDULES[cfg.parallel.pp_schedule]
        if cfg.parallel.stage_placement == "v" and dims.replicas > 1 and _needs_shared_embed(cfg):
            # Two DDP/FSDP wrappers would each reduce the shared embedding's gradient.
            raise UserError(
                "parallel.pp_schedule=zbv with dp > 1 and a tied embedding or MTP is not "
                "supported (use interleaved or zero_bubble)"
            )
        # DDP reduces when the last backward's hooks fire, but a zero-bubble schedule computes
        # the weight gradients in a later pass: run those stages unwrapped and average the
        # gradients over dp after the step instead (FSDP2 reduces in the schedule's final
        # REDUCE_GRAD action, after every weight pass).
        self._dp_average: list[nn.Parameter] = []
        if spec.split_backward and any(isinstance(p, DistributedDataParallel) for p in parts):
            parts = [p.module if isinstance(p, DistributedDataParallel) else p for p in parts]
            ignored = {id(p) for _, p in expert_parallel_params(model)}  # reduced over edp
            self._dp_average = [p for p in model.parameters() if id(p) not in ignored]
        # Static shapes: no metadata-inference forward (it would run the modules on dummy
        # data, which MoE statistics and the metrics would see).
        self.stages = [
            pipelining.PipelineStage(
                part, chunk.stage_index, S, device, *self._stage_io(chunk), group=self.pp_group
            )
            for part, chunk in zip(parts, self.chunks)
        ]
        cls = getattr(pipelining, spec.cls_name)
        stages = self.stages if spec.multi else self.stages[0]
        try:
            self.schedule = cls(stages, n_microbatches, loss_fn=self._loss, scale_grads=False)
        except ValueError as err:  # e.g. micro-batch counts a schedule cannot split
            raise UserError(
                f"parallel.pp_schedule={cfg.parallel.pp_schedule} with {n_microbatches} "
                f"micro-batches per step: {err}"
            ) from None
        self.has_last = any(c.is_last for c in self.chunks)
        m = cfg.model
        self.metric_names = ["ce_loss"]
        if m.mtp.depth > 0:
            self.metric_names.append("mtp_loss")
        if cfg.optim.z_loss > 0:
            self.metric_names.append("z_loss")
        n_total = m.n_layers + m.mtp.depth
        if m.moe.aux_loss_coef > 0 and any(layer_spec(m, i).mlp == "moe" for i in range(n_total)):
            self.metric_names.append("aux_loss")
        self._tied, self._tie_group, self.not_counted = self._tied_params()
        # The gradient norm sums the stages' squares; the last stage's tied copy is not counted.
        self.clip_scope = ClipScope(
            groups.tp_group, groups.ep_group, groups.pp_group, tuple(self.not_counted)
        )

    def _stage_io(self, chunk) -> tuple[torch.Tensor, torch.Tensor]:
        """Example (meta) input and output of a stage for one micro-batch: token ids [B, T] or
        the hidden state [B, T (/tp under SP), C] in, the hidden state or the scalar loss out."""
        cfg, t = self.cfg, self.cfg.train
        T = t.seq_len // (self.dims.tp if cfg.parallel.sequence_parallel else 1) // self.dims.cp
        # FSDP2's mixed-precision policy computes in the low precision from the embedding on;
        # autocast leaves the residual stream in fp32.
        low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        dtype = low if (low is not None and cfg.zero.backend == "fsdp2") else torch.float32
        # requires_grad marks what carries a gradient back (hidden states, the loss).
        hidden = torch.empty(t.micro_batch_size, T, cfg.model.d_model, dtype=dtype, device="meta")
        hidden.requires_grad_(True)
        ids = torch.empty(t.micro_batch_size, t.seq_len, dtype=torch.long, device="meta")
        loss = torch.empty((), device="meta", requires_grad=True)
        return (ids if chunk.is_first else hidden), (loss if chunk.is_last else hidden)

    # -- training ----------------------------------------------------------------------------

    def _loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # The last chunk already returns the micro-batch loss; the trainer divides it by m.
        loss = output / self.n_micro
        return loss if self.scaler is None else self.scaler.scale_loss(loss)

    def forward_backward(
        self, batches: list[torch.Tensor], memory: MemoryMeter | None = None
    ) -> dict[str, torch.Tensor]:
        """Forward and backward of this rank's micro-batches ([B, T+1] token windows, all ranks
        of the pipeline pass the same); returns the mean of each loss term over them, the
        same on every pp rank. The schedule's forwards are not measured (``memory``)."""
        with self.strategy.autocast():
            sums = self._run_schedule(batches)
        self.sync_tied_grads()  # after the data-parallel reduction, before clipping
        return sums

    def _run_schedule(self, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        if len(batches) != self.n_micro:
            raise ValueError(f"expected {self.n_micro} micro-batches, got {len(batches)}")
        scale = 1.0 if self.scaler is None else self.scaler.scale
        for chunk in self.chunks:
            chunk.metrics.clear()
            chunk.aux_grad_scale = scale / self.n_micro
        tokens = torch.cat(batches)
        losses: list[torch.Tensor] | None = [] if self.has_last else None
        docs = self.document_ids(tokens[:, :-1])  # every stage masks (and positions) by them
        self.schedule.step(
            tokens[:, :-1].contiguous(),
            tokens=tokens,
            **({} if docs is None else {"document_ids": docs}),
            target=tokens if self.has_last else None,
            losses=losses,
            return_outputs=False,
        )
        if self._dp_average:
            self._average_over_dp()
        return self._reduce_metrics()

    def _average_over_dp(self) -> None:
        """What DDP does for the other schedules: each gradient divided by dp, then summed
        over the data-parallel group (one flat buffer)."""
        grads = [p.grad for p in self._dp_average if p.grad is not None]
        flat = _flatten_dense_tensors(grads).div_(self.dims.replicas)  # dp x cp
        dist.all_reduce(flat, group=self.groups.dp_group)
        for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)

    def _reduce_metrics(self) -> dict[str, torch.Tensor]:
        sums = torch.zeros(len(self.metric_names), device=self.device)
        for chunk in self.chunks:
            for metrics in chunk.metrics:
                for name, value in metrics.items():
                    k = self.metric_names.index(name)
                    sums[k] = sums[k] + value.float() / self.n_micro
            chunk.metrics.clear()
        dist.all_reduce(sums, group=self.pp_group)  # each term lives on one stage (aux: several)
        return dict(zip(self.metric_names, sums.unbind()))

    def end_of_step(self) -> dict[str, float]:
        """Per-step statistics of every stage's modules (MoE loads by layer) on every rank."""
        values = super().end_of_step()
        gathered: list[dict | None] = [None] * len(self.pp_ranks)
        dist.all_gather_object(gathered, values, group=self.pp_group)
        merged: dict = {}
        for part in gathered:
            merged.update(part or {})
        return merged

    def num_params(self) -> int:
        """This stage's parameters (a weight two stages hold, the tied embedding, counts once),
        summed over the pp ranks (collective over pp)."""
        shared = {id(p) for p in self.not_counted}
        n = sum(global_numel(p) for p in self.model.parameters() if id(p) not in shared)
        t = torch.tensor([n], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, group=self.pp_group)
        return int(t.item())

    # -- tied weights and clipping ------------------------------------------------------------

    def _tied_params(self) -> tuple[list[nn.Parameter], dist.ProcessGroup | None, list]:
        """The embedding shared by the first and last stage (tied head, MTP) when those sit on
        different ranks: its gradients are summed over a group of the two ranks (one per
        dp x tp position) and the last stage's copy is left out of the gradient norm."""
        cfg = self.cfg
        first, last = self.placement[0], self.placement[-1]
        if first == last or not _needs_shared_embed(cfg):
            return [], None, []
        if self.pp_group is not None and len(self.pp_ranks) == 2:
            group = self.pp_group
        else:
            # Every rank creates every pair's group (new_group is collective), keeps its own.
            mesh = self.groups.mesh
            assert mesh is not None  # built with the groups whenever pp > 1
            grid = mesh.mesh.reshape(self.dims.pp, -1)
            group = None
            for j in range(grid.shape[1]):
                ranks = [int(grid[first, j]), int(grid[last, j])]
                g = cast(dist.ProcessGroup, dist.new_group(ranks))
                if self.dims.rank in ranks:
                    group = g
        if self.dims.pp_rank not in (first, last):
            return [], None, []
        embed = cast(nn.Parameter, self.model.embed.weight)
        return [embed], group, ([embed] if self.dims.pp_rank == last else [])

    def sync_tied_grads(self) -> None:
        """Sum the shared embedding's gradient over the first and last stage (after the
        data-parallel reduction, before clipping)."""
        if self._tie_group is None:
            return
        for p in self._tied:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(to_local(p.grad), group=self._tie_group)

    # -- evaluation ----------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate_loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss of one [B, T+1] batch, forward-only through the stages; every pp
        rank calls it and receives the loss."""
        with self.strategy.autocast():
            return self._evaluate_loss(batch)

    def _evaluate_loss(self, batch: torch.Tensor) -> torch.Tensor:
        S = len(self.placement)
        me = self.dims.pp_rank
        by_index = {c.stage_index: c for c in self.chunks}
        mb, T = batch.shape[0], batch.shape[1] - 1
        tp_split = self.dims.tp if (self.cfg.parallel.sequence_parallel and self.dims.tp > 1) else 1
        shape = (mb, T // tp_split // self.dims.cp, self.cfg.model.d_model)  # a cp rank's chunks
        x: torch.Tensor | None = None
        loss = torch.zeros((), device=self.device)
        was_training = [chunk.training for chunk in self.chunks]
        for chunk in self.chunks:  # chunks are not submodules of the model: own mode flag
            chunk.eval()
        for s in range(S):
            owner = self.placement[s]
            if owner != me:
                continue
            chunk = by_index[s]
            if s > 0 and self.placement[s - 1] != me:
                x = torch.empty(shape, device=self.device)
                dist.recv(x, self.pp_ranks[self.placement[s - 1]], group=self.pp_group)
            out: torch.Tensor = chunk(
                batch[:, :-1] if s == 0 else x,
                tokens=batch,
                document_ids=self.document_ids(batch[:, :-1]),
            )
            if s == S - 1:
                chunk.metrics.clear()
                loss = out.detach().float()
            else:
                x = out.float()
                if self.placement[s + 1] != me:
                    dist.send(
                        x.contiguous(), self.pp_ranks[self.placement[s + 1]], group=self.pp_group
                    )
        for chunk, mode in zip(self.chunks, was_training):
            chunk.train(mode)
        dist.broadcast(loss, self.pp_ranks[self.placement[-1]], group=self.pp_group)
        return loss
