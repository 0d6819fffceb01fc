"""gpt-oss (``gpt_oss``): GQA with attention sinks and q/k/v/o biases, sliding and full layers
alternating (``layer_types``), YaRN, and an MoE on every layer whose router and experts carry
biases and whose experts use the clamped SwiGLU (``swiglu_limit``, ``swiglu_alpha``).

The router takes the softmax of the top-k logits, which is our softmax over all experts
renormalised over the chosen ones (``norm_topk_prob``). The experts are stored whole
(``mlp.experts.gate_up_proj`` [E, C, 2H] with gate and up interleaved, ``down_proj``
[E, H, C], each expert's matrix [in, out]) and, as released, MXFP4-quantized (``*_blocks`` /
``*_scales``: ``mxfp4.py``). ``hidden_act`` is not read by HF's gpt-oss experts (the clamped
SwiGLU is fixed), so the import ignores it too; export writes full precision.
"""

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
    unsupported,
)
from evoformer.checkpoint.hf.moe import aux_from_hf, aux_to_hf, gqa, gqa_to_hf, moe_skeleton
from evoformer.checkpoint.hf.rope import rope_to_hf
from evoformer.config.schema import MLPConfig, ModelConfig, MoEConfig
from evoformer.model.layout import layer_spec

SLIDING, FULL = "sliding_attention", "full_attention"

GPT_OSS_DEFAULTS: dict[str, Any] = {
    "vocab_size": 201088,
    "hidden_size": 2880,
    "intermediate_size": 2880,
    "num_hidden_layers": 36,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "num_local_experts": 128,
    "num_experts_per_tok": 4,
    "sliding_window": 128,
    "layer_types": None,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 150000.0,
    # HF's default when a file names no RoPE at all
    "rope_parameters": {
        "rope_type": "yarn",
        "factor": 32.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": False,
        "original_max_position_embeddings": 4096,
    },
    "attention_dropout": 0.0,
    "swiglu_alpha": 1.702,
    "swiglu_limit": 7.0,
    "router_aux_loss_coef": 0.001,
    "output_router_logits": False,
    "attention_bias": True,
}


def _pattern(types: list[str], window: int | None) -> tuple[int | None, int]:
    """``layer_types`` as our (sliding_window, global_every): every ``global_every``-th layer
    full, the others sliding (0: all sliding)."""
    if window is None or SLIDING not in types:
        return None, 0
    every = 0 if FULL not in types else types.index(FULL) + 1
    ours = [SLIDING if every <= 0 or (i + 1) % every else FULL for i in range(len(types))]
    if ours != types:
        raise unsupported(
            "gpt_oss",
            f"layer_types={types} (evoformer's full layers are every N-th, the rest sliding)",
        )
    return window, every


def gpt_oss_to_model_config(hf_cfg: dict[str, Any]) -> ModelConfig:
    """gpt-oss ``config.json`` -> ModelConfig."""
    c = hf_defaults(hf_cfg, GPT_OSS_DEFAULTS)
    n = c["num_hidden_layers"]
    types = c["layer_types"] or [SLIDING if (i + 1) % 2 else FULL for i in range(n)]
    if len(types) != n or set(types) - {SLIDING, FULL}:
        raise unsupported("gpt_oss", f"layer_types={types} (needs {n} of {SLIDING}, {FULL})")
    window, every = _pattern(list(types), c["sliding_window"])
    bias = bool(c["attention_bias"])
    attention = gqa(c, bias=bias, sliding_window=window, global_every=every, sinks=True)
    m = moe_skeleton("gpt_oss", {**c, "hidden_act": "silu"}, attention)
    m.mlp = MLPConfig(
        kind="clamped_swiglu",
        hidden=c["intermediate_size"],
        swiglu_limit=float(c["swiglu_limit"]),
        swiglu_alpha=float(c["swiglu_alpha"]),
    )
    m.moe = MoEConfig(
        num_experts=c["num_local_experts"],
        top_k=c["num_experts_per_tok"],
        score="softmax",
        norm_topk_prob=True,
        aux_loss_coef=aux_from_hf(c),
        router_bias=True,
        expert_bias=True,
    )
    return m


def gpt_oss_to_hf_config(m: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> gpt-oss ``config.json``; UserError names any choice it lacks."""
    a, moe = m.attention, m.moe
    check(
        "gpt_oss",
        [
            (a.kind != "mha", f"model.attention.kind={a.kind} (needs mha)"),
            (not a.sinks, "model.attention.sinks=false (gpt-oss attention has sinks)"),
            (a.qk_norm != "none", f"model.attention.qk_norm={a.qk_norm}"),
            (a.has_qkv_bias != a.bias, "q/k/v biases without an o_proj bias, or the reverse"),
            (a.scale is not None, f"model.attention.scale={a.scale}"),
            (m.position.kind != "rope", f"model.position.kind={m.position.kind} (needs rope)"),
            (m.position.local_rope_theta is not None, "model.position.local_rope_theta"),
            (m.norm.kind != "rmsnorm", f"model.norm.kind={m.norm.kind} (needs rmsnorm)"),
            (m.norm.placement != "pre", f"model.norm.placement={m.norm.placement} (needs pre)"),
            (m.norm.unit_offset, "model.norm.unit_offset=true"),
            (m.mlp.kind != "clamped_swiglu", f"model.mlp.kind={m.mlp.kind} (needs clamped_swiglu)"),
            (m.dropout != 0, f"model.dropout={m.dropout} (no residual dropout)"),
            (m.embed_scale or m.parallel_block, "embed_scale / parallel_block"),
            (moe.num_experts <= 0, "model.moe.num_experts=0 (a dense model)"),
            (moe.score != "softmax", f"model.moe.score={moe.score} (needs softmax)"),
            (not moe.norm_topk_prob, "model.moe.norm_topk_prob=false"),
            (moe.routed_scaling != 1, f"model.moe.routed_scaling={moe.routed_scaling}"),
            (moe.n_groups > 1, f"model.moe.n_groups={moe.n_groups}"),
            (moe.bias_update_rate > 0, f"model.moe.bias_update_rate={moe.bias_update_rate}"),
            (not (moe.router_bias and moe.expert_bias), "MoE without router and expert biases"),
            (m.shared_width, "shared experts"),
            (moe.first_k_dense or moe.layer_freq != 1, "dense layers (every gpt-oss layer is MoE)"),
            (m.mtp.depth, f"model.mtp.depth={m.mtp.depth}"),
        ],
    )
    types = [SLIDING if layer_spec(m, i).is_local else FULL for i in range(m.n_layers)]
    return {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": a.n_heads,
        **gqa_to_hf(m),
        "hidden_act": "silu",
        "max_position_embeddings": m.max_seq_len,
        "initializer_range": m.init.std,
        "rms_norm_eps": m.norm.eps,
        "tie_word_embeddings": m.tie_embeddings,
        "attention_dropout": a.dropout,
        "attention_bias": a.bias,
        "sliding_window": a.sliding_window,
        "layer_types": types,
        **rope_to_hf(m.position),
        "intermediate_size": m.expert_width,
        "num_local_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "swiglu_limit": m.mlp.swiglu_limit,
        "swiglu_alpha": m.mlp.swiglu_alpha,
        **aux_to_hf(m),
    }


_EXPERTS = "model.layers.{i}.mlp.experts."
_OURS = "layers.{i}.mlp.experts."

GPT_OSS_RULES = (
    rule("model.embed_tokens.weight", "embed.weight"),
    rule("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
    *attention_rules("qkvo"),
    rule("model.layers.{i}.self_attn.sinks", "layers.{i}.attn.sinks"),
    rule("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.weight"),
    rule("model.layers.{i}.mlp.router.weight", "layers.{i}.mlp.router.weight"),
    rule("model.layers.{i}.mlp.router.bias", "layers.{i}.mlp.router.bias"),
    WeightRule(
        _EXPERTS + "gate_up_proj",
        (_OURS + "gate_proj", _OURS + "up_proj"),
        swap_last=True,
        interleave=True,
    ),
    WeightRule(
        _EXPERTS + "gate_up_proj_bias",
        (_OURS + "gate_proj_bias", _OURS + "up_proj_bias"),
        interleave=True,
    ),
    WeightRule(_EXPERTS + "down_proj", (_OURS + "down_proj",), swap_last=True),
    rule(_EXPERTS + "down_proj_bias", _OURS + "down_proj_bias"),
    rule("model.norm.weight", "norm.weight"),
    rule("lm_head.weight", "head.weight"),
)

FAMILY = Family(
    name="gpt_oss",
    model_type="gpt_oss",
    architectures=("GptOssForCausalLM", "GptOssModel"),
    to_model_config=gpt_oss_to_model_config,
    to_hf_config=gpt_oss_to_hf_config,
    rules=GPT_OSS_RULES,
    base_prefix="model.",
    ignore=ROTARY_BUFFERS,
)
