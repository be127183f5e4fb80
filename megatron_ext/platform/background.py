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


def _put(handoff: queue.Queue, stop: threading.Event, entry: tuple[bool, object]) -> bool:
    while not stop.is_set():
        try:
            handoff.put(entry, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _produce(items: Iterable[object], handoff: queue.Queue, stop: threading.Event) -> None:
    """The worker of ``Ahead``: it holds no reference to its ``Ahead``, so dropping that
    stops it (``__del__``)."""
    try:
        for item in items:
            if not _put(handoff, stop, (False, item)):
                return
    except BaseException as e:  # handed to the consumer, raised there
        _put(handoff, stop, (True, e))
        return
    _put(handoff, stop, (True, None))


class Ahead(Iterator[T]):
    """What ``produce_ahead`` returns: an iterator whose worker is already running."""

    def __init__(self, items: Iterable[T], depth: int, name: str) -> None:
        self._stop = threading.Event()
        self._handoff: queue.Queue[tuple[bool, object]] = queue.Queue(maxsize=depth)
        self._done = False
        self._worker = threading.Thread(target=_produce, args=(items, self._handoff, self._stop),
                                        name=name, daemon=True)
        self._worker.start()

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        try:
            done, value = self._handoff.get()
        except BaseException:
            self.close()
            raise
        if done:
            self.close()
            if value is not None:
                raise value  # type: ignore[misc]
            raise StopIteration
        return value  # type: ignore[return-value]

    def close(self) -> None:
        """Stop the worker before it takes another item, and wait for it."""
        self._done = True
        self._stop.set()
        worker = getattr(self, "_worker", None)  # (None: __init__ failed before it)
        if worker is not None and worker.ident is not None \
                and worker is not threading.current_thread():
            worker.join()

    def __del__(self) -> None:  # an iterator dropped unfinished must not leave its worker
        self.close()


def produce_ahead(items: Iterable[T], depth: int = 2, name: str = "producer") -> Ahead[T]:
    """Iterate ``items`` on a worker thread, started now, at most ``depth`` ahead of the
    caller, who gets them in order.

    The counterpart of ``consume_behind`` for a producer worth overlapping with its consumer.
    An exception the iteration raises is raised here, after the items before it; ``close``
    (or dropping the iterator) stops the worker before it takes another item and waits for it,
    so nothing iterates ``items`` once it returns. Starting at the call, not at the first
    ``next``, lets a caller set the next batch of work going while it finishes the last."""
    return Ahead(items, depth, name)
