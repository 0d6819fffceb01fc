"""Which SDPA kernel runs attention: ``model.attention.sdpa_kernel``.

``F.scaled_dot_product_attention`` picks a backend by itself; on a GPU the order matters for
speed (cuDNN's fused attention is the fastest exact kernel on Hopper for training shapes, then
flash-attention 2, then the memory-efficient kernel; the math fallback materialises the
scores). ``auto`` asks for that order on CUDA (``sdpa_kernel(..., set_priority=True)``: the
first that takes the inputs runs, so masks or head dims a kernel cannot handle fall through),
and leaves CPU to torch's own choice. A single name pins that kernel (an error if it cannot take
the inputs), for measuring one against another. All are exact attention: they differ from the
math path by fp32/bf16 rounding only.

Grouped KV heads: on CUDA the KV heads are handed over as they are (``enable_gqa=True``; the
kernels index the shared head instead of reading a copy expanded H/K times, which costs
memory traffic in forward and a reduction in backward); on CPU they are expanded first as
before (bit-identical results on the CPU path; ``native_gqa`` forces either way, for tests).

Shapes: B batch, H query heads, K kv heads, T queries, S keys, D head dim.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

KERNELS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
AUTO_CUDA = ("cudnn", "flash", "efficient", "math")


def kernel_context(kernel: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The ``sdpa_kernel`` context for ``kernel`` (``auto`` on CPU: none, torch decides)."""
    if kernel == "auto":
        if device.type != "cuda":
            return contextlib.nullcontext()
        names = AUTO_CUDA
    else:
        names = (kernel,)
    return sdpa_kernel([KERNELS[n] for n in names], set_priority=True)


def expand_kv(x_BKSD: torch.Tensor, n_heads: int) -> torch.Tensor:
    """K kv heads repeated to the H query heads (each kv head serves H/K consecutive ones)."""
    B, K, S, D = x_BKSD.shape
    if K == n_heads:
        return x_BKSD
    return x_BKSD[:, :, None].expand(B, K, n_heads // K, S, D).reshape(B, n_heads, S, D)


def attend(
    q_BHTD: torch.Tensor,
    k_BKSD: torch.Tensor,
    v_BKSD: torch.Tensor,
    *,
    mask: torch.Tensor | None,
    causal: bool,
    dropout: float,
    scale: float | None,
    kernel: str = "auto",
    native_gqa: bool | None = None,
) -> torch.Tensor:
    """SDPA through the kernel ``kernel`` asks for: [B, H, T, D]. ``native_gqa`` (default: on
    CUDA) passes K < H kv heads to the kernel as they are instead of expanding them."""
    H, K = q_BHTD.shape[1], k_BKSD.shape[1]
    native = q_BHTD.is_cuda if native_gqa is None else native_gqa
    gqa = native and K != H
    if not gqa:
        k_BKSD, v_BKSD = expand_kv(k_BKSD, H), expand_kv(v_BKSD, H)
    with kernel_context(kernel, q_BHTD.device):
        return F.scaled_dot_product_attention(
            q_BHTD,
            k_BKSD,
            v_BKSD,
            attn_mask=mask,
            is_causal=causal,
            dropout_p=dropout,
            scale=scale,
            enable_gqa=gqa,
        )
