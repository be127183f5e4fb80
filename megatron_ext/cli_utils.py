"""The command-line convention shared by the conversion tools: bad usage is one line, exit 2;
a failure is one line, exit 1."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Callable


class UsageError(Exception):
    """Raised by OneLineParser instead of printing usage + message and exiting."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors become ``UsageError`` so the tool prints a single line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def run_tool(prog: str, work: Callable[[], Path], usage: tuple = (), failures: tuple = ()) -> int:
    """Run a converter's ``work`` (parse args, write, return the output path) with the shared
    exit codes: 0 done; 2 bad usage/input (``UsageError`` and ``usage``), one line on stderr;
    1 ``failures`` and I/O errors. SLURM and friends stop jobs with SIGTERM: it becomes
    SystemExit, so staged output is removed on the way out, as for Ctrl-C."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        output = work()
    except (UsageError, *usage) as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except (OSError, *failures) as e:
        print(f"{prog}: failed: {one_line(e)}", file=sys.stderr)
        return 1
    print(f"{prog}: wrote {output}")
    return 0


def conversion_parser(prog: str, doc: str, input_help: str, output_help: str,
                      validation_help: str) -> OneLineParser:
    """The arguments every converter takes: --input, --output, --overwrite, --skip-validation."""
    p = OneLineParser(prog=prog, description=doc,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, type=Path, help=input_help)
    p.add_argument("--output", required=True, type=Path, help=output_help)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--skip-validation", action="store_true", help=validation_help)
    return p
