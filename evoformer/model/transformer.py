"""The decoder-only Transformer: embeddings, a stack of blocks, final norm and LM head.

Every architecture is a composition of orthogonal choices from ModelConfig (norm kind and
placement, position kind, attention, MLP kind); presets are YAML files in configs/models/.
Shapes: B batch, T sequence, C d_model, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from evoformer.config.schema import ModelConfig, RopeScalingConfig
from evoformer.model.attention import KVCache, build_attention, is_local_layer
from evoformer.model.loss import lm_loss
from evoformer.model.mlp import build_ffn
from evoformer.model.norms import build_norm
from evoformer.model.positions import RotaryEmbedding


class Block(nn.Module):
    """One transformer layer: attention and feed-forward sub-layers around the residual stream.

    ``norm.placement`` decides where the norms sit (pre, post, OLMo 2's reordered, Gemma's
    sandwich); ``parallel_block`` runs attention and MLP side by side on one normed input (PaLM).
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.placement = cfg.norm.placement
        self.parallel = cfg.parallel_block
        self.is_local = is_local_layer(cfg.attention, layer_idx)
        self.dropout = cfg.dropout
        self.attn_norm = build_norm(cfg.norm, cfg.d_model)
        self.attn = build_attention(cfg, layer_idx)
        self.mlp_norm = None if self.parallel else build_norm(cfg.norm, cfg.d_model)
        self.mlp = build_ffn(cfg, layer_idx)
        if hasattr(self.mlp, "layer_idx"):  # MoE names its load metrics by layer
            self.mlp.layer_idx = layer_idx
        if self.placement == "sandwich":
            self.attn_post_norm = build_norm(cfg.norm, cfg.d_model)
            self.mlp_post_norm = build_norm(cfg.norm, cfg.d_model)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout, self.training) if self.dropout else x

    def forward(self, x_BTC, rope=None, cache: KVCache | None = None) -> torch.Tensor:
        if self.parallel:
            h = self.attn_norm(x_BTC)
            return x_BTC + self._drop(self.attn(h, rope, cache) + self.mlp(h))
        if self.placement == "pre":
            x_BTC = x_BTC + self._drop(self.attn(self.attn_norm(x_BTC), rope, cache))
            return x_BTC + self._drop(self.mlp(self.mlp_norm(x_BTC)))
        if self.placement == "post":
            x_BTC = self.attn_norm(x_BTC + self._drop(self.attn(x_BTC, rope, cache)))
            return self.mlp_norm(x_BTC + self._drop(self.mlp(x_BTC)))
        if self.placement == "reordered":
            x_BTC = x_BTC + self._drop(self.attn_norm(self.attn(x_BTC, rope, cache)))
            return x_BTC + self._drop(self.mlp_norm(self.mlp(x_BTC)))
        # sandwich
        h = self.attn_post_norm(self.attn(self.attn_norm(x_BTC), rope, cache))
        x_BTC = x_BTC + self._drop(h)
        return x_BTC + self._drop(self.mlp_post_norm(self.mlp(self.mlp_norm(x_BTC))))


@dataclasses.dataclass
class ModelOutput:
    """What ``forward(..., targets=...)`` returns for training: the loss to backpropagate and
    detached per-term metrics (``ce_loss`` always; ``aux_loss``, ``mtp_loss`` when present)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


class Transformer(nn.Module):
    """Decoder-only language model; ``forward(input_ids [B, T]) -> logits [B, T, V]``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = (
            nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.position.kind == "learned" else None
        )
        self.rope, self.rope_local = self._build_rope(cfg)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        # Post-norm stacks end normalised already; the others (pre, OLMo 2's reordered, Gemma's
        # sandwich) leave a raw residual stream that needs a final norm before the head.
        self.norm = build_norm(cfg.norm, cfg.d_model) if cfg.norm.placement != "post" else None
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, False)
        self.mtp = None
        if cfg.mtp.depth > 0:
            from evoformer.model.mtp import MultiTokenPrediction

            self.mtp = MultiTokenPrediction(cfg)
        self.activation_checkpointing = False

    @staticmethod
    def _build_rope(cfg: ModelConfig):
        if cfg.position.kind != "rope":
            return None, None
        a = cfg.attention
        head_dim = a.qk_rope_head_dim if a.kind == "mla" else a.head_dim or cfg.d_model // a.n_heads
        rope = RotaryEmbedding(head_dim, cfg.max_seq_len, cfg.position)
        local = None
        if cfg.position.local_rope_theta is not None:
            # Gemma 3: local layers use their own base and no context-extension scaling.
            local_cfg = dataclasses.replace(
                cfg.position, rope_theta=cfg.position.local_rope_theta,
                rope_scaling=RopeScalingConfig(),
            )  # fmt: skip
            local = RotaryEmbedding(head_dim, cfg.max_seq_len, local_cfg)
        return rope, local

    # -- weights ---------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Deterministic init from ``seed``: each tensor draws from its own generator keyed by
        its name, so the result does not depend on device, construction order or which layers a
        rank holds (pipeline stages, tensor shards are cut from the same global weights)."""
        std = self.cfg.init.std
        residual_std = (
            std / math.sqrt(2 * self.cfg.n_layers) if self.cfg.init.scaled_residual else std
        )
        for module in self.modules():
            if hasattr(module, "reset_parameters") and not isinstance(
                module, (nn.Linear, nn.Embedding)
            ):
                module.reset_parameters()
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                s = residual_std if getattr(module, "is_residual_out", False) else std
                _normal_(module.weight, s, seed, f"{name}.weight")
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            # Other weight layouts (stacked MoE experts) name their linear-like parameters.
            for pname, residual in getattr(module, "normal_init", {}).items():
                s = residual_std if residual else std
                _normal_(getattr(module, pname), s, seed, f"{name}.{pname}")

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed.weight.numel()
            if self.pos_embed is not None:
                n -= self.pos_embed.weight.numel()
        return n

    # -- forward ---------------------------------------------------------------------------

    def new_caches(self, batch: int, max_len: int) -> list[KVCache]:
        p = self.embed.weight
        return [layer.attn.new_cache(batch, max_len, p.device, p.dtype) for layer in self.layers]

    def forward(
        self,
        input_ids: torch.Tensor,
        caches: list[KVCache] | None = None,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor | ModelOutput:
        """Logits [B, T, V]; with ``targets`` [B, T] the training loss instead (ModelOutput)."""
        hidden_BTC = self.hidden_states(input_ids, caches)
        if targets is None:
            return self.logits(hidden_BTC)
        ce = lm_loss(self.logits(hidden_BTC), targets)
        loss, metrics = ce, {"ce_loss": ce.detach()}
        if self.mtp is not None:  # first: its blocks may hold MoE layers with aux losses
            mtp_loss = self.mtp(hidden_BTC, input_ids, targets, self)
            loss = loss + self.cfg.mtp.loss_weight * mtp_loss
            metrics["mtp_loss"] = mtp_loss.detach()
        aux = [m.aux_loss for m in self.modules() if getattr(m, "aux_loss", None) is not None]
        if aux:
            aux_total = torch.stack(aux).sum()
            loss = loss + aux_total
            metrics["aux_loss"] = aux_total.detach()
        return ModelOutput(loss, metrics)

    def logits(self, hidden_BTC: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head (tied to the embedding when configured)."""
        if self.norm is not None:
            hidden_BTC = self.norm(hidden_BTC)
        weight = self.embed.weight if self.head is None else self.head.weight
        return F.linear(hidden_BTC, weight)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        x_BTC = self.embed(input_ids)
        if self.cfg.embed_scale:
            # Gemma rounds the multiplier to the activation dtype before scaling.
            x_BTC = x_BTC * torch.tensor(self.cfg.d_model**0.5, dtype=x_BTC.dtype)
        return x_BTC

    def hidden_states(
        self, input_ids: torch.Tensor, caches: list[KVCache] | None = None
    ) -> torch.Tensor:
        """The residual stream after the last block (before the final norm)."""
        B, T = input_ids.shape
        start = caches[0].length if caches else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} exceeds max_seq_len={self.cfg.max_seq_len}")
        positions = torch.arange(start, start + T, device=input_ids.device)
        x_BTC = self.embed_tokens(input_ids)
        if self.pos_embed is not None:
            x_BTC = x_BTC + self.pos_embed(positions)
        if self.cfg.dropout:
            x_BTC = F.dropout(x_BTC, self.cfg.dropout, self.training)
        rope = self.rope(positions) if self.rope is not None else None
        rope_local = self.rope_local(positions) if self.rope_local is not None else rope
        for i, layer in enumerate(self.layers):
            cache = caches[i] if caches else None
            layer_rope = rope_local if layer.is_local else rope
            if self.activation_checkpointing and self.training and cache is None:
                x_BTC = checkpoint(layer, x_BTC, layer_rope, use_reentrant=False)
            else:
                x_BTC = layer(x_BTC, layer_rope, cache)
        return x_BTC


def _normal_(t: torch.Tensor, std: float, seed: int, name: str) -> None:
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    t.copy_(torch.empty(t.shape, dtype=torch.float32).normal_(0.0, std, generator=g))


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", seed: int | None = 0):
    """Build on the meta device (no allocation), then materialise on ``device`` and initialise
    from ``seed`` (``seed=None`` leaves the memory uninitialised, e.g. before loading weights)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    for rope in (model.rope, model.rope_local):
        if rope is not None:
            rope.reset_parameters()
    if seed is not None:
        model.init_weights(seed)
    return model
