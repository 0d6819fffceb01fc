"""What a model's layers need to know about the parallel layout, in one small object.

``ParallelContext`` carries the tensor-parallel group, whether sequence parallelism is on, and
the data-parallel group (for statistics summed over the global batch, e.g. MoE expert loads), and
the expert-parallel group (MoE experts split over it, ``parallel/expert.py``) and the
context-parallel group (each sequence split over it, ``parallel/context_parallel.py``).
The Transformer receives it once and hands it to each block; a block reads ``ctx.tp`` to choose
its layers (``tp == 1``: the plain ``nn.Linear`` / ``nn.Embedding`` model, unchanged) and calls
``ctx.enter`` / ``ctx.exit`` around a tensor-parallel region.
"""

from __future__ import annotations

import dataclasses
from functools import cached_property

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from evoformer.parallel.collectives import (
    SEQ_DIM,
    copy_to_parallel_region,
    gather_from_sequence_parallel_region,
    group_rank,
    group_size,
    reduce_from_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from evoformer.parallel.layers import ColumnParallelLinear, RowParallelLinear


@dataclasses.dataclass(frozen=True)
class ParallelContext:
    """The layout as the model sees it. ``ParallelContext()`` is one process."""

    tp_group: dist.ProcessGroup | None = None
    sequence_parallel: bool = False
    dp_group: dist.ProcessGroup | None = None
    backend: str = "torch"  # linear layers: torch | te (Transformer Engine, te_backend.py)
    # Expert parallelism (parallel/expert.py): MoE experts split over this group, tokens
    # dispatched to them by all-to-all. None: every rank holds all experts.
    ep_group: dist.ProcessGroup | None = None
    # Context parallelism: this rank holds 2 of the 2 * cp chunks of every sequence; attention
    # runs over the group as ``cp_kind`` (ring | alltoall). None: the whole sequence is here.
    cp_group: dist.ProcessGroup | None = None
    cp_kind: str = "ring"

    @classmethod
    def from_groups(
        cls, groups, sequence_parallel: bool = False, backend: str = "torch"
    ) -> ParallelContext:
        """From ``ParallelDims.build()``'s ``ParallelGroups`` (``None``: one process).
        ``sequence_parallel`` with tp = 1 is a no-op."""
        if groups is None:
            return cls(backend=backend)
        return cls(
            groups.tp_group,
            sequence_parallel,
            groups.dp_group,
            backend,
            ep_group=getattr(groups, "ep_group", None),
            cp_group=getattr(groups, "cp_group", None),
            cp_kind=groups.dims.cp_kind,
        )

    @cached_property
    def tp(self) -> int:
        """Tensor-parallel size."""
        return group_size(self.tp_group)

    @cached_property
    def tp_rank(self) -> int:
        return group_rank(self.tp_group)

    @cached_property
    def ep(self) -> int:
        """Expert-parallel size."""
        return group_size(self.ep_group)

    @cached_property
    def ep_rank(self) -> int:
        return group_rank(self.ep_group)

    @cached_property
    def cp(self) -> int:
        """Context-parallel size."""
        return group_size(self.cp_group)

    @cached_property
    def cp_rank(self) -> int:
        return group_rank(self.cp_group)

    def cp_shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's two load-balanced chunks of a full-sequence ``x`` along ``dim``
        (``x`` itself when cp = 1)."""
        if self.cp == 1:
            return x
        from evoformer.parallel.context_parallel import shard_sequence

        return shard_sequence(x, dim, self.cp, self.cp_rank)

    @property
    def sp(self) -> bool:
        """Sequence parallelism is active (asked for, and tp > 1)."""
        return self.sequence_parallel and self.tp > 1

    def without_sp(self) -> ParallelContext:
        """The same groups with sequence parallelism off (MTP modules run on full sequences)."""
        return dataclasses.replace(self, sequence_parallel=False)

    def enter(self, x_BTC: torch.Tensor) -> torch.Tensor:
        """Enter a TP region once for every column layer reading ``x``: identity forward and
        all-reduce of the gradient backward (Megatron's f); under SP an all-gather along T
        forward and a reduce-scatter backward."""
        if self.sp:
            return gather_from_sequence_parallel_region(x_BTC, self.tp_group)
        return copy_to_parallel_region(x_BTC, self.tp_group)

    def exit(self, partial_BTC: torch.Tensor) -> torch.Tensor:
        """Leave a TP region: sum the ranks' partial outputs (Megatron's g: all-reduce; under
        SP a reduce-scatter along T)."""
        if self.sp:
            return reduce_scatter_to_sequence_parallel_region(partial_BTC, self.tp_group)
        return reduce_from_parallel_region(partial_BTC, self.tp_group)

    def seq_shard(self, T: int) -> tuple[int, int]:
        """``(start, length)`` of this rank's sequence shard under SP (all of it otherwise)."""
        if not self.sp:
            return 0, T
        if T % self.tp:
            raise ValueError(
                f"sequence parallelism: sequence length {T} is not divisible by tp={self.tp}"
            )
        n = T // self.tp
        return self.tp_rank * n, n

    # -- the linear layers a block uses ------------------------------------------------------

    def column(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        explicit_comm: bool = False,
        **kw,
    ) -> nn.Module:
        """``nn.Linear`` at tp = 1, else a ColumnParallelLinear (output dim split) on this
        context's group; ``explicit_comm``: the caller enters the region (``enter``). Backend
        ``te``: a ``te.Linear`` with the same parameters and communication, at any tp."""
        if self.backend == "te":
            from evoformer.parallel.te_backend import TEColumnParallelLinear

            return TEColumnParallelLinear(
                in_features,
                out_features,
                bias,
                self.tp_group,
                sequence_parallel=self.sp,
                explicit_comm=explicit_comm,
                **kw,
            )
        if self.tp == 1:
            return nn.Linear(in_features, out_features, bias=bias)
        return ColumnParallelLinear(
            in_features,
            out_features,
            bias,
            self.tp_group,
            sequence_parallel=self.sp,
            explicit_comm=explicit_comm,
            **kw,
        )

    def row(
        self, in_features: int, out_features: int, bias: bool, explicit_comm: bool = False
    ) -> nn.Module:
        """``nn.Linear`` at tp = 1, else a RowParallelLinear (input dim split) that reduces its
        output (SP: reduce-scatters it); ``explicit_comm``: the caller reduces (``exit``).
        Backend ``te``: a ``te.Linear`` with the same parameters and communication."""
        if self.backend == "te":
            from evoformer.parallel.te_backend import TERowParallelLinear

            return TERowParallelLinear(
                in_features,
                out_features,
                bias,
                self.tp_group,
                sequence_parallel=self.sp,
                explicit_comm=explicit_comm,
            )
        if self.tp == 1:
            return nn.Linear(in_features, out_features, bias=bias)
        return RowParallelLinear(
            in_features,
            out_features,
            bias,
            self.tp_group,
            sequence_parallel=self.sp,
            explicit_comm=explicit_comm,
        )

    def dropout(self, x_BTC: torch.Tensor, p: float, training: bool) -> torch.Tensor:
        """Dropout of an activation outside the TP regions. Replicated (no SP): every TP rank
        holds the same RNG state (the trainer seeds per data-parallel rank), so all draw the
        same mask, as one process would. Under SP the mask of the *global* [B, T, C] tensor is
        drawn and this rank's sequence slice kept, so SP on and off drop the same units."""
        if not (p and training):
            return x_BTC
        if not self.sp:
            return F.dropout(x_BTC, p, training)
        shape = list(x_BTC.shape)
        n = shape[SEQ_DIM]
        shape[SEQ_DIM] = n * self.tp
        keep = torch.empty(shape, dtype=x_BTC.dtype, device=x_BTC.device).bernoulli_(1 - p)
        if p < 1:
            keep.div_(1 - p)
        return x_BTC * keep.narrow(SEQ_DIM, self.tp_rank * n, n)
