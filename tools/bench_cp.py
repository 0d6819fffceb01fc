"""Context parallelism on CPU: activation bytes per rank, tokens/s and ring traffic vs cp.

Trains the CPU-reference LLaMA shape (``configs/bench/cpu-reference.yaml``: d 256, 4 layers,
4 heads / 2 KV heads, SwiGLU 688, vocab 8192) at one long sequence per micro-batch (default
seq 8192) through the real ``Trainer`` on 1 process (cp=1) and on cp = 2 and 4 gloo ranks of
one thread each, and reports per layout, from rank 0's ``metrics.jsonl``:

- activations: ``mem_activations_bytes`` (what one micro-batch's forward keeps for backward,
  measured, ``engine.memory``), and its ratio to cp=1;
- tokens/s of the whole world (the mean of the steps after the first);
- the bytes one ring step sends per rank and attention layer (K and V of the rank's tokens in
  fp32: forward; the backward sends them again with their fp32 gradients), and per step in all.

On 2 shared cores the cp ranks time-share the cores, so tokens/s measures the overhead of the
split (exchange, block masks), not a speed-up.

    python tools/bench_cp.py [--seq 8192] [--steps 3] [--cp 1 2 4] [--kind ring] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from evoformer.config import load_config  # noqa: E402
from evoformer.distributed.testing import run_distributed  # noqa: E402
from evoformer.engine import Trainer  # noqa: E402
from evoformer.parallel.context_parallel import ring_step_bytes  # noqa: E402


def _overrides(seq: int, steps: int, cp: int, kind: str, out: str) -> list[str]:
    return [
        f"train.seq_len={seq}",
        f"model.max_seq_len={seq}",
        "train.micro_batch_size=1",
        "train.global_batch_size=1",
        f"train.max_steps={steps}",
        "train.log_every=1",
        "run.threads=1",
        "run.measure_memory=true",
        "checkpoint.save_final=false",
        f"parallel.cp={cp}",
        f"parallel.cp_kind={kind}",
        f"run.output_dir={out}",
    ]


def _run(rank: int, world: int, seq: int, steps: int, kind: str, out: str) -> list[dict]:
    cfg = load_config(
        [str(REPO / "configs/bench/cpu-reference.yaml")], _overrides(seq, steps, world, kind, out)
    )
    Trainer(cfg).train()
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--kind", default="ring", choices=["ring", "alltoall"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    cfg = load_config([str(REPO / "configs/bench/cpu-reference.yaml")], [])
    m = cfg.model
    D, K = m.head_dim, m.kv_heads
    results = {}
    with tempfile.TemporaryDirectory() as root:
        for cp in args.cp:
            out = f"{root}/cp{cp}"
            if cp == 1:
                torch.set_num_threads(1)
                lines = _run(0, 1, args.seq, args.steps, args.kind, out)
            else:
                lines = run_distributed(
                    _run, cp, args.seq, args.steps, args.kind, out, timeout=3000
                )[0]
            later = lines[1:] or lines
            T = args.seq // cp
            step_bytes = ring_step_bytes(torch.Size([1, K, T, D]), torch.Size([1, K, T, D]), 4)
            results[cp] = {
                "activations": lines[0]["mem_activations_bytes"],
                "tokens_per_s": sum(r["tokens_per_s"] for r in later) / len(later),
                "ring_step_bytes": step_bytes if cp > 1 else 0,
                # forward: cp - 1 steps of K/V; backward: cp - 1 of K/V and cp of fp32 dK/dV
                "ring_bytes_per_layer_step": (3 * (cp - 1) + cp) * step_bytes if cp > 1 else 0,
                "loss": lines[-1]["loss"],
            }
    base = results[args.cp[0]]["activations"]
    print(
        f"context parallelism, {args.kind}, seq {args.seq}, micro-batch 1, fp32, "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}"
    )
    print(
        f"{'cp':>3} {'activations/rank':>18} {'vs cp=1':>8} {'tokens/s':>9} "
        f"{'bytes/ring step':>16} {'ring bytes/layer/step':>22}"
    )
    for cp, r in results.items():
        print(
            f"{cp:>3} {r['activations'] / 2**20:>14.1f} MiB {r['activations'] / base:>8.3f} "
            f"{r['tokens_per_s']:>9.0f} {r['ring_step_bytes'] / 2**20:>12.2f} MiB "
            f"{r['ring_bytes_per_layer_step'] / 2**20:>18.2f} MiB"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
