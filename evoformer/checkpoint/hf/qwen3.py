"""Qwen3: Qwen2 with per-head RMSNorm on q and k, an explicit head_dim, and optional biases on
all four attention projections."""

from __future__ import annotations

from typing import Any

from evoformer.checkpoint.hf.dense import (
    LLAMA_RULES,
    QWEN2_DEFAULTS,
    check_llama_like,
    llama_like,
    llama_like_to_hf,
    qwen_window,
    qwen_window_to_hf,
)
from evoformer.checkpoint.hf.family import ROTARY_BUFFERS, Family, hf_defaults, qk_norm_rules
from evoformer.config.schema import ModelConfig

QWEN3_DEFAULTS: dict[str, Any] = {**QWEN2_DEFAULTS, "head_dim": 128, "attention_bias": False}


def qwen3_to_model_config(hf: dict[str, Any]) -> ModelConfig:
    """Qwen3 ``config.json`` -> ModelConfig: per-head RMSNorm on q and k before RoPE."""
    c = hf_defaults(hf, QWEN3_DEFAULTS)
    window, every = qwen_window("qwen3", c)
    return llama_like(
        "qwen3",
        c,
        bias=bool(c["attention_bias"]),
        qk_norm="head",
        sliding_window=window,
        global_every=every,
    )


def qwen3_to_hf_config(m: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> Qwen3 ``config.json``; UserError names any choice Qwen3 lacks."""
    check_llama_like("qwen3", m)
    return {
        **llama_like_to_hf("qwen3", "Qwen3ForCausalLM", m, head_dim_field=True),
        "attention_bias": m.attention.bias,
        **qwen_window_to_hf(m),
    }


FAMILY = Family(
    name="qwen3",
    model_type="qwen3",
    architectures=("Qwen3ForCausalLM", "Qwen3Model"),
    to_model_config=qwen3_to_model_config,
    to_hf_config=qwen3_to_hf_config,
    rules=(*LLAMA_RULES, *qk_norm_rules()),
    base_prefix="model.",
    ignore=ROTARY_BUFFERS,
)
