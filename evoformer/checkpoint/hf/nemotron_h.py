"""Nemotron-H: a stack of single-sub-layer blocks named by ``hybrid_override_pattern`` --
``M`` Mamba-2, ``*`` attention (GQA, no positions), ``-`` a squared-ReLU MLP (2 matrices),
``E`` MoE (not converted yet) -- each pre-RMSNorm with a residual.

Each HF block is one of our blocks with the other sub-layer absent: ``M`` and ``*`` set the
mixer (``mixer_pattern`` M / A) with no MLP, ``-`` the MLP with no mixer (``mlp_pattern``).
HF's fused ``in_proj`` holds z, x, B, C, dt one after the other and its convolution x, B, C,
so both split into our per-stream tensors without reordering."""

from __future__ import annotations

from typing import Any

from evoformer.checkpoint.hf.family import Family, check, hf_defaults, rule, unsupported
from evoformer.config.schema import (
    AttentionConfig,
    InitConfig,
    MambaConfig,
    MLPConfig,
    ModelConfig,
    NormConfig,
    PositionConfig,
)
from evoformer.model.layout import layer_plan

NEMOTRON_H_DEFAULTS: dict[str, Any] = {
    "vocab_size": 131072,
    "hidden_size": 4096,
    "tie_word_embeddings": False,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 4096,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "sliding_window": None,
    "intermediate_size": 21504,
    "mlp_hidden_act": "relu2",
    "mlp_bias": False,
    "ssm_state_size": 128,
    "mamba_num_heads": 128,
    "mamba_head_dim": 64,
    "mamba_hidden_act": "silu",
    "n_groups": 8,
    "conv_kernel": 4,
    "time_step_limit": [0.0, float("inf")],
    "use_conv_bias": True,
    "chunk_size": 128,
    "use_bias": False,
    "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-5,
    "residual_in_fp32": False,
    "hidden_dropout": 0.0,
    "hybrid_override_pattern": "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
}
# HF pattern letter -> (our mixer letter, our MLP letter)
_BLOCKS = {"M": ("M", "-"), "*": ("A", "-"), "-": ("-", "D")}
_TYPES = {"linear_attention": "M", "full_attention": "*", "mlp": "-", "moe": "E"}


def _pattern(c: dict[str, Any]) -> str:
    # transformers 5 may write layers_block_type (or layer_types) instead of the string.
    types = c.get("layers_block_type") or c.get("layer_types")
    if types:
        return "".join(_TYPES.get(t, "?") for t in types)
    return c["hybrid_override_pattern"]


def _number(x: Any) -> float:
    # transformers 5 writes infinity as {"__float__": "Infinity"} (JSON has no inf).
    return float(x["__float__"]) if isinstance(x, dict) else float(x)


def nemotron_h_to_model_config(hf_cfg: dict[str, Any]) -> ModelConfig:
    """Nemotron-H ``config.json`` -> ModelConfig."""
    c = hf_defaults(hf_cfg, NEMOTRON_H_DEFAULTS)
    pattern = _pattern(c)
    limit = [_number(x) for x in c["time_step_limit"]]
    check(
        "nemotron_h",
        [
            (set(pattern) - set(_BLOCKS), f"hybrid_override_pattern letters {set(pattern)}"),
            (c["mlp_hidden_act"] != "relu2", f"mlp_hidden_act={c['mlp_hidden_act']!r}"),
            (c["mamba_hidden_act"] != "silu", f"mamba_hidden_act={c['mamba_hidden_act']!r}"),
            (limit != [0.0, float("inf")], f"time_step_limit={limit}"),
            (c["sliding_window"] is not None, f"sliding_window={c['sliding_window']}"),
            (c["residual_in_fp32"], "residual_in_fp32"),
        ],
    )
    heads = c["num_attention_heads"]
    # transformers 5 reads head_dim (default 128); 4.x remote code wrote attention_head_dim.
    head_dim = c["head_dim"]
    d = c["hidden_size"]
    return ModelConfig(
        vocab_size=c["vocab_size"],
        d_model=d,
        n_layers=len(pattern),
        max_seq_len=c["max_position_embeddings"],
        tie_embeddings=bool(c["tie_word_embeddings"]),
        norm=NormConfig(kind="rmsnorm", eps=float(c["layer_norm_epsilon"]), bias=False),
        position=PositionConfig(kind="none"),
        attention=AttentionConfig(
            n_heads=heads,
            n_kv_heads=c["num_key_value_heads"] or heads,
            head_dim=None if head_dim * heads == d else head_dim,
            bias=bool(c["attention_bias"]),
            dropout=float(c["attention_dropout"]),
        ),
        mlp=MLPConfig(
            kind="gelu",
            hidden=c["intermediate_size"],
            bias=bool(c["mlp_bias"]),
            activation="relu2",
        ),
        init=InitConfig(std=float(c["initializer_range"]), scaled_residual=False),
        mixer_pattern="".join(_BLOCKS[x][0] for x in pattern),
        mlp_pattern="".join(_BLOCKS[x][1] for x in pattern),
        mamba=MambaConfig(
            n_heads=c["mamba_num_heads"],
            head_dim=c["mamba_head_dim"],
            state_dim=c["ssm_state_size"],
            n_groups=c["n_groups"],
            conv_kernel=c["conv_kernel"],
            conv_bias=bool(c["use_conv_bias"]),
            bias=bool(c["use_bias"]),
            chunk_size=c["chunk_size"],
        ),
        dropout=float(c["hidden_dropout"]),
    )


def nemotron_h_to_hf_config(m: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> Nemotron-H ``config.json``; UserError names any choice it lacks."""
    letters = {("mamba2", "none"): "M", ("attention", "none"): "*", ("none", "dense"): "-"}
    plan = layer_plan(m)
    blocks = [letters.get((s.mixer, s.mlp)) for s in plan]
    if None in blocks:
        bad = next(s for s, b in zip(plan, blocks, strict=True) if b is None)
        raise unsupported("nemotron_h", f"a block with mixer {bad.mixer} and MLP {bad.mlp}")
    a, mb = m.attention, m.mamba
    check(
        "nemotron_h",
        [
            (m.position.kind != "none", f"model.position.kind={m.position.kind} (needs none)"),
            (m.norm.kind != "rmsnorm" or m.norm.unit_offset, "a norm other than plain RMSNorm"),
            (a.kind != "mha" or a.qk_norm != "none" or a.output_gate, "attention variants"),
            (a.sliding_window is not None, "a sliding window"),
            (a.has_qkv_bias != a.bias, "q/k/v biases differing from the output's"),
            (m.mlp.kind != "gelu" or m.mlp.resolved_activation != "relu2", "MLP other than relu2"),
            (m.moe.num_experts > 0, "MoE blocks"),
            (a.scale is not None, f"model.attention.scale={a.scale}"),
        ],
    )
    return {
        "architectures": ["NemotronHForCausalLM"],
        "model_type": "nemotron_h",
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "tie_word_embeddings": m.tie_embeddings,
        "num_hidden_layers": m.n_layers,
        "hybrid_override_pattern": "".join(b for b in blocks if b is not None),
        "num_attention_heads": a.n_heads,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_dim,
        "attention_head_dim": m.head_dim,
        "max_position_embeddings": m.max_seq_len,
        "attention_bias": a.bias,
        "attention_dropout": a.dropout,
        "intermediate_size": m.mlp.hidden,
        "mlp_hidden_act": "relu2",
        "mlp_bias": m.mlp.bias,
        "ssm_state_size": mb.state_dim,
        "mamba_num_heads": mb.n_heads,
        "mamba_head_dim": mb.head_dim,
        "mamba_hidden_act": "silu",
        "n_groups": mb.n_groups,
        "conv_kernel": mb.conv_kernel,
        "expand": max(1, mb.n_heads * mb.head_dim // m.d_model),
        "use_conv_bias": mb.conv_bias,
        "use_bias": mb.bias,
        "chunk_size": mb.chunk_size,
        "initializer_range": m.init.std,
        "layer_norm_epsilon": m.norm.eps,
        "rms_norm_eps": m.norm.eps,
        "hidden_dropout": m.dropout,
        "residual_in_fp32": False,
    }


def _mx(hf: str, *ours: str) -> Any:
    return rule(f"backbone.layers.{{i}}.mixer.{hf}", *(f"layers.{{i}}.{o}" for o in ours))


NEMOTRON_H_RULES = (
    rule("backbone.embeddings.weight", "embed.weight"),
    # One norm per HF block: ours is the mixer's or the MLP's, whichever the block has.
    rule("backbone.layers.{i}.norm.weight", "layers.{i}.attn_norm.weight"),
    rule("backbone.layers.{i}.norm.weight", "layers.{i}.mlp_norm.weight"),
    _mx(
        "in_proj.weight",
        *(f"attn.{p}_proj.weight" for p in ("z", "x", "b", "c", "dt")),
    ),
    _mx("in_proj.bias", *(f"attn.{p}_proj.bias" for p in ("z", "x", "b", "c", "dt"))),
    _mx("conv1d.weight", "attn.x_conv.weight", "attn.b_conv.weight", "attn.c_conv.weight"),
    _mx("conv1d.bias", "attn.x_conv.bias", "attn.b_conv.bias", "attn.c_conv.bias"),
    _mx("A_log", "attn.A_log"),
    _mx("D", "attn.D"),
    _mx("dt_bias", "attn.dt_bias"),
    _mx("norm.weight", "attn.norm_weight"),
    _mx("out_proj.weight", "attn.out_proj.weight"),
    _mx("out_proj.bias", "attn.out_proj.bias"),
    *(_mx(f"{p}_proj.{t}", f"attn.{p}_proj.{t}") for p in "qkvo" for t in ("weight", "bias")),
    *(
        _mx(f"{p}_proj.{t}", f"mlp.{p}_proj.{t}")
        for p in ("up", "down")
        for t in ("weight", "bias")
    ),
    rule("backbone.norm_f.weight", "norm.weight"),
    rule("lm_head.weight", "head.weight"),
)

FAMILY = Family(
    name="nemotron_h",
    model_type="nemotron_h",
    architectures=("NemotronHForCausalLM", "NemotronHModel"),
    to_model_config=nemotron_h_to_model_config,
    to_hf_config=nemotron_h_to_hf_config,
    rules=NEMOTRON_H_RULES,
    base_prefix="backbone.",
)
