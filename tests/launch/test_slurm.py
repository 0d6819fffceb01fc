"""launch/slurm.sbatch on a real local Slurm cluster (two simulated nodes, see slurm_cluster.py):
a 2-node job trains like one process, and a job that is warned (SIGUSR1) and then preempted
checkpoints, requeues itself twice and finishes with the losses of an uninterrupted run."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.launch.conftest import STEPS, assert_losses_match, read_losses, read_status

SBATCH = str(REPO / "launch/slurm.sbatch")


def _submit(slurm, tmp_path: Path, args: list[str], env: dict[str, str]) -> tuple[int, Path]:
    job = slurm.sbatch(
        ["--nodes=2", "--time=10", f"--output={tmp_path}/job-%j.out", SBATCH, *args],
        cwd=tmp_path,
        env={**env, "NPROC_PER_NODE": "2"},
    )
    return job, tmp_path / f"job-{job}.out"


def _wait_for(what: str, check, log: Path, slurm, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            text = log.read_text() if log.exists() else "(no output yet)"
            pytest.fail(f"waited {timeout}s for {what}:\n{text[-4000:]}\n{slurm.log_tail()}")
        time.sleep(0.2)


def _last_step(run: Path) -> int:
    try:
        return max(read_losses(run), default=0)
    except (OSError, ValueError):  # not written yet, or a line half-written
        return 0


def test_two_node_job_trains_like_one_process(
    slurm, run_args, reference_losses, launch_env, tmp_path
):
    run = tmp_path / "run"
    started = time.monotonic()
    job, log = _submit(slurm, tmp_path, run_args(run), launch_env)
    info = slurm.wait(job, timeout=180)
    took = time.monotonic() - started
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", f"{info}\n{text[-4000:]}"
    assert info["NodeList"] == "node[1-2]" and info["NumNodes"] == "2"
    assert f"rendezvous node1:{20000 + job % 20000}" in text
    assert text.count("world 4 (dp 4)") == 1 and f"finished at step {STEPS}/{STEPS}" in text
    assert read_status(run) == {"state": "finished", "step": STEPS, "max_steps": STEPS}
    worst = assert_losses_match(read_losses(run), reference_losses)
    print(
        f"2-node Slurm job {job}: submit to done in {took:.1f} s, largest loss difference "
        f"{worst:.1e}"
    )


def test_warning_and_preemption_checkpoint_requeue_and_resume(
    slurm, run_args, reference_losses, launch_env, tmp_path
):
    run = tmp_path / "run"
    started = time.monotonic()
    job, log = _submit(slurm, tmp_path, run_args(run), launch_env)

    # 1. The time-limit warning, as --signal=B:USR1@N delivers it: to the batch script only.
    _wait_for("step 30", lambda: _last_step(run) >= 30, log, slurm)
    slurm.scancel("--signal=USR1", "--batch", str(job))
    _wait_for("the first resume", lambda: "resumed from" in log.read_text(), log, slurm)
    first_stop = read_status(run)["step"]

    # 2. Preemption: a job in the higher-priority partition needs both nodes; Slurm sends
    #    SIGTERM to the training job's steps (not to the batch script).
    _wait_for(f"step {first_stop + 30}", lambda: _last_step(run) >= first_stop + 30, log, slurm)
    urgent = slurm.sbatch(
        [
            "-p",
            "urgent",
            "--exclusive",
            "--nodes=2",
            f"--output={tmp_path}/urgent-%j.out",
            "--wrap",
            "echo urgent ran",
        ],
        cwd=tmp_path,
    )
    info = slurm.wait(job, timeout=240)
    took = time.monotonic() - started
    text = log.read_text()

    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "2", f"{info}\n{text[-4000:]}"
    assert slurm.job_info(urgent)["JobState"] == "COMPLETED"
    assert "SIGUSR1: time limit near" in text
    stops = [
        int(line.split("stopped by signal at step ")[1].split(";")[0])
        for line in text.splitlines()
        if "stopped by signal at step" in line
    ]
    assert len(stops) == 2 and stops[0] == first_stop and stops[1] > first_stop, stops
    assert text.count("requeueing job") == 2
    for n, step in enumerate(stops, start=1):
        assert f"restart {n}:" in text
        assert f"resumed from {run}/checkpoints/step_{step} at step {step}" in text
    assert f"finished at step {STEPS}/{STEPS}" in text
    assert read_status(run) == {"state": "finished", "step": STEPS, "max_steps": STEPS}
    # Resumed runs rewrite metrics past their checkpoint: one line per step, all as if never
    # interrupted.
    worst = assert_losses_match(read_losses(run), reference_losses)
    print(
        f"Slurm job {job}: stopped at steps {stops}, 2 requeues, submit to done in {took:.1f} s, "
        f"largest loss difference {worst:.1e}"
    )


def test_scancel_saves_and_ends_the_job_for_good(slurm, run_args, launch_env, tmp_path):
    run = tmp_path / "run"
    job, log = _submit(slurm, tmp_path, run_args(run), launch_env)
    _wait_for("step 5", lambda: _last_step(run) >= 5, log, slurm)
    slurm.scancel(str(job))  # SIGTERM to everything, like a preemption, but meant as "stop"
    info = slurm.wait(job, timeout=120)
    text = log.read_text()
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", f"{info}\n{text[-4000:]}"
    status = read_status(run)
    assert status["state"] == "interrupted" and 5 <= status["step"] < STEPS
    assert f"cancelled at step {status['step']}/{STEPS}" in text and "requeueing job" not in text
    assert (run / "checkpoints" / f"step_{status['step']}").is_dir()
