"""Run a function on N freshly spawned ranks: the one helper every multi-process test uses.

    def _check(rank, world_size, n):
        ...  # torch.distributed is initialised here
        return some_picklable_value

    results = run_distributed(_check, 2, 8)  # [rank 0's value, rank 1's value]

``fn`` must be importable by the children (a module-level function). gloo on CPU; the same call
with ``backend="nccl"`` gives each rank its own GPU. The rendezvous uses a TCPStore the parent
opens on a free port (port 0, so no race with other jobs picking ports); MASTER_ADDR,
MASTER_PORT, RANK, WORLD_SIZE and LOCAL_RANK are set in each child as torchrun would, so code
reading the environment (``ParallelDims.from_env``) sees a consistent world.
"""

from __future__ import annotations

import os
import pickle
import queue
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_HOST = "127.0.0.1"


class DistributedTestError(RuntimeError):
    """A rank raised (its traceback is in the message), died, or the run timed out."""


def _worker(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    timeout: float,
    results: mp.Queue,
    fn: Callable[..., Any],
    args: tuple,
) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR=_HOST,
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        store = dist.TCPStore(
            _HOST, port, world_size, is_master=False, timeout=timedelta(seconds=timeout)
        )
        dist.init_process_group(
            backend,
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout),
        )
        try:
            value = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        # Pickled here with plain pickle: tensors travel as bytes, not as shared-memory handles
        # that would die with this process.
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def _context():
    """A forkserver that has imported torch once: each rank then starts in milliseconds instead
    of importing torch afresh (seconds on a loaded 2-core CI box), and exits without a full
    interpreter teardown. Children are still fresh processes forked from a server that has
    started no threads and touched no device, so gloo and NCCL initialise as after a spawn."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", __name__])
    return ctx


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout: float = 60,
) -> list[Any]:
    """Spawn ``world_size`` processes, initialise torch.distributed in each, call
    ``fn(rank, world_size, *args)`` and return the ranks' return values in rank order.

    A rank's exception is re-raised here (``DistributedTestError`` carrying its traceback) as
    soon as it arrives, and the other ranks are stopped; so is a run past ``timeout`` seconds.
    """
    ctx = _context()
    store = dist.TCPStore(
        _HOST,
        0,
        world_size,
        is_master=True,
        timeout=timedelta(seconds=timeout),
        wait_for_workers=False,
    )
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_worker,
            args=(rank, world_size, store.port, backend, timeout, results, fn, args),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    values: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(values) < world_size:
            try:
                rank, ok, payload = results.get(timeout=0.2)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead:
                    codes = {r: procs[r].exitcode for r in dead}
                    raise DistributedTestError(f"rank(s) died without a result: {codes}") from None
                if time.monotonic() > deadline:
                    missing = sorted(set(range(world_size)) - set(values))
                    raise DistributedTestError(
                        f"{fn.__name__} timed out after {timeout}s; no result from ranks {missing}"
                    ) from None
                continue
            if not ok:
                raise DistributedTestError(f"rank {rank} of {world_size} raised:\n{payload}")
            values[rank] = pickle.loads(payload)
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results.close()
    return [values[r] for r in range(world_size)]
