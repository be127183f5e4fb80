"""Console output of a training run: progress on stdout, warnings on stderr, one line each.

A run on random tokens (``data.mock``) says so: its first line is ``mock_banner``, every later
line of ``log`` ends in `` | MOCK DATA`` (``mark_lines``) and its W&B run carries ``MOCK_TAG``.
The mark goes at the end: scripts and tests match lines by their start (``step 3/``).
"""

from __future__ import annotations

import math

from megatron_ext.platform.cli import warn as _warn

MOCK_MARK = "MOCK DATA"
MOCK_TAG = "mock-data"
_suffix = ""  # what every log line ends with (mark_lines)


def mock_banner(vocab_size: int) -> str:
    return (f"{MOCK_MARK}: training on random tokens (data.mock: true), not on data: the loss "
            f"stays near ln(vocab) = {math.log(vocab_size):.2f}; set data.blend and "
            "data.tokenizer (or data.demo_corpus: true) to train on text")


def mark_lines(mark: str | None) -> None:
    """End every later ``log`` line with `` | mark`` (None: no mark)."""
    global _suffix
    _suffix = f" | {mark}" if mark else ""


def log(msg: str) -> None:
    print(msg + _suffix, flush=True)


def warn(msg: str) -> None:
    """``WARNING: msg`` on stderr: the same line a tool prints (``platform.cli.warn``)."""
    _warn(msg)


def reason(e: BaseException) -> str:
    """An exception as one short line (wandb's messages span lines and give advice)."""
    text = " ".join(str(e).split()) or "no message"
    text = text.split(" Consider increasing")[0]  # wandb's hint names a setting we already set
    return f"{type(e).__name__}: {text}"[:300]
