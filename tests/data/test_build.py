from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from evoformer.config.schema import DataConfig
from evoformer.data import (
    ConcatDataset,
    PackedDataset,
    SyntheticDataset,
    Tokenizer,
    TokenStore,
    build_datasets,
    corpus,
    write_token_store,
)
from evoformer.errors import UserError


def _build(cfg: DataConfig, vocab: int = 1024, seq_len: int = 32, logs: list[str] | None = None):
    return build_datasets(
        cfg,
        seq_len=seq_len,
        seed=11,
        vocab_size=vocab,
        log=logs.append if logs is not None else lambda _: None,
    )


def test_synthetic() -> None:
    bundle = _build(DataConfig(source="synthetic"), vocab=300, seq_len=16)
    assert isinstance(bundle.train, SyntheticDataset) and isinstance(bundle.val, SyntheticDataset)
    assert bundle.tokenizer is None
    assert bundle.train.vocab_size == 300 and bundle.train[0].shape == (17,)
    assert torch.equal(bundle.train[5], SyntheticDataset(300, 16, 11)[5])
    assert not torch.equal(bundle.train[0], bundle.val[0])


def test_unknown_source() -> None:
    with pytest.raises(UserError, match=r"unknown data.source 'web' \(expected default"):
        _build(DataConfig(source="web"))


def test_default(monkeypatch: pytest.MonkeyPatch, small_corpus: list[Path], tmp_path: Path) -> None:
    monkeypatch.setattr(corpus, "default_corpus_files", lambda: list(small_corpus))
    cfg = DataConfig(source="default", tokenizer_vocab_size=512, cache_dir=str(tmp_path))
    bundle = _build(cfg, vocab=1024, seq_len=64)
    assert isinstance(bundle.train, PackedDataset) and isinstance(bundle.val, PackedDataset)
    assert bundle.tokenizer is not None and bundle.tokenizer.vocab_size == 512
    window = bundle.train[0]
    assert window.shape == (65,) and int(window.max()) < 512
    texts = [p.read_text(encoding="utf-8") for p in small_corpus]
    first_doc = bundle.tokenizer.decode(bundle.train.store.doc(0))
    assert first_doc in texts
    # the first window is the start of the first training document
    assert (
        bundle.tokenizer.decode(window[:-1])
        == first_doc[: len(bundle.tokenizer.decode(window[:-1]))]
    )
    assert len(bundle.train) == (bundle.train.stream_len - 1) // 64

    with pytest.raises(UserError, match=r"tokenizer has 512 tokens but model\.vocab_size is 300"):
        _build(cfg, vocab=300)
    no_val = DataConfig(
        source="default", tokenizer_vocab_size=512, cache_dir=str(tmp_path), val_fraction=0.0
    )
    assert _build(no_val).val is None


def _text_files(tmp_path: Path, n: int = 30) -> list[Path]:
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "x", "value", "class", "import", "for", "in", "if"]
    txt = []
    for i in range(n):
        body = "\n".join(" ".join(rng.choice(words, size=8)) for _ in range(10)) + f"\n# {i}\n"
        path = tmp_path / f"doc{i}.txt"
        path.write_text(body, encoding="utf-8")
        txt.append(path)
    return txt


def test_files_text_and_jsonl(tmp_path: Path, small_tokenizer: Tokenizer) -> None:
    txt = _text_files(tmp_path)
    jl = tmp_path / "extra.jsonl"
    jl.write_text("".join(json.dumps({"text": f"print({i})\n" * 20}) + "\n" for i in range(10)))
    cfg = DataConfig(
        source="files",
        paths=[str(p) for p in txt] + [str(jl)],
        tokenizer=str(small_tokenizer.path),
        val_fraction=0.2,
        cache_dir=str(tmp_path / "cache"),
    )
    logs: list[str] = []
    bundle = _build(cfg, logs=logs)
    assert bundle.tokenizer is not None and bundle.tokenizer.path == small_tokenizer.path
    assert any("tokenising 31 file(s) of data.paths" in m for m in logs)
    train, val = bundle.train, bundle.val
    assert isinstance(train, PackedDataset) and isinstance(val, PackedDataset)
    assert train.store.path == val.store.path and train.store.n_docs == 40
    # whole documents are held out: disjoint, together all 40
    assert train.n_docs + val.n_docs == 40 and val.n_docs >= 1
    assert train.n_tokens + val.n_tokens == train.store.n_tokens

    # second build: the tokenised store comes from the cache and the split is identical
    logs2: list[str] = []
    again = _build(cfg, logs=logs2)
    assert not any("tokenising" in m for m in logs2)
    assert torch.equal(again.val[0], val[0]) and len(again.train) == len(train)


def test_files_token_stores_and_val_paths(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    docs = [rng.integers(3, 500, size=50).tolist() for _ in range(20)]
    a = write_token_store(tmp_path / "a.tok", docs[:10], 500, eod_id=2)
    # a token store is recognised by its magic bytes, whatever its extension
    b = write_token_store(tmp_path / "b.bin", docs[10:], 500, eod_id=2)
    v = write_token_store(tmp_path / "v.tok", docs[:3], 500, eod_id=2)
    cfg = DataConfig(source="files", paths=[str(a), str(b)], val_paths=[str(v)])
    bundle = _build(cfg, vocab=512, seq_len=16)
    assert isinstance(bundle.train, ConcatDataset) and isinstance(bundle.val, PackedDataset)
    assert bundle.tokenizer is None
    n_a = (TokenStore(a).n_tokens + 10 - 1) // 16
    assert len(bundle.train) == n_a + (TokenStore(b).n_tokens + 10 - 1) // 16
    np.testing.assert_array_equal(bundle.train[0].numpy()[:16], docs[0][:16])
    np.testing.assert_array_equal(bundle.train[n_a].numpy()[:16], docs[10][:16])
    np.testing.assert_array_equal(bundle.val[0].numpy()[:16], docs[0][:16])

    with pytest.raises(
        UserError, match=r"token store .*a.tok has 500 tokens but model.vocab_size is 400"
    ):
        _build(cfg, vocab=400)


def test_files_errors(tmp_path: Path, small_tokenizer: Tokenizer) -> None:
    txt = _text_files(tmp_path, 3)
    with pytest.raises(UserError, match=r"data.source=files with text files needs data.tokenizer"):
        _build(DataConfig(source="files", paths=[str(txt[0])]))
    with pytest.raises(UserError, match=r"data.paths: file .*nope.txt not found"):
        _build(DataConfig(source="files", paths=[str(tmp_path / "nope.txt")]))
    with pytest.raises(UserError, match=r"needs data\.paths"):
        _build(DataConfig(source="files"))
    with pytest.raises(
        UserError, match=r"tokenizer .* has 1024 tokens but model\.vocab_size is 512"
    ):
        _build(
            DataConfig(source="files", paths=[str(txt[0])], tokenizer=str(small_tokenizer.path)),
            vocab=512,
        )
    other = write_token_store(tmp_path / "o.tok", [[1, 2, 3]], 700, eod_id=2)
    with pytest.raises(UserError, match="was made with a 700-token vocabulary"):
        _build(DataConfig(source="files", paths=[str(other)], tokenizer=str(small_tokenizer.path)))
