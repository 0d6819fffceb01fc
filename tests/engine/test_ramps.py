"""Batch-size ramp-up and sequence-length warmup: the global batch and seq_len follow the
schedule step by step, tokens are counted as trained, and a run stopped mid-ramp resumes
bit-exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evoformer.config import load_config
from evoformer.data.sampler import BatchSchedule, GlobalBatchSampler
from evoformer.engine import Trainer
from evoformer.errors import UserError
from tests.conftest import REPO


def test_batch_schedule_stages() -> None:
    s = BatchSchedule(16, (4, 4, 96))  # 3 increments, one per 32 samples
    sizes = [s.size(i) for i in range(20)]
    assert sizes == [4] * 8 + [8] * 4 + [12] * 3 + [16] * 5
    for i in range(30):
        assert s.start(i + 1) == s.start(i) + s.size(i)
    # the sampler draws each step's batch at its consumed position: no sample twice in an epoch
    sampler = GlobalBatchSampler(1000, 16, seed=0, schedule=s)
    drawn = np.concatenate([sampler.global_batch(i) for i in range(20)])
    assert len(drawn) == s.start(20) and len(set(drawn.tolist())) == len(drawn)
    assert [len(sampler.global_batch(i)) for i in range(20)] == sizes


def _cfg(out_dir, *overrides: str):
    return load_config(
        [str(REPO / "configs/models/tiny/llama.yaml")],
        [
            "data.source=synthetic",
            "train.seq_len=32",
            "train.global_batch_size=8",
            "train.micro_batch_size=2",
            "train.max_steps=8",
            "train.log_every=1",
            "optim.warmup_steps=2",
            "checkpoint.save_final=false",
            "run.progress=off",
            f"run.output_dir={out_dir}",
            *overrides,
        ],
    )


def _records(out_dir) -> list[dict]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


RAMPS = {
    # 2 -> 4 -> 6 -> 8 sequences over 12 x 32 tokens (4 samples per increment)
    "batch": (["train.batch_ramp=[2,2,384]"], [2, 2, 4, 6, 8, 8, 8, 8], [32] * 8),
    # 8 sequences of 8 tokens, then 16, then 32: the same tokens per step
    "seq_len": (
        ["train.seq_len_schedule=[[0,8],[2,16],[5,32]]"],
        [32, 32, 16, 16, 16, 8, 8, 8],
        [8, 8, 16, 16, 16, 32, 32, 32],
    ),
}


@pytest.mark.parametrize("kind", sorted(RAMPS))
def test_ramps_follow_the_schedule_and_resume_exactly(kind, tmp_path):
    overrides, batch_sizes, seq_lens = RAMPS[kind]
    full = Trainer(_cfg(tmp_path / "full", *overrides, "checkpoint.save_every=3")).train()
    rows = _records(tmp_path / "full")
    assert [r["batch_size"] for r in rows] == batch_sizes
    assert [r["seq_len"] for r in rows] == seq_lens
    tokens = np.cumsum([b * n for b, n in zip(batch_sizes, seq_lens)])
    assert [r["tokens"] for r in rows] == tokens.tolist()
    ckpt = tmp_path / "full/checkpoints/step_3"
    resumed = Trainer(_cfg(tmp_path / "res", *overrides, f"checkpoint.load={ckpt}")).train()
    assert sorted(resumed.losses) == list(range(4, 9))
    assert all(resumed.losses[s] == full.losses[s] for s in resumed.losses)  # bit-exact


def test_bad_ramps_are_one_line(tmp_path):
    with pytest.raises(UserError, match="start must be below"):
        _cfg(tmp_path, "train.batch_ramp=[3,2,100]")
    with pytest.raises(UserError, match="must divide train.seq_len"):
        _cfg(tmp_path, "train.seq_len_schedule=[[0,12]]")
    with pytest.raises(UserError, match=r"\[\[0, len\]"):
        _cfg(tmp_path, "train.seq_len_schedule=[[1,8]]")
    with pytest.raises(UserError, match="does not divide into dp"):
        Trainer(_cfg(tmp_path, "train.batch_ramp=[1,1,100]"))
