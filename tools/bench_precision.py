"""Precision on a GPU: loss tracking of bf16 / fp16 / FP8 against fp32, and step throughput.

    python tools/bench_precision.py track            # tiny LLaMA, 100 steps, default corpus
    python tools/bench_precision.py speed [--compile] # ~700M LLaMA-style, seq 2048, synthetic

``track`` prints the max / mean relative per-step loss difference of bf16 and fp16 against
fp32 and of torchao FP8 (tensorwise, rowwise) against bf16. ``speed`` prints the median
tokens/s over the late steps and the MFU against the H100 SXM bf16 peak (989 TFLOP/s), with
FLOPs per token = 6 x (parameters without the embedding table) + causal attention counted once
(6 x layers x seq x d_model). ``--compile`` sets ``train.compile=true``, which compiles every
transformer block (torchao's FP8 casts are only fused under torch.compile; eager FP8 is slower
than bf16).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from evoformer.config import load_config
from evoformer.engine import Trainer

REPO = Path(__file__).resolve().parent.parent
PEAK_BF16 = 989e12
TORCHAO = ["precision=bf16", "fp8.enabled=true", "fp8.backend=torchao"]
SPEED_MODEL = [
    "model.vocab_size=32768",
    "model.d_model=2048",
    "model.n_layers=12",
    "model.attention.n_heads=16",
    "model.attention.n_kv_heads=8",
    "model.mlp.hidden=5632",
    "model.max_seq_len=2048",
    "data.source=synthetic",
    "train.seq_len=2048",
    "train.global_batch_size=8",
    "train.micro_batch_size=4",
    "optim.warmup_steps=5",
]


def run(name: str, overrides: list[str], steps: int, out: Path, compile_blocks: bool = False):
    cfg = load_config(
        [str(REPO / "configs/models/tiny/llama.yaml")],
        [
            "train.log_every=1",
            "run.progress=off",
            "checkpoint.save_final=false",
            f"train.max_steps={steps}",
            f"run.output_dir={out / name}",
            f"train.compile={str(compile_blocks).lower()}",
            *overrides,
        ],
    )
    trainer = Trainer(cfg)
    losses = trainer.train().losses
    rows = [json.loads(line) for line in open(out / name / "metrics.jsonl") if '"loss"' in line]
    return trainer, losses, rows


def rel(got: dict[int, float], want: dict[int, float]) -> tuple[float, float]:
    r = [abs(got[s] - want[s]) / abs(want[s]) for s in want]
    return max(r), sum(r) / len(r)


def track(out: Path) -> None:
    common = [
        "data.source=default",
        "data.tokenizer_vocab_size=512",
        "model.n_layers=4",
        "train.seq_len=128",
        "train.global_batch_size=16",
        "train.micro_batch_size=16",
        "optim.warmup_steps=10",
        "optim.lr=3e-3",
    ]
    runs = {
        "fp32": [],
        "bf16": ["precision=bf16"],
        "fp16": ["precision=fp16"],
        "fp8_tensorwise": TORCHAO,
        "fp8_rowwise": [*TORCHAO, "fp8.recipe=rowwise"],
    }
    losses = {name: run(name, common + ov, 100, out)[1] for name, ov in runs.items()}
    for name, ref in [
        ("bf16", "fp32"),
        ("fp16", "fp32"),
        ("fp8_tensorwise", "bf16"),
        ("fp8_rowwise", "bf16"),
    ]:
        mx, mean = rel(losses[name], losses[ref])
        print(f"{name} vs {ref}, 100 steps: max {mx:.1e}, mean {mean:.1e}")


def speed(out: Path, compile_blocks: bool) -> None:
    runs = {
        "bf16": ["precision=bf16"],
        "fp8_tensorwise": [*TORCHAO, "fp8.keep_first_last=false"],
        "fp8_tensorwise_keep_first_last": TORCHAO,
        "fp8_rowwise": [*TORCHAO, "fp8.recipe=rowwise", "fp8.keep_first_last=false"],
    }
    for name, ov in runs.items():
        trainer, _, rows = run(name, SPEED_MODEL + ov, 30, out, compile_blocks)
        tps = sorted(r["tokens_per_s"] for r in rows[15:])[len(rows[15:]) // 2]
        m = trainer.model.cfg
        n = trainer._global_params() - trainer.model.embed.weight.numel()
        flops = 6 * n + 6 * m.n_layers * trainer.cfg.train.seq_len * m.d_model
        print(f"{name}: {tps:,.0f} tok/s, MFU {tps * flops / PEAK_BF16:.1%} (bf16 peak)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("track", "speed"))
    ap.add_argument("--compile", action="store_true", help="torch.compile every block")
    ap.add_argument("--out", default=f"/tmp/evoformer-bench-precision-{int(time.time())}")
    args = ap.parse_args()
    out = Path(args.out)
    if args.mode == "track":
        track(out)
    else:
        speed(out, args.compile)


if __name__ == "__main__":
    main()
