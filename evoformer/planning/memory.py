"""Memory estimator for a layout: per-rank parameter, gradient, optimizer and activation bytes.

``estimate(cfg, world_size)`` needs the config and the model's shapes only: the model is built
on the meta device (no allocation, no process groups) and every parameter is assigned to the
pipeline rank that would hold it, cut by tensor, expert and ZeRO data parallelism the way our
engines cut it. The numbers are for the busiest rank (tp rank 0, dp rank 0) of each pp rank.

Model state (what ``engine.memory`` measures as ``mem_params/grads/optim_bytes``):

- tensor parallelism: matrices (2-D and up, the MoE router excepted) are split over ``tp``;
  vectors (norms, row-layer biases) are replicated. Expert parallelism splits the routed experts
  over ``ep``.
- bytes per parameter: our torch strategies keep fp32 parameters (bf16/fp16 compute through
  autocast or FSDP2's policy), fp32 gradients and AdamW's two fp32 moments: 4 + 4 + 8. DeepSpeed
  keeps 16-bit parameters and gradients with bf16/fp16 plus an fp32 master copy (counted as
  optimizer state): 2 + 2 + 12; in fp32 its ZeRO optimizer still keeps a separate master
  partition: 4 + 4 + 12.
- ZeRO: ``ddp`` shards nothing; ``fsdp2`` (stages 1-3 alike at rest) shards every parameter, its
  gradient and its AdamW moments on dim 0 over dp, padded to ``ceil(dim0 / dp)`` rows (rank 0
  holds the largest shard); ``deepspeed`` partitions flat buffers: stage 1 the optimizer state,
  stage 2 also gradients, stage 3 also parameters.

Activations (``mem_activations_bytes``: what one micro-batch's forward keeps for backward),
in elements per token and block, fitted to measured saved tensors of our blocks (fp32; C model
width, q / kv the query / key-value projection widths, H the MLP width):

- ``none``: attention 4C + 4q (k and v are expanded to q's width for SDPA), feed-forward
  2C + 4H (gated) or 2C + 2H, an MoE layer 2C + top_k (4H_e + 3C) + E (+ shared experts).
- ``selective`` (matmul and attention outputs saved): attention 2C + 2q + 2kv, feed-forward
  C + 2H (gated) or C + H, MoE top_k (2H_e + C) + E (+ shared).
- ``full``: the block input, C.
- the head: 3C + V (the logits; V / tp under tensor parallelism).

Under tensor parallelism q, kv, H, E-experts' widths are divided by tp; the C-sized tensors too
under sequence parallelism. Bytes per element: fp32 4; bf16/fp16 with 16-bit parameters (FSDP2's
policy, DeepSpeed) 2; bf16/fp16 through autocast (one process, DDP) 4 for the C-sized tensors
(residual stream and norms stay fp32) and 2 for the rest, plus autocast's 16-bit copy of every
matmul weight. The head's logits and loss are fp32 in every case. Pipeline ranks hold the
stages ``model.stages`` assigns them (cost-balanced, virtual stages, V placement for zbv) and
the activations of up to ``pp - rank`` micro-batches in flight (1F1B; GPipe: all of them;
interleaved schedules are counted like 1F1B). Measured against ``engine.memory`` on the tiny
and CPU-benchmark LLaMA shapes the activation estimate is within 1 % in fp32 and 5 % in bf16
(autocast and FSDP2's policy; the test allows a factor 1.25: ``tests/engine/test_memory.py``);
other block kinds are looser. Treat it as an estimate, and measure (``mem_activations_bytes``
on the first metrics line) before committing hardware. On CUDA the measured number is the
allocator's peak during the forward, temporaries included, so it exceeds this estimate of what
is kept (H100, the CPU-benchmark model, fp32: 1.5x without checkpointing, 1.8x with full).

Context parallelism (``parallel.cp``): a rank holds seq_len / cp tokens of every sequence, so
the activations above are divided by cp; FSDP2 shards the model state over dp x cp. On top
comes one attention layer's transient exchange buffers (``cp_buffer_bytes``): for ``ring`` the
K/V being sent and the ones being received, in the compute dtype, and in the backward the fp32
K/V gradients travelling with them (send and receive); for ``alltoall`` q, k, v and the output
re-sharded to the whole sequence (send and receive).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from evoformer.config.schema import Config, ModelConfig
from evoformer.errors import UserError
from evoformer.model.checkpointing import is_checkpointed, normalize_mode
from evoformer.model.layout import layer_spec
from evoformer.model.stages import split_layers, stage_ranks
from evoformer.model.transformer import Transformer

KINDS = ("params", "grads", "optim", "activations")


@dataclasses.dataclass
class RankEstimate:
    """Estimated bytes one rank holds (a pipeline stage's busiest rank)."""

    stage: int  # pipeline rank
    layers: str  # its blocks, e.g. "0-3" or "0-1,6-7" (interleaved stages)
    params: int = 0
    grads: int = 0
    optim: int = 0
    activations: int = 0

    @property
    def model_state(self) -> int:
        return self.params + self.grads + self.optim

    @property
    def total(self) -> int:
        return self.model_state + self.activations


@dataclasses.dataclass
class Plan:
    """The layout derived from the world size and the per-stage estimates."""

    world_size: int
    tp: int
    pp: int
    dp: int
    ep: int
    stages: list[RankEstimate]
    notes: list[str]
    cp: int = 1

    @property
    def worst(self) -> RankEstimate:
        return max(self.stages, key=lambda r: r.total)


def rank_layers(cfg: Config) -> list[tuple[list[int], bool, bool]]:
    """For each pp rank: its blocks (global indices), whether it holds the first stage
    (embedding) and whether it holds the last (final norm, head, MTP). The split and placement
    are the pipeline engine's (``model.stages``): cost-balanced or ``parallel.pp_layers``,
    ``pp_virtual_stages`` per rank, looped or V-shaped (zbv)."""

    p = cfg.parallel
    if p.pp == 1:
        return [(list(range(cfg.model.n_layers)), True, True)]
    S = p.pp * p.stages_per_rank
    stages = split_layers(cfg.model, S, cfg.train.seq_len, p.pp_layers)
    placement = stage_ranks(S, p.pp, p.stage_placement)
    out = []
    for r in range(p.pp):
        mine = [s for s in range(S) if placement[s] == r]
        layers = sorted(i for s in mine for i in stages[s])
        out.append((layers, 0 in mine, S - 1 in mine))
    return out


def bytes_per_param(cfg: Config) -> tuple[int, int, int]:
    """(param, grad, optimizer) bytes per parameter; see the module docstring."""
    if cfg.zero.backend == "deepspeed":
        half = cfg.precision in ("bf16", "fp16")
        return (2, 2, 12) if half else (4, 4, 12)
    return 4, 4, 8


def _held_by(name: str, layers: set[int], first: bool, last: bool, tied: bool) -> bool:
    """Whether a rank with these blocks / first / last stage holds parameter ``name``: blocks
    where they fall; the embedding on the first stage (and on the last with tied embeddings,
    for the head); the final norm, head and MTP modules on the last."""
    if name.startswith("layers."):
        return int(name.split(".")[1]) in layers
    if name.startswith("embed."):
        return first or (last and tied)
    if name.startswith("pos_embed."):
        return first
    return last


def _local_numel(name: str, shape: tuple[int, ...], tp: int, ep: int) -> tuple[int, ...]:
    """The shape one tp/ep rank holds (dim 0 split: the output or vocabulary dim for column and
    vocabulary layers; the split dim does not change the byte count)."""
    local = list(shape)
    if ".experts." in name and ep > 1:
        local[0] = math.ceil(local[0] / ep)
    if tp > 1 and len(local) >= 2 and not name.endswith("router.weight"):
        dim = 1 if ".experts." in name else 0
        local[dim] = math.ceil(local[dim] / tp)
    return tuple(local)


def _dp_shard_numel(shape: tuple[int, ...], dp: int) -> int:
    """FSDP2's dim-0 shard on dp rank 0 (padded to ceil(dim0 / dp) rows)."""
    rows = math.ceil(shape[0] / dp) if shape else 1
    return rows * math.prod(shape[1:])


def _model_state(
    cfg: Config, stage_params: list[tuple[str, tuple[int, ...]]], tp: int, dp: int, ep: int
) -> tuple[int, int, int]:
    bp, bg, bo = bytes_per_param(cfg)
    z = cfg.zero
    full = sharded = 0
    for name, shape in stage_params:
        local = _local_numel(name, shape, tp, ep)
        # Experts are replicated over dp / ep ranks only (ep is carved out of dp).
        shard_dp = max(dp // ep, 1) if ".experts." in name else dp
        full += math.prod(local)
        sharded += _dp_shard_numel(local, shard_dp) if shard_dp > 1 else math.prod(local)
    if z.backend == "fsdp2" and dp > 1:
        return sharded * bp, sharded * bg, sharded * bo
    if z.backend == "deepspeed" and dp > 1:
        flat = math.ceil(full / dp)
        return (
            (flat if z.stage >= 3 else full) * bp,
            (flat if z.stage >= 2 else full) * bg,
            (flat if z.stage >= 1 else full) * bo,
        )
    return full * bp, full * bg, full * bo


def _attention_widths(m: ModelConfig) -> tuple[int, int]:
    """(q width, k+v width per k or v) of one block's attention projections."""
    a = m.attention
    if a.kind == "mla":
        return a.n_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim), a.n_heads * a.v_head_dim
    return a.n_heads * m.head_dim, m.kv_heads * m.head_dim


def activation_elements_per_token(
    m: ModelConfig, layer_idx: int, mode: str, tp: int = 1, sp: bool = False
) -> tuple[float, float]:
    """Elements one token keeps for backward in block ``layer_idx`` (see the module docstring):
    (residual-width tensors, the others: projections, MLP and expert intermediates)."""
    C = m.d_model / (tp if sp else 1)
    q, kv = (w / tp for w in _attention_widths(m))
    if mode == "full":
        return C, 0.0
    moe = m.moe
    if layer_spec(m, layer_idx).mlp == "moe":
        he = m.expert_width / tp
        shared = m.shared_width
        hs = shared / tp
        if mode == "selective":
            c = moe.top_k * C + (C if hs else 0)
            other = moe.top_k * 2 * he + moe.num_experts + 2 * hs
        else:
            c = 2 * C + moe.top_k * 3 * C + (C if hs else 0)
            other = moe.top_k * 4 * he + moe.num_experts + 4 * hs
    else:
        h = m.mlp.hidden / tp
        if mode == "selective":
            c, other = C, (2 * h if m.mlp.gated else h)
        else:
            c, other = 2 * C, (4 * h if m.mlp.gated else 2 * h)
    if mode == "selective":
        return c + 2 * C, other + 2 * q + 2 * kv
    return c + 4 * C, other + 4 * q


def _activation_widths(cfg: Config) -> tuple[int, int, bool]:
    """Bytes per element of (residual-width tensors, the others), and whether an autocast
    weight cache exists. fp32: 4, 4. bf16/fp16 with parameters in 16 bits (FSDP2's policy,
    DeepSpeed): 2, 2. bf16/fp16 through autocast (one process, DDP): the residual stream and
    norms stay fp32 (4), matmul outputs are 16-bit (2), and autocast caches a 16-bit copy of
    every matmul weight for the step."""
    if cfg.precision not in ("bf16", "fp16"):
        return 4, 4, False
    if cfg.zero.backend in ("fsdp2", "deepspeed"):
        return 2, 2, False
    return 4, 2, True


def activation_bytes(
    cfg: Config, layers: list[int], last: bool, tp: int = 1, matmul_weights: int = 0
) -> float:
    """One micro-batch's activations on a rank holding blocks ``layers`` (global indices) and,
    with ``last``, the head; ``matmul_weights``: the rank's matmul weight elements (autocast's
    16-bit weight cache)."""
    m, t = cfg.model, cfg.train
    sp = cfg.parallel.sequence_parallel and tp > 1
    mode = normalize_mode(cfg.activation_checkpointing)
    every = cfg.activation_checkpointing_every
    wc, wo, cache = _activation_widths(cfg)
    per_token = 0.0
    for i in layers:
        layer_mode = mode if is_checkpointed(mode, every, i) else "none"
        c, other = activation_elements_per_token(m, i, layer_mode, tp, sp)
        per_token += c * wc + other * wo
    fixed = 2 * matmul_weights if cache else 0
    if last:  # norm, logits and the loss: fp32 whatever the precision
        C = m.d_model / (tp if sp else 1)
        # The plain loss keeps this rank's fp32 softmax [tokens, V/tp]; the chunked one
        # (model.loss_chunk) keeps dH [tokens, d_model] and an fp32 dW [V/tp, d_model] per
        # head call instead (its [chunk, V/tp] buffers are freed within the forward).
        head = 4 * (3 * C + (m.d_model if m.loss_chunk else m.vocab_size / tp))
        head_fixed = 4 * m.vocab_size / tp * m.d_model if m.loss_chunk else 0
        per_token += head
        fixed += head_fixed * (1 + m.mtp.depth)
        for k in range(m.mtp.depth):
            c, other = activation_elements_per_token(m, m.n_layers + k, "none", tp)
            per_token += c * wc + other * wo + head
    tokens = t.micro_batch_size * t.seq_len / cfg.parallel.cp  # a cp rank's share
    return per_token * tokens + fixed + cp_buffer_bytes(cfg, tp)


def cp_buffer_bytes(cfg: Config, tp: int = 1) -> float:
    """Context parallelism's transient exchange buffers of one attention layer on a rank (see
    the module docstring); 0 at cp = 1."""
    p, m, t = cfg.parallel, cfg.model, cfg.train
    if p.cp == 1:
        return 0.0
    _, wo, _ = _activation_widths(cfg)
    q, kv = (w / tp for w in _attention_widths(m))
    k_and_v = 2 * kv if m.attention.kind != "mla" else q + kv  # MLA sends per-head K and V
    tokens = t.micro_batch_size * t.seq_len / p.cp
    if p.cp_kind == "ring":
        return tokens * k_and_v * (2 * wo + 2 * 4)
    return tokens * (2 * q + k_and_v) * wo * 2


def _ranges(layers: list[int]) -> str:
    """[0, 1, 2, 6, 7] -> "0-2,6-7"."""
    parts, start = [], None
    for k, i in enumerate(layers):
        if start is None:
            start = i
        if k + 1 == len(layers) or layers[k + 1] != i + 1:
            parts.append(f"{start}-{i}" if i > start else str(i))
            start = None
    return ",".join(parts)


_META_CACHE: dict[str, list[tuple[str, tuple[int, ...]]]] = {}


def _meta_parameters(m: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, global shape) of every parameter; built once per model config (the fit search
    below estimates one model at many micro-batch sizes)."""
    key = repr(m)
    if key not in _META_CACHE:
        with torch.device("meta"):
            model = Transformer(m)
        _META_CACHE[key] = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    return _META_CACHE[key]


def estimate(cfg: Config, world_size: int) -> Plan:
    """Per-rank memory of ``cfg`` on ``world_size`` ranks (dp = world / (tp * pp * cp))."""

    p = cfg.parallel
    tp, pp, ep, cp = p.tp, p.pp, p.ep, p.cp
    if world_size < 1 or world_size % (tp * pp * cp):
        what = "parallel.tp * parallel.pp" + (" * parallel.cp" if cp > 1 else "")
        raise UserError(
            f"--gpus {world_size} must be a positive multiple of {what} = {tp * pp * cp}"
        )
    dp = world_size // (tp * pp * cp)
    if dp % ep:
        raise UserError(f"parallel.ep={ep} must divide the data-parallel size {dp}")
    m = cfg.model
    if m.n_layers < pp:
        raise UserError(f"parallel.pp={pp} exceeds model.n_layers={m.n_layers}")
    params = _meta_parameters(m)
    t = cfg.train
    n_micro = max(t.global_batch_size // (dp * t.micro_batch_size), 1)
    stages = []
    try:
        placement = rank_layers(cfg)
    except ValueError as err:  # a pp_layers list or a split the layers cannot fill
        raise UserError(f"config: parallel: {err}") from None
    for r, (layers, first, last) in enumerate(placement):
        held = set(layers)
        mine = [(n, sh) for n, sh in params if _held_by(n, held, first, last, m.tie_embeddings)]
        pb, gb, ob = _model_state(cfg, mine, tp, dp * cp, ep)  # replicas: dp x cp
        matmul = sum(
            math.prod(_local_numel(n, sh, tp, ep))
            for n, sh in mine
            if len(sh) >= 2 and not n.startswith(("embed.", "pos_embed."))
        )
        act = activation_bytes(cfg, layers, last, tp, matmul)
        if pp > 1:  # micro-batches in flight on this rank (1F1B: pp - r; GPipe: all)
            in_flight = n_micro if cfg.parallel.pp_schedule == "gpipe" else min(pp - r, n_micro)
            act *= in_flight
        stages.append(RankEstimate(r, _ranges(layers), pb, gb, ob, int(act)))
    notes = []
    if cp > 1:
        notes.append(
            f"cp {cp} ({p.cp_kind}): activations of seq_len / cp = {t.seq_len // cp} tokens "
            f"per sequence, plus {_fmt(cp_buffer_bytes(cfg, tp))} of exchange buffers"
        )
    if cfg.zero.backend == "fsdp2" and dp * cp > 1:
        notes.append(
            "fsdp2: at rest; during a block's forward/backward its parameters are gathered "
            "(stage 3: one or two blocks at a time; stages 1/2: every block from its forward "
            "to its backward)"
        )
    if cfg.zero.backend == "ddp" and dp * cp > 1:
        notes.append("ddp: plus one gradient-sized copy in DDP's all-reduce buckets")
    return Plan(world_size, tp, pp, dp, ep, stages, notes, cp)


def _fmt(n: float) -> str:
    for div, name in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:,.2f} {name}"
    return f"{n:,.0f} B"


def format_plan(cfg: Config, plan: Plan) -> str:
    """The table `evoformer plan` prints."""
    z = cfg.zero
    backend = z.backend if plan.dp * plan.cp > 1 else "single (dp = 1)"
    cp = f" x cp {plan.cp} ({cfg.parallel.cp_kind})" if plan.cp > 1 else ""
    head = (
        f"layout: world {plan.world_size} = tp {plan.tp} x pp {plan.pp} x dp {plan.dp}{cp}"
        f" (ep {plan.ep}) | {backend} stage {z.stage} | precision {cfg.precision} | "
        f"micro batch {cfg.train.micro_batch_size} x seq {cfg.train.seq_len} | "
        f"activation checkpointing {cfg.activation_checkpointing}"
        + (
            f" every {cfg.activation_checkpointing_every}"
            if cfg.activation_checkpointing_every > 1
            else ""
        )
    )
    cols = ("pp rank", "blocks", "params", "grads", "optim", "model state", "activations", "total")
    rows = []
    for r in plan.stages:
        rows.append(
            (
                str(r.stage),
                r.layers,
                _fmt(r.params),
                _fmt(r.grads),
                _fmt(r.optim),
                _fmt(r.model_state),
                _fmt(r.activations),
                _fmt(r.total),
            )
        )
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    line = "  ".join(c.rjust(w) for c, w in zip(cols, widths))
    out = [
        head,
        "per rank, one row per pipeline rank (its tp rank 0, dp rank 0):",
        line,
        "-" * len(line),
    ]
    out += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows]
    out += [f"note: {n}" for n in plan.notes]
    return "\n".join(out)


_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str) -> int:
    """``80GB``, ``80GiB``, ``80G``, ``1.5T``, ``81920MB`` -> bytes. Binary units throughout:
    a GPU sold as "80GB" reports about 80 GiB, which is what the estimate is compared with."""
    t = text.strip().upper().replace("IB", "").rstrip("B") or "0"
    unit = t[-1] if t[-1] in _UNITS else ""
    number = t[: -1 if unit else None]
    try:
        value = float(number) * _UNITS[unit]
    except ValueError:
        raise UserError(f"--gpu-mem {text!r}: expected a size such as 80GB or 40GiB") from None
    if value <= 0:
        raise UserError(f"--gpu-mem {text!r} must be positive")
    return int(value)


def _with_micro_batch(cfg: Config, size: int) -> Config:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=size))


def largest_micro_batch(cfg: Config, world_size: int, limit: int, most: int = 4096) -> int:
    """The largest ``train.micro_batch_size`` (up to ``most``) whose busiest rank fits in
    ``limit`` bytes; 0 when not even one sequence fits. Per-rank bytes grow with the
    micro-batch, so doubling then bisecting finds it."""

    def fits(size: int) -> bool:
        return estimate(_with_micro_batch(cfg, size), world_size).worst.total <= limit

    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= most and fits(high):
        low, high = high, high * 2
    high = min(high, most + 1)
    while high - low > 1:  # fits(low), not fits(high) (or high beyond most)
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def fit_verdict(cfg: Config, plan: Plan, world_size: int, limit: int) -> list[str]:
    """The lines ``evoformer plan --gpu-mem`` adds: does the busiest rank fit in ``limit``,
    and the largest micro-batch that would."""
    worst = plan.worst
    share = f"{_fmt(worst.total)} of {_fmt(limit)}, {100 * worst.total / limit:.0f} %"
    verdict = "fits" if worst.total <= limit else "does not fit"
    lines = [f"gpu memory {_fmt(limit)}: {verdict} (busiest rank: pp rank {worst.stage}, {share})"]
    best = largest_micro_batch(cfg, world_size, limit)
    one = estimate(_with_micro_batch(cfg, 1), world_size).worst
    if best == 0 and one.model_state > limit:
        lines.append(
            f"no micro-batch fits: the model state alone is {_fmt(one.model_state)} on pp rank "
            f"{one.stage} (more ranks, a higher ZeRO stage, tp or pp would shard it)"
        )
    elif best == 0:
        lines.append(
            "no micro-batch fits: one sequence's activations do not fit next to the model "
            "state (activation checkpointing or a shorter train.seq_len would)"
        )
    else:
        lines.append(f"largest micro-batch that fits: train.micro_batch_size={best}")
    return lines
