"""DeepSeek-V2 / V2-Lite / V2.5: MLA attention (V2-Lite: a full-rank query), the first k
layers dense, then softmax-scored DeepSeekMoE with shared experts.

What differs from DeepSeek-V3 (whose tensor names and interleaved-RoPE permutation it shares):
- the router: softmax scores, no selection bias, gate weights not renormalised (HF's class
  ignores ``norm_topk_prob``; every release sets it false, and true is refused), times
  ``routed_scaling_factor``;
- ``topk_method``: ``greedy`` (V2-Lite) is plain top-k; ``group_limited_greedy`` (V2, V2.5)
  keeps the ``topk_group`` groups whose *best* expert scores highest (V3 sums the two best):
  our ``moe.group_score: max``;
- RoPE always rotates interleaved pairs (no ``rope_interleave`` key), YaRN with DeepSeek's
  softmax gain as in V3; no MTP modules;
- ``aux_loss_alpha`` (the expert-level balance loss weight, 0.001) is our
  ``moe.aux_loss_coef``. The device- and communication-balance losses of the V2 report have no
  config key and are not reproduced.
"""

from __future__ import annotations

from typing import Any

import torch

from evoformer.checkpoint.hf.deepseek_v3 import (
    DEEPSEEK_V3_RULES,
    interleaved_to_halves,
)
from evoformer.checkpoint.hf.family import (
    ROTARY_BUFFERS,
    Family,
    WeightRule,
    check,
    hf_defaults,
)
from evoformer.checkpoint.hf.moe import (
    GATED,
    check_moe_skeleton,
    expert_rules,
    moe_skeleton,
    moe_skeleton_to_hf,
)
from evoformer.config.schema import AttentionConfig, ModelConfig, MoEConfig

# DeepseekV2Config's defaults (transformers 5), for keys a file omits.
DEEPSEEK_V2_DEFAULTS: dict[str, Any] = {
    "vocab_size": 102400,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "moe_intermediate_size": 1407,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "n_shared_experts": 2,
    "n_routed_experts": 64,
    "routed_scaling_factor": 1.0,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "n_group": None,
    "topk_group": None,
    "topk_method": "greedy",
    "num_experts_per_tok": None,
    "first_k_dense_replace": 0,
    "norm_topk_prob": False,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "aux_loss_alpha": 0.0,
}

TOPK_METHODS = ("greedy", "group_limited_greedy")


def deepseek_v2_to_model_config(hf_cfg: dict[str, Any]) -> ModelConfig:
    """DeepSeek-V2 ``config.json`` -> ModelConfig."""
    c = hf_defaults(hf_cfg, DEEPSEEK_V2_DEFAULTS)
    method = c["topk_method"]
    check(
        "deepseek_v2",
        [
            (
                method not in TOPK_METHODS,
                f"topk_method={method!r} (supported: greedy, group_limited_greedy)",
            ),
            (
                hf_cfg.get("scoring_func", "softmax") != "softmax",
                f"scoring_func={hf_cfg.get('scoring_func')!r}",
            ),
            (
                hf_cfg.get("moe_layer_freq", 1) != 1,
                f"moe_layer_freq={hf_cfg.get('moe_layer_freq')}",
            ),
            (
                bool(c["norm_topk_prob"]),
                "norm_topk_prob=true (HF's DeepSeek-V2 never renormalises the gate weights)",
            ),
            (bool(c["mlp_bias"]), "mlp_bias=true (evoformer's experts carry no biases)"),
            (not c["n_shared_experts"], "n_shared_experts=0 (HF's DeepSeek-V2 always has them)"),
            (not c["num_experts_per_tok"], f"num_experts_per_tok={c['num_experts_per_tok']}"),
        ],
    )
    attention = AttentionConfig(
        kind="mla",
        n_heads=c["num_attention_heads"],
        bias=bool(c["attention_bias"]),
        dropout=float(c["attention_dropout"]),
        q_lora_rank=c["q_lora_rank"] or 0,  # null (V2-Lite): a full-rank query
        kv_lora_rank=c["kv_lora_rank"],
        qk_nope_head_dim=c["qk_nope_head_dim"],
        qk_rope_head_dim=c["qk_rope_head_dim"],
        v_head_dim=c["v_head_dim"],
    )
    m = moe_skeleton("deepseek_v2", c, attention)
    grouped = method == "group_limited_greedy"
    m.moe = MoEConfig(
        num_experts=c["n_routed_experts"],
        top_k=c["num_experts_per_tok"],
        expert_hidden=c["moe_intermediate_size"],
        num_shared_experts=c["n_shared_experts"],
        score="softmax",
        norm_topk_prob=False,
        routed_scaling=float(c["routed_scaling_factor"]),
        # greedy ignores the group keys (V2-Lite ships n_group 1 anyway)
        n_groups=(c["n_group"] or 1) if grouped else 1,
        topk_groups=(c["topk_group"] or 1) if grouped else 1,
        group_score="max",
        first_k_dense=c["first_k_dense_replace"] or 0,
        aux_loss_coef=float(c["aux_loss_alpha"] or 0.0),
    )
    return m


def deepseek_v2_notes(hf_cfg: dict[str, Any], m: ModelConfig) -> tuple[str, ...]:
    """What the import carries and drops of DeepSeek-V2's balancing."""
    return (
        f"load balancing: model.moe.aux_loss_coef={m.moe.aux_loss_coef} (aux_loss_alpha, the "
        "expert-level loss); the V2 report's device- and communication-level losses have no "
        "config key and are not reproduced",
    )


def deepseek_v2_to_hf_config(m: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> DeepSeek-V2 ``config.json``; UserError names any choice it lacks."""
    check_moe_skeleton("deepseek_v2", m, "mla")
    moe, a = m.moe, m.attention
    expert, shared = m.expert_width, m.shared_width
    grouped = moe.n_groups > 1
    check(
        "deepseek_v2",
        [
            (
                moe.layer_freq != 1 and moe.first_k_dense < m.n_layers,
                f"model.moe.layer_freq={moe.layer_freq} "
                "(DeepSeek-V2: every layer after the dense ones)",
            ),
            (moe.score != "softmax", f"model.moe.score={moe.score} (needs softmax)"),
            (moe.norm_topk_prob, "model.moe.norm_topk_prob=true (DeepSeek-V2 never renormalises)"),
            (
                grouped and moe.group_score != "max",
                f"model.moe.group_score={moe.group_score} (group_limited_greedy needs max)",
            ),
            (
                not shared or shared % expert,
                f"shared experts of width {shared} (needs a positive multiple of {expert})",
            ),
            (m.mtp.depth > 0, f"model.mtp.depth={m.mtp.depth} (DeepSeek-V2 has no MTP)"),
            (a.scale is not None, f"model.attention.scale={a.scale}"),
        ],
    )
    return {
        **moe_skeleton_to_hf("deepseek_v2", "DeepseekV2ForCausalLM", m),
        "num_key_value_heads": a.n_heads,
        "intermediate_size": m.mlp.hidden,
        "moe_intermediate_size": expert,
        "n_shared_experts": shared // expert,
        "n_routed_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "routed_scaling_factor": moe.routed_scaling,
        "norm_topk_prob": False,
        "scoring_func": "softmax",
        "topk_method": "group_limited_greedy" if grouped else "greedy",
        "n_group": moe.n_groups,
        "topk_group": moe.topk_groups,
        "first_k_dense_replace": moe.first_k_dense,
        "moe_layer_freq": 1,
        "q_lora_rank": a.q_lora_rank or None,
        "kv_lora_rank": a.kv_lora_rank,
        "qk_nope_head_dim": a.qk_nope_head_dim,
        "qk_rope_head_dim": a.qk_rope_head_dim,
        "v_head_dim": a.v_head_dim,
        "attention_bias": a.bias,
        "mlp_bias": False,
        "aux_loss_alpha": moe.aux_loss_coef,
    }


# DeepSeek-V3's names minus its router bias (V2 has none; a rule without a tensor is skipped).
DEEPSEEK_V2_RULES = tuple(r for r in DEEPSEEK_V3_RULES if "e_score_correction_bias" not in r.hf)


def deepseek_v2_extra_rules(m: ModelConfig) -> tuple[WeightRule, ...]:
    """One rule per expert matrix."""
    return expert_rules("mlp", GATED, m)


def deepseek_v2_transform(
    name: str, t: torch.Tensor, hf_cfg: dict[str, Any], to_ours: bool
) -> torch.Tensor:
    """HF's DeepSeek-V2 always rotates interleaved pairs: permute the rope rows to halves."""
    return interleaved_to_halves(name, t, hf_defaults(hf_cfg, DEEPSEEK_V2_DEFAULTS), to_ours)


FAMILY = Family(
    name="deepseek_v2",
    model_type="deepseek_v2",
    architectures=("DeepseekV2ForCausalLM", "DeepseekV2Model"),
    to_model_config=deepseek_v2_to_model_config,
    to_hf_config=deepseek_v2_to_hf_config,
    rules=DEEPSEEK_V2_RULES,
    base_prefix="model.",
    ignore=ROTARY_BUFFERS,
    extra_rules=deepseek_v2_extra_rules,
    transform=deepseek_v2_transform,
    notes=deepseek_v2_notes,
)
