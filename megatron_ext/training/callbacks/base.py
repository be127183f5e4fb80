"""The callback interface: the named points at which the trainer calls out.

Every hook has a default that does nothing, so a callback implements only its own points. Hooks
run on every rank in list order (megatron_ext.training.callbacks.build); a hook that runs
collectives (validation, checkpointing, router statistics) relies on that.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the callbacks are a layer above the trainer
    from megatron_ext.training.trainer import Trainer


class Callback:
    def on_start(self, trainer: Trainer) -> None:
        """Before the first step (after resume)."""

    def on_step_end(self, trainer: Trainer) -> None:
        """After each optimizer step (or skipped step); ``trainer.last`` describes it."""

    def on_log(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """At a log step: add this callback's entries to ``metrics`` (sinks write them)."""

    def on_eval(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """Validation results (``val_loss``, ``val_ppl``) at the current step."""

    def on_save(self, trainer: Trainer, path: Path, background_s: float | None) -> None:
        """A checkpoint was committed; ``background_s`` is the write's duration if it was
        written in the background, else None."""

    def on_end(self, trainer: Trainer) -> None:
        """After the last step of a run that ended normally (completed, preempted or stopped
        on non-finite steps)."""

    def close(self, trainer: Trainer, aborted: bool) -> None:
        """Always, last: release what the callback holds. ``aborted``: an exception is
        propagating (e.g. an unfinished background write must not become the latest)."""
