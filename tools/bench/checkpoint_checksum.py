"""What checkpoint checksums cost: xxh3-128 (ours) vs sha256 throughput, and their share of a real
save and of a resume's verification.

1. Hashes a synthetic ``--size`` file (random bytes, page-cached: the hash's own speed, which is
   what a writer pays when it re-reads the file it just wrote) with ``manifest.file_sum``'s
   chunked loop, once per algorithm after a warm-up read.
2. Runs a tiny ``pretrain_moe.py`` save (``--config``, mock data, 2 steps, a save after each)
   and reports the save time training waited for, the time to hash every file of the checkpoint
   (what the writers and rank 0 add to a save) and the time of ``manifest.check`` (what each
   resume or ``checkpoint.load`` adds: a full read).

Prints a Markdown section for docs/benchmarks.md.
  python tools/bench/checkpoint_checksum.py --size 1GiB
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchlib import runs
from benchlib.report import device_name

from megatron_ext.checkpoint import manifest
from megatron_ext.conversion.hf_io import parse_size
from megatron_ext.conversion.keymaps import ConversionError
from megatron_ext.platform.cli import ArgumentParser, run_cli

ROOT = Path(__file__).resolve().parents[2]

CHUNK = 8 << 20  # the chunk manifest.file_sum reads


def _sha256(path: Path) -> str:
    """sha256 with manifest.file_sum's read loop."""
    h, buf = hashlib.sha256(), bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _xxh3(path: Path) -> str:
    return manifest.file_sum(path)[manifest.ALGO]


def hash_speeds(work: Path, size: int) -> dict[str, float]:
    """GB/s of each hash over a page-cached ``size``-byte file of random bytes."""
    data = work / "synthetic.bin"
    with open(data, "wb") as f:
        for left in range(size, 0, -(64 << 20)):
            f.write(os.urandom(min(left, 64 << 20)))
    _sha256(data)  # warm-up: the file is in the page cache for both timed reads
    speeds = {}
    for name, fn in ((manifest.ALGO, _xxh3), ("sha256", _sha256)):
        t = time.perf_counter()
        fn(data)
        speeds[name] = size / (time.perf_counter() - t) / 1e9
    data.unlink()
    return speeds


def tiny_save(config: str, work: Path) -> dict[str, float]:
    """Save time of a real run, and the hash / verification time of its checkpoint."""
    args = [sys.executable, str(ROOT / "pretrain_moe.py"), "--config", config,
            "--set", "data.demo_corpus=false", "--set", "data.mock=true",
            "--set", "train.eval_interval=0", "--set", "train.log_interval=1",
            "--set", "logging.wandb.mode=disabled", "--set", "train.train_steps=2",
            "--set", "train.train_tokens=null", "--set", "schedule.warmup_steps=0",
            "--set", "checkpoint.save_interval=1", "--set", f"checkpoint.save={work / 'ckpt'}",
            "--set", f"logging.output_dir={work / 'run'}"]
    records = runs.train(args, work / "run", "training run")
    save_s = next(r["time/save_s"] for r in records if r["kind"] == "train" and r["step"] == 2)
    ckpt = work / "ckpt" / "iter_0000002"
    files = [p for p in ckpt.rglob("*") if p.is_file() and p.name != "meta.json"]
    t = time.perf_counter()
    for p in files:
        manifest.file_sum(p)
    hash_s = time.perf_counter() - t
    t = time.perf_counter()
    manifest.check(ckpt, manifest.read(ckpt, 2), checksums=True)
    check_s = time.perf_counter() - t
    return {"size_mb": sum(p.stat().st_size for p in files) / 1e6, "save_s": save_s,
            "hash_s": hash_s, "check_s": check_s}


def render(speeds: dict[str, float], size: int, save: dict[str, float], config: str,
           cmd: str) -> str:
    lines = [f"Device: {device_name()}, {os.cpu_count()} cores. Command: `{cmd}`.", "",
             f"| hash | GB/s ({size / 2**30:.3g} GiB file, page-cached, one core) |", "|---|---|"]
    lines += [f"| {name} | {gbs:.2f} |" for name, gbs in speeds.items()]
    lines += ["", "| save of | checkpoint MB | save (training waited), s | hashing its files, s "
              "| verification (`manifest.check`), s |", "|---|---|---|---|---|",
              f"| `{config}` | {save['size_mb']:.1f} | {save['save_s']:.3f} | "
              f"{save['hash_s']:.4f} ({100 * save['hash_s'] / save['save_s']:.1f}% of the save) | "
              f"{save['check_s']:.4f} |"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1GiB", help="synthetic file size, e.g. 1GiB, 64MB")
    p.add_argument("--config", default="configs/tiny-cpu.yaml", help="config of the tiny save")
    p.add_argument("--out", type=Path, default=None,
                   help="work directory (default: a temporary one, deleted afterwards)")
    a = p.parse_args(argv)
    try:
        size = parse_size(a.size)
    except ConversionError as e:
        print(f"error: --size: {e}", file=sys.stderr)
        return 2
    if not Path(a.config).is_file():
        print(f"error: config not found: {a.config}", file=sys.stderr)
        return 2
    work = a.out or Path(tempfile.mkdtemp(prefix="ckpt_checksum_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        speeds = hash_speeds(work, size)
        save = tiny_save(a.config, work)
    finally:
        if a.out is None:
            shutil.rmtree(work, ignore_errors=True)
    cmd = " ".join(["python", "tools/bench/checkpoint_checksum.py", *(argv or sys.argv[1:])])
    print(render(speeds, size, save, a.config, cmd))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
