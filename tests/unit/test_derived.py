"""``config.derived.derive``: what a validated config implies, computed once into a frozen
``Derived`` (the run's layers read it instead of recomputing). In-process, no torch."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_ext.config.derived import Derived, derive
from megatron_ext.config.loader import load_config
from megatron_ext.config.validate import validate
from tests.conftest import REPO

TINY = REPO / "configs/tiny-cpu.yaml"  # 4 layers, 8 experts, vocab 4096, demo valid_sets


def _derived(*overrides: str) -> Derived:
    cfg = load_config(TINY, list(overrides))
    validate(cfg)
    return derive(cfg)


def test_the_demo_configs_values():
    d = _derived()
    assert d == Derived(total_steps=300, moe_layer_pattern=(1, 1, 1, 1), stage_layers=(4,),
                        padded_vocab=4096,
                        valid_sets={"english": "demo:en", "japanese": "demo:ja",
                                    "code": "demo:code"})


def test_each_value_follows_its_fields():
    d = _derived(
        # 16 x 128 = 2048 tokens a step: 2049 tokens take two steps; 4097 rows pad to 33 x 128
        "train.train_tokens=2049", "schedule.warmup_steps=1", "model.vocab_size=4097",
        "moe.layer_freq=[0, 1, 0, 1]",
        "parallel.pipeline=2", "parallel.first_stage_layers=1", "parallel.world_size=2",
        "data.demo_corpus=false", "data.mock=false", "data.tokenizer=tok",
        "data.blend=[data/x]",
        "data.valid_sets={demo: 'demo:en', wiki: data/wiki, mix: [1, data/a, 1, 'demo:ja']}")
    assert d.total_steps == 2
    assert d.padded_vocab == 4224
    assert d.moe_layer_pattern == (0, 1, 0, 1)
    assert d.stage_layers == (1, 3)
    # entries naming the demo corpus apply only when training on it
    assert dict(d.valid_sets) == {"wiki": "data/wiki"}


def test_a_dense_model_has_no_moe_layers():
    assert _derived("moe.num_experts=0").moe_layer_pattern == (0, 0, 0, 0)


def test_it_cannot_be_changed_after_derivation():
    d = _derived()
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.total_steps = 1  # type: ignore[misc]
    assert isinstance(d.moe_layer_pattern, tuple) and isinstance(d.stage_layers, tuple)
