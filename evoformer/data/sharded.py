"""The sharded token store that `evoformer preprocess` writes: a folder of token-store shards
and an ``index.json`` naming them.

Layout::

    OUT/index.json              format, vocab_size, eod_id, totals, the shard list, the run's stats
    OUT/shard-00000.tok         each shard is a complete single-file token store (store.py)
    OUT/shard-00001.tok         (a new shard starts once one holds shard_tokens tokens)
    OUT/slice-00003-of-00016/   with --num-slices: each slice is itself a sharded store; the
                                merged OUT/index.json lists their shards by relative path

``index.json`` is written last (temporary name, fsync, rename), so a folder without one is never
taken for a store. Opening reads the index and each shard's 64-byte header (plus its document
offsets), never the tokens: a store of any size opens at once, memory-mapped.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from evoformer.data._common import fsync_dir
from evoformer.data.store import Documents, TokenStore, TokenStoreWriter
from evoformer.errors import UserError

INDEX_NAME = "index.json"
FORMAT = "evoformer-sharded-token-store"
VERSION = 1
DEFAULT_SHARD_TOKENS = 1 << 28  # 256 Mi tokens: 512 MiB per uint16 shard


def is_sharded_store(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding a store index (complete or not is checked on open)."""
    return (Path(path) / INDEX_NAME).is_file()


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` via a temporary file, fsync and rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=1)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class ShardWriter:
    """Writes documents into ``shard-NNNNN.tok`` files under ``folder``, starting a new shard once
    the current one holds ``shard_tokens`` tokens (documents are never split across shards)."""

    def __init__(self, folder: Path, vocab_size: int, eod_id: int, shard_tokens: int) -> None:
        if shard_tokens <= 0:
            raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
        self.folder = folder
        self.vocab_size, self.eod_id, self.shard_tokens = vocab_size, eod_id, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._cur: TokenStoreWriter | None = None

    def _open(self) -> TokenStoreWriter:
        if self._cur is None:
            name = f"shard-{len(self.shards):05d}.tok"
            self._cur = TokenStoreWriter(self.folder / name, self.vocab_size, self.eod_id)
        return self._cur

    def _close_current(self) -> None:
        cur, self._cur = self._cur, None
        if cur is None:
            return
        n_docs, n_tokens = cur.n_docs, cur.n_tokens
        path = cur.commit()
        self.shards.append(
            {
                "path": path.name,
                "n_docs": n_docs,
                "n_tokens": n_tokens,
                "bytes": path.stat().st_size,
            }
        )

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given back to back in ``tokens`` with sizes ``lengths``."""
        lengths = np.asarray(lengths, dtype=np.int64)
        while lengths.size:
            cur = self._open()
            before = np.cumsum(lengths) - lengths  # tokens ahead of each document in this batch
            # documents that start while the shard is still below its size go into it
            k = int(np.searchsorted(before, self.shard_tokens - cur.n_tokens, side="left"))
            k = max(k, 1) if cur.n_tokens == 0 else k
            n = int(before[k]) if k < lengths.size else tokens.size
            if k:
                cur.add_concatenated(tokens[:n], lengths[:k])
            if k < lengths.size:
                self._close_current()
            tokens, lengths = tokens[n:], lengths[k:]

    def finish(self) -> list[dict[str, Any]]:
        """Commit the last shard; returns the shard entries for the index."""
        self._close_current()
        return self.shards

    def abort(self) -> None:
        if self._cur is not None:
            self._cur.abort()
            self._cur = None


class _ShardedTokens:
    """All shards' token ids as one read-only sequence: integer-array and slice indexing."""

    def __init__(self, shards: list[TokenStore], dtype: np.dtype) -> None:
        self._shards = shards
        self.dtype = dtype
        self._starts = np.cumsum([0] + [s.n_tokens for s in shards]).astype(np.int64)
        self.size = int(self._starts[-1])
        self.shape = (self.size,)
        self.ndim = 1

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: Any) -> np.ndarray:
        if isinstance(idx, slice):
            idx = np.arange(*idx.indices(self.size), dtype=np.int64)
        arr = np.asarray(idx, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.size):
            raise IndexError(f"token index outside [0, {self.size})")
        which = np.searchsorted(self._starts, arr, side="right") - 1
        out = np.empty(arr.shape, dtype=self.dtype)
        for k in np.unique(which):  # a training window touches one or two shards
            sel = which == k
            out[sel] = self._shards[k].tokens[arr[sel] - self._starts[k]]
        return out


class ShardedStore(Documents):
    """A read-only sharded token store (see the module docstring), with the same reading
    interface as :class:`TokenStore`: ``path``, ``n_tokens``, ``n_docs``, ``vocab_size``,
    ``eod_id``, ``tokens``, ``offsets``, :meth:`doc`, :meth:`doc_lengths`. ``meta`` is the
    parsed ``index.json``. A missing, foreign, truncated or inconsistent index or shard raises
    :class:`UserError` naming it."""

    def kept_tokenizer(self) -> Path | None:
        """The copy of the tokenizer that made the store (``tokenizer.model`` or a
        ``tokenizer/`` folder, written by `evoformer preprocess`), or None (older stores)."""
        for name in ("tokenizer.model", "tokenizer"):
            if (self.path / name).exists():
                return self.path / name
        return None

    @property
    def tokenizer_digest(self) -> str | None:
        """Content hash of the tokenizer that made the store (``Tokenizer.digest``)."""
        return (self.meta.get("tokenizer") or {}).get("sha256")

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        index = self.path / INDEX_NAME
        if not index.is_file():
            raise UserError(
                f"{self.path} is not a complete token store (no {INDEX_NAME}): an unfinished or "
                f"killed `evoformer preprocess`, or slices not merged yet (`evoformer preprocess "
                f"--merge --out {self.path}`)"
            )
        try:
            meta = json.loads(index.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise UserError(f"token store index {index} is corrupt (not JSON)") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise UserError(f"{index} is not an evoformer token store index")
        if meta.get("version") != VERSION:
            raise UserError(
                f"token store {self.path} has index version {meta.get('version')}, this evoformer "
                f"reads version {VERSION}: re-create it with `evoformer preprocess`"
            )
        self.meta: dict[str, Any] = meta
        self.vocab_size: int = int(meta["vocab_size"])
        self.eod_id: int = int(meta["eod_id"])
        self._shards: list[TokenStore] = []
        for entry in meta["shards"]:
            shard = TokenStore(self.path / entry["path"])
            got = (shard.n_docs, shard.n_tokens, shard.vocab_size, shard.eod_id)
            want = (entry["n_docs"], entry["n_tokens"], self.vocab_size, self.eod_id)
            if got != want:
                raise UserError(
                    f"token store {self.path} is inconsistent: shard {entry['path']} holds "
                    f"{got[0]} documents / {got[1]} tokens (vocab {got[2]}, eod {got[3]}), the "
                    f"index says {want[0]} / {want[1]} (vocab {want[2]}, eod {want[3]})"
                )
            self._shards.append(shard)
        self.n_docs: int = sum(s.n_docs for s in self._shards)
        self.n_tokens: int = sum(s.n_tokens for s in self._shards)
        if (self.n_docs, self.n_tokens) != (meta["n_docs"], meta["n_tokens"]):
            raise UserError(f"token store {self.path} is inconsistent: index totals disagree")
        self.dtype = self._shards[0].dtype if self._shards else np.dtype("<u2")
        self._doc_starts = np.cumsum([0] + [s.n_docs for s in self._shards]).astype(np.int64)
        if len(self._shards) == 1:
            self.tokens: Any = self._shards[0].tokens
            self.offsets: np.ndarray = self._shards[0].offsets
        else:
            self.tokens = _ShardedTokens(self._shards, self.dtype)
            tok_starts = self.tokens._starts
            parts = [np.zeros(1, np.int64)] + [
                np.asarray(s.offsets[1:], np.int64) + tok_starts[k]
                for k, s in enumerate(self._shards)
            ]
            self.offsets = np.concatenate(parts)

    @property
    def shards(self) -> list[TokenStore]:
        """The shard stores, in document order."""
        return list(self._shards)

    def doc(self, i: int) -> np.ndarray:
        """Token ids of document ``i`` (a read-only view, without EOD)."""
        if not -self.n_docs <= i < self.n_docs:
            raise IndexError(f"document {i} out of range for {self.n_docs} documents")
        i %= self.n_docs
        k = int(np.searchsorted(self._doc_starts, i, side="right")) - 1
        return self._shards[k].doc(i - int(self._doc_starts[k]))

    def __repr__(self) -> str:
        return (
            f"ShardedStore({str(self.path)!r}, shards={len(self._shards)}, "
            f"n_tokens={self.n_tokens}, n_docs={self.n_docs}, vocab_size={self.vocab_size})"
        )

    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])  # type: ignore[misc]


def index_entry(
    shards: list[dict[str, Any]], vocab_size: int, eod_id: int, **extra: Any
) -> dict[str, Any]:
    """The content of an ``index.json`` for ``shards`` (plus free-form ``extra`` fields)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "vocab_size": vocab_size,
        "eod_id": eod_id,
        "n_docs": sum(s["n_docs"] for s in shards),
        "n_tokens": sum(s["n_tokens"] for s in shards),
        "shards": shards,
        **extra,
    }
