"""Shared fixtures: quiet single-threaded torch, a private cache dir for corpora."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="session")
def _torch_defaults():
    torch.set_num_threads(1)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("evoformer-cache")
    os.environ["EVOFORMER_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory) -> Path:
    """An HF tokenizer folder (tokenizer.json + tokenizer_config.json, eos <|endoftext|>): a
    512-token byte-level BPE trained on 30 default-corpus files."""
    from evoformer.data import default_corpus_files
    from tests.tokenizer_testing import train_byte_level_bpe, write_hf_folder

    files = default_corpus_files()[::40][:30]
    return write_hf_folder(train_byte_level_bpe(files), tmp_path_factory.mktemp("hf-tok") / "tok")
