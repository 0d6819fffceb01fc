"""MXFP4 expert weights (gpt-oss) dequantized on import.

gpt-oss ships its routed experts in the OCP Microscaling format (OCP MX v1.0, MXFP4): blocks of
32 FP4 (E2M1) elements sharing one E8M0 scale. Such a folder's ``config.json`` carries
``quantization_config = {"quant_method": "mxfp4", "modules_to_not_convert": [...]}``; each
quantized stacked tensor ``X`` (``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``) is
stored as

- ``X_blocks``: uint8 [E, rows, G, 16], two E2M1 codes per byte, the element at the even index
  in the low nibble;
- ``X_scales``: uint8 [E, rows, G], the block's power of two biased by 127 (2^(s - 127)).

An E2M1 code is sign (bit 3), a 2-bit exponent and 1 mantissa bit: the magnitudes
0, 0.5, 1, 1.5, 2, 3, 4, 6. Dequantized, ``X`` is [E, rows, G * 32]; the release stores each
expert's matrix as [out, in] rows, so the full-precision tensor (HF's ``X``, [E, in, out]) is
that with the last two dims swapped. The values are exact in bf16 (a 2-bit mantissa times a
power of two), so bf16 is what import stores, as transformers' own dequantisation does.
"""

from __future__ import annotations

from typing import Any

import torch

BLOCKS, SCALES = "_blocks", "_scales"
OUT_DTYPE = torch.bfloat16
# E2M1 code -> value (OCP MX v1.0, section 5.3.3): codes 8-15 are the negatives of 0-7.
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_VALUES = _E2M1 + tuple(-v for v in _E2M1)


def is_mxfp4(hf_cfg: dict[str, Any]) -> bool:
    """Whether ``config.json`` declares MXFP4-quantized weights."""
    q = hf_cfg.get("quantization_config")
    return isinstance(q, dict) and q.get("quant_method") == "mxfp4"


def dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``X_blocks`` [E, R, G, 16] uint8 and ``X_scales`` [E, R, G] uint8 -> ``X`` [E, G*32, R]
    bf16 (the full-precision layout: each expert's [in, out])."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"blocks/scales must be uint8, got {blocks.dtype}/{scales.dtype}")
    if blocks.dim() < 3 or blocks.shape[-1] != 16 or blocks.shape[:-1] != scales.shape:
        raise ValueError(
            f"blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not pair up as "
            "[..., G, 16] with [..., G]"
        )
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    *lead, R, G, _ = blocks.shape
    out = torch.empty(*lead, G * 32, R, dtype=OUT_DTYPE)
    # One expert at a time: the fp32 temporaries stay a few times one expert's size.
    for e, (b_RG16, s_RG) in enumerate(zip(blocks.reshape(-1, R, G, 16), scales.reshape(-1, R, G))):
        low, high = (b_RG16 & 0x0F).long(), (b_RG16 >> 4).long()
        # [R, G, 16, 2] -> [R, G, 32]: element 2j is byte j's low nibble, 2j + 1 its high one.
        values = torch.stack([lut[low], lut[high]], dim=-1).flatten(-2)
        exponent = (s_RG.to(torch.int32) - 127).unsqueeze(-1).to(torch.float32)
        values = torch.ldexp(values, exponent).flatten(-2)  # [R, G * 32]
        out.view(-1, G * 32, R)[e] = values.t().to(OUT_DTYPE)
    return out
