"""Longest test files first, so that two xdist workers finish together.

``make test`` runs ``-n 2 --dist loadfile``: each file runs whole on one worker, handed out in
collection order as workers free up. xdist's default order (most tests first) puts the files of
one or two long integration tests last, and one worker then runs a 4-minute file alone while
the other idles. Longest-first is the classic fix for that tail. The seconds are measured
(``tests/durations.json``); a file missing there (new, or under 20 s) keeps its place after the
measured ones. Regenerate after large changes:

    .venv/bin/python -m pytest -q -n 2 --dist loadfile --durations=0 tests > /tmp/d.log
    .venv/bin/python -m tests.scheduling /tmp/d.log > tests/durations.json
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

DURATIONS = Path(__file__).with_name("durations.json")
_LINE = re.compile(r"^([0-9.]+)s (?:setup|call|teardown)\s+tests/([^:]+)::")


def order_longest_first(items: list) -> None:
    """Stable-sort pytest items (in place) by their file's measured seconds, longest first."""
    seconds = json.loads(DURATIONS.read_text())["seconds"]

    def weight(item) -> float:
        rel = Path(str(item.path)).resolve().relative_to(Path(__file__).resolve().parent)
        return -seconds.get(rel.as_posix(), 0)

    items.sort(key=weight)


def durations_from_log(text: str, floor: float = 20.0) -> dict[str, int]:
    """Seconds per test file from pytest's ``--durations=0`` report."""
    per_file: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            per_file[m.group(2)] += float(m.group(1))
    return {f: round(s) for f, s in sorted(per_file.items(), key=lambda kv: -kv[1]) if s >= floor}


if __name__ == "__main__":
    log = Path(sys.argv[1]).read_text(errors="replace")
    print(json.dumps({"measured": "pytest --durations=0 (seconds per file; under 20 s omitted)",
                      "seconds": durations_from_log(log)}, indent=1))
