"""Pipeline stage construction: the cost-balanced layer split, explicit overrides, stage
placement, and stage models that hold exactly their layers under full-model names with the
one-process model's initial weights."""

from __future__ import annotations

import itertools

import pytest
import torch

from evoformer.config import load_config
from evoformer.errors import UserError
from evoformer.model import build_model
from evoformer.model.stages import (
    _balance,
    build_stage_model,
    layer_costs,
    split_layers,
    stage_ranks,
)
from tests.conftest import REPO


def _model_cfg(family: str, *overrides: str):
    return load_config([str(REPO / f"configs/models/tiny/{family}.yaml")], list(overrides)).model


def _stage_costs(counts, blocks, first, last):
    out, start = [], 0
    for s, n in enumerate(counts):
        c = (
            sum(blocks[start : start + n])
            + (first if s == 0 else 0)
            + (last if s == len(counts) - 1 else 0)
        )
        out.append(c)
        start += n
    return out


def _all_splits(L: int, S: int):
    for cuts in itertools.combinations(range(1, L), S - 1):
        bounds = (0, *cuts, L)
        yield [bounds[i + 1] - bounds[i] for i in range(S)]


@pytest.mark.parametrize("S", [2, 3, 4])
def test_balanced_split_minimises_the_most_expensive_stage(S):
    # Uneven blocks (a dense first layer, MoE after it) and heavy head: against brute force.
    blocks = [5.0, 2.0, 2.0, 3.0, 2.0, 2.0, 4.0, 1.0]
    first, last = 1.0, 6.0
    counts = _balance(blocks, first, last, S)
    assert sum(counts) == len(blocks) and min(counts) >= 1
    best = min(max(_stage_costs(c, blocks, first, last)) for c in _all_splits(len(blocks), S))
    assert max(_stage_costs(counts, blocks, first, last)) == best


def test_head_cost_moves_layers_off_the_last_stage():
    # LLaMA with a large vocabulary: the last stage (head + loss) gets fewer blocks.
    cfg = _model_cfg("llama", "model.n_layers=8", "model.vocab_size=32768")
    blocks, first, last = layer_costs(cfg, 32)
    assert last == 2 * cfg.d_model * cfg.vocab_size and first == cfg.d_model * cfg.vocab_size
    stages = split_layers(cfg, 2, 32)
    assert stages[0] == list(range(len(stages[0])))
    assert len(stages[0]) > len(stages[1]) >= 1
    assert [i for s in stages for i in s] == list(range(8))
    # Small vocabulary: even split.
    assert split_layers(_model_cfg("llama", "model.n_layers=8"), 2, 32) == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
    ]


def test_explicit_layers_per_stage_and_bad_overrides():
    cfg = _model_cfg("llama", "model.n_layers=6")
    assert split_layers(cfg, 4, 32, [1, 2, 2, 1]) == [[0], [1, 2], [3, 4], [5]]
    for bad in ([1, 2, 2], [1, 2, 2, 2], [0, 3, 2, 1]):
        with pytest.raises(ValueError, match="pp_layers"):
            split_layers(cfg, 4, 32, bad)
    with pytest.raises(ValueError, match="at least as many layers"):
        split_layers(cfg, 8, 32)


def test_stage_placement_loop_and_v():
    assert stage_ranks(4, 2) == [0, 1, 0, 1]
    assert stage_ranks(4, 2, "v") == [0, 1, 1, 0]
    assert stage_ranks(8, 4, "v") == [0, 1, 2, 3, 3, 2, 1, 0]
    with pytest.raises(ValueError):
        stage_ranks(6, 2, "v")


@pytest.mark.parametrize("family", ["llama", "gpt2", "deepseek-v3"])
def test_stage_models_hold_their_layers_under_full_names_with_one_process_init(family):
    cfg = _model_cfg(family, "model.n_layers=4")
    full = build_model(cfg, seed=7).state_dict()
    stages = split_layers(cfg, 4, 32)
    seen: set[str] = set()
    for mine in ([0, 2], [1, 3]):  # interleaved: two stages per rank
        model = build_stage_model(cfg, stages, mine, seed=7)
        sd = model.state_dict()
        for name, value in sd.items():
            assert torch.equal(value, full[name]), name  # same name, same initial value
        layers = {int(n.split(".")[1]) for n in sd if n.startswith("layers.")}
        assert layers == {i for s in mine for i in stages[s]}
        assert ("embed.weight" in sd) == (
            0 in mine or cfg.tie_embeddings or cfg.mtp.depth > 0
        )  # the last stage keeps the embedding for a tied head or MTP
        assert any(n.startswith("norm.") for n in sd) == (3 in mine)
        assert any(n.startswith("mtp.") for n in sd) == (3 in mine and cfg.mtp.depth > 0)
        # Chunks share the model's modules and name their parameters the same way.
        assert [c.stage_index for c in model.chunks] == mine
        params = {id(p): n for n, p in model.named_parameters()}
        for chunk in model.chunks:
            for n, p in chunk.named_parameters():
                assert params[id(p)] == n
        seen |= set(sd)
    assert seen == set(full)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["parallel.pp_layers=[1,1]"], "pp_layers.*sums to 2"),
        (["parallel.pp_layers=[2,1,1]"], "pp_layers.*needs 2 entries"),
        (["parallel.pp_virtual_stages=2"], "one stage per rank"),
        (["parallel.pp_schedule=zbv", "parallel.pp_virtual_stages=3"], "exactly 2"),
        (["parallel.pp_schedule=interleaved", "parallel.pp_virtual_stages=3"], "need at least"),
        (["parallel.pp_schedule=pipedream"], "pp_schedule.*must be one of"),
        (["zero.backend=deepspeed"], "pipeline"),
    ],
)
def test_pipeline_config_errors(overrides, match):
    with pytest.raises(UserError, match=match):
        load_config(
            [str(REPO / "configs/models/tiny/llama.yaml")],
            ["model.n_layers=4", "parallel.pp=2", *overrides],
        )
