"""Fixes for megatron-core 0.16.1 that apply on every device (CPU and GPU alike)."""

from __future__ import annotations


def apply_megatron_fixes() -> list[str]:
    """Apply the fixes; returns the names of those that were needed (for the log/tests).

    - ``moe_utils.te_general_gemm``: the router's forward reads this name, which is only
      defined when Transformer Engine imports, so without TE (our H100 image, any CPU) every MoE
      forward raises NameError. ``None`` selects megatron's own torch matmul path.
    """
    from megatron.core.transformer.moe import moe_utils

    applied = []
    if not getattr(moe_utils, "HAVE_TE", False) and not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
        applied.append("moe_utils.te_general_gemm=None")
    return applied
