"""Check an upcycled checkpoint with transformers (CPU, fp32): it loads strictly, its logits are
finite, and, for function-preserving recipes (r = 0), they equal the dense model's.

The models come from ``conversion.hf_models`` (transformers, imported only there and only when
loading); the comparison is ``model.compare``, shared with checkpoint conversion.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_ext.conversion.hf_models import load_dense, load_moe
from megatron_ext.model.compare import ValidationReport, compare, probe_tokens


def validate_upcycled(dense_dir: Path, moe_dir: Path, function_preserving: bool,
                      rel_tolerance: float = 1e-4) -> ValidationReport:
    """Compare logits of the dense and the upcycled model on ``probe_tokens``.

    Function-preserving recipes must match within ``rel_tolerance * max(1, max |dense logit|)``:
    the MoE sums top-k copies of the dense MLP with weights renormalized to 1, so only rounding
    (and the permuted summation order) differs.
    """
    dense = load_dense(dense_dir)
    tokens = probe_tokens(dense.config.vocab_size)
    with torch.no_grad():
        ref = dense(tokens).logits
    del dense
    moe = load_moe(moe_dir)
    with torch.no_grad():
        out = moe(tokens).logits
    return compare(ref, out, function_preserving, rel_tolerance)
