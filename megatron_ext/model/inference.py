"""Run a built megatron model for evaluation: full-vocabulary logits of a token batch.

Loading a checkpoint into a model is the checkpoint layer's job
(``megatron_ext.checkpoint.load_model``); this module only runs the model.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel


@torch.no_grad()
def logits(model, tokens_BS: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits [b, s, vocab] (vocab padding included) for a token batch."""
    device = next(model.parameters()).device
    tokens_BS = tokens_BS.to(device)
    pos = torch.arange(tokens_BS.shape[1], device=device).expand_as(tokens_BS)
    out = model(tokens_BS, pos, None).float()
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        # The output layer is column-parallel: each TP rank holds a slice of the vocabulary.
        out = tensor_parallel.gather_from_tensor_model_parallel_region(out)
    return out
