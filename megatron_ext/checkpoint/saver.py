"""The training loop's checkpoint writer: synchronous, or asynchronous (``checkpoint.async_save``)
through megatron-core's ``AsyncCallsQueue``. The checkpoint format, commit and verification are
``megatron_ext.checkpoint.store``'s."""

from __future__ import annotations

import errno
import logging
import os
import re
import resource
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from torch.distributed.checkpoint.api import CheckpointException

from megatron_ext.checkpoint import manifest
from megatron_ext.checkpoint.store import (
    ITER_RE,
    CheckpointError,
    Known,
    TrainState,
    _rank,
    iter_name,
    save,
)

# Write failures a user can act on, by errno. Writers in other processes (megatron's shard
# writers, torch.save's C++ stream) reach us as text, hence the "[Errno N]" search too.
_CAUSES = {n: os.strerror(n) for n in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES,
                                       errno.EPERM, errno.EROFS)}
_CAUSES[errno.EFBIG] += " (the file system's or the process's file-size limit, ulimit -f)"
_ERRNO_RE = re.compile(r"\[Errno (\d+)\][^']*(?:'([^']+)')?")
_STRERROR = {os.strerror(n): n for n in _CAUSES}
# megatron's shard writers log each write failure (in the writer process) before finalize
# raises it; the Saver reports it as the run's one error line instead.
_WRITER_LOG = "megatron.core.dist_checkpointing.strategies.filesystem_async"

# A committed checkpoint and its background write time (None: written synchronously).
Committed = tuple[Path, float | None]

class Saver:
    """The loop's checkpoint writer: synchronous, or asynchronous with ``async_save``.

    Async saves go through megatron-core's ``AsyncCallsQueue`` (a forked writer per rank). At most
    one is in flight: a new save first waits for the previous one, which bounds host memory to one
    snapshot. ``poll``/``wait``/``close`` are collectives (megatron all-reduces "done" flags), so
    every rank calls them at the same steps; ``pending`` is the same on every rank.
    """

    def __init__(self, root: str | Path, keep_last: int, fully_reshardable: bool,
                 async_save: bool, known: Known | None = None):
        self.root, self.keep_last, self.fully_reshardable = Path(root), keep_last, fully_reshardable
        self.queue = AsyncCallsQueue() if async_save else None
        self.in_flight: list[tuple[Path, float]] = []  # (checkpoint, monotonic start time)
        # What rank 0 wrote or verified (``known``: the resume plan's verdicts, ``ResumePlan.
        # verified``), so pruning re-reads none of it (store._prune).
        self.known: Known = dict(known or {})
        logging.getLogger(_WRITER_LOG).setLevel(logging.CRITICAL)

    @property
    def pending(self) -> bool:
        return bool(self.in_flight)

    def save(self, state: TrainState, model, optimizer, config: dict,
             layout: dict) -> list[Committed]:
        """Start (async) or write (sync) a checkpoint; returns the checkpoints committed now."""
        done = self.wait()
        if _rank() == 0:
            _warn_if_short_of_space(self.root)
        try:
            path = save(self.root, state, model, optimizer, config, layout, self.keep_last,
                        self.fully_reshardable, self.queue, self.known)
        except (Exception, CheckpointException) as e:  # the latter is a BaseException
            err = _save_failed(e, [self.root / f".tmp_{iter_name(state.step)}"])
            if err is None:
                raise
            raise err from None
        if self.queue is None:
            return done + [(path, None)]
        self.in_flight.append((path, time.monotonic()))
        return done

    def poll(self, wait: bool = False) -> list[Committed]:
        """Commit the async saves whose writers have finished on every rank (all, with wait);
        each with its background write time (start to commit)."""
        if not self.in_flight:
            return []
        try:
            n = len(self.queue.maybe_finalize_async_calls(blocking=wait))
        except (Exception, CheckpointException) as e:  # the latter is a BaseException
            # every writer has ended (megatron finalizes only then)
            tmps = [path.with_name(f".tmp_{path.name}") for path, _ in self.in_flight]
            self.in_flight.clear()
            # megatron reports any writer failure, not only OS errors, through finalize
            raise _save_failed(e, tmps, "background ", any_error=True) from None
        done, self.in_flight = self.in_flight[:n], self.in_flight[n:]
        now = time.monotonic()
        return [(path, now - start) for path, start in done]

    def wait(self) -> list[Committed]:
        return self.poll(wait=True)

    def close(self, abort: bool = False) -> None:
        """``abort`` (after an error) kills writers: their directory stays ``.tmp_*``, never
        latest."""
        if self.queue is None or not self.in_flight:
            return
        if abort:
            # megatron's queue.close(abort=True) only stops persistent workers; ours are
            # per-save forks, which its callers kill with close(abort=True).
            for call in self.queue.async_calls:
                call.async_caller.close(abort=True)
            self.queue.async_calls.clear()
        else:
            self.queue.close()
        self.in_flight.clear()


def _save_failed(e: BaseException, tmps: list[Path], kind: str = "",
                 any_error: bool = False) -> CheckpointError | None:
    """The one-line error of a failed save (None: not a write failure, but a bug to report with
    its traceback); rank 0 removes the unfinished directories either way, nothing else
    (``latest`` and older checkpoints were not touched)."""
    root = tmps[0].parent
    code, where, rank = _errno_of(e)
    free, need = _free_bytes(root), sum(_last_checkpoint_sizes(root))
    if code is None:  # torch's stream writer reports "unexpected pos", without the errno
        code = _probable_cause(root, tmps, need, free)
    if _rank() == 0:
        for tmp in tmps:
            shutil.rmtree(tmp, ignore_errors=True)
    name = ", ".join(t.name[len(".tmp_"):] for t in tmps)
    if code not in _CAUSES:
        if not any_error and not isinstance(e, (CheckpointError, CheckpointException, OSError)):
            return None
        return CheckpointError(f"{kind}checkpoint save of {name} failed: {_failure_summary(e)}")
    space = ", ".join(x for x in (f"needs ~{_size(need)}" if need else "",
                                  f"{_size(free)} free" if free is not None else "") if x
                      ) if code in (errno.ENOSPC, errno.EDQUOT) else ""
    on_rank = f" (rank {rank})" if rank is not None else ""
    return CheckpointError(f"{kind}checkpoint save failed: {_CAUSES[code]} at "
                           f"{where or tmps[0]}{on_rank}" + (f" ({space})" if space else ""))


def _probable_cause(root: Path, tmps: list[Path], need: int, free: int | None
                    ) -> int | None:
    """The errno a write into ``root`` would get now, judged from the file system and limits."""
    try:
        if os.statvfs(root).f_flag & os.ST_RDONLY:
            return errno.EROFS
        if not os.access(root, os.W_OK):
            return errno.EACCES
    except OSError:
        return None
    if free is not None and need and free < need:
        return errno.ENOSPC
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        written = [f.stat().st_size for t in tmps if t.is_dir() for f in t.rglob("*")
                   if f.is_file()]
        if max(written + _last_checkpoint_sizes(root), default=0) >= limit:
            return errno.EFBIG
    return None


def _chain(e: BaseException) -> Iterator[tuple[int | None, BaseException]]:
    """(rank or None, error): ``e``, its causes, and the per-rank errors megatron's
    CheckpointException carries (the coordinator's only)."""
    seen, todo = set(), [(None, e)]
    while todo:
        rank, x = todo.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield rank, x
        todo += [(rank, x.__cause__), (rank, x.__context__)]
        for r, failure in sorted((getattr(x, "failures", None) or {}).items()):
            todo.append((r, failure[0] if isinstance(failure, tuple) else failure))


def _errno_of(e: BaseException) -> tuple[int | None, str | None, int | None]:
    """(errno, file, rank) of the first OS error in ``e``'s chain, as an object or as text."""
    for rank, x in _chain(e):
        if isinstance(x, OSError) and x.errno is not None:
            return x.errno, x.filename, rank
        m = _ERRNO_RE.search(str(x))
        if m:
            return int(m.group(1)), m.group(2), rank
        for text, code in _STRERROR.items():
            if text in str(x):
                return code, None, rank
    return None, None, None


def _last_checkpoint_sizes(root: Path) -> list[int]:
    """File sizes of the newest complete checkpoint under ``root`` (none: [])."""
    try:
        done = sorted(p for p in root.iterdir() if p.is_dir() and ITER_RE.match(p.name))
        return [f.stat().st_size for f in done[-1].rglob("*") if f.is_file()] if done else []
    except OSError:
        return []


def _free_bytes(root: Path) -> int | None:
    try:
        return shutil.disk_usage(root).free
    except OSError:  # root not created yet
        return None


def _size(n: int) -> str:
    return f"{n / 1e9:.3g} GB" if n >= 1e8 else f"{n / 1e6:.3g} MB"


def _warn_if_short_of_space(root: Path) -> None:
    """One warning (per process) when the next save will not fit: it needs about as much free
    space as the last checkpoint took, since older ones are pruned only after it commits."""
    need, free = sum(_last_checkpoint_sizes(root)), _free_bytes(root)
    if need and free is not None and free < need:
        manifest.notice(f"space {root}", f"{root}: {_size(free)} free, the last checkpoint took "
                                          f"{_size(need)}: the next save will likely fail")


def _failure_summary(e: BaseException) -> str:
    """One line from megatron's write failure: every rank's error reaches the coordinator (rank 0),
    the others only learn that something failed."""
    failures = getattr(e, "failures", None)
    if isinstance(e, CheckpointException):
        if not failures:
            return "a writer failed (reported on rank 0)"
        return "; ".join(f"rank {r}: {w[0] if isinstance(w, tuple) else w}"
                         for r, w in sorted(failures.items()))
    return str(e).splitlines()[0] if str(e) else type(e).__name__
