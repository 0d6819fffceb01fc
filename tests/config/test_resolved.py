"""The derived widths and pipeline facts are resolved by the config, once; nothing else
repeats the "null / 0 means ..." defaults."""

import re

import pytest

from evoformer.config import load_config
from tests.conftest import REPO


def model(*overrides: str):
    return load_config([str(REPO / "configs/models/tiny/llama.yaml")], overrides).model


def test_head_dim_and_kv_heads_default_from_d_model_and_heads():
    m = model("model.d_model=96", "model.attention.n_heads=4", "model.attention.n_kv_heads=null")
    assert (m.head_dim, m.kv_heads) == (24, 4)
    m = model("model.attention.head_dim=40", "model.attention.n_kv_heads=2")
    assert (m.head_dim, m.kv_heads) == (40, 2)


def test_expert_and_shared_widths():
    m = model("model.mlp.hidden=64", "model.moe.num_experts=4", "model.moe.num_shared_experts=2")
    assert (m.expert_width, m.shared_width) == (64, 128)
    m = model("model.moe.num_experts=4", "model.moe.expert_hidden=16", "model.moe.shared_hidden=24")
    assert (m.expert_width, m.shared_width) == (16, 24)
    assert model("model.moe.num_experts=4").shared_width == 0


@pytest.mark.parametrize(
    "kind, activation, gated, resolved",
    [
        ("swiglu", "default", True, "silu"),
        ("geglu", "default", True, "gelu_tanh"),
        ("gelu", "default", False, "gelu_tanh"),
        ("swiglu", "gelu", True, "gelu"),
    ],
)
def test_mlp_gated_and_default_activation(kind, activation, gated, resolved):
    m = model(f"model.mlp.kind={kind}", f"model.mlp.activation={activation}")
    assert (m.mlp.gated, m.mlp.resolved_activation) == (gated, resolved)


@pytest.mark.parametrize(
    "schedule, virtual, stages, placement",
    [
        ("1f1b", 0, 1, "loop"),
        ("interleaved", 0, 2, "loop"),
        ("interleaved", 3, 3, "loop"),
        ("zbv", 0, 2, "v"),
    ],
)
def test_stages_per_rank_and_placement(schedule, virtual, stages, placement):
    overrides = [f"parallel.pp_schedule={schedule}", f"parallel.pp_virtual_stages={virtual}"]
    p = load_config([], overrides).parallel
    assert (p.stages_per_rank, p.stage_placement) == (stages, placement)


# The defaults the properties resolve, as code would spell them if it resolved them again.
REPEATED = re.compile(
    r"head_dim or\b|n_kv_heads or\b|expert_hidden or\b|shared_hidden or\b|pp_virtual_stages or\b"
    r"|qkv_bias is None|\(\"swiglu\", \"geglu\"\)"
)


def test_no_module_resolves_the_defaults_again():
    schema = REPO / "evoformer/config/schema.py"
    found = [
        f"{path.relative_to(REPO)}:{i}: {line.strip()}"
        for root in ("evoformer", "tools")
        for path in sorted((REPO / root).rglob("*.py"))
        if path != schema
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if REPEATED.search(line)
    ]
    assert not found, "use the ModelConfig / MLPConfig / ParallelConfig properties:\n" + "\n".join(
        found
    )
