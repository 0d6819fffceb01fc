"""DeepSeek-V3: MLA attention, the first k layers dense, then sigmoid-scored, group-limited MoE
with shared experts, and MTP modules.

- The layer pattern: DeepSeek's ``first_k_dense_replace`` is our ``moe.first_k_dense``.
- MLA: its RoPE rotates interleaved pairs (``rope_interleave``, true in every DeepSeek release);
  ours rotates halves, which is the same function once the rope rows of ``q_b_proj``/``q_proj``
  and ``kv_a_proj_with_mqa`` are permuted (``Family.transform``; export writes the interleaved
  layout back). YaRN RoPE (DeepSeek-V3's long-context setting) maps to
  ``rope_scaling.kind: yarn``; MLA adds DeepSeek's softmax gain mscale(factor, mscale_all_dim)^2.
- MTP: checkpoints store module k as decoder layer ``n_layers + k`` (``enorm``, ``hnorm``,
  ``eh_proj``, ``shared_head.norm``, a full MoE block, and copies of the embedding and head).
  ``num_nextn_predict_layers`` counts the modules, but HF's own model neither builds nor saves
  them, so the depth is taken from the weights actually present (``Family.refine``); export
  writes them in the same layout (HF's ``DeepseekV3ForCausalLM`` ignores them, its ``MtpModel``
  and vLLM read them).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch

from evoformer.checkpoint.hf.family import (
    GATED_MLP_RULES,
    ROTARY_BUFFERS,
    Family,
    WeightRule,
    check,
    hf_defaults,
    rule,
)
from evoformer.checkpoint.hf.moe import (
    SHARED_EXPERT_ROUTER_RULES,
    check_moe_skeleton,
    experts_and_mtp_rules,
    moe_skeleton,
    moe_skeleton_to_hf,
)
from evoformer.config.schema import AttentionConfig, ModelConfig, MoEConfig, MTPConfig

DEEPSEEK_V3_DEFAULTS: dict[str, Any] = {
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "n_shared_experts": 1,
    "n_routed_experts": 256,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "n_group": 8,
    "topk_group": 4,
    "num_experts_per_tok": 8,
    "first_k_dense_replace": 3,
    "norm_topk_prob": True,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "rope_interleave": True,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "num_nextn_predict_layers": 1,
    "aux_loss_alpha": 0.0,
}

# The per-step update speed of the router's selection bias (the DeepSeek-V3 report's gamma,
# 0.001 for the first 14.3T tokens): set on import so continued pretraining keeps balancing.
BIAS_UPDATE_RATE = 0.001


def deepseek_v3_to_model_config(hf_cfg: dict[str, Any]) -> ModelConfig:
    """DeepSeek-V3 ``config.json`` -> ModelConfig: MLA, the first k layers dense, then sigmoid
    scored, group-limited MoE with shared experts; MTP modules as the checkpoint holds them."""
    c = hf_defaults(hf_cfg, DEEPSEEK_V3_DEFAULTS)
    # Keys of DeepSeek's own modeling code that HF's class does not read; refuse the values
    # HF would silently compute differently from the checkpoint's intent.
    check(
        "deepseek_v3",
        [
            (
                hf_cfg.get("scoring_func", "sigmoid") != "sigmoid",
                f"scoring_func={hf_cfg.get('scoring_func')!r}",
            ),
            (
                hf_cfg.get("moe_layer_freq", 1) != 1,
                f"moe_layer_freq={hf_cfg.get('moe_layer_freq')}",
            ),
            (not c["n_shared_experts"], "n_shared_experts=0 (HF's DeepSeek-V3 always has them)"),
        ],
    )
    attention = AttentionConfig(
        kind="mla",
        n_heads=c["num_attention_heads"],
        bias=bool(c["attention_bias"]),
        dropout=float(c["attention_dropout"]),
        q_lora_rank=c["q_lora_rank"] or 0,  # null: a full-rank query
        kv_lora_rank=c["kv_lora_rank"],
        qk_nope_head_dim=c["qk_nope_head_dim"],
        qk_rope_head_dim=c["qk_rope_head_dim"],
        v_head_dim=c["v_head_dim"],
    )
    m = moe_skeleton("deepseek_v3", c, attention)
    m.moe = MoEConfig(
        num_experts=c["n_routed_experts"],
        top_k=c["num_experts_per_tok"],
        expert_hidden=c["moe_intermediate_size"],
        num_shared_experts=c["n_shared_experts"],
        score="sigmoid",
        norm_topk_prob=bool(c["norm_topk_prob"]),
        routed_scaling=float(c["routed_scaling_factor"]),
        n_groups=c["n_group"] or 1,
        topk_groups=c["topk_group"] or 1,
        first_k_dense=c["first_k_dense_replace"] or 0,
        # DeepSeek's own config.json names the (sequence-wise) balance loss aux_loss_alpha.
        aux_loss_coef=float(c["aux_loss_alpha"] or 0.0),
        bias_update_rate=BIAS_UPDATE_RATE,
    )
    m.mtp = MTPConfig(depth=c["num_nextn_predict_layers"] or 0)
    return m


def deepseek_v3_notes(hf_cfg: dict[str, Any], m: ModelConfig) -> tuple[str, ...]:
    """What config.json does not say: the aux-loss-free balancing rate."""
    return (
        f"aux-loss-free balancing on: model.moe.bias_update_rate={m.moe.bias_update_rate} "
        "(DeepSeek-V3's gamma; config.json has no key for it, 0 freezes the router bias)",
    )


def deepseek_v3_refine(m: ModelConfig, names: set[str]) -> ModelConfig:
    """No MTP modules unless the files hold them (HF's model neither builds nor saves them,
    though its config counts one by default)."""
    if m.mtp.depth and f"model.layers.{m.n_layers}.eh_proj.weight" not in names:
        return dataclasses.replace(m, mtp=MTPConfig(depth=0))
    return m


def deepseek_v3_to_hf_config(m: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> DeepSeek-V3 ``config.json``; UserError names any choice it lacks."""
    check_moe_skeleton("deepseek_v3", m, "mla")
    moe, a = m.moe, m.attention
    expert, shared = m.expert_width, m.shared_width
    check(
        "deepseek_v3",
        [
            (
                moe.layer_freq != 1 and moe.first_k_dense < m.n_layers,
                f"model.moe.layer_freq={moe.layer_freq} "
                "(DeepSeek-V3: every layer after the dense ones)",
            ),
            (
                moe.first_k_dense > m.n_layers and m.mtp.depth,
                f"model.moe.first_k_dense={moe.first_k_dense} with MTP (HF's MTP blocks are MoE)",
            ),
            (moe.score != "sigmoid", f"model.moe.score={moe.score} (needs sigmoid)"),
            (
                not shared or shared % expert,
                f"shared experts of width {shared} (needs a positive multiple of {expert})",
            ),
            (a.scale is not None, f"model.attention.scale={a.scale}"),
        ],
    )
    return {
        **moe_skeleton_to_hf("deepseek_v3", "DeepseekV3ForCausalLM", m),
        "num_key_value_heads": a.n_heads,
        "intermediate_size": m.mlp.hidden,
        "moe_intermediate_size": expert,
        "n_shared_experts": shared // expert,
        "n_routed_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "routed_scaling_factor": moe.routed_scaling,
        "norm_topk_prob": moe.norm_topk_prob,
        "n_group": moe.n_groups,
        "topk_group": moe.topk_groups,
        "first_k_dense_replace": moe.first_k_dense,
        "q_lora_rank": a.q_lora_rank or None,
        "kv_lora_rank": a.kv_lora_rank,
        "qk_nope_head_dim": a.qk_nope_head_dim,
        "qk_rope_head_dim": a.qk_rope_head_dim,
        "v_head_dim": a.v_head_dim,
        "attention_bias": a.bias,
        "rope_interleave": True,  # DeepSeek's layout, which vLLM and SGLang assume
        "num_nextn_predict_layers": m.mtp.depth,
        "aux_loss_alpha": m.moe.aux_loss_coef,
    }


DEEPSEEK_V3_RULES = (
    rule("model.embed_tokens.weight", "embed.weight"),
    rule("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
    *(
        rule(f"model.layers.{{i}}.self_attn.{theirs}.{t}", f"layers.{{i}}.attn.{ours}.{t}")
        for theirs, ours, tensors in (
            ("q_proj", "q_proj", ("weight",)),
            ("q_a_proj", "q_a_proj", ("weight", "bias")),
            ("q_a_layernorm", "q_a_norm", ("weight",)),
            ("q_b_proj", "q_b_proj", ("weight",)),
            ("kv_a_proj_with_mqa", "kv_a_proj", ("weight", "bias")),
            ("kv_a_layernorm", "kv_a_norm", ("weight",)),
            ("kv_b_proj", "kv_b_proj", ("weight",)),
            ("o_proj", "o_proj", ("weight", "bias")),
        )
        for t in tensors
    ),
    rule("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.weight"),
    *GATED_MLP_RULES,
    *SHARED_EXPERT_ROUTER_RULES,
    rule("model.norm.weight", "norm.weight"),
    rule("lm_head.weight", "head.weight"),
)


def deepseek_v3_extra_rules(m: ModelConfig) -> tuple[WeightRule, ...]:
    """Per-expert slices, and the MTP modules as decoder layers ``n_layers + k``."""
    return experts_and_mtp_rules(m, DEEPSEEK_V3_RULES)


# q_b_proj / q_proj rows are per head [nope, rope]; kv_a_proj_with_mqa rows are [latent, rope].
_ROPE_ROWS = re.compile(r".*\.self_attn\.(q_proj|q_b_proj|kv_a_proj_with_mqa)\.(weight|bias)")


def interleaved_to_halves(
    name: str, t: torch.Tensor, c: dict[str, Any], to_ours: bool
) -> torch.Tensor:
    """Interleaved RoPE pairs (x0, x1), (x2, x3), ... -> halves (x0, x2, ...; x1, x3, ...)
    on import, and back on export, for the rope rows of the query and shared key; ``c``: the
    config with the family's defaults filled in."""
    match = _ROPE_ROWS.fullmatch(name)
    if match is None:
        return t
    R = c["qk_rope_head_dim"]
    perm = torch.cat([torch.arange(0, R, 2), torch.arange(1, R, 2)])
    idx = perm if to_ours else perm.argsort()
    t = t.clone()
    if match.group(1) == "kv_a_proj_with_mqa":
        t[-R:] = t[-R:][idx]
    else:
        heads = t.view(c["num_attention_heads"], c["qk_nope_head_dim"] + R, *t.shape[1:])
        heads[:, -R:] = heads[:, -R:][:, idx]
    return t


def deepseek_v3_transform(
    name: str, t: torch.Tensor, hf_cfg: dict[str, Any], to_ours: bool
) -> torch.Tensor:
    """:func:`interleaved_to_halves` unless the file says ``rope_interleave: false``."""
    if not hf_cfg.get("rope_interleave", True):
        return t
    return interleaved_to_halves(name, t, hf_defaults(hf_cfg, DEEPSEEK_V3_DEFAULTS), to_ours)


FAMILY = Family(
    name="deepseek_v3",
    model_type="deepseek_v3",
    architectures=("DeepseekV3ForCausalLM", "DeepseekV3Model"),
    to_model_config=deepseek_v3_to_model_config,
    to_hf_config=deepseek_v3_to_hf_config,
    rules=DEEPSEEK_V3_RULES,
    base_prefix="model.",
    ignore=ROTARY_BUFFERS,
    extra_rules=deepseek_v3_extra_rules,
    transform=deepseek_v3_transform,
    refine=deepseek_v3_refine,
    notes=deepseek_v3_notes,
)
