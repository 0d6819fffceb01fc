"""RoPE settings between HF ``config.json`` and our :class:`PositionConfig`, both ways.

HF writes RoPE in two layouts: ``rope_theta`` + ``rope_scaling`` (transformers 4, and what most
published files carry) or one ``rope_parameters`` dict (transformers 5); we read either and
write both, so transformers 4 and 5 read the same thing. Every family reads the same RoPE kinds,
as every HF class computes them with the same ``ROPE_INIT_FUNCTIONS``: ``default``, ``linear``,
``llama3`` and ``yarn`` (HF's ``dynamic`` and ``longrope`` are refused by name).

- :func:`rope_params_from_hf` / :func:`rope_params_to_hf`: one parameter dict (``rope_type`` +
  ``rope_theta`` + the scaling keys), e.g. one of Gemma 3's per-layer-type entries;
- :func:`rope_from_hf` / :func:`rope_to_hf`: a flat config (either layout).
"""

from __future__ import annotations

from typing import Any

from evoformer.checkpoint.hf.family import unsupported
from evoformer.config.schema import PositionConfig, RopeScalingConfig

SUPPORTED = "default, linear, llama3, yarn"


def _original(params: dict[str, Any], c: dict[str, Any], max_pos: int) -> int:
    # As transformers' standardize_rope_params: a top-level original_max_position_embeddings
    # (Phi-3 style) wins, then the scaling dict's own, then max_position_embeddings.
    top = c.get("original_max_position_embeddings")
    return int(top or params.get("original_max_position_embeddings") or max_pos)


def rope_params_from_hf(
    params: dict[str, Any],
    family: str,
    max_pos: int,
    c: dict[str, Any] | None = None,
    partial_ok: bool = False,
) -> PositionConfig:
    """One HF RoPE parameter dict (``rope_type`` + ``rope_theta`` + scaling keys) -> ours;
    ``c``: the whole config, for keys HF also reads outside the dict. ``partial_ok``: the
    family's HF class rotates only ``partial_rotary_factor`` of each head (Qwen3-Next)."""
    c = c or {}
    theta = float(params.get("rope_theta") or 10000.0)
    kind = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", 1.0)
    if partial not in (None, 1, 1.0) and not partial_ok:
        raise unsupported(family, f"partial_rotary_factor={partial}")
    fraction = float(partial or 1.0)
    if kind == "default":
        return PositionConfig(kind="rope", rope_theta=theta, rotary_fraction=fraction)
    if kind == "linear":
        scaling = RopeScalingConfig(kind="linear", factor=float(params["factor"]))
    elif kind == "llama3":
        scaling = RopeScalingConfig(
            kind="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_seq_len=_original(params, c, max_pos),
        )
    elif kind == "yarn":
        scaling = _yarn_from_hf(params, c, max_pos)
    else:
        raise unsupported(family, f"rope_type={kind!r} (supported: {SUPPORTED})")
    return PositionConfig(
        kind="rope", rope_theta=theta, rope_scaling=scaling, rotary_fraction=fraction
    )


def _yarn_from_hf(params: dict[str, Any], c: dict[str, Any], max_pos: int) -> RopeScalingConfig:
    original = _original(params, c, max_pos)
    factor = params.get("factor")
    if factor is None:  # DeepSeek-style files may give only the two context lengths
        factor = max_pos / original
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


def rope_from_hf(c: dict[str, Any], family: str, partial_ok: bool = False) -> PositionConfig:
    """RoPE from a flat HF config: the legacy ``rope_theta`` + ``rope_scaling`` or transformers
    5's ``rope_parameters``. Like transformers 5, a legacy ``rope_scaling`` wins over
    ``rope_parameters`` when a file carries both."""
    params = dict(c.get("rope_scaling") or c.get("rope_parameters") or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        raise unsupported(family, f"per-layer-type rope_parameters ({', '.join(params)})")
    params.setdefault("rope_theta", c.get("rope_theta") or 10000.0)
    partial = c.get("partial_rotary_factor")
    if partial is not None:
        params.setdefault("partial_rotary_factor", partial)
    return rope_params_from_hf(params, family, c["max_position_embeddings"], c, partial_ok)


def rope_params_to_hf(p: PositionConfig) -> dict[str, Any]:
    """Our RoPE as one HF parameter dict."""
    s = p.rope_scaling
    out: dict[str, Any] = {"rope_type": "default", "rope_theta": p.rope_theta}
    if p.rotary_fraction != 1.0:
        out["partial_rotary_factor"] = p.rotary_fraction
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
    elif s.kind == "yarn":
        out.update(
            rope_type="yarn",
            factor=s.factor,
            original_max_position_embeddings=s.original_max_seq_len,
            beta_fast=s.beta_fast,
            beta_slow=s.beta_slow,
            truncate=s.truncate,
        )
        for key in ("mscale", "mscale_all_dim"):
            if getattr(s, key):
                out[key] = getattr(s, key)
        if s.attention_factor is not None:
            out["attention_factor"] = s.attention_factor
    return out


def rope_to_hf(p: PositionConfig) -> dict[str, Any]:
    """HF RoPE keys in both layouts, so transformers 4 and 5 read the same thing."""
    params = rope_params_to_hf(p)
    scaling = None
    if p.rope_scaling.kind != "none":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    return {"rope_theta": p.rope_theta, "rope_scaling": scaling, "rope_parameters": params}
