"""The paper stack's load-balancing loss over all MoE layers at once (``moe.aux_loss_scope:
all_layers``), beside megatron's per-layer one (``per_layer``, megatron's own code).

The paper's runs (moe-recipes v1.0.0 on transformers' Mixtral) train with
``load_balancing_loss_func``: the router logits of every layer are concatenated and ONE
Switch-style loss is taken over them, per forward (one micro-batch of one rank). With, over the
micro-batch's T tokens and the L MoE layers (N = T x L rows):

    c_e = rows whose top-k (of the softmax over all E experts) includes e   (a count)
    s_e = sum of expert e's softmax probability over the rows
    loss = E * sum_e (c_e / N) * (s_e / N)          (= top_k at perfect balance)

and ``aux_loss_coeff x loss`` is added once. megatron's ``aux_loss`` instead takes this per
layer, divides it by top_k and adds every layer's: per layer about L / k times the paper's
balancing gradient, and no offsetting of one layer's imbalance by another's.

How it is computed here, with megatron's pieces:
- every MoE layer's router is an ``AllLayersRouter`` (set in the layer spec): after megatron's
  routing it hands its logits [T, E] to the model's ``AllLayersLoss``, which keeps c_l (no
  gradient: a count) and s_l (with gradient) for the layer;
- when the decoder's forward ends, ``AllLayersLoss.attach`` sums them over the layers (and the
  counts over the tensor-parallel group: with sequence parallelism each rank routes its shard),
  forms ``E / N^2 * sum_e c_e * s_e`` and attaches ``aux_loss_coeff x`` it to the decoder
  output with megatron's ``MoEAuxLossAutoScaler``. The schedule sets that scaler's gradient to
  1 / micro-batches, as it divides the LM loss, so the step's objective is the mean over
  micro-batches and data-parallel ranks of ``lm_loss + coeff x loss``, the paper's.
- Tensor + sequence parallelism: each rank's s covers its own tokens and N counts every rank's,
  so the ranks' partial losses add up to the loss; megatron sums the router weights' gradients
  over the group (they are sequence-parallel parameters). Expert parallelism and data
  parallelism: each rank's loss covers its own micro-batch, as each GPU's did in the paper.
- Nothing waits on the host and every shape is fixed, so a captured CUDA graph replays it
  (``train.cuda_graph``). The value, unscaled, is added into a device buffer for logging.

Not supported (refused by config validation): pipeline parallelism (a stage never sees the
other stages' counts before its backward) and recomputing whole MoE layers (their forward runs
again inside the backward, after the loss was formed). There is no upstream equivalent in
megatron-core 0.16.1 (its ``global_aux_loss`` pools one layer's counts over data-parallel ranks
and micro-batches; it is still per layer). ``AllLayersRouter`` overrides
``TopKRouter.routing(logits, padding_mask)`` of 0.16.1 (``platform.patches`` pins the version).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.moe.router import TopKRouter


def all_layers_loss(counts_E: torch.Tensor, sums_E: torch.Tensor, rows: int | float,
                    num_experts: int) -> torch.Tensor:
    """``E * sum_e (c_e / N) * (s_e / N)``: counts ``c`` (top-k assignments), probability sums
    ``s`` and rows ``N`` over every layer of a micro-batch."""
    return num_experts * (counts_E * sums_E).sum() / (rows * rows)


def routing_statistics(logits_TE: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-k assignments per expert [E] (detached), softmax probability per expert summed
    over the tokens [E]) of one layer's router logits, as transformers' loss function takes
    them: softmax over all experts in fp32, top-k of the probabilities. Elementwise ops and
    reductions only: no host sync, deterministic."""
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    top_TK = torch.topk(probs_TE.detach(), top_k, dim=-1).indices
    chosen_TE = torch.zeros_like(probs_TE, requires_grad=False).scatter_(1, top_TK, 1.0)
    return chosen_TE.sum(dim=0), probs_TE.sum(dim=0)


class AllLayersLoss:
    """One model's all-layers load-balancing loss: collects each MoE layer's statistics during
    the forward and attaches the loss to the decoder output at its end."""

    def __init__(self, coeff: float, num_experts: int, top_k: int,
                 tp_group: dist.ProcessGroup | None):
        self.coeff, self.num_experts, self.top_k = coeff, num_experts, top_k
        self.tp_group = tp_group
        self.counts: list[torch.Tensor] = []
        self.sums: list[torch.Tensor] = []
        self.tokens = 0  # this rank's tokens per layer
        # Sum of the unscaled loss (this rank's part of it with TP) over the forwards since the
        # last ``take``; a fixed device buffer that CUDA-graph replays keep adding into.
        self.logged: torch.Tensor | None = None

    def reset(self) -> None:
        self.counts, self.sums, self.tokens = [], [], 0

    def record(self, logits_TE: torch.Tensor) -> None:
        counts, sums = routing_statistics(logits_TE, self.top_k)
        self.counts.append(counts)
        self.sums.append(sums)
        self.tokens = logits_TE.shape[0]

    def loss(self) -> torch.Tensor | None:
        """This rank's part of the micro-batch's loss (the whole loss without TP), or None
        when no layer recorded (evaluation, no-grad forwards)."""
        if not self.counts:
            return None
        counts = torch.stack(self.counts).sum(dim=0)
        tp = 1
        if self.tp_group is not None and dist.get_world_size(self.tp_group) > 1:
            dist.all_reduce(counts, group=self.tp_group)  # a count: no gradient to carry
            tp = dist.get_world_size(self.tp_group)
        rows = self.tokens * tp * len(self.counts)
        return all_layers_loss(counts, torch.stack(self.sums).sum(dim=0), rows, self.num_experts)

    def attach(self, output: torch.Tensor) -> torch.Tensor:
        """``output`` (the decoder's) carrying ``coeff x loss`` into the backward."""
        loss = self.loss()
        self.reset()
        if loss is None:
            return output
        if self.logged is None:
            self.logged = torch.zeros((), dtype=torch.float32, device=loss.device)
        self.logged.add_(loss.detach())
        return MoEAuxLossAutoScaler.apply(output, self.coeff * loss)

    def take(self) -> torch.Tensor:
        """The logged sum since the last call (a copy; the buffer restarts from zero)."""
        if self.logged is None:
            return torch.zeros((), dtype=torch.float32)
        value = self.logged.clone()
        self.logged.zero_()
        return value


class AllLayersRouter(TopKRouter):
    """megatron's TopKRouter that also reports its logits to the model's ``AllLayersLoss``
    (set by ``install``) in training forwards that build a graph."""

    all_layers: AllLayersLoss | None = None

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        out = super().routing(logits, padding_mask=padding_mask)
        if self.all_layers is not None and self.training and torch.is_grad_enabled():
            if padding_mask is not None:
                raise NotImplementedError("moe.aux_loss_scope all_layers: padding masks")
            self.all_layers.record(logits.reshape(-1, self.config.num_moe_experts))
        return out


def install(model: torch.nn.Module, coeff: float) -> AllLayersLoss | None:
    """Give ``model`` (a GPTModel whose MoE routers are ``AllLayersRouter``) its all-layers
    loss: the routers report to it, and the decoder's output carries it. Returns it (None for
    a model without such routers)."""
    routers = [m for m in model.modules() if isinstance(m, AllLayersRouter)]
    if not routers:
        return None
    config = routers[0].config
    loss = AllLayersLoss(coeff, config.num_moe_experts, config.moe_router_topk,
                         routers[0].tp_cp_group)
    for router in routers:
        router.all_layers = loss
    model.decoder.register_forward_pre_hook(lambda module, args: loss.reset())
    model.decoder.register_forward_hook(lambda module, args, output: loss.attach(output))
    model.all_layers_loss = loss
    return loss
