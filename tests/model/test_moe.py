"""Mixture of experts: router math against a token-by-token dense reference, grouped GEMM ==
loop, skewed loads, the balance loss by hand and against HF's, aux-loss-free bias balancing
(one process and two), capacity, metrics and init."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from evoformer.config.schema import MLPConfig, ModelConfig, MoEConfig
from evoformer.distributed.testing import run_distributed
from evoformer.model import build_model
from evoformer.model.layout import moe_spec
from evoformer.model.moe import MoE

TOL = 1e-5

ROUTERS = {
    # Mixtral: softmax, renormalised top-k.
    "mixtral": dict(num_experts=6, top_k=2),
    # Qwen3-MoE default: softmax probabilities as they are.
    "qwen3_moe": dict(num_experts=6, top_k=3, norm_topk_prob=False),
    # DeepSeek-V3: sigmoid, groups, selection bias, scaling, shared experts.
    "deepseek_v3": dict(
        num_experts=8,
        top_k=3,
        score="sigmoid",
        n_groups=4,
        topk_groups=2,
        routed_scaling=2.5,
        num_shared_experts=2,
        bias_update_rate=0.01,
    ),
}


def _cfg(n_layers: int = 1, **moe) -> ModelConfig:
    moe = {"expert_hidden": 16, **moe}
    return ModelConfig(
        vocab_size=64,
        d_model=32,
        n_layers=n_layers,
        max_seq_len=64,
        mlp=MLPConfig(kind="swiglu", hidden=48),
        moe=MoEConfig(**moe),
    )


def _moe(cfg: ModelConfig, seed: int = 0) -> MoE:
    m = MoE(moe_spec(cfg), layer_idx=0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
        if m.e_score_correction_bias is not None:
            m.e_score_correction_bias.copy_(0.1 * torch.randn(m.num_experts, generator=g))
    return m


def _reference(m: MoE, x_BTC: torch.Tensor) -> torch.Tensor:
    """Every token, one at a time, through its top-k experts written out naively."""
    ex = m.experts
    bias = m.e_score_correction_bias
    E, G = m.num_experts, m.n_groups
    out = []
    for x in x_BTC.reshape(-1, x_BTC.shape[-1]).double():
        logits = m.router.weight.double() @ x
        scores = logits.softmax(-1) if m.score == "softmax" else logits.sigmoid()
        choice = scores + (0 if bias is None else bias.double())
        if G > 1:
            groups = choice.view(G, E // G).topk(2, dim=-1).values.sum(-1)
            allowed = torch.zeros(E, dtype=torch.bool)
            for g in groups.topk(m.topk_groups).indices.tolist():
                allowed[g * (E // G) : (g + 1) * (E // G)] = True
            choice = choice.masked_fill(~allowed, -math.inf)
        chosen = choice.topk(m.top_k).indices
        w = scores[chosen]
        if m.norm_topk_prob:
            w = w / w.sum()
        y = torch.zeros_like(x)
        for e, we in zip(chosen.tolist(), m.routed_scaling * w):
            h = F.silu(ex.gate_proj[e].double() @ x) * (ex.up_proj[e].double() @ x)
            y += we * (ex.down_proj[e].double() @ h)
        if m.shared_experts is not None:
            s = m.shared_experts
            h = F.silu(s.gate_proj.weight.double() @ x) * (s.up_proj.weight.double() @ x)
            y += s.down_proj.weight.double() @ h
        out.append(y)
    return torch.stack(out).view(x_BTC.shape).float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("router", list(ROUTERS))
@pytest.mark.parametrize("grouped", [True, False])
def test_matches_dense_reference(router: str, grouped: bool) -> None:
    m = _moe(_cfg(**ROUTERS[router])).eval()
    m.experts.use_grouped_mm = grouped
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _rel(m(x), _reference(m, x)) <= TOL


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="no torch._grouped_mm")
def test_grouped_gemm_equals_loop_forward_and_backward() -> None:
    m = _moe(_cfg(**ROUTERS["deepseek_v3"]))
    assert m.experts._grouped(torch.zeros(1, 32))  # the auto choice on CPU fp32
    x = torch.randn(3, 11, 32, generator=torch.Generator().manual_seed(2))
    results = []
    for grouped in (True, False):
        m.zero_grad()
        m.experts.use_grouped_mm = grouped
        xg = x.clone().requires_grad_()
        y = m(xg)
        y.sum().backward()  # a broadcast gradient, which _grouped_mm's backward rejects raw
        results.append((y.detach(), xg.grad, [p.grad.clone() for p in m.parameters()]))
    (y1, gx1, gp1), (y2, gx2, gp2) = results
    assert _rel(y1, y2) <= TOL and _rel(gx1, gx2) <= TOL
    for (name, _), a, b in zip(m.named_parameters(), gp1, gp2):
        assert _rel(a, b) <= TOL, name


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("top_k", [1, 2])
def test_skewed_loads(grouped: bool, top_k: int) -> None:
    """A selection bias sends every token to expert 0 (top-1) or experts 0 and 5 (top-2): the
    other experts get no token, the GEMMs still run, and the load metrics say so."""
    m = _moe(_cfg(num_experts=6, top_k=top_k, score="sigmoid", bias_update_rate=0.5))
    m.experts.use_grouped_mm = grouped
    with torch.no_grad():
        m.e_score_correction_bias.copy_(torch.tensor([10.0, 0, 0, 0, 0, 5.0]))
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(3))
    y = m.train()(x)
    assert _rel(y.detach(), _reference(m, x)) <= TOL
    stats = m.end_of_step()
    share = [1.0, 0, 0, 0, 0, 0] if top_k == 1 else [0.5, 0, 0, 0, 0, 0.5]
    assert stats["moe/L0/share"] == share
    assert stats["moe/L0/max_over_mean"] == pytest.approx(6 / top_k)
    # Overloaded experts are pushed down, idle ones up, by exactly the rate.
    want = torch.tensor([10.0, 0, 0, 0, 0, 5.0]) + 0.5 * torch.tensor(
        [-1, 1, 1, 1, 1, -1 if top_k == 2 else 1]
    )
    assert torch.equal(m.e_score_correction_bias, want)


def test_balance_loss_by_hand() -> None:
    """E=4, K=2, three tokens with router probabilities written out:
    token 0: [.5, .25, .125, .125] -> experts 0, 1
    token 1: [.125, .5, .25, .125] -> experts 1, 2
    token 2: [.25, .125, .125, .5] -> experts 3, 0
    f = counts / N = [2, 2, 1, 1] / 3; P = mean probabilities = [.875, .875, .5, .75] / 3;
    loss = E * sum f P = 4 * (2*.875 + 2*.875 + .5 + .75) / 9 = 19/9."""
    probs = torch.tensor(
        [[0.5, 0.25, 0.125, 0.125], [0.125, 0.5, 0.25, 0.125], [0.25, 0.125, 0.125, 0.5]]
    )
    m = MoE(moe_spec(_cfg(num_experts=4, top_k=2, aux_loss_coef=0.1)), layer_idx=0).train()
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[:, :3] = probs.log().T  # token n is the n-th unit vector
        for p in m.experts.parameters():
            p.normal_()
    x = torch.eye(32)[:3].view(1, 3, 32)
    m(x)
    assert m.aux_loss.item() == pytest.approx(0.1 * 19 / 9, rel=1e-6)
    assert m.end_of_step()["moe/L0/aux_loss"] == pytest.approx(0.1 * 19 / 9, rel=1e-6)
    m.eval()(x)
    assert m.aux_loss is None  # only in training


def test_balance_loss_matches_hf_mixtral() -> None:
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    m = _moe(_cfg(num_experts=8, top_k=2, aux_loss_coef=0.02)).train()
    x = torch.randn(3, 10, 32, generator=torch.Generator().manual_seed(4))
    m(x)
    logits = F.linear(x.reshape(-1, 32), m.router.weight)
    ref = mixtral.load_balancing_loss_func((logits,), 8, 2)
    assert m.aux_loss.item() == pytest.approx(0.02 * ref.item(), rel=1e-6)
    # In a model the coefficient is shared by the MoE layers: the summed term is their mean.
    model = build_model(_cfg(n_layers=3, num_experts=4, aux_loss_coef=0.02), seed=0)
    assert {layer.mlp.aux_loss_coef for layer in model.layers} == {0.02 / 3}


def test_aux_loss_free_bias_balances_a_skewed_router() -> None:
    """Router weights frozen and biased towards the first experts: the selection bias alone
    evens the load out over the steps."""
    m = _moe(_cfg(num_experts=8, top_k=2, score="sigmoid", bias_update_rate=0.01)).train()
    x = torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(5)) + 1.0
    with torch.no_grad():
        m.e_score_correction_bias.zero_()
        m.router.weight.mul_(0.5)
        m.router.weight += torch.linspace(1.0, -1.0, 8)[:, None] / 32
    history = []
    for _ in range(50):
        m(x[:2])  # two micro-batches per step; the update sees both
        m(x[2:])
        history.append(m.end_of_step()["moe/L0/max_over_mean"])
    assert history[0] > 3.0
    assert max(history[-10:]) < 1.3
    assert m.e_score_correction_bias[0] < 0 < m.e_score_correction_bias[-1]


def _bias_worker(rank: int, world_size: int) -> list[float]:
    torch.manual_seed(0)
    m = _moe(_cfg(num_experts=6, top_k=2, score="sigmoid", bias_update_rate=0.1)).train()
    m.process_group = torch.distributed.group.WORLD  # the data-parallel ranks (here: all)
    x = torch.randn(world_size, 5, 32, generator=torch.Generator().manual_seed(6)) + 0.5
    m(x[rank : rank + 1])  # each rank routes different tokens
    m.end_of_step()
    return m.e_score_correction_bias.tolist()


def test_bias_update_uses_loads_of_all_ranks() -> None:
    got = run_distributed(_bias_worker, 2)
    m = _moe(_cfg(num_experts=6, top_k=2, score="sigmoid", bias_update_rate=0.1)).train()
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(6)) + 0.5
    m(x)  # one process seeing both ranks' tokens
    m.end_of_step()
    assert got[0] == got[1] == m.e_score_correction_bias.tolist()


def test_capacity_drops_overflow_in_training_only() -> None:
    m = _moe(_cfg(num_experts=4, top_k=1, score="sigmoid", capacity_factor=1.0))
    with torch.no_grad():
        m.e_score_correction_bias.copy_(torch.tensor([10.0, 0, 0, 0]))  # all to expert 0
    x = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(7))
    y = m.train()(x)
    # capacity = 1.0 * 8 tokens * 1 / 4 experts = 2: the first two tokens keep expert 0's output.
    assert m.end_of_step()["moe/L0/dropped"] == pytest.approx(6 / 8)
    ref = _reference(m, x)
    assert _rel(y[0, :2].detach(), ref[0, :2]) <= TOL
    assert y[0, 2:].abs().max().item() == 0.0
    assert _rel(m.eval()(x).detach(), ref) <= TOL


def test_metrics_only_after_training_forwards() -> None:
    m = _moe(_cfg(**ROUTERS["deepseek_v3"]))
    x = torch.randn(1, 4, 32)
    m.eval()(x)
    assert m.end_of_step() == {}
    m.train()(x)
    stats = m.end_of_step()
    assert sorted(stats) == [
        "moe/L0/bias_max",
        "moe/L0/bias_min",
        "moe/L0/max_over_mean",
        "moe/L0/share",
    ]
    assert sum(stats["moe/L0/share"]) == pytest.approx(1.0, abs=1e-3)
    assert m.end_of_step() == {}


def test_init_is_deterministic_and_scaled() -> None:
    cfg = _cfg(n_layers=4, num_experts=4, score="sigmoid", first_k_dense=1)
    cfg.init.scaled_residual = True
    a, b, c = build_model(cfg, seed=3), build_model(cfg, seed=3), build_model(cfg, seed=4)
    ex = a.layers[1].mlp.experts
    assert torch.equal(ex.gate_proj, b.layers[1].mlp.experts.gate_proj)
    assert not torch.equal(ex.gate_proj, c.layers[1].mlp.experts.gate_proj)
    # Named seeds: the same tensor in another layer or another matrix draws different numbers.
    assert not torch.equal(ex.gate_proj, a.layers[2].mlp.experts.gate_proj)
    assert not torch.equal(ex.gate_proj, ex.up_proj)
    assert ex.gate_proj.std().item() == pytest.approx(0.02, rel=0.05)
    assert ex.down_proj.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert torch.equal(a.layers[1].mlp.e_score_correction_bias, torch.zeros(4))
    assert "layers.1.mlp.e_score_correction_bias" in a.state_dict()  # checkpointed
