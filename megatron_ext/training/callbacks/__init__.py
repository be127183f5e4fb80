"""The callbacks of a training run, and the one list that builds them.

The trainer (``megatron_ext.training.trainer``) owns only the step; each other concern is one
module here, a ``Callback`` (``base``) that implements the named points it needs. Callbacks run
in list order at every point, on every rank. Adding a concern is one new file and one line in
``build``::

    # megatron_ext/training/callbacks/grad_stats.py
    class GradStats(Callback):
        def on_log(self, trainer, metrics):
            metrics["grad/max"] = ...

    # in build() below, before MetricsLogger so its metrics are written:
        GradStats(run),

A launcher of one's own (e.g. a test) can add callbacks without editing the list: it passes
factories ``Run -> Callback`` as ``extra`` (``cli.main(argv, extra_callbacks=...)`` hands them
down through ``session.train``); they run before checkpointing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from megatron_ext.checkpoint.store import Known
from megatron_ext.training.callbacks.base import Callback
from megatron_ext.training.callbacks.checkpointing import Checkpointing
from megatron_ext.training.callbacks.expert_similarity import ExpertSimilarity
from megatron_ext.training.callbacks.metrics import MetricsLogger
from megatron_ext.training.callbacks.router import RouterMetrics
from megatron_ext.training.callbacks.throughput import Throughput
from megatron_ext.training.callbacks.validation import Validation
from megatron_ext.training.loggers import MetricsWriter
from megatron_ext.training.setup import Run
from megatron_ext.training.signals import Preemption

Factory = Callable[[Run], Callback]


def build(run: Run, writer: MetricsWriter, preempt: Preemption,
          extra: Sequence[Factory] = (), verified: Known | None = None) -> list[Callback]:
    """``verified``: the resume plan's checkpoint verdicts (``Checkpointing``)."""
    moe = [RouterMetrics(run), ExpertSimilarity(run)] if run.cfg.moe.num_experts else []
    return [
        Throughput(run),       # first: it accumulates the step's times before anyone reads them
        *moe,                  # router losses and expert load, reduced over ranks at log steps
        MetricsLogger(writer),  # at log steps: gathers every callback's metrics and writes them
        Validation(run),
        *_downstream(run),
        *(factory(run) for factory in extra),
        Checkpointing(run, preempt, verified),  # last: a preemption stops the run after its save
    ]


def _downstream(run: Run) -> list[Callback]:
    """In-loop lm-eval tasks, only when configured."""
    if not (run.cfg.eval.tasks and run.cfg.eval.task_interval):
        return []
    # why inside: lm-evaluation-harness takes seconds to import; most runs do not use it
    from megatron_ext.training.callbacks.downstream import DownstreamTasks

    return [DownstreamTasks(run)]
