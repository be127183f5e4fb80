"""Make megatron-core 0.16.1 run on CPU with gloo.

megatron-core has no CPU path: it allocates on ``torch.cuda.current_device()``, hard-codes
``device="cuda"`` in a few places, uses the CUDA RNG tracker, CUDA streams/events, and checks
``Tensor.type() == 'torch.cuda.FloatTensor'`` in the optimizer. This module redirects exactly
those assumptions to the CPU, and nothing else. It is enabled only when CUDA is unavailable
(``enable_if_needed``), so GPU runs execute unmodified megatron-core code.

Every redirection is listed in ``REDIRECTIONS`` (the test suite checks each one); the ones
that replace megatron-core internals are also records in ``megatron_ext.platform.patches``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_ACTIVE: _CudaToCpuMode | None = None

REDIRECTIONS = (
    "torch.cuda.current_device -> cpu device (also called from backward, outside any mode)",
    "device='cuda'/cuda:N in factory calls, .to(), .cuda() -> cpu (TorchFunctionMode)",
    "Tensor.type() of CPU float tensors reports torch.cuda.* (optimizer/clip_grads asserts)",
    "torch.cuda.Stream/Event/current_stream/stream/synchronize -> no-ops",
    "torch.cuda RNG (get/set_rng_state, manual_seed) -> CPU generator",
    "megatron tensor_parallel.random._get/_set_cuda_rng_state -> CPU generator",
    "moe_utils.te_general_gemm = None without Transformer Engine (platform.compat; GPU too)",
)


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int means a CUDA ordinal in torch's factory functions.
    return isinstance(device, int) and not isinstance(device, bool)


_CPU = torch.device("cpu")


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU for every torch function call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = _CPU
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], _CPU, *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            if args[0].is_floating_point() and not args[0].is_cuda:
                return name.replace("torch.", "torch.cuda.", 1)
            return name
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for torch.cuda.Stream / Event on CPU: everything is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def wait_stream(self, *a, **k):
        pass

    def wait_event(self, *a, **k):
        pass

    def record_event(self, *a, **k):
        return _NullStream()

    def record(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def wait(self, *a, **k):
        pass


def _cpu_rng_get(*args, **kwargs):
    return torch.get_rng_state()


def _cpu_rng_set(state, *args, **kwargs):
    torch.set_rng_state(state)


def is_enabled() -> bool:
    return _ACTIVE is not None


def enable() -> None:
    """Install the redirections (idempotent). Only call when CUDA is unavailable."""
    global _ACTIVE
    if _ACTIVE is not None:
        return
    if torch.cuda.is_available():
        raise RuntimeError("megatron_ext.platform.cpu must not be enabled when CUDA is available")

    cuda = torch.cuda
    cuda.current_device = lambda: _CPU
    cuda.set_device = lambda *a, **k: None
    cuda.device_count = lambda: 0
    cuda.synchronize = lambda *a, **k: None
    cuda.Stream = _NullStream
    cuda.Event = _NullStream
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.get_rng_state = _cpu_rng_get
    cuda.set_rng_state = _cpu_rng_set
    cuda.random.get_rng_state = _cpu_rng_get
    cuda.random.set_rng_state = _cpu_rng_set
    # torch.manual_seed itself calls torch.cuda.manual_seed_all, so seed the generator directly.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.reset_peak_memory_stats = lambda *a, **k: None

    # why inside: megatron-core (seconds to import) is loaded only when the CPU path is switched
    # on, after the CUDA check above; GPU processes that import this module never pay for it
    from megatron.core.tensor_parallel import random as mc_random

    from megatron_ext.platform.compat import apply_megatron_fixes

    mc_random._get_cuda_rng_state = _cpu_rng_get
    mc_random._set_cuda_rng_state = _cpu_rng_set
    apply_megatron_fixes()

    _ACTIVE = _CudaToCpuMode()
    _ACTIVE.__enter__()  # global for the life of the process: backward needs it too


def enable_if_needed() -> bool:
    """Enable the CPU path when there is no CUDA device. Returns True when enabled."""
    if torch.cuda.is_available():
        return False
    enable()
    return True


@contextlib.contextmanager
def native_torch():
    """Run a block with torch function handling off, the CUDA -> CPU mode included (a no-op
    when the CPU path is not enabled). Every torch call through the mode is a Python call: about
    a third of a one-token decode step of a small model. Only for code known to name no CUDA
    device outside ``torch.cuda.current_device()`` (which stays redirected) and to rely on no
    other function mode or subclass ``__torch_function__`` (``with torch.device(...)`` is one:
    transformers' model loading uses it)."""
    if _ACTIVE is None:
        yield
        return
    with torch._C.DisableTorchFunction():
        yield
