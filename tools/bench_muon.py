"""Muon vs AdamW on the quickstart model, side by side in one run.

Each optimizer trains the quickstart config (7.1M parameters, the embedded corpus, 16 x 256
tokens per step) at each learning rate of a small sweep; the best rate of each (lowest final
validation loss) is compared: the steps Muon needs to reach AdamW's final validation loss
(goal <= 0.8 x AdamW's), and each optimizer's time per step. Runs go to a scratch folder.

    python tools/bench_muon.py [--steps 150] [--lrs 1e-3 2e-3 4e-3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from evoformer.config import load_config  # noqa: E402
from evoformer.engine import Trainer  # noqa: E402


def run(optimizer: str, lr: float, steps: int, every: int, root: Path) -> dict:
    cfg = load_config(
        [str(REPO / "configs/quickstart.yaml")],
        [
            f"optim.name={optimizer}",
            f"optim.lr={lr}",
            f"train.max_steps={steps}",
            f"train.eval_every={every}",
            "train.eval_batches=4",
            f"optim.warmup_steps={max(1, steps // 10)}",
            "checkpoint.save_every=0",
            "checkpoint.save_final=false",
            "checkpoint.load=none",
            "run.progress=off",
            f"run.output_dir={root / f'{optimizer}-{lr:g}'}",
        ],
    )
    trainer = Trainer(cfg)
    t0 = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - t0
    return {
        "optimizer": optimizer,
        "lr": lr,
        "val": result.val_losses,
        "final_val": result.val_losses[steps],
        "s_per_step": seconds / steps,
    }


def steps_to_reach(val: dict[int, float], target: float) -> int | None:
    hits = [s for s, v in sorted(val.items()) if v <= target]
    return hits[0] if hits else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--every", type=int, default=15, help="evaluate every N steps")
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 2e-3, 4e-3])
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for lr in args.lrs:
            for opt in ("adamw", "muon"):
                r = run(opt, lr, args.steps, args.every, Path(tmp))
                print(
                    f"{opt} lr {lr:g}: final val {r['final_val']:.4f}, {r['s_per_step']:.2f} s/step"
                )
                runs.append(r)
    best = {
        opt: min((r for r in runs if r["optimizer"] == opt), key=lambda r: r["final_val"])
        for opt in ("adamw", "muon")
    }
    target = best["adamw"]["final_val"]
    reach = steps_to_reach(best["muon"]["val"], target)
    result = {
        "what": "Muon vs AdamW, quickstart model, best lr of each from the sweep",
        "machine": platform.processor() or platform.machine(),
        "steps": args.steps,
        "lrs": args.lrs,
        "runs": [{k: v for k, v in r.items() if k != "val"} for r in runs],
        "adamw_best_lr": best["adamw"]["lr"],
        "muon_best_lr": best["muon"]["lr"],
        "adamw_final_val": target,
        "muon_final_val": best["muon"]["final_val"],
        "muon_steps_to_adamw_final": reach,
        "ratio": None if reach is None else reach / args.steps,
        "s_per_step": {k: round(v["s_per_step"], 3) for k, v in best.items()},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
