"""Plumbing shared by the corpus and preprocessing caches: cache root, file lock, keys, splits."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from evoformer.errors import UserError

Log = Callable[[str], Any]


def cache_root(cfg_cache_dir: str | None) -> Path:
    """Where tokenised corpora are cached: the config value, else $EVOFORMER_CACHE, else
    ~/.cache/evoformer (created if missing)."""
    raw = cfg_cache_dir or os.environ.get("EVOFORMER_CACHE") or "~/.cache/evoformer"
    root = Path(os.path.expandvars(raw)).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the data cache directory {root}: {exc}") from None
    return root


def file_stamp(path: Path) -> list[Any]:
    """Identity of a file for cache keys: resolved path, size and modification time."""
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def fingerprint(parts: Any) -> str:
    """A short stable hex digest of a JSON-serialisable description of a cache entry."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@contextlib.contextmanager
def locked(lock_path: Path, log: Log, what: str) -> Iterator[None]:
    """Hold an exclusive fcntl lock on ``lock_path`` (created if needed).

    torchrun starts every rank at once; the first to get here builds the cache entry and the
    others block until it is done, then find it complete. The kernel drops the lock when its
    holder dies, so a killed build never leaves the others waiting forever.
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process {what} ...")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def held_out_mask(digests: Sequence[bytes], val_fraction: float) -> np.ndarray:
    """Which documents go to validation, from a content hash of each (True = validation).

    A document is held out when its hash, read as a number in [0, 1), is below val_fraction: the
    choice depends only on the document itself, so it is stable across runs and machines, and
    identical documents always land on the same side (no train/val leakage through duplicates).
    With val_fraction > 0 at least one document is held out and at least one is kept.
    """
    n = len(digests)
    mask = np.zeros(n, dtype=bool)
    if val_fraction <= 0 or n == 0:
        return mask
    if n < 2:
        raise UserError(
            f"cannot hold out a validation split (data.val_fraction={val_fraction}) from a "
            "corpus of a single document: add documents or set data.val_fraction=0"
        )
    u = np.array([int.from_bytes(d[:8], "big") / 2.0**64 for d in digests])
    mask = u < val_fraction
    if not mask.any():
        mask[int(np.argmin(u))] = True
    if mask.all():
        mask[int(np.argmax(u))] = False
    return mask


def digest(data: bytes) -> bytes:
    """The content hash used by :func:`held_out_mask`."""
    return hashlib.blake2b(data, digest_size=8).digest()
