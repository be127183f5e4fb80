"""Load one of our checkpoints into a megatron model for evaluation (no optimizer, no DDP).

Used by conversion validation, routing analysis and the resharding tests. The parallel layout is
the caller's choice (e.g. a checkpoint saved at EP=2 evaluated at EP=1): dist_checkpointing
reshards on load. Running the loaded model is model-side: ``megatron_ext.model.inference``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_ext.checkpoint import manifest, plan, store
from megatron_ext.checkpoint.store import CheckpointError, find_resumable, saved_config, verify
from megatron_ext.config.loader import ConfigError, apply_overrides, config_from_dict
from megatron_ext.config.schema import Config
from megatron_ext.model.builder import build_model, resolve_backends
from megatron_ext.platform.cli import warned
from megatron_ext.platform.dist import init_distributed


@dataclass(frozen=True)
class Verified:
    """A checkpoint this process verified (``checkpoint_config``): its directory, saved config
    and the ``manifest.stats`` of its files when the verification began. ``load_model`` takes
    it and reads no byte of it again while those are unchanged (a tool hashes a checkpoint
    once, not once to read its config and again to load it)."""

    path: Path
    config: Config
    stats: dict | None

    def unchanged(self) -> bool:
        """(None, e.g. a file gone: verify again, which says what is wrong)"""
        return self.stats is not None and manifest.stats_or_none(self.path) == self.stats


def checkpoint_config(path: str | Path) -> Verified:
    """Resolve ``path`` (a checkpoint dir, or a save root with ``latest``), verify it and read
    its config."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: not found")
    if (path / "meta.json").exists():
        before = manifest.stats_or_none(path)  # before any byte is read: a change meanwhile shows
        verify(path)
    else:
        found = warned(find_resumable(path))  # verified; a fallback past a damaged one says so
        if found is None:
            raise CheckpointError(f"{path}: no checkpoint found")
        path, before = found, manifest.stats_or_none(found)
    return Verified(path, _config(path), before)


def _config(path: Path) -> Config:
    try:  # data only (strict YAML); a config that does not build is a damaged checkpoint
        return config_from_dict(saved_config(path))
    except ConfigError as e:
        raise CheckpointError(f"{path / 'config.yaml'}: {' '.join(str(e).split())}") from None


def load_model(source: str | Path | Verified, expert_parallel: int = 1, tensor_parallel: int = 1,
               overrides: Mapping[str, Any] | None = None):
    """Initialize (if needed) distributed state, build the model of ``source`` and load it.

    The model computes every token (``moe.capacity_factor`` off): token dropping is a training
    device, and with it a token's output would depend on the other tokens of its batch, unlike
    the exported HF model's. ``overrides``: dotted config fields, type-checked by the config
    loader, applied after that. ``source``: a checkpoint directory (verified here, by the ranks
    together), a save root (this process finds and verifies its newest usable checkpoint) or
    what ``checkpoint_config`` returned (not verified again unless a file changed since).
    Returns (config, model in eval mode). Call ``megatron_ext.platform.dist.shutdown()`` after.
    """
    if isinstance(source, Verified):
        verified = source
    elif (Path(source) / "meta.json").is_file():
        verified = None  # verified below, by the ranks together
    else:
        verified = checkpoint_config(source)
    path = verified.path if verified else Path(source)
    cfg = copy.deepcopy(verified.config) if verified else _config(path)  # (changed below)
    cfg.parallel.expert = expert_parallel
    cfg.parallel.tensor = tensor_parallel
    # The whole model on each rank, whatever pipeline layout the checkpoint was saved at.
    cfg.parallel.pipeline = 1
    cfg.parallel.virtual_pipeline = None
    cfg.parallel.first_stage_layers = cfg.parallel.last_stage_layers = None
    cfg.parallel.sequence_parallel = tensor_parallel > 1 and cfg.moe.num_experts > 0
    cfg.parallel.world_size = None
    cfg.train.precision = "fp32" if not torch.cuda.is_available() else cfg.train.precision
    cfg = apply_overrides(cfg, {"moe.capacity_factor": None, **(overrides or {})})
    init_distributed(cfg)
    model = build_model(cfg, resolve_backends(cfg))
    if torch.cuda.is_available():
        model.cuda()
    if verified is not None and plan.on_rank0(verified.unchanged):  # the ranks agree
        store.load_weights(path, model)
    else:  # each rank hashes its share; rank 0 reads the pickles
        plan.load_weights(path, model)
    model.eval()
    return cfg, model
