"""Conversion between HuggingFace ``save_pretrained`` folders and evoformer checkpoints.

One table, :data:`FAMILIES` (``registry.py``), drives both directions. A family
(:class:`Family`, one module each: ``gpt2.py``, ``llama.py``, ...) is three things:

- ``to_model_config``: the HF ``config.json`` (a plain dict) -> our :class:`ModelConfig`, raising a
  :class:`UserError` for every HF feature our schema cannot express;
- ``to_hf_config``: our ModelConfig -> the HF ``config.json`` dict, raising a UserError naming the
  model choice HF's class for that family cannot express. Every export also reads the result
  back through ``to_model_config`` and refuses the model unless the same ModelConfig comes back
  (:func:`hf_config_for`, ``roundtrip.py``), so a setting no converter knows about (say a schema
  field added later) stops the export instead of being silently dropped;
- ``rules``: the weight-name mapping. Each :class:`WeightRule` ties one HF tensor to one or more of
  ours (several = HF fuses them along the output dimension, e.g. GPT-2's ``c_attn``), optionally
  transposed (GPT-2's ``Conv1D`` stores ``[in, out]``); ``{i}`` stands for the layer index.

The machinery around the table: ``family.py`` (the two dataclasses and the guards the family
modules share), ``rope.py`` (RoPE settings both ways), ``dense.py`` / ``moe.py`` (what the
LLaMA-descended dense and the MoE families share), ``weights.py`` (the rules applied to
safetensors files and to our state dict), ``convert.py`` (import and export of whole folders).
Adding a family (Phi, Granite, ...) is one module defining a ``FAMILY`` and one registry line.
"""

from evoformer.checkpoint.hf.convert import (
    Conversion,
    convert_from_hf,
    convert_to_hf,
    export_hf,
    family_for_hf_config,
    family_for_model_config,
    import_hf,
)
from evoformer.checkpoint.hf.dense import window_layout
from evoformer.checkpoint.hf.family import Family, WeightRule
from evoformer.checkpoint.hf.registry import FAMILIES
from evoformer.checkpoint.hf.roundtrip import hf_config_for
from evoformer.checkpoint.hf.weights import hf_state_dict

__all__ = [
    "FAMILIES",
    "Conversion",
    "Family",
    "WeightRule",
    "convert_from_hf",
    "convert_to_hf",
    "export_hf",
    "family_for_hf_config",
    "family_for_model_config",
    "hf_config_for",
    "hf_state_dict",
    "import_hf",
    "window_layout",
]
