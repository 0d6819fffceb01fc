"""Gradient clipping counts every parameter once across tensor parallelism: the norm on 2 TP
ranks (sharded, replicated and partial-gradient parameters, a padded vocabulary) equals the
single-process norm, and clipping scales the gathered gradients like torch does on one process.
"""

from __future__ import annotations

import math

import pytest
import torch

from evoformer.config import load_config
from evoformer.distributed.dims import ParallelDims
from evoformer.distributed.testing import run_distributed
from evoformer.engine.grad_norm import ClipScope, clip_grad_norm_, grad_norm
from evoformer.model import build_model
from evoformer.parallel import sequence_parallel_params, sync_sequence_parallel_grads
from evoformer.parallel.collectives import _all_gather
from evoformer.parallel.sharding import tp_split
from tests.conftest import REPO

# MQA (K/V replicated, partial gradients), an odd vocabulary (padded shards) and SP (norm
# weights with partial gradients): every kind of parameter the norm must count once.
OVERRIDES = ["model.attention.n_kv_heads=1", "model.vocab_size=511"]


def _model_and_grads(groups=None, sp=False):
    cfg = load_config([str(REPO / "configs/models/tiny/llama.yaml")], OVERRIDES).model
    model = build_model(cfg, seed=0, groups=groups, sequence_parallel=sp)
    ids = torch.randint(0, 511, (2, 17), generator=torch.Generator().manual_seed(0))
    model(ids[:, :-1], targets=ids[:, 1:]).loss.backward()
    if groups is not None:
        sync_sequence_parallel_grads(sequence_parallel_params(model), groups.tp_group)
    return model


def _worker(rank: int, world: int) -> dict:
    groups = ParallelDims(world, rank, rank, tp=world).build("cpu")
    model = _model_and_grads(groups, sp=True)
    params = list(model.parameters())
    norm = grad_norm(params, groups.tp_group).item()
    # The two classic mistakes: only this rank's gradients, or all of them summed over TP.
    local = math.sqrt(sum(p.grad.pow(2).sum().item() for p in params))
    every = torch.tensor([local**2])
    torch.distributed.all_reduce(every, group=groups.tp_group)
    clipped_norm = clip_grad_norm_(params, norm / 2, ClipScope(groups.tp_group)).item()
    grads = {}
    for name, p in model.named_parameters():
        g, split = p.grad, tp_split(p)
        if split is not None:
            g = _all_gather(g.contiguous(), groups.tp_group, split.dim)
            g = g.narrow(split.dim, 0, split.length)
        grads[name] = g
    return {
        "norm": norm,
        "local": local,
        "summed": every.sqrt().item(),
        "clip_returned": clipped_norm,
        "after": grad_norm(params, groups.tp_group).item(),
        "grads": grads,
    }


def test_tp_grad_norm_counts_each_parameter_once():
    results = run_distributed(_worker, 2)
    single = _model_and_grads()
    want = torch.nn.utils.clip_grad_norm_(single.parameters(), float("inf")).item()
    torch.nn.utils.clip_grad_norm_(single.parameters(), want / 2)
    for r in results:
        assert r["norm"] == pytest.approx(want, rel=1e-6)
        assert r["clip_returned"] == pytest.approx(want, rel=1e-6)
        assert r["after"] == pytest.approx(want / 2, rel=1e-5)
        # The mistakes are far off: a test that could not fail would not show this.
        assert abs(r["local"] - want) / want > 0.05 and abs(r["summed"] - want) / want > 0.05
        for name, p in single.named_parameters():
            torch.testing.assert_close(r["grads"][name], p.grad, rtol=1e-5, atol=1e-7)


def test_tp1_is_torch_clip_grad_norm():
    a, b = _model_and_grads(), _model_and_grads()
    got = clip_grad_norm_(a.parameters(), 0.1, ClipScope())
    want = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.1)
    assert torch.equal(got, want)
    assert all(torch.equal(x.grad, y.grad) for x, y in zip(a.parameters(), b.parameters()))
