"""Training-step throughput: our megatron-core model vs transformers Mixtral vs megatron's plain
local spec, same shapes, one process, one device (see tools/bench/README.md).

Example (H100):
  python tools/bench/throughput.py --config configs/8x152M.yaml --seq 4096 --micro-batch 4 \\
      --out bench_out/8x152M --profile
CPU smoke run (seconds):
  python tools/bench/throughput.py --config configs/tiny-cpu.yaml --set data.demo_corpus=false \\
      --set data.mock=true --layers 2 --seq 64 --micro-batch 2 --steps 2 --warmup 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_ext.platform.cli import ArgumentParser, run_cli
from megatron_ext.platform.quiet import quiet_process

quiet_process()  # before megatron is imported: its import-time notices are noise here

from benchlib.report import write_outputs  # noqa: E402
from benchlib.throughput import (  # noqa: E402
    VARIANTS,
    BenchOptions,
    run_benchmark,
    split_variant,
)


def parse_args(argv: list[str] | None = None) -> tuple[BenchOptions, Path | None]:
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (e.g. configs/8x152M.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="config override, repeatable")
    p.add_argument("--layers", type=int, default=None, help="override model.num_layers")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto = bf16 on GPU, fp32 on CPU")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="device peak for MFU (989 = H100 SXM dense bf16)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, run in this order: {','.join(VARIANTS)}, each "
                        "optionally with config overrides, e.g. ours+model.lm_loss=megatron")
    p.add_argument("--profile", action="store_true",
                   help="torch.profiler over a few steps of each variant without "
                        "+overrides: top-15 kernels")
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument("--profile-variants", default=None,
                   help="comma-separated variants to profile (default: those without "
                        "+overrides); a Chrome trace is kept for ours-based ones")
    p.add_argument("--out", type=Path, default=None,
                   help="directory for throughput.json / throughput.md (/ profile.md)")
    a = p.parse_args(argv)
    variants = tuple(v.strip() for v in a.variants.split(",") if v.strip())
    if not variants or len(set(variants)) != len(variants):
        p.error("--variants: none given, or one given twice")
    for v in variants:
        try:
            split_variant(v)
        except ValueError as e:
            p.error(f"--variants: {e}")
    profile_variants = None
    if a.profile_variants is not None:
        profile_variants = tuple(v.strip() for v in a.profile_variants.split(",") if v.strip())
        missing = [v for v in profile_variants if v not in variants]
        if missing:
            p.error(f"--profile-variants: not among --variants: {','.join(missing)}")
    if a.profile and a.out is None:
        p.error("--profile needs --out")
    if min(a.steps, a.micro_batch, a.seq) < 1 or a.warmup < 0:
        p.error("--steps, --micro-batch and --seq must be >= 1, --warmup >= 0")
    opts = BenchOptions(
        config=a.config, overrides=a.overrides, layers=a.layers, micro_batch=a.micro_batch,
        seq=a.seq, steps=a.steps, warmup=a.warmup, dtype=a.dtype, peak_tflops=a.peak_tflops,
        variants=variants, profile=a.profile, profile_steps=a.profile_steps,
        profile_variants=profile_variants,
    )
    return opts, a.out


def main(argv: list[str] | None = None) -> int:
    opts, out = parse_args(argv)
    res = run_benchmark(opts, out)
    if out is not None:
        write_outputs(res, out)
        print(f"[bench] wrote {out / 'throughput.json'} and {out / 'throughput.md'}")
    print()
    for name, r in res["variants"].items():
        if r["status"] == "ok":
            print(f"{name:6s} {r['tokens_per_s']:>12,.0f} tokens/s  {r['model_tflops']:8.2f} "
                  f"TFLOP/s  MFU {100 * r['mfu']:5.1f}%  peak {r['peak_memory_gib']:.2f} GiB  "
                  f"activations {r['activations_gib']:.2f} GiB")
        else:
            print(f"{name:6s} FAILED: {r['error']}")
    # The ratios last: the line a reader (or a log tail) looks for.
    print("ratios: " + (", ".join(f"{k} = {v:.3f}" for k, v in res["ratios"].items()) or "n/a"))
    failed = [n for n, r in res["variants"].items() if r["status"] != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
