"""The HF families evoformer converts, by name.

The order is behaviour: export without ``--family`` writes the first family that can express
the model. Adding a family is one module defining its ``FAMILY`` and one line here.
"""

from __future__ import annotations

from evoformer.checkpoint.hf import (
    deepseek_v2,
    deepseek_v3,
    gemma3,
    glm4_moe,
    gpt2,
    gpt_oss,
    kimi_k2,
    llama,
    minimax_m2,
    mistral,
    mixtral,
    nemotron_h,
    olmo2,
    olmo3,
    phi3,
    qwen2,
    qwen3,
    qwen3_moe,
    qwen3_next,
    smollm3,
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
        olmo3.FAMILY,
        phi3.FAMILY,
        smollm3.FAMILY,
        gemma3.FAMILY,
        mixtral.FAMILY,
        qwen3_moe.FAMILY,
        deepseek_v2.FAMILY,
        deepseek_v3.FAMILY,
        kimi_k2.FAMILY,  # after deepseek_v3: the same model exports as deepseek_v3 by default
        gpt_oss.FAMILY,
        glm4_moe.FAMILY,
        minimax_m2.FAMILY,
        qwen3_next.FAMILY,
        nemotron_h.FAMILY,
    )
}
