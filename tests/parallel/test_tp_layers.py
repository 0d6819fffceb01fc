"""Tensor-parallel layers on 2 gloo ranks equal the single-device layers filled from the same
global weights: forward, every gradient, with and without sequence parallelism; and they issue
exactly the collectives of the Megatron scheme."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from evoformer.distributed.dims import ParallelDims
from evoformer.distributed.testing import run_distributed
from evoformer.parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelLMHead,
    count_collectives,
    gather_vocab_logits,
    sequence_parallel_params,
    sync_sequence_parallel_grads,
    vocab_parallel_cross_entropy,
)
from evoformer.parallel.sharding import tp_split

B, T, C, H, V = 2, 6, 8, 12, 37  # V=37 does not divide tp=2: the vocabulary is padded
TOL = {"rtol": 1e-5, "atol": 1e-6}


def _global_weights() -> dict[str, torch.Tensor]:
    # Scaled like a real init (std 1/sqrt(fan_in)), so activations are O(1) and the tolerance
    # measures rounding, not cancellation in huge sums.
    g = torch.Generator().manual_seed(0)
    shapes = {"emb": (V, C), "w1": (H, C), "b1": (H,), "w2": (C, H), "b2": (C,), "head": (V, C)}
    return {k: torch.randn(s, generator=g) * s[-1] ** -0.5 for k, s in shapes.items()}


def _reference(w: dict, ids, targets):
    """The single-device net: embedding -> residual MLP (fc1, gelu, fc2) -> head -> CE."""
    emb, head = nn.Embedding(V, C), nn.Linear(C, V, bias=False)
    fc1, fc2 = nn.Linear(C, H), nn.Linear(H, C)
    with torch.no_grad():
        pairs = [
            (emb.weight, "emb"),
            (fc1.weight, "w1"),
            (fc1.bias, "b1"),
            (fc2.weight, "w2"),
            (fc2.bias, "b2"),
            (head.weight, "head"),
        ]
        for p, name in pairs:
            p.copy_(w[name])
    x = emb(ids)
    x = x + fc2(F.gelu(fc1(x)))
    logits = head(x)
    loss = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-1)
    loss.backward()
    grads = {
        "emb": emb.weight.grad,
        "w1": fc1.weight.grad,
        "b1": fc1.bias.grad,
        "w2": fc2.weight.grad,
        "b2": fc2.bias.grad,
        "head": head.weight.grad,
    }
    return loss.detach(), logits.detach(), grads


def _mlp_pair(rank, group, sp, w, x, dy, **kw):
    """Column -> gelu -> row on this rank's (sequence shard of the) input; returns the output,
    the input gradient, the layers and the collective counts in forward and backward."""
    fc1 = ColumnParallelLinear(C, H, True, group, sequence_parallel=sp, **kw.get("col", {}))
    fc2 = RowParallelLinear(H, C, True, group, sequence_parallel=sp, **kw.get("row", {}))
    fc1.shard_from_full_(weight=w["w1"], bias=w["b1"])
    fc2.shard_from_full_(weight=w["w2"], bias=w["b2"])
    if sp:
        x, dy = x.chunk(2, 1)[rank], dy.chunk(2, 1)[rank]
    x = x.clone().requires_grad_()
    with count_collectives() as fwd:
        y = fc2(F.gelu(fc1(x)))
    with count_collectives() as bwd:
        y.backward(dy)
    sync_sequence_parallel_grads(sequence_parallel_params(fc2), group)
    return y.detach(), x.grad, fc1, fc2, dict(fwd), dict(bwd)


def _worker(rank: int, world: int) -> dict:
    group = ParallelDims(world, rank, rank, tp=world).build("cpu").tp_group
    w = _global_weights()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, T), generator=gen)
    targets = torch.randint(0, V, (B, T), generator=gen)
    targets[0, :2] = -1  # ignored positions
    x, dy = torch.randn(B, T, C, generator=gen), torch.randn(B, T, C, generator=gen)

    # Single-device references.
    fc1, fc2 = nn.Linear(C, H), nn.Linear(H, C)
    with torch.no_grad():
        fc1.weight.copy_(w["w1"]), fc1.bias.copy_(w["b1"])
        fc2.weight.copy_(w["w2"]), fc2.bias.copy_(w["b2"])
    xr = x.clone().requires_grad_()
    yr = fc2(F.gelu(fc1(xr)))
    yr.backward(dy)
    ref_loss, ref_logits, ref_grads = _reference(w, ids, targets)

    out = {}
    for sp in (False, True):
        y, dx, c1, c2, fwd, bwd = _mlp_pair(rank, group, sp, w, x, dy)
        seq = (lambda t: t.chunk(world, 1)[rank]) if sp else (lambda t: t)  # noqa: E731
        out[f"mlp_sp{sp:d}"] = [
            (y, seq(yr.detach())),
            (dx, seq(xr.grad)),
            (c1.weight.grad, c1.shard_of("weight", fc1.weight.grad)),
            (c1.bias.grad, c1.shard_of("bias", fc1.bias.grad)),
            (c2.weight.grad, c2.shard_of("weight", fc2.weight.grad)),
            (c2.bias.grad, fc2.bias.grad),
        ]
        out[f"counts_sp{sp:d}"] = (fwd, bwd)

    # Column with gather_output -> row splitting a replicated input: same MLP, other plumbing.
    kw = {"col": {"gather_output": True}, "row": {"input_is_parallel": False}}
    y, dx, c1, c2, fwd, bwd = _mlp_pair(rank, group, False, w, x, dy, **kw)
    out["mlp_gathered"] = [
        (y, yr.detach()),
        (dx, xr.grad),
        (c2.weight.grad, c2.shard_of("weight", fc2.weight.grad)),
    ]

    # The whole tiny net: vocab-parallel embedding (padded), MLP, vocab-parallel head and CE.
    for sp in (False, True):
        emb = VocabParallelEmbedding(V, C, group, sequence_parallel=sp)
        head = VocabParallelLMHead(C, V, group, sequence_parallel=sp)
        c1 = ColumnParallelLinear(C, H, True, group, sequence_parallel=sp)
        c2 = RowParallelLinear(H, C, True, group, sequence_parallel=sp)
        emb.shard_from_full_(weight=w["emb"])
        head.shard_from_full_(weight=w["head"])
        c1.shard_from_full_(weight=w["w1"], bias=w["b1"])
        c2.shard_from_full_(weight=w["w2"], bias=w["b2"])
        with count_collectives() as fwd:
            h = emb(ids)
            h = h + c2(F.gelu(c1(h)))
            logits = head(h)
            loss = vocab_parallel_cross_entropy(
                logits, targets, group, head.vocab_start, head.vocab_end
            )
        with count_collectives() as bwd:
            loss.backward()
        sync_sequence_parallel_grads(sequence_parallel_params(c2), group)
        full_logits = gather_vocab_logits(logits, group, V)
        out[f"net_sp{sp:d}"] = [
            (loss.detach(), ref_loss),
            (full_logits, ref_logits),
            (emb.weight.grad, emb.shard_of("weight", ref_grads["emb"])),
            (head.weight.grad, head.shard_of("weight", ref_grads["head"])),
            (c1.weight.grad, c1.shard_of("weight", ref_grads["w1"])),
            (c1.bias.grad, c1.shard_of("bias", ref_grads["b1"])),
            (c2.weight.grad, c2.shard_of("weight", ref_grads["w2"])),
            (c2.bias.grad, ref_grads["b2"]),
            (emb.gather_full("weight"), w["emb"]),
            (c2.gather_full("weight"), w["w2"]),
        ]
        out[f"net_counts_sp{sp:d}"] = (dict(fwd), dict(bwd))
        out["emb_rows"] = (emb.weight.shape[0], emb.shard_start, emb.vocab_end)
    return out


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_distributed(_worker, 2)


@pytest.mark.parametrize("case", ["mlp_sp0", "mlp_sp1", "mlp_gathered", "net_sp0", "net_sp1"])
def test_tp2_equals_single_device(results, case):
    for rank, out in enumerate(results):
        for i, (actual, expected) in enumerate(out[case]):
            where = f"{case}[{i}] rank {rank}"
            torch.testing.assert_close(actual, expected, **TOL, msg=lambda m, w=where: f"{w}: {m}")


def test_vocab_padding_layout(results):
    # V=37 over tp=2 -> padded to 38, 19 rows per rank; rank 1's last row is padding.
    assert results[0]["emb_rows"] == (19, 0, 19)
    assert results[1]["emb_rows"] == (19, 19, 37)


def test_collective_counts_follow_megatron(results):
    """Megatron-LM (Shoeybi et al. 2019, Korthikanti et al. 2022): a column -> row pair costs
    one all-reduce forward (g, after the row matmul) and one backward (f, before the column
    matmul). With sequence parallelism g becomes a reduce-scatter and f an all-gather along T,
    and backward mirrors it: all-gather (of g's gradient) + reduce-scatter (of f's). Megatron
    additionally re-gathers the column input in backward to avoid keeping it; we keep it, so
    backward has one all-gather, not two."""
    for out in results:
        assert out["counts_sp0"] == ({"all_reduce": 1}, {"all_reduce": 1})
        assert out["counts_sp1"] == (
            {"all_gather": 1, "reduce_scatter": 1},
            {"all_gather": 1, "reduce_scatter": 1},
        )
        # Whole net: embedding all-reduce, MLP g, CE's max + (sum-exp, target) all-reduces;
        # backward the f of the MLP and of the head. Under SP the embedding reduce-scatters
        # and the head gathers; the CE keeps its 2 all-reduces and needs none backward.
        assert out["net_counts_sp0"] == ({"all_reduce": 4}, {"all_reduce": 2})
        assert out["net_counts_sp1"] == (
            {"all_reduce": 2, "all_gather": 2, "reduce_scatter": 2},
            {"all_gather": 2, "reduce_scatter": 2},
        )


# -- single process: tp=1 is a plain layer ---------------------------------------------------


def test_tp1_layers_are_plain_linear_and_embedding():
    torch.manual_seed(0)
    col, row = ColumnParallelLinear(C, H), RowParallelLinear(H, C, bias=False)
    emb, head = VocabParallelEmbedding(V, C), VocabParallelLMHead(C, V)
    torch.manual_seed(0)
    ref = nn.Linear(C, H)
    assert list(col.state_dict()) == ["weight", "bias"] and list(row.state_dict()) == ["weight"]
    assert col.weight.shape == (H, C) and row.weight.shape == (C, H)
    assert emb.weight.shape == (V, C) and head.weight.shape == (V, C)
    torch.testing.assert_close(col.weight, ref.weight, rtol=0, atol=0)  # nn.Linear's init
    x = torch.randn(B, T, C)
    with count_collectives() as n:
        torch.testing.assert_close(col(x), ref(x), rtol=0, atol=0)
        ids = torch.randint(0, V, (B, T))
        torch.testing.assert_close(emb(ids), F.embedding(ids, emb.weight), rtol=0, atol=0)
    assert sum(n.values()) == 0


def test_sharding_metadata_survives_meta_materialisation():
    with torch.device("meta"):
        layers = nn.ModuleList(
            [
                ColumnParallelLinear(C, H),
                RowParallelLinear(H, C),
                VocabParallelEmbedding(V, C, pad_to_multiple_of=8),
            ]
        )
    layers.to_empty(device="cpu")
    col, row, emb = layers

    def tp_dim(p):
        return None if tp_split(p) is None else tp_split(p).dim

    assert (tp_dim(col.weight), tp_dim(col.bias), tp_dim(row.weight), tp_dim(row.bias)) == (
        0,
        0,
        1,
        None,
    )
    split = tp_split(emb.weight)
    assert (split.dim, split.length, emb.padded_num_embeddings) == (0, V, 40)
    assert emb.full_shape("weight") == (V, C) and emb.weight.shape == (40, C)
    w = torch.randn(V, C)
    emb.shard_from_full_(weight=w)
    torch.testing.assert_close(emb.gather_full("weight"), w, rtol=0, atol=0)
    assert emb.weight[V:].abs().sum() == 0  # padding rows are zeros
    with pytest.raises(ValueError, match="expected"):
        emb.shard_from_full_(weight=torch.randn(V + 1, C))
