"""upcycling.perturb: the layer's experts drawn on a worker thread (``ExpertStream``) are the
bytes one thread gives (``perturb_expert`` in a loop, itself replayed against the reference
algorithm in test_upcycling_neuron_stats.py); neuron_stats.Recycler never hands out a tensor
that something still holds."""

from __future__ import annotations

import time

import pytest
import torch

from megatron_ext.platform.direct_io import ALIGN
from megatron_ext.upcycling import UpcycleSpec
from megatron_ext.upcycling.neuron_stats import Recycler
from megatron_ext.upcycling.perturb import (
    Buffers,
    ExpertStream,
    mlp_sums,
    perturb_expert,
)


def _mlp(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    mlp = {"gate": 0.02 * torch.randn(96, 40, generator=g),
           "up": 0.3 + 0.02 * torch.randn(96, 40, generator=g),
           "down": 0.02 * torch.randn(40, 96, generator=g)}
    return {r: t.to(dtype) for r, t in mlp.items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("method,ratio,sharing", [
    ("drop", 0.5, "per_projection"), ("drop", 0.5, "shared"), ("drop", 0.0, "per_projection"),
    ("drop", 1.0, "per_projection"), ("noise", 0.5, "per_projection"),
])
def test_experts_drawn_ahead_equal_one_thread(dtype, method: str, ratio: float,
                                              sharing: str) -> None:
    mlp = _mlp(dtype)
    spec = UpcycleSpec(method=method, ratio=ratio, index_sharing=sharing, num_experts=4)
    one, ahead = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    sums = mlp_sums(mlp) if method == "drop" and ratio > 0 else None
    # two layers through the same buffers, every expert held until the end: each must stay
    # intact while later ones are made
    buffers = Buffers()
    got = [e for _ in range(2)
           for e in ExpertStream(mlp, spec, ahead, sums, buffers, spec.num_experts)]
    for expert in got:
        want = perturb_expert(mlp, spec, one)
        for role in want:
            assert torch.equal(expert[role].view(torch.uint8), want[role].view(torch.uint8))
    # and the generators end in step: nothing drawn ahead that the experts did not use
    assert torch.equal(one.get_state(), ahead.get_state())


def test_stopping_early_leaves_the_generator_where_the_draws_stopped() -> None:
    mlp, spec = _mlp(torch.bfloat16), UpcycleSpec(method="drop", ratio=0.5, num_experts=8)
    g = torch.Generator().manual_seed(5)
    experts = ExpertStream(mlp, spec, g, mlp_sums(mlp), Buffers(), 8)
    next(experts)
    experts.close()  # the worker stops; g is free again and was consumed for whole experts
    state = g.get_state()
    replay = torch.Generator().manual_seed(5)
    for _ in range(4):
        perturb_expert(mlp, spec, replay)
        if torch.equal(replay.get_state(), state):
            break
    assert torch.equal(replay.get_state(), state), "the generator stopped mid-expert"


def test_recycler_reuses_only_what_nobody_holds() -> None:
    r = Recycler(keep=8)
    a = r.get((4, 4), torch.float32)
    b = r.get((4, 4), torch.float32)
    assert b is not a
    b_id = id(b)
    del b
    assert id(r.get((4, 4), torch.float32)) == b_id  # free again: reused
    assert r.get((4, 5), torch.float32) is not a and r.get((4, 4), torch.int32) is not a
    view, a_at = a[1:], a.data_ptr()
    del a
    fresh = r.get((4, 4), torch.float32)
    assert fresh.data_ptr() != a_at and view.data_ptr() == a_at + 16  # a view holds it
    held = {"t": fresh}
    assert r.get((4, 4), torch.float32) is not fresh  # a Python reference holds it
    array = held.pop("t").numpy()
    del fresh
    got = r.get((4, 4), torch.float32)
    assert got.numpy().__array_interface__["data"][0] != array.__array_interface__["data"][0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64, torch.uint8])
def test_recycled_tensors_start_on_a_page_and_are_reused(dtype) -> None:
    """Page-aligned (the writer sends them to O_DIRECT files in place), contiguous, and free
    again once let go: the alignment must not leave a second holder of the memory."""
    r = Recycler(keep=4)
    for shape in [(3, 5), (1000, 77), (0,), (2, 4096)]:
        t = r.get(shape, dtype)
        assert (t.shape, t.dtype, t.is_contiguous()) == (shape, dtype, True)
        assert t.data_ptr() % ALIGN == 0
        t_id = id(t)
        del t
        assert id(r.get(shape, dtype)) == t_id


def test_recycler_keeps_at_most_keep() -> None:
    r = Recycler(keep=2)
    held = [r.get((3,), torch.float32) for _ in range(5)]
    assert len(r._kept) == 2 and len({id(t) for t in held}) == 5


def test_a_stream_draws_from_construction_and_hands_the_generator_back_before_its_last_expert(
) -> None:
    mlp, spec = _mlp(torch.bfloat16), UpcycleSpec(method="drop", ratio=0.5, num_experts=3)
    g = torch.Generator().manual_seed(5)
    start = g.get_state()
    built: list[dict[str, torch.Tensor]] = []
    handed: list[tuple[torch.Tensor, int]] = []
    stream = ExpertStream(mlp, spec, g, mlp_sums(mlp), Buffers(), 3,
                          on_drawn=lambda: handed.append((g.get_state(), len(built))))
    deadline = time.monotonic() + 5
    while torch.equal(g.get_state(), start) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not torch.equal(g.get_state(), start)  # drawing before the first ``next``
    built.extend(stream)
    replay = torch.Generator().manual_seed(5)
    want = [perturb_expert(mlp, spec, replay) for _ in range(3)]
    # once, with every draw made, before the last expert was built
    assert len(handed) == 1 and torch.equal(handed[0][0], replay.get_state())
    assert handed[0][1] == 2
    for got, expert in zip(built, want):
        assert all(torch.equal(got[r].view(torch.uint8), expert[r].view(torch.uint8))
                   for r in expert)
