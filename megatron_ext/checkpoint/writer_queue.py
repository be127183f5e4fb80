"""Where a synchronous save's shard writer reports its results: this process, not a Manager.

megatron-core 0.16.1's ``FileSystemWriterAsync`` always sends its write results through one
module-wide queue, ``filesystem_async._results_queue``, made on first use by a *spawned*
``multiprocessing.Manager``. An async save needs that (its writer is another process), but a
synchronous save writes and reads the results in the saving process: there the Manager only
costs, and it costs much. Its server process unpickles the results, torch's checkpoint
``WriteResult`` objects, so it imports torch (~3 s of CPU and ~380 MB per saving process, paid
on the first save: 3.1 of a tiny run's 4.6 s first save, measured 2026-12-07), and it outlives
a ``kill -9`` of its parent unless ``platform.children`` binds it.

``in_process_results()`` gives the writers created inside it a plain ``queue.Queue`` (each
writer keeps the queue it was made with, so an async save in flight keeps its Manager queue).
"""

from __future__ import annotations

import contextlib
import queue
from collections.abc import Iterator

from megatron.core.dist_checkpointing.strategies import filesystem_async


@contextlib.contextmanager
def in_process_results() -> Iterator[None]:
    """Within the block, megatron's new shard writers report to a queue in this process (for a
    save run with ``AsyncRequest.execute_sync``, whose writer is this process)."""
    saved = filesystem_async._results_queue
    filesystem_async._results_queue = queue.Queue()
    try:
        yield
    finally:
        filesystem_async._results_queue = saved
