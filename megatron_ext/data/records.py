"""Bounded reading of user records: no line, document or file enters memory unless it fits a limit.

Every reader of user text goes through here: preprocessing inputs (.txt, .jsonl, .jsonl.gz),
tokenizer-training inputs and generation prompt files. Python's ``for line in handle`` and
``read()`` materialize whatever they meet: an 8 GB line in a 8 MB ``.jsonl.gz`` is an 8 GB
allocation, ``/dev/zero`` never ends. Here instead:

* ``read_line(handle, limit)`` reads one line with ``readline(limit + 1)``; a longer line is read
  on and discarded in ``SKIP_BLOCK`` pieces, so it costs time, never memory.
* ``RecordReader`` turns a binary stream (a file, a byte range of one, a ``GzipFile``, a
  ``BytesIO``) into records -- lines, or blocks of non-blank lines separated by blank lines -- of
  at most ``limit`` bytes; a record over the limit comes out as ``None`` (the caller counts it or
  refuses it). Given a byte range ``[start, end)`` it yields exactly the records that *start* in
  the range, finishing the last one past ``end``: workers reading adjacent ranges of one file
  together see every record once, in order, whatever the range boundaries cut (a line, a CRLF,
  a multi-byte character).
* ``split_pieces(data, piece_bytes)`` cuts a long document into pieces of at most
  ``piece_bytes`` at a whitespace boundary (never inside a UTF-8 character) for tokenization
  piece by piece: see ``PIECE_BYTES``.
* ``read_text(path, max_bytes, ...)`` reads a small whole file with a bound on the total read;
  ``read_prompts_file`` gives the prompts of a generation prompts file through it.

Limits (measured with the demo byte-level BPE tokenizer, docs/benchmarks.md, "Preprocessing:
chunked work and bounded records"): Hugging Face ``tokenizers`` peaks at 110-140 bytes of memory
per byte of one document (a 24 MB document: 3.2 GB; under an address-space limit its failed
allocation aborts the process). Documents above ``PIECE_BYTES`` are therefore tokenized in
pieces (the same 24 MB document: 0.26 GB), and a record above ``DEFAULT_MAX_RECORD_BYTES`` is
never read at all.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

from megatron_ext.data.errors import DataError

# A record (a line, a block of lines, a JSON line) longer than this is skipped and counted, or
# fatal with --strict. Worst case per tokenizing process: the record, its decoded text and its
# tokens plus one piece's tokenization: a 33 MB document adds 0.38 GB to the preprocessing
# process (measured). Real documents are far below (a whole novel is ~1 MB); the flag raises it.
DEFAULT_MAX_RECORD_BYTES = 32 * 2**20
MIN_RECORD_BYTES = 1024
MAX_RECORD_BYTES = 2**31 - 1  # token counts are int32 in megatron's .idx
# Documents longer than this are tokenized in pieces cut at whitespace and concatenated as one
# document: for byte-level BPE (GPT-2's pre-tokenizer, what tools/data/train_tokenizer.py
# trains) the tokens are the same as whole-document tokenization, since every piece starts
# where the pre-tokenizer starts a new word anyway; a piece peaks at ~150 MB in the tokenizer.
PIECE_BYTES = 2**20
# A generation prompts file is read whole, then tokenized at once (~140 bytes of memory per byte):
# 4 MiB of prompts (about a million tokens) stay near 0.6 GB.
DEFAULT_MAX_PROMPTS_BYTES = 4 * 2**20
SKIP_BLOCK = 2**20  # how much of an over-limit line is held at once while skipping it
# Read-ahead of the file objects here: Python's default 8 KiB makes skipping a long line cost
# a system call (or a call into the gzip reader) per 8 KiB.
READ_BUFFER = 256 * 2**10
_SPACE_NO_NEWLINE = b" \t\r\x0b\x0c"  # bytes.strip()'s whitespace, less the newline


def check_limit(value: int, flag: str) -> int:
    """``value`` if it is a usable record limit, else a DataError naming ``flag``."""
    if not isinstance(value, int) or not MIN_RECORD_BYTES <= value <= MAX_RECORD_BYTES:
        raise DataError(f"{flag} must be an integer number of bytes in "
                        f"[{MIN_RECORD_BYTES}, {MAX_RECORD_BYTES}], got {str(value)[:40]}")
    return value


def read_line(handle: IO[bytes], limit: int) -> tuple[bytes | None, int]:
    """The next line of ``handle`` (with its newline) and the bytes it took; ``(b"", 0)`` at the
    end. A line of more than ``limit`` bytes before its newline is read on to its end in bounded
    pieces and returned as ``None``, or as ``b"\\n"`` if it holds only whitespace (it is blank)."""
    line = handle.readline(limit + 1)
    if len(line) <= limit or line[-1:] == b"\n":
        return line, len(line)
    size, blank = len(line), not line.strip()
    while line[-1:] != b"\n":
        line = handle.readline(SKIP_BLOCK)
        if not line:
            break
        size += len(line)
        blank = blank and not line.strip()
    return (b"\n" if blank else None), size


def _to_line_start(handle: IO[bytes], pos: int, end: float) -> int | None:
    """From ``pos`` (inside a line), the position where the next line starts, or None when no
    line starts before ``end`` or the stream ends first."""
    while True:
        chunk = handle.readline(int(min(SKIP_BLOCK, max(end - pos, 1))))  # not far past end
        if not chunk:
            return None
        pos += len(chunk)
        if chunk[-1:] == b"\n":
            return pos if pos < end else None
        if pos >= end:
            return None


def _line_before_is_blank(handle: IO[bytes], pos: int) -> bool:
    """Whether the line whose newline is at ``pos - 1`` holds only whitespace; reads backwards
    over its trailing whitespace only, and leaves ``handle`` at ``pos``."""
    cut = pos - 1
    try:
        while cut > 0:
            low = max(0, cut - SKIP_BLOCK)
            handle.seek(low)
            stripped = handle.read(cut - low).rstrip(_SPACE_NO_NEWLINE)
            if stripped:
                return stripped[-1:] == b"\n"
            cut = low
        return True
    finally:
        handle.seek(pos)


class RecordReader:
    """The records of a binary stream, each at most ``limit`` bytes; see the module docstring.

    Iterating yields ``(line number, record)``: the record's bytes without the trailing newline
    (CRLF included), or ``None`` if it was longer than ``limit`` (its bytes were skipped, never
    held). Line numbers count from the first line that starts at or after ``start`` (line 1).
    Blank (whitespace-only) lines separate records and are never records. ``blocks``: a record
    is a block of consecutive non-blank lines (internal newlines kept); else every non-blank
    line is one. Afterwards ``lines`` is the number of lines that start in ``[start, end)`` and
    ``blank_lines`` how many of them are blank: adding ``lines`` of the ranges before a range to
    its line numbers gives line numbers in the file. ``start > 0`` needs a seekable stream.
    """

    def __init__(self, handle: IO[bytes], *, blocks: bool, limit: int, start: int = 0,
                 end: int | None = None) -> None:
        self.handle, self.blocks, self.limit = handle, blocks, limit
        self.start, self.end = start, (math.inf if end is None else end)
        self.lines = 0
        self.blank_lines = 0

    def _first_line(self) -> tuple[int | None, bool]:
        """(position of the first line start in range or None, whether that line continues a
        block begun before ``start``, which the previous range's reader finishes)."""
        if self.start == 0:
            return 0, False
        self.handle.seek(self.start - 1)
        pos = _to_line_start(self.handle, self.start - 1, self.end)
        if pos is None:
            return None, False
        return pos, self.blocks and not _line_before_is_blank(self.handle, pos)

    def __iter__(self) -> Iterator[tuple[int, bytes | None]]:
        pos, inside = self._first_line()
        if pos is None:
            return
        block: list[bytes] = []
        first = size = 0
        over = False
        while pos < self.end or block or over:
            line, taken = read_line(self.handle, self.limit)
            if not taken:
                break
            mine = pos < self.end
            pos += taken
            self.lines += mine
            if line is not None and not line.strip():
                self.blank_lines += mine
                inside = False
                if block or over:
                    yield first, (None if over else b"".join(block).rstrip(b"\r\n"))
                    block, size, over = [], 0, False
                continue
            if inside:
                continue
            if not self.blocks:
                yield self.lines, (None if line is None else line.rstrip(b"\r\n"))
                continue
            if not block and not over:
                first = self.lines
            if over or line is None or size + len(line) > self.limit:
                block, size, over = [], 0, True  # keep reading to the block's end, holding nothing
            else:
                block.append(line)
                size += len(line)
        if block or over:
            yield first, (None if over else b"".join(block).rstrip(b"\r\n"))


def split_pieces(data: bytes, piece_bytes: int) -> list[bytes]:
    """``data`` cut into pieces of at most ``piece_bytes`` (>= 4). Each cut falls where a run of
    whitespace begins after a non-whitespace byte, preferring a run that holds a newline; only
    where a piece has no such place, at the last UTF-8 character boundary that fits."""
    pieces = []
    low = 0
    while len(data) - low > piece_bytes:
        window = data[low : low + piece_bytes + 1]  # a cut may fall just after the last byte
        cut = 0
        for sep in (b"\n", b" ", b"\t"):
            at = window.rfind(sep, 1)
            if at > 0:  # cut where the whitespace run holding ``at`` begins
                cut = max(cut, len(window[:at].rstrip()))
                if cut > piece_bytes // 2:  # else try the next kind: a longer piece may fit
                    break
        if not cut:
            cut = piece_bytes
            while cut > 1 and window[cut] & 0xC0 == 0x80:  # a UTF-8 continuation byte
                cut -= 1
        pieces.append(data[low : low + cut])
        low += cut
    pieces.append(data[low:])
    return pieces


def read_text(path: str | os.PathLike, max_bytes: int, flag: str, what: str) -> str:
    """The whole of a small UTF-8 file (``what`` names it in errors) read with a bound: more
    than ``max_bytes`` (an endless ``/dev/zero`` too) is a DataError naming ``flag``."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as err:
        raise DataError(f"cannot read {what} {path}: {err.strerror or err}") from None
    if len(data) > max_bytes:
        raise DataError(f"{path}: {what} larger than {max_bytes} bytes ({flag} raises the limit)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


@contextmanager
def open_records(path: str, blocks: bool, limit: int) -> Iterator[RecordReader]:
    """A ``RecordReader`` over the whole of ``path``, decompressed if it ends in ``.gz``. A read
    error or a damaged gzip stream (not gzip, cut, corrupt, CRC mismatch) while it is open is a
    DataError naming the file and the last line read."""
    reader = None
    try:
        with open(path, "rb", buffering=READ_BUFFER) as raw:
            handle = raw
            if path.endswith(".gz"):
                handle = io.BufferedReader(gzip.GzipFile(fileobj=raw, mode="rb"), READ_BUFFER)
            reader = RecordReader(handle, blocks=blocks, limit=limit)
            yield reader
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        where = f" after line {reader.lines}" if reader is not None and reader.lines else ""
        raise DataError(f"cannot read {path}{where}: {type(err).__name__}: {err}") from err


def read_prompts_file(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_PROMPTS_BYTES,
                 flag: str = "--max-prompts-bytes") -> list[str]:
    """The prompts of a prompts file: its non-blank lines (``str.splitlines``), nothing added
    or stripped, the file read with ``read_text``'s bound; a file without one is a DataError."""
    check_limit(max_bytes, flag)
    prompts = [line for line in read_text(path, max_bytes, flag, "prompts file").splitlines()
               if line.strip()]
    if not prompts:
        raise DataError(f"{path}: no prompts (the file has no non-empty line)")
    return prompts
