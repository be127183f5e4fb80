"""Reading a checkpoint never runs code: every pickle in a dist checkpoint is read restricted.

A torch_dist checkpoint holds four kinds of pickles, and upstream reads two of them with full
``pickle`` (any global, any callable: a doctored file runs code on load):

- ``.metadata``: torch's ``FileSystemReader.read_metadata`` does ``pickle.load``. Read here by
  ``_MetadataUnpickler``: an exact allow-list of the classes torch_dist stores there (listed in
  ``METADATA_GLOBALS``, found by listing the GLOBALs of real checkpoints of our models: sync and
  async saves, with and without optimizer, EP=1 and EP=2, fp32 and bf16), then a type check of
  the tree, so a well-formed pickle of the wrong shape is refused too, not a traceback later.
- sharded objects (``_extra_state`` of every linear layer) inside ``__*_*.distcp``: megatron's
  planner inherits torch's ``DefaultLoadPlanner.load_bytes``, ``torch.load(weights_only=False)``.
- ``common.pt`` (optimizer param groups, step): megatron's ``torch.load`` without
  ``weights_only``, which ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` turns into full pickle.
- ``rng/rank_*.pt``: ours, already ``weights_only=True``.

The last three are torch files: ``load_torch_file`` reads them with ``weights_only=True``
(torch's restricted unpickler: tensors, containers, primitives and the classes megatron-core
registers in ``megatron.core.safe_globals``). A non-empty ``_extra_state`` is refused as well:
it is FP8 state, which Transformer Engine and megatron decode with plain ``pickle.loads``, and
this project never trains in FP8.

Two entry points, so no caller has to remember anything:
- ``check_checkpoint(path)``, called by ``store.verify`` (every resume candidate,
  ``checkpoint.load``, the converters and the routing tool go through it): reads all of the
  above, restricted, before megatron opens anything; a refusal is a ``CheckpointError`` naming
  the file and the object, so resume falls back to an older checkpoint and the tools exit 2
  with one line.
- ``install()``, run when this module is imported (``store`` imports it): megatron's own reads
  go through the same restricted readers. Upstream functions replaced, megatron-core 0.16.1
  (checked: another version fails loudly at import) with torch 2.13's checkpoint reader:
  ``strategies.torch._get_filesystem_reader`` and its ``FileSystemReader`` /
  ``CachedMetadataFileSystemReader`` names; ``MCoreLoadPlanner.load_bytes`` (torch's
  ``DefaultLoadPlanner.load_bytes``); ``TorchCommonLoadStrategy.load_common`` and
  ``.load_sharded_objects`` (the latter only serves strategies that cannot store objects; our
  torch_dist can, so it is refused). The multi-storage client (object stores) is refused too.
"""

from __future__ import annotations

import _compat_pickle  # the stdlib's table of Python 2 -> 3 pickle names
import io
import json
import pickle
import re
from pathlib import Path
from typing import Any, BinaryIO

import megatron.core
import torch
from megatron.core.dist_checkpointing.strategies import common as mcore_common
from megatron.core.dist_checkpointing.strategies import torch as mcore_torch
from megatron.core.msc_utils import MultiStorageClientFeature
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import default_planner as torch_planner
from torch.distributed.checkpoint import metadata as dcp_md
from torch.distributed.checkpoint.filesystem import _StorageInfo

from megatron_ext.checkpoint.manifest import CheckpointError
from megatron_ext.platform.patches import TESTED_VERSIONS

DTYPES = tuple(n for n, v in vars(torch).items() if isinstance(v, torch.dtype))
METADATA_GLOBALS: dict[str, tuple[str, ...]] = {
    "torch.distributed.checkpoint.metadata": (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"),
    "torch.distributed.checkpoint.filesystem": ("_StorageInfo",),
    # megatron keeps every rank's save plan (``all_local_plans``) to reuse it on the next save.
    "torch.distributed.checkpoint.planner": (
        "SavePlan", "WriteItem", "TensorWriteData", "WriteItemType"),
    "torch": ("Size", *DTYPES),            # tensor shapes and dtypes (a dtype is not callable)
    "torch.serialization": ("_get_layout",),  # torch.layout's reducer: a name -> layout lookup
}
COMMON_FILE = "common.pt"
METADATA_FILE = ".metadata"
Source = str | Path | BinaryIO


def _resolve(module: str, name: str) -> Any:
    return getattr(__import__(module, fromlist=[name]), name)


# Resolved once: find_class is a dict lookup, never an import or a getattr chain.
_ALLOWED = {(m, n): _resolve(m, n) for m, names in METADATA_GLOBALS.items() for n in names}


class _MetadataUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only the ``METADATA_GLOBALS``. Callables can reach
    the stack only through ``find_class`` (GLOBAL, STACK_GLOBAL and the copyreg EXT opcodes all
    call it), so REDUCE / NEWOBJ / BUILD can only build allowed classes."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused(f"persistent id {str(pid)[:60]!r}")


class _Refused(pickle.UnpicklingError):
    """A disallowed global inside a pickle (the name is the message)."""


def read_metadata_file(path: Path) -> dcp_md.Metadata:
    """The torch_dist ``.metadata`` at ``path``, unpickled restricted and type-checked;
    CheckpointError naming the file otherwise."""
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except _Refused as e:
        raise CheckpointError(f"{path}: refusing to unpickle {e} (not a checkpoint metadata "
                              "class)") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror})") from None
    except Exception as e:  # any parse failure of untrusted bytes: damaged, not ours
        raise CheckpointError(f"{path}: not a valid checkpoint metadata file "
                              f"({type(e).__name__})") from None
    problem = _metadata_problem(md)
    if problem:
        raise CheckpointError(f"{path}: not a valid checkpoint metadata file ({problem})")
    return md


def _is_shape(v: Any) -> bool:
    return isinstance(v, torch.Size) and all(isinstance(x, int) and x >= 0 for x in v)


def _tensor_problem(key: str, tm: dcp_md.TensorStorageMetadata) -> str | None:
    props = tm.properties
    if not (isinstance(props, dcp_md.TensorProperties) and isinstance(props.dtype, torch.dtype)
            and _is_shape(tm.size) and isinstance(tm.chunks, list)):
        return f"tensor entry {key[:80]}"
    for c in tm.chunks:
        if not (isinstance(c, dcp_md.ChunkStorageMetadata) and _is_shape(c.offsets)
                and _is_shape(c.sizes) and len(c.offsets) == len(c.sizes) == len(tm.size)):
            return f"chunk of {key[:80]}"
    return None


def _storage_problem(index: Any, info: Any) -> str | None:
    if not (isinstance(index, dcp_md.MetadataIndex) and isinstance(index.fqn, str)
            and isinstance(info, _StorageInfo)):
        return "storage entry"
    rel = info.relative_path
    # A bare file name: the reader joins it to the checkpoint directory.
    if not (isinstance(rel, str) and rel and "/" not in rel and "\\" not in rel
            and not rel.startswith(".")):
        return f"storage file name {str(rel)[:80]!r}"
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
               for v in (info.offset, info.length)):
        return f"storage range of {index.fqn[:80]}"
    descriptors = info.transform_descriptors
    if not (descriptors is None or (isinstance(descriptors, (list, tuple))
                                    and all(isinstance(d, str) for d in descriptors))):
        return f"transforms of {index.fqn[:80]}"
    return None


def _metadata_problem(md: Any) -> str | None:
    """What is wrong with an unpickled ``.metadata`` tree (None: it has torch_dist's shape)."""
    if not isinstance(md, dcp_md.Metadata):
        return f"a {type(md).__name__}, not a Metadata"
    if not isinstance(md.state_dict_metadata, dict) or not isinstance(md.storage_data, dict):
        return "state_dict_metadata / storage_data are not dicts"
    for key, entry in md.state_dict_metadata.items():
        if not isinstance(key, str):
            return "a non-string key"
        if isinstance(entry, dcp_md.TensorStorageMetadata):
            problem = _tensor_problem(key, entry)
            if problem:
                return problem
        elif not isinstance(entry, dcp_md.BytesStorageMetadata):
            return f"entry {key[:80]} is a {type(entry).__name__}"
    for index, info in md.storage_data.items():
        problem = _storage_problem(index, info)
        if problem:
            return problem
    if not (md.planner_data is None or isinstance(md.planner_data, dict)):
        return "planner_data is not a dict"
    if not (getattr(md, "storage_meta", None) is None
            or isinstance(md.storage_meta, dcp_md.StorageMeta)):
        return "storage_meta is not a StorageMeta"
    return None


def _py3_name(raw: str) -> str:
    """The Python 3 name of a global as torch's refusal quotes it: torch.save pickles with
    protocol 2, whose stream holds Python 2 names (``commands.Popen``, bare ``eval``)."""
    module, _, name = raw.rpartition(".")
    module = module or "__builtin__"
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"


def load_torch_file(source: Source, what: str) -> Any:
    """``torch.load(weights_only=True)`` (explicit: no environment variable can relax it) onto
    the CPU; CheckpointError naming ``what`` and the refused object otherwise."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL ([\w.]+)", str(e))
        if m:
            raise CheckpointError(f"{what}: refusing to unpickle {_py3_name(m.group(1))} (not "
                                  "a tensor or plain-data object)") from None
        raise CheckpointError(f"{what}: refused by the restricted unpickler "
                              f"({' '.join(str(e).split())[:160]})") from None
    except FileNotFoundError:
        raise CheckpointError(f"{what}: missing") from None
    except Exception as e:  # any parse failure of untrusted bytes: damaged, not ours
        raise CheckpointError(f"{what}: not a readable torch file ({type(e).__name__})") from None


def check_sharded_object(fqn: str, obj: Any, what: str) -> None:
    """Refuse ``_extra_state`` that something downstream would unpickle unrestricted: FP8
    state (a non-empty byte tensor, or a BytesIO from Transformer Engine < 2)."""
    if "_extra_state" not in fqn:
        return
    for item in obj if isinstance(obj, list) else [obj]:
        if item is None or (isinstance(item, torch.Tensor) and item.numel() == 0):
            continue
        raise CheckpointError(f"{what}: {fqn} holds a {type(item).__name__} of FP8 extra "
                              "state, which would be unpickled unrestricted; this project never "
                              "writes one")


def _check_objects(path: Path, md: dcp_md.Metadata) -> None:
    """Every sharded object stored in the ``.distcp`` files, read as megatron would (restricted)."""
    for index, info in md.storage_data.items():
        if not isinstance(md.state_dict_metadata.get(index.fqn), dcp_md.BytesStorageMetadata):
            continue
        what = f"{path / info.relative_path} (object {index.fqn[:80]})"
        if info.transform_descriptors:
            raise CheckpointError(f"{what}: stored with transforms "
                                  f"{list(info.transform_descriptors)}, which this project "
                                  "never writes")
        try:
            with open(path / info.relative_path, "rb") as f:
                f.seek(info.offset)
                data = f.read(info.length)
        except OSError as e:
            raise CheckpointError(f"{what}: cannot be read ({e.strerror})") from None
        if len(data) != info.length:
            raise CheckpointError(f"{what}: the file ends before the object")
        check_sharded_object(index.fqn, load_torch_file(io.BytesIO(data), what), what)


def _check_backends(path: Path) -> None:
    """megatron picks its load strategies from ``metadata.json``: only torch_dist + torch."""
    f = path / "metadata.json"
    try:
        config = json.loads(f.read_bytes())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f}: unreadable or not JSON ({type(e).__name__})") from None
    backends = (config.get("sharded_backend"), config.get("common_backend")) if isinstance(
        config, dict) else None
    if backends != ("torch_dist", "torch"):
        raise CheckpointError(f"{f}: backends {backends} are not torch_dist + torch, the only "
                              "format this project writes and reads")


def check_checkpoint(path: str | Path) -> None:
    """Read every pickle of the checkpoint directory ``path`` restricted (see the module
    docstring); raise CheckpointError naming the file if anything is refused or malformed."""
    path = Path(path)
    _check_backends(path)
    md = read_metadata_file(path / METADATA_FILE)
    for info in md.storage_data.values():
        if not (path / info.relative_path).is_file():
            raise CheckpointError(f"{path / METADATA_FILE}: names {info.relative_path}, which "
                                  "does not exist")
    _check_objects(path, md)
    load_torch_file(path / COMMON_FILE, str(path / COMMON_FILE))
    for rng in sorted((path / "rng").glob("*.pt")):
        load_torch_file(rng, str(rng))


# --- megatron-core's read path ------------------------------------------------------------------
class RestrictedReader(FileSystemReader):
    """torch's ``FileSystemReader`` whose ``read_metadata`` is ``read_metadata_file``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_md.Metadata:
        rank = kwargs.get("rank")
        name = METADATA_FILE if rank is None else f"__{rank}{METADATA_FILE}"
        md = read_metadata_file(Path(self.path) / name)
        # As upstream: a load id for this read.
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = dcp_md.StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class RestrictedCachedReader(mcore_torch.CachedMetadataFileSystemReader, RestrictedReader):
    """megatron's metadata-caching reader over ``RestrictedReader`` (its ``read_metadata``
    calls ``super().read_metadata()`` once, which the MRO makes the restricted one)."""


def _filesystem_reader(checkpoint_dir: Any, cache_metadata: bool = False) -> FileSystemReader:
    """Replaces ``strategies.torch._get_filesystem_reader``."""
    if MultiStorageClientFeature.is_enabled():
        raise CheckpointError(f"{checkpoint_dir}: multi-storage-client checkpoints are not "
                              "supported (their metadata could not be read restricted)")
    return (RestrictedCachedReader if cache_metadata else RestrictedReader)(checkpoint_dir)


def _load_bytes(self: Any, read_item: Any, value: io.BytesIO) -> None:
    """Replaces ``DefaultLoadPlanner.load_bytes`` (as inherited by ``MCoreLoadPlanner``):
    the same placement, with ``load_torch_file`` instead of ``weights_only=False``."""
    fqn = read_item.dest_index.fqn
    what = f"checkpoint object {fqn[:80]}"
    obj = load_torch_file(value, what)
    check_sharded_object(fqn, obj, what)
    if self.flatten_state_dict:
        torch_planner.set_element(self.original_state_dict, self.mappings[fqn], obj)
    else:
        self.state_dict[fqn] = obj


def _load_common(self: Any, checkpoint_dir: str | Path) -> Any:
    """Replaces ``TorchCommonLoadStrategy.load_common``: ``common.pt``, restricted."""
    if MultiStorageClientFeature.is_enabled():
        raise CheckpointError(f"{checkpoint_dir}: multi-storage-client checkpoints are not "
                              "supported")
    path = Path(checkpoint_dir) / COMMON_FILE
    return load_torch_file(path, str(path))


def _load_sharded_objects(self: Any, sharded_objects_state_dict: Any,
                          checkpoint_dir: str | Path) -> Any:
    """Replaces ``TorchCommonLoadStrategy.load_sharded_objects`` (per-object ``.pt`` files of
    strategies that cannot store objects; torch_dist stores them in its shards)."""
    raise CheckpointError(f"{checkpoint_dir}: sharded objects in separate files are not "
                          "supported (only torch_dist checkpoints are read)")


_UPSTREAM = (
    (mcore_torch, "_get_filesystem_reader"), (mcore_torch, "FileSystemReader"),
    (mcore_torch, "CachedMetadataFileSystemReader"), (mcore_torch.MCoreLoadPlanner, "load_bytes"),
    (mcore_common.TorchCommonLoadStrategy, "load_common"),
    (mcore_common.TorchCommonLoadStrategy, "load_sharded_objects"),
    (torch_planner, "set_element"), (FileSystemReader, "read_metadata"),
)


def install() -> None:
    """Route megatron-core's checkpoint reads through the restricted readers (idempotent)."""
    if getattr(mcore_torch, "_megatron_ext_restricted", False):
        return
    missing = [f"{getattr(o, '__name__', o)}.{n}" for o, n in _UPSTREAM if not hasattr(o, n)]
    if megatron.core.__version__ not in TESTED_VERSIONS or missing:
        raise RuntimeError(
            f"megatron_ext.checkpoint.safe_pickle wraps megatron-core {TESTED_VERSIONS}'s "
            f"checkpoint readers; found megatron-core {megatron.core.__version__}"
            f"{' without ' + ', '.join(missing) if missing else ''}: review the wrappers")
    mcore_torch._get_filesystem_reader = _filesystem_reader
    mcore_torch.FileSystemReader = RestrictedReader
    mcore_torch.CachedMetadataFileSystemReader = RestrictedCachedReader
    mcore_torch.MCoreLoadPlanner.load_bytes = _load_bytes
    mcore_common.TorchCommonLoadStrategy.load_common = _load_common
    mcore_common.TorchCommonLoadStrategy.load_sharded_objects = _load_sharded_objects
    mcore_torch._megatron_ext_restricted = True


install()
