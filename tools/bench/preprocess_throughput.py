#!/usr/bin/env python3
"""Measure preprocessing throughput: tokens/s, tokens per CPU-second and the main process's share.

Inputs: the demo corpus (.txt, one short document per line) and a generated JSONL file of
repeated corpus documents, plain and gzipped (in a temporary directory, deleted afterwards).
Tokenizer: the demo byte-level BPE (vocab 4096, built by ensure_demo_data), --append-eod.
Each run calls ``preprocess()`` in this process, so it covers reading, parsing, tokenizing and
writing .bin/.idx, not interpreter start-up or the megatron-core import.

Per run: wall time, the CPU time of this (main) process and of its worker processes
(``getrusage`` RUSAGE_SELF / RUSAGE_CHILDREN deltas: pool workers are joined inside
``preprocess()``, so their time is in), tokens/s, tokens per CPU-second (main + workers) and the
main process's share of the CPU time, with the 1-minute load average at the start and end of the
run. On a shared machine wall time says how busy the machine was; tokens per CPU-second says
how much work the code does, and stays put under load.

``--before REV`` also runs ``megatron_ext/data/preprocess.py`` as it was at git revision REV (its
own module, beside the current one) on the same inputs, alternating run by run, so the ratio is
measured under the same load. ``--profile`` adds a cProfile of the main process (2 workers, the
generated JSONL) for each version: the functions where the main process spends its time.
``--document-mb 24`` measures the tokenizer's peak memory for one document that large, encoded
whole (as before the bounded reader) and in pieces (as now), each in its own process.
Prints a Markdown section ready for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import gzip
import hashlib
import importlib.util
import io
import json
import os
import platform
import pstats
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

from megatron_ext.platform.cli import ArgumentParser, run_cli

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def write_jsonl(corpus_files: Sequence[str], path: str, target_bytes: int) -> int:
    """Repeat the corpus documents as JSONL lines until the file reaches ``target_bytes``."""
    from megatron_ext.data.preprocess import iter_valid_texts

    docs = list(iter_valid_texts(corpus_files, txt_mode="lines"))
    block = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs).encode()
    written = 0
    with open(path, "wb") as handle:
        while written < target_bytes:
            handle.write(block)
            written += len(block)
    return written


def load_before(rev: str, directory: str) -> Callable:
    """``preprocess`` of megatron_ext/data/preprocess.py at git revision ``rev``, imported as
    its own module (pool workers fork with it loaded, so they find its functions)."""
    source = subprocess.run(["git", "-C", REPO, "show", f"{rev}:megatron_ext/data/preprocess.py"],
                            check=True, capture_output=True, text=True).stdout
    path = os.path.join(directory, "preprocess_before.py")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(source)
    spec = importlib.util.spec_from_file_location("preprocess_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["preprocess_before"] = module
    spec.loader.exec_module(module)
    return module.preprocess


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def measure(run: Callable, inputs: Sequence[str], tokenizer: str, workers: int, out: str,
            mode: str) -> dict:
    """One run: wall and CPU times, throughput, main share, load before and after."""
    load_start = os.getloadavg()[0]
    main0, kids0, wall0 = _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN), time.time()
    report = run(inputs, out, tokenizer, append_eod=True, workers=workers, txt_mode=mode)
    wall = time.time() - wall0
    main = _cpu(resource.RUSAGE_SELF) - main0
    kids = _cpu(resource.RUSAGE_CHILDREN) - kids0
    return {"workers": workers, "documents": report.documents, "tokens": report.tokens,
            "wall": wall, "main_cpu": main, "worker_cpu": kids,
            "tokens_per_s": report.tokens / wall, "tokens_per_cpu_s": report.tokens / (main + kids),
            "main_share": main / (main + kids), "load": (load_start, os.getloadavg()[0]),
            "mb": sum(os.path.getsize(p) for p in inputs) / 1e6,
            "digest": _digest(out)}


def _digest(prefix: str) -> str:
    """A fingerprint of the output pair, so before/after rows show they wrote the same bytes."""
    digest = hashlib.sha256()
    for suffix in (".bin", ".idx"):
        with open(prefix + suffix, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):  # noqa: B023 (used at once)
                digest.update(block)
    return digest.hexdigest()[:12]


def profile_main(run: Callable, inputs: Sequence[str], tokenizer: str, out: str,
                 top: int = 8) -> str:
    """cProfile of the main process for one 2-worker run: the top functions by own time."""
    profiler = cProfile.Profile()
    profiler.enable()
    run(inputs, out, tokenizer, append_eod=True, workers=2, txt_mode="blocks")
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    keep = [line for line in text.getvalue().splitlines()
            if line.strip() and not line.startswith(("   Ordered", "*** ", "Random"))]
    return "\n".join(keep)


# VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's RSS at fork (this process's).
_MEMORY_PROBE = """
import os, re, resource, sys
os.environ["TOKENIZERS_PARALLELISM"] = "false"
from megatron_ext.data.chunks import encode_documents
from megatron_ext.data.tokenizer import load_tokenizer
def hwm():
    with open("/proc/self/status") as status:
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", status.read()).group(1)) * 1024
def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
tok = load_tokenizer(sys.argv[1])
text = open(sys.argv[2], encoding="utf-8").read()
before, start = hwm(), cpu()
ids = tok.encode_batch([text])[0] if sys.argv[3] == "whole" else encode_documents(tok, [text])[0]
print(len(ids), hwm() - before, cpu() - start)
"""


def document_memory(tokenizer: str, corpus: list[str], mb: float, tmp: str) -> list[dict]:
    """Peak memory the tokenizer adds for one document of ``mb`` MB (corpus text repeated),
    encoded whole (what preprocessing did) and in pieces (``encode_documents``): each in its own
    process, VmHWM after minus before (the document itself is read before)."""
    english = next(path for path in corpus if os.path.basename(path).startswith("en_"))
    with open(english, encoding="utf-8") as handle:
        block = "\n".join(line for line in handle.read().splitlines() if line.strip()) + "\n"
    path = os.path.join(tmp, "document.txt")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write((block * int(mb * 1e6 // len(block) + 1))[: int(mb * 1e6)])
    rows = []
    for how in ("whole", "pieces"):
        out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, tokenizer, path, how],
                             capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONPATH": REPO}).stdout.split()
        rows.append({"how": how, "mb": mb, "tokens": int(out[0]), "peak": int(out[1]),
                     "cpu": float(out[2])})
    return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--jsonl-mb", type=float, default=64.0,
                        help="size of the generated JSONL input in MB (0: skip it)")
    parser.add_argument("--cache-dir", default=".cache/demo", help="demo data cache")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per demo-corpus case, the best counts (the JSONL runs once)")
    parser.add_argument("--before", metavar="REV",
                        help="also run megatron_ext/data/preprocess.py of this git revision")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile the main process (2 workers, generated JSONL)")
    parser.add_argument("--document-mb", type=float, default=0.0, metavar="MB",
                        help="also measure the peak memory of tokenizing one document this "
                             "large, whole and in pieces (0: skip)")
    return parser.parse_args(argv)


def _cases(corpus: list[str], tmp: str, jsonl_mb: float) -> list[tuple[str, list[str], str]]:
    cases = [("demo corpus (.txt, lines)", corpus, "lines")]
    if jsonl_mb > 0:
        jsonl = os.path.join(tmp, "generated.jsonl")
        write_jsonl(corpus, jsonl, int(jsonl_mb * 1e6))
        with open(jsonl, "rb") as src, gzip.open(jsonl + ".gz", "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst)
        cases += [("generated .jsonl", [jsonl], "blocks"),
                  ("generated .jsonl.gz", [jsonl + ".gz"], "blocks")]
    return cases


def run_all(args: argparse.Namespace, tokenizer: str, corpus: list[str], tmp: str) -> tuple:
    from megatron_ext.data.preprocess import preprocess

    versions = {"after": preprocess}
    if args.before:
        versions = {"before": load_before(args.before, tmp), **versions}
    warm = os.path.join(tmp, "warm-up.txt")
    with open(warm, "w", encoding="utf-8") as handle:
        handle.write("a first document\n\nand a second\n")
    for run in versions.values():  # imports (megatron-core: seconds) are not measured
        run([warm], os.path.join(tmp, "warm-up"), tokenizer, workers=2)
    rows = []
    cases = _cases(corpus, tmp, args.jsonl_mb)
    for name, inputs, mode in cases:
        repeat = args.repeat if name.startswith("demo") else 1
        for workers in args.workers:
            for version, run in versions.items():
                out = os.path.join(tmp, f"bench_{version}")
                best = min((measure(run, inputs, tokenizer, workers, out, mode)
                            for _ in range(repeat)), key=lambda r: r["wall"])
                rows.append((name, version, best))
    profiles = {}
    if args.profile and args.jsonl_mb > 0:
        for version, run in versions.items():
            profiles[version] = profile_main(run, cases[1][1], tokenizer,
                                             os.path.join(tmp, "bench_profile"))
    memory = document_memory(tokenizer, corpus, args.document_mb, tmp) if args.document_mb else []
    return rows, profiles, memory


def print_report(args: argparse.Namespace, argv: Sequence[str] | None, rows: list,
                 profiles: dict, memory: list, load: tuple[float, float]) -> None:
    command = shlex.join(["python", "tools/bench/preprocess_throughput.py",
                          *(argv if argv is not None else sys.argv[1:])])
    print("## Data preprocessing throughput\n")
    print(f"- device: {cpu_model()}, {os.cpu_count()} cores, shared with other jobs "
          f"(1-min load average {load[0]:.1f} at start, {load[1]:.1f} at end); "
          f"demo corpus rows: best of {args.repeat} runs")
    print(f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    print(f"- command: `{command}`")
    print("- tokenizer: demo byte-level BPE, vocab 4096; --append-eod; tokens/s = tokens / wall "
          "time of preprocess(); CPU-s = main + worker CPU time (getrusage); main share = main "
          "CPU / all CPU; load = 1-min load average at the run's start -> end")
    print()
    print("| input | MB | code | workers | tokens | wall s | tokens/s | CPU-s (main + workers) "
          "| tokens/CPU-s | main share | load | output |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for name, version, r in rows:
        print(f"| {name} | {r['mb']:.1f} | {version} | {r['workers']} | {r['tokens']:,} | "
              f"{r['wall']:.2f} | {r['tokens_per_s']:,.0f} | {r['main_cpu']:.2f} + "
              f"{r['worker_cpu']:.2f} | {r['tokens_per_cpu_s']:,.0f} | "
              f"{100 * r['main_share']:.1f}% | {r['load'][0]:.1f} -> {r['load'][1]:.1f} | "
              f"`{r['digest']}` |")
    if args.before:
        print("\nafter / before, same input and workers (tokens per CPU-second; main share):\n")
        before = {(n, r["workers"]): r for n, v, r in rows if v == "before"}
        for name, version, r in rows:
            b = before.get((name, r["workers"]))
            if version == "after" and b:
                print(f"- {name}, {r['workers']} worker(s): "
                      f"{r['tokens_per_cpu_s'] / b['tokens_per_cpu_s']:.2f}x tokens/CPU-s, "
                      f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}x tokens/s, main share "
                      f"{100 * b['main_share']:.1f}% -> {100 * r['main_share']:.1f}%, "
                      f"same output: {r['digest'] == b['digest']}")
    for version, text in profiles.items():
        print(f"\ncProfile of the main process, {version}, generated .jsonl, 2 workers:\n")
        print("```\n" + text + "\n```")
    if memory:
        print(f"\nOne {args.document_mb:g} MB document (English corpus text repeated), "
              "tokenizer's added peak RSS:\n")
        print("| encoded | tokens | added peak RSS | bytes per document byte | CPU s |")
        print("|---|---:|---:|---:|---:|")
        for m in memory:
            print(f"| {m['how']} | {m['tokens']:,} | {m['peak'] / 1e9:.2f} GB | "
                  f"{m['peak'] / (m['mb'] * 1e6):.0f} | {m['cpu']:.1f} |")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from megatron_ext.data.demo import corpus_files, ensure_demo_data

    tokenizer, _ = ensure_demo_data(args.cache_dir)
    corpus = corpus_files()
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="preprocess_bench_") as tmp:
        rows, profiles, memory = run_all(args, tokenizer, corpus, tmp)
    print_report(args, argv, rows, profiles, memory, (load_start, os.getloadavg()[0]))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
