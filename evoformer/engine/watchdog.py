"""Hang visibility: a rank that makes no progress for ``dist.timeout_s`` ends the job in one line.

Two paths reach the same line. A collective that times out (gloo raises in the waiting call;
NCCL's own watchdog with ``TORCH_NCCL_ASYNC_ERROR_HANDLING``) is turned into ``JobHung`` by the
trainer (``hang_error``). What no collective timeout catches -- a rank stuck outside any
collective (a dead data loader, a deadlock, a sleeping hook), a backend that ignores the timeout,
or the ranks waiting on it when their process group was made by someone else -- the ``Watchdog``
thread catches: the trainer calls ``beat(step, phase)`` whenever it enters a phase (the step, its
end-of-step all-reduce, an evaluation, a save); when no beat comes for ``timeout_s`` plus a grace
of a few seconds (so a timing-out collective reports first, with its own words), the thread
prints the line to stderr, lets the trainer record it (``status.json``: ``hung``), and ends the
process with ``os._exit(HANG_EXIT)``: a hung collective cannot be interrupted from Python, and
the launcher (torchrun) then stops the other ranks.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable

import torch.distributed as dist

from evoformer.errors import HANG_EXIT, JobHung


def grace_s(timeout_s: float) -> float:
    """How long after ``timeout_s`` the watchdog waits for a collective's own timeout error."""
    return min(5.0, max(1.0, 0.05 * timeout_s))


class Watchdog:
    """Ends the process when no ``beat`` arrives for ``timeout_s`` (+ ``grace_s``).

    ``describe_checkpoint()`` names the last complete checkpoint (read when it fires);
    ``on_fire(line)`` runs just before the exit (the trainer writes ``status.json``)."""

    def __init__(
        self,
        timeout_s: float,
        rank: int,
        describe_checkpoint: Callable[[], str],
        on_fire: Callable[[str], None] | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        self.limit_s = timeout_s + grace_s(timeout_s)
        self.rank = rank
        self.describe_checkpoint = describe_checkpoint
        self.on_fire = on_fire
        self.step = 0
        self.phase = "start-up"
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._last = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="evoformer-watchdog", daemon=True)
        self._thread.start()

    def beat(self, step: int, phase: str) -> None:
        """Progress: this rank now enters ``phase`` of ``step`` (cheap: two stores)."""
        self.step, self.phase = step, phase
        self._last = time.monotonic()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def message(self) -> str:
        return (
            f"rank {self.rank}: no progress for over {self.timeout_s:g} s (dist.timeout_s) at "
            f"step {self.step}, in {self.phase}; {self.describe_checkpoint()}; ending the job"
        )

    def _run(self) -> None:
        poll = min(1.0, self.timeout_s / 10)
        while not self._stop.wait(poll):
            if time.monotonic() - self._last < self.limit_s:
                continue
            line = f"error: {self.message()}"
            try:
                print(line, file=sys.stderr, flush=True)
                if self.on_fire is not None:
                    self.on_fire(line)
            finally:
                os._exit(HANG_EXIT)


_COLLECTIVE_WORDS = ("timed out", "timeout", "gloo", "nccl", "connection closed by peer")


def is_collective_failure(err: BaseException) -> bool:
    """Whether ``err`` is a collective that timed out or lost a peer (gloo, NCCL, the store):
    what a rank waiting on a stuck or dead rank sees."""
    if isinstance(err, dist.DistError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(w in text for w in _COLLECTIVE_WORDS)


def hang_error(err: BaseException, rank: int, step: int, phase: str, checkpoint: str) -> JobHung:
    """The one line for a collective that timed out (or whose peer ended) in ``phase``."""
    first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
    what = "timed out" if "timed out" in first.lower() else "failed"
    return JobHung(
        f"rank {rank}: a collective {what} at step {step}, in {phase} ({first[:200]}); "
        f"{checkpoint}; ending the job"
    )
