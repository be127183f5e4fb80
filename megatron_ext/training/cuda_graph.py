"""One CUDA graph for a whole training step's forward and backward (``train.cuda_graph``).

A small MoE such as 8x152M is bound by the host on an H100: one step launches ~2,000 kernels
through megatron-core's Python modules, and the GPU idles about half of the step waiting for
them (docs/benchmarks.md, profile). Replaying a captured graph launches them all at once.

This works because nothing in our step synchronizes with the host or changes shape: the local
token dispatcher keeps per-expert counts on the device, grouped_mm takes them as offsets, and
dropout is off. The optimizer step, gradient clipping and logging stay eager.

How a step is graphed (the whole-network recipe of torch.cuda.graph):
- the first ``warmup`` calls run eagerly on a side stream (lazy initialisation, torch.compile's
  first compilations, the autograd and allocator state capture needs);
- the next call captures ``fn`` and replays the graph once (capture itself computes nothing);
- later calls replay. ``fn``'s returned tensors are the graph's static outputs: their values are
  refreshed by every replay, so read them before the next one.
Inputs must live in fixed device buffers (``StaticInputs``) and gradients must not be set to
None after capture (their memory is the graph's).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from megatron_ext.errors import UserError

WARMUP_STEPS = 2


class GraphCaptureError(UserError, RuntimeError):
    """The step could not be captured (a host sync, a CPU tensor, a shape that changes)."""


class StepGraph:
    """Eager for ``warmup`` calls, then capture once and replay."""

    def __init__(self, warmup: int = WARMUP_STEPS):
        if not torch.cuda.is_available():
            raise GraphCaptureError("train.cuda_graph needs a CUDA device")
        self.warmup = warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: Any = None
        self._stream = torch.cuda.Stream()

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def run(self, fn: Callable[[], Any]) -> Any:
        if self.graph is not None:
            self.graph.replay()
            self.calls += 1
            return self.outputs
        # Capture cannot run on the default stream. A caller already on a side stream (the
        # training loop, see step_stream) keeps it: the AccumulateGrad nodes megatron's DDP
        # holds were made there, and autograd runs them on the stream they were made on.
        current = torch.cuda.current_stream()
        side = self._stream if current == torch.cuda.default_stream() else current
        side.wait_stream(current)
        with torch.cuda.stream(side):
            if self.calls < self.warmup:
                out = fn()
            else:
                out = self._capture(fn, side)
        current.wait_stream(side)
        self.calls += 1
        return out

    def _capture(self, fn: Callable[[], Any], stream: torch.cuda.Stream) -> Any:
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the autograd engine's worker thread may capture too (backward).
            with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                out = fn()
        except Exception as e:  # noqa: BLE001 - re-raised with the cause named
            raise GraphCaptureError(
                f"train.cuda_graph: capturing the step failed ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); set train.cuda_graph: false"
            ) from e
        self.graph, self.outputs = graph, out
        graph.replay()  # capture records the work without doing it: this step's results
        return out


def step_stream(enabled: bool) -> contextlib.AbstractContextManager:
    """With ``enabled`` on a GPU, a context that makes one new side stream current: a run
    that builds its model and trains inside it can be captured (see StepGraph.run)."""
    if not (enabled and torch.cuda.is_available()):
        return contextlib.nullcontext()
    return torch.cuda.stream(torch.cuda.Stream())


class StaticInputs:
    """Fixed device buffers for the micro-batches a graph reads; each step copies into them."""

    def __init__(self):
        self.buffers: list[dict[str, torch.Tensor]] = []

    def stage(self, batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        if not self.buffers:
            self.buffers = [{k: torch.empty_like(v, device="cuda") for k, v in b.items()}
                            for b in batches]
        if len(batches) != len(self.buffers):
            raise GraphCaptureError(f"train.cuda_graph: {len(batches)} micro-batches this step, "
                                    f"{len(self.buffers)} when captured")
        for buf, b in zip(self.buffers, batches, strict=True):
            for k, v in b.items():
                if k not in buf or buf[k].shape != v.shape or buf[k].dtype != v.dtype:
                    raise GraphCaptureError(
                        f"train.cuda_graph: input {k} changed shape or dtype since capture "
                        f"({tuple(v.shape)} {v.dtype})")
                buf[k].copy_(v, non_blocking=True)
        return self.buffers


class StepRunner:
    """How the trainer runs a step's forward and backward: eagerly (this class) or replaying
    one captured graph (``GraphedStepRunner``)."""

    def stage(self, batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        return batches

    def run(self, fn: Callable[[], Any]) -> Any:
        return fn()


class GraphedStepRunner(StepRunner):
    """train.cuda_graph: the forward+backward of all micro-batches replays one captured graph
    that reads its inputs from fixed buffers."""

    def __init__(self) -> None:
        self.graph, self.inputs = StepGraph(), StaticInputs()

    def stage(self, batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        return self.inputs.stage(batches)

    def run(self, fn: Callable[[], Any]) -> Any:
        return self.graph.run(fn)


def step_runner(cuda_graph: bool, warn: Callable[[str], None]) -> StepRunner:
    """The runner for ``train.cuda_graph``; without a CUDA device the steps run eagerly, and
    ``warn`` says so."""
    if cuda_graph and torch.cuda.is_available():
        return GraphedStepRunner()
    if cuda_graph:
        warn("train.cuda_graph: no CUDA device, so steps run eagerly")
    return StepRunner()
