"""The trainer's saves: in the foreground, or in the background with one save in flight.

A save is ``strategy.begin_save`` (the shards into a temp folder: all of it in the foreground;
with ``checkpoint.async_save`` only the staging into host memory, the write continuing on a
thread) and ``PendingSave.commit`` (every rank's write done: rank 0 publishes the folder and
moves ``latest``; see ``checkpoint.io``). In the background the trainer votes on the commit in
its end-of-step all-reduce: ``flags`` says whether this rank's write is still running or has
failed, ``settle`` commits once no rank is writing (or raises every rank's one line when one
failed). A new save, a stop and the end of the run first ``finish`` the save in flight.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evoformer.checkpoint import LATEST, PendingSave
from evoformer.config.schema import CheckpointConfig
from evoformer.engine.strategy import Strategy


class Checkpointer:
    """Saves of one run into ``ckpt_root``; ``log`` prints a line (rank 0's logger)."""

    def __init__(
        self,
        strategy: Strategy,
        ckpt_root: Path,
        cfg: CheckpointConfig,
        log: Callable[[str], None],
    ) -> None:
        self.strategy = strategy
        self.ckpt_root = ckpt_root
        self.cfg = cfg
        self.log = log
        self.pending: PendingSave | None = None  # the background save in flight
        self.stall = 0.0  # how long starting the pending save stalled the step
        self.seconds = 0.0  # seconds the loop spent saving since the last metrics line
        self.write_s: float | None = None  # the last background write's duration
        self.last_step: int | None = None  # the step of the newest save begun

    def save(
        self,
        step: int,
        trainer_state: dict[str, Any],
        config_yaml: str,
        extra_files: dict[str, Path],
    ) -> Path:
        """Save ``step``; returns its folder (in the background: where it will appear)."""
        self.finish()  # one save in flight at a time
        t0 = time.perf_counter()
        background = self.cfg.async_save
        pending = self.strategy.begin_save(
            self.ckpt_root,
            step,
            trainer_state=trainer_state,
            config_yaml=config_yaml,
            keep_last=self.cfg.keep_last,
            extra_files=extra_files,
            background=background,
        )
        self.last_step = step
        if background:
            self.pending, self.stall = pending, time.perf_counter() - t0
            self.seconds += self.stall
            self.log(
                f"checkpoint step_{step}: writing in the background (the step stalled "
                f"{self.stall:.2f} s)"
            )
            return pending.final
        path = pending.commit()
        took = time.perf_counter() - t0
        self.seconds += took
        self.log(f"saved checkpoint {path} in {took:.2f} s")
        return path

    def finish(self) -> None:
        """Wait for the background save in flight (if any) and commit it; collective."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        t0 = time.perf_counter()
        path = pending.commit()  # every rank raises the same line if a write failed
        waited = time.perf_counter() - t0
        self.seconds += waited
        self.write_s = pending.written_s
        self.log(
            f"saved checkpoint {path} in {pending.written_s or 0.0:.2f} s, written in the "
            f"background (steps stalled {self.stall:.2f} s to stage it and {waited:.2f} s to "
            "wait for and commit it)"
        )

    def flags(self) -> list[float]:
        """This rank's vote for the end-of-step all-reduce (MAX): [still writing, failed]."""
        pending = self.pending
        busy = pending is not None and not pending.done()
        failed = pending is not None and not busy and pending.failed()
        return [float(busy), float(failed)]

    def settle(self, busy_anywhere: bool, failed_anywhere: bool) -> None:
        """After the vote: commit when no rank is still writing; when a rank failed, every rank
        raises ``CheckpointWriteError`` here (at the same step)."""
        if self.pending is not None and (failed_anywhere or not busy_anywhere):
            self.finish()

    def metrics(self, steps: int) -> dict[str, float]:
        """``checkpoint_ms`` per step of the window (and, once after a background commit,
        ``checkpoint_write_s``); starts the next window."""
        out = {"checkpoint_ms": 1e3 * self.seconds / steps}
        if self.write_s is not None:
            out["checkpoint_write_s"] = self.write_s
        self.seconds, self.write_s = 0.0, None
        return out

    def note(self) -> str:
        """Where a resume would start (the checkpoint ``latest`` names), for one-line errors."""
        try:
            name = (self.ckpt_root / LATEST).read_text().strip()
        except OSError:
            return "there is no complete checkpoint"
        return f"the last complete checkpoint is {self.ckpt_root / name}"
