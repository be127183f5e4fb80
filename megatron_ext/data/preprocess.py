"""Tokenize text into megatron-core's indexed format (``PREFIX.bin`` + ``PREFIX.idx``).

Inputs and what a document is:
  * ``.txt``  -- ``txt_mode="blocks"`` (default): a document is a block of lines separated by one
    or more blank lines (internal newlines kept); ``txt_mode="lines"``: every line is a document.
  * ``.jsonl`` / ``.jsonl.gz`` -- one JSON object per line, the text under ``json_key``.
  Blank (whitespace-only) lines are separators, never documents, in every format: they are
  counted in the report but are not errors.

Bad records are skipped and counted by reason (``SKIP_REASONS``), with the first few
``file:line`` positions per reason; ``strict=True`` turns the first one into a DataError.

Output is written with megatron-core's ``IndexedDatasetBuilder`` (uint16 tokens when the vocabulary
is below 65500, else int32 -- megatron's ``DType.optimal_dtype``) into hidden temporary files next
to the prefix, which are renamed into place only at the very end: the old ``.idx`` is removed
first, then ``.bin`` and last ``.idx`` are renamed. A run killed at any point therefore never
leaves a ``.bin``/``.idx`` pair that looks complete; temporary files are removed on errors,
Ctrl-C and SIGTERM (under SIGKILL they stay behind, hidden, and never under the final names).
"""

from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import signal
import time
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO

import numpy as np

from megatron_ext.data.errors import DataError
from megatron_ext.data.tokenizer import Tokenizer, load_tokenizer
from megatron_ext.platform.fs import check_disjoint, signals_deferred
from megatron_ext.platform.progress import Progress
from megatron_ext.platform.quiet import quiet_megatron

TXT_MODES = ("blocks", "lines")
SUFFIXES = (".txt", ".jsonl", ".jsonl.gz")
SKIP_REASONS = {
    "malformed_json": "malformed JSON line",
    "missing_key": "JSON object without the text key",
    "not_a_string": "text value is not a string",
    "invalid_utf8": "invalid UTF-8",
    "empty_document": "empty document",
}
MAX_EXAMPLES = 5
CHUNK_BYTES = 256 * 1024  # small enough that the 1 MB demo files still spread over 2 workers

# A chunk is (file index, kind, [(line number, raw bytes), ...]); kind is "txt" or "jsonl".
Chunk = tuple[int, str, list[tuple[int, bytes]]]


@dataclass
class PreprocessReport:
    """What a preprocessing run did; ``format()`` is the human-readable final report."""

    output_prefix: str
    inputs: list[str]
    documents: int = 0
    tokens: int = 0
    input_bytes: int = 0
    blank_lines: int = 0
    seconds: float = 0.0
    dtype: str = ""
    workers: int = 1
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def add_skip(self, reason: str, where: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(where)

    def format(self) -> str:
        lines = [
            f"wrote {self.output_prefix}.bin/.idx ({self.dtype}) from {len(self.inputs)} file(s)",
            f"documents: {self.documents}",
            f"tokens: {self.tokens}",
            f"throughput: {self.tokens_per_second:,.0f} tokens/s "
            f"({self.seconds:.2f} s, {self.workers} worker(s))",
            f"blank lines ignored: {self.blank_lines}",
        ]
        if not self.skipped:
            lines.append("skipped: 0")
        for reason, count in sorted(self.skipped.items()):
            first = ", ".join(self.examples.get(reason, []))
            lines.append(f"skipped {reason} ({SKIP_REASONS[reason]}): {count} (first: {first})")
        return "\n".join(lines)



def _input_kind(path: str) -> str:
    if path.endswith(".txt"):
        return "txt"
    if path.endswith(".jsonl") or path.endswith(".jsonl.gz"):
        return "jsonl"
    raise DataError(f"unsupported input type: {path} (expected {', '.join(SUFFIXES)})")


def _iter_records(handle: IO[bytes], kind: str, txt_mode: str) -> Iterator[tuple[int, bytes] | int]:
    """Yield (first line number, raw document bytes), or 1 for each blank line."""
    block: list[bytes] = []
    block_start = 0
    for line_no, line in enumerate(handle, start=1):
        if not line.strip():
            if block:
                yield block_start, b"".join(block).rstrip(b"\r\n")
                block = []
            yield 1
        elif kind == "jsonl" or txt_mode == "lines":
            yield line_no, line.rstrip(b"\r\n")
        else:
            if not block:
                block_start = line_no
            block.append(line)
    if block:
        yield block_start, b"".join(block).rstrip(b"\r\n")


def _iter_file_records(path: str, txt_mode: str) -> Iterator[tuple[tuple[int, bytes] | int, int]]:
    """Yield (record or blank marker, bytes of the file on disk consumed so far). Damage (not
    gzip, a cut or corrupt deflate stream, a CRC mismatch) is a DataError naming the file and the
    last line read."""
    kind = _input_kind(path)
    last_line = 0
    try:
        with open(path, "rb") as raw:
            # Progress follows the on-disk (compressed) position, so .gz files report right.
            handle = gzip.GzipFile(fileobj=raw, mode="rb") if path.endswith(".gz") else raw
            for item in _iter_records(handle, kind, txt_mode):
                if not isinstance(item, int):
                    last_line = item[0]
                yield item, raw.tell()
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        where = f" after line {last_line}" if last_line else ""
        raise DataError(f"cannot read {path}{where}: {type(err).__name__}: {err}") from err


def _iter_chunks(
    inputs: Sequence[str], txt_mode: str, chunk_bytes: int
) -> Iterator[tuple[Chunk, int, int]]:
    """Yield (chunk, blank lines in it, input bytes consumed so far across all files)."""
    done_before = 0
    for file_index, path in enumerate(inputs):
        kind = _input_kind(path)
        records: list[tuple[int, bytes]] = []
        pending = blanks = position = 0
        for item, position in _iter_file_records(path, txt_mode):
            if isinstance(item, int):
                blanks += item
                continue
            records.append(item)
            pending += len(item[1])
            if pending >= chunk_bytes:
                yield (file_index, kind, records), blanks, done_before + position
                records, pending, blanks = [], 0, 0
        done_before += os.path.getsize(path)
        if records or blanks:
            yield (file_index, kind, records), blanks, done_before



def _parse(kind: str, records: list[tuple[int, bytes]], json_key: str):
    """Return (texts, their line numbers, [(reason, line), ...])."""
    texts: list[str] = []
    lines: list[int] = []
    skips: list[tuple[str, int]] = []
    for line_no, raw in records:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            # Point at the exact line inside a multi-line block.
            for offset, part in enumerate(raw.split(b"\n")):
                try:
                    part.decode("utf-8")
                except UnicodeDecodeError:
                    skips.append(("invalid_utf8", line_no + offset))
                    break
            continue
        if kind == "jsonl":
            try:
                obj = json.loads(text)
            except ValueError:
                skips.append(("malformed_json", line_no))
                continue
            if not isinstance(obj, dict):
                skips.append(("malformed_json", line_no))
                continue
            if json_key not in obj:
                skips.append(("missing_key", line_no))
                continue
            text = obj[json_key]
            if not isinstance(text, str):
                skips.append(("not_a_string", line_no))
                continue
        if not text.strip():
            skips.append(("empty_document", line_no))
            continue
        texts.append(text)
        lines.append(line_no)
    return texts, lines, skips


_STATE: dict = {}


def _init_worker(tokenizer: Tokenizer | str, json_key: str, append_eod: bool, dtype: str) -> None:
    if isinstance(tokenizer, str):
        # In a pool worker: Ctrl-C/SIGTERM are the parent's business (it terminates the pool).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        tokenizer = load_tokenizer(tokenizer)
    _STATE.update(tokenizer=tokenizer, json_key=json_key, append_eod=append_eod, dtype=dtype)


def _encode_all(tokenizer: Tokenizer, texts: list[str]) -> list[list[int] | None]:
    try:
        return list(tokenizer.encode_batch(texts))
    except (TypeError, ValueError, UnicodeError):
        # Lone surrogates from JSON escapes ("\ud800") cannot be encoded; find them one by one.
        out: list[list[int] | None] = []
        for text in texts:
            try:
                out.append(tokenizer.encode(text))
            except (TypeError, ValueError, UnicodeError):
                out.append(None)
        return out


def _process_chunk(chunk: Chunk):
    """Worker: chunk -> (file index, flat tokens, per-document lengths, skips)."""
    file_index, kind, records = chunk
    tokenizer: Tokenizer = _STATE["tokenizer"]
    texts, lines, skips = _parse(kind, records, _STATE["json_key"])
    eod = [tokenizer.eod] if _STATE["append_eod"] else []
    pieces: list[list[int]] = []
    for ids, line_no in zip(_encode_all(tokenizer, texts), lines, strict=False):
        if ids is None:
            skips.append(("invalid_utf8", line_no))
        elif not ids:
            skips.append(("empty_document", line_no))
        else:
            pieces.append(ids + eod)
    lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
    total = int(lengths.sum())
    flat = np.fromiter((t for piece in pieces for t in piece), dtype=_STATE["dtype"], count=total)
    skips.sort(key=lambda item: item[1])
    return file_index, flat, lengths, skips


def _ordered_results(chunks: Iterator[tuple[Chunk, int, int]], workers: int, init_args: tuple):
    """Yield (result, blanks, progress bytes) in input order, tokenizing on ``workers`` processes.

    Pool.imap would drain the whole input into its task queue ahead of the workers; a bounded
    window of in-flight apply_async calls keeps order and memory bounded (a few chunks per worker).
    """
    if workers == 1:
        _init_worker(*init_args)
        for chunk, blanks, done in chunks:
            yield _process_chunk(chunk), blanks, done
        return
    worker_args = (init_args[0].path, *init_args[1:])
    pool = multiprocessing.Pool(workers, initializer=_init_worker, initargs=worker_args)
    try:
        window: deque = deque()
        for chunk, blanks, done in chunks:
            window.append((pool.apply_async(_process_chunk, (chunk,)), blanks, done))
            if len(window) >= 4 * workers:
                pending, blanks_, done_ = window.popleft()
                yield pending.get(), blanks_, done_
        while window:
            pending, blanks_, done_ = window.popleft()
            yield pending.get(), blanks_, done_
        pool.close()
    finally:
        pool.terminate()
        pool.join()



def _temp_paths(output_prefix: str) -> tuple[str, str]:
    directory, base = os.path.split(os.path.abspath(output_prefix))
    stem = os.path.join(directory, f".{base}.tmp-{os.getpid()}")
    return f"{stem}.bin", f"{stem}.idx"


def _validate(inputs: Sequence[str], output_prefix: str, txt_mode: str, workers: int,
              tokenizer_path: str | None) -> None:
    if not inputs:
        raise DataError("no input files given")
    for path in inputs:
        if not os.path.isfile(path):
            raise DataError(f"input file not found: {path}")
        _input_kind(path)
    if txt_mode not in TXT_MODES:
        raise DataError(f"unknown txt mode {txt_mode!r} (expected one of {', '.join(TXT_MODES)})")
    if workers < 1:
        raise DataError(f"workers must be >= 1, got {workers}")
    if not output_prefix or output_prefix.endswith(os.sep) or os.path.isdir(output_prefix):
        raise DataError(f"output prefix must name a file prefix, got {output_prefix!r}")
    directory = os.path.dirname(os.path.abspath(output_prefix))
    if not os.path.isdir(directory):
        raise DataError(f"output directory does not exist: {directory}")
    # PREFIX.bin / PREFIX.idx must not be (or be written into) an input or the tokenizer.
    sources = [("--input", path) for path in inputs]
    if tokenizer_path is not None:
        sources.append(("--tokenizer", tokenizer_path))
    for suffix in (".bin", ".idx"):
        check_disjoint(f"{output_prefix}{suffix}", sources, output_flag="--output-prefix",
                       error=DataError)


def preprocess(
    inputs: Sequence[str],
    output_prefix: str,
    tokenizer: Tokenizer | str,
    json_key: str = "text",
    append_eod: bool = False,
    workers: int = 1,
    strict: bool = False,
    txt_mode: str = "blocks",
    progress: bool = False,
    chunk_bytes: int = CHUNK_BYTES,
) -> PreprocessReport:
    """Tokenize ``inputs`` into ``output_prefix``.bin/.idx; see the module docstring."""
    inputs = list(inputs)
    _validate(inputs, output_prefix, txt_mode, workers,
              tokenizer if isinstance(tokenizer, str) else getattr(tokenizer, "path", None))
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    with quiet_megatron():  # its package import warns about optional GPU libraries
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    report = PreprocessReport(output_prefix, inputs, dtype=dtype.__name__, workers=workers)
    tmp_bin, tmp_idx = _temp_paths(output_prefix)
    final_bin, final_idx = f"{output_prefix}.bin", f"{output_prefix}.idx"
    # --workers is the only parallelism: keep the tokenizers Rust pool out of the way.
    saved_env = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    start = time.time()
    bar = Progress(sum(os.path.getsize(p) for p in inputs), "preprocess", unit="B",
                   unit_scale=True, enabled=progress)
    committed = False
    builder = results = None
    try:
        builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
        init_args = (tokenizer, json_key, append_eod, dtype.__name__)
        results = _ordered_results(_iter_chunks(inputs, txt_mode, chunk_bytes), workers, init_args)
        for (file_index, flat, lengths, skips), blanks, done in results:
            report.blank_lines += blanks
            for reason, line_no in skips:
                where = f"{inputs[file_index]}:{line_no}"
                if strict:
                    raise DataError(f"{where}: {SKIP_REASONS[reason]} (--strict)")
                report.add_skip(reason, where)
            offset = 0
            for length in lengths.tolist():
                builder.add_document(flat[offset : offset + length], [length])
                offset += length
            report.documents += len(lengths)
            report.tokens += int(flat.size)
            report.input_bytes = done
            bar.update_to(done, docs=report.documents, tokens=report.tokens)
        if report.documents == 0:
            raise DataError(
                f"no documents to write: all {sum(report.skipped.values())} records were skipped "
                f"or the input is empty ({', '.join(inputs)})"
            )
        builder.finalize(tmp_idx)
        # Commit: drop a stale .idx first, then .bin, then .idx -- see the module docstring.
        with signals_deferred():  # Ctrl-C / SIGTERM wait: never half a pair
            if os.path.exists(final_idx):
                os.remove(final_idx)
            os.replace(tmp_bin, final_bin)
            os.replace(tmp_idx, final_idx)
            committed = True
    except OSError as err:
        raise DataError(f"cannot write {output_prefix}.bin/.idx: {err}") from err
    finally:
        if results is not None:
            results.close()  # terminates the worker pool now, not at garbage collection
        _STATE.clear()
        bar.close()
        if saved_env is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved_env
        if not committed:
            if builder is not None:
                builder.data_file.close()  # idempotent; the file may still be open on errors
            for path in (tmp_bin, tmp_idx):
                if os.path.exists(path):
                    os.remove(path)
    report.seconds = time.time() - start
    return report


def iter_valid_texts(
    inputs: Sequence[str], json_key: str = "text", txt_mode: str = "blocks"
) -> Iterator[str]:
    """Yield the text of every document preprocessing would keep (for tokenizer training)."""
    for path in inputs:
        if not os.path.isfile(path):
            raise DataError(f"input file not found: {path}")
        kind = _input_kind(path)
        for item, _ in _iter_file_records(path, txt_mode):
            if not isinstance(item, int):
                yield from _parse(kind, [item], json_key)[0]
