"""Training checkpoints with megatron-core dist_checkpointing (torch_dist format).

Layout of ``checkpoint.save``::

    iter_0000100/            one complete checkpoint (model + optimizer shards, rng/, meta.json)
    iter_0000200/
    latest                   "iter_0000200", replaced atomically after the directory is complete

A checkpoint is written to ``.tmp_iter_N`` and renamed once every rank has finished, so a
directory named ``iter_*`` is complete unless a file was later damaged. ``meta.json`` (written
last, before the rename) records the size and xxh3-128 checksum of every file, each computed by
the process that wrote the file (``manifest``); ``verify()`` checks them, so a missing,
truncated or overwritten file is found before megatron reads anything.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.distributed import DistributedDataParallel

from megatron_ext.checkpoint import (
    manifest,
    safe_pickle,  # importing it restricts megatron's reads
    writer_queue,
)
from megatron_ext.checkpoint.manifest import CheckpointError  # noqa: F401 (re-exported: store.CheckpointError)
from megatron_ext.config.loader import ConfigError, checked_config_tree
from megatron_ext.errors import one_line
from megatron_ext.model.chunks import model_chunks
from megatron_ext.platform.fs import atomic_write

ITER_RE = re.compile(r"^iter_(\d{7,})$")
# checkpoint name -> (verified?, manifest.stats when its verification began): the verdicts of
# the job (the resume plan's and the writer's) that pruning reuses while the files are unchanged
Known = dict[str, tuple[bool, dict]]


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


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP (its sharded_state_dict is the wrapped module's)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def model_sharded_state_dict(model: torch.nn.Module) -> dict:
    """The sharded state of every model chunk of this rank (``model_chunks``) under
    ``model``/``model<i>``. The keys written to disk are megatron's global ones (layers by their
    global number), so a checkpoint loads at any pipeline layout, interleaved or not."""
    chunks = [unwrap(chunk) for chunk in model_chunks(model)]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def _load_model_state(model: torch.nn.Module, loaded: dict) -> None:
    chunks = [unwrap(chunk) for chunk in model_chunks(model)]
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded["model" if len(chunks) == 1 else f"model{i}"])


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
         async_queue: AsyncCallsQueue | None = None, known: Known | None = None) -> Path:
    """Write ``root/iter_<step>`` atomically, update ``latest``, prune old ones. All ranks call.

    With ``async_queue`` only the snapshot happens here (host copies, or a fork on CPU): the
    shards are written by a background process, and the rename + ``latest`` update run as the
    request's finalize step once every rank's writer has finished
    (``async_queue.maybe_finalize_async_calls``). Until then the previous checkpoint stays
    ``latest``, so a crash mid-write resumes from it. ``known``: the caller's record of the
    checkpoints it wrote or verified (``_prune``), kept from save to save (``saver.Saver``).
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
    model_sd = model_sharded_state_dict(model)
    sharded = dict(model_sd)
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
            _commit(root, tmp, final, meta, config, keep_last,
                    {} if known is None else known)
        _barrier()

    # Always megatron's async request (its sync save is the same request run in-process), so
    # that the shard writer, forked or not, hashes what it wrote.
    with writer_queue.in_process_results() if async_queue is None else contextlib.nullcontext():
        request = dist_checkpointing.save(sharded, str(tmp),  # wants an empty directory
                                          async_sharded_save=True)
    rng_rel = f"rng/rank_{_rank():05d}.pt"
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), tmp / rng_rel)
    request = manifest.hashing_request(request, tmp, _rank(),
                                       {rng_rel: manifest.file_sum(tmp / rng_rel)})
    request.add_finalize_fn(commit)
    if async_queue is None:
        request.execute_sync()
    else:
        async_queue.schedule_async_request(request)
    return final


def _commit(root: Path, tmp: Path, final: Path, meta: dict, config: dict,
             keep_last: int, known: Known) -> None:
    """Rank 0, after every rank's shards are on disk: record sizes and checksums, rename, point
    ``latest``, prune."""
    (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    files = manifest.collect_sums(tmp, _world())
    shutil.rmtree(tmp / manifest.SUMS_DIR)
    meta = dict(meta, format=manifest.FORMAT, checksum=manifest.ALGO, files=files)
    atomic_write(tmp / "meta.json", json.dumps(meta, indent=1))
    if final.exists():  # a re-save of the same step (e.g. after a restart)
        shutil.rmtree(final)
    os.replace(tmp, final)
    known[final.name] = (True, manifest.stats(final))  # its sums are of what was written
    atomic_write(root / "latest", final.name + "\n")
    _prune(root, keep_last, known)


def _prune(root: Path, keep_last: int, known: Known | None = None) -> None:
    """Keep the newest ``keep_last`` checkpoints that verify; delete the older ones.

    Only checkpoints that verify count, so a damaged one never pushes a good one out. A damaged
    checkpoint newer than the oldest kept one is left in place (not counted, skipped by resume
    with a warning) for inspection: it ages out like any other once ``keep_last`` newer good ones
    exist. Verifying costs a full read of each checkpoint it looks at, but once per job: the
    verdicts in ``known`` (the writer's own checkpoints, those the resume plan verified or
    passed over, those verified here before) stand while the files' ``manifest.stats`` are
    unchanged.
    """
    known = {} if known is None else known
    done = sorted((p for p in root.iterdir() if p.is_dir() and ITER_RE.match(p.name)),
                  reverse=True)
    good = []
    for cand in done:
        if len(good) == keep_last:
            break
        now = manifest.stats_or_none(cand)
        if now is None:  # not counted
            known.pop(cand.name, None)
            continue
        if cand.name not in known or known[cand.name][1] != now:
            try:
                verify(cand)  # checksums: the content_checks policy of the run
                known[cand.name] = (True, now)  # (stats from before: a change meanwhile shows)
            except (CheckpointError, OSError):
                known[cand.name] = (False, now)  # not counted: it keeps more, never fewer
        if known[cand.name][0]:
            good.append(cand)
    if len(good) == keep_last:
        for old in done[done.index(good[-1]) + 1:]:
            known.pop(old.name, None)
            shutil.rmtree(old, ignore_errors=True)
    # Saves commit in step order, so a .tmp_ directory of an earlier step is a write that
    # never finished (a crash or a killed background writer).
    newest = int(ITER_RE.match(done[0].name).group(1)) if done else -1
    for stale in root.glob(".tmp_iter_*"):
        m = ITER_RE.match(stale.name[len(".tmp_"):])
        if m and int(m.group(1)) < newest:
            shutil.rmtree(stale, ignore_errors=True)


def verify(path: Path, checksums: bool | None = None) -> dict:
    """Return meta.json of a complete, undamaged checkpoint, or raise CheckpointError naming the
    checkpoint and the file. Before any other file is parsed, every file is compared with the
    size and checksum meta.json records (``checksums=None``: ``content_checks``, on by default;
    False: sizes only)."""
    path = Path(path)
    m = ITER_RE.match(path.name)
    meta = manifest.read(path, int(m.group(1)) if m else None)
    manifest.check(path, meta, checksums)
    safe_pickle.check_checkpoint(path)  # every pickle, restricted, before megatron reads
    if (path / "config.yaml").exists():  # (legacy checkpoints may lack it)
        saved_config(path)  # a saved config that does not parse is damage: fall back
    return meta


def saved_config(path: Path) -> dict:
    """The resolved config a checkpoint was saved with (a mapping that passed every check of
    the config loader: size, YAML aliases, types, bounds), or CheckpointError."""
    f = Path(path) / "config.yaml"
    try:
        return checked_config_tree(f)
    except ConfigError as e:  # names the file
        raise CheckpointError(f"unreadable saved config: {one_line(e)}") from None


def _read_latest(root: Path, candidates: list[Path]) -> tuple[Path | None, str | None]:
    """The checkpoint ``root/latest`` names, or a problem with it (any content, never raises)."""
    latest = root / "latest"
    if not latest.exists():
        return None, f"{latest} is missing" if candidates else None
    try:
        name = latest.read_bytes()[:200].decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None, f"{latest} is unreadable or not text"
    if not ITER_RE.match(name):
        return None, f"{latest} holds {name[:40]!r}, not a checkpoint name"
    if root / name not in candidates:
        return None, f"{latest} points at {name}, which does not exist"
    return root / name, None


def find_resumable(root: str | Path, checksums: bool | None = None
                   ) -> tuple[Path | None, list[str]]:
    """Newest usable checkpoint under ``root`` (None if there is none) and warnings to print:
    at most one, naming what was skipped (damaged files, a bad ``latest``).

    ``latest``'s target is tried first, then the others newest first; each is verified.
    Raises CheckpointError when checkpoints exist but none is usable. (A job's ranks decide
    together: ``plan.find_shared``.)
    """
    candidates, problems = candidates_of(root)
    for cand in candidates:
        try:
            verify(cand, checksums)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        return cand, fallback_warnings(problems, cand)
    return None, none_usable(root, candidates, problems)


def candidates_of(root: str | Path) -> tuple[list[Path], list[str]]:
    """The checkpoints under ``root`` in the order resume tries them (``latest``'s target, then
    newest first) and the problem with ``latest``, if any."""
    root = Path(root)
    if not root.is_dir():
        return [], []
    candidates = sorted((p for p in root.iterdir() if p.is_dir() and ITER_RE.match(p.name)),
                        reverse=True)
    target, problem = _read_latest(root, candidates)
    if target is not None:
        candidates.remove(target)
        candidates.insert(0, target)
    return candidates, [problem] if problem else []


def fallback_warnings(problems: list[str], chosen: Path) -> list[str]:
    """The one warning of a resume that passed over unusable checkpoints (none: [])."""
    if not problems:
        return []
    return [f"skipping unusable: {'; '.join(problems)}; resuming from {chosen.name}"]


def none_usable(root: str | Path, candidates: list[Path], problems: list[str]) -> list[str]:
    """When no candidate verified: CheckpointError if there were any, else the problems."""
    if candidates:
        raise CheckpointError(f"no usable checkpoint in {root}: {'; '.join(problems)}")
    return problems


def load(path: Path, meta: dict, model, optimizer, layout: dict
         ) -> tuple[TrainState, list[str]]:
    """Resume model (+ optimizer, RNG) from checkpoint ``path``, verified by the job with
    ``meta`` its manifest (``plan.ResumePlan``); returns state and warnings.

    The optimizer format (fully reshardable or not) is the one recorded in meta.json."""
    path = Path(path)
    warnings = []
    model_sd = model_sharded_state_dict(model)
    sharded = dict(model_sd)
    same_layout = meta["layout"] == layout
    if optimizer is not None and meta.get("has_optimizer"):
        saved_dist = meta["layout"].get("distributed_optimizer")
        if saved_dist is not None and saved_dist != layout.get("distributed_optimizer"):
            # megatron's distributed and plain optimizers keep different state dicts (param
            # groups, main-param shards): loading one into the other fails deep in megatron
            raise CheckpointError(
                f"{path}: optimizer state was saved with parallel.distributed_optimizer="
                f"{str(saved_dist).lower()} and cannot be loaded into this run's "
                f"{str(layout.get('distributed_optimizer')).lower()}; resume with "
                f"--set parallel.distributed_optimizer={str(saved_dist).lower()}, or start "
                f"from its weights with checkpoint.load")
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
    _load_model_state(model, loaded)
    if "optimizer" in loaded:
        optimizer.load_state_dict(loaded["optimizer"])
    rng_file = path / "rng" / f"rank_{_rank():05d}.pt"
    if same_layout and rng_file.is_file():
        _set_rng_state(safe_pickle.load_torch_file(rng_file, str(rng_file)))
    else:
        warnings.append("parallel layout changed: RNG states not restored")
    state = TrainState(meta["step"], meta["consumed_samples"], meta["consumed_tokens"],
                       meta["skipped_steps"], meta["scheduler"])
    return state, warnings


def load_weights(path: str | Path, model) -> None:
    """Initial weights only (``checkpoint.load``) from checkpoint ``path``, verified by the job
    (``plan.load_weights`` finds and verifies it)."""
    loaded = dist_checkpointing.load(model_sharded_state_dict(model), str(path))
    _load_model_state(model, loaded)
