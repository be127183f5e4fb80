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

import errno
import re

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


# How an allocation failure reads where it is not a MemoryError: torch's CPU allocator raises a
# plain RuntimeError with this text (torch 2.x: "can't allocate memory", older "not enough
# memory"), and libraries that report errno ENOMEM in their own error (safetensors' failed mmap)
# use its C text; CUDA's is torch.OutOfMemoryError, matched by name: this module needs no torch.
_ALLOCATOR_FAILED = re.compile(
    r"DefaultCPUAllocator: (can't allocate|not enough) memory|Cannot allocate memory")
_ENFORCE_PREFIX = re.compile(r"^\[enforce fail at [^\]]*\][^.]*\.\s*")
# a traceback's last line for either: "MemoryError", "torch.OutOfMemoryError: CUDA out of ..."
_RAISED_LINE = re.compile(r"^(?:[\w.]*\.)?(?:MemoryError|OutOfMemoryError)\b:?\s*(.*)$")
_TYPE_PREFIX = re.compile(r"^[\w.]*(Error|Exception): ")


def out_of_memory(error: BaseException) -> str | None:
    """The allocation failure behind ``error``, as one line (torch's ``[enforce fail at ...]``
    prefix dropped), or None when ``error`` is not one: a ``MemoryError``, a CUDA
    ``OutOfMemoryError``, torch's CPU allocator error, anywhere in ``error``'s chain of causes
    and contexts (a library that re-raises it as its own error keeps it there)."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = one_line(e)
        if (isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"
                or (isinstance(e, OSError) and e.errno == errno.ENOMEM)
                or _ALLOCATOR_FAILED.search(text)):
            return _ENFORCE_PREFIX.sub("", text) if str(e).strip() else "no memory left"
        e = e.__cause__ or e.__context__
    return None


def out_of_memory_in(text: str) -> str | None:
    """The first allocation failure that ``text`` reports (a formatted traceback, or a
    library's report that holds one where it kept no exception), as ``out_of_memory`` words
    it; None when it reports none."""
    for line in text.splitlines():
        line = line.strip()
        if (m := _RAISED_LINE.match(line)) is not None:
            return _ENFORCE_PREFIX.sub("", m.group(1)) or "no memory left"
        if _ALLOCATOR_FAILED.search(line):
            return _ENFORCE_PREFIX.sub("", _TYPE_PREFIX.sub("", line))
    return None


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
