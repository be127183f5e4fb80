"""AdamW (megatron-core's optimizer, distributed on GPU) and the warmup + cosine LR schedule.

Two choices reproduce the paper's stack (torch AdamW under DeepSpeed, docs/fidelity.md):
``optimizer.weight_decay_scope`` (every parameter decayed, or megatron's exemption of 1-D ones)
and ``optimizer.grad_divisor``. AdamW is invariant to the scale of its gradient but for eps, and
clipping compares the norm to a threshold, so stepping on ``g / d`` is exactly stepping on ``g``
with eps x d (m and v scale by 1/d and 1/d^2, so m / (sqrt(v) + eps) = m' / (sqrt(v') + d eps))
and the clipping coefficient computed from ``norm(g) / d`` (``clip_and_step``); the logged grad
norm stays the mean gradient's.
"""

from __future__ import annotations

import torch
from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_ext.config.schema import Config


def build_optimizer(cfg: Config, chunks: list, bf16: bool, distributed: bool):
    """megatron's optimizer over every model chunk of this rank (one unless interleaved)."""
    o = cfg.optimizer
    mcfg = McoreOptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps * o.grad_divisor,
        clip_grad=clip_threshold(cfg), bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=distributed,
    )
    # megatron's default overrides (None) set wd_mult 0 for 1-D parameters and biases; no
    # overrides ({}) leave one group that decays everything, as torch AdamW over parameters().
    overrides = {} if o.weight_decay_scope == "all" else None
    return get_megatron_optimizer(mcfg, list(chunks), config_overrides=overrides)


def clip_threshold(cfg: Config) -> float:
    """About the norm of the (undivided) mean gradient above which it is clipped (0: never);
    the exact rule: ``clip_and_step``."""
    return cfg.optimizer.clip_grad * cfg.optimizer.grad_divisor


def build_scheduler(cfg: Config, optimizer, total_steps: int) -> OptimizerParamScheduler:
    """Units are optimizer steps (the loop calls ``step(increment=1)``)."""
    s, o = cfg.schedule, cfg.optimizer
    decay = s.decay_steps or total_steps
    return OptimizerParamScheduler(
        optimizer,
        # The paper's stack ramps up from the minimum LR, not from 0.
        init_lr=o.min_lr if s.warmup_init_lr is None else s.warmup_init_lr,
        max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=s.warmup_steps, lr_decay_steps=decay, lr_decay_style=s.decay_style,
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=decay,
        wd_incr_style="constant",
        # On resume the config's schedule wins (only the step count comes from the checkpoint),
        # so extending train.train_steps extends the decay instead of being silently ignored.
        override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=False,
    )


def _chained(optimizer) -> list:
    return getattr(optimizer, "chained_optimizers", [optimizer])


@torch.no_grad()
def prepare_and_norm(optimizer) -> tuple[bool, float]:
    """Move grads into the optimizer's main grads; return (found_inf, global grad norm)."""
    found_inf = optimizer.prepare_grads()
    norm = optimizer.get_grad_norm()
    return bool(found_inf), float(norm)


@torch.no_grad()
def clip_and_step(optimizer, grad_norm: float, clip: float, divisor: float = 1.0) -> None:
    """The second half of megatron's ChainedOptimizer.step, after we inspected the norm.

    Clipping acts on the gradient divided by ``divisor`` (optimizer.grad_divisor): scale by
    ``clip / (grad_norm / divisor + 1e-6)`` when below 1, the formula of megatron, torch and
    DeepSpeed on the divided gradient (passing ``clip x divisor`` and the undivided norm
    instead would move the 1e-6 guard, a 1e-5 relative change per clipped step)."""
    if clip > 0:
        for opt in _chained(optimizer):
            params = opt.get_parameters()
            if params:
                clip_grad_by_total_norm_fp32(params, clip, grad_norm / divisor)
    optimizer.step_with_ready_grads()
