"""The one function that checks every field against the bounds the schema declares with it,
and the checks of what a whole run can build.

Each ``int``/``float`` field of the tree (optional or not) and each list field (what its items
may be) declares its bounds in ``schema.py`` (``setting(..., bounds=...)``, ``config/fields.py``);
``tests/unit/test_config_ranges.py`` walks the schema and fails for a field without them, so a
new field cannot skip its check; ``docs/config.md`` shows them. The loader applies the same
bounds to every Config it builds; ``check_ranges`` re-checks a Config changed in code. Upper
bounds are "sane": far beyond the paper's runs, and low enough that products of sizes
(parameters x bytes, samples x index entries) stay well inside int64. What a whole run can
build (vocabulary in int32, megatron's dataset index in this machine's memory) is checked
across fields by ``check_sizes``.
"""

from __future__ import annotations

import typing
from collections.abc import Iterator
from functools import cache
from typing import Any

import psutil

from megatron_ext.config.fields import INT32_MAX, Leaf, Rule, arms, leaves, problem
from megatron_ext.config.loader import ConfigError
from megatron_ext.config.schema import Config


@cache
def _leaves() -> dict[str, Leaf]:
    return {leaf.name: leaf for leaf in leaves(Config)}


def rules(dotted: str) -> tuple[Rule, ...]:
    """The bounds declared for a field: () when none, else one Range and/or one Items."""
    leaf = _leaves().get(dotted)
    return leaf.field.metadata.get("bounds", ()) if leaf else ()


def describe(dotted: str) -> str:
    """The declared range as text for the docs ('' when the field has none)."""
    return "; or ".join(r.text() for r in rules(dotted))


def numeric_fields() -> Iterator[tuple[str, Any]]:
    """(section.key, annotation) of every field that holds numbers, a list or a mapping, at
    any depth: those that need declared bounds."""
    for leaf in _leaves().values():
        if any(a in (int, float, list, dict) or typing.get_origin(a) in (list, dict)
               for a in arms(leaf.annotation)):
            yield leaf.name, leaf.annotation


def _value(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def check_ranges(cfg: Config) -> None:
    """Raise ConfigError ``section.key: reason`` for the first value outside its declared bounds
    (None of an optional field is always allowed)."""
    for name, leaf in _leaves().items():
        found = problem(name, leaf.field, _value(cfg, name))
        if found:
            raise ConfigError(": ".join(found))


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
