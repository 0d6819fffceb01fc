"""ParallelDims: rank arithmetic, layout errors, and the process groups it builds (world 4)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from evoformer.config.schema import ParallelConfig
from evoformer.distributed.dims import ParallelDims
from evoformer.distributed.testing import run_distributed
from evoformer.errors import UserError


def test_tp_is_innermost():
    ranks = [ParallelDims(world_size=8, rank=r, local_rank=r, tp=2) for r in range(8)]
    assert ranks[0].dp == 4
    assert [d.tp_rank for d in ranks] == [0, 1, 0, 1, 0, 1, 0, 1]
    assert [d.dp_rank for d in ranks] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert all(d.pp_rank == 0 for d in ranks)


def test_from_env_and_single_process_build(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    dims = ParallelDims.from_env(ParallelConfig())
    assert (dims.world_size, dims.dp, dims.tp, dims.ep, dims.is_main, dims.distributed) == (
        1,
        1,
        1,
        1,
        True,
        False,
    )
    groups = dims.build("cpu")
    assert groups.tp_group is None and groups.dp_group is None and groups.mesh is None
    assert (groups.tp, groups.dp, groups.tp_ranks, groups.dp_ranks) == (1, 1, (0,), (0,))


def test_impossible_layouts_are_user_errors():
    with pytest.raises(UserError, match="not divisible by tp"):
        ParallelDims(world_size=6, rank=0, local_rank=0, tp=4)
    with pytest.raises(UserError, match=">= 1"):
        ParallelDims(world_size=2, rank=0, local_rank=0, tp=0)
    with pytest.raises(UserError, match="must divide the data-parallel size"):
        ParallelDims(world_size=6, rank=0, local_rank=0, ep=4)


def test_expert_parallel_is_carved_out_of_dp():
    # world 8 = pp 2 x dp 2 x tp 2, ep 2: dp index = edp_rank * ep + ep_rank.
    ranks = [ParallelDims(world_size=8, rank=r, local_rank=r, tp=2, pp=2, ep=2) for r in range(8)]
    assert [d.pp_rank for d in ranks] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [d.dp_rank for d in ranks] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert [d.ep_rank for d in ranks] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert ranks[0].edp == 1 and all(d.edp_rank == 0 for d in ranks)


def _worker(rank: int, world: int) -> dict:
    groups = ParallelDims.from_env(ParallelConfig(tp=2)).build("cpu")
    # Sum each rank's id over its groups: proves the groups really connect those ranks.
    tp_sum = torch.tensor([float(rank)])
    dp_sum = torch.tensor([float(rank)])
    dist.all_reduce(tp_sum, group=groups.tp_group)
    dist.all_reduce(dp_sum, group=groups.dp_group)
    return {
        "tp_ranks": groups.tp_ranks,
        "dp_ranks": groups.dp_ranks,
        "tp_rank": groups.tp_rank,
        "dp_rank": groups.dp_rank,
        "tp_group_rank": dist.get_rank(groups.tp_group),
        "dp_group_rank": dist.get_rank(groups.dp_group),
        "mesh": groups.mesh.mesh.tolist(),
        "pp_ranks": groups.pp_ranks,
        "tp_sum": tp_sum.item(),
        "dp_sum": dp_sum.item(),
    }


def test_world4_tp2_groups():
    results = run_distributed(_worker, 4)
    tp_groups = {0: (0, 1), 1: (0, 1), 2: (2, 3), 3: (2, 3)}  # adjacent ranks share TP
    dp_groups = {0: (0, 2), 1: (1, 3), 2: (0, 2), 3: (1, 3)}
    for rank, r in enumerate(results):
        assert r["tp_ranks"] == tp_groups[rank] and r["dp_ranks"] == dp_groups[rank]
        assert r["tp_rank"] == r["tp_group_rank"] == rank % 2
        assert r["dp_rank"] == r["dp_group_rank"] == rank // 2
        assert r["mesh"] == [[[0, 1], [2, 3]]] and r["pp_ranks"] == (rank,)
        assert r["tp_sum"] == sum(tp_groups[rank]) and r["dp_sum"] == sum(dp_groups[rank])


def _ep_worker(rank: int, world: int) -> dict:
    groups = ParallelDims.from_env(ParallelConfig(pp=2, ep=2)).build("cpu")
    return {
        "dp": groups.dp_ranks,
        "ep": groups.ep_ranks,
        "edp": groups.edp_ranks,
        "pp": groups.pp_ranks,
        "dp_mesh": groups.submesh("dp").mesh.tolist(),
    }


def test_world4_pp2_ep2_groups():
    # pp 2 x dp 2 (ep 2, edp 1): ranks 0,1 are stage 0, ranks 2,3 stage 1.
    results = run_distributed(_ep_worker, 4)
    for rank, r in enumerate(results):
        stage = (0, 1) if rank < 2 else (2, 3)
        assert r["dp"] == r["ep"] == stage and r["edp"] == (rank,)
        assert r["pp"] == (rank % 2, rank % 2 + 2) and r["dp_mesh"] == list(stage)
