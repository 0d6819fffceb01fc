"""gpt-oss, GLM-4.5 and MiniMax-M2: what their converters cannot express is refused in one line
naming the key and value (import), or the choice (export)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from evoformer.checkpoint.hf import import_hf
from evoformer.checkpoint.hf.convert import family_for_model_config
from evoformer.config import load_config
from evoformer.errors import UserError
from tests.conftest import REPO

CONFIGS = Path(__file__).parent / "configs"
FULL, SLIDING = "full_attention", "sliding_attention"


@pytest.mark.parametrize(
    "case, change, message",
    [
        ("gpt_oss", {"layer_types": [SLIDING, SLIDING, FULL, FULL]}, "layer_types="),
        ("gpt_oss", {"layer_types": [SLIDING, FULL]}, "needs 4 of"),
        ("gpt_oss", {"quantization_config": {"quant_method": "bnb"}}, "quant_method='bnb'"),
        ("minimax_m2", {"attn_type_list": [0, 1]}, "attn_type_list=[0, 1]"),
        ("minimax_m2", {"scoring_func": "softmax"}, "scoring_func='softmax'"),
        ("minimax_m2", {"use_routing_bias": False}, "use_routing_bias=false"),
        ("glm4_moe", {"partial_rotary_factor": 0.3}, "model.position.partial_rotary=0.3"),
    ],
)
def test_import_refusals_name_the_key(case: str, change: dict, message: str, tmp_path) -> None:
    raw = {**json.loads((CONFIGS / f"{case}.json").read_text()), **change}
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(raw))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(UserError) as info:
        import_hf(tmp_path / "hf", tmp_path / "out")
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


@pytest.mark.parametrize(
    "tiny, family, overrides, message",
    [
        ("gpt-oss", "llama", [], "llama:"),  # sinks and biased experts have no Llama spelling
        ("gpt-oss", "gpt_oss", ["model.attention.sinks=false"], "model.attention.sinks=false"),
        ("glm4-moe", "glm4_moe", ["model.attention.bias=true"], "model.attention.bias=true"),
        ("glm4-moe", "qwen3_moe", [], "qwen3_moe:"),  # partial RoPE, sigmoid scores
        ("minimax-m2", "minimax_m2", ["model.attention.qk_norm=head"], "qk_norm=head"),
    ],
)
def test_export_refusals_name_the_choice(tiny, family, overrides, message) -> None:
    m = load_config([str(REPO / f"configs/models/tiny/{tiny}.yaml")], overrides).model
    with pytest.raises(UserError, match=message.replace("[", r"\[")):
        family_for_model_config(m, family)


def test_every_new_tiny_model_exports_to_its_own_family() -> None:
    for tiny, family in (
        ("gpt-oss", "gpt_oss"),
        ("glm4-moe", "glm4_moe"),
        ("minimax-m2", "minimax_m2"),
    ):
        m = load_config([str(REPO / f"configs/models/tiny/{tiny}.yaml")]).model
        assert family_for_model_config(m).name == family
