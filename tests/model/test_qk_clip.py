"""QK-clip: the largest attention logit per head against a hand computation, and a clipped
head gives logits of exactly the threshold on the same input afterwards (MHA, GQA, MLA)."""

from __future__ import annotations

import math

import pytest
import torch

from evoformer.config.schema import AttentionConfig, MLPConfig, ModelConfig, NormConfig
from evoformer.model import build_model
from evoformer.model.documents import Documents
from evoformer.model.qk_clip import QKClip, max_attention_logits


def test_max_logits_by_hand() -> None:
    g = torch.Generator().manual_seed(0)
    B, H, T, D = 2, 3, 20, 8
    q, k = torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)
    ids = torch.zeros(B, T, dtype=torch.long)
    ids[:, 7:] = 1
    for window, docs in [(None, None), (5, None), (None, Documents(ids)), (4, Documents(ids))]:
        want = torch.full((H,), -math.inf)
        for b in range(B):
            for h in range(H):
                for t in range(T):
                    for s in range(t + 1):
                        if window is not None and t - s >= window:
                            continue
                        if docs is not None and ids[b, t] != ids[b, s]:
                            continue
                        want[h] = max(want[h], float(q[b, h, t] @ k[b, h, s]) * 0.5)
        got = max_attention_logits(q, k, 0.5, window, docs)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _cfg(attention: AttentionConfig) -> ModelConfig:
    return ModelConfig(
        vocab_size=61,
        d_model=32,
        n_layers=1,
        max_seq_len=64,
        norm=NormConfig(kind="rmsnorm"),
        attention=attention,
        mlp=MLPConfig(kind="swiglu", hidden=48),
    )


KINDS = {
    "mha": AttentionConfig(n_heads=4, bias=True),
    "gqa": AttentionConfig(n_heads=4, n_kv_heads=2),
    "mla": AttentionConfig(
        kind="mla",
        n_heads=4,
        q_lora_rank=16,
        kv_lora_rank=12,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
    ),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_clipped_head_reaches_the_threshold_exactly(kind) -> None:
    model = build_model(_cfg(KINDS[kind]), seed=0)
    with torch.no_grad():  # large logits: scale the query side up
        for name, p in model.named_parameters():
            if "q_proj" in name or "q_b_proj" in name:
                p.mul_(8)
    attn = model.layers[0].attn
    tracker = attn.qk_clip = QKClip(1.0, "L0", None, None)
    x = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(1))

    def max_logits() -> torch.Tensor:
        model.train()
        model(x)
        assert tracker.max_H is not None
        m = tracker.max_H.clone()
        return m

    before = max_logits()
    threshold = float(before.median())  # some heads above, some below
    tracker.threshold = threshold
    stats = attn.end_of_step()
    assert stats["qk/L0/max_logit"] == pytest.approx(float(before.max()))
    after = max_logits()
    tracker.max_H = None
    want = torch.minimum(before, torch.tensor(threshold))
    torch.testing.assert_close(after, want, rtol=1e-4, atol=1e-5)
    assert (before > threshold).any() and (after < before).any()
