"""Read and write HF checkpoint directories tensor by tensor.

Reading: the ``safetensors`` library reads every file's header before anything is loaded and
checks it as strictly as it checks any file (dimensions and offsets non-negative integers,
offsets contiguous and covering the file exactly, ``__metadata__`` a map of strings, known
dtypes); a file it refuses is one ``ConversionError`` line, not a library traceback later.
Tensors that are not floating point are refused too: every tensor of an HF model we convert is a
weight, and an integer one would be cast into garbage. Tensors are then read with ``safe_open``
opened per tensor: a long-lived handle keeps the whole file mapped and every page it has touched
counts towards the process RSS (1.4 GB after reading a 1.2 GB file), while a short-lived one
releases them. That, the names, shapes and dtypes known up front (``TensorInfo``), and one line
per damaged file are all that streaming needs from us on top of the library.

Writing: the full list of (name, shape, dtype) is known before the first tensor arrives (it
follows from the architecture), so shards and headers are planned up front and each tensor is
written straight to its offset, on a worker thread a few tensors behind the producer
(``platform.background``). Memory stays at those few tensors, whatever the shard size. Tensors
arriving in file order (every converter here) go to disk through O_DIRECT, without a copy in
the page cache (``platform.direct_io``); anything else through ordinary writes.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from megatron_ext.config.args import parse_size as bounded_size
from megatron_ext.config.loader import ConfigError
from megatron_ext.conversion.hf_config import read_hf_config, read_index
from megatron_ext.conversion.keymaps import ConversionError, hf_layer
from megatron_ext.errors import one_line
from megatron_ext.platform.background import consume_behind
from megatron_ext.platform.direct_io import ALIGN, SequentialFile, will_need
from megatron_ext.platform.fs import recover_interrupted, staging

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Copied verbatim from the input when present: the tokenizer travels with the weights.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
)
_MAX_MESSAGE = 200  # characters of the library's message quoted (it can quote the header)

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int = 0  # where its bytes start in ``file`` (from the file's first byte), and how many
    nbytes: int = 0


def parse_size(text: str | int) -> int:
    """'2GB' / '500MB' / '1.5GiB' / '123' -> bytes, bounded (``config.args.parse_size``)."""
    try:
        return bounded_size(text)
    except ConfigError as e:
        raise ConversionError(str(e)) from None


def read_safetensors_header(path: Path, float_only: bool = True) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, from its header as the safetensors library reads and
    checks it (see the module docstring); ``float_only``: refuse tensors that are not floating
    point. Any fault is one ConversionError naming the file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            header = {name: (f.get_slice(name).get_dtype(), f.get_slice(name).get_shape())
                      for name in f.keys()}
    except SafetensorError as e:
        raise ConversionError(f"{path}: {_damage(path, one_line(e))}") from None
    with open(path, "rb") as raw:  # the offsets, from the header the library just accepted
        n = int.from_bytes(raw.read(8), "little")
        offsets = {name: meta["data_offsets"] for name, meta in json.loads(raw.read(n)).items()
                   if name != "__metadata__"}
    out: dict[str, TensorInfo] = {}
    for name, (dtype_name, shape) in header.items():
        dtype = DTYPES.get(dtype_name)
        if dtype is None:
            raise ConversionError(f"{path}: {name} has dtype {dtype_name}, which we do not read")
        if float_only and not dtype.is_floating_point:
            raise ConversionError(f"{path}: {name} is {dtype_name}, not a floating-point weight")
        begin, end = offsets[name]
        out[name] = TensorInfo(path, dtype, tuple(shape), 8 + n + begin, end - begin)
    return out


def _damage(path: Path, message: str) -> str:
    """What is wrong with a file the safetensors reader refused: its own words, except for a file
    that ends too soon or too late (an interrupted download or copy), which it reports as a
    header too small or large, or as data not covering the file: that one gets its sizes."""
    message = message.removeprefix("Error while deserializing header: ")
    if len(message) > _MAX_MESSAGE:
        message = message[:_MAX_MESSAGE] + "..."
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little")
        if len(head) < 8 or 8 + n > size:
            return f"truncated safetensors file ({size} bytes" + (
                f", header of {n} bytes)" if len(head) == 8 else ")")
        end = _data_end(f.read(n)) if "not fully covered" in message else None
    if end is not None and 8 + n + end > size:
        return f"truncated safetensors file (needs {8 + n + end} bytes, has {size})"
    if end is not None and 8 + n + end < size:
        return f"{size - 8 - n - end} unexpected trailing bytes"
    return f"corrupt safetensors header ({message})"


def _data_end(raw: bytes) -> int | None:
    """Where a header the library found valid, but for the file's length, says the data ends."""
    try:
        header = json.loads(raw)
        return max((meta["data_offsets"][1] for name, meta in header.items()
                    if name != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None


class HFCheckpoint:
    """A validated HF checkpoint directory: ``config``, ``keys()``, ``info()``, ``get()``.
    ``float_only``: every tensor must be floating point (a weight), as for our conversions."""

    def __init__(self, path: str | os.PathLike[str], float_only: bool = True) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise ConversionError(f"{self.path}: not a directory")
        config_path = self.path / "config.json"
        if not (config_path.exists() or config_path.is_symlink()):
            raise ConversionError(f"{self.path}: no config.json (not an HF checkpoint)")
        self.config: dict[str, Any] = read_hf_config(config_path)  # bounded and checked
        self._tensors: dict[str, TensorInfo] = {}
        self._layers: dict[int, list[TensorInfo]] = {}  # for ``_read_ahead``
        self._advised: set[int] = set()
        for file in self._weight_files():
            for name, info in read_safetensors_header(file, float_only).items():
                if name in self._tensors:
                    raise ConversionError(f"{self.path}: {name} stored in two files")
                self._tensors[name] = info
        if self._weight_map is not None:
            for name in sorted(set(self._weight_map) ^ set(self._tensors)):
                raise ConversionError(f"{self.path}: index and shards disagree about {name}")
            for name, info in self._tensors.items():
                if self._weight_map[name] != info.file.name:
                    raise ConversionError(f"{self.path}: index puts {name} in another shard")
        for name, info in self._tensors.items():
            if (layer := hf_layer(name)) is not None:
                self._layers.setdefault(layer, []).append(info)

    def _weight_files(self) -> list[Path]:
        index = self.path / INDEX_NAME
        if index.exists() or index.is_symlink():
            weight_map = read_index(index)
            files = sorted(set(weight_map.values()))
            for name in files:
                if not (self.path / name).is_file():
                    raise ConversionError(f"{index}: shard {name} is missing")
            self._weight_map = weight_map
            return [self.path / name for name in files]
        single = self.path / SINGLE_NAME
        if not single.is_file():
            raise ConversionError(f"{self.path}: no {SINGLE_NAME} or {INDEX_NAME}")
        self._weight_map = None
        return [single]

    def keys(self) -> list[str]:
        return list(self._tensors)

    def info(self, name: str) -> TensorInfo:
        return self._tensors[name]

    def get(self, name: str) -> Tensor:
        """Load one tensor (KeyError when absent, like a dict)."""
        info = self._tensors[name]
        self._read_ahead(name)
        # Short-lived handle on purpose: see the module docstring.
        with safe_open(str(info.file), framework="pt") as f:
            return f.get_tensor(name)

    def _read_ahead(self, name: str) -> None:
        """Ask the kernel to read the next layer's tensors into the page cache in the background
        (once per layer; any tensor outside a layer asks for layer 0): tensors are read through
        a memory map, whose page faults read a cold file on whichever busy thread touches it.
        Measured at 8x3.7B (2 cores): a validated upcycle from an uncached dense took ~10 s
        more CPU than from a cached one without this, about the same with it."""
        at = hf_layer(name)
        layer = at + 1 if at is not None else 0
        if layer in self._advised or layer not in self._layers:
            return
        self._advised.add(layer)
        will_need([(t.file, t.start, t.nbytes) for t in self._layers[layer]])

    __call__ = get


def plan_shards(layout: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
                max_shard_bytes: int) -> list[list[tuple[str, tuple[int, ...], torch.dtype]]]:
    """Split ``layout`` in order into shards of at most ``max_shard_bytes`` (a lone bigger tensor
    gets its own shard, as HF does)."""
    shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
    used = 0
    for entry in layout:
        nbytes = _nbytes(entry[1], entry[2])
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(entry)
        used += nbytes
    return shards


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for dim in shape:
        n *= dim
    return n


class ShardedWriter:
    """Write tensors of a known layout into planned safetensors shards, in any order.

    Files are named ``model-0000i-of-0000n.safetensors`` (or ``model.safetensors`` when there is
    one shard, as HF does) and an index is written when there are several.
    """

    def __init__(self, out_dir: Path, layout: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_bytes: int) -> None:
        self.out_dir = Path(out_dir)
        shards = plan_shards(layout, max_shard_bytes)
        n = len(shards)
        self._slots: dict[str, tuple[str, int, tuple[int, ...], torch.dtype]] = {}
        self._headers: dict[str, bytes] = {}
        self._remaining: dict[str, int] = {}
        self.total_bytes = 0
        for i, shard in enumerate(shards):
            fname = SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            pos = 0
            for name, shape, dtype in shard:
                nbytes = _nbytes(shape, dtype)
                header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                                "data_offsets": [pos, pos + nbytes]}
                self._slots[name] = (fname, pos, tuple(shape), dtype)
                pos += nbytes
            self.total_bytes += pos
            raw = json.dumps(header, separators=(",", ":")).encode()
            # tensor data starts on a block of the file (spaces end a safetensors header, as
            # the reference's 8-byte padding): tensors aligned in memory are then written
            # from there (``SequentialFile``), where the layout keeps them aligned in the file
            raw += b" " * (-(8 + len(raw)) % ALIGN)
            self._headers[fname] = struct.pack("<Q", len(raw)) + raw
            self._remaining[fname] = len(shard)
        self._open: dict[str, SequentialFile] = {}
        self._written: set[str] = set()

    def write(self, name: str, tensor: Tensor) -> None:
        if name not in self._slots:
            raise ConversionError(f"output: unexpected tensor {name}")
        if name in self._written:
            raise ConversionError(f"output: tensor {name} written twice")
        fname, offset, shape, dtype = self._slots[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ConversionError(f"output: {name} is {list(tensor.shape)} {tensor.dtype}, "
                                  f"planned {list(shape)} {dtype}")
        f = self._open.get(fname)
        if f is None:
            f = self._open[fname] = SequentialFile(self.out_dir / fname)
            f.write_at(0, self._headers[fname])
        # Reinterpret as bytes without a copy (bf16 has no numpy dtype).
        f.write_at(len(self._headers[fname]) + offset,
                   tensor.detach().contiguous().reshape(-1).view(torch.uint8))
        self._written.add(name)
        self._remaining[fname] -= 1
        if self._remaining[fname] == 0:
            self._open.pop(fname).close()

    def finish(self) -> None:
        missing = [n for n in self._slots if n not in self._written]
        if missing:
            raise ConversionError(f"output: tensor {missing[0]} never written "
                                  f"({len(missing)} missing)")
        files = {slot[0] for slot in self._slots.values()}
        if len(files) > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {n: slot[0] for n, slot in self._slots.items()}}
            (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def close(self) -> None:
        """Close the files still open: after ``finish`` there are none; after an error their
        buffered bytes are dropped (the caller's staging directory goes with them)."""
        for f in self._open.values():
            f.close(discard=True)
        self._open.clear()


def write_hf_checkpoint(
    out_dir: Path,
    tensors: Iterable[tuple[str, Tensor]],
    layout: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
    config: dict[str, Any],
    max_shard_bytes: int = 2 * 10**9,
    copy_from: Path | None = None,
) -> None:
    """Write weights, config.json and (from ``copy_from``) tokenizer and generation_config
    files into the existing directory ``out_dir``; staging is the caller's (``staged_dir``)."""
    writer = ShardedWriter(out_dir, layout, max_shard_bytes)
    try:
        # The writes run on a worker thread while the producer computes the next tensors.
        for _ in consume_behind(tensors, lambda item: writer.write(*item), name="write"):
            pass
        writer.finish()
    finally:
        writer.close()
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if copy_from is not None:
        for fname in (*TOKENIZER_FILES, "generation_config.json"):
            if (copy_from / fname).is_file():
                shutil.copy2(copy_from / fname, out_dir / fname)


@contextmanager
def staged_dir(output: Path, overwrite: bool) -> Iterator[Path]:
    """``platform.fs.staging`` for a converter's output: a previous output is replaced only with
    ``overwrite`` (ConversionError otherwise), after putting back one that a killed fallback
    swap left aside."""
    output = Path(output).absolute()
    recover_interrupted(output)
    if (output.exists() or output.is_symlink()) and not overwrite:
        raise ConversionError(f"{output} exists (pass --overwrite to replace it)")
    with staging(output) as tmp:
        yield tmp
