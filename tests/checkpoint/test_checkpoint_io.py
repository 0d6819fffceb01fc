"""Atomic checkpoint commits: a crash at any point never yields a torn checkpoint."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from evoformer.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    load_model,
    resolve_checkpoint,
    save_checkpoint,
)
from evoformer.config import load_config, to_yaml
from evoformer.errors import UserError
from evoformer.model import build_model
from tests.conftest import REPO

CFG = load_config([str(REPO / "configs/models/tiny/llama.yaml")], ["train.seq_len=32"])


def _model(seed: int):
    model = build_model(CFG.model, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 512, (2, 8))).sum().backward()
    opt.step()
    return model, opt


def _save(root, step, seed, **kw):
    model, opt = _model(seed)
    return save_checkpoint(root, step, model, opt, {"note": step}, to_yaml(CFG), **kw), model


def test_save_load_round_trip(tmp_path):
    path, model = _save(tmp_path, 5, seed=1)
    assert path.name == "step_5"
    assert (tmp_path / "latest").read_text().strip() == "step_5"
    fresh, opt = build_model(CFG.model, seed=2), None
    opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    state = load_checkpoint(resolve_checkpoint(tmp_path), fresh, opt)
    assert state["step"] == 5 and state["note"] == 5
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    assert all("exp_avg" in s for s in opt.state.values())
    loaded = load_model(tmp_path)
    assert not loaded.training
    ids = torch.randint(0, 512, (1, 10))
    torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


def test_keep_last_prunes_oldest(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, seed=step, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_3", "step_4"]


def test_keep_last_never_prunes_what_latest_names(tmp_path):
    """A run restarted from an earlier step saves lower step numbers than those already there."""
    for step in (5, 6, 2):
        _save(tmp_path, step, seed=step, keep_last=2)
    assert resolve_checkpoint(tmp_path).name == "step_2"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_2", "step_6"]


def _crash_during_commit(root: str) -> None:
    def die(tmp: Path) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    _save(Path(root), 2, seed=2, before_commit=die)


def _slow_saves(root: str) -> None:
    for step in range(1, 1000):
        _save(Path(root), step, seed=step, keep_last=2)


def test_kill_during_save_leaves_previous_checkpoint_intact(tmp_path):
    _, model = _save(tmp_path, 1, seed=1)
    proc = mp.get_context("spawn").Process(target=_crash_during_commit, args=(str(tmp_path),))
    proc.start()
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL
    # The half-written save exists only as a temp folder; latest still names step 1.
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_1"]
    assert any(p.name.startswith(".tmp-step_2") for p in tmp_path.iterdir())
    assert resolve_checkpoint(tmp_path).name == "step_1"
    loaded = load_model(tmp_path)
    for a, b in zip(loaded.parameters(), model.parameters()):
        assert torch.equal(a, b)
    _save(tmp_path, 3, seed=3)  # the next save sweeps the debris
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


def test_random_kills_never_leave_a_torn_latest(tmp_path):
    ctx = mp.get_context("spawn")
    for delay in (2.5, 3.1, 3.7):
        proc = ctx.Process(target=_slow_saves, args=(str(tmp_path),))
        proc.start()
        time.sleep(delay)
        proc.kill()
        proc.join()
        if (tmp_path / "latest").exists():
            ckpt = resolve_checkpoint(tmp_path)
            model = build_model(CFG.model, seed=None)
            load_checkpoint(ckpt, model, restore_rng=False)  # must not raise


def test_corrupt_or_missing_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(UserError, match="is not a checkpoint"):
        resolve_checkpoint(tmp_path)
    path, _ = _save(tmp_path, 1, seed=1)
    for f in path.glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(UserError, match="cannot be loaded"):
        load_model(tmp_path)
    (path / ".metadata").unlink()
    with pytest.raises(UserError, match="incomplete or corrupt: .metadata is missing"):
        load_model(tmp_path)
    (tmp_path / "latest").write_text("step_9\n")
    with pytest.raises(UserError, match="names step_9, which does not exist"):
        load_model(tmp_path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_metadata_with_foreign_objects_is_refused(tmp_path):
    import pickle

    path, _ = _save(tmp_path, 1, seed=1)
    (path / ".metadata").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(UserError, match="refusing to load posix.system"):
        load_model(tmp_path)
