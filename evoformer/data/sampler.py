"""Deterministic, resumable, data-parallel-invariant sample order.

The order is a pure function: the global batch of optimizer step ``s`` is computed from
``(seed, s, num_samples, global_batch_size)`` alone. There is no iterator state to save, so
resuming at step ``s`` reproduces exactly the batches an uninterrupted run would have seen, and a
run restarted with a different data-parallel size trains on the same samples per step (each rank
just takes a different slice).
"""

from __future__ import annotations

import bisect
import math
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from evoformer.data.dataset import WindowDataset, get_batch
from evoformer.errors import UserError

# Epochs up to this many samples are materialised as a numpy permutation (4 bytes per sample);
# beyond it a keyed Feistel bijection computes the permutation on the fly in O(1) memory, so a
# huge synthetic dataset or a multi-billion-token corpus costs nothing up front.
_MATERIALISE_MAX = 1 << 24
_FEISTEL_ROUNDS = 6
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix64(z: np.ndarray) -> np.ndarray:
    # splitmix64 finaliser: a cheap, well-mixing round function (uint64 arithmetic wraps)
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


class _FeistelPermutation:
    """A pseudo-random bijection of range(n): a balanced Feistel network on the smallest
    even-bit domain covering n, with cycle walking to stay inside range(n)."""

    def __init__(self, n: int, keys: np.ndarray) -> None:
        self.n = n
        self.half = max(1, ((n - 1).bit_length() + 1) // 2)
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = keys.astype(np.uint64)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x >> h, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix64(right ^ k) & self.mask)
        return (left << h) | right

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        y = self._encrypt(np.asarray(idx, dtype=np.uint64))
        out_of_range = y >= np.uint64(self.n)
        while out_of_range.any():  # the domain is < 4n, so this ends in a few rounds
            y[out_of_range] = self._encrypt(y[out_of_range])
            out_of_range = y >= np.uint64(self.n)
        return y.astype(np.int64)


class BatchSchedule:
    """The global batch of each step, constant or ramped up (``train.batch_ramp``).

    A ramp ``(start, increment, ramp_samples)`` (Megatron's ``--rampup-batch-size``) begins at
    ``start`` sequences and grows by ``increment`` each time another ``ramp_samples / n``
    samples have been consumed (n = the number of increments to ``full``), then stays at
    ``full``. ``size(step)`` and ``start(step)`` (samples consumed before ``step``) are pure
    functions of the step, computed stage by stage.
    """

    def __init__(self, full: int, ramp: tuple[int, int, int] | None = None) -> None:
        self.full = int(full)
        self.ramp = ramp
        # (first step, first sample, size) of each stage, the last one open-ended
        self.stages: list[tuple[int, int, int]] = [(0, 0, self.full)]
        if ramp is not None:
            start, inc, samples = (int(x) for x in ramp)
            n = (self.full - start) // inc
            per_stage = samples / n
            stages, step, consumed, size = [], 0, 0, start
            for k in range(n):
                stages.append((step, consumed, size))
                end = math.ceil((k + 1) * per_stage)  # the next size starts once this is reached
                steps = max(1, -(-(end - consumed) // size))
                step, consumed, size = step + steps, consumed + steps * size, size + inc
            stages.append((step, consumed, self.full))
            self.stages = stages

    def _stage(self, step: int) -> tuple[int, int, int]:
        k = bisect.bisect_right([s[0] for s in self.stages], step) - 1
        return self.stages[k]

    def size(self, step: int) -> int:
        """Sequences in the global batch of ``step``."""
        return self._stage(step)[2]

    def start(self, step: int) -> int:
        """Samples consumed by the steps before ``step``."""
        first, consumed, size = self._stage(step)
        return consumed + (step - first) * size

    def sizes(self) -> list[int]:
        return sorted({s[2] for s in self.stages})


class GlobalBatchSampler:
    """Which samples make up the global batch of each optimizer step.

    Epoch ``e`` is a permutation of ``range(num_samples)`` drawn from
    ``np.random.default_rng([seed, e])``; the epochs are laid end to end and cut into
    consecutive global batches (a batch may span an epoch boundary). The position in the data
    IS the step: resuming needs nothing but the step number, and :meth:`state_dict` only records
    what the order was built from, so a mismatched resume is caught.
    """

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        seed: int,
        schedule: BatchSchedule | None = None,
    ) -> None:
        if num_samples <= 0:
            raise UserError(f"the dataset has no samples to draw batches from ({num_samples})")
        if global_batch_size <= 0:
            raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
        self.num_samples = int(num_samples)
        self.global_batch_size = int(global_batch_size)
        self.schedule = schedule or BatchSchedule(global_batch_size)
        self.seed = int(seed)
        self._perms: OrderedDict[int, Any] = OrderedDict()
        # The prefetch thread reads batches while the loop logs from the caches.
        self._lock = threading.RLock()

    def _permutation(self, epoch: int) -> Any:
        """The epoch's permutation: an array, or an on-the-fly bijection for huge datasets."""
        perm = self._perms.get(epoch)
        if perm is None:
            rng = np.random.default_rng([self.seed % (1 << 64), epoch])
            n = self.num_samples
            if n <= _MATERIALISE_MAX:
                perm = rng.permutation(n).astype(np.int32)
            else:
                keys = rng.integers(0, np.iinfo(np.int64).max, size=_FEISTEL_ROUNDS)
                perm = _FeistelPermutation(n, keys)
            self._perms[epoch] = perm
            while len(self._perms) > 2:  # current epoch and the one a batch may spill into
                self._perms.popitem(last=False)
        return perm

    def global_batch(self, step: int) -> np.ndarray:
        """Sample indices (int64, length global_batch_size) of the global batch at ``step``."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        start, g = self.schedule.start(step), self.schedule.size(step)
        with self._lock:
            return self.order(np.arange(start, start + g, dtype=np.int64))

    def order(self, pos: np.ndarray) -> np.ndarray:
        """The sample at each position ``pos`` (int64, ascending) of the epochs laid end to end."""
        if not pos.size:
            return np.empty(0, dtype=np.int64)
        epochs, within = np.divmod(pos, self.num_samples)
        out = np.empty(pos.size, dtype=np.int64)
        for e in range(int(epochs[0]), int(epochs[-1]) + 1):
            sel = epochs == e
            out[sel] = self._permutation(e)[within[sel]]
        return out

    def micro_batches(
        self, step: int, dp_rank: int, dp_size: int, micro_batch_size: int
    ) -> list[np.ndarray]:
        """The micro-batches of data-parallel rank ``dp_rank`` at ``step``.

        Rank r takes the contiguous slice [r*G/dp, (r+1)*G/dp) of the global batch and splits it
        into micro-batches of ``micro_batch_size``; together the ranks cover the global batch
        exactly once, whatever ``dp_size`` is.
        """
        g = self.schedule.size(step)
        if dp_size <= 0 or g % dp_size:
            raise ValueError(f"global batch {g} is not divisible by data-parallel size {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        per_rank = g // dp_size
        if micro_batch_size <= 0 or per_rank % micro_batch_size:
            raise ValueError(
                f"per-rank batch {per_rank} (= {g} / dp {dp_size}) is not divisible by "
                f"micro_batch_size {micro_batch_size}"
            )
        mine = self.global_batch(step)[dp_rank * per_rank : (dp_rank + 1) * per_rank]
        return [mine[i : i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)]

    def epoch(self, step: int) -> float:
        """Epochs completed before ``step`` (fractional; for logging)."""
        return self.schedule.start(step) / self.num_samples

    def state_dict(self) -> dict[str, Any]:
        """What the order was built from (the position is the step, saved by the trainer)."""
        state: dict[str, Any] = {
            "seed": self.seed,
            "num_samples": self.num_samples,
            "global_batch_size": self.global_batch_size,
        }
        if self.schedule.ramp is not None:
            state["batch_ramp"] = list(self.schedule.ramp)
        return state

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Adopt a checkpoint's order; refuses one built for other data or another batch size.

        The checkpoint's seed wins over this run's, so a resumed run continues the same order.
        """
        if int(state["num_samples"]) != self.num_samples:
            raise UserError(
                f"cannot resume the data order: the checkpoint was trained on "
                f"{state['num_samples']} samples, this run's dataset has {self.num_samples} "
                "(did the data or train.seq_len change?)"
            )
        if int(state["global_batch_size"]) != self.global_batch_size:
            raise UserError(
                f"cannot resume the data order: the checkpoint used train.global_batch_size="
                f"{state['global_batch_size']}, this run has {self.global_batch_size}"
            )
        ramp = list(self.schedule.ramp) if self.schedule.ramp is not None else None
        if state.get("batch_ramp") != ramp:
            raise UserError(
                f"cannot resume the data order: the checkpoint used train.batch_ramp="
                f"{state.get('batch_ramp')}, this run has {ramp}"
            )
        if int(state["seed"]) != self.seed:
            self.seed = int(state["seed"])
            self._perms.clear()


# Steps per block of the blend's per-step draws: the counts before a step are summed block by
# block (cached), so resuming at step s costs s / _BLEND_BLOCK vectorised blocks.
_BLEND_BLOCK = 4096


class BlendedSampler(GlobalBatchSampler):
    """Global batches drawn from several sources in given proportions (``data.weights``).

    The sources are datasets laid end to end (``ConcatDataset``; ``sizes`` their samples). Each
    step's global batch of ``g`` takes ``floor(g * w_k)`` samples from source k plus, for the
    ``g - sum(floor)`` remaining slots, one more from each source chosen by systematic sampling
    over the fractional parts: source k gets the extra sample with probability exactly
    ``g * w_k - floor(g * w_k)``. So every step holds within one sample of ``g * w_k`` of each
    source and the expectation is exact. Inside a source, samples follow that source's own
    epoch permutations (as ``GlobalBatchSampler``), from the position its earlier steps reached:
    a source that runs out wraps to a new epoch of itself. The batch is then shuffled, so each
    data-parallel rank sees the mix. Everything is a function of ``(seed, step)``: resuming, or
    another data-parallel size, gives the same batches.
    """

    def __init__(
        self, sizes: list[int], weights: list[float], global_batch_size: int, seed: int
    ) -> None:
        if len(sizes) != len(weights) or not sizes:
            raise ValueError(f"{len(sizes)} sources but {len(weights)} weights")
        if min(weights) < 0 or sum(weights) <= 0:
            raise UserError(f"data.weights must be >= 0 and not all 0, got {weights}")
        super().__init__(sum(sizes), global_batch_size, seed)
        self.sizes = [int(n) for n in sizes]
        total = float(sum(weights))
        self.weights = [w / total for w in weights]
        self.offsets = np.cumsum([0] + self.sizes[:-1]).astype(np.int64)
        self._orders = [
            GlobalBatchSampler(n, 1, seed * 1_000_003 + 7919 * (k + 1))
            for k, n in enumerate(self.sizes)
        ]
        ideal = np.asarray(self.weights) * self.global_batch_size
        self._floor = np.floor(ideal + 1e-9).astype(np.int64)
        self._frac = np.clip(ideal - self._floor, 0.0, None)
        self._before: dict[int, np.ndarray] = {0: np.zeros(len(sizes), dtype=np.int64)}

    def _block_counts(self, block: int) -> np.ndarray:
        """Samples per source [steps of the block, K] of the steps in block ``block``."""
        u = np.random.default_rng([self.seed % (1 << 64), 0xB1E4D, block]).random(_BLEND_BLOCK)
        extra = int(round(self._frac.sum()))
        edges = np.concatenate([[0.0], np.cumsum(self._frac)])
        counts = np.tile(self._floor, (_BLEND_BLOCK, 1))
        for j in range(extra):  # the points u + j fall into distinct sources' intervals
            k = np.searchsorted(edges, u + j, side="right") - 1
            np.add.at(counts, (np.arange(_BLEND_BLOCK), np.clip(k, 0, len(self.sizes) - 1)), 1)
        return counts

    def counts_before(self, step: int) -> np.ndarray:
        """Samples drawn from each source by the steps before ``step`` (int64 [K])."""
        block, within = divmod(step, _BLEND_BLOCK)
        with self._lock:
            start = max(b for b in self._before if b <= block)
            acc = self._before[start]
            for b in range(start, block):
                acc = acc + self._block_counts(b).sum(0)
                self._before[b + 1] = acc
        return acc + self._block_counts(block)[:within].sum(0)

    def step_counts(self, step: int) -> np.ndarray:
        """Samples from each source in the global batch of ``step`` (int64 [K], sum g)."""
        block, within = divmod(step, _BLEND_BLOCK)
        return self._block_counts(block)[within]

    def global_batch(self, step: int) -> np.ndarray:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        with self._lock:
            return self._blend(step)

    def _blend(self, step: int) -> np.ndarray:
        before, now = self.counts_before(step), self.step_counts(step)
        parts = [
            self.offsets[k] + self._orders[k].order(np.arange(before[k], before[k] + now[k]))
            for k in range(len(self.sizes))
        ]
        batch = np.concatenate(parts)
        rng = np.random.default_rng([self.seed % (1 << 64), 0x5F1E, step])
        return batch[rng.permutation(batch.size)]

    def epoch(self, step: int) -> float:
        """Epochs of the largest-share source completed before ``step`` (for logging)."""
        k = int(np.argmax(self.weights))
        return float(self.counts_before(step)[k]) / self.sizes[k]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "sizes": self.sizes, "weights": self.weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """As ``GlobalBatchSampler``, and refuses a checkpoint of other sources or weights."""
        if "sizes" not in state:
            raise UserError(
                "cannot resume the data order: the checkpoint was trained without data.weights"
            )
        if [int(n) for n in state["sizes"]] != self.sizes:
            raise UserError(
                f"cannot resume the data order: the checkpoint's sources have {state['sizes']} "
                f"samples, this run's {self.sizes} (did data.paths or train.seq_len change?)"
            )
        if not np.allclose(state["weights"], self.weights, rtol=0, atol=1e-12):
            raise UserError(
                f"cannot resume the data order: the checkpoint used data.weights "
                f"{state['weights']} (normalised), this run {self.weights}"
            )
        super().load_state_dict(state)
        self._orders = [
            GlobalBatchSampler(n, 1, self.seed * 1_000_003 + 7919 * (k + 1))
            for k, n in enumerate(self.sizes)
        ]
        self._before = {0: self._before[0]}


class EvalBatches:
    """Fixed validation micro-batches: the first ``n_batches * micro_batch_size`` windows of
    ``dataset`` in order (clipped to its length; the last batch may be short).

    Iterating yields LongTensors ``[b, seq_len + 1]`` and gives the same batches every time. With
    ``dp_size > 1`` rank ``dp_rank`` gets batches dp_rank, dp_rank + dp_size, ... so the ranks
    share the work; summing their losses and token counts gives the single-rank result.
    """

    def __init__(
        self,
        dataset: WindowDataset,
        micro_batch_size: int,
        n_batches: int,
        dp_rank: int = 0,
        dp_size: int = 1,
    ) -> None:
        if micro_batch_size <= 0 or n_batches < 0:
            raise ValueError(
                f"bad eval batching: micro_batch_size={micro_batch_size}, n_batches={n_batches}"
            )
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        self.dataset = dataset
        total = min(n_batches * micro_batch_size, len(dataset))
        starts = range(0, total, micro_batch_size)
        self.batches = [
            np.arange(s, min(s + micro_batch_size, total), dtype=np.int64) for s in starts
        ][dp_rank::dp_size]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for idx in self.batches:
            yield get_batch(self.dataset, idx)
