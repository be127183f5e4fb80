"""Router statistics: the aux losses megatron tracks (``router_losses``), the all-layers
load-balancing loss (``all_layers_aux_loss``, moe.aux_loss_scope: all_layers) and per-layer
expert load, imbalance, routing entropy and dropped tokens (``RouterStats``), at low overhead.

A forward hook on every megatron ``TopKRouter`` adds the routing map's per-expert token counts into
a device tensor (no host sync). ``collect()`` is called once per log interval: it all-reduces the
counts over the data-parallel group (experts see different tokens on different ranks) and moves
them to the host once. With a capacity factor, megatron's router drops overflow tokens from the
routing map it returns, so ``1 - routed / (tokens * top_k)`` is the exact dropped fraction.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import (
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
)
from megatron.core.transformer.moe.router import TopKRouter

from megatron_ext.model.builder import layer_index
from megatron_ext.model.load_balancing import AllLayersLoss


def router_losses(forwards: int, num_layers: int) -> dict[str, float]:
    """Unscaled load-balancing (and z-) loss per micro-batch, averaged over the MoE layers of
    every pipeline stage, and clear the tracker (a collective: every rank calls it at once).

    megatron's router adds each forward's unscaled loss into a per-layer tracker (a slot for each
    of the model's ``num_layers``); ``forwards`` is the number of micro-batch forwards since the
    last clear.
    """
    out = {}
    tracker = get_moe_layer_wise_logging_tracker()
    pipeline = dist.is_initialized() and parallel_state.get_pipeline_model_parallel_world_size() > 1
    for name, key in (("load_balancing_loss", "aux_loss"), ("z_loss", "z_loss")):
        vals = tracker.get(name, {}).get("values")
        if vals is None and not pipeline:
            continue
        # The last slot says whether this stage tracked the loss at all (a pipeline stage
        # without MoE layers has no entry but still joins the pipeline's sum).
        present = float(vals is not None)
        vals = (vals.clone().float() if vals is not None else
                torch.zeros(num_layers, device="cuda" if torch.cuda.is_available() else "cpu"))
        vals = torch.cat([vals, torch.full((1,), present, device=vals.device)])
        if dist.is_initialized():
            _reduce_tracked(vals, tracker.get(name, {}), pipeline)
        if vals[-1] == 0:
            continue
        vals = vals[:-1]
        nz = vals[vals != 0]
        out[key] = nz.mean().item() / max(forwards, 1) if nz.numel() else 0.0
    clear_aux_losses_tracker()
    return out


def all_layers_aux_loss(loss: AllLayersLoss, forwards: int) -> dict[str, float]:
    """The unscaled all-layers load-balancing loss per micro-batch since the last call,
    averaged over the data-parallel ranks (the value moe-recipes logs as
    training/load_balancing_loss, there rank 0's only). With tensor parallelism each rank holds
    its sequence shard's part: the parts are summed. A collective: every rank calls it at once."""
    value = loss.take().reshape(1)
    if dist.is_initialized():
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            dist.all_reduce(value, group=parallel_state.get_tensor_model_parallel_group())
        dist.all_reduce(value, group=parallel_state.get_data_parallel_group())
        value /= parallel_state.get_data_parallel_world_size()
    return {"aux_loss": value.item() / max(forwards, 1)}


def _reduce_tracked(vals: torch.Tensor, entry: dict, pipeline: bool) -> None:
    """As megatron's reduce_aux_losses_tracker_across_ranks (whose AVG op gloo lacks): sum over
    the router's reduce group (TP ranks each saw part of the sequence with sequence
    parallelism; without one, average over TP), average over data-parallel ranks, then sum over
    the pipeline stages (each fills only its own layers' slots). The flag in the last slot
    stays non-zero where any rank tracked the loss."""
    if entry.get("reduce_group") is not None:
        dist.all_reduce(vals, group=entry["reduce_group"])
    elif parallel_state.get_tensor_model_parallel_world_size() > 1:
        # The z-loss is tracked without a group: each TP rank's mean over its own sequence
        # shard (MoE with TP implies sequence parallelism). Equal shards: average them.
        dist.all_reduce(vals, group=parallel_state.get_tensor_model_parallel_group())
        vals /= parallel_state.get_tensor_model_parallel_world_size()
    if not entry.get("reduce_group_has_dp", False):
        dist.all_reduce(vals, group=parallel_state.get_data_parallel_group())
        vals /= parallel_state.get_data_parallel_world_size()
    if pipeline:
        dist.all_reduce(vals, group=parallel_state.get_pipeline_model_parallel_group())


class RouterStats:
    def __init__(self, model: torch.nn.Module, top_k: int):
        self.top_k = top_k
        self.layers: list[int] = []
        self.counts: list[torch.Tensor | None] = []
        self.tokens: list[torch.Tensor | None] = []
        self._handles = []
        for module in model.modules():
            if isinstance(module, TopKRouter):
                idx = len(self.layers)
                self.layers.append(layer_index(module))
                self.counts.append(None)
                self.tokens.append(None)
                self._handles.append(module.register_forward_hook(self._hook(idx)))

    def _hook(self, idx: int):
        def hook(module, inputs, outputs):
            routing_map = outputs[1]  # [tokens, experts] bool after capacity dropping
            if not torch.is_grad_enabled():
                return  # skip validation / analysis forwards
            c = routing_map.sum(dim=0, dtype=torch.float32).detach()
            if self.counts[idx] is None:
                self.counts[idx] = torch.zeros_like(c)
                self.tokens[idx] = torch.zeros((), dtype=torch.float32, device=c.device)
            # In place, into fixed buffers: a captured CUDA graph (train.cuda_graph) replays
            # these adds without running this hook again.
            self.counts[idx].add_(c)
            self.tokens[idx].add_(routing_map.shape[0])

        return hook

    def collect(self) -> dict[str, float]:
        """Reduce and reset; returns flat metrics ``moe/layer{L}/...`` plus averages, over the
        MoE layers of every pipeline stage (a collective: every rank calls it at once)."""
        layers = self._reduce_local()
        if dist.is_initialized() and parallel_state.get_pipeline_model_parallel_world_size() > 1:
            # Each stage reports its own layers (a stage may have none): gather the small
            # [layers, experts] tables of every stage, once per log interval.
            group = parallel_state.get_pipeline_model_parallel_group()
            gathered: list = [None] * dist.get_world_size(group)
            dist.all_gather_object(gathered, layers, group=group)
            layers = sorted((x for stage in gathered for x in stage), key=lambda x: x[0])
        return _metrics(layers, self.top_k) if layers else {}

    def _reduce_local(self) -> list[tuple[int, torch.Tensor, float]]:
        """(layer, routed tokens per expert, tokens) of this stage's MoE layers, summed over the
        ranks that routed other tokens; the buffers restart from zero."""
        if not self.layers or self.counts[0] is None:
            return []
        counts = torch.stack(self.counts)  # [moe_layers, experts] (copies)
        tokens = torch.stack(self.tokens)
        if dist.is_initialized():
            groups = [parallel_state.get_data_parallel_group()]
            if parallel_state.get_tensor_model_parallel_world_size() > 1:
                # MoE with TP implies sequence parallelism: each TP rank routed its own tokens.
                groups.append(parallel_state.get_tensor_model_parallel_group())
            for group in groups:
                dist.all_reduce(counts, group=group)
                dist.all_reduce(tokens, group=group)
        counts, tokens = counts.cpu(), tokens.cpu()
        for buf in (*self.counts, *self.tokens):
            buf.zero_()
        return [(layer, counts[i], tokens[i].item()) for i, layer in enumerate(self.layers)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _metrics(layers: list[tuple[int, torch.Tensor, float]], top_k: int) -> dict[str, float]:
    """Per-layer load, imbalance, entropy and dropped fraction, and their summaries."""
    out: dict[str, float] = {}
    ratios, entropies, dropped = [], [], []
    for layer, counts, tokens in layers:
        routed = counts.sum().item()
        frac = counts / max(routed, 1.0)
        nz = frac[frac > 0]
        entropy = float(-(nz * nz.log()).sum())
        ratio = float(frac.max() / frac.min()) if frac.min() > 0 else math.inf
        drop = 1.0 - routed / max(tokens * top_k, 1.0)
        for e in range(counts.shape[0]):
            out[f"moe/layer{layer}/load_e{e}"] = float(frac[e])
        out[f"moe/layer{layer}/max_min_ratio"] = ratio
        out[f"moe/layer{layer}/entropy"] = entropy
        out[f"moe/layer{layer}/dropped_frac"] = drop
        ratios.append(ratio)
        entropies.append(entropy)
        dropped.append(drop)
    out["moe/max_min_ratio"] = max(ratios)
    out["moe/entropy"] = sum(entropies) / len(entropies)
    out["moe/dropped_frac"] = sum(dropped) / len(dropped)
    return out
