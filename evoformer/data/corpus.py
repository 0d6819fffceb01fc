"""The embedded default corpus: the Python standard library's own source, tokenised and cached.

Every Python installation carries about 11 MB of real, varied, permissively licensed code, so
`evoformer train` works out of the box with no download. On first use a tokenizer is trained on
it, the files are tokenised and split into train/val token stores under the cache directory;
later runs (and the other torchrun ranks) just open the cached files.
"""

from __future__ import annotations

import json
import os
import shutil
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from evoformer.data._common import (
    Log,
    cache_root,
    digest,
    file_stamp,
    fingerprint,
    fsync_dir,
    held_out_mask,
    locked,
)
from evoformer.data.store import TokenStore, TokenStoreWriter
from evoformer.data.tokenizer import load_tokenizer, train_tokenizer
from evoformer.errors import UserError

__all__ = ["CorpusFiles", "cache_root", "default_corpus_files", "prepare_default_corpus"]

# Bump when the tokenizer settings, the split rule or the file layout change: old cache entries
# are then simply not found again.
FORMAT_VERSION = 1
_MAX_FILE_BYTES = 1_000_000
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"}
_ENCODE_BATCH = 64


@dataclass(frozen=True)
class CorpusFiles:
    """The cached artefacts of a prepared corpus."""

    tokenizer: Path
    train: Path
    val: Path


def default_corpus_files() -> list[Path]:
    """The .py files of the running Python's standard library, sorted by relative path.

    Third-party packages (site-packages, dist-packages), the test suites (any test/tests
    directory, which includes tkinter's), idlelib, lib2to3 and files over 1 MB are left out.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # pruning here also keeps the walk out of site-packages, which can be huge
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS and d != "__pycache__"]
        for name in filenames:
            if not name.endswith(".py"):
                continue
            path = Path(dirpath, name)
            try:
                if path.stat().st_size > _MAX_FILE_BYTES:
                    continue
            except OSError:  # a dangling symlink in an odd installation
                continue
            found.append((path.relative_to(root).as_posix(), path))
    return [path for _, path in sorted(found)]


def _cached(entry: Path, tokenizer: Path | None) -> CorpusFiles | None:
    """The files of a complete cache entry, or None. An entry directory only ever appears by an
    atomic rename of a finished build, so its existence means it is complete."""
    files = CorpusFiles(
        tokenizer=tokenizer or entry / "tokenizer.model",
        train=entry / "train.tok",
        val=entry / "val.tok",
    )
    if files.tokenizer.exists() and files.train.is_file() and files.val.is_file():
        return files
    return None


def prepare_default_corpus(
    cache_dir: str | None,
    vocab_size: int,
    val_fraction: float,
    tokenizer_path: str | None = None,
    log: Log = print,
    eod_id: int | None = None,
) -> CorpusFiles:
    """Tokenise the default corpus once and cache it; returns the cached files.

    The cache key covers the file list with sizes and modification times, ``vocab_size``,
    ``val_fraction``, the tokenizer's content digest (when given), the ``eod_id`` override (when
    given) and a format version; ``tokenizer_path`` is anything :func:`load_tokenizer` reads.
    Safe to call from many processes at once: one builds under a file lock while the others
    wait, and a killed build leaves only a temporary directory that the next build removes.
    """
    files = default_corpus_files()
    if not files:
        stdlib = sysconfig.get_paths()["stdlib"]
        raise UserError(f"the default corpus is empty: no .py files under {stdlib}")
    tok_path = Path(tokenizer_path).resolve() if tokenizer_path else None
    parts = {
        "format": FORMAT_VERSION,
        "files": [file_stamp(f) for f in files],
        "vocab_size": None if tok_path else vocab_size,
        "val_fraction": val_fraction,
        "tokenizer": load_tokenizer(tok_path, eod_id).digest if tok_path else None,
    }
    if eod_id is not None:  # only then: the keys of existing caches stay valid
        parts["eod_id"] = eod_id
    key = fingerprint(parts)
    root = cache_root(cache_dir)
    entry = root / f"corpus-{key}"
    found = _cached(entry, tok_path)
    if found is not None:
        return found
    with locked(root / f"corpus-{key}.lock", log, "preparing the default corpus"):
        found = _cached(entry, tok_path)  # another rank may have finished while we waited
        if found is not None:
            return found
        for stale in root.glob(f"corpus-{key}.tmp-*"):  # from killed builds: we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        if entry.exists():  # damaged (a file deleted by hand): rebuild it
            shutil.rmtree(entry)
        tmp = Path(tempfile.mkdtemp(prefix=f"corpus-{key}.tmp-", dir=root))
        try:
            _build(files, tmp, entry, vocab_size, val_fraction, tok_path, log, eod_id)
            os.rename(tmp, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(root)
    found = _cached(entry, tok_path)
    assert found is not None
    return found


def _read(path: Path) -> str:
    # errors="replace": one odd byte in some stdlib file must not stop `evoformer train`
    return path.read_text(encoding="utf-8", errors="replace")


def _build(
    files: list[Path],
    out: Path,
    final: Path,
    vocab_size: int,
    val_fraction: float,
    tok_path: Path | None,
    log: Log,
    eod_id: int | None,
) -> None:
    t0 = time.perf_counter()
    texts = [_read(f) for f in files]
    if tok_path is None:
        log(f"preparing default corpus (first use): training tokenizer ({vocab_size} tokens)...")
        tok_path = train_tokenizer(iter(texts), out / "tokenizer", vocab_size, seed=0)
        log(f"trained tokenizer in {time.perf_counter() - t0:.1f} s; tokenising...")
    else:
        log(f"preparing default corpus (first use): tokenising with {tok_path}...")
    tokenizer = load_tokenizer(tok_path, eod_id)
    kept = [i for i, t in enumerate(texts) if t]
    is_val = held_out_mask([digest(texts[i].encode("utf-8")) for i in kept], val_fraction)
    chars = sum(len(texts[i]) for i in kept)
    with (
        TokenStoreWriter(out / "train.tok", tokenizer.vocab_size, tokenizer.eod_id) as train,
        TokenStoreWriter(out / "val.tok", tokenizer.vocab_size, tokenizer.eod_id) as val,
    ):
        for start in range(0, len(kept), _ENCODE_BATCH):
            batch = kept[start : start + _ENCODE_BATCH]
            for j, ids in enumerate(tokenizer.encode_batch([texts[i] for i in batch])):
                (val if is_val[start + j] else train).add(ids)
    n_train, n_val = TokenStore(out / "train.tok").n_tokens, TokenStore(out / "val.tok").n_tokens
    manifest = {
        "format": FORMAT_VERSION,
        "files": len(kept),
        "chars": chars,
        "train_tokens": n_train,
        "val_tokens": n_val,
        "val_docs": int(is_val.sum()),
        "tokens_per_char": (n_train + n_val) / max(chars, 1),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    log(
        f"tokenised {len(kept)} files -> {n_train} train tokens, {n_val} val tokens "
        f"in {manifest['seconds']:.1f} s (cached in {final})"
    )
