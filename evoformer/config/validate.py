"""Checks on a whole Config that types alone cannot express; one UserError per mistake."""

from __future__ import annotations

from evoformer.config.schema import Config
from evoformer.errors import UserError

CHOICES = {
    "model.norm.kind": ("layernorm", "rmsnorm"),
    "model.norm.placement": ("pre", "post", "reordered", "sandwich"),
    "model.position.kind": ("rope", "learned", "alibi", "none"),
    "model.position.rope_scaling.kind": ("none", "linear", "llama3", "yarn"),
    "model.attention.kind": ("mha", "mla"),
    "model.attention.qk_norm": ("none", "head", "full"),
    "model.mlp.kind": ("gelu", "swiglu", "geglu"),
    "model.moe.score": ("softmax", "sigmoid"),
    "model.mlp.activation": ("default", "gelu", "gelu_tanh", "silu"),
    "model.backend": ("torch", "te"),
    "data.source": ("default", "files", "synthetic"),
    "optim.schedule": ("cosine", "wsd", "constant"),
    "parallel.pp_schedule": ("gpipe", "1f1b", "interleaved", "zero_bubble"),
    "zero.backend": ("ddp", "fsdp2", "deepspeed"),
    "precision": ("fp32", "bf16", "fp16"),
    "fp8.backend": ("te", "torchao"),
    "activation_checkpointing": ("none", "full", "selective"),
    "checkpoint.load": None,  # free text, checked elsewhere
    "run.device": ("auto", "cpu", "cuda"),
    "run.progress": ("auto", "on", "off"),
}

POSITIVE = (
    "model.vocab_size", "model.d_model", "model.n_layers", "model.max_seq_len",
    "model.attention.n_heads", "model.mlp.hidden", "data.tokenizer_vocab_size",
    "train.max_steps", "train.global_batch_size", "train.micro_batch_size", "train.seq_len",
    "train.eval_batches", "train.log_every", "parallel.tp", "parallel.pp", "parallel.ep",
    "activation_checkpointing_every",
)  # fmt: skip

NON_NEGATIVE = (
    "train.eval_every", "checkpoint.save_every", "checkpoint.keep_last", "optim.warmup_steps",
    "optim.lr", "optim.weight_decay", "optim.grad_clip", "run.threads", "zero.stage",
)  # fmt: skip


def get(cfg: object, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _fail(key: str, value, why: str) -> None:
    raise UserError(f"config: {key}={value!r}: {why}")


def validate(cfg: Config) -> None:
    """Raise UserError on the first impossible setting."""
    # YAML reads on/off as booleans; accept both spellings for the progress switch.
    progress = str(cfg.run.progress).lower()
    cfg.run.progress = {"true": "on", "false": "off"}.get(progress, progress)
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
            "train.global_batch_size", t.global_batch_size,
            f"must be a multiple of train.micro_batch_size={t.micro_batch_size}",
        )  # fmt: skip
    if t.seq_len > cfg.model.max_seq_len:
        _fail("train.seq_len", t.seq_len, f"exceeds model.max_seq_len={cfg.model.max_seq_len}")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        _fail("data.val_fraction", cfg.data.val_fraction, "must be in [0, 1)")
    if cfg.data.source == "files" and not cfg.data.paths:
        _fail("data.paths", cfg.data.paths, "data.source=files needs at least one path")
    if not 0.0 <= cfg.optim.min_lr_ratio <= 1.0:
        _fail("optim.min_lr_ratio", cfg.optim.min_lr_ratio, "must be in [0, 1]")
    if not 0.0 < cfg.optim.decay_fraction <= 1.0:
        _fail("optim.decay_fraction", cfg.optim.decay_fraction, "must be in (0, 1]")
    validate_parallel(cfg)
    validate_zero(cfg)
    _not_yet(cfg)


def validate_zero(cfg: Config) -> None:
    """ZeRO backend and stage: ddp is stage 0; fsdp2 shards at stages 1-3, over dp only."""
    z = cfg.zero
    if z.backend == "ddp" and z.stage != 0:
        _fail("zero.stage", z.stage, "zero.backend=ddp does not shard; use zero.backend=fsdp2")
    if z.backend == "fsdp2":
        if z.stage not in (1, 2, 3):
            _fail("zero.stage", z.stage, "zero.backend=fsdp2 needs zero.stage 1, 2 or 3")
        if cfg.parallel.tp != 1:
            _fail("parallel.tp", cfg.parallel.tp, "zero.backend=fsdp2 with tp > 1 (2-D FSDP x TP) "
                  "is not available in this version yet")  # fmt: skip
        if cfg.precision != "fp32":
            _fail("precision", cfg.precision, "zero.backend=fsdp2 runs fp32 only in this version "
                  "(bf16 mixed-precision policy not available yet)")  # fmt: skip


def validate_model(cfg: Config) -> None:
    m = cfg.model
    a = m.attention
    kv = a.n_kv_heads or a.n_heads
    if a.head_dim is None and m.d_model % a.n_heads:
        _fail("model.attention.n_heads", a.n_heads, f"must divide model.d_model={m.d_model}")
    if kv <= 0 or a.n_heads % kv:
        _fail("model.attention.n_kv_heads", kv, f"must divide n_heads={a.n_heads}")
    head_dim = a.head_dim or m.d_model // a.n_heads
    if m.position.kind == "rope" and head_dim % 2:
        _fail("model.attention.head_dim", head_dim, "must be even for RoPE")
    if a.sliding_window is not None and a.sliding_window <= 0:
        _fail("model.attention.sliding_window", a.sliding_window, "must be > 0 (null = no window)")
    if a.global_every < 0 or a.global_every == 1:
        _fail(
            "model.attention.global_every", a.global_every,
            "must be 0 (every layer local) or >= 2 (1 would make every layer global)",
        )  # fmt: skip
    if a.global_every and a.sliding_window is None:
        _fail(
            "model.attention.global_every", a.global_every,
            "needs model.attention.sliding_window (the window of the local layers)",
        )  # fmt: skip
    if a.scale is not None and a.scale <= 0:
        _fail("model.attention.scale", a.scale, "must be > 0 (null = 1/sqrt(head_dim))")
    if a.kind == "mla" and m.position.kind == "alibi":
        _fail("model.position.kind", "alibi", "MLA carries its own decoupled RoPE")
    if a.kind == "mla" and a.qk_norm != "none":
        _fail("model.attention.qk_norm", a.qk_norm, "MLA normalises its latents instead")
    if a.kind == "mla" and a.sliding_window is not None:
        _fail("model.attention.sliding_window", a.sliding_window, "MLA has no sliding window")
    p = m.position
    if p.local_rope_theta is not None:
        if p.kind != "rope":
            _fail("model.position.local_rope_theta", p.local_rope_theta, "needs position.kind=rope")
        if p.local_rope_theta <= 0:
            _fail("model.position.local_rope_theta", p.local_rope_theta, "must be > 0")
    if p.kind == "rope" and p.rope_theta <= 0:
        _fail("model.position.rope_theta", p.rope_theta, "must be > 0")
    if p.kind == "rope" and p.rope_scaling.kind != "none" and p.rope_scaling.factor <= 0:
        _fail("model.position.rope_scaling.factor", p.rope_scaling.factor, "must be > 0")
    if m.norm.unit_offset and m.norm.kind != "rmsnorm":
        _fail("model.norm.unit_offset", True, "only RMSNorm has a unit offset")
    if m.parallel_block and m.norm.placement != "pre":
        _fail(
            "model.parallel_block", True,
            f"a parallel block has one pre-norm (model.norm.placement={m.norm.placement})",
        )  # fmt: skip


def validate_parallel(cfg: Config) -> None:
    """Layouts the model cannot be split into (the world size is checked by ParallelDims at
    launch: it must be a multiple of tp). ``parallel.sequence_parallel`` with tp = 1 is a no-op,
    so recipes may keep it on while tp is overridden."""
    tp, m = cfg.parallel.tp, cfg.model
    if tp == 1:
        return
    a = m.attention
    kv = a.n_kv_heads or a.n_heads
    why = f"must be divisible by parallel.tp={tp}"
    if a.n_heads % tp:
        _fail("model.attention.n_heads", a.n_heads, why + " (heads are split over TP)")
    if a.kind != "mla" and kv % tp and tp % kv:
        _fail(
            "model.attention.n_kv_heads", kv,
            f"must divide or be divisible by parallel.tp={tp} (KV heads are split, or "
            "replicated when fewer than tp)",
        )  # fmt: skip
    dense = m.moe.num_experts <= 0 or m.moe.first_k_dense > 0 or m.moe.layer_freq > 1
    if dense and m.mlp.hidden % tp:
        _fail("model.mlp.hidden", m.mlp.hidden, why)
    if m.moe.num_experts > 0:
        expert = m.moe.expert_hidden or m.mlp.hidden
        if expert % tp:
            _fail("model.moe.expert_hidden", expert, why)
        shared = m.moe.shared_hidden or m.moe.num_shared_experts * expert
        if shared % tp:
            _fail("model.moe.shared_hidden", shared, why)
    if cfg.parallel.sequence_parallel and cfg.train.seq_len % tp:
        _fail(
            "train.seq_len", cfg.train.seq_len,
            f"{why} with parallel.sequence_parallel (the sequence is split over TP)",
        )  # fmt: skip


def _not_yet(cfg: Config) -> None:
    """Settings that are part of the contract but whose engines have not landed yet."""
    later = {
        "parallel.pp": (cfg.parallel.pp != 1, "pipeline parallelism"),
        "parallel.ep": (cfg.parallel.ep != 1, "expert parallelism"),
        "zero.backend": (cfg.zero.backend == "deepspeed", "the DeepSpeed backend"),
        "precision": (cfg.precision == "fp16", "fp16 with loss scaling"),
        "fp8.enabled": (cfg.fp8.enabled, "FP8 training"),
    }
    for key, (bad, what) in later.items():
        if bad:
            _fail(key, get(cfg, key), f"{what} is not available in this version yet")
