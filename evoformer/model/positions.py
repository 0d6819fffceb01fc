"""Position information: rotary embeddings (linear, Llama-3.1 and YaRN scaling) and ALiBi slopes.

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
    elif scaling.kind == "yarn":
        inv = _yarn_inv_freq(inv, head_dim, theta, scaling)
    return inv


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 * mscale * ln(factor) + 1 (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_attention_factor(scaling: RopeScalingConfig) -> float:
    """Multiplier of the cos/sin tables: YaRN's temperature, 1 for every other scaling."""
    if scaling.kind != "yarn":
        return 1.0
    if scaling.attention_factor is not None:
        return scaling.attention_factor
    if scaling.mscale and scaling.mscale_all_dim:
        return yarn_mscale(scaling.factor, scaling.mscale) / yarn_mscale(
            scaling.factor, scaling.mscale_all_dim
        )
    return yarn_mscale(scaling.factor)


def _yarn_inv_freq(
    inv: torch.Tensor, head_dim: int, theta: float, s: RopeScalingConfig
) -> torch.Tensor:
    # YaRN (Peng et al. 2023), "NTK-by-parts": dimensions that rotate fewer than beta_slow times
    # over the original context are interpolated (divided by factor), those rotating more than
    # beta_fast times are kept, and a linear ramp blends the band between.
    def correction_dim(rotations: float) -> float:
        return (head_dim * math.log(s.original_max_seq_len / (rotations * 2 * math.pi))) / (
            2 * math.log(theta)
        )

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    return inv / s.factor * (1 - extrapolate) + inv * extrapolate


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

    # Buffers [max_seq_len, D], registered in __init__ (declared so their type is known).
    cos: torch.Tensor
    sin: torch.Tensor

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
        factor = rope_attention_factor(self.cfg.rope_scaling)
        self.cos.copy_((emb.cos() * factor).to(self.cos.dtype))
        self.sin.copy_((emb.sin() * factor).to(self.sin.dtype))

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for the given positions: [T] -> [T, D] each, or per row (document
        masking restarts positions) [B, T] -> [B, T, D]."""
        return self.cos[positions], self.sin[positions]


def apply_rope(x_BHTD: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor) -> torch.Tensor:
    """Rotate q or k by position (tables [T, D], or [B, T, D] for per-row positions). Tables
    narrower than the head (partial RoPE, ``position.rotary_fraction``) rotate its first dims
    and pass the rest through."""
    if cos_TD.dim() == 3:  # [B, T, D]: one table per row, shared by the heads
        cos_TD, sin_TD = cos_TD[:, None], sin_TD[:, None]
    R = cos_TD.shape[-1]
    if R < x_BHTD.shape[-1]:
        rot, rest = x_BHTD[..., :R], x_BHTD[..., R:]
        return torch.cat((apply_rope(rot, cos_TD, sin_TD), rest), dim=-1)
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
