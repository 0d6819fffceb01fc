"""The launch tests' shared pieces: one tiny real-text run, its single-process reference losses,
the external tools they need, and the local Slurm cluster.

Every launch test trains the same run (tiny LLaMA, seq 32, global batch 8 = 4 ranks x 2) so each
layout is compared with one single-process reference: `run_args(out_dir)` builds its arguments.
Its learning rate is modest on purpose: at 3e-3 this tiny model amplifies the rounding-level
difference between a 4-rank all-reduce and 4 accumulated micro-batches to 3e-5 relative within
100 steps; at 1e-3 the 300 steps stay within 3e-7.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from evoformer.config import load_config
from evoformer.data import (
    default_corpus_files,
    load_tokenizer,
    preprocess,
    train_tokenizer,
)
from evoformer.engine import Trainer
from tests.conftest import REPO
from tests.launch.slurm_cluster import LocalSlurm

TINY = str(REPO / "configs/models/tiny/llama.yaml")
STEPS = 300
# Opt-ins, read when a test runs. EVOFORMER_INSTALL_TEST_TOOLS=1 lets the launch tests change
# the machine: apt/pip-install the tools they need, start a local Slurm cluster as root (it
# adds, then removes, an /etc/hosts line). EVOFORMER_REQUIRE_LAUNCH_TOOLS=1 (CI) implies it and
# turns every skip into a failure. Without either, a missing tool skips with one line.
INSTALL_OPT_IN = "EVOFORMER_INSTALL_TEST_TOOLS"
REQUIRE_OPT_IN = "EVOFORMER_REQUIRE_LAUNCH_TOOLS"


def _required() -> bool:
    return os.environ.get(REQUIRE_OPT_IN) == "1"


def may_change_machine() -> bool:
    return _required() or os.environ.get(INSTALL_OPT_IN) == "1"


def _skip_or_fail(message: str) -> None:
    if _required():
        pytest.fail(message + f"; {REQUIRE_OPT_IN}=1 forbids skipping")
    pytest.skip(message)


SLURM_PACKAGES = ["slurmd", "slurmctld", "slurm-client", "munge"]
SLURM_BINARIES = [
    "munged",
    "munge",
    "unmunge",
    "slurmctld",
    "slurmd",
    "sbatch",
    "squeue",
    "scontrol",
    "scancel",
    "sinfo",
]


def need_tools(binaries: list[str], apt: list[str] | None = None, pip: str | None = None) -> None:
    """Make sure ``binaries`` are on PATH: with the opt-in, install the Debian packages ``apt``
    (when root with apt-get) or the PyPI requirement ``pip`` first; else skip saying how (fail
    instead under EVOFORMER_REQUIRE_LAUNCH_TOOLS=1, as in CI)."""
    missing = [b for b in binaries if shutil.which(b) is None]
    how = f"apt-get install {' '.join(apt)} as root" if apt else f"pip install {pip}"
    if missing and not may_change_machine():
        pytest.skip(
            f"needs {', '.join(missing)}: {how}, or set {INSTALL_OPT_IN}=1 to let the tests "
            "install them"
        )
    if missing and apt and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *apt]
        if subprocess.run(install, env=env, capture_output=True, timeout=600).returncode:
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
            subprocess.run(install, env=env, capture_output=True, timeout=600)
    elif missing and pip:
        install = [sys.executable, "-m", "pip", "install", "--quiet", pip]
        subprocess.run(install, capture_output=True, timeout=600)
    missing = [b for b in binaries if shutil.which(b) is None]
    if missing:
        _skip_or_fail(f"needs {', '.join(missing)} ({how} failed or was not possible)")


def read_losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss from a run's metrics.jsonl."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def read_status(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "status.json").read_text())


def assert_losses_match(got: dict[int, float], want: dict[int, float], rel: float = 1e-5) -> float:
    """Every step present, each loss within ``rel`` of the reference; returns the largest
    relative difference."""
    assert sorted(got) == sorted(want), f"steps {sorted(set(want) ^ set(got))[:10]} differ"
    worst = max(abs(got[s] - want[s]) / abs(want[s]) for s in want)
    assert worst <= rel, f"largest relative loss difference {worst:.2e} > {rel:.0e}"
    return worst


@pytest.fixture(scope="session")
def token_store(tmp_path_factory) -> Path:
    """30 standard-library files tokenised once (512-token BPE) into a token store, so no rank
    tokenises anything."""
    root = tmp_path_factory.mktemp("launch-corpus")
    files = default_corpus_files()[::20][:30]
    tokenizer = load_tokenizer(train_tokenizer(files, root / "tok", 512, seed=0))
    preprocess(files, tokenizer, root / "corpus.tok", log=lambda *a, **k: None, workers=0)
    return root / "corpus.tok"


@pytest.fixture(scope="session")
def run_args(token_store) -> Callable[..., list[str]]:
    """``run_args(out_dir, *extra)``: config file and overrides of the shared tiny run."""

    def build(out_dir: Path, *extra: str) -> list[str]:
        return [
            TINY,
            "data.source=files",
            f"data.paths=[{token_store}]",
            "train.seq_len=32",
            "train.global_batch_size=8",
            "train.micro_batch_size=2",
            f"train.max_steps={STEPS}",
            "train.log_every=1",
            "train.eval_every=0",
            "optim.warmup_steps=2",
            "optim.lr=1e-3",
            "run.progress=off",
            "run.threads=1",
            f"run.output_dir={out_dir}",
            *extra,
        ]

    return build


@pytest.fixture(scope="session")
def reference_losses(run_args, tmp_path_factory) -> dict[int, float]:
    """The shared run on one process, in this process: what every launch layout must match."""
    out = tmp_path_factory.mktemp("reference") / "run"
    files, overrides = run_args(out)[:1], run_args(out)[1:]
    result = Trainer(load_config(files, overrides)).train()
    assert not result.interrupted and len(result.losses) == STEPS
    return result.losses


@pytest.fixture
def launch_env() -> dict[str, str]:
    """Environment for launcher subprocesses: this interpreter, one thread per worker."""
    return {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def slurm():
    """A two-node local Slurm cluster for a test module (root and Debian's slurm packages)."""
    if not may_change_machine():
        pytest.skip(
            "a local Slurm cluster starts root daemons and edits /etc/hosts: set "
            f"{INSTALL_OPT_IN}=1 to allow it"
        )
    if os.geteuid() != 0:
        _skip_or_fail("a local Slurm cluster needs root (daemons, munge user, /etc/hosts)")
    need_tools(SLURM_BINARIES, apt=SLURM_PACKAGES)
    with LocalSlurm(nodes=2, cpus=2) as cluster:
        yield cluster
