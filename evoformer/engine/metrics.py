"""Where training numbers go: metrics.jsonl, the console, and optionally wandb / TensorBoard.

Only the main rank logs; other ranks get a sink that drops everything.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from evoformer.config.schema import RunConfig


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drop lines a killed run wrote past the checkpoint, so steps never repeat."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a half-written last line from a kill
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(k + "\n" for k in kept))
    tmp.replace(path)


class MetricsLogger:
    """Appends JSON lines, prints progress, forwards to wandb / TensorBoard when enabled."""

    def __init__(self, run: RunConfig, out_dir: Path, max_steps: int, config_dict: dict) -> None:
        self.path = out_dir / "metrics.jsonl"
        self.file = open(self.path, "a", buffering=1)
        self.console = True  # False once the terminal or pipe reading our output has gone
        self.max_steps = max_steps
        self.bar = None
        interactive = sys.stderr.isatty()
        if run.progress == "on" or (run.progress == "auto" and interactive):
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, unit="step", dynamic_ncols=True, file=sys.stderr)
        self.wandb = None
        if run.wandb:
            import wandb

            self.wandb = wandb.init(
                project=run.wandb_project,
                dir=str(out_dir),
                config=config_dict,
                name=out_dir.name,
                resume="allow",
            )
        self.tb = None
        if run.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        self.start_time = time.perf_counter()

    def set_start(self, step: int) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()
        self._start_step = step
        self.start_time = time.perf_counter()

    def info(self, text: str) -> None:
        """A line on the console. A console that went away (``| tee`` killed by the same
        Ctrl-C, a closed ssh session) ends the echo, never the run: the metrics file, the
        checkpoint and ``status.json`` are still written."""
        if not self.console:
            return
        try:
            if self.bar is not None:
                self.bar.write(text, file=sys.stderr)
            else:
                print(text, flush=True)
        except (BrokenPipeError, OSError):
            self.console = False
            if self.bar is not None:
                self.bar.disable = True

    def log(self, record: dict[str, Any], echo: bool = True) -> None:
        self.file.write(json.dumps(record) + "\n")
        step = record["step"]
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        if "loss" in record:
            if self.bar is not None and self.console:
                self.bar.n = step
                self.bar.set_postfix(
                    loss=f"{record['loss']:.3f}",
                    tok_s=f"{record['tokens_per_s']:.0f}",
                    refresh=False,
                )
                try:
                    self.bar.refresh()
                except (BrokenPipeError, OSError):
                    self.console = False
            if echo:
                self.info(self._line(record))
        elif "val_loss" in record and echo:
            self.info(f"step {step:>6} | val_loss {record['val_loss']:.4f}")

    def _line(self, r: dict[str, Any]) -> str:
        done = r["step"] - getattr(self, "_start_step", 0)
        elapsed = time.perf_counter() - self.start_time
        eta = elapsed / done * (self.max_steps - r["step"]) if done > 0 else float("nan")
        return (
            f"step {r['step']:>6}/{self.max_steps} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | "
            f"grad_norm {r['grad_norm']:.3f} | {r['tokens_per_s']:,.0f} tok/s | "
            + (f"mfu {r['mfu']:.1%} | " if "mfu" in r else "")
            + f"eta {format_duration(eta)}"
        )

    def close(self) -> None:
        self.file.close()
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tb is not None:
            self.tb.close()


class NullLogger:
    """What non-main ranks log to."""

    def __getattr__(self, name: str):
        return lambda *a, **k: None
