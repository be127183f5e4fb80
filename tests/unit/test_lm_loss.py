"""The fused LM loss (megatron_ext/model/lm_loss.py) against plain autograd cross-entropy.

Chunking is forced (tiny CHUNK_ELEMENTS) so every test crosses chunk boundaries, including a
ragged last chunk; the upstream gradient is a random per-token weight (as a loss mask with
padding gives), so a gradient that ignored it, or was scaled once globally, fails.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_ext.model import fusion, lm_loss

T, H, V = 37, 16, 50  # T not a multiple of the chunk size


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(lm_loss, "CHUNK_ELEMENTS", 8 * V)  # 8 tokens per chunk, 5 chunks


def _inputs(dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(T, 1, H, generator=gen) * 2).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=gen) * 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (T, 1), generator=gen)
    weights = torch.rand(T, 1, generator=gen)  # per-token upstream gradient
    return h, w, labels, weights


def _reference(h, w, labels, weights):
    h32 = h.detach().float().requires_grad_()
    w32 = w.detach().float().requires_grad_()
    loss = F.cross_entropy((h32 @ w32.t()).view(T, V), labels.view(T), reduction="none")
    (loss * weights.view(T)).sum().backward()
    return loss.view(T, 1).detach(), h32.grad, w32.grad


def _fused(h, w, labels, weights, fuse=False):
    loss = lm_loss.linear_cross_entropy(h, w, labels, fuse=fuse)
    (loss * weights).sum().backward()
    return loss.detach(), h.grad, w.grad


def test_fp32_matches_autograd_cross_entropy():
    h, w, labels, weights = _inputs(torch.float32)
    ref = _reference(h, w, labels, weights)
    got = _fused(h, w, labels, weights)
    assert got[0].dtype == torch.float32
    for name, a, b in zip(("loss", "grad_h", "grad_w"), got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_bf16_keeps_model_dtype_and_stays_close():
    h, w, labels, weights = _inputs(torch.bfloat16)
    ref = _reference(h, w, labels, weights)
    loss, gh, gw = _fused(h, w, labels, weights)
    assert loss.dtype == torch.float32 and gh.dtype == gw.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref[0], rtol=2e-2, atol=2e-2)
    for g, r in ((gh, ref[1]), (gw, ref[2])):
        assert float((g.float() - r).norm() / r.norm()) < 2e-2


def test_extreme_logits_stay_finite():
    # Logits of +-1e4: a naive exp overflows; log-sum-exp with the max subtracted does not.
    h, w, labels, weights = _inputs(torch.float32)
    with torch.no_grad():
        h.mul_(500.0)
    ref = _reference(h, w, labels, weights)
    got = _fused(h, w, labels, weights)
    assert all(torch.isfinite(t).all() for t in got)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-3)


def test_second_backward_is_refused():
    h, w, labels, _ = _inputs(torch.float32)
    loss = lm_loss.linear_cross_entropy(h, w, labels).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_label_shape_mismatch_is_refused():
    h, w, labels, _ = _inputs(torch.float32)
    with pytest.raises(ValueError, match="do not match"):
        lm_loss.linear_cross_entropy(h, w, labels[:-1])


def test_compiled_chunk_functions_match_eager(monkeypatch):
    # The torch.compile'd path (the CUDA default); on CPU inductor emits C++ (CI has a compiler).
    monkeypatch.setattr(fusion, "FAILED", set())
    h, w, labels, weights = _inputs(torch.float32, seed=3)
    ref = _reference(h, w, labels, weights)
    got = _fused(h, w, labels, weights, fuse=True)
    assert not fusion.FAILED, "compiled path did not run"
    for name, a, b in zip(("loss", "grad_h", "grad_w"), got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_compiler_failure_warns_once_and_runs_eagerly(monkeypatch):
    def broken(fn):
        def call(*args):
            raise RuntimeError("no triton here")
        return call

    monkeypatch.setattr(fusion, "compiled", broken)
    monkeypatch.setattr(fusion, "FAILED", set())
    h, w, labels, weights = _inputs(torch.float32, seed=4)
    ref = _reference(h, w, labels, weights)
    with pytest.warns(UserWarning, match="no triton here") as record:
        got = _fused(h, w, labels, weights, fuse=True)
    assert len(record) == 2  # one per chunk function, not one per chunk
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)
