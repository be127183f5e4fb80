"""The declared range of every numeric config field, and the one function that checks them.

``RANGES`` has an entry for each ``int``/``float`` field of the tree (optional or not) and each
list field (what its items may be). ``tests/unit/test_config_ranges.py`` walks the schema and
fails for a field without one, so a new field cannot skip its check; ``docs/config.md`` shows
the ranges. Upper bounds are "sane": far beyond the paper's runs, and low enough that products
of sizes (parameters x bytes, samples x index entries) stay well inside int64. What a whole run
can build (vocabulary in int32, megatron's dataset index in this machine's memory) is checked
across fields by ``check_sizes``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Union

import psutil

from megatron_ext.config.loader import ConfigError, short_repr
from megatron_ext.config.schema import Config

INT32_MAX = 2**31 - 1
SEED_MAX = 2**32 - 1  # numpy's RandomState and torch.manual_seed take 32-bit seeds
# Steps stay exact in float64, which the LR schedule uses for step / decay_steps.
STEPS_MAX = 2**53
LR_MAX = 10.0


@dataclass(frozen=True)
class Range:
    """Numbers from ``lo`` to ``hi`` (inclusive unless ``*_open``); ``whole``: a float field
    whose value megatron truncates to an integer, so a fraction would be silently lost."""

    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False
    whole: bool = False

    def problem(self, x: int | float) -> str | None:
        """Why ``x`` is out of range, or None."""
        if isinstance(x, float) and not math.isfinite(x):
            return f"must be a finite number, got {x}"
        if x < self.lo or (self.lo_open and x == self.lo):
            return f"must be {'>' if self.lo_open else '>='} {_num(self.lo)}, got {_num(x)}"
        if x > self.hi or (self.hi_open and x == self.hi):
            return f"must be {'<' if self.hi_open else '<='} {_num(self.hi)}, got {_num(x)}"
        if self.whole and x != int(x):
            return f"must be a whole number (megatron takes an integer), got {_num(x)}"
        return None

    def text(self) -> str:
        """Interval notation for the docs, e.g. ``(0, 1]``."""
        return (f"{'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}"
                f"{')' if self.hi_open else ']'}" + (" whole" if self.whole else ""))


@dataclass(frozen=True)
class Items:
    """What a list field may hold: numbers in ``numbers`` (integers only with ``integers``),
    strings when ``strings``; at most ``max_len`` items."""

    numbers: Range | None = None
    integers: bool = False
    strings: bool = False
    max_len: int = 65536

    def problem(self, items: list) -> str | None:
        if len(items) > self.max_len:
            return f"has {len(items)} items, at most {self.max_len} allowed"
        for i, x in enumerate(items):
            number = isinstance(x, (int, float)) and not isinstance(x, bool)
            if number and self.numbers is not None and (not self.integers or isinstance(x, int)):
                why = self.numbers.problem(x)
                if why:
                    return f"item {i}: {why}"
            elif not (isinstance(x, str) and self.strings):
                return f"item {i}: {short_repr(x)} is not {self._kinds()}"
        return None

    def _kinds(self) -> str:
        kinds = ([("an integer" if self.integers else "a number") + f" in {self.numbers.text()}"]
                 if self.numbers else []) + (["a string"] if self.strings else [])
        return " or ".join(kinds)

    def text(self) -> str:
        return "list of " + self._kinds().replace("an integer", "integers").replace(
            "a number", "numbers").replace("a string", "strings")


Rule = Range | Items | tuple

RANGES: dict[str, Rule] = {
    "model.num_layers": Range(1, 1024),
    "model.hidden_size": Range(1, 65536),
    "model.num_attention_heads": Range(1, 1024),
    "model.num_kv_heads": Range(1, 1024),
    "model.ffn_hidden_size": Range(1, 262144),
    "model.vocab_size": Range(1, INT32_MAX),
    "model.vocab_multiple": Range(1, 65536),
    "model.max_position_embeddings": Range(2, 2**22),
    # megatron's GPTModel takes int(rotary_base); below 2 the RoPE frequencies do not decay.
    "model.rotary_base": Range(2, 1e12, whole=True),
    "model.norm_epsilon": Range(0, 1, lo_open=True),
    "model.init_method_std": Range(0, 1, lo_open=True),
    "moe.num_experts": Range(0, 1024),
    "moe.top_k": Range(1, 1024),
    "moe.aux_loss_coeff": Range(0, 100),
    "moe.z_loss_coeff": Range(0, 100),
    "moe.layer_freq": (Range(1, 1024), Items(Range(0, 1), integers=True, max_len=1024)),
    "moe.capacity_factor": Range(0, 1024, lo_open=True),
    "parallel.tensor": Range(1, 1024),
    "parallel.pipeline": Range(1, 1024),
    "parallel.virtual_pipeline": Range(1, 1024),
    "parallel.first_stage_layers": Range(1, 1024),
    "parallel.last_stage_layers": Range(1, 1024),
    "parallel.expert": Range(1, 1024),
    "parallel.world_size": Range(1, 2**20),
    "optimizer.lr": Range(0, LR_MAX),
    "optimizer.min_lr": Range(0, LR_MAX),
    "optimizer.weight_decay": Range(0, 10),
    "optimizer.adam_beta1": Range(0, 1, hi_open=True),
    "optimizer.adam_beta2": Range(0, 1, hi_open=True),
    "optimizer.adam_eps": Range(0, 1, lo_open=True),
    "optimizer.clip_grad": Range(0, 1e6),
    "optimizer.grad_divisor": Range(0, 1e6, lo_open=True),
    "schedule.warmup_steps": Range(0, STEPS_MAX),
    "schedule.warmup_init_lr": Range(0, LR_MAX),
    "schedule.decay_steps": Range(1, STEPS_MAX),
    "train.global_batch_size": Range(1, 2**24),
    "train.micro_batch_size": Range(1, 2**16),
    "train.train_steps": Range(1, STEPS_MAX),
    "train.train_tokens": Range(1, 2**62),
    "train.seed": Range(0, SEED_MAX),
    "train.log_interval": Range(1, STEPS_MAX),
    "train.eval_interval": Range(0, STEPS_MAX),
    "train.eval_iters": Range(1, 2**20),
    "train.max_skipped_steps": Range(0, STEPS_MAX),
    "train.peak_tflops": Range(0, 1e6, lo_open=True),
    "train.recompute_modules": Items(strings=True, max_len=16),
    # [weight, prefix, ...]: megatron needs positive weights (a NaN weight passes its check).
    "data.blend": Items(Range(0, 1e12, lo_open=True), strings=True),
    "data.seq_length": Range(2, 2**22),
    "checkpoint.save_interval": Range(0, STEPS_MAX),
    "checkpoint.keep_last": Range(1, 2**20),
    "logging.wandb.tags": Items(strings=True, max_len=1024),
    "logging.wandb.init_timeout_s": Range(0, 86400, lo_open=True),
    "logging.wandb.finish_timeout_s": Range(0, 86400, lo_open=True),
    "eval.tasks": Items(strings=True, max_len=256),
    "eval.task_interval": Range(0, STEPS_MAX),
    "eval.limit": Range(1, 2**31),
    "eval.batch_size": Range(1, 2**16),
    "upcycling.ratio": Range(0, 1),
    "upcycling.seed": Range(0, SEED_MAX),
    "upcycling.noise_std": Range(0, 1, lo_open=True),
    # The cluster --plan assumes: past these, no machine the planner could describe exists.
    "cluster.gpus_per_node": Range(1, 1024),
    "cluster.peak_tflops": Range(0, 1e6, lo_open=True),
    "cluster.memory_gb": Range(0, 1e5, lo_open=True),
    "cluster.usable_memory_fraction": Range(0, 1, lo_open=True),
    "cluster.hbm_gbs": Range(0, 1e6, lo_open=True),
    "cluster.intra_node_gbs": Range(0, 1e6, lo_open=True),
    "cluster.inter_node_gbs": Range(0, 1e6, lo_open=True),
    "cluster.intra_node_latency_us": Range(0, 1e6),
    "cluster.inter_node_latency_us": Range(0, 1e6),
}


def _num(x: float) -> str:
    if isinstance(x, int) and len(str(abs(x))) > 19:  # past int64: mantissa and exponent
        digits = str(abs(x))
        return f"{'-' if x < 0 else ''}{digits[0]}.{digits[1:4]}e+{len(digits) - 1}"
    if isinstance(x, int) or (x.is_integer() and abs(x) < 1e6):
        return str(int(x))
    return f"{x:g}"


def rules(dotted: str) -> tuple:
    """The rules declared for a field: () when none, else one Range and/or one Items."""
    entry = RANGES.get(dotted, ())
    return entry if isinstance(entry, tuple) else (entry,)


def describe(dotted: str) -> str:
    """The declared range as text for the docs ('' when the field has none)."""
    return "; or ".join(r.text() for r in rules(dotted))


def numeric_fields(cls: type = Config, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(section.key, annotation) of every field that holds numbers or a list, at any depth."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, dotted = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from numeric_fields(tp, dotted + ".")
            continue
        # Optional[int] and int | None are different objects with the same meaning.
        union = typing.get_origin(tp) in (Union, types.UnionType)
        arms = typing.get_args(tp) if union else (tp,)
        if any(a in (int, float, list) or typing.get_origin(a) is list for a in arms):
            yield dotted, tp


def _value(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def check_ranges(cfg: Config) -> None:
    """Raise ConfigError ``section.key: reason`` for the first value outside its declared range
    (None of an optional field is always allowed)."""
    for dotted, _ in numeric_fields():
        value = _value(cfg, dotted)
        if value is None or isinstance(value, bool):
            continue
        for rule in rules(dotted):
            applies = isinstance(value, list) == isinstance(rule, Items)
            why = rule.problem(value) if applies else None
            if why:
                raise ConfigError(f"{dotted}: {why}")


def dataset_samples(cfg: Config, steps: int) -> tuple[int, int]:
    """(train, validation) samples the run asks megatron's dataset builder for."""
    tr = cfg.train
    valid = ((steps // tr.eval_interval + 1) * tr.eval_iters * tr.global_batch_size
             if tr.eval_interval else 0)
    return steps * tr.global_batch_size, valid


def index_bytes(samples: int, blended: bool) -> int:
    """Lower bound of the index arrays megatron builds in memory for ``samples`` samples
    (megatron/core/datasets/gpt_dataset.py): the sample index, (samples + 1) x 2 int32 (int64
    past int32), and the shuffle index, one uint32 (int64 past 2^32 - 2) a sample; a blend of
    several datasets adds BlendedDataset's int16 dataset index and int64 sample index. The
    document index (epochs x documents, int32) depends on the data and is left out."""
    sample = 2 * (4 if samples <= INT32_MAX else 8)
    shuffle = 4 if samples < 2**32 - 2 else 8
    return (samples + 1) * sample + samples * shuffle + (10 * samples if blended else 0)


def check_sizes(cfg: Config, steps: int) -> None:
    """What the run must be able to build: token ids in int32 and megatron's dataset index in
    this machine's memory. Run after the single-field ranges and divisibility checks."""
    m = cfg.model
    padded = -(-m.vocab_size // m.vocab_multiple) * m.vocab_multiple
    if padded > INT32_MAX:
        raise ConfigError(f"model.vocab_size: {m.vocab_size} padded to a multiple of "
                          f"vocab_multiple={m.vocab_multiple} is {padded}, beyond int32 token ids")
    head_dim = m.hidden_size // m.num_attention_heads
    if head_dim % 2:
        raise ConfigError(f"model.hidden_size: head dimension {m.hidden_size}/"
                          f"{m.num_attention_heads} = {head_dim} must be even (RoPE rotates "
                          f"pairs of channels)")
    d = cfg.data
    blended = d.demo_corpus or (not d.mock and sum(isinstance(x, str) for x in d.blend) > 1)
    train, valid = dataset_samples(cfg, steps)
    valid = valid if float(d.split.split(",")[1]) > 0 else 0  # no validation split: not built
    need = index_bytes(train, blended) + (index_bytes(valid, blended) if valid else 0)
    have = psutil.virtual_memory().total
    if need > have:
        tr = cfg.train
        field = ("train.eval_iters" if index_bytes(train, blended) <= have
                 else "train.train_tokens" if tr.train_tokens is not None else "train.train_steps")
        raise ConfigError(
            f"{field}: {steps:,} steps x {tr.global_batch_size:,} sequences = {train:,} training "
            f"(+ {valid:,} validation) samples; megatron's dataset index for them needs at least "
            f"{_gib(need)}, more than this machine's memory ({_gib(have)})")


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"
