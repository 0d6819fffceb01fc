from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from evoformer.data import (
    ShardedStore,
    Tokenizer,
    commands,
    load_tokenizer,
    preprocess,
    read_documents,
    train_tokenizer,
)
from evoformer.data.commands import preprocess_main, tokenizer_train_main
from evoformer.errors import UserError


def _jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_read_documents(tmp_path: Path) -> None:
    txt = tmp_path / "a.txt"
    txt.write_text("line 1\n\tline 2\n", encoding="utf-8")
    assert list(read_documents(txt)) == ["line 1\n\tline 2\n"]
    jl = _jsonl(tmp_path / "b.jsonl", [{"text": "one"}, {"text": "two\n", "id": 3}])
    with open(jl, "a") as fh:
        fh.write("\n")  # blank lines are skipped
    assert list(read_documents(jl)) == ["one", "two\n"]


def test_read_documents_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"input file .*nope.txt not found"):
        list(read_documents(tmp_path / "nope.txt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: invalid JSON"):
        list(read_documents(bad))
    no_text = _jsonl(tmp_path / "nt.jsonl", [{"text": "a"}, {"text": "b"}, {"body": "c"}])
    with pytest.raises(UserError, match=r'nt.jsonl:3: JSON object has no "text" field'):
        list(read_documents(no_text))
    not_str = _jsonl(tmp_path / "ns.jsonl", [{"text": 5}])
    with pytest.raises(UserError, match=r'ns.jsonl:1: "text" is not a string'):
        list(read_documents(not_str))
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"ok\xff\xfe")
    with pytest.raises(UserError, match=r"bin.txt is not UTF-8 text \(bad byte at offset 2\)"):
        list(read_documents(binary))


def test_preprocess(tmp_path: Path, small_tokenizer: Tokenizer, quiet: list[str]) -> None:
    txt = tmp_path / "a.py"
    txt.write_text("def f():\n    return 1\n", encoding="utf-8")
    jl = _jsonl(tmp_path / "b.jsonl", [{"text": "x = 1"}, {"text": ""}, {"text": "y = 2\n"}])
    store = preprocess([txt, jl], small_tokenizer, tmp_path / "out", log=quiet.append, workers=0)
    assert isinstance(store, ShardedStore) and ShardedStore(tmp_path / "out").n_docs == 3
    texts = [txt.read_text(), "x = 1", "y = 2\n"]  # the empty document is skipped
    assert store.n_docs == 3
    assert (store.vocab_size, store.eod_id) == (small_tokenizer.vocab_size, small_tokenizer.eod_id)
    for i, text in enumerate(texts):
        np.testing.assert_array_equal(store.doc(i), small_tokenizer.encode(text))
        assert small_tokenizer.decode(store.doc(i)) == text
    assert len(quiet) == 1 and f"3 documents, {store.n_tokens} tokens" in quiet[0]
    assert "MB/s" in quiet[0] and "tokens/s" in quiet[0]
    assert "1 empty documents skipped" in quiet[0]


def test_preprocess_errors(tmp_path: Path, small_tokenizer: Tokenizer) -> None:
    out = tmp_path / "out"
    with pytest.raises(UserError, match="not found"):
        preprocess([tmp_path / "missing.txt"], small_tokenizer, out, log=lambda _: None)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(UserError, match="the corpus is empty"):
        preprocess([empty], small_tokenizer, out, log=lambda _: None)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"nope": "fine"}\n{"nope": 1}\n')
    with pytest.raises(UserError, match=r'missing key "text" 2 \(first: .*bad\.jsonl:1, .*:2\)'):
        preprocess([bad], small_tokenizer, out, log=lambda _: None, workers=0)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_commands(
    tmp_path: Path, small_corpus: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = [str(p) for p in small_corpus[:8]]
    assert tokenizer_train_main([*inputs, "--out", str(tmp_path / "t"), "--vocab-size", "400"]) == 0
    model = tmp_path / "t.model"
    assert load_tokenizer(model).vocab_size == 400
    out = tmp_path / "c"
    argv = [*inputs[:3], "--tokenizer", str(model), "--out", str(out), "--workers", "0"]
    assert preprocess_main(argv) == 0
    store = ShardedStore(out)
    assert store.n_docs == 3 and store.vocab_size == 400
    printed = capsys.readouterr().out
    assert "(400 tokens)" in printed and f"{store.n_tokens} tokens" in printed
    with pytest.raises(UserError, match="not found"):
        preprocess_main(["nope.txt", "--tokenizer", str(model), "--out", str(out)])
    with pytest.raises(UserError, match="already exists"):
        preprocess_main(argv)
    with pytest.raises(UserError, match="is not a sentencepiece model"):
        preprocess_main([inputs[0], "--tokenizer", inputs[0], "--out", str(tmp_path / "d")])
    with pytest.raises(SystemExit):  # argparse usage error: --out is required
        tokenizer_train_main(inputs)


def test_tokenizer_command_defaults_to_the_default_corpus(
    tmp_path: Path, small_corpus: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(commands, "default_corpus_files", lambda: small_corpus[:6])
    assert tokenizer_train_main(["--out", str(tmp_path / "d"), "--vocab-size", "400"]) == 0
    expected = train_tokenizer(small_corpus[:6], tmp_path / "ref", 400)
    assert (tmp_path / "d.model").read_bytes() == expected.read_bytes()
    with pytest.raises(UserError, match="too small"):
        tokenizer_train_main(["--out", str(tmp_path / "d"), "--vocab-size", "100"])
