"""Context-parallel attention (ring and all-to-all) against one process's attention (gloo).

Each rank holds its two load-balanced chunks of q/k/v; the output and the q/k/v gradients of
its chunks must equal those of causal attention on the whole sequence, for GQA, MLA-shaped
values (V != D: every ring block in fp32 math; with V == D the ring's unmasked and causal
blocks run in the CPU flash kernel), a sliding window shorter than a chunk and longer than one,
ALiBi and documents.
"""

from __future__ import annotations

import pytest
import torch

from evoformer.distributed.testing import run_distributed
from evoformer.parallel.context_parallel import (
    attention_bias,
    context_attention,
    gather_sequence,
    local_positions,
    shard_sequence,
)

CASES = {
    "causal-gqa": {},
    "mla-values": {"V": 12},
    "window-short": {"window": 5},
    "window-long": {"window": 23},
    "alibi": {"alibi": True},
    "documents": {"docs": True},
    "docs-window-alibi": {"docs": True, "window": 9, "alibi": True},
}


def _inputs(case: dict, S: int = 48):
    g = torch.Generator().manual_seed(0)
    B, H, K, D = 2, 4, 2, 8
    V = case.get("V", D)
    q = torch.randn(B, H, S, D, generator=g)
    k = torch.randn(B, K, S, D, generator=g)
    v = torch.randn(B, K, S, V, generator=g)
    grad = torch.randn(B, H, S, V, generator=g)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625]) if case.get("alibi") else None
    docs = None
    if case.get("docs"):
        docs = torch.zeros(B, S, dtype=torch.long)
        docs[0, 7:30], docs[0, 30:] = 1, 2
        docs[1, 20:] = 1
    return q, k, v, grad, slopes, docs


def _reference(case: dict):
    q, k, v, grad, slopes, docs = _inputs(case)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    H, K = q.shape[1], k.shape[1]
    pos = torch.arange(q.shape[2])
    bias = attention_bias(pos, pos, case.get("window"), slopes, docs, docs)
    ke, ve = (x.repeat_interleave(H // K, dim=1) for x in (k, v))
    scores = q @ ke.transpose(-1, -2) * q.shape[-1] ** -0.5 + bias
    out = torch.softmax(scores, -1) @ ve
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def _rel(got, want) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def _check(rank: int, world: int, kind: str) -> dict:
    import torch.distributed as dist

    group = dist.group.WORLD
    errors = {}
    for name, case in CASES.items():
        q, k, v, grad, slopes, docs = _inputs(case)
        want = _reference(case)
        mine = [shard_sequence(x, 2, world, rank) for x in (q, k, v, grad)]
        ql, kl, vl = (x.clone().requires_grad_() for x in mine[:3])
        out = context_attention(ql, kl, vl, group, kind, None, case.get("window"), slopes, docs)
        out.backward(mine[3])
        got = [out.detach(), ql.grad, kl.grad, vl.grad]
        assert all(g is not None for g in got)
        full = [gather_sequence(x, 2, group) for x in got]
        errors[name] = max(_rel(a, b) for a, b in zip(full, want))
    return errors


# alltoall at cp=4: 2 KV heads do not split over 4 ranks, so they are expanded first
@pytest.mark.parametrize("kind,world", [("ring", 2), ("ring", 4), ("alltoall", 2), ("alltoall", 4)])
def test_context_attention_matches_one_process(kind: str, world: int) -> None:
    errors = run_distributed(_check, world, kind)
    for rank_errors in errors:
        for name, err in rank_errors.items():
            assert err < 1e-5, (name, err)


def test_shard_and_positions() -> None:
    x = torch.arange(16)
    assert shard_sequence(x, 0, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert shard_sequence(x, 0, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert local_positions(4, 4, 1).tolist() == [2, 3, 12, 13]
    with pytest.raises(ValueError, match="not divisible by 2\\*cp"):
        shard_sequence(torch.arange(10), 0, 2, 0)


def test_dims_order_pp_dp_cp_tp() -> None:
    from evoformer.distributed import ParallelDims
    from evoformer.errors import UserError

    d = ParallelDims(world_size=16, rank=13, local_rank=5, tp=2, pp=2, cp=2)
    assert (d.dp, d.replicas) == (2, 4)
    # rank 13 = pp 1, dp 1, cp 0, tp 1 in the [pp, dp, cp, tp] grid
    assert (d.pp_rank, d.dp_rank, d.cp_rank, d.tp_rank) == (1, 1, 0, 1)
    with pytest.raises(UserError, match="not divisible by tp\\*pp\\*cp"):
        ParallelDims(world_size=6, rank=0, local_rank=0, cp=4)
