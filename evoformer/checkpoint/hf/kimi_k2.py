"""Kimi K2 (Moonshot AI): DeepSeek-V3's architecture and tensor names under its own
``model_type: kimi_k2`` (384 routed experts, no expert groups, 64 heads, no MTP module, YaRN,
FP8 block-scaled weights as released).

transformers has no ``kimi_k2`` class: the files name ``DeepseekV3ForCausalLM`` (Moonshot's
remote code), and Moonshot's advice for engines without the type is to run the checkpoint as
``deepseek_v3``. Import reads the file exactly as DeepSeek-V3's converter does; export with
``--family kimi_k2`` writes ``model_type: kimi_k2`` back (the default export of the same model
is ``deepseek_v3``, the first family in the registry that expresses it, which transformers
loads).
"""

from __future__ import annotations

from typing import Any

from evoformer.checkpoint.hf import deepseek_v3
from evoformer.checkpoint.hf.family import Family
from evoformer.config.schema import ModelConfig


def kimi_k2_to_hf_config(m: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> Kimi K2 ``config.json``: DeepSeek-V3's keys under ``kimi_k2``."""
    return {**deepseek_v3.deepseek_v3_to_hf_config(m), "model_type": "kimi_k2"}


FAMILY = Family(
    name="kimi_k2",
    model_type="kimi_k2",
    architectures=deepseek_v3.FAMILY.architectures,
    to_model_config=deepseek_v3.deepseek_v3_to_model_config,
    to_hf_config=kimi_k2_to_hf_config,
    rules=deepseek_v3.DEEPSEEK_V3_RULES,
    base_prefix="model.",
    ignore=deepseek_v3.FAMILY.ignore,
    extra_rules=deepseek_v3.deepseek_v3_extra_rules,
    transform=deepseek_v3.deepseek_v3_transform,
    refine=deepseek_v3.deepseek_v3_refine,
    notes=deepseek_v3.deepseek_v3_notes,
)
