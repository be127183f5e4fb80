"""A token dispatcher for MoE layers whose experts all live on this rank: no host syncs.

Without expert or tensor parallelism nothing is exchanged, and megatron-core's allgather
dispatcher (the one that applies) reduces to a permutation -- but it builds it with
``tokens_per_expert.cpu()`` and two ``masked_select`` calls, whose output sizes depend on the
data: three points per MoE layer and forward where the CPU waits for the GPU to drain.

Dropless top-k routing selects exactly tokens x k (token, expert) pairs, a size the host knows.
So the permutation comes from ``nonzero_static`` over the expert-major routing map -- the same
order megatron uses (by expert, then by token), hence the same expert inputs -- and the
per-expert counts stay on the device, where ``GroupedGemmExperts`` takes them (grouped_mm reads
device offsets). Combining is an ``index_add`` back to token order, as megatron's unpermute does
with ``scatter_add``.

Contract (megatron's ``MoETokenDispatcher``): dispatch_preprocess -> token_dispatch ->
dispatch_postprocess -> experts -> combine_preprocess -> token_combine -> combine_postprocess.
Not supported, and refused at construction: expert/tensor parallelism, a capacity factor
(token dropping changes the number of pairs), shared-expert overlap.
"""

from __future__ import annotations

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher
from megatron.core.transformer.transformer_config import TransformerConfig


class LocalTokenDispatcher(MoETokenDispatcher):
    def __init__(self, num_local_experts: int, config: TransformerConfig,
                 pg_collection: ProcessGroupCollection):
        super().__init__(config=config, pg_collection=pg_collection)
        if self.tp_size * self.ep_size != 1:
            raise ValueError("LocalTokenDispatcher: needs expert and tensor parallel size 1")
        if num_local_experts != config.num_moe_experts:
            raise ValueError("LocalTokenDispatcher: every expert must be local")
        if config.moe_expert_capacity_factor is not None or config.moe_shared_expert_overlap:
            raise ValueError("LocalTokenDispatcher: dropless routing without shared-expert "
                             "overlap only")
        self.top_k = config.moe_router_topk
        self.routing_map: torch.Tensor | None = None

    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        self.hidden_shape = hidden_states.shape
        self.routing_map = routing_map
        return hidden_states.view(-1, self.hidden_shape[-1]), probs

    def token_dispatch(self, hidden_states, probs):
        return hidden_states, probs  # nothing to exchange

    def dispatch_postprocess(self, hidden_states, probs):
        tokens = hidden_states.shape[0]
        map_ET = self.routing_map.t()
        # (expert, token) pairs in expert-major order; exactly tokens * top_k of them.
        pairs = torch.nonzero_static(map_ET.reshape(-1), size=tokens * self.top_k).squeeze(1)
        self.token_index = pairs % tokens
        tokens_per_expert = map_ET.sum(dim=1)
        permuted_probs = probs.t().reshape(-1).index_select(0, pairs)
        self.routing_map = None
        return hidden_states.index_select(0, self.token_index), tokens_per_expert, permuted_probs

    def combine_preprocess(self, hidden_states):
        out = hidden_states.new_zeros(self.hidden_shape[:-1].numel(), hidden_states.shape[-1])
        out = out.index_add(0, self.token_index, hidden_states)
        self.token_index = None
        return out

    def token_combine(self, hidden_states):
        return hidden_states

    def combine_postprocess(self, hidden_states):
        return hidden_states.view(self.hidden_shape)


def use_local_dispatcher(model: torch.nn.Module) -> int:
    """Swap every MoE layer's dispatcher for ``LocalTokenDispatcher``; returns how many.
    (Layers built with megatron's default process groups, as our builder builds them.)"""
    swapped = 0
    for module in model.modules():
        if isinstance(module, MoELayer):
            module.token_dispatcher = LocalTokenDispatcher(
                module.num_local_experts, module.config, get_default_pg_collection())
            swapped += 1
    return swapped
