"""Metric sinks: console line, JSONL (always), Weights & Biases and TensorBoard (optional).

Only rank 0 writes. Every sink receives the same flat ``{name: number}`` dict per record.
JSONL is the record of the run; W&B (``wandb_sink``) and TensorBoard are extras that never cost
it: a failing extra warns once and is dropped, and no W&B call can hold training or the exit past
a deadline.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from megatron_ext.config.schema import LoggingConfig
from megatron_ext.platform.fs import open_append
from megatron_ext.training.console import log, reason, warn
from megatron_ext.training.wandb_sink import WandbSink

__all__ = ["MetricsWriter", "TensorBoardSink", "format_line", "log", "warn"]


class MetricsWriter:
    def __init__(self, cfg: LoggingConfig, run_dir: Path, resolved_config: dict,
                 run_name: str, enabled: bool):
        self.enabled = enabled
        self.jsonl_path = run_dir / "metrics.jsonl"
        self._jsonl = None
        self._wandb: WandbSink | None = None
        self._tb: TensorBoardSink | None = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open_append(self.jsonl_path)  # never through a symbolic link
        if cfg.wandb.mode != "disabled":
            self._wandb = WandbSink.start(cfg, run_dir, resolved_config, run_name)
        if cfg.tensorboard:
            self._tb = TensorBoardSink(run_dir / "tensorboard")

    def write(self, step: int, metrics: dict[str, Any], kind: str = "train") -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": time.time()}
        record.update({k: _jsonable(v) for k, v in metrics.items()})
        self._jsonl.write(json.dumps(record) + "\n")
        prefix = "" if kind == "train" else f"{kind}/"
        numeric = {f"{prefix}{k}": v for k, v in metrics.items()
                   if isinstance(v, (int, float)) and math.isfinite(v)}
        if self._wandb is not None:
            self._wandb.log(numeric, step)
        if self._tb is not None:
            self._tb.log(numeric, step)

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._wandb is not None:
            self._wandb.close()
        if self._tb is not None:
            self._tb.close()


class TensorBoardSink:
    """TensorBoard events; the first failure (a log dir that cannot be written) warns once."""

    def __init__(self, log_dir: Path):
        self._log_dir = log_dir
        self._writer = None
        try:
            # here, not at the top: tensorboard's import costs start-up time
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(log_dir))
        except Exception as e:  # noqa: BLE001 - any failure: run on without it
            self._fail(e)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self._writer is None:
            return
        try:
            for k, v in metrics.items():
                self._writer.add_scalar(k, v, step)
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def close(self) -> None:
        if self._writer is None:
            return
        try:
            self._writer.close()
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def _fail(self, e: BaseException) -> None:
        writer, self._writer = self._writer, None
        warn(f"TensorBoard writer failed for {self._log_dir} ({reason(e)}); training "
             "continues without TensorBoard (metrics.jsonl has every record)")
        if writer is not None:
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - already reported
                pass


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def format_line(step: int, total: int, m: dict[str, Any]) -> str:
    parts = [f"step {step}/{total}", f"tokens {m['tokens']:,}", f"loss {m['loss']:.4f}"]
    if "aux_loss" in m:
        parts.append(f"aux {m['aux_loss']:.4f}")
    if "moe/expert_cos_mean" in m:  # expert diversity: 1.0 for identical experts
        parts.append(f"expert cos {m['moe/expert_cos_mean']:.3f}")
    parts += [f"lr {m['lr']:.3e}", f"gnorm {m['grad_norm']:.3f}",
              f"tok/s {m['tokens_per_s']:,.0f}", f"TFLOP/s {m['tflops']:.2f}",
              f"MFU {100 * m['mfu']:.2f}%", f"ETA {_hms(m['eta_s'])}"]
    if m.get("skipped"):
        parts.append(f"skipped {m['skipped']}")
    return " | ".join(parts)


def _hms(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"
