"""launch/lib.sh's decisions, run in bash on hand-made run folders: what a status.json says,
and whether a hung run is requeued (only when a checkpoint landed since the previous hang)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.conftest import REPO


def _lib(call: str, run: Path) -> str:
    script = f'source "{REPO}/launch/lib.sh"; {call}'
    proc = subprocess.run(
        ["bash", "-c", script, "lib", str(run)], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def _checkpoint(run: Path, step: int) -> Path:
    path = run / "checkpoints" / f"step_{step}"
    path.mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text(f"step_{step}\n")
    return path


def test_run_state_reads_a_hung_status(tmp_path):
    status = {"state": "hung", "step": 41, "max_steps": 100}
    (tmp_path / "status.json").write_text(json.dumps(status))
    assert _lib('evo_run_state "$1" 0', tmp_path) == "hung 41 100"
    # a status older than this launch does not count
    assert _lib('evo_run_state "$1" 4102444800', tmp_path) == "none 0 0"


def test_a_hang_is_retried_once_per_new_checkpoint(tmp_path):
    assert _lib('evo_hang_retry "$1"', tmp_path) == "stop none"  # nothing to resume from
    first = _checkpoint(tmp_path, 40)
    assert _lib('evo_hang_retry "$1"', tmp_path) == f"retry {first}"
    # hung again before any new checkpoint: the fault is not transient
    assert _lib('evo_hang_retry "$1"', tmp_path) == f"stop {first}"
    second = _checkpoint(tmp_path, 80)
    assert _lib('evo_hang_retry "$1"', tmp_path) == f"retry {second}"
    assert (tmp_path / ".hang_checkpoint").read_text().strip() == str(second)
