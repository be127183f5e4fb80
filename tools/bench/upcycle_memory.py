"""Peak memory and wall time of tools/convert/upcycle.py at the 8x1.5B shape (paper, table 2).

Generates a random dense Llama checkpoint (hidden 2048, 24 layers, 16 / 8 heads, d_ff 7168,
vocab 48640, bf16, sharded safetensors) tensor by tensor in a temp dir, upcycles it (drop, r=0.5,
8 experts, --skip-validation) in a subprocess while polling the RSS of the process tree, prints
the figures, appends them to docs/benchmarks.md under "## Upcycling memory" and deletes
everything. Needs ~22 GB of free disk at full size; --layers N scales down (recorded as such).
"""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

from megatron_ext.conversion.hf_io import write_hf_checkpoint
from megatron_ext.conversion.keymaps import Arch, hf_config_for, hf_shapes
from megatron_ext.platform.cli import ArgumentParser, run_cli

ROOT = Path(__file__).resolve().parents[2]

SECTION = "## Upcycling memory"
TARGET_GB = 3.0


def dense_arch(layers: int) -> Arch:
    return Arch(num_layers=layers, hidden_size=2048, num_heads=16, num_kv_heads=8, head_dim=128,
                ffn_hidden_size=7168, vocab_size=48640)


def make_dense(path: Path, arch: Arch, max_shard_size: int) -> int:
    """Random bf16 Llama written shard by shard: one tensor in memory at a time."""
    g = torch.Generator().manual_seed(0)
    shapes = hf_shapes(arch)
    layout = [(n, s, torch.bfloat16) for n, s in shapes.items()]

    def tensors():
        for name, shape in shapes.items():
            if name.endswith("norm.weight"):
                yield name, torch.ones(shape, dtype=torch.bfloat16)
            else:
                yield name, (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)

    path.mkdir(parents=True)
    write_hf_checkpoint(path, tensors(), layout, hf_config_for(arch), max_shard_size)
    return sum(f.stat().st_size for f in path.iterdir())


# A bare Python parent for the measured command: ru_maxrss of a forked child starts from its
# parent's RSS at fork time, so forking the CLI straight from this (big) process would inflate it.
_WRAPPER = ("import resource, subprocess, sys\n"
            "rc = subprocess.call(sys.argv[2:])\n"
            "kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
            "open(sys.argv[1], 'w').write(str(kib))\n"
            "sys.exit(rc)\n")


def run_measured(cmd: list[str], poll_s: float = 0.05) -> tuple[int, float, int, int, float]:
    """(returncode, wall seconds, peak summed RSS of the tree by polling, the command's ru_maxrss
    in bytes, mean 1-minute load average: a shared machine stretches the wall time)."""
    with tempfile.NamedTemporaryFile(suffix=".maxrss") as rss_file:
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-c", _WRAPPER, rss_file.name, *cmd],
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        root = psutil.Process(proc.pid)
        peak, loads = 0, []
        while proc.poll() is None:
            loads.append(os.getloadavg()[0])
            try:
                procs = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in procs))
            except psutil.NoSuchProcess:
                pass
            time.sleep(poll_s)
        wall = time.monotonic() - start
        text = Path(rss_file.name).read_text().strip()
    maxrss = int(text) * 1024 if text else 0  # KiB on Linux
    return proc.returncode, wall, peak, maxrss, sum(loads) / max(1, len(loads))


def pick_workdir(need_bytes: int, requested: Path | None) -> Path:
    candidates = [requested] if requested else [Path(tempfile.gettempdir()), ROOT]
    for base in candidates:
        if shutil.disk_usage(base).free > need_bytes * 1.1:
            return base
    raise SystemExit(f"upcycle_memory: need {need_bytes / 1e9:.0f} GB free in one of "
                     f"{', '.join(map(str, candidates))}")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def record(docs: Path, entry: str) -> None:
    """Append ``entry`` at the end of the "## Upcycling memory" section (created if absent)."""
    text = docs.read_text() if docs.exists() else "# Benchmarks\n"
    if SECTION not in text:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n"
    head, _, rest = text.partition(SECTION)
    nxt = rest.find("\n## ")
    body, tail = (rest, "") if nxt < 0 else (rest[:nxt], rest[nxt:])
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(head + SECTION + body.rstrip("\n") + "\n\n" + entry.rstrip("\n") + "\n" + tail)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=24, help="scale down (full size: 24)")
    p.add_argument("--workdir", type=Path, default=None, help="where the temp checkpoints go")
    p.add_argument("--max-shard-size", default="2GB")
    p.add_argument("--no-record", action="store_true", help="do not append to docs/benchmarks.md")
    args = p.parse_args(argv)

    arch = dense_arch(args.layers)
    dense_params = sum(torch.Size(s).numel() for s in hf_shapes(arch).values())
    moe_arch = Arch(**{**arch.__dict__, "num_experts": 8, "moe_layers": range(args.layers)})
    moe_params = sum(torch.Size(s).numel() for s in hf_shapes(moe_arch).values())
    base = pick_workdir(2 * (dense_params + moe_params), args.workdir)
    tmp = Path(tempfile.mkdtemp(prefix="upcycle_bench_", dir=base))
    try:
        print(f"generating dense {dense_params / 1e9:.2f}B params in {tmp} ...", flush=True)
        t0 = time.monotonic()
        from megatron_ext.conversion.hf_io import parse_size

        dense_bytes = make_dense(tmp / "dense", arch, parse_size(args.max_shard_size))
        print(f"  {dense_bytes / 1e9:.2f} GB in {time.monotonic() - t0:.0f}s", flush=True)
        cli = ["tools/convert/upcycle.py", "--input", str(tmp / "dense"), "--output",
               str(tmp / "moe"), "--method", "drop", "--ratio", "0.5", "--num-experts", "8",
               "--top-k", "2", "--seed", "1234", "--skip-validation",
               "--max-shard-size", args.max_shard_size]
        rc, wall, peak, maxrss, load = run_measured([sys.executable, str(ROOT / cli[0]), *cli[1:]])
        if rc != 0:
            print(f"upcycle_memory: the upcycle CLI failed (exit {rc})", file=sys.stderr)
            return 1
        moe_bytes = sum(f.stat().st_size for f in (tmp / "moe").iterdir())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    worst = max(peak, maxrss) / 1e9
    verdict = "under" if worst < TARGET_GB else "OVER"
    scale = "full size" if args.layers == 24 else f"SCALED DOWN to {args.layers} of 24 layers"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = [
        f"### {datetime.date.today().isoformat()}: drop r=0.5, 8 experts, 8x1.5B shape ({scale})",
        "",
        f"- device: {cpu_model()}, {cores} cores (shared), no GPU; torch {torch.__version__}; "
        f"Python {platform.python_version()}",
        f"- input: random dense Llama, {dense_params / 1e9:.2f}B params, "
        f"{dense_bytes / 1e9:.2f} GB bf16 safetensors; output {moe_params / 1e9:.2f}B params, "
        f"{moe_bytes / 1e9:.2f} GB in {args.max_shard_size} shards",
        f"- command: `PYTHONPATH=. python {' '.join(cli).replace(str(tmp), '$TMP')}`",
        f"- bench: `python tools/bench/upcycle_memory.py --layers {args.layers}`",
        f"- peak RSS: {peak / 1e9:.2f} GB (psutil, process tree, 50 ms polling); "
        f"ru_maxrss {maxrss / 1e9:.2f} GB; target < {TARGET_GB:.0f} GB: {verdict}",
        f"- wall time: {wall:.0f} s (mean 1-min load average {load:.1f} on {cores} cores: "
        "other jobs share the machine, so this is an upper bound)",
    ]
    entry = "\n".join(lines)
    print(entry)
    if not args.no_record:
        record(ROOT / "docs" / "benchmarks.md", entry)
        print(f"recorded in {ROOT / 'docs' / 'benchmarks.md'}")
    return 0 if worst < TARGET_GB else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
