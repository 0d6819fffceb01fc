"""The export round-trip check: a family's ``config.json`` for a model must read back as the
same model (:func:`hf_config_for`), so a setting no converter knows about (say a schema field
added later) stops the export instead of being silently dropped. Both sides are compared after
:func:`canonical` spells out defaults and resets what cannot change the function."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from typing import Any

from evoformer.checkpoint.hf.family import Family, unsupported
from evoformer.config.schema import (
    DeltaNetConfig,
    MambaConfig,
    MLPConfig,
    ModelConfig,
    MoEConfig,
    MTPConfig,
)
from evoformer.model.layout import MIXERS, MLPS, compact_pattern, layer_plan, layer_spec

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
    ("deltanet", lambda m: "G" not in m.mixer_pattern, None),
    ("mamba", lambda m: "M" not in m.mixer_pattern, None),
    ("mtp", lambda m: m.mtp.depth == 0, None),
]


def canonical_moe(m: ModelConfig) -> None:
    """Spell out MoE widths and drop training-only settings (in place), so two configs that
    compute the same function compare equal in the export round-trip check."""
    m.mtp.loss_weight = MTPConfig().loss_weight
    moe = m.moe
    if moe.num_experts <= 0:
        return
    moe.expert_hidden, moe.shared_hidden = m.expert_width, m.shared_width
    moe.num_shared_experts = 0  # only the shared width matters
    if moe.n_groups <= 1:
        moe.n_groups, moe.topk_groups = 1, 1
        moe.group_score = MoEConfig().group_score  # no groups: how they would score is moot
    moe.aux_loss_coef = 0.0
    moe.capacity_factor = 0.0  # applied in training only
    if moe.score == "sigmoid":
        moe.bias_update_rate = 0.0  # the bias exists either way; the rate only trains it
    if all(layer_spec(m, i).mlp == "moe" for i in range(m.n_layers + m.mtp.depth)):
        m.mlp.hidden, m.mlp.bias = MLPConfig().hidden, MLPConfig().bias  # no dense layer uses it


def canonical(m: ModelConfig) -> ModelConfig:
    """``m`` with defaults spelled out and inactive settings reset, for comparing two configs."""
    m = copy.deepcopy(m)
    a = m.attention
    a.n_kv_heads, a.head_dim = m.kv_heads, m.head_dim
    if getattr(a, "qkv_bias", False) is None:
        a.qkv_bias = a.bias
    m.mlp.activation = m.mlp.resolved_activation
    p = m.position
    if p.local_rope_theta == p.rope_theta and p.rope_scaling.kind == "none":
        p.local_rope_theta = None  # local layers get the same RoPE either way
    canonical_moe(m)
    # The chunk length of the mixers' training form changes how, not what, they compute.
    m.deltanet.chunk_size = DeltaNetConfig().chunk_size
    m.mamba.chunk_size = MambaConfig().chunk_size
    plan = layer_plan(m)
    letters = {v: k for k, v in MIXERS.items()}
    m.mixer_pattern = compact_pattern("".join(letters[s.mixer] for s in plan), "A")
    if m.mlp_pattern:
        mlps = {v: k for k, v in MLPS.items()}
        m.mlp_pattern = compact_pattern("".join(mlps[s.mlp] for s in plan), "D")
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


def diff(ours: Any, theirs: Any, prefix: str = "model") -> list[str]:
    """``prefix.key=value`` for every leaf where ``ours`` differs from ``theirs``."""
    if dataclasses.is_dataclass(ours):
        out = []
        for f in dataclasses.fields(ours):
            sub = getattr(theirs, f.name, None)
            out += diff(getattr(ours, f.name), sub, f"{prefix}.{f.name}")
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
    lost = diff(canonical(m), canonical(family.to_model_config(hf)))
    if lost:
        raise unsupported(family.name, ", ".join(lost[:3]))
    return hf
