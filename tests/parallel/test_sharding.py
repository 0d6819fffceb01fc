"""``parallel.sharding``: the typed shard spec, its helpers and retagging, the DTensor views
checkpoints use -- and a check that no other module reads or writes raw sharding attributes."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from evoformer.distributed.testing import run_distributed
from evoformer.model.moe import GroupedExperts
from evoformer.parallel.layers import ColumnParallelLinear, RowParallelLinear
from evoformer.parallel.sharding import (
    KeepShardSpecs,
    ShardSpec,
    Split,
    ep_global_view,
    full_shape,
    has_partial_grad,
    is_expert_parallel,
    is_tp_sharded,
    local_piece,
    mark_expert_sharded,
    mark_partial_grad,
    mark_sharded,
    retag,
    set_shard_spec,
    shard_spec,
    shard_specs,
    shard_tensor,
    to_local,
    tp_global_view,
    tp_split,
)

ROOT = Path(__file__).resolve().parents[2] / "evoformer"
OWNER = Path("parallel/sharding.py")  # the one module allowed to touch the storage


# -- the spec ----------------------------------------------------------------------------------


def test_spec_queries_and_full_shape():
    spec = ShardSpec(tp=Split(1, 10), ep=Split(0, 8), ep_rank=3)
    assert spec.is_tp_sharded and spec.is_expert and not spec.partial_grad
    assert spec.full_shape((2, 5, 4)) == torch.Size([8, 10, 4])
    assert ShardSpec().full_shape((2, 5)) == torch.Size([2, 5])
    assert not ShardSpec().is_tp_sharded and not ShardSpec().is_expert
    with pytest.raises(AttributeError):  # frozen: a spec is replaced, never edited
        spec.ep_rank = 0


def test_attach_read_and_clear():
    p = nn.Parameter(torch.zeros(4, 3))
    assert shard_spec(p) is None and not is_tp_sharded(p) and tp_split(p) is None
    assert full_shape(p) == (4, 3)
    set_shard_spec(p, ShardSpec(tp=Split(0, 7)))
    assert shard_spec(p) == ShardSpec(tp=Split(0, 7)) and tp_split(p) == Split(0, 7)
    assert is_tp_sharded(p) and not is_expert_parallel(p) and not has_partial_grad(p)
    assert full_shape(p) == (7, 3)
    set_shard_spec(p, ShardSpec())  # the replicated default is stored as no spec at all
    assert shard_spec(p) is None
    set_shard_spec(p, ShardSpec(partial_grad=True))
    set_shard_spec(p, None)
    assert shard_spec(p) is None


def test_spec_travels_with_the_parameter_like_the_old_tags():
    # Pickling (torch.save of a module, spawn) keeps it; so does in-place .data replacement.
    p = nn.Parameter(torch.zeros(2, 3))
    set_shard_spec(p, ShardSpec(tp=Split(1, 6), partial_grad=True))
    assert shard_spec(pickle.loads(pickle.dumps(p))) == shard_spec(p)
    p.data = torch.ones(2, 3)
    assert shard_spec(p) == ShardSpec(tp=Split(1, 6), partial_grad=True)


def test_full_shape_of_a_deepspeed_partition_is_unpartitioned():
    p = nn.Parameter(torch.zeros(0))  # ZeRO-3 leaves an empty local tensor ...
    p.ds_shape = torch.Size([4, 6])  # ... and records the real shape (DeepSpeed's attribute)
    set_shard_spec(p, ShardSpec(tp=Split(1, 12)))
    assert full_shape(p) == (4, 12)


def test_mark_helpers_compose_and_skip_missing_parameters():
    m = nn.Module()
    m.w = nn.Parameter(torch.zeros(2, 3, 5))
    m.bias = None
    mark_sharded(m, "w", 1, 6)
    mark_expert_sharded(m, "w", 0, 8, rank=2)
    mark_partial_grad(m, "bias")  # None: nothing to mark, no error
    mark_sharded(m, "bias", 0, 6)
    assert shard_spec(m.w) == ShardSpec(tp=Split(1, 6), ep=Split(0, 8), ep_rank=2)
    assert full_shape(m.w) == (8, 6, 5)
    lin = nn.Linear(3, 3)
    mark_partial_grad(lin, "weight", "bias")
    assert has_partial_grad(lin.weight) and has_partial_grad(lin.bias)
    assert not is_tp_sharded(lin.weight)


def test_parallel_layers_declare_their_splits():
    col, row = ColumnParallelLinear(4, 6), RowParallelLinear(6, 4, sequence_parallel=False)
    assert shard_specs(col) == {
        "weight": ShardSpec(tp=Split(0, 6)),
        "bias": ShardSpec(tp=Split(0, 6)),
    }
    assert shard_specs(row) == {"weight": ShardSpec(tp=Split(1, 6))}  # bias replicated


# -- this rank's piece of a global tensor ------------------------------------------------------


def test_shard_tensor_pads_the_last_slices_with_zeros():
    full = torch.arange(5.0)
    assert shard_tensor(full, 0, 2, 1).tolist() == [2.0, 3.0]
    assert shard_tensor(full, 0, 2, 2).tolist() == [4.0, 0.0]
    assert shard_tensor(full, 0, 2, 3).tolist() == [0.0, 0.0]


def test_local_piece_cuts_experts_then_the_tp_slice():
    full = torch.arange(4 * 6 * 2.0).view(4, 6, 2)  # 4 experts, hidden 6, C 2
    p = nn.Parameter(torch.empty(2, 3, 2))  # ep 2, tp 2
    set_shard_spec(p, ShardSpec(tp=Split(1, 6), ep=Split(0, 4), ep_rank=1))
    assert full_shape(p) == full.shape
    torch.testing.assert_close(local_piece(full, p, tp_rank=1), full[2:4, 3:6], rtol=0, atol=0)
    q = nn.Parameter(torch.empty(4, 6, 2))
    assert local_piece(full, q) is full  # replicated: the global tensor itself


# -- retagging ---------------------------------------------------------------------------------


def test_retag_reattaches_specs_to_new_parameters_by_name():
    m = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    mark_sharded(m[0], "weight", 0, 8)
    mark_partial_grad(m[1], "bias")
    specs = shard_specs(m)
    assert specs == {"0.weight": ShardSpec(tp=Split(0, 8)), "1.bias": ShardSpec(partial_grad=True)}
    m[0].weight = nn.Parameter(torch.zeros(4, 3))  # what fully_shard / to_empty do
    m[1].bias = nn.Parameter(torch.zeros(2))
    assert shard_specs(m) == {}
    retag(m, specs)
    assert shard_specs(m) == specs


def test_to_empty_keeps_specs_only_through_keep_shard_specs():
    class Holder(KeepShardSpecs):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.empty(2, 3))
            mark_sharded(self, "w", 1, 6)

    with torch.device("meta"):
        kept, plain = Holder(), nn.Linear(3, 2)
        mark_sharded(plain, "weight", 0, 4)
        experts = GroupedExperts(4, 8, 6, lambda gate, up: torch.relu(gate) * up)
        mark_expert_sharded(experts, "up_proj", 0, 8, rank=1)
    old = kept.w
    for m in (kept, plain, experts):
        m.to_empty(device="cpu")
    assert kept.w is not old and shard_spec(kept.w) == ShardSpec(tp=Split(1, 6))
    assert shard_spec(plain.weight) is None  # why the model's modules derive from KeepShardSpecs
    assert shard_spec(experts.up_proj) == ShardSpec(ep=Split(0, 8), ep_rank=1)


# -- DTensor views (two gloo ranks) ------------------------------------------------------------


def _views(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    tp_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    ep_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    full = torch.arange(5 * 3.0).view(5, 3)  # 5 rows over 2 ranks: 3 each, one padding row
    local = shard_tensor(full, 0, 3, rank)
    view = tp_global_view(local, Split(0, 5), tp_mesh)
    experts = torch.arange(4 * 2 * 3.0).view(4, 2, 3)
    mine = experts[2 * rank : 2 * rank + 2]
    ev = ep_global_view(mine, ShardSpec(ep=Split(0, 4), ep_rank=rank), ep_mesh)
    return {
        "tp_full": view.full_tensor(),
        "tp_local": to_local(view).clone(),
        "shape": tuple(view.shape),
        "ep_full": ev.full_tensor(),
        "plain": to_local(local) is local,
    }


def test_dtensor_views_describe_the_unpadded_global_tensors():
    full = torch.arange(5 * 3.0).view(5, 3)
    experts = torch.arange(4 * 2 * 3.0).view(4, 2, 3)
    r0, r1 = run_distributed(_views, 2)
    for r in (r0, r1):
        assert r["shape"] == (5, 3) and r["plain"]
        torch.testing.assert_close(r["tp_full"], full, rtol=0, atol=0)
        torch.testing.assert_close(r["ep_full"], experts, rtol=0, atol=0)
    torch.testing.assert_close(r0["tp_local"], full[:3], rtol=0, atol=0)
    torch.testing.assert_close(r1["tp_local"], full[3:], rtol=0, atol=0)  # padding dropped


# -- nobody else touches the storage -----------------------------------------------------------

# The per-parameter attributes and per-module dicts the spec replaced: nothing outside
# parallel/sharding.py may read or write them, as attributes or through getattr & co.
RAW_ATTRS = {
    "tp_dim",
    "tp_full_size",
    "ep_dim",
    "ep_full_size",
    "ds_shape",
    "tp_shards",
    "ep_shards",
}
# Also ordinary words elsewhere (``ctx.ep_rank``, ``layer.sequence_parallel``): banned only as
# getattr/hasattr/setattr/delattr names, which is how the old parameter tags were read.
RAW_DYNAMIC = RAW_ATTRS | {"ep_rank", "sequence_parallel", "sequence_parallel_params"}
DYNAMIC = {"getattr", "hasattr", "setattr", "delattr"}


def _raw_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in RAW_ATTRS:
            found.append(f"{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in DYNAMIC:
            name = node.args[1] if len(node.args) > 1 else None
            if isinstance(name, ast.Constant) and name.value in RAW_DYNAMIC:
                found.append(f"{node.lineno}: {node.func.id}(..., {name.value!r})")
        elif isinstance(node, ast.Compare) and isinstance(node.left, ast.Constant):
            if node.left.value in RAW_ATTRS:  # "tp_shards" in module.__dict__
                found.append(f"{node.lineno}: {node.left.value!r} in ...")
    return found


def _violations(root: Path) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        if path.relative_to(root) != OWNER:
            bad += [f"{path.relative_to(root)}:{use}" for use in _raw_uses(path)]
    return bad


def test_only_the_sharding_module_touches_sharding_attributes():
    assert _violations(ROOT) == []


def test_the_attribute_check_can_fail(tmp_path):
    files = {
        "engine/a.py": "def f(p):\n    return p.tp_dim\n",
        "engine/b.py": "def f(p):\n    return getattr(p, 'ep_rank', 0)\n",
        "model/c.py": "def f(p):\n    p.ep_full_size = 4\n",
        "model/d.py": "def f(m):\n    return 'ep_shards' in m.__dict__\n",
        "engine/e.py": "def f(p):\n    return hasattr(p, 'sequence_parallel')\n",
        # ordinary words on other objects, and a local name: fine
        "engine/ok.py": "def f(c, tp_dim):\n    return c.ep_rank, c.sequence_parallel, tp_dim\n",
        "parallel/sharding.py": "def f(p):\n    return getattr(p, 'ds_shape', p.shape)\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    bad = _violations(tmp_path)
    assert [b.split(":")[0] for b in bad] == [
        "engine/a.py",
        "engine/b.py",
        "engine/e.py",
        "model/c.py",
        "model/d.py",
    ]
