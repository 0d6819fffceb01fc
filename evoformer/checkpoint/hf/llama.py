"""LLaMA: pre-RMSNorm, RoPE (default, linear, llama3 or YaRN), SwiGLU, grouped-query
attention."""

from __future__ import annotations

from typing import Any

from evoformer.checkpoint.hf.dense import LLAMA_RULES
from evoformer.checkpoint.hf.family import (
    ACTIVATIONS,
    ROTARY_BUFFERS,
    Family,
    hf_defaults,
    invert,
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

LLAMA_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,
    "head_dim": None,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
}


def llama_to_model_config(hf: dict[str, Any]) -> ModelConfig:
    """LLaMA ``config.json`` -> ModelConfig (pre-RMSNorm, RoPE, SwiGLU, GQA)."""
    c = hf_defaults(hf, LLAMA_DEFAULTS)
    act = c["hidden_act"]
    if act not in ACTIVATIONS:
        raise unsupported("llama", f"hidden_act={act!r}")
    d, n_heads = c["hidden_size"], c["num_attention_heads"]
    head_dim = c["head_dim"] or d // n_heads
    # pretraining_tp > 1 only splits HF's matmuls into slices: same function, other rounding.
    return ModelConfig(
        vocab_size=c["vocab_size"],
        d_model=d,
        n_layers=c["num_hidden_layers"],
        max_seq_len=c["max_position_embeddings"],
        tie_embeddings=bool(c["tie_word_embeddings"]),
        dropout=0.0,
        norm=NormConfig(kind="rmsnorm", eps=float(c["rms_norm_eps"]), bias=False),
        position=rope_from_hf(c, "llama"),
        attention=AttentionConfig(
            n_heads=n_heads,
            n_kv_heads=c["num_key_value_heads"] or n_heads,
            head_dim=None if head_dim * n_heads == d else head_dim,
            bias=bool(c["attention_bias"]),
            dropout=float(c["attention_dropout"]),
        ),
        mlp=MLPConfig(
            kind="swiglu",
            hidden=c["intermediate_size"],
            bias=bool(c["mlp_bias"]),
            activation=ACTIVATIONS[act],
        ),
        init=InitConfig(std=float(c["initializer_range"]), scaled_residual=False),
    )


def llama_to_hf_config(m: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> LLaMA ``config.json``; UserError names any choice LLaMA lacks."""
    a = m.attention
    act = m.mlp.activation if m.mlp.activation != "default" else "silu"
    checks = [
        (m.position.kind != "rope", f"model.position.kind={m.position.kind} (needs rope)"),
        (m.norm.kind != "rmsnorm", f"model.norm.kind={m.norm.kind} (needs rmsnorm)"),
        (m.norm.placement != "pre", f"model.norm.placement={m.norm.placement} (needs pre)"),
        (m.mlp.kind != "swiglu", f"model.mlp.kind={m.mlp.kind} (needs swiglu)"),
        (m.dropout != 0, f"model.dropout={m.dropout} (LLaMA has no residual dropout)"),
        (act not in invert(ACTIVATIONS), f"model.mlp.activation={act}"),
    ]
    for bad, what in checks:
        if bad:
            raise unsupported("llama", what)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": m.mlp.hidden,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": a.n_heads,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_dim,
        "hidden_act": invert(ACTIVATIONS)[act],
        "max_position_embeddings": m.max_seq_len,
        "initializer_range": m.init.std,
        "rms_norm_eps": m.norm.eps,
        "tie_word_embeddings": m.tie_embeddings,
        "attention_bias": a.bias,
        "attention_dropout": a.dropout,
        "mlp_bias": m.mlp.bias,
        "pretraining_tp": 1,
        **rope_to_hf(m.position),
    }


FAMILY = Family(
    name="llama",
    model_type="llama",
    architectures=("LlamaForCausalLM", "LlamaModel"),
    to_model_config=llama_to_model_config,
    to_hf_config=llama_to_hf_config,
    rules=LLAMA_RULES,
    base_prefix="model.",
    ignore=ROTARY_BUFFERS,
)
