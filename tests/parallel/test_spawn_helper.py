"""run_distributed: results in rank order, torchrun-like environment, errors re-raised."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from evoformer.distributed.testing import DistributedTestError, run_distributed


def _worker(rank: int, world: int, fail_rank: int) -> dict:
    x = torch.tensor([rank + 1.0])
    dist.all_reduce(x)
    if rank == fail_rank:
        raise ValueError(f"boom from rank {rank}")
    env = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    return {"sum": x, "env": env, "threads": torch.get_num_threads(), "backend": dist.get_backend()}


def test_results_in_rank_order_with_torchrun_env():
    results = run_distributed(_worker, 2, -1)
    for rank, r in enumerate(results):
        torch.testing.assert_close(r["sum"], torch.tensor([3.0]))
        assert r["env"] == {
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
        }
        assert (r["threads"], r["backend"]) == (1, "gloo")


def test_rank_exception_is_reraised_with_traceback():
    with pytest.raises(DistributedTestError, match="rank 1 of 2 raised") as info:
        run_distributed(_worker, 2, 1)
    assert "ValueError: boom from rank 1" in str(info.value)
    assert "_worker" in str(info.value)  # the child's traceback
