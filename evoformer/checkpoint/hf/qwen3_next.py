"""Qwen3-Next: Gated DeltaNet linear attention on three of every four layers
(``layer_types`` / ``full_attention_interval``), gated full attention on the rest (per-head
q/k RMSNorm, an output gate from q_proj, RoPE on a quarter of each head), zero-centred
RMSNorms (``1 + weight``), and Qwen-MoE feed-forwards with one sigmoid-gated shared expert.

HF fuses the DeltaNet input projections per q/k head (``in_proj_qkvz``: each head's q, k,
then its value heads' v and z; ``in_proj_ba``: its value heads' b, a); ours are one
projection per stream, so the converter regroups the rows (:func:`_regroup`)."""

from __future__ import annotations

from typing import Any

import torch

from evoformer.checkpoint.hf.family import (
    GATED_MLP_RULES,
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
from evoformer.config.schema import DeltaNetConfig, ModelConfig, MoEConfig
from evoformer.model.layout import compact_pattern, layer_plan

QWEN3_NEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 48,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "head_dim": 256,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "partial_rotary_factor": 0.25,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 32,
    "decoder_sparse_step": 1,
    "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512,
    "num_experts_per_tok": 10,
    "num_experts": 512,
    "norm_topk_prob": True,
    "router_aux_loss_coef": 0.001,
    "mlp_only_layers": [],
    "layer_types": None,
    "full_attention_interval": 4,
}
_LETTER = {"linear_attention": "G", "full_attention": "A"}


def _layer_types(c: dict[str, Any]) -> list[str]:
    # As Qwen3NextConfig: an explicit list, else every full_attention_interval-th layer full.
    if c["layer_types"]:
        return list(c["layer_types"])
    every = c["full_attention_interval"]
    n = c["num_hidden_layers"]
    return ["linear_attention" if (i + 1) % every else "full_attention" for i in range(n)]


def qwen3_next_to_model_config(hf_cfg: dict[str, Any]) -> ModelConfig:
    """Qwen3-Next ``config.json`` -> ModelConfig."""
    c = hf_defaults(hf_cfg, QWEN3_NEXT_DEFAULTS)
    types = _layer_types(c)
    if set(types) - set(_LETTER):
        raise unsupported("qwen3_next", f"layer_types {sorted(set(types) - set(_LETTER))}")
    attention = gqa(c, bias=bool(c["attention_bias"]), qk_norm="head", output_gate=True)
    m = moe_skeleton("qwen3_next", c, attention, partial_rotary=True)
    m.norm.unit_offset = True  # Qwen3NextRMSNorm: (1 + weight), weight starts at zero
    m.mixer_pattern = compact_pattern("".join(_LETTER[t] for t in types), "A")
    m.deltanet = DeltaNetConfig(
        n_heads=c["linear_num_value_heads"],
        n_key_heads=c["linear_num_key_heads"],
        key_head_dim=c["linear_key_head_dim"],
        value_head_dim=c["linear_value_head_dim"],
        conv_kernel=c["linear_conv_kernel_dim"],
    )
    step, mlp_only = c["decoder_sparse_step"], list(c["mlp_only_layers"] or [])
    n = m.n_layers
    theirs = [i for i in range(n) if i not in mlp_only and (i + 1) % step == 0]
    if c["num_experts"] <= 0 or not theirs:
        return m
    m.moe = MoEConfig(
        num_experts=c["num_experts"],
        top_k=c["num_experts_per_tok"],
        expert_hidden=c["moe_intermediate_size"],
        num_shared_experts=1 if c["shared_expert_intermediate_size"] else 0,
        shared_hidden=c["shared_expert_intermediate_size"],
        shared_gate=bool(c["shared_expert_intermediate_size"]),
        score="softmax",
        norm_topk_prob=bool(c["norm_topk_prob"]),
        first_k_dense=theirs[0],
        layer_freq=step,
        aux_loss_coef=aux_from_hf(c),
    )
    if [s.index for s in layer_plan(m) if s.mlp == "moe"] != theirs:
        raise unsupported(
            "qwen3_next",
            f"MoE layers {theirs} (decoder_sparse_step={step}, mlp_only_layers={mlp_only}): "
            "evoformer's are every layer_freq-th from first_k_dense on",
        )
    return m


def qwen3_next_to_hf_config(m: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> Qwen3-Next ``config.json``; UserError names any choice it lacks."""
    check_moe_skeleton("qwen3_next", m, "mha")
    plan = layer_plan(m)
    moe = m.moe
    ours = [s.index for s in plan if s.mlp == "moe"]
    step = moe.layer_freq
    mlp_only = [i for i in range(m.n_layers) if i not in ours and (i + 1) % step == 0]
    a = m.attention
    check(
        "qwen3_next",
        [
            (any(s.mixer not in ("attention", "deltanet") for s in plan), "mixers other than A/G"),
            (m.mlp_pattern != "", f"model.mlp_pattern={m.mlp_pattern}"),
            (not a.output_gate, "attention without output_gate"),
            (a.qk_norm != "head", f"model.attention.qk_norm={a.qk_norm}"),
            (not m.norm.unit_offset, "RMSNorm without unit offset"),
            (a.sliding_window is not None, "a sliding window"),
            (moe.score != "softmax", f"model.moe.score={moe.score}"),
            (moe.routed_scaling != 1, f"model.moe.routed_scaling={moe.routed_scaling}"),
            (moe.n_groups > 1, f"model.moe.n_groups={moe.n_groups}"),
            (m.shared_width and not moe.shared_gate, "shared experts without a gate"),
            (m.mtp.depth, f"model.mtp.depth={m.mtp.depth}"),
        ],
    )
    d = m.deltanet
    types = ["linear_attention" if s.mixer == "deltanet" else "full_attention" for s in plan]
    return {
        **moe_skeleton_to_hf("qwen3_next", "Qwen3NextForCausalLM", m),
        **gqa_to_hf(m),
        "partial_rotary_factor": m.position.partial_rotary,
        "intermediate_size": m.mlp.hidden,
        "attention_bias": a.bias,
        "layer_types": types,
        "linear_conv_kernel_dim": d.conv_kernel,
        "linear_key_head_dim": d.key_head_dim,
        "linear_value_head_dim": d.value_head_dim,
        "linear_num_key_heads": d.n_key_heads,
        "linear_num_value_heads": d.n_heads,
        "decoder_sparse_step": step,
        "mlp_only_layers": mlp_only,
        "num_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "moe_intermediate_size": m.expert_width,
        "shared_expert_intermediate_size": m.shared_width,
        "norm_topk_prob": moe.norm_topk_prob,
        **aux_to_hf(m),
    }


def _widths(hf_cfg: dict[str, Any]) -> tuple[int, int, int, int]:
    c = hf_defaults(hf_cfg, QWEN3_NEXT_DEFAULTS)
    G, H = c["linear_num_key_heads"], c["linear_num_value_heads"]
    return G, H // G, c["linear_key_head_dim"], c["linear_value_head_dim"]


def _regroup(name: str, t: torch.Tensor, hf_cfg: dict[str, Any], to_ours: bool) -> torch.Tensor:
    """HF's per-q/k-head interleaved rows <-> ours, stream after stream."""
    if name.endswith("in_proj_qkvz.weight"):
        G, r, K, V = _widths(hf_cfg)
        sizes = [K, K, r * V, r * V]
    elif name.endswith("in_proj_ba.weight"):
        G, r, _, _ = _widths(hf_cfg)
        sizes = [r, r]
    else:
        return t
    C = t.shape[-1]
    if to_ours:  # [G, (q k v z), C] -> [(q..), (k..), (v..), (z..)]
        parts = t.reshape(G, sum(sizes), C).split(sizes, dim=1)
        return torch.cat([p.reshape(-1, C) for p in parts])
    streams = t.split([G * s for s in sizes])
    return torch.cat([s.reshape(G, -1, C) for s in streams], dim=1).reshape(-1, C)


def _la(hf: str, *ours: str) -> WeightRule:
    return rule(f"model.layers.{{i}}.linear_attn.{hf}", *(f"layers.{{i}}.attn.{o}" for o in ours))


QWEN3_NEXT_RULES = (
    rule("model.embed_tokens.weight", "embed.weight"),
    rule("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
    *attention_rules("qkvo"),
    *qk_norm_rules(),
    _la(
        "in_proj_qkvz.weight",
        "query_proj.weight",
        "key_proj.weight",
        "value_proj.weight",
        "gate_proj.weight",
    ),
    _la("in_proj_ba.weight", "beta_proj.weight", "decay_proj.weight"),
    _la("conv1d.weight", "q_conv.weight", "k_conv.weight", "v_conv.weight"),
    _la("dt_bias", "dt_bias"),
    _la("A_log", "A_log"),
    _la("norm.weight", "norm_weight"),
    _la("out_proj.weight", "out_proj.weight"),
    rule("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.weight"),
    *GATED_MLP_RULES,
    rule("model.layers.{i}.mlp.gate.weight", "layers.{i}.mlp.router.weight"),
    *(
        rule(
            f"model.layers.{{i}}.mlp.shared_expert.{p}.weight",
            f"layers.{{i}}.mlp.shared_experts.{p}.weight",
        )
        for p in ("gate_proj", "up_proj", "down_proj")
    ),
    rule("model.layers.{i}.mlp.shared_expert_gate.weight", "layers.{i}.mlp.shared_gate.weight"),
    rule("model.norm.weight", "norm.weight"),
    rule("lm_head.weight", "head.weight"),
)


def qwen3_next_expert_rules(m: ModelConfig) -> tuple[WeightRule, ...]:
    """Per-expert slices."""
    return expert_rules("mlp", GATED, m)


FAMILY = Family(
    name="qwen3_next",
    model_type="qwen3_next",
    architectures=("Qwen3NextForCausalLM", "Qwen3NextModel"),
    to_model_config=qwen3_next_to_model_config,
    to_hf_config=qwen3_next_to_hf_config,
    rules=QWEN3_NEXT_RULES,
    base_prefix="model.",
    ignore=(r"mtp\..*",),  # the published files' MTP module, which HF's class drops too
    extra_rules=qwen3_next_expert_rules,
    transform=_regroup,
)
