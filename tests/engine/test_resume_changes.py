"""What a resume may change: the loss's chunking and the attention kernel (the same function,
computed another way) but not the model's shape."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from evoformer.config import load_config
from evoformer.engine.resume import check_resume
from evoformer.errors import UserError
from tests.conftest import REPO

TINY = [str(REPO / "configs/models/tiny/llama.yaml")]


def _checkpoint(tmp_path):
    OmegaConf.save(OmegaConf.structured(load_config(TINY)), tmp_path / "config.yaml")
    return tmp_path


def test_loss_chunk_and_sdpa_kernel_may_change(tmp_path):
    cfg = load_config(TINY, ["model.loss_chunk=64", "model.attention.sdpa_kernel=math"])
    changes = check_resume(_checkpoint(tmp_path), cfg)
    assert sorted(changes) == [
        "model.attention.sdpa_kernel 'auto' -> 'math'",
        "model.loss_chunk 0 -> 64",
    ]


def test_model_shape_may_not_change(tmp_path):
    with pytest.raises(UserError, match=r"model.d_model \(64 -> 128\)"):
        check_resume(_checkpoint(tmp_path), load_config(TINY, ["model.d_model=128"]))
