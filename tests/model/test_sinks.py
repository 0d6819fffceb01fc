"""Attention sinks (gpt-oss) on every attention path, the clamped SwiGLU and biased experts.

- ``sdpa_with_sinks`` equals the explicit softmax with the sink column (values and gradients,
  fp64) for plain causal, a sliding window, an additive bias and a decoding step;
- in the model: packed documents equal the documents alone, cached decoding equals the full
  forward, and the sink is really in the denominator (a changed sink changes the logits);
- the clamped SwiGLU is gpt-oss's formula, and biased experts give the same output on the
  grouped-GEMM and the per-expert loop paths.
Tensor-parallel head sharding of the sink is trained in tests/engine/test_tp_training.py.
"""

from __future__ import annotations

from typing import cast

import pytest
import torch

from evoformer.config import load_config
from evoformer.data.dataset import document_ids_from_eod
from evoformer.model import build_model
from evoformer.model.attention import Attention
from evoformer.model.mlp import clamped_swiglu
from evoformer.model.moe import MoE
from evoformer.model.sinks import sdpa_with_sinks
from tests.conftest import REPO

B, H, T, D = 2, 3, 9, 8


def _explicit(q, k, v, sinks, allowed=None, bias=None):
    """The definition: scores with a sink column appended, softmax, the sink's share dropped."""
    scores = q @ k.transpose(-1, -2) * D**-0.5
    if bias is not None:
        scores = scores + bias
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    sink = sinks.view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
    return torch.cat([scores, sink], dim=-1).softmax(dim=-1)[..., :-1] @ v


def _inputs(S: int = T):
    g = torch.Generator().manual_seed(0)
    make = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    return make(B, H, T, D), make(B, H, S, D), make(B, H, S, D), make(H)


CAUSAL = torch.ones(T, T, dtype=torch.bool).tril()
WINDOW = CAUSAL & (torch.arange(T)[:, None] - torch.arange(T)[None, :] < 3)


@pytest.mark.parametrize("case", ["causal", "window", "bias", "decode"])
def test_sdpa_with_sinks_is_the_definition(case: str) -> None:
    S = T + 4 if case == "decode" else T
    q, k, v, sinks = _inputs(S)
    if case == "causal":
        got, want = (
            sdpa_with_sinks(q, k, v, sinks, is_causal=True),
            _explicit(q, k, v, sinks, CAUSAL),
        )
    elif case == "window":
        got, want = sdpa_with_sinks(q, k, v, sinks, WINDOW), _explicit(q, k, v, sinks, WINDOW)
    elif case == "bias":
        bias = -0.3 * torch.rand(H, T, T, dtype=torch.float64)
        bias = bias.masked_fill(~CAUSAL, float("-inf"))
        got, want = sdpa_with_sinks(q, k, v, sinks, bias), _explicit(q, k, v, sinks, bias=bias)
    else:  # new tokens against a longer cache, every key visible
        got, want = sdpa_with_sinks(q, k, v, sinks), _explicit(q, k, v, sinks)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(got.square().sum(), (q, k, v, sinks))
    refs = torch.autograd.grad(want.square().sum(), (q, k, v, sinks))
    for g, r in zip(grads, refs):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    assert refs[3].abs().min() > 1e-6  # the sink gets a real gradient


def _model(seed: int = 1):
    cfg = load_config([str(REPO / "configs/models/tiny/gpt-oss.yaml")]).model
    model = build_model(cfg, seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # sinks and biases away from their zero init
        for name, p in model.named_parameters():
            if name.endswith(("sinks", "bias")):
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def test_packed_documents_equal_documents_alone() -> None:
    model = _model()
    g = torch.Generator().manual_seed(3)
    eod = 3
    parts = [torch.randint(4, 512, (n,), generator=g) for n in (11, 20, 9)]  # past the window 16
    for p in parts[1:]:
        p[0] = eod
    x = torch.cat(parts)[None]
    with torch.no_grad():
        packed = model(x, document_ids=document_ids_from_eod(x, eod))[0]
        start = 0
        for p in parts:
            alone = model(p[None])[0]
            torch.testing.assert_close(packed[start : start + len(p)], alone, rtol=1e-5, atol=1e-5)
            start += len(p)


def test_cached_decoding_equals_the_full_forward() -> None:
    model = _model()
    x = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(x)
        caches = model.new_caches(2, 40)
        steps = [model(x[:, :10], caches)]  # prefill
        steps.append(model(x[:, 10:13], caches))  # several new tokens after a prefill
        steps += [model(x[:, t : t + 1], caches) for t in range(13, 40)]  # one at a time
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_the_sink_is_in_the_denominator() -> None:
    model = _model()
    x = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = model(x)
        attn = cast(Attention, model.layers[0].attn)
        assert attn.sinks is not None
        attn.sinks.add_(3.0)
        after = model(x)
    assert (after - before).abs().max() > 1e-3


def test_clamped_swiglu_is_gpt_oss_formula() -> None:
    gate = torch.tensor([-20.0, -1.0, 0.5, 9.0])
    up = torch.tensor([-9.0, 0.3, 2.0, 8.0])
    got = clamped_swiglu(gate, up, limit=7.0, alpha=1.702)
    g = torch.tensor([-20.0, -1.0, 0.5, 7.0])  # clamped above only
    u = torch.tensor([-7.0, 0.3, 2.0, 7.0])  # clamped both ways
    torch.testing.assert_close(got, (u + 1) * g * torch.sigmoid(1.702 * g))


def test_biased_experts_grouped_and_loop_paths_agree() -> None:
    model = _model()
    experts = cast(MoE, model.layers[0].mlp).experts
    x = torch.randn(30, 64, generator=torch.Generator().manual_seed(6))
    counts = torch.tensor([7, 0, 15, 8])
    with torch.no_grad():
        experts.use_grouped_mm = True
        grouped = experts(x, counts)
        experts.use_grouped_mm = False
        loop = experts(x, counts)
    torch.testing.assert_close(grouped, loop, rtol=1e-5, atol=1e-6)
    assert experts.down_proj_bias.abs().sum() > 0
