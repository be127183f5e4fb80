"""One pass of megatron-core's forward/backward schedule over a step's micro-batches, and the
token-weighted LM loss it reports. Shared by the trainer (forward and backward) and validation
(forward only), so both compute the loss the same way."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_ext.training.setup import Run


def _forward_step(data_iterator: Iterator, model: torch.nn.Module):
    batch = next(data_iterator)
    losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

    def loss_func(output: torch.Tensor):
        mask = batch["loss_mask"]
        loss_sum = (output.float() * mask).sum()
        ntok = mask.sum()
        # megatron divides the returned loss by ntok and the number of micro-batches.
        return loss_sum, ntok.int(), {"lm": torch.stack([loss_sum.detach(), ntok.detach()])}

    return losses, loss_func


def forward_backward(run: Run, batches: list[dict], forward_only: bool) -> list[dict]:
    """megatron's schedule over ``batches`` (one step's micro-batches on this rank); returns
    the per-micro-batch reports that ``reduce_loss`` turns into the step's loss."""
    schedule = get_forward_backward_func()
    return schedule(forward_step_func=_forward_step, data_iterator=iter(batches),
                    model=[run.model], num_microbatches=len(batches),
                    seq_length=run.cfg.data.seq_length,
                    micro_batch_size=run.cfg.train.micro_batch_size, forward_only=forward_only)


def reduce_loss(reports: list[dict], device: torch.device | str) -> float:
    """Token-weighted mean LM loss over the reports of every data-parallel rank."""
    if not reports:
        return float("nan")
    total = torch.stack([r["lm"] for r in reports]).sum(0).to(device)
    if dist.is_initialized():
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return (total[0] / total[1].clamp(min=1)).item()
