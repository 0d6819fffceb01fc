"""SmolLM3: LLaMA's block (GQA, optional biases, tied embeddings by default) in which some
layers apply no rotary positions (NoPE).

- ``no_rope_layers``: one flag per layer, 1 = RoPE, 0 = NoPE (SmolLM3-3B: every 4th layer is
  NoPE); absent, transformers derives it from ``no_rope_layer_interval``. Ours:
  ``position.nope_layers``, the indices of the NoPE layers (``LayerSpec.rope = "none"``).
  Export writes the list back, with the interval that generates it where one does.
- Windows: ``use_sliding_window`` + ``sliding_window`` on the layers ``layer_types`` names
  (transformers' default puts them on the NoPE layers); every release has them off, and
  layouts other than all / none / all-but-every-N-th are refused by name.
"""

from __future__ import annotations

from typing import Any

from evoformer.checkpoint.hf.dense import (
    FULL,
    LLAMA_RULES,
    SLIDING,
    check_llama_like,
    layer_types,
    llama_like,
    llama_like_to_hf,
    window_layout,
)
from evoformer.checkpoint.hf.family import (
    ROTARY_BUFFERS,
    Family,
    check,
    hf_defaults,
    unsupported,
)
from evoformer.config.schema import ModelConfig

# SmolLM3Config's defaults (transformers 5), for keys a file omits.
SMOLLM3_DEFAULTS: dict[str, Any] = {
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_hidden_layers": 36,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "rope_theta": 2000000.0,
    "use_sliding_window": False,
    "sliding_window": None,
    "no_rope_layers": None,
    "no_rope_layer_interval": 4,
    "layer_types": None,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "tie_word_embeddings": True,
}


def _rope_flags(c: dict[str, Any]) -> list[int]:
    n = c["num_hidden_layers"]
    flags = c["no_rope_layers"]
    if flags is None:  # as SmolLM3Config: every interval-th layer is NoPE
        every = c["no_rope_layer_interval"]
        flags = [int((i + 1) % every != 0) for i in range(n)]
    if len(flags) != n or any(f not in (0, 1) for f in flags):
        raise unsupported("smollm3", f"no_rope_layers={flags} (needs {n} flags of 0 or 1)")
    return [int(f) for f in flags]


def smollm3_to_model_config(hf: dict[str, Any]) -> ModelConfig:
    """SmolLM3 ``config.json`` -> ModelConfig: LLaMA's block with NoPE layers."""
    c = hf_defaults(hf, SMOLLM3_DEFAULTS)
    check("smollm3", [(bool(c["mlp_bias"]), "mlp_bias=true")])
    flags = _rope_flags(c)
    window = c["sliding_window"] if c["use_sliding_window"] else None
    types = c["layer_types"] or [
        SLIDING if window is not None and not has_rope else FULL for has_rope in flags
    ]
    sliding_window, every = window_layout("smollm3", types, window)
    m = llama_like(
        "smollm3",
        c,
        bias=bool(c["attention_bias"]),
        sliding_window=sliding_window,
        global_every=every,
    )
    m.position.nope_layers = [i for i, has_rope in enumerate(flags) if not has_rope]
    return m


def _interval(nope: list[int], n: int) -> int:
    """The ``no_rope_layer_interval`` that generates ``nope`` (HF's 4 when none does)."""
    for every in range(1, n + 1):
        if nope == [i for i in range(n) if (i + 1) % every == 0]:
            return every
    return 4


def smollm3_to_hf_config(m: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> SmolLM3 ``config.json``; UserError names any choice SmolLM3 lacks."""
    check_llama_like("smollm3", m)
    a, nope = m.attention, m.position.nope_layers
    return {
        **llama_like_to_hf("smollm3", "SmolLM3ForCausalLM", m, head_dim_field=False),
        "attention_bias": a.bias,
        "mlp_bias": False,
        "no_rope_layers": [int(i not in nope) for i in range(m.n_layers)],
        "no_rope_layer_interval": _interval(sorted(nope), m.n_layers),
        "use_sliding_window": a.sliding_window is not None,
        "sliding_window": a.sliding_window,
        "layer_types": layer_types(m),
    }


FAMILY = Family(
    name="smollm3",
    model_type="smollm3",
    architectures=("SmolLM3ForCausalLM", "SmolLM3Model"),
    to_model_config=smollm3_to_model_config,
    to_hf_config=smollm3_to_hf_config,
    rules=LLAMA_RULES,
    base_prefix="model.",
    ignore=ROTARY_BUFFERS,
)
