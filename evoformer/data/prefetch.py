"""Reading the next steps' batches in the background while the current step trains.

A step's micro-batches are a pure function of the step (the sampler), so the ``Prefetcher`` can
compute steps ``s + 1 .. s + depth`` on a worker thread while step ``s`` runs: gathering windows
from the memory-mapped stores is numpy work that releases the GIL, and on a GPU the batches are
pinned so the copy to the device runs asynchronously. What the step still waits for is measured
(``wait``), so ``metrics.jsonl`` shows whether the data keeps up.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

Fetch = Callable[[int], list[torch.Tensor]]


class Prefetcher:
    """``get(step)`` returns the step's batches (from ``fetch(step)``), prefetching ahead.

    ``depth``: steps read ahead (0 = read inside the step, on the calling thread). ``pin``: pin
    the batches' memory (for asynchronous host-to-device copies). Steps are expected in order;
    any other step is read synchronously (and the read-ahead restarts from it).
    """

    def __init__(self, fetch: Fetch, depth: int = 2, pin: bool = False) -> None:
        self.fetch = fetch
        self.depth = max(0, int(depth))
        self.pin = pin
        self._pool = ThreadPoolExecutor(1, "evoformer-prefetch") if self.depth else None
        self._pending: dict[int, Future[list[torch.Tensor]]] = {}
        self.wait = 0.0  # seconds the last get() blocked

    def _read(self, step: int) -> list[torch.Tensor]:
        batches = self.fetch(step)
        return [b.pin_memory() for b in batches] if self.pin else batches

    def get(self, step: int) -> list[torch.Tensor]:
        t0 = time.perf_counter()
        future = self._pending.pop(step, None)
        if future is None:
            for stale in self._pending.values():  # a jump (resume, another order): start over
                stale.cancel()
            self._pending.clear()
            batches = self._read(step)
        else:
            batches = future.result()
        self.wait = time.perf_counter() - t0
        if self._pool is not None:
            for ahead in range(step + 1, step + 1 + self.depth):
                if ahead not in self._pending:
                    self._pending[ahead] = self._pool.submit(self._read, ahead)
        return batches

    def close(self) -> None:
        """Stop reading ahead (pending reads are dropped)."""
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
