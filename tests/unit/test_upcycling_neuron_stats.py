"""Slice statistics from per-neuron sums (upcycling/neuron_stats.py): they equal torch.std_mean
of the gathered slice, and drop's bytes equal a replay that gathers each slice and takes
torch.std_mean of it (the upcycler's algorithm before the sums)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_ext.upcycling import UpcycleSpec
from megatron_ext.upcycling.neuron_stats import NeuronSums, as_fp32
from megatron_ext.upcycling.perturb import perturb_expert


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("offset", [0.0, 3.0])  # a mean far from 0 must not cancel the variance
def test_sums_equal_std_mean_of_the_slice(dtype, offset: float) -> None:
    g = torch.Generator().manual_seed(0)
    w = (offset + 0.02 * torch.randn(96, 40, generator=g)).to(dtype)
    idx = torch.randperm(96, generator=g)[:37]
    for dim, sel in ((0, w.index_select(0, idx)), (1, w.t().contiguous().index_select(1, idx))):
        std, mean = NeuronSums(w if dim == 0 else w.t().contiguous(), dim).std_mean(idx)
        want_std, want_mean = torch.std_mean(sel.float())
        assert as_fp32(mean) == want_mean.item() and as_fp32(std) == want_std.item()
    assert NeuronSums(w, 0).std_mean(idx[:0]) == (0.0, NeuronSums(w, 0).shift)


def _replay(mlp: dict, spec: UpcycleSpec, g: torch.Generator) -> dict:
    """drop, the slice gathered and its torch.std_mean sampled from (REFERENCE.md section 1);
    noise, N(0, noise_std) added to the gathered slice in fp32 (section 6)."""
    f = mlp["gate"].shape[0]
    k = math.floor(spec.ratio * f)
    perm = torch.randperm(f, generator=g)
    out = {"gate": mlp["gate"][perm], "up": mlp["up"][perm], "down": mlp["down"][:, perm]}
    for role in ("gate", "down", "up"):
        idx = torch.randperm(f, generator=g)[:k]
        dim = 1 if role == "down" else 0
        sel = out[role].index_select(dim, idx).float()
        if spec.method == "noise":
            new = sel + torch.normal(0.0, spec.noise_std, tuple(sel.shape), generator=g)
        else:
            std, mean = torch.std_mean(sel)
            new = torch.normal(mean.item(), std.item(), tuple(sel.shape), generator=g)
        out[role].index_copy_(dim, idx, new.to(out[role].dtype))
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("method", ["drop", "noise"])
# the second shape draws 257 x 259 samples per projection: past fast_normal.MIN_SAMPLES, so the
# compiled kernel makes them where it can be built, and not a multiple of 16
@pytest.mark.parametrize("d_ff,hidden", [(160, 48), (514, 259)])
def test_drop_and_noise_bytes_equal_a_replay(dtype, method: str, d_ff: int, hidden: int) -> None:
    g = torch.Generator().manual_seed(1)
    mlp = {"gate": 0.02 * torch.randn(d_ff, hidden, generator=g),
           "up": 0.5 + 0.02 * torch.randn(d_ff, hidden, generator=g),
           "down": 0.02 * torch.randn(hidden, d_ff, generator=g)}
    mlp = {r: t.to(dtype) for r, t in mlp.items()}
    spec = UpcycleSpec(method=method, ratio=0.5, num_experts=2)
    ours, theirs = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for _ in range(3):  # experts: the generator stays in step
        got, want = perturb_expert(mlp, spec, ours), _replay(mlp, spec, theirs)
        for role in got:
            assert torch.equal(got[role].view(torch.uint8), want[role].view(torch.uint8)), role


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_sums_leave_the_matrix_unchanged(dtype) -> None:
    """An fp64 matrix once came back shifted and squared: ``.double()`` of it is itself."""
    w = (0.3 + 0.02 * torch.randn(64, 24, generator=torch.Generator().manual_seed(2))).to(dtype)
    before = w.clone()
    for dim in (0, 1):
        NeuronSums(w, dim)
        assert torch.equal(w, before)
