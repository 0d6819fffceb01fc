"""Checks on a whole Config that types alone cannot express; one UserError per mistake."""

from __future__ import annotations

from evoformer.config.checks import fail as _fail
from evoformer.config.checks import get
from evoformer.config.schema import PP_SCHEDULE_VIRTUAL_STAGES, Config
from evoformer.config.validate_layout import (
    validate_context_parallel,
    validate_expert_parallel,
    validate_parallel,
    validate_pipeline,
)
from evoformer.errors import UserError

CHOICES = {
    "model.norm.kind": ("layernorm", "rmsnorm"),
    "model.norm.placement": ("pre", "post", "reordered", "sandwich"),
    "model.position.kind": ("rope", "learned", "alibi", "none"),
    "model.position.rope_scaling.kind": ("none", "linear", "llama3", "yarn"),
    "model.attention.kind": ("mha", "mla"),
    "model.attention.sdpa_kernel": ("auto", "cudnn", "flash", "efficient", "math"),
    "model.attention.qk_norm": ("none", "head", "full"),
    "model.mlp.kind": ("gelu", "swiglu", "geglu", "clamped_swiglu"),
    "model.moe.score": ("softmax", "sigmoid"),
    "model.moe.group_score": ("top2", "max"),
    "model.mlp.activation": ("default", "gelu", "gelu_tanh", "silu", "relu2"),
    "model.backend": ("torch", "te"),
    "data.source": ("default", "files", "synthetic"),
    "optim.schedule": ("cosine", "wsd", "constant"),
    "parallel.pp_schedule": tuple(PP_SCHEDULE_VIRTUAL_STAGES),
    "parallel.cp_kind": ("ring", "alltoall"),
    "zero.backend": ("ddp", "fsdp2", "deepspeed"),
    "precision": ("fp32", "bf16", "fp16"),
    "fp8.backend": ("te", "torchao"),
    "fp8.recipe": ("tensorwise", "rowwise", "delayed", "mxfp8", "blockwise"),
    "activation_checkpointing": ("none", "full", "selective"),
    "train.compile_scope": ("block", "model"),
    "train.compile_mode": (
        "default",
        "reduce-overhead",
        "max-autotune",
        "max-autotune-no-cudagraphs",
    ),
    "checkpoint.load": None,  # free text, checked elsewhere
    "run.device": ("auto", "cpu", "cuda"),
    "run.progress": ("auto", "on", "off"),
}

POSITIVE = (
    "model.vocab_size",
    "model.d_model",
    "model.n_layers",
    "model.max_seq_len",
    "model.attention.n_heads",
    "model.mlp.hidden",
    "data.tokenizer_vocab_size",
    "train.max_steps",
    "train.global_batch_size",
    "train.micro_batch_size",
    "train.seq_len",
    "train.eval_batches",
    "train.log_every",
    "train.spike_window",
    "parallel.tp",
    "parallel.pp",
    "parallel.ep",
    "parallel.cp",
    "activation_checkpointing_every",
)

NON_NEGATIVE = (
    "train.eval_every",
    "checkpoint.save_every",
    "checkpoint.keep_last",
    "optim.warmup_steps",
    "optim.lr",
    "optim.weight_decay",
    "optim.grad_clip",
    "run.threads",
    "zero.stage",
    "train.nonfinite_patience",
    "optim.z_loss",
    "train.spike_sigma",
    "data.prefetch",
    "dist.flight_recorder",
)


def validate(cfg: Config) -> None:
    """Raise UserError on the first impossible setting."""
    # YAML reads on/off as booleans; accept both spellings for the progress switch.
    progress = str(cfg.run.progress).lower()
    cfg.run.progress = {"true": "on", "false": "off"}.get(progress, progress)
    # The old boolean spelling of activation checkpointing: true means full, false none.
    ac = str(cfg.activation_checkpointing).lower()
    cfg.activation_checkpointing = {"true": "full", "false": "none"}.get(ac, ac)
    for key, choices in CHOICES.items():
        if choices and get(cfg, key) not in choices:
            _fail(key, get(cfg, key), f"must be one of {', '.join(choices)}")
    for key in POSITIVE:
        if get(cfg, key) <= 0:
            _fail(key, get(cfg, key), "must be > 0")
    for key in NON_NEGATIVE:
        if get(cfg, key) < 0:
            _fail(key, get(cfg, key), "must be >= 0")
    validate_model(cfg)
    t = cfg.train
    if t.global_batch_size % t.micro_batch_size:
        _fail(
            "train.global_batch_size",
            t.global_batch_size,
            f"must be a multiple of train.micro_batch_size={t.micro_batch_size}",
        )
    if t.seq_len > cfg.model.max_seq_len:
        _fail("train.seq_len", t.seq_len, f"exceeds model.max_seq_len={cfg.model.max_seq_len}")
    graphs = t.compile_mode in ("reduce-overhead", "max-autotune")
    if t.compile and graphs and (cfg.zero.backend != "ddp" or cfg.parallel.pp > 1):
        _fail(
            "train.compile_mode",
            t.compile_mode,
            "CUDA graphs need the same buffers every step: zero.backend=ddp and pp = 1 only",
        )
    if t.compile and t.compile_scope == "model":
        if cfg.parallel.pp > 1:
            _fail("train.compile_scope", "model", "pp > 1 runs stages, not the model: use block")
        if cfg.zero.backend != "ddp":
            _fail(
                "train.compile_scope",
                "model",
                f"is tested with zero.backend=ddp only (zero.backend={cfg.zero.backend} wraps "
                "each block itself): use block",
            )
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        _fail("data.val_fraction", cfg.data.val_fraction, "must be in [0, 1)")
    if cfg.data.source == "files" and not cfg.data.paths:
        _fail("data.paths", cfg.data.paths, "data.source=files needs at least one path")
    validate_blend(cfg)
    prof = list(cfg.run.profile)
    if prof and (len(prof) != 2 or not 1 <= prof[0] <= prof[1]):
        _fail("run.profile", prof, "give [first, last] steps, 1 <= first <= last")
    validate_optimizer(cfg)
    validate_ramps(cfg)
    c = cfg.checkpoint
    if c.init_from and c.load not in (None, "", "none", "auto"):
        _fail(
            "checkpoint.init_from",
            c.init_from,
            f"starts a new run; checkpoint.load={c.load} continues one: set only one of them",
        )
    if not 0.0 <= cfg.optim.min_lr_ratio <= 1.0:
        _fail("optim.min_lr_ratio", cfg.optim.min_lr_ratio, "must be in [0, 1]")
    if not 0.0 < cfg.optim.decay_fraction <= 1.0:
        _fail("optim.decay_fraction", cfg.optim.decay_fraction, "must be in (0, 1]")
    if cfg.dist.timeout_s <= 0:
        _fail("dist.timeout_s", cfg.dist.timeout_s, "must be > 0 seconds")
    if cfg.dist.async_error_handling not in (0, 1, 2, 3):
        _fail("dist.async_error_handling", cfg.dist.async_error_handling, "must be 0, 1, 2 or 3")
    validate_parallel(cfg)
    validate_pipeline(cfg)
    validate_expert_parallel(cfg)
    validate_context_parallel(cfg)
    validate_zero(cfg)
    validate_deepspeed(cfg)
    validate_precision(cfg)
    _not_yet(cfg)


def validate_ramps(cfg: Config) -> None:
    """``train.batch_ramp`` and ``train.seq_len_schedule``."""
    t = cfg.train
    ramp, sched = list(t.batch_ramp), [list(x) for x in t.seq_len_schedule]
    if ramp:
        if len(ramp) != 3 or min(ramp) <= 0:
            _fail("train.batch_ramp", ramp, "give [start, increment, tokens], all > 0")
        start, inc, _ = ramp
        if start >= t.global_batch_size or (t.global_batch_size - start) % inc:
            _fail(
                "train.batch_ramp",
                ramp,
                f"start must be below train.global_batch_size={t.global_batch_size}, which "
                "start + k * increment must reach",
            )
        for key, bad in (
            ("parallel.pp", cfg.parallel.pp > 1),
            ("zero.backend", cfg.zero.backend == "deepspeed"),
            ("data.weights", bool(cfg.data.weights)),
        ):
            if bad:
                _fail("train.batch_ramp", ramp, f"is not supported with this {key}")
    if sched:
        steps = [s[0] for s in sched if len(s) == 2]
        if len(steps) != len(sched) or steps[0] != 0 or steps != sorted(set(steps)):
            _fail("train.seq_len_schedule", sched, "give [[0, len], [step, len], ...] by step")
        tp = cfg.parallel.tp if cfg.parallel.sequence_parallel else 1
        for _, n in sched:
            if n <= cfg.model.mtp.depth or t.seq_len % n or n % tp:
                _fail(
                    "train.seq_len_schedule",
                    sched,
                    f"every length must divide train.seq_len={t.seq_len} (and be a multiple of "
                    "tp under sequence parallelism)",
                )
        if cfg.parallel.pp > 1:
            _fail("train.seq_len_schedule", sched, "is not supported with parallel.pp > 1")


def validate_optimizer(cfg: Config) -> None:
    """``optim.name`` and Muon's keys."""
    o = cfg.optim
    if o.name not in ("adamw", "muon"):
        _fail("optim.name", o.name, "must be one of adamw, muon")
    if o.qk_clip < 0:
        _fail("optim.qk_clip", o.qk_clip, "must be >= 0")
    if o.qk_clip > 0:
        if cfg.model.attention.qk_norm != "none":
            _fail("optim.qk_clip", o.qk_clip, "has no effect with QK-norm (it rescales q and k)")
        if cfg.zero.backend != "ddp":
            _fail(
                "optim.qk_clip",
                o.qk_clip,
                f"scales rows of whole weights: zero.backend=ddp only, not {cfg.zero.backend}",
            )
    if o.name != "muon":
        return
    if cfg.zero.backend == "deepspeed":
        _fail("optim.name", o.name, "Muon runs with zero.backend ddp or fsdp2, not deepspeed")
    if len(o.muon_ns_coefficients) != 3:
        _fail("optim.muon_ns_coefficients", list(o.muon_ns_coefficients), "needs 3 numbers")
    if o.muon_lr_scale not in ("rms", "spectral"):
        _fail("optim.muon_lr_scale", o.muon_lr_scale, "must be one of rms, spectral")
    if o.muon_ns_steps < 1:
        _fail("optim.muon_ns_steps", o.muon_ns_steps, "must be >= 1")
    if not 0.0 <= o.muon_momentum < 1.0:
        _fail("optim.muon_momentum", o.muon_momentum, "must be in [0, 1)")


def validate_blend(cfg: Config) -> None:
    """``data.weights``: one non-negative weight per path, not all zero."""
    w, paths = list(cfg.data.weights), list(cfg.data.paths)
    if not w:
        return
    if cfg.data.source != "files":
        _fail("data.weights", w, "blends data.paths, which needs data.source=files")
    if len(w) != len(paths):
        _fail("data.weights", w, f"needs one weight per data.paths entry ({len(paths)} paths)")
    if min(w) < 0 or sum(w) <= 0:
        _fail("data.weights", w, "must be >= 0 and not all 0")


def validate_precision(cfg: Config) -> None:
    """Loss-scale arithmetic and which FP8 recipe each backend offers (engine.fp8)."""
    ls = cfg.loss_scale
    if ls.initial_scale <= 0 or ls.min_scale <= 0:
        _fail("loss_scale.initial_scale", ls.initial_scale, "initial and min scale must be > 0")
    if ls.growth_factor < 1.0:
        _fail("loss_scale.growth_factor", ls.growth_factor, "must be >= 1")
    if not 0.0 < ls.backoff_factor < 1.0:
        _fail("loss_scale.backoff_factor", ls.backoff_factor, "must be in (0, 1)")
    if ls.growth_interval < 1:
        _fail("loss_scale.growth_interval", ls.growth_interval, "must be >= 1")
    f = cfg.fp8
    if not f.enabled:
        return
    if cfg.zero.backend == "deepspeed":
        _fail(
            "fp8.enabled",
            True,
            "FP8 with zero.backend=deepspeed is not supported; use zero.backend=ddp or fsdp2",
        )
    if f.backend == "torchao":
        if f.recipe not in ("tensorwise", "rowwise"):
            _fail("fp8.recipe", f.recipe, "fp8.backend=torchao offers tensorwise | rowwise")
        if cfg.model.backend != "torch":
            _fail("fp8.backend", f.backend, "torchao swaps torch linears: model.backend=torch")
        if cfg.parallel.tp != 1:
            _fail(
                "fp8.backend",
                f.backend,
                "torchao FP8 with parallel.tp > 1 is not "
                "supported (it expects DTensor TP); use fp8.backend=te or tp=1",
            )
        if f.fsdp_float8_all_gather and (f.recipe != "tensorwise" or cfg.zero.backend != "fsdp2"):
            _fail(
                "fp8.fsdp_float8_all_gather",
                True,
                "needs zero.backend=fsdp2 and fp8.recipe=tensorwise",
            )
    else:
        if f.recipe == "rowwise":
            _fail(
                "fp8.recipe",
                f.recipe,
                "fp8.backend=te offers tensorwise | delayed | mxfp8 | "
                "blockwise (rowwise is torchao's)",
            )
        if cfg.model.backend != "te":
            _fail(
                "fp8.backend",
                f.backend,
                "FP8 through Transformer Engine needs "
                "model.backend=te (or use fp8.backend=torchao)",
            )
        if f.fsdp_float8_all_gather:
            _fail("fp8.fsdp_float8_all_gather", True, "is a torchao option (fp8.backend=torchao)")


def validate_zero(cfg: Config) -> None:
    """ZeRO backend and stage: ddp is stage 0; fsdp2 shards at stages 1-3 over dp (composed
    with tp as 2-D FSDP x TP), or as HSDP with ``zero.replicate`` > 1 (replicate must divide dp,
    which is known at launch: checked by ``ParallelGroups.hsdp_mesh``)."""
    z = cfg.zero
    if z.backend == "ddp" and z.stage != 0:
        _fail("zero.stage", z.stage, "zero.backend=ddp does not shard; use zero.backend=fsdp2")
    if z.backend == "fsdp2":
        if z.stage not in (1, 2, 3):
            _fail("zero.stage", z.stage, "zero.backend=fsdp2 needs zero.stage 1, 2 or 3")
    if z.replicate < 1:
        _fail("zero.replicate", z.replicate, "must be >= 1 (1 = no HSDP)")
    if z.replicate > 1 and z.backend != "fsdp2":
        _fail("zero.replicate", z.replicate, "HSDP (replicate > 1) needs zero.backend=fsdp2")
    if z.replicate > 1 and cfg.parallel.ep > 1:
        _fail(
            "zero.replicate",
            z.replicate,
            "HSDP with parallel.ep > 1 is not supported (both split the dp dimension)",
        )


# DeepSpeed config keys evoformer derives from its own settings (engine.deepspeed): a raw key
# under zero.deepspeed_config may not set them, or DeepSpeed and the trainer would disagree on
# the batch arithmetic, the clipping, the stage or the precision.
DEEPSPEED_OWNED_KEYS = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size / (dp * train.micro_batch_size)",
    "gradient_clipping": "optim.grad_clip",
    "zero_optimization.stage": "zero.stage",
    "zero_optimization.offload_optimizer.device": "zero.offload_optimizer",
    "zero_optimization.offload_param.device": "zero.offload_param",
    "bf16.enabled": "precision",
    "fp16.enabled": "precision",
    "optimizer": "optim.* (evoformer's AdamW is the client optimizer)",
    "scheduler": "optim.schedule (evoformer sets the learning rate every step)",
}


DEEPSPEED_ASYNC_REFUSED = (
    "config: checkpoint.async_save=true is not available with zero.backend=deepspeed (DeepSpeed "
    "writes its partitioned optimizer state itself, synchronously); set checkpoint.async_save="
    "false"
)


def validate_deepspeed(cfg: Config) -> None:
    """DeepSpeed's own limits (see engine.deepspeed)."""
    _validate_deepspeed(cfg)
    if cfg.zero.backend == "deepspeed" and cfg.checkpoint.async_save:
        raise UserError(DEEPSPEED_ASYNC_REFUSED)
    if cfg.zero.backend == "deepspeed" and cfg.zero.stage > 0 and cfg.train.spike_sigma > 0:
        _fail(
            "train.spike_sigma",
            cfg.train.spike_sigma,
            "skipping loss spikes needs zero.backend ddp/fsdp2 or DeepSpeed stage 0 (ZeRO 1-3 "
            "apply every finite step inside DeepSpeed)",
        )


def _validate_deepspeed(cfg: Config) -> None:
    """zero.backend=deepspeed: stages 0-3 over dp, with our TP as its mpu; no pipeline."""
    z = cfg.zero
    offload = ("none", "cpu", "nvme")
    for key in ("offload_optimizer", "offload_param"):
        if getattr(z, key) not in offload:
            _fail(f"zero.{key}", getattr(z, key), f"must be one of {', '.join(offload)}")
    if z.backend != "deepspeed":
        for key in ("offload_optimizer", "offload_param"):
            if getattr(z, key) != "none":
                _fail(f"zero.{key}", getattr(z, key), "offload needs zero.backend=deepspeed")
        return
    if z.stage not in (0, 1, 2, 3):
        _fail("zero.stage", z.stage, "zero.backend=deepspeed needs zero.stage 0, 1, 2 or 3")
    if cfg.parallel.pp != 1:
        _fail(
            "parallel.pp",
            cfg.parallel.pp,
            "zero.backend=deepspeed does not run with "
            "pipeline parallelism; use parallel.pp=1 or zero.backend=ddp/fsdp2",
        )
    if z.offload_param != "none" and z.stage != 3:
        _fail("zero.offload_param", z.offload_param, f"needs zero.stage=3 (got {z.stage})")
    if z.offload_optimizer != "none" and z.stage == 0:
        _fail("zero.offload_optimizer", z.offload_optimizer, "needs zero.stage 1, 2 or 3")
    if "nvme" in (z.offload_optimizer, z.offload_param) and not z.nvme_path:
        _fail("zero.nvme_path", z.nvme_path, "nvme offload needs a folder on an NVMe drive")
    if cfg.parallel.ep != 1:
        _fail(
            "parallel.ep",
            cfg.parallel.ep,
            "zero.backend=deepspeed does not run expert "
            "parallelism in this version; use zero.backend=ddp or fsdp2",
        )
    if cfg.fp8.enabled:
        _fail(
            "fp8.enabled",
            True,
            "FP8 with zero.backend=deepspeed is not available in this "
            "version; use zero.backend=ddp or fsdp2",
        )
    ls = cfg.loss_scale
    if cfg.precision == "fp16" and (ls.growth_factor != 2.0 or ls.backoff_factor != 0.5):
        _fail(
            "loss_scale.growth_factor",
            (ls.growth_factor, ls.backoff_factor),
            "DeepSpeed's loss scaler grows by 2 and backs off by 0.5 only",
        )
    raw = z.deepspeed_config
    if not isinstance(raw, dict):
        _fail("zero.deepspeed_config", raw, "must be a mapping of DeepSpeed keys")
    for dotted, ours in DEEPSPEED_OWNED_KEYS.items():
        d = raw
        for part in dotted.split("."):
            d = d.get(part) if isinstance(d, dict) else None
        if d is not None:
            _fail(
                f"zero.deepspeed_config.{dotted}",
                d,
                f"is set by evoformer from {ours}; set that instead",
            )


def validate_model(cfg: Config) -> None:
    m = cfg.model
    a = m.attention
    kv = m.kv_heads
    if a.head_dim is None and m.d_model % a.n_heads:
        _fail("model.attention.n_heads", a.n_heads, f"must divide model.d_model={m.d_model}")
    if kv <= 0 or a.n_heads % kv:
        _fail("model.attention.n_kv_heads", kv, f"must divide n_heads={a.n_heads}")
    if m.position.kind == "rope" and m.head_dim % 2:
        _fail("model.attention.head_dim", m.head_dim, "must be even for RoPE")
    if a.sliding_window is not None and a.sliding_window <= 0:
        _fail("model.attention.sliding_window", a.sliding_window, "must be > 0 (null = no window)")
    if a.global_every < 0 or a.global_every == 1:
        _fail(
            "model.attention.global_every",
            a.global_every,
            "must be 0 (every layer local) or >= 2 (1 would make every layer global)",
        )
    if a.global_every and a.sliding_window is None:
        _fail(
            "model.attention.global_every",
            a.global_every,
            "needs model.attention.sliding_window (the window of the local layers)",
        )
    if a.scale is not None and a.scale <= 0:
        _fail("model.attention.scale", a.scale, "must be > 0 (null = 1/sqrt(head_dim))")
    if a.kind == "mla" and m.position.kind == "alibi":
        _fail("model.position.kind", "alibi", "MLA carries its own decoupled RoPE")
    if a.kind == "mla" and a.qk_norm != "none":
        _fail("model.attention.qk_norm", a.qk_norm, "MLA normalises its latents instead")
    if a.kind == "mla" and a.sliding_window is not None:
        _fail("model.attention.sliding_window", a.sliding_window, "MLA has no sliding window")
    if a.kind == "mla" and a.sinks:
        _fail("model.attention.sinks", True, "MLA has no attention sinks (mha only)")
    if m.mlp.kind == "clamped_swiglu" and m.mlp.swiglu_limit <= 0:
        _fail("model.mlp.swiglu_limit", m.mlp.swiglu_limit, "must be > 0")
    p = m.position
    if p.partial_rotary != 1.0:
        rot = int(m.head_dim * p.partial_rotary) if a.kind != "mla" else 0
        if a.kind == "mla" or p.kind != "rope" or not 0 < p.partial_rotary <= 1 or rot % 2:
            _fail(
                "model.position.partial_rotary",
                p.partial_rotary,
                "needs rope, mha attention, a share in (0, 1] and an even number of rotated dims",
            )
    if p.local_rope_theta is not None:
        if p.kind != "rope":
            _fail("model.position.local_rope_theta", p.local_rope_theta, "needs position.kind=rope")
        if p.local_rope_theta <= 0:
            _fail("model.position.local_rope_theta", p.local_rope_theta, "must be > 0")
    if p.nope_layers:
        if p.kind != "rope":
            _fail("model.position.nope_layers", p.nope_layers, "needs position.kind=rope")
        bad = [i for i in p.nope_layers if not 0 <= i < m.n_layers]
        if bad or len(set(p.nope_layers)) != len(p.nope_layers):
            _fail(
                "model.position.nope_layers",
                p.nope_layers,
                f"must be distinct layer indices in [0, {m.n_layers})",
            )
    if p.kind == "rope" and p.rope_theta <= 0:
        _fail("model.position.rope_theta", p.rope_theta, "must be > 0")
    if p.kind == "rope" and p.rope_scaling.kind != "none" and p.rope_scaling.factor <= 0:
        _fail("model.position.rope_scaling.factor", p.rope_scaling.factor, "must be > 0")
    if m.norm.unit_offset and m.norm.kind != "rmsnorm":
        _fail("model.norm.unit_offset", True, "only RMSNorm has a unit offset")
    if m.loss_chunk < 0:
        _fail("model.loss_chunk", m.loss_chunk, "must be >= 0 (0 = the plain, unchunked loss)")
    if m.parallel_block and m.norm.placement != "pre":
        _fail(
            "model.parallel_block",
            True,
            f"a parallel block has one pre-norm (model.norm.placement={m.norm.placement})",
        )
    validate_moe(cfg)
    validate_hybrid(cfg)


def validate_hybrid(cfg: Config) -> None:
    """The per-block patterns (``model.mixer_pattern``, ``model.mlp_pattern``) and the mixers
    they use; the per-layer plan (``model.layout``) trusts them once they pass here."""
    m = cfg.model
    for key, letters in (("mixer_pattern", "AGM-"), ("mlp_pattern", "DE-")):
        pat = getattr(m, key)
        if not pat:
            continue
        if set(pat) - set(letters):
            _fail(f"model.{key}", pat, f"letters must be from {letters!r}")
        if m.n_layers % len(pat):
            _fail(f"model.{key}", pat, f"its length must divide model.n_layers={m.n_layers}")
    if "E" in m.mlp_pattern and m.moe.num_experts <= 0:
        _fail("model.mlp_pattern", m.mlp_pattern, "E (MoE) needs model.moe.num_experts > 0")
    if (m.mixer_pattern or m.mlp_pattern) and m.norm.placement != "pre":
        _fail("model.norm.placement", m.norm.placement, "hybrid blocks are pre-norm")
    if (m.mixer_pattern or m.mlp_pattern) and (m.parallel_block or m.mtp.depth):
        _fail("model.mixer_pattern", m.mixer_pattern, "not with parallel_block or MTP")
    d, mb = m.deltanet, m.mamba
    if "G" in m.mixer_pattern:
        for key in ("n_heads", "n_key_heads", "key_head_dim", "value_head_dim", "conv_kernel"):
            if getattr(d, key) <= 0:
                _fail(f"model.deltanet.{key}", getattr(d, key), "must be > 0")
        if d.n_heads % d.n_key_heads:
            _fail("model.deltanet.n_key_heads", d.n_key_heads, f"must divide n_heads={d.n_heads}")
        if d.chunk_size <= 0:
            _fail("model.deltanet.chunk_size", d.chunk_size, "must be > 0")
    if "M" in m.mixer_pattern:
        for key in ("n_heads", "head_dim", "state_dim", "n_groups", "conv_kernel", "chunk_size"):
            if getattr(mb, key) <= 0:
                _fail(f"model.mamba.{key}", getattr(mb, key), "must be > 0")
        if mb.n_heads % mb.n_groups:
            _fail("model.mamba.n_groups", mb.n_groups, f"must divide n_heads={mb.n_heads}")
    if m.attention.output_gate and (m.attention.kind == "mla" or m.attention.qk_norm == "full"):
        _fail("model.attention.output_gate", True, "needs attention.kind=mha, qk_norm none|head")
    if cfg.data.document_masking and set(m.mixer_pattern) & set("GM"):
        _fail(
            "data.document_masking",
            True,
            "Gated DeltaNet / Mamba-2 layers carry state across document boundaries",
        )


def validate_moe(cfg: Config) -> None:
    """Routing settings a user can mistype; the MoE layer trusts them once they pass here."""
    m = cfg.model
    moe = m.moe
    if moe.num_experts < 0:
        _fail("model.moe.num_experts", moe.num_experts, "must be >= 0 (0 = dense model)")
    if moe.num_experts == 0:
        return
    E = moe.num_experts
    if not m.mlp.gated:
        _fail("model.mlp.kind", m.mlp.kind, "MoE experts are gated: use swiglu or geglu")
    if moe.n_groups < 1 or E % moe.n_groups:
        _fail("model.moe.n_groups", moe.n_groups, f"must divide model.moe.num_experts={E}")
    if not 1 <= moe.topk_groups <= moe.n_groups:
        _fail("model.moe.topk_groups", moe.topk_groups, f"must be in [1, n_groups={moe.n_groups}]")
    reachable = moe.topk_groups * (E // moe.n_groups)
    if not 1 <= moe.top_k <= reachable:
        _fail(
            "model.moe.top_k",
            moe.top_k,
            f"must be in [1, {reachable}] (the experts a token may reach: topk_groups x "
            "num_experts / n_groups)",
        )
    for key in ("num_shared_experts", "expert_hidden", "shared_hidden", "first_k_dense"):
        if getattr(moe, key) < 0:
            _fail(f"model.moe.{key}", getattr(moe, key), "must be >= 0")
    if moe.layer_freq < 1:
        _fail("model.moe.layer_freq", moe.layer_freq, "must be >= 1")
    for key in ("aux_loss_coef", "bias_update_rate", "capacity_factor"):
        if getattr(moe, key) < 0:
            _fail(f"model.moe.{key}", getattr(moe, key), "must be >= 0 (0 = off)")
    if moe.routed_scaling <= 0:
        _fail("model.moe.routed_scaling", moe.routed_scaling, "must be > 0")


def _not_yet(cfg: Config) -> None:
    """Settings that are part of the contract but whose engines have not landed yet."""
    later = {}
    for key, (bad, what) in later.items():
        if bad:
            _fail(key, get(cfg, key), f"{what} is not available in this version yet")
