"""A synchronous save reports its write results in its own process: no multiprocessing Manager
is spawned (megatron-core's default for every save, whose server imports torch to unpickle the
results: ~3 s of CPU per saving process). ``checkpoint/writer_queue.py``."""

from __future__ import annotations

import multiprocessing
import queue

import pytest
from megatron.core.dist_checkpointing.strategies import filesystem_async

from megatron_ext.checkpoint import store
from megatron_ext.checkpoint.writer_queue import in_process_results


def test_writers_made_inside_get_an_in_process_queue_and_the_global_is_restored():
    before = filesystem_async._results_queue
    with in_process_results():
        got = filesystem_async._get_write_results_queue()  # what a new writer takes
        assert type(got) is queue.Queue
    assert filesystem_async._results_queue is before
    with pytest.raises(RuntimeError), in_process_results():
        raise RuntimeError("a failed save")
    assert filesystem_async._results_queue is before


def test_a_real_synchronous_save_starts_no_manager(hf_llama, tmp_path, monkeypatch):
    """The converter's write is a synchronous save through ``store.save``: it starts no
    Manager process, megatron's module-wide queue is untouched, and the checkpoint's checksums
    (which the writer records from those results) verify."""
    from megatron_ext.conversion.hf_io import HFCheckpoint
    from megatron_ext.conversion.keymaps import arch_from_hf_config, hf_to_mcore
    from megatron_ext.conversion.mcore_io import config_from_hf, write_mcore_checkpoint

    def managers() -> set[int]:  # other tests in this worker may have left some running
        return {p.pid for p in multiprocessing.active_children() if "Manager" in p.name}

    # as in a fresh process, whatever an earlier test in this worker left: megatron would make
    # its Manager now
    monkeypatch.setattr(filesystem_async, "_results_queue", None)
    running = managers()
    hf = HFCheckpoint(hf_llama)
    root = write_mcore_checkpoint(hf_to_mcore(hf.get, arch_from_hf_config(hf.config)),
                                  config_from_hf(hf.config), tmp_path / "mcore")
    assert filesystem_async._results_queue is None
    assert managers() <= running  # none started by the save
    meta = store.verify(root / "iter_0000000", checksums=True)
    assert meta["files"]
