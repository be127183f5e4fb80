"""The one reader of a run's ``metrics.jsonl`` (the loss curves, the comparison's report).

The file is the training loop's record (``training.loggers.MetricsWriter``): one JSON object per
line with ``kind`` ("train", "valid", ...), an integer ``step`` and, for training records, the
``tokens`` consumed. It is read as data from anywhere (a copied run, a half-written line after
a kill, a hand-edited file), so every line is checked: a line that is not UTF-8, not JSON, not
an object, longer than ``MAX_LINE_BYTES`` or without a non-negative integer ``step`` (and
``tokens`` for training records) is skipped and counted, and the reader prints one warning
naming the count and the first such line. A file with no usable training record is one error
line (``MetricsError``, exit 2), the skipped lines' count included. Values are taken only when
finite numbers (``finite``): non-finite losses are logged as strings.
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from megatron_ext.errors import UserError
from megatron_ext.platform.cli import warn

# A record holds a few hundred numbers (per-layer expert loads): far below this. Longer lines
# are skipped (counted) without being held in memory whole.
MAX_LINE_BYTES = 4 << 20
_MAX_STEP = 2**63 - 1


class MetricsError(UserError, ValueError):
    """A metrics file that cannot be used; the message is one line."""


def _count(value: object) -> bool:
    """A non-negative integer (JSON true/false are not counts)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_STEP


def finite(value: object) -> float | None:
    """``value`` as a float when it is a finite number, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


@dataclass
class MetricsLog:
    path: Path
    records: list[dict] = field(default_factory=list)  # well-formed, in file order
    lines: int = 0
    skipped: int = 0
    first_problem: str = ""

    def by_step(self, kind: str) -> dict[int, dict]:
        """The last record of each step of ``kind``: a resumed run logs some steps twice."""
        return {rec["step"]: rec for rec in self.records if rec["kind"] == kind}

    def tokens_per_step(self) -> float | None:
        """Tokens per step from the training records (None without one past step 0)."""
        ratios = [r["tokens"] / r["step"] for r in self.records
                  if r["kind"] == "train" and r["step"] > 0]
        return min(ratios) if ratios else None

    def skipped_note(self) -> str:
        if not self.skipped:
            return ""
        s = "" if self.skipped == 1 else "s"
        return (f"skipped {self.skipped} malformed line{s} of {self.lines}; first "
                f"{self.first_problem}")


def _problem(raw: bytes) -> tuple[dict | None, str]:
    """(record, "") for a well-formed line, else (None, why not)."""
    try:
        rec = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "not UTF-8"
    except (ValueError, RecursionError):  # invalid JSON, a number too long, nesting too deep
        return None, "not JSON"
    if not isinstance(rec, dict):
        return None, f"a JSON {type(rec).__name__}, not an object"
    if not isinstance(rec.get("kind"), str):
        return None, "no kind"
    if not _count(rec.get("step")):
        return None, "step is not a non-negative integer"
    if rec["kind"] == "train" and not _count(rec.get("tokens")):
        return None, "tokens is not a non-negative integer"
    return rec, ""


def _lines(path: Path):
    """(line number, bytes) of each line; an over-long line comes as None, read past in
    bounded pieces."""
    with open(path, "rb") as f:
        n = 0
        while raw := f.readline(MAX_LINE_BYTES + 1):
            n += 1
            if len(raw) > MAX_LINE_BYTES:
                while raw and not raw.endswith(b"\n"):
                    raw = f.readline(MAX_LINE_BYTES + 1)
                yield n, None
            else:
                yield n, raw


def read_metrics(path: str | Path, label: str = "") -> MetricsLog:
    """Every well-formed record of ``path`` (see the module docstring): MetricsError when the
    file is missing, not a regular file or unreadable, or holds no usable training record;
    otherwise one warning when lines were skipped. ``label`` prefixes messages (a run's name)."""
    path = Path(path)
    where = f"{label}: {path}" if label else str(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or a device never ends
            raise MetricsError(f"{where} is not a regular file")
        log = MetricsLog(path)
        for n, raw in _lines(path):
            log.lines = n
            if raw is not None and not raw.strip():
                continue  # a blank line is no record and no damage
            rec, why = _problem(raw) if raw is not None else (
                None, f"longer than {MAX_LINE_BYTES} bytes")
            if rec is not None:
                log.records.append(rec)
            else:
                log.skipped += 1
                log.first_problem = log.first_problem or f"line {n}: {why}"
    except FileNotFoundError:
        raise MetricsError(f"{where} not found") from None
    except OSError as e:
        raise MetricsError(f"{where} cannot be read ({e.strerror or e})") from None
    if not any(rec["kind"] == "train" for rec in log.records):
        note = f" ({log.skipped_note()})" if log.skipped else ""
        raise MetricsError(f"{where} has no training records{note}")
    if log.skipped:
        warn(f"{where}: {log.skipped_note()}")
    return log
