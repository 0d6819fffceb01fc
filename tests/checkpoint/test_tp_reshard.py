"""A checkpoint saved under tensor parallelism loads on one process (and back): DCP reshards."""

from __future__ import annotations

import torch
from torch import nn

from evoformer.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from evoformer.config import load_config, to_yaml
from evoformer.distributed.dims import ParallelDims
from evoformer.distributed.testing import run_distributed
from evoformer.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from evoformer.parallel.sharding import tp_split
from tests.conftest import REPO

V, IN, HID = 37, 6, 8  # V=37 is not divisible by tp=2: the embedding shards are padded


def _full_weights():
    g = torch.Generator().manual_seed(0)
    return {
        "0.weight": torch.randn(V, IN, generator=g),
        "1.weight": torch.randn(HID, IN, generator=g),
        "1.bias": torch.randn(HID, generator=g),
        "2.weight": torch.randn(IN, HID, generator=g),
        "2.bias": torch.randn(IN, generator=g),
    }


def _net(group):
    net = nn.Sequential(
        VocabParallelEmbedding(V, IN, group=group),
        ColumnParallelLinear(IN, HID, bias=True, group=group),
        RowParallelLinear(HID, IN, bias=True, group=group),
    )
    w = _full_weights()
    net[0].shard_from_full_(weight=w["0.weight"])
    net[1].shard_from_full_(weight=w["1.weight"], bias=w["1.bias"])
    net[2].shard_from_full_(weight=w["2.weight"], bias=w["2.bias"])
    return net


def _train_step(net):
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    x = torch.randint(0, V, (4, 5), generator=torch.Generator().manual_seed(1))
    net(x).pow(2).sum().backward()
    opt.step()
    opt.zero_grad()
    return opt


def _save_tp(rank, world, root):
    groups = ParallelDims(world_size=world, rank=rank, local_rank=rank, tp=world).build("cpu")
    net = _net(groups.tp_group)
    opt = _train_step(net)
    cfg_yaml = to_yaml(load_config([str(REPO / "configs/models/tiny/llama.yaml")]))
    save_checkpoint(root, 1, net, opt, {}, cfg_yaml, tp_mesh=groups.submesh("tp"))
    out = {}
    for name, p in net.named_parameters():
        for key, t in (("param", p.detach()), *opt.state[p].items()):
            if key == "step":
                continue
            split = tp_split(p)
            if split is not None:
                parts = [torch.empty_like(t) for _ in range(world)]
                torch.distributed.all_gather(parts, t.contiguous(), group=groups.tp_group)
                t = torch.cat(parts, split.dim).narrow(split.dim, 0, split.length)
            out[(name, key)] = t.clone()
    return out


def test_tp2_checkpoint_loads_on_one_process(tmp_path):
    saved = run_distributed(_save_tp, 2, str(tmp_path))[0]
    single = _net(None)
    _train_step(single)  # the same step on one device: TP trains like one process
    for name, p in single.named_parameters():
        torch.testing.assert_close(saved[(name, "param")], p.detach(), rtol=1e-5, atol=1e-6)

    fresh = _net(None)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    load_checkpoint(resolve_checkpoint(tmp_path), fresh, fresh_opt, restore_rng=False)
    for name, p in fresh.named_parameters():  # what tp=2 saved, exactly
        assert torch.equal(p.detach(), saved[(name, "param")]), name
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(fresh_opt.state[p][key], saved[(name, key)]), (name, key)
