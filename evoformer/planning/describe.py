"""`evoformer inspect`: the table of a config's parameters, FLOPs per token, KV cache and
one-process memory. The numbers come from :mod:`evoformer.model.costs` (analytic) and
:mod:`evoformer.planning.memory` (the estimator); this module only formats them."""

from __future__ import annotations

import dataclasses

from evoformer.config.schema import Config, ModelConfig
from evoformer.model.costs import count_params, flops_per_token, kv_cache_bytes_per_token
from evoformer.model.layout import layer_spec
from evoformer.planning.memory import estimate


def _count(n: float) -> str:
    """8,030,261,248 -> "8,030,261,248 (8.03B)", the way model sizes are quoted."""
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n:,.0f}  ({n / div:.2f}{suffix})"
    return f"{n:,.0f}"


def _flops(x: float) -> str:
    for div, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x:,.0f}  ({x / div:.2f} {prefix}FLOP)"
    return f"{x:,.0f}  FLOP"


def _bytes(n: float) -> str:
    for div, name in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n:,.0f} B  ({n / div:.2f} {name})"
    return f"{n:,.0f} B"


def layer_summary(cfg: ModelConfig) -> str:
    """e.g. "61 (3 dense + 58 MoE), attention mla" or "62 (52 local window 1024 + 10 global)"."""
    n = cfg.n_layers
    parts = []
    specs = [layer_spec(cfg, i) for i in range(n)]
    mixers = {
        "deltanet": "DeltaNet",
        "mamba2": "Mamba-2",
        "attention": "attention",
        "none": "MLP-only",
    }
    if any(s.mixer != "attention" for s in specs):  # a hybrid: say what mixes each block
        counts = [(sum(s.mixer == k for s in specs), name) for k, name in mixers.items()]
        parts.append(" + ".join(f"{c} {name}" for c, name in counts if c))
        if no_mlp := sum(s.mlp == "none" for s in specs):
            parts.append(f"{no_mlp} without MLP")
    moe = sum(s.mlp == "moe" for s in specs)
    if moe:
        parts.append(f"{n - moe} dense + {moe} MoE" if moe < n else f"{n} MoE")
    local = sum(layer_spec(cfg, i).is_local for i in range(n))
    if local:
        w = cfg.attention.sliding_window
        parts.append(f"{local} window {w} + {n - local} global" if local < n else f"window {w}")
    a = cfg.attention
    kind = (
        "mla"
        if a.kind == "mla"
        else {a.n_heads: "mha", 1: "mqa"}.get(cfg.kv_heads, f"gqa-{a.n_kv_heads}")
    )
    return f"{n} ({', '.join(parts + [kind])})"


def _one_process(cfg: Config) -> Config:
    parallel = dataclasses.replace(cfg.parallel, tp=1, pp=1, ep=1, cp=1)
    return dataclasses.replace(cfg, parallel=parallel)


def describe(cfg: Config) -> str:
    """The table `evoformer inspect` prints: parameters, FLOPs per token, KV cache."""
    m, T = cfg.model, cfg.train.seq_len
    p = count_params(m)
    f = flops_per_token(m, T)
    kv = kv_cache_bytes_per_token(m, dtype_bytes=2)
    rows = [
        ("layers", layer_summary(m)),
        ("params total", _count(p["total"])),
        ("params active / token", _count(p["active"])),
        ("params non-embedding", _count(p["non_embedding"])),
    ]
    if p["mtp"]:
        rows.append(("params MTP (extra)", _count(p["mtp"])))
    rows += [
        (f"FLOPs/token training (seq {T})", _flops(f["training"])),
        (f"FLOPs/token inference (seq {T})", _flops(f["inference"])),
        ("  of which attention", _flops(f["attention"])),
        ("KV cache / token (bf16)", _bytes(kv["per_token"])),
        (f"KV cache at {kv['context_len']} tokens", _bytes(kv["at_context"])),
    ]
    if kv["window_layers"]:
        rows.append(("", f"({kv['window_layers']} layers capped at window {kv['window']})"))
    if kv["recurrent_layers"]:
        # DeltaNet / Mamba-2 layers: a fixed-size state instead of a growing cache.
        rows.append(
            (
                f"recurrent state ({kv['recurrent_layers']} layers)",
                _bytes(kv["state"]) + " at any length (in the total above)",
            )
        )
    # One process (tp = pp = dp = 1); `evoformer plan --gpus N` estimates a layout.
    mem = estimate(_one_process(cfg), 1).stages[0]
    mb = cfg.train.micro_batch_size
    rows += [
        ("memory params + grads", _bytes(mem.params + mem.grads)),
        ("memory optimizer (AdamW)", _bytes(mem.optim)),
        (f"memory activations ({mb}x{T})", _bytes(mem.activations)),
    ]
    width = max(len(k) for k, _ in rows)
    head = f"parameters: {p['total']:,} total, {p['non_embedding']:,} non-embedding"
    return "\n".join([head] + [f"{k:<{width}}  {v}" for k, v in rows])
