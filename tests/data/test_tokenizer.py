from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from evoformer.data import Tokenizer, load_tokenizer, train_tokenizer
from evoformer.errors import UserError

SOURCE = '''\
#!/usr/bin/env python3
"""Module docstring with unicode: café, naïve, 漢字, emoji 🐍, math ∑ ≤ ∞."""


class Thing:
\tdef tabbed(self):\t# a tab-indented method with a trailing tab\t
\t\treturn {"key": [1, 2,   3]}

    def spaced(self, x):
        if x:

            return x  *  2~~~~
        return None
\r\n
'''.replace("~", " ")  # ~ marks trailing spaces (kept out of the source file)


def test_round_trip_python_source(small_tokenizer: Tokenizer, small_corpus: list[Path]) -> None:
    tok = small_tokenizer
    texts = [SOURCE, "", " ", "\n", "\n\n\n", "  lead", "trail  ", "\t", "x\x00y\x0b\u200b"]
    texts += [p.read_text(encoding="utf-8") for p in small_corpus[:5]]
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(0 <= i < tok.vocab_size for i in ids)
    # batched and single encodes agree
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_special_ids_and_whitespace_pieces(small_tokenizer: Tokenizer) -> None:
    tok = small_tokenizer
    assert tok.vocab_size == 1024
    assert (tok.eod_id, tok.bos_id, tok.pad_id) == (2, 1, -1)
    assert tok.encode("") == []
    # newline is a single piece, and a 4-space indent is one piece, not four
    assert [tok.id_to_piece(i) for i in tok.encode("\n")] == ["\n"]
    assert len(tok.encode("    ")) == 1
    assert len(tok.encode("        return")) <= 3
    # digits are split
    assert len(tok.encode("12345")) == 5


def test_compression_on_code(small_tokenizer: Tokenizer, small_corpus: list[Path]) -> None:
    text = small_corpus[-1].read_text(encoding="utf-8")
    ratio = len(small_tokenizer.encode(text)) / len(text)
    assert 0.15 < ratio < 0.6  # a 1k BPE on code: far fewer tokens than characters


def test_training_is_deterministic(small_corpus: list[Path], tmp_path: Path) -> None:
    a = train_tokenizer(small_corpus[:10], tmp_path / "a", 512, seed=3)
    b = train_tokenizer(small_corpus[:10], tmp_path / "b.model", 512, seed=3)
    assert a == tmp_path / "a.model" and b == tmp_path / "b.model"
    assert a.read_bytes() == b.read_bytes()
    assert (tmp_path / "a.vocab").read_text().count("\n") == 512
    # only the two outputs per model: no temporary files left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.model",
        "a.vocab",
        "b.model",
        "b.vocab",
    ]


def test_training_accepts_texts(tmp_path: Path) -> None:
    texts = [f"def f{i}(x):\n    return x + {i}\n" * 5 for i in range(200)]
    model = train_tokenizer(iter(texts), tmp_path / "t", 300)
    tok = load_tokenizer(model)
    assert tok.vocab_size == 300
    assert tok.decode(tok.encode(texts[7])) == texts[7]


def test_training_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no text"):
        train_tokenizer(["", "\n\n"], tmp_path / "e", 300)
    with pytest.raises(UserError, match="Vocabulary size too high"):
        train_tokenizer(["tiny corpus"], tmp_path / "e", 5000)
    with pytest.raises(UserError, match="not found"):
        train_tokenizer([tmp_path / "missing.txt"], tmp_path / "e", 300)
    with pytest.raises(UserError, match=r"vocab_size 262 is too small, this corpus needs at least"):
        train_tokenizer(["abc def ghi"] * 50, tmp_path / "e", 262)
    assert not list(tmp_path.iterdir())


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"tokenizer file .*nope.model not found"):
        load_tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_text("this is not a protobuf")
    with pytest.raises(UserError, match="is not a sentencepiece model"):
        load_tokenizer(bad)


def test_pickle_reloads(small_tokenizer: Tokenizer) -> None:
    clone = pickle.loads(pickle.dumps(small_tokenizer))
    assert clone.path == small_tokenizer.path
    assert clone.encode(SOURCE) == small_tokenizer.encode(SOURCE)
