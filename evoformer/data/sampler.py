"""Deterministic, resumable, data-parallel-invariant sample order.

The order is a pure function: the global batch of optimizer step ``s`` is computed from
``(seed, s, num_samples, global_batch_size)`` alone. There is no iterator state to save, so
resuming at step ``s`` reproduces exactly the batches an uninterrupted run would have seen, and a
run restarted with a different data-parallel size trains on the same samples per step (each rank
just takes a different slice).
"""

from __future__ import annotations

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


class GlobalBatchSampler:
    """Which samples make up the global batch of each optimizer step.

    Epoch ``e`` is a permutation of ``range(num_samples)`` drawn from
    ``np.random.default_rng([seed, e])``; the epochs are laid end to end and cut into
    consecutive global batches (a batch may span an epoch boundary). The position in the data
    IS the step: resuming needs nothing but the step number, and :meth:`state_dict` only records
    what the order was built from, so a mismatched resume is caught.
    """

    def __init__(self, num_samples: int, global_batch_size: int, seed: int) -> None:
        if num_samples <= 0:
            raise UserError(f"the dataset has no samples to draw batches from ({num_samples})")
        if global_batch_size <= 0:
            raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
        self.num_samples = int(num_samples)
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self._perms: OrderedDict[int, Any] = OrderedDict()

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
        n, g = self.num_samples, self.global_batch_size
        pos = np.arange(step * g, step * g + g, dtype=np.int64)
        epochs, within = np.divmod(pos, n)
        out = np.empty(g, dtype=np.int64)
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
        g = self.global_batch_size
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
        return step * self.global_batch_size / self.num_samples

    def state_dict(self) -> dict[str, int]:
        """What the order was built from (the position is the step, saved by the trainer)."""
        return {
            "seed": self.seed,
            "num_samples": self.num_samples,
            "global_batch_size": self.global_batch_size,
        }

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
        if int(state["seed"]) != self.seed:
            self.seed = int(state["seed"])
            self._perms.clear()


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
