"""Peak memory and write rate of tools/convert/upcycle.py at the papers' shapes (table 2).

Generates a random dense Llama checkpoint (8x1.5B: hidden 2048, 24 layers, 16 / 8 heads, d_ff
7168, vocab 48640; 8x3.7B: hidden 3072, 28 layers, 24 / 24 heads, d_ff 8192, vocab 99584; bf16,
sharded safetensors) tensor by tensor in a temp dir, upcycles it (drop, r=0.5, 8 experts, the
default validation unless --skip-validation) in a subprocess, and measures its peak memory
(ru_maxrss and polled VmHWM of the CLI process) and its write rate (output bytes over the time
from the first output file to the end), beside the disk's own rate: dd oflag=direct writing as
many bytes as the run into the same directory just before and just after it (a short burst
can read 2-3x the rate of a write this long on a virtual disk: caches in front of it), and
dd conv=fdatasync of 1 GiB; also the 1-minute load average, and the rate a single torch
generator allows (``generator_seconds``: the reference's draws are one sequential stream,
through the upcycler's ``fast_normal.normal_``).
--layers scales the model down (the output says so): memory is per layer, so measuring two
layer counts shows whether the peak grows with depth. Results are printed and appended to
docs/benchmarks.md under "## Upcycling memory"; everything generated is deleted.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from megatron_ext.conversion.hf_io import parse_size, write_hf_checkpoint
from megatron_ext.conversion.keymaps import Arch, hf_config_for, hf_shapes
from megatron_ext.platform.cli import ArgumentParser, run_cli
from megatron_ext.platform.direct_io import cached_share
from megatron_ext.upcycling import fast_normal

ROOT = Path(__file__).resolve().parents[2]

SECTION = "## Upcycling memory"
TARGET_GB = 3.0
SHAPES = {  # name: (hidden, layers, heads, kv heads, d_ff, vocab)
    "8x1.5B": (2048, 24, 16, 8, 7168, 48640),
    "8x3.7B": (3072, 28, 24, 24, 8192, 99584),
}


def dense_arch(layers: int | None, shape: str = "8x1.5B") -> Arch:
    hidden, full, heads, kv, d_ff, vocab = SHAPES[shape]
    return Arch(num_layers=layers or full, hidden_size=hidden, num_heads=heads, num_kv_heads=kv,
                head_dim=hidden // heads, ffn_hidden_size=d_ff, vocab_size=vocab)


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


@dataclass
class Measured:
    rc: int
    wall: float
    """Seconds of the whole CLI, interpreter start and imports included."""
    writing: float
    """Seconds from the first output file to the end: what the write rate is judged over."""
    tree_rss: int
    """Peak summed RSS of the process tree (polled)."""
    maxrss: int
    """ru_maxrss of the CLI process (exact)."""
    vmhwm: int
    """VmHWM of the CLI process, last polled value (the kernel's own high-water mark)."""
    load: float
    """Mean 1-minute load average during the run."""
    logit_check: str
    """Whether the CLI ran the full-model logit check ("ran", "skipped" or "-")."""


def _vmhwm(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    m = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(m.group(1)) * 1024 if m else 0


def run_measured(cmd: list[str], out_parent: Path, poll_s: float = 0.05) -> Measured:
    """Run ``cmd`` under the bare wrapper and measure it (``Measured``); the write clock starts
    when a .safetensors file first appears in the staging dir under ``out_parent``."""
    with tempfile.NamedTemporaryFile(suffix=".maxrss") as rss_file, \
            tempfile.TemporaryFile("w+") as stdout:
        start = time.monotonic()
        first_file = None
        proc = subprocess.Popen([sys.executable, "-c", _WRAPPER, rss_file.name, *cmd],
                                env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=stdout)
        root = psutil.Process(proc.pid)
        peak, hwm, loads = 0, 0, []
        while proc.poll() is None:
            loads.append(os.getloadavg()[0])
            try:
                procs = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in procs))
                hwm = max([hwm] + [_vmhwm(p.pid) for p in procs[1:]])
            except psutil.NoSuchProcess:
                pass
            if first_file is None and any(out_parent.glob(".*/*.safetensors")):
                first_file = time.monotonic()
            time.sleep(poll_s)
        end = time.monotonic()
        text = Path(rss_file.name).read_text().strip()
        stdout.seek(0)
        said = stdout.read()
    print(said, end="")
    logit = ("skipped" if "logit check skipped" in said else
             "ran" if "max |logit diff|" in said else "-")
    maxrss = int(text) * 1024 if text else 0  # KiB on Linux
    return Measured(proc.returncode, end - start, end - (first_file or start), peak, maxrss, hwm,
                    sum(loads) / max(1, len(loads)), logit)


def disk_rate(directory: Path, mode: str, nbytes: int = 2**30) -> float:
    """Bytes/s of dd writing ``nbytes`` (whole 16 MiB blocks, at least one) into ``directory``
    (mode: oflag=direct or conv=fdatasync)."""
    target = directory / "dd.tmp"
    count = max(1, nbytes // 2**24)
    try:
        r = subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=16M", f"count={count}",
                            mode], capture_output=True, text=True, check=True)
    finally:
        target.unlink(missing_ok=True)
    m = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", r.stderr)
    return int(m.group(1)) / float(m.group(2))


def generator_seconds(arch: Arch, experts: int = 8, ratio: float = 0.5, repeats: int = 3) -> float:
    """Seconds one torch generator takes to draw one MoE layer's drop samples here through the
    upcycler's ``fast_normal.normal_`` (best of ``repeats``): the reference's stream comes from
    a single generator in a fixed order, so no upcycle of a seed can make a layer's experts
    faster than this, however many cores it has."""
    k = math.floor(ratio * arch.ffn_hidden_size)
    samples = torch.empty(k * arch.hidden_size)
    g = torch.Generator().manual_seed(0)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(3 * experts):  # gate, down, up of each expert
            fast_normal.normal_(samples, 0.0, 0.02, g)
        best = min(best, time.perf_counter() - start)
    return best


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


def measure(tmp: Path, shape: str, layers: int, mode: str, max_shard: str,
            out_bytes: int) -> tuple[list, str]:
    """One mode ("default" or "skip") on the dense model in ``tmp``, whose output is about
    ``out_bytes``: (runs, command). A run's disk rate is the mean of dd's before and after."""
    cli = ["tools/convert/upcycle.py", "--input", str(tmp / "dense"), "--output",
           str(tmp / "moe"), "--method", "drop", "--ratio", "0.5", "--num-experts", "8",
           "--top-k", "2", "--seed", "1234", "--max-shard-size", max_shard]
    if mode == "skip":
        cli.append("--skip-validation")
    runs = []
    for _ in range(measure.repeats):
        synced = disk_rate(tmp, "conv=fdatasync")
        before = disk_rate(tmp, "oflag=direct", out_bytes)
        cached = input_cached(tmp / "dense")
        m = run_measured([sys.executable, str(ROOT / cli[0]), *cli[1:]], tmp)
        if m.rc != 0:
            raise SystemExit(f"upcycle_memory: the upcycle CLI failed (exit {m.rc})")
        out_bytes = sum(f.stat().st_size for f in (tmp / "moe").iterdir())
        shutil.rmtree(tmp / "moe")  # first: the disk holds the dense model and one of the two
        after = disk_rate(tmp, "oflag=direct", out_bytes)
        direct = (before + after) / 2
        runs.append((m, out_bytes / m.writing, direct, synced, out_bytes, before, after, cached))
        print(f"  {shape} {layers} layers {mode}: {out_bytes / m.writing / 1e6:.0f} MB/s "
              f"= {out_bytes / m.writing / direct:.2f}x dd (oflag=direct of as many bytes: "
              f"{before / 1e6:.0f} before, {after / 1e6:.0f} after; fdatasync 1 GiB "
              f"{synced / 1e6:.0f} MB/s), ru_maxrss {m.maxrss / 1e9:.2f} GB, load {m.load:.1f}, "
              f"input {cached:.0%} in the page cache", flush=True)
    return runs, " ".join(cli).replace(str(tmp), "$TMP")


measure.repeats = 3


def input_cached(dense: Path) -> float:
    """The share of the dense model's bytes in the page cache: a run that finds it cold (the
    first, since ``make_dense`` writes with O_DIRECT) reads all of it from the disk it writes to."""
    files = sorted(dense.glob("*.safetensors"))
    total = sum(f.stat().st_size for f in files)
    return sum(cached_share(f) * f.stat().st_size for f in files) / max(1, total)


def git_rev() -> str:
    r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                       capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", "HEAD"]).returncode
    return (r.stdout.strip() or "unknown") + (" + local changes" if dirty else "")


def entry(shape: str, layers: int, full: int, results: dict, dense_bytes: int, sizes: tuple,
          argv: list[str], draw_s: float, load_before: float) -> str:
    """The docs/benchmarks.md section for one model (every mode and run, then the ratios)."""
    dense_params, moe_params = sizes
    scale = "full depth" if layers == full else f"SCALED to {layers} of {full} layers"
    cores = len(os.sched_getaffinity(0))
    out_bytes = next(iter(results.values()))[0][0][4]  # the same bytes in every mode
    now = datetime.datetime.now(datetime.UTC)
    lines = [
        f"### {now:%Y-%m-%d %H:%M} UTC: drop r=0.5, 8 experts, {shape} shape "
        f"({scale}; {git_rev()})",
        "",
        f"- machine: {cpu_model()}, {cores} cores (1-minute load {load_before:.1f} before the "
        f"first run), {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, no GPU; "
        f"torch {torch.__version__}",
        f"- input: random dense Llama, {dense_params / 1e9:.2f}B params, "
        f"{dense_bytes / 1e9:.2f} GB bf16; output {moe_params / 1e9:.2f}B params, "
        f"{out_bytes / 1e9:.2f} GB",
        f"- bench: `PYTHONPATH=. python tools/bench/upcycle_memory.py {' '.join(argv)}`",
    ]
    for mode, (_, cmd) in results.items():
        lines.append(f"- {mode} command: `PYTHONPATH=. python {cmd}`")
    lines += ["", "dd oflag=direct writes as many bytes as the run, just before and just after "
              "it; the ratio is to their mean.", "",
              "| mode | run | input in page cache | load (1 min) | dd direct MB/s before / after | "
              "dd fdatasync 1 GiB MB/s | upcycle MB/s (first file to end) | x dd | wall s | "
              "ru_maxrss GB | VmHWM GB | tree RSS GB | full-model logit check |",
              "|---" * 13 + "|"]
    for mode, (runs, _) in results.items():
        for i, (m, rate, direct, synced, _, before, after, cached) in enumerate(runs, 1):
            lines.append(f"| {mode} | {i} | {cached:.0%} | {m.load:.1f} | {before / 1e6:.0f} / "
                         f"{after / 1e6:.0f} | {synced / 1e6:.0f} | {rate / 1e6:.0f} | "
                         f"{rate / direct:.2f} | {m.wall:.0f} | "
                         f"{m.maxrss / 1e9:.2f} | {m.vmhwm / 1e9:.2f} | {m.tree_rss / 1e9:.2f} | "
                         f"{m.logit_check} |")
    lines.append("")
    for mode, (runs, _) in results.items():
        peak = max(max(r[0].maxrss, r[0].vmhwm) for r in runs)
        rates, ratios = [r[1] for r in runs], [r[1] / r[2] for r in runs]
        lines.append(
            f"- {mode}: peak {peak / 1e9:.2f} GB ({peak / 1e9 / TARGET_GB:.2f}x the "
            f"{TARGET_GB:.0f} GB target); write rate {min(rates) / 1e6:.0f}-"
            f"{max(rates) / 1e6:.0f} MB/s = {min(ratios):.2f}-{max(ratios):.2f}x the same "
            f"runs' dd oflag=direct of as many bytes (mean of before and after), "
            f"{min(r[1] / r[3] for r in runs):.2f}-{max(r[1] / r[3] for r in runs):.2f}x "
            f"dd conv=fdatasync of 1 GiB")
    bound = out_bytes / (layers * draw_s)
    lines.append(f"- the generator's bound: one layer's drop samples take {draw_s:.2f} s from one "
                 f"generator here (`generator_seconds`, best of 3; {fast_normal.backend()}), so no "
                 f"upcycle of a seed can write this model faster than {bound / 1e6:.0f} MB/s")
    for mode, (runs, _) in results.items():
        best = max(runs, key=lambda r: r[1])
        lines.append(f"  - {mode}: best run {best[1] / bound:.2f}x that bound; the bound is "
                     f"{bound / best[2]:.2f}x that run's dd oflag=direct")
    if {"default", "skip"} <= results.keys():
        peaks = {mode: max(max(r[0].maxrss, r[0].vmhwm) for r in runs)
                 for mode, (runs, _) in results.items()}
        rates = {mode: max(r[1] for r in runs) for mode, (runs, _) in results.items()}
        lines.append(f"- default vs --skip-validation: peak "
                     f"{peaks['default'] / peaks['skip']:.2f}x, write rate "
                     f"{rates['default'] / rates['skip']:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=SHAPES, default="8x3.7B")
    p.add_argument("--layers", type=int, nargs="+", default=[0],
                   help="layer counts to measure (0: the shape's full depth)")
    p.add_argument("--modes", nargs="+", choices=("default", "skip"), default=["default", "skip"],
                   help="default: the validated path; skip: --skip-validation")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=None, help="where the temp checkpoints go")
    p.add_argument("--max-shard-size", default="2GB")
    p.add_argument("--no-record", action="store_true", help="do not append to docs/benchmarks.md")
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    measure.repeats = args.repeats
    worst = 0.0
    for layers in args.layers:
        arch = dense_arch(layers or None, args.shape)
        full = SHAPES[args.shape][1]
        dense_params = sum(torch.Size(s).numel() for s in hf_shapes(arch).values())
        moe_arch = Arch(**{**arch.__dict__, "num_experts": 8,
                           "moe_layers": range(arch.num_layers)})
        moe_params = sum(torch.Size(s).numel() for s in hf_shapes(moe_arch).values())
        base = pick_workdir(2 * (dense_params + moe_params) + 2**30, args.workdir)
        tmp = Path(tempfile.mkdtemp(prefix="upcycle_bench_", dir=base))
        try:
            print(f"generating dense {args.shape}, {arch.num_layers} layers, "
                  f"{dense_params / 1e9:.2f}B params in {tmp} ...", flush=True)
            dense_bytes = make_dense(tmp / "dense", arch, parse_size(args.max_shard_size))
            draw_s = generator_seconds(arch)
            load_before = os.getloadavg()[0]
            results = {mode: measure(tmp, args.shape, arch.num_layers, mode, args.max_shard_size,
                                     2 * moe_params) for mode in args.modes}
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        text = entry(args.shape, arch.num_layers, full, results, dense_bytes,
                     (dense_params, moe_params), argv, draw_s, load_before)
        print(text)
        if "default" in results:
            worst = max(worst, *(max(r[0].maxrss, r[0].vmhwm) / 1e9
                                 for r in results["default"][0]))
        if not args.no_record:
            record(ROOT / "docs" / "benchmarks.md", text)
            print(f"recorded in {ROOT / 'docs' / 'benchmarks.md'}")
    return 0 if worst < TARGET_GB else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
