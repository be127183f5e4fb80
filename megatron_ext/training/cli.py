"""Command line of pretrain_moe.py: parse -> validate -> (print | dry-run | train)."""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron_ext.config.args import int_arg
from megatron_ext.config.derived import Derived, derive
from megatron_ext.config.loader import ConfigError, load_config, to_yaml
from megatron_ext.config.schema import Config
from megatron_ext.config.validate import check_paths, planned_world_size, validate
from megatron_ext.errors import UsageError, UserError, one_line, out_of_memory
from megatron_ext.platform import children, launch
from megatron_ext.platform.cli import ArgumentParser, safe_console
from megatron_ext.platform.launch import is_rank0
from megatron_ext.platform.quiet import quiet_process
from megatron_ext.platform.run_files import check_run_io
from megatron_ext.platform.run_lock import RunLocks
from megatron_ext.training import dry_run, signals, wandb_sink
from megatron_ext.training.console import warn
from megatron_ext.training.exit_codes import CONFIG as EXIT_CONFIG
from megatron_ext.training.exit_codes import FAILED as EXIT_FAILED
from megatron_ext.training.exit_codes import OK as EXIT_OK
from megatron_ext.training.signals import Preemption

if TYPE_CHECKING:  # annotations only: the callbacks import megatron-core (seconds)
    from megatron_ext.training.callbacks import Factory

# Before megatron-core is imported: its notices about absent TE/apex (the "backends:" log line
# says what runs) and internal deprecations a user cannot act on.
quiet_process()


PLAN_TOP = 10  # layouts --plan shows unless --plan-all
MAX_NODES = 2**16  # --plan: far past any cluster, and the layouts of it are searched in seconds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(
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
                   help="validate, count parameters, show layout, memory estimate and predicted "
                   "step time (the config's cluster section); no training")
    p.add_argument("--plan", action="store_true",
                   help="rank every parallel layout of --nodes nodes by predicted step time "
                   "(memory per GPU, tokens/s, MFU, days to the token budget); no training")
    p.add_argument("--nodes", type=int_arg(1, MAX_NODES), metavar="N",
                   help="nodes of cluster.gpus_per_node GPUs that --plan lays the run out on")
    p.add_argument("--plan-all", action="store_true",
                   help="with --plan: every valid layout, those that do not fit included "
                   "(default: the 10 best that fit)")
    args = p.parse_args(argv)
    if (args.nodes is not None or args.plan_all) and not args.plan:
        raise UsageError("--nodes and --plan-all go with --plan")
    if args.plan and (args.nodes is None or args.nodes < 1):
        raise UsageError("--plan needs --nodes N (N >= 1)")
    return args


def train_main(cfg: Config, derived: Derived, preempt: Preemption,
               extra_callbacks: Sequence[Factory] = ()) -> int:
    # Rank 0 alone holds the run's locks, from before anything is built until the very end;
    # taken before megatron is even imported, so a directory in use is refused in seconds.
    locks = RunLocks(_lock_targets(cfg) if is_rank0() else [])
    try:
        stop, plan = _preflight(cfg, derived, locks) if is_rank0() else (None, None)
        if stop is not None and launch.world_size() == 1:
            return _stop(stop)  # before any process group: nobody else waits for this one
        # Here, after the locks: torch and megatron-core take seconds to import, and a run
        # directory in use must be refused before that (and --dry-run never needs them).
        from megatron_ext.checkpoint import store as ckpt
        from megatron_ext.checkpoint.plan import COMPLETE, make_plan
        from megatron_ext.platform.dist import init_distributed, shutdown
        from megatron_ext.training import session
        from megatron_ext.training.cuda_graph import step_stream

        layout = init_distributed(cfg)
        try:
            stop = _agree(stop, layout)
            if stop is not None:
                return _stop(stop)
            if plan is None:  # several ranks: they decide together, now that they can talk
                plan = make_plan(cfg, derived.total_steps)
                for w in plan.warnings if layout.rank == 0 else ():
                    warn(w)
            if plan.action == COMPLETE:
                return _stop((EXIT_OK, plan.message if layout.rank == 0 else None))
            # train.cuda_graph: the whole run, model building included, on one side stream
            # (capture cannot use the default stream, and megatron's DDP keeps AccumulateGrad
            # nodes that belong to the stream they were made on).
            with step_stream(cfg.train.cuda_graph):
                return session.train(cfg, derived, layout, preempt, plan, extra_callbacks)
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


def _preflight(cfg: Config, derived: Derived, locks: RunLocks
               ) -> tuple[tuple[int, str | None] | None, Any]:
    """Rank 0, before anything is built: take the run's locks, then (a single process: it
    needs no peers) decide from the checkpoints what to start from. Returns (exit code and line
    to stop with, or None; the ``ResumePlan``, or None when the ranks make it together)."""
    try:
        for w in locks.acquire():
            warn(w)
    except (ConfigError, OSError) as e:
        return (EXIT_CONFIG, f"error: {e}"), None
    if launch.world_size() > 1:
        return None, None
    from megatron_ext.checkpoint import plan  # megatron: only once the locks are held
    from megatron_ext.checkpoint.store import CheckpointError

    try:
        made = plan.make_plan(cfg, derived.total_steps)
    except (CheckpointError, OSError) as e:
        return (EXIT_CONFIG, f"error: {e}"), None
    for w in made.warnings:
        warn(w)
    return ((EXIT_OK, made.message) if made.action == plan.COMPLETE else None), made


def _agree(stop: tuple[int, str | None] | None, layout: Any):
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


def _stop(stop: tuple[int, str | None]) -> int:
    code, line = stop
    if line:
        print(one_line(line), file=sys.stdout if code == EXIT_OK else sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None, extra_callbacks: Sequence[Factory] = ()) -> int:
    """pretrain_moe.py's entry point. The signal handlers come first, before the heavy imports
    (``megatron_ext.training.signals`` says what each signal does in each phase). After a
    start-up signal or a Ctrl-C the process ends here (exit 0 or 130), without returning.
    ``extra_callbacks``: factories ``Run -> Callback`` added to the run's callbacks (a launcher
    of one's own, e.g. a test's)."""
    safe_console()  # a character the terminal cannot show is escaped, never a traceback
    preempt = signals.install()
    children.bind_helpers()  # megatron's checkpoint writers end with this process
    if children.launched_by_torchrun():  # torchrun starts workers in sessions of their own
        children.die_with_parent()       # so a kill -9 of its process group misses them
    return signals.run(lambda: _main(argv, preempt, extra_callbacks))


def _main(argv: list[str] | None, preempt: Preemption, extra_callbacks: Sequence[Factory]) -> int:
    try:
        args = parse_args(argv)
    except UsageError as e:
        return _fail(f"error: {e}")
    info_only = args.print_config or args.dry_run or args.plan
    try:
        # W&B's environment variables go between the config file and --set (wandb_sink)
        cfg = load_config(args.config, [*wandb_sink.env_overrides(), *args.overrides])
        # --dry-run / --print-config reason about the planned size (parallel.world_size); a
        # training launch is checked against the processes it really has.
        launched = launch.world_size()
        validate(cfg, world_size=planned_world_size(cfg, launched) if info_only else launched)
        derived = derive(cfg)  # once: the run's layers take these instead of recomputing them
        if cfg.logging.wandb.name is None and args.config:
            cfg.logging.wandb.name = Path(args.config).stem
        if cfg.logging.output_dir is None:  # per config: two configs never share metrics.jsonl
            cfg.logging.output_dir = f"runs/{Path(args.config).stem if args.config else 'default'}"
        if not info_only:
            check_paths(cfg)
            check_run_io(cfg, args.config)  # outputs vs inputs, no run file through a link
    except UserError as e:  # the config, or the launcher's environment
        return _fail(f"config error: {e}")
    if args.print_config:
        print(to_yaml(cfg), end="")
        return EXIT_OK
    if args.dry_run:
        return dry_run.main(cfg, is_rank0())
    if args.plan:
        return dry_run.plan_main(cfg, args.nodes, None if args.plan_all else PLAN_TOP, is_rank0())
    # Here, not at the top: the checkpoint layer imports megatron-core (seconds), which
    # --print-config, --dry-run and a start-up signal do without.
    from megatron_ext.checkpoint.manifest import content_checks

    try:  # the plan takes the policy from cfg; the writer's pruning from here
        with content_checks(cfg.checkpoint.verify_checksums):
            return train_main(cfg, derived, preempt, extra_callbacks)
    except UserError as e:  # found while building (backend, tokenizer, data) or capturing
        return _fail(f"error: {e}")
    except Exception as e:  # noqa: BLE001 - report, then a distinct exit code for the launcher
        preempt.check()  # a failure that follows a signal (a peer rank left) is that signal
        if (what := out_of_memory(e)) is not None:  # a limit, not a bug: the rank that hit it
            print(one_line(f"error: out of memory on rank {launch.launch().rank}: {what}"),
                  file=sys.stderr, flush=True)
            return EXIT_FAILED
        traceback.print_exc()
        return EXIT_FAILED


def _fail(line: str) -> int:
    if is_rank0():
        print(one_line(line), file=sys.stderr, flush=True)  # one line, whatever the message held
    return EXIT_CONFIG
