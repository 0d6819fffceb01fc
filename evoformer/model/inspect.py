"""Parameter and FLOP accounting of a model config, computed on the meta device."""

from __future__ import annotations

import torch

from evoformer.config.schema import Config, ModelConfig
from evoformer.model.transformer import Transformer


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Total and non-embedding parameter counts, without allocating any weights."""
    with torch.device("meta"):
        model = Transformer(cfg)
    total = model.num_params()
    return {"total": total, "non_embedding": model.num_params(exclude_embeddings=True)}


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6 * (non-embedding matmul params + head) + causal attention (counted once: 6*L*T*d_attn)."""
    counts = count_params(cfg)
    head = cfg.vocab_size * cfg.d_model
    dense = counts["non_embedding"] + (head if cfg.tie_embeddings else 0)
    a = cfg.attention
    d_attn = a.n_heads * (a.head_dim or cfg.d_model // a.n_heads)
    # QK^T and AV are 2 matmuls of T*d_attn per query; causal halves them; x3 for fwd+bwd.
    attention = 6 * cfg.n_layers * seq_len * d_attn
    return 6 * dense + attention


def describe(cfg: Config) -> str:
    counts = count_params(cfg.model)
    flops = train_flops_per_token(cfg.model, cfg.train.seq_len)
    return (
        f"parameters: {counts['total']:,} total, {counts['non_embedding']:,} non-embedding\n"
        f"training FLOPs per token (seq {cfg.train.seq_len}): {flops / 1e6:,.1f} MFLOP"
    )
