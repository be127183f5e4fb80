"""Append lm-eval results to the W&B run of a training run directory (``--wandb-run-dir``).

A training run with ``logging.wandb`` keeps its W&B run id in ``RUNDIR/wandb_run_id``; the results
go to that same run (``resume="allow"``), under ``lm_eval/<task>/<metric>`` in its history and
summary, plus one ``lm_eval/results`` table. Offline by default (into ``RUNDIR/wandb/``, for a
later ``wandb sync``, or the run's ``logging.wandb.dir``); ``WANDB_MODE=online`` sends them at
once. Project, entity and group come from ``RUNDIR/config.yaml`` (which records the values the
training run used, its WANDB_* variables included).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from megatron_ext.config.loader import ConfigError, load_config
from megatron_ext.data.errors import DataError


def flat_metrics(results: dict[str, Any], prefix: str = "lm_eval") -> dict[str, float]:
    """``<prefix>/<task>/<metric>`` -> value for every finite numeric metric (stderrs too); the
    ``,none`` filter suffix lm-eval appends is dropped, other filters kept (``metric/filter``)."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if not math.isfinite(value):
                continue
            metric, _, filt = key.partition(",")
            name = metric if filt in ("", "none") else f"{metric}/{filt}"
            out[f"{prefix}/{task}/{name}"] = float(value)
    return out


def run_id(run_dir: Path) -> str:
    """The W&B run id a training run saved, or one line saying why there is none."""
    id_file = Path(run_dir) / "wandb_run_id"
    if not id_file.is_file():
        raise DataError(f"{run_dir}: no W&B run here ({id_file.name} missing; train with "
                        "logging.wandb.mode=online|offline)")
    return id_file.read_text().strip()


def append_results(results: dict[str, Any], run_dir: str | Path) -> Path:
    """Log ``results`` into the run directory's W&B run; returns the local W&B directory."""
    run_dir = Path(run_dir)
    rid = run_id(run_dir)
    try:
        wcfg = load_config(run_dir / "config.yaml").logging.wandb
    except ConfigError as e:
        raise DataError(f"{run_dir / 'config.yaml'}: {e}") from None
    # why inside: importing wandb costs ~1 s, and only this option needs it
    import wandb

    metrics = flat_metrics(results)
    run = wandb.init(id=rid, resume="allow", dir=wcfg.dir or str(run_dir), project=wcfg.project,
                     entity=wcfg.entity, group=wcfg.group,
                     mode=os.environ.get("WANDB_MODE", "offline"),
                     reinit="create_new")
    try:
        run.log(metrics)
        run.summary.update(metrics)
        rows = [[k.split("/")[1], k.split("/", 2)[2], v] for k, v in metrics.items()]
        run.log({"lm_eval/results": wandb.Table(columns=["task", "metric", "value"], data=rows)})
    finally:
        run.finish()
    return Path(run.dir).parent
