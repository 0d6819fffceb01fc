"""Megatron .bin/.idx corpora: read as documents, through build_datasets, corruption caught."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from evoformer.config.schema import DataConfig
from evoformer.data import MegatronStore, PackedDataset, Tokenizer, build_datasets
from evoformer.errors import UserError

_CODES = {"uint8": 1, "int16": 3, "int32": 4, "int64": 5, "uint16": 8}


def write_mmidx(prefix: Path, docs: list[list[list[int]]], dtype: str = "uint16") -> Path:
    """A Megatron corpus written by hand from the format description: each document is a list
    of sequences (sentences), as Megatron's --split-sentences writes them."""
    dt = np.dtype(dtype).newbyteorder("<")
    lengths, doc_index, chunks = [], [0], []
    for doc in docs:
        for seq in doc:
            lengths.append(len(seq))
            chunks.append(np.asarray(seq, dtype=dt).tobytes())
        doc_index.append(len(lengths))
    pointers = np.concatenate([[0], np.cumsum(lengths)[:-1]]) * dt.itemsize if lengths else []
    prefix.with_suffix(".bin").write_bytes(b"".join(chunks))
    with open(prefix.with_suffix(".idx"), "wb") as fh:
        fh.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", _CODES[dtype]))
        fh.write(struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(doc_index)))
        fh.write(np.asarray(lengths, dtype="<i4").tobytes())
        fh.write(np.asarray(pointers, dtype="<i8").tobytes())
        fh.write(np.asarray(doc_index, dtype="<i8").tobytes())
    return prefix


def _docs(rng: np.random.Generator, n: int, vocab: int) -> list[list[list[int]]]:
    return [
        [rng.integers(3, vocab, size=int(rng.integers(1, 40))).tolist() for _ in range(k)]
        for k in rng.integers(1, 4, size=n)
    ]


@pytest.mark.parametrize("dtype", ["uint16", "int32"])
def test_tokens_read_equal_tokens_written(tmp_path: Path, dtype: str) -> None:
    docs = _docs(np.random.default_rng(0), 50, 1000)
    prefix = write_mmidx(tmp_path / "corpus_text_document", docs, dtype)
    store = MegatronStore(prefix, vocab_size=1000, eod_id=2)
    assert store.n_docs == 50 and store.dtype == np.dtype(dtype)
    assert store.n_tokens == sum(len(s) for d in docs for s in d)
    for i, doc in enumerate(docs):
        assert store.doc(i).tolist() == [t for seq in doc for t in seq]
    np.testing.assert_array_equal(store.doc_lengths(), [sum(map(len, d)) for d in docs])


def test_build_datasets_reads_megatron_prefixes(tmp_path: Path, small_tokenizer: Tokenizer) -> None:
    docs = _docs(np.random.default_rng(1), 80, small_tokenizer.vocab_size)
    prefix = write_mmidx(tmp_path / "mega", docs)
    flat = [[t for seq in d for t in seq] for d in docs]
    eod = small_tokenizer.eod_id
    stream = np.concatenate([np.append(np.asarray(d), eod) for d in flat])
    for name in (prefix, prefix.with_suffix(".bin"), prefix.with_suffix(".idx")):
        cfg = DataConfig(
            source="files", paths=[str(name)], tokenizer=str(small_tokenizer.path), val_fraction=0
        )
        bundle = build_datasets(cfg, seq_len=16, seed=0, vocab_size=1024, log=lambda _: None)
        assert isinstance(bundle.train, PackedDataset)
        assert len(bundle.train) == (len(stream) - 1) // 16
        for i in (0, 5, len(bundle.train) - 1):
            np.testing.assert_array_equal(bundle.train[i].numpy(), stream[i * 16 : i * 16 + 17])
    no_tok = DataConfig(source="files", paths=[str(prefix)], val_fraction=0)
    with pytest.raises(UserError, match="Megatron corpus .*mega needs data.tokenizer"):
        build_datasets(no_tok, seq_len=16, seed=0, vocab_size=1024, log=lambda _: None)


def test_a_mismatched_index_is_one_clear_line(tmp_path: Path) -> None:
    prefix = write_mmidx(tmp_path / "m", _docs(np.random.default_rng(2), 10, 500))
    idx, bin_ = prefix.with_suffix(".idx"), prefix.with_suffix(".bin")
    good_idx, good_bin = idx.read_bytes(), bin_.read_bytes()

    def opens() -> None:
        MegatronStore(prefix, 500, 2)

    bin_.write_bytes(good_bin[:-2])
    with pytest.raises(UserError, match=r"m\.idx does not match .*m\.bin: the index describes"):
        opens()
    bin_.write_bytes(good_bin + b"\0\0")
    with pytest.raises(UserError, match="does not match"):
        opens()
    bin_.write_bytes(good_bin)
    idx.write_bytes(good_idx[:-8])
    with pytest.raises(UserError, match=r"m\.idx is truncated or corrupt: .* need \d+ bytes"):
        opens()
    idx.write_bytes(good_idx[:20])
    with pytest.raises(UserError, match="truncated"):
        opens()
    idx.write_bytes(b"NOTMEGA!!" + good_idx[9:])
    with pytest.raises(UserError, match="not a Megatron MMIDIDX index"):
        opens()
    idx.write_bytes(good_idx[:17] + struct.pack("<B", 7) + good_idx[18:])
    with pytest.raises(UserError, match="dtype code 7 is not an integer token type"):
        opens()
    bin_.unlink()
    idx.write_bytes(good_idx)
    with pytest.raises(UserError, match=r"m\.bin not found"):
        opens()


def test_megatron_core_writes_what_we_read(tmp_path: Path) -> None:
    """Cross-check against megatron-core's own builder, where it is installed."""
    indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    import torch

    docs = _docs(np.random.default_rng(3), 30, 30000)
    prefix = str(tmp_path / "mc")
    builder = indexed.IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for doc in docs:
        for seq in doc:
            builder.add_item(torch.tensor(seq))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    store = MegatronStore(prefix, vocab_size=32000, eod_id=2)
    assert store.n_docs == 30
    for i, doc in enumerate(docs):
        assert store.doc(i).tolist() == [t for seq in doc for t in seq]
