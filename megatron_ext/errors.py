"""The one family of user-facing errors: every fault the user can cause or fix is a ``UserError``.

A CLI (``megatron_ext.platform.cli.run_cli``) turns any ``UserError`` into exactly one line on
stderr and its ``exit_code``; everything else is a bug and keeps its traceback. Each layer
subclasses it for its own faults (``ConfigError``, ``DataError``, ``CheckpointError``, ...), so
callers can catch one layer's faults or all of them. This module is the bottom layer: it
imports nothing of ours.

The subclasses also derive from the builtin type they replaced (``ValueError`` or
``RuntimeError``), so code that catches those keeps working.
"""

from __future__ import annotations

# Process exit codes shared by every entry point (megatron_ext.cli: training and the tools).
EXIT_OK = 0
EXIT_FAILED = 1  # unexpected error (traceback) or a failed check of our own output
EXIT_USER = 2  # bad config, path, data, checkpoint or usage: one line on stderr
EXIT_NONFINITE = 4  # training stopped: too many non-finite steps
EXIT_INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT
EXIT_TERMINATED = 143  # SIGTERM outside training (tools): 128 + SIGTERM


def one_line(message: object) -> str:
    """``message`` (text or an exception) on one line: whitespace runs, newlines included,
    collapsed to one space; an exception without text is named by its type."""
    return " ".join(str(message).split()) or type(message).__name__


class UserError(Exception):
    """A fault the user can fix; the message is one line naming the file, field or path."""

    exit_code = EXIT_USER

    def __init__(self, message: object = "") -> None:
        # One line whatever the caller formatted into it (paths and values can hold newlines).
        super().__init__(" ".join(str(message).split()))


class UsageError(UserError):
    """Bad command-line usage (raised by the shared argument parser instead of exiting)."""


class CheckFailed(UserError):
    """Our own output failed a check (e.g. an upcycled model does not reproduce its dense base):
    not a bad input, so exit 1, but still one line rather than a traceback."""

    exit_code = EXIT_FAILED
