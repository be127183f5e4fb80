"""The metric sinks' callback: the console line, JSONL, W&B and TensorBoard (``MetricsWriter``)
receive each log step's metrics, each validation and each background checkpoint write."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from megatron_ext.checkpoint.store import ITER_RE
from megatron_ext.training.callbacks.base import Callback
from megatron_ext.training.console import log
from megatron_ext.training.loggers import MetricsWriter, format_line

if TYPE_CHECKING:  # annotations only (the trainer is a layer below the callbacks)
    from megatron_ext.training.trainer import Trainer


class MetricsLogger(Callback):
    def __init__(self, writer: MetricsWriter):
        self.writer = writer

    def on_step_end(self, trainer: Trainer) -> None:
        if not trainer.is_log_step:
            return
        metrics = trainer.log_metrics()  # a collective where callbacks reduce over ranks
        if trainer.rank0:
            log(format_line(trainer.state.step, trainer.run.derived.total_steps, metrics))
        self.writer.write(trainer.state.step, metrics)

    def on_eval(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if trainer.rank0:
            parts = [f"validation at step {trainer.state.step}"]
            if "val_loss" in metrics:
                parts.append(f"loss {metrics['val_loss']:.4f} | ppl {metrics['val_ppl']:.2f}")
            parts += [f"{key[:-5]} loss {value:.4f} ppl {metrics[key[:-5] + '/ppl']:.2f}"
                      for key, value in metrics.items() if key.endswith("/loss")]
            parts += [f"{key[len('tasks/'):]} {value:.4f}" for key, value in metrics.items()
                      if key.startswith("tasks/") and "stderr" not in key]
            log(" | ".join(parts))
        self.writer.write(trainer.state.step, metrics, kind="valid")

    def on_save(self, trainer: Trainer, path: Path, background_s: float | None) -> None:
        """Background writes also go to the metrics (kind checkpoint, at the step they were
        committed) so W&B shows how long they take against save_interval."""
        if trainer.rank0:
            log(f"saved checkpoint {path}" + ("" if background_s is None else
                                               f" (background write {background_s:.1f}s)"))
        if background_s is not None:
            self.writer.write(trainer.state.step,
                              {"saved_step": int(ITER_RE.match(path.name).group(1)),
                               "background_write_s": background_s}, kind="checkpoint")
