"""Content checksums of checkpoint files: computed at save by the process that wrote each file,
recorded in ``iter_N/meta.json``, and checked before a checkpoint is read.

At save every rank hashes what it wrote (its ``__<rank>_<n>.distcp`` shards, inside the async
writer when the save is asynchronous, and its ``rng/rank_<r>.pt``) into ``.sums/rank_<r>.json``
in the temporary directory; rank 0 merges those at commit, hashes the coordinator's files
(``.metadata``, ``common.pt``, ``metadata.json``, ``config.yaml``) and writes the manifest.

``check`` costs a full read of the checkpoint (xxh3-128, ~GB/s per core, see
docs/benchmarks.md); a job verifies the checkpoint it starts from once, each rank hashing its
``share`` (``checkpoint.plan``), and the training loop's writer remembers the checkpoints it
wrote and the plan's verdicts (``stats``), so pruning does not re-read them; a tool loads the
checkpoint it verified without verifying it again (``load_model.Verified``).
``content_checks(False)`` (``checkpoint.verify_checksums: false``, converters'
``--no-verify-checksums``) checks sizes only.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch.distributed as dist
import xxhash

from megatron_ext.config.fields import LR_MAX, STEPS_MAX, Range, clip, short_repr
from megatron_ext.errors import UserError
from megatron_ext.platform.fs import atomic_write

ALGO = "xxh3_128"
FORMAT = 2
SUMS_DIR = ".sums"
COORDINATOR_FILES = (".metadata", "common.pt", "metadata.json", "config.yaml")
_HEX = re.compile(r"^[0-9a-f]{32}$")
_CHUNK = 8 << 20
# The counters a resume continues from, bounded like the config tree's fields (a step count
# past 2^53 is no longer exact in the LR schedule's float math); a batch holds at most 2^24
# samples (train.global_batch_size) of at most 2^22 tokens (data.seq_length).
COUNTERS = {"step": Range(0, STEPS_MAX), "consumed_samples": Range(0, STEPS_MAX),
            "consumed_tokens": Range(0, 2**63 - 1), "skipped_steps": Range(0, STEPS_MAX)}
# megatron's OptimizerParamScheduler.state_dict: its numbers, bounded as the schema bounds the
# fields they come from (optimizer.lr / min_lr / weight_decay, schedule.*_steps).
SCHEDULER = {"num_steps": Range(0, STEPS_MAX), "lr_warmup_steps": Range(0, STEPS_MAX),
             "lr_decay_steps": Range(0, STEPS_MAX), "wd_incr_steps": Range(0, STEPS_MAX),
             "max_lr": Range(0, LR_MAX), "min_lr": Range(0, LR_MAX),
             "start_wd": Range(0, 10), "end_wd": Range(0, 10)}
SCHEDULER_NAMES = ("lr_decay_style", "wd_incr_style")

# The converters' policy (``--no-verify-checksums``) for the verifies of a block; training
# passes ``checkpoint.verify_checksums`` explicitly (``checkpoint.plan``).
_content = contextvars.ContextVar("checkpoint_content_checks", default=True)
_noticed: set[str] = set()  # warnings already printed: one each per process


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be used or written; the message says which and why."""


# --- hashing ------------------------------------------------------------------------------------
def file_sum(path: Path) -> dict[str, Any]:
    """``{"size": bytes, "xxh3_128": hex}`` of one file, read in 8 MiB chunks (the size is what
    was read, so a file that changes meanwhile cannot pass with a stale ``stat``)."""
    h, size = xxhash.xxh3_128(), 0
    buf = bytearray(_CHUNK)  # reused: no allocation per chunk
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return {"size": size, ALGO: h.hexdigest()}


def _write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=1))


def write_rank_sums(tmp: Path, rank: int, sums: dict[str, dict]) -> None:
    (tmp / SUMS_DIR).mkdir(exist_ok=True)
    _write_json(tmp / SUMS_DIR / f"rank_{rank:05d}.json", sums)


def hashing_request(request, tmp: Path, rank: int, own: dict[str, dict]):
    """megatron's ``AsyncRequest`` whose writer also hashes the shards it wrote (plus ``own``,
    sums of this rank's other files) into ``.sums/rank_<r>.json``.

    Upstream coupling (megatron-core 0.16.1, ``FileSystemWriterAsync.get_save_function_and_args``):
    ``async_fn(rank, write_buckets, results_queue)`` with buckets ``(abs path, name, data)``;
    ``AsyncRequest.execute_sync`` runs the same function in-process for synchronous saves, the
    async queue in a forked writer. A rank with nothing to write gets no ``async_fn``.
    """
    inner = request.async_fn
    if inner is None:
        write_rank_sums(tmp, rank, own)
        return request

    def write_then_hash(*args, **kwargs):
        inner(*args, **kwargs)
        buckets = args[1]
        sums = dict(own)
        try:
            for bucket in buckets:
                written = Path(bucket[0])
                if written.is_file():  # a failed write is reported by megatron's finalize
                    sums[written.name] = file_sum(written)
            write_rank_sums(tmp, rank, sums)
        except OSError as e:  # commit then reports this rank's sums as missing
            print(f"WARNING: rank {rank}: could not record checkpoint checksums: {e}",
                  file=sys.stderr, flush=True)

    return request._replace(async_fn=write_then_hash)


def collect_sums(tmp: Path, world_size: int) -> dict[str, dict]:
    """Rank 0 at commit: every rank's recorded sums, plus sums of the files no rank recorded
    (the coordinator's: .metadata, common.pt, metadata.json, config.yaml)."""
    files: dict[str, dict] = {}
    for r in range(world_size):
        sums_file = tmp / SUMS_DIR / f"rank_{r:05d}.json"
        try:
            files.update(json.loads(sums_file.read_text()))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{tmp}: rank {r}'s writer recorded no checksums "
                                  f"({type(e).__name__})") from None
    for p in sorted(tmp.rglob("*")):
        rel = p.relative_to(tmp).as_posix()
        if p.is_file() and rel not in files and not rel.startswith(SUMS_DIR + "/"):
            files[rel] = file_sum(p)
    return dict(sorted(files.items()))


# --- policy and notices -----------------------------------------------------------------------
@contextlib.contextmanager
def content_checks(enabled: bool) -> Iterator[None]:
    """Within the block, ``check`` compares checksums (True) or sizes only (False)."""
    token = _content.set(bool(enabled))
    try:
        yield
    finally:
        _content.reset(token)


def content_policy() -> bool:
    """Whether checksums are compared here (``content_checks``; on by default)."""
    return _content.get()


def notice(key: str, msg: str) -> None:
    """One ``WARNING:`` line on stderr, once per process and ``key``, from rank 0 (the checkpoint
    layer sits below ``training.loggers``; same format)."""
    if key in _noticed or (dist.is_initialized() and dist.get_rank() != 0):
        return
    _noticed.add(key)
    print(f"WARNING: {msg}", file=sys.stderr, flush=True)


# --- reading and checking -----------------------------------------------------------------------
# A manifest holds an entry of ~120 bytes per file: 64 MiB is half a million files, past any
# checkpoint's; a larger meta.json is damage (and is never read into memory whole).
MAX_META_BYTES = 64 << 20


def read(path: Path, step: int | None) -> dict:
    """meta.json of checkpoint ``path``, schema-checked; ``step``: the one its name says."""
    meta_file = path / "meta.json"
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    if not meta_file.is_file():
        raise CheckpointError(f"{path}: meta.json missing (incomplete save)")
    try:
        with open(meta_file, "rb") as f:
            raw = f.read(MAX_META_BYTES + 1)
        if len(raw) > MAX_META_BYTES:
            raise CheckpointError(f"{path}: meta.json is corrupt (larger than "
                                  f"{MAX_META_BYTES >> 20} MiB)")
        meta = json.loads(raw)
    except (OSError, ValueError, RecursionError) as e:  # invalid JSON or UTF-8, too deep
        raise CheckpointError(f"{path}: meta.json is corrupt ({type(e).__name__})") from None
    problem = _schema_problem(meta)
    if problem:
        raise CheckpointError(f"{path}: meta.json is corrupt ({problem})")
    if step is not None and meta["step"] != step:
        raise CheckpointError(f"{path}: meta.json records step {meta['step']}, the directory "
                              f"name says {step}")
    problem = _counts_problem(meta)
    if problem:
        raise CheckpointError(f"{path}: meta.json is corrupt ({problem})")
    return meta


def _is_int(v: Any, minimum: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _schema_problem(meta: Any) -> str | None:
    if not isinstance(meta, dict):
        return f"a JSON {type(meta).__name__}, not an object"
    for key, bounds in COUNTERS.items():
        if not _is_int(meta.get(key), minimum=-2**63):
            return f"{key} is {short_repr(meta.get(key))}, not an integer"
        why = bounds.problem(meta[key])
        if why:
            return f"{key} {why}"
    for key, kind in (("scheduler", dict), ("layout", dict), ("files", dict),
                      ("has_optimizer", bool), ("optimizer_fully_reshardable", bool)):
        if not isinstance(meta.get(key), kind):
            return f"{key} is missing or not a {kind.__name__}"
    problem = _scheduler_problem(meta["scheduler"])
    if problem:
        return problem
    world = meta["layout"].get("world_size")
    if not _is_int(world, 1) or world > len(meta["files"]):  # one rng file per rank at least
        return f"layout.world_size is {short_repr(world)} for {len(meta['files'])} files"
    legacy = "format" not in meta
    if not legacy and (meta["format"] != FORMAT or meta.get("checksum") != ALGO):
        return (f"format {short_repr(meta['format'])} / checksum "
                f"{short_repr(meta.get('checksum'))} not supported")
    for rel, entry in meta["files"].items():
        if rel.startswith("/") or ".." in rel.split("/") or rel == "meta.json":
            return f"file name {short_repr(rel)} not allowed"
        ok = (_is_int(entry) if legacy else isinstance(entry, dict) and _is_int(
            entry.get("size")) and isinstance(entry.get(ALGO), str) and _HEX.match(entry[ALGO]))
        if not ok:
            return f"entry of {clip(rel)} is {short_repr(entry)}"
    return None


def _scheduler_problem(sched: dict) -> str | None:
    """The LR schedule's state resumes as is: its step count and rates must be in bounds (a
    negative ``num_steps`` would train at a negative learning rate)."""
    for key, value in sched.items():
        name = f"scheduler.{clip(str(key))}"
        if key in SCHEDULER:
            if not Range.applies(value):
                return f"{name} is {short_repr(value)}, not a number"
            why = SCHEDULER[key].problem(value)
            if why:
                return f"{name} {why}"
        elif key in SCHEDULER_NAMES:
            if not isinstance(value, str) or len(value) > 40:
                return f"{name} is {short_repr(value)}, not a schedule name"
        else:
            return f"{name} is not a field of the LR schedule"
    return None


def _counts_problem(meta: dict) -> str | None:
    """Counters that contradict each other: one schedule step per applied optimizer step."""
    step, sched = meta["step"], meta["scheduler"]
    if meta["skipped_steps"] > step:
        return f"skipped_steps {meta['skipped_steps']} exceeds step {step}"
    if sched.get("num_steps", 0) > step:
        return f"scheduler.num_steps {sched['num_steps']} exceeds step {step}"
    return None


def required_files(meta: dict) -> list[str]:
    rng = [f"rng/rank_{r:05d}.pt" for r in range(meta["layout"]["world_size"])]
    legacy = ["config.yaml"] if "format" not in meta else []  # written after the size record
    return [*COORDINATOR_FILES[:2], *([] if legacy else ["config.yaml"]), *rng]


def check(path: Path, meta: dict, checksums: bool | None = None) -> None:
    """Raise CheckpointError naming the first file that is missing, unrecorded, of the wrong
    size or (with checksums) of the wrong content. ``checksums=None``: ``content_checks``."""
    content = _content.get() if checksums is None else checksums
    check_sizes(path, meta)
    if content and "format" in meta:
        problem = content_problem(path, meta, sorted(meta["files"]))
        if problem is not None:
            raise CheckpointError(problem[1])
    announce(path, meta, content)


def check_sizes(path: Path, meta: dict) -> None:
    """Every recorded file present with its recorded size, no file unrecorded (one ``stat``
    per file: what every candidate costs before its content is read)."""
    legacy = "format" not in meta
    files = meta["files"]
    for rel in required_files(meta):
        if rel not in files and not (legacy and rel == "config.yaml"):
            raise CheckpointError(f"{path}: {rel} is not recorded in meta.json")
    try:
        sizes = _sizes(path)
    except OSError as e:  # e.g. an unreadable subdirectory
        raise CheckpointError(f"{path}: cannot list its files ({e.strerror})") from None
    extra = sorted(set(sizes) - set(files) - {"meta.json"} - ({"config.yaml"} if legacy else set()))
    if extra:
        raise CheckpointError(f"{path}: unrecorded file {extra[0]} (not written by this save)")
    for rel, entry in files.items():
        if rel not in sizes:
            raise CheckpointError(f"{path}: missing file {rel}")
        size = entry if isinstance(entry, int) else entry["size"]
        if sizes[rel] != size:
            raise CheckpointError(f"{path}: {rel} has {sizes[rel]} bytes, expected {size} "
                                  f"(truncated or damaged)")


def content_problem(path: Path, meta: dict, names: list[str]) -> tuple[str, str] | None:
    """(file, line) for the first of ``names`` whose content does not match its checksum (or
    cannot be read), else None. Sizes are ``check_sizes``'."""
    for rel in names:
        try:
            got = file_sum(path / rel)
        except OSError as e:
            return rel, f"{path}: {rel} cannot be read ({e.strerror})"
        if got[ALGO] != meta["files"][rel][ALGO]:
            return rel, f"{path}: {rel} does not match its checksum (damaged)"
    return None


def share(meta: dict, rank: int, world: int) -> list[str]:
    """The files ``rank`` of ``world`` hashes when a job verifies a checkpoint together: the
    largest first, each to the rank with the fewest bytes so far (ties: the lowest rank), so
    every rank reads about 1/world of the checkpoint. The same on every rank (meta.json's
    sizes only)."""
    load, mine = [0] * world, []
    for rel, entry in sorted(meta["files"].items(), key=lambda kv: (-kv[1]["size"], kv[0])):
        owner = load.index(min(load))
        load[owner] += entry["size"]
        if owner == rank:
            mine.append(rel)
    return sorted(mine)


def announce(path: Path, meta: dict, content: bool) -> None:
    """The one warning of a checkpoint whose content was not verified."""
    if "format" not in meta:
        notice("legacy", f"{path}: written before checkpoint checksums; file sizes checked, "
                         f"content not verified")
    elif not content:
        notice("off", "checkpoint.verify_checksums is off: checkpoint file sizes are checked, "
                      "their content is not verified")


def _sizes(path: Path) -> dict[str, int]:
    return {p.relative_to(path).as_posix(): p.stat().st_size
            for p in path.rglob("*") if p.is_file()}


def stats_or_none(path: Path) -> dict[str, tuple] | None:
    """``stats``, or None where a file cannot be listed (the verification that follows says
    what is wrong; nothing is known of it)."""
    try:
        return stats(path)
    except OSError:
        return None


def stats(path: Path) -> dict[str, tuple]:
    """(size, inode, mtime, ctime) of every file under ``path``, by relative name: what a
    writer compares to know a checkpoint it verified is unchanged (``store._prune``)."""
    out = {}
    for p in path.rglob("*"):
        if p.is_file():
            st = p.stat()
            out[p.relative_to(path).as_posix()] = (st.st_size, st.st_ino, st.st_mtime_ns,
                                                   st.st_ctime_ns)
    return out
