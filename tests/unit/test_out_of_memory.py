"""Running out of memory is one line and exit 1, whichever tool, library or allocator ran out.

``errors.out_of_memory`` recognizes the class: Python's ``MemoryError``, torch's CPU allocator
error (a plain RuntimeError), CUDA's ``OutOfMemoryError``, errno ENOMEM in an ``OSError`` or in
a library's own text (safetensors' failed mmap), each also behind another error in the chain.
Shown on the real paths:

* every tool (``platform.cli.run_cli``): real allocation failures, bare and wrapped;
* training (``training.cli``): a real run whose embedding cannot be allocated;
* transformers' loader, which swallows the error and points at a report we had held back: the
  report's allocation failure comes back as a ``MemoryError`` (other failures keep their
  traceback, with the report as a note), and transformers' logger is left as it was;
* the upcycler's forced whole-model check: ``tests/unit/test_upcycling_stream_check.py``
  (``test_validated_upcycle_fits_a_limit_the_whole_model_check_exceeds``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megatron_ext.conversion.hf_models import _quiet_transformers
from megatron_ext.errors import out_of_memory, out_of_memory_in
from tests.conftest import REPO, run_cli
from tests.resilience import small_args

_TOOL = r"""
import errno, sys
from megatron_ext.platform.cli import run_cli

def work(argv):
    mode = argv[0]
    if mode == "python":
        bytearray(2 ** 50)
    if mode == "torch":
        import torch
        torch.empty(2 ** 50, dtype=torch.uint8)
    if mode == "wrapped":  # a library that reports its own error while handling the failure
        try:
            bytearray(2 ** 50)
        except MemoryError:
            raise RuntimeError("the loader failed")
    if mode == "caused":
        import torch
        try:
            torch.empty(2 ** 50, dtype=torch.uint8)
        except RuntimeError as e:
            raise ValueError("could not convert") from e
    if mode == "enomem":
        raise OSError(errno.ENOMEM, "Cannot allocate memory")
    if mode == "mmap":  # safetensors' words for a failed mmap
        raise RuntimeError("unable to mmap 120615936 bytes from file <x>: "
                           "Cannot allocate memory (12)")
    if mode == "bug":
        raise RuntimeError("an index out of range")
    return 0

sys.exit(run_cli(work, sys.argv[1:]))
"""
_TORCH_LINE = ("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1125899906842624 "
               "bytes. Error code 12 (Cannot allocate memory)")


@pytest.mark.parametrize("mode, detail", [
    ("python", "no memory left"),
    ("torch", _TORCH_LINE),
    ("wrapped", "no memory left"),
    ("caused", _TORCH_LINE),
    ("enomem", "[Errno 12] Cannot allocate memory"),
    ("mmap", "unable to mmap 120615936 bytes from file <x>: Cannot allocate memory (12)"),
])
def test_every_tool_reports_running_out_of_memory_in_one_line(mode: str, detail: str) -> None:
    r = subprocess.run([sys.executable, "-c", _TOOL, mode], capture_output=True, text=True,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert r.returncode == 1, r.stderr
    assert r.stderr.splitlines() == [f"error: out of memory: {detail}"]


def test_an_error_that_is_not_memory_keeps_its_traceback() -> None:
    r = subprocess.run([sys.executable, "-c", _TOOL, "bug"], capture_output=True, text=True,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert r.returncode == 1 and "Traceback" in r.stderr
    assert "out of memory" not in r.stderr
    assert out_of_memory(RuntimeError("an index out of range")) is None
    assert out_of_memory_in("Traceback ...\nValueError: MemoryErrors are rare\n") is None


def test_training_that_cannot_allocate_its_model_says_so_in_one_line(tmp_path: Path) -> None:
    # a vocabulary of 2^31 - 128 rows of hidden size 64 in fp32: the embedding alone is 0.55 TB,
    # refused at allocation
    r = run_cli(small_args(tmp_path, 1, "--set", "model.vocab_size=2147483520",
                           "--set", "schedule.warmup_steps=0"), timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error")]
    assert errors == ["error: out of memory on rank 0: DefaultCPUAllocator: can't allocate "
                      f"memory: you tried to allocate {2147483520 * 64 * 4} bytes. Error code 12 "
                      "(Cannot allocate memory)"], r.stderr[-3000:]
    assert "Traceback" not in r.stderr


# transformers 5's loader keeps an error in converting a weight as text in its report (a
# formatted traceback), logs the report as a warning, then raises an error that only points at it
_REPORT = ("MixtralForCausalLM LOAD REPORT from: /x\nKey | Status\nmodel.layers.0.mlp | CONVERSION"
           "\nTraceback (most recent call last):\n  File \"core_model_loading.py\", line 1323\n"
           "RuntimeError: [enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
           "can't allocate memory: you tried to allocate 4194304 bytes. Error code 12 (Cannot "
           "allocate memory)\nError: on tensors destined for model.layers.0.mlp")
_POINTER = ("We encountered some issues during automatic conversion of the weights. For details "
            "look at the `CONVERSION` entries of the above report!")


def _logger_state() -> tuple:
    from transformers.utils import logging as hf_logging

    root = hf_logging.get_logger()
    return root.level, list(root.handlers), root.propagate, hf_logging.is_progress_bar_enabled()


def test_a_memory_failure_transformers_kept_in_its_report_becomes_a_memory_error() -> None:
    from transformers.utils import logging as hf_logging

    before = _logger_state()
    with pytest.raises(MemoryError) as got, _quiet_transformers(Path("/x")):
        hf_logging.get_logger("transformers.modeling_utils").warning(_REPORT)
        raise RuntimeError(_POINTER)
    assert str(got.value) == ("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                              "4194304 bytes. Error code 12 (Cannot allocate memory) "
                              "(transformers, loading /x)")
    assert isinstance(got.value.__cause__, RuntimeError)
    assert _logger_state() == before


def test_another_load_failure_keeps_its_error_with_the_report_as_a_note() -> None:
    from transformers.utils import logging as hf_logging

    before = _logger_state()
    report = "Key | Status\nmodel.norm.weight | CONVERSION\nValueError: a shape that cannot be"
    with pytest.raises(RuntimeError) as got, _quiet_transformers(Path("/x")):
        hf_logging.get_logger("transformers.modeling_utils").warning(report)
        raise RuntimeError(_POINTER)
    assert str(got.value) == _POINTER
    assert got.value.__notes__ == [f"transformers said, loading /x:\n{report}"]
    assert _logger_state() == before
