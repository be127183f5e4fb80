"""The training loop's checkpoint writer: synchronous, or asynchronous (``checkpoint.async_save``)
through megatron-core's ``AsyncCallsQueue``. The checkpoint format, commit and verification are
``megatron_ext.checkpoint.dist``'s."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Optional

from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from torch.distributed.checkpoint.api import CheckpointException

from megatron_ext.checkpoint.dist import CheckpointError, TrainState, _rank, save

# A committed checkpoint and its background write time (None: written synchronously).
Committed = tuple[Path, Optional[float]]

class Saver:
    """The loop's checkpoint writer: synchronous, or asynchronous with ``async_save``.

    Async saves go through megatron-core's ``AsyncCallsQueue`` (a forked writer per rank). At most
    one is in flight: a new save first waits for the previous one, which bounds host memory to one
    snapshot. ``poll``/``wait``/``close`` are collectives (megatron all-reduces "done" flags), so
    every rank calls them at the same steps; ``pending`` is the same on every rank.
    """

    def __init__(self, root: str | Path, keep_last: int, fully_reshardable: bool,
                 async_save: bool):
        self.root, self.keep_last, self.fully_reshardable = Path(root), keep_last, fully_reshardable
        self.queue = AsyncCallsQueue() if async_save else None
        self.in_flight: list[tuple[Path, float]] = []  # (checkpoint, monotonic start time)

    @property
    def pending(self) -> bool:
        return bool(self.in_flight)

    def save(self, state: TrainState, model, optimizer, config: dict,
             layout: dict) -> list[Committed]:
        """Start (async) or write (sync) a checkpoint; returns the checkpoints committed now."""
        done = self.wait()
        path = save(self.root, state, model, optimizer, config, layout, self.keep_last,
                    self.fully_reshardable, self.queue)
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
            names = ", ".join(p.name for p, _ in self.in_flight)
            if _rank() == 0:  # every writer has ended (megatron finalizes only then)
                for path, _ in self.in_flight:
                    shutil.rmtree(path.with_name(f".tmp_{path.name}"), ignore_errors=True)
            self.in_flight.clear()
            raise CheckpointError(f"background checkpoint write of {names} failed: "
                                  f"{_failure_summary(e)}") from e
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
