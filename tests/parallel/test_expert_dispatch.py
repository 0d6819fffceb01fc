"""Expert-parallel dispatch (all-to-all) against the one-rank reference, forward and backward.

Each rank routes its own tokens; the reference runs them through the local dispatcher and all
E experts on the same rank, the expert-parallel path sends them to the ranks holding their
experts (E / ep each) and back. Outputs and input / gate-weight gradients must agree per rank,
and each rank's expert gradients must equal the reference gradients summed over every rank's
tokens, for its slice of the experts. Loads are skewed on purpose (experts with no tokens, one
expert taking every token, a rank receiving nothing), with and without a capacity limit (the
same copies dropped as the reference drops). gloo, fp32.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from evoformer.distributed.testing import run_distributed
from evoformer.model.moe import GroupedExperts
from evoformer.parallel.context import ParallelContext
from evoformer.parallel.expert import AllToAllDispatcher, LocalDispatcher, build_dispatcher

E, C, H, N, K = 8, 16, 32, 12, 2
# fp32, same rows through the same GEMMs: differences are summation order in the expert
# gradients only.
TOL = {"rtol": 1e-5, "atol": 1e-6}


def _routing(kind: str, rank: int) -> torch.Tensor:
    """[N, K] expert choices of this rank's tokens (two distinct experts per token)."""
    g = torch.Generator().manual_seed(100 + rank)
    if kind == "random":
        return torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    if kind == "one_takes_all":  # expert 5 in every token's first slot; 0-3 never chosen
        second = torch.tensor([4, 6, 7])[torch.randint(0, 3, (N,), generator=g)]
        return torch.stack([torch.full((N,), 5), second], dim=1)
    if kind == "one_rank_idle":  # only experts 0-3 (ep rank 0's): rank 1 receives no row
        return torch.stack([torch.randperm(4, generator=g)[:K] for _ in range(N)])
    raise ValueError(kind)


def _experts(ctx: ParallelContext) -> GroupedExperts:
    experts = GroupedExperts(E, C, H, lambda gate, up: F.silu(gate) * up, ctx)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name in ("gate_proj", "up_proj", "down_proj"):
            p = getattr(experts, name)
            full = torch.randn((E, *p.shape[1:]), generator=g) * 0.2
            n = p.shape[0]
            p.copy_(full[ctx.ep_rank * n : (ctx.ep_rank + 1) * n])
    return experts


def _run(dispatcher, experts, x_NC, experts_NK, w_NK, capacity):
    x_NC = x_NC.clone().requires_grad_()
    w_NK = w_NK.clone().requires_grad_()
    xs, counts, d = dispatcher.dispatch(x_NC, experts_NK, capacity)
    out = dispatcher.combine(experts(xs, counts), d, w_NK)
    # A loss that weighs every output element differently, so a misplaced row shows.
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {n: p.grad.clone() for n, p in experts.named_parameters()}
    return out.detach(), x_NC.grad, w_NK.grad, grads, d


def _check(rank: int, world: int, kind: str, capacity: int | None, grouped: bool) -> dict:
    group = dist.group.WORLD
    g = torch.Generator().manual_seed(rank)
    x_NC = torch.randn(N, C, generator=g)
    w_NK = torch.rand(N, K, generator=g)
    experts_NK = _routing(kind, rank)

    ref_experts = _experts(ParallelContext())
    ep_experts = _experts(ParallelContext(ep_group=group))
    for m in (ref_experts, ep_experts):
        m.use_grouped_mm = grouped
    ref = _run(LocalDispatcher(E), ref_experts, x_NC, experts_NK, w_NK, capacity)
    dispatcher = build_dispatcher(E, group)
    assert isinstance(dispatcher, AllToAllDispatcher) and dispatcher.num_local_experts == E // 2
    calls = []
    real = dist.all_to_all_single

    def recording(output, input, *args, **kwargs):
        calls.append((input.dtype, tuple(input.shape)))
        return real(output, input, *args, **kwargs)

    dist.all_to_all_single = recording
    try:
        got = _run(dispatcher, ep_experts, x_NC, experts_NK, w_NK, capacity)
    finally:
        dist.all_to_all_single = real
    # Counts first (E integers), then the rows; the combine's rows back; backward: the two row
    # exchanges reversed. Nothing padded: exactly the kept copies travel.
    sent = int(ref[4].kept_E.sum())
    assert calls[0] == (torch.int64, (E,))
    assert calls[1] == (torch.float32, (sent, C))
    assert [c[0] for c in calls[2:]] == [torch.float32] * 3 and len(calls) == 5
    assert calls[-1][1] == (sum(got[4].recv_splits), C)  # dispatch's backward, reversed

    torch.testing.assert_close(got[0], ref[0], **TOL)  # outputs
    torch.testing.assert_close(got[1], ref[1], **TOL)  # d input
    torch.testing.assert_close(got[2], ref[2], **TOL)  # d gate weights
    # Expert gradients: the reference's (this rank's tokens, all experts), summed over ranks,
    # then this rank's slice of experts.
    L = E // world
    for name, grad in ref[3].items():
        dist.all_reduce(grad, group=group)
        torch.testing.assert_close(got[3][name], grad[rank * L : (rank + 1) * L], **TOL)
    # The same copies are kept and dropped as on the reference.
    assert torch.equal(got[4].kept_E, ref[4].kept_E)
    assert torch.equal(got[4].selected_E, ref[4].selected_E)
    return {
        "kept": ref[4].kept_E.tolist(),
        "selected": ref[4].selected_E.tolist(),
        "recv": sum(got[4].recv_splits),
    }


@pytest.mark.parametrize(
    "kind,capacity,grouped",
    [
        ("random", None, True),
        ("one_takes_all", None, True),
        ("one_rank_idle", None, True),
        ("one_takes_all", 4, True),
        ("random", 2, False),  # the per-expert loop instead of torch._grouped_mm
    ],
)
def test_all_to_all_dispatch_matches_local_reference(kind, capacity, grouped):
    out = run_distributed(_check, 2, kind, capacity, grouped, timeout=60)
    for r in out:
        if capacity is None:
            assert r["kept"] == r["selected"] and sum(r["kept"]) == N * K
        else:
            # Each expert keeps min(chosen, capacity) copies of this rank's tokens.
            assert r["kept"] == [min(s, capacity) for s in r["selected"]]
            assert sum(r["kept"]) < N * K  # the limit bites in these cases
    if kind == "one_takes_all":
        for r in out:
            assert r["selected"][:4] == [0, 0, 0, 0] and r["selected"][5] == N
        assert out[0]["recv"] == 0  # no token chose ep rank 0's experts (0-3)
    if kind == "one_rank_idle":
        assert out[1]["recv"] == 0 and out[0]["recv"] == 2 * N * K


def _bad_split(rank: int, world: int) -> str:
    try:
        AllToAllDispatcher(3, dist.group.WORLD)
    except ValueError as err:
        return str(err)
    return ""


def test_ep_must_divide_the_experts():
    msg = run_distributed(_bad_split, 2, timeout=60)[0]
    assert "parallel.ep=2 must divide model.moe.num_experts=3" in msg
