"""MXFP4 dequantization (gpt-oss experts): hand-built blocks decode to the OCP MX values, random
blocks equal transformers' own dequantisation bit for bit, and a quantized weight comes back
within MXFP4's rounding."""

from __future__ import annotations

import pytest
import torch

from evoformer.checkpoint.hf.mxfp4 import dequantize
from tests.checkpoint.mxfp4_testing import quantize


def test_hand_built_blocks() -> None:
    # One expert, two rows (outputs) of one block each: row 0 bytes 0x21 then zeros, scale
    # 2^0; row 1 bytes 0xF7 (low nibble 7 = +6, high 15 = -6) then 0x98, scale 2^2.
    blocks = torch.zeros(1, 2, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0, 0] = 0x21  # element 0: code 1 = 0.5, element 1: code 2 = 1.0
    blocks[0, 1, 0, 0] = 0xF7  # element 0: +6, element 1: -6
    blocks[0, 1, 0, 1] = 0x98  # element 2: code 8 = -0, element 3: code 9 = -0.5
    scales = torch.tensor([[[127], [129]]], dtype=torch.uint8)
    w = dequantize(blocks, scales)
    assert w.shape == (1, 32, 2) and w.dtype == torch.bfloat16  # [E, in, out]
    assert w[0, :4, 0].tolist() == [0.5, 1.0, 0.0, 0.0]
    assert w[0, :4, 1].tolist() == [24.0, -24.0, -0.0, -2.0]
    assert w[0, 4:].abs().sum() == 0


def test_equals_transformers_dequantisation() -> None:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 10, 4, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(110, 140, (3, 10, 4), dtype=torch.uint8, generator=g)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
    assert torch.equal(dequantize(blocks, scales), theirs)


def test_quantized_weight_round_trips_within_mxfp4_rounding() -> None:
    w = torch.randn(2, 64, 24, generator=torch.Generator().manual_seed(1))  # [E, in, out]
    back = dequantize(*quantize(w)).float()
    # E2M1 keeps 1 mantissa bit: rounding error <= 1/4 of the block's power-of-two scale,
    # i.e. at most 1/4 * 2^(floor(log2 amax) - 2) * 4 = amax / 4 per element.
    amax = w.transpose(1, 2).reshape(2, 24, 2, 32).abs().amax(-1, keepdim=True)
    err = (back - w).transpose(1, 2).reshape(2, 24, 2, 32).abs()
    assert (err <= amax / 4 + 1e-6).all()
    assert (err.mean() / w.abs().mean()).item() < 0.15


def test_mismatched_blocks_and_scales_are_refused() -> None:
    with pytest.raises(ValueError, match="do not pair up"):
        dequantize(
            torch.zeros(1, 2, 3, 16, dtype=torch.uint8), torch.zeros(1, 2, 2, dtype=torch.uint8)
        )
