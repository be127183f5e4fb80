"""Router metrics per log interval: the unscaled load-balancing and z-losses (from megatron's
aux-loss tracker, or the model's all-layers loss with moe.aux_loss_scope: all_layers) and, with
``logging.expert_load``, per-layer expert load, imbalance, routing entropy and dropped tokens
(``megatron_ext.training.router_stats``), over the MoE layers of every pipeline stage."""

from __future__ import annotations

from typing import TYPE_CHECKING

from megatron_ext.training.callbacks.base import Callback
from megatron_ext.training.router_stats import RouterStats, all_layers_aux_loss, router_losses
from megatron_ext.training.setup import Run

if TYPE_CHECKING:  # annotations only (the trainer is a layer below the callbacks)
    from megatron_ext.training.trainer import Trainer


class RouterMetrics(Callback):
    def __init__(self, run: Run):
        self.stats = (RouterStats(run.model, run.cfg.moe.top_k)
                      if run.cfg.logging.expert_load else None)
        self.forwards = 0  # micro-batch forwards on this rank since the last log step
        # moe.aux_loss_scope all_layers (pipeline parallelism is refused with it: one chunk)
        self.all_layers = next((m.all_layers_loss for m in run.model.modules()
                                if hasattr(m, "all_layers_loss")), None)

    def on_step_end(self, trainer: Trainer) -> None:
        self.forwards += trainer.micro.num_microbatches

    def on_log(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        metrics.update(router_losses(self.forwards, trainer.run.cfg.model.num_layers))
        if self.all_layers is not None:
            metrics.update(all_layers_aux_loss(self.all_layers, self.forwards))
        self.forwards = 0
        if self.stats is not None:
            metrics.update(self.stats.collect())

    def close(self, trainer: Trainer, aborted: bool) -> None:
        if self.stats is not None:
            self.stats.remove()
