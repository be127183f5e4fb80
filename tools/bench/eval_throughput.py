"""Evaluation throughput: our lm-eval LM class against lm-eval's HF model on the same checkpoint.

Trains a small MoE with ``pretrain_moe.py`` on the demo corpus (or takes ``--checkpoint``),
exports it with ``tools/convert/mcore_to_hf.py``, then runs the same local tasks through
``megatron_ext.evaluation`` twice: our ``MegatronLM`` on the checkpoint and lm-eval's ``HFLM`` on
the export, both fp32 on the CPU (the checkpoint's dtype on a GPU), same batch size. Requests are
counted as lm-eval hands them to the model; each backend runs ``--repeats`` times and the best
time counts. Prints a Markdown section for docs/benchmarks.md.

  python tools/bench/eval_throughput.py --tasks demo_en_mc,demo_en_ppl --limit 40
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import runs
from benchlib.report import device_name

from megatron_ext.platform.cli import ArgumentParser, run_cli
from megatron_ext.platform.quiet import quiet_process

ROOT = Path(__file__).resolve().parents[2]
REQUEST_KINDS = ("loglikelihood", "loglikelihood_rolling", "generate_until")
SMALL = ["model.num_layers=4", "model.hidden_size=128", "model.ffn_hidden_size=256",
         "train.train_steps=10", "schedule.warmup_steps=2", "train.eval_interval=0",
         "train.log_interval=5", "data.valid_sets={}", "logging.wandb.mode=disabled"]


def train_and_export(work: Path) -> tuple[Path, Path]:
    """A small demo-corpus checkpoint and its HF export."""
    ckpt, hf = work / "ckpt", work / "hf"
    args = [sys.executable, str(ROOT / "pretrain_moe.py"), "--config", "configs/tiny-cpu.yaml"]
    for item in SMALL + [f"checkpoint.save={ckpt}", f"logging.output_dir={work / 'run'}"]:
        args += ["--set", item]
    runs.train(args, work / "run", "training run")
    convert = [sys.executable, str(ROOT / "tools/convert/mcore_to_hf.py"), "--input", str(ckpt),
               "--output", str(hf)]
    proc = subprocess.run(convert, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: the export failed: {proc.stderr.strip().splitlines()[-1:]}")
    return ckpt, hf


def counted(lm) -> dict[str, int]:
    """Count the requests lm-eval hands to ``lm`` (wraps its three request methods)."""
    count = {"requests": 0}
    for kind in REQUEST_KINDS:
        method = getattr(lm, kind)

        def wrapper(requests, *args, _method=method, **kwargs):
            count["requests"] += len(requests)
            return _method(requests, *args, **kwargs)

        setattr(lm, kind, wrapper)
    return count


def measure(path: Path, hf: bool, tasks: list[str], limit: int, batch: int, repeats: int,
            tokenizer: str | None) -> dict:
    from megatron_ext.evaluation import harness  # why inside: lm-eval imports take seconds

    manager = harness.task_manager(tasks)
    best, requests, results = float("inf"), 0, None
    for _ in range(repeats):
        lm = harness.build_lm(path, batch, hf=hf, tokenizer=tokenizer)
        count = counted(lm)
        start = time.perf_counter()
        results = harness.evaluate(lm, tasks, manager, limit=limit)
        best = min(best, time.perf_counter() - start)
        requests = count["requests"]
    metrics = {task: {k.split(",")[0]: v for k, v in entries.items()
                      if isinstance(v, float) and "stderr" not in k}
               for task, entries in results["results"].items()}
    return {"backend": "lm-eval HFLM (export)" if hf else "ours (MegatronLM)",
            "requests": requests, "seconds": best, "per_s": requests / best, "metrics": metrics}


def render(rows: list[dict], cmd: str) -> str:
    lines = [f"Device: {device_name()}. Command: `{cmd}`.", "",
             "| backend | requests | best of runs, s | requests/s |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['requests']} | {r['seconds']:.2f} | "
                     f"{r['per_s']:.1f} |")
    ratio = rows[0]["per_s"] / rows[1]["per_s"]
    ours, theirs = rows[0]["metrics"], rows[1]["metrics"]
    worst = max((abs(ours[t][m] - theirs[t][m]) / max(abs(theirs[t][m]), 1e-12)
                 for t in theirs for m in theirs[t]), default=0.0)
    lines += ["", f"ours / HF: {ratio:.2f}x; largest relative difference of a task metric: "
                  f"{worst:.1e}."]
    return "\n".join(lines)


def _bench(argv: list[str] | None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="demo_en_mc,demo_en_ppl")
    p.add_argument("--limit", type=int, default=40, help="items per task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--checkpoint", type=Path, help="our checkpoint (default: train a small one)")
    p.add_argument("--hf", type=Path, help="its HF export (with --checkpoint)")
    p.add_argument("--tokenizer", help="tokenizer for the HF export (default: the checkpoint's)")
    a = p.parse_args(argv)
    quiet_process(all_from_internals=True)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    tasks = [t for t in a.tasks.split(",") if t]
    work = Path(tempfile.mkdtemp(prefix="eval_bench_"))
    try:
        ckpt, hf = (a.checkpoint, a.hf) if a.checkpoint else train_and_export(work)
        from megatron_ext.checkpoint.load_model import checkpoint_config
        from megatron_ext.evaluation.tokenizer import tokenizer_path

        tokenizer = a.tokenizer or tokenizer_path(checkpoint_config(ckpt)[1])
        rows = [measure(ckpt, False, tasks, a.limit, a.batch_size, a.repeats, None),
                measure(hf, True, tasks, a.limit, a.batch_size, a.repeats, tokenizer)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    given = sys.argv[1:] if argv is None else argv
    print(render(rows, " ".join(["python", "tools/bench/eval_throughput.py", *given])))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_bench, argv)


if __name__ == "__main__":
    sys.exit(main())
