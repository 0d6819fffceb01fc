"""RoPE frequency scaling equals HuggingFace's reference implementations."""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV3Config, LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from evoformer.config.schema import RopeScalingConfig
from evoformer.model.positions import rope_attention_factor, rope_inv_freq


@pytest.mark.parametrize(
    "mscale, mscale_all_dim", [(1.0, 1.0), (0.707, 0.707), (0.0, 0.0), (1.0, 0.707)]
)
def test_yarn_matches_hf(mscale, mscale_all_dim):
    params = {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 40.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
    }
    if mscale:
        params["mscale"] = mscale
    if mscale_all_dim:
        params["mscale_all_dim"] = mscale_all_dim
    hf_cfg = DeepseekV3Config(
        qk_rope_head_dim=64, max_position_embeddings=163840, rope_parameters=params
    )
    inv_ref, factor_ref = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg)
    ours = RopeScalingConfig(
        kind="yarn",
        factor=40.0,
        original_max_seq_len=4096,
        mscale=mscale,
        mscale_all_dim=mscale_all_dim,
    )
    inv = rope_inv_freq(64, 10000.0, ours)
    torch.testing.assert_close(inv.float(), inv_ref, rtol=1e-6, atol=0)
    assert rope_attention_factor(ours) == pytest.approx(factor_ref, rel=1e-12)
    # The ramp really blends: some dims kept, some divided by the factor, some between.
    base = rope_inv_freq(64, 10000.0, RopeScalingConfig())
    ratio = inv / base
    assert ratio.max() == pytest.approx(1.0) and ratio.min() == pytest.approx(1 / 40)
    assert ((ratio < 0.99) & (ratio > 1 / 40 + 1e-3)).any()


def test_llama3_and_linear_match_hf():
    params = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    hf_cfg = LlamaConfig(hidden_size=1024, num_attention_heads=8, rope_parameters=params)
    inv_ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg)
    ours = RopeScalingConfig(
        kind="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_seq_len=8192,
    )
    torch.testing.assert_close(
        rope_inv_freq(128, 500000.0, ours).float(), inv_ref, rtol=1e-6, atol=0
    )
    linear = RopeScalingConfig(kind="linear", factor=4.0)
    torch.testing.assert_close(
        rope_inv_freq(128, 1e4, linear), rope_inv_freq(128, 1e4, RopeScalingConfig()) / 4
    )
