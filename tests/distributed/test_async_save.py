"""checkpoint.async_save: background writes (megatron's AsyncCallsQueue, one forked writer per
rank) produce the same checkpoints as synchronous saves, and a writer that fails on one rank is
one clear error on every rank that never becomes ``latest``. Two ranks with EP=2, so the
finalize collectives and per-rank shards are exercised.

The two-rank runs are forked (tests.forkrun: one import of torch and megatron for the three of
the module fixture, the rank-1 failure included); the kill -9 test's killed run is a real
``python`` process."""

import json
import shutil
import textwrap

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from megatron_ext.checkpoint import store as ckpt
from tests.conftest import run_cli
from tests.forkrun import run_clis
from tests.resilience import kill_job, popen, small_args, wait_for_line

STEPS = 8
ASYNC = ("--set", "checkpoint.async_save=true")


def _args(tmp, *extra) -> list[str]:
    return small_args(tmp, STEPS, "--set", "checkpoint.save_interval=2",
                      "--set", "parallel.expert=2", *extra)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{mode: (checkpoint root, completed two-rank run)} of a sync run, an async run and an
    async run whose rank 1 fails to write its step-4 checkpoint (FAILING_WRITER)."""
    tmp = tmp_path_factory.mktemp("runs")
    script = tmp / "failing_writer.py"
    script.write_text(FAILING_WRITER)
    calls = {"sync": _args(tmp / "sync"), "async": _args(tmp / "async", *ASYNC),
             "failing": [str(script), *_args(tmp / "failing", *ASYNC)[1:]]}
    procs = run_clis(list(calls.values()), tmp / "driver", nprocs=[2] * len(calls))
    return {mode: (tmp / mode / "ckpt", proc) for mode, proc in zip(calls, procs)}


def _tensors(path, tmp) -> dict:
    dcp_to_torch_save(path, tmp / "flat.pt")
    flat = torch.load(tmp / "flat.pt", weights_only=True)
    return {k: v for k, v in flat.items() if isinstance(v, torch.Tensor)}


def _meta(path) -> dict:
    meta = json.loads((path / "meta.json").read_text())
    meta.pop("files")  # sizes are checked by verify(); file names below
    return meta


def test_async_checkpoints_equal_sync_ones(runs, tmp_path):
    (sync_root, sync), (async_root, proc) = runs["sync"], runs["async"]
    for run in (sync, proc):
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = proc.stdout
    names = sorted(p.name for p in async_root.iterdir() if p.is_dir())
    assert names == ["iter_0000002", "iter_0000004", "iter_0000006", "iter_0000008"]
    assert sorted(p.name for p in sync_root.iterdir() if p.is_dir()) == names
    assert (async_root / "latest").read_text().strip() == "iter_0000008"
    assert not list(async_root.glob(".tmp_*"))
    assert out.count("in the background") == 4 and out.count("saved checkpoint") == 4, out
    # Each background write also reaches the metrics (and so W&B) with its duration.
    records = [json.loads(line) for line in
               (async_root.parent / "run" / "metrics.jsonl").read_text().splitlines()]
    writes = [r for r in records if r["kind"] == "checkpoint"]
    assert [r["saved_step"] for r in writes] == [2, 4, 6, 8], writes
    assert all(r["background_write_s"] > 0 and r["step"] >= r["saved_step"] for r in writes)
    for name in names:
        a, s = async_root / name, sync_root / name
        assert sorted(ckpt.verify(a)["files"]) == sorted(ckpt.verify(s)["files"])
        assert _meta(a) == _meta(s)
        ta, ts = _tensors(a, tmp_path), _tensors(s, tmp_path)
        assert ta.keys() == ts.keys() and any(k.startswith("optimizer.") for k in ta)
        for key in ts:
            assert torch.equal(ta[key], ts[key]), (name, key)
        for rank in (0, 1):
            ra = torch.load(a / "rng" / f"rank_{rank:05d}.pt", weights_only=True)
            rs = torch.load(s / "rng" / f"rank_{rank:05d}.pt", weights_only=True)
            assert torch.equal(ra["cpu"], rs["cpu"])


def test_async_run_resumes_like_a_sync_run(runs, tmp_path):
    """Restart the async run from its step-6 checkpoint: steps 7 and 8 have the losses of the
    uninterrupted sync run (which also stands for a resumed sync run: resuming is checked
    bit-identical in tests/distributed/test_preemption.py)."""
    (_, sync), (async_root, _) = runs["sync"], runs["async"]
    sync_out = sync.stdout
    root = tmp_path / "ckpt"
    shutil.copytree(async_root / "iter_0000006", root / "iter_0000006")
    (root / "latest").write_text("iter_0000006\n")
    proc, = run_clis([_args(tmp_path, *ASYNC)], tmp_path / "driver", nprocs=[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "at step 6" in proc.stdout

    def losses(out: str) -> list[str]:
        return [ln.split("| loss ")[1].split()[0] for ln in out.splitlines()
                if ln.startswith(("step 7/", "step 8/"))]

    assert len(losses(sync_out)) == 2 and losses(proc.stdout) == losses(sync_out)


def test_kill9_during_background_write_resumes_from_the_previous_one(tmp_path):
    """The rename to iter_N and the ``latest`` update are the trainer's, after every writer has
    finished: a trainer killed right after the fork never commits, whatever its writer does."""
    args = small_args(tmp_path, 10, "--set", "checkpoint.save_interval=4", *ASYNC)
    proc = popen(args)
    wait_for_line(proc, lambda line: "iter_0000008 in the background" in line)
    proc.kill()  # the trainer alone: its writer may still be running
    proc.wait()
    root = tmp_path / "ckpt"
    assert (root / "latest").read_text().strip() == "iter_0000004"
    assert not (root / "iter_0000008").exists()
    kill_job(proc)  # then the rest of the job (the writer, megatron's result-queue manager)
    again = run_cli(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "iter_0000004 at step 4" in again.stdout, again.stdout[-3000:]
    assert (root / "latest").read_text().strip() == "iter_0000010"
    assert not list(root.glob(".tmp_*"))


FAILING_WRITER = textwrap.dedent("""
    # Rank 1's background writer hits a full disk while writing the step-4 checkpoint.
    import errno, functools, sys
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron_ext.training.cli import main

    real = filesystem_async._write_item

    @functools.wraps(real)  # megatron inspects its signature
    def write_item(*args, **kwargs):
        stream = next(a for a in args if hasattr(a, "write") and hasattr(a, "name"))
        if ".tmp_iter_0000004" in str(stream.name) and "__1_" in str(stream.name):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    filesystem_async._write_item = write_item
    if __name__ == "__main__":
        sys.exit(main(sys.argv[1:]))
""")


def test_failed_background_write_is_one_error_and_never_latest(runs):
    root, proc = runs["failing"]
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "iter_0000004" in errors[0] and "No space left on device" in errors[0], errors[0]
    assert (root / "latest").read_text().strip() == "iter_0000002"
    # The failed write's directory is removed, not left half-written.
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["iter_0000002"]
    ckpt.verify(root / "iter_0000002")
