"""One drop / noise expert from a dense MLP, in two halves that can run on two threads.

``draw_expert`` consumes the generator (the permutation, each projection's neurons and their
samples, in the order ``upcycle``'s docstring fixes) and touches no weight; ``apply_draws``
builds the expert from the dense MLP and the draws and consumes nothing. A seed's bytes depend
only on the generator being consumed in that order, so ``ExpertStream`` can run the draws for
a layer's experts on a worker thread (``platform.background.produce_ahead``) while the caller
builds the previous expert, and the next layer's stream can start as soon as this one's last
draws are taken. Measured at the 8x3.7B shape, the halves cost ~0.19-0.25 s (samples) and
~0.12-0.14 s (gathers and copies) per expert, so on two free cores the upcycler's critical
path is the draws alone, and every byte stays what it was.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_ext.platform.background import produce_ahead
from megatron_ext.upcycling.neuron_stats import NeuronSums, Recycler, Scratch, as_fp32
from megatron_ext.upcycling.spec import UpcycleSpec

DRAW_ROLES = ("gate", "down", "up")  # RNG order, as the reference (w1, w2, w3)


@dataclass
class ExpertDraws:
    """What one expert takes from the generator: ``perm`` over the d_ff neurons, and per
    projection the re-initialized positions ``idx`` and their new values ``new`` (drop: the
    samples, already in the weights' dtype; noise: the fp32 noise, added to the slice later)."""

    perm: Tensor
    idx: dict[str, Tensor]
    new: dict[str, Tensor]


def mlp_sums(mlp: dict[str, Tensor]) -> dict[str, NeuronSums]:
    """``NeuronSums`` of a dense MLP's three matrices (down's neurons are its columns)."""
    return {role: NeuronSums(w, 1 if role == "down" else 0) for role, w in mlp.items()}


def draw_expert(
    shapes: dict[str, tuple[int, ...]], dtype: dict[str, torch.dtype], spec: UpcycleSpec,
    g: torch.Generator, sums: dict[str, NeuronSums] | None,
    scratch: Scratch, outputs: Recycler,
) -> ExpertDraws:
    """The draws of one expert. ``shapes``/``dtype``: of gate [F,H], up [F,H], down [H,F];
    drop: ``sums`` of the dense MLP (``mlp_sums``). ``scratch`` holds the fp32 samples
    while they are cast; the values handed out come from ``outputs``."""
    d_ff = shapes["gate"][0]
    k = math.floor(spec.ratio * d_ff)
    perm = torch.randperm(d_ff, generator=g)
    shared_idx = torch.randperm(d_ff, generator=g)[:k] if spec.index_sharing == "shared" else None
    draws = ExpertDraws(perm, {}, {})
    for role in DRAW_ROLES:
        idx = shared_idx if shared_idx is not None else torch.randperm(d_ff, generator=g)[:k]
        if k == 0:
            continue
        rows, cols = shapes[role]
        shape = (k, cols) if role != "down" else (rows, k)
        if spec.method == "drop":
            assert sums is not None
            # the selected slice is the dense neurons perm[idx]
            std, mean = sums[role].std_mean(perm[idx])
            # normal_ on a contiguous fp32 tensor: the same draws and values as torch.normal
            fp32 = outputs if dtype[role] == torch.float32 else scratch
            new = fp32.get(shape, torch.float32).normal_(as_fp32(mean), as_fp32(std),
                                                        generator=g)
            if new.dtype != dtype[role]:
                new = outputs.get(shape, dtype[role]).copy_(new)
        else:
            new = outputs.get(shape, torch.float32).normal_(0.0, spec.noise_std, generator=g)
        draws.idx[role], draws.new[role] = idx, new
    return draws


def apply_draws(
    mlp: dict[str, Tensor], draws: ExpertDraws, spec: UpcycleSpec, outputs: Recycler,
    scratch: Scratch, down_rows: Tensor | None = None,
) -> dict[str, Tensor]:
    """The expert: the dense neurons in ``draws.perm``'s order (rows of gate/up, columns of
    down: reordering alone keeps the function), then the drawn positions replaced (drop) or
    perturbed (noise). ``down_rows``: ``mlp["down"].t().contiguous()``, once per layer;
    ``scratch``: this thread's temporaries."""
    perm = draws.perm
    out = {role: torch.index_select(mlp[role], 0, perm,
                                    out=outputs.get(mlp[role].shape, mlp[role].dtype))
           for role in ("gate", "up")}
    # down's neurons are columns: gathered as rows of its transpose (a memcpy per neuron), its
    # drawn neurons written as rows too, then transposed into place: 1.5x faster than
    # index_select and index_copy_ on dim 1 (an element at a time).
    if down_rows is None:
        down_rows = mlp["down"].t().contiguous()
    n_rows, k = down_rows.numel(), len(draws.idx.get("down", ()))
    flat = scratch.get((n_rows + k * down_rows.shape[1],), down_rows.dtype)
    rows = torch.index_select(down_rows, 0, perm, out=flat[:n_rows].view(down_rows.shape))
    neurons = {"gate": out["gate"], "up": out["up"], "down": rows}  # rows are the neurons
    for role, idx in draws.idx.items():
        w, new = neurons[role], draws.new[role]
        if role == "down":
            new = new.t()  # drawn as [H, k]: the same values, as k rows
        if spec.method == "noise":
            # torch.normal's samples, added in fp32 as before, then cast
            new = (w.index_select(0, idx).float() + new).to(w.dtype)
        elif not new.is_contiguous():
            new = flat[n_rows:].view(new.shape).copy_(new)
        w.index_copy_(0, idx, new)
    out["down"] = outputs.get(mlp["down"].shape, mlp["down"].dtype).copy_(rows.t())
    return out


def perturb_expert(
    mlp: dict[str, Tensor], spec: UpcycleSpec, g: torch.Generator,
    sums: dict[str, NeuronSums] | None = None, scratch: Scratch | None = None,
) -> dict[str, Tensor]:
    """One drop/noise expert from the dense MLP {gate [F,H], up [F,H], down [H,F]} (unchanged),
    on this thread: ``apply_draws(draw_expert(...))``. drop: ``sums`` are the dense MLP's
    ``NeuronSums``, computed here when not given."""
    if spec.method == "drop" and sums is None:
        sums = mlp_sums(mlp)
    outputs = Recycler(keep=0)
    shapes = {r: tuple(w.shape) for r, w in mlp.items()}
    dtypes = {r: w.dtype for r, w in mlp.items()}
    scratch = scratch or Scratch()
    draws = draw_expert(shapes, dtypes, spec, g, sums, scratch, outputs)
    return apply_draws(mlp, draws, spec, outputs, scratch)


class Buffers:
    """What ``ExpertStream`` reuses from layer to layer: the experts' tensors (``outputs``),
    the drawn values, and a scratch per thread (the draws' worker, the caller)."""

    def __init__(self) -> None:
        self.outputs, self.drawn = Recycler(), Recycler()
        self.draw_scratch, self.apply_scratch = Scratch(), Scratch()
        self.down_rows = Scratch()  # the layer's dense down as rows, valid for that layer


class ExpertStream:
    """``num_experts`` drop/noise experts of one layer, in order (an iterator): their draws
    made on a worker thread that starts at construction and stays one expert ahead (module
    docstring), each expert built by the caller's ``next``.

    ``g`` must not be used elsewhere until the last expert's draws are taken: then
    ``on_drawn`` runs (on the caller's thread, before that expert is built), so the next
    layer's stream can start drawing while this layer's last expert is still being built and
    written. ``close`` stops and joins the worker (exhausting the iterator does too)."""

    def __init__(self, mlp: dict[str, Tensor], spec: UpcycleSpec, g: torch.Generator,
                 sums: dict[str, NeuronSums] | None, buffers: Buffers, num_experts: int,
                 on_drawn: Callable[[], None] | None = None) -> None:
        self.mlp, self.spec, self.buffers = mlp, spec, buffers
        self.left, self.on_drawn = num_experts, on_drawn
        self._down_rows: Tensor | None = None
        shapes = {r: tuple(w.shape) for r, w in mlp.items()}
        dtypes = {r: w.dtype for r, w in mlp.items()}
        b = buffers

        def draws() -> Iterator[ExpertDraws]:
            for _ in range(num_experts):
                yield draw_expert(shapes, dtypes, spec, g, sums, b.draw_scratch, b.drawn)

        # one expert handed over while the next is drawn: building one (~0.14 s at 8x3.7B) is
        # faster than drawing one (~0.25 s), so a deeper queue only holds more buffers and
        # leaves the worker idle longer at the layer's end (measured: 70 MB less peak)
        self._draws = produce_ahead(draws(), depth=1, name="draw")

    def __iter__(self) -> ExpertStream:
        return self

    def __next__(self) -> dict[str, Tensor]:
        if self.left == 0:
            self.close()
            raise StopIteration
        d = next(self._draws)
        self.left -= 1
        if self.left == 0 and self.on_drawn is not None:
            self.on_drawn()  # g is free: the last draw_expert has returned
        if self._down_rows is None:  # here, not at construction: the previous layer's
            # stream may still be building its last expert from the same buffer until then
            down, b = self.mlp["down"], self.buffers
            self._down_rows = b.down_rows.get((down.shape[1], down.shape[0]),
                                              down.dtype).copy_(down.t())
        return apply_draws(self.mlp, d, self.spec, self.buffers.outputs,
                           self.buffers.apply_scratch, self._down_rows)

    def close(self) -> None:
        self._draws.close()

