"""Validation every ``train.eval_interval`` steps on the held-out split: ``eval_iters`` global
batches, fresh ones each time, forward only; the results go to ``on_eval`` (the sinks)."""

from __future__ import annotations

import math

import torch
from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

from megatron_ext.training.batches import MicroBatches
from megatron_ext.training.callbacks.base import Callback
from megatron_ext.training.forward import forward_backward, reduce_loss
from megatron_ext.training.setup import Run, dp_rank_and_size
from megatron_ext.training.trainer import Trainer


class Validation(Callback):
    def __init__(self, run: Run):
        self.run = run

    def on_step_end(self, trainer: Trainer) -> None:
        tr = self.run.cfg.train
        if self.run.valid_ds is None or not trainer.is_step(tr.eval_interval):
            return
        with trainer.excluded("eval"):
            done = trainer.state.step // tr.eval_interval - 1  # validations before this one
            trainer.emit("on_eval", evaluate(self.run, done * tr.eval_iters
                                             * tr.global_batch_size))


def evaluate(run: Run, consumed: int) -> dict[str, float]:
    """Mean LM loss and perplexity over ``eval_iters`` global batches of the validation set,
    starting at sample ``consumed``."""
    tr = run.cfg.train
    dp_rank, dp = dp_rank_and_size()
    micro = MicroBatches(run.valid_ds, tr.global_batch_size, tr.micro_batch_size, dp, dp_rank,
                         run.layout.device)
    # Validation forwards also feed megatron's aux-loss tracker; keep the training window's sums.
    tracker = get_moe_layer_wise_logging_tracker()
    saved = {k: v["values"].clone() for k, v in tracker.items() if "values" in v}
    reports = []
    run.model.eval()
    with torch.no_grad():
        for i in range(tr.eval_iters):
            batches = list(micro.step(consumed + i * tr.global_batch_size))
            reports += forward_backward(run, batches, forward_only=True)
    run.model.train()
    for k, v in saved.items():
        tracker[k]["values"].copy_(v)
    loss = reduce_loss(reports, run.layout.device)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
