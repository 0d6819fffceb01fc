"""Partial RoPE (GLM-4.5): a table narrower than the head rotates the leading dims only, as
HF's Glm4Moe does, and a share that leaves an odd number of rotated dims is refused."""

from __future__ import annotations

import pytest
import torch

from evoformer.config import load_config
from evoformer.config.schema import PositionConfig
from evoformer.errors import UserError
from evoformer.model.positions import RotaryEmbedding, apply_rope
from tests.conftest import REPO


def test_partial_rope_equals_hf_glm4_moe() -> None:
    modeling = pytest.importorskip("transformers.models.glm4_moe.modeling_glm4_moe")
    rope = RotaryEmbedding(16, 64, PositionConfig(rope_theta=1e6, partial_rotary=0.5))
    rope.reset_parameters()
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 20, 32, generator=g), torch.randn(2, 2, 20, 32, generator=g)
    cos, sin = rope(torch.arange(20))
    theirs = modeling.apply_rotary_pos_emb(q, k, cos[None], sin[None])
    ours = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert torch.equal(ours[0][..., 16:], q[..., 16:])  # the tail carries no position
    assert not torch.allclose(ours[0][..., :16], q[..., :16])


def test_the_model_builds_a_table_of_the_rotated_dims() -> None:
    from evoformer.model import build_model

    cfg = load_config([str(REPO / "configs/models/tiny/glm4-moe.yaml")]).model
    model = build_model(cfg, seed=0)
    assert model.rope is not None and model.rope.cos.shape == (cfg.max_seq_len, 16)


def test_odd_rotated_dims_are_refused() -> None:
    with pytest.raises(UserError, match="model.position.partial_rotary=0.3"):
        load_config(
            [str(REPO / "configs/models/tiny/glm4-moe.yaml")], ["model.position.partial_rotary=0.3"]
        )
