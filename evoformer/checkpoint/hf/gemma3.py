"""Gemma 3 (text): sandwich norms with a unit offset, embeddings scaled by sqrt(d), GeGLU,
per-head q/k norms, ``query_pre_attn_scalar``, and local (sliding, own RoPE base) layers with
every N-th layer global."""

from __future__ import annotations

from typing import Any

from evoformer.checkpoint.hf.dense import FULL, SLIDING, layer_types, window_layout
from evoformer.checkpoint.hf.family import (
    ACTIVATIONS,
    GATED_MLP_RULES,
    ROTARY_BUFFERS,
    Family,
    activation_to_hf,
    attention_rules,
    check,
    hf_defaults,
    qk_norm_rules,
    rule,
    unsupported,
)
from evoformer.checkpoint.hf.rope import rope_params_from_hf, rope_params_to_hf
from evoformer.config.schema import (
    AttentionConfig,
    InitConfig,
    MLPConfig,
    ModelConfig,
    NormConfig,
    PositionConfig,
)

GEMMA3_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "layer_types": None,
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
    "use_bidirectional_attention": False,
}


def _gemma3_rope(c: dict[str, Any], has_local: bool) -> PositionConfig:
    params = c.get("rope_parameters")
    if params and not all(isinstance(v, dict) for v in params.values()):
        raise unsupported("gemma3", "rope_parameters without per-layer-type entries")
    full: dict[str, Any]
    local: dict[str, Any]
    if params:
        full, local = dict(params.get(FULL) or {}), dict(params.get(SLIDING) or {})
    else:  # transformers 4: rope_theta (+ rope_scaling) global, rope_local_base_freq local
        full = {"rope_type": "default", **(c.get("rope_scaling") or {})}
        full.setdefault("rope_theta", c.get("rope_theta") or 1_000_000.0)
        local = {"rope_type": "default"}
        local.setdefault("rope_theta", c.get("rope_local_base_freq") or 10_000.0)
    full.setdefault("rope_theta", 1_000_000.0)
    local.setdefault("rope_theta", 10_000.0)
    pos = rope_params_from_hf(full, "gemma3", c["max_position_embeddings"], c)
    loc = rope_params_from_hf(local, "gemma3", c["max_position_embeddings"], c)
    if has_local and (loc.rope_theta, loc.rope_scaling) != (pos.rope_theta, pos.rope_scaling):
        if loc.rope_scaling.kind != "none":
            raise unsupported("gemma3", f"rope scaling on sliding layers ({local})")
        pos.local_rope_theta = loc.rope_theta
    return pos


def gemma3_to_model_config(hf: dict[str, Any]) -> ModelConfig:
    """Gemma 3 text ``config.json`` -> ModelConfig (sandwich unit-offset RMSNorms, scaled
    embeddings, GeGLU, per-head q/k norms, 5 local : 1 global layers with their own RoPE)."""
    c = hf_defaults(hf, GEMMA3_DEFAULTS)
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if c[key] is not None:
            raise unsupported("gemma3", f"{key}={c[key]}")
    if c["use_bidirectional_attention"]:
        raise unsupported("gemma3", "use_bidirectional_attention=true")
    act = c["hidden_activation"]
    if act not in ACTIVATIONS:
        raise unsupported("gemma3", f"hidden_activation={act!r}")
    pattern = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6
    n = c["num_hidden_layers"]
    types = c["layer_types"] or [SLIDING if (i + 1) % pattern else FULL for i in range(n)]
    window, every = window_layout("gemma3", types, c["sliding_window"])
    head_dim = c["head_dim"] or c["hidden_size"] // c["num_attention_heads"]
    scalar = c["query_pre_attn_scalar"]
    return ModelConfig(
        vocab_size=c["vocab_size"],
        d_model=c["hidden_size"],
        n_layers=n,
        max_seq_len=c["max_position_embeddings"],
        tie_embeddings=bool(c["tie_word_embeddings"]),
        norm=NormConfig(
            kind="rmsnorm",
            eps=float(c["rms_norm_eps"]),
            placement="sandwich",
            bias=False,
            unit_offset=True,
        ),
        position=_gemma3_rope(c, has_local=window is not None),
        attention=AttentionConfig(
            n_heads=c["num_attention_heads"],
            n_kv_heads=c["num_key_value_heads"] or c["num_attention_heads"],
            head_dim=None if head_dim * c["num_attention_heads"] == c["hidden_size"] else head_dim,
            bias=bool(c["attention_bias"]),
            dropout=float(c["attention_dropout"]),
            qk_norm="head",
            sliding_window=window,
            global_every=every,
            scale=None if scalar == head_dim else float(scalar) ** -0.5,
        ),
        mlp=MLPConfig(kind="geglu", hidden=c["intermediate_size"], activation=ACTIVATIONS[act]),
        init=InitConfig(std=float(c["initializer_range"]), scaled_residual=False),
        embed_scale=True,
    )


def gemma3_to_hf_config(m: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> Gemma 3 text ``config.json``; UserError names any choice Gemma 3 lacks."""
    a = m.attention
    head_dim = m.head_dim
    check(
        "gemma3",
        [
            (m.position.kind != "rope", f"model.position.kind={m.position.kind} (needs rope)"),
            (m.norm.kind != "rmsnorm", f"model.norm.kind={m.norm.kind} (needs rmsnorm)"),
            (m.mlp.kind != "geglu", f"model.mlp.kind={m.mlp.kind} (needs geglu)"),
            (
                m.d_model % a.n_heads,
                f"model.attention.n_heads={a.n_heads} (HF Gemma 3 needs it to "
                f"divide d_model={m.d_model})",
            ),
        ],
    )
    scalar = head_dim if a.scale is None else round(a.scale**-2)
    if a.scale is not None and abs(scalar * a.scale**2 - 1) > 1e-6:
        raise unsupported(
            "gemma3", f"model.attention.scale={a.scale} (query_pre_attn_scalar must be an integer)"
        )
    full = rope_params_to_hf(m.position)
    local = full
    if m.position.local_rope_theta is not None:
        local = {"rope_type": "default", "rope_theta": m.position.local_rope_theta}
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": m.mlp.hidden,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": a.n_heads,
        "num_key_value_heads": m.kv_heads,
        "head_dim": head_dim,
        "hidden_activation": activation_to_hf("gemma3", m),
        "max_position_embeddings": m.max_seq_len,
        "initializer_range": m.init.std,
        "rms_norm_eps": m.norm.eps,
        "tie_word_embeddings": m.tie_embeddings,
        "attention_bias": a.bias,
        "attention_dropout": a.dropout,
        "query_pre_attn_scalar": scalar,
        # HF builds the sliding mask even when no layer uses it, so it needs some window.
        "sliding_window": a.sliding_window or m.max_seq_len,
        "layer_types": layer_types(m),
        "rope_parameters": {FULL: full, SLIDING: local},
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "use_bidirectional_attention": False,
    }


GEMMA3_RULES = (
    rule("model.embed_tokens.weight", "embed.weight"),
    rule("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
    *attention_rules("qkvo"),
    *qk_norm_rules(),
    rule("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.attn_post_norm.weight"),
    rule("model.layers.{i}.pre_feedforward_layernorm.weight", "layers.{i}.mlp_norm.weight"),
    rule("model.layers.{i}.post_feedforward_layernorm.weight", "layers.{i}.mlp_post_norm.weight"),
    *GATED_MLP_RULES,
    rule("model.norm.weight", "norm.weight"),
    rule("lm_head.weight", "head.weight"),
)

FAMILY = Family(
    name="gemma3",
    model_type="gemma3_text",
    architectures=("Gemma3ForCausalLM", "Gemma3TextModel"),
    to_model_config=gemma3_to_model_config,
    to_hf_config=gemma3_to_hf_config,
    rules=GEMMA3_RULES,
    base_prefix="model.",
    ignore=ROTARY_BUFFERS,
    # Gemma 3 4B / 12B / 27B ship as the multimodal wrapper around a gemma3_text model.
    wrappers={"gemma3": ("Gemma3ForConditionalGeneration",)},
)
