"""Document masking is exact: in a packed window of several documents every token's logits and
loss equal those of its document run alone, for every attention kind and position encoding."""

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
    NormConfig,
    PositionConfig,
)
from evoformer.data.dataset import document_ids_from_eod
from evoformer.model import build_model
from evoformer.model.documents import Documents

EOD = 3
# Two rows of 40 tokens: a document continued from the previous window, then whole documents
# each opened by the EOD token; the rows differ, so both batching paths run.
ROW_LENGTHS = [[7, 12, 1, 20], [40], [15, 25]]


def _cfg(**kw) -> ModelConfig:
    base = dict(
        vocab_size=61,
        d_model=32,
        n_layers=2,
        max_seq_len=64,
        norm=NormConfig(kind="rmsnorm", eps=1e-5),
        attention=AttentionConfig(n_heads=4, n_kv_heads=2),
        mlp=MLPConfig(kind="swiglu", hidden=48),
    )
    return ModelConfig(**{**base, **kw})


MLA = AttentionConfig(
    kind="mla",
    n_heads=4,
    q_lora_rank=16,
    kv_lora_rank=12,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
)
VARIANTS = {
    "dense_gqa_rope": _cfg(),
    "mla": _cfg(attention=MLA),
    "sliding_window": _cfg(attention=AttentionConfig(n_heads=4, n_kv_heads=1, sliding_window=6)),
    "local_global_qknorm": _cfg(
        attention=AttentionConfig(
            n_heads=4, n_kv_heads=2, sliding_window=5, global_every=2, qk_norm="head"
        ),
        position=PositionConfig(kind="rope", local_rope_theta=1000.0),
    ),
    "alibi": _cfg(position=PositionConfig(kind="alibi")),
    "alibi_window": _cfg(
        position=PositionConfig(kind="alibi"),
        attention=AttentionConfig(n_heads=4, sliding_window=6),
    ),
    "learned_layernorm_post": _cfg(
        position=PositionConfig(kind="learned"),
        norm=NormConfig(kind="layernorm", placement="post"),
        mlp=MLPConfig(kind="gelu", hidden=64),
    ),
}


def _packed_batch(seed: int = 0) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """[B, 40] token windows and, per row, its documents as separate sequences."""
    g = torch.Generator().manual_seed(seed)
    rows, docs = [], []
    for lengths in ROW_LENGTHS:
        parts = []
        for j, n in enumerate(lengths):
            body = torch.randint(EOD + 1, 61, (n,), generator=g)
            if j > 0:  # every run after the first starts at an EOD
                body[0] = EOD
            parts.append(body)
        rows.append(torch.cat(parts))
        docs.append(parts)
    return torch.stack(rows), docs


def _token_losses(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_BTV.flatten(0, 1), targets_BT.flatten(), reduction="none").view(
        targets_BT.shape
    )


def _check_exact(model, x: torch.Tensor, docs: list[list[torch.Tensor]]) -> None:
    targets = torch.roll(x, -1, dims=1)  # the last column is scored against nothing below
    ids = document_ids_from_eod(x, EOD)
    packed = model(x, document_ids=ids)
    losses = _token_losses(packed, targets)
    for b, parts in enumerate(docs):
        start = 0
        for part in parts:
            n = part.numel()
            alone = model(part[None])[0]
            torch.testing.assert_close(packed[b, start : start + n], alone, rtol=1e-5, atol=1e-5)
            # the next-token losses inside the document (its last target belongs to the next)
            if n > 1:
                want = _token_losses(alone[None, :-1], part[None, 1:])[0]
                got = losses[b, start : start + n - 1]
                assert ((got - want).abs() / want.abs()).max().item() <= 1e-6
            start += n


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_packed_documents_equal_documents_alone(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(VARIANTS[name], seed=1).eval()
    x, docs = _packed_batch()
    with torch.no_grad():
        _check_exact(model, x, docs)
        # and without masking the packed window really does differ (the test can fail)
        masked = model(x, document_ids=document_ids_from_eod(x, EOD))
        assert not torch.allclose(model(x), masked, atol=1e-4)


def test_moe_and_mtp_with_documents() -> None:
    """MoE layers route tokens alone; MTP depth k at position i keeps position i's document,
    so its logits for a document equal those of the document alone."""
    cfg = _cfg(
        attention=MLA,
        moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=16, capacity_factor=0.0),
        mtp=MTPConfig(depth=1),
    )
    model = build_model(cfg, seed=2).eval()
    x, docs = _packed_batch(seed=1)
    ids = document_ids_from_eod(x, EOD)
    with torch.no_grad():
        _check_exact(model, x, docs)
        docs_obj = Documents(ids)
        hidden = model.hidden_states(x, docs=docs_obj)
        packed = model.mtp.logits(hidden, x, model, docs_obj)[0]
        b, start, n = 2, 15, 25  # row 2's second document
        part = x[b : b + 1, start : start + n]
        alone = model.mtp.logits(model.hidden_states(part), part, model)[0]
        torch.testing.assert_close(packed[b, start : start + n - 1], alone[0], rtol=1e-5, atol=1e-5)
        # training loss runs with documents (MTP term included)
        out = model.train()(x, targets=torch.roll(x, -1, 1), document_ids=ids)
        assert set(out.metrics) >= {"ce_loss", "mtp_loss"}


def test_document_positions_and_ids() -> None:
    x = torch.tensor([[5, 6, EOD, 7, 8, 9, EOD, EOD, 4]])
    ids = document_ids_from_eod(x, EOD)
    assert ids.tolist() == [[0, 0, 1, 1, 1, 1, 2, 3, 3]]
    d = Documents(ids)
    assert d.positions.tolist() == [[0, 1, 0, 1, 2, 3, 0, 0, 1]]
    assert d.segments == [((0, 2), (2, 6), (6, 7), (7, 9))]


def test_training_gradients_match_documents_alone() -> None:
    """Backward too: the packed loss's gradient equals the sum of the documents' alone."""
    model = build_model(VARIANTS["dense_gqa_rope"], seed=3)
    x, docs = _packed_batch(seed=2)
    x, docs = x[2:], docs[2:]  # one row, two documents
    targets = torch.roll(x, -1, 1)
    targets[0, 14] = -100  # the first document's last token predicts the next one's EOD
    targets[0, -1] = -100
    loss = F.cross_entropy(
        model(x, document_ids=document_ids_from_eod(x, EOD)).flatten(0, 1),
        targets.flatten(),
        reduction="sum",
    )
    grads = torch.autograd.grad(loss, list(model.parameters()))
    alone = 0
    for part in docs[0]:
        alone = alone + F.cross_entropy(model(part[None])[0, :-1], part[1:], reduction="sum")
    want = torch.autograd.grad(alone, list(model.parameters()))
    for g, w in zip(grads, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("window", [None, 6])
def test_flex_block_mask_equals_per_document_attention(window) -> None:
    """The GPU path (flex_attention with a block mask, run eagerly here, forward only) computes
    what the per-document SDPA calls compute, with a value width other than the key's (MLA)."""
    from evoformer.model.attention import causal_window_mask
    from evoformer.model.documents import document_attention

    g = torch.Generator().manual_seed(0)
    x, _ = _packed_batch()
    docs = Documents(document_ids_from_eod(x, EOD))
    B, T = x.shape
    q, k = (torch.randn(B, 4, T, 16, generator=g) for _ in range(2))
    v = torch.randn(B, 4, T, 8, generator=g)
    mask = causal_window_mask(T, T, window) if window else None
    want = document_attention(q, k, v, docs, mask, 0.3, window=window, flex=False)
    got = document_attention(q, k, v, docs, mask, 0.3, window=window, flex=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
