"""Console output of a training run: progress on stdout, warnings on stderr, one line each."""

from __future__ import annotations

from megatron_ext.platform.cli import warn as _warn


def log(msg: str) -> None:
    print(msg, flush=True)


def warn(msg: str) -> None:
    """``WARNING: msg`` on stderr: the same line a tool prints (``platform.cli.warn``)."""
    _warn(msg)


def reason(e: BaseException) -> str:
    """An exception as one short line (wandb's messages span lines and give advice)."""
    text = " ".join(str(e).split()) or "no message"
    text = text.split(" Consider increasing")[0]  # wandb's hint names a setting we already set
    return f"{type(e).__name__}: {text}"[:300]
