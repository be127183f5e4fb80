"""Preprocessing work in chunks: the main process plans, worker processes read and tokenize.

A chunk is described, not shipped: for a plain file (``.txt``, ``.jsonl``) it is a byte range
``[start, end)`` that the worker reads itself (``RecordReader`` gives it exactly the records
that start in the range, so adjacent ranges cover every record once whatever the boundaries
cut). A ``.jsonl.gz`` cannot be seeked into, so the main process decompresses it and cuts the
stream after a newline into chunks of whole lines (decompressing costs ~1% of tokenizing;
a worker per file would leave the others idle on one large file, and each worker
decompressing the whole file to pick its lines would repeat the work N times). A line too long
for the record limit is skipped there in bounded memory and passed on as a "long" chunk.

A worker returns the chunk's tokens as one numpy array with the documents' lengths, its bad
records as ``(reason, line)`` with line numbers counted from the chunk's first line, and the
number of lines and blank lines it covered: the main process does no per-document work.
"""

from __future__ import annotations

import gzip
import io
import json
import multiprocessing
import os
import signal
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from itertools import chain

import numpy as np

from megatron_ext.data.errors import DataError
from megatron_ext.data.records import PIECE_BYTES, READ_BUFFER, RecordReader, split_pieces
from megatron_ext.data.tokenizer import Tokenizer, load_tokenizer

# (file index, kind "txt"/"jsonl", blocks?, payload); payload: ("range", path, start, end|None),
# ("bytes", whole lines) or ("long", blank?) for one over-limit line of a .jsonl.gz.
Unit = tuple[int, str, bool, tuple]
# (file index, tokens, document lengths, [(reason, line in chunk)], lines covered, blank lines)
Result = tuple[int, np.ndarray, np.ndarray, list[tuple[str, int]], int, int]


def input_kind(path: str) -> str:
    if path.endswith(".txt"):
        return "txt"
    if path.endswith(".jsonl") or path.endswith(".jsonl.gz"):
        return "jsonl"
    raise DataError(f"unsupported input type: {path} (expected .txt, .jsonl, .jsonl.gz)")


def plan_units(inputs: Sequence[str], txt_mode: str, chunk_bytes: int,
               limit: int) -> Iterator[tuple[Unit, int]]:
    """Every chunk of every input in order, with the input bytes (on disk) done after it."""
    done_before = 0
    for index, path in enumerate(inputs):
        kind = input_kind(path)
        blocks = kind == "txt" and txt_mode == "blocks"
        size = os.path.getsize(path)
        if path.endswith(".gz"):
            for payload, position in _gzip_chunks(path, chunk_bytes, limit):
                yield (index, kind, blocks, payload), done_before + position
        else:
            for start in range(0, size, chunk_bytes):
                end = start + chunk_bytes
                payload = ("range", path, start, end if end < size else None)
                yield (index, kind, blocks, payload), done_before + min(end, size)
        done_before += size


def _gzip_chunks(path: str, chunk_bytes: int, limit: int) -> Iterator[tuple[tuple, int]]:
    """Whole-line chunks of a gzip file, and its compressed position after each. Damage (not
    gzip, a cut or corrupt stream, a CRC mismatch) is a DataError naming the last line read."""
    lines = 0
    try:
        with open(path, "rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as stream:
            pending: list[bytes] = []  # the start of a line that no block so far has ended
            held = 0
            skipping, blank = False, True  # inside a line over the limit; all whitespace so far
            while block := stream.read(chunk_bytes):
                if skipping:
                    end = block.find(b"\n")
                    blank = blank and not block[: len(block) if end < 0 else end].strip()
                    if end < 0:
                        continue
                    lines += 1
                    yield ("long", blank), raw.tell()
                    skipping, block = False, block[end + 1 :]
                cut = block.rfind(b"\n") + 1
                if cut:
                    data = b"".join([*pending, block[:cut]])
                    lines += data.count(b"\n")
                    yield ("bytes", data), raw.tell()
                    pending, held = [block[cut:]], len(block) - cut
                else:
                    pending.append(block)
                    held += len(block)
                if held > limit:  # a line over the limit: read on to its end, holding nothing
                    skipping, blank = True, not any(part.strip() for part in pending)
                    pending, held = [], 0
            if skipping:
                yield ("long", blank), raw.tell()
            elif held:
                yield ("bytes", b"".join(pending)), raw.tell()
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        where = f" after line {lines}" if lines else ""
        raise DataError(f"cannot read {path}{where}: {type(err).__name__}: {err}") from err


def read_unit(payload: tuple, blocks: bool,
              limit: int) -> tuple[list[tuple[int, bytes | None]], int, int]:
    """(records, lines covered, blank lines) of one chunk."""
    if payload[0] == "long":
        blank = payload[1]
        return ([] if blank else [(1, None)]), 1, int(blank)
    if payload[0] == "bytes":
        reader = RecordReader(io.BytesIO(payload[1]), blocks=blocks, limit=limit)
        return list(reader), reader.lines, reader.blank_lines
    _, path, start, end = payload
    try:
        with open(path, "rb", buffering=READ_BUFFER) as handle:
            reader = RecordReader(handle, blocks=blocks, limit=limit, start=start, end=end)
            return list(reader), reader.lines, reader.blank_lines
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None


def parse(kind: str, records: list[tuple[int, bytes | None]], json_key: str):
    """Return (texts, their line numbers, [(reason, line), ...])."""
    texts: list[str] = []
    lines: list[int] = []
    skips: list[tuple[str, int]] = []
    for line_no, raw in records:
        if raw is None:
            skips.append(("too_long", line_no))
            continue
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


def text_pieces(text: str, piece_bytes: int = PIECE_BYTES) -> Iterator[str]:
    """``text`` itself, or its pieces (``split_pieces``) one by one when it is over
    ``piece_bytes``; a text that is not valid Unicode (a lone surrogate from a JSON escape)
    stays whole."""
    if len(text) <= piece_bytes // 4:  # at most 4 bytes a character: surely short enough
        yield text
        return
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        yield text  # the tokenizer refuses it: counted as invalid_utf8
        return
    for piece in split_pieces(data, piece_bytes):
        yield piece.decode("utf-8")


def _encode_batch(tokenizer: Tokenizer, texts: list[str]) -> list[list[int] | None]:
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


def _encode_long(tokenizer: Tokenizer, text: str, piece_bytes: int) -> np.ndarray | None:
    """A long text's ids, encoded piece by piece: one piece's encoding alive at a time (the
    tokenizer's ~140 bytes per byte), the ids kept as int32 arrays, not Python lists."""
    ids = []
    for piece in text_pieces(text, piece_bytes):
        encoded = _encode_batch(tokenizer, [piece])[0]
        if encoded is None:
            return None
        ids.append(np.array(encoded, dtype=np.int32))
    return np.concatenate(ids)


def encode_documents(tokenizer: Tokenizer, texts: list[str],
                     piece_bytes: int = PIECE_BYTES) -> list[list[int] | np.ndarray | None]:
    """Token ids per text (None: cannot be encoded). Texts over ``piece_bytes`` are encoded
    piece by piece (``text_pieces``) into one array; the others together, as lists."""
    long = {i for i, text in enumerate(texts) if len(text) > piece_bytes // 4}
    if not long:
        return _encode_batch(tokenizer, texts)
    out: list = _encode_batch(tokenizer, ["" if i in long else t for i, t in enumerate(texts)])
    for i in long:
        out[i] = _encode_long(tokenizer, texts[i], piece_bytes)
    return out


def _flatten(parts: list, dtype: str, total: int) -> np.ndarray:
    """One array of ``parts`` (lists of ids, and arrays for long documents) back to back."""
    if not any(isinstance(part, np.ndarray) for part in parts):
        return np.fromiter(chain.from_iterable(parts), dtype=dtype, count=total)
    return np.concatenate([np.asarray(part, dtype=dtype) for part in parts if len(part)])


_STATE: dict = {}
_PARENT_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def init_worker(tokenizer: Tokenizer | str, json_key: str, append_eod: bool, dtype: str,
                limit: int) -> None:
    if isinstance(tokenizer, str):
        # In a pool worker: Ctrl-C/SIGTERM are the parent's business (it terminates the pool).
        # Both arrive blocked (ordered_results): a SIGTERM from terminate() that came before
        # this point kills the worker now, silently, instead of raising the parent's Terminated.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _PARENT_SIGNALS)
        tokenizer = load_tokenizer(tokenizer)
    _STATE.update(tokenizer=tokenizer, json_key=json_key, append_eod=append_eod, dtype=dtype,
                  limit=limit)


def process_unit(unit: Unit) -> Result:
    """Worker: read, parse and tokenize one chunk; see the module docstring."""
    file_index, kind, blocks, payload = unit
    tokenizer: Tokenizer = _STATE["tokenizer"]
    records, lines, blanks = read_unit(payload, blocks, _STATE["limit"])
    texts, text_lines, skips = parse(kind, records, _STATE["json_key"])
    eod = [tokenizer.eod] if _STATE["append_eod"] else []
    parts: list = []  # lists of ids (arrays for long documents), each followed by eod
    lengths: list[int] = []
    for ids, line_no in zip(encode_documents(tokenizer, texts), text_lines, strict=True):
        if ids is None:
            skips.append(("invalid_utf8", line_no))
        elif len(ids) == 0:
            skips.append(("empty_document", line_no))
        else:
            parts.append(ids)
            parts.append(eod)
            lengths.append(len(ids) + len(eod))
    flat = _flatten(parts, _STATE["dtype"], sum(lengths))
    skips.sort(key=lambda item: item[1])
    return file_index, flat, np.array(lengths, dtype=np.int64), skips, lines, blanks


def ordered_results(units: Iterator[tuple[Unit, int]], workers: int,
                    init_args: tuple) -> Iterator[tuple[Result, int]]:
    """Yield (result, progress bytes) in input order, tokenizing on ``workers`` processes.

    Pool.imap would drain the whole input into its task queue ahead of the workers; a bounded
    window of in-flight apply_async calls keeps order and memory bounded (a few chunks per worker).
    """
    if workers == 1:
        init_worker(*init_args)
        for unit, done in units:
            yield process_unit(unit), done
        return
    worker_args = (init_args[0].path, *init_args[1:])
    pool = None
    try:
        # Forked workers inherit this process's SIGTERM handler (raise Terminated, for cleanup):
        # until init_worker replaces it, a terminate() would print a worker traceback.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _PARENT_SIGNALS)
        try:
            pool = multiprocessing.Pool(workers, initializer=init_worker, initargs=worker_args)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a pending signal lands here
        window: deque = deque()
        for unit, done in units:
            window.append((pool.apply_async(process_unit, (unit,)), done))
            if len(window) >= 4 * workers:
                pending, done_ = window.popleft()
                yield pending.get(), done_
        while window:
            pending, done_ = window.popleft()
            yield pending.get(), done_
        pool.close()
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


def clear_state() -> None:
    _STATE.clear()
