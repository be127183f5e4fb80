"""``normal_`` on fp32 CPU tensors: torch's values and generator state, to the bit, ~3-5x faster.

The drop and noise draws are ``Tensor.normal_`` on fp32 from one mt19937 ``torch.Generator``: at
the 8x3.7B shape, 8.5 billion samples and the largest serial part of an upcycle (39-50 s of CPU on
this project's 2-core machines). torch spends ~90% of ``normal_`` in its per-sample engine calls.
``normal_fill.cpp`` does the same draws a block of the generator's state at a time and the same
Box-Muller transform as the kernel torch runs on this CPU (docs in that file).

It is a C++ file compiled on first use in a private temporary directory (~1 s; nothing is cached
or read back later), then checked against torch's own ``normal_`` on sizes that cross the state's
regeneration and leave a partial block of 16, values and generator state. Where anything fails (no
compiler, a torch whose kernel differs, ``MEGATRON_EXT_FAST_NORMAL=0``), ``normal_`` is torch's,
and ``backend()`` says why: a seed's bytes never depend on which one ran.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

_SOURCE = Path(__file__).with_name("normal_fill.cpp")
_STATE_BYTES = 5056  # torch's CPUGeneratorImplState, which normal_fill.cpp reads and writes
_CHECK_SIZES = (16, 40, 624, 1000, 5003)  # a block, a partial one, one regeneration, several
# Below this, torch's own normal_ takes a few ms at most: not worth a compile in a process that
# draws nothing larger (a tiny test model). The bytes are the same either way.
MIN_SAMPLES = 1 << 16


def normal_(out: Tensor, mean: float, std: float, g: torch.Generator) -> Tensor:
    """``out.normal_(mean, std, generator=g)``, in place, with the same values and leaving ``g``
    in the same state. No other thread may use ``g`` meanwhile: torch's ``normal_`` holds the
    generator's lock, while this reads its state, draws, and writes the state back."""
    fill = _kernel()[0] if out.numel() >= MIN_SAMPLES else None
    if (fill is None or out.dtype != torch.float32 or out.device.type != "cpu"
            or not out.is_contiguous() or g.device.type != "cpu"
            or not (math.isfinite(mean) and math.isfinite(std) and std >= 0)):
        # torch's own path: its other kernels, and its errors for a bad std
        return out.normal_(mean, std, generator=g)
    state = g.get_state()
    if state.numel() != _STATE_BYTES:
        return out.normal_(mean, std, generator=g)
    fill(state.data_ptr(), out.data_ptr(), out.numel(), mean, std)
    g.set_state(state)
    return out


def backend() -> str:
    """Which ``normal_`` runs here, in a few words (for benches and bug reports)."""
    return _kernel()[1]


@functools.cache
def _kernel() -> tuple[Callable[..., None] | None, str]:
    if os.environ.get("MEGATRON_EXT_FAST_NORMAL", "1") == "0":
        return None, "torch's normal_ (MEGATRON_EXT_FAST_NORMAL=0)"
    capability = torch.backends.cpu.get_cpu_capability()
    avx2 = capability == "AVX2"
    if not avx2 and capability not in ("DEFAULT", "AVX512"):
        return None, f"torch's normal_ (no kernel here for CPU capability {capability})"
    try:
        fill = _compile(avx2)
    except (OSError, subprocess.SubprocessError) as err:
        return None, f"torch's normal_ (could not build normal_fill.cpp: {err})"
    mismatch = _differs_from_torch(fill)
    if mismatch:
        return None, f"torch's normal_ (normal_fill.cpp differs from it: {mismatch})"
    kind = "AVX2" if avx2 else "scalar"
    return fill, f"normal_fill.cpp ({kind}, matches torch {torch.__version__})"


def _compile(avx2: bool) -> Callable[..., None]:
    asked = os.environ.get("CXX") or "c++"  # $CXX may carry flags, or be "ccache g++"
    try:
        command = shlex.split(asked)
    except ValueError as err:
        raise OSError(f"$CXX={asked!r}: {err}") from err
    cxx = shutil.which(command[0]) if command else None
    if cxx is None:
        raise OSError(f"no C++ compiler {asked!r} on PATH")
    # -ffp-contract=fast (GCC's default): torch's build fused avx_mathfun's multiply-adds, and
    # with contraction off 1% of the values differ in their last bit
    flags = ["-O3", "-std=c++17", "-ffp-contract=fast", "-shared", "-fPIC"]
    if avx2:
        if platform.machine() not in ("x86_64", "AMD64"):
            raise OSError(f"AVX2 capability on {platform.machine()}")
        # the flags torch builds its AVX2 kernels with, and its headers for avx_mathfun.h
        include = Path(torch.__file__).parent / "include"
        flags += ["-mavx2", "-mfma", "-DFAST_NORMAL_AVX2", "-DCPU_CAPABILITY_AVX2",
                  "-DCPU_CAPABILITY=AVX2", f"-I{include}"]
    with tempfile.TemporaryDirectory(prefix="megatron_ext_normal_") as tmp:
        lib = Path(tmp) / "normal_fill.so"
        done = subprocess.run([cxx, *command[1:], *flags, str(_SOURCE), "-o", str(lib)],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
            raise OSError(f"{Path(cxx).name}: {last}")
        # loaded before the directory goes: the mapping outlives the file
        fill = ctypes.CDLL(str(lib)).normal_fill_fp32
    fill.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_double,
                     ctypes.c_double]
    fill.restype = None
    return fill


def _differs_from_torch(fill: Callable[..., None]) -> str:
    """'' when ``fill`` gives torch's values and generator state on ``_CHECK_SIZES``, one after
    another from one seed; else the first size where it does not."""
    ours, theirs = torch.Generator().manual_seed(20241206), torch.Generator().manual_seed(20241206)
    for n in _CHECK_SIZES:
        expected = torch.empty(n).normal_(0.25, 1.5, generator=theirs)
        state = ours.get_state()
        if state.numel() != _STATE_BYTES:
            return f"a generator state of {state.numel()} bytes, not {_STATE_BYTES}"
        got = torch.empty(n)
        fill(state.data_ptr(), got.data_ptr(), n, 0.25, 1.5)
        ours.set_state(state)
        if not torch.equal(got.view(torch.int32), expected.view(torch.int32)):
            return f"values of {n} samples"
        if not torch.equal(ours.get_state(), theirs.get_state()):
            return f"generator state after {n} samples"
    return ""
