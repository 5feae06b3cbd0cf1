"""A real one-node SLURM cluster on this machine, for the tests that submit jobs.

Debian's munge, slurmctld and slurmd run in the foreground from a slurm.conf written into a temporary
folder (one node on localhost with this machine's CPUs and memory, process tracking without cgroups so it
works in a container, no accounting database); every client command finds it through ``SLURM_CONF``. The
daemons are stopped by the process ids started here. CI installs the packages (.ci/run); a machine without
them fails these tests loudly instead of skipping them, so a broken cluster never passes for a green run.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
READY_TIMEOUT_S = 60


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _memory_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def write_slurm_conf(folder: Path) -> Path:
    """slurm.conf for one node named after this host, reached on 127.0.0.1, with this machine's CPUs and
    (a little less than) its memory, so slurmd never finds the node smaller than configured and drains it."""
    host = socket.gethostname().split(".")[0]
    state = folder / "state"
    spool = folder / "spool"
    for path in (state, spool):
        path.mkdir(parents=True, exist_ok=True)
    cpus = os.cpu_count() or 1
    settings = {
        "ClusterName": "hermes-test",
        "SlurmctldHost": f"{host}(127.0.0.1)",
        "SlurmctldPort": _free_port(),
        "SlurmdPort": _free_port(),
        "SlurmUser": "root",
        "SlurmdUser": "root",
        "AuthType": "auth/munge",
        "CredType": "cred/munge",
        "AuthInfo": f"socket={folder / 'munge.socket'}",
        "StateSaveLocation": state,
        "SlurmdSpoolDir": spool,
        "SlurmctldPidFile": folder / "slurmctld.pid",
        "SlurmdPidFile": folder / "slurmd.pid",
        "SlurmctldLogFile": folder / "slurmctld.log",
        "SlurmdLogFile": folder / "slurmd.log",
        "ProctrackType": "proctrack/linuxproc",
        "TaskPlugin": "task/none",
        "JobAcctGatherType": "jobacct_gather/none",
        "AccountingStorageType": "accounting_storage/none",
        "SelectType": "select/cons_tres",
        "SelectTypeParameters": "CR_CPU",
        "SchedulerType": "sched/builtin",
        "ReturnToService": 2,
        "JobRequeue": 1,
        # No accounting database: the controller's memory is the only record of an ended job, and the
        # tests (and `slurm status`) read it long after the first job of a chain ended.
        "MinJobAge": 7200,
        "KillWait": 60,
        "MpiDefault": "none",
        "SwitchType": "switch/none",
    }
    lines = [f"{key}={value}" for key, value in settings.items()]
    lines += [
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={_memory_mib() * 9 // 10} State=UNKNOWN",
        f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO",
    ]
    conf = folder / "slurm.conf"
    conf.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return conf


class LocalCluster:
    """munged, slurmctld and slurmd started here, in the foreground, and stopped by their process ids."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.conf = write_slurm_conf(folder)
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        missing = [name for name in (*DAEMONS, "sbatch") if shutil.which(name) is None]
        if missing:
            raise RuntimeError(
                f"SLURM is not installed ({', '.join(missing)} missing): "
                "apt-get install slurmctld slurmd slurm-client munge"
            )
        key = self.folder / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._spawn(
            "munged",
            "--foreground",
            "--force",
            f"--key-file={key}",
            f"--socket={self.folder / 'munge.socket'}",
            f"--pid-file={self.folder / 'munged.pid'}",
            f"--log-file={self.folder / 'munged.log'}",
            f"--seed-file={self.folder / 'munged.seed'}",
        )
        self._ready(lambda: (self.folder / "munge.socket").exists(), "munged")
        self._spawn("slurmctld", "-D", "-i", "-f", str(self.conf))
        self._ready(lambda: self._ok("scontrol", "ping"), "slurmctld")
        self._spawn("slurmd", "-D", "-f", str(self.conf))
        self._ready(self._node_idle, "slurmd")

    def stop(self) -> None:
        """Cancel what is still queued or running (slurmd leaves running jobs behind when it stops), then
        stop the daemons in reverse order of their start."""
        if self.processes and self._ok("scontrol", "ping"):
            jobs = subprocess.run(
                ["squeue", "--noheader", "--format=%i"], env=self.env, capture_output=True, text=True
            ).stdout.split()
            if jobs:
                subprocess.run(["scancel", *jobs], env=self.env, capture_output=True)
                _wait_for(lambda: not self._squeue_has_jobs())
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.processes.clear()

    def _spawn(self, *command: str) -> None:
        log = (self.folder / f"{command[0]}.out").open("wb")
        self.processes.append(
            subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.folder)
        )

    def _ok(self, *command: str) -> bool:
        return subprocess.run(command, env=self.env, capture_output=True).returncode == 0

    def _squeue_has_jobs(self) -> bool:
        listed = subprocess.run(["squeue", "--noheader"], env=self.env, capture_output=True, text=True)
        return bool(listed.stdout.strip())

    def _node_idle(self) -> bool:
        result = subprocess.run(
            ["sinfo", "--noheader", "--format=%t"], env=self.env, capture_output=True, text=True
        )
        return result.returncode == 0 and result.stdout.strip() in ("idle", "mix", "alloc")

    def _daemons_alive(self) -> bool:
        return all(process.poll() is None for process in self.processes)

    def _ready(self, ready: Callable[[], bool], name: str) -> None:
        """Wait for a daemon; if it dies or never answers, stop the others and fail with every log."""
        if _wait_for(lambda: not self._daemons_alive() or ready()) and self._daemons_alive():
            return
        logs = "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-2000:]}"
            for path in sorted(self.folder.glob("*.out")) + sorted(self.folder.glob("*.log"))
        )
        self.stop()
        raise RuntimeError(f"{name} did not come up within {READY_TIMEOUT_S} s\n{logs}")


def _wait_for(condition: Callable[[], bool], timeout: float = READY_TIMEOUT_S) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """The running cluster; SLURM_CONF points every command of the session (and every job) at it."""
    cluster = LocalCluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        cluster.stop()
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
