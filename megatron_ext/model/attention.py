"""Core attention for megatron-core's local spec without Transformer Engine.

megatron's own ``DotProductAttention`` materializes the [b, heads, s, s] score matrix; PyTorch's
``scaled_dot_product_attention`` runs FlashAttention-2 / memory-efficient kernels on H100 and a
fused kernel on CPU, with the causal mask implied (no mask tensor is built). When the
``flash_attn`` package imports, its kernel is used on CUDA instead.

Generation (``model.inference``'s KV cache) calls it with megatron's per-call mask type
(``no_mask`` for a one-token decode step) and, for left-padded batches, an explicit boolean mask
that replaces the causal one; training passes neither.

Shapes (megatron's convention): query [s, b, heads, d], key/value [s, b, kv_heads, d];
output [s, b, heads * d].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

try:  # optional: the NGC image ships it
    from flash_attn import flash_attn_func

    HAVE_FLASH_ATTN = True
except ImportError:  # pragma: no cover - not installable on CPU machines
    flash_attn_func = None
    HAVE_FLASH_ATTN = False


class SDPAttention(MegatronModule):
    """Causal self-attention through torch SDPA (or flash-attn); a drop-in for
    DotProductAttention."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        use_flash_attn: bool = False,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask):
            raise ValueError(f"SDPAttention supports causal/no_mask, not {attn_mask_type}")
        self.causal = attn_mask_type == AttnMaskType.causal
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(head_dim)
        self.dropout_p = (config.attention_dropout if attention_dropout is None
                          else attention_dropout)
        self.use_flash_attn = use_flash_attn and HAVE_FLASH_ATTN

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention: packed sequences and attention bias are unsupported")
        s, b, heads, d = query.shape
        dropout = self.dropout_p if self.training else 0.0
        # megatron passes the type per call: no_mask for a KV-cache decode step (one query
        # against every cached key), where a causal mask would hide all but the first key.
        causal = self.causal if attn_mask_type is None else attn_mask_type == AttnMaskType.causal
        if attention_mask is not None:
            # An explicit mask (megatron's convention: True = masked out, broadcastable to
            # [b, heads, sq, sk]) is the whole mask, causal part included: generation's left
            # padding (model.inference). Training passes none.
            causal, allowed = False, ~attention_mask
        else:
            allowed = None
        if self.use_flash_attn and query.is_cuda and allowed is None:
            # flash-attn wants [b, s, heads, d] and handles GQA itself.
            out_BSHD = flash_attn_func(
                query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1),
                dropout_p=dropout, softmax_scale=self.softmax_scale, causal=causal,
            )
            return out_BSHD.transpose(0, 1).reshape(s, b, heads * d)
        # SDPA wants [b, heads, s, d]; enable_gqa avoids materializing repeated k/v heads.
        q_BHSD = query.permute(1, 2, 0, 3)
        k_BHSD = key.permute(1, 2, 0, 3)
        v_BHSD = value.permute(1, 2, 0, 3)
        out_BHSD = F.scaled_dot_product_attention(
            q_BHSD, k_BHSD, v_BHSD, attn_mask=allowed, dropout_p=dropout, is_causal=causal,
            scale=self.softmax_scale, enable_gqa=k_BHSD.shape[1] != heads,
        )
        return out_BHSD.permute(2, 0, 1, 3).reshape(s, b, heads * d)


class FlashAttention(SDPAttention):
    """SDPAttention that prefers the flash-attn package's kernel (when importable)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, use_flash_attn=True, **kwargs)
