"""OLMo 2: norms on the sub-layer outputs (``reordered``), RMSNorm over the whole q / k
projection."""

from __future__ import annotations

from typing import Any

from evoformer.checkpoint.hf.dense import check_llama_like, llama_like, llama_like_to_hf
from evoformer.checkpoint.hf.family import (
    GATED_MLP_RULES,
    ROTARY_BUFFERS,
    Family,
    attention_rules,
    hf_defaults,
    qk_norm_rules,
    rule,
)
from evoformer.config.schema import ModelConfig

OLMO2_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50304,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "rms_norm_eps": 1e-5,
}


def olmo2_to_model_config(hf: dict[str, Any]) -> ModelConfig:
    """OLMo 2 ``config.json`` -> ModelConfig: norms on the sub-layer outputs, QK-norm over the
    whole projection."""
    c = hf_defaults(hf, OLMO2_DEFAULTS)
    m = llama_like("olmo2", c, bias=bool(c["attention_bias"]), qk_norm="full")
    m.norm.placement = "reordered"
    return m


def olmo2_to_hf_config(m: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> OLMo 2 ``config.json``; UserError names any choice OLMo 2 lacks."""
    check_llama_like("olmo2", m, placement="reordered")
    return {
        **llama_like_to_hf("olmo2", "Olmo2ForCausalLM", m, head_dim_field=False),
        "attention_bias": m.attention.bias,
    }


OLMO2_RULES = (
    rule("model.embed_tokens.weight", "embed.weight"),
    *attention_rules("qkvo"),
    *qk_norm_rules(),
    # reordered: our attn_norm / mlp_norm sit where OLMo 2 has its post-sub-layer norms.
    rule("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.attn_norm.weight"),
    rule("model.layers.{i}.post_feedforward_layernorm.weight", "layers.{i}.mlp_norm.weight"),
    *GATED_MLP_RULES,
    rule("model.norm.weight", "norm.weight"),
    rule("lm_head.weight", "head.weight"),
)

FAMILY = Family(
    name="olmo2",
    model_type="olmo2",
    architectures=("Olmo2ForCausalLM", "Olmo2Model"),
    to_model_config=olmo2_to_model_config,
    to_hf_config=olmo2_to_hf_config,
    rules=OLMO2_RULES,
    base_prefix="model.",
    ignore=ROTARY_BUFFERS,
)
