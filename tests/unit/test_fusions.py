"""The compiled RoPE and RMSNorm against megatron's / torch's eager code, values and gradients."""

from __future__ import annotations

import pytest
import torch
from megatron.core.models.common.embeddings import rope_utils

from megatron_ext.model import fusion, rope

S, B, HEADS, D = 12, 2, 3, 16


def _freqs(rot_dim: int) -> torch.Tensor:
    inv = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2).float() / rot_dim))
    f = torch.outer(torch.arange(S).float(), inv)
    return torch.cat((f, f), dim=-1)[:, None, None, :]  # [s, 1, 1, rot], megatron's layout


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("rot_dim", [D, D // 2])  # full and partial rotary
def test_compiled_rope_matches_megatron_unfused(monkeypatch, dtype, tol, rot_dim):
    monkeypatch.setattr(fusion, "FAILED", set())
    gen = torch.Generator().manual_seed(0)
    t0 = torch.randn(S, B, HEADS, D, generator=gen).to(dtype)
    freqs = _freqs(rot_dim)
    upstream = torch.randn(S, B, HEADS, D, generator=gen).to(dtype)
    outs = []
    reference = lambda t: rope_utils._apply_rotary_pos_emb_bshd(t, freqs)  # noqa: E731
    for fn in (reference, lambda t: rope.fused_rope(t, freqs)):
        t = t0.clone().requires_grad_()
        y = fn(t)
        (y.float() * upstream.float()).sum().backward()
        outs.append((y.detach().float(), t.grad.float()))
    assert not fusion.FAILED
    for a, b in zip(outs[1], outs[0]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_install_fills_only_an_empty_slot(monkeypatch):
    sentinel = object()
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", sentinel)
    assert rope.install() and rope_utils.fused_apply_rotary_pos_emb is sentinel  # TE's stays
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", None)
    assert rope.install() and rope_utils.fused_apply_rotary_pos_emb is rope.fused_rope
    with pytest.raises(NotImplementedError, match="interleaved"):
        rope.fused_rope(torch.zeros(S, B, HEADS, D), _freqs(D), interleaved=True)


def test_compiled_rms_norm_matches_torch(monkeypatch):
    from types import SimpleNamespace

    from megatron_ext.model.norm import RMSNorm

    monkeypatch.setattr(fusion, "FAILED", set())
    config = SimpleNamespace(normalization="RMSNorm", layernorm_zero_centered_gamma=False,
                             params_dtype=torch.float32, sequence_parallel=False)
    eager, fused = RMSNorm(config, 24, eps=1e-5), RMSNorm(config, 24, eps=1e-5, fused=True)
    with torch.no_grad():
        eager.weight.uniform_(0.5, 1.5)
        fused.weight.copy_(eager.weight)
    x0 = torch.randn(S, B, 24, generator=torch.Generator().manual_seed(1))
    grads = []
    for norm in (eager, fused):
        x = x0.clone().requires_grad_()
        y = norm(x)
        (y * torch.arange(24.0)).sum().backward()
        grads.append((y.detach(), x.grad, norm.weight.grad))
    assert not fusion.FAILED
    for a, b in zip(grads[1], grads[0]):
        # The compiled kernel sums in another order (which can vary with the thread count): the
        # rounding error of an element scales with the largest terms of its sums (input
        # gradients reach ~35 here), not with the element itself.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * max(1.0, b.abs().max().item()))
