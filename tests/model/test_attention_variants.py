"""Attention, norm and position variants against hand-written references: sliding-window masks,
ALiBi (slopes, scores, HF MPT parity), QK-norm, unit-offset RMSNorm, softmax scale, linear RoPE
scaling, the parallel block, and a training smoke test per architecture kind."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from evoformer.config.schema import (
    AttentionConfig,
    Config,
    MLPConfig,
    ModelConfig,
    NormConfig,
    PositionConfig,
    RopeScalingConfig,
)
from evoformer.config.validate import validate_model
from evoformer.errors import UserError
from evoformer.model import attention as attention_mod
from evoformer.model import build_model
from evoformer.model.attention import alibi_bias, causal_window_mask
from evoformer.model.norms import RMSNorm
from evoformer.model.positions import alibi_slopes, apply_rope, rope_inv_freq


def _cfg(**kw) -> ModelConfig:
    """A tiny pre-norm RoPE model; keyword groups override whole sub-configs."""
    base = dict(
        vocab_size=97,
        d_model=32,
        n_layers=2,
        max_seq_len=64,
        norm=NormConfig(kind="rmsnorm", eps=1e-5),
        attention=AttentionConfig(n_heads=4, n_kv_heads=2),
        mlp=MLPConfig(kind="swiglu", hidden=48),
    )
    return ModelConfig(**{**base, **kw})


def _reference_attention(attn, x, rope=None, bias_HTS=None, window=None):
    """Eager softmax attention with every variant spelled out step by step."""
    B, T, _ = x.shape
    H, K, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q, k = attn.q_proj(x), attn.k_proj(x)
    if attn.qk_norm == "full":
        q, k = attn.q_norm(q), attn.k_norm(k)
    q = q.view(B, T, H, D).transpose(1, 2)
    k = k.view(B, T, K, D).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, K, D).transpose(1, 2)
    if attn.qk_norm == "head":
        q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    k, v = k.repeat_interleave(H // K, 1), v.repeat_interleave(H // K, 1)
    scale = attn.scale if attn.scale is not None else 1 / math.sqrt(D)
    scores = q @ k.transpose(-1, -2) * scale
    if bias_HTS is not None:
        scores = scores + bias_HTS
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    hidden = (j > i) | ((i - j >= window) if window is not None else False)
    scores = scores.masked_fill(hidden, float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * D)
    return attn.o_proj(out)


# -- sliding-window masks ---------------------------------------------------------------------


@pytest.mark.parametrize("T, S, window", [(7, 7, 3), (7, 7, 1), (7, 7, 7), (1, 9, 4), (3, 10, 4)])
def test_window_mask_matches_hand_built_reference(T: int, S: int, window: int) -> None:
    ref = torch.zeros(T, S, dtype=torch.bool)
    for t in range(T):
        q = S - T + t  # absolute position of the new token
        for s in range(S):
            ref[t, s] = q - window < s <= q
    assert torch.equal(causal_window_mask(T, S, window), ref)


def test_window_off_by_one_against_hf() -> None:
    # HF's own mask function: key kv visible from query q iff kv <= q and kv > q - window.
    masking = pytest.importorskip("transformers.masking_utils")
    fn = masking.sliding_window_causal_mask_function(4)
    want = torch.tensor(
        [[bool(fn(0, 0, torch.tensor(q), torch.tensor(kv))) for kv in range(9)] for q in range(9)]
    )
    assert torch.equal(causal_window_mask(9, 9, 4), want)
    # The window counts the query itself: 4 tokens, positions 5..8 for query 8.
    assert causal_window_mask(9, 9, 4)[8].nonzero().flatten().tolist() == [5, 6, 7, 8]


def test_sliding_window_attention_matches_reference() -> None:
    cfg = _cfg(attention=AttentionConfig(n_heads=4, n_kv_heads=2, sliding_window=5))
    model = build_model(cfg, seed=0)
    attn = model.layers[0].attn
    x = torch.randn(2, 12, cfg.d_model)
    rope = model.rope(torch.arange(12))
    ref = _reference_attention(attn, x, rope, window=5)
    torch.testing.assert_close(attn(x, rope), ref, rtol=1e-5, atol=1e-6)
    # ...and the window changes the result (a wrong mask cannot pass by accident).
    assert (attn(x, rope) - _reference_attention(attn, x, rope, window=6)).abs().max() > 1e-3


def test_masks_are_built_once_and_only_when_needed(monkeypatch) -> None:
    builds = []
    real = attention_mod.causal_window_mask

    def counting(*args, **kwargs):
        builds.append(args[:3])
        return real(*args, **kwargs)

    monkeypatch.setattr(attention_mod, "causal_window_mask", counting)
    attention_mod._shared_mask.cache_clear()
    ids = torch.randint(0, 97, (2, 16))
    # Default path, and a window the sequence never exceeds: SDPA is_causal, no mask at all.
    build_model(_cfg(n_layers=3), seed=0)(ids)
    build_model(_cfg(attention=AttentionConfig(n_heads=4, sliding_window=16)), seed=0)(ids)
    assert builds == []
    # A binding window: one mask serves all 4 layers, and the next forward reuses it.
    windowed = build_model(_cfg(n_layers=4, attention=AttentionConfig(n_heads=4, sliding_window=5)))
    windowed(ids)
    windowed(ids)
    assert builds == [(16, 16, 5)]


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_masks_from_inference_mode_stay_there(position: str, monkeypatch) -> None:
    # Autograd may not save inference tensors (some SDPA backends save the mask), so a mask
    # memoised under inference_mode must not be handed to a training forward.
    cfg = _cfg(
        position=PositionConfig(kind=position),
        attention=AttentionConfig(n_heads=4, sliding_window=3),
    )
    model = build_model(cfg, seed=0)
    ids = torch.randint(0, 97, (2, 9))
    with torch.inference_mode():
        model(ids)
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, attn_mask=None, **kwargs):
        seen.append(attn_mask.is_inference())
        return sdpa(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model(ids, targets=ids).loss.backward()
    assert seen == [False, False]
    assert model.layers[0].attn.q_proj.weight.grad.abs().sum() > 0


# -- ALiBi ------------------------------------------------------------------------------------


def test_alibi_slopes_powers_of_two_and_interpolated() -> None:
    assert torch.equal(alibi_slopes(8), 2.0 ** -torch.arange(1, 9, dtype=torch.float64))
    # 12 heads (paper, App. A): the 8-head slopes, then every other slope of the 16-head
    # sequence 2^-0.5, 2^-1, ...: 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5.
    want = [2.0**-e for e in (1, 2, 3, 4, 5, 6, 7, 8, 0.5, 1.5, 2.5, 3.5)]
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(want, dtype=torch.float64))


@pytest.mark.parametrize("n_heads", [5, 6, 12, 16, 20])
def test_alibi_slopes_match_bloom(n_heads: int) -> None:
    bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    # BLOOM's tensor is slope_h * key position; position 1 gives the slopes themselves.
    alibi = bloom.build_alibi_tensor(torch.ones(1, 2), n_heads, torch.float32)
    torch.testing.assert_close(alibi[:, 0, 1], alibi_slopes(n_heads).float())


def test_alibi_bias_values() -> None:
    bias = alibi_bias(4, 3, 5, window=None)  # 3 new tokens at positions 2..4 of 5
    slopes = alibi_slopes(4).float()
    assert bias.shape == (4, 3, 5)
    torch.testing.assert_close(bias[:, 2, 1], -3 * slopes)  # query 4, key 1: distance 3
    assert torch.equal(bias[:, 0, 3:], torch.full((4, 2), float("-inf")))  # the future
    assert torch.isinf(alibi_bias(4, 5, 5, window=2)[:, 4, 2]).all()  # outside the window


@pytest.mark.parametrize("window", [None, 4])
def test_alibi_attention_matches_reference(window) -> None:
    cfg = _cfg(
        position=PositionConfig(kind="alibi"),
        attention=AttentionConfig(n_heads=6, n_kv_heads=3, head_dim=8, sliding_window=window),
    )
    model = build_model(cfg, seed=1)
    assert model.rope is None
    attn = model.layers[1].attn
    x = torch.randn(2, 10, cfg.d_model)
    i, j = torch.arange(10)[:, None], torch.arange(10)[None, :]
    bias = -alibi_slopes(6).float()[:, None, None] * (i - j)
    ref = _reference_attention(attn, x, bias_HTS=bias, window=window)
    torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-6)


def test_alibi_model_matches_hf_mpt() -> None:
    """HF parity for ALiBi through MPT (pre-LayerNorm without biases, fused Wqkv, 4x GELU MLP,
    tied head). BLOOM is not expressible: it normalises the embeddings (word_embeddings_
    layernorm), which evoformer has no setting for. MPT's slopes equal the standard ones for a
    power-of-two head count (it orders the interpolated heads differently otherwise)."""
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.MptConfig(
        d_model=64,
        n_heads=8,
        n_layers=2,
        max_seq_len=40,
        vocab_size=300,
        expansion_ratio=4,
        layer_norm_epsilon=2e-5,
        attn_config={"alibi": True, "alibi_bias_max": 8},
    )
    torch.manual_seed(0)
    hf = transformers.MptForCausalLM(hf_cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in hf.parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if p.ndim == 1 else 0.05 * noise)
    cfg = ModelConfig(
        vocab_size=300,
        d_model=64,
        n_layers=2,
        max_seq_len=40,
        tie_embeddings=True,
        norm=NormConfig(kind="layernorm", eps=2e-5, bias=False),
        position=PositionConfig(kind="alibi"),
        attention=AttentionConfig(n_heads=8),
        mlp=MLPConfig(kind="gelu", hidden=256, activation="gelu"),
    )
    ours = build_model(cfg, seed=None).eval()
    sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}
    mine = {"embed.weight": sd["wte.weight"], "norm.weight": sd["norm_f.weight"]}
    for i in range(2):
        b, o = f"blocks.{i}.", f"layers.{i}."
        q, k, v = sd[b + "attn.Wqkv.weight"].chunk(3)
        mine.update(
            {
                o + "attn_norm.weight": sd[b + "norm_1.weight"],
                o + "attn.q_proj.weight": q,
                o + "attn.k_proj.weight": k,
                o + "attn.v_proj.weight": v,
                o + "attn.o_proj.weight": sd[b + "attn.out_proj.weight"],
                o + "mlp_norm.weight": sd[b + "norm_2.weight"],
                o + "mlp.up_proj.weight": sd[b + "ffn.up_proj.weight"],
                o + "mlp.down_proj.weight": sd[b + "ffn.down_proj.weight"],
            }
        )
    ours.load_state_dict(mine, strict=True)
    ids = torch.randint(0, 300, (2, 40), generator=g)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        err = ((ours(ids) - ref).abs().max() / ref.abs().max()).item()
    assert err <= 1e-5, f"relative logit error {err:.2e}"


# -- QK-norm, unit offset, scale, biases ------------------------------------------------------


@pytest.mark.parametrize("kind", ["head", "full"])
def test_qk_norm_matches_reference(kind: str) -> None:
    cfg = _cfg(attention=AttentionConfig(n_heads=4, n_kv_heads=2, head_dim=12, qk_norm=kind))
    model = build_model(cfg, seed=2)
    attn = model.layers[0].attn
    q_dim, k_dim = (12, 12) if kind == "head" else (48, 24)
    assert attn.q_norm.weight.shape == (q_dim,) and attn.k_norm.weight.shape == (k_dim,)
    with torch.no_grad():
        attn.q_norm.weight.normal_(1.0, 0.3)
        attn.k_norm.weight.normal_(1.0, 0.3)
    x = torch.randn(2, 9, cfg.d_model)
    rope = model.rope(torch.arange(9))
    out = attn(x, rope)
    torch.testing.assert_close(out, _reference_attention(attn, x, rope), rtol=1e-5, atol=1e-6)
    # Head-wise and whole-projection norms are different functions.
    other = "full" if kind == "head" else "head"
    attn.qk_norm = other
    attn.q_norm = RMSNorm(12 if other == "head" else 48, 1e-5)
    attn.k_norm = RMSNorm(12 if other == "head" else 24, 1e-5)
    attn.q_norm.reset_parameters(), attn.k_norm.reset_parameters()
    assert (attn(x, rope) - out).abs().max() > 1e-3


def test_qk_norm_is_applied_before_rope() -> None:
    # Per-head RMSNorm of a rotated vector equals rotating the normed one only if the norm's
    # gain is uniform; with a non-uniform gain the order shows.
    cfg = _cfg(attention=AttentionConfig(n_heads=2, n_kv_heads=2, head_dim=16, qk_norm="head"))
    model = build_model(cfg, seed=3)
    attn = model.layers[0].attn
    with torch.no_grad():
        attn.q_norm.weight.copy_(torch.linspace(0.2, 2.0, 16))
        attn.k_norm.weight.copy_(torch.linspace(2.0, 0.2, 16))
    x = torch.randn(1, 6, cfg.d_model)
    rope = model.rope(torch.arange(6))
    out = attn(x, rope)
    torch.testing.assert_close(out, _reference_attention(attn, x, rope), rtol=1e-5, atol=1e-6)


def test_unit_offset_rmsnorm() -> None:
    norm = RMSNorm(16, eps=1e-6, unit_offset=True)
    norm.reset_parameters()
    assert torch.equal(norm.weight, torch.zeros(16))  # starts as the identity gain
    x = torch.randn(3, 16)
    rms = x.pow(2).mean(-1, keepdim=True).add(1e-6).rsqrt()
    torch.testing.assert_close(norm(x), x * rms)
    with torch.no_grad():
        norm.weight.normal_(0, 0.5)
    torch.testing.assert_close(norm(x), x * rms * (1 + norm.weight))
    # bf16 input: the product is taken in fp32 and rounded once (Gemma), not rounded first.
    xb = x.bfloat16()
    ref = (xb.float() * xb.float().pow(2).mean(-1, keepdim=True).add(1e-6).rsqrt()) * (
        1 + norm.weight
    )
    assert norm(xb).dtype == torch.bfloat16
    torch.testing.assert_close(norm(xb), ref.bfloat16(), rtol=0, atol=0)


def test_unit_offset_model_starts_with_zero_norm_weights() -> None:
    cfg = _cfg(
        norm=NormConfig(kind="rmsnorm", unit_offset=True, placement="sandwich"),
        attention=AttentionConfig(n_heads=4, qk_norm="head"),
    )
    model = build_model(cfg, seed=0)
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert len(norms) == 2 * 6 + 1 and all(torch.equal(p, torch.zeros_like(p)) for p in norms)


def test_explicit_scale_and_qkv_bias() -> None:
    cfg = _cfg(attention=AttentionConfig(n_heads=4, scale=0.3, qkv_bias=True))
    model = build_model(cfg, seed=4)
    attn = model.layers[0].attn
    assert attn.q_proj.bias is not None and attn.v_proj.bias is not None
    assert attn.o_proj.bias is None
    with torch.no_grad():
        attn.q_proj.bias.normal_()
    x = torch.randn(2, 7, cfg.d_model)
    rope = model.rope(torch.arange(7))
    out = attn(x, rope)
    torch.testing.assert_close(out, _reference_attention(attn, x, rope), rtol=1e-5, atol=1e-6)
    attn.scale = None
    assert (attn(x, rope) - out).abs().max() > 1e-4


def test_linear_rope_scaling_divides_frequencies() -> None:
    base = rope_inv_freq(32, 10000.0, RopeScalingConfig())
    scaled = rope_inv_freq(32, 10000.0, RopeScalingConfig(kind="linear", factor=4.0))
    torch.testing.assert_close(scaled, base / 4)


def test_geglu_defaults_to_gelu_tanh() -> None:
    cfg = _cfg(mlp=MLPConfig(kind="geglu", hidden=40))
    mlp = build_model(cfg, seed=0).layers[0].mlp
    x = torch.randn(3, cfg.d_model)
    ref = mlp.down_proj(F.gelu(mlp.gate_proj(x), approximate="tanh") * mlp.up_proj(x))
    torch.testing.assert_close(mlp(x), ref)


def test_parallel_block_by_hand() -> None:
    # HF parity is not claimed for the PaLM block: GPT-J adds a bias to the LM head and rotates
    # interleaved pairs of a partial rotary slice; GPT-NeoX's parallel residual has two norms.
    cfg = _cfg(parallel_block=True)
    block = build_model(cfg, seed=5).layers[0]
    assert block.mlp_norm is None
    rope = build_model(cfg, seed=5).rope(torch.arange(8))
    x = torch.randn(2, 8, cfg.d_model)
    h = block.attn_norm(x)
    torch.testing.assert_close(block(x, rope), x + block.attn(h, rope) + block.mlp(h))


# -- caches -----------------------------------------------------------------------------------


@pytest.mark.parametrize("position", ["alibi", "rope"])
def test_cached_decoding_with_windows(position: str) -> None:
    cfg = _cfg(
        n_layers=3,
        position=PositionConfig(kind=position),
        attention=AttentionConfig(n_heads=4, n_kv_heads=2, sliding_window=4, global_every=3),
    )
    model = build_model(cfg, seed=6).eval()
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        full = model(ids)
        caches = model.new_caches(2, 20)
        steps = [model(ids[:, :7], caches), model(ids[:, 7:10], caches)]
        steps += [model(ids[:, t : t + 1], caches) for t in range(10, 20)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-6)


# -- training smoke test per kind -------------------------------------------------------------

KINDS = {
    "mistral": dict(attention=AttentionConfig(n_heads=4, n_kv_heads=2, sliding_window=6)),
    "qwen2": dict(
        attention=AttentionConfig(
            n_heads=4, n_kv_heads=2, qkv_bias=True, sliding_window=6, global_every=2
        )
    ),
    "qwen3": dict(attention=AttentionConfig(n_heads=4, n_kv_heads=2, head_dim=12, qk_norm="head")),
    "olmo2": dict(
        norm=NormConfig(kind="rmsnorm", placement="reordered"),
        attention=AttentionConfig(n_heads=4, qk_norm="full"),
    ),
    "gemma3": dict(
        norm=NormConfig(kind="rmsnorm", placement="sandwich", unit_offset=True),
        position=PositionConfig(
            kind="rope",
            local_rope_theta=1000.0,
            rope_scaling=RopeScalingConfig(kind="linear", factor=2.0),
        ),
        attention=AttentionConfig(
            n_heads=4, n_kv_heads=1, qk_norm="head", sliding_window=6, global_every=2, scale=0.2
        ),
        mlp=MLPConfig(kind="geglu", hidden=48),
        embed_scale=True,
        tie_embeddings=True,
    ),
    "alibi": dict(
        position=PositionConfig(kind="alibi"), attention=AttentionConfig(n_heads=6, head_dim=8)
    ),
    "palm": dict(parallel_block=True),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_training_reduces_loss(kind: str) -> None:
    cfg = _cfg(**KINDS[kind])
    validate_model(Config(model=cfg))
    model = build_model(cfg, seed=7).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 97, (4, 17), generator=torch.Generator().manual_seed(8))
    losses = []
    for _ in range(20):
        loss = model(ids[:, :-1], targets=ids[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0], losses


# -- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(attention=AttentionConfig(n_heads=4, sliding_window=0)), "sliding_window"),
        (dict(attention=AttentionConfig(n_heads=4, global_every=6)), "needs model.attention"),
        (dict(attention=AttentionConfig(n_heads=4, scale=-1.0)), "scale"),
        (dict(norm=NormConfig(kind="layernorm", unit_offset=True)), "only RMSNorm"),
        (dict(parallel_block=True, norm=NormConfig(placement="sandwich")), "one pre-norm"),
        (dict(position=PositionConfig(kind="alibi", local_rope_theta=10.0)), "local_rope_theta"),
        (dict(position=PositionConfig(rope_scaling=RopeScalingConfig("linear", 0.0))), "factor"),
    ],
)
def test_validation_names_impossible_combinations(change: dict, match: str) -> None:
    cfg = Config(model=dataclasses.replace(_cfg(), **change))
    with pytest.raises(UserError, match=match):
        validate_model(cfg)
