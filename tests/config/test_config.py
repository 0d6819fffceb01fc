"""Config loading: merge order, overrides, and one clear error per mistake."""

from __future__ import annotations

import pytest

from evoformer.config import config_help, load_config, to_yaml
from evoformer.errors import UserError
from tests.conftest import REPO


def test_files_merge_left_to_right_then_overrides(tmp_path):
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text("train: {max_steps: 10, seq_len: 64}\nmodel: {d_model: 128}\n")
    b.write_text("train: {max_steps: 20}\n")
    cfg = load_config([str(a), str(b)], ["train.max_steps=30", "optim.lr=1e-3"])
    assert cfg.train.max_steps == 30
    assert cfg.train.seq_len == 64
    assert cfg.model.d_model == 128
    assert cfg.optim.lr == pytest.approx(1e-3)
    cfg2 = load_config([str(a), str(b)])
    assert cfg2.train.max_steps == 20


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config([str(REPO / "configs/quickstart.yaml")], ["model.n_layers=3"])
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    again = load_config([str(path)])
    assert again == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "train.max_stesp=3",
            "unknown config key 'train.max_stesp' (did you mean 'train.max_steps'?)",
        ),
        ("modle.d_model=3", "unknown config key 'modle'"),
        ("train.max_steps=abc", "bad value for 'train.max_steps'"),
        ("precision=fp64", "precision='fp64': must be one of fp32, bf16, fp16"),
        ("model.attention.n_kv_heads=3", "must divide n_heads=4"),
        ("train.micro_batch_size=3", "must be a multiple of train.micro_batch_size=3"),
        ("train.max_steps=0", "train.max_steps=0: must be > 0"),
        ("parallel.pp_layers=[2]", "parallel.pp_layers=[2]: needs parallel.pp > 1"),
        ("noequals", "is not of the form key=value"),
        (
            "model.position.nope_layers=[3,4]",
            "model.position.nope_layers=[3, 4]: must be distinct layer indices in [0, 4)",
        ),
    ],
)
def test_bad_settings_give_one_clear_line(override, message):
    with pytest.raises(UserError) as info:
        load_config([], [override])
    text = str(info.value)
    assert message in text
    assert "\n" not in text


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.tp=3"], "model.attention.n_heads=4: must be divisible by parallel.tp=3"),
        (
            [
                "model.attention.n_heads=12",
                "model.attention.n_kv_heads=3",
                "parallel.tp=4",
                "model.attention.head_dim=16",
            ],
            "model.attention.n_kv_heads=3: must divide or be divisible by parallel.tp=4",
        ),
        (["model.mlp.hidden=690", "parallel.tp=4"], "model.mlp.hidden=690: must be divisible"),
        (
            ["model.moe.num_experts=4", "model.moe.expert_hidden=30", "parallel.tp=4"],
            "model.moe.expert_hidden=30: must be divisible by parallel.tp=4",
        ),
        (
            [
                "model.moe.num_experts=4",
                "model.moe.expert_hidden=32",
                "model.moe.shared_hidden=34",
                "parallel.tp=4",
            ],
            "model.moe.shared_hidden=34: must be divisible by parallel.tp=4",
        ),
        (
            ["parallel.tp=4", "parallel.sequence_parallel=true", "train.seq_len=250"],
            "train.seq_len=250: must be divisible by parallel.tp=4 with parallel.sequence_parallel",
        ),
    ],
)
def test_impossible_tensor_parallel_layouts(overrides, message):
    with pytest.raises(UserError) as info:
        load_config([], overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_possible_tensor_parallel_layouts():
    # KV heads fewer than tp are replicated; SP with tp=1 is a no-op; the vocab is padded.
    load_config([], ["parallel.tp=4", "model.attention.n_kv_heads=2", "model.vocab_size=8191"])
    load_config([], ["parallel.tp=1", "parallel.sequence_parallel=true", "train.seq_len=255"])
    load_config([str(REPO / "configs/models/tiny/deepseek-v3.yaml")], ["parallel.tp=4"])


def test_bad_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: [1, 2\n")
    with pytest.raises(UserError, match=r"bad\.yaml:\d+:\d+: invalid YAML"):
        load_config([str(bad)])
    with pytest.raises(UserError, match="config file not found"):
        load_config([str(tmp_path / "missing.yaml")])
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        load_config([str(tmp_path / "list.yaml")])
    (tmp_path / "typo.yaml").write_text("trian: {max_steps: 1}\n")
    with pytest.raises(UserError, match=r"typo\.yaml: unknown config key 'trian'.*'train'"):
        load_config([str(tmp_path / "typo.yaml")])


def test_help_lists_every_field_with_its_doc():
    text = config_help()
    for key in (
        "run.output_dir",
        "train.global_batch_size",
        "model.attention.n_kv_heads",
        "checkpoint.load",
        "zero.backend",
        "parallel.pp_schedule",
    ):
        assert key in text
    assert "Peak learning rate." in text


def test_every_shipped_config_loads():
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        load_config([str(path)], ["train.seq_len=32"])


MOE = ["model.moe.num_experts=8", "model.moe.top_k=2"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.moe.n_groups=3"], "model.moe.n_groups=3: must divide model.moe.num_experts=8"),
        (["model.moe.n_groups=0"], "model.moe.n_groups=0: must divide"),
        (
            ["model.moe.n_groups=4", "model.moe.topk_groups=5"],
            "model.moe.topk_groups=5: must be in [1, n_groups=4]",
        ),
        (["model.moe.top_k=9"], "model.moe.top_k=9: must be in [1, 8]"),
        (
            ["model.moe.n_groups=4", "model.moe.topk_groups=1", "model.moe.top_k=3"],
            "model.moe.top_k=3: must be in [1, 2]",
        ),
        (["model.moe.top_k=0"], "model.moe.top_k=0: must be in [1, 8]"),
        (["model.mlp.kind=gelu"], "model.mlp.kind='gelu': MoE experts are gated"),
        (["model.moe.layer_freq=0"], "model.moe.layer_freq=0: must be >= 1"),
        (["model.moe.capacity_factor=-1"], "model.moe.capacity_factor=-1.0: must be >= 0"),
        (["model.moe.first_k_dense=-1"], "model.moe.first_k_dense=-1: must be >= 0"),
        (["model.moe.routed_scaling=0"], "model.moe.routed_scaling=0.0: must be > 0"),
        (["model.moe.score=relu"], "model.moe.score='relu': must be one of softmax, sigmoid"),
        (["model.moe.group_score=sum"], "model.moe.group_score='sum': must be one of top2, max"),
        (
            ["model.mlp.kind=clamped_swiglu", "model.mlp.swiglu_limit=0"],
            "model.mlp.swiglu_limit=0.0: must be > 0",
        ),
    ],
)
def test_moe_routing_mistakes_are_one_line(overrides, message):
    with pytest.raises(UserError) as info:
        load_config([], MOE + overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_moe_routing_mistake_is_one_line_from_the_cli(tmp_path):
    import subprocess
    import sys

    argv = [sys.executable, "-m", "evoformer", "train", *MOE, "model.moe.n_groups=3"]
    argv.append(f"run.output_dir={tmp_path / 'run'}")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.moe.n_groups=3" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("value, mode", [("true", "full"), ("false", "none"), ("full", "full")])
def test_activation_checkpointing_boolean_spelling(value, mode):
    # docs/decisions.md: the old boolean `activation_checkpointing: true` still means full.
    cfg = load_config([], [f"activation_checkpointing={value}"])
    assert cfg.activation_checkpointing == mode
