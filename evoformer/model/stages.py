"""Pipeline stages of the Transformer: which layers each stage holds, and the stage modules.

A pipeline of ``S`` stages (``pp`` ranks times ``v`` virtual stages per rank) cuts the layer
stack into ``S`` contiguous runs: the embedding sits on the first stage; final norm, LM head,
loss and MTP modules on the last. ``split_layers`` balances the runs by estimated training cost
(FLOPs per token of each block, with the embedding and the head/MTP counted on their stages), or
takes an explicit ``pp_layers`` list. ``stage_ranks`` places stages on ranks: looped (stage s on
rank ``s % pp``, GPipe/1F1B/interleaved) or V-shaped (rank r holds stages r and 2pp-1-r, ZBV).

Each rank builds one ``TransformerStage``: the ``Transformer`` with only this rank's layers,
keeping full-model parameter names (``layers.7.attn.q.weight`` stays ``layers.7...``; the stack is
a ``ModuleDict`` keyed by the global layer index), so init (per name from the seed), checkpoints
and optimizer state are the same whatever the layout. Its ``chunks`` are the ``StageChunk``
modules the pipeline schedule runs, one per virtual stage, sharing the container's submodules.

Tied embeddings: the first and the last stage both hold ``embed.weight`` (the last for the head,
and for MTP, which embeds tokens too), initialised identically; the engine sums their gradients.

Shapes: B batch, T sequence, C d_model.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from evoformer.config.schema import ModelConfig
from evoformer.model.costs import attention_flops, block_params, mtp_module_params
from evoformer.model.documents import Documents
from evoformer.model.transformer import Block, Transformer, aux_loss_of, materialise
from evoformer.parallel.context import ParallelContext

# -- layout ----------------------------------------------------------------------------------


def layer_costs(cfg: ModelConfig, seq_len: int) -> tuple[list[float], float, float]:
    """Forward FLOPs per token of each block, of the first stage's extras (embedding) and of the
    last stage's (final norm, head and loss, MTP modules). An embedding lookup does no matmul,
    but its backward accumulates a [V, C] gradient and the optimizer updates it: counted as half
    a head (V*C)."""
    d, V = cfg.d_model, cfg.vocab_size
    blocks = [
        2 * block_params(cfg, i).matmul + attention_flops(cfg, i, seq_len)
        for i in range(cfg.n_layers)
    ]
    head = 2 * d * V + sum(
        2 * mtp_module_params(cfg, k).matmul
        + 2 * d * V
        + attention_flops(cfg, cfg.n_layers + k, seq_len)
        for k in range(cfg.mtp.depth)
    )
    return blocks, float(d * V), float(head)


def split_layers(
    cfg: ModelConfig, num_stages: int, seq_len: int, pp_layers: list[int] | None = None
) -> list[list[int]]:
    """Global layer indices of each stage: ``pp_layers`` (layers per stage) when given, else the
    contiguous split minimising the most expensive stage (each stage at least one layer)."""
    L = cfg.n_layers
    if pp_layers:
        if len(pp_layers) != num_stages or sum(pp_layers) != L or min(pp_layers) < 1:
            raise ValueError(
                f"pp_layers={pp_layers} must give {num_stages} stages of >= 1 layer summing to "
                f"n_layers={L}"
            )
        counts = list(pp_layers)
    else:
        if L < num_stages:
            raise ValueError(f"{num_stages} pipeline stages need at least as many layers (n={L})")
        counts = _balance(*layer_costs(cfg, seq_len), num_stages)
    out, start = [], 0
    for n in counts:
        out.append(list(range(start, start + n)))
        start += n
    return out


def _balance(blocks: list[float], first: float, last: float, S: int) -> list[int]:
    """Layers per stage minimising the maximum stage cost (ties: the earliest split), by
    dynamic programming over (stages used, layers covered)."""
    L = len(blocks)
    prefix = [0.0]
    for c in blocks:
        prefix.append(prefix[-1] + c)

    def cost(s: int, i: int, j: int) -> float:  # stage s holds layers i..j-1
        return prefix[j] - prefix[i] + (first if s == 0 else 0.0) + (last if s == S - 1 else 0.0)

    inf = float("inf")
    best = [[inf] * (L + 1) for _ in range(S + 1)]
    cut = [[0] * (L + 1) for _ in range(S + 1)]
    best[0][0] = 0.0
    for s in range(1, S + 1):
        for j in range(s, L - (S - s) + 1):
            for i in range(s - 1, j):
                val = max(best[s - 1][i], cost(s - 1, i, j))
                if val < best[s][j] - 1e-9 * abs(val):
                    best[s][j], cut[s][j] = val, i
    counts, j = [], L
    for s in range(S, 0, -1):
        i = cut[s][j]
        counts.append(j - i)
        j = i
    return counts[::-1]


def stage_ranks(num_stages: int, pp: int, style: str = "loop") -> list[int]:
    """The pp rank of each stage: ``loop`` puts stage s on rank s % pp; ``v`` (two stages per
    rank) puts stages r and 2*pp-1-r on rank r, so the last stage sits next to the first."""
    if num_stages % pp:
        raise ValueError(f"{num_stages} stages do not divide over pp={pp} ranks")
    if style == "loop":
        return [s % pp for s in range(num_stages)]
    if style == "v":
        if num_stages != 2 * pp:
            raise ValueError(f"a V-shaped placement needs 2 stages per rank, got {num_stages}")
        return [s if s < pp else 2 * pp - 1 - s for s in range(num_stages)]
    raise ValueError(f"unknown stage placement {style!r}")


# -- modules ---------------------------------------------------------------------------------


class TransformerStage(Transformer):
    """The part of the Transformer one pipeline rank holds (see the module docstring).

    ``layer_ids``: the global indices of its layers; ``first`` / ``last``: whether it holds the
    pipeline's first stage (embedding) or last (final norm, head, MTP; the embedding too when it
    is tied or MTP needs it). Build on the meta device (``build_stage_model``): construction
    creates the whole model's modules and drops the others before anything is allocated."""

    layers: nn.ModuleDict  # this stage's blocks, keyed by their global index as a string
    # Set by engine.pipeline.build_pipeline_model: every stage's layers, each stage's pp rank.
    pp_stages: list[list[int]]
    pp_placement: list[int]

    def __init__(
        self,
        cfg: ModelConfig,
        ctx: ParallelContext | None,
        layer_ids: list[int],
        first: bool,
        last: bool,
    ) -> None:
        super().__init__(cfg, ctx)
        self.layer_ids = sorted(layer_ids)
        self.has_first, self.has_last = first, last
        full = cast(nn.ModuleList, self.layers)  # the whole model's blocks, built by Transformer
        self.layers = nn.ModuleDict({str(i): full[i] for i in self.layer_ids})
        if not first:
            self.pos_embed = None
            if not (last and (cfg.tie_embeddings or self.mtp is not None)):
                self.embed = None
        if not last:
            self.norm = self.head = self.mtp = None
        self.chunks: list[StageChunk] = []  # a plain list: not registered twice

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= sum(m.weight.numel() for m in (self.embed, self.pos_embed) if m is not None)
        return n

    def forward(self, *args, **kwargs):
        raise RuntimeError(
            "a pipeline stage runs through its chunks (engine.pipeline), not forward()"
        )

    def new_caches(self, batch: int, max_len: int):
        raise RuntimeError("pipeline stages do not generate")


class StageChunk(nn.Module):
    """One pipeline stage: what ``torch.distributed.pipelining.PipelineStage`` runs.

    ``forward(x, tokens)``: ``tokens`` is the micro-batch [B, T+1] (inputs and next tokens);
    the first stage embeds ``x`` = ``tokens[:, :-1]``, the others take in ``x`` the previous
    stage's hidden state [B, T, C] (under SP this rank's sequence slice). The last stage returns the
    micro-batch's training loss (CE + MTP + MoE aux terms, as ``Transformer.forward``; in eval
    mode the mean CE), the others their hidden state. MoE aux losses of a non-last stage ride
    backward on its output (``attach_aux_loss``). Detached per-micro-batch metrics (``ce_loss``,
    ``mtp_loss``, ``aux_loss``) are appended to ``self.metrics`` for the engine."""

    _model: TransformerStage  # held in __dict__, so nn.Module's __getattr__ does not type it

    def __init__(
        self, model: TransformerStage, stage_index: int, num_stages: int, layer_ids: list[int]
    ) -> None:
        super().__init__()
        self.__dict__["_model"] = model  # not a submodule: its parameters are not ours
        self.stage_index, self.num_stages = stage_index, num_stages
        self.is_first, self.is_last = stage_index == 0, stage_index == num_stages - 1
        # The last stage uses the embedding for a tied head or MTP only (otherwise, on a rank
        # that also holds the first stage, it must not appear in two DP-wrapped chunks).
        shares = model.cfg.tie_embeddings or model.mtp is not None
        self.embed = model.embed if (self.is_first or (self.is_last and shares)) else None
        self.pos_embed = model.pos_embed if self.is_first else None
        self.rope, self.rope_local = model.rope, model.rope_local
        self.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in layer_ids})
        self.norm = model.norm if self.is_last else None
        self.head = model.head if self.is_last else None
        self.mtp = model.mtp if self.is_last else None
        self.aux_grad_scale = 1.0  # d(step loss)/d(aux loss): 1 / micro-batches (set by engine)
        self.metrics: list[dict[str, torch.Tensor]] = []

    def forward(
        self, x: torch.Tensor, tokens: torch.Tensor, document_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        m = self._model
        T = tokens.shape[1] - 1
        docs = Documents(document_ids) if document_ids is not None else None
        positions = m.positions(T, tokens.device, docs=docs)
        if m.ctx.cp > 1:  # this rank's two chunks of the sequence (parallel/context_parallel.py)
            positions = m.ctx.cp_shard(positions, -1)
            x = m.ctx.cp_shard(x, 1) if self.is_first else x
        x_BTC = m.embed_input(x, positions) if self.is_first else x
        ropes = m.rotary(positions)
        for layer in self.layers.values():
            layer = cast(Block, layer)  # a ModuleDict yields plain nn.Module
            x_BTC = layer(x_BTC, ropes[layer.spec.rope], None, docs)
        if not self.is_last:
            aux = aux_loss_of(self)
            if aux is not None:
                self.metrics.append({"aux_loss": aux.detach()})
                x_BTC = attach_aux_loss(x_BTC, aux, self.aux_grad_scale)
            return x_BTC
        return self._loss(x_BTC, tokens, docs)

    def _loss(
        self, hidden_BTC: torch.Tensor, tokens: torch.Tensor, docs: Documents | None
    ) -> torch.Tensor:
        out = self._model.training_loss(
            hidden_BTC, tokens[:, :-1], tokens[:, 1:], self, extras=self.training, docs=docs
        )
        self.metrics.append(out.metrics)
        return out.loss


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on the stage output; backward also seeds the aux loss's gradient (Megatron's
    MoEAuxLossAutoScaler), so a loss computed mid-pipeline reaches backward without travelling
    to the last stage."""

    @staticmethod
    def forward(ctx, x, aux, scale: float):
        ctx.save_for_backward(aux)
        ctx.scale = scale
        # A copy, not a view: the zero-bubble schedules detach stage outputs in place.
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        (aux,) = ctx.saved_tensors
        return grad, torch.full_like(aux, ctx.scale), None


def attach_aux_loss(x: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` forward; backward through ``x`` also backpropagates ``scale * aux``."""
    return _AttachAuxLoss.apply(x, aux, scale)


def build_stage_model(
    cfg: ModelConfig,
    stages: list[list[int]],
    my_stages: list[int],
    device: str | torch.device = "cpu",
    seed: int | None = 0,
    groups=None,
    sequence_parallel: bool = False,
) -> TransformerStage:
    """This rank's ``TransformerStage`` holding stages ``my_stages`` (indices into ``stages``,
    the layers of every stage), with one ``StageChunk`` per held stage in ``.chunks``. Built on
    the meta device, materialised on ``device`` and initialised from ``seed`` per parameter name,
    so the weights equal the one-process model's (``build_model``)."""
    S = len(stages)
    layer_ids = [i for s in my_stages for i in stages[s]]
    ctx = ParallelContext.from_groups(groups, sequence_parallel, backend=cfg.backend)
    with torch.device("meta"):
        model = TransformerStage(cfg, ctx, layer_ids, 0 in my_stages, S - 1 in my_stages)
    materialise(model, device, seed)
    model.chunks = [StageChunk(model, s, S, stages[s]) for s in sorted(my_stages)]
    return model
