"""OLMo 3: OLMo 2's block (norms on the sub-layer outputs, RMSNorm over the whole q / k
projection) with local and global layers.

- ``layer_types`` (default: three sliding layers, then one full, repeated) with
  ``sliding_window`` on the sliding ones: our ``attention.sliding_window`` +
  ``global_every`` (other layouts are refused by name, as for every family).
- RoPE per layer type: the published files carry YaRN in ``rope_scaling`` (factor 8 over an
  8k pretraining context), which transformers applies to the full-attention layers only; the
  sliding layers rotate with the plain base. Ours: the scaled table on global layers and
  ``position.local_rope_theta`` (the same base, unscaled) on local ones. transformers 5 writes
  the two as ``rope_parameters: {full_attention, sliding_attention}``; both layouts are read,
  and export writes both.
"""

from __future__ import annotations

import copy
from typing import Any

from evoformer.checkpoint.hf.dense import FULL, SLIDING, layer_types, window_layout
from evoformer.checkpoint.hf.family import ROTARY_BUFFERS, Family, hf_defaults, unsupported
from evoformer.checkpoint.hf.olmo2 import (
    OLMO2_DEFAULTS,
    OLMO2_RULES,
    olmo2_to_hf_config,
    olmo2_to_model_config,
)
from evoformer.checkpoint.hf.rope import rope_params_from_hf, rope_params_to_hf
from evoformer.config.schema import ModelConfig, PositionConfig

# Olmo3Config's defaults (transformers 5), for keys a file omits.
OLMO3_DEFAULTS: dict[str, Any] = {
    **OLMO2_DEFAULTS,
    "rope_theta": 500000.0,
    "sliding_window": 4096,
    "layer_types": None,
}


def _olmo3_rope(c: dict[str, Any], has_local: bool) -> PositionConfig:
    params: dict[str, Any] = c.get("rope_parameters") or {}
    nested = bool(params) and all(isinstance(v, dict) for v in params.values())
    if c.get("rope_scaling") is not None or not nested:
        # the published layout: rope_theta for both, rope_scaling on the full layers only
        full = {"rope_type": "default", **(c.get("rope_scaling") or params or {})}
        full.setdefault("rope_theta", c["rope_theta"])
        local = {"rope_type": "default", "rope_theta": full["rope_theta"]}
    else:
        full, local = dict(params.get(FULL) or {}), dict(params.get(SLIDING) or {})
        full.setdefault("rope_theta", c["rope_theta"])
        local.setdefault("rope_theta", c["rope_theta"])
    max_pos = c["max_position_embeddings"]
    pos = rope_params_from_hf(full, "olmo3", max_pos, c)
    loc = rope_params_from_hf(local, "olmo3", max_pos, c)
    if has_local and (loc.rope_theta, loc.rope_scaling) != (pos.rope_theta, pos.rope_scaling):
        if loc.rope_scaling.kind != "none":
            raise unsupported("olmo3", f"rope scaling on sliding layers ({local})")
        pos.local_rope_theta = loc.rope_theta
    return pos


def olmo3_to_model_config(hf: dict[str, Any]) -> ModelConfig:
    """OLMo 3 ``config.json`` -> ModelConfig: OLMo 2's block, local/global layers, RoPE per
    layer type."""
    c = hf_defaults(hf, OLMO3_DEFAULTS)
    n = c["num_hidden_layers"]
    types = c["layer_types"] or [SLIDING if (i + 1) % 4 else FULL for i in range(n)]
    if len(types) != n:
        raise unsupported("olmo3", f"layer_types of {len(types)} entries for {n} layers")
    window, every = window_layout("olmo3", types, c["sliding_window"])
    # OLMo 2's reader, without the RoPE keys it would refuse in the per-layer-type layout
    flat = {k: v for k, v in c.items() if k not in ("rope_scaling", "rope_parameters")}
    m = olmo2_to_model_config(flat)
    m.attention.sliding_window, m.attention.global_every = window, every
    m.position = _olmo3_rope(c, window is not None)
    return m


def olmo3_to_hf_config(m: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> OLMo 3 ``config.json``: both RoPE layouts, the window and
    ``layer_types``."""
    flat = copy.deepcopy(m)  # OLMo 2's writer, for what the two share
    flat.attention.sliding_window, flat.position.local_rope_theta = None, None
    out = olmo2_to_hf_config(flat)
    full = rope_params_to_hf(flat.position)
    local = full  # no sliding layer, or the same RoPE on both kinds
    if m.attention.sliding_window is not None and m.position.local_rope_theta is not None:
        local = {"rope_type": "default", "rope_theta": m.position.local_rope_theta}
    return {
        **out,
        "architectures": ["Olmo3ForCausalLM"],
        "model_type": "olmo3",
        # HF builds the sliding mask whenever a layer type is sliding; some window is needed.
        "sliding_window": m.attention.sliding_window or m.max_seq_len,
        "layer_types": layer_types(m),
        "rope_parameters": {FULL: full, SLIDING: local},
    }


FAMILY = Family(
    name="olmo3",
    model_type="olmo3",
    architectures=("Olmo3ForCausalLM", "Olmo3Model"),
    to_model_config=olmo3_to_model_config,
    to_hf_config=olmo3_to_hf_config,
    rules=OLMO2_RULES,
    base_prefix="model.",
    ignore=ROTARY_BUFFERS,
)
