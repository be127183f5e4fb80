"""Run a built megatron model for evaluation: full-vocabulary logits of a token batch, and
incremental decoding with a KV cache.

Two caches with one interface, picked by ``new_cache``: the lean decoder's (``model.decode``:
plain PyTorch on the model's weights, for single-process models of the architecture we build,
SDPA attention) and megatron's own, for everything else (parallel layouts, Transformer Engine,
megatron's unfused attention, GPU). ``extend`` runs either; what follows is megatron's.

Loading a checkpoint into a model is the checkpoint layer's job
(``megatron_ext.checkpoint.load_model``); this module only runs the model.

KV cache: megatron-core's own static-batching path (``StaticInferenceContext``, 0.16.1): each
attention layer keeps the keys and values it computed in a [max_length, batch, kv_heads, d]
buffer, applies RoPE at the new positions (cache columns), and once the cache holds tokens
attends the new queries to every cached key with no causal mask (``AttnMaskType.no_mask``).
All rows share the column index. ``extend`` runs a [b, s] block after the cached columns.

Rows of different lengths, two ways (``KVCache(padded=...)``):
* padded (``padding_masks_supported``: every core attention is our ``SDPAttention``): rows are
  left-padded to one width; every call passes an explicit mask (causal, padding columns
  hidden, a padding query sees only itself so no softmax row is empty), so any block size may
  follow the cache (a shared context, then its continuations). A row's real tokens sit at
  columns pad..; RoPE scores depend on relative positions only, so this is the unpadded
  computation up to float rounding.
* unpadded (any attention: Transformer Engine's and megatron's unfused one take a mask type,
  not a padding mask, on this path): after the prefill one column per call, so the caller
  prefills the shortest prompt and feeds longer prompts' remaining tokens one step at a time;
  no padding ever enters the cache.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.transformer.dot_product_attention import DotProductAttention

from megatron_ext.model import decode
from megatron_ext.model.attention import SDPAttention
from megatron_ext.model.decode import LeanCache, attention_mask
from megatron_ext.platform import cpu

# model -> (runs with the CPU function mode off?, honours padding masks?); see the helpers below.
_TRAITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _traits(model) -> tuple[bool, bool]:
    traits = _TRAITS.get(model)
    if traits is None:
        cores = [m.core_attention for m in model.modules() if hasattr(m, "core_attention")]
        # megatron's unfused attention builds its causal mask on device="cuda": it needs the
        # CPU path's device redirection, every other op of the forward does not.
        native = not any(isinstance(m, DotProductAttention) for m in cores)
        padded = bool(cores) and all(isinstance(m, SDPAttention) for m in cores)
        traits = _TRAITS[model] = (native, padded)
    return traits


def _native(model):
    """``cpu.native_torch()`` (a no-op on GPU) unless the model needs the CPU path's device
    redirection during its forward: every torch call through that mode is a Python call."""
    return cpu.native_torch() if _traits(model)[0] else contextlib.nullcontext()


def padding_masks_supported(model) -> bool:
    """True if ``new_cache(model, ...)`` may be padded: every core attention of ``model`` takes
    an explicit padding mask (ours), which the lean decoder also requires."""
    return _traits(model)[1]


def _gather_vocab(out: torch.Tensor) -> torch.Tensor:
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        # The output layer is column-parallel: each TP rank holds a slice of the vocabulary.
        out = tensor_parallel.gather_from_tensor_model_parallel_region(out)
    return out


@torch.no_grad()
def logits(model, tokens_BS: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits [b, s, vocab] (vocab padding included) for a token batch."""
    device = next(model.parameters()).device
    tokens_BS = tokens_BS.to(device)
    pos = torch.arange(tokens_BS.shape[1], device=device).expand_as(tokens_BS)
    with _native(model):
        return _gather_vocab(model(tokens_BS, pos, None).float())


class KVCache:
    """Keys and values of ``batch`` rows, up to ``max_length`` columns each (megatron's
    ``StaticInferenceContext``; its buffers are allocated by the first ``extend``). ``padded``:
    ``extend`` takes which columns are padding and masks them (``padding_masks_supported``)."""

    def __init__(self, batch: int, max_length: int, padded: bool = False):
        self.context = StaticInferenceContext(batch, max_length)
        self.max_length = max_length
        self.pad_BL = torch.zeros(batch, max_length, dtype=torch.bool) if padded else None

    @property
    def length(self) -> int:
        """Columns filled so far (the same for every row)."""
        return self.context.sequence_len_offset

    def keep_rows(self, rows: list[int]) -> None:
        """Drop every row not in ``rows`` (row i of the cache becomes ``rows[i]`` of before),
        so that finished rows cost nothing in later steps."""
        memory = self.context.key_value_memory_dict
        for layer, (key_SBHD, value_SBHD) in memory.items():
            index = torch.tensor(rows, dtype=torch.long, device=key_SBHD.device)
            memory[layer] = (key_SBHD.index_select(1, index), value_SBHD.index_select(1, index))
        if self.pad_BL is not None:
            self.pad_BL = self.pad_BL[rows]
        self.context.max_batch_size = len(rows)

    def mask(self, s: int, device: torch.device) -> torch.Tensor | None:
        """The attention mask (True = masked) of ``s`` new columns after ``length``, or None
        when unpadded (megatron's causal/no-mask types then apply)."""
        if self.pad_BL is None:
            return None
        return attention_mask(self.pad_BL, self.length, s, device)


def new_cache(model, batch: int, max_length: int, padded: bool = False) -> KVCache | LeanCache:
    """The KV cache ``extend`` runs ``model`` with: the lean decoder's (``model.decode``) when
    it implements the model, else megatron's static inference context."""
    if decode.unsupported(model) is None:
        return LeanCache(model, batch, max_length, padded)
    return KVCache(batch, max_length, padded)


@torch.no_grad()
def extend(model, tokens_BS: torch.Tensor, cache: KVCache | LeanCache,
           pad_BS: torch.Tensor | None = None, every_column: bool = False) -> torch.Tensor:
    """Run ``tokens_BS`` after the columns already in ``cache`` (adding theirs) and return
    full-vocabulary logits (fp32): [b, vocab] of each row's last new column, or [b, s, vocab]
    of every new column with ``every_column``. ``pad_BS``: which new columns are padding (a
    padded cache; None = none is). An unpadded cache takes one column per call after the
    prefill (megatron then attends without a mask); a padded one any number (the mask)."""
    b, s = tokens_BS.shape
    start = cache.length
    if start > 0 and s != 1 and cache.pad_BL is None:
        raise ValueError(f"KVCache: after the prefill, one token per row per call, got {s}")
    if start + s > cache.max_length:
        raise ValueError(f"KVCache: {start + s} columns exceed the cache's {cache.max_length}")
    if pad_BS is not None:
        if cache.pad_BL is None:
            raise ValueError("KVCache: padding given to an unpadded cache")
        cache.pad_BL[:, start:start + s] = pad_BS
    device = next(model.parameters()).device
    if isinstance(cache, LeanCache):
        with cpu.native_torch():  # plain torch calls, no CUDA device named
            return cache.forward(tokens_BS.to(device), every_column)
    context = cache.context
    if start > 0 and s == 1:
        context.enable_decode_mode()
    else:
        context.enable_prefill_mode()
    # The LM head runs on the last column only unless every column is asked for.
    context.materialize_only_last_token_logits = not every_column
    pos_BS = torch.arange(start, start + s, device=device).expand(b, s)
    with _native(model):
        out_BSV = model(tokens_BS.to(device), pos_BS, cache.mask(s, device),
                        inference_context=context, runtime_gather_output=True)
    context.increment_sequence_len_offset(s)
    return out_BSV.float() if every_column else out_BSV[:, -1].float()
