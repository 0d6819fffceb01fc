"""Data and tensor parallelism through the real launcher: torchrun x2 (gloo, dp=2 or tp=2 with
sequence parallelism) trains like one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from evoformer.checkpoint import load_model
from evoformer.config import load_config
from evoformer.engine import Trainer
from tests.conftest import REPO

TINY = str(REPO / "configs/models/tiny/llama.yaml")


def _losses(run_dir) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def test_torchrun_dp2_matches_single_process(run_overrides, tmp_path):
    common = [o for o in run_overrides if not o.startswith("run.output_dir")]
    common += ["train.max_steps=6", "train.micro_batch_size=2", "train.eval_every=3"]
    single = Trainer(load_config([TINY], [*common, f"run.output_dir={tmp_path / 'one'}"])).train()

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "evoformer",
            "train",
            TINY,
            *common,
            f"run.output_dir={tmp_path / 'two'}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world 2 (dp 2)" in proc.stdout
    assert proc.stdout.count("step      6/6") == 1  # only rank 0 logs
    two = _losses(tmp_path / "two")
    assert sorted(two) == list(range(1, 7))
    for step, loss in single.losses.items():
        assert two[step] == pytest.approx(loss, rel=1e-5), step
    a, b = load_model(tmp_path / "one"), load_model(tmp_path / "two")
    for pa, pb in zip(a.parameters(), b.parameters()):
        # Adam divides by sqrt(v): rounding-level gradient differences show up at ~1e-6 absolute.
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)


def test_torchrun_tp2_sequence_parallel_matches_single_process(run_overrides, tmp_path):
    """`torchrun ... -m evoformer train ... parallel.tp=2 parallel.sequence_parallel=true`: the
    same losses as one process, one log, and its checkpoint loads on one process for inference."""
    common = [o for o in run_overrides if not o.startswith("run.output_dir")]
    common += ["train.max_steps=4", "train.eval_every=4", "train.eval_batches=2"]
    single = Trainer(load_config([TINY], [*common, f"run.output_dir={tmp_path / 'one'}"])).train()

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "evoformer",
            "train",
            TINY,
            *common,
            "parallel.tp=2",
            "parallel.sequence_parallel=true",
            f"run.output_dir={tmp_path / 'tp'}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world 2 (tp 2 x dp 1, sequence parallel)" in proc.stdout
    assert proc.stdout.count("step      4/4") == 1  # only rank 0 logs
    lines = [json.loads(x) for x in (tmp_path / "tp/metrics.jsonl").read_text().splitlines()]
    tp = {r["step"]: r["loss"] for r in lines if "loss" in r}
    val = [r["val_loss"] for r in lines if "val_loss" in r]
    assert sorted(tp) == [1, 2, 3, 4]
    for step, loss in single.losses.items():
        assert tp[step] == pytest.approx(loss, rel=1e-5), step
    assert val == [pytest.approx(single.val_losses[4], rel=1e-5)]
    a, b = load_model(tmp_path / "one"), load_model(tmp_path / "tp")  # tp=2 shards -> one
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=2e-4)
