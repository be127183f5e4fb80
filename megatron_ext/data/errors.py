"""The one exception type of the data pipeline, and the CLI convention around it.

Every user-facing data problem (missing file, bad tokenizer, malformed input under --strict,
vocabulary mismatch) raises ``DataError`` with a one-line message. CLIs turn it into exactly one
line on stderr and exit code 2, so scripts and SLURM logs show the cause, not a traceback.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Callable, Sequence

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class DataError(ValueError):
    """A problem with user-provided data, paths or settings; the message is one line."""

    def __init__(self, message: str) -> None:
        # Keep the message on one line whatever the caller formatted into it.
        super().__init__(" ".join(str(message).split()))


class Terminated(BaseException):
    """Raised in the main process on SIGTERM so that ``finally`` blocks clean up temp files.

    A BaseException (like KeyboardInterrupt) so that ``except Exception`` does not swallow it.
    """


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the one-line convention: usage errors print one line and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a CLI entry point with the data pipeline's error convention.

    DataError -> one line on stderr, exit 2. Ctrl-C -> exit 130, SIGTERM -> exit 143; both after
    the library's cleanup handlers (``finally``) have removed temporary outputs.
    """
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return main(argv)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("error: interrupted, temporary outputs removed", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print("error: terminated (SIGTERM), temporary outputs removed", file=sys.stderr)
        return EXIT_TERMINATED
    finally:
        signal.signal(signal.SIGTERM, previous)
