"""Evaluation throughput: our lm-eval LM class against lm-eval's HF model on the same checkpoint.

Trains a small MoE with ``pretrain_moe.py`` on the demo corpus (``--shape``, a
``benchlib.runs.SHAPES`` entry; or takes ``--checkpoint`` and ``--hf``), exports it with
``tools/convert/mcore_to_hf.py``, then runs the same local tasks through
``megatron_ext.evaluation`` with our ``MegatronLM`` on the checkpoint and lm-eval's ``HFLM`` on
the export, both fp32 on the CPU (the checkpoint's dtype on a GPU), same batch size. The default
tasks cover every request kind: multiple choice (loglikelihood), rolling perplexity and
generation (generate_until). Requests are counted as lm-eval hands them to the model. The two
backends alternate within each of ``--repeats`` repeats (load changes hit both); reported: the
time in the model's request methods (per kind too) and in the whole ``simple_evaluate``, the
ratio of each backend's best model time (other processes only slow a run down), and the ratio
per repeat (median, range). HFLM runs without megatron_ext's
CPU-path function mode (on in this process once our model loaded; lm-eval's users never have
it). Prints a Markdown section for docs/benchmarks.md.

  python tools/bench/eval_throughput.py --tasks demo_en_mc,demo_en_ppl,demo_en_gen --limit 40
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchlib import runs
from benchlib.report import device_name

from megatron_ext.platform.cli import ArgumentParser, run_cli
from megatron_ext.platform.quiet import quiet_process

REQUEST_KINDS = ("loglikelihood", "loglikelihood_rolling", "generate_until")
OURS, HF = "ours (MegatronLM)", "lm-eval HFLM (export)"


def counted(lm) -> dict[str, float]:
    """Count the requests lm-eval hands to ``lm`` and time each kind (wraps its three request
    methods)."""
    count: dict[str, float] = {"requests": 0}
    for kind in REQUEST_KINDS:
        method = getattr(lm, kind)

        def wrapper(requests, *args, _method=method, _kind=kind, **kwargs):
            count["requests"] += len(requests)
            start = time.perf_counter()
            try:
                return _method(requests, *args, **kwargs)
            finally:
                count[_kind] = count.get(_kind, 0.0) + time.perf_counter() - start

        setattr(lm, kind, wrapper)
    return count


def run_once(path: Path, hf: bool, tasks: list[str], limit: int, batch: int,
             tokenizer: str | None) -> dict:
    """One timed evaluation (the model load is not timed)."""
    from megatron_ext.evaluation import harness  # why inside: lm-eval imports take seconds
    from megatron_ext.platform.cpu import native_torch

    manager = harness.task_manager(tasks)
    # Built outside native_torch: transformers' loading relies on torch's device context
    # (a function mode), which native_torch switches off with the rest.
    lm = harness.build_lm(path, batch, hf=hf, tokenizer=tokenizer)
    count = counted(lm)
    with native_torch() if hf else contextlib.nullcontext():
        start = time.perf_counter()
        results = harness.evaluate(lm, tasks, manager, limit=limit)
        seconds = time.perf_counter() - start
    metrics = {task: {k.split(",")[0]: v for k, v in entries.items()
                      if isinstance(v, float) and "stderr" not in k}
               for task, entries in results["results"].items()}
    return {"requests": count["requests"], "seconds": seconds, "metrics": metrics,
            "kinds": {k: count[k] for k in REQUEST_KINDS if k in count}}


def measure(ckpt: Path, hf: Path, tasks: list[str], a, tokenizer: str) -> dict[str, list]:
    runs_by_backend: dict[str, list] = {OURS: [], HF: []}
    for _ in range(a.repeats):
        runs_by_backend[OURS].append(run_once(ckpt, False, tasks, a.limit, a.batch_size, None))
        runs_by_backend[HF].append(run_once(hf, True, tasks, a.limit, a.batch_size, tokenizer))
    return runs_by_backend


def _model_s(run: dict) -> float:
    return sum(run["kinds"].values())


def render(by_backend: dict[str, list], cmd: str) -> str:
    """Per backend: the requests, then medians (min-max) over the repeats of the time in the
    model's request methods (what the LM class does) and of the whole ``simple_evaluate``
    (lm-eval's own work included: the same code for both, e.g. ~0.7 s collecting environment
    info); per request kind, median model seconds; the ratios of the two per repeat."""
    kinds = [k for k in REQUEST_KINDS if k in by_backend[OURS][0]["kinds"]]
    lines = [f"Device: {device_name()}. Command: `{cmd}`.", "",
             "| backend | requests | model s | requests/s (model) | simple_evaluate s | "
             + " | ".join(f"{k} s" for k in kinds) + " |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(kinds)]
    for name, rows in by_backend.items():
        model, wall = [_model_s(r) for r in rows], [r["seconds"] for r in rows]
        per_kind = [statistics.median(r["kinds"][k] for r in rows) for k in kinds]
        lines.append(f"| {name} | {rows[0]['requests']} | {statistics.median(model):.2f} "
                     f"({min(model):.2f}-{max(model):.2f}) | "
                     f"{rows[0]['requests'] / statistics.median(model):.1f} | "
                     f"{statistics.median(wall):.2f} ({min(wall):.2f}-{max(wall):.2f}) | "
                     + " | ".join(f"{x:.2f}" for x in per_kind) + " |")
    pairs = list(zip(by_backend[OURS], by_backend[HF], strict=True))
    model_ratio = [_model_s(h) / _model_s(o) for o, h in pairs]
    wall_ratio = [h["seconds"] / o["seconds"] for o, h in pairs]
    ours, theirs = by_backend[OURS][-1]["metrics"], by_backend[HF][-1]["metrics"]
    worst = max((abs(ours[t][m] - theirs[t][m]) / max(abs(theirs[t][m]), 1e-12)
                 for t in theirs for m in theirs[t]), default=0.0)
    spread = lambda r: f"{statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})"  # noqa: E731
    best = (min(_model_s(h) for h in by_backend[HF]) / min(_model_s(o) for o in by_backend[OURS]))
    lines += ["", f"ours / HF speed, model time: best of each backend {best:.2f}x; per repeat "
                  f"over {len(pairs)} repeats, median (range) {spread(model_ratio)}. Whole "
                  f"simple_evaluate per repeat: {spread(wall_ratio)}. Largest relative "
                  f"difference of a task metric: {worst:.1e}."]
    return "\n".join(lines)


def _bench(argv: list[str] | None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="demo_en_mc,demo_en_ppl,demo_en_gen")
    p.add_argument("--limit", type=int, default=40, help="items per task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shape", default="tiny-cpu", choices=sorted(runs.SHAPES),
                   help="the model trained when no --checkpoint is given")
    p.add_argument("--checkpoint", type=Path, help="our checkpoint (default: train a small one)")
    p.add_argument("--hf", type=Path, help="its HF export (with --checkpoint)")
    p.add_argument("--tokenizer", help="tokenizer for the HF export (default: the checkpoint's)")
    p.add_argument("--workdir", type=Path,
                   help="keep the trained checkpoint here and reuse it (default: a temporary "
                        "directory, removed)")
    a = p.parse_args(argv)
    if bool(a.checkpoint) != bool(a.hf):
        p.error("--checkpoint and --hf go together")
    quiet_process(all_from_internals=True)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    tasks = [t for t in a.tasks.split(",") if t]
    work = a.workdir or Path(tempfile.mkdtemp(prefix="eval_bench_"))
    try:
        ckpt, hf = (a.checkpoint, a.hf) if a.checkpoint else runs.train_and_export(work, a.shape)
        from megatron_ext.checkpoint.load_model import checkpoint_config
        from megatron_ext.data.run_tokenizer import tokenizer_path

        tokenizer = a.tokenizer or tokenizer_path(checkpoint_config(ckpt).config)
        by_backend = measure(ckpt, hf, tasks, a, tokenizer)
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    given = sys.argv[1:] if argv is None else argv
    print(render(by_backend, " ".join(["python", "tools/bench/eval_throughput.py", *given])))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_bench, argv)


if __name__ == "__main__":
    sys.exit(main())
