"""A token store remembers the tokenizer that made it: `evoformer preprocess` keeps a copy and
its content hash, training on the store without data.tokenizer uses (and keeps) that copy, and
another tokenizer -- even of the same vocabulary size -- is refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from evoformer.config.schema import DataConfig
from evoformer.data import ShardedStore, build_datasets, load_tokenizer, preprocess
from evoformer.data.tokenizer import train_tokenizer
from evoformer.errors import UserError
from tests.data.conftest import SMALL_VOCAB


@pytest.fixture(scope="module")
def store(small_corpus, small_tokenizer, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kept") / "corpus"
    preprocess(small_corpus[:6], small_tokenizer, out, log=lambda *a: None, workers=0)
    return out


def _cfg(store: Path, tokenizer: str | None = None) -> DataConfig:
    return DataConfig(source="files", paths=[str(store)], tokenizer=tokenizer, val_fraction=0.0)


def test_the_store_keeps_its_tokenizer(store, small_tokenizer) -> None:
    kept = ShardedStore(store).kept_tokenizer()
    assert kept == store / "tokenizer.model"
    assert load_tokenizer(kept).digest == small_tokenizer.digest
    assert ShardedStore(store).tokenizer_digest == small_tokenizer.digest
    bundle = build_datasets(_cfg(store), 32, 0, SMALL_VOCAB, log=lambda *a: None)
    assert bundle.tokenizer is not None and bundle.tokenizer.digest == small_tokenizer.digest
    same = build_datasets(_cfg(store, str(small_tokenizer.path)), 32, 0, SMALL_VOCAB)
    assert same.tokenizer is not None


def test_another_tokenizer_of_the_same_size_is_refused(store, small_corpus, tmp_path) -> None:
    other = train_tokenizer(small_corpus[10:20], tmp_path / "other", SMALL_VOCAB, seed=1)
    assert load_tokenizer(other).vocab_size == SMALL_VOCAB
    with pytest.raises(UserError, match="made with another tokenizer than data.tokenizer"):
        build_datasets(_cfg(store, str(other)), 32, 0, SMALL_VOCAB, log=lambda *a: None)


def test_a_run_on_the_store_keeps_the_tokenizer(store, tmp_path) -> None:
    from evoformer.config import load_config
    from evoformer.engine import Trainer
    from tests.conftest import REPO

    cfg = load_config(
        [str(REPO / "configs/models/tiny/llama.yaml")],
        [
            "data.source=files",
            f"data.paths=[{store}]",
            "data.val_fraction=0",
            f"model.vocab_size={SMALL_VOCAB}",
            "train.seq_len=32",
            "train.global_batch_size=2",
            "train.micro_batch_size=2",
            "train.max_steps=1",
            "run.progress=off",
            f"run.output_dir={tmp_path / 'run'}",
        ],
    )
    Trainer(cfg).train()
    assert (tmp_path / "run/tokenizer.model").is_file()
    assert (tmp_path / "run/checkpoints/step_1/tokenizer.model").is_file()
