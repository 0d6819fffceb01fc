"""HF conversion for the dense families after LLaMA: Mistral, Qwen2, Qwen3, OLMo 2 and Gemma 3.

Each is a :class:`~evoformer.checkpoint.hf.Family` entry built from the same pieces as LLaMA's
(see :mod:`evoformer.checkpoint.hf` for how the table drives import and export); what differs is
spelled out per family:

- Mistral: a sliding window on every layer.
- Qwen2: biases on q/k/v only; an optional window on the layers ``layer_types`` names.
- Qwen3: per-head RMSNorm on q and k, an explicit head_dim, biases on all four projections.
- OLMo 2: norms on the sub-layer outputs (``reordered``), RMSNorm over the whole q / k
  projection.
- Gemma 3 (text): sandwich norms with a unit offset, embeddings scaled by sqrt(d), GeGLU,
  per-head q/k norms, ``query_pre_attn_scalar``, and local (sliding, own RoPE base) layers with
  every N-th layer global.

HF layouts of local/global layers are lists (``layer_types``); ours is ``sliding_window`` plus
``global_every``, so only the layouts that list can reproduce are accepted (all local, none, or
all but every N-th), and anything else is refused by name.
"""

from __future__ import annotations

from typing import Any

from evoformer.checkpoint.hf import FAMILIES as HF_FAMILIES
from evoformer.checkpoint.hf import (
    LLAMA_ACTIVATIONS,
    LLAMA_RULES,
    Family,
    _hf_defaults,
    _invert,
    _rule,
    _unsupported,
)
from evoformer.config.schema import (
    AttentionConfig,
    InitConfig,
    MLPConfig,
    ModelConfig,
    NormConfig,
    PositionConfig,
    RopeScalingConfig,
)
from evoformer.model.layout import layer_spec

SLIDING, FULL = "sliding_attention", "full_attention"

# ---------------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------------


def _rope_params(params: dict[str, Any], family: str, max_pos: int) -> PositionConfig:
    """One HF RoPE parameter dict (``rope_type`` + ``rope_theta`` + scaling keys) -> ours."""
    theta = float(params["rope_theta"])
    kind = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", 1.0)
    if partial not in (None, 1, 1.0):
        raise _unsupported(family, f"partial_rotary_factor={partial}")
    if kind == "default":
        return PositionConfig(kind="rope", rope_theta=theta)
    if kind == "linear":
        scaling = RopeScalingConfig(kind="linear", factor=float(params["factor"]))
    elif kind == "llama3":
        scaling = RopeScalingConfig(
            kind="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_seq_len=int(params.get("original_max_position_embeddings", max_pos)),
        )
    else:
        raise _unsupported(family, f"rope_type={kind!r} (supported: default, linear, llama3)")
    return PositionConfig(kind="rope", rope_theta=theta, rope_scaling=scaling)


def _rope_from_hf(c: dict[str, Any], family: str) -> PositionConfig:
    """RoPE from a flat HF config: transformers 5 ``rope_parameters`` or the older
    ``rope_theta`` + ``rope_scaling`` (which wins when a file carries both, as in transformers)."""
    params = dict(c.get("rope_scaling") or c.get("rope_parameters") or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        raise _unsupported(family, f"per-layer-type rope_parameters ({', '.join(params)})")
    params.setdefault("rope_theta", c.get("rope_theta") or 10000.0)
    partial = c.get("partial_rotary_factor")
    if partial is not None:
        params.setdefault("partial_rotary_factor", partial)
    return _rope_params(params, family, c["max_position_embeddings"])


def _rope_dict(p: PositionConfig) -> dict[str, Any]:
    """Our RoPE as one HF parameter dict."""
    s = p.rope_scaling
    out: dict[str, Any] = {"rope_type": "default", "rope_theta": p.rope_theta}
    if s.kind == "linear":
        out.update(rope_type="linear", factor=s.factor)
    elif s.kind == "llama3":
        out.update(
            rope_type="llama3",
            factor=s.factor,
            low_freq_factor=s.low_freq_factor,
            high_freq_factor=s.high_freq_factor,
            original_max_position_embeddings=s.original_max_seq_len,
        )
    return out


def _rope_to_hf(p: PositionConfig) -> dict[str, Any]:
    """HF RoPE keys in both layouts, so transformers 4 and 5 read the same thing."""
    params = _rope_dict(p)
    scaling = None if p.rope_scaling.kind == "none" else params
    return {"rope_theta": p.rope_theta, "rope_scaling": scaling, "rope_parameters": params}


def window_layout(
    family: str, layer_types: list[str], window: int | None
) -> tuple[int | None, int]:
    """HF ``layer_types`` (+ the window of its sliding layers) -> our ``(sliding_window,
    global_every)``; a UserError for layouts ``model.layout`` cannot reproduce."""
    unknown = sorted(set(layer_types) - {SLIDING, FULL})
    if unknown:
        raise _unsupported(family, f"layer_types entry {unknown[0]!r}")
    local = [t == SLIDING for t in layer_types]
    if window is None or not any(local):
        return None, 0
    if all(local):
        return window, 0
    for every in range(2, len(local) + 1):
        if all(is_local == bool((i + 1) % every) for i, is_local in enumerate(local)):
            return window, every
    short = "".join("S" if x else "F" for x in local)
    raise _unsupported(
        family,
        f"layer_types={short} (S sliding, F full): evoformer's local layers are all "
        "layers, or all but every N-th (attention.global_every)",
    )


def layer_types(m: ModelConfig) -> list[str]:
    """Our local/global layout as HF's ``layer_types`` list."""
    return [SLIDING if layer_spec(m, i).is_local else FULL for i in range(m.n_layers)]


def _check(family: str, checks: list[tuple[bool, str]]) -> None:
    for bad, what in checks:
        if bad:
            raise _unsupported(family, what)


def _activation_from_hf(family: str, act: str) -> str:
    if act not in LLAMA_ACTIVATIONS:
        raise _unsupported(family, f"hidden_act={act!r}")
    return LLAMA_ACTIVATIONS[act]


def _activation_to_hf(family: str, m: ModelConfig) -> str:
    default = "gelu_tanh" if m.mlp.kind == "geglu" else "silu"
    act = default if m.mlp.activation == "default" else m.mlp.activation
    if act not in _invert(LLAMA_ACTIVATIONS):
        raise _unsupported(family, f"model.mlp.activation={act}")
    return _invert(LLAMA_ACTIVATIONS)[act]


def _head_dim(c: dict[str, Any]) -> int:
    # The classes without a head_dim field still read one from config.json (getattr).
    return c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]


def _base(family: str, c: dict[str, Any], **attention: Any) -> ModelConfig:
    """The LLaMA-like skeleton every family here shares: pre-RMSNorm, RoPE, SwiGLU, GQA."""
    d, n_heads = c["hidden_size"], c["num_attention_heads"]
    head_dim = _head_dim(c)
    return ModelConfig(
        vocab_size=c["vocab_size"],
        d_model=d,
        n_layers=c["num_hidden_layers"],
        max_seq_len=c["max_position_embeddings"],
        tie_embeddings=bool(c["tie_word_embeddings"]),
        norm=NormConfig(kind="rmsnorm", eps=float(c["rms_norm_eps"]), bias=False),
        position=_rope_from_hf(c, family),
        attention=AttentionConfig(
            n_heads=n_heads,
            n_kv_heads=c["num_key_value_heads"] or n_heads,
            head_dim=None if head_dim * n_heads == d else head_dim,
            dropout=float(c["attention_dropout"]),
            **attention,
        ),
        mlp=MLPConfig(
            kind="swiglu",
            hidden=c["intermediate_size"],
            activation=_activation_from_hf(family, c["hidden_act"]),
        ),
        init=InitConfig(std=float(c["initializer_range"]), scaled_residual=False),
    )


def _base_checks(family: str, m: ModelConfig, placement: str = "pre") -> None:
    _check(
        family,
        [
            (m.position.kind != "rope", f"model.position.kind={m.position.kind} (needs rope)"),
            (m.norm.kind != "rmsnorm", f"model.norm.kind={m.norm.kind} (needs rmsnorm)"),
            (
                m.norm.placement != placement,
                f"model.norm.placement={m.norm.placement} (needs {placement})",
            ),
            (m.mlp.kind != "swiglu", f"model.mlp.kind={m.mlp.kind} (needs swiglu)"),
            (m.mlp.bias, "model.mlp.bias=true"),
            (m.dropout != 0, f"model.dropout={m.dropout} (no residual dropout)"),
        ],
    )


def _base_to_hf(family: str, arch: str, m: ModelConfig, head_dim_field: bool) -> dict[str, Any]:
    a = m.attention
    head_dim = a.head_dim or m.d_model // a.n_heads
    if not head_dim_field and head_dim * a.n_heads != m.d_model:
        raise _unsupported(family, f"model.attention.head_dim={a.head_dim} (needs d_model/n_heads)")
    out = {
        "architectures": [arch],
        "model_type": family,
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": m.mlp.hidden,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": a.n_heads,
        "num_key_value_heads": a.n_kv_heads or a.n_heads,
        "hidden_act": _activation_to_hf(family, m),
        "max_position_embeddings": m.max_seq_len,
        "initializer_range": m.init.std,
        "rms_norm_eps": m.norm.eps,
        "tie_word_embeddings": m.tie_embeddings,
        "attention_dropout": a.dropout,
        **_rope_to_hf(m.position),
    }
    if head_dim_field:
        out["head_dim"] = head_dim
    return out


def _qk_norm_rules() -> tuple:
    return tuple(
        _rule(f"model.layers.{{i}}.self_attn.{p}_norm.weight", f"layers.{{i}}.attn.{p}_norm.weight")
        for p in "qk"
    )


_ROTARY = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)

# ---------------------------------------------------------------------------------------------
# Mistral
# ---------------------------------------------------------------------------------------------

MISTRAL_DEFAULTS: dict[str, Any] = {
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
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "attention_dropout": 0.0,
}


def mistral_to_model_config(hf: dict[str, Any]) -> ModelConfig:
    """Mistral ``config.json`` -> ModelConfig: LLaMA with a sliding window on every layer."""
    c = _hf_defaults(hf, MISTRAL_DEFAULTS)
    return _base("mistral", c, sliding_window=c["sliding_window"])


def mistral_to_hf_config(m: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> Mistral ``config.json``; UserError names any choice Mistral lacks."""
    _base_checks("mistral", m)
    return {
        **_base_to_hf("mistral", "MistralForCausalLM", m, head_dim_field=True),
        "sliding_window": m.attention.sliding_window,
    }


# ---------------------------------------------------------------------------------------------
# Qwen2 / Qwen3
# ---------------------------------------------------------------------------------------------

QWEN2_DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 22016,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "use_sliding_window": False,
    "sliding_window": 4096,
    "max_window_layers": 28,
    "layer_types": None,
    "attention_dropout": 0.0,
}

QWEN3_DEFAULTS: dict[str, Any] = {**QWEN2_DEFAULTS, "head_dim": 128, "attention_bias": False}


def _qwen_window(family: str, c: dict[str, Any]) -> tuple[int | None, int]:
    # As Qwen2Config: the window exists only with use_sliding_window, on the layers
    # layer_types names (by default those from max_window_layers on).
    window = c["sliding_window"] if c["use_sliding_window"] else None
    types = c["layer_types"] or [
        SLIDING if window is not None and i >= c["max_window_layers"] else FULL
        for i in range(c["num_hidden_layers"])
    ]
    return window_layout(family, types, window)


def _qwen_window_to_hf(m: ModelConfig) -> dict[str, Any]:
    a = m.attention
    types = layer_types(m)
    # max_window_layers only matters to readers that ignore layer_types: the first layer from
    # which every layer slides.
    first = next((i for i in range(m.n_layers) if all(t == SLIDING for t in types[i:])), m.n_layers)
    return {
        "use_sliding_window": a.sliding_window is not None,
        "sliding_window": a.sliding_window,
        "max_window_layers": first,
        "layer_types": types,
    }


def qwen2_to_model_config(hf: dict[str, Any]) -> ModelConfig:
    """Qwen2 ``config.json`` -> ModelConfig: LLaMA with biases on q/k/v (not o)."""
    c = _hf_defaults(hf, QWEN2_DEFAULTS)
    window, every = _qwen_window("qwen2", c)
    return _base("qwen2", c, qkv_bias=True, sliding_window=window, global_every=every)


def qwen2_to_hf_config(m: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> Qwen2 ``config.json``; UserError names any choice Qwen2 lacks."""
    _base_checks("qwen2", m)
    return {
        **_base_to_hf("qwen2", "Qwen2ForCausalLM", m, head_dim_field=False),
        **_qwen_window_to_hf(m),
    }


def qwen3_to_model_config(hf: dict[str, Any]) -> ModelConfig:
    """Qwen3 ``config.json`` -> ModelConfig: per-head RMSNorm on q and k before RoPE."""
    c = _hf_defaults(hf, QWEN3_DEFAULTS)
    window, every = _qwen_window("qwen3", c)
    return _base(
        "qwen3",
        c,
        bias=bool(c["attention_bias"]),
        qk_norm="head",
        sliding_window=window,
        global_every=every,
    )


def qwen3_to_hf_config(m: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> Qwen3 ``config.json``; UserError names any choice Qwen3 lacks."""
    _base_checks("qwen3", m)
    return {
        **_base_to_hf("qwen3", "Qwen3ForCausalLM", m, head_dim_field=True),
        "attention_bias": m.attention.bias,
        **_qwen_window_to_hf(m),
    }


# ---------------------------------------------------------------------------------------------
# OLMo 2
# ---------------------------------------------------------------------------------------------

OLMO2_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50304,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "rms_norm_eps": 1e-5,
}


def olmo2_to_model_config(hf: dict[str, Any]) -> ModelConfig:
    """OLMo 2 ``config.json`` -> ModelConfig: norms on the sub-layer outputs, QK-norm over the
    whole projection."""
    c = _hf_defaults(hf, OLMO2_DEFAULTS)
    m = _base("olmo2", c, bias=bool(c["attention_bias"]), qk_norm="full")
    m.norm.placement = "reordered"
    return m


def olmo2_to_hf_config(m: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> OLMo 2 ``config.json``; UserError names any choice OLMo 2 lacks."""
    _base_checks("olmo2", m, placement="reordered")
    return {
        **_base_to_hf("olmo2", "Olmo2ForCausalLM", m, head_dim_field=False),
        "attention_bias": m.attention.bias,
    }


# The attention projections (biases kept only where the model has them) and the gated MLP, named
# alike in every LLaMA-descended HF family.
_ATTN_RULES = tuple(
    _rule(f"model.layers.{{i}}.self_attn.{p}_proj.{t}", f"layers.{{i}}.attn.{p}_proj.{t}")
    for p in "qkvo"
    for t in ("weight", "bias")
)
_MLP_RULES = tuple(
    _rule(f"model.layers.{{i}}.mlp.{p}_proj.weight", f"layers.{{i}}.mlp.{p}_proj.weight")
    for p in ("gate", "up", "down")
)


OLMO2_RULES = (
    _rule("model.embed_tokens.weight", "embed.weight"),
    *_ATTN_RULES,
    *_qk_norm_rules(),
    # reordered: our attn_norm / mlp_norm sit where OLMo 2 has its post-sub-layer norms.
    _rule("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.attn_norm.weight"),
    _rule("model.layers.{i}.post_feedforward_layernorm.weight", "layers.{i}.mlp_norm.weight"),
    *_MLP_RULES,
    _rule("model.norm.weight", "norm.weight"),
    _rule("lm_head.weight", "head.weight"),
)

# ---------------------------------------------------------------------------------------------
# Gemma 3 (text)
# ---------------------------------------------------------------------------------------------

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
        raise _unsupported("gemma3", "rope_parameters without per-layer-type entries")
    if params:
        full, local = dict(params.get(FULL) or {}), dict(params.get(SLIDING) or {})
    else:  # transformers 4: rope_theta (+ rope_scaling) global, rope_local_base_freq local
        full = {"rope_type": "default", **(c.get("rope_scaling") or {})}
        full.setdefault("rope_theta", c.get("rope_theta") or 1_000_000.0)
        local = {"rope_type": "default"}
        local.setdefault("rope_theta", c.get("rope_local_base_freq") or 10_000.0)
    full.setdefault("rope_theta", 1_000_000.0)
    local.setdefault("rope_theta", 10_000.0)
    pos = _rope_params(full, "gemma3", c["max_position_embeddings"])
    loc = _rope_params(local, "gemma3", c["max_position_embeddings"])
    if has_local and (loc.rope_theta, loc.rope_scaling) != (pos.rope_theta, pos.rope_scaling):
        if loc.rope_scaling.kind != "none":
            raise _unsupported("gemma3", f"rope scaling on sliding layers ({local})")
        pos.local_rope_theta = loc.rope_theta
    return pos


def gemma3_to_model_config(hf: dict[str, Any]) -> ModelConfig:
    """Gemma 3 text ``config.json`` -> ModelConfig (sandwich unit-offset RMSNorms, scaled
    embeddings, GeGLU, per-head q/k norms, 5 local : 1 global layers with their own RoPE)."""
    c = _hf_defaults(hf, GEMMA3_DEFAULTS)
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if c[key] is not None:
            raise _unsupported("gemma3", f"{key}={c[key]}")
    if c["use_bidirectional_attention"]:
        raise _unsupported("gemma3", "use_bidirectional_attention=true")
    act = c["hidden_activation"]
    if act not in LLAMA_ACTIVATIONS:
        raise _unsupported("gemma3", f"hidden_activation={act!r}")
    pattern = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6
    n = c["num_hidden_layers"]
    types = c["layer_types"] or [SLIDING if (i + 1) % pattern else FULL for i in range(n)]
    window, every = window_layout("gemma3", types, c["sliding_window"])
    head_dim = c["head_dim"]
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
        mlp=MLPConfig(
            kind="geglu", hidden=c["intermediate_size"], activation=LLAMA_ACTIVATIONS[act]
        ),
        init=InitConfig(std=float(c["initializer_range"]), scaled_residual=False),
        embed_scale=True,
    )


def gemma3_to_hf_config(m: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> Gemma 3 text ``config.json``; UserError names any choice Gemma 3 lacks."""
    a = m.attention
    head_dim = a.head_dim or m.d_model // a.n_heads
    _check(
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
        raise _unsupported(
            "gemma3", f"model.attention.scale={a.scale} (query_pre_attn_scalar must be an integer)"
        )
    full = _rope_dict(m.position)
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
        "num_key_value_heads": a.n_kv_heads or a.n_heads,
        "head_dim": head_dim,
        "hidden_activation": _activation_to_hf("gemma3", m),
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
    _rule("model.embed_tokens.weight", "embed.weight"),
    _rule("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
    *_ATTN_RULES,
    *_qk_norm_rules(),
    _rule("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.attn_post_norm.weight"),
    _rule("model.layers.{i}.pre_feedforward_layernorm.weight", "layers.{i}.mlp_norm.weight"),
    _rule("model.layers.{i}.post_feedforward_layernorm.weight", "layers.{i}.mlp_post_norm.weight"),
    *_MLP_RULES,
    _rule("model.norm.weight", "norm.weight"),
    _rule("lm_head.weight", "head.weight"),
)

# ---------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="mistral",
            model_type="mistral",
            architectures=("MistralForCausalLM", "MistralModel"),
            to_model_config=mistral_to_model_config,
            to_hf_config=mistral_to_hf_config,
            rules=LLAMA_RULES,
            base_prefix="model.",
            ignore=_ROTARY,
        ),
        Family(
            name="qwen2",
            model_type="qwen2",
            architectures=("Qwen2ForCausalLM", "Qwen2Model"),
            to_model_config=qwen2_to_model_config,
            to_hf_config=qwen2_to_hf_config,
            rules=LLAMA_RULES,
            base_prefix="model.",
            ignore=_ROTARY,
        ),
        Family(
            name="qwen3",
            model_type="qwen3",
            architectures=("Qwen3ForCausalLM", "Qwen3Model"),
            to_model_config=qwen3_to_model_config,
            to_hf_config=qwen3_to_hf_config,
            rules=(*LLAMA_RULES, *_qk_norm_rules()),
            base_prefix="model.",
            ignore=_ROTARY,
        ),
        Family(
            name="olmo2",
            model_type="olmo2",
            architectures=("Olmo2ForCausalLM", "Olmo2Model"),
            to_model_config=olmo2_to_model_config,
            to_hf_config=olmo2_to_hf_config,
            rules=OLMO2_RULES,
            base_prefix="model.",
            ignore=_ROTARY,
        ),
        Family(
            name="gemma3",
            model_type="gemma3_text",
            architectures=("Gemma3ForCausalLM", "Gemma3TextModel"),
            to_model_config=gemma3_to_model_config,
            to_hf_config=gemma3_to_hf_config,
            rules=GEMMA3_RULES,
            base_prefix="model.",
            ignore=_ROTARY,
        ),
    )
}

# Registered here rather than in hf.py so either module may be imported first (hf.py imports
# this one at its end; this one needs hf.py's helpers at its start).
HF_FAMILIES.update(FAMILIES)
