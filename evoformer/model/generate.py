"""Autoregressive sampling with a KV cache: greedy, temperature, top-k and top-p."""

from __future__ import annotations

import torch

from evoformer.model.transformer import Transformer


def sample_next(
    logits_BV: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token per row; ``temperature <= 0`` is greedy (argmax)."""
    if temperature <= 0:
        return logits_BV.argmax(dim=-1)
    logits = logits_BV.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already cover top_p of the mass.
        drop = probs.cumsum(dim=-1) - probs > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    use_cache: bool = True,
    stop_id: int | None = None,
    seed: int = 0,
) -> list[int]:
    """Continue ``prompt_ids``; returns only the new tokens. Without a cache the whole sequence
    is re-run each step (the reference the cached path is tested against)."""
    device = model.embed.weight.device
    limit = model.cfg.max_seq_len
    max_new_tokens = min(max_new_tokens, limit - len(prompt_ids))
    generator = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    caches = model.new_caches(1, len(prompt_ids) + max_new_tokens) if use_cache else None
    out: list[int] = []
    step_input = ids
    for _ in range(max(0, max_new_tokens)):
        logits = model(step_input if use_cache else ids, caches)[:, -1]
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        token = int(nxt.item())
        out.append(token)
        if stop_id is not None and token == stop_id:
            break
        step_input = nxt.view(1, 1)
        ids = torch.cat([ids, step_input], dim=1)
    return out
