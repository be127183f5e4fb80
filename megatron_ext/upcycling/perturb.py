"""One drop / noise expert from a dense MLP, in two halves that can run on two threads.

``draw_expert`` consumes the generator (the permutation, each projection's neurons and their
samples, in the order ``upcycle``'s docstring fixes) and touches no weight; ``apply_draws``
builds the expert from the dense MLP and the draws and consumes nothing. A seed's bytes depend
only on the generator being consumed in that order, so ``ExpertStream`` can run the draws for
a layer's experts on a worker thread (``platform.background.produce_ahead``) while the caller
builds the previous expert, and the next layer's stream can start as soon as this one's last
draws are taken. Measured at the 8x3.7B shape in a full upcycle on two cores, the halves cost
~0.19 s (the fp32 samples) and ~0.09 s (gathers, casts and copies) per expert, and the draws'
thread is busy 96% of the run: the upcycler's critical path is the draws alone, and every byte
stays what it was.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_ext.platform.background import produce_ahead
from megatron_ext.upcycling.neuron_match import as_bits
from megatron_ext.upcycling.neuron_stats import NeuronSums, Recycler, Scratch, as_fp32
from megatron_ext.upcycling.spec import UpcycleSpec

DRAW_ROLES = ("gate", "down", "up")  # RNG order, as the reference (w1, w2, w3)


@dataclass
class ExpertDraws:
    """What one expert takes from the generator: ``perm`` over the d_ff neurons, and per
    projection the re-initialized positions ``idx`` and their new values ``new``, fp32 (drop:
    the samples, cast to the weights' dtype as they are put in place; noise: the noise, added
    to the slice later)."""

    perm: Tensor
    idx: dict[str, Tensor]
    new: dict[str, Tensor]


def mlp_sums(mlp: dict[str, Tensor]) -> dict[str, NeuronSums]:
    """``NeuronSums`` of a dense MLP's three matrices (down's neurons are its columns)."""
    return {role: NeuronSums(w, 1 if role == "down" else 0) for role, w in mlp.items()}


def draw_expert(
    shapes: dict[str, tuple[int, ...]], spec: UpcycleSpec, g: torch.Generator,
    sums: dict[str, NeuronSums] | None, outputs: Recycler,
) -> ExpertDraws:
    """The draws of one expert. ``shapes``: of gate [F,H], up [F,H], down [H,F]; drop: ``sums``
    of the dense MLP (``mlp_sums``). The values handed out come from ``outputs``. Nothing but
    the draws happens here, not even the cast to the weights' dtype: on two cores the draws'
    thread is the upcycler's critical path (``apply_draws`` casts, on the caller's thread)."""
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
            new = outputs.get(shape, torch.float32).normal_(as_fp32(mean), as_fp32(std),
                                                           generator=g)
        else:
            new = outputs.get(shape, torch.float32).normal_(0.0, spec.noise_std, generator=g)
        draws.idx[role], draws.new[role] = idx, new
    return draws


def apply_draws(
    mlp: dict[str, Tensor], draws: ExpertDraws, spec: UpcycleSpec, outputs: Recycler,
    down_src: Tensor | None = None, cast: Scratch | None = None,
) -> dict[str, Tensor]:
    """The expert: the dense neurons in ``draws.perm``'s order (rows of gate/up, columns of
    down: reordering alone keeps the function), then the drawn positions replaced (drop) or
    perturbed (noise). ``down_src``: ``down_source(mlp["down"], k)``, once per layer.
    ``cast``: where gate's and up's samples are cast to the weights' dtype (down's are cast
    as they are copied into ``down_src``); a fresh buffer when not given."""
    perm = draws.perm
    out = {role: torch.index_select(mlp[role], 0, perm,
                                    out=outputs.get(mlp[role].shape, mlp[role].dtype))
           for role in ("gate", "up")}
    for role in ("gate", "up"):
        if role in draws.idx:
            w, idx, new = out[role], draws.idx[role], draws.new[role]
            if spec.method == "noise":  # torch.normal's samples, added in fp32, then cast
                new = (w.index_select(0, idx).float() + new).to(w.dtype)
            elif new.dtype != w.dtype:
                new = (cast or Scratch()).get(tuple(new.shape), w.dtype).copy_(new)
            w.index_copy_(0, idx, new)
    down = mlp["down"]
    idx = draws.idx.get("down", perm[:0])
    if down_src is None:
        down_src = down_source(down, len(idx))
    # Down's neurons are its columns: one gather along rows of [dense down | drawn columns]
    # puts each in place, the drawn ones through indices past d_ff. Gathered as integers of the
    # element's width: 35 vs 52 ms for an 8x3.7B expert (one thread) against gathering rows of
    # the transpose and transposing back, and 3x faster than the same gather in bf16.
    d_ff = down.shape[1]
    tail = down_src[:, d_ff:]
    if len(idx):
        new = draws.new["down"]  # [H, k]: already columns
        if spec.method == "noise":
            new = down.index_select(1, perm[idx]).float() + new
        tail.copy_(new)
    src = perm.clone()
    src[idx] = torch.arange(d_ff, d_ff + len(idx))
    dst = outputs.get(down.shape, down.dtype)
    torch.gather(as_bits(down_src), 1, src.expand(down.shape[0], -1), out=as_bits(dst))
    out["down"] = dst
    return out


def down_source(down: Tensor, k: int, into: Scratch | None = None) -> Tensor:
    """[H, F + k]: the dense ``down`` [H, F], then room for an expert's k drawn columns
    (``apply_draws`` gathers the expert's down from it); in ``into`` when given."""
    shape = (down.shape[0], down.shape[1] + k)
    src = torch.empty(shape, dtype=down.dtype) if into is None else into.get(shape, down.dtype)
    src[:, :down.shape[1]].copy_(down)
    return src


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
    draws = draw_expert(shapes, spec, g, sums, outputs)
    return apply_draws(mlp, draws, spec, outputs, cast=scratch)


class Buffers:
    """What ``ExpertStream`` reuses from layer to layer: the experts' tensors (``outputs``),
    the drawn values, the layer's ``down_source`` and the casts of the caller's thread."""

    def __init__(self) -> None:
        self.outputs, self.drawn = Recycler(), Recycler()
        self.down_src = Scratch()  # valid for one layer
        self.cast = Scratch()


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
        self._down_src: Tensor | None = None
        shapes = {r: tuple(w.shape) for r, w in mlp.items()}

        def draws() -> Iterator[ExpertDraws]:
            for _ in range(num_experts):
                yield draw_expert(shapes, spec, g, sums, buffers.drawn)

        # one expert handed over while the next is drawn: building one (~0.08 s at 8x3.7B) is
        # faster than drawing one (~0.2 s), so a deeper queue only holds more buffers and
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
        if self._down_src is None:  # here, not at construction: the previous layer's
            # stream may still be building its last expert from the same buffer until then
            k = len(d.idx.get("down", ()))
            self._down_src = down_source(self.mlp["down"], k, self.buffers.down_src)
        return apply_draws(self.mlp, d, self.spec, self.buffers.outputs, self._down_src,
                           self.buffers.cast)

    def close(self) -> None:
        self._draws.close()

