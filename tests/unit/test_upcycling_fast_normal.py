"""upcycling.fast_normal: torch's CPU ``normal_`` on fp32 to the bit (the values, and the
generator's state after them) wherever the stream stands and whatever the size; the compiled
kernel is what runs where it can be built, and each way it cannot be falls back to torch's
``normal_`` and says why."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_ext.upcycling import fast_normal
from megatron_ext.upcycling.fast_normal import MIN_SAMPLES
from tests.conftest import REPO

# past the threshold by: a partial block of 16, one mt19937 state, and around its regeneration
SIZES = [MIN_SAMPLES + extra for extra in (0, 1, 15, 17, 623, 624, 625, 1249)] + [1 << 20]
PARAMS = [(0.0, 1.0), (0.0123, 0.0213), (-3.0, 0.5), (1.0, 0.0)]


def _pair(seed: int, skip: int) -> tuple[torch.Generator, torch.Generator]:
    """Two generators at the same point of one stream: ``skip`` words in (any word of a state)."""
    gens = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    for g in gens:
        torch.randperm(skip, generator=g)
    return gens


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("n", SIZES)
def test_values_and_state_equal_torchs(n: int) -> None:
    for i, (mean, std) in enumerate(PARAMS):
        theirs, ours = _pair(seed=i, skip=97 * i + 1)
        expected = torch.empty(n).normal_(mean, std, generator=theirs)
        got = fast_normal.normal_(torch.empty(n), mean, std, ours)
        assert _same(got, expected), (n, mean, std)
        assert torch.equal(ours.get_state(), theirs.get_state()), (n, mean, std)


def test_a_stream_of_draws_equals_torchs() -> None:
    """As the upcycler interleaves them: permutations, then samples of several sizes."""
    theirs, ours = _pair(seed=1234, skip=8)
    for n in (3 * MIN_SAMPLES + 5, MIN_SAMPLES, 2 * MIN_SAMPLES + 1000):
        perms = [torch.randperm(1000, generator=g) for g in (theirs, ours)]
        assert torch.equal(*perms)
        expected = torch.empty(n).normal_(0.01, 0.02, generator=theirs)
        assert _same(fast_normal.normal_(torch.empty(n), 0.01, 0.02, ours), expected)
    assert torch.equal(torch.rand(5, generator=ours), torch.rand(5, generator=theirs))


@pytest.mark.parametrize("make", [
    lambda n: torch.empty(2, n // 2).t(),  # not contiguous
    lambda n: torch.empty(n, dtype=torch.float64),
    lambda n: torch.empty(n, dtype=torch.bfloat16),
    lambda n: torch.empty(15),  # torch's own kernel for under 16 samples
    lambda n: torch.empty(MIN_SAMPLES - 1),
])
def test_what_the_kernel_does_not_cover_is_torchs(make) -> None:
    theirs, ours = _pair(seed=5, skip=3)
    expected = make(MIN_SAMPLES + 2).normal_(0.5, 2.0, generator=theirs)
    got = fast_normal.normal_(make(MIN_SAMPLES + 2), 0.5, 2.0, ours)
    assert torch.equal(got, expected) and torch.equal(ours.get_state(), theirs.get_state())


@pytest.mark.parametrize("std", [-0.1, float("nan")])
def test_a_bad_std_is_torchs_error(std: float) -> None:
    with pytest.raises(RuntimeError) as theirs:
        torch.empty(MIN_SAMPLES).normal_(0.0, std)
    with pytest.raises(RuntimeError) as ours:
        fast_normal.normal_(torch.empty(MIN_SAMPLES), 0.0, std, torch.Generator())
    assert str(ours.value) == str(theirs.value)


def _gnu_cxx() -> bool:
    cxx = shutil.which("c++")
    return bool(cxx) and "Free Software Foundation" in subprocess.run(
        [cxx, "--version"], capture_output=True, text=True).stdout


@pytest.mark.skipif(not _gnu_cxx(), reason="needs GCC as c++ (the compiler it is checked with)")
@pytest.mark.parametrize("capability,kind", [("", "AVX2"), ("default", "scalar")])
def test_the_kernel_runs_where_it_can_be_built(capability: str, kind: str) -> None:
    """In a fresh process, as torch dispatches for this CPU (AVX2 here) and as it does with
    ATEN_CPU_CAPABILITY=default (the generic kernel that AVX512 CPUs run too)."""
    if not capability and torch.backends.cpu.get_cpu_capability() != "AVX2":
        pytest.skip("this CPU's torch kernel is not the AVX2 one")
    code = ("import json, torch\n"
            "from megatron_ext.upcycling import fast_normal\n"
            "a, b = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)\n"
            "x = torch.empty(1 << 20).normal_(0.0, 0.02, generator=a)\n"
            "y = fast_normal.normal_(torch.empty(1 << 20), 0.0, 0.02, b)\n"
            "print(json.dumps([fast_normal.backend(), torch.equal(x, y),"
            " torch.equal(a.get_state(), b.get_state())]))\n")
    env = {"ATEN_CPU_CAPABILITY": capability} if capability else {}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={**_env(), **env}, timeout=300)
    assert done.returncode == 0, done.stderr
    backend, same_values, same_state = json.loads(done.stdout)
    assert backend.startswith(f"normal_fill.cpp ({kind},"), backend
    assert same_values and same_state


def test_the_check_rejects_a_kernel_that_is_not_torchs() -> None:
    """The AVX2 build against torch's generic kernel (ATEN_CPU_CAPABILITY=default): the check
    that guards every build must tell them apart."""
    if not _gnu_cxx() or torch.backends.cpu.get_cpu_capability() != "AVX2":
        pytest.skip("needs GCC and an AVX2 CPU")
    code = ("from megatron_ext.upcycling import fast_normal as f\n"
            "print(f._differs_from_torch(f._compile(avx2=True)))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={**_env(), "ATEN_CPU_CAPABILITY": "default"}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("values of"), done.stdout


@pytest.mark.parametrize("env,why", [
    ({"MEGATRON_EXT_FAST_NORMAL": "0"}, "(MEGATRON_EXT_FAST_NORMAL=0)"),
    ({"CXX": "/nonexistent/c++"}, "no C++ compiler '/nonexistent/c++' on PATH"),
    ({"CXX": "false"}, "could not build normal_fill.cpp: false: exit 1"),
    pytest.param({"CXX": "c++ -include /nonexistent/h.h"}, "could not build normal_fill.cpp",
                 marks=pytest.mark.skipif(not shutil.which("c++"), reason="no c++")),
    ({"CXX": "'c++"}, "$CXX=\"'c++\": No closing quotation"),
])
def test_each_fallback_says_why_and_gives_torchs_values(monkeypatch, env: dict, why: str) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    fast_normal._kernel.cache_clear()
    try:
        backend = fast_normal.backend()
        theirs, ours = _pair(seed=2, skip=11)
        expected = torch.empty(MIN_SAMPLES).normal_(0.0, 1.0, generator=theirs)
        got = fast_normal.normal_(torch.empty(MIN_SAMPLES), 0.0, 1.0, ours)
    finally:
        fast_normal._kernel.cache_clear()  # the next test builds the real one again
    assert backend.startswith("torch's normal_") and why in backend, backend
    assert _same(got, expected) and torch.equal(ours.get_state(), theirs.get_state())


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "CXX",
                                                            "MEGATRON_EXT_FAST_NORMAL")}
    return {**env, "PYTHONPATH": str(REPO)}
