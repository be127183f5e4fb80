"""Run pretrain_moe.py as a benchmark's subprocess and read back what it logged."""

from __future__ import annotations

import subprocess
import sys
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


# Small MoE shapes trained on the demo corpus by the evaluation/generation benchmarks, as
# overrides of configs/tiny-cpu.yaml. tiny-cpu: that file as it is (4 layers, hidden 128, 4/2
# heads, d_ff 256, 8 experts top-2). wide: the 8x152M layer shape (hidden 512, 8/8 heads,
# d_ff 2048, 8 experts top-2) with 4 layers. A few steps: the weights need to be a trained
# model's (peaked distributions, no near-ties everywhere), not a good one.
SHAPES = {
    "tiny-cpu": ["train.train_steps=20"],
    "wide": ["model.num_layers=4", "model.hidden_size=512", "model.num_attention_heads=8",
             "model.num_kv_heads=8", "model.ffn_hidden_size=2048", "train.train_steps=8",
             "train.global_batch_size=8", "train.micro_batch_size=8"],
}
_QUICK = ["train.eval_interval=0", "train.log_interval=5", "data.valid_sets={}",
          "logging.wandb.mode=disabled", "schedule.warmup_steps=2", "optimizer.lr=3e-3"]


def train_and_export(work: Path, shape: str) -> tuple[Path, Path]:
    """(checkpoint, fp32 HF export) of ``shape`` trained by pretrain_moe.py under ``work``;
    reused when ``work`` already holds them (a benchmark's --workdir)."""
    ckpt, hf = work / f"{shape}-ckpt", work / f"{shape}-hf"
    if (hf / "config.json").is_file():
        return ckpt, hf
    args = [sys.executable, str(ROOT / "pretrain_moe.py"), "--config", "configs/tiny-cpu.yaml"]
    for item in [*_QUICK, *SHAPES[shape], f"checkpoint.save={ckpt}",
                 f"logging.output_dir={work / shape}"]:
        args += ["--set", item]
    train(args, work / shape, f"{shape} training run")
    convert = [sys.executable, "-m", "megatron_ext.cli.mcore_to_hf", "--input", str(ckpt),
               "--output", str(hf), "--dtype", "float32", "--skip-validation"]
    proc = subprocess.run(convert, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: the {shape} export failed: "
                         f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    return ckpt, hf
