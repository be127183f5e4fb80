"""Metric sinks: console line, JSONL (always), Weights & Biases and TensorBoard (optional).

Only rank 0 writes. Every sink receives the same flat ``{name: number}`` dict per record.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

from megatron_ext.config.schema import LoggingConfig


def log(msg: str) -> None:
    print(msg, flush=True)


def warn(msg: str) -> None:
    print(f"WARNING: {msg}", file=sys.stderr, flush=True)


def _wandb_has_credentials() -> bool:
    """Whether ``wandb.init(mode="online")`` finds credentials without prompting.

    Looks where the SDK (0.31) looks: WANDB_API_KEY, an identity token file, or a netrc entry
    for the W&B host (WANDB_BASE_URL, default api.wandb.ai; a self-hosted server has its own
    entry) in $NETRC, else ~/.netrc, else ~/_netrc. An unreadable netrc counts as none: the
    fallback must never crash a training run.
    """
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
    try:
        if os.environ.get("NETRC"):
            candidates = [Path(os.environ["NETRC"]).expanduser()]
        else:
            candidates = [Path("~/.netrc").expanduser(), Path("~/_netrc").expanduser()]
        for path in candidates:
            if path.is_file():  # the SDK reads only the first file found
                entry = netrc.netrc(str(path)).authenticators(host)
                return bool(entry and entry[2])  # the API key is the password field
    except (OSError, RuntimeError, netrc.NetrcParseError):  # RuntimeError: no home directory
        return False
    return False


class MetricsWriter:
    def __init__(self, cfg: LoggingConfig, run_dir: Path, resolved_config: dict,
                 run_name: str, enabled: bool):
        self.enabled = enabled
        self.jsonl_path = run_dir / "metrics.jsonl"
        self._jsonl = None
        self._wandb = None
        self._tb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.jsonl_path, "a", buffering=1)
        if cfg.wandb.mode != "disabled":
            self._wandb = self._start_wandb(cfg, run_dir, resolved_config, run_name)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    @staticmethod
    def _start_wandb(cfg: LoggingConfig, run_dir: Path, resolved: dict, run_name: str):
        import wandb

        mode = cfg.wandb.mode
        if mode == "online" and not _wandb_has_credentials():
            warn("logging.wandb.mode=online but no W&B credentials found; logging offline "
                 "(sync later with `wandb sync`)")
            mode = "offline"
        kwargs = dict(
            project=cfg.wandb.project, entity=cfg.wandb.entity, name=cfg.wandb.name or run_name,
            tags=list(cfg.wandb.tags) or None, config=resolved, dir=str(run_dir),
            resume="allow", id=_stable_run_id(run_dir),
        )
        try:
            return wandb.init(mode=mode, **kwargs)
        except Exception as e:  # noqa: BLE001 - wandb raises many types (auth, network, server)
            if mode != "online":
                raise
            # A W&B outage or a revoked key must not cost the training run.
            reason = " ".join(str(e).split()) or type(e).__name__
            warn(f"W&B online init failed ({reason}); logging offline "
                 "(sync later with `wandb sync`)")
            return wandb.init(mode="offline", **kwargs)

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
            self._wandb.log(numeric, step=step)
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()


def _stable_run_id(run_dir: Path) -> str:
    """One W&B run per run directory, so a resumed job appends to the same run."""
    id_file = run_dir / "wandb_run_id"
    if id_file.exists():
        return id_file.read_text().strip()
    import uuid

    rid = uuid.uuid4().hex[:12]
    id_file.write_text(rid)
    return rid


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def format_line(step: int, total: int, m: dict[str, Any]) -> str:
    parts = [f"step {step}/{total}", f"tokens {m['tokens']:,}", f"loss {m['loss']:.4f}"]
    if "aux_loss" in m:
        parts.append(f"aux {m['aux_loss']:.4f}")
    parts += [f"lr {m['lr']:.3e}", f"gnorm {m['grad_norm']:.3f}",
              f"tok/s {m['tokens_per_s']:,.0f}", f"TFLOP/s {m['tflops']:.2f}",
              f"MFU {100 * m['mfu']:.2f}%", f"ETA {_hms(m['eta_s'])}"]
    if m.get("skipped"):
        parts.append(f"skipped {m['skipped']}")
    return " | ".join(parts)


def _hms(seconds: Optional[float]) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"
