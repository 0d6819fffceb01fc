"""The decoder-only Transformer: embeddings, a stack of blocks, final norm and LM head.

Every architecture is a composition of orthogonal choices from ModelConfig (norm kind and
placement, position kind, attention, MLP kind); presets are YAML files in configs/models/.

Tensor parallelism comes in through one ``ParallelContext`` (``build_model(..., groups=...)``):
each block builds its layers from it (plain ``nn.Linear`` at tp = 1), the embedding and head
are split along the vocabulary and the loss is the vocab-parallel cross-entropy, so the full
logits never exist in training. Under sequence parallelism the residual stream between the TP
regions (norms, dropout, residual adds) holds this rank's slice of the sequence.

Shapes: B batch, T sequence, C d_model, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from evoformer.config.schema import ModelConfig, RopeScalingConfig
from evoformer.model.documents import Documents
from evoformer.model.layout import LayerSpec, layer_plan, moe_spec
from evoformer.model.loss import lm_loss
from evoformer.model.mixers import PositionCounter, build_mixer
from evoformer.model.mlp import build_mlp
from evoformer.model.moe import MoE
from evoformer.model.norms import build_norm
from evoformer.model.positions import RotaryEmbedding
from evoformer.parallel.context import ParallelContext
from evoformer.parallel.context_parallel import cp_loss_weight, gather_sequence
from evoformer.parallel.cross_entropy import vocab_parallel_cross_entropy, vocab_parallel_z_loss
from evoformer.parallel.fused_cross_entropy import fused_vocab_parallel_loss
from evoformer.parallel.layers import (
    TensorParallelModule,
    VocabParallelEmbedding,
    VocabParallelLMHead,
    gather_vocab_logits,
    vocab_parallel_logits,
)
from evoformer.parallel.sharding import KeepShardSpecs, full_shape, local_piece, mark_partial_grad

if TYPE_CHECKING:
    from evoformer.model.mixers import LayerCache, Mixer


class Block(nn.Module):
    """One transformer layer: attention and feed-forward sub-layers around the residual stream.

    ``norm.placement`` decides where the norms sit (pre, post, OLMo 2's reordered, Gemma's
    sandwich); ``parallel_block`` runs attention and MLP side by side on one normed input (PaLM).
    """

    def __init__(
        self, cfg: ModelConfig, spec: LayerSpec, ctx: ParallelContext | None = None
    ) -> None:
        super().__init__()
        self.ctx = ctx = ctx or ParallelContext()
        self.spec = spec  # this layer's entry of the per-layer plan (model.layout)
        self.layer_idx = layer_idx = spec.index
        self.placement = cfg.norm.placement
        self.parallel = cfg.parallel_block
        self.dropout = cfg.dropout
        # Hybrid blocks (model.mixer_pattern / mlp_pattern) may lack either sub-layer.
        has_mixer, has_mlp = spec.mixer != "none", spec.mlp != "none"
        self.attn_norm = build_norm(cfg.norm, cfg.d_model) if has_mixer else None
        # The token mixer: attention, or a recurrent mixer (model.mixers) for hybrid layers.
        self.attn = build_mixer(cfg, spec, ctx) if has_mixer else None
        self.mlp_norm = None if self.parallel or not has_mlp else build_norm(cfg.norm, cfg.d_model)
        if spec.mlp == "moe":
            self.mlp = MoE(moe_spec(cfg), layer_idx, ctx)  # names its load metrics by layer
        elif has_mlp:
            self.mlp = build_mlp(cfg.mlp, cfg.d_model, ctx)
        else:
            self.mlp = None
        if self.placement == "sandwich":
            self.attn_post_norm = build_norm(cfg.norm, cfg.d_model)
            self.mlp_post_norm = build_norm(cfg.norm, cfg.d_model)
        if ctx.sp:  # the norms see this rank's sequence shard: partial gradients
            for name in ("attn_norm", "mlp_norm", "attn_post_norm", "mlp_post_norm"):
                if getattr(self, name, None) is not None:
                    mark_partial_grad(getattr(self, name), "weight", "bias")

    @property
    def is_local(self) -> bool:
        """Whether this layer attends through a sliding window (from its spec)."""
        return self.spec.is_local

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        if not self.dropout:
            return x
        return self.ctx.dropout(x, self.dropout, self.training)

    def new_cache(self, batch: int, max_len: int, device, dtype) -> LayerCache:
        """This block's decoding state: its mixer's (KV cache, recurrent state), or a
        position counter for a block without one."""
        if self.attn is None:
            return PositionCounter()
        return cast("Mixer", self.attn).new_cache(batch, max_len, device, dtype)

    def forward(
        self, x_BTC, rope=None, cache: LayerCache | None = None, docs: Documents | None = None
    ) -> torch.Tensor:
        """``docs``: the batch's documents, when attention stays inside them."""
        if self.attn is None or self.mlp is None:
            return self._hybrid_forward(x_BTC, rope, cache, docs)
        attn, mlp, attn_norm = self.attn, self.mlp, cast(nn.Module, self.attn_norm)
        if self.parallel:
            h = attn_norm(x_BTC)
            return x_BTC + self._drop(attn(h, rope, cache, docs) + mlp(h))
        mlp_norm = cast(nn.Module, self.mlp_norm)  # present unless the block is parallel
        if self.placement == "pre":
            x_BTC = x_BTC + self._drop(attn(attn_norm(x_BTC), rope, cache, docs))
            return x_BTC + self._drop(mlp(mlp_norm(x_BTC)))
        if self.placement == "post":
            x_BTC = attn_norm(x_BTC + self._drop(attn(x_BTC, rope, cache, docs)))
            return mlp_norm(x_BTC + self._drop(mlp(x_BTC)))
        if self.placement == "reordered":
            x_BTC = x_BTC + self._drop(attn_norm(attn(x_BTC, rope, cache, docs)))
            return x_BTC + self._drop(mlp_norm(mlp(x_BTC)))
        # sandwich
        h = self.attn_post_norm(attn(attn_norm(x_BTC), rope, cache, docs))
        x_BTC = x_BTC + self._drop(h)
        return x_BTC + self._drop(self.mlp_post_norm(mlp(mlp_norm(x_BTC))))

    def _hybrid_forward(self, x_BTC, rope, cache, docs) -> torch.Tensor:
        """A pre-norm block with one sub-layer missing (Nemotron-H's M, * and - blocks)."""
        if self.attn is not None:
            attn_norm = cast(nn.Module, self.attn_norm)
            x_BTC = x_BTC + self._drop(self.attn(attn_norm(x_BTC), rope, cache, docs))
        elif cache is not None:
            cache.length += x_BTC.shape[1]
        if self.mlp is not None:
            x_BTC = x_BTC + self._drop(self.mlp(cast(nn.Module, self.mlp_norm)(x_BTC)))
        return x_BTC


class ModelOutput(NamedTuple):
    """What ``forward(..., targets=...)`` returns for training: the loss to backpropagate and
    detached per-term metrics (``ce_loss`` always; ``aux_loss``, ``mtp_loss`` when present).
    A NamedTuple so that wrappers which look for output tensors (DeepSpeed ZeRO-3's backward
    hooks) find the loss."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


class Transformer(KeepShardSpecs):
    """Decoder-only language model; ``forward(input_ids [B, T]) -> logits [B, T, V]``.

    ``ctx`` (default: one process) gives the tensor-parallel group and sequence parallelism;
    under TP the forward still returns the full logits for inference (gathered), and the
    training loss (``targets``) is computed from the vocabulary shards."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.ctx = ctx = ctx or ParallelContext(backend=cfg.backend)
        V, C = cfg.vocab_size, cfg.d_model
        if ctx.tp == 1:
            self.embed = nn.Embedding(V, C)
        else:
            self.embed = VocabParallelEmbedding(V, C, ctx.tp_group, sequence_parallel=ctx.sp)
        self.pos_embed = (
            nn.Embedding(cfg.max_seq_len, C) if cfg.position.kind == "learned" else None
        )
        self.rope, self.rope_local = self._build_rope(cfg)
        self.layers = nn.ModuleList(Block(cfg, spec, ctx) for spec in layer_plan(cfg))
        # Post-norm stacks end normalised already; the others (pre, OLMo 2's reordered, Gemma's
        # sandwich) leave a raw residual stream that needs a final norm before the head.
        self.norm = build_norm(cfg.norm, C) if cfg.norm.placement != "post" else None
        if cfg.tie_embeddings:
            self.head = None
        elif ctx.tp == 1:
            self.head = nn.Linear(C, V, False)
        else:
            self.head = VocabParallelLMHead(C, V, ctx.tp_group, sequence_parallel=ctx.sp)
        if ctx.sp:  # used on this rank's sequence shard: partial gradients
            for module in (self.pos_embed, self.norm):
                if module is not None:
                    mark_partial_grad(module, "weight", "bias")
        # optim.z_loss (set by engine.parallelize): weight of the z-loss in the training loss
        self.z_loss_weight = 0.0
        self.mtp = None
        if cfg.mtp.depth > 0:
            from evoformer.model.mtp import MultiTokenPrediction

            self.mtp = MultiTokenPrediction(cfg, ctx.without_sp())

    @staticmethod
    def _build_rope(cfg: ModelConfig):
        if cfg.position.kind != "rope":
            return None, None
        head_dim = cfg.rotary_dim  # the rotated dims only (partial RoPE, MLA's rope dims)
        rope = RotaryEmbedding(head_dim, cfg.max_seq_len, cfg.position)
        local = None
        if cfg.position.local_rope_theta is not None:
            # Gemma 3: local layers use their own base and no context-extension scaling.
            local_cfg = dataclasses.replace(
                cfg.position,
                rope_theta=cfg.position.local_rope_theta,
                rope_scaling=RopeScalingConfig(),
            )
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
        linear_like = (nn.Linear, nn.Embedding, TensorParallelModule)
        rank = self.ctx.tp_rank
        for module in self.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset) and not isinstance(module, linear_like):
                reset()
        for name, module in self.named_modules():
            if isinstance(module, linear_like):
                s = residual_std if getattr(module, "is_residual_out", False) else std
                _normal_(module.weight, s, seed, f"{name}.weight", rank)
                bias = getattr(module, "bias", None)
                if bias is not None:
                    bias.zero_()
            # Other weight layouts (stacked MoE experts) name their linear-like parameters.
            for pname, residual in getattr(module, "normal_init", {}).items():
                s = residual_std if residual else std
                _normal_(getattr(module, pname), s, seed, f"{name}.{pname}", rank)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed.weight.numel()
            if self.pos_embed is not None:
                n -= self.pos_embed.weight.numel()
        return n

    # -- forward ---------------------------------------------------------------------------

    def new_caches(self, batch: int, max_len: int) -> list[LayerCache]:
        p = self.embed.weight
        layers = cast(Iterable[Block], self.layers)
        return [layer.new_cache(batch, max_len, p.device, p.dtype) for layer in layers]

    def forward(
        self,
        input_ids: torch.Tensor,
        caches: list[LayerCache] | None = None,
        targets: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor | ModelOutput:
        """Logits [B, T, V]; with ``targets`` [B, T] the training loss instead (ModelOutput).

        ``document_ids`` [B, T] (packed windows, no ``caches``): a document is a run of equal
        consecutive ids; each token attends only to earlier tokens of its run and positions
        restart at the run's first token (``model.documents``)."""
        docs = Documents(document_ids) if document_ids is not None else None
        hidden_BTC = self.hidden_states(input_ids, caches, docs)
        if targets is None:
            # context parallelism: every rank returns the whole sequence's logits
            return gather_sequence(self.logits(hidden_BTC), 1, self.ctx.cp_group)
        return self.training_loss(hidden_BTC, input_ids, targets, aux_from=self, docs=docs)

    def training_loss(
        self,
        hidden_BTC: torch.Tensor,
        input_ids: torch.Tensor,
        targets: torch.Tensor,
        aux_from: nn.Module,
        extras: bool = True,
        docs: Documents | None = None,
    ) -> ModelOutput:
        """The loss of the last hidden state -- next-token CE, + ``mtp.loss_weight`` x MTP, +
        the MoE aux losses of ``aux_from``'s modules -- and its detached terms. The one place
        the loss is assembled (the whole model and the pipeline's last stage both call it);
        ``extras=False`` (a stage in eval mode): CE only.

        Context parallelism: ``input_ids`` / ``targets`` are the whole sequences and
        ``hidden_BTC`` this rank's chunks; each term is this rank's share of the global mean,
        scaled by cp, so that the mean over the cp ranks (their gradient and metric averages)
        is the one process's loss exactly."""
        h = self.norm(hidden_BTC) if self.norm is not None else hidden_BTC
        all_targets, targets = targets, self.ctx.cp_shard(targets, 1)
        weight = cp_loss_weight(targets, all_targets, self.ctx.cp)
        loss, ce, z = self._head_loss_terms(h, targets, self.ctx.sp, self.z_loss_weight)
        loss, ce = loss * weight, ce * weight
        metrics = {"ce_loss": ce.detach()}
        if z is not None:
            z = z * weight
            metrics["z_loss"] = z.detach()
        if extras and self.mtp is not None:  # first: its blocks may hold MoE layers with aux
            mtp_loss = self.mtp(hidden_BTC, input_ids, all_targets, self, docs)
            loss = loss + self.cfg.mtp.loss_weight * mtp_loss
            metrics["mtp_loss"] = mtp_loss.detach()
        aux = aux_loss_of(aux_from) if extras else None
        if aux is not None:
            loss = loss + aux
            metrics["aux_loss"] = aux.detach()
        return ModelOutput(loss, metrics)

    def logits(self, hidden_BTC: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head (tied to the embedding when configured): full logits
        [B, T, V] (under TP gathered from the vocabulary shards, without gradient)."""
        if self.norm is not None:
            hidden_BTC = self.norm(hidden_BTC)
        return self.head_logits(hidden_BTC, self.ctx.sp)

    def head_logits(self, h_BTC: torch.Tensor, sequence_parallel: bool = False) -> torch.Tensor:
        """Full logits of normalised hidden states (``sequence_parallel``: ``h`` is this rank's
        sequence shard, as the main stack's output under SP; the MTP modules' is not)."""
        weight = self.embed.weight if self.head is None else self.head.weight
        if self.ctx.tp == 1:
            return F.linear(h_BTC, weight)
        local = vocab_parallel_logits(h_BTC, weight, self.ctx.tp_group, sequence_parallel)
        return gather_vocab_logits(local, self.ctx.tp_group, self.cfg.vocab_size)

    def head_loss(
        self, h_BTC: torch.Tensor, targets_BT: torch.Tensor, sequence_parallel: bool = False
    ) -> torch.Tensor:
        """Mean next-token cross-entropy of normalised hidden states; under TP computed from
        each rank's vocabulary shard (vocab-parallel cross-entropy, no full logits)."""
        return self._head_loss_terms(h_BTC, targets_BT, sequence_parallel, 0.0)[0]

    def _head_loss_terms(
        self, h_BTC: torch.Tensor, targets_BT: torch.Tensor, sequence_parallel: bool, z_w: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(ce + z_w * z, ce, z)`` of normalised hidden states (``z`` None when ``z_w`` is 0):
        through the chunked fused head + loss with ``model.loss_chunk``, else the plain path
        (this rank's full logits, then the vocab-parallel cross-entropy and z-loss)."""
        if self.cfg.loss_chunk > 0:
            weight = self.embed.weight if self.head is None else self.head.weight
            start, end = (0, self.cfg.vocab_size) if self.ctx.tp == 1 else self._vocab_range()
            loss, ce, z = fused_vocab_parallel_loss(
                h_BTC,
                weight,
                targets_BT,
                self.ctx.tp_group,
                start,
                end,
                chunk=self.cfg.loss_chunk,
                sequence_parallel=sequence_parallel,
                z_weight=z_w,
            )
            return loss, ce, (z if z_w > 0 else None)
        local = self._local_logits(h_BTC, sequence_parallel)
        ce = self._cross_entropy(local, targets_BT)
        if z_w <= 0:
            return ce, ce, None
        z = vocab_parallel_z_loss(local, targets_BT, self.ctx.tp_group, self._real_columns())
        return ce + z_w * z, ce, z

    def _vocab_range(self) -> tuple[int, int]:
        shard = self._vocab_shard()
        return shard.vocab_start, shard.vocab_end

    def _local_logits(self, h_BTC: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
        """The logits of this rank's vocabulary shard (all of them at tp = 1)."""
        weight = self.embed.weight if self.head is None else self.head.weight
        if self.ctx.tp == 1:
            return F.linear(h_BTC, weight)
        return vocab_parallel_logits(h_BTC, weight, self.ctx.tp_group, sequence_parallel)

    def _vocab_shard(self) -> VocabParallelEmbedding | VocabParallelLMHead:
        return cast(
            VocabParallelEmbedding | VocabParallelLMHead,
            self.embed if self.head is None else self.head,
        )  # under TP both are vocabulary shards

    def _real_columns(self) -> int:
        """Columns of this rank's logits that are real tokens (the rest: vocabulary padding)."""
        if self.ctx.tp == 1:
            return self.cfg.vocab_size
        shard = self._vocab_shard()
        return shard.vocab_end - shard.vocab_start

    def _cross_entropy(self, local: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
        if self.ctx.tp == 1:
            return lm_loss(local, targets_BT)
        shard = self._vocab_shard()
        return vocab_parallel_cross_entropy(
            local, targets_BT, self.ctx.tp_group, shard.vocab_start, shard.vocab_end
        )

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        x_BTC = self.embed(input_ids)
        if self.cfg.embed_scale:
            # Gemma rounds the multiplier to the activation dtype before scaling.
            x_BTC = x_BTC * torch.tensor(self.cfg.d_model**0.5, dtype=x_BTC.dtype)
        return x_BTC

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        caches: list[LayerCache] | None = None,
        docs: Documents | None = None,
    ) -> torch.Tensor:
        """The residual stream after the last block (before the final norm); under sequence
        parallelism this rank's slice of the sequence."""
        B, T = input_ids.shape
        start = caches[0].length if caches else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} exceeds max_seq_len={self.cfg.max_seq_len}")
        positions = self.positions(T, input_ids.device, start, docs)
        if docs is not None and caches:
            raise ValueError("document_ids are for packed training windows, not cached decoding")
        if self.ctx.cp > 1:  # this rank's two chunks, at their positions in the whole sequence
            input_ids, positions = self.ctx.cp_shard(input_ids, 1), self.ctx.cp_shard(positions, -1)
        x_BTC = self.embed_input(input_ids, positions)
        ropes = self.rotary(positions)
        for i, layer in enumerate(cast(Iterable[Block], self.layers)):
            x_BTC = layer(x_BTC, ropes[layer.spec.rope], caches[i] if caches else None, docs)
        return x_BTC

    @staticmethod
    def positions(
        T: int, device: torch.device, start: int = 0, docs: Documents | None = None
    ) -> torch.Tensor:
        """Positions of ``T`` tokens: ``start, start + 1, ...`` [T], or per row from each
        document's first token [B, T] under document masking."""
        if docs is not None:
            return docs.positions
        return torch.arange(start, start + T, device=device)

    def embed_input(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The start of the residual stream: token (+ learned position) embeddings and
        embedding dropout; under sequence parallelism this rank's slice of the sequence."""
        x_BTC = self.embed_tokens(input_ids)
        if self.pos_embed is not None:
            first, n = self.ctx.seq_shard(positions.shape[-1])
            x_BTC = x_BTC + self.pos_embed(positions[..., first : first + n])
        if self.cfg.dropout:
            x_BTC = self.ctx.dropout(x_BTC, self.cfg.dropout, self.training)
        return x_BTC

    def rotary(self, positions: torch.Tensor) -> dict[str, tuple | None]:
        """The rotary tables for ``positions`` by name, as a block's ``spec.rope`` asks for
        them: ``global``, ``local`` (Gemma 3's local base), ``none``."""
        rope = self.rope(positions) if self.rope is not None else None
        rope_local = self.rope_local(positions) if self.rope_local is not None else rope
        return {"global": rope, "local": rope_local, "none": None}


def aux_loss_of(module: nn.Module) -> torch.Tensor | None:
    """The sum of the MoE aux losses the last forward left on ``module``'s submodules."""
    aux = []
    for m in module.modules():  # a plain loop: torch.compile breaks on a walrus comprehension
        a = getattr(m, "aux_loss", None)
        if a is not None:
            aux.append(a)
    return torch.stack(aux).sum() if aux else None


def _normal_(t: torch.Tensor, std: float, seed: int, name: str, tp_rank: int = 0) -> None:
    """Draw ``t`` from N(0, std) with a generator keyed by its name. A tensor- or
    expert-parallel shard is cut from the global tensor drawn exactly as on one device."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    full = torch.empty(full_shape(t), dtype=torch.float32).normal_(0.0, std, generator=g)
    t.copy_(local_piece(full, t, tp_rank))


def build_model(
    cfg: ModelConfig,
    device: str | torch.device = "cpu",
    seed: int | None = 0,
    groups=None,
    sequence_parallel: bool = False,
) -> Transformer:
    """Build on the meta device (no allocation), then materialise on ``device`` and initialise
    from ``seed`` (``seed=None`` leaves the memory uninitialised, e.g. before loading weights).

    ``groups`` (``ParallelDims.build()``'s ParallelGroups; ``None``: one process) makes the
    model tensor-parallel over ``groups.tp_group`` (with ``sequence_parallel``); every layout
    starts from the same global weights."""
    ctx = ParallelContext.from_groups(groups, sequence_parallel, backend=cfg.backend)
    with torch.device("meta"):
        model = Transformer(cfg, ctx)
    return materialise(model, device, seed)


def materialise(model: Transformer, device: str | torch.device, seed: int | None) -> Transformer:
    """Allocate a meta-device model on ``device``, rebuild its RoPE tables, and initialise its
    weights per parameter name from ``seed`` (``None``: leave the memory uninitialised)."""
    model.to_empty(device=device)
    for rope in (model.rope, model.rope_local):
        if rope is not None:
            rope.reset_parameters()
    if seed is not None:
        model.init_weights(seed)
    return model
