"""Progress of a long-running tool: tqdm's bar on a terminal, plain lines with an ETA in a log.

Every tool that runs longer than a few seconds (conversions, upcycling, preprocessing, routing
analysis, lm-eval) reports through ``Progress``, on stderr (stdout carries results). On a
terminal it is tqdm's bar, redrawn in place. When stderr is a file or a pipe (a SLURM log,
``| tee``), a redrawn bar would be one ever-growing line of carriage returns, so instead one
plain line is written every ``MOE_PROGRESS_INTERVAL`` seconds (environment, default 10), the
first only after that long (a short run prints nothing), and a last one at the end if any was
written. Each line has the share done, the rate, the elapsed time and the ETA (tqdm's number
and time formats)::

    upcycle: 45% (450/1,000 tensors) | 37.5 tensors/s | elapsed 00:12 | ETA 00:14
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Any

from tqdm import tqdm

INTERVAL_ENV = "MOE_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 10.0


def _interval() -> float:
    try:
        value = float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_S))
    except ValueError:
        return DEFAULT_INTERVAL_S
    return value if value >= 0 else DEFAULT_INTERVAL_S  # NaN and negatives: the default


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """``total`` units of work named ``desc``; ``update(n)`` or ``update_to(done)`` as it goes,
    ``close()`` (or a ``with`` block) at the end. ``info`` keywords are shown beside the count
    (e.g. documents and tokens of a preprocessing run). ``unit_scale``: 1.2M instead of 1234567
    (bytes: binary multiples). ``enabled=False`` shows nothing."""

    def __init__(self, total: float, desc: str, *, unit: str = "it", unit_scale: bool = False,
                 enabled: bool = True, stream: IO[str] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.desc, self.unit, self.unit_scale = total, desc, unit, unit_scale
        self.enabled = enabled
        self.n: float = 0
        self.info = ""
        self.start = self.last = time.monotonic()
        self.interval = _interval()
        self.lines = 0
        self.divisor = 1024 if unit == "B" else 1000
        self.bar = (tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale,
                         unit_divisor=self.divisor, file=self.stream, dynamic_ncols=True)
                    if enabled and _is_terminal(self.stream) else None)

    def update(self, n: float = 1, **info: Any) -> None:
        self.update_to(self.n + n, **info)

    def update_to(self, done: float, **info: Any) -> None:
        self.n = done
        if info:
            self.info = ", ".join(f"{key} {value:,}" if isinstance(value, int) else
                                  f"{key} {value}" for key, value in info.items())
        if self.bar is not None:
            if info:
                self.bar.set_postfix_str(self.info, refresh=False)
            self.bar.update(done - self.bar.n)
            return
        now = time.monotonic()
        if self.enabled and now - self.last >= self.interval:
            self._line(now)

    def line(self, now: float | None = None) -> str:
        """The plain progress line as of ``now`` (see the module docstring)."""
        elapsed = (time.monotonic() if now is None else now) - self.start
        rate = self.n / elapsed if elapsed > 0 and self.n > 0 else None
        share = f"{100 * self.n / self.total:.0f}%" if self.total else "?%"
        eta = tqdm.format_interval(max(self.total - self.n, 0) / rate) \
            if rate and self.total else "?"
        if self.unit_scale:  # 1.43MB/2.86MB, 41.0MB/s
            done = f"{self._size(self.n)}/{self._size(self.total)}"
            speed = f"{self._size(rate or 0)}/s"
        else:  # 450/1,000 tensors, 37.5 tensors/s
            done = f"{self.n:,.0f}/{self.total:,.0f} {self.unit}"
            speed = f"{rate or 0:,.1f} {self.unit}/s"
        text = (f"{self.desc}: {share} ({done}) | {speed} | "
                f"elapsed {tqdm.format_interval(elapsed)} | ETA {eta}")
        return f"{text} | {self.info}" if self.info else text

    def _size(self, value: float) -> str:
        return tqdm.format_sizeof(value, self.unit, self.divisor)

    def _line(self, now: float) -> None:
        self.last = now
        self.lines += 1
        self.stream.write(self.line(now) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.lines:  # a log that had progress lines gets the final one
            self._line(time.monotonic())
            self.lines = 0

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
