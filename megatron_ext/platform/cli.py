"""The one way a command-line tool runs: its argument parser and its exit codes.

Every tool of ``megatron_ext.cli`` is ``main(argv) -> int`` returning ``run_cli(work, argv)``, and
its parser is ``ArgumentParser``. What the user sees, whatever the tool:

* bad usage (a missing or malformed argument): one line ``error: MESSAGE (see --help)``, exit 2;
* a ``megatron_ext.errors.UserError`` (bad config, path, data, checkpoint; ``CheckFailed``):
  one line ``error: MESSAGE``, the error's ``exit_code`` (2, or 1 for ``CheckFailed``);
* an ``OSError`` (disk full, permission denied): one line ``error: MESSAGE``, exit 1;
* running out of memory (``errors.out_of_memory``: Python's, torch's CPU or CUDA allocator's,
  also when a library re-raised it as its own error): ``error: out of memory: MESSAGE``, exit 1;
* Ctrl-C: exit 130, SIGTERM (SLURM's scancel, a preemption): exit 143; both with one line and
  only after the tool's ``finally`` blocks have removed its temporary outputs (SIGTERM is raised
  as ``Terminated``, a BaseException like KeyboardInterrupt, so ``except Exception`` in library
  code does not swallow it);
* anything else is a bug: its traceback, exit 1.

Output never fails on a character the terminal's encoding lacks (``PYTHONIOENCODING=ascii``, a
Latin-1 terminal): ``safe_console`` makes stdout and stderr write it as a backslash escape.
Warnings go through ``warn`` (``WARNING: ...`` on stderr, rank 0 only), training's and every
tool's alike.

Standard library, ``megatron_ext.errors`` and ``platform.launch`` only: a tool's ``--help`` and
usage errors come back before torch is imported.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

from megatron_ext.errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    UsageError,
    UserError,
    one_line,
    out_of_memory,
)
from megatron_ext.platform.launch import is_rank0

INTERRUPTED_LINE = "error: interrupted, temporary outputs removed"
TERMINATED_LINE = "error: terminated (SIGTERM), temporary outputs removed"
Main = Callable[[Sequence[str] | None], int | None]
T = TypeVar("T")
_WARNED: set[str] = set()


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM so that ``finally`` blocks clean up temp files.

    A BaseException (like KeyboardInterrupt) so that ``except Exception`` does not swallow it."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors raise ``UsageError`` (one line, exit 2 from ``run_cli``)
    instead of printing the usage block and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see --help)")


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def _fail(line: str, code: int) -> int:
    print(line, file=sys.stderr, flush=True)
    return code


def safe_console() -> None:
    """stdout and stderr write a character their encoding cannot hold as a backslash escape
    instead of raising UnicodeEncodeError (a Japanese prompt on an ASCII terminal)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):  # not a text stream we can reconfigure
            pass


def warn(message: str, *, once: bool = False) -> None:
    """One ``WARNING:`` line on stderr, from rank 0 only; ``once``: a message already printed
    by this process is not printed again (a tool that reads a checkpoint twice)."""
    line = one_line(message)
    if once and line in _WARNED:
        return
    _WARNED.add(line)
    try:
        rank0 = is_rank0()
    except UserError:  # a malformed launcher environment: reported where it matters
        rank0 = True
    if rank0:
        print(f"WARNING: {line}", file=sys.stderr, flush=True)


def warned(result: tuple[T, Iterable[str]]) -> T:
    """The value of a ``(value, warnings)`` result, its warnings printed (``warn``, once each):
    how a checkpoint root that fell back to an older checkpoint says so, in every tool."""
    value, warnings = result
    for message in warnings:
        warn(message, once=True)
    return value


def run_cli(main: Main, argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)`` with the shared exit codes (see the module docstring); returns the
    code, ``main``'s own (None = 0) when it ends normally."""
    safe_console()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        code = main(argv)
        return EXIT_OK if code is None else int(code)
    except UserError as e:
        return _fail(f"error: {e}", e.exit_code)
    except Exception as e:  # the machine's faults, not the input's, nor bugs:
        if (what := out_of_memory(e)) is not None:  # ... its memory
            return _fail(f"error: out of memory: {what}", EXIT_FAILED)
        if isinstance(e, OSError):  # ... disk full, permissions, ...
            return _fail(f"error: {one_line(e)}", EXIT_FAILED)
        raise
    except KeyboardInterrupt:
        return _fail(INTERRUPTED_LINE, EXIT_INTERRUPTED)
    except Terminated:
        return _fail(TERMINATED_LINE, EXIT_TERMINATED)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def conversion_parser(prog: str, doc: str, input_help: str, output_help: str,
                      validation_help: str) -> ArgumentParser:
    """The arguments every converter takes: --input, --output, --overwrite, --skip-validation,
    --no-verify-checksums."""
    p = ArgumentParser(prog=prog, description=doc,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, type=Path, help=input_help)
    p.add_argument("--output", required=True, type=Path,
                   help=f"{output_help}; never an input, inside one or around one")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--skip-validation", action="store_true", help=validation_help)
    p.add_argument("--no-verify-checksums", action="store_true",
                   help="check megatron checkpoint file sizes only, not their recorded checksums "
                        "(saves a full read of a huge checkpoint)")
    return p
