"""One pass of megatron-core's forward/backward schedule over a step's micro-batches, and the
token-weighted LM loss it reports. Shared by the trainer (forward and backward) and validation
(forward only), so both compute the loss the same way."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_ext.model.chunks import model_chunks
from megatron_ext.training.setup import Run


def _forward_step(data_iterator: Iterator, model: torch.nn.Module):
    batch = next(data_iterator)
    losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

    def loss_func(output: torch.Tensor):
        mask = batch["loss_mask"]
        loss_sum = (output.float() * mask).sum()
        ntok = mask.sum()
        # megatron divides the returned loss by ntok and the number of micro-batches M, and
        # gives the load-balancing loss carried by the model's activations (either scope) the
        # gradient scale 1/M: the step minimizes the mean over micro-batches (and, through DDP,
        # data-parallel ranks) of this micro-batch's token-mean LM loss + coeff x its aux loss,
        # the paper stack's objective (docs/fidelity.md). A loss mask changes only the LM mean.
        return loss_sum, ntok.int(), {"lm": torch.stack([loss_sum.detach(), ntok.detach()])}

    return losses, loss_func


def forward_backward(run: Run, batches: list[dict], forward_only: bool) -> list[dict]:
    """megatron's schedule over ``batches`` (one step's micro-batches on this rank); returns
    the per-micro-batch reports that ``reduce_loss`` turns into the step's loss (none on a
    pipeline stage other than the last).

    The schedule follows the parallel state: no pipeline, 1F1B, or interleaved. Every chunk
    reads the same micro-batches: the first uses tokens and positions, the last labels and the
    loss mask; the others take their input from the previous stage."""
    schedule = get_forward_backward_func()
    chunks = model_chunks(run.model)
    data = [iter(batches) for _ in chunks]
    return schedule(forward_step_func=_forward_step, data_iterator=data[0] if len(data) == 1
                    else data, model=chunks, num_microbatches=len(batches),
                    seq_length=run.cfg.data.seq_length,
                    micro_batch_size=run.cfg.train.micro_batch_size, forward_only=forward_only)


def reduce_loss(reports: list[dict], device: torch.device | str) -> float:
    """Token-weighted mean LM loss over the reports of every data-parallel rank, the same on
    every rank. Only the last pipeline stage has reports: the sums are also added over the
    pipeline group, so every stage logs, skips and validates with the last stage's loss."""
    sums = torch.stack([r["lm"] for r in reports]).sum(0) if reports else torch.zeros(2)
    total = torch.cat([sums.float().to(device),
                       torch.tensor([float(len(reports))], device=device)])
    if dist.is_initialized():
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
    if total[2] == 0:  # no micro-batch anywhere
        return float("nan")
    return (total[0] / total[1].clamp(min=1)).item()
