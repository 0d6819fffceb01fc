"""Transformer Engine versions of the column/row-parallel linear layers (``model.backend: te``).

``ParallelContext.column`` / ``.row`` return these instead of ``nn.Linear`` /
``ColumnParallelLinear`` / ``RowParallelLinear`` when the backend is ``te``. Each is a subclass
of ``transformer_engine.pytorch.Linear`` (so its GEMM, FP8 and autocast handling are TE's) and of
``TensorParallelModule`` (so it carries the same sharding metadata and helpers: each
parameter's ``ShardSpec``, ``full_shape``, ``shard_from_full_``, ``gather_full``, specs kept
across ``.to_empty()``).
Its parameters are TE's own ``weight`` / ``bias``, with the local shapes of our layers
(column ``[out/tp, in]``, row ``[out, in/tp]``), so both backends have identical state dicts and
parameter names (the per-name init, checkpoints and grad clipping see no difference). TE's
``_extra_state`` (FP8 scaling metadata) is left out of the state dict to keep it so.

Communication: TE does it where its scheme equals ours -- a column layer that enters the TP
region itself (no ``explicit_comm``: identity forward, all-reduce of dX backward) and a row layer
that reduces its output (all-reduce forward, bias added after it). Everywhere else the TE module
is a local GEMM (``parallel_mode=None``) and our collectives communicate, as in the torch
backend: ``explicit_comm`` layers (the caller enters/leaves the region once for several layers)
and sequence parallelism (TE gathers / reduce-scatters along dim 0, i.e. sequence-first
``[T, B, C]`` activations; ours are batch-first ``[B, T, C]`` and are split along dim 1).

Transformer Engine is imported lazily (``import_te``); it needs CUDA.
"""

from __future__ import annotations

import functools
import importlib

import torch
import torch.distributed as dist
from torch import nn

from evoformer.errors import UserError
from evoformer.parallel.collectives import (
    gather_from_parallel_region,
    gather_from_sequence_parallel_region,
    group_rank,
    group_size,
    reduce_scatter_to_sequence_parallel_region,
)
from evoformer.parallel.layers import TensorParallelModule, _local
from evoformer.parallel.sharding import mark_partial_grad, mark_sharded

MISSING = (
    "model.backend=te needs Transformer Engine (CUDA): pip install -e '.[gpu]' on a GPU machine"
)


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def import_te():
    """``transformer_engine.pytorch``, or a one-line UserError when it (or CUDA) is missing."""
    try:
        te = importlib.import_module("transformer_engine.pytorch")
    except ImportError:
        te = None
    if te is None or not _cuda_available():
        raise UserError(MISSING)
    return te


def _te_device() -> str:
    """TE allocates on CUDA unless told ``"meta"`` (deferred init, as ``build_model`` does)."""
    return "meta" if torch.empty(0).device.type == "meta" else "cuda"


@functools.cache
def _linear_class(te) -> type:
    """The adapter class for this ``transformer_engine.pytorch`` module (built lazily, since the
    base class only exists once TE is imported)."""

    class TEParallelLinear(TensorParallelModule, te.Linear):
        # TensorParallelModule.__init__ would call te.Linear.__init__ without arguments: its
        # state is set by hand below.
        def __init__(
            self,
            in_features: int,
            out_features: int,
            bias: bool,
            group: dist.ProcessGroup | None,
            mode: str,
            sequence_parallel: bool = False,
            explicit_comm: bool = False,
            gather_output: bool = False,
        ) -> None:
            tp = group_size(group)
            sp = sequence_parallel and tp > 1
            if mode == "row" and explicit_comm and bias:
                raise ValueError("TERowParallelLinear: explicit_comm returns partial sums; no bias")
            # TE communicates only where its scheme is ours (see the module docstring).
            self.te_comm = tp > 1 and not sp and not explicit_comm
            te_in, te_out = in_features, out_features
            if not self.te_comm and mode == "column":
                te_out = _local(out_features, tp, "out_features")
            elif not self.te_comm:
                te_in = _local(in_features, tp, "in_features")
            # A row layer under our collectives adds its bias after the reduction.
            self.bias_after = mode == "row" and bias and tp > 1 and not self.te_comm
            te.Linear.__init__(
                self,
                te_in,
                te_out,
                bias=bias,
                tp_group=group if tp > 1 else None,
                tp_size=tp,
                parallel_mode=mode if self.te_comm else None,
                sequence_parallel=False,
                return_bias=self.bias_after,
                device=_te_device(),
            )
            self.group, self.tp_size, self.tp_rank = group, tp, group_rank(group)
            self.mode, self.sp, self.explicit_comm = mode, sp, explicit_comm
            self.gather_output = gather_output
            self.full_in_features, self.full_out_features = in_features, out_features
            if mode == "column":
                mark_sharded(self, "weight", 0, out_features)
                mark_sharded(self, "bias", 0, out_features)
            else:
                mark_sharded(self, "weight", 1, in_features)
                if sp:
                    mark_partial_grad(self, "bias")

        # Same state-dict keys as the torch layers: no TE "_extra_state" (FP8 scaling history,
        # which TE rebuilds after a restart).
        get_extra_state = nn.Module.get_extra_state
        set_extra_state = nn.Module.set_extra_state

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tp_comm = self.tp_size > 1 and not self.te_comm
            if self.mode == "column":
                if tp_comm and not self.explicit_comm:  # (explicit: the caller entered)
                    x = gather_from_sequence_parallel_region(x, self.group)  # SP
                y = te.Linear.forward(self, x)
                return gather_from_parallel_region(y, self.group) if self.gather_output else y
            out = te.Linear.forward(self, x)
            y, bias = out if self.bias_after else (out, None)
            if not tp_comm or self.explicit_comm:
                return y  # reduced by TE, tp = 1, or a partial sum the caller reduces
            y = reduce_scatter_to_sequence_parallel_region(y, self.group)  # SP
            return y if bias is None else y + bias

        def extra_repr(self) -> str:
            return (
                f"mode={self.mode}, in_features={self.full_in_features}, "
                f"out_features={self.full_out_features}, bias={self.bias is not None}, "
                f"tp={self.tp_size}, sequence_parallel={self.sp}, te_comm={self.te_comm}"
            )

    return TEParallelLinear


def TEColumnParallelLinear(
    in_features: int,
    out_features: int,
    bias: bool = True,
    group: dist.ProcessGroup | None = None,
    gather_output: bool = False,
    sequence_parallel: bool = False,
    explicit_comm: bool = False,
) -> nn.Module:
    """``te.Linear`` as a ColumnParallelLinear: ``weight [out/tp, in]``, same arguments."""
    cls = _linear_class(import_te())
    return cls(
        in_features,
        out_features,
        bias,
        group,
        "column",
        sequence_parallel=sequence_parallel,
        explicit_comm=explicit_comm,
        gather_output=gather_output,
    )


def TERowParallelLinear(
    in_features: int,
    out_features: int,
    bias: bool = True,
    group: dist.ProcessGroup | None = None,
    sequence_parallel: bool = False,
    explicit_comm: bool = False,
) -> nn.Module:
    """``te.Linear`` as a RowParallelLinear (input already split): ``weight [out, in/tp]``,
    replicated bias added after the reduction."""
    cls = _linear_class(import_te())
    return cls(
        in_features,
        out_features,
        bias,
        group,
        "row",
        sequence_parallel=sequence_parallel,
        explicit_comm=explicit_comm,
    )


__all__ = ["MISSING", "TEColumnParallelLinear", "TERowParallelLinear", "import_te"]
