"""Conversion between HuggingFace ``save_pretrained`` folders and evoformer checkpoints.

One table, :data:`FAMILIES`, drives both directions. A family is three things:

- ``to_model_config``: the HF ``config.json`` (a plain dict) -> our :class:`ModelConfig`, raising a
  :class:`UserError` for every HF feature our schema cannot express;
- ``to_hf_config``: our ModelConfig -> the HF ``config.json`` dict, raising a UserError naming the
  model choice HF's class for that family cannot express. Every export also reads the result
  back through ``to_model_config`` and refuses the model unless the same ModelConfig comes back
  (:func:`hf_config_for`), so a setting no converter knows about (say a schema field added
  later) stops the export instead of being silently dropped;
- ``rules``: the weight-name mapping. Each :class:`WeightRule` ties one HF tensor to one or more of
  ours (several = HF fuses them along the output dimension, e.g. GPT-2's ``c_attn``), optionally
  transposed (GPT-2's ``Conv1D`` stores ``[in, out]``); ``{i}`` stands for the layer index.

Rules list every tensor a family can have; the ones whose evoformer tensors the configured model
lacks (biases, an untied head) are skipped, so optional tensors need no special cases. Any HF
tensor left unconsumed is an error rather than silently dropped weights. Adding a family
(Mistral, Qwen, OLMo 2, ...) is one more :class:`Family` entry.

Weights are read with ``safetensors`` only: pickled ``pytorch_model.bin`` files can run arbitrary
code when loaded, so they are refused. ``config.json`` is read as JSON (with the family's HF
defaults filled in for keys ``save_pretrained`` may omit), so importing needs no ``transformers``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import re
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from evoformer.checkpoint.io import list_checkpoints, save_checkpoint, write_text_atomic
from evoformer.checkpoint.model_io import load_model
from evoformer.config.loader import to_yaml
from evoformer.config.schema import (
    AttentionConfig,
    Config,
    InitConfig,
    MLPConfig,
    ModelConfig,
    NormConfig,
    PositionConfig,
    RopeScalingConfig,
)
from evoformer.config.validate import validate_model
from evoformer.errors import UserError
from evoformer.model import Transformer, build_model

# ---------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WeightRule:
    """One HF tensor <-> evoformer tensor(s); ``{i}`` in the names is the layer index."""

    hf: str
    ours: tuple[str, ...]
    transpose: bool = False  # HF stores [in, out] (GPT-2 Conv1D) instead of nn.Linear's [out, in]
    index: int | None = None  # the HF tensor is slice [index] of ours (stacked MoE experts)


@dataclasses.dataclass(frozen=True)
class Family:
    """How one HuggingFace architecture maps onto evoformer."""

    name: str
    model_type: str  # HF config.json "model_type"
    architectures: tuple[str, ...]  # accepted HF classes; the first is written on export
    to_model_config: Callable[[dict[str, Any]], ModelConfig]
    to_hf_config: Callable[[ModelConfig], dict[str, Any]]
    rules: tuple[WeightRule, ...]
    base_prefix: str  # the decoder's prefix in *ForCausalLM files; bare-model files omit it
    ignore: tuple[str, ...] = ()  # regexes of HF tensors with no counterpart (stale buffers)
    # Rules that depend on the model config (one per expert; MTP modules stored as extra layers).
    extra_rules: Callable[[ModelConfig], Sequence[WeightRule]] | None = None
    # transform(hf_name, tensor, hf_config, to_ours): a per-tensor change of layout in HF's
    # naming (DeepSeek's interleaved RoPE rows); applied on import, inverted on export.
    transform: Callable[[str, torch.Tensor, dict[str, Any], bool], torch.Tensor] | None = None
    # refine(model_config, hf_tensor_names): settings config.json cannot tell (DeepSeek's MTP
    # modules, counted by the config but present only in some files).
    refine: Callable[[ModelConfig, set[str]], ModelConfig] | None = None


def _rule(hf: str, *ours: str, transpose: bool = False) -> WeightRule:
    return WeightRule(hf, tuple(ours), transpose)


def _hf_defaults(hf: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    # save_pretrained may write only the keys that differ from the class defaults.
    return {**defaults, **{k: v for k, v in hf.items() if v is not None or k not in defaults}}


def _invert(mapping: dict[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for hf_name, ours in mapping.items():
        out.setdefault(ours, hf_name)  # the first HF name listed is the canonical one
    return out


def _unsupported(family: str, what: str) -> UserError:
    return UserError(f"{family}: {what} cannot be expressed")


# -- GPT-2 ------------------------------------------------------------------------------------

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
    c = _hf_defaults(hf, GPT2_DEFAULTS)
    if c["add_cross_attention"]:
        raise _unsupported("gpt2", "add_cross_attention=true (cross-attention)")
    if not c["scale_attn_weights"]:
        raise _unsupported("gpt2", "scale_attn_weights=false (unscaled attention scores)")
    if c["scale_attn_by_inverse_layer_idx"]:
        raise _unsupported("gpt2", "scale_attn_by_inverse_layer_idx=true")
    act = c["activation_function"]
    if act not in GPT2_ACTIVATIONS:
        raise _unsupported("gpt2", f"activation_function={act!r}")
    if c["embd_pdrop"] != c["resid_pdrop"]:
        # One model.dropout covers embeddings and residuals.
        raise _unsupported(
            "gpt2", f"embd_pdrop={c['embd_pdrop']} != resid_pdrop={c['resid_pdrop']}"
        )
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
            (a.n_kv_heads or a.n_heads) != a.n_heads,
            f"model.attention.n_kv_heads={a.n_kv_heads} (GPT-2 has no grouped-query attention)",
        ),
        (
            a.head_dim not in (None, m.d_model // a.n_heads),
            f"model.attention.head_dim={a.head_dim} (GPT-2 needs d_model / n_heads)",
        ),
        (act not in _invert(GPT2_ACTIVATIONS), f"model.mlp.activation={act}"),
    ]
    for bad, what in checks:
        if bad:
            raise _unsupported("gpt2", what)
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": m.vocab_size,
        "n_positions": m.max_seq_len,
        "n_embd": m.d_model,
        "n_layer": m.n_layers,
        "n_head": a.n_heads,
        "n_inner": m.mlp.hidden,
        "activation_function": _invert(GPT2_ACTIVATIONS)[act],
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
    _rule("transformer.wte.weight", "embed.weight"),
    _rule("transformer.wpe.weight", "pos_embed.weight"),
    _rule("transformer.h.{i}.ln_1.weight", "layers.{i}.attn_norm.weight"),
    _rule("transformer.h.{i}.ln_1.bias", "layers.{i}.attn_norm.bias"),
    _rule(
        "transformer.h.{i}.attn.c_attn.weight",
        *(f"layers.{{i}}.attn.{p}_proj.weight" for p in "qkv"),
        transpose=True,
    ),
    _rule(
        "transformer.h.{i}.attn.c_attn.bias", *(f"layers.{{i}}.attn.{p}_proj.bias" for p in "qkv")
    ),
    _rule("transformer.h.{i}.attn.c_proj.weight", "layers.{i}.attn.o_proj.weight", transpose=True),
    _rule("transformer.h.{i}.attn.c_proj.bias", "layers.{i}.attn.o_proj.bias"),
    _rule("transformer.h.{i}.ln_2.weight", "layers.{i}.mlp_norm.weight"),
    _rule("transformer.h.{i}.ln_2.bias", "layers.{i}.mlp_norm.bias"),
    _rule("transformer.h.{i}.mlp.c_fc.weight", "layers.{i}.mlp.up_proj.weight", transpose=True),
    _rule("transformer.h.{i}.mlp.c_fc.bias", "layers.{i}.mlp.up_proj.bias"),
    _rule("transformer.h.{i}.mlp.c_proj.weight", "layers.{i}.mlp.down_proj.weight", transpose=True),
    _rule("transformer.h.{i}.mlp.c_proj.bias", "layers.{i}.mlp.down_proj.bias"),
    _rule("transformer.ln_f.weight", "norm.weight"),
    _rule("transformer.ln_f.bias", "norm.bias"),
    _rule("lm_head.weight", "head.weight"),
)

# -- LLaMA ------------------------------------------------------------------------------------

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

LLAMA_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
}


def rope_from_hf(c: dict[str, Any], family: str) -> PositionConfig:
    """RoPE settings from either HF layout: ``rope_theta`` + ``rope_scaling`` (transformers 4)
    or ``rope_parameters`` (transformers 5). Like transformers 5, a legacy ``rope_scaling``
    wins over ``rope_parameters`` when a file carries both."""
    params = dict(c.get("rope_scaling") or c.get("rope_parameters") or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        raise _unsupported(family, f"per-layer-type rope_parameters ({', '.join(params)})")
    theta = float(params.get("rope_theta", c.get("rope_theta") or 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise _unsupported(family, f"partial_rotary_factor={partial}")
    if kind == "default":
        return PositionConfig(kind="rope", rope_theta=theta)
    if kind == "yarn":
        return PositionConfig(kind="rope", rope_theta=theta, rope_scaling=_yarn_from_hf(params, c))
    if kind != "llama3":
        raise _unsupported(family, f"rope_type={kind!r} (supported: default, llama3, yarn)")
    scaling = RopeScalingConfig(
        kind="llama3",
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_seq_len=int(
            params.get("original_max_position_embeddings", c["max_position_embeddings"])
        ),
    )
    return PositionConfig(kind="rope", rope_theta=theta, rope_scaling=scaling)


def _yarn_from_hf(params: dict[str, Any], c: dict[str, Any]) -> RopeScalingConfig:
    original = int(params.get("original_max_position_embeddings") or c["max_position_embeddings"])
    factor = params.get("factor")
    if factor is None:  # DeepSeek-style files may give only the two context lengths
        factor = c["max_position_embeddings"] / original
    attention_factor = params.get("attention_factor")
    return RopeScalingConfig(
        kind="yarn",
        factor=float(factor),
        original_max_seq_len=original,
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=float(params.get("mscale") or 0.0),
        mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
        attention_factor=None if attention_factor is None else float(attention_factor),
        truncate=bool(params.get("truncate", True)),
    )


def rope_to_hf(p: PositionConfig) -> dict[str, Any]:
    """HF RoPE keys written in both layouts, so transformers 4 and 5 read the same thing."""
    s = p.rope_scaling
    scaling = None
    if s.kind == "llama3":
        scaling = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_seq_len,
        }
    elif s.kind == "yarn":
        scaling = {
            "rope_type": "yarn",
            "factor": s.factor,
            "original_max_position_embeddings": s.original_max_seq_len,
            "beta_fast": s.beta_fast,
            "beta_slow": s.beta_slow,
            "truncate": s.truncate,
        }
        for key in ("mscale", "mscale_all_dim"):
            if getattr(s, key):
                scaling[key] = getattr(s, key)
        if s.attention_factor is not None:
            scaling["attention_factor"] = s.attention_factor
    params = {"rope_type": "default", **(scaling or {}), "rope_theta": p.rope_theta}
    return {"rope_theta": p.rope_theta, "rope_scaling": scaling, "rope_parameters": params}


def llama_to_model_config(hf: dict[str, Any]) -> ModelConfig:
    """LLaMA ``config.json`` -> ModelConfig (pre-RMSNorm, RoPE, SwiGLU, GQA)."""
    c = _hf_defaults(hf, LLAMA_DEFAULTS)
    act = c["hidden_act"]
    if act not in LLAMA_ACTIVATIONS:
        raise _unsupported("llama", f"hidden_act={act!r}")
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
            activation=LLAMA_ACTIVATIONS[act],
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
        (
            m.position.rope_scaling.kind not in ("none", "llama3"),
            f"model.position.rope_scaling.kind={m.position.rope_scaling.kind}",
        ),
        (act not in _invert(LLAMA_ACTIVATIONS), f"model.mlp.activation={act}"),
    ]
    for bad, what in checks:
        if bad:
            raise _unsupported("llama", what)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": m.mlp.hidden,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": a.n_heads,
        "num_key_value_heads": a.n_kv_heads or a.n_heads,
        "head_dim": a.head_dim or m.d_model // a.n_heads,
        "hidden_act": _invert(LLAMA_ACTIVATIONS)[act],
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


LLAMA_RULES = (
    _rule("model.embed_tokens.weight", "embed.weight"),
    _rule("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
    *(
        _rule(f"model.layers.{{i}}.self_attn.{p}_proj.{t}", f"layers.{{i}}.attn.{p}_proj.{t}")
        for p in "qkvo"
        for t in ("weight", "bias")
    ),
    _rule("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.weight"),
    *(
        _rule(f"model.layers.{{i}}.mlp.{p}_proj.{t}", f"layers.{{i}}.mlp.{p}_proj.{t}")
        for p in ("gate", "up", "down")
        for t in ("weight", "bias")
    ),
    _rule("model.norm.weight", "norm.weight"),
    _rule("lm_head.weight", "head.weight"),
)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="gpt2",
            model_type="gpt2",
            architectures=("GPT2LMHeadModel", "GPT2Model"),
            to_model_config=gpt2_to_model_config,
            to_hf_config=gpt2_to_hf_config,
            rules=GPT2_RULES,
            base_prefix="transformer.",
            # Causal-mask buffers that older transformers versions saved with the weights.
            ignore=(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)",),
        ),
        Family(
            name="llama",
            model_type="llama",
            architectures=("LlamaForCausalLM", "LlamaModel"),
            to_model_config=llama_to_model_config,
            to_hf_config=llama_to_hf_config,
            rules=LLAMA_RULES,
            base_prefix="model.",
            ignore=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",),
        ),
    )
}

# -- the generic guard ------------------------------------------------------------------------

# Fields that only matter when another field switches them on: reset to their defaults before
# comparing, so an unused setting does not block an export. (Unknown fields are compared as is:
# a choice added to the schema later is refused until a family learns to express it.)
_INACTIVE: list[tuple[str, Callable[[ModelConfig], bool], tuple[str, ...] | None]] = [
    ("init", lambda m: True, ("std", "scaled_residual")),  # initialisation is not the function
    ("position", lambda m: m.position.kind != "rope", ("rope_theta", "rope_scaling")),
    (
        "position.rope_scaling",
        lambda m: m.position.rope_scaling.kind == "none",
        ("factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len"),
    ),
    ("norm", lambda m: m.norm.kind == "rmsnorm", ("bias",)),
    (
        "attention",
        lambda m: getattr(m.attention, "kind", "mha") != "mla",
        ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"),
    ),
    (
        "attention",
        lambda m: getattr(m.attention, "sliding_window", None) is None,
        ("global_every",),
    ),
    (
        "position",
        lambda m: getattr(m.attention, "sliding_window", None) is None,
        ("local_rope_theta",),
    ),
    ("moe", lambda m: m.moe.num_experts == 0, None),
    ("mtp", lambda m: m.mtp.depth == 0, None),
]

DEFAULT_ACTIVATION = {"swiglu": "silu", "gelu": "gelu_tanh", "geglu": "gelu_tanh"}

# More in-place canonicalisations, registered by the family modules (hf_moe: expert widths,
# training-only MoE/MTP settings).
CANONICAL_HOOKS: list[Callable[[ModelConfig], None]] = []


def _canonical(m: ModelConfig) -> ModelConfig:
    """``m`` with defaults spelled out and inactive settings reset, for comparing two configs."""
    m = copy.deepcopy(m)
    a = m.attention
    a.n_kv_heads = a.n_kv_heads or a.n_heads
    a.head_dim = a.head_dim or m.d_model // a.n_heads
    if getattr(a, "qkv_bias", False) is None:
        a.qkv_bias = a.bias
    if m.mlp.activation == "default":
        m.mlp.activation = DEFAULT_ACTIVATION.get(m.mlp.kind, "default")
    p = m.position
    if p.local_rope_theta == p.rope_theta and p.rope_scaling.kind == "none":
        p.local_rope_theta = None  # local layers get the same RoPE either way
    for hook in CANONICAL_HOOKS:
        hook(m)
    for path, inactive, names in _INACTIVE:
        parent, _, leaf = path.rpartition(".")
        owner = _get(m, parent) if parent else m
        if not hasattr(owner, leaf) or not inactive(m):
            continue
        node = getattr(owner, leaf)
        fresh = type(node)()
        if names is None:
            setattr(owner, leaf, fresh)
        else:
            for name in names:
                setattr(node, name, getattr(fresh, name))
    return m


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _diff(ours: Any, theirs: Any, prefix: str = "model") -> list[str]:
    """``prefix.key=value`` for every leaf where ``ours`` differs from ``theirs``."""
    if dataclasses.is_dataclass(ours):
        out = []
        for f in dataclasses.fields(ours):
            sub = getattr(theirs, f.name, None)
            out += _diff(getattr(ours, f.name), sub, f"{prefix}.{f.name}")
        return out
    same = ours == theirs or (
        isinstance(ours, float) and isinstance(theirs, float) and math.isclose(ours, theirs)
    )
    return [] if same else [f"{prefix}={ours}"]


def hf_config_for(family: Family, m: ModelConfig) -> dict[str, Any]:
    """``family``'s ``config.json`` for ``m``, refusing (with a UserError naming the setting)
    any model the HF class would compute differently: the HF config read back must give ``m``
    again, so a setting the family's converters do not know about cannot be dropped silently."""
    hf = family.to_hf_config(m)
    lost = _diff(_canonical(m), _canonical(family.to_model_config(hf)))
    if lost:
        raise _unsupported(family.name, ", ".join(lost[:3]))
    return hf


# ---------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------


def _expand(rules: Sequence[WeightRule], n_layers: int, have: set[str]) -> list[WeightRule]:
    """Per-layer copies of the rules, keeping those whose evoformer tensors the model has."""
    out = []
    for rule in rules:
        layers = range(n_layers) if any("{i}" in n for n in (rule.hf, *rule.ours)) else [None]
        for i in layers:
            r = (
                rule
                if i is None
                else dataclasses.replace(
                    rule,
                    hf=rule.hf.replace("{i}", str(i)),
                    ours=tuple(n.replace("{i}", str(i)) for n in rule.ours),
                )
            )
            present = [n in have for n in r.ours]
            if all(present):
                out.append(r)
            elif any(present):  # a bug in a rule table, not a user mistake
                raise ValueError(f"rule {r} maps onto tensors the model only partly has")
    return out


class _SafetensorsReader:
    """The tensors of a ``save_pretrained`` folder (one file or an index of shards), read on
    demand so peak memory stays near one copy of the model."""

    def __init__(self, hf_dir: Path, base_prefix: str) -> None:
        index = hf_dir / "model.safetensors.index.json"
        single = hf_dir / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise UserError(f"{index}: not a safetensors index ({err})") from None
            files = {name: hf_dir / fname for name, fname in weight_map.items()}
        elif single.is_file():
            files = {name: single for name in self._keys(single)}
        else:
            bins = [p.name for p in hf_dir.glob("pytorch_model*.bin*")]
            if bins:
                raise UserError(
                    f"{hf_dir} holds pickled PyTorch weights ({bins[0]}), which evoformer never "
                    "loads (unpickling can run arbitrary code); convert them to safetensors first "
                    "(save_pretrained in transformers >= 4.35 writes model.safetensors)"
                )
            raise UserError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
        for path in set(files.values()):
            if not path.is_file():
                raise UserError(f"{hf_dir}: weight shard {path.name} is missing")
        # Bare-model files (GPT2Model, or the original GPT-2 release) lack the decoder prefix.
        if not any(n.startswith(base_prefix) for n in files):
            files = {
                (n if n.startswith("lm_head.") else base_prefix + n): p for n, p in files.items()
            }
            self._strip = base_prefix
        else:
            self._strip = ""
        self.files = files
        self._handles: dict[Path, Any] = {}

    @staticmethod
    def _keys(path: Path) -> list[str]:
        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except (SafetensorError, OSError) as err:
            raise UserError(f"{path}: unreadable safetensors file ({err})") from None

    def names(self) -> list[str]:
        return list(self.files)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()

    def get(self, name: str) -> torch.Tensor:
        path = self.files[name]
        stored = name[len(self._strip) :] if self._strip and name.startswith(self._strip) else name
        try:
            if path not in self._handles:
                self._handles[path] = safe_open(str(path), framework="pt")
            return self._handles[path].get_tensor(stored)
        except (SafetensorError, OSError) as err:
            raise UserError(f"{path}: cannot read tensor {stored} ({err})") from None


def _rules(family: Family, model: Transformer, have: set[str]) -> list[WeightRule]:
    extra = family.extra_rules(model.cfg) if family.extra_rules is not None else ()
    return _expand((*family.rules, *extra), model.cfg.n_layers, have)


@torch.no_grad()
def _load_hf_weights(
    family: Family,
    reader: _SafetensorsReader,
    model: Transformer,
    hf_cfg: dict[str, Any] | None = None,
) -> None:
    """Copy every HF tensor into the model (converting dtype), checking names and shapes."""
    ours = model.state_dict()
    rules = _rules(family, model, set(ours))
    available = set(reader.names())
    filled: dict[tuple[str, int | None], str] = {}  # (our tensor, slice) -> the HF tensor
    for rule in rules:
        if rule.hf not in available:
            raise UserError(f"{family.name}: tensor {rule.hf} is missing from the weights")
        t = reader.get(rule.hf)
        if family.transform is not None:
            t = family.transform(rule.hf, t, hf_cfg or {}, True)
        t = t.t() if rule.transpose else t
        targets = [ours[n] if rule.index is None else ours[n][rule.index] for n in rule.ours]
        sizes = [x.shape[0] for x in targets]
        parts = t.split(sizes, dim=0) if len(rule.ours) > 1 and t.shape[0] == sum(sizes) else [t]
        for name, target, part in zip(rule.ours, targets, parts):
            if len(parts) != len(rule.ours) or part.shape != target.shape:
                raise UserError(
                    f"{family.name}: tensor {rule.hf} has shape {tuple(t.shape)}, but config.json "
                    f"implies {' + '.join(str(tuple(x.shape)) for x in targets)}"
                )
            key = (name, rule.index)
            if key in filled and not torch.equal(target, part.to(target.dtype)):
                # A checkpoint may store copies (DeepSeek's MTP layers repeat the embedding).
                raise UserError(
                    f"{family.name}: tensors {filled[key]} and {rule.hf} should hold the same "
                    f"weights ({name}) but differ"
                )
            target.copy_(part)
            filled[key] = rule.hf
        available.discard(rule.hf)
    ignore = re.compile("|".join(family.ignore)) if family.ignore else None
    for name in sorted(available):
        if name == "lm_head.weight" and model.cfg.tie_embeddings:
            continue  # some tied checkpoints store the head anyway
        if ignore is not None and ignore.fullmatch(name):
            continue
        raise UserError(
            f"{family.name}: tensor {name} has no evoformer counterpart (a feature config.json "
            "does not declare, or an unsupported variant)"
        )
    filled_names = {name for name, _ in filled}
    missing = sorted(n for n, p in model.named_parameters() if n not in filled_names)
    if missing:
        raise UserError(f"{family.name}: no HF tensor provides {missing[0]}")


def hf_state_dict(family: Family, model: Transformer) -> dict[str, torch.Tensor]:
    """``model``'s weights under ``family``'s HF names: fresh contiguous tensors, none shared
    (as safetensors requires), ready for ``save_file`` or an HF model's ``load_state_dict``."""
    ours = {n: t.detach() for n, t in model.state_dict().items()}
    hf_cfg = family.to_hf_config(model.cfg) if family.transform is not None else {}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for rule in _rules(family, model, set(ours)):
        parts = [ours[n] if rule.index is None else ours[n][rule.index] for n in rule.ours]
        t = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        t = t.t() if rule.transpose else t
        if family.transform is not None:
            t = family.transform(rule.hf, t, hf_cfg, False)
        out[rule.hf] = t.contiguous().clone()
        used.update(rule.ours)
    params = {n for n, _ in model.named_parameters()}
    left = sorted(params - used)
    if left:
        raise UserError(f"{family.name}: no HF tensor holds evoformer's {left[0]}")
    return out


# ---------------------------------------------------------------------------------------------
# import / export
# ---------------------------------------------------------------------------------------------


def _read_hf_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    if not hf_dir.is_dir():
        raise UserError(f"HuggingFace folder not found: {hf_dir}")
    if not path.is_file():
        raise UserError(f"{hf_dir} is not a save_pretrained folder: config.json is missing")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: expected a JSON object")
    return cfg


def family_for_hf_config(hf_cfg: dict[str, Any]) -> Family:
    """The family of an HF ``config.json`` (by ``model_type``), checking its architecture."""
    model_type = hf_cfg.get("model_type")
    family = next((f for f in FAMILIES.values() if f.model_type == model_type), None)
    if family is None:
        known = ", ".join(sorted(f.model_type for f in FAMILIES.values()))
        raise UserError(f"HF model_type {model_type!r} is not supported (supported: {known})")
    for arch in hf_cfg.get("architectures") or []:
        if arch not in family.architectures:
            raise UserError(
                f"{family.name}: architecture {arch} is not a causal LM evoformer can import "
                f"(expected {' or '.join(family.architectures)})"
            )
    return family


def _checked_config(model_cfg: ModelConfig) -> Config:
    cfg = Config(model=model_cfg)
    # The default train.seq_len must fit a short-context model for config.yaml to validate.
    cfg.train.seq_len = min(cfg.train.seq_len, model_cfg.max_seq_len)
    validate_model(cfg)
    return cfg


def import_hf(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Convert a HuggingFace ``save_pretrained`` folder into an evoformer run folder.

    Writes ``out_dir/config.yaml`` and ``out_dir/checkpoints/step_0`` so that
    ``load_model(out_dir)`` (and ``checkpoint.load=PATH`` training) can use it; returns
    ``out_dir``. Refuses an ``out_dir`` that already holds checkpoints.
    """
    return _import_hf(Path(hf_dir), Path(out_dir))[0]


def _import_hf(hf_dir: Path, out_dir: Path) -> tuple[Path, Family, int]:
    hf_cfg = _read_hf_config(hf_dir)
    family = family_for_hf_config(hf_cfg)
    model_cfg = family.to_model_config(hf_cfg)
    reader = _SafetensorsReader(hf_dir, family.base_prefix)
    if family.refine is not None:
        model_cfg = family.refine(model_cfg, set(reader.names()))
    cfg = _checked_config(model_cfg)
    if list_checkpoints(out_dir / "checkpoints"):
        raise UserError(f"{out_dir} already holds checkpoints; import into a new folder")
    model = build_model(cfg.model, seed=None)
    try:
        _load_hf_weights(family, reader, model, hf_cfg)
    finally:
        reader.close()
    config_yaml = to_yaml(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(
        out_dir / "checkpoints",
        step=0,
        model=model,
        optimizer=None,
        trainer_state={"source": "hf"},
        config_yaml=config_yaml,
    )
    write_text_atomic(out_dir / "config.yaml", config_yaml)
    return out_dir, family, model.num_params()


def family_for_model_config(model_cfg: ModelConfig, family: str | None = None) -> Family:
    """The HF family that can express ``model_cfg`` (the named one, or the first that fits)."""
    if family is not None:
        if family not in FAMILIES:
            raise UserError(f"unknown HF family {family!r} (known: {', '.join(FAMILIES)})")
        hf_config_for(FAMILIES[family], model_cfg)  # raises, naming the choice it lacks
        return FAMILIES[family]
    reasons = []
    for fam in FAMILIES.values():
        try:
            hf_config_for(fam, model_cfg)
            return fam
        except UserError as err:
            reasons.append(str(err))
    raise UserError("no HuggingFace family can express this model: " + "; ".join(reasons))


def export_hf(ckpt_path: str | Path, out_dir: str | Path, family: str | None = None) -> Path:
    """Write an evoformer checkpoint as a HuggingFace folder (``config.json`` +
    ``model.safetensors``) that ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads.

    ``ckpt_path`` is anything :func:`load_model` accepts. ``family`` forces one HF architecture;
    by default the first in :data:`FAMILIES` that can express the model is used. No tokenizer or
    generation config is written (token ids are not part of the model config). Returns ``out_dir``.
    """
    return _export_hf(ckpt_path, Path(out_dir), family)[0]


def _export_hf(ckpt_path, out_dir: Path, family: str | None) -> tuple[Path, Family, int]:
    model = load_model(ckpt_path)
    fam = family_for_model_config(model.cfg, family)
    hf_cfg = hf_config_for(fam, model.cfg)
    state = hf_state_dict(fam, model)
    dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    # Our configs carry no token ids; HF's class defaults (e.g. GPT-2's 50256) may not even fit
    # the vocabulary, so say "unknown" rather than inherit them.
    hf_cfg = {**hf_cfg, "dtype": dtype, "bos_token_id": None, "eos_token_id": None}
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".model.safetensors.{uuid.uuid4().hex[:8]}.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out_dir / "model.safetensors")
    write_text_atomic(out_dir / "config.json", json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
    return out_dir, fam, model.num_params()


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def _report(prog: str, convert: Callable[[], tuple[Path, Family, int]], verb: str) -> int:
    try:
        out, family, n_params = convert()
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    print(f"{verb} {family.name} model ({n_params:,} parameters) -> {out}")
    return 0


def import_hf_main(argv: Sequence[str] | None = None) -> int:
    """``evoformer import-hf HF_DIR OUT_DIR``; returns the exit status."""
    prog = "evoformer import-hf"
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Convert a HuggingFace save_pretrained folder (safetensors) into an evoformer "
        f"run folder with a step_0 checkpoint. Families: {', '.join(FAMILIES)}.",
    )
    parser.add_argument("hf_dir", type=Path, help="folder with config.json and model.safetensors")
    parser.add_argument(
        "out_dir", type=Path, help="run folder to create (config.yaml, checkpoints/)"
    )
    ns = parser.parse_args(argv)
    return _report(prog, lambda: _import_hf(ns.hf_dir, ns.out_dir), "imported")


def export_hf_main(argv: Sequence[str] | None = None) -> int:
    """``evoformer export-hf CKPT_DIR OUT_DIR [--family NAME]``; returns the exit status."""
    prog = "evoformer export-hf"
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Write an evoformer checkpoint as a HuggingFace folder (config.json + "
        "model.safetensors) that AutoModelForCausalLM.from_pretrained loads.",
    )
    parser.add_argument(
        "ckpt_dir", help="checkpoint step folder, checkpoints/ folder or run folder"
    )
    parser.add_argument("out_dir", type=Path, help="folder to write the HF files into")
    parser.add_argument("--family", choices=list(FAMILIES), help="HF architecture (default: auto)")
    ns = parser.parse_args(argv)
    return _report(prog, lambda: _export_hf(ns.ckpt_dir, ns.out_dir, ns.family), "exported")


# Families kept in their own modules; each registers itself into FAMILIES on import:
# hf_dense (Mistral, Qwen2/3, OLMo 2, Gemma 3), hf_moe (Mixtral, Qwen3-MoE, DeepSeek-V3).
from evoformer.checkpoint import hf_dense, hf_moe  # noqa: E402, F401
