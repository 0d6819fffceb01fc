"""The HF families evoformer converts, by name.

The order is behaviour: export without ``--family`` writes the first family that can express
the model. Adding a family is one module defining its ``FAMILY`` and one line here.
"""

from __future__ import annotations

from evoformer.checkpoint.hf import (
    deepseek_v3,
    gemma3,
    gpt2,
    llama,
    mistral,
    mixtral,
    nemotron_h,
    olmo2,
    qwen2,
    qwen3,
    qwen3_moe,
    qwen3_next,
)
from evoformer.checkpoint.hf.family import Family

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        gpt2.FAMILY,
        llama.FAMILY,
        mistral.FAMILY,
        qwen2.FAMILY,
        qwen3.FAMILY,
        olmo2.FAMILY,
        gemma3.FAMILY,
        mixtral.FAMILY,
        qwen3_moe.FAMILY,
        deepseek_v3.FAMILY,
        qwen3_next.FAMILY,
        nemotron_h.FAMILY,
    )
}
