"""Multi-token prediction (DeepSeek-V3): D sequential modules, module k predicting at position i
the token i+k+1 (k tokens past the next one), sharing the model's embedding and output head.

Module k combines the previous depth's hidden state h_i with the embedding of token i+k:
``eh_proj([RMSNorm(embed(t_{i+k})); RMSNorm(h_i)])`` (embedding first, as DeepSeek's
checkpoints are laid out), runs one transformer block, applies its own output norm and the
shared head, and is scored against token i+k+1. As in DeepSeek's released modeling code and
HF's ``MtpModel``, depth 1 reads the main model's *normalised* final hidden state and depth k+1
reads module k's normalised output; each module's output norm is its own (checkpoints store it
as ``shared_head.norm``).

The block is ``Block(cfg, n_layers + k - 1)``: it follows the model's layer pattern as if it
were one more layer, so a DeepSeek-V3 MTP block is an MoE layer, as in the checkpoints.

Only ``forward(..., targets=...)`` runs these modules; inference never does.

Tensor parallelism: ``proj`` is column-parallel with a gathered output (as Megatron's
``eh_proj``), the block is a tensor-parallel Block and the head/loss are the model's
vocab-parallel ones. The modules run on the full sequence even under sequence parallelism: a
depth-k module sees T - k positions, which need not split over tp, so the main stack's output
and the token embeddings are all-gathered along T on entry.

Context parallelism: the main stack's output holds this rank's two chunks of the sequence. Depth
k keeps every local position i and reads the embedding of token i + k and the target i + k + 1
from the whole sequence (every cp rank holds all token ids); the last k positions, which have
no such token, get a padding id and an ignored target. Causal attention keeps them from
influencing the scored positions, so each scored position sees exactly what one process gives
it, with the shifted targets crossing the chunk borders.

Shapes: B batch, T sequence, C d_model.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from evoformer.config.schema import ModelConfig
from evoformer.model.documents import Documents
from evoformer.model.layout import layer_spec
from evoformer.model.moe import MoE
from evoformer.model.norms import build_norm
from evoformer.model.transformer import Block
from evoformer.parallel.collectives import gather_from_sequence_parallel_region
from evoformer.parallel.context import ParallelContext
from evoformer.parallel.context_parallel import cp_loss_weight, local_positions


class MTPModule(nn.Module):
    """One prediction depth: input norms, the 2C -> C projection, a block and an output norm."""

    def __init__(self, cfg: ModelConfig, depth: int, ctx: ParallelContext | None = None) -> None:
        super().__init__()
        ctx = ctx or ParallelContext()
        self.embed_norm = build_norm(cfg.norm, cfg.d_model)
        self.hidden_norm = build_norm(cfg.norm, cfg.d_model)
        self.proj = ctx.column(2 * cfg.d_model, cfg.d_model, False, gather_output=True)
        self.block = Block(cfg, layer_spec(cfg, cfg.n_layers + depth - 1), ctx)
        self.out_norm = build_norm(cfg.norm, cfg.d_model)

    def forward(
        self, h_BTC: torch.Tensor, embedded_BTC: torch.Tensor, rope, docs: Documents | None = None
    ) -> torch.Tensor:
        """The normalised output hidden state of this depth."""
        x = torch.cat([self.embed_norm(embedded_BTC), self.hidden_norm(h_BTC)], dim=-1)
        return self.out_norm(self.block(self.proj(x), rope, None, docs))


class MultiTokenPrediction(nn.Module):
    """``cfg.mtp.depth`` modules; ``forward`` returns the mean of their cross-entropies."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext | None = None) -> None:
        """``ctx``: the model's layout without sequence parallelism (see the module doc)."""
        super().__init__()
        self.layers = nn.ModuleList(MTPModule(cfg, k, ctx) for k in range(1, cfg.mtp.depth + 1))

    def forward(
        self,
        hidden_BTC: torch.Tensor,
        input_ids: torch.Tensor,
        targets: torch.Tensor,
        model,
        docs: Documents | None = None,
    ) -> torch.Tensor:
        """``hidden_BTC``: the main model's last hidden state (before its final norm) for
        ``input_ids`` [B, T]; ``targets`` [B, T] are the next tokens (< 0 ignored). Returns the
        mean over depths of each depth's mean cross-entropy. ``docs``: the main stack's
        documents; depth k's position i keeps the document of position i."""
        hidden = self.hidden_states(hidden_BTC, input_ids, model, docs)
        ctx = model.ctx
        if ctx.cp > 1:  # this rank's share of each depth's global mean (see the module doc)
            losses = []
            for k, h in enumerate(hidden, start=1):
                mine = ctx.cp_shard(F.pad(targets[:, k:], (0, k), value=-1), 1)
                weight = cp_loss_weight(mine, targets[:, k:], ctx.cp)
                losses.append(model.head_loss(h, mine) * weight)
            return torch.stack(losses).mean()
        losses = [model.head_loss(h, targets[:, k:]) for k, h in enumerate(hidden, start=1)]
        return torch.stack(losses).mean()

    def logits(
        self, hidden_BTC: torch.Tensor, input_ids: torch.Tensor, model, docs=None
    ) -> list[torch.Tensor]:
        """Depth k's logits [B, T-k, V]: position i predicts token i+k+1 (T must exceed the
        depth; causal attention makes a prefix of the sequence exact, no padding needed)."""
        hidden = self.hidden_states(hidden_BTC, input_ids, model, docs)
        return [model.head_logits(h) for h in hidden]

    def hidden_states(
        self, hidden_BTC: torch.Tensor, input_ids: torch.Tensor, model, docs=None
    ) -> list[torch.Tensor]:
        """Depth k's normalised output [B, T-k, C] (full sequence, also under SP)."""
        T = input_ids.shape[1]
        if T <= len(self.layers):
            raise ValueError(f"MTP depth {len(self.layers)} needs sequences longer than {T}")
        h = model.norm(hidden_BTC) if model.norm is not None else hidden_BTC
        sp = model.ctx.sp
        embedded = None
        if sp:
            # Leave sequence parallelism: the modules below are plain TP on full sequences,
            # whose gradients are complete on every rank, so backward just keeps our slice.
            group = model.ctx.tp_group
            h = gather_from_sequence_parallel_region(h, group, reduce_grad=False)
            embedded = gather_from_sequence_parallel_region(
                model.embed_tokens(input_ids), group, reduce_grad=False
            )
        if model.ctx.cp > 1:
            return self._hidden_states_cp(h, input_ids, model, docs)
        docs = docs.prefix(T - 1) if docs is not None else None
        positions = model.positions(T - 1, input_ids.device, docs=docs)
        ropes = model.rotary(positions)
        out = []
        for k, layer in enumerate(self.layers, start=1):
            layer = cast(MTPModule, layer)  # a ModuleList yields plain nn.Module
            n = T - k
            r = ropes[layer.block.spec.rope]
            r = None if r is None else (r[0][..., :n, :], r[1][..., :n, :])
            e = embedded[:, k:] if embedded is not None else model.embed_tokens(input_ids[:, k:])
            h = layer(h[:, :n], e, r, docs.prefix(n) if docs is not None else None)
            out.append(h)
        return out

    def _hidden_states_cp(self, h_BTC, input_ids, model, docs) -> list[torch.Tensor]:
        """``hidden_states`` under context parallelism: every depth on this rank's chunks [B, T
        (local), C], the last k positions of the whole sequence padded (see the module doc)."""
        ctx, T = model.ctx, input_ids.shape[1]
        positions = ctx.cp_shard(model.positions(T, input_ids.device, docs=docs), -1)
        ropes = model.rotary(positions)
        B, n = h_BTC.shape[:2]
        where_T = local_positions(n, ctx.cp, ctx.cp_rank, h_BTC.device)  # in the whole sequence
        out = []
        for k, layer in enumerate(self.layers, start=1):
            layer = cast(MTPModule, layer)
            if isinstance(layer.block.mlp, MoE):  # its load statistics skip the padding
                layer.block.mlp.counted_N = (where_T < T - k).expand(B, n).reshape(-1)
            shifted = ctx.cp_shard(F.pad(input_ids[:, k:], (0, k)), 1)  # token i + k at i
            e = model.embed_tokens(shifted)
            if ctx.sp:
                e = gather_from_sequence_parallel_region(e, ctx.tp_group, reduce_grad=False)
            h_BTC = layer(h_BTC, e, ropes[layer.block.spec.rope], docs)
            out.append(h_BTC)
        return out
