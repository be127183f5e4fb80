"""The trainer owns only the step: megatron's forward/backward schedule, the non-finite guard and
the optimizer step. Everything else (metrics, validation, checkpoints and preemption, router
statistics, throughput) is a callback (``megatron_ext.training.callbacks``), called at named
points; CUDA-graph capture is the step runner (``megatron_ext.training.cuda_graph``).

Exit codes: ``megatron_ext.training.exit_codes``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch.distributed as dist
from megatron.core import parallel_state

from megatron_ext.checkpoint.store import TrainState
from megatron_ext.training import exit_codes
from megatron_ext.training.batches import MicroBatches
from megatron_ext.training.console import warn
from megatron_ext.training.cuda_graph import StepRunner
from megatron_ext.training.forward import forward_backward, reduce_loss
from megatron_ext.training.optim import clip_and_step, prepare_and_norm
from megatron_ext.training.setup import Run, dp_rank_and_size

if TYPE_CHECKING:  # annotations only: the callbacks are a layer above the trainer
    from megatron_ext.training.callbacks.base import Callback


@dataclass
class StepResult:
    """What one step did; ``times`` holds its data, forward_backward and optimizer seconds."""

    loss: float
    grad_norm: float
    skipped: bool
    times: dict[str, float] = field(default_factory=dict)


@dataclass
class Summary:
    status: str
    steps: int
    tokens: int
    first_loss: float | None
    last_loss: float | None
    wall_s: float
    skipped_steps: int


class Trainer:
    def __init__(self, run: Run, state: TrainState, callbacks: Sequence[Callback],
                 runner: StepRunner):
        self.run, self.state, self.callbacks, self.runner = run, state, list(callbacks), runner
        dp_rank, dp = dp_rank_and_size()
        tr = run.cfg.train
        self.micro = MicroBatches(run.train_ds, tr.global_batch_size, tr.micro_batch_size, dp,
                                  dp_rank, run.layout.device)
        self.rank0 = run.layout.rank == 0
        self.last: StepResult | None = None
        self.losses: list[float | None] = [None, None]  # first and last finite loss
        self.excluded_s: dict[str, float] = {}  # validation/saving: not training time
        self.exit_code, self.status = exit_codes.OK, None
        self.t_start = time.time()

    # --- what callbacks use --------------------------------------------------------------------
    def stop(self, exit_code: int, status: str) -> None:
        """End the run after the current step's callbacks."""
        self.exit_code, self.status = exit_code, status

    def is_step(self, interval: int) -> bool:
        """Whether this step is on ``interval`` (0: never); the last step is a log step too."""
        return bool(interval) and self.state.step % interval == 0

    @property
    def is_log_step(self) -> bool:
        return (self.is_step(self.run.cfg.train.log_interval)
                or self.state.step == self.run.derived.total_steps)

    @contextlib.contextmanager
    def excluded(self, what: str) -> Iterator[None]:
        """Time spent inside is reported as ``time/<what>_s`` and kept out of tokens/s."""
        t0 = time.time()
        try:
            yield
        finally:
            self.excluded_s[what] = self.excluded_s.get(what, 0.0) + time.time() - t0

    def emit(self, hook: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def log_metrics(self) -> dict[str, float]:
        """The metrics of this log step: the step's own, then each callback's (``on_log``), and
        those only other pipeline stages have (their layers'). A collective: every rank calls
        it at each log step."""
        result = self.last
        metrics = {"loss": result.loss, "lr": self.run.optimizer.param_groups[0]["lr"],
                   "grad_norm": result.grad_norm, "tokens": self.state.consumed_tokens,
                   "consumed_samples": self.state.consumed_samples,
                   "skipped": self.state.skipped_steps, "elapsed_s": time.time() - self.t_start}
        self.emit("on_log", metrics)
        return _with_other_stages(metrics)

    # --- the loop ------------------------------------------------------------------------------
    def fit(self) -> tuple[int, Summary]:
        """Train from ``state`` to the end or a stop; returns (exit code, summary)."""
        try:
            self.emit("on_start")
            while self.status is None and self.state.step < self.run.derived.total_steps:
                self.last = self._step()
                if self._guard(self.last):
                    self._advance(self.last)
                    self.emit("on_step_end")
            self.status = self.status or "completed"
            self.emit("on_end")
        except BaseException:
            self.emit("close", True)
            raise
        self.emit("close", False)
        return self.exit_code, self._summary()

    def _step(self) -> StepResult:
        run = self.run
        t0 = time.time()
        batches = self.runner.stage(list(self.micro.step(self.state.consumed_samples)))
        t1 = time.time()
        run.model.zero_grad_buffer()
        run.optimizer.zero_grad()
        reports = self.runner.run(lambda: forward_backward(run, batches, forward_only=False))
        t2 = time.time()
        loss = reduce_loss(reports, run.layout.device)
        found_inf, grad_norm = prepare_and_norm(run.optimizer)
        skipped = found_inf or not (math.isfinite(loss) and math.isfinite(grad_norm))
        if not skipped:
            o = run.cfg.optimizer
            clip_and_step(run.optimizer, grad_norm, o.clip_grad, o.grad_divisor)
            run.scheduler.step(increment=1)
        times = {"data": t1 - t0, "forward_backward": t2 - t1, "optimizer": time.time() - t2}
        return StepResult(loss, grad_norm, skipped, times)

    def _guard(self, result: StepResult) -> bool:
        """Count a non-finite step (its update was not applied); stop past the limit, before
        anything (a checkpoint above all) sees the step. Returns whether the run goes on."""
        if not result.skipped:
            return True
        state, limit = self.state, self.run.cfg.train.max_skipped_steps
        state.skipped_steps += 1
        if self.rank0:
            warn(f"step {state.step + 1}: non-finite loss ({result.loss}) or grad norm "
                 f"({result.grad_norm}); step skipped ({state.skipped_steps}/{limit})")
        if state.skipped_steps <= limit:
            return True
        if self.rank0:
            warn(f"stopping: {state.skipped_steps} non-finite steps exceed "
                 f"train.max_skipped_steps={limit}; no checkpoint written")
        self.stop(exit_codes.NONFINITE, "stopped (non-finite)")
        return False

    def _advance(self, result: StepResult) -> None:
        # The batch is consumed either way: a skipped batch is not retried.
        tr, state = self.run.cfg.train, self.state
        state.step += 1
        state.consumed_samples += tr.global_batch_size
        state.consumed_tokens += tr.global_batch_size * self.run.cfg.data.seq_length
        if not result.skipped:
            self.losses = [result.loss if self.losses[0] is None else self.losses[0], result.loss]

    def _summary(self) -> Summary:
        s = self.state
        return Summary(self.status, s.step, s.consumed_tokens, self.losses[0], self.losses[1],
                       time.time() - self.t_start, s.skipped_steps)


def _with_other_stages(metrics: dict[str, float]) -> dict[str, float]:
    """``metrics`` plus the keys that only other pipeline stages computed: a callback that
    reports per layer (``moe/layer{L}/...``) sees only its own stage's layers. Values this stage
    has are kept (the step's loss and norm are the same on every stage)."""
    if not dist.is_initialized() or parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return metrics
    group = parallel_state.get_pipeline_model_parallel_group()
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, metrics, group=group)
    for other in gathered:
        for key, value in other.items():
            metrics.setdefault(key, value)
    return metrics
