"""What the mixture-of-experts families (Mixtral, Qwen3-MoE, DeepSeek-V3) share.

- Experts: HF files store one matrix per expert (``experts.{e}.w1`` in Mixtral,
  ``experts.{e}.gate_proj`` in Qwen3-MoE and DeepSeek-V3; transformers 5 fuses them in memory
  but ``save_pretrained`` writes them back per expert); ours are stacked [E, ...] tensors, so
  each HF matrix is one slice (``WeightRule.index``). Those rules depend on the expert count,
  hence ``Family.extra_rules`` (:func:`expert_rules`).
- The skeleton: pre-RMSNorm, RoPE, SwiGLU experts, and HF's router aux-loss switch.

Training-only settings (aux-loss weight, capacity factor, bias update rate with sigmoid scores,
MTP loss weight) and the different spellings of the same expert widths are made equal before
the export round-trip check (:func:`~evoformer.checkpoint.hf.roundtrip.canonical_moe`), so they
never block an export.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from evoformer.checkpoint.hf.family import (
    WeightRule,
    activation_from_hf,
    activation_to_hf,
    check,
    rule,
)
from evoformer.checkpoint.hf.rope import rope_from_hf, rope_to_hf
from evoformer.config.schema import (
    AttentionConfig,
    InitConfig,
    MLPConfig,
    ModelConfig,
    NormConfig,
)


def moe_skeleton(
    family: str, c: dict[str, Any], attention: AttentionConfig, partial_rotary: bool = False
) -> ModelConfig:
    """Pre-RMSNorm, RoPE, SwiGLU: what all three families share (the MoE is theirs);
    ``partial_rotary``: the family's HF class honours ``partial_rotary_factor`` (GLM-4.5)."""
    return ModelConfig(
        vocab_size=c["vocab_size"],
        d_model=c["hidden_size"],
        n_layers=c["num_hidden_layers"],
        max_seq_len=c["max_position_embeddings"],
        tie_embeddings=bool(c["tie_word_embeddings"]),
        norm=NormConfig(kind="rmsnorm", eps=float(c["rms_norm_eps"]), bias=False),
        position=rope_from_hf(c, family, partial_ok=partial_rotary),
        attention=attention,
        mlp=MLPConfig(
            kind="swiglu",
            hidden=c["intermediate_size"],
            activation=activation_from_hf(family, c["hidden_act"]),
        ),
        init=InitConfig(std=float(c["initializer_range"]), scaled_residual=False),
    )


def gqa(c: dict[str, Any], **extra: Any) -> AttentionConfig:
    """Grouped-query attention from the HF keys; ``extra``: the family's own fields."""
    d, n_heads = c["hidden_size"], c["num_attention_heads"]
    head_dim = c.get("head_dim") or d // n_heads
    return AttentionConfig(
        n_heads=n_heads,
        n_kv_heads=c["num_key_value_heads"] or n_heads,
        head_dim=None if head_dim * n_heads == d else head_dim,
        dropout=float(c["attention_dropout"]),
        **extra,
    )


def check_moe_skeleton(family: str, m: ModelConfig, attention_kind: str) -> None:
    """Refuse a model outside the skeleton, or one without experts."""
    check(
        family,
        [
            (
                m.attention.kind != attention_kind,
                f"model.attention.kind={m.attention.kind} (needs {attention_kind})",
            ),
            (m.position.kind != "rope", f"model.position.kind={m.position.kind} (needs rope)"),
            (m.norm.kind != "rmsnorm", f"model.norm.kind={m.norm.kind} (needs rmsnorm)"),
            (m.norm.placement != "pre", f"model.norm.placement={m.norm.placement} (needs pre)"),
            (m.mlp.kind != "swiglu", f"model.mlp.kind={m.mlp.kind} (needs swiglu)"),
            (m.dropout != 0, f"model.dropout={m.dropout} (no residual dropout)"),
            (m.moe.num_experts <= 0, "model.moe.num_experts=0 (a dense model)"),
            (
                m.moe.bias_update_rate > 0 and m.moe.score == "softmax",
                "model.moe.bias_update_rate>0 with softmax scores (no router bias)",
            ),
        ],
    )


def moe_skeleton_to_hf(family: str, arch: str, m: ModelConfig) -> dict[str, Any]:
    """The skeleton's ``config.json`` keys."""
    return {
        "architectures": [arch],
        "model_type": family,
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.attention.n_heads,
        "hidden_act": activation_to_hf(family, m),
        "max_position_embeddings": m.max_seq_len,
        "initializer_range": m.init.std,
        "rms_norm_eps": m.norm.eps,
        "tie_word_embeddings": m.tie_embeddings,
        "attention_dropout": m.attention.dropout,
        **rope_to_hf(m.position),
    }


def gqa_to_hf(m: ModelConfig) -> dict[str, Any]:
    """Our KV heads and head width as HF keys."""
    return {
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_dim,
    }


def aux_from_hf(c: dict[str, Any]) -> float:
    """Our ``moe.aux_loss_coef``: HF's ``router_aux_loss_coef``, the weight the model was
    trained with. (``output_router_logits`` only says whether HF's forward computes the loss
    by default, false in every published file; it does not switch balancing off.)"""
    return float(c["router_aux_loss_coef"] or 0.0)


def aux_to_hf(m: ModelConfig) -> dict[str, Any]:
    """Our ``moe.aux_loss_coef`` as HF's router settings (written as the families ship them:
    the weight, with HF's forward not computing the loss unless asked)."""
    return {"output_router_logits": False, "router_aux_loss_coef": m.moe.aux_loss_coef}


# (HF name, ours) of the three expert matrices, as Qwen3-MoE and DeepSeek-V3 name them.
GATED = (("gate_proj", "gate_proj"), ("up_proj", "up_proj"), ("down_proj", "down_proj"))


def expert_rules(
    hf_mlp: str, names: tuple[tuple[str, str], ...], m: ModelConfig
) -> tuple[WeightRule, ...]:
    """One rule per expert matrix: HF ``{hf_mlp}.experts.{e}.{hf}.weight`` is slice e of our
    stacked ``mlp.experts.{ours}``."""
    return tuple(
        WeightRule(
            f"model.layers.{{i}}.{hf_mlp}.experts.{e}.{theirs}.weight",
            (f"layers.{{i}}.mlp.experts.{ours}",),
            index=e,
        )
        for e in range(m.moe.num_experts)
        for theirs, ours in names
    )


# DeepSeek-V3's router with its selection bias and always-on shared experts, as GLM-4.5 writes
# them too.
SHARED_EXPERT_ROUTER_RULES = (
    rule("model.layers.{i}.mlp.gate.weight", "layers.{i}.mlp.router.weight"),
    rule(
        "model.layers.{i}.mlp.gate.e_score_correction_bias",
        "layers.{i}.mlp.e_score_correction_bias",
    ),
    *(
        rule(
            f"model.layers.{{i}}.mlp.shared_experts.{p}_proj.weight",
            f"layers.{{i}}.mlp.shared_experts.{p}_proj.weight",
        )
        for p in ("gate", "up", "down")
    ),
)

_LAYER, _BLOCK = "model.layers.{i}.", "layers.{i}."


def experts_and_mtp_rules(m: ModelConfig, rules: tuple[WeightRule, ...]) -> tuple[WeightRule, ...]:
    """Per-expert slices, and DeepSeek-V3-style MTP modules stored as decoder layers
    ``n_layers + k`` (their block takes ``rules``' per-layer rules; their embedding and head are
    copies of the shared ones, which loading checks agree)."""
    experts = expert_rules("mlp", GATED, m)
    out = list(experts)
    per_layer = [r for r in (*rules, *experts) if r.hf.startswith(_LAYER)]
    for k in range(m.mtp.depth):
        theirs, ours = f"model.layers.{m.n_layers + k}.", f"mtp.layers.{k}."
        out += [
            rule(theirs + "enorm.weight", ours + "embed_norm.weight"),
            rule(theirs + "hnorm.weight", ours + "hidden_norm.weight"),
            rule(theirs + "eh_proj.weight", ours + "proj.weight"),
            rule(theirs + "shared_head.norm.weight", ours + "out_norm.weight"),
            rule(theirs + "embed_tokens.weight", "embed.weight"),
            rule(
                theirs + "shared_head.head.weight",
                "embed.weight" if m.tie_embeddings else "head.weight",
            ),
        ]
        out += [
            dataclasses.replace(
                r,
                hf=r.hf.replace(_LAYER, theirs),
                ours=tuple(o.replace(_BLOCK, ours + "block.") for o in r.ours),
            )
            for r in per_layer
        ]
    return tuple(out)
