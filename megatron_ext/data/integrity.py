"""Trust checks for megatron-core indexed datasets (``PREFIX.bin`` + ``PREFIX.idx``) and for the
index caches megatron writes next to them.

``check_indexed_dataset(prefix)`` is the one gate every dataset open goes through (the blend
parser, token counts, the token-id scan, hence training start-up and the blend builder). It reads
the ``.idx`` (megatron-core 0.16.1 ``_IndexReader`` layout: 9-byte magic, u64 version = 1, u8
dtype code, u64 sequence count S, u64 document-boundary count D, then S int32 lengths, S int64
byte pointers into the ``.bin``, D int64 document boundaries) through numpy memmaps in chunks, and
only ``stat``s the ``.bin``: the cost is one sequential read of the ``.idx`` (megatron reads its
lengths in full anyway when it builds the sample index), never of the ``.bin``. Any lie ends in a
``DataError`` naming the file: a header that is truncated, has the wrong magic, version or an
unknown/non-integer dtype; a size that does not match the header's counts (a truncated file or a
lying count); a negative length; a pointer that does not follow the lengths (megatron's writer
packs sequences back to back, so pointer i must equal the sum of the lengths before it: this also
catches non-monotonic pointers and pointers past the end); document boundaries that do not start
at 0, go backwards or do not end at S; an empty dataset; and a ``.bin`` whose size is not exactly
what the index describes. A longer ``.bin`` is refused too: megatron's writer never produces
one, so the two files are not one pair (e.g. a ``.bin`` rewritten after its ``.idx``) and
training on what the stale index happens to cover would be silent data loss.

Token ids are checked by ``token_range``: every token of a small dataset, a sample of windows of
a large one (a full scan of a TB corpus would take longer than the job's start-up should).

``discard_damaged_caches(dirs)`` guards megatron's index caches (``<hash>-<Class>-<split>-*.npy``
plus a ``description.txt``), which megatron writes in place, not atomically, and trusts when all
files exist: a build killed while writing the last ``.npy`` leaves a truncated file that a later
run would load (numpy error, or wrong samples). Every ``.npy`` header is parsed and its size
checked against shape x dtype before megatron looks; a damaged entry (all files of that
hash/class/split) is removed with one warning, so megatron rebuilds it. Object dtypes are refused
as damage too: megatron loads with ``allow_pickle=True``, and a cache directory must not be a
way to run a pickle.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from megatron_ext.data.errors import DataError
from megatron_ext.platform.quiet import quiet_megatron

with quiet_megatron():  # its package import warns about optional GPU libraries
    # The format's constants, from the reader we validate for (megatron-core 0.16.1).
    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType

HEADER_BYTES = len(_INDEX_HEADER) + 8 + 1 + 8 + 8  # magic, version, dtype code, S, D
INDEX_VERSION = 1
CHUNK = 1 << 24  # elements per memmap slice: bounded memory on billion-sequence indices
FULL_SCAN_BYTES = 2 << 30  # .bin bytes up to which every token id is checked
SAMPLE_WINDOWS, WINDOW_BYTES = 64, 1 << 20  # otherwise: 64 evenly spaced 1 MiB windows per .bin
# megatron's cache file names: <md5 hex>-<dataset class>-<split>-<what>
_CACHE_NAME = re.compile(
    r"^([0-9a-f]{32}-[A-Za-z]+Dataset-(?:train|valid|test)-)[a-z_]+\.(?:npy|txt)$")


@dataclass(frozen=True)
class IndexSummary:
    """What a validated ``.idx`` says, for callers that need counts without opening it again."""

    prefix: str
    dtype: type
    sequences: int
    documents: int
    tokens: int


_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}
_CHECKED: dict[str, tuple[tuple, IndexSummary]] = {}


def _signature(path: str) -> tuple:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def check_indexed_dataset(prefix: str) -> IndexSummary:
    """Validate ``prefix``.idx/.bin (see the module docstring) or raise a one-line DataError.

    The result is remembered per prefix while both files keep their inode, size and mtime, so the
    start-up path can call this from several places without reading a large ``.idx`` twice.
    """
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    for path in (bin_path, idx_path):
        if not os.path.isfile(path):
            raise DataError(f"dataset prefix {prefix} has no {path}")
    try:
        key = (_signature(idx_path), _signature(bin_path))
        cached = _CHECKED.get(os.path.abspath(prefix))
        if cached is not None and cached[0] == key:
            return cached[1]
        summary = _check(prefix, idx_path, bin_path)
    except OSError as err:
        raise DataError(f"cannot read dataset {prefix}: {err}") from err
    _CHECKED[os.path.abspath(prefix)] = (key, summary)
    return summary


def _read_header(idx_path: str) -> tuple[type, int, int]:
    """(token dtype, sequence count S, document-boundary count D) from the 34-byte header."""
    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as handle:
        head = handle.read(HEADER_BYTES)
    magic = len(_INDEX_HEADER)
    if len(head) >= magic and head[:magic] != _INDEX_HEADER:
        raise DataError(f"{idx_path} is not a megatron indexed-dataset index "
                        f"(starts with {head[:magic]!r}, expected {_INDEX_HEADER!r})")
    if len(head) < HEADER_BYTES or not head.startswith(_INDEX_HEADER):
        raise DataError(f"{idx_path} is truncated: {size} bytes, shorter than the "
                        f"{HEADER_BYTES}-byte header")
    version = int.from_bytes(head[magic : magic + 8], "little")
    if version != INDEX_VERSION:
        raise DataError(f"{idx_path}: index version {version}, megatron-core 0.16.1 reads only "
                        f"version {INDEX_VERSION}")
    code = head[magic + 8]
    try:
        dtype = DType.dtype_from_code(code)
    except ValueError:
        raise DataError(f"{idx_path}: unknown token dtype code {code}") from None
    if not np.issubdtype(dtype, np.integer):
        raise DataError(f"{idx_path}: token dtype {dtype.__name__} is not an integer type")
    sequences = int.from_bytes(head[magic + 9 : magic + 17], "little")
    boundaries = int.from_bytes(head[magic + 17 : magic + 25], "little")
    expected = HEADER_BYTES + 12 * sequences + 8 * boundaries
    if size != expected:
        raise DataError(f"{idx_path} is {size} bytes but its header ({sequences} sequences, "
                        f"{boundaries} document boundaries) needs {expected}: the file is "
                        f"truncated or its header is wrong")
    if sequences == 0:
        raise DataError(f"{idx_path} holds no sequences: the dataset is empty")
    return dtype, sequences, boundaries


def _check(prefix: str, idx_path: str, bin_path: str) -> IndexSummary:
    dtype, sequences, boundaries = _read_header(idx_path)
    tokens = _check_sequences(idx_path, sequences, np.dtype(dtype).itemsize)
    _check_documents(idx_path, sequences, boundaries)
    if tokens == 0:
        raise DataError(f"{idx_path} describes no tokens: the dataset is empty")
    described, actual = tokens * np.dtype(dtype).itemsize, os.path.getsize(bin_path)
    if actual < described:
        raise DataError(f"{bin_path} is {actual} bytes but {idx_path} describes {described} "
                        f"({tokens} {dtype.__name__} tokens): the .bin is truncated or belongs "
                        f"to another index")
    if actual > described:
        raise DataError(f"{bin_path} is {actual} bytes but {idx_path} describes only {described}"
                        f": the two files are not one pair (a .bin rewritten after its .idx?)")
    return IndexSummary(prefix, dtype, sequences, boundaries - 1, tokens)


def _check_sequences(idx_path: str, count: int, itemsize: int) -> int:
    """Lengths non-negative and pointers packed back to back; returns the number of tokens."""
    lengths = np.memmap(idx_path, np.int32, "r", offset=HEADER_BYTES, shape=(count,))
    pointers = np.memmap(idx_path, np.int64, "r", offset=HEADER_BYTES + 4 * count,
                         shape=(count,))
    tokens = 0
    for start in range(0, count, CHUNK):
        length = np.asarray(lengths[start : start + CHUNK], dtype=np.int64)
        negative = np.flatnonzero(length < 0)
        if negative.size:
            i = start + int(negative[0])
            raise DataError(f"{idx_path}: sequence {i} has a negative length ({lengths[i]})")
        starts = tokens + np.concatenate(([0], np.cumsum(length[:-1])))
        wrong = np.flatnonzero(np.asarray(pointers[start : start + CHUNK]) != starts * itemsize)
        if wrong.size:
            i = start + int(wrong[0])
            raise DataError(f"{idx_path}: sequence {i} points at byte {pointers[i]} of the .bin, "
                            f"but the lengths before it put it at byte "
                            f"{int(starts[wrong[0]]) * itemsize} (corrupt pointers)")
        tokens += int(length.sum())
    del lengths, pointers  # close the maps now, not at garbage collection
    return tokens


def _check_documents(idx_path: str, sequences: int, count: int) -> None:
    """Document boundaries: 0 first, never decreasing, the sequence count last."""
    if count < 2:
        raise DataError(f"{idx_path} holds {max(count - 1, 0)} documents: the dataset is empty")
    bounds = np.memmap(idx_path, np.int64, "r", offset=HEADER_BYTES + 12 * sequences,
                       shape=(count,))
    if bounds[0] != 0 or bounds[-1] != sequences:
        raise DataError(f"{idx_path}: document boundaries run from {bounds[0]} to {bounds[-1]}, "
                        f"expected 0 to the sequence count {sequences}")
    previous = 0
    for start in range(0, count, CHUNK):
        chunk = np.asarray(bounds[start : start + CHUNK])
        steps = np.diff(chunk, prepend=previous)
        if (steps < 0).any():
            i = start + int(np.flatnonzero(steps < 0)[0])
            raise DataError(f"{idx_path}: document boundary {i} ({bounds[i]}) goes backwards")
        previous = int(chunk[-1])
    del bounds


def token_range(prefix: str, full_scan_bytes: int = FULL_SCAN_BYTES) -> tuple[int, int, bool]:
    """(smallest, largest token id, whether every token was read) of a validated dataset.

    Reads the whole ``.bin`` when it is at most ``full_scan_bytes``, else ``SAMPLE_WINDOWS``
    evenly spaced windows (first and last included): a corpus tokenized with another tokenizer
    has out-of-range ids everywhere, so the sample finds it without reading terabytes.
    """
    summary = check_indexed_dataset(prefix)
    itemsize = np.dtype(summary.dtype).itemsize
    data = np.memmap(prefix + ".bin", dtype=summary.dtype, mode="r", shape=(summary.tokens,))
    full = summary.tokens * itemsize <= full_scan_bytes
    if full:
        windows = [(s, s + (1 << 26)) for s in range(0, summary.tokens, 1 << 26)]
    else:
        width = min(WINDOW_BYTES // itemsize, summary.tokens)
        starts = np.linspace(0, summary.tokens - width, SAMPLE_WINDOWS).astype(np.int64)
        windows = [(int(s), int(s) + width) for s in starts]
    low, high = None, None
    for begin, end in windows:
        piece = data[begin:end]
        low = int(piece.min()) if low is None else min(low, int(piece.min()))
        high = int(piece.max()) if high is None else max(high, int(piece.max()))
    del data
    if low < 0:
        raise DataError(f"{prefix}.bin contains a negative token id ({low}): the file is corrupt")
    return low, high, full


def _cache_problem(path: str) -> str | None:
    """Why a cached ``.npy`` cannot be trusted, or None: parsed header, size = shape x dtype."""
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version not in _NPY_HEADER_READERS:  # numpy.save writes 1.0 for these arrays
                return f"unsupported .npy version {version}"
            shape, _, dtype = _NPY_HEADER_READERS[version](handle)
            offset = handle.tell()
    except (ValueError, EOFError, OSError, SyntaxError) as err:
        return f"unreadable header ({' '.join(str(err).split())})"
    if dtype.hasobject:
        return "an object (pickle) array"
    needed = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = os.path.getsize(path)
    return None if size == needed else f"{size} bytes, its header needs {needed}"


def discard_damaged_caches(directories: Iterable[str]) -> list[str]:
    """Remove every megatron index-cache entry with a damaged ``.npy``; returns what was removed.

    Call it on global rank 0 only, before the build (megatron builds on rank 0 first and the other
    ranks load after a barrier, so nobody reads a file that rank 0 is rewriting). Prints one
    warning per removed entry; megatron then rebuilds it as a cache miss.
    """
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return []
    removed = []
    for directory in dict.fromkeys(directories):
        names = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
        groups: dict[str, list[str]] = {}
        for name in names:
            match = _CACHE_NAME.match(name)
            if match:
                groups.setdefault(match.group(1), []).append(os.path.join(directory, name))
        for files in groups.values():
            problems = [(p, _cache_problem(p)) for p in files if p.endswith(".npy")]
            bad = [(p, why) for p, why in problems if why is not None]
            if not bad:
                continue
            try:
                for path in files:
                    os.remove(path)
            except OSError as err:
                raise DataError(f"damaged index cache {bad[0][0]} ({bad[0][1]}) cannot be "
                                f"removed: {err}") from err
            print(f"WARNING: damaged dataset index cache {bad[0][0]} ({bad[0][1]}): removed "
                  f"{len(files)} cache file(s), rebuilding", file=sys.stderr, flush=True)
            removed += files
    return removed
