"""Datasets of fixed-length training windows: packed real text, and synthetic tokens.

Every dataset here maps a sample index to a LongTensor of ``seq_len + 1`` ids: the model input is
``x[:-1]`` and the next-token target is ``x[1:]``.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np
import torch

from evoformer.data.store import DocumentStore
from evoformer.errors import UserError


def _seed_u64(seed: int) -> int:
    # numpy's SeedSequence takes non-negative ints only; fold negative seeds in.
    return seed % (1 << 64)


class PackedDataset:
    """Fixed windows over the documents of one :class:`DocumentStore`, packed back to back.

    The documents (optionally only those in ``doc_ids``, in that order) form one stream with the
    store's EOD token after each; sample ``i`` is ``stream[i*seq_len : i*seq_len + seq_len + 1]``
    so consecutive windows overlap by one token and every stream token is a target exactly once.
    The stream is never materialised: a window is gathered from the memory-mapped store with one
    vectorised binary search over document starts (O(seq_len log n_docs) per sample, 24 bytes of
    RAM per document).
    """

    def __init__(
        self, store: DocumentStore, seq_len: int, doc_ids: Sequence[int] | np.ndarray | None = None
    ) -> None:
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.store = store
        self.seq_len = seq_len
        self.vocab_size = store.vocab_size
        self.eod_id: int | None = store.eod_id
        offsets = np.asarray(store.offsets, dtype=np.int64)
        if doc_ids is None:
            self._base = offsets[:-1]
            self._lens = np.diff(offsets)
        else:
            ids = np.asarray(doc_ids, dtype=np.int64)
            if ids.size and (ids.min() < 0 or ids.max() >= store.n_docs):
                raise IndexError(f"doc_ids outside [0, {store.n_docs}) for {store.path}")
            self._base = offsets[ids]
            self._lens = offsets[ids + 1] - self._base
        # stream position where each document starts; the last entry is the stream length
        self._starts = np.zeros(len(self._lens) + 1, dtype=np.int64)
        np.cumsum(self._lens + 1, out=self._starts[1:])
        self.n_docs = len(self._lens)
        self.n_tokens = int(self._lens.sum())  # document tokens, without the EODs
        self.stream_len = int(self._starts[-1])
        if self.n_tokens == 0 or self.stream_len < seq_len + 1:
            raise UserError(
                f"corpus too small/empty: {store.path} gives {self.n_tokens} tokens in "
                f"{self.n_docs} documents, fewer than one sample of seq_len + 1 = {seq_len + 1}"
            )

    def __len__(self) -> int:
        return (self.stream_len - 1) // self.seq_len

    def _window(self, i: int) -> np.ndarray:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for {n} samples")
        i %= n
        pos = np.arange(i * self.seq_len, i * self.seq_len + self.seq_len + 1, dtype=np.int64)
        d = np.searchsorted(self._starts, pos, side="right") - 1
        local = pos - self._starts[d]
        is_eod = local >= self._lens[d]
        idx = np.where(is_eod, 0, self._base[d] + local)
        out = self.store.tokens[idx].astype(np.int64)
        out[is_eod] = self.store.eod_id
        return out

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self._window(int(i)))

    def __repr__(self) -> str:
        return (
            f"PackedDataset({str(self.store.path)!r}, seq_len={self.seq_len}, "
            f"docs={self.n_docs}, samples={len(self)})"
        )


class ConcatDataset:
    """Several window datasets of the same ``seq_len`` one after another (e.g. one per file)."""

    def __init__(self, datasets: Sequence[PackedDataset | SyntheticDataset]) -> None:
        if not datasets:
            raise ValueError("ConcatDataset needs at least one dataset")
        seq_lens = {ds.seq_len for ds in datasets}
        if len(seq_lens) != 1:
            raise ValueError(f"datasets disagree on seq_len: {sorted(seq_lens)}")
        self.datasets = list(datasets)
        self.seq_len = datasets[0].seq_len
        self.vocab_size = max(ds.vocab_size for ds in datasets)
        eods = {ds.eod_id for ds in datasets}
        if len(eods) != 1:
            raise UserError(
                f"the data files disagree on the end-of-document id: {sorted(map(str, eods))} "
                "(were they tokenised with different tokenizers?)"
            )
        self.eod_id = eods.pop()
        self._ends = np.cumsum([len(ds) for ds in datasets]).tolist()

    def __len__(self) -> int:
        return self._ends[-1]

    def _window(self, i: int) -> np.ndarray:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for {n} samples")
        i %= n
        k = bisect.bisect_right(self._ends, i)
        return self.datasets[k]._window(i - (self._ends[k - 1] if k else 0))

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self._window(int(i)))


class SyntheticDataset:
    """Uniformly random tokens: sample ``i`` comes from a generator seeded by ``(seed, i)``.

    Deterministic and independent of access order, so it behaves like real data under any
    sampler or data-parallel layout (for throughput runs and tests without a corpus).
    """

    def __init__(self, vocab_size: int, seq_len: int, seed: int, length: int = 10**9) -> None:
        if vocab_size <= 0 or seq_len <= 0 or length <= 0:
            raise ValueError(
                f"vocab_size, seq_len and length must be positive, got {vocab_size}, "
                f"{seq_len}, {length}"
            )
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.seed = seed
        self.length = length
        self.eod_id: int | None = None  # random tokens: no documents

    def __len__(self) -> int:
        return self.length

    def _window(self, i: int) -> np.ndarray:
        if not -self.length <= i < self.length:
            raise IndexError(f"sample {i} out of range for {self.length} samples")
        i %= self.length
        rng = np.random.default_rng([_seed_u64(self.seed), i])
        return rng.integers(0, self.vocab_size, size=self.seq_len + 1, dtype=np.int64)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self._window(int(i)))

    def __repr__(self) -> str:
        return (
            f"SyntheticDataset(vocab_size={self.vocab_size}, seq_len={self.seq_len}, "
            f"seed={self.seed}, length={self.length})"
        )


WindowDataset = PackedDataset | ConcatDataset | SyntheticDataset


def get_batch(dataset: WindowDataset, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
    """The samples at ``indices`` stacked into a LongTensor ``[len(indices), seq_len + 1]``."""
    window = getattr(dataset, "_window", None)
    if window is None:  # any other map-style dataset of equal-length LongTensors
        return torch.stack([dataset[int(i)] for i in indices])
    rows = [window(int(i)) for i in indices]
    if not rows:
        return torch.empty(0, dataset.seq_len + 1, dtype=torch.long)
    return torch.from_numpy(np.stack(rows))


def document_ids_from_eod(tokens_BT: torch.Tensor, eod_id: int) -> torch.Tensor:
    """Document ids [B, T] of packed token windows in which ``eod_id`` separates documents
    (``Transformer.forward(..., document_ids=...)``).

    The end-of-document token opens the next document, in the role of its beginning-of-sequence
    token: a document run alone is ``[EOD, t1, ..., tn]``, and with ``x = window[:-1]``,
    ``y = window[1:]`` every prediction is made from one document's tokens only (the last token
    of a document predicts the EOD that ends it)."""
    return torch.cumsum(tokens_BT == eod_id, dim=1)
