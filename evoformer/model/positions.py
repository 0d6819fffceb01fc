"""Position information: rotary embeddings (linear and Llama-3.1 scaling) and ALiBi slopes.

Shapes: B batch, T sequence, H heads, D head dim.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from evoformer.config.schema import PositionConfig, RopeScalingConfig


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScalingConfig) -> torch.Tensor:
    """Inverse frequencies [D/2] in fp64, with the configured scaling applied."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling.kind == "linear":
        inv = inv / scaling.factor  # positions / factor (Gemma 3 global layers, "linear" in HF)
    elif scaling.kind == "llama3":
        inv = _llama3_scaling(inv, scaling)
    return inv


def _llama3_scaling(inv: torch.Tensor, s: RopeScalingConfig) -> torch.Tensor:
    # Llama-3.1: long wavelengths are divided by `factor`, short ones kept, the band between
    # interpolated smoothly in 1/wavelength.
    low_wavelen = s.original_max_seq_len / s.low_freq_factor
    high_wavelen = s.original_max_seq_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables; rotates the two halves of each head (HF/LLaMA convention)."""

    def __init__(self, head_dim: int, max_seq_len: int, cfg: PositionConfig) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self.cfg = cfg
        self.register_buffer("cos", torch.empty(max_seq_len, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, head_dim), persistent=False)

    def reset_parameters(self) -> None:
        inv = rope_inv_freq(self.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling)
        t = torch.arange(self.max_seq_len, dtype=torch.float64)
        freqs = torch.outer(t, inv)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos.copy_(emb.cos().to(self.cos.dtype))
        self.sin.copy_(emb.sin().to(self.sin.dtype))

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for the given positions [T] -> [T, D] each."""
        return self.cos[positions], self.sin[positions]


def apply_rope(x_BHTD: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor) -> torch.Tensor:
    """Rotate q or k by position."""
    half = x_BHTD.shape[-1] // 2
    x1, x2 = x_BHTD[..., :half], x_BHTD[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return x_BHTD * cos_TD.to(x_BHTD.dtype) + rotated * sin_TD.to(x_BHTD.dtype)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi per-head slopes [H] in fp64 (Press et al. 2022; BLOOM's ``build_alibi_tensor``).

    For a power of two n the slopes are the geometric sequence 2^(-8/n), 2^(-16/n), ..., 2^-8.
    Otherwise the first 2^floor(log2 n) heads take that sequence and the remaining heads take
    every other slope of the 2^(floor(log2 n)+1) sequence (the odd powers), which interleaves
    them between the first ones.
    """
    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = 2.0 ** (-8.0 / closest * torch.arange(1, closest + 1, dtype=torch.float64))
    if closest != n_heads:
        extra = n_heads - closest
        odd = torch.arange(1, 2 * extra, 2, dtype=torch.float64)
        slopes = torch.cat([slopes, 2.0 ** (-4.0 / closest * odd)])
    return slopes
