"""Run a consumer of a stream on a worker thread, a bounded distance behind the producer.

Streamed conversions chain producer -> checker -> writer. Torch kernels and file writes release
the GIL, so the upcycler computing layer n+1 overlaps the check and the write of layer n, while
memory grows only by the ``depth`` items in flight.
"""

from __future__ import annotations

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
