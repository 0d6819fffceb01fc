"""Block-scaled FP8 weights (DeepSeek-V3 / R1, Kimi K2) dequantized on import.

Such a folder's ``config.json`` carries ``quantization_config`` = ``{"quant_method": "fp8",
"fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}``; each
quantized ``X.weight`` is ``float8_e4m3fn`` [M, N] with ``X.weight_scale_inv`` float32
[ceil(M / 128), ceil(N / 128)], one scale per block, edge blocks partial (the weight was
zero-padded to whole blocks to compute the scale, the padding then dropped). Dequantization is
DeepSeek's reference ``weight_dequant`` (``inference/kernel.py``, used by ``fp8_cast_bf16.py``):
each block's values, read as fp32, times the block's scale, stored in the default dtype, bf16
there; so ours gives bf16 too, bit for bit the same.
"""

from __future__ import annotations

from typing import Any

import torch

from evoformer.errors import UserError

SCALE_SUFFIX = "_scale_inv"  # X.weight -> X.weight_scale_inv
OUT_DTYPE = torch.bfloat16  # the reference's output dtype


def fp8_block_size(hf_cfg: dict[str, Any]) -> tuple[int, int] | None:
    """The weight block size of an FP8 block-scaled checkpoint (None: not quantized); a
    UserError names any ``quantization_config`` evoformer cannot read."""
    q = hf_cfg.get("quantization_config")
    if not q:
        return None
    if not isinstance(q, dict):
        raise UserError(f"quantization_config={q!r} is not an object")
    method = q.get("quant_method")
    if method == "mxfp4":
        return None  # gpt-oss's MXFP4 experts: mxfp4.py
    if method != "fp8":
        raise UserError(
            f"quantization_config.quant_method={method!r} cannot be expressed (evoformer imports "
            "full-precision weights, FP8 block-scaled ones (quant_method 'fp8') or MXFP4 experts "
            "(quant_method 'mxfp4')"
        )
    if q.get("fmt", "e4m3") not in ("e4m3", "float8_e4m3fn"):  # MiniMax-M2 spells it out
        raise UserError(f"quantization_config.fmt={q['fmt']!r} cannot be expressed (needs e4m3)")
    if q.get("activation_scheme", "dynamic") != "dynamic":
        raise UserError(
            f"quantization_config.activation_scheme={q['activation_scheme']!r} cannot be expressed "
            "(static activation scales; needs dynamic)"
        )
    block = q.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) for b in block)):
        raise UserError(
            f"quantization_config.weight_block_size={block!r} cannot be expressed (needs [rows, "
            "cols]; per-tensor FP8 scales are not supported)"
        )
    return block[0], block[1]


def dequantize(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]
) -> torch.Tensor:
    """``weight`` (e4m3, [M, N]) times its per-block ``scale_inv`` ([ceil(M/bm), ceil(N/bn)]),
    in fp32, returned in bf16 as the reference does; partial edge blocks use their block's
    scale."""
    bm, bn = block
    M, N = weight.shape
    gm, gn = -(-M // bm), -(-N // bn)
    if tuple(scale_inv.shape) != (gm, gn):
        raise ValueError(f"scale shape {tuple(scale_inv.shape)} != blocks {(gm, gn)}")
    x = torch.zeros(gm * bm, gn * bn, dtype=torch.float32)
    x[:M, :N] = weight.to(torch.float32)
    x.view(gm, bm, gn, bn).mul_(scale_inv.to(torch.float32)[:, None, :, None])
    return x[:M, :N].to(OUT_DTYPE)
