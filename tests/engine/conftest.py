"""A small real corpus (standard-library files as jsonl) and a 512-token tokenizer for runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evoformer.data import default_corpus_files, train_tokenizer


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory, cache_dir) -> dict[str, str]:
    root = tmp_path_factory.mktemp("corpus")
    files = default_corpus_files()[::20][:30]
    jsonl = root / "docs.jsonl"
    with open(jsonl, "w") as f:
        for p in files:
            f.write(json.dumps({"text": p.read_text(errors="replace")}) + "\n")
    model = train_tokenizer(files, root / "tok", 512, seed=0)
    return {"path": str(jsonl), "tokenizer": str(model)}


@pytest.fixture
def run_overrides(text_corpus, tmp_path) -> list[str]:
    """Overrides for a tiny LLaMA run on the small corpus in a fresh output dir."""
    return [
        "data.source=files",
        f"data.paths=[{text_corpus['path']}]",
        f"data.tokenizer={text_corpus['tokenizer']}",
        "data.val_fraction=0.1",
        "train.seq_len=32",
        "train.global_batch_size=8",
        "train.micro_batch_size=4",
        "train.log_every=1",
        "optim.warmup_steps=2",
        "optim.lr=3e-3",
        f"run.output_dir={Path(tmp_path) / 'run'}",
        "run.progress=off",
    ]


@pytest.fixture(scope="session")
def short_docs(tmp_path_factory, cache_dir) -> dict[str, str]:
    """Documents of 1-2 lines from a few standard-library files, and a 512-token tokenizer."""
    root = tmp_path_factory.mktemp("short_docs")
    lines = [ln for p in default_corpus_files()[::40][:8] for ln in p.read_text().splitlines()]
    lines = [ln for ln in lines if ln.strip()]
    docs, i = [], 0
    while i < len(lines) and len(docs) < 400:
        n = 1 + len(docs) % 2
        docs.append("\n".join(lines[i : i + n]))
        i += n
    path = root / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = train_tokenizer(docs, root / "tok", 512, seed=0)
    return {"path": str(path), "tokenizer": str(tok)}
