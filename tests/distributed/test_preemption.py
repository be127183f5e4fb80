"""A run killed with -9 after a save, or signalled with SIGUSR1, continues bit-identically
(also at pipeline-parallel size 2: two processes, one layer per stage, with async saves).

One job per layout and mode, three launches of the same command: killed with -9 after a save,
resumed and signalled with SIGUSR1 (it saves its current step, maybe while a periodic
background write is pending, and exits 0), resumed again to the end. Every step after the
kill's checkpoint has the loss of the uninterrupted run (the job's first launch; sync saves, as
async saves do not change the math).

Async saves are killed and signalled at PP=2 only: a single process's kill -9 during a
background write is tests/distributed/test_async_save.py's
``test_kill9_during_background_write_resumes_from_the_previous_one``, and the signal that waits
for a pending write is the same code at any layout. Each job's launches are forked from one
driver the test watches (tests.forkrun's ``start_clis``: one import of torch and megatron), the
ranks killed and signalled as a scheduler would; kill -9 and signals of torchrun itself are
tests/distributed/test_signals_torchrun.py's."""

import os
import random
import signal

import pytest

from tests.forkrun import EXITED, kill_ranks, next_call, ranks, start_clis, stop_clis
from tests.resilience import losses_by_step, small_args, wait_for_line

STEPS = 16  # the signalled launch resumes at step 4 or 8: steps left for the signal
SYNC, ASYNC = (), ("--set", "checkpoint.async_save=true")
# Also with background (async) saves: a kill mid-write must leave the previous checkpoint as
# latest, and a signal must wait for the write before exiting 0.
PP2 = ("--set", "parallel.pipeline=2")


def _nprocs(layout: tuple) -> int:
    return 2 if layout == PP2 else 1


@pytest.mark.parametrize("mode, layout", [(SYNC, ()), (ASYNC, PP2)], ids=["sync", "async-pp2"])
def test_kill9_then_sigusr1_each_resume_bit_identically(tmp_path, mode, layout):
    ref = small_args(tmp_path / "ref", STEPS, "--set", "checkpoint.save_interval=4", *layout)
    run = small_args(tmp_path, STEPS, "--set", "checkpoint.save_interval=4", *mode, *layout)
    job = start_clis([ref, run, run, run], tmp_path / "driver", nprocs=[_nprocs(layout)] * 4)
    try:
        seen = wait_for_line(job, lambda line: line.startswith(EXITED))
        assert _code(seen[-1]) == 0, "".join(seen)[-3000:]
        next_call(job)
        _check_job(tmp_path, job, losses_by_step(tmp_path / "ref" / "run"))
    finally:
        stop_clis(job)


def _check_job(tmp_path, job, reference: dict[int, float]) -> None:
    kill_at = random.Random().randint(5, 7)  # some step after the save at step 4
    # A background save is committed (and logged) a few steps after it starts.
    seen = wait_for_line(job, lambda line: line.startswith("saved checkpoint")
                         and "iter_0000004" in line)
    if not any(_step(line) >= kill_at for line in seen):
        wait_for_line(job, lambda line: _step(line) >= kill_at)
    kill_ranks(job)  # SIGKILL: no handler runs, nothing is flushed
    assert _exit_code(job) == -signal.SIGKILL
    # The kill lands during step kill_at + 1. On a loaded machine it can land late enough for
    # the step-8 save to have completed; resuming from there is equally what must work.
    latest = (tmp_path / "ckpt" / "latest").read_text().strip()
    assert latest in ("iter_0000004", "iter_0000008"), (kill_at, latest)
    saved = int(latest.split("_")[1])

    next_call(job)  # the same command: it resumes, then is signalled at its first step
    seen = wait_for_line(job, lambda line: _step(line) > saved)
    for pid in ranks(job):  # the training processes, as the SLURM launcher relays it
        os.kill(pid, signal.SIGUSR1)
    seen += wait_for_line(job, lambda line: line.startswith(EXITED))
    out = "".join(seen)
    assert _code(seen[-1]) == 0, out[-3000:]
    assert "resumed from" in out and f"{latest} at step {saved}" in out, out[-3000:]
    assert "received signal" in out and "summary: preempted" in out
    latest = (tmp_path / "ckpt" / "latest").read_text().strip()
    stopped = int(latest.split("_")[1])
    assert saved < stopped < STEPS, (saved, stopped)
    assert f"saved step {stopped}" in out

    next_call(job)  # once more, to the end
    seen = wait_for_line(job, lambda line: line.startswith(EXITED))
    out = "".join(seen)
    assert _code(seen[-1]) == 0, out[-3000:]
    assert f"{latest} at step {stopped}" in out, out[-3000:]
    resumed = losses_by_step(tmp_path / "run")
    for step in range(saved + 1, STEPS + 1):
        assert resumed[step] == reference[step], (kill_at, step, resumed[step], reference[step])
    assert not list((tmp_path / "ckpt").glob(".tmp_*"))  # a killed write is cleaned up


def _exit_code(job) -> int:
    return _code(wait_for_line(job, lambda line: line.startswith(EXITED))[-1])


def _code(line: str) -> int:
    return int(line[len(EXITED):])


def _step(line: str) -> int:
    return int(line.split()[1].split("/")[0]) if line.startswith("step ") else -1
