"""MoE upcycling of dense Llama checkpoints: scratch, naive, noise (RNU), drop, btx.

``upcycle`` (HF names) and ``upcycle_mcore`` (megatron-core names) stream tensors;
``upcycle_checkpoint`` is the directory-to-directory function behind ``moe-upcycle``.
"""

from megatron_ext.upcycling.spec import METHODS, UpcycleError, UpcycleSpec
from megatron_ext.upcycling.upcycle import upcycle, upcycle_mcore

__all__ = ["METHODS", "UpcycleError", "UpcycleSpec", "upcycle", "upcycle_mcore"]
