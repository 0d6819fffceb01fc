"""Multi-head latent attention (cache of latents, cached decoding == full forward) and
multi-token prediction (loss by hand), plus a short MoE + MLA + MTP training run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from evoformer.config.schema import (
    AttentionConfig,
    MLPConfig,
    ModelConfig,
    MoEConfig,
    MTPConfig,
    PositionConfig,
)
from evoformer.model import build_model
from evoformer.model.generate import generate
from evoformer.model.mla import LatentCache

TOL = 1e-5


def _cfg(q_lora_rank: int = 24, depth: int = 1, **moe) -> ModelConfig:
    return ModelConfig(
        vocab_size=96,
        d_model=48,
        n_layers=2,
        max_seq_len=64,
        position=PositionConfig(kind="rope", rope_theta=10000.0),
        attention=AttentionConfig(
            kind="mla",
            n_heads=4,
            q_lora_rank=q_lora_rank,
            kv_lora_rank=16,
            qk_nope_head_dim=12,
            qk_rope_head_dim=8,
            v_head_dim=10,
        ),
        mlp=MLPConfig(kind="swiglu", hidden=64),
        moe=MoEConfig(**moe),
        mtp=MTPConfig(depth=depth),
    )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("q_lora_rank", [0, 24])
def test_cached_decoding_matches_full_forward(q_lora_rank: int) -> None:
    model = build_model(_cfg(q_lora_rank), seed=1).eval()
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        caches = model.new_caches(2, 20)
        # Prefill 12 tokens, then decode one at a time (the cached path absorbs kv_b_proj).
        steps = [model(ids[:, :12], caches)] + [
            model(ids[:, t : t + 1], caches) for t in range(12, 20)
        ]
    assert _rel(torch.cat(steps, dim=1), full) <= TOL
    prompt = ids[0, :5].tolist()
    cached = generate(model, prompt, 25, temperature=0, use_cache=True)
    assert cached == generate(model, prompt, 25, temperature=0, use_cache=False)
    assert len(set(cached)) > 1  # not a degenerate repetition


def test_cache_holds_only_the_latent_and_rope_key() -> None:
    cfg = _cfg()
    model = build_model(cfg, seed=0)
    caches = model.new_caches(3, 32)
    a = cfg.attention
    per_token = (a.kv_lora_rank + a.qk_rope_head_dim) * 4  # fp32
    assert all(isinstance(c, LatentCache) for c in caches)
    assert [c.bytes_per_token() for c in caches] == [per_token] * cfg.n_layers
    total = sum(t.nbytes for c in caches for t in (c.latent_BSL, c.k_pe_BSR))
    assert total == per_token * 3 * 32 * cfg.n_layers
    # vs. 2 * heads * head_dims a full K/V cache of the same attention would take.
    full = (a.n_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim)) * 4
    assert per_token < full / 3


def test_mtp_loss_by_hand() -> None:
    """Depth 1: [RMSNorm(embed(t_{i+1})); RMSNorm(final_norm(h_i))] -> eh_proj -> block ->
    own norm -> shared head, scored against t_{i+2}."""
    model = build_model(_cfg(depth=1), seed=2).train()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # norms away from 1 so a skipped or swapped norm shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    ids = torch.randint(0, 96, (2, 17), generator=g)
    x, y = ids[:, :-1], ids[:, 1:].clone()
    y[0, 3] = -1  # ignored
    out = model(x, targets=y)

    eps = model.cfg.norm.eps
    mod = model.mtp.layers[0]
    T = x.shape[1]
    h = F.rms_norm(model.hidden_states(x), (48,), model.norm.weight, eps)[:, : T - 1]
    e = model.embed(x[:, 1:])
    z = (
        torch.cat(
            [
                F.rms_norm(e, (48,), mod.embed_norm.weight, eps),
                F.rms_norm(h, (48,), mod.hidden_norm.weight, eps),
            ],
            dim=-1,
        )
        @ mod.proj.weight.T
    )
    z = mod.block(z, model.rope(torch.arange(T - 1)))
    logits = F.rms_norm(z, (48,), mod.out_norm.weight, eps) @ model.head.weight.T
    ref = F.cross_entropy(logits.reshape(-1, 96), y[:, 1:].reshape(-1), ignore_index=-1)
    assert out.metrics["mtp_loss"].item() == pytest.approx(ref.item(), rel=TOL)
    ce = F.cross_entropy(model(x).reshape(-1, 96), y.reshape(-1), ignore_index=-1)
    assert out.loss.item() == pytest.approx(ce.item() + 0.3 * ref.item(), rel=TOL)


def test_mtp_runs_only_with_targets() -> None:
    model = build_model(_cfg(depth=2), seed=0)
    calls = []
    model.mtp.register_forward_hook(lambda *a: calls.append(1))
    ids = torch.randint(0, 96, (1, 9))
    model(ids)
    model.eval()(ids)
    assert calls == []
    out = model.train()(ids[:, :-1], targets=ids[:, 1:])
    assert calls == [1] and "mtp_loss" in out.metrics
    # Depth 2 scores 6 positions of 8: T must exceed the depth.
    logits = model.mtp.logits(model.hidden_states(ids[:, :8]), ids[:, :8], model)
    assert [t.shape[1] for t in logits] == [7, 6]


def test_moe_mla_mtp_model_trains() -> None:
    """15 AdamW steps on one repeated batch: the loss falls, and the MoE layers (including the
    MTP block's) report their load after every step, as the trainer merges it."""
    torch.manual_seed(0)
    cfg = _cfg(
        depth=1,
        num_experts=8,
        top_k=2,
        expert_hidden=24,
        num_shared_experts=1,
        score="sigmoid",
        n_groups=2,
        topk_groups=1,
        first_k_dense=1,
        aux_loss_coef=0.01,
        bias_update_rate=0.001,
        routed_scaling=2.0,
    )
    model = build_model(cfg, seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = torch.randint(0, 96, (4, 33), generator=torch.Generator().manual_seed(1))
    losses, mtp_losses, metrics = [], [], {}
    for _ in range(15):
        out = model(batch[:, :-1], targets=batch[:, 1:])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.metrics["ce_loss"].item())
        mtp_losses.append(out.metrics["mtp_loss"].item())
        metrics = {
            k: v
            for m in model.modules()
            if hasattr(m, "end_of_step")
            for k, v in m.end_of_step().items()
        }
    assert set(out.metrics) == {"ce_loss", "aux_loss", "mtp_loss"}
    assert losses[-1] < 0.7 * losses[0] and mtp_losses[-1] < 0.8 * mtp_losses[0]
    # Layer 0 is dense; layer 1 and the MTP block (layer index 2) are MoE.
    assert {k.split("/")[1] for k in metrics} == {"L1", "L2"}
    assert len(metrics["moe/L1/share"]) == 8 and metrics["moe/L1/max_over_mean"] >= 1.0
    assert metrics["moe/L2/bias_max"] > 0 > metrics["moe/L2/bias_min"]
