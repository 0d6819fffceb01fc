"""The token mixer of a block, chosen per layer by the plan (``LayerSpec.mixer``), and what the
recurrent mixers share: the short causal depthwise convolution and the decoding state.

Attention mixes tokens through a KV cache that grows with the sequence; Gated DeltaNet
(``model.deltanet``) and Mamba-2 (``model.mamba``) carry a fixed-size state instead -- the last
``kernel - 1`` inputs of each convolution and one matrix per head -- so their decoding memory
does not grow with the sequence. Both run a chunked (parallel-in-time) form when the whole
sequence is there, and a token-by-token recurrent form when decoding from a cache; the two
compute the same function (tests/model/test_mixers.py).

Shapes: B batch, T new tokens, C channels (this rank's under tensor parallelism), K kernel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from evoformer.config.schema import ModelConfig
from evoformer.model.layout import LayerSpec
from evoformer.parallel.context import ParallelContext
from evoformer.parallel.sharding import mark_sharded

if TYPE_CHECKING:
    from evoformer.model.attention import KVCache
    from evoformer.model.mla import LatentCache


class PositionCounter:
    """The decoding state of a block without a token mixer: only how many tokens it has seen
    (the model reads the position of new tokens off the first block's cache)."""

    def __init__(self) -> None:
        self.length = 0


class RecurrentState:
    """Decoding state of one recurrent mixer: each convolution's last ``K - 1`` inputs
    (``conv[name]``, [B, C, K - 1]) and the per-head recurrent state (``state``; fp32). Both
    start as None, meaning zeros, so a prefill from an empty cache runs the training form."""

    def __init__(self) -> None:
        self.conv: dict[str, torch.Tensor] = {}
        self.state: torch.Tensor | None = None
        self.length = 0

    def nbytes(self) -> int:
        """Bytes held (what a decoding step reads and writes, whatever the sequence length)."""
        held = [*self.conv.values(), *([self.state] if self.state is not None else [])]
        return sum(t.numel() * t.element_size() for t in held)


if TYPE_CHECKING:
    from evoformer.model.attention import Attention
    from evoformer.model.deltanet import GatedDeltaNet
    from evoformer.model.mamba import Mamba2
    from evoformer.model.mla import MultiHeadLatentAttention

    LayerCache = KVCache | LatentCache | RecurrentState | PositionCounter  # one block's state
    Mixer = Attention | MultiHeadLatentAttention | GatedDeltaNet | Mamba2  # a block's mixer


class CausalConv(nn.Module):
    """Depthwise causal convolution over time (Mamba's and DeltaNet's short conv), weight
    [C, 1, K] as ``nn.Conv1d`` stores it. Under TP the channels are split with the heads
    (``full_channels``: the global count)."""

    def __init__(self, channels: int, kernel: int, bias: bool, full_channels: int) -> None:
        super().__init__()
        self.kernel = kernel
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel))
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None
        # Drawn per name like the linear layers (Transformer.init_weights), so every layout
        # starts from the same global weights; the bias starts at zero.
        self.normal_init = {"weight": False}
        if channels != full_channels:
            mark_sharded(self, "weight", 0, full_channels)
            mark_sharded(self, "bias", 0, full_channels)

    def reset_parameters(self) -> None:
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(
        self, x_BTC: torch.Tensor, cache: RecurrentState | None = None, name: str = ""
    ) -> torch.Tensor:
        """silu(conv(x)) [B, T, C]; with ``cache`` the inputs before ``x`` come from (and the
        last ``K - 1`` go back to) ``cache.conv[name]``."""
        x_BCT = x_BTC.transpose(1, 2)
        past = None if cache is None else cache.conv.get(name)
        if past is None:
            past = x_BCT.new_zeros(*x_BCT.shape[:2], self.kernel - 1)
        full = torch.cat([past.to(x_BCT.dtype), x_BCT], dim=-1)
        if cache is not None:
            cache.conv[name] = full[..., full.shape[-1] - (self.kernel - 1) :].detach().clone()
        y = F.conv1d(full, self.weight, self.bias, groups=x_BCT.shape[1])
        return F.silu(y).transpose(1, 2)


def sharded_heads(n: int, ctx: ParallelContext, what: str) -> int:
    """This rank's share of ``n`` heads (or groups) under tensor parallelism."""
    if n % ctx.tp:
        raise ValueError(f"tensor parallelism: tp={ctx.tp} must divide {what}={n}")
    return n // ctx.tp


def build_mixer(cfg: ModelConfig, spec: LayerSpec, ctx: ParallelContext | None = None) -> nn.Module:
    """The token mixer of the block ``spec`` describes (``spec.mixer`` is not ``none``)."""
    if spec.mixer == "deltanet":
        from evoformer.model.deltanet import GatedDeltaNet

        return GatedDeltaNet(cfg.deltanet, cfg.d_model, cfg.norm.eps, ctx)
    if spec.mixer == "mamba2":
        from evoformer.model.mamba import Mamba2

        return Mamba2(cfg.mamba, cfg.d_model, cfg.norm.eps, ctx)
    from evoformer.model.attention import build_attention

    return build_attention(cfg, spec, ctx)
