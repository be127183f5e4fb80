"""Training checkpoints with megatron-core dist_checkpointing (torch_dist format).

Layout of ``checkpoint.save``::

    iter_0000100/            one complete checkpoint (model + optimizer shards, rng/, meta.json)
    iter_0000200/
    latest                   "iter_0000200", replaced atomically after the directory is complete

A checkpoint is written to ``.tmp_iter_N`` and renamed once every rank has finished, so a
directory named ``iter_*`` is complete unless a file was later damaged. ``meta.json`` (written
last, before the rename) records the size of every file; ``verify()`` checks them so a truncated
or missing shard is found before megatron tries to read it.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import yaml
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

ITER_RE = re.compile(r"^iter_(\d{7,})$")
ARCH_FIELDS = (
    "model.num_layers", "model.hidden_size", "model.num_attention_heads", "model.num_kv_heads",
    "model.ffn_hidden_size", "model.vocab_size", "model.vocab_multiple", "moe.num_experts",
    "moe.layer_freq",
)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message says which and why."""


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    skipped_steps: int = 0
    scheduler: dict = field(default_factory=dict)


def iter_name(step: int) -> str:
    return f"iter_{step:07d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP (its sharded_state_dict is the wrapped module's)."""
    from megatron.core.distributed import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _optimizer_metadata(fully_reshardable: bool) -> dict:
    # Without chained_optim_avoid_prefix the state keys carry "chained_<i>." prefixes, and the
    # number of chained optimizers depends on the expert-parallel size: keys would not match
    # across EP layouts.
    return {"distrib_optim_sharding_type":
            "fully_reshardable" if fully_reshardable else "dp_reshardable",
            "chained_optim_avoid_prefix": True}


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def all_finite(model: torch.nn.Module) -> bool:
    bad = torch.zeros(1)
    for p in model.parameters():
        if not torch.isfinite(p.detach()).all():
            bad += 1
            break
    bad = bad.to(next(model.parameters()).device)
    if dist.is_initialized():
        dist.all_reduce(bad)
    return bad.item() == 0


def save(root: str | Path, state: TrainState, model, optimizer, config: dict,
         layout: dict, keep_last: int, fully_reshardable: bool,
         async_queue: Optional[AsyncCallsQueue] = None) -> Path:
    """Write ``root/iter_<step>`` atomically, update ``latest``, prune old ones. All ranks call.

    With ``async_queue`` only the snapshot happens here (host copies, or a fork on CPU): the
    shards are written by a background process, and the rename + ``latest`` update run as the
    request's finalize step once every rank's writer has finished
    (``async_queue.maybe_finalize_async_calls``). Until then the previous checkpoint stays
    ``latest``, so a crash mid-write resumes from it.
    """
    root = Path(root)
    if not all_finite(model):
        raise CheckpointError("refusing to save: model parameters contain NaN/Inf")
    name = iter_name(state.step)
    tmp, final = root / f".tmp_{name}", root / name
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    inner = unwrap(model)
    model_sd = inner.sharded_state_dict()
    sharded = {"model": model_sd}
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=False, metadata=_optimizer_metadata(fully_reshardable)
        )
    # Captured now: the caller keeps mutating ``state`` while an async write is in flight.
    meta = {
        "step": state.step, "consumed_samples": state.consumed_samples,
        "consumed_tokens": state.consumed_tokens, "skipped_steps": state.skipped_steps,
        "scheduler": copy.deepcopy(state.scheduler), "layout": layout,
        "has_optimizer": optimizer is not None,
        "optimizer_fully_reshardable": fully_reshardable,
    }

    def commit() -> None:
        _barrier()
        if _rank() == 0:
            _commit(root, tmp, final, meta, config, keep_last)
        _barrier()

    request = dist_checkpointing.save(sharded, str(tmp),  # wants an empty directory
                                      async_sharded_save=async_queue is not None)
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), tmp / "rng" / f"rank_{_rank():05d}.pt")
    if async_queue is None:
        commit()
    else:
        request.add_finalize_fn(commit)
        async_queue.schedule_async_request(request)
    return final


def _commit(root: Path, tmp: Path, final: Path, meta: dict, config: dict,
            keep_last: int) -> None:
    """Rank 0, after every rank's shards are on disk: record sizes, rename, point ``latest``."""
    meta = dict(meta, files={str(p.relative_to(tmp)): p.stat().st_size
                             for p in sorted(tmp.rglob("*")) if p.is_file()})
    (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    _atomic_write(tmp / "meta.json", json.dumps(meta, indent=1))
    if final.exists():  # a re-save of the same step (e.g. after a restart)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_write(root / "latest", final.name + "\n")
    _prune(root, keep_last)


def _prune(root: Path, keep_last: int) -> None:
    done = sorted(p for p in root.iterdir() if p.is_dir() and ITER_RE.match(p.name))
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    # Saves commit in step order, so a .tmp_ directory of an earlier step is a write that
    # never finished (a crash or a killed background writer).
    newest = int(ITER_RE.match(done[-1].name).group(1)) if done else -1
    for stale in root.glob(".tmp_iter_*"):
        m = ITER_RE.match(stale.name[len(".tmp_"):])
        if m and int(m.group(1)) < newest:
            shutil.rmtree(stale, ignore_errors=True)


def verify(path: Path) -> dict:
    """Return meta.json of a complete checkpoint, or raise CheckpointError saying what is wrong."""
    meta_file = path / "meta.json"
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    if not meta_file.is_file():
        raise CheckpointError(f"{path}: meta.json missing (incomplete save)")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: meta.json is corrupt")
    if ".metadata" not in meta.get("files", {}):
        raise CheckpointError(f"{path}: dist_checkpointing metadata not recorded")
    for rel, size in meta["files"].items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"{path}: missing file {rel}")
        if f.stat().st_size != size:
            raise CheckpointError(f"{path}: {rel} has {f.stat().st_size} bytes, "
                                  f"expected {size} (truncated or damaged)")
    return meta


def find_resumable(root: str | Path) -> tuple[Optional[Path], list[str]]:
    """Newest usable checkpoint under ``root`` (None if there is none) and warnings to print.

    Raises CheckpointError when checkpoints exist but none is usable.
    """
    root = Path(root)
    if not root.is_dir():
        return None, []
    warnings: list[str] = []
    candidates = sorted((p for p in root.iterdir() if p.is_dir() and ITER_RE.match(p.name)),
                        reverse=True)
    latest = root / "latest"
    if latest.exists():
        target = root / latest.read_text().strip()
        if target.is_dir() and target in candidates:
            candidates.remove(target)
            candidates.insert(0, target)
        else:
            warnings.append(f"{latest} points at {target.name}, which does not exist")
    elif candidates:
        warnings.append(f"{latest} is missing")
    problems = []
    for cand in candidates:
        try:
            verify(cand)
            if problems:
                warnings.append(f"skipping unusable checkpoint(s): {'; '.join(problems)}; "
                                f"resuming from {cand.name}")
            return cand, warnings
        except CheckpointError as e:
            problems.append(str(e))
    if problems:
        raise CheckpointError(f"no usable checkpoint in {root}: {'; '.join(problems)}")
    return None, warnings


def check_compatible(path: Path, config: dict) -> None:
    saved = yaml.safe_load((path / "config.yaml").read_text())
    diffs = []
    for dotted in ARCH_FIELDS:
        sec, key = dotted.split(".")
        a, b = saved.get(sec, {}).get(key), config.get(sec, {}).get(key)
        if a != b:
            diffs.append(f"{dotted} (checkpoint {a!r}, config {b!r})")
    if diffs:
        raise CheckpointError(f"{path} is incompatible with this config: {', '.join(diffs)}")


def load(path: Path, model, optimizer, layout: dict) -> tuple[TrainState, list[str]]:
    """Resume model (+ optimizer, RNG) from a verified checkpoint; returns state and warnings.

    The optimizer format (fully reshardable or not) is the one recorded in meta.json."""
    meta = verify(path)
    warnings = []
    inner = unwrap(model)
    model_sd = inner.sharded_state_dict()
    sharded = {"model": model_sd}
    same_layout = meta["layout"] == layout
    if optimizer is not None and meta.get("has_optimizer"):
        if not same_layout and layout.get("distributed_optimizer") and not meta.get(
                "optimizer_fully_reshardable"):
            raise CheckpointError(
                f"{path}: optimizer state was saved for layout {meta['layout']} in the "
                f"dp_reshardable format and cannot be loaded at {layout}; resume with the old "
                f"layout, or start from its weights with checkpoint.load")
        sharded["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=True,
            metadata=_optimizer_metadata(meta.get("optimizer_fully_reshardable", True)))
    loaded = dist_checkpointing.load(sharded, str(path))
    inner.load_state_dict(loaded["model"])
    if "optimizer" in loaded:
        optimizer.load_state_dict(loaded["optimizer"])
    rng_file = path / "rng" / f"rank_{_rank():05d}.pt"
    if same_layout and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        warnings.append("parallel layout changed: RNG states not restored")
    state = TrainState(meta["step"], meta["consumed_samples"], meta["consumed_tokens"],
                       meta["skipped_steps"], meta["scheduler"])
    return state, warnings


def load_weights(path: str | Path, model) -> Path:
    """Initial weights only (``checkpoint.load``): a checkpoint dir or a root with ``latest``."""
    path = Path(path)
    if (path / "latest").is_file() or not (path / "meta.json").exists():
        found, _ = find_resumable(path)
        if found is None:
            raise CheckpointError(f"{path}: no checkpoint found")
        path = found
    verify(path)
    inner = unwrap(model)
    loaded = dist_checkpointing.load({"model": inner.sharded_state_dict()}, str(path))
    inner.load_state_dict(loaded["model"])
    return path
