"""Reading pre-tokenised corpora in Megatron-LM's ``.bin`` / ``.idx`` format (MMIDIDX).

The index (``PREFIX.idx``, little-endian)::

    9 bytes  magic b"MMIDIDX\\x00\\x00"
    u64      version (1)
    u8       dtype code: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16
    u64      sequence count S
    u64      document count D (entries of the document index: documents + 1)
    i32[S]   sequence lengths (tokens)
    i64[S]   sequence pointers (byte offsets into PREFIX.bin)
    i64[D]   document index: document d is sequences doc_index[d] : doc_index[d + 1]
    (i8[S]   sequence modes, multimodal corpora only: ignored)

``PREFIX.bin`` holds the token ids back to back. The files carry neither the vocabulary size nor
the end-of-document id, so evoformer reads them with those of ``data.tokenizer`` (the tokenizer
the corpus was made with). A document keeps all its tokens: one made with Megatron's
``--append-eod`` already ends in EOD, and the packer adds its own after it.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np

from evoformer.data.store import Documents
from evoformer.errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
_HEAD = struct.Struct("<9sQBQQ")
_DTYPES = {
    1: np.dtype("u1"),
    2: np.dtype("i1"),
    3: np.dtype("<i2"),
    4: np.dtype("<i4"),
    5: np.dtype("<i8"),
    8: np.dtype("<u2"),
}
_CHECK_CHUNK = 1 << 20


def megatron_prefix(path: str | Path) -> Path | None:
    """The prefix of a Megatron corpus named by ``path`` (the prefix itself, or its .bin or .idx),
    or None when ``path`` names no such corpus (neither file next to it)."""
    path = Path(path)
    if path.suffix in (".bin", ".idx"):
        prefix = path.with_suffix("")
        return prefix if prefix.with_suffix(".idx").exists() else None
    idx = path.with_name(path.name + ".idx")
    return path if idx.exists() and not path.is_file() else None


class MegatronStore(Documents):
    """A Megatron ``.bin``/``.idx`` corpus read as documents, with the reading interface of
    :class:`~evoformer.data.store.TokenStore` (``tokens``, ``offsets``, :meth:`doc`, ...).

    ``vocab_size`` and ``eod_id`` come from the caller (the tokenizer of the corpus). Opening
    checks the magic, version, dtype, the index size, that the document index and the sequence
    pointers are consistent and contiguous, and that ``.bin`` holds exactly the tokens the index
    describes; any mismatch raises :class:`UserError` in one line naming the files.
    """

    def __init__(self, prefix: str | Path, vocab_size: int, eod_id: int) -> None:
        self.prefix = Path(prefix)
        self.path = self.prefix  # the name datasets and messages show
        idx, bin_ = self.prefix.with_name(self.prefix.name + ".idx"), self.bin_path
        for p in (idx, bin_):
            if not p.is_file():
                raise UserError(f"Megatron corpus {self.prefix}: {p} not found")
        self.vocab_size, self.eod_id = vocab_size, eod_id
        size = idx.stat().st_size
        with open(idx, "rb") as fh:
            head = fh.read(_HEAD.size)
        what = f"Megatron index {idx}"
        if head[:9] != MAGIC:
            raise UserError(f"{what} is not a Megatron MMIDIDX index (bad magic bytes)")
        if len(head) < _HEAD.size:
            raise UserError(f"{what} is truncated: {size} bytes, shorter than its header")
        _, version, code, n_seq, n_doc = _HEAD.unpack(head)
        if version != 1:
            raise UserError(f"{what} has version {version}; evoformer reads version 1")
        if code not in _DTYPES:
            raise UserError(f"{what}: dtype code {code} is not an integer token type")
        self.dtype = _DTYPES[code]
        base = _HEAD.size + 4 * n_seq + 8 * n_seq + 8 * n_doc
        if size not in (base, base + n_seq):  # + n_seq: the modes of a multimodal corpus
            raise UserError(
                f"{what} is truncated or corrupt: {n_seq} sequences and {n_doc} document "
                f"entries need {base} bytes, the file holds {size}"
            )
        if n_doc < 1:
            raise UserError(f"{what} is corrupt: empty document index")
        raw = np.memmap(idx, dtype=np.uint8, mode="r")
        o = _HEAD.size
        lengths = raw[o : o + 4 * n_seq].view("<i4")
        pointers = raw[o + 4 * n_seq : o + 12 * n_seq].view("<i8")
        doc_index = np.asarray(raw[o + 12 * n_seq : base].view("<i8"), dtype=np.int64)
        if doc_index[0] != 0 or doc_index[-1] != n_seq or np.any(np.diff(doc_index) < 0):
            raise UserError(f"{what} is corrupt: inconsistent document index")
        itemsize = self.dtype.itemsize
        n_tokens = self._check_contiguous(lengths, pointers, itemsize, what)
        bin_size = bin_.stat().st_size
        if bin_size != n_tokens * itemsize:
            raise UserError(
                f"{what} does not match {bin_}: the index describes {n_tokens} tokens "
                f"({n_tokens * itemsize} bytes of {self.dtype}), the .bin holds {bin_size} bytes"
            )
        # token offset of each document start (the last entry is the end of the corpus)
        seq_starts = np.empty(n_seq + 1, dtype=np.int64)
        seq_starts[0] = 0
        np.cumsum(lengths, out=seq_starts[1:])
        self.offsets: np.ndarray = seq_starts[doc_index]
        self.n_docs: int = n_doc - 1
        self.n_tokens: int = n_tokens
        self.tokens: Any = (
            np.memmap(bin_, dtype=self.dtype, mode="r")
            if n_tokens
            else np.zeros(0, dtype=self.dtype)
        )

    @property
    def bin_path(self) -> Path:
        return self.prefix.with_name(self.prefix.name + ".bin")

    @staticmethod
    def _check_contiguous(
        lengths: np.ndarray, pointers: np.ndarray, itemsize: int, what: str
    ) -> int:
        """Total tokens; the sequences must lie back to back from byte 0 (chunked, so even a
        billion sequences need little memory)."""
        total = 0
        for start in range(0, len(lengths), _CHECK_CHUNK):
            lens = np.asarray(lengths[start : start + _CHECK_CHUNK], dtype=np.int64)
            ptrs = np.asarray(pointers[start : start + _CHECK_CHUNK], dtype=np.int64)
            if (lens < 0).any():
                raise UserError(f"{what} is corrupt: negative sequence length")
            expect = (total + np.cumsum(lens) - lens) * itemsize
            if not np.array_equal(ptrs, expect):
                raise UserError(
                    f"{what} is corrupt: sequence pointers are not back to back (evoformer "
                    "reads contiguous corpora, as Megatron's builder writes them)"
                )
            total += int(lens.sum())
        return total

    def __repr__(self) -> str:
        return (
            f"MegatronStore({str(self.prefix)!r}, n_tokens={self.n_tokens}, "
            f"n_docs={self.n_docs}, dtype={self.dtype})"
        )

    def __getstate__(self) -> dict[str, Any]:
        return {"prefix": str(self.prefix), "vocab": self.vocab_size, "eod": self.eod_id}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["prefix"], state["vocab"], state["eod"])  # type: ignore[misc]
