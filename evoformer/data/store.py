"""The token store: one memory-mapped file of token ids with document boundaries.

Layout (all little-endian)::

    header   64 bytes: magic b"EVOTOKS1", u32 version, u32 dtype code (1 = uint16, 2 = uint32),
             u64 n_tokens, u64 n_docs, u32 vocab_size, i32 eod_id, zero padding
    tokens   n_tokens ids of the dtype, zero-padded to a multiple of 8 bytes
    offsets  n_docs + 1 int64: document d is tokens[offsets[d]:offsets[d + 1]]

Documents are stored without the end-of-document token; the dataset inserts it when packing, so
one store serves any packing scheme. Files are written to a temporary name in the same directory,
fsynced and renamed into place, so a killed run never leaves a half-written store under the final
name.
"""

from __future__ import annotations

import os
import struct
import tempfile
from array import array
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import numpy as np

from evoformer.data._common import fsync_dir
from evoformer.errors import UserError

MAGIC = b"EVOTOKS1"
VERSION = 1
HEADER_SIZE = 64
_HEADER = struct.Struct("<8sIIQQIi")
_DTYPES = {1: np.dtype("<u2"), 2: np.dtype("<u4")}
_OFFSET_DTYPE = np.dtype("<i8")


class DocumentStore(Protocol):
    """What the datasets read from a corpus of documents, whatever its files: this module's
    :class:`TokenStore`, a sharded store (``sharded.py``) or a Megatron corpus (``megatron.py``).
    Document ``d`` is ``tokens[offsets[d] : offsets[d + 1]]``, without an EOD token."""

    path: Path
    n_tokens: int
    n_docs: int
    vocab_size: int
    eod_id: int
    tokens: Any
    offsets: np.ndarray

    def doc(self, i: int) -> np.ndarray: ...

    def doc_lengths(self) -> np.ndarray: ...


def is_token_store(path: str | Path) -> bool:
    """Whether ``path`` starts with the token-store magic bytes (whatever its extension)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def _dtype_code(vocab_size: int) -> int:
    if vocab_size <= 1 << 16:
        return 1
    if vocab_size <= 1 << 32:
        return 2
    raise ValueError(f"vocab_size {vocab_size} does not fit the token store's uint32 ids")


def _pad8(n: int) -> int:
    return (-n) % 8


def _expected_size(n_tokens: int, n_docs: int, itemsize: int) -> int:
    tok_bytes = n_tokens * itemsize
    return HEADER_SIZE + tok_bytes + _pad8(tok_bytes) + (n_docs + 1) * _OFFSET_DTYPE.itemsize


class TokenStoreWriter:
    """Streams documents into a new token store; :meth:`commit` publishes it atomically.

    Use as a context manager: leaving the block normally commits, an exception discards the
    temporary file. Only the document offsets (8 bytes per document) are held in memory.
    """

    def __init__(self, path: str | Path, vocab_size: int, eod_id: int) -> None:
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        if not 0 <= eod_id < vocab_size:
            raise ValueError(f"eod_id {eod_id} is outside the vocabulary [0, {vocab_size})")
        self.path = Path(path)
        self.vocab_size = vocab_size
        self.eod_id = eod_id
        self._code = _dtype_code(vocab_size)
        self._dtype = _DTYPES[self._code]
        self._offsets = array("q", [0])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent
        )
        self._tmp = Path(tmp)
        self._fh = os.fdopen(fd, "wb")
        self._fh.write(b"\0" * HEADER_SIZE)  # the real header is written once the counts are known

    @property
    def n_tokens(self) -> int:
        """Tokens written so far."""
        return self._offsets[-1]

    @property
    def n_docs(self) -> int:
        """Documents written so far."""
        return len(self._offsets) - 1

    def add(self, doc: Sequence[int] | np.ndarray) -> None:
        """Append one document (token ids, without an end-of-document token)."""
        arr = np.asarray(doc)
        if arr.ndim != 1:
            raise ValueError(f"a document must be a 1-d sequence of ids, got shape {arr.shape}")
        if arr.size:
            if arr.dtype.kind not in "iu":
                raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"token id {lo if lo < 0 else hi} outside [0, {self.vocab_size})")
            self._fh.write(arr.astype(self._dtype, copy=False).tobytes())
        self._offsets.append(self._offsets[-1] + arr.size)

    def add_concatenated(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append several documents at once: ``tokens`` holds them back to back, ``lengths``
        their sizes (one range check and one write for the lot, not one per document)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if tokens.ndim != 1 or int(lengths.sum()) != tokens.size or (lengths < 0).any():
            total = int(lengths.sum())
            raise ValueError(f"{tokens.size} tokens do not split into lengths summing to {total}")
        if tokens.size:
            if tokens.dtype.kind not in "iu":
                raise ValueError(f"token ids must be integers, got dtype {tokens.dtype}")
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"token id {lo if lo < 0 else hi} outside [0, {self.vocab_size})")
            self._fh.write(tokens.astype(self._dtype, copy=False).tobytes())
        ends = self._offsets[-1] + np.cumsum(lengths)
        self._offsets.extend(ends.tolist())

    def commit(self) -> Path:
        """Finish the file, fsync it and rename it to its final name; returns that path."""
        n_tokens, n_docs = self.n_tokens, self.n_docs
        try:
            self._fh.write(b"\0" * _pad8(n_tokens * self._dtype.itemsize))
            self._fh.write(
                np.frombuffer(self._offsets, dtype=np.int64).astype(_OFFSET_DTYPE).tobytes()
            )
            self._fh.seek(0)
            self._fh.write(
                _HEADER.pack(
                    MAGIC, VERSION, self._code, n_tokens, n_docs, self.vocab_size, self.eod_id
                )
            )
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        fsync_dir(self.path.parent)
        return self.path

    def abort(self) -> None:
        """Discard the temporary file (nothing appears under the final name)."""
        if not self._fh.closed:
            self._fh.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> TokenStoreWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_token_store(
    path: str | Path, docs: Iterable[Sequence[int]], vocab_size: int, eod_id: int
) -> Path:
    """Write ``docs`` (token-id sequences, without EOD) to a token store at ``path``, atomically.

    Documents are streamed to disk as they come, so ``docs`` may be a generator over a corpus
    larger than memory. Returns ``path``.
    """
    with TokenStoreWriter(path, vocab_size, eod_id) as writer:
        for doc in docs:
            writer.add(doc)
    return Path(path)


class Documents:
    """What every store derives from ``tokens``, ``offsets`` and ``n_docs``: document ``i``,
    the document lengths, ``len``."""

    tokens: Any
    offsets: Any
    n_docs: int

    def doc(self, i: int) -> np.ndarray:
        """Token ids of document ``i`` (a read-only view, without EOD)."""
        if not -self.n_docs <= i < self.n_docs:
            raise IndexError(f"document {i} out of range for {self.n_docs} documents")
        i %= self.n_docs
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def doc_lengths(self) -> np.ndarray:
        """Number of tokens of every document (int64, length n_docs)."""
        return np.diff(np.asarray(self.offsets, dtype=np.int64))

    def __len__(self) -> int:
        return self.n_docs


class TokenStore(Documents):
    """A read-only, memory-mapped token store (see the module docstring for the format).

    Attributes: ``path``, ``n_tokens``, ``n_docs``, ``vocab_size``, ``eod_id``, ``tokens`` (a
    read-only array view of all ids, documents back to back) and ``offsets`` (int64, n_docs + 1).
    Opening checks the magic, version and file size, and that the offsets are consistent; a
    foreign, truncated or corrupt file raises :class:`UserError` naming it.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as fh:
                head = fh.read(HEADER_SIZE)
                size = os.fstat(fh.fileno()).st_size
        except FileNotFoundError:
            raise UserError(f"token store {self.path} not found") from None
        except IsADirectoryError:
            raise UserError(f"token store {self.path} is a directory, not a file") from None
        except OSError as exc:
            raise UserError(f"cannot read token store {self.path}: {exc.strerror}") from None
        if head[:8] != MAGIC:
            raise UserError(f"{self.path} is not an evoformer token store (bad magic bytes)")
        if len(head) < HEADER_SIZE:
            raise UserError(
                f"token store {self.path} is truncated or corrupt: {size} bytes, "
                f"shorter than the {HEADER_SIZE}-byte header"
            )
        _, version, code, n_tokens, n_docs, vocab_size, eod_id = _HEADER.unpack_from(head)
        if version != VERSION:
            raise UserError(
                f"token store {self.path} has format version {version}, this evoformer reads "
                f"version {VERSION}: re-create it with `evoformer preprocess`"
            )
        if code not in _DTYPES:
            raise UserError(f"token store {self.path} is corrupt: unknown dtype code {code}")
        dtype = _DTYPES[code]
        expected = _expected_size(n_tokens, n_docs, dtype.itemsize)
        if size != expected:
            raise UserError(
                f"token store {self.path} is truncated or corrupt: header says {n_tokens} tokens "
                f"in {n_docs} documents ({expected} bytes), file holds {size} bytes"
            )
        if vocab_size <= 0 or not 0 <= eod_id < vocab_size:
            raise UserError(
                f"token store {self.path} is corrupt: eod_id {eod_id}, vocab_size {vocab_size}"
            )
        self.n_tokens: int = n_tokens
        self.n_docs: int = n_docs
        self.vocab_size: int = vocab_size
        self.eod_id: int = eod_id
        self.dtype = dtype
        raw = np.memmap(self.path, dtype=np.uint8, mode="r")
        tok_end = HEADER_SIZE + n_tokens * dtype.itemsize
        off_start = tok_end + _pad8(n_tokens * dtype.itemsize)
        self.tokens: np.ndarray = raw[HEADER_SIZE:tok_end].view(dtype)
        self.offsets: np.ndarray = raw[off_start:].view(_OFFSET_DTYPE)
        offs = self.offsets
        if offs[0] != 0 or offs[-1] != n_tokens or (n_docs and np.any(offs[1:] < offs[:-1])):
            raise UserError(f"token store {self.path} is corrupt: inconsistent document offsets")

    def __repr__(self) -> str:
        return (
            f"TokenStore({str(self.path)!r}, n_tokens={self.n_tokens}, n_docs={self.n_docs}, "
            f"vocab_size={self.vocab_size})"
        )

    # DataLoader workers may be spawned: send the path, not the mapped pages.
    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])  # type: ignore[misc]
