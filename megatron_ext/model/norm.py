"""RMSNorm for megatron's local spec that also works with sequence parallelism.

Without Transformer Engine or apex, megatron-core's local spec uses ``WrappedTorchNorm``, which
refuses ``sequence_parallel`` -- and megatron requires sequence parallelism for MoE with tensor
parallelism, so MoE + TP would need TE. With sequence parallelism each TP rank normalizes its
own slice of the sequence, so the only extra need is that the norm weight's gradient is summed
over the TP group: megatron's ``finalize_model_grads`` does that for parameters flagged
``sequence_parallel``. State-dict keys and values are those of ``torch.nn.RMSNorm``.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.RMSNorm):
    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5,
                 persist_layer_norm: bool = False, zero_centered_gamma: bool = False,
                 normalization: str = "RMSNorm"):
        if config.normalization != "RMSNorm" or config.layernorm_zero_centered_gamma:
            raise ValueError("megatron_ext RMSNorm: only plain RMSNorm is supported")
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel
