"""Compare the loss curves of several runs (training and validation loss vs tokens).

    moe-loss-curves --run du=runs/du --run nu=runs/naive \
        --run scratch=runs/scratch --output runs/compare [--smooth 0.9] [--log-x]

Each RUN_DIR is a training run's ``logging.output_dir`` (it holds metrics.jsonl). Writes
``loss_curves.png`` and ``loss_curves.md`` (final losses) into --output. Exit 2 with one line
for a missing or unreadable run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_ext.analysis.curves import read_run, summary_table, write_report
from megatron_ext.config.args import float_arg
from megatron_ext.errors import UsageError
from megatron_ext.platform.cli import ArgumentParser, run_cli
from megatron_ext.platform.fs import check_io


def main(argv: list[str] | None = None) -> int:
    return run_cli(_compare, argv)


def _compare(argv: list[str] | None) -> int:
    p = ArgumentParser(prog="loss_curves", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, metavar="LABEL=RUN_DIR")
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--smooth", type=float_arg(0, 1, hi_open=True), default=0.0,
                   help="EMA weight in [0, 1)")
    p.add_argument("--log-x", action="store_true", help="logarithmic token axis")
    args = p.parse_args(argv)
    if not 0.0 <= args.smooth < 1.0:
        raise UsageError(f"--smooth {args.smooth} is outside [0, 1)")
    runs = []
    for item in args.run:
        label, sep, run_dir = item.partition("=")
        if not sep or not label or not run_dir:
            raise UsageError(f"--run {item!r}: expected LABEL=RUN_DIR")
        runs.append((label, run_dir))
    # the plot goes beside a run, never into or around it; checked before any reading
    check_io([("--output", args.output)], [("--run", run_dir) for _, run_dir in runs])
    curves = [read_run(label, Path(run_dir)) for label, run_dir in runs]
    png, md = write_report(curves, args.output, args.smooth, args.log_x)  # each file whole
    print(summary_table(curves), end="")
    print(f"loss_curves: wrote {png} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
