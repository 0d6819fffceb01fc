"""The prefetcher reads the next steps while the current one runs: the step stops waiting."""

from __future__ import annotations

import time

import pytest
import torch

from evoformer.data.prefetch import Prefetcher

READ_S, STEP_S = 0.05, 0.08


def _slow_fetch(step: int) -> list[torch.Tensor]:
    time.sleep(READ_S)  # a slow store: the time the step would block on
    return [torch.full((2, 3), step)]


def _run(depth: int, steps: int = 6) -> tuple[list[int], list[float]]:
    p = Prefetcher(_slow_fetch, depth=depth)
    seen, waits = [], []
    for step in range(steps):
        seen.append(int(p.get(step)[0][0, 0]))
        waits.append(p.wait)
        time.sleep(STEP_S)  # the training step
    p.close()
    return seen, waits


def test_the_step_stops_waiting_on_data() -> None:
    seen_off, waits_off = _run(depth=0)
    seen_on, waits_on = _run(depth=2)
    assert seen_off == seen_on == list(range(6))  # the same batches, in order
    assert min(waits_off) >= READ_S * 0.9  # every step reads its own batches
    assert waits_on[0] >= READ_S * 0.9  # nothing to prefetch before the first step
    assert max(waits_on[1:]) < READ_S / 5, waits_on


def test_a_jump_reads_synchronously_and_errors_reach_the_caller() -> None:
    p = Prefetcher(lambda s: [torch.tensor([s])], depth=2)
    assert p.get(0)[0].item() == 0
    assert p.get(10)[0].item() == 10  # not prefetched: read on the spot
    assert p.get(11)[0].item() == 11
    p.close()

    def broken(step: int) -> list[torch.Tensor]:
        if step == 1:
            raise ValueError("bad shard")
        return [torch.tensor([step])]

    p = Prefetcher(broken, depth=1)
    p.get(0)
    with pytest.raises(ValueError, match="bad shard"):
        p.get(1)
    p.close()
