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

from megatron_ext.analysis.curves import plot, read_run, summary_table
from megatron_ext.config.args import float_arg
from megatron_ext.errors import UsageError
from megatron_ext.platform.cli import ArgumentParser, run_cli
from megatron_ext.platform.fs import check_disjoint


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
    curves, runs = [], []
    for item in args.run:
        label, sep, run_dir = item.partition("=")
        if not sep or not label or not run_dir:
            raise UsageError(f"--run {item!r}: expected LABEL=RUN_DIR")
        curves.append(read_run(label, Path(run_dir)))
        runs.append(("--run", run_dir))
    check_disjoint(args.output, runs)  # the plot goes beside a run, never into or around it
    args.output.mkdir(parents=True, exist_ok=True)
    png, md = args.output / "loss_curves.png", args.output / "loss_curves.md"
    plot(curves, png.with_suffix(".tmp.png"), args.smooth, args.log_x)
    png.with_suffix(".tmp.png").replace(png)  # written whole or not at all
    md.write_text("# Loss curves\n\n" + summary_table(curves))
    print(summary_table(curves), end="")
    print(f"loss_curves: wrote {png} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
