"""The test suite changes the machine only when asked: without the opt-in a missing launch tool
skips with one line saying how to enable it, and nothing is installed."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.launch import conftest as launch


@pytest.fixture
def root_with_apt(monkeypatch):
    """A root machine with apt-get and none of the tools; records every command run."""
    ran: list[list[str]] = []
    monkeypatch.setattr(launch.os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda b: "/usr/bin/apt-get" if b == "apt-get" else None)
    monkeypatch.setattr(
        subprocess, "run", lambda cmd, **kw: ran.append(cmd) or subprocess.CompletedProcess(cmd, 1)
    )
    for name in (launch.INSTALL_OPT_IN, launch.REQUIRE_OPT_IN):
        monkeypatch.delenv(name, raising=False)
    return ran


def test_without_the_opt_in_nothing_is_installed_and_the_skip_says_how(root_with_apt):
    with pytest.raises(pytest.skip.Exception) as skipped:
        launch.need_tools(["sbatch"], apt=["slurm-client"])
    assert root_with_apt == []
    assert "EVOFORMER_INSTALL_TEST_TOOLS=1" in str(skipped.value)
    assert "apt-get install slurm-client" in str(skipped.value)


def test_the_opt_in_installs(root_with_apt, monkeypatch):
    monkeypatch.setenv(launch.INSTALL_OPT_IN, "1")
    with pytest.raises(pytest.skip.Exception):  # the stubbed install "fails"
        launch.need_tools(["sbatch"], apt=["slurm-client"])
    assert any(cmd[:2] == ["apt-get", "install"] for cmd in root_with_apt)


def test_ci_turns_the_skip_into_a_failure(root_with_apt, monkeypatch):
    monkeypatch.setenv(launch.REQUIRE_OPT_IN, "1")
    with pytest.raises(pytest.fail.Exception):
        launch.need_tools(["sbatch"], apt=["slurm-client"])
    assert root_with_apt, "CI opts in: the install is attempted"
