"""Tokenising raw corpora into a sharded token store (`evoformer preprocess`).

The pipeline: the calling process streams raw records from the inputs (:mod:`readers`: text,
JSON lines plain/gzip/zstd, parquet; files, folders, globs), groups them into batches of at most
``_BATCH_DOCS`` records / ``_BATCH_BYTES`` bytes, and hands them to ``workers`` spawned
processes, each pinned to one core and holding its own tokenizer (sent by path), which decode
them (UTF-8, JSON: the costly part of reading, so it scales with the workers too) and tokenise.
Results come back in submission order with at most ``_INFLIGHT_PER_WORKER`` batches per worker
in flight, so memory is bounded by a few batches whatever the corpus size, and the output
(documents, order, shard boundaries, skip counts) depends only on the inputs, never on the
number of workers.

Everything is written into a hidden temporary folder next to ``out`` and renamed into place once
complete (shards fsynced, ``index.json`` last): a failed or killed run never leaves a store under
``out``, and an existing store there is untouched until the new one replaces it (``force``).

For corpora beyond one machine, ``num_slices`` / ``slice_index`` tokenise one contiguous slice
of the (sorted, expanded) input files into ``out/slice-IIIII-of-NNNNN/``; :func:`merge_slices`
then writes ``out/index.json`` over all slices without copying any tokens.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from evoformer.data._common import Log, file_stamp, fingerprint, fsync_dir
from evoformer.data.readers import (
    DEFAULT_MAX_DOC_BYTES,
    Record,
    Skipped,
    decode_record,
    expand_inputs,
    raw_records,
    read_documents,
)
from evoformer.data.sharded import (
    DEFAULT_SHARD_TOKENS,
    INDEX_NAME,
    ShardedStore,
    ShardWriter,
    index_entry,
    is_sharded_store,
    write_json_atomic,
)
from evoformer.data.store import _DTYPES, _dtype_code
from evoformer.errors import UserError

if TYPE_CHECKING:
    from evoformer.data.tokenizer import Tokenizer

__all__ = ["default_workers", "merge_slices", "preprocess", "read_documents", "slice_files"]

# A batch is the unit of work sent to a worker: large enough that the inter-process traffic
# (a few MB of text out, the ids back as one array) is small next to the encoding, small enough
# that a few of them per worker keep memory modest.
_BATCH_DOCS = 2048
_BATCH_BYTES = 2 << 20
_INFLIGHT_PER_WORKER = 3
_SLICE_RE = re.compile(r"slice-(\d{5})-of-(\d{5})")
# Bump when the output for the same inputs changes (a finished slice is then not reused).
_FORMAT = 2


def default_workers() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


# --- the worker side ---------------------------------------------------------------------------

_worker: dict[str, Any] = {}


def _init_worker(
    tokenizer: Tokenizer, dtype: str, text_key: str, counter: Any, cpus: list[int]
) -> None:
    # One core per worker: the tokenizer's own thread pool (sentencepiece sizes it from the
    # machine's cores, HF tokenizers from RAYON_NUM_THREADS) then shares that core instead of
    # oversubscribing the machine, so N workers use N cores.
    os.environ["RAYON_NUM_THREADS"] = "1"
    with counter.get_lock():
        k = counter.value
        counter.value += 1
    if cpus and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, {cpus[k % len(cpus)]})
        except OSError:
            pass
    _worker.update(tokenizer=tokenizer, dtype=np.dtype(dtype), text_key=text_key)


Encoded = tuple[np.ndarray, np.ndarray, int, Skipped]


def _encode(tokenizer: Tokenizer, dtype: np.dtype, text_key: str, batch: list[Record]) -> Encoded:
    """Decode and tokenise a batch of raw records: the ids back to back (in ``dtype``), each
    document's length, the characters read, and the records skipped."""
    texts: list[str] = []
    skipped = Skipped()
    for record in batch:
        text, reason, where, _ = decode_record(record, text_key)
        if text is None:
            skipped.add(reason, where)
        else:
            texts.append(text)
    ids = tokenizer.encode_batch(texts) if texts else []
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    tokens = np.fromiter(chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    return tokens, lengths, sum(map(len, texts)), skipped


def _encode_in_worker(batch: list[Record]) -> Encoded:
    return _encode(_worker["tokenizer"], _worker["dtype"], _worker["text_key"], batch)


# --- the main side -----------------------------------------------------------------------------


def _batches(
    files: Sequence[Path],
    text_key: str,
    skipped: Skipped,
    max_doc_bytes: int,
    counters: dict[str, int],
) -> Iterator[tuple[list[Record], Skipped]]:
    """Raw records of all ``files`` in order, grouped into batches, each with what was skipped
    while reading it (whole files: truncated, unreadable, no such column)."""
    batch: list[Record] = []
    size = 0
    skipped = Skipped()
    for path in files:
        for record in raw_records(path, text_key, skipped, max_doc_bytes, counters):
            batch.append(record)
            payload = record[3]
            size += len(payload) if payload is not None else 0
            if len(batch) >= _BATCH_DOCS or size >= _BATCH_BYTES:
                yield batch, skipped
                batch, size, skipped = [], 0, Skipped()
    if batch or skipped.total:
        yield batch, skipped


def _encoded(
    batches: Iterator[tuple[list[Record], Skipped]],
    tokenizer: Tokenizer,
    dtype: np.dtype,
    text_key: str,
    workers: int,
) -> Generator[tuple[Encoded, Skipped], None, None]:
    """Encoded batches in input order, each with its reading skips; ``workers=0`` encodes in
    this process."""
    if workers == 0:
        for batch, read_skips in batches:
            yield _encode(tokenizer, dtype, text_key, batch), read_skips
        return
    ctx = mp.get_context("spawn")  # safe under threads / CUDA (build.py runs inside training)
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=ctx,
        initializer=_init_worker,
        initargs=(tokenizer, dtype.str, text_key, ctx.Value("i", 0), cpus),
    )
    inflight: deque[tuple[Future[Encoded], Skipped]] = deque()
    try:
        for batch, read_skips in batches:
            inflight.append((pool.submit(_encode_in_worker, batch), read_skips))
            if len(inflight) >= _INFLIGHT_PER_WORKER * workers:
                future, read_skips = inflight.popleft()
                yield future.result(), read_skips
        while inflight:
            future, read_skips = inflight.popleft()
            yield future.result(), read_skips
    except BrokenProcessPool:
        raise UserError(
            "a tokenizer worker process died (out of memory, killed, or started from a script "
            "without an `if __name__ == '__main__':` guard; workers=0 tokenises in-process)"
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def slice_files(files: Sequence[Path], index: int, num_slices: int) -> list[Path]:
    """Slice ``index`` of ``num_slices``: a contiguous run of ``files`` balanced by size, so the
    slices concatenated in order are exactly ``files`` (and a merged store holds the documents
    in the order one run would have written them)."""
    if num_slices < 1 or not 0 <= index < num_slices:
        raise UserError(f"--slice-index {index} is outside [0, --num-slices {num_slices})")
    sizes = [p.stat().st_size for p in files]
    total = sum(sizes)
    chosen, before = [], 0
    for j, (path, size) in enumerate(zip(files, sizes, strict=True)):
        middle = (before + size / 2) / total if total else (j + 0.5) / len(files)
        if min(int(middle * num_slices), num_slices - 1) == index:
            chosen.append(path)
        before += size
    return chosen


def slice_name(index: int, num_slices: int) -> str:
    return f"slice-{index:05d}-of-{num_slices:05d}"


def _publish(tmp: Path, target: Path) -> None:
    """Rename the finished ``tmp`` folder to ``target``, replacing what is there."""
    if target.exists() or target.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    fsync_dir(target.parent)


def _names(paths: Sequence[Path]) -> str:
    return ", ".join(str(p) for p in paths[:3]) + (", ..." if len(paths) > 3 else "")


def preprocess(
    inputs: Sequence[str | Path],
    tokenizer: Tokenizer,
    out_path: str | Path,
    log: Log = print,
    *,
    workers: int | None = None,
    text_key: str = "text",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES,
    num_slices: int = 1,
    slice_index: int = 0,
    force: bool = False,
) -> ShardedStore:
    """Tokenise the documents of ``inputs`` into a sharded token store at ``out_path``; returns
    it opened (see the module docstring for the pipeline and the guarantees).

    ``workers``: tokenizer processes (None = the cores; 0 = in this process). Bad records are
    skipped, counted per reason and reported; documents that tokenise to nothing are dropped.
    With ``num_slices > 1`` only slice ``slice_index`` is written, under ``out_path``, and a
    slice already finished from the same inputs is kept as it is (a requeued array task).
    An existing store at the target is refused unless ``force``.
    """
    t0 = time.perf_counter()
    files = expand_inputs(inputs)
    if not files:
        raise UserError("no input files to preprocess")
    out = Path(out_path)
    sliced = num_slices > 1
    if sliced:
        files = slice_files(files, slice_index, num_slices)
        target = out / slice_name(slice_index, num_slices)
    else:
        target = out
    workers = default_workers() if workers is None else workers
    if workers < 0:
        raise UserError(f"--workers must be >= 0, got {workers}")
    tok_sha = tokenizer.digest  # the files that decide the ids (Tokenizer.digest)
    key = fingerprint(
        {
            "format": _FORMAT,
            "inputs": [file_stamp(p) for p in files],
            "tokenizer": tok_sha,
            "text_key": text_key,
            "max_doc_bytes": max_doc_bytes,
            "shard_tokens": shard_tokens,
        }
    )
    if target.exists():
        if sliced and is_sharded_store(target):
            done = ShardedStore(target)
            if done.meta.get("inputs_fingerprint") == key:
                log(f"{target} is already done (same inputs): kept")
                return done
        if not force:
            raise UserError(
                f"{target} already exists: remove it, pass --force to replace it, or choose "
                "another --out"
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    dtype = _DTYPES[_dtype_code(tokenizer.vocab_size)]
    counters = {"bytes": 0, "chars": 0}
    skipped = Skipped()
    empty = 0
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        writer = ShardWriter(tmp, tokenizer.vocab_size, tokenizer.eod_id, shard_tokens)
        try:
            batches = _batches(files, text_key, skipped, max_doc_bytes, counters)
            # closing: on a failure here the worker pool shuts down now, not at garbage collection
            with closing(_encoded(batches, tokenizer, dtype, text_key, workers)) as encoded:
                for (tokens, lengths, chars, bad), read_skips in encoded:
                    counters["chars"] += chars
                    skipped.update(read_skips)
                    skipped.update(bad)
                    keep = lengths > 0
                    empty += int(lengths.size - keep.sum())
                    writer.add(tokens, lengths[keep])
            shards = writer.finish()
        except BaseException:
            writer.abort()
            raise
        n_docs = sum(s["n_docs"] for s in shards)
        n_tokens = sum(s["n_tokens"] for s in shards)
        if n_tokens == 0 and not sliced:
            why = skipped.summary() if skipped.total else "the corpus is empty"
            raise UserError(f"no text to tokenise in {_names(files)}: {why}")
        seconds = time.perf_counter() - t0
        stats = {
            "input_files": len(files),
            "input_bytes": counters["bytes"],
            "chars": counters["chars"],
            "documents": n_docs,
            "tokens": n_tokens,
            "empty_documents": empty,
            "skipped": skipped.as_dict(),
            "seconds": round(seconds, 3),
            "workers": workers,
        }
        meta = index_entry(
            shards,
            tokenizer.vocab_size,
            tokenizer.eod_id,
            tokenizer={"path": str(tokenizer.path), "sha256": tok_sha},
            text_key=text_key,
            inputs_fingerprint=key,
            stats=stats,
        )
        keep_tokenizer(tokenizer, tmp)
        write_json_atomic(tmp / INDEX_NAME, meta)
        _publish(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    store = ShardedStore(target)
    mb = counters["bytes"] / 1e6
    ratio = n_tokens / max(counters["chars"], 1)
    what = f"slice {slice_index} of {num_slices}: " if sliced else ""
    log(
        f"{what}tokenised {len(files)} file(s), {mb:.1f} MB: {n_docs} documents, {n_tokens} "
        f"tokens ({ratio:.3f} tokens/char) in {seconds:.1f} s ({mb / seconds:.2f} MB/s, "
        f"{n_tokens / seconds:,.0f} tokens/s, {workers} workers) -> {target}"
        + (f" ({empty} empty documents skipped)" if empty else "")
    )
    if skipped.total:
        log(skipped.summary())
    return store


def keep_tokenizer(tokenizer: Tokenizer, folder: Path) -> None:
    """Copy the tokenizer's files into a store folder (``tokenizer.model``, or a ``tokenizer/``
    folder for an HF one), so that training on the store can use it without data.tokenizer and
    keep it in its run folder."""
    for name, src in tokenizer.files.items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)


def _copy_kept_tokenizer(src: Path, dest: Path) -> None:
    from evoformer.data.tokenizer import HF_DIR, SP_FILE  # (tokenizer imports this module)

    for name in (SP_FILE, HF_DIR):
        if (src / name).is_file():
            shutil.copyfile(src / name, dest / name)
        elif (src / name).is_dir():
            shutil.copytree(src / name, dest / name, dirs_exist_ok=True)


def merge_slices(
    out_path: str | Path, log: Log = print, num_slices: int | None = None
) -> ShardedStore:
    """Write ``out/index.json`` over the slices under ``out`` (all of them must be finished and
    made with the same tokenizer); returns the merged store. No token is copied."""
    out = Path(out_path)
    if not out.is_dir():
        raise UserError(f"nothing to merge: {out} is not a folder")
    found: dict[int, Path] = {}
    counts: set[int] = set()
    for child in sorted(out.iterdir()):
        m = _SLICE_RE.fullmatch(child.name)
        if m and child.is_dir():
            found[int(m[1])] = child
            counts.add(int(m[2]))
    if not found:
        raise UserError(f"nothing to merge: no slice-*-of-* folders in {out}")
    if len(counts) > 1:
        raise UserError(f"{out} mixes slices of different --num-slices: {sorted(counts)}")
    n = counts.pop()
    if num_slices is not None and num_slices != n:
        raise UserError(f"--num-slices {num_slices} but the slices in {out} are of {n}")
    missing = [i for i in range(n) if i not in found]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise UserError(f"cannot merge {out}: {len(missing)} of {n} slices not finished ({shown})")
    slices = [ShardedStore(found[i]) for i in range(n)]
    first = slices[0].meta
    for s in slices[1:]:
        if (s.vocab_size, s.eod_id, s.meta["tokenizer"]["sha256"]) != (
            slices[0].vocab_size,
            slices[0].eod_id,
            first["tokenizer"]["sha256"],
        ):
            raise UserError(f"cannot merge {out}: {s.path.name} used a different tokenizer")
    shards = [
        {**entry, "path": f"{s.path.name}/{entry['path']}"}
        for s in slices
        for entry in s.meta["shards"]
    ]
    if not sum(e["n_tokens"] for e in shards):
        raise UserError(f"cannot merge {out}: the slices hold no tokens (the corpus is empty)")
    skipped: dict[str, int] = {}
    for s in slices:
        for reason, k in s.meta["stats"]["skipped"]["counts"].items():
            skipped[reason] = skipped.get(reason, 0) + k
    total = {
        k: sum(s.meta["stats"][k] for s in slices)
        for k in ("input_files", "input_bytes", "chars", "documents", "tokens", "empty_documents")
    }
    meta = index_entry(
        shards,
        slices[0].vocab_size,
        slices[0].eod_id,
        tokenizer=first["tokenizer"],
        text_key=first.get("text_key"),
        slices=n,
        stats={
            **total,
            "skipped": {"counts": skipped},
            "task_seconds": sum(s.meta["stats"]["seconds"] for s in slices),
        },
    )
    _copy_kept_tokenizer(slices[0].path, out)
    write_json_atomic(out / INDEX_NAME, meta)
    store = ShardedStore(out)
    log(
        f"merged {n} slices -> {out}: {store.n_docs} documents, {store.n_tokens} tokens in "
        f"{len(shards)} shards" + (f"; skipped records {skipped}" if skipped else "")
    )
    return store
