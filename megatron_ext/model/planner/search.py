"""``--plan``: every layout of N nodes the config allows, its memory and predicted step, ranked.

A layout is a copy of the config with the parallel sizes and micro-batch changed; it counts
only if ``config.validate`` accepts it (the same checks a launch runs), and its memory is
``model.params.memory_estimate_gb``, the estimate ``--dry-run`` prints.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

from megatron_ext.config.loader import ConfigError
from megatron_ext.config.schema import Config
from megatron_ext.config.validate import validate
from megatron_ext.model.params import memory_estimate_gb
from megatron_ext.model.planner.step import Prediction, predict


@dataclass
class Candidate:
    prediction: Prediction
    memory_gib: float
    fits: bool
    configured: bool  # the config's own layout


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(cfg: Config, world: int) -> Iterator[Config]:
    """Copies of ``cfg`` for every valid (tp, pp, ep, micro-batch, distributed optimizer) on
    ``world`` GPUs: TP within a node (powers of two), PP dividing the layers, EP dividing the
    experts and the data-parallel size, micro-batches dividing each rank's share of the batch."""
    gpn = cfg.cluster.gpus_per_node
    tps = [t for t in (2**i for i in range(11)) if t <= min(gpn, world)]
    experts = divisors(cfg.moe.num_experts) if cfg.moe.num_experts else [1]
    for tp in tps:
        for pp in divisors(cfg.model.num_layers):
            if world % (tp * pp):
                continue
            dp = world // (tp * pp)
            if cfg.train.global_batch_size % dp:
                continue
            for ep in (e for e in experts if dp % e == 0):
                for mb in divisors(cfg.train.global_batch_size // dp):
                    for dist in (True, False):
                        view = _view(cfg, world, tp, pp, ep, mb, dist)
                        if view is not None:
                            yield view


def _view(cfg: Config, world: int, tp: int, pp: int, ep: int, mb: int,
          dist: bool) -> Config | None:
    view = copy.deepcopy(cfg)
    par = view.parallel
    par.tensor, par.pipeline, par.expert, par.world_size = tp, pp, ep, world
    par.sequence_parallel, par.distributed_optimizer = tp > 1, dist
    par.virtual_pipeline = par.first_stage_layers = par.last_stage_layers = None
    view.train.micro_batch_size = mb
    if view.moe.token_dispatcher == "local" and (tp > 1 or ep > 1):
        view.moe.token_dispatcher = "auto"
    for graph in dict.fromkeys((cfg.train.cuda_graph, False)):  # graphed where allowed
        view.train.cuda_graph = graph
        try:
            validate(view, world)
            return view
        except ConfigError:
            continue
    return None


def candidates(cfg: Config, nodes: int) -> list[Candidate]:
    """Every valid layout of ``nodes`` x ``cluster.gpus_per_node`` GPUs, those that fit the
    memory first, then by step time."""
    cl = cfg.cluster
    world = nodes * cl.gpus_per_node
    mine = _key(cfg, world)
    budget = cl.memory_gb * cl.usable_memory_fraction
    out = []
    for view in layouts(cfg, world):
        mem = memory_estimate_gb(view, world, bf16=view.train.precision != "fp32")["total"]
        out.append(Candidate(predict(view, world), mem, mem <= budget, _key(view, world) == mine))
    out.sort(key=lambda c: (not c.fits, c.prediction.step_s))
    return out


def _key(cfg: Config, world: int) -> tuple:
    par = cfg.parallel
    dist = par.distributed_optimizer if par.distributed_optimizer is not None else True
    return (par.tensor, par.pipeline, par.expert, world, cfg.train.micro_batch_size, dist)
