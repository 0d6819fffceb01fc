"""RoPE settings between HF ``config.json`` and our :class:`PositionConfig`, both ways.

HF writes RoPE in two layouts: ``rope_theta`` + ``rope_scaling`` (transformers 4) or one
``rope_parameters`` dict (transformers 5); we read either and write both, so transformers 4 and
5 read the same thing. Two sets of translations live here because the families accept different
scalings:

- :func:`rope_from_hf` / :func:`rope_to_hf`: LLaMA and the MoE families (default, ``llama3``,
  ``yarn``);
- :func:`rope_params_from_hf` (one parameter dict, e.g. one of Gemma 3's per-layer-type
  entries), :func:`flat_rope_from_hf`, :func:`rope_params_to_hf` and :func:`flat_rope_to_hf`:
  Mistral, Qwen2/3, OLMo 2 and Gemma 3 (default, ``linear``, ``llama3``).
"""

from __future__ import annotations

from typing import Any

from evoformer.checkpoint.hf.family import unsupported
from evoformer.config.schema import PositionConfig, RopeScalingConfig

# -- LLaMA and the MoE families: default, llama3, yarn ----------------------------------------


def rope_from_hf(c: dict[str, Any], family: str) -> PositionConfig:
    """RoPE settings from either HF layout: ``rope_theta`` + ``rope_scaling`` (transformers 4)
    or ``rope_parameters`` (transformers 5). Like transformers 5, a legacy ``rope_scaling``
    wins over ``rope_parameters`` when a file carries both."""
    params = dict(c.get("rope_scaling") or c.get("rope_parameters") or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        raise unsupported(family, f"per-layer-type rope_parameters ({', '.join(params)})")
    theta = float(params.get("rope_theta", c.get("rope_theta") or 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise unsupported(family, f"partial_rotary_factor={partial}")
    if kind == "default":
        return PositionConfig(kind="rope", rope_theta=theta)
    if kind == "yarn":
        return PositionConfig(kind="rope", rope_theta=theta, rope_scaling=_yarn_from_hf(params, c))
    if kind != "llama3":
        raise unsupported(family, f"rope_type={kind!r} (supported: default, llama3, yarn)")
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


# -- Mistral, Qwen2/3, OLMo 2, Gemma 3: default, linear, llama3 -------------------------------


def rope_params_from_hf(params: dict[str, Any], family: str, max_pos: int) -> PositionConfig:
    """One HF RoPE parameter dict (``rope_type`` + ``rope_theta`` + scaling keys) -> ours."""
    theta = float(params["rope_theta"])
    kind = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", 1.0)
    if partial not in (None, 1, 1.0):
        raise unsupported(family, f"partial_rotary_factor={partial}")
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
        raise unsupported(family, f"rope_type={kind!r} (supported: default, linear, llama3)")
    return PositionConfig(kind="rope", rope_theta=theta, rope_scaling=scaling)


def flat_rope_from_hf(c: dict[str, Any], family: str) -> PositionConfig:
    """RoPE from a flat HF config: transformers 5 ``rope_parameters`` or the older
    ``rope_theta`` + ``rope_scaling`` (which wins when a file carries both, as in transformers)."""
    params = dict(c.get("rope_scaling") or c.get("rope_parameters") or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        raise unsupported(family, f"per-layer-type rope_parameters ({', '.join(params)})")
    params.setdefault("rope_theta", c.get("rope_theta") or 10000.0)
    partial = c.get("partial_rotary_factor")
    if partial is not None:
        params.setdefault("partial_rotary_factor", partial)
    return rope_params_from_hf(params, family, c["max_position_embeddings"])


def rope_params_to_hf(p: PositionConfig) -> dict[str, Any]:
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


def flat_rope_to_hf(p: PositionConfig) -> dict[str, Any]:
    """HF RoPE keys in both layouts, so transformers 4 and 5 read the same thing."""
    params = rope_params_to_hf(p)
    scaling = None if p.rope_scaling.kind == "none" else params
    return {"rope_theta": p.rope_theta, "rope_scaling": scaling, "rope_parameters": params}
