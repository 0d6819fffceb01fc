"""Measured memory per rank: parameters, gradients, optimizer state and activations of a step.

What is counted (bytes this rank holds, whatever the strategy):

- ``params``, ``optim``: the local tensors ``Strategy.local_tensors()`` yields (DTensor shards
  counted as their local shard; tensors sharing storage counted once), measured after the first
  optimizer step, when AdamW's moments exist. ``optim`` includes a separate fp32 master copy of
  the weights where a strategy keeps one (kind ``master``, e.g. DeepSpeed), as ZeRO counts it.
- ``grads``: the local gradients at their peak, i.e. after the last micro-batch's backward and
  right before the optimizer step (``local_tensors`` kind ``grad``). Buffers a data-parallel
  engine keeps besides ``.grad`` (DDP's gradient buckets: one more gradient-sized copy unless
  ``gradient_as_bucket_view``) are not parameters' gradients and are not included.
- ``activations``: what one micro-batch's forward leaves for its backward, measured on the first
  micro-batch of the first step. On CPU: the bytes of every new tensor storage created during
  the forward (seen through a ``TorchDispatchMode``; views, in-place and out= results are not
  new) that is still alive when the forward returns, parameters' and buffers' storages left out.
  This is exactly what autograd keeps (saved tensors, checkpointed blocks' inputs, the outputs a
  selective-checkpoint policy saves), and it excludes temporaries freed within the forward. On
  CUDA: ``max_memory_allocated`` during the forward minus the memory allocated before it, i.e.
  the forward's peak including its transient temporaries.
- ``gathered_params``: when that forward returns, the bytes of the unsharded parameters FSDP2
  keeps gathered for backward (every unit at stages 1/2, the last block at stage 3; 0 without
  FSDP2). Transient memory that sharding at rest does not show.

Under pipeline parallelism the schedule runs the micro-batches (no single forward to measure):
``mem_activations_bytes`` is left out there; ``evoformer plan`` estimates it.

The numbers go to ``metrics.jsonl`` as ``mem_params_bytes``, ``mem_grads_bytes``,
``mem_optim_bytes``, ``mem_activations_bytes``, ``mem_gathered_params_bytes`` and
``mem_total_bytes`` (their sum).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from evoformer.parallel.sharding import to_local

KINDS = ("param", "grad", "optim")


@dataclasses.dataclass
class MemoryStats:
    """Bytes one rank holds; see the module docstring for what each field counts."""

    params: int = 0
    grads: int = 0
    optim: int = 0
    activations: int | None = 0  # None: no forward was measured (e.g. a pipeline schedule)
    gathered_params: int = 0

    @property
    def model_state(self) -> int:
        """Parameters + gradients + optimizer state (ZeRO's "model states")."""
        return self.params + self.grads + self.optim

    @property
    def total(self) -> int:
        return self.model_state + (self.activations or 0) + self.gathered_params

    def metrics(self) -> dict[str, int]:
        """The ``mem_*_bytes`` fields of a metrics line (activations only when measured)."""
        out = {
            "mem_params_bytes": self.params,
            "mem_grads_bytes": self.grads,
            "mem_optim_bytes": self.optim,
            "mem_activations_bytes": self.activations,
            "mem_gathered_params_bytes": self.gathered_params,
            "mem_total_bytes": self.total,
        }
        return {k: v for k, v in out.items() if v is not None}


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of ``tensors``, each distinct (data pointer, size) counted once (tied weights)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in tensors:
        t = to_local(t)
        n = t.numel() * t.element_size()
        key = (t.data_ptr(), n)
        if n and key not in seen:
            seen.add(key)
            total += n
    return total


def local_bytes(pairs: Iterable[tuple[str, torch.Tensor]]) -> dict[str, int]:
    """Sum ``(kind, tensor)`` pairs (``Strategy.local_tensors()``) into bytes per kind."""
    by_kind: dict[str, list[torch.Tensor]] = {k: [] for k in KINDS}
    for kind, t in pairs:
        by_kind.setdefault(kind, []).append(t)
    return {kind: tensor_bytes(ts) for kind, ts in by_kind.items()}


def _returns_alias(func) -> bool:
    """Views, in-place and out= ops return (parts of) tensors that already exist."""
    return any(r.alias_info is not None for r in func._schema.returns)


class _LiveStorages(TorchDispatchMode):
    """Remembers (weakly) the storage of every new tensor an op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, StorageWeakRef] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if _returns_alias(func):
            return out
        for t in tree_flatten(out)[0]:
            if type(t) is torch.Tensor or type(t) is torch.nn.Parameter:
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                old = self.refs.get(ref.cdata)
                if old is None or old.expired():  # a freed storage's address may be reused
                    self.refs[ref.cdata] = ref
        return out

    def live_bytes(self, exclude: set[int]) -> int:
        """Bytes of the storages still alive, those in ``exclude`` left out."""
        total = 0
        for cdata, ref in self.refs.items():
            if cdata not in exclude and not ref.expired():
                total += torch.UntypedStorage._new_with_weak_ptr(cdata).nbytes()
        return total


def gathered_param_bytes(module: torch.nn.Module) -> int:
    """Bytes of the unsharded parameters an FSDP2 model has registered right now (FSDP2 swaps
    a unit's DTensor shards for full tensors while it keeps the unit gathered); 0 otherwise."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    if not isinstance(module, FSDPModule):
        return 0
    gathered = [p for p in module.parameters() if not isinstance(p, DTensor)]
    keys = {
        StorageWeakRef(p.untyped_storage()).cdata: p.untyped_storage().nbytes() for p in gathered
    }
    return sum(keys.values())


def _storage_keys(module: torch.nn.Module) -> set[int]:
    keys = set()
    for t in [*module.parameters(), *module.buffers()]:
        t = to_local(t)
        keys.add(StorageWeakRef(t.untyped_storage()).cdata)
    return keys


@contextlib.contextmanager
def measure_forward(module: torch.nn.Module, device: torch.device) -> Iterator[list[int]]:
    """Measure the activation bytes of the forward run inside; on exit they are appended to the
    yielded list, then the gathered-parameter bytes (see the module docstring)."""
    out: list[int] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        torch.cuda.synchronize(device)
        out += [max(torch.cuda.max_memory_allocated(device) - before, 0)]
        out.append(gathered_param_bytes(module))
        return
    tracker = _LiveStorages()
    with tracker:
        yield out
    out += [tracker.live_bytes(_storage_keys(module)), gathered_param_bytes(module)]


class MemoryMeter:
    """Measures one step (the first) for the trainer, then keeps reporting the same numbers.

    Call order inside a step: ``forward(model, first_micro_batch)`` around each forward,
    ``after_backward(strategy)`` once all micro-batches are done, ``after_step(strategy)`` after
    the optimizer step (returns the metrics to log)."""

    def __init__(self, device: torch.device, enabled: bool = True, compiled: bool = False) -> None:
        self.device = device
        self.enabled = enabled
        # The CPU tracker is a TorchDispatchMode, under which dynamo declines to trace a frame
        # and then never compiles it: compiled runs on CPU report no activation bytes.
        self.trace_activations = not (compiled and device.type == "cpu")
        self.stats: MemoryStats | None = None
        self._grads = 0
        self._activations: list[int] = []

    @property
    def measuring(self) -> bool:
        return self.enabled and self.stats is None

    def forward(self, model: torch.nn.Module, first: bool) -> contextlib.AbstractContextManager:
        if not (self.measuring and first and self.trace_activations):
            return contextlib.nullcontext()
        cm = measure_forward(model, self.device)

        @contextlib.contextmanager
        def run():
            with cm as out:
                yield
            self._activations = out

        return run()

    def after_backward(self, strategy) -> None:
        if self.measuring:
            self._grads = local_bytes(strategy.local_tensors()).get("grad", 0)

    def after_step(self, strategy) -> dict[str, int]:
        if self.measuring:
            held = local_bytes(strategy.local_tensors())
            self.stats = MemoryStats(
                params=held.get("param", 0),
                grads=self._grads,
                optim=held.get("optim", 0) + held.get("master", 0),
                activations=self._activations[0] if self._activations else None,
                gathered_params=self._activations[1] if self._activations else 0,
            )
        return self.stats.metrics() if self.stats is not None else {}
