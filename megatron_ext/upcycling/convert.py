"""Directory to directory upcycling: the library function behind ``moe-upcycle`` (``cli.upcycle``).

Checkpoint formats are dispatched in one place (``_READERS`` / ``_WRITERS``): HF directories,
and our megatron-core checkpoints (``megatron_ext.conversion.mcore_io``: read whole at EP = 1,
written in one process at EP = 1; any EP can train from the result).
The output is staged in a temp dir beside the target and renamed only after writing and
validation succeed, so any failure leaves nothing at the output path.

Validation (on by default) streams: ``stream_check.StreamCheck`` checks every tensor against
the dense model as it is produced (memory: about one layer). The full-model logit check, which
holds whole fp32 models (about ``LOGIT_CHECK_BYTES_PER_PARAM`` bytes per MoE parameter, measured:
7.39 GB at 0.93B), runs only when that estimate fits ``logit_check_bytes`` (default: half the
RAM available at the start); otherwise a line says it was skipped.
"""

from __future__ import annotations

import copy
import json
import math
import resource
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import Tensor

from megatron_ext.config.schema import DataConfig
from megatron_ext.conversion.convert import (
    compare_logits,
    layer_progress,
    preflight,
    resolve_dtype,
)
from megatron_ext.conversion.hf_config import read_hf_config
from megatron_ext.conversion.hf_io import HFCheckpoint, staged_dir, write_hf_checkpoint
from megatron_ext.conversion.keymaps import (
    HF_EMBED,
    Arch,
    ConversionError,
    StreamGetter,
    arch_from_hf_config,
    hf_config_for,
    hf_settings_from_config,
    hf_shapes,
    hf_to_mcore,
)
from megatron_ext.conversion.mcore_io import (
    config_from_hf,
    hf_config_from_mcore,
    hf_record,
    hf_view,
    read_mcore_checkpoint,
    save_mcore_into,
    with_arch,
)
from megatron_ext.errors import out_of_memory
from megatron_ext.model.compare import ValidationError, ValidationReport
from megatron_ext.upcycling.spec import UpcycleError, UpcycleSpec
from megatron_ext.upcycling.stream_check import StreamCheck
from megatron_ext.upcycling.upcycle import output_layout, upcycle
from megatron_ext.upcycling.validate import validate_upcycled

FORMATS = ("auto", "hf", "mcore")
LOGIT_CHECK_BYTES_PER_PARAM = 8
INFO_FILE = "upcycling.json"
# Files that mark a megatron-core checkpoint: torch_dist metadata, our checkpoint.save layout
# (``latest``, ``meta.json``), or Megatron-LM's tracker file.
_MCORE_MARKERS = (".metadata", "metadata.json", "latest", "meta.json",
                  "latest_checkpointed_iteration.txt")


@dataclass(frozen=True)
class DenseModel:
    """A dense checkpoint opened for streaming: a getter plus what can be known without reading."""

    path: Path
    arch: Arch
    config: dict[str, Any]
    keys: list[str]
    get: Callable[[str], Tensor]
    dtype_of: Callable[[str], torch.dtype]
    shape_of: Callable[[str], tuple[int, ...]]
    files_dir: Path | None = None
    """Where tokenizer / generation_config files to carry over live (None: nowhere)."""
    mcore_config: Any = None
    """The source's training Config when it is an mcore checkpoint (kept for the output)."""


def detect_format(path: Path) -> str:
    if not path.exists():
        raise ConversionError(f"{path}: input does not exist")
    if not path.is_dir():
        raise ConversionError(f"{path}: input is not a directory")
    if (path / "config.json").exists():  # not only a regular file: the reader says what is wrong
        return "hf"
    if any((path / marker).exists() for marker in _MCORE_MARKERS):
        return "mcore"
    raise ConversionError(f"{path}: neither an HF checkpoint (no config.json) nor a "
                          "megatron-core checkpoint")


def _open_hf(path: Path) -> DenseModel:
    ckpt = HFCheckpoint(path)
    model_type = ckpt.config.get("model_type")
    if model_type != "llama":
        raise ConversionError(f"{path}: model_type {model_type!r}, expected a dense Llama "
                              "checkpoint (model_type 'llama')")
    return DenseModel(path, arch_from_hf_config(ckpt.config), ckpt.config, ckpt.keys(), ckpt.get,
                      lambda n: ckpt.info(n).dtype, lambda n: ckpt.info(n).shape, files_dir=path)


def _write_hf(out: Path, tensors: Iterable[tuple[str, Tensor]], dense: DenseModel,
              spec: UpcycleSpec, max_shard_bytes: int, data: DataConfig | None) -> None:
    # data: an HF directory holds no training config
    moe_arch = spec.moe_arch(dense.arch)
    dtype = str(dense.dtype_of(HF_EMBED)).removeprefix("torch.")
    config = hf_config_for(moe_arch, top_k=spec.top_k, dtype=dtype,
                           **hf_settings_from_config(dense.config))
    layout = output_layout(dense.arch, spec, dense.dtype_of)
    write_hf_checkpoint(out, tensors, layout, config, max_shard_bytes,
                        copy_from=dense.files_dir)


def _open_mcore(path: Path) -> DenseModel:
    """A dense mcore checkpoint served under HF names (its whole fp32 state dict in memory),
    in the precision its weights have (``conversion.convert.resolve_dtype``)."""
    get, keys, arch, cfg = read_mcore_checkpoint(path)
    if arch.num_experts:
        raise ConversionError(f"{path}: an MoE checkpoint ({arch.num_experts} experts), expected "
                              "a dense one")
    record = hf_record(path, arch)
    record_dtype = read_hf_config(record).get("dtype") if record else None
    dtype, _ = resolve_dtype("auto", get, keys, record_dtype)
    shapes = hf_shapes(arch)
    hf_get = hf_view(lambda n: get(n).to(dtype), arch)
    return DenseModel(path, arch, hf_config_from_mcore(cfg, arch, dtype, record), list(shapes),
                      hf_get, lambda n: dtype, lambda n: shapes[n], files_dir=record,
                      mcore_config=cfg)


def _write_mcore(out: Path, tensors: Iterable[tuple[str, Tensor]], dense: DenseModel,
                 spec: UpcycleSpec, max_shard_bytes: int, data: DataConfig | None) -> None:
    """The HF-named MoE stream, renamed on the fly, into an mcore checkpoint root at ``out``.
    The training config keeps an mcore source's settings (HF source: our defaults, no data:
    ``config_from_hf``); ``data`` (the run's --config) replaces the data section."""
    moe_arch = spec.moe_arch(dense.arch)
    dtype = dense.dtype_of(HF_EMBED)
    hf_config = hf_config_for(moe_arch, top_k=spec.top_k,
                              dtype=str(dtype).removeprefix("torch."),
                              **hf_settings_from_config(dense.config))
    if dense.mcore_config is not None:
        cfg = with_arch(dense.mcore_config, moe_arch, top_k=spec.top_k)
        if data is not None:
            cfg.data = copy.deepcopy(data)
    else:
        cfg = config_from_hf(hf_config, data=data)
    stream = hf_to_mcore(StreamGetter(tensors), moe_arch)  # same order in and out: no buffering
    save_mcore_into(out, stream, cfg, dtype=dtype, hf_config=hf_config,
                    tokenizer_dir=dense.files_dir)


_READERS: dict[str, Callable[[Path], DenseModel] | None] = {"hf": _open_hf, "mcore": _open_mcore}
_WRITERS: dict[str, Callable[..., None] | None] = {"hf": _write_hf, "mcore": _write_mcore}


def _lookup(table: dict[str, Any], fmt: str, what: str) -> Any:
    if fmt not in table:
        raise ConversionError(f"unknown {what} format {fmt!r} (use {', '.join(table)})")
    if table[fmt] is None:
        raise ConversionError(f"{what} format {fmt!r} is not yet supported (use hf)")
    return table[fmt]


def resolve_format(path: Path, input_format: str = "auto") -> str:
    return detect_format(Path(path)) if input_format == "auto" else input_format


def open_dense(path: Path, input_format: str = "auto") -> DenseModel:
    path = Path(path)
    reader = _lookup(_READERS, resolve_format(path, input_format), "input")
    if not path.is_dir():
        raise ConversionError(f"{path}: input is not a directory")
    return reader(path)


def _check_same_shapes(base: DenseModel, other: DenseModel) -> None:
    """btx sources must be interchangeable with the input: same keys, shapes and dtypes."""
    if set(other.keys) != set(base.keys):
        diff = sorted(set(other.keys) ^ set(base.keys))
        raise ConversionError(f"btx source {other.path}: key {diff[0]} differs from the input")
    for name in base.keys:
        theirs = (other.shape_of(name), other.dtype_of(name))
        if theirs != (base.shape_of(name), base.dtype_of(name)):
            raise ConversionError(
                f"btx source {other.path}: {name} is {list(other.shape_of(name))} "
                f"{other.dtype_of(name)}, the input has {list(base.shape_of(name))} "
                f"{base.dtype_of(name)}")


def logit_check_need(arch: Arch, spec: UpcycleSpec) -> int:
    """Estimated peak bytes of the full-model logit check (module docstring)."""
    params = sum(math.prod(shape) for shape in hf_shapes(spec.moe_arch(arch)).values())
    return LOGIT_CHECK_BYTES_PER_PARAM * params


def default_logit_budget() -> int:
    """Half the RAM available now, what the logit check may take without crowding the node, and
    never more than half of what an address-space limit (ulimit -v) leaves: the estimate counts
    parameters, not the shards' mmaps or the allocator's per-thread arenas, which count too."""
    budget = psutil.virtual_memory().available // 2
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit != resource.RLIM_INFINITY:
        budget = min(budget, max(0, limit - psutil.Process().memory_info().vms) // 2)
    return budget


def upcycle_checkpoint(
    input_dir: Path,
    output_dir: Path,
    spec: UpcycleSpec,
    *,
    btx_dirs: Sequence[Path] = (),
    input_format: str = "auto",
    output_format: str | None = None,
    overwrite: bool = False,
    validate: bool = True,
    max_shard_bytes: int = 2 * 10**9,
    data: DataConfig | None = None,
    logit_check_bytes: int | None = None,
    log: Callable[[str], None] = print,
    record: dict[str, Any] | None = None,
) -> ValidationReport | None:
    """Upcycle the dense checkpoint at ``input_dir`` into ``output_dir`` (see module docstring).

    Bad inputs raise ``ConversionError`` / ``UpcycleError`` before anything is written; a failed
    validation raises ``ValidationError``. btx: the input is source 0, ``btx_dirs`` the others.
    ``record``: more provenance for ``upcycling.json`` (the recipe's name of the dense base).
    ``data``: the data section of an mcore output's config.yaml (``_write_mcore``).
    """
    if output_format is None:  # the input's own format
        output_format = resolve_format(Path(input_dir), input_format)
    writer = _lookup(_WRITERS, output_format, "output")
    sources = [("--input", Path(input_dir))] + [("--btx-sources", Path(d)) for d in btx_dirs]
    output_dir = preflight(sources, Path(output_dir), overwrite)
    if spec.btx_sources:
        raise UpcycleError("pass btx sources as btx_dirs, not as getters")
    spec.with_placeholder_sources(len(btx_dirs)).validate()  # before any input is read
    dense = open_dense(Path(input_dir), input_format)
    sources = [open_dense(Path(d), input_format) for d in btx_dirs]
    for source in sources:
        _check_same_shapes(dense, source)
    spec = replace(spec, btx_sources=tuple(s.get for s in sources))
    stream = upcycle(dense.get, dense.keys, dense.arch, spec)  # validates spec against the arch
    check = StreamCheck([dense.get, *(s.get for s in sources)], dense.arch, spec)
    if validate:
        stream = check.tap(stream)
    report = None
    with staged_dir(output_dir, overwrite) as tmp:
        progress = layer_progress(stream, dense.arch.num_layers, "upcycle")
        writer(tmp, progress, dense, spec, max_shard_bytes, data)
        info = {**spec.describe(), "input": str(Path(input_dir).absolute()),
                "btx_sources": [str(Path(d).absolute()) for d in btx_dirs], **(record or {})}
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        if validate:
            log(check.summary())
            need = logit_check_need(dense.arch, spec)
            budget = default_logit_budget() if logit_check_bytes is None else logit_check_bytes
            if need > budget:
                log(f"validation: full-model logit check skipped: it needs about "
                    f"{need / 1e9:.1f} GB, over the {budget / 1e9:.1f} GB budget "
                    "(--logit-check-memory)")
                return None
            in_fmt = resolve_format(Path(input_dir), input_format)
            try:
                if in_fmt == output_format == "hf":
                    report = validate_upcycled(Path(input_dir), tmp, spec.function_preserving())
                else:
                    # Drop the sources (an mcore one is a whole state dict in memory): both
                    # sides are reloaded from disk, one model at a time.
                    vocab, preserving = dense.arch.vocab_size, spec.function_preserving()
                    del dense, sources, stream, progress
                    spec = replace(spec, btx_sources=())
                    report = compare_logits((Path(input_dir), in_fmt), (tmp, output_format),
                                            vocab, preserving)
            except Exception as e:  # say which step and which flag let it run
                if (failed := out_of_memory(e)) is None:
                    raise
                raise MemoryError(
                    f"{failed}, in the full-model logit check (about {need / 1e9:.1f} GB, within "
                    f"the {budget / 1e9:.1f} GB of --logit-check-memory; the streaming validation "
                    "passed)") from e
            log(report.summary())
            if not report.passed:
                raise ValidationError(report.summary())
    return report
