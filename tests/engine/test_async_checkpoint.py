"""Background checkpoints (``checkpoint.async_save``): training goes on while the shards are
written, ``latest`` moves only once the write is complete, resume stays bit-exact (one process
and DDP over 2 ranks), a failed write ends the run in one line with ``latest`` untouched, only one
save is in flight, and a kill during a background write never leaves a torn ``latest``."""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.filesystem as dcp_fs

from evoformer import cli
from evoformer.checkpoint import (
    CheckpointWriteError,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
)
from evoformer.checkpoint import io as ckpt_io
from evoformer.config import load_config
from evoformer.distributed.testing import run_distributed
from evoformer.engine import Trainer
from evoformer.model import build_model
from tests.conftest import REPO

TINY = str(REPO / "configs/models/tiny/llama.yaml")
COMMON = [
    "data.source=synthetic",
    "train.seq_len=32",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "train.max_steps=10",
    "train.log_every=1",
    "run.progress=off",
    "optim.warmup_steps=2",
    "optim.lr=3e-3",
    "model.dropout=0.1",  # the RNG state travels through the checkpoint too
    "checkpoint.save_every=3",
    "checkpoint.async_save=true",
]


def _args(out_dir, *overrides: str) -> list[str]:
    return [*COMMON, f"run.output_dir={out_dir}", *overrides]


def _cfg(out_dir, *overrides: str):
    return load_config([TINY], _args(out_dir, *overrides))


def _metrics(out_dir) -> list[dict]:
    return [json.loads(x) for x in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def test_background_saves_commit_and_resume_bit_exactly(tmp_path, capsys):
    full = Trainer(_cfg(tmp_path / "full")).train()
    ckpts = tmp_path / "full/checkpoints"
    # saved at 3, 6, 9 (background) and 10 (final); keep_last=3; the last one is committed
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_6", "step_9", "step_10"]
    assert (ckpts / "latest").read_text().strip() == "step_10"
    assert not any(p.name.startswith(".tmp") for p in ckpts.iterdir())
    out = capsys.readouterr().out
    assert out.count("writing in the background (the step stalled") == 4
    assert out.count("written in the background (steps stalled") == 4
    writes = [
        m["checkpoint_write_s"] for m in _metrics(tmp_path / "full") if "checkpoint_write_s" in m
    ]
    # on the next metrics line after each commit (those of steps 9 and 10 come after the last)
    assert len(writes) == 2 and all(w > 0 for w in writes)
    # The weights of step 6 were staged at step 6, whatever the optimizer did while they were
    # written: resuming from them gives the uninterrupted run's losses, bit for bit.
    resumed = Trainer(
        _cfg(tmp_path / "resumed", f"checkpoint.load={ckpts / 'step_6'}", "checkpoint.save_every=0")
    ).train()
    assert sorted(resumed.losses) == list(range(7, 11))
    assert all(resumed.losses[s] == full.losses[s] for s in resumed.losses), resumed.losses


def _dp_resume(rank: int, world: int, root: str, layout: list[str]) -> dict:
    full = Trainer(_cfg(f"{root}/full", *layout)).train().losses
    resumed = Trainer(
        _cfg(f"{root}/resumed", *layout, f"checkpoint.load={root}/full/checkpoints/step_6")
    ).train()
    return {"full": full, "resumed": resumed.losses}


@pytest.mark.parametrize(
    "layout", [[], ["zero.backend=fsdp2", "zero.stage=3"]], ids=["ddp", "fsdp2-stage3"]
)
def test_background_saves_over_two_ranks_resume_bit_exactly(tmp_path, layout):
    """Two ranks write their shards on the writer's own gloo group; FSDP2's DTensor shards are
    staged like plain tensors."""
    ranks = run_distributed(_dp_resume, 2, str(tmp_path), layout, timeout=120)
    full, resumed = ranks[0]["full"], ranks[0]["resumed"]
    assert sorted(resumed) == list(range(7, 11))
    assert all(resumed[s] == full[s] for s in resumed)
    assert (tmp_path / "full/checkpoints/latest").read_text().strip() == "step_10"
    assert sorted(p.name for p in (tmp_path / "full/checkpoints/step_10").glob("rng_rank*")) == [
        "rng_rank0.pt",
        "rng_rank1.pt",
    ]


def _fail_writes_from(step: int, monkeypatch):
    """From ``step`` on, every shard write raises ENOSPC, as a full disk would."""
    original = dcp_fs._write_item

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def hook(at: int, trainer) -> None:
        monkeypatch.setattr(dcp_fs, "_write_item", full_disk if at >= step else original)

    return hook


@pytest.mark.parametrize("background", ["true", "false"])
def test_a_failed_write_keeps_latest_and_ends_in_one_line(tmp_path, monkeypatch, background):
    cfg = _cfg(tmp_path / "run", f"checkpoint.async_save={background}")
    trainer = Trainer(cfg, step_hook=_fail_writes_from(4, monkeypatch))
    with pytest.raises(CheckpointWriteError) as err:
        trainer.train()
    line = str(err.value)
    assert "\n" not in line
    assert "checkpoint step_6 could not be written: No space left on device" in line
    assert line.endswith("checkpoints/latest still names step_3")
    ckpts = tmp_path / "run/checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_3"
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_3"]
    assert not any(p.name.startswith(".tmp") for p in ckpts.iterdir())  # removed on failure
    # a background failure is found at a later step boundary
    assert trainer.step in ((7, 8) if background == "true" else (6,))


def test_the_cli_reports_a_failed_write_with_exit_status_2(tmp_path, monkeypatch, capsys):
    def full_disk(*args, **kwargs):
        raise OSError(errno.EACCES, "Permission denied", "/ckpt/__0_0.distcp")

    monkeypatch.setattr(dcp_fs, "_write_item", full_disk)
    status = cli.main(["train", TINY, *_args(tmp_path / "run")])
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: checkpoint step_3 could not be written: Permission denied (/ckpt/__0_0.distcp); "
        "there is no earlier checkpoint"
    ]
    assert not (tmp_path / "run/checkpoints/latest").exists()


def test_one_save_in_flight_and_the_final_save_waits(tmp_path, monkeypatch):
    original_write, original_async = dcp_fs._FileSystemWriter.write_data, dcp.async_save
    futures = []

    def slow_write(*args, **kwargs):
        time.sleep(0.5)  # longer than a step: the next save finds this one still running
        return original_write(*args, **kwargs)

    def tracked_async_save(*args, **kwargs):
        assert all(f.done() for f in futures), "a save started while another was in flight"
        futures.append(original_async(*args, **kwargs))
        return futures[-1]

    monkeypatch.setattr(dcp_fs._FileSystemWriter, "write_data", slow_write)
    monkeypatch.setattr(ckpt_io.dcp, "async_save", tracked_async_save)
    result = Trainer(_cfg(tmp_path / "run", "checkpoint.save_every=1", "train.max_steps=4")).train()
    assert len(futures) == 4 and all(f.done() for f in futures)
    assert result.step == 4
    ckpts = tmp_path / "run/checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_4"
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_2", "step_3", "step_4"]


def _train_with_slow_background_writes(out_dir: str) -> None:
    original = dcp_fs._FileSystemWriter.write_data

    def slow_write(*args, **kwargs):
        time.sleep(0.3)
        return original(*args, **kwargs)

    dcp_fs._FileSystemWriter.write_data = slow_write
    cfg = _cfg(out_dir, "checkpoint.save_every=1", "train.max_steps=100000")
    Trainer(cfg).train()


def test_a_kill_during_a_background_write_never_tears_latest(tmp_path):
    ckpts = tmp_path / "run/checkpoints"
    ctx = mp.get_context("spawn")
    for attempt in range(2):
        proc = ctx.Process(target=_train_with_slow_background_writes, args=(str(tmp_path / "run"),))
        proc.start()
        deadline = time.monotonic() + 60
        # kill while a background write is in flight, after a few commits
        while time.monotonic() < deadline:
            tmps = list(ckpts.glob(".tmp-step_*")) if ckpts.is_dir() else []
            if len(list_checkpoints(ckpts)) >= 2 and tmps:
                break
            time.sleep(0.01)
        assert time.monotonic() < deadline, "no background write was seen in flight"
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        ckpt = resolve_checkpoint(ckpts)  # latest names a complete checkpoint
        model = build_model(_cfg(tmp_path / "run").model, seed=None)
        load_checkpoint(ckpt, model, restore_rng=False)  # and it loads
        (tmp_path / "run/checkpoints").rename(tmp_path / f"killed{attempt}")
