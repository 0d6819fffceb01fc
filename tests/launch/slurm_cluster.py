"""A real Slurm cluster on this machine: munged, slurmctld and two slurmd as simulated nodes.

Debian's packages (slurmd slurmctld slurm-client munge); facts in shared/notes/slurm-local.md.
Everything lives in a private folder (config, munge key and socket, state, logs, pid files) and
on free ports, so nothing touches a system Slurm or munge; the only shared change is one marked
`/etc/hosts` line naming the nodes, removed again on stop. Daemons are stopped by their pid files.

    with LocalSlurm() as cluster:
        job = cluster.sbatch(["--nodes=2", "script.sbatch"], cwd=tmp, env=env)
        cluster.wait(job, timeout=120)

Run as a script (``python tests/launch/slurm_cluster.py``) it starts a cluster and prints the
SLURM_CONF to export, for trying launch/slurm.sbatch by hand; Ctrl-C stops it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "munge", "unmunge")
HOSTS = Path("/etc/hosts")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LocalSlurm:
    """Start/stop a cluster of ``nodes`` simulated nodes (node1..nodeN) with ``cpus`` CPUs each.

    Partitions: ``debug`` (default; preemptible, requeued on preemption after ``grace_time``
    seconds of SIGTERM) and ``urgent`` (higher priority tier: its jobs preempt debug jobs).
    """

    def __init__(self, nodes: int = 2, cpus: int = 2, grace_time: int = 60) -> None:
        self.nodes = [f"node{i}" for i in range(1, nodes + 1)]
        self.cpus = cpus
        self.grace_time = grace_time
        self.root: Path | None = None
        self.env: dict[str, str] = {}
        self._hosts_marker = ""

    # -- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> LocalSlurm:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="evoformer-slurm-"))
        # munged (user munge) must traverse to its socket; nothing here is secret but the key.
        self.root.chmod(0o755)
        self._hosts_marker = f"# evoformer-test-slurm {self.root}"
        try:
            self._start_munge()
            self._write_config()
            self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
            self._add_hosts_line()
            self._run(["slurmctld", "-f", str(self.conf), "-i"])
            for node in self.nodes:
                self._run(["slurmd", "-f", str(self.conf), "-N", node])
            self._wait_idle(timeout=30)
        except BaseException as exc:
            logs = self.log_tail()
            self.stop()
            raise RuntimeError(f"local Slurm cluster did not start: {exc}\n{logs}") from exc

    def stop(self) -> None:
        """Cancel every job, stop the daemons this object started (pid files), clean up."""
        if self.root is None:
            return
        if (self.root / "slurmctld.pid").exists():
            with contextlib.suppress(Exception):
                self._cancel_all(timeout=30)
        daemons = [(self.root / f"slurmd-{n}.pid", "slurmd") for n in self.nodes]
        daemons += [(self.root / "slurmctld.pid", "slurmctld")]
        daemons += [(self.root / "munge" / "munged.pid", "munged")]
        _stop_daemons(daemons)
        self._remove_hosts_line()
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    # -- jobs ------------------------------------------------------------------------------------

    def sbatch(self, args: list[str], cwd: Path, env: dict[str, str] | None = None) -> int:
        """Submit; returns the job id."""
        out = self._run(["sbatch", "--parsable", *args], cwd=cwd, env={**self.env, **(env or {})})
        return int(out.strip().split(";")[0])

    def squeue(self, job: int) -> str:
        """The job's state as squeue shows it ("" once it has left the queue)."""
        proc = subprocess.run(
            ["squeue", "-h", "-j", str(job), "-o", "%T"],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=30,
        )
        return proc.stdout.strip()

    def job_info(self, job: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (kept by slurmctld for MinJobAge after the end)."""
        out = self._run(["scontrol", "show", "job", "-o", str(job)])
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job: int, timeout: float) -> dict[str, str]:
        """Poll until the job has left the queue (squeue; sbatch --wait polls slower)."""
        deadline = time.monotonic() + timeout
        while self.squeue(job):
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job} still {self.squeue(job)} after {timeout:.0f}s")
            time.sleep(0.5)
        return self.job_info(job)

    def scancel(self, *args: str) -> None:
        self._run(["scancel", *args])

    def log_tail(self, lines: int = 40) -> str:
        """The end of every daemon log, for a failing test's message."""
        parts = []
        for log in sorted((self.root / "log").glob("*.log")) if self.root else []:
            parts.append(f"--- {log.name}\n" + "\n".join(log.read_text().splitlines()[-lines:]))
        return "\n".join(parts)

    # -- setup -----------------------------------------------------------------------------------

    @property
    def conf(self) -> Path:
        assert self.root is not None
        return self.root / "slurm.conf"

    def _start_munge(self) -> None:
        munge = self.root / "munge"
        secret = munge / "secret"
        secret.mkdir(parents=True)
        (secret / "munge.key").write_bytes(os.urandom(1024))
        user = pwd.getpwnam("munge")
        for p in (munge, secret, secret / "munge.key"):
            os.chown(p, user.pw_uid, user.pw_gid)
        # munged checks permissions: socket folder open to all, key folder and key private.
        munge.chmod(0o755)
        secret.chmod(0o700)
        (secret / "munge.key").chmod(0o600)
        self.munge_socket = munge / "munge.sock"
        self._run(
            [
                "munged",
                f"--socket={self.munge_socket}",
                f"--key-file={secret / 'munge.key'}",
                f"--pid-file={munge / 'munged.pid'}",
                f"--log-file={munge / 'munged.log'}",
                f"--seed-file={secret / 'munged.seed'}",
            ],
            user="munge",
            group="munge",
        )
        cred = self._run(["munge", "-S", str(self.munge_socket), "-n"])
        check = subprocess.run(
            ["unmunge", "-S", str(self.munge_socket)],
            input=cred,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if "STATUS:          Success" not in check.stdout:
            raise RuntimeError(f"munge does not work: {check.stdout}{check.stderr}")

    def _write_config(self) -> None:
        root = self.root
        for sub in ("log", "state", "spool"):
            (root / sub).mkdir()
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        host = socket.gethostname()
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={self.cpus} "
            "State=UNKNOWN"
            for n, port in zip(self.nodes, node_ports)
        )
        node_list = ",".join(self.nodes)
        # FirstJobId: job ids (and the rendezvous ports launch/slurm.sbatch derives from them)
        # differ between clusters that run at the same time on this machine.
        self.conf.write_text(f"""\
ClusterName=evotest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=10
CommunicationParameters=NoInAddrAny
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
SchedulerParameters=sched_interval=5,bf_interval=5
MailProg=/bin/true
ReturnToService=2
FirstJobId={random.randint(1000, 900_000)}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
{nodes}
PartitionName=debug Nodes={node_list} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 \
GraceTime={self.grace_time}
PartitionName=urgent Nodes={node_list} MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
""")

    def _add_hosts_line(self) -> None:
        with HOSTS.open("a") as f:  # in place: /etc/hosts may be a bind mount
            f.write(f"127.0.0.1 {' '.join(self.nodes)} {self._hosts_marker}\n")

    def _remove_hosts_line(self) -> None:
        if not self._hosts_marker:
            return
        text = HOSTS.read_text()
        kept = [line for line in text.splitlines(True) if self._hosts_marker not in line]
        if len(kept) != len(text.splitlines(True)):
            with HOSTS.open("w") as f:
                f.write("".join(kept))

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states = ""
        while time.monotonic() < deadline:
            states = self._run(["sinfo", "-h", "-N", "-p", "debug", "-o", "%N %t"])
            if sum(line.split()[-1] == "idle" for line in states.splitlines()) == len(self.nodes):
                return
            time.sleep(0.3)
        raise RuntimeError(f"nodes not idle after {timeout}s:\n{states}\n{self.log_tail()}")

    def _cancel_all(self, timeout: float) -> None:
        jobs = self._run(["squeue", "-h", "-o", "%i"]).split()
        if jobs:
            self._run(["scancel", *jobs])
        deadline = time.monotonic() + timeout
        while self._run(["squeue", "-h", "-o", "%i"]).split() and time.monotonic() < deadline:
            time.sleep(0.5)

    def _run(self, cmd: list[str], cwd=None, env=None, **kw) -> str:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            cwd=cwd,
            env=env or self.env or None,
            timeout=60,
            **kw,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}")
        return proc.stdout


def _stop_daemons(pid_files: list[tuple[Path, str]], timeout: float = 10) -> None:
    """SIGTERM the daemons the pid files name (each checked by its process name, so a reused pid
    is left alone), then SIGKILL whatever is still there after ``timeout``."""
    pids = []
    for pid_file, name in pid_files:
        try:
            pid = int(pid_file.read_text().split()[0])
            if Path(f"/proc/{pid}/comm").read_text().strip() == name:
                pids.append(pid)
        except (OSError, ValueError, IndexError):
            continue
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while pids and time.monotonic() < deadline:
            pids = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
            time.sleep(0.1)
        if not pids:
            return


if __name__ == "__main__":
    with LocalSlurm() as cluster:
        print(f"export SLURM_CONF={cluster.conf}   # Ctrl-C stops the cluster", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
