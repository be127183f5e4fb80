#!/usr/bin/env python3
"""Measure preprocessing throughput (tokens/s) on the demo corpus and a generated JSONL file.

Uses the demo tokenizer (byte-level BPE, vocab 4096, built by ensure_demo_data). Each run calls
megatron_ext.data.preprocess.preprocess in this process, so the timings cover reading, parsing,
tokenizing and writing .bin/.idx, not interpreter start-up or the megatron-core import (~4 s).
The generated JSONL (repeated corpus documents, one JSON object per line) lives in a temporary
directory that is deleted afterwards. Prints a Markdown section ready for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
from collections.abc import Sequence

from megatron_ext.platform.cli import ArgumentParser, run_cli


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


def measure(
    inputs: Sequence[str], tokenizer: str, workers: int, out_dir: str, mode: str, repeat: int
) -> dict:
    """Best of ``repeat`` runs: the machine is shared, the fastest run is the least disturbed."""
    from megatron_ext.data.preprocess import preprocess

    report = min(
        (preprocess(inputs, os.path.join(out_dir, f"bench_w{workers}"), tokenizer,
                    append_eod=True, workers=workers, txt_mode=mode) for _ in range(repeat)),
        key=lambda r: r.seconds,
    )
    size = sum(os.path.getsize(p) for p in inputs)
    return {
        "workers": workers, "documents": report.documents, "tokens": report.tokens,
        "seconds": report.seconds, "tokens_per_s": report.tokens_per_second,
        "mb_per_s": size / 1e6 / report.seconds, "mb": size / 1e6,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--jsonl-mb", type=float, default=200.0,
                        help="size of the generated JSONL input in MB (0: skip it)")
    parser.add_argument("--cache-dir", default=".cache/demo", help="demo data cache")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per demo-corpus case, the best counts (the JSONL runs once)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from megatron_ext.data.demo import corpus_files, ensure_demo_data

    tokenizer, _ = ensure_demo_data(args.cache_dir)
    corpus = corpus_files()
    load = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="preprocess_bench_") as tmp:
        for workers in args.workers:
            rows.append(("demo corpus (.txt, lines)", measure(corpus, tokenizer, workers, tmp,
                                                               "lines", args.repeat)))
        if args.jsonl_mb > 0:
            jsonl = os.path.join(tmp, "generated.jsonl")
            write_jsonl(corpus, jsonl, int(args.jsonl_mb * 1e6))
            for workers in args.workers:
                rows.append(("generated .jsonl", measure([jsonl], tokenizer, workers, tmp,
                                                         "blocks", 1)))
    script = "tools/bench/preprocess_throughput.py"
    command = shlex.join(["python", script, *(argv if argv is not None else sys.argv[1:])])
    print("## Data preprocessing throughput\n")
    print(f"- device: {cpu_model()}, {os.cpu_count()} cores, shared with other jobs "
          f"(1-min load average {load:.1f} at start, {os.getloadavg()[0]:.1f} at end); "
          f"demo corpus rows: best of {args.repeat} runs")
    print(f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}")
    print(f"- command: `{command}`")
    print("- tokenizer: demo byte-level BPE, vocab 4096; --append-eod; tokens/s = tokens / wall "
          "time of preprocess() (read + parse + tokenize + write), excluding interpreter start-up")
    print()
    print("| input | MB | workers | documents | tokens | seconds | tokens/s | MB/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows:
        print(f"| {name} | {r['mb']:.1f} | {r['workers']} | {r['documents']:,} | "
              f"{r['tokens']:,} | {r['seconds']:.2f} | {r['tokens_per_s']:,.0f} | "
              f"{r['mb_per_s']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
