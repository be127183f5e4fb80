"""Signals and kill -9 under torchrun (2 gloo workers, each in a session of its own).

- SIGTERM to torchrun during start-up: torchrun forwards it, every rank ends within seconds
  (none waits in a collective for a rank that left), one start-up line, nothing written.
- SIGTERM to one rank only during start-up: the job still ends within a bounded time.
- kill -9 of torchrun's process group mid-run: no worker (nor helper) outlives it.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.processes import cleanup, finish, leftovers, start, wait_until_gone
from tests.resilience import small_args, wait_for_line

pytestmark = pytest.mark.slow
LINE = "received SIGTERM during start-up; nothing saved; exiting"


def torchrun_job(tmp_path, steps: int = 8):
    args = small_args(tmp_path, steps)[1:]
    return start(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                  "pretrain_moe.py", *args])


def workers(proc) -> dict[str, object]:
    return {p.environ().get("RANK"): p for p in leftovers(proc)
            if "pretrain_moe.py" in p.cmdline() and p.pid != proc.pid}


def test_sigterm_to_torchrun_during_start_up_ends_every_rank(tmp_path):
    proc = torchrun_job(tmp_path)
    wait_for_line(proc, lambda line: line.startswith("layout:"))  # rank 0, before the build
    proc.send_signal(signal.SIGTERM)  # torchrun sends SIGTERM on to both workers
    out, took = finish(proc, time.monotonic())
    # torchrun itself reports the signal (exit 1, its own traceback); the workers say one line.
    assert out.count(LINE) == 1 and "summary:" not in out, out[-3000:]
    assert "pretrain_moe.py FAILED" not in out, out[-3000:]  # both workers exited 0
    assert took < 20, (took, out[-2000:])
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())


def test_sigterm_to_one_rank_during_start_up_ends_the_job(tmp_path):
    proc = torchrun_job(tmp_path)
    try:
        wait_for_line(proc, lambda line: line.startswith("layout:"))
        workers(proc)["1"].send_signal(signal.SIGTERM)  # rank 1 leaves, rank 0 is not told
        out, took = finish(proc, time.monotonic())
    finally:
        cleanup(proc)
    # Rank 0's next collective fails (gloo: connection closed by peer), torchrun ends the job.
    assert proc.returncode != 0 and took < 60, (took, out[-3000:])
    assert not wait_until_gone(proc, 5)


def test_kill9_of_torchrun_group_leaves_no_worker(tmp_path):
    proc = torchrun_job(tmp_path, steps=40)
    try:
        wait_for_line(proc, lambda line: line.startswith("step 2/"))
        assert set(workers(proc)) == {"0", "1"}
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun's group: the workers are not in it
        proc.wait()
        alive = wait_until_gone(proc, 5)
        assert not alive, alive
    finally:
        cleanup(proc)
