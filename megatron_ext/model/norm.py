"""RMSNorm for megatron's local spec that also works with sequence parallelism.

Without Transformer Engine or apex, megatron-core's local spec uses ``WrappedTorchNorm``, which
refuses ``sequence_parallel`` -- and megatron requires sequence parallelism for MoE with tensor
parallelism, so MoE + TP would need TE. With sequence parallelism each TP rank normalizes its
own slice of the sequence, so the only extra need is that the norm weight's gradient is summed
over the TP group: megatron's ``finalize_model_grads`` does that for parameters flagged
``sequence_parallel``. State-dict keys and values are those of ``torch.nn.RMSNorm``.

``fused=True`` (``model.kernel_fusion``) runs ``F.rms_norm`` through torch.compile, which fuses
the eager op-by-op sequence (square, mean, rsqrt, two multiplies) in each direction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ext.model import fusion


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float | None) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


class RMSNorm(torch.nn.RMSNorm):
    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5,
                 persist_layer_norm: bool = False, zero_centered_gamma: bool = False,
                 normalization: str = "RMSNorm", fused: bool = False):
        if config.normalization != "RMSNorm" or config.layernorm_zero_centered_gamma:
            raise ValueError("megatron_ext RMSNorm: only plain RMSNorm is supported")
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return fusion.run(_rms_norm, True, x, self.weight, self.eps)
        return super().forward(x)
