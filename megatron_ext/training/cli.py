"""Command line of pretrain_moe.py: parse -> validate -> (print | dry-run | train)."""

from __future__ import annotations

import argparse
import warnings
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Optional

from megatron_ext.cli_utils import one_line
from megatron_ext.config.loader import ConfigError, load_config, to_yaml
from megatron_ext.config.schema import Config
from megatron_ext.config.validate import (
    check_paths, launched_world_size, validate,
)
from megatron_ext.platform import children
from megatron_ext.platform.run_lock import RunLocks
from megatron_ext.training import dry_run
from megatron_ext.training.exit_codes import CONFIG as EXIT_CONFIG
from megatron_ext.training.exit_codes import FAILED as EXIT_FAILED
from megatron_ext.training.exit_codes import OK as EXIT_OK
from megatron_ext.training import signals
from megatron_ext.training.signals import Preemption

# megatron-core warns at import when TE/apex are absent; the "backends:" log line says what runs.
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed")
# Internal deprecations inside megatron-core 0.16.1 / torch that a user cannot act on.
for _msg in ("full scope is deprecated", "Please use DTensor instead",
             "`load_state_dict` is deprecated", "moe_ffn_hidden_size is not set"):
    warnings.filterwarnings("ignore", message=_msg)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="pretrain_moe.py",
        description="Pretrain a (Mixture-of-Experts) GPT with megatron-core. Exit codes: 0 done "
        "(or preempted by SIGTERM/SIGUSR1 and saved: rerun to resume), 1 failure, 2 config or "
        "checkpoint error, 4 too many non-finite steps, 130 interrupted (Ctrl-C).",
    )
    p.add_argument("--config", help="YAML config (configs/*.yaml); defaults when omitted")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=VALUE",
                   help="override a config field (value parsed as YAML); repeatable")
    p.add_argument("--print-config", action="store_true",
                   help="print the fully resolved config as YAML and exit")
    p.add_argument("--dry-run", action="store_true",
                   help="validate, count parameters, show layout and memory estimates; no training")
    return p.parse_args(argv)


def _rank0() -> bool:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0


def train_main(cfg: Config, preempt: Preemption) -> int:
    # Rank 0 alone holds the run's locks, from before anything is built until the very end;
    # taken before megatron is even imported, so a directory in use is refused in seconds.
    locks = RunLocks(_lock_targets(cfg) if _rank0() else [])
    try:
        stop = _preflight(cfg, locks) if _rank0() else None
        if stop is not None and launched_world_size() == 1:
            return _stop(stop)  # before any process group: nobody else waits for this one
        from megatron_ext.checkpoint import dist as ckpt
        from megatron_ext.platform.dist import init_distributed, shutdown
        from megatron_ext.training.cuda_graph import step_stream

        layout = init_distributed(cfg)
        try:
            stop = _agree(stop, layout)
            if stop is not None:
                return _stop(stop)
            # train.cuda_graph: the whole run, model building included, on one side stream
            # (capture cannot use the default stream, and megatron's DDP keeps AccumulateGrad
            # nodes that belong to the stream they were made on).
            with step_stream(cfg.train.cuda_graph):
                return _run(cfg, layout, preempt)
        except ckpt.CheckpointError as e:
            preempt.check()  # e.g. a peer rank that left on a start-up signal
            if layout.rank == 0:
                print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
            return EXIT_CONFIG
        finally:
            shutdown()
    finally:
        locks.release()


def _lock_targets(cfg: Config) -> list[tuple[str, str]]:
    targets = [(cfg.checkpoint.save, "checkpoint.save"),
               (cfg.logging.output_dir, "logging.output_dir")]
    return [(path, what) for path, what in targets if path]


def _preflight(cfg: Config, locks: RunLocks) -> Optional[tuple[int, Optional[str]]]:
    """Rank 0, before anything is built: take the run's locks, then decide from the checkpoint
    whether there is anything to train. Returns (exit code, line to print) to stop with, or None."""
    from megatron_ext.training.loggers import warn

    try:
        for w in locks.acquire():
            warn(w)
    except (ConfigError, OSError) as e:
        return EXIT_CONFIG, f"error: {e}"
    from megatron_ext.checkpoint import resume_check  # megatron: only once the locks are held
    from megatron_ext.checkpoint.dist import CheckpointError

    try:
        done, warnings = resume_check.preflight(cfg)
    except (CheckpointError, OSError) as e:
        return EXIT_CONFIG, f"error: {e}"
    for w in warnings:
        warn(w)
    return (EXIT_OK, done) if done else None


def _agree(stop: Optional[tuple[int, Optional[str]]], layout: Any):
    """Every rank gets rank 0's verdict from ``_preflight``: all stop, or all go on."""
    import torch  # (cli.py imports torch lazily: --print-config and --dry-run stay fast)
    import torch.distributed as dist

    if layout.world_size == 1:
        return stop
    code = torch.tensor([-1 if stop is None else stop[0]], device=layout.device)
    dist.broadcast(code, src=0)
    if int(code.item()) < 0:
        return None
    return stop if layout.rank == 0 else (int(code.item()), None)


def _stop(stop: tuple[int, Optional[str]]) -> int:
    code, line = stop
    if line:
        print(one_line(line), file=sys.stdout if code == EXIT_OK else sys.stderr, flush=True)
    return code


def _run(cfg: Config, layout: Any, preempt: Any) -> int:
    """Build, resume or initialise, train; returns the exit code."""
    from megatron_ext.checkpoint import dist as ckpt
    from megatron_ext.config.loader import to_dict
    from megatron_ext.training.loggers import MetricsWriter, log, warn
    from megatron_ext.training.loop import layout_dict, train
    from megatron_ext.training.setup import build_run, run_dir

    rank0 = layout.rank == 0
    if rank0:  # before building: a log line that says start-up reached the data and model
        log(f"layout: {layout.describe()}")
    run = build_run(cfg, layout)
    if rank0:
        log(f"backends: {run.backends.describe()}")
    out = run_dir(cfg)
    resolved = to_dict(cfg)
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(to_yaml(cfg))
    state = ckpt.TrainState()
    resume, warnings = (ckpt.find_resumable_shared(cfg.checkpoint.save)
                        if cfg.checkpoint.save else (None, []))
    for w in warnings:
        warn(w) if rank0 else None
    if resume is not None:  # rank 0 checked the config against it (resume_check.preflight)
        state, warnings = ckpt.load(resume, run.model, run.optimizer, layout_dict(run))
        run.scheduler.load_state_dict(state.scheduler)
        for w in warnings:
            warn(w) if rank0 else None
        if rank0:
            log(f"resumed from {resume} at step {state.step}")
    elif cfg.checkpoint.load:
        path = ckpt.load_weights(cfg.checkpoint.load, run.model)
        if rank0:
            log(f"initial weights from {path}")
    writer = MetricsWriter(cfg.logging, out, resolved, cfg.logging.wandb.name or "run",
                           enabled=rank0)
    try:
        preempt.start_training(layout.device)  # signals from here on: finish the step and save
        code, summary = train(run, state, writer, preempt)
    finally:
        writer.close()
    if rank0:
        log(_summary_line(summary, cfg, writer.jsonl_path))
    return code


def _summary_line(s: dict, cfg: Config, metrics_path: Path) -> str:
    fl = "n/a" if s["first_loss"] is None else f"{s['first_loss']:.4f}"
    ll = "n/a" if s["last_loss"] is None else f"{s['last_loss']:.4f}"
    where = cfg.checkpoint.save or "(checkpoint.save not set)"
    return (f"summary: {s['status']} | steps {s['steps']} | tokens {s['tokens']:,} | first loss {fl} | "
            f"last loss {ll} | skipped {s['skipped_steps']} | wall {s['wall_s']:.1f}s | "
            f"checkpoint {where} | metrics {metrics_path}")


def main(argv: Optional[list[str]] = None) -> int:
    """pretrain_moe.py's entry point. The signal handlers come first, before the heavy imports
    (``megatron_ext.training.signals`` says what each signal does in each phase). After a
    start-up signal or a Ctrl-C the process ends here (exit 0 or 130), without returning."""
    preempt = signals.install()
    children.bind_helpers()  # megatron's checkpoint writers end with this process
    if children.launched_by_torchrun():  # torchrun starts workers in sessions of their own
        children.die_with_parent()       # so a kill -9 of its process group misses them
    return signals.run(lambda: _main(argv, preempt))


def _main(argv: Optional[list[str]], preempt: Preemption) -> int:
    args = parse_args(argv)
    info_only = args.print_config or args.dry_run
    try:
        cfg = load_config(args.config, args.overrides)
        # --dry-run / --print-config reason about the planned size (parallel.world_size); a
        # training launch is checked against the processes it really has.
        validate(cfg, world_size=None if info_only else launched_world_size())
        if cfg.logging.wandb.name is None and args.config:
            cfg.logging.wandb.name = Path(args.config).stem
        if cfg.logging.output_dir is None:  # per config: two configs never share metrics.jsonl
            cfg.logging.output_dir = f"runs/{Path(args.config).stem if args.config else 'default'}"
        if not info_only:
            check_paths(cfg)
    except ConfigError as e:
        return _fail(f"config error: {e}")
    if args.print_config:
        print(to_yaml(cfg), end="")
        return EXIT_OK
    if args.dry_run:
        return dry_run.main(cfg, _rank0())
    from megatron_ext.checkpoint.manifest import content_checks
    from megatron_ext.data.errors import DataError
    from megatron_ext.training.cuda_graph import GraphCaptureError

    try:
        with content_checks(cfg.checkpoint.verify_checksums):  # every verify of this run
            return train_main(cfg, preempt)
    except (ConfigError, DataError, GraphCaptureError) as e:  # found while building (backend,
        return _fail(f"error: {e}")                            # tokenizer, data) or capturing
    except Exception:  # noqa: BLE001 - report, then a distinct exit code for the launcher
        preempt.check()  # a failure that follows a signal (a peer rank left) is that signal
        traceback.print_exc()
        return EXIT_FAILED


def _fail(line: str) -> int:
    if _rank0():
        print(one_line(line), file=sys.stderr, flush=True)  # one line, whatever the message held
    return EXIT_CONFIG
