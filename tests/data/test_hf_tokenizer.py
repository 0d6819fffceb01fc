"""HuggingFace tokenizers (``tokenizer.json`` alone or in a folder) through ``load_tokenizer``: the
ids are those of the ``tokenizers`` library, the end of document follows the documented rule,
bad files are one-line errors, and the tokenizer pickles and hashes by content."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import tokenizers

from evoformer.cli import main
from evoformer.data import (
    HFTokenizer,
    SentencePieceTokenizer,
    ShardedStore,
    Tokenizer,
    TokenStore,
    corpus,
    default_corpus_files,
    load_tokenizer,
    prepare_default_corpus,
)
from evoformer.errors import UserError
from tests.tokenizer_testing import write_hf_folder

SAMPLE = default_corpus_files()[7::97][:8]  # not the files the tokenizer was trained on


def _raw(folder: Path) -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))


@pytest.mark.parametrize("kind", ["folder", "tokenizer.json"])
def test_ids_are_the_tokenizers_librarys(hf_tokenizer_dir: Path, kind: str) -> None:
    path = hf_tokenizer_dir if kind == "folder" else hf_tokenizer_dir / "tokenizer.json"
    tok, raw = load_tokenizer(path), _raw(hf_tokenizer_dir)
    assert isinstance(tok, HFTokenizer) and tok.path == path
    texts = [p.read_text(encoding="utf-8") for p in SAMPLE]
    texts += ["", "\n\n\t  x  \n", "café 漢字 🐍 \x00", "a<|endoftext|>b"]
    want = [e.ids for e in raw.encode_batch(texts, add_special_tokens=False)]
    assert tok.encode_batch(texts) == want
    assert [tok.encode(t) for t in texts] == want
    assert sum(map(len, want)) > 10_000  # a real sample, not a few tokens
    # byte-level BPE: every text round-trips exactly, special tokens included
    assert [tok.decode(ids) for ids in want] == texts
    assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True) == 512
    assert max(max(ids) for ids in want if ids) < tok.vocab_size
    assert (tok.eod_id, tok.bos_id, tok.pad_id) == (0, -1, 2)
    assert tok.encode("a<|endoftext|>b")[1] == tok.eod_id


def test_end_of_document_rule(hf_tokenizer_dir: Path, tmp_path: Path) -> None:
    raw = _raw(hf_tokenizer_dir)
    # a folder: tokenizer_config.json's eos_token, as a string or an AddedToken dict
    chat = write_hf_folder(raw, tmp_path / "chat", eos_token="<|im_end|>")
    assert load_tokenizer(chat).eod_id == 1
    as_dict = write_hf_folder(raw, tmp_path / "dict", eos_token={"content": "<|im_end|>"})
    assert load_tokenizer(as_dict).eod_id == 1
    # no eos_token in the config: the known document ends among the special tokens
    none = write_hf_folder(raw, tmp_path / "none", eos_token=None)
    assert load_tokenizer(none).eod_id == 0
    # data.eod_id overrides, and survives pickling
    over = load_tokenizer(chat, eod_id=0)
    assert over.eod_id == 0 and pickle.loads(pickle.dumps(over)).eod_id == 0
    with pytest.raises(UserError, match=r"data.eod_id=512 is not a token of .*\(ids are 0..511\)"):
        load_tokenizer(chat, eod_id=512)
    with pytest.raises(UserError, match=r"eos_token '<nope>' is not in the vocabulary"):
        load_tokenizer(write_hf_folder(raw, tmp_path / "bad", eos_token="<nope>"))


def test_no_document_end_is_one_clear_error(hf_tokenizer_dir: Path, tmp_path: Path) -> None:
    data = json.loads((hf_tokenizer_dir / "tokenizer.json").read_text())
    # only a turn end among the specials: <|im_end|> is not a document end
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] == "<|im_end|>"]
    for t in data["added_tokens"]:
        data["model"]["vocab"].pop(t["content"], None)
    data["model"]["vocab"] = {k: v for k, v in data["model"]["vocab"].items() if v != 0}
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"none of its special tokens is a known end of document"):
        load_tokenizer(path)
    assert load_tokenizer(path, eod_id=1).eod_id == 1


def test_wrong_kinds_of_file_are_one_line_errors(tmp_path: Path) -> None:
    not_tok = tmp_path / "config.json"
    not_tok.write_text('{"model_type": "llama"}')
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    fake_json = tmp_path / "fake" / "tokenizer.json"
    fake_json.parent.mkdir()
    fake_json.write_bytes(b"\x89PNG\r\n" + bytes(100))
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        not_tok: r"tokenizer file .*config.json is not a HuggingFace tokenizer.json \(",
        binary: r"tokenizer file .*weights.bin is not a sentencepiece model",
        fake_json.parent: r"tokenizer file .*fake/tokenizer.json is not a HuggingFace",
        empty: r"tokenizer folder .*empty has no tokenizer.json",
        tmp_path / "missing.json": r"tokenizer file .*missing.json not found",
    }
    for path, message in cases.items():
        with pytest.raises(UserError, match=message) as err:
            load_tokenizer(path)
        assert "\n" not in str(err.value)


def test_digest_files_and_pickle(hf_tokenizer_dir: Path, small_tokenizer, tmp_path: Path) -> None:
    tok = load_tokenizer(hf_tokenizer_dir)
    moved = tmp_path / "moved"
    shutil.copytree(hf_tokenizer_dir, moved)
    assert load_tokenizer(moved).digest == tok.digest  # content, not location
    config = json.loads((moved / "tokenizer_config.json").read_text())
    (moved / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|pad|>"}))
    assert load_tokenizer(moved).digest != tok.digest
    assert len(tok.digest) == 64 and tok.digest != small_tokenizer.digest
    assert set(tok.files) == {"tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"}
    bare = load_tokenizer(hf_tokenizer_dir / "tokenizer.json")
    assert bare.files == {"tokenizer/tokenizer.json": hf_tokenizer_dir / "tokenizer.json"}
    assert small_tokenizer.files == {"tokenizer.model": small_tokenizer.path}
    assert isinstance(small_tokenizer, SentencePieceTokenizer)
    clone = pickle.loads(pickle.dumps(tok))
    assert isinstance(clone, Tokenizer) and clone.path == tok.path
    assert clone.encode("def f(x):\n    return x\n") == tok.encode("def f(x):\n    return x\n")


def test_preprocess_with_an_hf_folder_and_eod_id(hf_tokenizer_dir: Path, tmp_path: Path) -> None:
    docs = tmp_path / "docs.jsonl"
    texts = [p.read_text(encoding="utf-8") for p in SAMPLE[:3]]
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "out"
    argv = ["preprocess", str(docs), "--tokenizer", str(hf_tokenizer_dir), "--out", str(out)]
    assert main([*argv, "--workers", "1"]) == 0  # the tokenizer travels to a worker process
    store = ShardedStore(out)
    tok = load_tokenizer(hf_tokenizer_dir)
    assert (store.vocab_size, store.eod_id, store.n_docs) == (512, 0, 3)
    assert store.doc(1).tolist() == tok.encode(texts[1])
    b = tmp_path / "b"
    assert main([*argv[:-1], str(b), "--eod-id", "1", "--workers", "1"]) == 0
    assert ShardedStore(b).eod_id == 1
    assert main([*argv[:-1], str(tmp_path / "c"), "--eod-id", "999", "--workers", "0"]) == 2


def test_default_corpus_with_an_hf_folder(
    hf_tokenizer_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(corpus, "default_corpus_files", lambda: list(SAMPLE))
    logs: list[str] = []
    files = prepare_default_corpus(str(tmp_path), 999, 0.2, str(hf_tokenizer_dir), logs.append)
    assert files.tokenizer == hf_tokenizer_dir.resolve()
    assert "tokenising with" in logs[0]
    train, val = TokenStore(files.train), TokenStore(files.val)
    assert (train.vocab_size, train.eod_id) == (512, 0)
    tok = load_tokenizer(hf_tokenizer_dir)
    docs = sorted(train.doc(i).tolist() for i in range(train.n_docs))
    docs += [val.doc(i).tolist() for i in range(val.n_docs)]
    assert sorted(docs) == sorted(tok.encode_batch([p.read_text() for p in SAMPLE]))
    # the override is another cache entry, with its separator
    other = prepare_default_corpus(str(tmp_path), 999, 0.2, str(hf_tokenizer_dir), eod_id=1)
    assert other.train.parent != files.train.parent and TokenStore(other.train).eod_id == 1
