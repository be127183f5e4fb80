"""The paper's comparison of MoE initializations in one command, each stage a subprocess.

    moe-compare-inits --config configs/tiny-cpu.yaml \\
        --methods scratch,naive,drop:0.5 --tokens 200000 --train-dense 200000 --output runs/compare

Stages: dense base (moe-pretrain with moe.num_experts=0, unless --dense gives one) -> per
method an initialization (moe-upcycle --config; scratch: none) -> its training
(moe-pretrain, identical config, seed, data order, schedule and steps; checkpoint.load = the
upcycled model) -> downstream tasks (moe-lm-eval, with --tasks) -> routing by domain
(moe-routing on the held-out end of the demo corpus' en/ja/code files) ->
DIR/report.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from megatron_ext.config.args import field_arg, float_arg, int_arg
from megatron_ext.experiments.plan import (
    KINDS,
    Experiment,
    build_stages,
    check_stage_configs,
    parse_methods,
)
from megatron_ext.platform.cli import ArgumentParser, run_cli
from megatron_ext.platform.fs import check_io
from megatron_ext.platform.quiet import quiet_process

quiet_process()  # before megatron is imported: its import-time notices are noise here

EPILOG = f"""\
methods: {', '.join(KINDS)}; drop and noise take the ratio r (drop:0.5, noise:0.5).
btx (Branch-Train-MiX): the dense base trained further on each demo domain (code, en, ja) for
--btx-tokens each; experts from the base and the branches (num_experts divisible by 4).
tokens: each MoE run trains ceil(TOKENS / (global_batch_size * seq_length)) steps.
rerun the same command to resume: finished stages (outputs that verify) are skipped, an
interrupted training resumes from its checkpoint. A DIR holding another experiment (config,
methods, tokens, ...) is refused unless --overwrite (which deletes it first).
outputs: DIR/report.md, report.json, curves.png, stages.json (each stage's command, wall time,
tokens), logs/<stage>.log, dense/, init/<method>/, train/<method>/, routing/<method>/, eval/.
exit codes: 0 ok, 2 bad input or a stage's bad input (one line), 1 a stage failed, 130 Ctrl-C.
--slurm: submit one sbatch job per unfinished stage instead, each waiting (afterok) for the
jobs of the stages it reads, so the methods' trainings run in parallel (trainings through
scripts/slurm/launcher.sh, the tools as `srun python` in one task), and a last job that writes
the report (--report-only); print one line per job and exit 0 at once. --sbatch-args="..."
(with `=`) goes to every job, e.g. --sbatch-args="--partition=gpu --time=4:00:00". Logs:
DIR/logs/<stage>-<job id>.out; job ids and sbatch commands: DIR/stages.json. Rerun the same
command to resubmit what failed: jobs still queued or running are kept, not duplicated.
--report-only: write the report of finished stages; exit 2 naming a stage that is not.
"""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, type=Path, help="config of the MoE runs")
    p.add_argument("--methods", required=True, help="comma-separated, e.g. scratch,naive,drop:0.5")
    p.add_argument("--tokens", required=True, type=field_arg("train.train_tokens"),
                   help="training tokens per method")
    p.add_argument("--output", required=True, type=Path, help="experiment directory")
    base = p.add_mutually_exclusive_group(required=True)
    base.add_argument("--dense", type=Path, help="dense base: our checkpoint or an HF dir")
    base.add_argument("--train-dense", type=field_arg("train.train_tokens"), metavar="TOKENS",
                      help="train the dense base first, for TOKENS tokens")
    p.add_argument("--tasks", help="downstream tasks for moe-lm-eval (e.g. demo_local)")
    p.add_argument("--eval-limit", type=float_arg(0, 2**31, lo_open=True), metavar="N",
                   help="with --tasks: at most N examples per task (a fraction if < 1)")
    p.add_argument("--routing-tokens", type=int_arg(1, 2**31 - 1), default=20_000,
                   help="tokens per domain")
    p.add_argument("--btx-tokens", type=field_arg("train.train_tokens"), metavar="TOKENS",
                   help="btx: training tokens of each domain branch (default: --tokens / 4)")
    p.add_argument("--nproc-per-node", type=field_arg("cluster.gpus_per_node"), default=1,
                   metavar="N",
                   help="local backend: run each training under torchrun with N processes "
                        "(this node's GPUs; on CPU, N gloo processes); default 1")
    p.add_argument("--overwrite", action="store_true", help="replace a different experiment")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="config override for every stage (repeatable), as pretrain_moe.py --set")
    p.add_argument("--slurm", action="store_true", help="submit the stages as SLURM jobs")
    p.add_argument("--sbatch-args", default="", metavar="ARGS",
                   help="sbatch options for every job (--slurm)")
    p.add_argument("--report-only", action="store_true", help="only write the report")
    args = p.parse_args(argv)
    try:
        args.sbatch_args = shlex.split(args.sbatch_args)
    except ValueError as e:
        p.error(f"--sbatch-args: {e}")
    if args.sbatch_args and not args.slurm:
        p.error("--sbatch-args needs --slurm")
    if args.slurm and args.nproc_per_node != 1:  # the launcher starts GPUS_PER_NODE per node
        p.error("--nproc-per-node is for the local backend; with --slurm, give the job's GPUs "
                "in --sbatch-args (--gpus-per-node=N)")
    if args.report_only and (args.slurm or args.overwrite):
        p.error("--report-only goes without --slurm and --overwrite")
    for flag in ("tokens", "train_dense", "routing_tokens", "btx_tokens", "nproc_per_node"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be a positive number")
    return args


def _compare(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    exp = Experiment(args.config, args.overrides, parse_methods(args.methods), args.tokens,
                     args.output, dense=args.dense, dense_tokens=args.train_dense or 0,
                     tasks=args.tasks, eval_limit=args.eval_limit,
                     routing_tokens=args.routing_tokens,
                     btx_tokens=args.btx_tokens, procs=args.nproc_per_node)
    stages = build_stages(exp)
    check_stage_configs(exp, stages)
    check_io([("--output", exp.output)], exp.inputs())  # --overwrite deletes it: no input in it
    # why inside: these import megatron-core (seconds); --help and usage errors stay fast
    from megatron_ext.experiments import slurm
    from megatron_ext.experiments.report import write_report
    from megatron_ext.experiments.runner import (
        check_dense,
        prepare_output,
        run_stages,
        write_heldout,
    )

    if args.report_only:  # the last job of --slurm
        write_report(exp, slurm.finished_ledger(exp))
        print(f"compare: report {exp.output / 'report.md'}")
        return 0
    queue, live = slurm.connect(exp, args.slurm)
    if exp.dense is not None:
        check_dense(exp)
    prepare_output(exp.output, exp.fingerprint(), args.overwrite)
    write_heldout(exp)
    if args.slurm:
        slurm.submit(exp, queue, live, args.sbatch_args)
        return 0
    ledger = run_stages(stages, exp.output)
    write_report(exp, ledger)
    print(f"compare: report {exp.output / 'report.md'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_compare, argv)


if __name__ == "__main__":
    sys.exit(main())
