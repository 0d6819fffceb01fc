"""Qwen2: LLaMA with biases on q/k/v only, and an optional window on the layers
``layer_types`` names."""

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
from evoformer.checkpoint.hf.family import ROTARY_BUFFERS, Family, hf_defaults
from evoformer.config.schema import ModelConfig


def qwen2_to_model_config(hf: dict[str, Any]) -> ModelConfig:
    """Qwen2 ``config.json`` -> ModelConfig: LLaMA with biases on q/k/v (not o)."""
    c = hf_defaults(hf, QWEN2_DEFAULTS)
    window, every = qwen_window("qwen2", c)
    return llama_like("qwen2", c, qkv_bias=True, sliding_window=window, global_every=every)


def qwen2_to_hf_config(m: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> Qwen2 ``config.json``; UserError names any choice Qwen2 lacks."""
    check_llama_like("qwen2", m)
    return {
        **llama_like_to_hf("qwen2", "Qwen2ForCausalLM", m, head_dim_field=False),
        **qwen_window_to_hf(m),
    }


FAMILY = Family(
    name="qwen2",
    model_type="qwen2",
    architectures=("Qwen2ForCausalLM", "Qwen2Model"),
    to_model_config=qwen2_to_model_config,
    to_hf_config=qwen2_to_hf_config,
    rules=LLAMA_RULES,
    base_prefix="model.",
    ignore=ROTARY_BUFFERS,
)
