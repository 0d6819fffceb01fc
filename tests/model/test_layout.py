"""The per-layer plan: each block's window, RoPE table and MLP kind, resolved in one place."""

from __future__ import annotations

from evoformer.config.schema import (
    AttentionConfig,
    ModelConfig,
    MoEConfig,
    MTPConfig,
    PositionConfig,
)
from evoformer.model import build_model
from evoformer.model.layout import layer_plan, layer_spec, moe_layers


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
