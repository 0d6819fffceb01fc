"""KV cache and FLOPs per token across attention kinds: the tables in docs/architectures.md.

Every number comes from :mod:`evoformer.model.costs` (analytic, nothing allocated) applied to
the presets in configs/models/ and to one 7B shape (Llama 2 7B) with only its attention swapped.

    python tools/arch_table.py            # print the tables (markdown)
    python tools/arch_table.py --write    # refresh them in docs/architectures.md
    python tools/arch_table.py --check    # exit 1 when docs/architectures.md is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from evoformer.config import load_config  # noqa: E402
from evoformer.config.schema import ModelConfig  # noqa: E402
from evoformer.model.costs import (  # noqa: E402
    count_params,
    flops_per_token,
    kv_cache_bytes_per_token,
)
from evoformer.planning.describe import layer_summary  # noqa: E402

DOC = REPO / "docs/architectures.md"
BEGIN, END = "<!-- arch_table:begin -->", "<!-- arch_table:end -->"
CONTEXT = 32_768  # long-context length of the KV and inference columns
TRAIN_SEQ = 4_096  # training sequence length of the FLOPs column

PRESETS = [
    "llama2-7b",
    "llama3-8b",
    "mistral-7b",
    "qwen3-8b",
    "olmo2-7b",
    "olmo3-7b",
    "smollm3-3b",
    "phi4-14b",
    "gemma3-27b",
    "llama3.1-405b",
    "mixtral-8x7b",
    "qwen3-235b-a22b",
    "deepseek-v2-lite",
    "deepseek-v2-236b",
    "deepseek-v3-671b",
    "kimi-k2-1t",
    "gpt-oss-20b",
    "gpt-oss-120b",
    "glm4.5-air-106b",
    "glm4.5-355b",
    "minimax-m2-230b",
    "qwen3-next-80b-a3b",
    "nemotron-h-8b",
]

# One 7B shape (Llama 2 7B: d 4096, 32 layers, 32 query heads of 128) with only the attention
# swapped; MLA takes DeepSeek-V2-Lite's per-head dims (no q low-rank, latent 512, RoPE key 64).
# Fewer KV heads free parameters; the MLP is widened to spend them again (as Llama 2 70B and
# Mistral did), so every variant has the same total size within 0.1 %.
SYNTHETIC = [
    ("MHA (32 KV heads)", []),
    ("GQA-8", ["model.attention.n_kv_heads=8"]),
    ("MQA (1 KV head)", ["model.attention.n_kv_heads=1"]),
    (
        "MLA (latent 512 + RoPE 64)",
        [
            "model.attention.kind=mla",
            "model.attention.q_lora_rank=0",
            "model.attention.kv_lora_rank=512",
            "model.attention.qk_nope_head_dim=128",
            "model.attention.qk_rope_head_dim=64",
            "model.attention.v_head_dim=128",
        ],
    ),
    (
        "GQA-8 + window 4096 (all layers)",
        [
            "model.attention.n_kv_heads=8",
            "model.attention.sliding_window=4096",
        ],
    ),
    (
        "GQA-8 + 5:1 local:global, window 1024",
        [
            "model.attention.n_kv_heads=8",
            "model.attention.sliding_window=1024",
            "model.attention.global_every=6",
        ],
    ),
]


def _load(name: str, overrides: list[str] = ()) -> ModelConfig:
    return load_config([str(REPO / f"configs/models/{name}.yaml")], list(overrides)).model


def equal_size(overrides: list[str]) -> ModelConfig:
    """The 7B shape with ``overrides``, its MLP widened (multiple of 64) to the MHA total."""
    target = count_params(_load("llama2-7b"))["total"]
    cfg = _load("llama2-7b", overrides)
    per_unit = 3 * cfg.d_model * cfg.n_layers  # SwiGLU: three d x hidden matrices per layer
    extra = round((target - count_params(cfg)["total"]) / per_unit / 64) * 64
    return _load("llama2-7b", [*overrides, f"model.mlp.hidden={cfg.mlp.hidden + extra}"])


def _b(n: float) -> str:
    return f"{n / 1e9:,.2f}B" if n < 100e9 else f"{n / 1e9:,.0f}B"


def _kib(n: float) -> str:
    return f"{n / 2**10:,.1f} KiB"


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def _gflop(x: float) -> str:
    return f"{x / 1e9:,.1f}"


def row(label: str, cfg: ModelConfig, mha_bytes: float | None = None) -> str:
    p = count_params(cfg)
    kv = kv_cache_bytes_per_token(cfg, dtype_bytes=2, context_len=CONTEXT)
    train = flops_per_token(cfg, TRAIN_SEQ)
    long = flops_per_token(cfg, CONTEXT)
    params = (
        _b(p["total"]) if p["active"] == p["total"] else f"{_b(p['total'])} / {_b(p['active'])}"
    )
    cells = [
        label,
        layer_summary(cfg).split(" (", 1)[1].rstrip(")"),
        params,
        _kib(kv["per_token"]),
        _gib(kv["at_context"]),
    ]
    if mha_bytes is not None:
        cells.append(f"{kv['at_context'] / mha_bytes:.3f}")
    cells += [
        _gflop(train["training"]),
        _gflop(long["inference"]),
        f"{100 * long['attention'] / long['inference']:.0f} %",
    ]
    return "| " + " | ".join(cells) + " |"


def tables() -> str:
    head = (
        "| {first} | layers / attention | params (total / active) | KV per token | "
        f"KV at {CONTEXT // 1024}k{{ratio}} | train GFLOP/token @{TRAIN_SEQ // 1024}k | "
        f"forward GFLOP/token @{CONTEXT // 1024}k | attention share @{CONTEXT // 1024}k |"
    )
    out = [
        head.format(first="preset", ratio=""),
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    out += [row(f"`{name}`", _load(name)) for name in PRESETS]
    out += ["", head.format(first="7B shape (Llama 2 7B)", ratio=" | vs MHA")]
    out.append("|---|---|---|---:|---:|---:|---:|---:|---:|")
    mha = kv_cache_bytes_per_token(_load("llama2-7b"), context_len=CONTEXT)["at_context"]
    for label, overrides in SYNTHETIC:
        cfg = equal_size(overrides)
        out.append(row(f"{label}, MLP {cfg.mlp.hidden}", cfg, mha))
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="refresh docs/architectures.md")
    mode.add_argument("--check", action="store_true", help="exit 1 if the doc is stale")
    args = ap.parse_args()
    text = tables()
    if not (args.write or args.check):
        print(text)
        return 0
    doc = DOC.read_text()
    before, rest = doc.split(BEGIN, 1)
    _, after = rest.split(END, 1)
    new = f"{before}{BEGIN}\n{text}\n{END}{after}"
    if args.check:
        if new != doc:
            print(f"{DOC} is stale: run python tools/arch_table.py --write", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
