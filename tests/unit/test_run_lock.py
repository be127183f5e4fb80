"""One run per directory (megatron_ext.platform.run_lock): a live holder's lock is refused with
its pid, host and lock path; a lock whose process is gone (killed, a zombie, a reused pid) is
taken over with one warning; a lock from another host is refused unless it carries this
process's SLURM_JOB_ID (a requeued job); only the holder itself removes it, not a forked child.
Holders are real processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from megatron_ext.config.loader import ConfigError
from megatron_ext.platform.run_lock import RunLock, RunLocks, my_record
from tests.conftest import REPO

HOLDER = textwrap.dedent("""
    import sys, time
    from megatron_ext.platform.run_lock import RunLocks
    locks = RunLocks([(sys.argv[1], "checkpoint.save")])
    locks.acquire()
    print("held", flush=True)
    sys.stdin.readline()  # hold until told (or killed)
    locks.release()
""")


@pytest.fixture
def holder(tmp_path):
    """Start a real process holding ``tmp_path/ckpt``'s lock; yields (process, lock dir)."""
    procs = []

    def start(path=tmp_path / "ckpt", **env):
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], cwd=REPO, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                env=dict(os.environ, PYTHONPATH=str(REPO), **env))
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc, path

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def _lock_record(path) -> dict:
    return json.loads((path / ".lock").read_text())


def test_live_holder_is_refused_with_pid_host_and_lock(holder):
    proc, path = holder()
    with pytest.raises(ConfigError) as e:
        RunLock(path, "checkpoint.save").acquire()
    msg = str(e.value)
    assert msg.startswith(f"checkpoint.save {path} is in use by another run (pid {proc.pid} "
                          f"on host {socket.gethostname()}, since ")
    assert msg.endswith(f", lock {path}/.lock)")
    assert _lock_record(path)["pid"] == proc.pid  # the refusal left the holder's lock alone
    # Released by the holder: the next run takes it without a word.
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.wait(timeout=10) == 0
    assert not path.exists()  # the holder made the directory for its lock and removed it
    lock = RunLock(path, "checkpoint.save")
    assert lock.acquire() == []
    (path / "keep").write_text("")
    lock.release()
    assert sorted(p.name for p in path.iterdir()) == ["keep"]  # no temporary files either


@pytest.mark.parametrize("how", ["killed", "zombie"])
def test_lock_of_a_dead_process_is_taken_over_with_one_warning(holder, how):
    proc, path = holder()
    proc.send_signal(signal.SIGKILL)
    if how == "killed":
        proc.wait()
    else:  # killed but not reaped yet: its pid still exists, as a zombie
        deadline = time.time() + 10
        while open(f"/proc/{proc.pid}/stat").read().split()[2] != "Z":
            assert time.time() < deadline
            time.sleep(0.05)
    lock = RunLock(path, "logging.output_dir")
    warnings = lock.acquire()
    assert len(warnings) == 1 and f"pid {proc.pid} on host {socket.gethostname()}" in warnings[0]
    assert "no longer running" in warnings[0]
    assert _lock_record(path)["pid"] == os.getpid()
    lock.release()
    assert not (path / ".lock").exists()


def _write_lock(path, **fields) -> dict:
    path.mkdir(parents=True, exist_ok=True)
    rec = dict(my_record(), **fields)
    (path / ".lock").write_text(json.dumps(rec))
    return rec


def test_reused_pid_is_not_mistaken_for_the_holder(tmp_path):
    """The lock names a live pid (this one) whose start time is not the recorded one: the pid
    was reused by another process after the holder died."""
    _write_lock(tmp_path, pid=os.getpid(), start_time=my_record()["start_time"] - 3600)
    lock = RunLock(tmp_path, "checkpoint.save")
    assert len(lock.acquire()) == 1
    lock.release()


@pytest.mark.parametrize("their_job, my_job", [(None, None), ("55", None), ("55", "77"),
                                               (None, "77")])
def test_foreign_host_is_refused_unless_same_slurm_job(tmp_path, monkeypatch, their_job, my_job):
    _write_lock(tmp_path, host="other-node-17", pid=4321, slurm_job_id=their_job)
    if my_job:
        monkeypatch.setenv("SLURM_JOB_ID", my_job)
    else:
        monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(ConfigError) as e:
        RunLock(tmp_path, "checkpoint.save").acquire()
    assert "(pid 4321 on host other-node-17" in str(e.value)
    assert "cannot be checked from here: remove the lock if that run has ended" in str(e.value)
    assert _lock_record(tmp_path)["host"] == "other-node-17"


def test_same_slurm_job_on_another_host_takes_over(tmp_path, monkeypatch):
    """A requeued job restarts (on any node) with the same SLURM_JOB_ID: it resumes."""
    _write_lock(tmp_path, host="other-node-17", pid=4321, slurm_job_id="55")
    monkeypatch.setenv("SLURM_JOB_ID", "55")
    lock = RunLock(tmp_path, "checkpoint.save")
    warnings = lock.acquire()
    assert len(warnings) == 1 and "SLURM job 55" in warnings[0]
    assert _lock_record(tmp_path)["pid"] == os.getpid()
    lock.release()


def test_same_slurm_job_but_live_on_this_host_is_refused(holder, monkeypatch):
    """Two runs of one job on one node (e.g. two srun steps) still exclude each other."""
    proc, path = holder(SLURM_JOB_ID="55")
    monkeypatch.setenv("SLURM_JOB_ID", "55")
    with pytest.raises(ConfigError, match=f"pid {proc.pid} on host .*SLURM job 55"):
        RunLock(path, "checkpoint.save").acquire()


def _make_lock(path, kind: str) -> None:
    """A lock file that no run of ours wrote: empty, garbage, or a record with a field that no
    live process can have (pid 1e400 reads as inf, -5, a string, true, past pid_max)."""
    lock = path / ".lock"
    raw = {"empty": b"", "binary": b"\xff\xfe\x00garbage", "array": b"[1, 2]",
           "huge": b"{" + b" " * (1 << 17) + b"}", "deep": b"[" * 100_000}
    if kind in raw:
        lock.write_bytes(raw[kind])
    elif kind == "fifo":  # a reader that opened it plainly would wait forever
        os.mkfifo(lock)
    elif kind == "link to /dev/zero":  # ... or read forever
        lock.symlink_to("/dev/zero")
    elif kind == "directory":
        lock.mkdir()
    else:
        field, value = kind.split("=", 1)  # the value as raw JSON text (1e400, NaN, ...)
        rec = {**my_record(), "pid": 4321, "start_time": 1.0, field: "@VALUE@"}
        lock.write_text(json.dumps(rec).replace('"@VALUE@"', value))


@pytest.mark.parametrize("kind", [
    "empty", "binary", "array", "huge", "deep", "fifo", "link to /dev/zero", "directory",
    "pid=1e400", "pid=-5", "pid=0", 'pid="4321"', "pid=true", "pid=99999999999999999999",
    "pid=4321.5", "start_time=NaN", "start_time=Infinity", 'start_time="yesterday"',
    "start_time=null", "host=17", "token=[]", 'slurm_job_id={"a": 1}'])
def test_unreadable_or_malformed_lock_is_refused(tmp_path, kind):
    _make_lock(tmp_path, kind)
    start = time.monotonic()
    with pytest.raises(ConfigError) as e:
        RunLock(tmp_path, "checkpoint.save").acquire()
    assert time.monotonic() - start < 5  # no read of an endless file, no wait on a FIFO
    message = str(e.value)
    assert "is unreadable or malformed; remove it if no run uses" in message, message
    assert "\n" not in message and len(message) < 500
    assert os.path.lexists(tmp_path / ".lock")  # someone else's file: left as it was


def test_forked_child_does_not_release_and_second_lock_is_rolled_back(tmp_path, holder):
    """A background checkpoint writer is a fork of the holder: its exit must not drop the lock.
    When the second of a run's locks is refused, the first is released again."""
    mine = RunLocks([(tmp_path / "a", "checkpoint.save")])
    mine.acquire()
    pid = os.fork()
    if pid == 0:  # the child "exits cleanly" through the same release path
        mine.release()
        os._exit(0)
    os.waitpid(pid, 0)
    assert _lock_record(tmp_path / "a")["pid"] == os.getpid()
    mine.release()
    assert not (tmp_path / "a/.lock").exists()

    proc, held = holder(tmp_path / "run")
    both = RunLocks([(tmp_path / "a", "checkpoint.save"), (held, "logging.output_dir")])
    with pytest.raises(ConfigError, match=f"logging.output_dir {held} is in use .*pid {proc.pid}"):
        both.acquire()
    assert not (tmp_path / "a/.lock").exists()


def test_same_directory_under_two_names_is_locked_once(tmp_path):
    locks = RunLocks([(tmp_path, "checkpoint.save"), (tmp_path / "." / "", "logging.output_dir")])
    assert locks.acquire() == []
    locks.release()
    assert not (tmp_path / ".lock").exists()


CONTENDER = textwrap.dedent("""
    import sys
    from megatron_ext.config.loader import ConfigError
    from megatron_ext.platform.run_lock import RunLock
    try:
        RunLock(sys.argv[1], "checkpoint.save").acquire()
        print("took", flush=True)
        sys.stdin.readline()  # keep holding while the others try
    except ConfigError:
        print("refused", flush=True)
""")


@pytest.mark.parametrize("stale", [False, True])
def test_racing_runs_exactly_one_wins(tmp_path, stale):
    """Four runs start at once on a free directory, or on one whose lock is stale: one takes it."""
    if stale:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout.strip()
        _write_lock(tmp_path, pid=int(dead))
    procs = [subprocess.Popen([sys.executable, "-c", CONTENDER, str(tmp_path)], cwd=REPO,
                              text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              env=dict(os.environ, PYTHONPATH=str(REPO))) for _ in range(4)]
    try:
        results = sorted(p.stdout.readline().strip() for p in procs)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert results == ["refused"] * 3 + ["took"]


def test_directories_made_for_the_lock_are_removed_if_left_empty(tmp_path):
    """A run refused or failing before it writes anything leaves no empty directories; one
    that wrote keeps them."""
    lock = RunLock(tmp_path / "a/b/ckpt", "checkpoint.save")
    lock.acquire()
    lock.release()
    assert list(tmp_path.iterdir()) == []
    lock.acquire()
    (tmp_path / "a/b/metrics.jsonl").write_text("{}\n")
    lock.release()
    assert sorted(p.name for p in (tmp_path / "a/b").iterdir()) == ["metrics.jsonl"]
