"""Every tiny family trains through the real Trainer (loss falls) and generates with its cache."""

from __future__ import annotations

import json

import pytest
import torch

from evoformer.checkpoint import load_model
from evoformer.config import load_config
from evoformer.engine import Trainer
from evoformer.model.generate import generate
from tests.conftest import REPO

FAMILIES = [
    "gpt2",
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen3",
    "qwen3-moe",
    "olmo2",
    "gemma3",
    "deepseek-v3",
    "deepseek-v2",  # softmax, group-limited by the best expert
    "kimi-k2",  # DeepSeek-V3's layout without expert groups or MTP
    "phi4",  # LLaMA's block (its HF family fuses the projections)
    "olmo3",  # windows with YaRN on the global layers only
    "smollm3",  # a NoPE layer
    "gpt-oss",
    "glm4-moe",
    "minimax-m2",
    "qwen3-next",
    "nemotron-h",
]


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_family_trains_and_generates(family, run_overrides):
    cfg = load_config(
        [str(REPO / f"configs/models/tiny/{family}.yaml")],
        [*run_overrides, "train.max_steps=25", "train.log_every=5", "optim.lr=5e-3"],
    )
    result = Trainer(cfg).train()
    first = result.losses[1]
    last = sum(result.losses[s] for s in range(21, 26)) / 5
    assert last < first - 0.5, (first, last)
    lines = [json.loads(x) for x in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    if cfg.model.moe.num_experts:
        keys = set().union(*(line.keys() for line in lines))
        assert any(k.startswith("moe/") for k in keys), keys
    if cfg.model.mtp.depth:
        assert all("mtp_loss" in line for line in lines)
    model = load_model(result.output_dir)
    prompt = [5, 9, 17, 33]
    with torch.no_grad():
        cached = generate(model, prompt, 24, temperature=0, use_cache=True)
        plain = generate(model, prompt, 24, temperature=0, use_cache=False)
    assert cached == plain
