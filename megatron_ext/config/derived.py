"""Values that follow from the config: each computed by one function here, from the sections it
reads, and for a run all of them once, right after validation (``derive``), into a frozen
``Derived`` that the run's layers take instead of computing them again.

The functions assume a config that ``validate.validate`` accepted (a layout that splits evenly,
``train_steps`` or ``train_tokens`` given); tools that reason about configs they did not launch
(the planner, conversion, routing reports) call the one they need on those sections.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from megatron_ext.config.schema import (
    Config,
    DataConfig,
    ModelConfig,
    MoEConfig,
    ParallelConfig,
    TrainConfig,
)

DEMO_PREFIX = "demo:"  # data.valid_sets: a language of the demo corpus (demo:en, demo:ja)


def moe_layer_pattern(model: ModelConfig, moe: MoEConfig) -> list[int]:
    """1 for MoE layers, 0 for dense ones (all 0 for a dense model)."""
    L = model.num_layers
    if moe.num_experts == 0:
        return [0] * L
    freq = moe.layer_freq
    if isinstance(freq, int):
        return [1 if i % freq == 0 else 0 for i in range(L)]
    return [int(x) for x in freq]


def pipeline_stage_layers(par: ParallelConfig, num_layers: int) -> list[int]:
    """Transformer layers per pipeline stage (megatron's split: ``first_stage_layers`` and
    ``last_stage_layers`` when set, the rest evenly over the other stages)."""
    first, last = par.first_stage_layers, par.last_stage_layers
    if par.pipeline == 1:
        return [num_layers]
    middle = par.pipeline - (first is not None) - (last is not None)
    each = (num_layers - (first or 0) - (last or 0)) // max(middle, 1)
    stages = [each] * par.pipeline
    if first is not None:
        stages[0] = first
    if last is not None:
        stages[-1] = last
    return stages


def total_steps(train: TrainConfig, seq_length: int) -> int:
    """Optimizer steps of the run: ``train_tokens`` rounded up to whole steps, else
    ``train_steps``."""
    if train.train_tokens is not None:
        per_step = train.global_batch_size * seq_length
        return -(-train.train_tokens // per_step)
    return int(train.train_steps)


def padded_vocab(model: ModelConfig) -> int:
    """Vocabulary rows of the embedding/output layer. Not scaled by the tensor-parallel size (as
    megatron's training script does) so a checkpoint loads at any TP; validation checks that
    ``vocab_multiple`` splits evenly over TP ranks."""
    mult = model.vocab_multiple
    return -(-model.vocab_size // mult) * mult


def names_demo_corpus(source: object) -> bool:
    """Whether a data.valid_sets entry reads the demo corpus (``demo:<language>``)."""
    items = source if isinstance(source, list) else [source]
    return any(isinstance(x, str) and x.startswith(DEMO_PREFIX) for x in items)


def active_valid_sets(data: DataConfig) -> dict:
    """The data.valid_sets this run evaluates: entries naming the demo corpus count only when
    training on it (so a demo config switched to other data does not fail on them)."""
    return {name: source for name, source in data.valid_sets.items()
            if data.demo_corpus or not names_demo_corpus(source)}


@dataclass(frozen=True)
class Derived:
    """What a validated config implies, computed once per run (``derive``)."""

    total_steps: int
    moe_layer_pattern: tuple[int, ...]  # per layer: 1 MoE, 0 dense
    stage_layers: tuple[int, ...]  # transformer layers per pipeline stage
    padded_vocab: int
    valid_sets: Mapping[str, object]  # name -> source: the data.valid_sets evaluated


def derive(cfg: Config) -> Derived:
    """The derived values of ``cfg``, which ``validate`` has accepted."""
    return Derived(
        total_steps=total_steps(cfg.train, cfg.data.seq_length),
        moe_layer_pattern=tuple(moe_layer_pattern(cfg.model, cfg.moe)),
        stage_layers=tuple(pipeline_stage_layers(cfg.parallel, cfg.model.num_layers)),
        padded_vocab=padded_vocab(cfg.model),
        valid_sets=active_valid_sets(cfg.data),
    )
