"""`evoformer preprocess` at scale: workers, shards, atomicity, slices + merge, and the sharded
store read through build_datasets."""

from __future__ import annotations

import gzip
import importlib
import json
from pathlib import Path

import numpy as np
import pytest

from evoformer.config.schema import DataConfig
from evoformer.data import (
    PackedDataset,
    ShardedStore,
    Skipped,
    Tokenizer,
    build_datasets,
    merge_slices,
    preprocess,
)
from evoformer.data.commands import preprocess_main
from evoformer.data.sharded import ShardWriter
from evoformer.errors import UserError

# the module, not the function the package re-exports under the same name
preprocess_module = importlib.import_module("evoformer.data.preprocess")


def _corpus(folder: Path, small_corpus: list[Path]) -> list[str]:
    """A mixed-format corpus of the small stdlib slice; returns its documents in read order."""
    folder.mkdir()
    texts = [p.read_text(encoding="utf-8") for p in small_corpus[:12]]
    rows = [{"text": t} for t in texts[:6]]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    (folder / "a.jsonl.gz").write_bytes(gzip.compress(data))
    for i, t in enumerate(texts[6:]):
        (folder / f"b{i}.py").write_text(t, encoding="utf-8")
    return texts


def _quiet(_: str) -> None:
    pass


def _tokens_of(store) -> list[list[int]]:
    return [store.doc(i).tolist() for i in range(store.n_docs)]


def _files(store_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(store_dir.glob("shard-*.tok"))}


def test_store_matches_the_tokenizer_and_is_the_same_for_any_worker_count(
    tmp_path: Path, small_corpus: list[Path], small_tokenizer: Tokenizer
) -> None:
    texts = _corpus(tmp_path / "in", small_corpus)
    logs: list[str] = []
    kw = {"shard_tokens": 20_000, "log": logs.append}
    one = preprocess([tmp_path / "in"], small_tokenizer, tmp_path / "w1", workers=1, **kw)
    two = preprocess([tmp_path / "in"], small_tokenizer, tmp_path / "w2", workers=2, **kw)
    preprocess([tmp_path / "in"], small_tokenizer, tmp_path / "w0", workers=0, **kw)
    assert len(one.shards) >= 3  # several shards, so their boundaries are compared too
    assert _files(tmp_path / "w1") == _files(tmp_path / "w2") == _files(tmp_path / "w0")
    assert one.meta["shards"] == two.meta["shards"]
    assert _tokens_of(one) == [small_tokenizer.encode(t) for t in texts]
    assert one.n_tokens == sum(len(small_tokenizer.encode(t)) for t in texts)
    assert one.meta["stats"]["documents"] == 12 and one.meta["stats"]["workers"] == 1
    assert "2 workers" in logs[1] and "MB/s" in logs[1]
    # the multi-shard view: a window across a shard boundary reads both shards
    boundary = int(np.cumsum([s.n_tokens for s in one.shards])[0])
    ids = np.arange(boundary - 3, boundary + 3)
    flat = np.concatenate([one.doc(i) for i in range(one.n_docs)])
    np.testing.assert_array_equal(one.tokens[ids], flat[ids])
    np.testing.assert_array_equal(one.tokens[5:40], flat[5:40])


def test_skipped_records_are_reported_not_fatal(tmp_path: Path, small_tokenizer: Tokenizer) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(
        b'{"text": "a = 1"}\n{"text": oops}\n{"body": 2}\n{"text": "b = 2"}\n{"text": 3}\n'
        b'{"text": "\xff"}\n{"text": ""}\n'
    )
    logs: list[str] = []
    store = preprocess([path], small_tokenizer, tmp_path / "out", log=logs.append, workers=0)
    assert store.n_docs == 2
    skipped = store.meta["stats"]["skipped"]["counts"]
    assert skipped == {
        "invalid JSON": 1,
        'missing key "text"': 1,
        "non-string text": 1,
        "invalid UTF-8": 1,
    }
    assert store.meta["stats"]["empty_documents"] == 1
    assert logs[1].startswith("skipped 4 records: ") and f"{path}:2" in logs[1]


def test_bad_inputs_give_one_line_and_write_nothing(
    tmp_path: Path, small_tokenizer: Tokenizer
) -> None:
    out = tmp_path / "out"
    with pytest.raises(UserError, match="matches no files"):
        preprocess([str(tmp_path / "*.jsonl")], small_tokenizer, out, log=_quiet)
    nokey = tmp_path / "nokey.jsonl"
    nokey.write_text('{"content": "x"}\n' * 3)
    with pytest.raises(UserError, match=r'no text to tokenise .*missing key "text" 3'):
        preprocess([nokey], small_tokenizer, out, log=_quiet, workers=0)
    assert not out.exists() and list(tmp_path.glob(".out*")) == []


def _fail_after(monkeypatch: pytest.MonkeyPatch, calls: int, exc: BaseException) -> None:
    real = ShardWriter.add
    seen = {"n": 0}

    def add(self, tokens, lengths):
        seen["n"] += 1
        if seen["n"] > calls:
            raise exc
        real(self, tokens, lengths)

    monkeypatch.setattr(ShardWriter, "add", add)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_failure_mid_run_leaves_no_store_and_keeps_the_old_one(
    tmp_path: Path,
    small_corpus: list[Path],
    small_tokenizer: Tokenizer,
    monkeypatch: pytest.MonkeyPatch,
    workers: int,
) -> None:
    _corpus(tmp_path / "in", small_corpus)
    monkeypatch.setattr(preprocess_module, "_BATCH_DOCS", 2)  # several batches in flight
    fresh = tmp_path / "fresh"
    _fail_after(monkeypatch, 2, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        preprocess(
            [tmp_path / "in"],
            small_tokenizer,
            fresh,
            log=_quiet,
            workers=workers,
            shard_tokens=5_000,
        )
    assert not fresh.exists() and list(tmp_path.glob(".fresh*")) == []
    monkeypatch.undo()
    old = tmp_path / "old"
    preprocess([small_corpus[0]], small_tokenizer, old, log=_quiet, workers=0)
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    monkeypatch.setattr(preprocess_module, "_BATCH_DOCS", 2)
    _fail_after(monkeypatch, 1, RuntimeError("disk full"))
    with pytest.raises(RuntimeError, match="disk full"):
        preprocess([tmp_path / "in"], small_tokenizer, old, log=_quiet, workers=workers, force=True)
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before
    assert list(tmp_path.glob(".old*")) == []
    # and without --force an existing store is refused up front
    with pytest.raises(UserError, match="already exists"):
        preprocess([tmp_path / "in"], small_tokenizer, old, log=_quiet, workers=0)


def test_slices_and_merge_equal_one_run(
    tmp_path: Path, small_corpus: list[Path], small_tokenizer: Tokenizer
) -> None:
    texts = _corpus(tmp_path / "in", small_corpus)
    whole = preprocess(
        [tmp_path / "in"], small_tokenizer, tmp_path / "whole", log=_quiet, workers=0
    )
    out = tmp_path / "sliced"
    logs: list[str] = []
    for i in (2, 0):
        preprocess(
            [tmp_path / "in"],
            small_tokenizer,
            out,
            log=logs.append,
            workers=0,
            num_slices=3,
            slice_index=i,
        )
    with pytest.raises(UserError, match="not a complete token store"):
        ShardedStore(out)
    with pytest.raises(UserError, match=r"1 of 3 slices not finished \(1\)"):
        merge_slices(out, log=_quiet)
    argv = [str(tmp_path / "in"), "--tokenizer", str(small_tokenizer.path), "--out", str(out)]
    assert (
        preprocess_main([*argv, "--workers", "0", "--num-slices", "3", "--slice-index", "1"]) == 0
    )
    # a requeued task whose slice is finished keeps it
    preprocess(
        [tmp_path / "in"], small_tokenizer, out, log=logs.append, num_slices=3, slice_index=0
    )
    assert "already done" in logs[-1]
    assert preprocess_main(["--merge", "--out", str(out)]) == 0
    merged = ShardedStore(out)
    assert merged.meta["slices"] == 3 and len(merged.shards) == 3
    assert _tokens_of(merged) == _tokens_of(whole) == [small_tokenizer.encode(t) for t in texts]
    assert merged.meta["stats"]["documents"] == 12
    np.testing.assert_array_equal(merged.offsets, whole.offsets)


def test_corrupt_sharded_store(
    tmp_path: Path, small_corpus: list[Path], small_tokenizer: Tokenizer
) -> None:
    _corpus(tmp_path / "in", small_corpus)
    out = tmp_path / "s"
    preprocess([tmp_path / "in"], small_tokenizer, out, log=_quiet, workers=0, shard_tokens=20_000)
    shard = out / "shard-00001.tok"
    data = shard.read_bytes()
    shard.write_bytes(data[:-8])
    with pytest.raises(UserError, match=r"shard-00001\.tok is truncated or corrupt"):
        ShardedStore(out)
    shard.write_bytes(b"")
    with pytest.raises(UserError, match=r"shard-00001\.tok is not an evoformer token store"):
        ShardedStore(out)
    shard.write_bytes(data)
    index = json.loads((out / "index.json").read_text())
    index["shards"][0]["n_docs"] += 1
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="is inconsistent: shard shard-00000.tok holds"):
        ShardedStore(out)
    (out / "index.json").write_text("{not json")
    with pytest.raises(UserError, match="index .* is corrupt"):
        ShardedStore(out)


def test_build_datasets_reads_a_sharded_store(
    tmp_path: Path, small_corpus: list[Path], small_tokenizer: Tokenizer
) -> None:
    _corpus(tmp_path / "in", small_corpus)
    out = tmp_path / "store"
    store = preprocess(
        [tmp_path / "in"], small_tokenizer, out, log=_quiet, workers=0, shard_tokens=20_000
    )
    assert len(store.shards) >= 3
    cfg = DataConfig(source="files", paths=[str(out)], val_fraction=0.0)
    bundle = build_datasets(cfg, seq_len=64, seed=0, vocab_size=1024, log=_quiet)
    assert isinstance(bundle.train, PackedDataset)
    eod = small_tokenizer.eod_id
    stream = np.concatenate([np.append(store.doc(i), eod) for i in range(store.n_docs)])
    assert len(bundle.train) == (len(stream) - 1) // 64
    for i in (0, 7, len(bundle.train) - 1):
        np.testing.assert_array_equal(bundle.train[i].numpy(), stream[i * 64 : i * 64 + 65])
    split = build_datasets(
        DataConfig(source="files", paths=[str(out)], val_fraction=0.2),
        seq_len=64,
        seed=0,
        vocab_size=1024,
        log=_quiet,
    )
    assert split.val is not None and split.train.n_tokens + split.val.n_tokens == store.n_tokens
    with pytest.raises(UserError, match="has 1024 tokens but model.vocab_size is 512"):
        build_datasets(cfg, seq_len=64, seed=0, vocab_size=512, log=_quiet)
    (out / "index.json").unlink()
    with pytest.raises(UserError, match="not a complete token store"):
        build_datasets(cfg, seq_len=64, seed=0, vocab_size=1024, log=_quiet)


def test_the_pipeline_reads_only_a_bounded_window_ahead(small_tokenizer: Tokenizer) -> None:
    """Structure, not RSS: with an endless input, the first encoded batch comes back after
    only the in-flight window (3 batches per worker) has been read, in input order."""
    pulled = {"n": 0}

    def endless():
        while True:
            pulled["n"] += 1
            yield [("mem", "utf8", 0, f"x = {pulled['n']}".encode())], Skipped()

    dtype = np.dtype("<u2")
    pipeline = preprocess_module._encoded(endless(), small_tokenizer, dtype, "text", workers=2)
    with preprocess_module.closing(pipeline) as encoded:
        (first_tokens, first_lengths, chars, _), _ = next(encoded)
        assert pulled["n"] == 6 and chars == 5
        (second_tokens, *_), _ = next(encoded)
        assert pulled["n"] == 7
    assert first_tokens.tolist() == small_tokenizer.encode("x = 1")
    assert second_tokens.tolist() == small_tokenizer.encode("x = 2")
    assert first_lengths.tolist() == [len(first_tokens)]


def test_every_format_through_the_workers(tmp_path: Path, small_tokenizer: Tokenizer) -> None:
    """Parquet values, zstd and gzip lines and text files, decoded in a worker process."""
    from tests.data.test_readers import DOCS, _write_all_formats

    (tmp_path / "in").mkdir()
    _write_all_formats(tmp_path / "in")
    (tmp_path / "in" / "e.txt").write_text(DOCS[0], encoding="utf-8")
    store = preprocess([tmp_path / "in"], small_tokenizer, tmp_path / "o", log=_quiet, workers=1)
    kept = [d for d in DOCS if d]  # the empty document tokenises to nothing and is dropped
    assert _tokens_of(store) == [small_tokenizer.encode(d) for d in kept * 4 + [DOCS[0]]]
    assert store.meta["stats"]["empty_documents"] == 4
