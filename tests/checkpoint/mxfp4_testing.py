"""MXFP4 test files: gpt-oss expert tensors quantized as the release stores them."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from evoformer.checkpoint.hf.mxfp4 import E2M1_VALUES

EXPERT_TENSORS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def quantize(w_EIO: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A full-precision expert stack [E, in, out] as MXFP4 ``(blocks [E, out, in/32, 16],
    scales [E, out, in/32])``: per 32-element block of each [out, in] row, the E8M0 scale
    2^(floor(log2 amax) - 2) (E2M1's largest exponent is 2), each element rounded to the nearest
    E2M1 value, two codes a byte, the even element in the low nibble."""
    rows = w_EIO.transpose(1, 2).float()  # [E, out, in]
    E, R, n_in = rows.shape
    blocks = rows.reshape(E, R, n_in // 32, 32)
    amax = blocks.abs().amax(dim=-1).clamp(min=2.0**-126)
    exponent = torch.floor(torch.log2(amax)) - 2
    scaled = blocks / torch.exp2(exponent).unsqueeze(-1)
    lut = torch.tensor(E2M1_VALUES)
    codes = (scaled.unsqueeze(-1) - lut).abs().argmin(dim=-1).to(torch.uint8)  # [E, R, G, 32]
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed, (exponent + 127).to(torch.uint8)


def write_mxfp4(path: Path) -> dict[str, torch.Tensor]:
    """Replace the expert stacks of a saved gpt-oss ``model.safetensors`` by their MXFP4
    ``_blocks`` / ``_scales``; returns the file's tensors with the experts as transformers'
    own dequantisation reads the blocks back (the reference model's weights)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    st = load_file(path)
    ref = dict(st)
    for name in [n for n in st if n.endswith(EXPERT_TENSORS)]:
        blocks, scales = quantize(st.pop(name))
        st[name + "_blocks"], st[name + "_scales"] = blocks, scales
        ref[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16).float()
    save_file(st, str(path), metadata={"format": "pt"})
    return ref
