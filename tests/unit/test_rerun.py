"""What a rerun of pretrain_moe.py does, on the real CLI: a second run on a checkpoint or output
directory in use exits 2 at start-up naming the first run's pid, and the locks are gone once the
first run ends (normally, on an error, on SIGTERM); a resume whose config changes the run lists
every differing field and exits 2 unless checkpoint.allow_config_change (then one warning);
fields that do not change the run resume silently; a finished run's rerun exits 0 touching
nothing; a checkpoint.save / logging.output_dir that cannot be a writable directory exits 2
before anything is built."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_ext.config.loader import to_dict
from megatron_ext.config.schema import Config
from tests.conftest import REPO, run_cli, set_args
from tests.forkrun import run_clis
from tests.resilience import kill_job, popen, small_args, wait_for_line
from tests.unit.test_run_lock import HOLDER


def _snapshot(root: Path) -> dict:
    """Every file with its size and mtime (directory mtimes change: the lock comes and goes)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def _no_locks(*dirs: Path) -> bool:
    return not any((d / ".lock").exists() for d in dirs)


def _error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def reruns(tmp_path_factory) -> dict[str, tuple[Path, dict, subprocess.CompletedProcess]]:
    """A run that completed its 4 steps (checkpoint at step 4, metrics.jsonl), then one rerun
    of it per test below, each on its own copy: {name: (copy, its files before, the rerun)}.
    All forked (tests.forkrun): the finished run from one driver, the reruns from another."""
    tmp = tmp_path_factory.mktemp("reruns")
    proc, = run_clis([small_args(tmp / "finished", 4)], tmp / "driver1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _no_locks(tmp / "finished" / "ckpt", tmp / "finished" / "run")  # released at exit
    sets = {
        "nothing": ("train.log_interval=2",),  # a free change
        "refused": ("optimizer.lr=0.01", "train.seed=7", "train.global_batch_size=16",
                    "data.seq_length=64"),
        "opt_in": ("optimizer.lr=0.001", "checkpoint.allow_config_change=true"),
        "optimizer": ("parallel.distributed_optimizer=true", "checkpoint.allow_config_change=true"),
    }
    before = {}
    for name in sets:
        shutil.copytree(tmp / "finished", tmp / name)
        before[name] = _snapshot(tmp / name)
    procs = run_clis([small_args(tmp / name, 6 if name in ("opt_in", "optimizer") else 4,
                                 *set_args(*extra)) for name, extra in sets.items()],
                     tmp / "driver2")
    return {name: (tmp / name, before[name], proc) for name, proc in zip(sets, procs)}


def test_finished_run_rerun_does_nothing(reruns):
    copy, before, proc = reruns["nothing"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == (
        f"run already complete: step 4 of 4 in {copy}/ckpt/iter_0000004; nothing to do")
    assert "layout:" not in proc.stdout  # nothing was built
    assert _snapshot(copy) == before  # metrics.jsonl, config.yaml, checkpoints untouched


def test_config_that_changes_the_run_is_refused_listing_every_field(reruns):
    copy, before, proc = reruns["refused"]
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _error_line(proc.stderr)
    assert f"resuming {copy}/ckpt/iter_0000004 with a config that changes the run" in line
    for field in ("optimizer.lr: checkpoint 0.002, config 0.01", "train.seed: checkpoint 1234, "
                  "config 7", "train.global_batch_size: checkpoint 8, config 16",
                  "data.seq_length: checkpoint 32, config 64"):
        assert field in line
    assert "--set checkpoint.allow_config_change=true" in line
    assert "layout:" not in proc.stdout  # refused before anything was built
    assert _snapshot(copy) == before and _no_locks(copy / "ckpt", copy / "run")


def test_opt_in_resumes_with_the_changes_as_a_warning(reruns):
    copy, _, proc = reruns["opt_in"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if "allow_config_change" in line]
    assert len(warnings) == 1 and warnings[0].startswith("WARNING: resuming")
    assert "optimizer.lr: checkpoint 0.002, config 0.001" in warnings[0]
    assert "train.train_steps: checkpoint 4, config 6" in warnings[0]
    assert f"resumed from {copy}/ckpt/iter_0000004 at step 4" in proc.stdout
    assert "summary: completed | steps 6" in proc.stdout


def test_other_optimizer_kind_is_refused_in_one_line(reruns):
    """megatron's distributed and plain optimizers keep different state dicts: a resume that
    switches parallel.distributed_optimizer is refused in one line, not a traceback from
    megatron's load, even with checkpoint.allow_config_change (the field is a layout choice)."""
    copy, before, proc = reruns["optimizer"]
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _error_line(proc.stderr)
    assert "saved with parallel.distributed_optimizer=false" in line, line
    assert "--set parallel.distributed_optimizer=false" in line and "Traceback" not in proc.stderr
    assert _snapshot(copy) == before and _no_locks(copy / "ckpt", copy / "run")


@pytest.mark.slow
def test_second_run_is_refused_until_the_first_ends_on_sigterm(tmp_path):
    """Two runs on one checkpoint dir, then on one output dir; SIGTERM frees both locks, and a
    resume with only a free field changed (log_interval) starts without a warning."""
    first = popen(small_args(tmp_path, 5000))
    try:
        wait_for_line(first, lambda line: line.startswith("step 1/"), timeout=120)
        start = time.monotonic()
        second = run_cli(small_args(tmp_path, 5000))
        assert second.returncode == 2, second.stderr[-3000:]
        assert time.monotonic() - start < 30
        assert _error_line(second.stderr).startswith(
            f"error: checkpoint.save {tmp_path}/ckpt is in use by another run (pid {first.pid} "
            f"on host ")
        third = run_cli(small_args(tmp_path, 5000, "--set", f"checkpoint.save={tmp_path}/other"))
        assert third.returncode == 2, third.stderr[-3000:]
        assert _error_line(third.stderr).startswith(
            f"error: logging.output_dir {tmp_path}/run is in use by another run "
            f"(pid {first.pid} on host ")
        assert not (tmp_path / "other/.lock").exists()  # its own first lock was given back
        os.kill(first.pid, signal.SIGTERM)
        rest = first.communicate(timeout=120)[0]
        assert first.returncode == 0, rest[-3000:]
    finally:
        kill_job(first)
    assert _no_locks(tmp_path / "ckpt", tmp_path / "run")
    resumed = popen(small_args(tmp_path, 5000, "--set", "train.log_interval=7"))
    try:
        lines = wait_for_line(resumed, lambda line: line.startswith("step "), timeout=120)
    finally:
        kill_job(resumed)
    assert any(line.startswith(f"resumed from {tmp_path}/ckpt/iter_") for line in lines)
    assert not any("WARNING" in line or "error" in line for line in lines), "".join(lines)


def _readonly_dir() -> Path:
    """A directory that even root cannot create entries in (sysfs), or skip."""
    for cand in (Path("/sys"), Path("/proc/sys")):
        try:
            (cand / "moe-probe").mkdir()
        except OSError:
            return cand
        (cand / "moe-probe").rmdir()
    pytest.skip("no read-only directory on this machine")


@pytest.mark.parametrize("field, kind", [
    ("checkpoint.save", "file"), ("logging.output_dir", "file"),
    ("checkpoint.save", "under_file"), ("logging.output_dir", "under_file"),
    ("checkpoint.save", "readonly"), ("logging.output_dir", "readonly"),
])
def test_unwritable_paths_are_refused_before_anything_is_built(tmp_path, field, kind):
    (tmp_path / "afile").write_text("keep me\n")
    path = {"file": tmp_path / "afile", "under_file": tmp_path / "afile/sub/dir",
            "readonly": _readonly_dir() if kind == "readonly" else None}[kind]
    if kind == "readonly":
        path = path / "moe-run" / "ckpt"
    start = time.monotonic()
    proc = run_cli(small_args(tmp_path, 4, "--set", f"{field}={path}"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    # ~0.5 s on an idle machine: refused before torch is imported, let alone a model built
    # (the bound leaves room for a loaded test machine).
    assert time.monotonic() - start < 20 and "layout:" not in proc.stdout
    line = proc.stderr.strip().splitlines()[-1]
    expected = {"file": f"{path} is a file, not a directory",
                "under_file": f"{path} lies under {tmp_path}/afile, which is a file",
                "readonly": f"{path} cannot be written"}[kind]
    assert line.startswith(f"config error: {field}: {expected}"), proc.stderr[-3000:]
    assert (tmp_path / "afile").read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing created


@pytest.mark.slow
def test_torchrun_ranks_all_stop_when_rank0_is_refused(tmp_path):
    """Only rank 0 takes the lock; its refusal reaches every rank (no rank waits forever)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "ckpt")], cwd=REPO,
                              text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert holder.stdout.readline().strip() == "held"
        # two ranks forked from one driver (tests.forkrun), as torchrun would start them
        proc, = run_clis([small_args(tmp_path, 5000)], tmp_path / "driver", timeout=240,
                         nprocs=[2])
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode != 0
    assert f"is in use by another run (pid {holder.pid} on host" in proc.stderr
    assert proc.stderr.count("error: checkpoint.save") == 1  # rank 0 says it, once
    assert "layout:" not in proc.stdout


@pytest.mark.parametrize("field, value, expected", [
    ("parallel.expert", 2, "free"), ("train.micro_batch_size", 1, "free"),
    ("model.attention_backend", "flash", "free"), ("train.cuda_graph", True, "free"),
    ("train.recompute", "full", "free"), ("checkpoint.keep_last", 9, "free"),
    ("logging.output_dir", "elsewhere", "free"), ("train.eval_interval", 5, "free"),
    ("optimizer.lr", 1.0, "run"), ("schedule.warmup_steps", 9, "run"),
    ("data.split", "1,0,0", "run"), ("data.blend", ["a"], "run"),
    ("train.precision", "bf16", "run"),
    ("train.train_tokens", 10**9, "run"), ("upcycling.ratio", 0.1, "run"), ("moe.top_k", 1, "run"),
    ("model.hidden_size", 8, "arch"), ("moe.layer_freq", 2, "arch"),
])
def test_policy_table(field, value, expected):
    """Each field falls in the class its comment in resume_check.POLICY gives."""
    # Imported here: it loads megatron-core, which the other tests of this module never need.
    from megatron_ext.checkpoint.resume_check import differences

    saved, current = to_dict(Config()), to_dict(Config())
    section, key = field.split(".")
    current[section][key] = value
    del saved["checkpoint"]["allow_config_change"]  # an older checkpoint: compared as default
    found = {cls: [f for f, _, _ in fields] for cls, fields in differences(saved, current).items()}
    assert found == {cls: [field] if cls == expected else [] for cls in ("arch", "run", "free")}


def test_default_output_dir_is_per_config(tmp_path):
    """Two configs without logging.output_dir never share one metrics.jsonl."""
    cfg = tmp_path / "my-exp.yaml"
    cfg.write_text("train:\n  train_steps: 3\n")
    for args, expected in (([], "runs/default"), (["--config", str(cfg)], "runs/my-exp")):
        proc = run_cli(["pretrain_moe.py", *args, "--print-config"])
        assert proc.returncode == 0, proc.stderr
        assert f"  output_dir: {expected}\n" in proc.stdout
