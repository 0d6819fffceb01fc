"""HF conversion for the mixture-of-experts families: Mixtral, Qwen3-MoE and DeepSeek-V3.

Each is a :class:`~evoformer.checkpoint.hf.Family` (see :mod:`evoformer.checkpoint.hf` for how
the table drives import and export). What the MoE families add to the dense ones:

- Experts: HF files store one matrix per expert (``experts.{e}.w1`` in Mixtral,
  ``experts.{e}.gate_proj`` in Qwen3-MoE and DeepSeek-V3; transformers 5 fuses them in memory
  but ``save_pretrained`` writes them back per expert); ours are stacked [E, ...] tensors, so
  each HF matrix is one slice (``WeightRule.index``). Those rules depend on the expert count,
  hence ``Family.extra_rules``.
- Layer patterns: DeepSeek's ``first_k_dense_replace`` is our ``moe.first_k_dense``; Qwen3-MoE's
  ``decoder_sparse_step`` + ``mlp_only_layers`` are accepted where ``first_k_dense`` +
  ``layer_freq`` give the same MoE layers.
- DeepSeek-V3 MLA: its RoPE rotates interleaved pairs (``rope_interleave``, true in every
  DeepSeek release); ours rotates halves, which is the same function once the rope rows of
  ``q_b_proj``/``q_proj`` and ``kv_a_proj_with_mqa`` are permuted (``Family.transform``; export
  writes the interleaved layout back). YaRN RoPE (DeepSeek-V3's long-context setting) maps to
  ``rope_scaling.kind: yarn``; MLA adds DeepSeek's softmax gain mscale(factor, mscale_all_dim)^2.
- DeepSeek-V3 MTP: checkpoints store module k as decoder layer ``n_layers + k`` (``enorm``,
  ``hnorm``, ``eh_proj``, ``shared_head.norm``, a full MoE block, and copies of the embedding and
  head). ``num_nextn_predict_layers`` counts the modules, but HF's own model neither builds nor
  saves them, so the depth is taken from the weights actually present (``Family.refine``);
  export writes them in the same layout (HF's ``DeepseekV3ForCausalLM`` ignores them, its
  ``MtpModel`` and vLLM read them).

Training-only settings (aux-loss weight, capacity factor, bias update rate with sigmoid scores,
MTP loss weight) and the different spellings of the same expert widths are made equal before
the export round-trip check (:func:`canonical_moe`), so they never block an export.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch

from evoformer.checkpoint import hf
from evoformer.checkpoint.hf import FAMILIES as HF_FAMILIES
from evoformer.checkpoint.hf import (
    LLAMA_ACTIVATIONS,
    Family,
    WeightRule,
    _hf_defaults,
    _invert,
    _rule,
    _unsupported,
    rope_from_hf,
    rope_to_hf,
)
from evoformer.config.schema import (
    AttentionConfig,
    InitConfig,
    MLPConfig,
    ModelConfig,
    MoEConfig,
    MTPConfig,
    NormConfig,
)
from evoformer.model.layout import layer_spec

# ---------------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------------


def _check(family: str, checks: list[tuple[Any, str]]) -> None:
    for bad, what in checks:
        if bad:
            raise _unsupported(family, what)


def _activation(family: str, act: str) -> str:
    if act not in LLAMA_ACTIVATIONS:
        raise _unsupported(family, f"hidden_act={act!r}")
    return LLAMA_ACTIVATIONS[act]


def _activation_to_hf(family: str, m: ModelConfig) -> str:
    act = "silu" if m.mlp.activation == "default" else m.mlp.activation
    if act not in _invert(LLAMA_ACTIVATIONS):
        raise _unsupported(family, f"model.mlp.activation={act}")
    return _invert(LLAMA_ACTIVATIONS)[act]


def _skeleton(family: str, c: dict[str, Any], attention: AttentionConfig) -> ModelConfig:
    """Pre-RMSNorm, RoPE, SwiGLU: what all three families share."""
    return ModelConfig(
        vocab_size=c["vocab_size"],
        d_model=c["hidden_size"],
        n_layers=c["num_hidden_layers"],
        max_seq_len=c["max_position_embeddings"],
        tie_embeddings=bool(c["tie_word_embeddings"]),
        norm=NormConfig(kind="rmsnorm", eps=float(c["rms_norm_eps"]), bias=False),
        position=rope_from_hf(c, family),
        attention=attention,
        mlp=MLPConfig(
            kind="swiglu",
            hidden=c["intermediate_size"],
            activation=_activation(family, c["hidden_act"]),
        ),
        init=InitConfig(std=float(c["initializer_range"]), scaled_residual=False),
    )


def _gqa(c: dict[str, Any], **extra: Any) -> AttentionConfig:
    d, n_heads = c["hidden_size"], c["num_attention_heads"]
    head_dim = c.get("head_dim") or d // n_heads
    return AttentionConfig(
        n_heads=n_heads,
        n_kv_heads=c["num_key_value_heads"] or n_heads,
        head_dim=None if head_dim * n_heads == d else head_dim,
        dropout=float(c["attention_dropout"]),
        **extra,
    )


def _skeleton_checks(family: str, m: ModelConfig, attention_kind: str) -> None:
    _check(
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


def _skeleton_to_hf(family: str, arch: str, m: ModelConfig) -> dict[str, Any]:
    return {
        "architectures": [arch],
        "model_type": family,
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.attention.n_heads,
        "hidden_act": _activation_to_hf(family, m),
        "max_position_embeddings": m.max_seq_len,
        "initializer_range": m.init.std,
        "rms_norm_eps": m.norm.eps,
        "tie_word_embeddings": m.tie_embeddings,
        "attention_dropout": m.attention.dropout,
        **rope_to_hf(m.position),
    }


def _gqa_to_hf(m: ModelConfig) -> dict[str, Any]:
    a = m.attention
    return {
        "num_key_value_heads": a.n_kv_heads or a.n_heads,
        "head_dim": a.head_dim or m.d_model // a.n_heads,
    }


def _aux_from_hf(c: dict[str, Any]) -> float:
    # HF adds the balance loss only with output_router_logits.
    return float(c["router_aux_loss_coef"]) if c["output_router_logits"] else 0.0


def _aux_to_hf(m: ModelConfig) -> dict[str, Any]:
    coef = m.moe.aux_loss_coef
    return {"output_router_logits": coef > 0, "router_aux_loss_coef": coef or 0.001}


def _attention_rules(projections: str) -> tuple[WeightRule, ...]:
    return tuple(
        _rule(f"model.layers.{{i}}.self_attn.{p}_proj.{t}", f"layers.{{i}}.attn.{p}_proj.{t}")
        for p in projections
        for t in ("weight", "bias")
    )


def _expert_rules(hf_mlp: str, names: tuple[tuple[str, str], ...], m: ModelConfig):
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


GATED = (("gate_proj", "gate_proj"), ("up_proj", "up_proj"), ("down_proj", "down_proj"))
DENSE_MLP_RULES = tuple(
    _rule(f"model.layers.{{i}}.mlp.{p}_proj.weight", f"layers.{{i}}.mlp.{p}_proj.weight")
    for p in ("gate", "up", "down")
)
_ROTARY = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)


def canonical_moe(m: ModelConfig) -> None:
    """Spell out MoE widths and drop training-only settings (in place), so two configs that
    compute the same function compare equal in the export round-trip check."""
    m.mtp.loss_weight = MTPConfig().loss_weight
    moe = m.moe
    if moe.num_experts <= 0:
        return
    moe.expert_hidden = moe.expert_hidden or m.mlp.hidden
    moe.shared_hidden = moe.shared_hidden or moe.num_shared_experts * moe.expert_hidden
    moe.num_shared_experts = 0  # only the shared width matters
    if moe.n_groups <= 1:
        moe.n_groups, moe.topk_groups = 1, 1
    moe.aux_loss_coef = 0.0
    moe.capacity_factor = 0.0  # applied in training only
    if moe.score == "sigmoid":
        moe.bias_update_rate = 0.0  # the bias exists either way; the rate only trains it
    if all(layer_spec(m, i).mlp == "moe" for i in range(m.n_layers + m.mtp.depth)):
        m.mlp.hidden, m.mlp.bias = MLPConfig().hidden, MLPConfig().bias  # no dense layer uses it


# ---------------------------------------------------------------------------------------------
# Mixtral
# ---------------------------------------------------------------------------------------------

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
    c = _hf_defaults(hf_cfg, MIXTRAL_DEFAULTS)
    if c["router_jitter_noise"]:
        raise _unsupported("mixtral", f"router_jitter_noise={c['router_jitter_noise']}")
    m = _skeleton("mixtral", c, _gqa(c, sliding_window=c["sliding_window"]))
    m.moe = MoEConfig(
        num_experts=c["num_local_experts"],
        top_k=c["num_experts_per_tok"],
        expert_hidden=c["intermediate_size"],
        score="softmax",
        norm_topk_prob=True,
        aux_loss_coef=_aux_from_hf(c),
    )
    return m


def mixtral_to_hf_config(m: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> Mixtral ``config.json``; UserError names any choice Mixtral lacks."""
    _skeleton_checks("mixtral", m, "mha")
    moe = m.moe
    _check(
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
            (moe.shared_hidden or moe.num_shared_experts, "shared experts"),
            (m.mtp.depth, f"model.mtp.depth={m.mtp.depth}"),
        ],
    )
    return {
        **_skeleton_to_hf("mixtral", "MixtralForCausalLM", m),
        **_gqa_to_hf(m),
        "intermediate_size": moe.expert_hidden or m.mlp.hidden,
        "sliding_window": m.attention.sliding_window,
        "num_local_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "router_jitter_noise": 0.0,
        **_aux_to_hf(m),
    }


MIXTRAL_RULES = (
    _rule("model.embed_tokens.weight", "embed.weight"),
    _rule("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
    *_attention_rules("qkvo"),
    _rule("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.weight"),
    _rule("model.layers.{i}.block_sparse_moe.gate.weight", "layers.{i}.mlp.router.weight"),
    _rule("model.norm.weight", "norm.weight"),
    _rule("lm_head.weight", "head.weight"),
)


def mixtral_expert_rules(m: ModelConfig) -> tuple[WeightRule, ...]:
    names = (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))
    return _expert_rules("block_sparse_moe", names, m)


# ---------------------------------------------------------------------------------------------
# Qwen3-MoE
# ---------------------------------------------------------------------------------------------

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
    c = _hf_defaults(hf_cfg, QWEN3_MOE_DEFAULTS)
    n_experts = hf_cfg.get("num_experts", hf_cfg.get("num_local_experts", c["num_experts"]))
    window = c["sliding_window"] if c["use_sliding_window"] else None
    attention = _gqa(c, bias=bool(c["attention_bias"]), qk_norm="head", sliding_window=window)
    m = _skeleton("qwen3_moe", c, attention)
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
        aux_loss_coef=_aux_from_hf(c),
    )
    if [i for i in range(m.n_layers) if layer_spec(m, i).mlp == "moe"] != theirs:
        raise _unsupported(
            "qwen3_moe",
            f"MoE layers {theirs} (decoder_sparse_step={step}, mlp_only_layers="
            f"{mlp_only}): evoformer's are every layer_freq-th from first_k_dense on",
        )
    return m


def qwen3_moe_to_hf_config(m: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> Qwen3-MoE ``config.json``; UserError names any choice it lacks."""
    _skeleton_checks("qwen3_moe", m, "mha")
    moe = m.moe
    ours = [i for i in range(m.n_layers) if layer_spec(m, i).mlp == "moe"]
    step = moe.layer_freq
    mlp_only = [i for i in range(m.n_layers) if i not in ours and (i + 1) % step == 0]
    _check(
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
            (moe.shared_hidden or moe.num_shared_experts, "shared experts"),
            (m.mtp.depth, f"model.mtp.depth={m.mtp.depth}"),
        ],
    )
    a = m.attention
    return {
        **_skeleton_to_hf("qwen3_moe", "Qwen3MoeForCausalLM", m),
        **_gqa_to_hf(m),
        "intermediate_size": m.mlp.hidden,
        "moe_intermediate_size": moe.expert_hidden or m.mlp.hidden,
        "attention_bias": a.bias,
        "use_sliding_window": a.sliding_window is not None,
        "sliding_window": a.sliding_window,
        "decoder_sparse_step": step,
        "mlp_only_layers": mlp_only,
        "num_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "norm_topk_prob": moe.norm_topk_prob,
        **_aux_to_hf(m),
    }


QWEN3_MOE_RULES = (
    _rule("model.embed_tokens.weight", "embed.weight"),
    _rule("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
    *_attention_rules("qkvo"),
    *(
        _rule(f"model.layers.{{i}}.self_attn.{p}_norm.weight", f"layers.{{i}}.attn.{p}_norm.weight")
        for p in "qk"
    ),
    _rule("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.weight"),
    *DENSE_MLP_RULES,
    _rule("model.layers.{i}.mlp.gate.weight", "layers.{i}.mlp.router.weight"),
    _rule("model.norm.weight", "norm.weight"),
    _rule("lm_head.weight", "head.weight"),
)


def qwen3_moe_expert_rules(m: ModelConfig) -> tuple[WeightRule, ...]:
    return _expert_rules("mlp", GATED, m)


# ---------------------------------------------------------------------------------------------
# DeepSeek-V3
# ---------------------------------------------------------------------------------------------

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
}


def deepseek_v3_to_model_config(hf_cfg: dict[str, Any]) -> ModelConfig:
    """DeepSeek-V3 ``config.json`` -> ModelConfig: MLA, the first k layers dense, then sigmoid
    scored, group-limited MoE with shared experts; MTP modules as the checkpoint holds them."""
    c = _hf_defaults(hf_cfg, DEEPSEEK_V3_DEFAULTS)
    # Keys of DeepSeek's own modeling code that HF's class does not read; refuse the values
    # HF would silently compute differently from the checkpoint's intent.
    _check(
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
        # null means a full-rank query (the defaults merge would read it as "unset")
        q_lora_rank=hf_cfg.get("q_lora_rank", c["q_lora_rank"]) or 0,
        kv_lora_rank=c["kv_lora_rank"],
        qk_nope_head_dim=c["qk_nope_head_dim"],
        qk_rope_head_dim=c["qk_rope_head_dim"],
        v_head_dim=c["v_head_dim"],
    )
    m = _skeleton("deepseek_v3", c, attention)
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
    )
    m.mtp = MTPConfig(depth=c["num_nextn_predict_layers"] or 0)
    return m


def deepseek_v3_refine(m: ModelConfig, names: set[str]) -> ModelConfig:
    """No MTP modules unless the files hold them (HF's model neither builds nor saves them,
    though its config counts one by default)."""
    if m.mtp.depth and f"model.layers.{m.n_layers}.eh_proj.weight" not in names:
        return dataclasses.replace(m, mtp=MTPConfig(depth=0))
    return m


def deepseek_v3_to_hf_config(m: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> DeepSeek-V3 ``config.json``; UserError names any choice it lacks."""
    _skeleton_checks("deepseek_v3", m, "mla")
    moe, a = m.moe, m.attention
    expert = moe.expert_hidden or m.mlp.hidden
    shared = moe.shared_hidden or moe.num_shared_experts * expert
    _check(
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
        **_skeleton_to_hf("deepseek_v3", "DeepseekV3ForCausalLM", m),
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
    }


DEEPSEEK_V3_RULES = (
    _rule("model.embed_tokens.weight", "embed.weight"),
    _rule("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
    *(
        _rule(f"model.layers.{{i}}.self_attn.{theirs}.{t}", f"layers.{{i}}.attn.{ours}.{t}")
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
    _rule("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.weight"),
    *DENSE_MLP_RULES,
    _rule("model.layers.{i}.mlp.gate.weight", "layers.{i}.mlp.router.weight"),
    _rule(
        "model.layers.{i}.mlp.gate.e_score_correction_bias",
        "layers.{i}.mlp.e_score_correction_bias",
    ),
    *(
        _rule(
            f"model.layers.{{i}}.mlp.shared_experts.{p}_proj.weight",
            f"layers.{{i}}.mlp.shared_experts.{p}_proj.weight",
        )
        for p in ("gate", "up", "down")
    ),
    _rule("model.norm.weight", "norm.weight"),
    _rule("lm_head.weight", "head.weight"),
)

LAYER, MTP_BLOCK = "model.layers.{i}.", "layers.{i}."


def deepseek_v3_extra_rules(m: ModelConfig) -> tuple[WeightRule, ...]:
    """Per-expert slices, and the MTP modules as decoder layers ``n_layers + k``."""
    experts = _expert_rules("mlp", GATED, m)
    out = list(experts)
    per_layer = [r for r in (*DEEPSEEK_V3_RULES, *experts) if r.hf.startswith(LAYER)]
    for k in range(m.mtp.depth):
        theirs, ours = f"model.layers.{m.n_layers + k}.", f"mtp.layers.{k}."
        out += [
            _rule(theirs + "enorm.weight", ours + "embed_norm.weight"),
            _rule(theirs + "hnorm.weight", ours + "hidden_norm.weight"),
            _rule(theirs + "eh_proj.weight", ours + "proj.weight"),
            _rule(theirs + "shared_head.norm.weight", ours + "out_norm.weight"),
            # Copies of the shared embedding and head (loading checks that they agree).
            _rule(theirs + "embed_tokens.weight", "embed.weight"),
            _rule(
                theirs + "shared_head.head.weight",
                "embed.weight" if m.tie_embeddings else "head.weight",
            ),
        ]
        out += [
            dataclasses.replace(
                r,
                hf=r.hf.replace(LAYER, theirs),
                ours=tuple(o.replace(MTP_BLOCK, ours + "block.") for o in r.ours),
            )
            for r in per_layer
        ]
    return tuple(out)


# q_b_proj / q_proj rows are per head [nope, rope]; kv_a_proj_with_mqa rows are [latent, rope].
_ROPE_ROWS = re.compile(r".*\.self_attn\.(q_proj|q_b_proj|kv_a_proj_with_mqa)\.(weight|bias)")


def deepseek_v3_transform(
    name: str, t: torch.Tensor, hf_cfg: dict[str, Any], to_ours: bool
) -> torch.Tensor:
    """Interleaved RoPE pairs (x0, x1), (x2, x3), ... -> halves (x0, x2, ...; x1, x3, ...)
    on import, and back on export, for the rope rows of the query and shared key."""
    match = _ROPE_ROWS.fullmatch(name)
    if match is None or not hf_cfg.get("rope_interleave", True):
        return t
    c = _hf_defaults(hf_cfg, DEEPSEEK_V3_DEFAULTS)
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


# ---------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="mixtral",
            model_type="mixtral",
            architectures=("MixtralForCausalLM", "MixtralModel"),
            to_model_config=mixtral_to_model_config,
            to_hf_config=mixtral_to_hf_config,
            rules=MIXTRAL_RULES,
            base_prefix="model.",
            ignore=_ROTARY,
            extra_rules=mixtral_expert_rules,
        ),
        Family(
            name="qwen3_moe",
            model_type="qwen3_moe",
            architectures=("Qwen3MoeForCausalLM", "Qwen3MoeModel"),
            to_model_config=qwen3_moe_to_model_config,
            to_hf_config=qwen3_moe_to_hf_config,
            rules=QWEN3_MOE_RULES,
            base_prefix="model.",
            ignore=_ROTARY,
            extra_rules=qwen3_moe_expert_rules,
        ),
        Family(
            name="deepseek_v3",
            model_type="deepseek_v3",
            architectures=("DeepseekV3ForCausalLM", "DeepseekV3Model"),
            to_model_config=deepseek_v3_to_model_config,
            to_hf_config=deepseek_v3_to_hf_config,
            rules=DEEPSEEK_V3_RULES,
            base_prefix="model.",
            ignore=_ROTARY,
            extra_rules=deepseek_v3_extra_rules,
            transform=deepseek_v3_transform,
            refine=deepseek_v3_refine,
        ),
    )
}

# Registered here rather than in hf.py so either module may be imported first (hf.py imports
# this one at its end; this one needs hf.py's helpers at its start).
HF_FAMILIES.update(FAMILIES)
hf.CANONICAL_HOOKS.append(canonical_moe)
