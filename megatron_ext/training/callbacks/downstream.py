"""In-loop downstream evaluation (``eval.tasks`` every ``eval.task_interval`` steps), as
OLMo-core does: lm-evaluation-harness tasks on the current weights, through the same LM class as
``moe-lm-eval`` (``megatron_ext.evaluation``), logged as ``tasks/<task>/<metric>``
beside the losses (console, JSONL, W&B under ``valid/``).

Rank 0 evaluates its replica alone (config validation requires an unsplit model); the other ranks
wait at a barrier. The time counts as evaluation, not training (``Trainer.excluded``). The task
names are checked when the run starts, so a typo fails in seconds, not at the first interval.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.distributed as dist

from megatron_ext.checkpoint.store import unwrap
from megatron_ext.data.run_tokenizer import checkpoint_tokenizer
from megatron_ext.evaluation import harness
from megatron_ext.evaluation.lm_eval_model import MegatronLM
from megatron_ext.evaluation.wandb_results import flat_metrics
from megatron_ext.training.callbacks.base import Callback
from megatron_ext.training.setup import Run

if TYPE_CHECKING:  # annotations only (the trainer is a layer below the callbacks)
    from megatron_ext.training.trainer import Trainer


class DownstreamTasks(Callback):
    def __init__(self, run: Run):
        self.run, self.ev = run, run.cfg.eval
        self.enabled = run.layout.rank == 0
        if self.enabled:
            self.manager = harness.task_manager(self.ev.tasks)
            harness.check_tasks(self.manager, self.ev.tasks)
            self.tokenizer = checkpoint_tokenizer(run.cfg)

    def on_step_end(self, trainer: Trainer) -> None:
        if not trainer.is_step(self.ev.task_interval):
            return
        with trainer.excluded("eval"):
            metrics = self._evaluate() if self.enabled else {}
            if dist.is_initialized():
                dist.barrier()
            trainer.emit("on_eval", metrics)

    def _evaluate(self) -> dict[str, float]:
        model = unwrap(self.run.model)  # without DDP: a forward on this rank alone
        lm = MegatronLM(cfg=self.run.cfg, model=model, tok=self.tokenizer,
                        batch_size=self.ev.batch_size)
        model.eval()
        try:
            results = harness.evaluate(lm, list(self.ev.tasks), self.manager, limit=self.ev.limit)
        finally:
            model.train()
        return flat_metrics(results, prefix="tasks")

