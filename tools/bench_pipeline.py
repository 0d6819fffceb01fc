"""Pipeline schedules on CPU: throughput and measured bubble against one process.

Trains the same small LLaMA-style model on one process (one thread) and on pp=2 ranks (one
thread each, gloo) under every schedule, and prints a markdown table: tokens/s, speed-up over
one process, the measured idle fraction ``1 - speedup / pp`` (bubble plus communication and
stage imbalance), and the textbook bubble ``(p-1)/(m+p-1)`` (interleaved: ``(p-1)/(v*m+p-1)``).

    python tools/bench_pipeline.py                      # 8 layers, d 256, 8 micro-batches
    python tools/bench_pipeline.py --micro-batches 4 --steps 6
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from evoformer.config import load_config
from evoformer.distributed.testing import run_distributed
from evoformer.engine import Trainer

REPO = Path(__file__).resolve().parent.parent
SCHEDULES = ["gpipe", "1f1b", "interleaved", "zero_bubble", "zbv"]
VIRTUAL = {"gpipe": 1, "1f1b": 1, "interleaved": 2, "zero_bubble": 2, "zbv": 2}


def _overrides(args, out: str) -> list[str]:
    return [
        "data.source=synthetic",
        f"train.seq_len={args.seq_len}",
        f"train.micro_batch_size={args.micro_batch}",
        f"train.global_batch_size={args.micro_batch * args.micro_batches}",
        f"train.max_steps={args.steps}",
        "train.log_every=1",
        "run.progress=off",
        "checkpoint.save_final=false",
        f"model.n_layers={args.layers}",
        f"model.d_model={args.d_model}",
        f"model.mlp.hidden={args.d_model * 8 // 3 // 8 * 8}",
        "model.vocab_size=4096",
        "model.attention.n_heads=4",
        "model.attention.n_kv_heads=2",
        "run.threads=1",
        "run.device=cpu",
        f"run.output_dir={out}",
    ]


def _tokens_per_s(out: str) -> float:
    """Best tokens/s of the steps after the first (warm-up): on a shared machine the fastest
    step is the one least disturbed by other processes."""
    lines = [json.loads(x) for x in open(f"{out}/metrics.jsonl") if x.strip()]
    return max(x["tokens_per_s"] for x in lines if "tokens_per_s" in x and x["step"] > 1)


def _run(rank: int, world: int, args, out: str, extra: list[str]) -> float | None:
    torch.set_num_threads(1)
    cfg = load_config([str(REPO / "configs/models/tiny/llama.yaml")], _overrides(args, out) + extra)
    Trainer(cfg).train()
    return _tokens_per_s(out) if rank == 0 else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--micro-batches", type=int, default=8, help="per step (m)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--schedules", nargs="*", default=SCHEDULES)
    args = ap.parse_args()
    p, m = 2, args.micro_batches
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        one = run_distributed(_run, 1, args, f"{tmp}/one", [], timeout=1800)[0]
        rows = [("one process", one, 1.0, "-", "-")]
        for name in args.schedules:
            extra = ["parallel.pp=2", f"parallel.pp_schedule={name}"]
            rate = run_distributed(_run, p, args, f"{tmp}/{name}", extra, timeout=1800)[0]
            v = VIRTUAL[name]
            theory = (p - 1) / (v * m + p - 1)
            speedup = rate / one
            rows.append((f"pp=2 {name}", rate, speedup, f"{1 - speedup / p:.0%}", f"{theory:.0%}"))
    print(
        f"\n{args.layers} layers, d {args.d_model}, seq {args.seq_len}, micro-batch "
        f"{args.micro_batch}, m={m} micro-batches/step, {args.steps} steps, 1 thread/rank "
        f"({time.time() - t0:.0f} s)\n"
    )
    print("| run | tokens/s | speed-up | measured idle | textbook bubble |")
    print("|---|---:|---:|---:|---:|")
    for label, rate, speedup, idle, theory in rows:
        print(f"| {label} | {rate:,.0f} | {speedup:.2f}x | {idle} | {theory} |")


if __name__ == "__main__":
    main()
