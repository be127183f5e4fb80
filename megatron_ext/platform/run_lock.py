"""One run per directory: a lock file that names its holder.

``checkpoint.save`` and ``logging.output_dir`` each get a ``.lock`` file while a run uses them, so
a second run on the same directory is refused at start-up instead of interleaving checkpoints or
``metrics.jsonl`` with the first. The file records who holds it (host, pid, the process's start
time, SLURM_JOB_ID, command, since when), which lets a later run decide whether the holder is
still alive:

- same host: the pid is checked (with its start time, so a reused pid is not mistaken for the
  holder); a dead holder's lock is taken over with one warning;
- another host cannot be checked: refused, unless the lock carries this process's SLURM_JOB_ID
  (a requeued job restarts, possibly on another node, and must resume).

Shared filesystems: the lock is created with ``link(2)`` of a fully written private file, which is
atomic and fails if the name exists on local disks and on Lustre, GPFS and NFSv3/v4 alike (the
classic NFS-safe lock); the holder's record is therefore never seen half-written. A node that dies
leaves its lock behind: only a requeue of the same SLURM job, a run on that same host, or removing
the file by hand takes it over.

Only rank 0 of a job takes the lock (the caller decides); a process forked from the holder (a
background checkpoint writer) never releases it.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import socket
import stat
import sys
import time
import uuid
from pathlib import Path

import psutil

from megatron_ext.config.loader import ConfigError
from megatron_ext.platform.fs import discard, write_temp

LOCK_NAME = ".lock"
# A takeover guard older than this was left by a process that died mid-takeover (it lives for
# milliseconds otherwise).
_GUARD_STALE_S = 30.0
# A record is a few hundred bytes; a lock file larger than this is not one of ours.
_MAX_LOCK_BYTES = 1 << 16
_MAX_PID = 1 << 22  # Linux's largest pid_max


def _start_time(pid: int) -> float | None:
    """Start time of a running process, None if it is gone (a zombie counts as gone)."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.create_time()
    except (psutil.Error, ProcessLookupError, ValueError, OverflowError):
        return None


def my_record() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start_time": _start_time(pid),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "command": " ".join(sys.argv),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "token": uuid.uuid4().hex}


def _describe(rec: dict) -> str:
    job = f", SLURM job {_shown(rec.get('slurm_job_id'))}" if rec.get("slurm_job_id") else ""
    return (f"pid {_shown(rec.get('pid'))} on host {_shown(rec.get('host'))}{job}, since "
            f"{_shown(rec.get('since'))}")


def _shown(value: object) -> str:
    """A record field for a message: a lock is anyone's file, so its fields are cut short."""
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _read(lock: Path) -> dict | None:
    """The holder's record; None if the lock vanished meanwhile; {} if it is unreadable or
    malformed (not a regular file, not JSON, fields of the wrong type or range). Never follows
    a link, never blocks (a FIFO) and reads at most ``_MAX_LOCK_BYTES``."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError:  # a symbolic link (ELOOP), no permission, ...
        return {}
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return {}
        data = os.read(fd, _MAX_LOCK_BYTES + 1)
    except OSError:
        return {}
    finally:
        os.close(fd)
    try:
        rec = json.loads(data.decode("utf-8")) if len(data) <= _MAX_LOCK_BYTES else None
    except (ValueError, RecursionError):  # not UTF-8 or not JSON (a huge number included)
        return {}
    return rec if _well_formed(rec) else {}


def _well_formed(rec: object) -> bool:
    """Whether ``rec`` is a record as ``my_record`` writes it: a pid a process can have, a
    finite start time, text where text goes."""
    if not isinstance(rec, dict):
        return False
    pid, started = rec.get("pid"), rec.get("start_time")
    return (isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid <= _MAX_PID
            and isinstance(started, (int, float)) and not isinstance(started, bool)
            and math.isfinite(started)
            and all(isinstance(rec.get(k), str) for k in ("host", "token"))
            and all(isinstance(rec.get(k, ""), str) for k in ("since", "command"))
            and isinstance(rec.get("slurm_job_id"), (str, type(None))))


def _alive_here(rec: dict) -> bool:
    """Whether the holder (on this host) still runs: same pid *and* same start time."""
    now = _start_time(rec["pid"])
    return now is not None and abs(now - rec["start_time"]) < 1.0


def _verdict(rec: dict, me: dict) -> str | None:
    """None if ``rec``'s lock may be taken over by ``me``, else why not."""
    if not rec:
        return "unreadable"
    if rec.get("host") == me["host"]:
        return "alive" if _alive_here(rec) else None
    if me["slurm_job_id"] and rec.get("slurm_job_id") == me["slurm_job_id"]:
        return None  # our own job, requeued onto another node
    return "foreign"


class RunLock:
    """Hold ``path/.lock`` for the config field ``what`` (named in messages); ``release()``
    removes it if it is still ours."""

    def __init__(self, path: str | Path, what: str):
        self.dir, self.what = Path(path), what
        self.file = self.dir / LOCK_NAME
        self.record: dict | None = None
        self.created: list[Path] = []  # directories made for the lock, deepest first

    def acquire(self) -> list[str]:
        """Take the lock or raise ConfigError naming the holder; returns warnings to print."""
        missing, d = [], self.dir
        while not d.exists() and d != d.parent:
            missing.append(d)
            d = d.parent
        self.dir.mkdir(parents=True, exist_ok=True)
        self.created = missing
        me = my_record()
        # Written whole and synced before it is linked into place (create-if-absent).
        tmp = write_temp(self.file, json.dumps(me, indent=1) + "\n")
        # Set before the lock exists: a signal right after the link still releases it (release
        # removes the file only if it carries this record).
        self.record = me
        _HELD.append(self)
        try:
            for _ in range(5):  # a takeover racing with another run re-reads the lock
                if _link(tmp, self.file):
                    return []
                rec = _read(self.file)
                if rec is None:
                    continue  # released between our link and read: try again
                why = _verdict(rec, me)
                if why is not None:
                    raise ConfigError(self._in_use(rec, why))
                if self._take_over(tmp, rec):
                    return [f"{self.what} {self.dir}: took over the lock of a run that is no "
                            f"longer running ({_describe(rec)}; {self.file})"]
            raise ConfigError(f"{self.what} {self.dir}: could not take {self.file} (other runs "
                              f"keep taking it)")
        except BaseException:
            self.release()
            raise
        finally:
            discard(tmp)

    def _in_use(self, rec: dict, why: str) -> str:
        where = f"{self.what} {self.dir} is in use by another run"
        if why == "unreadable":
            return (f"{where} (lock {self.file} is unreadable or malformed; remove it if no "
                    f"run uses {self.dir})")
        hint = "" if why == "alive" else \
            "; that host cannot be checked from here: remove the lock if that run has ended"
        return f"{where} ({_describe(rec)}, lock {self.file}){hint}"

    def _take_over(self, tmp: Path, stale: dict) -> bool:
        """Replace a stale lock by ours, unless another run got there first (then False).

        Two runs that both found the same stale lock must not both end up "holding" it: the
        replacement happens under a short-lived guard file, after checking that the lock still
        holds the stale record."""
        guard = self.file.with_name(LOCK_NAME + ".takeover")
        if not _link(tmp, guard):
            try:
                if time.time() - guard.stat().st_mtime > _GUARD_STALE_S:
                    guard.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            time.sleep(0.05)
            return False
        try:
            if _read(self.file) != stale:
                return False
            os.replace(tmp, self.file)  # atomic: the lock is never absent meanwhile
            return True
        finally:
            discard(guard)

    def release(self) -> None:
        """Remove the lock if this process holds it (not a forked child, not a taker-over).
        Never raises: it runs on the way out of every failure (a save directory made read-only
        has already been reported; its lock is then left for the next run to take over), and
        it is tried once only (not again at exit)."""
        if self.record is None or self.record["pid"] != os.getpid():
            return
        record, created = self.record, self.created
        self.record, self.created = None, []
        if self in _HELD:
            _HELD.remove(self)
        try:
            rec = _read(self.file)
            if rec is not None and rec.get("token") == record["token"]:
                self.file.unlink(missing_ok=True)
        except OSError:  # read-only, gone with its filesystem: nothing more to do here
            return
        # A run that ends before writing anything leaves no empty directories behind either.
        for d in created:
            try:
                d.rmdir()
            except OSError:  # not empty (the run wrote there) or gone: keep the rest
                break


# Locks this process holds, for ``release_all``.
_HELD: list[RunLock] = []


def release_all() -> None:
    """Release every lock of this process: for exits that skip ``finally`` (an ``os._exit``
    after running the atexit functions, as the start-up signal watchdog does)."""
    for lock in list(reversed(_HELD)):
        lock.release()


atexit.register(release_all)


def _link(src: Path, dst: Path) -> bool:
    """Atomically create ``dst`` with ``src``'s content; False if ``dst`` exists."""
    try:
        os.link(src, dst)
        return True
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links: O_EXCL create (a reader may briefly see
        pass         # it empty, and then refuses as for an unreadable lock)
    try:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(src.read_text())
    return True


class RunLocks:
    """The locks of one run (``[(path, what), ...]``), taken in order and released together.

    Paths that resolve to the same directory are locked once (under the first name)."""

    def __init__(self, targets: list[tuple[str | Path, str]]):
        seen, self.locks = set(), []
        for path, what in targets:
            key = os.path.realpath(path)
            if key not in seen:
                seen.add(key)
                self.locks.append(RunLock(path, what))

    def acquire(self) -> list[str]:
        warnings: list[str] = []
        try:
            for lock in self.locks:
                warnings += lock.acquire()
        except BaseException:
            self.release()
            raise
        return warnings

    def release(self) -> None:
        for lock in reversed(self.locks):
            lock.release()
