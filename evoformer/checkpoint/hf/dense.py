"""What the dense families after LLaMA (Mistral, Qwen2, Qwen3, OLMo 2, Gemma 3) share: the
LLaMA-like skeleton and its tensor names, and HF's local/global layer layouts.

HF layouts of local/global layers are lists (``layer_types``); ours is ``sliding_window`` plus
``global_every``, so only the layouts that pair can reproduce are accepted (all local, none, or
all but every N-th), and anything else is refused by name.
"""

from __future__ import annotations

from typing import Any

from evoformer.checkpoint.hf.family import (
    activation_from_hf,
    activation_to_hf,
    attention_rules,
    check,
    rule,
    unsupported,
)
from evoformer.checkpoint.hf.rope import rope_from_hf, rope_to_hf
from evoformer.config.schema import (
    AttentionConfig,
    InitConfig,
    MLPConfig,
    ModelConfig,
    NormConfig,
)
from evoformer.model.layout import layer_spec

SLIDING, FULL = "sliding_attention", "full_attention"

# LLaMA's tensor names, which Mistral and Qwen2/3 use unchanged (optional biases included).
LLAMA_RULES = (
    rule("model.embed_tokens.weight", "embed.weight"),
    rule("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
    *attention_rules("qkvo"),
    rule("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.weight"),
    *(
        rule(f"model.layers.{{i}}.mlp.{p}_proj.{t}", f"layers.{{i}}.mlp.{p}_proj.{t}")
        for p in ("gate", "up", "down")
        for t in ("weight", "bias")
    ),
    rule("model.norm.weight", "norm.weight"),
    rule("lm_head.weight", "head.weight"),
)

# -- local / global layers --------------------------------------------------------------------


def window_layout(
    family: str, layer_types: list[str], window: int | None
) -> tuple[int | None, int]:
    """HF ``layer_types`` (+ the window of its sliding layers) -> our ``(sliding_window,
    global_every)``; a UserError for layouts ``model.layout`` cannot reproduce."""
    unknown = sorted(set(layer_types) - {SLIDING, FULL})
    if unknown:
        raise unsupported(family, f"layer_types entry {unknown[0]!r}")
    local = [t == SLIDING for t in layer_types]
    if window is None or not any(local):
        return None, 0
    if all(local):
        return window, 0
    for every in range(2, len(local) + 1):
        if all(is_local == bool((i + 1) % every) for i, is_local in enumerate(local)):
            return window, every
    short = "".join("S" if x else "F" for x in local)
    raise unsupported(
        family,
        f"layer_types={short} (S sliding, F full): evoformer's local layers are all "
        "layers, or all but every N-th (attention.global_every)",
    )


def layer_types(m: ModelConfig) -> list[str]:
    """Our local/global layout as HF's ``layer_types`` list."""
    return [SLIDING if layer_spec(m, i).is_local else FULL for i in range(m.n_layers)]


# -- the LLaMA-like skeleton ------------------------------------------------------------------


def _head_dim(c: dict[str, Any]) -> int:
    # The classes without a head_dim field still read one from config.json (getattr).
    return c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]


def llama_like(family: str, c: dict[str, Any], **attention: Any) -> ModelConfig:
    """The LLaMA-like skeleton every family here shares: pre-RMSNorm, RoPE, SwiGLU, GQA;
    ``attention`` adds the family's own :class:`AttentionConfig` fields."""
    d, n_heads = c["hidden_size"], c["num_attention_heads"]
    head_dim = _head_dim(c)
    return ModelConfig(
        vocab_size=c["vocab_size"],
        d_model=d,
        n_layers=c["num_hidden_layers"],
        max_seq_len=c["max_position_embeddings"],
        tie_embeddings=bool(c["tie_word_embeddings"]),
        norm=NormConfig(kind="rmsnorm", eps=float(c["rms_norm_eps"]), bias=False),
        position=rope_from_hf(c, family),
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
            activation=activation_from_hf(family, c["hidden_act"]),
        ),
        init=InitConfig(std=float(c["initializer_range"]), scaled_residual=False),
    )


def check_llama_like(family: str, m: ModelConfig, placement: str = "pre") -> None:
    """Refuse a model outside the skeleton (norm ``placement`` is the family's)."""
    check(
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


def llama_like_to_hf(
    family: str, arch: str, m: ModelConfig, head_dim_field: bool
) -> dict[str, Any]:
    """The skeleton's ``config.json`` keys; ``head_dim_field``: the HF class has a head_dim."""
    a = m.attention
    head_dim = m.head_dim
    if not head_dim_field and head_dim * a.n_heads != m.d_model:
        raise unsupported(family, f"model.attention.head_dim={a.head_dim} (needs d_model/n_heads)")
    out = {
        "architectures": [arch],
        "model_type": family,
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": m.mlp.hidden,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": a.n_heads,
        "num_key_value_heads": m.kv_heads,
        "hidden_act": activation_to_hf(family, m),
        "max_position_embeddings": m.max_seq_len,
        "initializer_range": m.init.std,
        "rms_norm_eps": m.norm.eps,
        "tie_word_embeddings": m.tie_embeddings,
        "attention_dropout": a.dropout,
        **rope_to_hf(m.position),
    }
    if head_dim_field:
        out["head_dim"] = head_dim
    return out


# -- Qwen2 / Qwen3 ----------------------------------------------------------------------------

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


def qwen_window(family: str, c: dict[str, Any]) -> tuple[int | None, int]:
    """Qwen2/3's window settings -> our ``(sliding_window, global_every)``."""
    # As Qwen2Config: the window exists only with use_sliding_window, on the layers
    # layer_types names (by default those from max_window_layers on).
    window = c["sliding_window"] if c["use_sliding_window"] else None
    types = c["layer_types"] or [
        SLIDING if window is not None and i >= c["max_window_layers"] else FULL
        for i in range(c["num_hidden_layers"])
    ]
    return window_layout(family, types, window)


def qwen_window_to_hf(m: ModelConfig) -> dict[str, Any]:
    """Our window as Qwen2/3's ``use_sliding_window`` / ``max_window_layers`` / ``layer_types``."""
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
