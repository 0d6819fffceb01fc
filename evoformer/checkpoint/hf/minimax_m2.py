"""MiniMax-M2 (``minimax_m2``): GQA with RMSNorm over the whole q and k projections
(``qk_norm_type: per_layer``, our ``qk_norm: full``), partial RoPE (``rotary_dim`` of each head),
and an MoE on every layer with sigmoid scores, a selection bias (``use_routing_bias``:
``e_score_correction_bias``), the chosen scores renormalised, no shared expert; Mixtral's tensor
names (``block_sparse_moe.experts.{e}.w1/w3/w2``). The release ships FP8 block-scaled weights,
dequantized as DeepSeek's (``fp8.py``).

HF's class ignores the keys of MiniMax's own code about MTP modules (``use_mtp``,
``num_mtp_modules``, ``mtp_transformer_layers``) and builds full attention on every layer; the
import refuses ``attn_type_list`` entries other than 1 (full attention), a disabled routing bias
or non-sigmoid scores, rather than compute something else. The selection bias is updated at
0.001 (DeepSeek-V3's rate; config.json has no key for it).
"""

from __future__ import annotations

from typing import Any

from evoformer.checkpoint.hf.family import (
    ROTARY_BUFFERS,
    Family,
    attention_rules,
    check,
    hf_defaults,
    qk_norm_rules,
    rule,
)
from evoformer.checkpoint.hf.mixtral import mixtral_expert_rules
from evoformer.checkpoint.hf.moe import (
    aux_from_hf,
    aux_to_hf,
    check_moe_skeleton,
    gqa,
    gqa_to_hf,
    moe_skeleton,
    moe_skeleton_to_hf,
)
from evoformer.config.schema import ModelConfig, MoEConfig

MINIMAX_M2_DEFAULTS: dict[str, Any] = {
    "vocab_size": 200064,
    "hidden_size": 3072,
    "intermediate_size": 1536,
    "num_hidden_layers": 62,
    "num_attention_heads": 48,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 196608,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "attention_dropout": 0.0,
    "num_experts_per_tok": 8,
    "num_local_experts": 256,
    "router_aux_loss_coef": 0.001,
    "rope_theta": 5000000.0,
    "rotary_dim": None,
}

BIAS_UPDATE_RATE = 0.001


def minimax_m2_to_model_config(hf_cfg: dict[str, Any]) -> ModelConfig:
    """MiniMax-M2 ``config.json`` -> ModelConfig."""
    c = hf_defaults(hf_cfg, MINIMAX_M2_DEFAULTS)
    types = c.get("attn_type_list") or []
    check(
        "minimax_m2",
        [
            (any(t != 1 for t in types), f"attn_type_list={types} (1 = full attention only)"),
            (c.get("scoring_func", "sigmoid") != "sigmoid", f"scoring_func={c['scoring_func']!r}"),
            (c.get("use_routing_bias") is False, "use_routing_bias=false"),
            (
                c.get("use_qk_norm", True) and c.get("qk_norm_type", "per_layer") != "per_layer",
                f"qk_norm_type={c.get('qk_norm_type')!r} (HF's class normalises per layer)",
            ),
            (c.get("shared_intermediate_size") or 0, "shared_intermediate_size > 0"),
        ],
    )
    head_dim = c["head_dim"] or c["hidden_size"] // c["num_attention_heads"]
    if c["rotary_dim"] is not None and "partial_rotary_factor" not in c:
        c = {**c, "partial_rotary_factor": c["rotary_dim"] / head_dim}  # as HF's config does
    # HF's attention always normalises q and k over the whole projection.
    attention = gqa(c, bias=False, qk_norm="full")
    m = moe_skeleton("minimax_m2", c, attention, partial_rotary=True)
    m.moe = MoEConfig(
        num_experts=c["num_local_experts"],
        top_k=c["num_experts_per_tok"],
        expert_hidden=c["intermediate_size"],
        score="sigmoid",
        norm_topk_prob=True,
        aux_loss_coef=aux_from_hf(c),
        bias_update_rate=BIAS_UPDATE_RATE,
    )
    return m


def minimax_m2_notes(hf_cfg: dict[str, Any], m: ModelConfig) -> tuple[str, ...]:
    out = [
        f"aux-loss-free balancing on: model.moe.bias_update_rate={m.moe.bias_update_rate} "
        "(config.json has no key for it; 0 freezes the router bias)"
    ]
    if hf_cfg.get("use_mtp"):
        out.append("use_mtp / num_mtp_modules: not read (HF's MiniMax-M2 builds no MTP modules)")
    return tuple(out)


def minimax_m2_to_hf_config(m: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> MiniMax-M2 ``config.json``; UserError names any choice it lacks."""
    check_moe_skeleton("minimax_m2", m, "mha")
    a, moe = m.attention, m.moe
    check(
        "minimax_m2",
        [
            (a.has_qkv_bias or a.bias, "attention biases"),
            (a.qk_norm != "full", f"model.attention.qk_norm={a.qk_norm} (needs full)"),
            (a.sliding_window is not None, f"model.attention.sliding_window={a.sliding_window}"),
            (a.scale is not None or a.sinks, "model.attention.scale / sinks"),
            (moe.score != "sigmoid", f"model.moe.score={moe.score} (needs sigmoid)"),
            (not moe.norm_topk_prob, "model.moe.norm_topk_prob=false"),
            (moe.routed_scaling != 1, f"model.moe.routed_scaling={moe.routed_scaling}"),
            (moe.n_groups > 1, f"model.moe.n_groups={moe.n_groups}"),
            (moe.first_k_dense or moe.layer_freq != 1, "dense layers (every layer is MoE)"),
            (m.shared_width, "shared experts"),
            (moe.router_bias or moe.expert_bias, "router or expert biases"),
            (m.mtp.depth, f"model.mtp.depth={m.mtp.depth}"),
        ],
    )
    return {
        **moe_skeleton_to_hf("minimax_m2", "MiniMaxM2ForCausalLM", m),
        **gqa_to_hf(m),
        "intermediate_size": m.expert_width,
        "num_local_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "rotary_dim": m.rotary_dim,
        "use_qk_norm": True,
        "qk_norm_type": "per_layer",
        "scoring_func": "sigmoid",
        "use_routing_bias": True,
        "attn_type_list": [1] * m.n_layers,
        **aux_to_hf(m),
    }


MINIMAX_M2_RULES = (
    rule("model.embed_tokens.weight", "embed.weight"),
    rule("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
    *attention_rules("qkvo"),
    *qk_norm_rules(),
    rule("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.weight"),
    rule("model.layers.{i}.block_sparse_moe.gate.weight", "layers.{i}.mlp.router.weight"),
    rule(
        "model.layers.{i}.block_sparse_moe.e_score_correction_bias",
        "layers.{i}.mlp.e_score_correction_bias",
    ),
    rule("model.norm.weight", "norm.weight"),
    rule("lm_head.weight", "head.weight"),
)


FAMILY = Family(
    name="minimax_m2",
    model_type="minimax_m2",
    architectures=("MiniMaxM2ForCausalLM", "MiniMaxM2Model"),
    to_model_config=minimax_m2_to_model_config,
    to_hf_config=minimax_m2_to_hf_config,
    rules=MINIMAX_M2_RULES,
    base_prefix="model.",
    ignore=ROTARY_BUFFERS,
    extra_rules=mixtral_expert_rules,  # Mixtral's names: w1 / w3 / w2
    notes=minimax_m2_notes,
)
