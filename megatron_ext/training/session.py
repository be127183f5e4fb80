"""One training session, once the process group exists: build the run, resume it (or load
initial weights), train it with the trainer and its callbacks, print the summary line."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from megatron_ext.checkpoint import store as ckpt
from megatron_ext.checkpoint.plan import LOAD, RESUME, ResumePlan
from megatron_ext.config.derived import Derived
from megatron_ext.config.loader import to_dict, to_yaml
from megatron_ext.config.schema import Config
from megatron_ext.platform import patches
from megatron_ext.platform.dist import Layout
from megatron_ext.platform.fs import atomic_write
from megatron_ext.platform.run_files import CONFIG_FILE
from megatron_ext.training import callbacks
from megatron_ext.training.console import MOCK_MARK, log, mark_lines, mock_banner, warn
from megatron_ext.training.cuda_graph import step_runner
from megatron_ext.training.loggers import MetricsWriter
from megatron_ext.training.setup import Run, build_run, layout_dict, run_dir
from megatron_ext.training.signals import Preemption
from megatron_ext.training.trainer import Summary, Trainer


def train(cfg: Config, derived: Derived, layout: Layout, preempt: Preemption, plan: ResumePlan,
          extra_callbacks: Sequence[callbacks.Factory] = ()) -> int:
    """Build, resume or initialise as ``plan`` says (``checkpoint.plan.make_plan``, already
    verified), train; returns the exit code. ``derived``: ``derive(cfg)``, made once after
    validation. ``extra_callbacks``: factories of callbacks beyond
    the standard list (``callbacks.build``)."""
    patches.check()  # our patches of megatron-core internals hold for the installed version
    rank0 = layout.rank == 0
    if rank0 and cfg.data.mock:  # random tokens: the first line says so, every line marks it
        log(mock_banner(cfg.model.vocab_size))
        mark_lines(MOCK_MARK)
    try:
        return _train(cfg, derived, layout, preempt, plan, extra_callbacks, rank0)
    finally:
        mark_lines(None)


def _train(cfg: Config, derived: Derived, layout: Layout, preempt: Preemption, plan: ResumePlan,
           extra_callbacks: Sequence[callbacks.Factory], rank0: bool) -> int:
    if rank0:  # before building: a log line that says start-up reached the data and model
        log(f"layout: {layout.describe()}")
    run = build_run(cfg, derived, layout)
    if rank0:
        log(f"backends: {run.backends.describe()}")
    out = run_dir(cfg)
    state = _initial_state(run, plan, rank0)
    if rank0:  # after the checkpoints were read: a refused start writes nothing
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / CONFIG_FILE, to_yaml(cfg))  # a link there is replaced, not followed
    writer = MetricsWriter(cfg.logging, out, to_dict(cfg), cfg.logging.wandb.name or "run",
                           enabled=rank0)
    try:
        runner = step_runner(cfg.train.cuda_graph, warn if rank0 else lambda line: None)
        trainer = Trainer(run, state, callbacks.build(run, writer, preempt, extra_callbacks,
                                                      plan.verified), runner)
        preempt.start_training(layout.device)  # signals from here on: finish the step and save
        code, summary = trainer.fit()
    finally:
        writer.close()
    if rank0:
        log(_summary_line(summary, cfg, writer.jsonl_path))
    return code


def _initial_state(run: Run, plan: ResumePlan, rank0: bool) -> ckpt.TrainState:
    """Resume from the plan's checkpoint, else start at step 0 (from checkpoint.load's weights
    when the plan says so). The plan's warnings were printed when it was made."""
    if plan.action == RESUME:
        state, warnings = ckpt.load(plan.path, plan.meta, run.model, run.optimizer,
                                    layout_dict(run))
        run.scheduler.load_state_dict(state.scheduler)
        for w in warnings if rank0 else ():
            warn(w)
        if rank0:
            log(f"resumed from {plan.path} at step {state.step}")
        return state
    if plan.action == LOAD:
        ckpt.load_weights(plan.path, run.model)
        # The optimizer copied the parameters when it was built (fp32 main params in bf16, its
        # shards with the distributed optimizer) and writes them back after every step: without
        # this the first step would replace the loaded weights by the random init.
        run.optimizer.reload_model_params()
        if rank0:
            log(f"initial weights from {plan.path}")
    return ckpt.TrainState()


def _summary_line(s: Summary, cfg: Config, metrics_path: Path) -> str:
    fl = "n/a" if s.first_loss is None else f"{s.first_loss:.4f}"
    ll = "n/a" if s.last_loss is None else f"{s.last_loss:.4f}"
    where = cfg.checkpoint.save or "(checkpoint.save not set)"
    return (f"summary: {s.status} | steps {s.steps} | tokens {s.tokens:,} | first loss {fl} | "
            f"last loss {ll} | skipped {s.skipped_steps} | wall {s.wall_s:.1f}s | "
            f"checkpoint {where} | metrics {metrics_path}")
