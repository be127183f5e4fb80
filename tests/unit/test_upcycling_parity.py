"""Upcycled checkpoints in transformers: r = 0 reproduces the dense logits; r > 0 loads and runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_ext.conversion.hf_models import load_moe
from megatron_ext.model.compare import probe_tokens
from megatron_ext.upcycling import UpcycleSpec
from megatron_ext.upcycling.convert import upcycle_checkpoint
from megatron_ext.upcycling.validate import validate_upcycled


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, vocab_size=256)
    path = tmp_path_factory.mktemp("dense")
    LlamaForCausalLM(cfg).save_pretrained(path)  # fp32: the comparison is exact up to rounding
    return path


def _upcycle(dense_dir: Path, out: Path, **spec) -> Path:
    upcycle_checkpoint(dense_dir, out, UpcycleSpec(**spec), validate=False, log=lambda s: None)
    return out


def test_naive_logits_equal_dense_in_transformers(dense_dir: Path, tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM, MixtralForCausalLM

    out = _upcycle(dense_dir, tmp_path / "moe", method="naive", num_experts=4, top_k=2)
    tokens = probe_tokens(256)
    with torch.no_grad():
        ref = LlamaForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)(tokens).logits
        moe = MixtralForCausalLM.from_pretrained(out, dtype=torch.float32)
        got = moe(tokens).logits
    assert moe.config.num_local_experts == 4 and moe.config.num_experts_per_tok == 2
    assert (got - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("spec", [
    dict(method="drop", ratio=0.0, num_experts=8, top_k=2),
    dict(method="noise", ratio=0.0, num_experts=4, top_k=1),
    dict(method="naive", num_experts=4, top_k=2, moe_layers={1}),  # mixed dense / MoE
])
def test_function_preserving_recipes(dense_dir: Path, tmp_path: Path, spec: dict) -> None:
    out = _upcycle(dense_dir, tmp_path / "moe", **spec)
    report = validate_upcycled(dense_dir, out, function_preserving=True)
    assert report.passed and report.max_abs_diff <= 1e-5


def test_mixed_model_keeps_dense_layer(dense_dir: Path, tmp_path: Path) -> None:
    out = _upcycle(dense_dir, tmp_path / "moe", method="drop", ratio=0.5, num_experts=4,
                   moe_layers={0})
    model = load_moe(out)
    assert type(model.model.layers[1].mlp).__name__ == "LlamaMLP"
    assert type(model.model.layers[0].mlp).__name__ == "MixtralSparseMoeBlock"


def test_drop_loads_strictly_and_is_finite(dense_dir: Path, tmp_path: Path) -> None:
    out = _upcycle(dense_dir, tmp_path / "moe", method="drop", ratio=0.5, num_experts=4)
    report = validate_upcycled(dense_dir, out, function_preserving=False)
    assert report.passed and report.finite and report.tolerance is None
    assert report.max_abs_diff > 1e-4  # r = 0.5 does change the function


def test_same_seed_same_bytes_on_disk(dense_dir: Path, tmp_path: Path) -> None:
    import hashlib

    def digest(path: Path) -> str:
        return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()

    spec = dict(method="drop", ratio=0.5, num_experts=4)
    a = digest(_upcycle(dense_dir, tmp_path / "a", seed=11, **spec))
    b = digest(_upcycle(dense_dir, tmp_path / "b", seed=11, **spec))
    c = digest(_upcycle(dense_dir, tmp_path / "c", seed=12, **spec))
    assert a == b != c
