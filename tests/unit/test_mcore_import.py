"""megatron-core imported through our package skips torch._dynamo and wandb (platform/mcore_import).

The saving is ~3 s of CPU per process (every tool, rank and checkpoint worker); what must not
change is what megatron-core computes: its fusions are still torch.compile'd on a CUDA machine,
on first call, with the arguments they were decorated with (eager without CUDA: the same
functions), and wandb and tensorboard still load for our sinks.
"""

from __future__ import annotations

import json
import subprocess
import sys

from megatron_ext.platform.mcore_import import lazy_compile
from tests.conftest import REPO

PROBE = r"""
import json, sys
import megatron_ext.model.builder  # imports megatron.core through the package
import megatron.core, megatron.core.jit as jit, torch
from megatron.core.fusions import fused_bias_swiglu
seen = {"dynamo": "torch._dynamo" in sys.modules, "wandb": "wandb" in sys.modules,
        "tensorboard": "torch.utils.tensorboard" in sys.modules,
        "fuser_lazy": jit.jit_fuser.__name__ == "stand_in",
        "swiglu_wraps": getattr(fused_bias_swiglu.swiglu, "lazy_compile_of", None) is not None,
        "compile_restored": torch.compile.__module__ == "torch",
        "loader": type(megatron.core.__loader__).__name__}
import wandb  # the real module, after megatron-core's import
from torch.utils.tensorboard import SummaryWriter
seen["wandb_real"] = hasattr(wandb, "init") and SummaryWriter.__name__ == "SummaryWriter"
print(json.dumps(seen))
"""


def test_megatron_core_through_the_package_skips_dynamo_and_wandb():
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen == {"dynamo": False, "wandb": False, "tensorboard": False, "fuser_lazy": True,
                    "swiglu_wraps": True, "compile_restored": True, "loader": "SourceFileLoader",
                    "wandb_real": True}


def test_the_stand_in_compiles_on_first_call_with_the_decoration_arguments():
    calls = []

    def real(fn, **kwargs):  # a compiler that records what it was asked, then runs fn doubled
        calls.append((fn.__name__, kwargs))
        return lambda *a: 2 * fn(*a)

    stand_in = lazy_compile(real, compiles=lambda: True)  # as on a CUDA machine

    @stand_in
    def plain(x):
        return x + 1

    @stand_in(dynamic=True)
    def with_kwargs(x):
        return x * 3

    assert calls == []  # decorating compiles nothing
    assert plain(1) == 4 and plain(2) == 6  # compiled once, then reused
    assert with_kwargs(2) == 12
    assert calls == [("plain", {}), ("with_kwargs", {"dynamic": True})]
    assert plain.__name__ == "plain" and plain.lazy_compile_of(1) == 2


def test_without_cuda_the_function_runs_eagerly_and_nothing_is_compiled():
    calls = []
    stand_in = lazy_compile(lambda fn, **kw: calls.append(fn), compiles=lambda: False)
    double = stand_in(lambda x: 2 * x)
    assert double(4) == 8 and double(5) == 10 and calls == []
