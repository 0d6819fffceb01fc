"""Hang visibility: a rank stuck past ``dist.timeout_s`` ends the job within the timeout plus a
few seconds, with one line naming the step, where it waited and the last complete checkpoint;
the collective timeout and the NCCL settings reach ``init_process_group``."""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from evoformer.config import load_config
from evoformer.config.schema import DistConfig
from evoformer.distributed import ParallelDims
from evoformer.distributed import dims as dims_module
from evoformer.distributed.testing import DistributedTestError, run_distributed
from evoformer.engine import Trainer
from evoformer.engine.watchdog import Watchdog, grace_s, hang_error
from evoformer.errors import HANG_EXIT, JobHung, UserError
from tests.conftest import REPO

TINY = str(REPO / "configs/models/tiny/llama.yaml")
TIMEOUT = 5.0


def _stalled_rank(rank: int, world: int, root: str, wedged: bool) -> None:
    with open(f"{root}/stderr{rank}", "w") as err:
        os.dup2(err.fileno(), 2)  # the watchdog's line goes to fd 2, then the process ends

    def hook(step: int, trainer) -> None:
        if step == 3 and rank == 1:
            Path(f"{root}/stall_started").write_text(str(time.time()))
            if wedged:  # a rank too stuck to report itself (e.g. in C code holding the GIL)
                trainer.watchdog.stop()
            time.sleep(120)  # far past the timeout

    cfg = load_config(
        [TINY],
        [
            "data.source=synthetic",
            "train.seq_len=32",
            "train.global_batch_size=8",
            "train.micro_batch_size=2",
            "train.max_steps=6",
            "run.progress=off",
            "checkpoint.save_every=2",
            f"dist.timeout_s={TIMEOUT}",
            f"run.output_dir={root}/run",
        ],
    )
    try:
        Trainer(cfg, step_hook=hook).train()
    except JobHung as hung:  # what the CLI does with it (cli.main)
        print(f"error: {hung}", file=sys.stderr, flush=True)
        os._exit(HANG_EXIT)


def test_the_watchdog_of_a_waiting_rank_ends_the_job_with_one_line(tmp_path):
    """Rank 1 stalls in a step hook and cannot report; rank 0, waiting in the end-of-step
    all-reduce, ends itself past dist.timeout_s with the line."""
    with pytest.raises(DistributedTestError, match="died without a result") as err:
        run_distributed(_stalled_rank, 2, str(tmp_path), True, timeout=60)
    assert f"0: {HANG_EXIT}" in str(err.value)  # rank 0 ended itself with the hang status
    started = float((tmp_path / "stall_started").read_text())
    ended = (tmp_path / "stderr0").stat().st_mtime
    assert TIMEOUT <= ended - started <= TIMEOUT + grace_s(TIMEOUT) + 4
    lines = [ln for ln in (tmp_path / "stderr0").read_text().splitlines() if "error:" in ln]
    ckpt = tmp_path / "run/checkpoints/step_2"
    assert lines == [
        "error: rank 0: no progress for over 5 s (dist.timeout_s) at step 3, in the end-of-step "
        "all-reduce (stop flag, background save state); "
        f"the last complete checkpoint is {ckpt}; ending the job"
    ]
    status = json.loads((tmp_path / "run/status.json").read_text())
    assert status["state"] == "hung" and status["step"] == 3


def test_a_stalled_rank_and_its_peer_both_end_with_one_line(tmp_path):
    """Rank 1's own watchdog ends it (naming the step hook); rank 0 then loses its peer in the
    all-reduce and ends with one line too, within the timeout plus a few seconds."""
    with pytest.raises(DistributedTestError, match="died without a result|raised"):
        run_distributed(_stalled_rank, 2, str(tmp_path), False, timeout=60)
    started = float((tmp_path / "stall_started").read_text())
    ckpt = tmp_path / "run/checkpoints/step_2"
    errors = {}
    for rank in (0, 1):
        path = tmp_path / f"stderr{rank}"
        deadline = time.monotonic() + 10  # the parent may have stopped rank 0 first
        while "error:" not in path.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        errors[rank] = [ln for ln in path.read_text().splitlines() if "error:" in ln]
        assert len(errors[rank]) == 1, errors
        assert errors[rank][0].endswith(f"the last complete checkpoint is {ckpt}; ending the job")
        assert path.stat().st_mtime - started <= TIMEOUT + grace_s(TIMEOUT) + 4
    assert (
        "rank 1: no progress for over 5 s (dist.timeout_s) at step 3, in the step hook"
        in (errors[1][0])
    )
    # its own watchdog, or the lost peer, whichever comes first
    assert errors[0][0].startswith(("error: rank 0: a collective ", "error: rank 0: no progress"))
    assert "at step 3, in the end-of-step all-reduce" in errors[0][0]


def test_the_watchdog_stays_quiet_while_progress_is_made():
    fired = []
    dog = Watchdog(0.5, 0, lambda: "no checkpoint", on_fire=fired.append)
    dog.start()
    try:
        for step in range(20):  # 2 s of beats every 0.1 s: never 0.5 s (+ grace) idle
            dog.beat(step, "the step")
            time.sleep(0.1)
    finally:
        dog.stop()
    assert fired == []
    assert dog.message() == (
        "rank 0: no progress for over 0.5 s (dist.timeout_s) at step 19, in the step; "
        "no checkpoint; ending the job"
    )


def test_a_timed_out_collective_becomes_one_line():
    err = RuntimeError("[gloo] Timed out waiting 5000ms for recv operation to complete\nmore")
    hung = hang_error(err, 1, 7, "the step", "the last complete checkpoint is step_6")
    assert isinstance(hung, UserError)
    assert str(hung) == (
        "rank 1: a collective timed out at step 7, in the step ([gloo] Timed out waiting 5000ms "
        "for recv operation to complete); the last complete checkpoint is step_6; ending the job"
    )


def test_timeout_and_nccl_settings_reach_init_process_group(monkeypatch, tmp_path):
    seen = {}

    def fake_init(backend, **kwargs):
        seen.update(backend=backend, **kwargs)

    monkeypatch.setattr(dims_module.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dims_module.dist, "init_process_group", fake_init)
    for key in ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_DUMP_ON_TIMEOUT", "TORCH_FR_DUMP_TEMP_FILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # what the user set wins
    dims = ParallelDims(world_size=2, rank=0, local_rank=0)
    cfg = DistConfig(timeout_s=42.0, flight_recorder=500)
    dims_module.init_process_group(dims, torch.device("cpu"), cfg, tmp_path)
    assert seen == {"backend": "gloo", "rank": 0, "world_size": 2, "timeout": timedelta(seconds=42)}
    assert "TORCH_FR_BUFFER_SIZE" not in os.environ  # gloo: no NCCL variables
    env = dims_module.nccl_environment(cfg, tmp_path)
    assert env["TORCH_FR_BUFFER_SIZE"] == env["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "500"
    assert env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert env["TORCH_FR_DUMP_TEMP_FILE"] == str(tmp_path / "flight_recorder" / "rank_")
    assert "TORCH_FR_BUFFER_SIZE" not in dims_module.nccl_environment(DistConfig(flight_recorder=0))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("dist.timeout_s=0", "dist.timeout_s=0.0: must be > 0 seconds"),
        ("dist.async_error_handling=5", "must be 0, 1, 2 or 3"),
    ],
)
def test_bad_dist_settings_are_one_line_errors(override, message):
    with pytest.raises(UserError, match=message):
        load_config([TINY], [override])
