"""Gated DeltaNet and Mamba-2: the chunked (training) and recurrent (decoding) forms compute the
same function, cached decoding equals recomputing, the decoding state does not grow with the
sequence, and the layer patterns resolve as configured."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from evoformer.config import load_config
from evoformer.errors import UserError
from evoformer.model import build_model
from evoformer.model.costs import kv_cache_bytes_per_token, recurrent_state_bytes
from evoformer.model.deltanet import chunked_delta_rule, recurrent_delta_rule
from evoformer.model.generate import generate
from evoformer.model.layout import layer_plan
from evoformer.model.mamba import chunked_ssd, recurrent_ssd
from evoformer.model.mixers import RecurrentState
from tests.conftest import REPO

TOL = 1e-5
HYBRIDS = ["qwen3-next", "nemotron-h"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def tiny(name: str, *overrides: str):
    return load_config([str(REPO / f"configs/models/tiny/{name}.yaml")], overrides).model


@pytest.mark.parametrize("T, chunk", [(37, 8), (16, 16), (5, 64)])
def test_delta_rule_chunked_equals_recurrent(T: int, chunk: int) -> None:
    g = torch.Generator().manual_seed(0)
    B, H, K, V = 2, 3, 8, 6
    q = torch.randn(B, H, T, K, generator=g) * K**-0.5
    k = F.normalize(torch.randn(B, H, T, K, generator=g), dim=-1)
    v = torch.randn(B, H, T, V, generator=g)
    decay = -torch.rand(B, H, T, generator=g) * 2
    beta = torch.rand(B, H, T, generator=g)
    state = torch.randn(B, H, K, V, generator=g)
    out_c, s_c = chunked_delta_rule(q, k, v, decay, beta, chunk, state)
    out_r, s_r = recurrent_delta_rule(q, k, v, decay, beta, state)
    assert rel(out_c, out_r) <= TOL and rel(s_c, s_r) <= TOL


@pytest.mark.parametrize("T, chunk", [(37, 8), (16, 16), (5, 64)])
def test_ssd_chunked_equals_recurrent(T: int, chunk: int) -> None:
    g = torch.Generator().manual_seed(1)
    B, H, P, N = 2, 4, 6, 8
    x = torch.randn(B, T, H, P, generator=g)
    dt = F.softplus(torch.randn(B, T, H, generator=g))
    A = -torch.rand(H, generator=g) * 4
    Bm, Cm = torch.randn(B, T, H, N, generator=g), torch.randn(B, T, H, N, generator=g)
    state = torch.randn(B, H, P, N, generator=g)
    y_c, s_c = chunked_ssd(x, dt, A, Bm, Cm, chunk, state)
    y_r, s_r = recurrent_ssd(x, dt, A, Bm, Cm, state)
    assert rel(y_c, y_r) <= TOL and rel(s_c, s_r) <= TOL


@pytest.mark.parametrize("name", HYBRIDS)
def test_cached_decoding_equals_full_forward(name: str) -> None:
    """Prefill 21 tokens (several chunks: chunk_size 8), then decode 11 one at a time: the
    logits equal one forward over all 32 (chunked form vs recurrent form, whole model)."""
    cfg = tiny(name, "model.deltanet.chunk_size=8", "model.mamba.chunk_size=8")
    model = build_model(cfg, seed=3).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids)
        caches = model.new_caches(2, 32)
        steps = [model(ids[:, :21], caches)]
        steps += [model(ids[:, t : t + 1], caches) for t in range(21, 32)]
    assert rel(torch.cat(steps, dim=1), full) <= TOL
    assert caches[0].length == 32


@pytest.mark.parametrize("name", HYBRIDS)
def test_greedy_with_and_without_cache_agree(name: str) -> None:
    model = build_model(tiny(name), seed=11).eval()
    with torch.no_grad():  # sharpen, so greedy decoding is not a run of near-ties
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(5)
    prompt = [5, 17, 99, 3, 250]
    cached = generate(model, prompt, 30, temperature=0, use_cache=True)
    assert cached == generate(model, prompt, 30, temperature=0, use_cache=False)
    assert len(cached) == 30 and len(set(cached)) > 3


@pytest.mark.parametrize("name", HYBRIDS)
def test_recurrent_state_is_constant_in_length(name: str) -> None:
    """The state a DeltaNet / Mamba-2 layer decodes with is the same size after 8 or 64
    tokens, and the inspector's formula counts it exactly (fp32 model: 4-byte conv windows)."""
    cfg = tiny(name)
    model = build_model(cfg, seed=0).eval()
    sizes = []
    for T in (8, 64):
        caches = model.new_caches(1, T)
        with torch.no_grad():
            model(torch.zeros(1, T, dtype=torch.long), caches)
        sizes.append([c.nbytes() for c in caches if isinstance(c, RecurrentState)])
    assert sizes[0] == sizes[1] and len(sizes[0]) > 0
    plan = layer_plan(cfg)
    expected = [recurrent_state_bytes(cfg, s, 4) for s in plan if s.mixer in ("deltanet", "mamba2")]
    assert sizes[0] == expected
    kv = kv_cache_bytes_per_token(cfg, dtype_bytes=4, context_len=64)
    assert kv["state"] == sum(expected)
    assert kv["per_token"] == sum(s.mixer == "attention" for s in plan) * 2 * cfg.kv_heads * 4 * (
        cfg.head_dim
    )


def test_patterns_resolve_per_layer() -> None:
    q = layer_plan(tiny("qwen3-next"))
    assert [s.mixer for s in q] == ["deltanet"] * 3 + ["attention"]
    assert [s.mlp for s in q] == ["moe"] * 4
    n = layer_plan(tiny("nemotron-h"))
    assert [(s.mixer, s.mlp) for s in n] == [
        ("mamba2", "none"),
        ("none", "dense"),
        ("mamba2", "none"),
        ("none", "dense"),
        ("attention", "none"),
        ("none", "dense"),
    ]


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.mixer_pattern=AGX", "letters must be from"),
        ("model.mixer_pattern=GGA", "must divide model.n_layers=4"),
        ("model.mlp_pattern=DE", None),  # valid: MoE model
        ("model.deltanet.n_key_heads=3", "must divide n_heads=4"),
        ("data.document_masking=true", "carry state across document boundaries"),
        ("model.position.partial_rotary=1.5", "partial_rotary"),
    ],
)
def test_pattern_validation(override: str, message: str | None) -> None:
    path = str(REPO / "configs/models/tiny/qwen3-next.yaml")
    if message is None:
        load_config([path], [override])
        return
    with pytest.raises(UserError, match=message):
        load_config([path], [override])
