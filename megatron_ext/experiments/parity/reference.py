"""The paper's training loop, rebuilt from what moe-recipes v1.0.0 does (docs/fidelity.md): the
reference side of the whole-run parity.

transformers' ``MixtralForCausalLM`` with ``output_router_logits`` (its ``loss`` is the mean
cross-entropy of the micro-batch plus ``router_aux_loss_coef x load_balancing_loss_func`` over
all layers), ``torch.optim.AdamW(model.parameters(), ...)`` (every parameter decayed), the
``WarmupCosineAnnealingLR`` schedule (``moe_recipes_lr``), and DeepSpeed's handling of the
step: the loop divides each micro-batch's loss by the accumulation steps, DeepSpeed divides it
again (``ReferenceRecipe.grad_divisor``), gradients are accumulated in fp32, clipped by their
global norm, and AdamW updates fp32 master weights (``MasterWeights`` when the model is bf16).

The model reads exactly our micro-batches: ``tokens`` as ``input_ids`` and our shifted
``labels`` (transformers' ``shift_labels``), so its LM loss covers the same predictions. (The
paper's stack fed the sample's seq+1 tokens and let transformers shift: the same predictions,
plus one more token in the routing statistics; docs/fidelity.md.)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

MOE_RECIPES_PI = 3.14159  # moe-recipes' optimizer.py writes pi so, and takes the cosine in fp32


@dataclass(frozen=True)
class ReferenceRecipe:
    lr: float
    min_lr: float
    warmup_steps: int
    decay_steps: int
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    clip: float
    grad_divisor: float  # DeepSpeed's second division by the accumulation steps


def moe_recipes_lr(step: int, lr: float, min_lr: float, warmup: int, decay: int) -> float:
    """``WarmupCosineAnnealingLR.get_lr`` at ``last_epoch = step`` (steps done so far): linear
    from ``min_lr`` over ``warmup``, cosine to ``min_lr`` at ``decay`` (pi as 3.14159, the
    cosine of a float32 tensor), ``min_lr`` after."""
    if step < warmup:
        return max(min_lr + (lr - min_lr) * (step / warmup), min_lr)
    if step < decay:
        progress = (step - warmup) / (decay - warmup)
        cosine = 0.5 * (1 + torch.cos(torch.tensor(progress) * MOE_RECIPES_PI))
        return max(min_lr + (lr - min_lr) * cosine.item(), min_lr)
    return min_lr


class MasterWeights:
    """fp32 master copies of a low-precision model's parameters (DeepSpeed bf16 + ZeRO): the
    optimizer steps on them, gradients accumulate into them in fp32, and each step's result is
    copied back into the model. With an fp32 model the parameters are their own masters."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.low = any(p.dtype != torch.float32 for p in params)
        self.masters = ([p.detach().float().clone().requires_grad_() for p in params]
                        if self.low else params)

    def accumulate(self) -> None:
        """After a micro-batch's backward: its gradients into the fp32 accumulators."""
        if not self.low:
            return
        for p, m in zip(self.params, self.masters, strict=True):
            if p.grad is None:
                continue
            g = p.grad.float()
            m.grad = g if m.grad is None else m.grad.add_(g)
            p.grad = None

    def copy_back(self) -> None:
        if self.low:
            with torch.no_grad():
                for p, m in zip(self.params, self.masters, strict=True):
                    p.copy_(m)


@dataclass
class StepRecord:
    step: int
    loss: float  # LM cross-entropy, mean over the step's micro-batches
    aux_loss: float  # unscaled all-layers load-balancing loss, mean over micro-batches
    grad_norm: float  # of the mean gradient (before the second division and clipping)
    lr: float  # after the step (the next step's), as our metrics log it


class ReferenceTrainer:
    """transformers' Mixtral trained the way moe-recipes v1.0.0 trained it."""

    def __init__(self, hf_dir: Path, recipe: ReferenceRecipe, device: str, dtype: torch.dtype):
        # why inside: transformers takes seconds to import; only the parity needs it
        from transformers import MixtralForCausalLM

        self.model = MixtralForCausalLM.from_pretrained(
            hf_dir, dtype=dtype, use_safetensors=True).to(device)
        self.model.train()
        self.recipe, self.device = recipe, device
        self.coef = self.model.config.router_aux_loss_coef
        self.top_k = self.model.config.num_experts_per_tok
        params = list(self.model.parameters())
        self.weights = MasterWeights(params)
        r = recipe
        self.optimizer = torch.optim.AdamW(self.weights.masters, lr=self._lr(0), betas=r.betas,
                                           eps=r.eps, weight_decay=r.weight_decay)
        self.steps_done = 0
        self.last_load: list[torch.Tensor] = []  # per layer: share of top-k assignments

    def _lr(self, step: int) -> float:
        r = self.recipe
        return moe_recipes_lr(step, r.lr, r.min_lr, r.warmup_steps, r.decay_steps)

    def step(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepRecord:
        accumulation = len(micro_batches)
        ce_sum = aux_sum = 0.0
        counts = None
        for batch in micro_batches:
            tokens = batch["tokens"].to(self.device)
            labels = batch["labels"].to(self.device).contiguous()
            out = self.model(input_ids=tokens, labels=tokens, shift_labels=labels,
                             output_router_logits=True)
            (out.loss / accumulation).backward()
            self.weights.accumulate()
            aux = out.aux_loss.detach().float()
            ce_sum += (out.loss.detach().float() - self.coef * aux).item()
            aux_sum += aux.item()
            counts = _add(counts, _expert_counts(out.router_logits, self.top_k))
        masters = self.weights.masters
        grads = [m.grad for m in masters if m.grad is not None]
        for g in grads:  # DeepSpeed's engine.backward divides the loss once more
            g.div_(self.recipe.grad_divisor)
        norm = torch.nn.utils.clip_grad_norm_(masters, self.recipe.clip if self.recipe.clip > 0
                                              else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.weights.copy_back()
        self.steps_done += 1
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr(self.steps_done)
        self.last_load = [c / c.sum() for c in counts]
        return StepRecord(self.steps_done, ce_sum / accumulation, aux_sum / accumulation,
                          float(norm) * self.recipe.grad_divisor, self._lr(self.steps_done))

    def train(self, steps: Iterable[list[dict[str, torch.Tensor]]]) -> list[StepRecord]:
        return [self.step(batches) for batches in steps]


def _expert_counts(router_logits: tuple[torch.Tensor, ...], top_k: int) -> list[torch.Tensor]:
    """Top-k assignments per expert of each layer (softmax over all experts, then top-k)."""
    out = []
    for logits in router_logits:
        top = torch.topk(torch.softmax(logits.detach().float(), dim=-1), top_k, dim=-1).indices
        out.append(torch.bincount(top.reshape(-1), minlength=logits.shape[-1]).float().cpu())
    return out


def _add(acc: list[torch.Tensor] | None, new: list[torch.Tensor]) -> list[torch.Tensor]:
    return new if acc is None else [a + b for a, b in zip(acc, new, strict=True)]
