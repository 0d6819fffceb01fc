"""Mixtral: Mistral attention, every layer a softmax top-k MoE with renormalised weights."""

from __future__ import annotations

from typing import Any

from evoformer.checkpoint.hf.family import (
    ROTARY_BUFFERS,
    Family,
    WeightRule,
    attention_rules,
    check,
    hf_defaults,
    rule,
)
from evoformer.checkpoint.hf.moe import (
    aux_from_hf,
    aux_to_hf,
    check_moe_skeleton,
    expert_rules,
    gqa,
    gqa_to_hf,
    moe_skeleton,
    moe_skeleton_to_hf,
)
from evoformer.config.schema import ModelConfig, MoEConfig

MIXTRAL_DEFAULTS: dict[str, Any] = {
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
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "rope_theta": 1e6,
    "sliding_window": None,
    "attention_dropout": 0.0,
    "num_experts_per_tok": 2,
    "num_local_experts": 8,
    "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
    "router_jitter_noise": 0.0,
}


def mixtral_to_model_config(hf_cfg: dict[str, Any]) -> ModelConfig:
    """Mixtral ``config.json`` -> ModelConfig: Mistral attention, every layer a softmax top-k
    MoE with renormalised weights."""
    c = hf_defaults(hf_cfg, MIXTRAL_DEFAULTS)
    m = moe_skeleton("mixtral", c, gqa(c, sliding_window=c["sliding_window"]))
    m.moe = MoEConfig(
        num_experts=c["num_local_experts"],
        top_k=c["num_experts_per_tok"],
        expert_hidden=c["intermediate_size"],
        score="softmax",
        norm_topk_prob=True,
        aux_loss_coef=aux_from_hf(c),
    )
    return m


def mixtral_notes(hf_cfg: dict[str, Any], m: ModelConfig) -> tuple[str, ...]:
    """Router jitter is train-time noise on the router input (HF applies it only in training):
    the function is the same without it, and evoformer trains without it."""
    jitter = hf_cfg.get("router_jitter_noise")
    if not jitter:
        return ()
    return (f"dropped router_jitter_noise={jitter} (train-time router noise; evoformer has none)",)


def mixtral_to_hf_config(m: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> Mixtral ``config.json``; UserError names any choice Mixtral lacks."""
    check_moe_skeleton("mixtral", m, "mha")
    moe = m.moe
    check(
        "mixtral",
        [
            (
                moe.first_k_dense or moe.layer_freq != 1,
                f"model.moe.first_k_dense={moe.first_k_dense}, layer_freq={moe.layer_freq} "
                "(every Mixtral layer is MoE)",
            ),
            (moe.score != "softmax", f"model.moe.score={moe.score} (needs softmax)"),
            (not moe.norm_topk_prob, "model.moe.norm_topk_prob=false"),
            (moe.routed_scaling != 1, f"model.moe.routed_scaling={moe.routed_scaling}"),
            (moe.n_groups > 1, f"model.moe.n_groups={moe.n_groups}"),
            (m.shared_width, "shared experts"),
            (m.mtp.depth, f"model.mtp.depth={m.mtp.depth}"),
        ],
    )
    return {
        **moe_skeleton_to_hf("mixtral", "MixtralForCausalLM", m),
        **gqa_to_hf(m),
        "intermediate_size": m.expert_width,
        "sliding_window": m.attention.sliding_window,
        "num_local_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "router_jitter_noise": 0.0,
        **aux_to_hf(m),
    }


MIXTRAL_RULES = (
    rule("model.embed_tokens.weight", "embed.weight"),
    rule("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
    *attention_rules("qkvo"),
    rule("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.weight"),
    rule("model.layers.{i}.block_sparse_moe.gate.weight", "layers.{i}.mlp.router.weight"),
    rule("model.norm.weight", "norm.weight"),
    rule("lm_head.weight", "head.weight"),
)


def mixtral_expert_rules(m: ModelConfig) -> tuple[WeightRule, ...]:
    """Per-expert slices (Mixtral names the matrices w1 / w3 / w2)."""
    names = (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))
    return expert_rules("block_sparse_moe", names, m)


FAMILY = Family(
    name="mixtral",
    model_type="mixtral",
    architectures=("MixtralForCausalLM", "MixtralModel"),
    to_model_config=mixtral_to_model_config,
    to_hf_config=mixtral_to_hf_config,
    rules=MIXTRAL_RULES,
    base_prefix="model.",
    ignore=ROTARY_BUFFERS,
    extra_rules=mixtral_expert_rules,
    notes=mixtral_notes,
)
