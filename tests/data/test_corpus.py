from __future__ import annotations

import multiprocessing
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest

from evoformer.data import (
    Tokenizer,
    TokenStore,
    cache_root,
    corpus,
    default_corpus_files,
    load_tokenizer,
    prepare_default_corpus,
)


def test_default_corpus_files() -> None:
    files = default_corpus_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [f.relative_to(root).as_posix() for f in files]
    assert len(files) > 300
    assert rel == sorted(rel)
    assert "os.py" in rel and "json/__init__.py" in rel
    banned = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"}
    assert not any(banned & set(r.split("/")[:-1]) for r in rel)
    assert all(f.suffix == ".py" and f.stat().st_size <= 1_000_000 for f in files)


def test_cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVOFORMER_CACHE", str(tmp_path / "env"))
    assert cache_root(str(tmp_path / "cfg")) == tmp_path / "cfg"
    assert cache_root(None) == tmp_path / "env" and (tmp_path / "env").is_dir()
    monkeypatch.delenv("EVOFORMER_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root(None) == tmp_path / "home" / ".cache" / "evoformer"


@pytest.fixture
def small_default(monkeypatch: pytest.MonkeyPatch, small_corpus: list[Path]) -> list[Path]:
    """Make the default corpus the ~40-file slice so preparing it takes about a second."""
    monkeypatch.setattr(corpus, "default_corpus_files", lambda: list(small_corpus))
    return small_corpus


def test_prepare_and_cache_hit(small_default: list[Path], tmp_path: Path) -> None:
    logs: list[str] = []
    files = prepare_default_corpus(str(tmp_path), 512, 0.1, log=logs.append)
    assert logs[0] == "preparing default corpus (first use): training tokenizer (512 tokens)..."
    train, val, tok = (
        TokenStore(files.train),
        TokenStore(files.val),
        load_tokenizer(files.tokenizer),
    )
    assert logs[-1].startswith(f"tokenised {len(small_default)} files -> {train.n_tokens} train")
    assert f"{val.n_tokens} val tokens" in logs[-1]
    assert tok.vocab_size == 512 and train.eod_id == tok.eod_id == 2
    # every file is exactly one document on one side, and decodes back to the file
    texts = {p.read_text(encoding="utf-8") for p in small_default}
    assert train.n_docs + val.n_docs == len(texts) and val.n_docs >= 1
    decoded = [tok.decode(s.doc(i)) for s in (train, val) for i in range(s.n_docs)]
    assert set(decoded) == texts
    encoded = tok.encode_batch(sorted(texts))
    assert train.n_tokens + val.n_tokens == sum(len(e) for e in encoded)

    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (files.train, files.val)}
    logs.clear()
    t0 = time.perf_counter()
    again = prepare_default_corpus(str(tmp_path), 512, 0.1, log=logs.append)
    assert time.perf_counter() - t0 < 1.0
    assert again == files and logs == []
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in before} == before

    # another split is another cache entry; the split is a function of the documents only
    other = prepare_default_corpus(str(tmp_path), 512, 0.5, log=logs.append)
    assert other.train.parent != files.train.parent
    assert load_tokenizer(other.tokenizer).encode("def f(): pass") == tok.encode("def f(): pass")
    assert TokenStore(other.val).n_docs > val.n_docs


def test_prepare_with_given_tokenizer(
    small_default: list[Path], small_tokenizer: Tokenizer, tmp_path: Path
) -> None:
    logs: list[str] = []
    files = prepare_default_corpus(
        str(tmp_path), 999, 0.05, tokenizer_path=str(small_tokenizer.path), log=logs.append
    )
    assert files.tokenizer == small_tokenizer.path.resolve()
    assert "tokenising with" in logs[0] and not any("training" in line for line in logs)
    assert TokenStore(files.train).vocab_size == small_tokenizer.vocab_size


def test_killed_build_is_redone(small_default: list[Path], tmp_path: Path) -> None:
    files = prepare_default_corpus(str(tmp_path), 512, 0.1, log=lambda _: None)
    expected = files.train.read_bytes()
    entry = files.train.parent
    # simulate a build killed half way (its temp dir) and a damaged entry (a file deleted)
    (tmp_path / f"{entry.name}.tmp-dead").mkdir()
    (tmp_path / f"{entry.name}.tmp-dead" / "train.tok").write_bytes(b"half")
    files.val.unlink()
    logs: list[str] = []
    rebuilt = prepare_default_corpus(str(tmp_path), 512, 0.1, log=logs.append)
    assert rebuilt == files and "training tokenizer" in logs[0]
    assert rebuilt.train.read_bytes() == expected  # deterministic rebuild
    assert not list(tmp_path.glob("*.tmp-*"))


def _prepare_in_child(cache: str) -> tuple[str, list[str]]:
    logs: list[str] = []
    files = prepare_default_corpus(cache, 512, 0.1, log=logs.append)
    return str(files.train), logs


def test_concurrent_ranks_build_once(small_default: list[Path], tmp_path: Path) -> None:
    # fork keeps the monkeypatched file list in the children, like torchrun ranks on one host
    with multiprocessing.get_context("fork").Pool(3) as pool:
        results = pool.map(_prepare_in_child, [str(tmp_path)] * 3)
    assert len({train for train, _ in results}) == 1
    builders = [logs for _, logs in results if any("training tokenizer" in m for m in logs)]
    assert len(builders) == 1
    store = TokenStore(results[0][0])
    assert store.n_docs > 0 and np.all(np.asarray(store.tokens) < 512)
