"""launch/preprocess_array.sbatch without Slurm: its array tasks and merge step run as Slurm
would run them (the array variables set by hand), and the merged store equals one run's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from evoformer.data import (
    ShardedStore,
    default_corpus_files,
    load_tokenizer,
    preprocess,
    train_tokenizer,
)
from tests.conftest import REPO

SCRIPT = str(REPO / "launch/preprocess_array.sbatch")


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    full = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "LAUNCH_PREFIX": f"{sys.executable} -m",
        "EVOFORMER": "evoformer",
        "PREPROCESS_ARGS": "--workers 1",
        **env,
    }
    return subprocess.run(
        ["bash", SCRIPT, *args], env=full, capture_output=True, text=True, timeout=120
    )


def test_array_tasks_then_merge(tmp_path: Path) -> None:
    files = default_corpus_files()[::40][:9]
    raw = tmp_path / "raw"
    raw.mkdir()
    for i, f in enumerate(files):
        (raw / f"{i:02d}.py").write_text(f.read_text(encoding="utf-8"), encoding="utf-8")
    tok = load_tokenizer(train_tokenizer(files, tmp_path / "tok", 400, seed=0))
    out = tmp_path / "out"
    glob = str(raw / "*.py")
    for task in ("1", "0"):
        env = {
            "SLURM_ARRAY_TASK_ID": task,
            "SLURM_ARRAY_TASK_COUNT": "2",
            "SLURM_ARRAY_TASK_MIN": "0",
        }
        proc = _run(str(out), str(tok.path), glob, **env)
        assert proc.returncode == 0, proc.stderr
        assert f"slice {task} of 2: tokenised" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["slice-00000-of-00002", "slice-00001-of-00002"]
    proc = _run("--merge", str(out))
    assert proc.returncode == 0, proc.stderr
    merged = ShardedStore(out)
    whole = preprocess([glob], tok, tmp_path / "whole", log=lambda _: None, workers=0)
    assert merged.n_docs == whole.n_docs == 9
    np.testing.assert_array_equal(
        np.concatenate([merged.doc(i) for i in range(9)]),
        np.concatenate([whole.doc(i) for i in range(9)]),
    )
    # outside an array task the script refuses with one line, and a bad merge is exit 2
    proc = _run(str(out), str(tok.path), glob)
    assert proc.returncode == 2 and "not an array task" in proc.stderr
    proc = _run("--merge", str(tmp_path / "nothing"))
    assert proc.returncode == 2 and "nothing to merge" in proc.stderr
