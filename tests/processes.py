"""Runs of the real CLIs marked so that every process they start can be found again (psutil), to
check that none outlives the run."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil

from tests.conftest import REPO
from tests.resilience import env, kill_job

MARK = "MOE_TEST_PROCESS_MARK"  # inherited by every process of a run


def start(args: list[str]) -> subprocess.Popen:
    """``python *args`` like tests.resilience.popen (own session, output merged, the repo's
    environment), with a unique ``MARK`` (``proc.token``)."""
    token = uuid.uuid4().hex
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, text=True,
                            env={**env(), MARK: token}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    proc.token = token
    return proc


def leftovers(proc: subprocess.Popen) -> list[psutil.Process]:
    """Live processes (not zombies) carrying ``proc``'s mark, ``proc`` itself included."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and p.environ().get(MARK) == proc.token:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def wait_until_gone(proc: subprocess.Popen, timeout: float) -> list[tuple[int, str]]:
    """(pid, command line) of the processes of ``proc`` still alive after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while leftovers(proc) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [(p.pid, " ".join(p.cmdline())[:120]) for p in leftovers(proc)]


def cleanup(proc: subprocess.Popen) -> None:
    """Whatever a failed test left: its process group, then anything else marked."""
    kill_job(proc)
    for p in leftovers(proc):
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def handlers_installed(proc: subprocess.Popen, sig: int = signal.SIGTERM,
                       timeout: float = 30) -> None:
    """Wait until the process catches ``sig`` (``SigCgt`` in /proc): pretrain_moe.py installs its
    handlers before its imports; until then the interpreter is still starting."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = Path(f"/proc/{proc.pid}/status").read_text().splitlines()
        caught = int(next(ln for ln in status if ln.startswith("SigCgt:")).split()[1], 16)
        if caught >> (sig - 1) & 1:
            return
        time.sleep(0.01)
    raise AssertionError(f"pid {proc.pid} never installed a handler for signal {sig}")


def finish(proc: subprocess.Popen, sent: float, timeout: float = 120) -> tuple[str, float]:
    """Output, and seconds from ``sent`` (time.monotonic of the signal) to the process's end."""
    try:
        out, _ = proc.communicate(timeout=timeout)
        took = time.monotonic() - sent
    finally:
        cleanup(proc)
    return out, took
