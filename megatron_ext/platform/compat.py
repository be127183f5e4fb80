"""Fixes for megatron-core 0.16.1 that apply on every device (CPU and GPU alike).

Each is a record in ``megatron_ext.platform.patches`` (upstream equivalent, when it can go).
"""

from __future__ import annotations

from megatron.core.tensor_parallel import random as tp_random
from megatron.core.transformer.moe import moe_utils


def apply_megatron_fixes() -> list[str]:
    """Apply the fixes; returns the names of those that were needed (for the log/tests).

    - ``moe_utils.te_general_gemm``: the router's forward reads this name, which is only
      defined when Transformer Engine imports, so without TE (our H100 image, any CPU) every MoE
      forward raises NameError. ``None`` selects megatron's own torch matmul path.
    - ``CheckpointWithoutOutput(fp8=False)``: its constructor sets ``self.fp8 = fp8 is not None``,
      so the default takes the FP8 path, which calls Transformer Engine: without TE the
      ``layernorm`` selective recompute raises NameError. Without TE, a false ``fp8`` now means no
      FP8 (our experts' ``moe_act`` recompute already passes ``fp8=None``).
    """
    applied = []
    if not getattr(moe_utils, "HAVE_TE", False) and not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
        applied.append("moe_utils.te_general_gemm=None")
    cls = tp_random.CheckpointWithoutOutput
    if not tp_random.HAVE_TE and not getattr(cls, "_fp8_default_fixed", False):
        original = cls.__init__

        def __init__(self, fp8=False):
            original(self, fp8=fp8 or None)

        cls.__init__ = __init__
        cls._fp8_default_fixed = True
        applied.append("CheckpointWithoutOutput fp8 default")
    return applied
