"""Benchmark plumbing: environment facts, memory peaks, the profiler table, JSON/Markdown output."""

from __future__ import annotations

import dataclasses
import datetime
import gzip
import json
import platform
import resource
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megatron_ext.config.schema import Config

# ---- environment -------------------------------------------------------------------------


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.cuda.current_device())
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()}"


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - absent package: say so in the report
        return "not installed"


def environment(cfg: Config, opts: Any, flops_per_token: float) -> dict[str, Any]:
    m, moe = cfg.model, cfg.moe
    return {
        "device": device_name(),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "megatron_core": _version("megatron-core"), "transformers": _version("transformers"),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "cpu_threads": torch.get_num_threads(),
        "options": dataclasses.asdict(opts),
        "dtype": cfg.train.precision,
        "shape": {
            "layers": m.num_layers, "hidden": m.hidden_size, "heads": m.num_attention_heads,
            "kv_heads": m.num_kv_heads or m.num_attention_heads, "ffn": m.ffn_hidden_size,
            "experts": moe.num_experts, "top_k": moe.top_k, "vocab": m.vocab_size,
            "seq": cfg.data.seq_length, "micro_batch": cfg.train.micro_batch_size,
        },
        "flops_per_token": flops_per_token,
        "peak_tflops": opts.peak_tflops,
    }


# ---- memory ------------------------------------------------------------------------------


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    # Linux resets the process's peak RSS (VmHWM, which ru_maxrss reports) on "5"; without it
    # the CPU peak is cumulative over the variants measured so far.
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def allocated_gib() -> float:
    return torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def peak_memory_gib() -> dict[str, Any]:
    if torch.cuda.is_available():
        return {"gib": torch.cuda.max_memory_allocated() / 2**30,
                "kind": "torch.cuda.max_memory_allocated"}
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"gib": kib / 2**20, "kind": "ru_maxrss (process peak RSS, reset per variant)"}


# ---- profiler ----------------------------------------------------------------------------


def _self_time_us(evt: Any, cuda: bool) -> float:
    if not cuda:
        return float(evt.self_cpu_time_total)
    # torch >= 2.4 names it "device"; older releases "cuda".
    return float(getattr(evt, "self_device_time_total", None)
                 or getattr(evt, "self_cuda_time_total", 0.0))


def kernel_table(events: Any, cuda: bool, steps: int, top: int = 15,
                 wall_ms_per_step: float = 0.0) -> str:
    """Top ops by self time (device kernels on GPU, CPU ops on CPU) as a Markdown table."""
    if cuda:
        # Kernels, copies and memsets only: a CPU op's "self device time" is its kernels'
        # time again, and counting both lists every kernel twice.
        from torch.autograd import DeviceType

        # GPU-side annotations (Optimizer.step#..., record_function ranges) span kernels too.
        events = [e for e in events if getattr(e, "device_type", None) == DeviceType.CUDA
                  and not getattr(e, "is_user_annotation", False) and "#" not in e.key]
    rows = [(e.key, e.count, _self_time_us(e, cuda)) for e in events]
    # ProfilerStep# spans the whole step on the CPU: a wrapper, not an op.
    rows = [r for r in rows if r[2] > 0 and not r[0].startswith("ProfilerStep")]
    total = sum(r[2] for r in rows) or 1.0
    rows.sort(key=lambda r: r[2], reverse=True)
    what = "self CUDA time" if cuda else "self CPU time"
    per_step = total / 1e3 / max(steps, 1)
    busy = ""
    if cuda and wall_ms_per_step:
        busy = (f"; wall {wall_ms_per_step:.1f} ms per profiled step, so the device is idle "
                f"{max(0.0, 1 - per_step / wall_ms_per_step):.0%} of it")
    lines = [
        f"{what} over {steps} profiled steps; total {total / 1e3:.1f} ms "
        f"({per_step:.1f} ms per step){busy}", "",
        f"| # | kernel / op | calls | {what} (ms) | % | avg (us) |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for i, (name, count, us) in enumerate(rows[:top], 1):
        short = name if len(name) <= 90 else name[:87] + "..."
        short = short.replace("|", "\\|")
        lines.append(f"| {i} | `{short}` | {count} | {us / 1e3:.2f} | {100 * us / total:.1f} "
                     f"| {us / max(count, 1):.1f} |")
    return "\n".join(lines)


def profile_steps(step: Callable[[], Any], name: str, out_dir: Path, steps: int,
                  trace: bool, trace_max_mb: float) -> dict[str, Any]:
    """Profile ``steps`` training steps (after one profiler warm-up step). Returns the kernel
    table (Markdown) and, when ``trace`` and small enough, writes a gzipped chrome trace."""
    from torch.profiler import ProfilerActivity, profile, schedule

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    # repeat=1: one cycle only; otherwise the profiler starts a new (empty) cycle at exit.
    plan = schedule(wait=0, warmup=1, active=steps, repeat=1)
    wall = 0.0
    with profile(activities=activities, schedule=plan) as prof:
        for i in range(steps + 1):
            t0 = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            if i:  # the first is the profiler's warm-up step
                wall += time.perf_counter() - t0
            prof.step()
    out: dict[str, Any] = {"table": kernel_table(prof.key_averages(), cuda, steps,
                                                 wall_ms_per_step=1e3 * wall / max(steps, 1))}
    if trace:
        safe = name.replace("+", "_").replace("=", "-").replace(".", "-")  # a plain file name
        raw = out_dir / f"trace_{safe}.json"
        prof.export_chrome_trace(str(raw))
        gz = raw.with_suffix(".json.gz")
        with raw.open("rb") as src, gzip.open(gz, "wb") as dst:
            dst.write(src.read())
        raw.unlink()
        size_mb = gz.stat().st_size / 2**20
        if size_mb > trace_max_mb:
            gz.unlink()
            out["trace"] = f"dropped ({size_mb:.1f} MB > {trace_max_mb} MB)"
        else:
            out["trace"] = gz.name
    return out


# ---- output ------------------------------------------------------------------------------


def _num(x: float) -> str:
    """One decimal for GPU-sized numbers, three significant digits for CPU toy ones."""
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.3g}"


def render_markdown(res: dict[str, Any]) -> str:
    meta, sh = res["meta"], res["meta"]["shape"]
    lines = [
        "# Training-step throughput", "",
        f"- device: {meta['device']} (peak {meta['peak_tflops']:g} TFLOP/s for MFU)",
        f"- torch {meta['torch']} (CUDA {meta['cuda']}), megatron-core {meta['megatron_core']}, "
        f"transformers {meta['transformers']}, Python {meta['python']}",
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}`",
        f"- shape: {sh['layers']} layers, hidden {sh['hidden']}, heads {sh['heads']}/"
        f"{sh['kv_heads']} kv, d_ff {sh['ffn']}, {sh['experts']} experts top-{sh['top_k']}, "
        f"vocab {sh['vocab']}, seq {sh['seq']}, micro-batch {sh['micro_batch']}, "
        f"dtype {meta['dtype']}",
        f"- FLOPs per token: {meta['flops_per_token']:.4g} (6 x active matmul params incl. LM "
        "head + 12 x layers x hidden x seq)",
        f"- step: {res['step']}", "",
        "| variant | micro-batch | tokens/s | model TFLOP/s | MFU | step ms (mean / min) "
        "| peak mem GiB | activations GiB | loss first -> last |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in res["variants"].items():
        if r["status"] != "ok":
            lines.append(f"| {name} | | failed: {r['error'][:120]} | | | | | | |")
            continue
        lines.append(
            f"| {name} | {r['micro_batch']} | {r['tokens_per_s']:,.0f} | "
            f"{_num(r['model_tflops'])} | "
            f"{_num(100 * r['mfu'])}% | {r['step_ms_mean']:.1f} / {r['step_ms_min']:.1f} | "
            f"{r['peak_memory_gib']:.2f} | {r.get('activations_gib', float('nan')):.2f} | "
            f"{r['losses'][0]:.3f} -> {r['losses'][-1]:.3f} |")
    lines += ["", "Activations: what one forward keeps for backward (autograd's saved tensors, "
              "parameters excluded), the same measure for every variant."]
    lines += ["", "Ratios (tokens/s): " + (", ".join(
        f"{k} = {v:.2f}" for k, v in res["ratios"].items()) or "n/a"), "", "Variants:"]
    for name, r in res["variants"].items():
        if r["status"] == "ok":
            lines.append(f"- `{name}`: {r['includes']}; peak memory = {r['peak_memory_kind']}")
    return "\n".join(lines) + "\n"


def render_profiles(res: dict[str, Any]) -> str:
    parts = [f"# Top kernels per training step ({res['meta']['device']})", "",
             f"Command: `{res['meta']['command']}`"]
    for name, r in res["variants"].items():
        if "profile" in r:
            trace = r["profile"].get("trace")
            parts += ["", f"## {name}", "", r["profile"]["table"]]
            parts += [f"\nChrome trace: {trace}"] if trace else []
    return "\n".join(parts) + "\n"


def write_outputs(res: dict[str, Any], out_dir: Path) -> None:
    """throughput.json, throughput.md and, when profiled, profile.md (few files on purpose:
    the GPU session can bring back only a handful)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "throughput.json").write_text(json.dumps(res, indent=2) + "\n")
    (out_dir / "throughput.md").write_text(render_markdown(res))
    if any("profile" in r for r in res["variants"].values()):
        (out_dir / "profile.md").write_text(render_profiles(res))
