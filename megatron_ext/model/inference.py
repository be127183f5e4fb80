"""Load one of our checkpoints into a megatron model for evaluation (no optimizer, no DDP).

Used by conversion validation, routing analysis and the resharding tests. The parallel layout is
the caller's choice (e.g. a checkpoint saved at EP=2 evaluated at EP=1): dist_checkpointing
reshards on load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from megatron_ext.config.loader import ConfigError, config_from_dict
from megatron_ext.config.schema import Config


def checkpoint_config(path: str | Path) -> tuple[Path, Config]:
    """Resolve ``path`` (a checkpoint dir, or a save root with ``latest``) and read its config."""
    from megatron_ext.checkpoint.dist import CheckpointError, find_resumable, saved_config, verify

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: not found")
    if not (path / "meta.json").exists():
        found, _ = find_resumable(path)
        if found is None:
            raise CheckpointError(f"{path}: no checkpoint found")
        path = found
    verify(path)
    try:  # data only (strict YAML); a config that does not build is a damaged checkpoint
        return path, config_from_dict(saved_config(path))
    except ConfigError as e:
        raise CheckpointError(f"{path / 'config.yaml'}: {' '.join(str(e).split())}") from None


def load_model(path: str | Path, expert_parallel: int = 1, tensor_parallel: int = 1,
               overrides: Optional[dict] = None):
    """Initialize (if needed) distributed state, build the model of ``path`` and load it.

    Returns (config, model in eval mode). Call ``megatron_ext.platform.dist.shutdown()`` after.
    """
    from megatron_ext.checkpoint.dist import load_weights
    from megatron_ext.model.builder import build_model, resolve_backends
    from megatron_ext.platform.dist import init_distributed

    path, cfg = checkpoint_config(path)
    cfg.parallel.expert = expert_parallel
    cfg.parallel.tensor = tensor_parallel
    cfg.parallel.sequence_parallel = tensor_parallel > 1 and cfg.moe.num_experts > 0
    cfg.parallel.world_size = None
    cfg.train.precision = "fp32" if not torch.cuda.is_available() else cfg.train.precision
    for dotted, value in (overrides or {}).items():
        sec, key = dotted.split(".")
        setattr(getattr(cfg, sec), key, value)
    init_distributed(cfg)
    model = build_model(cfg, resolve_backends(cfg))
    if torch.cuda.is_available():
        model.cuda()
    load_weights(path, model)
    model.eval()
    return cfg, model


@torch.no_grad()
def logits(model, tokens_BS: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits [b, s, vocab] (vocab padding included) for a token batch."""
    device = next(model.parameters()).device
    tokens_BS = tokens_BS.to(device)
    pos = torch.arange(tokens_BS.shape[1], device=device).expand_as(tokens_BS)
    out = model(tokens_BS, pos, None).float()
    from megatron.core import parallel_state, tensor_parallel

    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        # The output layer is column-parallel: each TP rank holds a slice of the vocabulary.
        out = tensor_parallel.gather_from_tensor_model_parallel_region(out)
    return out
