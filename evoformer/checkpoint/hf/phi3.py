"""Phi-3 / Phi-4 (``model_type: phi3``): LLaMA's block with the q/k/v projections fused into
one ``qkv_proj`` and the SwiGLU gate and up projections fused into one ``gate_up_proj``.

- Fused tensors: ``qkv_proj`` rows are [q (heads x head_dim); k; v (kv heads x head_dim)],
  ``gate_up_proj`` rows are [gate; up], exactly our separate projections stacked; import splits
  them (``WeightRule`` with several of ours) and export stacks them again, tensor by tensor, so
  sharded streaming conversion is unchanged.
- ``resid_pdrop`` is our residual ``model.dropout`` (0 in every release; HF's class applies no
  embedding dropout, so a non-zero value, which ours would also apply to the embedding, is
  refused); ``embd_pdrop`` is read by no HF code and dropped.
- RoPE: transformers' Phi-3 class accepts only default and ``longrope`` RoPE; longrope
  (Phi-3.5, Phi-4-mini) and ``partial_rotary_factor`` < 1 (Phi-4-mini) are refused by name.
  ``original_max_position_embeddings`` only parameterises longrope.
- ``sliding_window``: a window on every layer (Phi-3-mini: 2047) or none (Phi-4: null).
"""

from __future__ import annotations

from typing import Any

from evoformer.checkpoint.hf.dense import check_llama_like, llama_like, llama_like_to_hf
from evoformer.checkpoint.hf.family import (
    ROTARY_BUFFERS,
    Family,
    WeightRule,
    check,
    hf_defaults,
    rule,
    unsupported,
)
from evoformer.config.schema import ModelConfig

# Phi3Config's defaults (transformers 5), for keys a file omits.
PHI3_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32064,
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attention_dropout": 0.0,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "original_max_position_embeddings": 4096,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "sliding_window": None,
}


def phi3_to_model_config(hf: dict[str, Any]) -> ModelConfig:
    """Phi-3 / Phi-4 ``config.json`` -> ModelConfig."""
    c = hf_defaults(hf, PHI3_DEFAULTS)
    check(
        "phi3",
        [
            (
                bool(c["resid_pdrop"]),
                f"resid_pdrop={c['resid_pdrop']} (evoformer's dropout also drops embeddings)",
            ),
            # HF's Phi-3 projections never carry biases, whatever the file says.
            (bool(c.get("attention_bias")), "attention_bias=true (HF's Phi-3 has no biases)"),
        ],
    )
    m = llama_like("phi3", c, sliding_window=c["sliding_window"])
    kind = m.position.rope_scaling.kind
    if kind != "none":
        raise unsupported(
            "phi3", f"rope_type={kind!r} (transformers' Phi-3 takes default or longrope RoPE)"
        )
    return m


def phi3_to_hf_config(m: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> Phi-3 ``config.json``; UserError names any choice Phi-3 lacks."""
    check_llama_like("phi3", m)
    a = m.attention
    check(
        "phi3",
        [
            (a.has_qkv_bias or a.bias, "model.attention.bias=true (Phi-3 has no biases)"),
            (
                m.position.rope_scaling.kind != "none",
                f"model.position.rope_scaling.kind={m.position.rope_scaling.kind} "
                "(transformers' Phi-3 takes default or longrope RoPE)",
            ),
        ],
    )
    return {
        **llama_like_to_hf("phi3", "Phi3ForCausalLM", m, head_dim_field=False),
        "sliding_window": a.sliding_window,
        "original_max_position_embeddings": m.max_seq_len,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attention_bias": False,
    }


PHI3_RULES: tuple[WeightRule, ...] = (
    rule("model.embed_tokens.weight", "embed.weight"),
    rule("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
    rule(
        "model.layers.{i}.self_attn.qkv_proj.weight",
        *(f"layers.{{i}}.attn.{p}_proj.weight" for p in "qkv"),
    ),
    rule("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attn.o_proj.weight"),
    rule("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.weight"),
    rule(
        "model.layers.{i}.mlp.gate_up_proj.weight",
        "layers.{i}.mlp.gate_proj.weight",
        "layers.{i}.mlp.up_proj.weight",
    ),
    rule("model.layers.{i}.mlp.down_proj.weight", "layers.{i}.mlp.down_proj.weight"),
    rule("model.norm.weight", "norm.weight"),
    rule("lm_head.weight", "head.weight"),
)

FAMILY = Family(
    name="phi3",
    model_type="phi3",
    architectures=("Phi3ForCausalLM", "Phi3Model"),
    to_model_config=phi3_to_model_config,
    to_hf_config=phi3_to_hf_config,
    rules=PHI3_RULES,
    base_prefix="model.",
    ignore=ROTARY_BUFFERS,
)
