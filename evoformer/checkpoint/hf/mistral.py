"""Mistral: LLaMA with a sliding window on every layer."""

from __future__ import annotations

from typing import Any

from evoformer.checkpoint.hf.dense import (
    LLAMA_RULES,
    check_llama_like,
    llama_like,
    llama_like_to_hf,
)
from evoformer.checkpoint.hf.family import ROTARY_BUFFERS, Family, hf_defaults
from evoformer.config.schema import ModelConfig

MISTRAL_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": None,
    "hidden_act": "silu",
    "max_position_embeddings": 4096 * 32,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "attention_dropout": 0.0,
}


def mistral_to_model_config(hf: dict[str, Any]) -> ModelConfig:
    """Mistral ``config.json`` -> ModelConfig: LLaMA with a sliding window on every layer."""
    c = hf_defaults(hf, MISTRAL_DEFAULTS)
    return llama_like("mistral", c, sliding_window=c["sliding_window"])


def mistral_to_hf_config(m: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> Mistral ``config.json``; UserError names any choice Mistral lacks."""
    check_llama_like("mistral", m)
    return {
        **llama_like_to_hf("mistral", "MistralForCausalLM", m, head_dim_field=True),
        "sliding_window": m.attention.sliding_window,
    }


FAMILY = Family(
    name="mistral",
    model_type="mistral",
    architectures=("MistralForCausalLM", "MistralModel"),
    to_model_config=mistral_to_model_config,
    to_hf_config=mistral_to_hf_config,
    rules=LLAMA_RULES,
    base_prefix="model.",
    ignore=ROTARY_BUFFERS,
    # Mistral Small 3.1 / Pixtral-style releases: the text model is a Mistral.
    wrappers={"mistral3": ("Mistral3ForConditionalGeneration",)},
)
