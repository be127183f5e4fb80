"""Load one of our checkpoints into a megatron model for evaluation (no optimizer, no DDP).

Used by conversion validation, routing analysis and the resharding tests. The parallel layout is
the caller's choice (e.g. a checkpoint saved at EP=2 evaluated at EP=1): dist_checkpointing
reshards on load. Running the loaded model is model-side: ``megatron_ext.model.inference``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from megatron_ext.checkpoint import plan
from megatron_ext.checkpoint.store import CheckpointError, find_resumable, saved_config, verify
from megatron_ext.config.loader import ConfigError, apply_overrides, config_from_dict
from megatron_ext.config.schema import Config
from megatron_ext.model.builder import build_model, resolve_backends
from megatron_ext.platform.cli import warned
from megatron_ext.platform.dist import init_distributed


def checkpoint_config(path: str | Path) -> tuple[Path, Config]:
    """Resolve ``path`` (a checkpoint dir, or a save root with ``latest``) and read its config."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: not found")
    if not (path / "meta.json").exists():
        found = warned(find_resumable(path))  # a fallback past a damaged one says so
        if found is None:
            raise CheckpointError(f"{path}: no checkpoint found")
        path = found
    verify(path)
    return path, _config(path)


def _config(path: Path) -> Config:
    try:  # data only (strict YAML); a config that does not build is a damaged checkpoint
        return config_from_dict(saved_config(path))
    except ConfigError as e:
        raise CheckpointError(f"{path / 'config.yaml'}: {' '.join(str(e).split())}") from None


def load_model(path: str | Path, expert_parallel: int = 1, tensor_parallel: int = 1,
               overrides: Mapping[str, Any] | None = None):
    """Initialize (if needed) distributed state, build the model of ``path`` and load it.

    The model computes every token (``moe.capacity_factor`` off): token dropping is a training
    device, and with it a token's output would depend on the other tokens of its batch, unlike
    the exported HF model's. ``overrides``: dotted config fields, type-checked by the config
    loader, applied after that. Returns (config, model in eval mode). Call
    ``megatron_ext.platform.dist.shutdown()`` after.
    """
    path = Path(path)
    if (path / "meta.json").is_file():  # verified below, by the ranks together
        cfg = _config(path)
    else:  # a save root: this process finds (and verifies) its newest usable checkpoint
        path, cfg = checkpoint_config(path)
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
    plan.load_weights(path, model)  # each rank hashes its share; rank 0 reads the pickles
    model.eval()
    return cfg, model
