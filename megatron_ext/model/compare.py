"""Logit comparison of two models on fixed probe tokens: the one check behind checkpoint
conversion (``conversion.convert``) and upcycling validation (``upcycling.validate``).

Which models are compared (transformers or ours, HF or megatron checkpoints) is the caller's
business; this module only fixes the probe tokens and judges two logit tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_ext.errors import CheckFailed


class ValidationError(CheckFailed, RuntimeError):
    """The upcycled model failed a check (not a bad input: the conversion is wrong)."""


@dataclass(frozen=True)
class ValidationReport:
    max_abs_diff: float
    """Largest |logit_moe - logit_dense| over the probe sequences."""
    max_abs_logit: float
    """Largest |logit_dense|, the scale the difference is judged against."""
    finite: bool
    function_preserving: bool
    tolerance: float | None
    """Allowed max_abs_diff when function_preserving, else None (difference only reported)."""

    @property
    def passed(self) -> bool:
        if not self.finite:
            return False
        return self.tolerance is None or self.max_abs_diff <= self.tolerance

    def summary(self) -> str:
        check = (f"<= {self.tolerance:.2e} required" if self.tolerance is not None
                 else "reported only: this recipe changes the function")
        return (f"validation: max |logit diff| = {self.max_abs_diff:.3e} ({check}); "
                f"max |dense logit| = {self.max_abs_logit:.3f}; finite = {self.finite}; "
                f"{'PASS' if self.passed else 'FAIL'}")


def probe_tokens(vocab_size: int, num_sequences: int = 3, seq_len: int = 16) -> torch.Tensor:
    """Fixed token sequences (seeded, independent of the upcycling seed)."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (num_sequences, seq_len), generator=g)


def compare(expected: torch.Tensor, got: torch.Tensor, function_preserving: bool = True,
            rel_tolerance: float = 1e-4) -> ValidationReport:
    """Judge ``got`` against ``expected`` (logits on the same tokens).

    Function-preserving results must match within ``rel_tolerance * max(1, max |expected|)``:
    e.g. an r = 0 MoE sums top-k copies of the dense MLP with weights renormalized to 1, so only
    rounding (and the permuted summation order) differs. Otherwise the difference is reported.
    """
    scale = expected.abs().max().item()
    return ValidationReport(
        max_abs_diff=(got - expected).abs().max().item(),
        max_abs_logit=scale,
        finite=bool(torch.isfinite(got).all()),
        function_preserving=function_preserving,
        tolerance=rel_tolerance * max(1.0, scale) if function_preserving else None,
    )
