"""Check an upcycled checkpoint with transformers (CPU, fp32): it loads strictly, its logits are
finite, and, for function-preserving recipes (r = 0), they equal the dense model's.

transformers is imported lazily: conversion itself never needs it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from megatron_ext.checkpoint.hf_io import HFCheckpoint
from megatron_ext.checkpoint.keymaps import HF_DENSE_MLP, arch_from_hf_config


class ValidationError(RuntimeError):
    """The upcycled model failed a check (not a bad input: the conversion is wrong)."""


@dataclass(frozen=True)
class ValidationReport:
    max_abs_diff: float
    """Largest |logit_moe - logit_dense| over the probe sequences."""
    max_abs_logit: float
    """Largest |logit_dense|, the scale the difference is judged against."""
    finite: bool
    function_preserving: bool
    tolerance: float | None
    """Allowed max_abs_diff when function_preserving, else None (difference only reported)."""

    @property
    def passed(self) -> bool:
        if not self.finite:
            return False
        return self.tolerance is None or self.max_abs_diff <= self.tolerance

    def summary(self) -> str:
        check = (f"<= {self.tolerance:.2e} required" if self.tolerance is not None
                 else "reported only: this recipe changes the function")
        return (f"validation: max |logit diff| = {self.max_abs_diff:.3e} ({check}); "
                f"max |dense logit| = {self.max_abs_logit:.3f}; finite = {self.finite}; "
                f"{'PASS' if self.passed else 'FAIL'}")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    before, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)
        if bars:
            hf_logging.enable_progress_bar()


def load_dense(path: Path) -> Any:
    """LlamaForCausalLM in fp32, refusing missing or unexpected weights."""
    from transformers import LlamaForCausalLM

    with _quiet_transformers():
        model, info = LlamaForCausalLM.from_pretrained(
            path, dtype=torch.float32, output_loading_info=True,
            use_safetensors=True)  # never a pickled .bin
    _require_clean(info, set(), path)
    return model.eval()


def load_moe(path: Path) -> Any:
    """MixtralForCausalLM in fp32. Layers listed as dense in config.json (a mixed model, which
    Mixtral cannot express) get a Llama MLP swapped in and loaded from the checkpoint."""
    from transformers import MixtralForCausalLM
    from transformers.models.llama.modeling_llama import LlamaMLP

    ckpt = HFCheckpoint(path)
    arch = arch_from_hf_config(ckpt.config)
    dense_layers = set(range(arch.num_layers)) - arch.moe_layers
    with _quiet_transformers():
        model, info = MixtralForCausalLM.from_pretrained(
            path, dtype=torch.float32, output_loading_info=True,
            use_safetensors=True)  # never a pickled .bin
    _require_clean(info, dense_layers, path)
    mlp_config = SimpleNamespace(hidden_size=arch.hidden_size, hidden_act="silu", mlp_bias=False,
                                 intermediate_size=arch.ffn_hidden_size)
    for layer in sorted(dense_layers):
        mlp = LlamaMLP(mlp_config)
        for role in ("gate", "up", "down"):
            weight = ckpt.get(HF_DENSE_MLP[role].format(layer=layer)).float()
            getattr(mlp, f"{role}_proj").weight.data.copy_(weight)
        model.model.layers[layer].mlp = mlp
    return model.eval()


def _require_clean(info: dict[str, Any], dense_layers: set[int], path: Path) -> None:
    """No missing/unexpected/mismatched weights, except the MLPs of declared dense layers."""

    def in_dense_mlp(key: str) -> bool:
        parts = key.split(".")
        return (len(parts) > 3 and parts[:2] == ["model", "layers"] and parts[3] == "mlp"
                and int(parts[2]) in dense_layers)

    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        bad = sorted(str(k) for k in info.get(kind) or () if not in_dense_mlp(str(k)))
        if bad:
            raise ValidationError(f"{path}: transformers reports {kind} {bad[:3]}")


def probe_tokens(vocab_size: int, num_sequences: int = 3, seq_len: int = 16) -> torch.Tensor:
    """Fixed token sequences (seeded, independent of the upcycling seed)."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (num_sequences, seq_len), generator=g)


def validate_upcycled(dense_dir: Path, moe_dir: Path, function_preserving: bool,
                      rel_tolerance: float = 1e-4) -> ValidationReport:
    """Compare logits of the dense and the upcycled model on ``probe_tokens``.

    Function-preserving recipes must match within ``rel_tolerance * max(1, max |dense logit|)``:
    the MoE sums top-k copies of the dense MLP with weights renormalized to 1, so only rounding
    (and the permuted summation order) differs.
    """
    dense = load_dense(dense_dir)
    tokens = probe_tokens(dense.config.vocab_size)
    with torch.no_grad():
        ref = dense(tokens).logits
    del dense
    moe = load_moe(moe_dir)
    with torch.no_grad():
        out = moe(tokens).logits
    scale = ref.abs().max().item()
    return ValidationReport(
        max_abs_diff=(out - ref).abs().max().item(),
        max_abs_logit=scale,
        finite=bool(torch.isfinite(out).all()),
        function_preserving=function_preserving,
        tolerance=rel_tolerance * max(1.0, scale) if function_preserving else None,
    )
