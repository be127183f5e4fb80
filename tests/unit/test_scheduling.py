"""The suite's own scheduling (tests/scheduling.py): longest files first, from measured seconds."""

from __future__ import annotations

import json
from types import SimpleNamespace

from tests.conftest import REPO
from tests.scheduling import DURATIONS, durations_from_log, order_longest_first


def test_durations_are_summed_per_file_from_a_durations_report():
    log = "\n".join([
        "============ slowest durations ============",
        "12.50s call     tests/unit/test_a.py::test_x[1]",
        "10.00s setup    tests/unit/test_a.py::test_x[1]",
        "30.20s call     tests/distributed/test_b.py::test_y",
        "0.40s teardown tests/unit/test_c.py::test_z",
        "1 passed",
    ])
    assert durations_from_log(log) == {"distributed/test_b.py": 30, "unit/test_a.py": 22}
    assert durations_from_log(log, floor=0) == {"distributed/test_b.py": 30, "unit/test_a.py": 22,
                                                "unit/test_c.py": 0}


def test_measured_files_come_first_longest_first_and_the_rest_keep_their_order():
    seconds = json.loads(DURATIONS.read_text())["seconds"]
    (first, second), unmeasured = sorted(seconds, key=seconds.get, reverse=True)[:2], "unit/x.py"
    items = [SimpleNamespace(path=REPO / "tests" / rel, name=n) for rel, n in
             [(unmeasured, "a"), (second, "b"), (first, "c"), (unmeasured, "d"), (second, "e")]]
    order_longest_first(items)
    assert [i.name for i in items] == ["c", "b", "e", "a", "d"]
