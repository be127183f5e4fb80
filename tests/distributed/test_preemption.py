"""A run killed with -9 after a save, or signalled with SIGUSR1, continues bit-identically
(also at pipeline-parallel size 2: two processes, one layer per stage, with async saves).

One job per layout and mode, three launches of the same command: killed with -9 after a save,
resumed and signalled with SIGUSR1 (it saves its current step, maybe while a periodic
background write is pending, and exits 0), resumed again to the end. Every step after the
kill's checkpoint has the uninterrupted run's loss.

Async saves are killed and signalled at PP=2 only: a single process's kill -9 during a
background write is tests/distributed/test_async_save.py's
``test_kill9_during_background_write_resumes_from_the_previous_one``, and the signal that waits
for a pending write is the same code at any layout. The uninterrupted runs and each job's last
launch (a plain resume) are forked (tests.forkrun); the killed and signalled launches are real
``python`` / ``torchrun`` processes, since their launcher is what is tested."""

import os
import random
import signal
from pathlib import Path

import pytest

from tests.forkrun import run_clis
from tests.resilience import kill_job, losses_by_step, popen, small_args, wait_for_line

STEPS = 16  # the signalled launch resumes at step 4 or 8: steps left for the signal
SYNC, ASYNC = (), ("--set", "checkpoint.async_save=true")
# Also with background (async) saves: a kill mid-write must leave the previous checkpoint as
# latest, and a signal must wait for the write before exiting 0.
PP2 = ("--set", "parallel.pipeline=2")
TORCHRUN2 = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]


def _nprocs(layout: tuple) -> int:
    return 2 if layout == PP2 else 1


def _launcher(layout: tuple) -> list[str]:
    """Python arguments that start a run of ``layout`` (two processes for PP=2)."""
    return TORCHRUN2 if layout == PP2 else []


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[tuple, dict[int, float]]:
    """The uninterrupted run's losses per layout, both forked from one driver."""
    tmp = tmp_path_factory.mktemp("reference")
    layouts = [(), PP2]
    procs = run_clis([small_args(tmp / f"r{i}", STEPS, "--set", "checkpoint.save_interval=4",
                                 *layout) for i, layout in enumerate(layouts)],
                     tmp / "driver", nprocs=[_nprocs(layout) for layout in layouts])
    for proc in procs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return {layout: losses_by_step(tmp / f"r{i}" / "run") for i, layout in enumerate(layouts)}


@pytest.mark.parametrize("mode, layout", [(SYNC, ()), (ASYNC, PP2)], ids=["sync", "async-pp2"])
def test_kill9_then_sigusr1_each_resume_bit_identically(tmp_path, references, mode, layout):
    reference = references[layout]
    kill_at = random.Random().randint(5, 7)  # some step after the save at step 4
    run = small_args(tmp_path, STEPS, "--set", "checkpoint.save_interval=4", *mode, *layout)
    args = [*_launcher(layout), *run]
    proc = popen(args)
    # A background save is committed (and logged) a few steps after it starts.
    seen = wait_for_line(proc, lambda line: line.startswith("saved checkpoint")
                         and "iter_0000004" in line)
    if not any(_step(line) >= kill_at for line in seen):
        wait_for_line(proc, lambda line: _step(line) >= kill_at)
    kill_job(proc)  # SIGKILL: no handler runs, nothing is flushed
    # The kill lands during step kill_at + 1. On a loaded machine it can land late enough for
    # the step-8 save to have completed; resuming from there is equally what must work.
    latest = (tmp_path / "ckpt" / "latest").read_text().strip()
    assert latest in ("iter_0000004", "iter_0000008"), (kill_at, latest)
    saved = int(latest.split("_")[1])

    proc = popen(args)  # the same command: it resumes, then is signalled at its first step
    seen = wait_for_line(proc, lambda line: _step(line) > saved)
    _signal_workers(proc, layout)
    out, _ = proc.communicate(timeout=300)
    out = "".join(seen) + out
    assert proc.returncode == 0, out[-3000:]
    assert "resumed from" in out and f"{latest} at step {saved}" in out, out[-3000:]
    assert "received signal" in out and "summary: preempted" in out
    latest = (tmp_path / "ckpt" / "latest").read_text().strip()
    stopped = int(latest.split("_")[1])
    assert saved < stopped < STEPS, (saved, stopped)
    assert f"saved step {stopped}" in out

    again, = run_clis([run], tmp_path / "again", nprocs=[_nprocs(layout)])  # once more, to the end
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{latest} at step {stopped}" in again.stdout, again.stdout[-3000:]
    resumed = losses_by_step(tmp_path / "run")
    for step in range(saved + 1, STEPS + 1):
        assert resumed[step] == reference[step], (kill_at, step, resumed[step], reference[step])
    assert not list((tmp_path / "ckpt").glob(".tmp_*"))  # a killed write is cleaned up


def _step(line: str) -> int:
    return int(line.split()[1].split("/")[0]) if line.startswith("step ") else -1


def _signal_workers(proc, layout: tuple) -> None:
    """SIGUSR1 to the training processes: torchrun's workers (as the SLURM launcher relays it;
    torchrun itself would die of it), or the one process."""
    if layout != PP2:
        proc.send_signal(signal.SIGUSR1)
        return
    workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(workers) == 2, workers
    for pid in workers:
        os.kill(int(pid), signal.SIGUSR1)
