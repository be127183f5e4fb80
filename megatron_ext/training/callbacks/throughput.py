"""Throughput per log interval: tokens/s, TFLOP/s, MFU, ETA, the step's phase times and peak
memory. Validation and checkpoint time (``Trainer.excluded``) is kept out of the interval, so it
does not count as training time in tokens/s, TFLOP/s and MFU."""

from __future__ import annotations

import resource
import time
from typing import TYPE_CHECKING

import torch

from megatron_ext.model.params import flops_per_token
from megatron_ext.training.callbacks.base import Callback
from megatron_ext.training.setup import Run

if TYPE_CHECKING:  # annotations only (the trainer is a layer below the callbacks)
    from megatron_ext.training.trainer import Trainer

PHASES = ("forward_backward", "optimizer", "data")


class Throughput(Callback):
    def __init__(self, run: Run):
        cfg = run.cfg
        self.flops_per_token = flops_per_token(cfg.model, cfg.moe, cfg.data.seq_length)
        self._reset(None)

    def _reset(self, trainer: Trainer | None) -> None:
        self.t0, self.steps = time.time(), 0
        self.phase_s = dict.fromkeys(PHASES, 0.0)
        if trainer is not None:
            trainer.excluded_s.clear()

    def on_start(self, trainer: Trainer) -> None:
        self._reset(trainer)

    def on_step_end(self, trainer: Trainer) -> None:
        self.steps += 1
        for phase in PHASES:
            self.phase_s[phase] += trainer.last.times[phase]

    def on_log(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        run, excluded = trainer.run, trainer.excluded_s
        cfg = run.cfg
        elapsed = max(time.time() - self.t0 - sum(excluded.values()), 1e-9)
        n = max(self.steps, 1)
        tokens_per_s = n * cfg.train.global_batch_size * cfg.data.seq_length / elapsed
        tflops = self.flops_per_token * tokens_per_s / run.layout.world_size / 1e12
        metrics.update({
            "tokens_per_s": tokens_per_s, "tflops": tflops, "mfu": tflops / cfg.train.peak_tflops,
            "eta_s": (run.derived.total_steps - trainer.state.step) * elapsed / n,
            "time/step_s": elapsed / n,
            **{f"time/{phase}_s": self.phase_s[phase] / n for phase in PHASES},
            "time/eval_s": excluded.get("eval", 0.0), "time/save_s": excluded.get("save", 0.0),
        })
        metrics.update(_peak_memory())
        self._reset(trainer)


def _peak_memory() -> dict[str, float]:
    """Peak device memory since the last call (GPU), or the process's peak RSS (CPU)."""
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 1024**3
        torch.cuda.reset_peak_memory_stats()
        return {"memory/max_allocated_gb": peak}
    return {"memory/max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}
