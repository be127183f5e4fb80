"""The one decision a job makes about the checkpoint it starts from: ``ResumePlan``.

``make_plan`` is called once by every rank of a job (or by the only process, before any process
group exists) and returns the same plan everywhere: resume ``checkpoint.save``'s newest usable
checkpoint, load ``checkpoint.load``'s weights, start fresh, or stop (the run is complete). The
loaders (``store.load``, ``store.load_weights``) take the plan's path and verified manifest and
check nothing again. Deciding once is also what makes it cheap on many ranks:

- rank 0 reads ``meta.json`` and compares file sizes (one ``stat`` per file);
- every rank hashes its ``manifest.share`` of the files (about 1/world of the bytes), and the
  ranks agree on the verdict: the first damaged file in name order, the same line everywhere;
- rank 0 alone unpickles, restricted, every pickle (``safe_pickle.check_checkpoint``: once per
  job, not once per rank) and parses the saved config;
- rank 0 compares the saved config with the run's (``resume_check``).

Each step's verdict is broadcast as plain data, so a problem found on any rank is a
``CheckpointError`` with the same one line on every rank. A candidate that fails any step is
passed over, as ``store.find_resumable`` does, with the same warning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megatron_ext.checkpoint import manifest, resume_check, safe_pickle, store
from megatron_ext.checkpoint.store import CheckpointError, Known
from megatron_ext.config.schema import Config
from megatron_ext.platform.cli import warned

FRESH, RESUME, LOAD, COMPLETE = "fresh", "resume", "load", "complete"


@dataclass
class ResumePlan:
    """What the job starts from. ``action``: ``fresh``, ``resume`` (``path`` is a checkpoint of
    ``checkpoint.save``), ``load`` (initial weights from ``path``) or ``complete`` (``message``
    says the run is finished; nothing to do). ``meta``: the path's verified manifest;
    ``warnings``: the lines rank 0 prints (checkpoints passed over, allowed config changes);
    ``verified``: on rank 0, the verdicts on ``checkpoint.save``'s checkpoints it reached, for
    the writer's pruning (``store.Known``: not hashed again while unchanged)."""

    action: str = FRESH
    path: str | None = None
    meta: dict | None = None
    warnings: list[str] = field(default_factory=list)
    message: str | None = None
    verified: Known = field(default_factory=dict)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def on_rank0(fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0 only; every rank returns its (picklable) result or raises its
    CheckpointError with the same message (a rank that alone raised would leave the others
    waiting in a collective)."""
    if _world() == 1:
        return fn()
    box: list = [None]
    if _rank() == 0:
        try:
            box[0] = ("ok", fn())
        except CheckpointError as e:
            box[0] = ("error", str(e))
        except OSError as e:  # e.g. a directory it may not list: the same line everywhere
            box[0] = ("error", f"{e.filename or 'checkpoint'}: {e.strerror or e}")
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise CheckpointError(value)
    return value


def _structure(path: Path, checksums: bool) -> dict:
    """Rank 0: the schema-checked manifest; every file present with its recorded size."""
    m = store.ITER_RE.match(path.name)
    meta = manifest.read(path, int(m.group(1)) if m else None)
    manifest.check_sizes(path, meta)
    manifest.announce(path, meta, checksums)
    return meta


def _content_verdict(path: Path, meta: dict, checksums: bool) -> str | None:
    """Every rank hashes its share; all return the same problem line (the first damaged file
    in name order), or None."""
    problem = None
    if checksums and "format" in meta:
        found = manifest.content_problem(path, meta, manifest.share(meta, _rank(), _world()))
        if found is not None:
            problem = (found[0], found[1])
    if _world() > 1:
        every: list = [None] * _world()
        dist.all_gather_object(every, problem)
        found_by = [p for p in every if p is not None]
        problem = min(found_by) if found_by else None
    return None if problem is None else problem[1]


def _parse(path: Path) -> None:
    """Rank 0: every pickle read restricted, the saved config parsed (damage if it fails)."""
    safe_pickle.check_checkpoint(path)
    if (path / "config.yaml").exists():  # (legacy checkpoints may lack it)
        store.saved_config(path)


def verify_shared(path: str | Path, checksums: bool, seen: Known | None = None) -> dict:
    """``store.verify`` done by the job together (see the module docstring); returns the
    manifest on every rank, or raises the same CheckpointError on every rank. ``seen``: where
    rank 0 records the verdict (``store.Known``, by name)."""
    path = Path(path)
    before: list[dict | None] = [None]

    def structure() -> dict:
        if seen is not None:  # before any byte is read: a change meanwhile shows in pruning
            before[0] = manifest.stats_or_none(path)
        return _structure(path, checksums)

    try:
        meta = on_rank0(structure)
        problem = _content_verdict(path, meta, checksums)
        if problem is not None:
            raise CheckpointError(problem)
        on_rank0(lambda: _parse(path))
    except CheckpointError:
        if before[0] is not None:
            seen[path.name] = (False, before[0])
        raise
    if before[0] is not None:
        seen[path.name] = (True, before[0])
    return meta


def find_shared(root: str | Path, checksums: bool, seen: Known | None = None
                ) -> tuple[Path | None, dict | None, list[str]]:
    """``store.find_resumable`` decided by the job together: (checkpoint, its manifest,
    warnings), the same on every rank; ``seen``: as ``verify_shared``'s."""
    candidates, problems = on_rank0(lambda: store.candidates_of(root))
    for cand in candidates:
        try:
            meta = verify_shared(cand, checksums, seen)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        return cand, meta, store.fallback_warnings(problems, cand)
    return None, None, store.none_usable(root, candidates, problems)


def resolve_load(path: str | Path, checksums: bool) -> tuple[Path, dict, list[str]]:
    """``checkpoint.load``'s checkpoint: a checkpoint directory, or a save root whose newest
    usable one is taken (a fallback past a damaged one warns)."""
    path = Path(path)
    if on_rank0(lambda: (path / "latest").is_file() or not (path / "meta.json").exists()):
        found, meta, warnings = find_shared(path, checksums)
        if found is None:
            raise CheckpointError(f"{path}: no checkpoint found")
        return found, meta, warnings
    return path, verify_shared(path, checksums), []


def make_plan(cfg: Config, total_steps: int) -> ResumePlan:
    """The job's plan for ``cfg``, a run of ``total_steps`` (``Derived.total_steps``; every rank
    calls it; see the module docstring). Raises
    CheckpointError, the same on every rank, when the checkpoints are unusable or the config
    may not resume or load them."""
    ck, checksums = cfg.checkpoint, cfg.checkpoint.verify_checksums
    seen: Known = {}
    if ck.save:
        path, meta, warnings = find_shared(ck.save, checksums, seen)
        if path is not None:
            def decide() -> tuple[list[str], str | None]:
                changes = resume_check.check_resume(path, cfg)
                return changes, resume_check.complete_message(path, total_steps, meta)

            changes, message = on_rank0(decide)
            return ResumePlan(COMPLETE if message else RESUME, str(path), meta,
                              warnings + changes, message, seen)
        if not ck.load:
            return ResumePlan(warnings=warnings, verified=seen)
    if ck.load:
        path, meta, warnings = resolve_load(ck.load, checksums)

        def shapes() -> None:
            problem = resume_check.shape_problem(path, cfg)
            if problem is not None:
                raise CheckpointError(problem)

        on_rank0(shapes)
        return ResumePlan(LOAD, str(path), meta, warnings)
    return ResumePlan()


def load_weights(path: str | Path, model, checksums: bool | None = None) -> Path:
    """Verify (``resolve_load``, the job together) and load initial weights from ``path``, a
    checkpoint or a save root; the fallback warning, if any, printed once. For tools that load
    weights outside a training plan. ``checksums=None``: ``manifest.content_checks``."""
    policy = manifest.content_policy() if checksums is None else checksums
    found, _, warnings = resolve_load(path, policy)
    warned((found, warnings))
    store.load_weights(found, model)
    return found

