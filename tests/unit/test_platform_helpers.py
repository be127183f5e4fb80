"""One of each helper (issue 15), each shown on the path users run.

1. ``platform.cli.run_cli``, the runner of every tool: a usage error and every ``UserError``
   are one ``error:`` line with exit 2 (``CheckFailed``: 1), an OSError one line with exit 1,
   Ctrl-C exit 130 and SIGTERM exit 143 after ``finally`` cleanup (a staged output is removed,
   the previous output kept); real processes, real signals, a real tool.
2. ``platform.fs.atomic_write``: a kill -9 at any point of a write leaves the old content whole
   (or, once renamed, the new content whole), never a mix or an empty file.
3. ``platform.launch``: the one reader of torchrun's and srun's variables, and ``free_port``.
4. ``config.loader.apply_overrides``: dotted overrides with every type checked and named.
5. ``platform.quiet``: the shared warning filters hide megatron's notices, only those, and the
   context manager leaves the process's filters as they were.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import warnings

import pytest

from megatron_ext.config.loader import ConfigError, apply_overrides
from megatron_ext.config.schema import Config
from megatron_ext.errors import UserError
from megatron_ext.platform import launch, quiet
from megatron_ext.platform.cli import INTERRUPTED_LINE, TERMINATED_LINE
from tests.conftest import REPO

ENV = {**os.environ, "PYTHONPATH": str(REPO)}

# A tool in miniature: run_cli around work that fails as asked (argv[0]); "wait" stages an
# output beside a previous one and sleeps until it is signalled.
_TOOL = r"""
import sys, time
from pathlib import Path
from megatron_ext.config.loader import ConfigError
from megatron_ext.data.errors import DataError
from megatron_ext.errors import CheckFailed, UserError
from megatron_ext.platform.cli import ArgumentParser, run_cli
from megatron_ext.platform.fs import staging

def work(argv):
    p = ArgumentParser(prog="toy")
    p.add_argument("mode")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    errors = {"config": ConfigError, "data": DataError, "user": UserError, "check": CheckFailed}
    if args.mode in errors:
        raise errors[args.mode](f"{args.mode} problem\nin {args.out}")
    if args.mode == "oserror":
        (args.out / "sub" / "file").write_text("x")
    if args.mode == "bug":
        raise RuntimeError("a bug")
    if args.mode == "wait":
        with staging(args.out) as tmp:
            (tmp / "part").write_text("half")
            print("ready", flush=True)
            time.sleep(60)
    return 0

sys.exit(run_cli(work, sys.argv[1:]))
"""


def _toy(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _TOOL, *argv], env=ENV, capture_output=True,
                          text=True, timeout=60)


OUT = ["--out", "{out}"]


@pytest.mark.parametrize("argv, code, line", [
    (["config", *OUT], 2, "error: config problem in {out}"),
    (["data", *OUT], 2, "error: data problem in {out}"),
    (["user", *OUT], 2, "error: user problem in {out}"),
    (["check", *OUT], 1, "error: check problem in {out}"),
    (["oserror", *OUT], 1, "error: [Errno 2] No such file or directory: '{out}/sub/file'"),
    (["--bogus"], 2, "error: the following arguments are required: mode, --out (see --help)"),
    (["config", "--out"], 2, "error: argument --out: expected one argument (see --help)"),
])
def test_runner_turns_each_fault_into_one_line_and_its_exit_code(tmp_path, argv, code, line):
    out = tmp_path / "out"
    r = _toy(*(a.format(out=out) for a in argv))
    assert r.returncode == code, r.stderr
    assert r.stderr.splitlines() == [line.format(out=out)]


def test_runner_keeps_the_traceback_of_a_bug(tmp_path):
    r = _toy("bug", "--out", str(tmp_path))
    assert r.returncode == 1 and "Traceback" in r.stderr and "RuntimeError: a bug" in r.stderr


@pytest.mark.parametrize("sig, code, line", [(signal.SIGTERM, 143, TERMINATED_LINE),
                                             (signal.SIGINT, 130, INTERRUPTED_LINE)])
def test_signal_ends_a_tool_after_its_cleanup(tmp_path, sig, code, line):
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous").write_text("keep")
    proc = subprocess.Popen([sys.executable, "-c", _TOOL, "wait", "--out", str(out)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n", proc.stderr.read()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == code and err.splitlines() == [line], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the staged dir is gone
    assert [p.name for p in out.iterdir()] == ["previous"]


@pytest.mark.parametrize("argv, code, needle", [
    ([], 2, "the following arguments are required: --run, --output (see --help)"),
    (["--run", "a=missing", "--output", "o"], 2, "missing/metrics.jsonl not found"),
    (["--run", "a=run", "--output", "blocker/report"], 1, "Not a directory"),
])
def test_a_real_tool_uses_the_runner(tmp_path, argv, code, needle):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text(
        '{"kind": "train", "step": 1, "tokens": 100, "loss": 5.0}\n')
    (tmp_path / "blocker").write_text("a file where the output's parent should be")
    r = subprocess.run([sys.executable, "-m", "megatron_ext.cli.loss_curves", *argv],
                       cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    lines = r.stderr.splitlines()
    assert r.returncode == code and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]


# --- atomic_write --------------------------------------------------------------------------------
_WRITER = r"""
import os, signal, sys
from megatron_ext.platform import fs
path, where = sys.argv[1:]
def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)
real = {"fsync": os.fsync, "replace": os.replace}
def kill_at(name):
    def wrapped(*a, **k):
        if name == where:
            die()
        return real[name](*a, **k)
    return wrapped
os.fsync, os.replace = kill_at("fsync"), kill_at("replace")
if where == "dir":
    fs.fsync_dir = die  # after the rename: the new content is in place
if where == "write":  # a large write killed from outside while it runs
    print("writing", flush=True)
fs.atomic_write(path, b"new" * (20_000_000 if where == "write" else 1000))
"""


@pytest.mark.parametrize("where, expect_new", [
    ("fsync", False), ("replace", False), ("write", False), ("dir", True)])
def test_atomic_write_killed_leaves_old_or_new_content_whole(tmp_path, where, expect_new):
    path = tmp_path / "latest"
    path.write_bytes(b"old content\n")
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), where], env=ENV,
                            stdout=subprocess.PIPE, text=True)
    if where == "write":
        assert proc.stdout.readline() == "writing\n"
        deadline = time.monotonic() + 30
        while not [p for p in tmp_path.iterdir() if p.name != "latest"]:
            assert time.monotonic() < deadline and proc.poll() is None
        proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert path.read_bytes() == (b"new" * 1000 if expect_new else b"old content\n")
    # A later write succeeds and removes nothing but its own temp file.
    from megatron_ext.platform.fs import atomic_write

    atomic_write(path, "again")
    assert path.read_text() == "again"


# --- launch --------------------------------------------------------------------------------------
@pytest.mark.parametrize("env, want", [
    ({}, (0, 1, 0)),
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, (3, 8, 1)),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_LOCALID": "2"}, (5, 6, 2)),
    ({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "7", "SLURM_NTASKS": "16",
      "SLURM_LOCALID": "3"}, (1, 2, 3)),  # torchrun inside an allocation: torchrun's own
    ({"WORLD_SIZE": " 4 "}, (0, 4, 0)),
])
def test_launch_reads_torchrun_then_srun_then_one_process(env, want):
    found = launch.launch(env)
    assert (found.rank, found.world_size, found.local_rank) == want
    assert launch.world_size(env) == want[1] and launch.is_rank0(env) == (want[0] == 0)


@pytest.mark.parametrize("env, named", [
    ({"WORLD_SIZE": "0"}, "environment WORLD_SIZE: '0' is not a positive process count"),
    ({"SLURM_NTASKS": "four"}, "environment SLURM_NTASKS: 'four' is not a positive"),
    ({"RANK": "-1"}, "environment RANK: '-1' is not a non-negative rank"),
    ({"SLURM_LOCALID": ""}, "environment SLURM_LOCALID: '' is not a non-negative rank"),
])
def test_launch_names_a_bad_variable(env, named):
    with pytest.raises(UserError, match="^" + named.replace("(", r"\(")):
        launch.launch(env)


def test_free_port_is_bindable():
    ports = {launch.free_port() for _ in range(3)}
    assert all(1024 <= p <= 65535 for p in ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports.pop()))


# --- apply_overrides -----------------------------------------------------------------------------
def test_apply_overrides_takes_set_texts_and_mappings_and_keeps_the_input():
    cfg = Config()
    new = apply_overrides(cfg, ["train.seed=7", "optimizer.lr=1e-4", "moe.layer_freq=[1, 0]"])
    assert (new.train.seed, new.optimizer.lr, new.moe.layer_freq) == (7, 1e-4, [1, 0])
    assert apply_overrides(cfg, {"moe.capacity_factor": None, "train.seed": 3}).train.seed == 3
    assert cfg.train.seed == Config().train.seed


@pytest.mark.parametrize("overrides, message", [
    (["train.seed=x"], "train.seed: expected an integer, got 'x'"),
    ({"train.seed": "1"}, "train.seed: expected an integer, got '1'"),
    ({"train.seed": True}, "train.seed: expected an integer, got True"),
    (["optimizer.lr=.nan"], "optimizer.lr: must be a finite number"),
    (["model.vocab_size=[1]"], "model.vocab_size: expected an integer"),
    (["moe.bogus=1"], "moe.bogus: unknown key"),
    ({"nope.x": 1}, "nope: unknown key"),
    (["train.seed"], "--set train.seed: expected section.key=value"),
    ({"train..seed": 1}, "train..seed: expected section.key"),
    (["train.seed.deeper=1"], "train.seed.deeper: seed is not a section"),
])
def test_apply_overrides_names_each_bad_field(overrides, message):
    with pytest.raises(ConfigError) as e:
        apply_overrides(Config(), overrides)
    assert str(e.value).startswith(message), str(e.value)


# --- quiet ---------------------------------------------------------------------------------------
NOISE = ["Transformer Engine and Apex are not installed. Falling back to Torch optimizers.",
         "Apex is not installed.", "full scope is deprecated. Use x",
         "Please use DTensor instead and we are deprecating ShardedTensor.",
         "`load_state_dict` is deprecated and will be removed"]


def _shown(messages: list[str]) -> list[str]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        before = list(warnings.filters)
        with quiet.quiet_megatron():
            for text in messages:
                warnings.warn(text, UserWarning, stacklevel=1)
        assert warnings.filters == before  # the block's filters end with it
    return [str(w.message) for w in seen]


def test_quiet_hides_megatron_notices_and_nothing_else():
    assert _shown(NOISE) == []
    ours = ["GroupedGemmExperts: unaligned weight/input, using the loop path",
            "Transformer Engine could not be loaded"]
    assert _shown(ours) == ours


def test_quiet_process_sets_the_same_filters_for_the_whole_process():
    code = ("import warnings\nfrom megatron_ext.platform.quiet import quiet_process\n"
            "quiet_process()\n"
            f"for t in {NOISE!r} + ['kept']:\n    warnings.warn(t)\n")
    r = subprocess.run([sys.executable, "-W", "always", "-c", code], env=ENV,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "kept" in r.stderr
    assert not any(text[:20] in r.stderr for text in NOISE), r.stderr
