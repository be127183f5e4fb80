"""The comparison tool (moe-compare-inits) as the tests run it: a shortened command line, the
tool's main in the test process, and the one-line error check of its bad-input cases. Shared by
tests/unit/test_compare_inits.py, test_compare_bases.py, test_compare_slurm_plan.py and
tests/slurm/test_compare_slurm.py."""

from __future__ import annotations

import io
import os
import signal
import subprocess
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from tests.conftest import REPO, cli_env

TOOL = ["-m", "megatron_ext.cli.compare_inits"]
TINY = ["--config", "configs/tiny-cpu.yaml", *[a for kv in (
    "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
    "data.seq_length=32", "train.global_batch_size=8", "train.micro_batch_size=8",
    "train.log_interval=1", "train.eval_interval=2", "schedule.warmup_steps=1",
    "checkpoint.save_interval=2") for a in ("--set", kv)]]
TOKENS_PER_STEP = 8 * 32


def compare(out: Path, *extra: str, methods: str = "naive,drop:0.5", steps: int = 4,
            dense: list[str] | None = None) -> list[str]:
    return [*TOOL, *TINY, "--methods", methods, "--tokens", str(steps * TOKENS_PER_STEP),
            *(dense or ["--train-dense", str(2 * TOKENS_PER_STEP)]), "--routing-tokens", "1000",
            "--output", str(out), *extra]


def in_process(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """``run_cli(args)`` for the tool's own process, but in this one (its stages are still
    subprocesses): its bad input fails before anything heavy is imported, and a run spends
    seconds of its own only importing what this process has imported already. The environment
    (``conftest.cli_env``), directory and SIGTERM handler that run_cli's child would have,
    restored after. Not for a --dense checkpoint of ours: checking it opens a process group
    (see runner.stage_env)."""
    from megatron_ext.cli.compare_inits import main

    saved, cwd, handler = dict(os.environ), os.getcwd(), signal.getsignal(signal.SIGTERM)
    os.environ.clear()
    os.environ.update(cli_env(env))  # what run_cli gives its child
    out, err = io.StringIO(), io.StringIO()
    try:
        os.chdir(REPO)
        with redirect_stdout(out), redirect_stderr(err):
            code = main([str(a) for a in args[len(TOOL):]])
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(saved)
        signal.signal(signal.SIGTERM, handler)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def one_error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), (
        proc.returncode, proc.stderr[-2000:])
    return lines[0]
