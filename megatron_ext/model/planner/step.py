"""The predicted step of the layout a config describes: compute per pipeline stage, the 1F1B
bubble, exposed communication and the optimizer (costs.py and comm.py hold the assumptions)."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_ext.config.derived import derive
from megatron_ext.config.schema import Config
from megatron_ext.model.params import flops_per_token
from megatron_ext.model.planner.comm import Traffic, seconds, traffic
from megatron_ext.model.planner.costs import (
    ACT_BYTES,
    ADAM_BYTES_PER_PARAM,
    PARAM_BYTES,
    Layout,
    compute_time,
    optimizer_time,
)


@dataclass
class Prediction:
    """Seconds per optimizer step by part, and what follows from them."""

    layout: Layout
    world: int
    compute: float  # every micro-batch through the slowest stage, bubble excluded
    bubble: float
    comm: dict[str, float]  # exposed seconds per dimension: tp, ep, pp, dp
    optimizer: float
    traffic: list[Traffic]  # the slowest stage's messages
    tokens_per_step: int
    flops_per_token: float
    peak_tflops: float
    steps: int

    @property
    def step_s(self) -> float:
        return self.compute + self.bubble + sum(self.comm.values()) + self.optimizer

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s

    @property
    def mfu(self) -> float:
        """Model FLOPs (the throughput callback's count) per GPU-second over the peak."""
        return self.flops_per_token * self.tokens_per_s / self.world / (self.peak_tflops * 1e12)

    @property
    def days(self) -> float:
        return self.steps * self.step_s / 86400


def predict(cfg: Config, world: int, adam_bytes: float = ADAM_BYTES_PER_PARAM) -> Prediction:
    """Step time of ``cfg``'s layout (parallel sizes, micro-batch, cuda_graph) on ``world`` GPUs
    of ``cfg.cluster``; ``adam_bytes``: bytes the optimizer moves per parameter."""
    cl, lay = cfg.cluster, Layout.of(cfg, world)
    fp32 = cfg.train.precision == "fp32"  # (CPU runs: the tests count their messages)
    act, param = (4, 4) if fp32 else (ACT_BYTES, PARAM_BYTES)
    derived = derive(cfg)  # the layout's view of the config, which search.py validated
    stages = derived.stage_layers
    pattern, start, slowest = derived.moe_layer_pattern, 0, None
    for i, layers in enumerate(stages):
        first, last = i == 0, i == len(stages) - 1
        moe = sum(pattern[start:start + layers])
        start += layers
        msgs = traffic(cfg, lay, layers, moe, first, last, act, param)
        per_dim = {d: sum(seconds(t, lay, cl) for t in msgs if t.dim in dims)
                   for d, dims in (("tp", ("tp",)), ("ep", ("ep",)), ("pp", ("pp",)),
                                   ("dp", ("dp", "edp")))}
        micro = compute_time(cfg, cl, lay, layers, head=last)
        # Per micro-batch: compute plus the TP/EP/PP messages that sit in its critical path.
        per_micro = micro + (per_dim["tp"] + per_dim["ep"] + per_dim["pp"]) / lay.micro_batches
        if slowest is None or per_micro > slowest[0]:
            slowest = (per_micro, micro, per_dim, msgs)
    per_micro, micro, per_dim, msgs = slowest
    bubble = per_micro * (lay.pipeline - 1) / lay.virtual_pipeline
    return Prediction(
        layout=lay, world=world, compute=micro * lay.micro_batches, bubble=bubble,
        comm=per_dim, optimizer=optimizer_time(cfg, cl, lay, adam_bytes), traffic=msgs,
        tokens_per_step=cfg.train.global_batch_size * cfg.data.seq_length,
        flops_per_token=flops_per_token(cfg.model, cfg.moe, cfg.data.seq_length),
        peak_tflops=cl.peak_tflops, steps=derived.total_steps)


def volumes(pred: Prediction) -> dict[str, float]:
    """Message bytes per rank per step by ``dim op`` (e.g. ``"ep all_to_all"``)."""
    out: dict[str, float] = {}
    for t in pred.traffic:
        out[f"{t.dim} {t.op}"] = out.get(f"{t.dim} {t.op}", 0.0) + t.bytes
    return out
