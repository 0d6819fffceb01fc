"""Tensor-parallel layers with explicit groups: column/row-parallel linear, vocab-parallel
embedding and LM head.

Each layer takes the process group it talks to (``group``); ``group=None`` or a group of size 1
gives an ordinary ``nn.Linear`` / ``nn.Embedding`` with the same parameter names (``weight``,
``bias``), shapes and numerics. Under TP each rank holds a contiguous slice of the global weight:

=====================  ===================  ==========================  =======================
layer                  ``weight`` (local)   forward communication       backward communication
=====================  ===================  ==========================  =======================
ColumnParallelLinear   ``[out/tp, in]``     none (SP: all-gather T)     all-reduce dX (SP:
                                                                        reduce-scatter T)
RowParallelLinear      ``[out, in/tp]``     all-reduce Y (SP: reduce-   none (SP: all-gather T)
                                            scatter T)
VocabParallelEmbedding ``[V_pad/tp, C]``    all-reduce (SP: reduce-     none (SP: all-gather T)
                                            scatter T)
VocabParallelLMHead    ``[V_pad/tp, C]``    none (SP: all-gather T)     all-reduce dX (SP:
                                                                        reduce-scatter T)
=====================  ===================  ==========================  =======================

Sharding metadata: every layer gives each split parameter a ``ShardSpec`` (``parallel.sharding``:
the tensor dim it is split on and that dim's global unpadded length, e.g. ``Split(0, 4096)`` for
a column layer's weight; no spec = replicated), so checkpoint code can build DTensors or reshard.
The specs are kept across ``.to()`` / ``.to_empty()`` (which replace meta parameters).

Layout-independent init: draw the *global* tensor (``layer.full_shape(name)``) with the model's
per-name generator and call ``layer.shard_from_full_(weight=full)``; every layout then starts
from the same global weights. ``layer.gather_full(name)`` is the inverse (a collective).

Shapes: B batch, T sequence, C model dim, V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from evoformer.parallel.collectives import (
    _all_gather,
    all_reduce_,
    copy_to_parallel_region,
    gather_from_parallel_region,
    gather_from_sequence_parallel_region,
    group_rank,
    group_size,
    reduce_from_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_parallel_region,
)
from evoformer.parallel.sharding import (
    KeepShardSpecs,
    full_shape,
    has_partial_grad,
    mark_partial_grad,
    mark_sharded,
    shard_tensor,
    to_local,
    tp_split,
)


class TensorParallelModule(KeepShardSpecs):
    """Base of the parallel layers: the group, this rank's place in it; the parameters' shard
    specs survive ``.to_empty()`` from the meta device."""

    weight: nn.Parameter  # every parallel layer has one (this rank's shard)
    bias: nn.Parameter | None

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.group = group
        self.tp_size = group_size(group)
        self.tp_rank = group_rank(group)

    def full_shape(self, name: str) -> torch.Size:
        """Shape of parameter ``name`` on one device (global, without vocab padding)."""
        return full_shape(getattr(self, name))

    def shard_of(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the global tensor ``full`` for parameter ``name`` (padding rows
        are zeros)."""
        p = getattr(self, name)
        if tuple(full.shape) != tuple(self.full_shape(name)):
            raise ValueError(
                f"{type(self).__name__}.{name}: global tensor has shape {tuple(full.shape)}, "
                f"expected {tuple(self.full_shape(name))}"
            )
        split = tp_split(p)
        if split is None:
            return full
        return shard_tensor(full, split.dim, p.shape[split.dim], self.tp_rank)

    @torch.no_grad()
    def shard_from_full_(self, **full: torch.Tensor) -> TensorParallelModule:
        """Fill parameters from global (single-device) tensors, e.g.
        ``layer.shard_from_full_(weight=w, bias=b)``; each rank keeps its slice."""
        for name, tensor in full.items():
            getattr(self, name).copy_(self.shard_of(name, tensor))
        return self

    @torch.no_grad()
    def gather_full(self, name: str) -> torch.Tensor:
        """The global tensor of parameter ``name`` (padding stripped). A collective: every rank
        of the group must call it."""
        p = getattr(self, name)
        split, t = tp_split(p), p.detach()
        if split is None or self.tp_size == 1:
            return t.clone() if split is None else t.narrow(split.dim, 0, split.length).clone()
        return _all_gather(t, self.group, split.dim).narrow(split.dim, 0, split.length).clone()

    @torch.no_grad()
    def _default_init(self, fan_in: int) -> None:
        """nn.Linear's default scheme, drawn on the global tensors, then sharded: identical on
        every rank when the global RNG agrees. The model's per-name init replaces it."""
        if self.weight.is_meta:
            return
        w = torch.empty(self.full_shape("weight"), dtype=self.weight.dtype)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        full = {"weight": w}
        if getattr(self, "bias", None) is not None:
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            full["bias"] = torch.empty(self.full_shape("bias")).uniform_(-bound, bound)
        self.shard_from_full_(**{k: v.to(self.weight.device) for k, v in full.items()})


@torch.no_grad()
def gather_full_params(module: nn.Module, group: dist.ProcessGroup | None) -> dict:
    """``{name: global tensor}`` for every parameter: shards all-gathered over ``group`` and
    padding stripped, replicated parameters copied. A collective over the group."""
    out = {}
    for name, p in module.named_parameters():
        split, t = tp_split(p), p.detach()
        if split is not None and group_size(group) > 1:
            t = _all_gather(t, group, split.dim)
        out[name] = (t if split is None else t.narrow(split.dim, 0, split.length)).clone()
    return out


def _local(n: int, size: int, what: str) -> int:
    if n % size:
        raise ValueError(f"{what}={n} is not divisible by the tensor-parallel size {size}")
    return n // size


class ColumnParallelLinear(TensorParallelModule):
    """``Y = X W^T + b`` with ``W`` split along its output dim: ``weight [out/tp, in]``.

    Input replicated over ``group`` (sequence-parallel: sharded along T and all-gathered here);
    output sharded along the last dim, or all-gathered with ``gather_output=True``.
    Communicates: forward nothing (SP: all-gather of X along T); backward an all-reduce of dX
    (SP: reduce-scatter of dX along T); ``gather_output`` adds an all-gather of Y forward.

    ``explicit_comm=True``: the caller has already entered the TP region (``copy_to_parallel_
    region``, or the SP all-gather) once for several column layers reading the same input (q, k
    and v; gate and up), so their input gradients are reduced in one collective, not one each.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group: dist.ProcessGroup | None = None,
        gather_output: bool = False,
        sequence_parallel: bool = False,
        explicit_comm: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(group)
        self.in_features, self.out_features = in_features, out_features
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel and self.tp_size > 1
        self.explicit_comm = explicit_comm
        local = _local(out_features, self.tp_size, "out_features")
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(local, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(local, **kw)) if bias else None
        mark_sharded(self, "weight", 0, out_features)
        mark_sharded(self, "bias", 0, out_features)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._default_init(self.in_features)

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        if self.explicit_comm:
            pass  # the caller entered the TP region once for several layers
        elif self.sequence_parallel:
            x_BTC = gather_from_sequence_parallel_region(x_BTC, self.group)
        else:
            x_BTC = copy_to_parallel_region(x_BTC, self.group)
        y = F.linear(x_BTC, self.weight, self.bias)
        return gather_from_parallel_region(y, self.group) if self.gather_output else y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, tp={self.tp_size}, "
            f"gather_output={self.gather_output}, sequence_parallel={self.sequence_parallel}"
        )


class RowParallelLinear(TensorParallelModule):
    """``Y = X W^T + b`` with ``W`` split along its input dim: ``weight [out, in/tp]``; the
    bias is replicated and added once, after the reduction.

    Input sharded along the last dim (``input_is_parallel=True``, the output of a
    ColumnParallelLinear), or replicated and split here. Communicates: forward an all-reduce of
    Y (SP: reduce-scatter of Y along T, so the output is sequence-sharded); backward nothing
    (SP: all-gather of dY along T). Under SP the bias sees only this rank's tokens, so its
    gradient is partial: its spec says ``partial_grad`` and it needs
    ``sync_sequence_parallel_grads`` (an all-reduce over the group) before the optimizer step.

    ``explicit_comm=True`` (no bias): return this rank's partial sum unreduced, for a caller that
    sums several row layers' outputs first and reduces once (an MoE layer's experts).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group: dist.ProcessGroup | None = None,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
        explicit_comm: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(group)
        if sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear: sequence_parallel needs input_is_parallel=True")
        if explicit_comm and bias:
            raise ValueError("RowParallelLinear: explicit_comm returns partial sums; no bias")
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel and self.tp_size > 1
        self.explicit_comm = explicit_comm
        local = _local(in_features, self.tp_size, "in_features")
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, local, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        mark_sharded(self, "weight", 1, in_features)
        if self.sequence_parallel:
            mark_partial_grad(self, "bias")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._default_init(self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.linear(x, self.weight, self.bias)
        if not self.input_is_parallel:
            x = scatter_to_parallel_region(x, self.group)
        y = F.linear(x, self.weight)
        if self.explicit_comm:
            return y  # partial sum: the caller reduces it together with others
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(y, self.group)
        else:
            y = reduce_from_parallel_region(y, self.group)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, tp={self.tp_size}, "
            f"input_is_parallel={self.input_is_parallel}, "
            f"sequence_parallel={self.sequence_parallel}"
        )


class _VocabShardedModule(TensorParallelModule):
    """A ``[V, C]`` table split along the vocabulary, padded so it divides evenly.

    The padded vocabulary is ``V`` rounded up to a multiple of ``tp * pad_to_multiple_of``;
    rank r holds rows ``[shard_start, shard_end)`` of it, of which ``[vocab_start, vocab_end)``
    are real tokens (the last ranks may hold only padding). Padded rows are zero, never looked
    up, get zero gradient, and are excluded from the loss (``vocab_end``) and from gathered
    logits, so they never win.
    """

    def __init__(
        self, num_embeddings, embedding_dim, group, pad_to_multiple_of, device, dtype
    ) -> None:
        super().__init__(group)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        multiple = self.tp_size * pad_to_multiple_of
        self.padded_num_embeddings = -(-num_embeddings // multiple) * multiple
        per_rank = self.padded_num_embeddings // self.tp_size
        self.shard_start = self.tp_rank * per_rank
        self.shard_end = self.shard_start + per_rank
        self.vocab_start = min(self.shard_start, num_embeddings)
        self.vocab_end = min(self.shard_end, num_embeddings)
        self.weight = nn.Parameter(torch.empty(per_rank, embedding_dim, device=device, dtype=dtype))
        mark_sharded(self, "weight", 0, num_embeddings)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, padded={self.padded_num_embeddings}, "
            f"tp={self.tp_size}, rows=[{self.shard_start}, {self.shard_end})"
        )


class VocabParallelEmbedding(_VocabShardedModule):
    """Token embedding split along the vocabulary: ``weight [V_pad/tp, C]``.

    Each rank looks up the tokens it owns (zeros for the others); the partial results are
    summed with one all-reduce (SP: a reduce-scatter along T, leaving the output
    sequence-sharded). Backward communicates nothing (SP: all-gather of the gradient).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        group: dist.ProcessGroup | None = None,
        pad_to_multiple_of: int = 1,
        sequence_parallel: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, group, pad_to_multiple_of, device, dtype)
        self.sequence_parallel = sequence_parallel and self.tp_size > 1
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if not self.weight.is_meta:  # nn.Embedding's default, N(0, 1), on the global table
            self.shard_from_full_(weight=torch.randn(self.full_shape("weight")).to(self.weight))

    def forward(self, ids_BT: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(ids_BT, self.weight)
        outside_BT = (ids_BT < self.shard_start) | (ids_BT >= self.shard_end)
        local_BT = (ids_BT - self.shard_start).masked_fill(outside_BT, 0)
        x_BTC = F.embedding(local_BT, self.weight).masked_fill(outside_BT.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(x_BTC, self.group)
        return reduce_from_parallel_region(x_BTC, self.group)


class VocabParallelLMHead(_VocabShardedModule):
    """Untied LM head split along the vocabulary: ``weight [V_pad/tp, C]`` (no bias); returns
    this rank's logits ``[B, T, V_pad/tp]`` for ``vocab_parallel_cross_entropy(...,
    vocab_start=head.vocab_start, vocab_end=head.vocab_end)``. Communicates like a
    ColumnParallelLinear. A tied head calls ``vocab_parallel_logits`` with the embedding's
    weight instead."""

    def __init__(
        self,
        in_features: int,
        vocab_size: int,
        group: dist.ProcessGroup | None = None,
        pad_to_multiple_of: int = 1,
        sequence_parallel: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(vocab_size, in_features, group, pad_to_multiple_of, device, dtype)
        self.sequence_parallel = sequence_parallel and self.tp_size > 1
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._default_init(self.embedding_dim)

    def forward(self, hidden_BTC: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_logits(hidden_BTC, self.weight, self.group, self.sequence_parallel)


def vocab_parallel_logits(
    hidden_BTC: torch.Tensor,
    weight_VC: torch.Tensor,
    group: dist.ProcessGroup | None,
    sequence_parallel: bool = False,
) -> torch.Tensor:
    """This rank's logits against its vocabulary shard (a column-parallel matmul without
    gather): forward all-gathers T under SP; backward all-reduces (SP: reduce-scatters) dX."""
    if sequence_parallel:
        hidden_BTC = gather_from_sequence_parallel_region(hidden_BTC, group)
    else:
        hidden_BTC = copy_to_parallel_region(hidden_BTC, group)
    return F.linear(hidden_BTC, weight_VC)


@torch.no_grad()
def gather_vocab_logits(
    logits_local_BTV: torch.Tensor, group: dist.ProcessGroup | None, vocab_size: int
) -> torch.Tensor:
    """Full logits ``[B, T, V]`` from the vocab shards, padding stripped (for evaluation and
    generation; training uses ``vocab_parallel_cross_entropy`` and never builds them)."""
    if group_size(group) > 1:
        logits_local_BTV = _all_gather(logits_local_BTV.detach(), group, -1)
    return logits_local_BTV[..., :vocab_size]


def sequence_parallel_params(module: nn.Module) -> list[nn.Parameter]:
    """Parameters used on sequence shards whose gradients are therefore partial across the TP
    group (row-parallel biases under SP, and whatever the model marks with
    ``mark_partial_grad``, e.g. norm weights inside SP regions)."""
    return [p for p in module.parameters() if has_partial_grad(p)]


@torch.no_grad()
def sync_sequence_parallel_grads(
    params: list[nn.Parameter], group: dist.ProcessGroup | None
) -> None:
    """Sum the partial gradients of sequence-parallel parameters over the TP group, in one
    coalesced all-reduce (Megatron's ``allreduce_sequence_parallel_grads``).

    Under FSDP2 the gradients are DTensors holding this dp rank's shard, already reduced over
    dp: the ranks of a TP group hold the same shard of such a replicated parameter, so summing
    the local shards over TP is the same sum at 1/dp of the traffic."""
    grads = [to_local(p.grad) for p in params if p.grad is not None]
    if not grads or group_size(group) == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_(flat, group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
