"""platform.background: a consumer behind its producer, a producer ahead of its consumer, both
on worker threads, in order, with errors raised in the caller and nothing left running."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from megatron_ext.platform.background import consume_behind, produce_ahead


class Counted:
    """An iterator of 0..n-1 that records how many items were taken, and on which thread."""

    def __init__(self, n: int, fail_at: int | None = None) -> None:
        self.n, self.fail_at, self.taken, self.threads = n, fail_at, 0, set()

    def __iter__(self) -> Iterator[int]:
        for i in range(self.n):
            if i == self.fail_at:
                raise ValueError(f"item {i}")
            self.taken += 1
            self.threads.add(threading.current_thread().name)
            yield i


def test_produce_ahead_yields_in_order_from_a_worker() -> None:
    items = Counted(50)
    assert list(produce_ahead(items, depth=2, name="ahead")) == list(range(50))
    assert items.threads == {"ahead"}


def test_produce_ahead_raises_after_the_items_before_the_error() -> None:
    got = []
    with pytest.raises(ValueError, match="item 7"):
        for i in produce_ahead(Counted(20, fail_at=7)):
            got.append(i)
    assert got == list(range(7))


def test_closing_produce_ahead_stops_the_worker() -> None:
    items = Counted(1000)
    it = produce_ahead(items, depth=2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()  # joins the worker
    taken = items.taken
    assert taken <= 3 + 2 + 1  # what was consumed, the queue, and the one being put
    time.sleep(0.3)
    assert items.taken == taken
    assert not any(t.name == "producer" for t in threading.enumerate())


def test_produce_ahead_starts_at_the_call_and_a_dropped_one_stops() -> None:
    items = Counted(1000)
    it = produce_ahead(items, depth=2, name="eager")
    deadline = time.monotonic() + 5
    while items.taken == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert items.taken > 0  # working before anyone asked for an item
    del it  # never iterated, never closed: dropping it stops and joins the worker
    taken = items.taken
    time.sleep(0.3)
    assert items.taken == taken <= 2 + 1
    assert not any(t.name == "eager" for t in threading.enumerate())


def test_consume_behind_consumes_every_item_in_order_and_raises_its_error() -> None:
    seen: list[int] = []
    assert list(consume_behind(range(30), seen.append, depth=3)) == list(range(30))
    assert seen == list(range(30))

    def fail_at_5(i: int) -> None:
        if i == 5:
            raise RuntimeError("consumer failed at 5")

    with pytest.raises(RuntimeError, match="at 5"):
        list(consume_behind(range(30), fail_at_5, depth=3))
