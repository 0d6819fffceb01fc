"""Shared fixtures: a small slice of the default corpus and a tokenizer trained on it."""

from __future__ import annotations

from pathlib import Path

import pytest

from evoformer.data import Tokenizer, default_corpus_files, load_tokenizer, train_tokenizer

SMALL_VOCAB = 1024


@pytest.fixture(scope="session")
def small_corpus() -> list[Path]:
    """About 40 standard-library files spread over the whole (sorted) list."""
    files = default_corpus_files()
    step = max(1, len(files) // 40)
    return files[::step][:40]


@pytest.fixture(scope="session")
def small_tokenizer(
    small_corpus: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> Tokenizer:
    """A 1024-token tokenizer trained on the small corpus (shared by the whole session)."""
    out = tmp_path_factory.mktemp("tok") / "small"
    return load_tokenizer(train_tokenizer(small_corpus, out, SMALL_VOCAB, seed=0))


@pytest.fixture
def quiet() -> list[str]:
    """A log sink that records lines instead of printing them."""
    return []
