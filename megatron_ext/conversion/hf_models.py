"""HF checkpoints as transformers models (CPU, fp32), loaded strictly: the reference side of
conversion validation (``conversion.convert``) and upcycling validation (``upcycling.validate``).

transformers is imported inside the loaders: conversion itself never needs it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from megatron_ext.conversion.hf_io import HFCheckpoint
from megatron_ext.conversion.keymaps import HF_DENSE_MLP, arch_from_hf_config
from megatron_ext.errors import out_of_memory, out_of_memory_in
from megatron_ext.model.compare import ValidationError


class _Held(logging.Handler):
    """Keeps the messages of the records it is handed, to show only if a load fails."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _quiet_transformers(what: Path) -> Iterator[None]:
    """transformers' warnings and progress bars held back while it loads ``what``. If the load
    fails, they go with the error: transformers 5 catches an error in converting a weight
    (running out of memory, say) and raises one that only points at its logged report, so an
    allocation failure found there becomes a ``MemoryError`` (one line from the CLIs, see
    ``errors.out_of_memory``) and anything else gets the report as a note on its traceback."""
    # why inside: transformers takes seconds to import and only validation needs it
    from transformers.utils import logging as hf_logging

    root, held = hf_logging.get_logger(), _Held()  # the library's root logger
    before = (root.level, root.handlers[:], root.propagate, hf_logging.is_progress_bar_enabled())
    root.handlers[:], root.propagate = [held], False
    root.setLevel(logging.WARNING)
    hf_logging.disable_progress_bar()
    try:
        yield
    except Exception as e:
        said = "\n".join(held.messages)
        if out_of_memory(e) is None and (failed := out_of_memory_in(said)) is not None:
            raise MemoryError(f"{failed} (transformers, loading {what})") from e
        if said:
            e.add_note(f"transformers said, loading {what}:\n{said}")
        raise
    finally:
        root.setLevel(before[0])
        root.handlers[:], root.propagate = before[1], before[2]
        if before[3]:
            hf_logging.enable_progress_bar()


def load_dense(path: Path) -> Any:
    """LlamaForCausalLM in fp32, refusing missing or unexpected weights."""
    from transformers import LlamaForCausalLM  # why inside: start-up time (see module docstring)

    with _quiet_transformers(path):
        model, info = LlamaForCausalLM.from_pretrained(
            path, dtype=torch.float32, output_loading_info=True,
            use_safetensors=True)  # never a pickled .bin
    _require_clean(info, set(), path)
    return model.eval()


def load_moe(path: Path) -> Any:
    """MixtralForCausalLM in fp32. Layers listed as dense in config.json (a mixed model, which
    Mixtral cannot express) get a Llama MLP swapped in and loaded from the checkpoint."""
    # why inside: start-up time (see module docstring)
    from transformers import MixtralForCausalLM
    from transformers.models.llama.modeling_llama import LlamaMLP

    ckpt = HFCheckpoint(path)
    arch = arch_from_hf_config(ckpt.config)
    dense_layers = set(range(arch.num_layers)) - arch.moe_layers
    with _quiet_transformers(path):
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


def hf_logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    """transformers logits (fp32, CPU) of an HF checkpoint: Llama, Mixtral or mixed."""
    arch = arch_from_hf_config(HFCheckpoint(path).config)
    model = load_moe(path) if arch.num_experts else load_dense(path)
    with torch.no_grad():
        return model(tokens).logits.float()
