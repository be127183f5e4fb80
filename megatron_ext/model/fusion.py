"""torch.compile'd elementwise fusions, with an eager fallback that computes the same values.

Used by the fused LM loss, RMSNorm and RoPE when ``model.kernel_fusion`` is on (the CUDA default).
Functions are compiled once each, with dynamic shapes (chunk and sequence sizes vary). If the
compiler fails (no Triton, no C++ compiler, an unsupported op), the failure is reported once per
function and the eager function runs from then on: a missing compiler costs speed, not a run.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import cache

import torch

FAILED: set[str] = set()  # names of functions whose compilation failed in this process


@cache
def compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=True)


def run(fn: Callable, enabled: bool, *args):
    """``fn(*args)``, compiled when ``enabled`` and its compilation has not failed before."""
    if enabled and fn.__qualname__ not in FAILED:
        try:
            return compiled(fn)(*args)
        except Exception as e:  # noqa: BLE001 - any compiler error; eager is always correct
            FAILED.add(fn.__qualname__)
            warnings.warn(f"torch.compile of {fn.__qualname__} failed ({type(e).__name__}: "
                          f"{str(e)[:200]}); running it eagerly", stacklevel=2)
    return fn(*args)
