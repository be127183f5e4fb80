"""Run pretrain_moe.py as a benchmark's subprocess and read back what it logged."""

from __future__ import annotations

import subprocess
from pathlib import Path

from megatron_ext.analysis.metrics_log import read_metrics
from megatron_ext.platform.launch import free_port

ROOT = Path(__file__).resolve().parents[3]


def train(args: list[str], run_dir: Path, what: str) -> list[dict]:
    """Run ``python pretrain_moe.py ARGS`` (``args[0]`` is the interpreter) from the repo root
    alone on a free port; return the records of ``run_dir/metrics.jsonl``. A failed run ends the
    benchmark with one line naming ``what`` and the run's last stderr line."""
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: the {what} failed (exit {proc.returncode}): "
                         f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    return read_metrics(run_dir / "metrics.jsonl").records  # the one reader of the file
