"""How long training stops for a checkpoint: synchronous vs ``checkpoint.async_save``.

Runs ``pretrain_moe.py`` twice with the same config (mock data), saving every
``--save-interval`` steps, and reads from the run's metrics.jsonl the time each step window spent
in saves (``time/save_s``: what training waited for) and the background write time of each
async save (``checkpoint`` records: start to commit). Prints a Markdown section for
docs/benchmarks.md.

Example (CPU, 8x152M at a short sequence; ~5 GB per checkpoint with Adam state):
  python tools/bench/checkpoint_save.py --config configs/8x152M.yaml --seq 256 --out /tmp/ckb
CPU smoke run:
  python tools/bench/checkpoint_save.py --config configs/tiny-cpu.yaml --saves 2
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from benchlib import runs
from benchlib.report import device_name

from megatron_ext.platform.cli import ArgumentParser, run_cli

ROOT = Path(__file__).resolve().parents[2]


def run_mode(config: str, overrides: list[str], work: Path, async_save: bool, steps: int,
             interval: int) -> dict:
    """One training run; the saves at steps < ``steps`` are logged (the final one is not)."""
    tag = "async" if async_save else "sync"
    args = [sys.executable, str(ROOT / "pretrain_moe.py"), "--config", config,
            "--set", "data.demo_corpus=false", "--set", "data.mock=true",
            "--set", "train.eval_interval=0", "--set", "train.log_interval=1",
            "--set", "logging.wandb.mode=disabled", "--set", "checkpoint.keep_last=1",
            "--set", f"train.train_steps={steps}", "--set", "train.train_tokens=null",
            "--set", "schedule.warmup_steps=1", "--set", f"checkpoint.save_interval={interval}",
            "--set", f"checkpoint.save={work / tag / 'ckpt'}",
            "--set", f"logging.output_dir={work / tag / 'run'}",
            "--set", f"checkpoint.async_save={str(async_save).lower()}"]
    for o in overrides:
        args += ["--set", o]
    records = runs.train(args, work / tag / "run", f"{tag} run")
    train = {r["step"]: r for r in records if r["kind"] == "train"}
    saves = [train[s + 1]["time/save_s"] for s in range(interval, steps, interval)]
    step_s = [r["time/step_s"] for s, r in sorted(train.items()) if s > 1]
    writes = [r["background_write_s"] for r in records if r["kind"] == "checkpoint"]
    ckpt = next((work / tag / "ckpt").glob("iter_*"))
    size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    return {"mode": tag, "saves_s": saves, "step_s": sum(step_s) / max(len(step_s), 1),
            "writes_s": writes, "size_gb": size / 1e9}


def render(results: list[dict], cmd: str) -> str:
    lines = [f"Device: {device_name()}. Command: `{cmd}`.", "",
             "| mode | checkpoint GB | training paused per save, s (each) | "
             "background write, s (each) | step without save, s |",
             "|---|---|---|---|---|"]
    for r in results:
        saves = ", ".join(f"{x:.2f}" for x in r["saves_s"])
        writes = ", ".join(f"{x:.1f}" for x in r["writes_s"]) or "-"
        lines.append(f"| {r['mode']} | {r['size_gb']:.2f} | {saves} | {writes} | "
                     f"{r['step_s']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--seq", type=int, default=None, help="override data.seq_length")
    p.add_argument("--saves", type=int, default=3, help="timed saves per mode")
    p.add_argument("--save-interval", type=int, default=2, help="steps between saves")
    p.add_argument("--out", type=Path, default=None,
                   help="work directory (default: a temporary one, deleted afterwards)")
    a = p.parse_args(argv)
    if not Path(a.config).is_file():
        print(f"error: config not found: {a.config}", file=sys.stderr)
        return 2
    overrides = list(a.overrides)
    if a.seq:
        overrides += [f"data.seq_length={a.seq}", f"model.max_position_embeddings={a.seq}"]
    work = a.out or Path(tempfile.mkdtemp(prefix="ckpt_bench_"))
    steps = a.save_interval * a.saves + 1
    try:
        results = [run_mode(a.config, overrides, work, mode, steps, a.save_interval)
                   for mode in (False, True)]
    finally:
        if a.out is None:
            shutil.rmtree(work, ignore_errors=True)
    cmd = " ".join(["python", "tools/bench/checkpoint_save.py", *(argv or sys.argv[1:])])
    print(render(results, cmd))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
