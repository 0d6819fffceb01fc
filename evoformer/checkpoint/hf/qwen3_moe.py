"""Qwen3-MoE: Qwen3 attention (per-head q/k RMSNorm), softmax top-k MoE on the layers
``decoder_sparse_step`` + ``mlp_only_layers`` pick, accepted where our ``first_k_dense`` +
``layer_freq`` give the same MoE layers."""

from __future__ import annotations

from typing import Any

from evoformer.checkpoint.hf.family import (
    GATED_MLP_RULES,
    ROTARY_BUFFERS,
    Family,
    WeightRule,
    attention_rules,
    check,
    hf_defaults,
    qk_norm_rules,
    rule,
    unsupported,
)
from evoformer.checkpoint.hf.moe import (
    GATED,
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
from evoformer.model.layout import layer_spec

QWEN3_MOE_DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_hidden_layers": 24,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": None,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "use_sliding_window": False,
    "sliding_window": None,
    "attention_dropout": 0.0,
    "decoder_sparse_step": 1,
    "moe_intermediate_size": 768,
    "num_experts_per_tok": 8,
    "num_experts": 128,
    "norm_topk_prob": False,
    "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
    "mlp_only_layers": [],
}


def _qwen_moe_layers(n_layers: int, step: int, mlp_only: list[int]) -> list[int]:
    # As Qwen3MoeDecoderLayer decides.
    return [i for i in range(n_layers) if i not in mlp_only and (i + 1) % step == 0]


def qwen3_moe_to_model_config(hf_cfg: dict[str, Any]) -> ModelConfig:
    """Qwen3-MoE ``config.json`` -> ModelConfig: Qwen3 attention (per-head q/k RMSNorm), softmax
    top-k MoE on the layers ``decoder_sparse_step``/``mlp_only_layers`` pick."""
    c = hf_defaults(hf_cfg, QWEN3_MOE_DEFAULTS)
    n_experts = hf_cfg.get("num_experts", hf_cfg.get("num_local_experts", c["num_experts"]))
    window = c["sliding_window"] if c["use_sliding_window"] else None
    attention = gqa(c, bias=bool(c["attention_bias"]), qk_norm="head", sliding_window=window)
    m = moe_skeleton("qwen3_moe", c, attention)
    step, mlp_only = c["decoder_sparse_step"], list(c["mlp_only_layers"] or [])
    theirs = _qwen_moe_layers(m.n_layers, step, mlp_only) if n_experts > 0 else []
    if not theirs:
        return m  # no MoE layer: a dense model
    m.moe = MoEConfig(
        num_experts=n_experts,
        top_k=c["num_experts_per_tok"],
        expert_hidden=c["moe_intermediate_size"],
        score="softmax",
        norm_topk_prob=bool(c["norm_topk_prob"]),
        first_k_dense=theirs[0],
        layer_freq=step,
        aux_loss_coef=aux_from_hf(c),
    )
    if [i for i in range(m.n_layers) if layer_spec(m, i).mlp == "moe"] != theirs:
        raise unsupported(
            "qwen3_moe",
            f"MoE layers {theirs} (decoder_sparse_step={step}, mlp_only_layers="
            f"{mlp_only}): evoformer's are every layer_freq-th from first_k_dense on",
        )
    return m


def qwen3_moe_to_hf_config(m: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> Qwen3-MoE ``config.json``; UserError names any choice it lacks."""
    check_moe_skeleton("qwen3_moe", m, "mha")
    moe = m.moe
    ours = [i for i in range(m.n_layers) if layer_spec(m, i).mlp == "moe"]
    step = moe.layer_freq
    mlp_only = [i for i in range(m.n_layers) if i not in ours and (i + 1) % step == 0]
    check(
        "qwen3_moe",
        [
            (
                _qwen_moe_layers(m.n_layers, step, mlp_only) != ours,
                f"model.moe.first_k_dense={moe.first_k_dense}, layer_freq={step} (Qwen3-MoE's MoE "
                "layers are those with (i + 1) % decoder_sparse_step == 0)",
            ),
            (moe.score != "softmax", f"model.moe.score={moe.score} (needs softmax)"),
            (moe.routed_scaling != 1, f"model.moe.routed_scaling={moe.routed_scaling}"),
            (moe.n_groups > 1, f"model.moe.n_groups={moe.n_groups}"),
            (m.shared_width, "shared experts"),
            (m.mtp.depth, f"model.mtp.depth={m.mtp.depth}"),
        ],
    )
    a = m.attention
    return {
        **moe_skeleton_to_hf("qwen3_moe", "Qwen3MoeForCausalLM", m),
        **gqa_to_hf(m),
        "intermediate_size": m.mlp.hidden,
        "moe_intermediate_size": m.expert_width,
        "attention_bias": a.bias,
        "use_sliding_window": a.sliding_window is not None,
        "sliding_window": a.sliding_window,
        "decoder_sparse_step": step,
        "mlp_only_layers": mlp_only,
        "num_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "norm_topk_prob": moe.norm_topk_prob,
        **aux_to_hf(m),
    }


QWEN3_MOE_RULES = (
    rule("model.embed_tokens.weight", "embed.weight"),
    rule("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
    *attention_rules("qkvo"),
    *qk_norm_rules(),
    rule("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.weight"),
    *GATED_MLP_RULES,
    rule("model.layers.{i}.mlp.gate.weight", "layers.{i}.mlp.router.weight"),
    rule("model.norm.weight", "norm.weight"),
    rule("lm_head.weight", "head.weight"),
)


def qwen3_moe_expert_rules(m: ModelConfig) -> tuple[WeightRule, ...]:
    """Per-expert slices."""
    return expert_rules("mlp", GATED, m)


FAMILY = Family(
    name="qwen3_moe",
    model_type="qwen3_moe",
    architectures=("Qwen3MoeForCausalLM", "Qwen3MoeModel"),
    to_model_config=qwen3_moe_to_model_config,
    to_hf_config=qwen3_moe_to_hf_config,
    rules=QWEN3_MOE_RULES,
    base_prefix="model.",
    ignore=ROTARY_BUFFERS,
    extra_rules=qwen3_moe_expert_rules,
)
