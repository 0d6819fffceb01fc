"""launch/torchrun.sh for real: two agents on 127.0.0.1 (2 nodes x 2 processes, c10d rendezvous)
train exactly like one process, and a killed node ends the job quickly and cleanly."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evoformer.checkpoint import load_model, read_trainer_state, resolve_checkpoint
from evoformer.config import load_config
from evoformer.engine import Trainer
from evoformer.torchrun import report
from tests.conftest import REPO
from tests.launch.conftest import STEPS, assert_losses_match, read_losses, read_status

LAUNCHER = str(REPO / "launch/torchrun.sh")
TINY = str(REPO / "configs/models/tiny/llama.yaml")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, from /proc (workers live in their own session, so a
    process group would miss them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def _kill_tree(pid: int) -> None:
    """SIGKILL a process we started and everything below it, all at once."""
    for p in _process_tree(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


@pytest.fixture
def spawn(tmp_path):
    """``spawn(name, cmd, env)`` -> (Popen, log path); whatever is left is killed at the end."""
    procs: list[subprocess.Popen] = []

    def start(name: str, cmd: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"{name}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                cmd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=tmp_path,
                start_new_session=True,
            )
        procs.append(proc)
        return proc, log

    yield start
    for proc in procs:
        _kill_tree(proc.pid)


def _two_nodes(spawn, args: list[str], env: dict[str, str]):
    """Node A is configured through the environment, node B through options: both paths meet."""
    port = str(_free_port())
    env_a = {
        **env,
        "NNODES": "2",
        "NPROC_PER_NODE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port,
        "RDZV_ID": "loopback",
    }
    a = spawn("node_a", [LAUNCHER, *args], env_a)
    b = spawn(
        "node_b",
        [
            LAUNCHER,
            "--nnodes",
            "2",
            "--nproc-per-node=2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            port,
            "--rdzv-id=loopback",
            "--",
            *args,
        ],
        env,
    )
    return a, b


def _wait(proc: subprocess.Popen, log: Path, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{log.name} still running after {timeout}s:\n{log.read_text()[-3000:]}")


def _dry_run(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "NNODES",
            "NPROC_PER_NODE",
            "MASTER_ADDR",
            "MASTER_PORT",
            "NODE_RANK",
            "RDZV_ID",
            "CUDA_VISIBLE_DEVICES",
            "SLURM_JOB_ID",
        )
    }
    return subprocess.run(
        [LAUNCHER, "--dry-run", *args],
        env={**clean, **env, "PYTHON": "py"},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_command_line_from_options_and_environment():
    one = shlex.split(_dry_run("a.yaml", "train.max_steps=5").stdout)
    assert one[:3] == ["py", "-m", "evoformer.torchrun"]
    assert "--standalone" in one and "--nnodes=1" in one and "--nproc-per-node=1" in one
    assert "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in one
    assert one[-5:] == ["-m", "evoformer", "train", "a.yaml", "train.max_steps=5"]

    env = shlex.split(
        _dry_run(
            NNODES="2", MASTER_ADDR="n1", MASTER_PORT="1234", NPROC_PER_NODE="8", RDZV_ID="j7"
        ).stdout
    )
    for flag in (
        "--nnodes=2",
        "--nproc-per-node=8",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=n1:1234",
        "--rdzv-id=j7",
    ):
        assert flag in env
    # options win over the environment; NODE_RANK switches to a fixed-rank (static) rendezvous
    static = shlex.split(
        _dry_run(
            "--nnodes=2",
            "--master-addr",
            "n2",
            "--node-rank",
            "1",
            "--",
            "b.yaml",
            NNODES="4",
            MASTER_ADDR="n1",
        ).stdout
    )
    assert "--node-rank=1" in static and "--master-addr=n2" in static
    assert "--nnodes=2" in static and "--rdzv-backend=c10d" not in static
    assert static[-1] == "b.yaml"
    # one process per visible GPU by default
    gpus = shlex.split(_dry_run(CUDA_VISIBLE_DEVICES="0,1,2").stdout)
    assert "--nproc-per-node=3" in gpus

    missing = _dry_run("--nnodes", "2")
    assert missing.returncode == 2 and "needs --master-addr" in missing.stderr
    unknown = _dry_run("--gpus", "8")
    assert unknown.returncode == 2 and "unknown option --gpus" in unknown.stderr


def test_report_of_failed_workers():
    out = io.StringIO()
    same = {0: (2, "error: bad key"), 1: (2, "error: bad key"), 2: (-15, "")}
    assert report(same, out) == 2 and out.getvalue() == "error: bad key\n"
    out = io.StringIO()
    split = {0: (2, "error: a"), 1: (2, "error: b"), 3: (2, "error: b")}
    assert report(split, out) == 2
    assert out.getvalue() == "error: a (rank 0)\nerror: b (rank 1, 3)\n"
    out = io.StringIO()
    crash = {0: (-15, ""), 1: (1, "RuntimeError: boom"), 2: (2, "error: bad key")}
    assert report(crash, out) == 1
    assert out.getvalue().splitlines() == [
        "error: rank 1 failed (exit status 1): RuntimeError: boom",
        "error: rank 2 failed (exit status 2): error: bad key",
    ]


@pytest.mark.parametrize("through", ["launch/torchrun.sh", "plain torchrun"])
def test_a_user_error_under_two_processes_is_one_line(through, launch_env, tmp_path):
    args = [TINY, "model.bogus=1", f"run.output_dir={tmp_path}"]
    if through == "plain torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += ["--nproc-per-node=2", "-m", "evoformer", "train", *args]
    else:
        cmd = [LAUNCHER, "--nproc-per-node", "2", *args]
    proc = subprocess.run(cmd, env=launch_env, capture_output=True, text=True, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "unknown config key 'model.bogus'" in errors[0], proc.stderr
    if through == "launch/torchrun.sh":
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines() == errors, proc.stderr  # nothing else


def test_two_nodes_on_loopback_train_like_one_process(
    spawn, run_args, reference_losses, launch_env, tmp_path
):
    out = tmp_path / "run"
    (a, log_a), (b, log_b) = _two_nodes(spawn, run_args(out), launch_env)
    assert _wait(a, log_a, 240) == 0, log_a.read_text()[-3000:]
    assert _wait(b, log_b, 60) == 0, log_b.read_text()[-3000:]
    logs = log_a.read_text() + log_b.read_text()
    assert logs.count("world 4 (dp 4)") == 1  # rank 0 logs, on whichever node it landed
    assert read_status(out) == {"state": "finished", "step": STEPS, "max_steps": STEPS}
    worst = assert_losses_match(read_losses(out), reference_losses)
    print(f"2 nodes x 2 processes on loopback: {STEPS} steps, largest loss difference {worst:.1e}")


def test_killed_node_fails_fast_and_leaves_a_resumable_checkpoint(
    spawn, run_args, reference_losses, launch_env, tmp_path
):
    out = tmp_path / "run"
    args = run_args(out, "checkpoint.save_every=20")
    (a, log_a), (b, log_b) = _two_nodes(spawn, args, launch_env)
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 180
    while not (latest.is_file() and latest.read_text().strip() not in ("", "step_20")):
        assert a.poll() is None and b.poll() is None, log_a.read_text()[-3000:]
        assert time.monotonic() < deadline, "no second checkpoint within 180 s"
        time.sleep(0.1)

    _kill_tree(b.pid)  # node B loses power: its agent and workers vanish at once
    killed = time.monotonic()
    rc = _wait(a, log_a, 120)
    took = time.monotonic() - killed
    message = log_a.read_text()
    ckpt = resolve_checkpoint(out / "checkpoints")
    assert rc != 0
    assert took < 60, f"node A needed {took:.0f} s to notice"
    assert "training FAILED" in message, message[-3000:]
    assert f"Last complete checkpoint: {ckpt}" in message
    # a dead peer is never reported as finished or interrupted; a surviving rank that sees its
    # collective fail records "hung" (engine.watchdog), which a launcher may requeue
    status = out / "status.json"
    assert not status.exists() or json.loads(status.read_text())["state"] == "hung"
    saved = read_trainer_state(ckpt)["step"]
    assert saved >= 40 and saved % 20 == 0
    load_model(ckpt)

    # The message's advice works: rerunning (here on one process) resumes and ends exactly where
    # an uninterrupted run does.
    result = Trainer(load_config(args[:1], [*args[1:], "checkpoint.load=auto"])).train()
    assert min(result.losses) == saved + 1
    worst = assert_losses_match(read_losses(out), reference_losses)
    print(
        f"killed node: the other failed after {took:.1f} s; resumed from step {saved}, "
        f"largest loss difference {worst:.1e}"
    )


def test_ctrl_c_saves_a_checkpoint_and_exits_0(spawn, run_args, launch_env, tmp_path):
    out = tmp_path / "run"
    args = run_args(out, "train.max_steps=100000")
    proc, log = spawn("node", [LAUNCHER, "--nproc-per-node", "2", *args], launch_env)
    deadline = time.monotonic() + 120
    while not ((out / "metrics.jsonl").exists() and len(read_losses(out)) >= 10):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
    # Ctrl-C reaches the terminal's foreground process group: the script, not torchrun (which
    # runs in its own session so that the signal arrives once, forwarded).
    os.kill(proc.pid, signal.SIGINT)
    assert _wait(proc, log, 60) == 0, log.read_text()[-3000:]
    status = read_status(out)
    assert status["state"] == "interrupted" and status["step"] >= 10
    ckpt = out / "checkpoints" / f"step_{status['step']}"
    assert (
        f"stopped by SIGINT at step {status['step']}/100000; checkpoint {ckpt}" in log.read_text()
    )
    assert read_trainer_state(resolve_checkpoint(out))["step"] == status["step"]
