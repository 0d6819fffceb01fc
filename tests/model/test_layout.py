"""The per-layer plan: each block's window, RoPE table and MLP kind, resolved in one place."""

from __future__ import annotations

import math

import pytest

from evoformer.config.schema import (
    AttentionConfig,
    ModelConfig,
    MoEConfig,
    MTPConfig,
    PositionConfig,
    RopeScalingConfig,
)
from evoformer.model import build_model
from evoformer.model.layout import (
    AttentionSpec,
    LatentAttentionSpec,
    attention_spec,
    layer_plan,
    layer_spec,
    moe_layers,
    moe_spec,
)


def test_gemma3_local_global_pattern_and_rope_tables():
    cfg = ModelConfig(
        n_layers=7,
        attention=AttentionConfig(n_heads=4, sliding_window=16, global_every=3),
        position=PositionConfig(rope_theta=1e6, local_rope_theta=1e4),
    )
    plan = layer_plan(cfg)
    assert [s.window for s in plan] == [16, 16, None, 16, 16, None, 16]
    assert [s.rope for s in plan] == ["local", "local", "global"] * 2 + ["local"]
    assert all(s.mlp == "dense" for s in plan)
    # Without a separate local base every layer rotates with the one table.
    cfg.position.local_rope_theta = None
    assert {s.rope for s in layer_plan(cfg)} == {"global"}
    cfg.position.kind = "alibi"
    assert {s.rope for s in layer_plan(cfg)} == {"none"}


def test_nope_layers_rotate_nothing_whatever_their_window():
    cfg = ModelConfig(
        n_layers=8,
        attention=AttentionConfig(n_heads=4, sliding_window=16, global_every=4),
        position=PositionConfig(rope_theta=1e6, local_rope_theta=1e4, nope_layers=[3, 6]),
    )
    plan = layer_plan(cfg)
    assert [s.rope for s in plan] == ["local"] * 3 + ["none"] + ["local"] * 2 + ["none", "global"]
    assert [s.window for s in plan] == [16, 16, 16, None, 16, 16, 16, None]  # windows unchanged
    model = build_model(cfg, seed=0)
    assert [layer.spec.rope for layer in model.layers] == [s.rope for s in plan]


def test_deepseek_dense_then_moe_and_mtp_continues_the_pattern():
    cfg = ModelConfig(
        n_layers=5,
        moe=MoEConfig(num_experts=4, first_k_dense=1, layer_freq=2),
        mtp=MTPConfig(depth=2),
    )
    assert moe_layers(cfg) == [1, 3]
    assert moe_layers(cfg, with_mtp=True) == [1, 3, 5]
    assert layer_spec(cfg, 6).mlp == "dense"
    assert len(layer_plan(cfg, with_mtp=True)) == 7


def test_blocks_are_built_from_their_spec():
    cfg = ModelConfig(
        n_layers=3,
        d_model=32,
        vocab_size=64,
        max_seq_len=32,
        attention=AttentionConfig(n_heads=2, sliding_window=8, global_every=3),
        moe=MoEConfig(num_experts=2, top_k=1, first_k_dense=1),
    )
    cfg.mlp.hidden = 16
    model = build_model(cfg)
    assert [b.spec for b in model.layers] == list(layer_plan(cfg))
    assert [b.attn.window for b in model.layers] == [8, 8, None]
    assert [type(b.mlp).__name__ for b in model.layers] == ["GatedMLP", "MoE", "MoE"]


def test_sub_layers_get_resolved_sub_configs():
    """Each sub-layer is built from its own resolved spec; the defaults are applied once."""
    cfg = ModelConfig(
        d_model=64,
        n_layers=4,
        attention=AttentionConfig(n_heads=4, n_kv_heads=None, bias=True, sliding_window=8),
        moe=MoEConfig(num_experts=4, first_k_dense=1, aux_loss_coef=0.03, num_shared_experts=1),
        mtp=MTPConfig(depth=1),
    )
    a = attention_spec(cfg, layer_spec(cfg, 0))
    assert isinstance(a, AttentionSpec)
    assert (a.kv_heads, a.head_dim, a.qkv_bias, a.window) == (4, 16, True, 8)
    m = moe_spec(cfg)
    assert m.aux_loss_coef == 0.03 / 4  # three MoE layers plus the MTP block
    assert m.expert_mlp.hidden == m.expert_width == cfg.mlp.hidden
    assert m.shared_mlp is not None and m.shared_mlp.hidden == cfg.mlp.hidden
    assert not m.shared_mlp.bias

    mla = ModelConfig(
        attention=AttentionConfig(kind="mla", qk_nope_head_dim=24, qk_rope_head_dim=8),
        position=PositionConfig(rope_scaling=RopeScalingConfig(kind="yarn", factor=40.0)),
    )
    mla.position.rope_scaling.mscale_all_dim = 1.0
    spec = attention_spec(mla, layer_spec(mla, 0))
    assert isinstance(spec, LatentAttentionSpec)
    gain = (0.1 * math.log(40.0) + 1.0) ** 2  # DeepSeek's YaRN mscale, squared
    assert math.isclose(spec.scale, 32**-0.5 * gain)
    mla.attention.qk_norm = "head"
    with pytest.raises(ValueError, match="MLA supports none"):
        attention_spec(mla, layer_spec(mla, 0))
