"""Downstream tasks through lm-evaluation-harness on our checkpoint or on an HF directory.

    moe-lm-eval --checkpoint runs/tiny-cpu/checkpoints --tasks demo_local \\
        --output runs/tiny-cpu/lm_eval
    moe-lm-eval --checkpoint HF_DIR --tasks hellaswag,arc_easy --limit 100
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_ext.config.args import field_arg, float_arg, int_arg
from megatron_ext.errors import UserError
from megatron_ext.evaluation.wandb_results import append_results
from megatron_ext.evaluation.wandb_results import run_id as wandb_run_id
from megatron_ext.platform.cli import ArgumentParser, run_cli
from megatron_ext.platform.quiet import quiet_process

PROG = "lm_eval"
EPILOG = """\
CHECKPOINT: our checkpoint (a root with `latest`, or one iter_* dir, any expert/tensor-parallel
layout: it is resharded into this one process) evaluated by our model through lm-eval's LM
interface; or an HF model directory (or --hf), evaluated by lm-eval's own HF model.
tasks: lm-eval's names, groups or tags, plus the local ones in tasks/ (demo_en_mc, demo_ja_mc,
demo_en_gen, demo_en_ppl, demo_ja_ppl; tag demo_local), which need no network.
tokenizer: --tokenizer, else the checkpoint's data.tokenizer, else the demo tokenizer when the
checkpoint was trained with data.demo_corpus; for an HF directory, its own tokenizer files.
outputs: DIR/results.json (lm-eval's), DIR/results.md (its table), DIR/samples/<task>.jsonl
with --log-samples; each file written atomically. --wandb-run-dir RUNDIR: the metrics also go
to the W&B run of that training run (RUNDIR/wandb_run_id) as lm_eval/<task>/<metric>.
exit codes: 0 ok, 2 bad input (one line on stderr), 1 unexpected failure, 130 Ctrl-C, 143 SIGTERM.
"""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0], epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="our checkpoint or an HF dir")
    p.add_argument("--tasks", required=True, help="comma-separated task, group or tag names")
    p.add_argument("--output", type=Path, default=Path("runs/lm_eval"),
                   help="results directory (default: runs/lm_eval)")
    p.add_argument("--limit", type=float_arg(0, 2**31, lo_open=True), default=None,
                   help="at most N examples per task (a fraction if < 1)")
    p.add_argument("--batch-size", type=field_arg("eval.batch_size"), default=8)
    p.add_argument("--num-fewshot", type=int_arg(0, 1024), default=None)
    p.add_argument("--hf", action="store_true",
                   help="evaluate with lm-eval's HF model (CHECKPOINT is an HF directory)")
    p.add_argument("--tokenizer", default=None, help="override the tokenizer (path)")
    p.add_argument("--log-samples", action="store_true",
                   help="also write every request and response to DIR/samples/")
    p.add_argument("--bootstrap-iters", type=int_arg(0, 10**6), default=1000,
                   help="bootstrap resamples for standard errors (0: none)")
    p.add_argument("--seed", type=field_arg("train.seed"), default=1234)
    p.add_argument("--wandb-run-dir", type=Path, default=None,
                   help="also log the results into this training run directory's W&B run "
                        "(offline unless WANDB_MODE=online)")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(_evaluate, argv)


def _evaluate(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UserError("no task given (--tasks a,b,...)")
    if args.batch_size < 1 or (args.limit is not None and args.limit <= 0):
        raise UserError("--batch-size and --limit must be positive")
    if not args.checkpoint.exists():  # before the slow imports
        raise UserError(f"{args.checkpoint}: checkpoint not found")
    if args.wandb_run_dir is not None:  # before the evaluation, not after it
        wandb_run_id(args.wandb_run_dir)
    quiet_process(all_from_internals=True)  # before megatron is imported: its notices are noise
    # why inside: lm-eval, torch and megatron-core take seconds to import; --help does not
    from megatron_ext.conversion.hf_io import INDEX_NAME, SINGLE_NAME, HFCheckpoint
    from megatron_ext.evaluation import harness
    from megatron_ext.platform.dist import shutdown

    hf_weights = (args.checkpoint / INDEX_NAME, args.checkpoint / SINGLE_NAME)
    if (args.hf or harness.is_hf_dir(args.checkpoint)) and any(p.is_file() for p in hf_weights):
        # a damaged file is one line now, not a traceback from lm-eval's loader; any dtype:
        # this may be any HF model, whose buffers need not be floating point
        HFCheckpoint(args.checkpoint, float_only=False)
    manager = harness.task_manager(tasks)
    harness.check_tasks(manager, tasks)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    try:
        lm = harness.build_lm(args.checkpoint, args.batch_size, hf=args.hf,
                              tokenizer=args.tokenizer)
        harness.check_output(args.output, args.checkpoint, args.tokenizer, lm)
        results = harness.evaluate(lm, tasks, manager, limit=limit, num_fewshot=args.num_fewshot,
                                   log_samples=args.log_samples,
                                   bootstrap_iters=args.bootstrap_iters, seed=args.seed)
    finally:
        shutdown()
    harness.write_results(results, args.output)
    print(harness.markdown(results))
    print(f"{PROG}: wrote {args.output / 'results.json'} and {args.output / 'results.md'}")
    if args.wandb_run_dir is not None:
        print(f"{PROG}: logged to W&B in {append_results(results, args.wandb_run_dir)}")
    return 0


if __name__ == "__main__":  # the guard matters: dist_checkpointing starts worker processes
    sys.exit(main())
