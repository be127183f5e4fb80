"""Expert diversity: how alike each MoE layer's experts are, logged at every log step.

Metrics (``logging.expert_similarity``): ``moe/layer{L}/expert_cos_mean``, ``_min``, ``_max``
over the E(E-1)/2 pairs of experts of layer L (0-based, ``model.builder.layer_index``), and
``moe/expert_cos_mean`` averaged over layers. The paper's argument is that Drop-Upcycling's
experts diverge where naive upcycling's stay alike; these curves show it.

What is compared. Expert e is summarized by its linearized maps
``M_e = [W_down W_gate ; W_down W_up]`` (``W_down W_fc1`` without a gated unit), two H x H
matrices, and the similarity of experts a, b is the cosine <M_a, M_b> / (|M_a| |M_b|)
(Frobenius). Why not the flattened weights: the upcycler (megatron_ext.upcycling.upcycle)
permutes every drop/noise expert's neurons, which keeps its function but makes a position-wise
cosine about 0 even at r = 0. ``M_e = sum_i d_i g_i^T`` sums over neurons, so it is invariant to
that permutation; terms of different neurons (random signs) nearly cancel between experts.

Expected values at step 0 (tested in tests/unit/test_expert_similarity.py):
 * naive upcycling (every expert a copy of the dense MLP): exactly 1.0;
 * from scratch (independent random experts): 0, with a spread of about 1/H per pair;
 * Drop-Upcycling with ratio r, k = floor(r F), q = 1 - k/F: each expert re-draws, for each
   of gate, up and down, k of its neurons, an independent random subset per expert (and per
   matrix with ``index_sharing: per_projection``; one subset for the three with ``shared``),
   from Normal(mean, std) of the replaced slice. A neuron's term d_i g_i^T is common to two
   experts only if its down column and gate row are kept in both: probability q^n, n = 4
   (per_projection) or 2 (shared; (1 - r)^2 = 0.25 at r = 0.5). Fresh draws are
   independent, so, for the dense MLP's S = sum_i |d_i|^2 |g_i|^2 and T = |W_down W_gate|^2
   (and the same for up),
       E[cos] = q^n T / (S + q^n (T - S))        (``expected_drop_cos``)
   which is q^n (0.0625 at r = 0.5, 0 at r = 1) when the dense neurons are incoherent
   (T = S, e.g. a randomly initialized model: |T - S| / S ~ 1/H); a trained dense MLP whose
   neurons add up coherently (T > S) gives more. The replacement mean adds a term shared by
   all experts of relative size F (mean_down mean_gate / (std_down std_gate))^2: about 2e-5
   at F = 2048 with |mean| = 0.01 std, so negligible for near-zero-mean weights.

Distributed: each rank forms M for its local experts from its weight shards. With expert-TP
the shards split the F neurons, so M is a sum over shards: one all-reduce over the expert-TP
group. With EP the E x 2H^2 maps are all-gathered over the EP group (cheaper than the weights,
3FH per expert, whenever 2H < 3F) and every rank computes the same E x E Gram matrix in fp64.
Data-parallel replicas compute the same values. Runs only at log steps, under no_grad; weights
are cast to fp32 one expert at a time (one expert's fp32 copy is the extra memory besides the
maps; on GPU the products follow torch's TF32 setting). Cost: docs/benchmarks.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_layer import MoELayer
from torch import Tensor

from megatron_ext.model.builder import layer_index
from megatron_ext.training.callbacks.base import Callback
from megatron_ext.training.setup import Run

if TYPE_CHECKING:  # annotations only (the trainer is a layer below the callbacks)
    from megatron_ext.training.trainer import Trainer


def _local_weights(experts: torch.nn.Module) -> Iterator[tuple[Tensor, Tensor]]:
    """(fc1 [G, H], fc2 [H, F]) of each local expert: our grouped experts (stacked
    ``fc1_weight``/``fc2_weight``), megatron's SequentialMLP (``local_experts``) or
    TEGroupedMLP (``linear_fc1.weight{e}``)."""
    if hasattr(experts, "fc1_weight"):
        yield from zip(experts.fc1_weight.unbind(0), experts.fc2_weight.unbind(0), strict=True)
    elif hasattr(experts, "local_experts"):
        for mlp in experts.local_experts:
            yield mlp.linear_fc1.weight, mlp.linear_fc2.weight
    else:
        for e in range(experts.num_local_experts):
            yield (getattr(experts.linear_fc1, f"weight{e}"),
                   getattr(experts.linear_fc2, f"weight{e}"))


def _group(experts: torch.nn.Module, name: str):
    """The experts' own EP / expert-TP group (as their forward uses), else parallel_state's."""
    group = getattr(experts, f"{name}_group", None)
    if group is not None:
        return group
    if name == "ep":
        return parallel_state.get_expert_model_parallel_group()
    return parallel_state.get_expert_tensor_parallel_group()


def _size(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() and group is not None else 1


def expert_maps(experts: torch.nn.Module, gated: bool) -> Tensor:
    """[E, D] fp32: each global expert's flattened linearized maps (D = 2H^2 gated, else H^2),
    in global expert order; identical on every rank of the layer's EP x expert-TP groups."""
    maps = []
    for fc1_GH, fc2_HF in _local_weights(experts):
        fc1_GH, fc2_HF = fc1_GH.detach().float(), fc2_HF.detach().float()
        # Under expert-TP each rank holds [gate; up] rows of its own F/tp neurons (and those
        # columns of fc2): its product is that shard's part of the sum over neurons.
        fc1s = fc1_GH.chunk(2, dim=0) if gated else (fc1_GH,)
        maps.append(torch.cat([(fc2_HF @ w_FH).flatten() for w_FH in fc1s]))
    maps_ED = torch.stack(maps)
    tp = _group(experts, "tp")
    if _size(tp) > 1:
        dist.all_reduce(maps_ED, group=tp)
    ep = _group(experts, "ep")
    if _size(ep) > 1:
        parts = [torch.empty_like(maps_ED) for _ in range(_size(ep))]
        dist.all_gather(parts, maps_ED, group=ep)  # list order = EP rank = expert order
        maps_ED = torch.cat(parts)
    return maps_ED


def pairwise_cosines(maps_ED: Tensor) -> Tensor:
    """[E(E-1)/2] cosines of all pairs a < b, in fp64 (identical rows give exactly 1.0)."""
    gram_EE = maps_ED.double() @ maps_ED.double().T
    norms_E = gram_EE.diagonal().sqrt()
    cos_EE = (gram_EE / (norms_E[:, None] * norms_E[None, :])).clamp(-1.0, 1.0)
    a, b = torch.triu_indices(*cos_EE.shape, offset=1)
    return cos_EE[a, b]


@torch.no_grad()
def expert_similarity(model: torch.nn.Module) -> dict[str, float]:
    """The metrics of every MoE layer of ``model`` (a collective over the experts' EP and
    expert-TP groups and the pipeline: call on every rank). Empty without MoE layers or with
    one expert."""
    out: dict[str, float] = {}
    means = []
    for layer in model.modules():
        if not isinstance(layer, MoELayer):
            continue
        cos = pairwise_cosines(expert_maps(layer.experts, layer.config.gated_linear_unit))
        if cos.numel() == 0:
            continue
        key = f"moe/layer{layer_index(layer)}/expert_cos"
        out[f"{key}_mean"] = cos.mean().item()
        out[f"{key}_min"] = cos.min().item()
        out[f"{key}_max"] = cos.max().item()
        means.append(out[f"{key}_mean"])
    total = torch.tensor([sum(means), float(len(means))], dtype=torch.float64)
    if dist.is_initialized() and parallel_state.get_pipeline_model_parallel_world_size() > 1:
        # each pipeline stage holds some of the layers: the mean is over all of them
        dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
    if total[1] > 0:
        out["moe/expert_cos_mean"] = (total[0] / total[1]).item()
    return out


def expected_drop_cos(gate_FH: Tensor, up_FH: Tensor, down_HF: Tensor, ratio: float,
                      index_sharing: str = "per_projection") -> float:
    """E[cos] of two Drop-Upcycled experts of this dense MLP at step 0 (module docstring)."""
    d_ff = gate_FH.shape[0]
    q = 1.0 - math.floor(ratio * d_ff) / d_ff
    qn = q ** (4 if index_sharing == "per_projection" else 2)
    down_HF = down_HF.double()
    col_sq_F = down_HF.square().sum(0)
    total_t = total_s = 0.0
    for w_FH in (gate_FH.double(), up_FH.double()):
        total_t += (down_HF @ w_FH).square().sum().item()
        total_s += (col_sq_F * w_FH.square().sum(1)).sum().item()
    return qn * total_t / (total_s + qn * (total_t - total_s))


class ExpertSimilarity(Callback):
    def __init__(self, run: Run):
        self.model = run.model if run.cfg.logging.expert_similarity else None

    def on_log(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if self.model is not None:
            metrics.update(expert_similarity(self.model))
