"""RoPE as one compiled function, through megatron-core's own fused-RoPE hook.

megatron-core applies rotary embeddings either with Transformer Engine's fused kernel
(``apply_rope_fusion=True``) or with its unfused PyTorch code: per layer and for q and k, cos and
sin of the frequencies, a chunk + cat to rotate, two multiplies, an add and a cat -- about ten
memory passes each way. Without TE, ``rope_utils.fused_apply_rotary_pos_emb`` is None and
``apply_rope_fusion`` is refused. ``install()`` puts ``fused_rope`` (the same math as megatron's
unfused [s, b, h, d] path, compiled by torch.compile) in that slot, only when it is empty: with TE
installed, TE's kernel stays. Packed sequences (THD) and interleaved rotary are not covered; this
framework uses neither.
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings import rope_utils

from megatron_ext.model import fusion


def _rope(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """megatron's ``_apply_rotary_pos_emb_bshd`` for mscale 1, non-interleaved."""
    rot = freqs.shape[-1]
    t_rot, t_pass = t[..., :rot], t[..., rot:]
    cos, sin = torch.cos(freqs).to(t.dtype), torch.sin(freqs).to(t.dtype)
    x1, x2 = torch.chunk(t_rot, 2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return torch.cat((t_rot * cos + rotated * sin, t_pass), dim=-1)


def fused_rope(t: torch.Tensor, freqs: torch.Tensor, transpose_output_memory: bool = False,
               interleaved: bool = False) -> torch.Tensor:
    """TE's ``fused_apply_rotary_pos_emb`` signature, as megatron calls it."""
    if interleaved:
        raise NotImplementedError("megatron_ext fused RoPE: interleaved rotary is not supported")
    return fusion.run(_rope, True, t, freqs)


def install() -> bool:
    """Fill megatron's empty fused-RoPE slot with ``fused_rope``; True if a fused RoPE (ours or
    Transformer Engine's) is now there."""
    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = fused_rope
    return rope_utils.fused_apply_rotary_pos_emb is not None
