"""Checkpoints and preemption: periodic saves (``checkpoint.save_interval``), the final save, and
a save on SIGTERM/SIGUSR1 after which the run stops (exit 0; the same command resumes).
Asynchronous saves are written in the background and committed as they finish; a run that ends
waits for them, and one that fails aborts them (an unfinished write never becomes latest)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from megatron_ext.checkpoint.saver import Saver
from megatron_ext.checkpoint.store import Known
from megatron_ext.config.loader import to_dict
from megatron_ext.training import exit_codes
from megatron_ext.training.callbacks.base import Callback
from megatron_ext.training.console import log
from megatron_ext.training.setup import Run, layout_dict
from megatron_ext.training.signals import Preemption

if TYPE_CHECKING:  # annotations only (the trainer is a layer below the callbacks)
    from megatron_ext.training.trainer import Trainer


class Checkpointing(Callback):
    def __init__(self, run: Run, preempt: Preemption, verified: Known | None = None):
        """``verified``: the resume plan's verdicts on ``checkpoint.save``'s checkpoints
        (``ResumePlan.verified``): pruning after the first save does not hash them again."""
        ck = run.cfg.checkpoint
        self.run, self.preempt = run, preempt
        self.saver = (Saver(ck.save, ck.keep_last, ck.fully_reshardable_optimizer, ck.async_save,
                            verified) if ck.save else None)
        self.resolved, self.layout = to_dict(run.cfg), layout_dict(run)

    def on_step_end(self, trainer: Trainer) -> None:
        saver = self.saver
        if saver is not None and saver.pending:
            self._committed(trainer, saver.poll())
        stop = self.preempt.requested(self.run.layout.device)  # a collective: every step
        final = trainer.state.step == self.run.derived.total_steps
        if saver is not None and (stop or final
                                  or trainer.is_step(self.run.cfg.checkpoint.save_interval)):
            with trainer.excluded("save"):
                self._save(trainer, wait=stop)
        if stop:
            if trainer.rank0:
                log(f"received signal {self.preempt.signum}; saved step {trainer.state.step}; "
                    f"exiting (the same command resumes)" if saver is not None else
                    f"received signal {self.preempt.signum}; no checkpoint.save set, exiting")
            trainer.stop(exit_codes.OK, "preempted")

    def _save(self, trainer: Trainer, wait: bool) -> None:
        run, saver, state = self.run, self.saver, trainer.state
        state.scheduler = run.scheduler.state_dict()
        self._committed(trainer, saver.save(state, run.model, run.optimizer, self.resolved,
                                            self.layout))
        if wait:  # the job is about to end: finish the write
            self._committed(trainer, saver.wait())
        elif saver.pending and trainer.rank0:
            log(f"writing checkpoint {saver.in_flight[-1][0]} in the background")

    def _committed(self, trainer: Trainer, committed: list) -> None:
        for path, background_s in committed:
            trainer.emit("on_save", path, background_s)

    def on_end(self, trainer: Trainer) -> None:
        if self.saver is not None:
            self._committed(trainer, self.saver.wait())

    def close(self, trainer: Trainer, aborted: bool) -> None:
        if aborted and self.saver is not None:
            self.saver.close(abort=True)  # an unfinished background write must not be latest
