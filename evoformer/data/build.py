"""From a DataConfig to train/val datasets: the one entry point the trainer calls."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evoformer.config.schema import DataConfig
from evoformer.data._common import (
    Log,
    cache_root,
    digest,
    file_stamp,
    fingerprint,
    held_out_mask,
    locked,
)
from evoformer.data.corpus import prepare_default_corpus
from evoformer.data.dataset import ConcatDataset, PackedDataset, SyntheticDataset, WindowDataset
from evoformer.data.megatron import MegatronStore, megatron_prefix
from evoformer.data.preprocess import default_workers, preprocess
from evoformer.data.sharded import ShardedStore, is_sharded_store
from evoformer.data.store import DocumentStore, TokenStore, is_token_store
from evoformer.data.tokenizer import Tokenizer, load_tokenizer
from evoformer.errors import UserError

# Bump when preprocessing output changes so stale cached stores are not reused.
_FILES_CACHE_VERSION = 3
# Text inputs below this size are tokenised in the calling process (see _preprocess_workers).
_IN_PROCESS_BYTES = 32 << 20
# Validation windows of the synthetic source: plenty for any eval_batches setting.
_SYNTHETIC_VAL_LEN = 1 << 16


@dataclass
class DataBundle:
    """What the trainer gets: the datasets and, for real text, the tokenizer.

    With ``data.weights`` (a blend) ``train`` is the sources laid end to end (``ConcatDataset``,
    in ``data.paths`` order) and ``sources`` names them, with their share and, when documents
    are held out of each, their own validation windows."""

    train: WindowDataset
    val: WindowDataset | None
    tokenizer: Tokenizer | None
    sources: list[Source] = field(default_factory=list)


@dataclass
class Source:
    """One source of a blend: a name for the metrics, its weight, train samples and val set."""

    name: str
    weight: float
    samples: int
    val: WindowDataset | None


def _check_vocab(what: str, vocab: int, model_vocab: int) -> None:
    if vocab > model_vocab:
        raise UserError(
            f"{what} has {vocab} tokens but model.vocab_size is {model_vocab}: set "
            f"model.vocab_size={vocab} (or more, e.g. a multiple of 128), or use a tokenizer of "
            f"at most {model_vocab} tokens"
        )


def build_datasets(
    cfg: DataConfig, seq_len: int, seed: int, vocab_size: int, log: Log = print
) -> DataBundle:
    """Build the datasets ``cfg`` describes, as windows of ``seq_len + 1`` tokens.

    ``vocab_size`` is the model's; a tokenizer or token store with more ids is refused.
    ``seed`` only seeds synthetic data (the sampler owns the order of real data).
    """
    if cfg.source == "synthetic":
        return DataBundle(
            train=SyntheticDataset(vocab_size, seq_len, seed),
            # a different seed, so validation never repeats a training sample
            val=SyntheticDataset(vocab_size, seq_len, seed + 1, length=_SYNTHETIC_VAL_LEN),
            tokenizer=None,
        )
    if cfg.source == "default":
        return _build_default(cfg, seq_len, vocab_size, log)
    if cfg.source == "files":
        return _build_files(cfg, seq_len, vocab_size, log)
    raise UserError(f"unknown data.source {cfg.source!r} (expected default | files | synthetic)")


def _build_default(cfg: DataConfig, seq_len: int, vocab_size: int, log: Log) -> DataBundle:
    if cfg.tokenizer is None:
        # fail before spending time training a tokenizer the model cannot use
        _check_vocab("the tokenizer", cfg.tokenizer_vocab_size, vocab_size)
    else:
        given = load_tokenizer(cfg.tokenizer, cfg.eod_id)
        _check_vocab(f"tokenizer {cfg.tokenizer}", given.vocab_size, vocab_size)
    files = prepare_default_corpus(
        cfg.cache_dir,
        cfg.tokenizer_vocab_size,
        cfg.val_fraction,
        cfg.tokenizer,
        log=log,
        eod_id=cfg.eod_id,
    )
    tokenizer = load_tokenizer(files.tokenizer, cfg.eod_id)
    _check_vocab(f"tokenizer {files.tokenizer}", tokenizer.vocab_size, vocab_size)
    val_store = TokenStore(files.val)
    val = None
    if val_store.n_docs:
        try:
            val = PackedDataset(val_store, seq_len)
        except UserError as exc:
            raise UserError(f"{exc} (validation split: raise data.val_fraction)") from None
    return DataBundle(
        train=PackedDataset(TokenStore(files.train), seq_len), val=val, tokenizer=tokenizer
    )


def _preprocess_workers(texts: Sequence[Path]) -> int:
    """Worker processes for tokenising ``texts`` at first use: none (this process) for small
    inputs, where starting processes would cost more than it saves; else up to the cores."""
    total = sum(p.stat().st_size for p in texts)
    if total < _IN_PROCESS_BYTES:
        return 0
    return min(default_workers(), -(-total // _IN_PROCESS_BYTES))


def _open_one(path: Path, field: str, tokenizer: Tokenizer | None) -> DocumentStore | None:
    """The store ``path`` names (sharded folder, Megatron prefix/.bin/.idx, token-store file),
    or None for a text file to tokenise."""
    if path.is_dir():
        return ShardedStore(path)
    prefix = megatron_prefix(path)
    if prefix is not None:
        if tokenizer is None:
            raise UserError(
                f"{field}: Megatron corpus {prefix} needs data.tokenizer (the tokenizer it was "
                "made with: .bin/.idx files carry no vocabulary size or end-of-document id)"
            )
        return MegatronStore(prefix, tokenizer.vocab_size, tokenizer.eod_id)
    if not path.is_file():
        raise UserError(f"{field}: file {path} not found")
    if path.suffix == ".tok" or is_token_store(path):
        return TokenStore(path)
    return None


def _open_stores(
    paths: Sequence[str],
    field: str,
    tokenizer: Tokenizer | None,
    cfg: DataConfig,
    vocab_size: int,
    log: Log,
) -> list[DocumentStore]:
    """Stores for ``paths``: sharded stores (folders written by `evoformer preprocess`), token
    stores (.tok, or any file with the store's magic bytes) and Megatron corpora as they are;
    all text/jsonl files tokenised together into one store cached under the cache root (keyed by
    the inputs and the tokenizer)."""
    stores: list[DocumentStore] = []
    texts: list[Path] = []
    for raw in paths:
        path = Path(raw)
        store = _open_one(path, field, tokenizer)
        if store is None:
            texts.append(path)
            continue
        _check_vocab(f"token store {path}", store.vocab_size, vocab_size)
        if tokenizer is not None and store.vocab_size != tokenizer.vocab_size:
            raise UserError(
                f"token store {path} was made with a {store.vocab_size}-token vocabulary but "
                f"data.tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens"
            )
        _check_store_tokenizer(path, store, tokenizer)
        stores.append(store)
    if texts:
        if tokenizer is None:
            raise UserError(
                "data.source=files with text files needs data.tokenizer "
                "(train one with `evoformer tokenizer train`)"
            )
        key = fingerprint(
            {
                "format": _FILES_CACHE_VERSION,
                "inputs": [file_stamp(p) for p in texts],
                "tokenizer": tokenizer.digest,
                "eod_id": tokenizer.eod_id,
            }
        )
        root = cache_root(cfg.cache_dir)
        out = root / f"files-{key}"
        if not is_sharded_store(out):
            with locked(root / f"files-{key}.lock", log, "tokenising data files"):
                if not is_sharded_store(out):  # another rank may have finished while we waited
                    log(f"tokenising {len(texts)} file(s) of {field} (first use)...")
                    workers = _preprocess_workers(texts)
                    # force: whatever is there is not a complete store, and we hold the lock
                    preprocess(texts, tokenizer, out, log=log, workers=workers, force=True)
        stores.append(ShardedStore(out))
    return stores


def _check_store_tokenizer(path: Path, store: DocumentStore, tokenizer: Tokenizer | None) -> None:
    """A store records the tokenizer that made it (its content hash): another one, even of the
    same vocabulary size, would train and generate with ids that mean other text."""
    made_by = getattr(store, "tokenizer_digest", None)
    if tokenizer is None or made_by is None or made_by == tokenizer.digest:
        return
    raise UserError(
        f"token store {path} was made with another tokenizer than data.tokenizer "
        f"{tokenizer.path} (content hash {made_by[:12]} vs {tokenizer.digest[:12]}): "
        "preprocess the corpus again with this tokenizer, or set data.tokenizer to the store's "
        f"own copy ({path}/tokenizer.model or {path}/tokenizer)"
    )


def store_tokenizer(stores: Sequence[DocumentStore], eod_id: int | None) -> Tokenizer | None:
    """The tokenizer kept in the first store that has one (`evoformer preprocess` copies it),
    for a run given no data.tokenizer: it trains, generates and is kept in the run folder."""
    for store in stores:
        kept = store.kept_tokenizer() if isinstance(store, ShardedStore) else None
        if kept is not None:
            return load_tokenizer(kept, eod_id if eod_id is not None else store.eod_id)
    return None


def _packed(store: DocumentStore, seq_len: int, doc_ids: np.ndarray | None) -> PackedDataset:
    # PackedDataset reads only the DocumentStore interface (tokens, offsets, ids, path)
    return PackedDataset(store, seq_len, doc_ids)


def _datasets(
    stores: Sequence[DocumentStore], seq_len: int, doc_ids: Sequence[np.ndarray | None]
) -> WindowDataset:
    if len(stores) == 1:
        return _packed(stores[0], seq_len, doc_ids[0])
    # With several files, one too short for a single window is skipped rather than fatal.
    parts, first_error = [], None
    for store, ids in zip(stores, doc_ids, strict=True):
        try:
            parts.append(_packed(store, seq_len, ids))
        except UserError as exc:
            first_error = first_error or exc
    if not parts:
        assert first_error is not None
        raise first_error
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)


def source_names(paths: Sequence[str]) -> list[str]:
    """Metric names of blend sources: each path's file name without its suffixes, made unique."""
    names: list[str] = []
    for raw in paths:
        name = Path(raw).name.split(".")[0] or "source"
        base, k = name, 2
        while name in names:
            name, k = f"{base}{k}", k + 1
        names.append(name)
    return names


def _build_blend(
    cfg: DataConfig, seq_len: int, vocab_size: int, tokenizer: Tokenizer | None, log: Log
) -> DataBundle:
    """``data.weights``: one source per path, each held out on its own (``Source.val``)."""
    if len(cfg.weights) != len(cfg.paths):
        raise UserError(
            f"data.weights has {len(cfg.weights)} entries but data.paths {len(cfg.paths)}"
        )
    train_parts, sources = [], []
    for raw, name, weight in zip(cfg.paths, source_names(cfg.paths), cfg.weights, strict=True):
        (store,) = _open_stores([raw], "data.paths", tokenizer, cfg, vocab_size, log)
        tokenizer = tokenizer or store_tokenizer([store], cfg.eod_id)
        train_ids = val_ids = None
        if not cfg.val_paths and cfg.val_fraction > 0:
            is_val = held_out_mask(
                [digest(store.doc(i).tobytes()) for i in range(store.n_docs)], cfg.val_fraction
            )
            train_ids, val_ids = np.flatnonzero(~is_val), np.flatnonzero(is_val)
        try:
            train = PackedDataset(store, seq_len, train_ids)
        except UserError as exc:
            raise UserError(f"data.paths source {raw}: {exc}") from None
        val = None
        if val_ids is not None and val_ids.size:
            try:
                val = PackedDataset(store, seq_len, val_ids)
            except UserError:
                val = None  # too little held out for one window: no per-source val loss
        train_parts.append(train)
        sources.append(Source(name, float(weight), len(train), val))
    vals = [s.val for s in sources if s.val is not None]
    val: WindowDataset | None = (
        (vals[0] if len(vals) == 1 else ConcatDataset(vals)) if vals else None
    )
    if cfg.val_paths:
        val_stores = _open_stores(cfg.val_paths, "data.val_paths", tokenizer, cfg, vocab_size, log)
        val = _datasets(val_stores, seq_len, [None] * len(val_stores))
    total = sum(cfg.weights)
    log(
        "blending "
        + ", ".join(f"{s.name} {s.weight / total:.0%} ({s.samples:,} windows)" for s in sources)
    )
    return DataBundle(ConcatDataset(train_parts), val, tokenizer, sources)


def _build_files(cfg: DataConfig, seq_len: int, vocab_size: int, log: Log) -> DataBundle:
    if not cfg.paths:
        raise UserError(
            "data.source=files needs data.paths (text/.jsonl files, token stores from "
            "`evoformer preprocess`, or Megatron .bin/.idx corpora)"
        )
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.eod_id) if cfg.tokenizer else None
    if tokenizer is not None:
        _check_vocab(f"tokenizer {tokenizer.path}", tokenizer.vocab_size, vocab_size)
    if cfg.weights:
        return _build_blend(cfg, seq_len, vocab_size, tokenizer, log)
    train_stores = _open_stores(cfg.paths, "data.paths", tokenizer, cfg, vocab_size, log)
    tokenizer = tokenizer or store_tokenizer(train_stores, cfg.eod_id)
    if cfg.val_paths:
        val_stores = _open_stores(cfg.val_paths, "data.val_paths", tokenizer, cfg, vocab_size, log)
        return DataBundle(
            train=_datasets(train_stores, seq_len, [None] * len(train_stores)),
            val=_datasets(val_stores, seq_len, [None] * len(val_stores)),
            tokenizer=tokenizer,
        )
    if cfg.val_fraction <= 0:
        return DataBundle(
            train=_datasets(train_stores, seq_len, [None] * len(train_stores)),
            val=None,
            tokenizer=tokenizer,
        )
    # Hold out whole documents by a hash of their tokens, over all stores together.
    digests = [digest(s.doc(i).tobytes()) for s in train_stores for i in range(s.n_docs)]
    is_val = held_out_mask(digests, cfg.val_fraction)
    bounds = np.cumsum([0] + [s.n_docs for s in train_stores])
    train_ids, val_ids = [], []
    for k in range(len(train_stores)):
        mask = is_val[bounds[k] : bounds[k + 1]]
        train_ids.append(np.flatnonzero(~mask))
        val_ids.append(np.flatnonzero(mask))
    train_parts = [(s, ids) for s, ids in zip(train_stores, train_ids, strict=True) if ids.size]
    val_parts = [(s, ids) for s, ids in zip(train_stores, val_ids, strict=True) if ids.size]
    log(
        f"held out {int(is_val.sum())} of {len(digests)} documents for validation "
        f"(data.val_fraction={cfg.val_fraction})"
    )
    return DataBundle(
        train=_datasets([s for s, _ in train_parts], seq_len, [i for _, i in train_parts]),
        val=_datasets([s for s, _ in val_parts], seq_len, [i for _, i in val_parts]),
        tokenizer=tokenizer,
    )
