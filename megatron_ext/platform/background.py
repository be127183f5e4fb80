"""Run a consumer of a stream on a worker thread a bounded distance behind the producer
(``consume_behind``), or a producer a bounded distance ahead of its consumer (``produce_ahead``).

Streamed conversions chain producer -> checker -> writer. Torch kernels and file writes release
the GIL, so the upcycler computing layer n+1 overlaps the check and the write of layer n, while
memory grows only by the ``depth`` items in flight.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def consume_behind(items: Iterable[T], consume: Callable[[T], object], depth: int = 4,
                   name: str = "consumer") -> Iterator[T]:
    """Yield ``items`` unchanged while one worker thread calls ``consume`` on each, in order, at
    most ``depth`` items behind. The first exception ``consume`` raises is raised here, at a
    later item or at the end (items after it are not consumed); the stream is complete only
    once every item was consumed."""
    pending: deque[Future] = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix=name) as pool:
        try:
            for item in items:
                pending.append(pool.submit(consume, item))
                while pending and (len(pending) > depth or pending[0].done()):
                    pending.popleft().result()
                yield item
            while pending:
                pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def produce_ahead(items: Iterable[T], depth: int = 2, name: str = "producer") -> Iterator[T]:
    """Yield ``items`` in order while a worker thread iterates them, at most ``depth`` ahead.

    The counterpart of ``consume_behind`` for a producer worth overlapping with its consumer.
    An exception the iteration raises is raised here, after the items before it; closing this
    iterator early (or an exception in the caller) stops the worker before it takes another
    item and waits for it, so nothing iterates ``items`` once this returns."""
    handoff: queue.Queue[tuple[bool, object]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[bool, object]) -> bool:
        while not stop.is_set():
            try:
                handoff.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put((False, item)):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            put((True, e))
            return
        put((True, None))

    worker = threading.Thread(target=work, name=name, daemon=True)
    worker.start()
    try:
        while True:
            done, value = handoff.get()
            if done:
                if value is not None:
                    raise value  # type: ignore[misc]
                return
            yield value  # type: ignore[misc]
    finally:
        stop.set()
        worker.join()
