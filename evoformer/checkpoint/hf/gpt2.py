"""GPT-2: pre-LayerNorm, learned positions, a 4x GELU MLP, fused ``c_attn`` stored as Conv1D
(``[in, out]``, hence the transposed rules)."""

from __future__ import annotations

from typing import Any

from evoformer.checkpoint.hf.family import Family, hf_defaults, invert, rule, unsupported
from evoformer.config.schema import (
    AttentionConfig,
    InitConfig,
    MLPConfig,
    ModelConfig,
    NormConfig,
    PositionConfig,
)
from evoformer.errors import UserError

GPT2_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "activation_function": "gelu_new",
    "resid_pdrop": 0.1,
    "embd_pdrop": 0.1,
    "attn_pdrop": 0.1,
    "layer_norm_epsilon": 1e-5,
    "initializer_range": 0.02,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}

# HF activation name -> ours. gelu_new / gelu_pytorch_tanh are both the tanh approximation.
GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def gpt2_to_model_config(hf: dict[str, Any]) -> ModelConfig:
    """GPT-2 ``config.json`` -> ModelConfig (pre-LayerNorm, learned positions, 4x gelu MLP)."""
    c = hf_defaults(hf, GPT2_DEFAULTS)
    if c["add_cross_attention"]:
        raise unsupported("gpt2", "add_cross_attention=true (cross-attention)")
    if not c["scale_attn_weights"]:
        raise unsupported("gpt2", "scale_attn_weights=false (unscaled attention scores)")
    if c["scale_attn_by_inverse_layer_idx"]:
        raise unsupported("gpt2", "scale_attn_by_inverse_layer_idx=true")
    act = c["activation_function"]
    if act not in GPT2_ACTIVATIONS:
        raise unsupported("gpt2", f"activation_function={act!r}")
    if c["embd_pdrop"] != c["resid_pdrop"]:
        # One model.dropout covers embeddings and residuals.
        raise unsupported("gpt2", f"embd_pdrop={c['embd_pdrop']} != resid_pdrop={c['resid_pdrop']}")
    if c["n_embd"] % c["n_head"]:
        raise UserError(f"gpt2: n_embd={c['n_embd']} is not a multiple of n_head={c['n_head']}")
    # reorder_and_upcast_attn only changes fp16 rounding; our attention already runs in SDPA.
    return ModelConfig(
        vocab_size=c["vocab_size"],
        d_model=c["n_embd"],
        n_layers=c["n_layer"],
        max_seq_len=c["n_positions"],
        tie_embeddings=bool(c["tie_word_embeddings"]),
        dropout=float(c["resid_pdrop"]),
        norm=NormConfig(kind="layernorm", eps=float(c["layer_norm_epsilon"]), bias=True),
        position=PositionConfig(kind="learned"),
        attention=AttentionConfig(n_heads=c["n_head"], bias=True, dropout=float(c["attn_pdrop"])),
        mlp=MLPConfig(
            kind="gelu",
            hidden=c["n_inner"] or 4 * c["n_embd"],
            bias=True,
            activation=GPT2_ACTIVATIONS[act],
        ),
        init=InitConfig(std=float(c["initializer_range"]), scaled_residual=True),
    )


def gpt2_to_hf_config(m: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> GPT-2 ``config.json``; UserError names any choice GPT-2 lacks."""
    a = m.attention
    act = m.mlp.activation if m.mlp.activation != "default" else "gelu_tanh"
    checks = [
        (m.position.kind != "learned", f"model.position.kind={m.position.kind} (needs learned)"),
        (m.norm.kind != "layernorm", f"model.norm.kind={m.norm.kind} (needs layernorm)"),
        (not m.norm.bias, "model.norm.bias=false (GPT-2 LayerNorms have a bias)"),
        (m.norm.placement != "pre", f"model.norm.placement={m.norm.placement} (needs pre)"),
        (m.mlp.kind != "gelu", f"model.mlp.kind={m.mlp.kind} (needs gelu)"),
        (not m.mlp.bias, "model.mlp.bias=false (GPT-2 MLPs have biases)"),
        (not a.bias, "model.attention.bias=false (GPT-2 attention has biases)"),
        (
            m.kv_heads != a.n_heads,
            f"model.attention.n_kv_heads={a.n_kv_heads} (GPT-2 has no grouped-query attention)",
        ),
        (
            a.head_dim not in (None, m.d_model // a.n_heads),
            f"model.attention.head_dim={a.head_dim} (GPT-2 needs d_model / n_heads)",
        ),
        (act not in invert(GPT2_ACTIVATIONS), f"model.mlp.activation={act}"),
    ]
    for bad, what in checks:
        if bad:
            raise unsupported("gpt2", what)
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": m.vocab_size,
        "n_positions": m.max_seq_len,
        "n_embd": m.d_model,
        "n_layer": m.n_layers,
        "n_head": a.n_heads,
        "n_inner": m.mlp.hidden,
        "activation_function": invert(GPT2_ACTIVATIONS)[act],
        "resid_pdrop": m.dropout,
        "embd_pdrop": m.dropout,
        "attn_pdrop": a.dropout,
        "layer_norm_epsilon": m.norm.eps,
        "initializer_range": m.init.std,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": m.tie_embeddings,
    }


GPT2_RULES = (
    rule("transformer.wte.weight", "embed.weight"),
    rule("transformer.wpe.weight", "pos_embed.weight"),
    rule("transformer.h.{i}.ln_1.weight", "layers.{i}.attn_norm.weight"),
    rule("transformer.h.{i}.ln_1.bias", "layers.{i}.attn_norm.bias"),
    rule(
        "transformer.h.{i}.attn.c_attn.weight",
        *(f"layers.{{i}}.attn.{p}_proj.weight" for p in "qkv"),
        transpose=True,
    ),
    rule(
        "transformer.h.{i}.attn.c_attn.bias", *(f"layers.{{i}}.attn.{p}_proj.bias" for p in "qkv")
    ),
    rule("transformer.h.{i}.attn.c_proj.weight", "layers.{i}.attn.o_proj.weight", transpose=True),
    rule("transformer.h.{i}.attn.c_proj.bias", "layers.{i}.attn.o_proj.bias"),
    rule("transformer.h.{i}.ln_2.weight", "layers.{i}.mlp_norm.weight"),
    rule("transformer.h.{i}.ln_2.bias", "layers.{i}.mlp_norm.bias"),
    rule("transformer.h.{i}.mlp.c_fc.weight", "layers.{i}.mlp.up_proj.weight", transpose=True),
    rule("transformer.h.{i}.mlp.c_fc.bias", "layers.{i}.mlp.up_proj.bias"),
    rule("transformer.h.{i}.mlp.c_proj.weight", "layers.{i}.mlp.down_proj.weight", transpose=True),
    rule("transformer.h.{i}.mlp.c_proj.bias", "layers.{i}.mlp.down_proj.bias"),
    rule("transformer.ln_f.weight", "norm.weight"),
    rule("transformer.ln_f.bias", "norm.bias"),
    rule("lm_head.weight", "head.weight"),
)

FAMILY = Family(
    name="gpt2",
    model_type="gpt2",
    architectures=("GPT2LMHeadModel", "GPT2Model"),
    to_model_config=gpt2_to_model_config,
    to_hf_config=gpt2_to_hf_config,
    rules=GPT2_RULES,
    base_prefix="transformer.",
    # Causal-mask buffers that older transformers versions saved with the weights.
    ignore=(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)",),
)
