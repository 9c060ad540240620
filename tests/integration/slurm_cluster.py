"""A real single-node Slurm cluster on localhost for tests: munged, slurmctld and slurmd started by hand.

Everything lives in one temporary directory: its own munge socket (so a munged someone else runs is left
alone), its own slurm.conf (found through SLURM_CONF, so /etc/slurm is never written) and free ports. The
daemons run in the foreground as our children, so they are stopped by the PIDs we started, never by name.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from llmdistill.distributed import free_port

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
DAEMONS = ["/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd"]
# Job states in which a job will not change any more by itself.
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}


class SlurmUnavailable(Exception):
    """Why the cluster cannot run here (not root, packages missing and not installable)."""


def ensure_packages() -> None:
    """Install Slurm's and munge's Debian packages when missing; needs root (CI runs as root)."""
    if all(Path(p).exists() for p in DAEMONS) and shutil.which("sbatch"):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("Slurm packages are missing and installing them needs root (run `make slurm`)")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("Slurm packages are missing and there is no apt-get to install them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
    ):
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            raise SlurmUnavailable(f"`{' '.join(cmd)}` failed: {result.stderr[-2000:]}")


class Cluster:
    """Start with `start()`, always `stop()`; `env` is what a client command (sbatch, squeue, ...) needs."""

    def __init__(self, root: Path, cpus: int = 8):
        self.root = root
        # The node claims more CPUs than the machine has (config_overrides allows it), so a teacher job and a
        # 2-task trainer job can run side by side; the processes themselves set OMP_NUM_THREADS=1.
        self.cpus = cpus
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = root / "slurm.conf"
        # munged runs as the munge user, which cannot traverse pytest's private (0700) temporary directories:
        # its own directory sits directly under the system temp dir.
        self.munge_dir = Path(tempfile.mkdtemp(prefix="llmdistill-munge-"))
        self.munge_socket = self.munge_dir / "munge.socket"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def _write_conf(self) -> None:
        host = socket.gethostname().split(".")[0]
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            f"""# Single-node test cluster (tests/integration/slurm_cluster.py)
ClusterName=llmdistill
SlurmctldHost=localhost
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
# Reject a request the node can never satisfy instead of leaving it pending forever.
EnforcePartLimits=ALL
SlurmdParameters=config_overrides
# Batch jobs may be requeued (the preemption path calls `scontrol requeue` on itself).
JobRequeue=1
# Grace between SIGTERM and SIGKILL when a job is cancelled or requeued.
KillWait=15
NodeName={host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=20000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
        )

    def _spawn(self, name: str, cmd: list[str], **kw) -> None:
        log = (self.root / "log" / f"{name}.out").open("ab")
        self.procs[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True, **kw
        )

    def start(self, timeout: float = 60) -> None:
        self._write_conf()
        mdir = self.munge_dir
        shutil.chown(mdir, "munge", "munge")
        mdir.chmod(0o755)
        # munged refuses to run as root; it runs as the munge user that owns the key.
        self._spawn(
            "munged",
            [
                DAEMONS[0],
                "--foreground",
                "--force",
                f"--socket={self.munge_socket}",
                f"--pid-file={mdir}/munged.pid",
                f"--seed-file={mdir}/munged.seed",
                f"--log-file={mdir}/munged.log",
            ],
            user="munge",
            group="munge",
        )
        self._wait(lambda: self.munge_socket.exists(), timeout, "munged did not create its socket")
        self._spawn("slurmctld", [DAEMONS[1], "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", [DAEMONS[2], "-D", "-f", str(self.conf)])
        self._wait(self._node_idle, timeout, "the node did not become idle")

    def _node_idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True)
        return out.returncode == 0 and out.stdout.strip() == "idle"

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"{what} (exited: {dead}); logs:\n{self.logs()}")
            time.sleep(0.2)

    def logs(self, tail: int = 3000) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*")) + [self.munge_dir / "munged.log"]:
            if f.is_file():
                parts.append(f"--- {f.name}\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel what is left, then stop the daemons we started, by PID, newest first."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--user", "root"], env=self.env, capture_output=True, timeout=30)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        shutil.rmtree(self.munge_dir, ignore_errors=True)

    # --- client helpers -------------------------------------------------------------------------------

    def run(self, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(
            cmd, env=kw.pop("env", self.env), capture_output=True, text=True, timeout=60, **kw
        )

    def sbatch(self, args: list[str], env: dict | None = None, cwd: Path | None = None) -> int:
        result = self.run(["sbatch", "--parsable", *args], env=env or self.env, cwd=cwd)
        if result.returncode != 0:
            raise RuntimeError(f"sbatch {args} failed: {result.stderr}")
        return int(result.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, StartTime, ...); {} once forgotten."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)])
        if out.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", out.stdout))

    def wait_state(self, job_id: int, states: set[str], timeout: float) -> dict[str, str]:
        """Poll until the job is in one of `states` (or finished); bounded by `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states | FINAL_STATES:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout} s")
            time.sleep(0.5)
