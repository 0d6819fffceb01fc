"""Step stall of a checkpoint save, foreground vs background (``checkpoint.async_save``).

Trains a LLaMA-shaped model of a few hundred MB (default: d 768, 6 layers, 12 heads / 4 KV
heads, SwiGLU 2048, vocab 32000: 91 M parameters, 364 MB of fp32 weights, ~1.1 GB of
checkpoint with AdamW's moments) on synthetic data through the real ``Trainer`` three times --
no saves, saves in the foreground, saves in the background -- with ``checkpoint.save_every``
steps between saves, and reports per save:

- blocked: the time the training loop spent inside the save (foreground: all of it; background:
  staging the tensors into host memory, then waiting for and committing the write at a later
  step boundary), timed around ``Checkpointer.save`` and ``Checkpointer.finish``;
- mean step: the mean step time of each run (saves included): a background writer shares the
  CPU cores with training, so the steps beside it slow down; on a machine shared with other
  jobs this number moves with their load (reported before and after);
- write: the background write's own duration (``checkpoint_write_s``).

    python tools/bench_checkpoint.py [--steps 20] [--save-every 6] [--threads 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from evoformer.config import load_config  # noqa: E402
from evoformer.engine import Trainer  # noqa: E402
from evoformer.engine.checkpointing import Checkpointer  # noqa: E402

MODEL = [
    "model.vocab_size=32000",
    "model.d_model=768",
    "model.n_layers=6",
    "model.attention.n_heads=12",
    "model.attention.n_kv_heads=4",
    "model.mlp.hidden=2048",
]


class Blocked:
    """Seconds the loop spent in ``Checkpointer.save`` and ``Checkpointer.finish``."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.depth = 0  # save() calls finish(): count the outer call only
        for name in ("save", "finish"):
            original = getattr(Checkpointer, name)

            def timed(checkpointer, *a, _original=original, **k):
                t0 = time.perf_counter()
                self.depth += 1
                try:
                    return _original(checkpointer, *a, **k)
                finally:
                    self.depth -= 1
                    if self.depth == 0:
                        self.seconds += time.perf_counter() - t0

            setattr(Checkpointer, name, timed)


BLOCKED = Blocked()


def run(root: Path, name: str, args: argparse.Namespace, *overrides: str) -> dict:
    out = root / name
    BLOCKED.seconds = 0.0
    cfg = load_config(
        [str(REPO / "configs/models/tiny/llama.yaml")],
        [
            *MODEL,
            "data.source=synthetic",
            "train.seq_len=128",
            "train.global_batch_size=2",
            "train.micro_batch_size=2",
            f"train.max_steps={args.steps}",
            "train.log_every=1",
            "checkpoint.save_final=false",
            "checkpoint.keep_last=2",
            f"run.threads={args.threads}",
            "run.progress=off",
            "run.measure_memory=false",
            f"run.output_dir={out}",
            *overrides,
        ],
    )
    Trainer(cfg).train()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if "loss" in x and x["step"] > 1]  # step 1: warm-up
    result = {
        "step_ms": [x["step_ms"] for x in train],
        "blocked_s": BLOCKED.seconds,
        "write_s": [x["checkpoint_write_s"] for x in lines if "checkpoint_write_s" in x],
        "bytes": sum(f.stat().st_size for f in (out / "checkpoints").rglob("*") if f.is_file())
        if (out / "checkpoints").is_dir()
        else 0,
    }
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--save-every", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=None, help="where the runs write (default: tmp)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="bench_ckpt_"))
    every = f"checkpoint.save_every={args.save_every}"
    load_before = os.getloadavg()[0]  # other jobs on the machine skew the overhead
    runs = {
        "none": run(root, "none", args),
        "sync": run(root, "sync", args, every),
        "async": run(root, "async", args, every, "checkpoint.async_save=true"),
    }
    # saves at every save_every-th step; --steps leaves steps after the last for its write
    saves = args.steps // args.save_every
    report: dict = {"machine": platform.processor() or platform.machine(), "saves": saves}
    report["load_average_before_after"] = [load_before, os.getloadavg()[0]]
    for name, r in runs.items():
        report[name] = {"mean_step_ms": sum(r["step_ms"]) / len(r["step_ms"])}
        if name != "none":
            report[name] |= {"blocked_s_per_save": r["blocked_s"] / saves, "write_s": r["write_s"]}
    report["checkpoint_mb"] = runs["sync"]["bytes"] / 2 / 1e6  # keep_last=2 folders
    sync, bg = report["sync"], report["async"]
    report["stall_ratio_async_over_sync"] = bg["blocked_s_per_save"] / sync["blocked_s_per_save"]
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
