"""CPU training throughput with and without expert parallelism: ep=1 vs ep=2 on 2 ranks.

Both runs are the real trainer under torchrun (2 ranks, gloo, 1 thread each, fp32, DDP), on the
same Mixtral-style MoE model (``configs/bench/moe-ep.yaml``: 8 experts top-2, 4 layers,
d_model 256) and the same synthetic batches; only ``parallel.ep`` differs. At ep=1 each rank
holds all experts and runs its own tokens through them; at ep=2 each rank holds 4 of the 8 and
the routed copies travel by all-to-all. Runs alternate (ep=1, ep=2, ep=1, ...) so load changes
hit both alike; tokens/s is the median over the steps after ``--warmup`` of every repeat, read
from each run's metrics.jsonl. Also reported: expert parameter bytes per rank and the final
loss (the two layouts train the same model to the same losses).

    python tools/bench_ep.py [--repeats 3] [--steps 12] [--warmup 4] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs/bench/moe-ep.yaml"


def run_once(ep: int, steps: int, out_dir: Path) -> list[dict]:
    """One 2-rank training run; returns its metrics.jsonl training lines."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "evoformer",
        "train",
        str(CONFIG),
        f"parallel.ep={ep}",
        f"train.max_steps={steps}",
        f"run.output_dir={out_dir}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, env=env, cwd=REPO, capture_output=True, text=True)
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "loss" in line]


def expert_bytes_per_rank(ep: int) -> int:
    """fp32 bytes of the routed experts one rank holds (E / ep of them per MoE layer)."""
    from evoformer.config import load_config

    m = load_config([str(CONFIG)]).model
    per_expert = 3 * m.expert_width * m.d_model * 4
    return m.n_layers * (m.moe.num_experts // ep) * per_expert


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=4, help="steps left out of the median")
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args(argv)
    rates: dict[int, list[float]] = {1: [], 2: []}
    final: dict[int, float] = {}
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for ep in (1, 2) if r % 2 == 0 else (2, 1):
                t0 = time.perf_counter()
                lines = run_once(ep, args.steps, Path(tmp) / f"ep{ep}-{r}")
                rates[ep] += [x["tokens_per_s"] for x in lines if x["step"] > args.warmup]
                final[ep] = lines[-1]["loss"]
                print(
                    f"repeat {r} ep={ep}: {time.perf_counter() - t0:.0f} s wall, median "
                    f"{statistics.median(rates[ep]):,.0f} tokens/s so far"
                )
    load.append(os.getloadavg()[0])
    result = {
        ep: {
            "tokens_per_s": statistics.median(v),
            "min": min(v),
            "max": max(v),
            "expert_bytes_per_rank": expert_bytes_per_rank(ep),
            "final_loss": final[ep],
        }
        for ep, v in rates.items()
    }
    print("| setting | tokens/s (median, min-max) | expert bytes per rank | final loss |")
    print("|---|---:|---:|---:|")
    for ep, r in result.items():
        print(
            f"| ep={ep} (dp=2) | {r['tokens_per_s']:,.0f} ({r['min']:,.0f}-{r['max']:,.0f}) | "
            f"{r['expert_bytes_per_rank']:,} | {r['final_loss']:.4f} |"
        )
    print(
        f"ratio ep2/ep1: {result[2]['tokens_per_s'] / result[1]['tokens_per_s']:.3f}; "
        f"load average before / after: {load[0]:.2f} / {load[1]:.2f}"
    )
    if args.json:
        args.json.write_text(json.dumps({"results": result, "load": load}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
