"""Import megatron-core without paying for what a run does not use: ~3 s of CPU per process.

megatron-core 0.16.1 decorates its elementwise fusions with ``jit_fuser = torch.compile`` at
import time, and ``torch.compile(fn)`` imports torch._dynamo and torch._inductor (~2.5 s of CPU)
although nothing is compiled until the function is first called; its modules also import wandb
(~1 s) and torch.utils.tensorboard (~0.4 s) for an inference logger and timer writers that we
never use (our own sinks import them when a run logs there). Every process pays
that: each training, each tool, each torchrun rank and each of megatron's checkpoint workers.

``install()`` (called by ``megatron_ext/__init__.py``, so it precedes any import of
megatron-core through our package) adds a one-shot import hook: while ``megatron.core`` itself
executes, ``torch.compile`` is a lazy stand-in, so ``megatron.core.jit.jit_fuser`` becomes a
decorator that calls the real ``torch.compile`` with the same arguments on a function's first
call (what torch.compile does anyway: it compiles on the first call) where CUDA runs it, and
leaves the function eager without CUDA (``_compiles``), and importing either logger
fails inside megatron-core (its ImportError fallback) unless it was already loaded. Both are
restored when megatron.core's own import ends; later imports (our W&B and TensorBoard sinks)
load the real modules. Records: ``platform.patches`` ("lazy-jit-fuser",
"megatron-without-loggers").
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import sys
from collections.abc import Callable
from typing import Any

_TARGET = "megatron.core"
_HIDDEN = ("wandb", "torch.utils.tensorboard")  # megatron-core's optional loggers


def lazy_compile(real: Callable, compiles: Callable[[], bool] | None = None) -> Callable:
    """A stand-in for ``torch.compile`` that defers the call of ``real`` to the first use, and
    makes it only if ``compiles()`` (default: CUDA is available) says so then."""
    compiles = compiles or _compiles

    def stand_in(model: Callable | None = None, **kwargs: Any) -> Callable:
        if model is None:  # used as ``@torch.compile(dynamic=True)``
            return lambda fn: stand_in(fn, **kwargs)
        compiled: Callable | None = None

        @functools.wraps(model)
        def first_call_compiles(*args, **kw):
            nonlocal compiled
            if compiled is None:
                compiled = real(model, **kwargs) if compiles() else model
            return compiled(*args, **kw)

        first_call_compiles.lazy_compile_of = model  # what it wraps, for tests and debugging
        return first_call_compiles

    return stand_in


def _compiles() -> bool:
    """megatron's fusions are GPU kernels: without CUDA they run eagerly, the same math. (On CPU
    the one our runs reach, the router's ``_apply_expert_bias``, a no-op unless expert bias is on,
    cost an import of torch._inductor, ~1.5 s of CPU, per process.)"""
    import torch

    return torch.cuda.is_available()


class _Loader(importlib.abc.Loader):
    """megatron.core's own loader, with the two stand-ins in place while its module executes."""

    def __init__(self, inner: importlib.abc.Loader):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        import torch

        real_compile = torch.compile
        hidden = [name for name in _HIDDEN if name not in sys.modules]
        torch.compile = lazy_compile(real_compile)
        for name in hidden:
            sys.modules[name] = None  # importing it raises ImportError: megatron's fallback
        try:
            self.inner.exec_module(module)
        finally:
            torch.compile = real_compile
            for name in hidden:
                if name in sys.modules and sys.modules[name] is None:
                    del sys.modules[name]
            module.__loader__ = module.__spec__.loader = self.inner


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        uninstall()  # once: megatron.core is imported once per process
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _Loader(spec.loader)
        return spec


_FINDER = _Finder()


def install() -> None:
    """Hook the next import of megatron.core (nothing to do when it is already imported)."""
    if _TARGET not in sys.modules and _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
