"""The model under tensor parallelism (2 gloo ranks) computes what one process computes.

For every block kind (dense GQA, KV heads fewer than tp, QK-norm per head and over the full
projection, sliding windows with local RoPE, ALiBi, PaLM parallel blocks, post-norm, biases and
learned positions, MLA, MoE with aux loss and aux-loss-free bias, MTP), with sequence parallelism
off and on: the initial global weights are bit-identical, the training loss and its terms, every
gathered gradient and the inference logits match the single-process model; and each transformer
block issues exactly the collectives of the Megatron scheme. Generation with the KV cache (and
MLA's latent cache) under tp=2 picks the tokens one process picks.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from evoformer.config import load_config
from evoformer.distributed.dims import ParallelDims
from evoformer.distributed.testing import run_distributed
from evoformer.model import build_model
from evoformer.model.generate import generate
from evoformer.parallel import count_collectives, sequence_parallel_params
from evoformer.parallel.collectives import _all_gather
from evoformer.parallel.layers import gather_full_params, sync_sequence_parallel_grads
from evoformer.parallel.sharding import shard_spec, tp_split
from tests.conftest import REPO

B, T = 2, 16
CASES = {
    "llama": ("llama", []),
    "llama-mqa": ("llama", ["model.attention.n_kv_heads=1"]),
    "olmo2": ("olmo2", []),
    "olmo2-mqa": ("olmo2", ["model.attention.n_kv_heads=1"]),
    "gpt2": ("gpt2", []),
    "gpt2-post": ("gpt2", ["model.norm.placement=post"]),
    "gemma3": ("gemma3", ["model.n_layers=2", "model.attention.global_every=2"]),
    "qwen2": ("qwen2", []),
    "alibi-parallel-block": ("llama", ["model.position.kind=alibi", "model.parallel_block=true"]),
    "mixtral": ("mixtral", []),
    "deepseek-v3": ("deepseek-v3", []),
    "deepseek-q-full-rank-mtp2": (
        "deepseek-v3",
        ["model.attention.q_lora_rank=0", "model.mtp.depth=2"],
    ),
    # Dropout of the residual stream: replicated regions draw the same mask as one process
    # (same RNG state on every TP rank), SP draws the global mask and slices it.
    "llama-dropout": ("llama", ["model.dropout=0.2"]),
}


def _model_cfg(family: str, overrides: list[str]):
    return load_config([str(REPO / f"configs/models/tiny/{family}.yaml")], overrides).model


def _full_grads(model: nn.Module, group) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        split = tp_split(p)
        if split is not None:
            g = _all_gather(g.contiguous(), group, split.dim).narrow(split.dim, 0, split.length)
        out[name] = g
    return out


def _block_counts(model: nn.Module, layer: int, sp: bool, tp: int) -> tuple[dict, dict]:
    """Collectives of one transformer block's forward and backward."""
    block = model.layers[layer]
    t = T // tp if sp else T
    x = torch.randn(B, t, model.cfg.d_model, generator=torch.Generator().manual_seed(3))
    x.requires_grad_()
    rope = model.rope(torch.arange(T)) if model.rope is not None else None
    with count_collectives() as fwd:
        y = block(x, rope)
    with count_collectives() as bwd:
        y.backward(torch.ones_like(y))
    return dict(fwd), dict(bwd)


def _worker(rank: int, world: int) -> dict:
    groups = ParallelDims(world, rank, rank, tp=world).build("cpu")
    group = groups.tp_group
    out = {}
    for case, (family, overrides) in CASES.items():
        cfg = _model_cfg(family, overrides)
        ids = torch.randint(
            0, cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(1)
        )
        x, y = ids[:, :-1], ids[:, 1:]
        ref = build_model(cfg, seed=0).train()
        torch.manual_seed(5)
        ref_out = ref(x, targets=y)
        ref_out.loss.backward()
        with torch.no_grad():
            ref_logits = ref.eval()(x)
        for sp in (False, True):
            model = build_model(cfg, seed=0, groups=groups, sequence_parallel=sp).train()
            init = gather_full_params(model, group)
            torch.manual_seed(5)
            res = model(x, targets=y)
            res.loss.backward()
            sync_sequence_parallel_grads(sequence_parallel_params(model), group)
            grads = _full_grads(model, group)
            with torch.no_grad():
                logits = model.eval()(x)
            scale = max(p.grad.abs().max().item() for p in ref.parameters())
            out[(case, sp)] = {
                "init_equal": all(torch.equal(init[n], p) for n, p in ref.named_parameters()),
                "names": list(init) == [n for n, _ in ref.named_parameters()],
                "metrics": {
                    k: (v.item(), ref_out.metrics[k].item()) for k, v in res.metrics.items()
                },
                # Per parameter: max |grad error| / (max |ref grad| + 1e-4 * the largest grad);
                # the floor covers gradients that are zero in exact arithmetic (GPT-2's key
                # bias, which the softmax ignores) and so are pure rounding on both sides.
                "grad_err": {
                    n: (
                        (grads[n] - p.grad).abs().max() / (p.grad.abs().max() + 1e-4 * scale)
                    ).item()
                    for n, p in ref.named_parameters()
                },
                "logits_err": ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item(),
                "logits_shape": tuple(logits.shape),
            }
    # Collectives per transformer block (Megatron: 2 all-reduces forward and 2 backward).
    for case, layer in (
        ("llama", 0),
        ("llama-mqa", 0),
        ("gpt2", 0),
        ("olmo2", 0),
        ("deepseek-v3", 1),
    ):
        cfg = _model_cfg(*CASES[case])
        for sp in (False, True):
            model = build_model(cfg, seed=0, groups=groups, sequence_parallel=sp).train()
            out[("block", case, sp)] = _block_counts(model, layer, sp, world)
    # Inference: greedy generation with the KV cache (local heads; MLA's latent cache).
    for case in ("llama-mqa", "deepseek-v3"):
        cfg = _model_cfg(*CASES[case])
        ref, model = build_model(cfg, seed=0).eval(), build_model(cfg, seed=0, groups=groups).eval()
        out[("generate", case)] = [
            generate(m, [5, 9, 17], 12, temperature=0, use_cache=True) for m in (ref, model)
        ]
    # The whole training step of the dense model: no full logits (no gather in the head).
    model = build_model(_model_cfg("llama", []), seed=0, groups=groups).train()
    ids = torch.randint(0, 512, (B, T + 1), generator=torch.Generator().manual_seed(1))
    with count_collectives() as fwd:
        loss = model(ids[:, :-1], targets=ids[:, 1:]).loss
    with count_collectives() as bwd:
        loss.backward()
    out["model_counts"] = (dict(fwd), dict(bwd))
    return out


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_distributed(_worker, 2, timeout=120)


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sp"])
@pytest.mark.parametrize("case", list(CASES))
def test_tp2_model_equals_one_process(results, case, sp):
    for rank, out in enumerate(results):
        r = out[(case, sp)]
        assert r["init_equal"] and r["names"], (rank, "global weights differ at init")
        for name, (got, want) in r["metrics"].items():
            assert got == pytest.approx(want, rel=1e-6, abs=1e-9), (rank, name)
        worst = max(r["grad_err"].items(), key=lambda kv: kv[1])
        assert worst[1] < 1e-5, (rank, worst)
        assert r["logits_shape"] == (B, T, 512)
        assert r["logits_err"] < 1e-6, rank


def test_tp2_generates_like_one_process(results):
    for out in results:
        for case in ("llama-mqa", "deepseek-v3"):
            ref, tp = out[("generate", case)]
            assert ref == tp, case


def test_block_collectives_follow_megatron(results):
    """A block is two column -> row pairs: without SP 2 all-reduces forward (after o_proj and
    down_proj) and 2 backward (the input gradients of the q/k/v and the gate/up group, each
    entered once); with SP each becomes an all-gather + a reduce-scatter. OLMo 2's QK-norm over
    the full projection adds one all-reduce each way (the q and k statistics stacked). MLA and
    MoE keep the dense block's count: the latents enter the TP region once, and the routed and
    shared experts are reduced once per layer."""
    dense = ({"all_reduce": 2}, {"all_reduce": 2})
    dense_sp = ({"all_gather": 2, "reduce_scatter": 2}, {"all_gather": 2, "reduce_scatter": 2})
    expected = {
        "llama": (dense, dense_sp),
        "llama-mqa": (dense, dense_sp),
        "gpt2": (dense, dense_sp),
        "deepseek-v3": (dense, dense_sp),
        "olmo2": (
            ({"all_reduce": 3}, {"all_reduce": 3}),
            (
                {"all_gather": 2, "reduce_scatter": 2, "all_reduce": 1},
                {"all_gather": 2, "reduce_scatter": 2, "all_reduce": 1},
            ),
        ),
    }
    for out in results:
        for case, (no_sp, with_sp) in expected.items():
            assert out[("block", case, False)] == no_sp, case
            assert out[("block", case, True)] == with_sp, case


def test_training_step_never_gathers_logits(results):
    # Forward: embedding 1 + 2 per block x 2 blocks + the cross-entropy's 2 = 7 all-reduces, no
    # all-gather; backward: 2 per block + the head's input gradient = 5.
    for out in results:
        assert out["model_counts"] == ({"all_reduce": 7}, {"all_reduce": 5})


def test_tp1_groups_give_the_plain_model():
    """A single process's ParallelGroups build the model unchanged: plain layers, same state."""
    cfg = _model_cfg("deepseek-v3", [])
    groups = ParallelDims(world_size=1, rank=0, local_rank=0).build("cpu")
    a, b = build_model(cfg, seed=3), build_model(cfg, seed=3, groups=groups)
    assert type(a.embed) is nn.Embedding and type(a.layers[0].attn.kv_b_proj) is nn.Linear
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not any(shard_spec(p) is not None for p in b.parameters())
