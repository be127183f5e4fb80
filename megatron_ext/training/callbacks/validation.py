"""Validation every ``train.eval_interval`` steps: the training blend's held-out split
(``val_loss``, ``val_ppl``) and each named set of ``data.valid_sets`` (``<name>/loss``, ``/ppl``;
W&B shows them under ``valid/``), each on the same ``eval_iters`` global batches every time,
forward only; the results go to ``on_eval`` (the sinks)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker
from torch.utils.data import Dataset

from megatron_ext.training.batches import MicroBatches
from megatron_ext.training.callbacks.base import Callback
from megatron_ext.training.forward import forward_backward, reduce_loss
from megatron_ext.training.setup import Run, dp_rank_and_size

if TYPE_CHECKING:  # annotations only (the trainer is a layer below the callbacks)
    from megatron_ext.training.trainer import Trainer


class Validation(Callback):
    def __init__(self, run: Run):
        self.run = run
        # The training blend's held-out split as val_loss/val_ppl; data.valid_sets by name.
        self.sets = ([(None, run.valid_ds)] if run.valid_ds is not None else []) + \
            list(run.valid_sets.items())

    def on_step_end(self, trainer: Trainer) -> None:
        if not self.sets or not trainer.is_step(self.run.cfg.train.eval_interval):
            return
        with trainer.excluded("eval"):
            metrics: dict[str, float] = {}
            for name, dataset in self.sets:
                loss = evaluate(self.run, dataset)
                prefix = "val_" if name is None else f"{name}/"
                metrics[f"{prefix}loss"] = loss
                metrics[f"{prefix}ppl"] = math.exp(min(loss, 50.0))
            trainer.emit("on_eval", metrics)


def evaluate(run: Run, dataset: Dataset) -> float:
    """Mean LM loss over the first ``eval_iters`` global batches of ``dataset`` (the same
    samples every time), over every data-parallel rank."""
    tr = run.cfg.train
    dp_rank, dp = dp_rank_and_size()
    micro = MicroBatches(dataset, tr.global_batch_size, tr.micro_batch_size, dp, dp_rank,
                         run.layout.device)
    # Validation forwards also feed megatron's aux-loss tracker; keep the training window's sums.
    tracker = get_moe_layer_wise_logging_tracker()
    saved = {k: v["values"].clone() for k, v in tracker.items() if "values" in v}
    reports = []
    run.model.eval()
    with torch.no_grad():
        for i in range(tr.eval_iters):
            batches = list(micro.step(i * tr.global_batch_size))
            reports += forward_backward(run, batches, forward_only=True)
    run.model.train()
    for k, v in saved.items():
        tracker[k]["values"].copy_(v)
    return reduce_loss(reports, run.layout.device)
