"""Autograd-aware collectives on 2 gloo ranks: forward values, gradients and call counts."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from evoformer.distributed.testing import run_distributed
from evoformer.parallel import collectives as C


def _forward_backward(fn, x, dy):
    x = x.clone().requires_grad_()
    with C.count_collectives() as n:
        y = fn(x)
        y.backward(dy)
    return y.detach(), x.grad, dict(n)


def _worker(rank: int, world: int) -> dict:
    g = dist.group.WORLD
    r1 = rank + 1  # per-rank scale, so sums over ranks are recognisable
    x = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(2, 4, 6) * r1
    dy = torch.linspace(-1, 1, 2 * 4 * 6).reshape(2, 4, 6) * r1
    xs = [x / r1 * (q + 1) for q in range(world)]  # every rank's x, known everywhere
    dys = [dy / r1 * (q + 1) for q in range(world)]
    chunk = lambda t, dim: t.chunk(world, dim)[rank]  # noqa: E731
    out = {}

    y, dx, n = _forward_backward(lambda t: C.copy_to_parallel_region(t, g), x, dy)
    out["copy"] = ((y, dx, n), (x, sum(dys), {"all_reduce": 1}))
    y, dx, n = _forward_backward(lambda t: C.reduce_from_parallel_region(t, g), x, dy)
    out["reduce"] = ((y, dx, n), (sum(xs), dy, {"all_reduce": 1}))
    y, dx, n = _forward_backward(
        lambda t: C.gather_from_parallel_region(t, g), x, torch.cat(dys, -1)
    )
    out["gather_last"] = ((y, dx, n), (torch.cat(xs, -1), dy, {"all_gather": 1}))
    y, dx, n = _forward_backward(lambda t: C.scatter_to_parallel_region(t, g), x, chunk(dy, -1))
    full_dy = torch.cat([d.chunk(world, -1)[q] for q, d in enumerate(dys)], -1)
    out["scatter_last"] = ((y, dx, n), (chunk(x, -1), full_dy, {"all_gather": 1}))

    y, dx, n = _forward_backward(lambda t: C.sum_across_parallel_region(t, g), x, dy)
    out["sum_both_ways"] = ((y, dx, n), (sum(xs), sum(dys), {"all_reduce": 2}))

    # Sequence parallelism along T (dim 1 of [B, T, C]).
    y, dx, n = _forward_backward(
        lambda t: C.gather_from_sequence_parallel_region(t, g), x, torch.cat(dys, 1)
    )
    want_dx = chunk(sum(torch.cat(dys, 1) for _ in range(world)), 1)
    expected = (torch.cat(xs, 1), want_dx, {"all_gather": 1, "reduce_scatter": 1})
    out["sp_gather"] = ((y, dx, n), expected)
    y, dx, n = _forward_backward(
        lambda t: C.gather_from_sequence_parallel_region(t, g, reduce_grad=False),
        x,
        torch.cat(dys, 1),
    )
    out["sp_gather_split"] = ((y, dx, n), (torch.cat(xs, 1), dy, {"all_gather": 1}))
    y, dx, n = _forward_backward(
        lambda t: C.reduce_scatter_to_sequence_parallel_region(t, g), x, chunk(dy, 1)
    )
    full_dy = torch.cat([d.chunk(world, 1)[q] for q, d in enumerate(dys)], 1)
    expected = (chunk(sum(xs), 1), full_dy, {"reduce_scatter": 1, "all_gather": 1})
    out["sp_reduce_scatter"] = ((y, dx, n), expected)

    # The gloo fallback (all-reduce + slice) equals the native reduce-scatter.
    with C.count_collectives() as n:
        fallback = C._reduce_scatter_via_all_reduce(x, g, 1)
    out["fallback"] = ((fallback, dict(n)), (chunk(sum(xs), 1), {"reduce_scatter": 1}))

    # A gradient tensor shared with another branch (AddBackward hands the same tensor to both
    # inputs) must not be reduced in place.
    a, b = x.clone().requires_grad_(), torch.zeros_like(x).requires_grad_()
    (C.copy_to_parallel_region(a, g) + b).backward(dy)
    out["no_alias"] = ((a.grad, b.grad), (sum(dys), dy))

    try:
        C.reduce_scatter_to_sequence_parallel_region(torch.ones(1, 3, 2), g)
        out["indivisible"] = "no error"
    except ValueError as e:
        out["indivisible"] = str(e)
    return out


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_distributed(_worker, 2)


NAMES = [
    "copy",
    "reduce",
    "sum_both_ways",
    "gather_last",
    "scatter_last",
    "sp_gather",
    "sp_gather_split",
    "sp_reduce_scatter",
    "fallback",
    "no_alias",
]


@pytest.mark.parametrize("name", NAMES)
def test_collective_values_grads_and_counts(results, name):
    for rank, out in enumerate(results):
        actual, expected = out[name]
        for a, e in zip(actual, expected):
            if isinstance(e, dict):
                assert a == e, (rank, name)
            else:
                torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6, msg=f"{name} rank {rank}")


def test_indivisible_sequence_is_a_clear_error(results):
    assert "does not split over 2 ranks" in results[0]["indivisible"]


def test_no_group_is_identity_without_communication():
    x = torch.randn(2, 4, 6, requires_grad=True)
    with C.count_collectives() as n:
        for fn in (
            C.copy_to_parallel_region,
            C.reduce_from_parallel_region,
            C.sum_across_parallel_region,
            C.gather_from_parallel_region,
            C.scatter_to_parallel_region,
            C.gather_from_sequence_parallel_region,
            C.reduce_scatter_to_sequence_parallel_region,
        ):
            assert fn(x, None) is x
    assert sum(n.values()) == 0
