"""``run.profile``: trace a range of training steps with ``torch.profiler``.

Steps ``[first, last]`` (1-based, inclusive) run under the profiler; after the last one each rank
writes ``profile/trace_rank<R>.json`` (a Chrome trace: open it in https://ui.perfetto.dev or
chrome://tracing) and, on a GPU, ``profile/memory_rank<R>.pickle`` (a CUDA memory snapshot of
those steps: drag it onto https://pytorch.org/memory_viz). Outside the range nothing is
recorded, so profiling costs nothing when off.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from evoformer.errors import UserError


class StepProfiler:
    """Starts before step ``first``, stops and writes after step ``last`` (see module doc)."""

    def __init__(self, steps: list[int], out_dir: Path, rank: int) -> None:
        if steps and (len(steps) != 2 or not 1 <= steps[0] <= steps[1]):
            raise UserError(
                f"config: run.profile={steps!r}: give [first, last] steps, 1 <= first <= last"
            )
        self.first, self.last = (steps[0], steps[1]) if steps else (0, -1)
        self.out_dir, self.rank = out_dir, rank
        self._prof: profile | None = None
        self._cuda = torch.cuda.is_available()
        self.written: list[Path] = []

    def before_step(self, step: int) -> None:
        if step != self.first:
            return
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self._cuda else [])
        self._prof = profile(activities=activities, record_shapes=True)
        self._prof.__enter__()
        if self._cuda:
            torch.cuda.memory._record_memory_history(max_entries=100_000)

    def after_step(self, step: int) -> None:
        if step == self.last and self._prof is not None:
            self._finish()

    def _finish(self) -> None:
        assert self._prof is not None
        if self._cuda:
            torch.cuda.synchronize()
        self._prof.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        trace = self.out_dir / f"trace_rank{self.rank}.json"
        self._prof.export_chrome_trace(str(trace))
        self.written.append(trace)
        if self._cuda:
            snapshot = self.out_dir / f"memory_rank{self.rank}.pickle"
            torch.cuda.memory._dump_snapshot(str(snapshot))
            torch.cuda.memory._record_memory_history(enabled=None)
            self.written.append(snapshot)
        self._prof = None

    def close(self) -> None:
        """A run that ends inside the range still writes what it traced."""
        if self._prof is not None:
            self._finish()
