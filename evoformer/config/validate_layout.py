"""Checks on the parallel layout of a Config: tensor, pipeline, expert and context parallelism
(what the model cannot be split into); one UserError per mistake."""

from __future__ import annotations

from evoformer.config.checks import fail as _fail
from evoformer.config.checks import get
from evoformer.config.schema import Config


def validate_parallel(cfg: Config) -> None:
    """Layouts the model cannot be split into (the world size is checked by ParallelDims at
    launch: it must be a multiple of tp). ``parallel.sequence_parallel`` with tp = 1 is a no-op,
    so recipes may keep it on while tp is overridden."""
    tp, m = cfg.parallel.tp, cfg.model
    if tp == 1:
        return
    a = m.attention
    kv = m.kv_heads
    why = f"must be divisible by parallel.tp={tp}"
    if a.n_heads % tp:
        _fail("model.attention.n_heads", a.n_heads, why + " (heads are split over TP)")
    if a.kind != "mla" and kv % tp and tp % kv:
        _fail(
            "model.attention.n_kv_heads",
            kv,
            f"must divide or be divisible by parallel.tp={tp} (KV heads are split, or "
            "replicated when fewer than tp)",
        )
    dense = m.moe.num_experts <= 0 or m.moe.first_k_dense > 0 or m.moe.layer_freq > 1
    if dense and m.mlp.hidden % tp:
        _fail("model.mlp.hidden", m.mlp.hidden, why)
    if m.moe.num_experts > 0:
        if m.expert_width % tp:
            _fail("model.moe.expert_hidden", m.expert_width, why)
        if m.shared_width % tp:
            _fail("model.moe.shared_hidden", m.shared_width, why)
    if "G" in m.mixer_pattern and m.deltanet.n_key_heads % tp:
        _fail("model.deltanet.n_key_heads", m.deltanet.n_key_heads, why + " (heads split)")
    if "M" in m.mixer_pattern and m.mamba.n_groups % tp:
        _fail("model.mamba.n_groups", m.mamba.n_groups, why + " (heads and groups split)")
    if cfg.parallel.sequence_parallel and cfg.train.seq_len % tp:
        _fail(
            "train.seq_len",
            cfg.train.seq_len,
            f"{why} with parallel.sequence_parallel (the sequence is split over TP)",
        )


def validate_pipeline(cfg: Config) -> None:
    """Pipeline stages the model can be cut into: ``pp x virtual`` stages of >= 1 layer each
    (``parallel.pp_layers``, when given, one count per stage summing to n_layers); one stage per
    rank for gpipe/1f1b, exactly two for zbv."""
    p, m = cfg.parallel, cfg.model
    if p.pp_virtual_stages < 0:
        _fail("parallel.pp_virtual_stages", p.pp_virtual_stages, "must be >= 0 (0 = from schedule)")
    if p.pp == 1:
        if p.pp_layers:
            _fail("parallel.pp_layers", p.pp_layers, "needs parallel.pp > 1")
        return
    v = p.stages_per_rank
    if p.pp_schedule in ("gpipe", "1f1b") and v != 1:
        _fail(
            "parallel.pp_virtual_stages",
            v,
            f"pp_schedule={p.pp_schedule} runs one stage per "
            "rank (virtual stages need interleaved, zero_bubble or zbv)",
        )
    if p.pp_schedule == "zbv" and v != 2:
        _fail("parallel.pp_virtual_stages", v, "pp_schedule=zbv places exactly 2 stages per rank")
    S = p.pp * v
    if p.pp_layers:
        if len(p.pp_layers) != S or min(p.pp_layers) < 1:
            _fail(
                "parallel.pp_layers",
                p.pp_layers,
                f"needs {S} entries (pp={p.pp} x {v} stages per rank), each >= 1",
            )
        if sum(p.pp_layers) != m.n_layers:
            _fail(
                "parallel.pp_layers",
                p.pp_layers,
                f"sums to {sum(p.pp_layers)}, model.n_layers={m.n_layers}",
            )
    elif m.n_layers < S:
        _fail(
            "parallel.pp",
            p.pp,
            f"{S} pipeline stages (pp x {v} per rank) need at least as "
            f"many layers, model.n_layers={m.n_layers}",
        )
    if (
        p.pp_schedule == "zbv"
        and cfg.zero.backend == "fsdp2"
        and (m.tie_embeddings or m.mtp.depth > 0)
    ):
        _fail(
            "parallel.pp_schedule",
            "zbv",
            "puts the first and last stage on one rank, "
            "sharing the embedding (tied head or MTP): not with zero.backend=fsdp2",
        )


def validate_expert_parallel(cfg: Config) -> None:
    """``parallel.ep`` splits each MoE layer's routed experts evenly over the ep ranks (the
    world-size arithmetic, ep dividing dp, is checked by ParallelDims at launch)."""
    ep, m = cfg.parallel.ep, cfg.model.moe
    if ep == 1:
        return
    if m.num_experts <= 0:
        _fail("parallel.ep", ep, "expert parallelism needs an MoE model (model.moe.num_experts)")
    if m.num_experts % ep:
        _fail("parallel.ep", ep, f"must divide model.moe.num_experts={m.num_experts}")
    if cfg.zero.backend == "deepspeed":
        _fail("parallel.ep", ep, "expert parallelism runs with zero.backend=ddp or fsdp2")
    hsdp = getattr(cfg.zero, "replicate", 1) > 1
    if cfg.zero.backend == "fsdp2" and (cfg.parallel.tp > 1 or hsdp):
        _fail(
            "parallel.ep",
            ep,
            "expert parallelism with zero.backend=fsdp2 needs parallel.tp=1 "
            "and no HSDP (zero.replicate=1) in this version",
        )


def validate_context_parallel(cfg: Config) -> None:
    """``parallel.cp`` splits every sequence into 2 * cp chunks (load-balanced causal work);
    compositions this version does not run are refused here, one line each."""
    cp, p = cfg.parallel.cp, cfg.parallel
    if cp == 1:
        return
    seqs = [cfg.train.seq_len, *(n for _, n in cfg.train.seq_len_schedule)]
    tp_split = p.tp if p.sequence_parallel else 1
    for n in seqs:
        if n % (2 * cp * tp_split):
            _fail(
                "train.seq_len",
                n,
                f"must be divisible by 2*cp{'*tp' if tp_split > 1 else ''} = {2 * cp * tp_split} "
                "(each sequence is split into 2*cp load-balanced chunks"
                f"{', each split over tp by sequence parallelism' if tp_split > 1 else ''})",
            )
    if p.cp_kind == "alltoall" and (cfg.model.attention.n_heads // p.tp) % cp:
        _fail(
            "parallel.cp",
            cp,
            f"cp_kind=alltoall needs the {cfg.model.attention.n_heads // p.tp} attention heads of "
            "a tp rank divisible by cp (heads are re-sharded over cp); use cp_kind=ring",
        )
    refused = {
        "zero.backend": (cfg.zero.backend == "deepspeed", "zero.backend=deepspeed"),
        "zero.replicate": (cfg.zero.replicate > 1, "HSDP (zero.replicate > 1)"),
        "parallel.ep": (
            p.ep > 1 and cfg.zero.backend != "ddp",
            f"expert parallelism with zero.backend={cfg.zero.backend}",
        ),
        "model.attention.dropout": (cfg.model.attention.dropout > 0, "attention dropout"),
        "optim.qk_clip": (cfg.optim.qk_clip > 0, "QK-clip (optim.qk_clip)"),
        "model.backend": (cfg.model.backend == "te", "the Transformer Engine backend"),
        # inductor does not lower the ring's fused CPU blocks yet (found in a cp=2 run)
        "train.compile": (cfg.train.compile, "train.compile"),
        "model.moe.capacity_factor": (
            cfg.model.moe.capacity_factor > 0,
            "an MoE expert capacity (it would count each rank's chunks, not the sequence)",
        ),
    }
    for key, (bad, what) in refused.items():
        if bad:
            _fail(key, get(cfg, key), f"{what} does not run with parallel.cp > 1 in this version")
    if cfg.model.attention.sinks:  # the ring's log-sum-exp merge has no sink term yet
        _fail(
            "model.attention.sinks",
            True,
            "attention sinks do not run with parallel.cp > 1 in this version",
        )
    if set(cfg.model.mixer_pattern) & set("GM"):  # the recurrences would need state passing
        _fail(
            "model.mixer_pattern",
            cfg.model.mixer_pattern,
            "Gated DeltaNet / Mamba-2 layers do not run with parallel.cp > 1 in this version "
            "(their state would have to pass between the chunks)",
        )
