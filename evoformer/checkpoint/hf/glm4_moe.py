"""GLM-4.5 / 4.6 (``glm4_moe``): GQA with q/k/v biases (no o_proj bias), per-head QK-norm
(``use_qk_norm``), partial RoPE (``partial_rotary_factor``: the leading half of each head is
rotated, the rest carries no position), the first ``first_k_dense_replace`` layers dense, then
a DeepSeek-V3-style MoE: sigmoid scores with a selection bias (``e_score_correction_bias``,
the aux-loss-free balancing of "noaux_tc"), group-limited top-k, ``routed_scaling_factor``, and
shared experts.

Balancing: the selection bias is updated at DeepSeek-V3's rate (0.001; the GLM-4.5 report uses
the same loss-free balancing), since config.json has no key for it. MTP: GLM-4.5 files store
their ``num_nextn_predict_layers`` modules as decoder layers ``n_layers + k`` in DeepSeek-V3's
layout; HF's model neither builds nor saves them, so the depth is taken from the weights present.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from evoformer.checkpoint.hf.family import (
    GATED_MLP_RULES,
    ROTARY_BUFFERS,
    Family,
    WeightRule,
    check,
    hf_defaults,
    qk_norm_rules,
    rule,
)
from evoformer.checkpoint.hf.moe import (
    SHARED_EXPERT_ROUTER_RULES,
    check_moe_skeleton,
    experts_and_mtp_rules,
    gqa,
    gqa_to_hf,
    moe_skeleton,
    moe_skeleton_to_hf,
)
from evoformer.config.schema import ModelConfig, MoEConfig, MTPConfig

GLM4_MOE_DEFAULTS: dict[str, Any] = {
    "vocab_size": 151552,
    "hidden_size": 4096,
    "intermediate_size": 10944,
    "num_hidden_layers": 46,
    "num_attention_heads": 96,
    "num_key_value_heads": 8,
    "head_dim": None,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "partial_rotary_factor": 0.5,  # set by Glm4MoeConfig when a file omits it
    "attention_bias": False,
    "attention_dropout": 0.0,
    "moe_intermediate_size": 1408,
    "num_experts_per_tok": 8,
    "n_shared_experts": 1,
    "n_routed_experts": 128,
    "routed_scaling_factor": 1.0,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "norm_topk_prob": True,
    "use_qk_norm": False,
    "num_nextn_predict_layers": 1,
}

# Aux-loss-free balancing speed (DeepSeek-V3's gamma), which config.json does not carry.
BIAS_UPDATE_RATE = 0.001


def glm4_moe_to_model_config(hf_cfg: dict[str, Any]) -> ModelConfig:
    """GLM-4.5 ``config.json`` -> ModelConfig."""
    c = hf_defaults(hf_cfg, GLM4_MOE_DEFAULTS)
    attention = gqa(
        c,
        bias=False,  # o_proj never has one in HF's Glm4MoeAttention
        qkv_bias=bool(c["attention_bias"]),
        qk_norm="head" if c["use_qk_norm"] else "none",
    )
    m = moe_skeleton("glm4_moe", c, attention, partial_rotary=True)
    m.moe = MoEConfig(
        num_experts=c["n_routed_experts"],
        top_k=c["num_experts_per_tok"],
        expert_hidden=c["moe_intermediate_size"],
        num_shared_experts=c["n_shared_experts"] or 0,
        score="sigmoid",
        norm_topk_prob=bool(c["norm_topk_prob"]),
        routed_scaling=float(c["routed_scaling_factor"]),
        n_groups=c["n_group"] or 1,
        topk_groups=c["topk_group"] or 1,
        first_k_dense=c["first_k_dense_replace"] or 0,
        bias_update_rate=BIAS_UPDATE_RATE,
    )
    m.mtp = MTPConfig(depth=c["num_nextn_predict_layers"] or 0)
    return m


def glm4_moe_refine(m: ModelConfig, names: set[str]) -> ModelConfig:
    """No MTP modules unless the files hold them."""
    if m.mtp.depth and f"model.layers.{m.n_layers}.eh_proj.weight" not in names:
        return dataclasses.replace(m, mtp=MTPConfig(depth=0))
    return m


def glm4_moe_notes(hf_cfg: dict[str, Any], m: ModelConfig) -> tuple[str, ...]:
    return (
        f"aux-loss-free balancing on: model.moe.bias_update_rate={m.moe.bias_update_rate} "
        "(config.json has no key for it; 0 freezes the router bias)",
    )


def glm4_moe_to_hf_config(m: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> GLM-4.5 ``config.json``; UserError names any choice it lacks."""
    check_moe_skeleton("glm4_moe", m, "mha")
    moe, a = m.moe, m.attention
    expert, shared = m.expert_width, m.shared_width
    check(
        "glm4_moe",
        [
            (a.bias, "model.attention.bias=true (GLM-4.5's o_proj has no bias)"),
            (a.qk_norm == "full", "model.attention.qk_norm=full (GLM-4.5 normalises per head)"),
            (a.sliding_window is not None, f"model.attention.sliding_window={a.sliding_window}"),
            (a.scale is not None, f"model.attention.scale={a.scale}"),
            (a.sinks, "model.attention.sinks=true"),
            (moe.score != "sigmoid", f"model.moe.score={moe.score} (needs sigmoid)"),
            (
                moe.layer_freq != 1 and moe.first_k_dense < m.n_layers,
                f"model.moe.layer_freq={moe.layer_freq} (every layer after the dense ones)",
            ),
            (shared % expert if shared else False, f"shared experts of width {shared}"),
            (moe.router_bias or moe.expert_bias, "router or expert biases"),
            (
                moe.first_k_dense > m.n_layers and m.mtp.depth,
                f"model.moe.first_k_dense={moe.first_k_dense} with MTP (the MTP blocks are MoE)",
            ),
        ],
    )
    return {
        **moe_skeleton_to_hf("glm4_moe", "Glm4MoeForCausalLM", m),
        **gqa_to_hf(m),
        "intermediate_size": m.mlp.hidden,
        "moe_intermediate_size": expert,
        "attention_bias": a.has_qkv_bias,
        "use_qk_norm": a.qk_norm == "head",
        "n_shared_experts": shared // expert,
        "n_routed_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "routed_scaling_factor": moe.routed_scaling,
        "norm_topk_prob": moe.norm_topk_prob,
        "n_group": moe.n_groups,
        "topk_group": moe.topk_groups,
        "first_k_dense_replace": moe.first_k_dense,
        "num_nextn_predict_layers": m.mtp.depth,
        "partial_rotary_factor": m.position.partial_rotary,
    }


GLM4_MOE_RULES = (
    rule("model.embed_tokens.weight", "embed.weight"),
    rule("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
    *(
        rule(f"model.layers.{{i}}.self_attn.{p}_proj.{t}", f"layers.{{i}}.attn.{p}_proj.{t}")
        for p in "qkv"
        for t in ("weight", "bias")
    ),
    rule("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attn.o_proj.weight"),
    *qk_norm_rules(),
    rule("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.weight"),
    *GATED_MLP_RULES,
    *SHARED_EXPERT_ROUTER_RULES,
    rule("model.norm.weight", "norm.weight"),
    rule("lm_head.weight", "head.weight"),
)


def glm4_moe_extra_rules(m: ModelConfig) -> tuple[WeightRule, ...]:
    """Per-expert slices, and the MTP modules as decoder layers ``n_layers + k``."""
    return experts_and_mtp_rules(m, GLM4_MOE_RULES)


FAMILY = Family(
    name="glm4_moe",
    model_type="glm4_moe",
    architectures=("Glm4MoeForCausalLM", "Glm4MoeModel"),
    to_model_config=glm4_moe_to_model_config,
    to_hf_config=glm4_moe_to_hf_config,
    rules=GLM4_MOE_RULES,
    base_prefix="model.",
    ignore=ROTARY_BUFFERS,
    extra_rules=glm4_moe_extra_rules,
    refine=glm4_moe_refine,
    notes=glm4_moe_notes,
)
