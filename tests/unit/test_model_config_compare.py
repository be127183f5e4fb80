"""``resume_check.compare_model_config``: every field that fixes a tensor shape and differs
between a checkpoint's saved config and the run's, named in one list; equivalent spellings (GQA
heads left None, the MoE layer pattern of a dense model) are not differences."""

from __future__ import annotations

from megatron_ext.checkpoint.resume_check import compare_model_config
from megatron_ext.config.loader import to_dict
from megatron_ext.config.schema import Config


def _tree(**sections) -> dict:
    tree = to_dict(Config())
    for name, values in sections.items():
        tree[name].update(values)
    return tree


def test_same_shapes_compare_equal_whatever_else_differs():
    saved = _tree(model={"hidden_size": 64}, optimizer={"lr": 0.1})
    run = _tree(model={"hidden_size": 64, "rotary_base": 500.0}, optimizer={"lr": 0.2})
    assert compare_model_config(saved, run) == []


def test_every_differing_shape_field_is_named():
    saved = _tree(model={"hidden_size": 512, "ffn_hidden_size": 128}, moe={"num_experts": 8})
    run = _tree(model={"hidden_size": 704, "ffn_hidden_size": 256}, moe={"num_experts": 4})
    assert compare_model_config(saved, run) == [
        "model.ffn_hidden_size (checkpoint 128, config 256)",
        "model.hidden_size (checkpoint 512, config 704)",
        "moe.num_experts (checkpoint 8, config 4)"]


def test_equivalent_spellings_are_not_differences():
    heads = _tree(model={"num_attention_heads": 4, "num_kv_heads": None})
    assert compare_model_config(heads, _tree(model={"num_attention_heads": 4,
                                                    "num_kv_heads": 4})) == []
    dense = _tree(moe={"num_experts": 0, "layer_freq": 1})
    assert compare_model_config(dense, _tree(moe={"num_experts": 0, "layer_freq": 2})) == []


def test_an_older_checkpoint_missing_a_field_compares_its_default():
    saved = _tree()
    del saved["model"]["vocab_multiple"]
    assert compare_model_config(saved, _tree(model={"vocab_multiple": 64})) == [
        "model.vocab_multiple (checkpoint 128, config 64)"]
