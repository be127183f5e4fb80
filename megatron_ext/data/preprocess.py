"""Tokenize text into megatron-core's indexed format (``PREFIX.bin`` + ``PREFIX.idx``).

Inputs and what a document is:
  * ``.txt``  -- ``txt_mode="blocks"`` (default): a document is a block of lines separated by one
    or more blank lines (internal newlines kept); ``txt_mode="lines"``: every line is a document.
  * ``.jsonl`` / ``.jsonl.gz`` -- one JSON object per line, the text under ``json_key``.
  Blank (whitespace-only) lines are separators, never documents, in every format: they are
  counted in the report but are not errors.

Bad records are skipped and counted by reason (``SKIP_REASONS``), with the first few
``file:line`` positions per reason; ``strict=True`` turns the first one into a DataError.

Bounds (``megatron_ext.data.records``): a record (a line, a block, a JSON line) longer than
``max_record_bytes`` is skipped unread and counted as ``too_long`` (fatal with ``strict``); a
document longer than ``records.PIECE_BYTES`` is tokenized in pieces cut at whitespace and kept
as one document (for byte-level BPE the same tokens as whole; see ``records``).

Work (``megatron_ext.data.chunks``): workers read their own byte ranges of each file, tokenize
whole chunks and return a token array with the documents' lengths; this process writes each
chunk with one write (``indexed_writer``). The output is byte-identical for any number of
workers and chunk size.

Output is written in megatron-core's indexed format (``indexed_writer``: uint16 tokens when the
vocabulary is below 65500, else int32 -- megatron's ``DType.optimal_dtype``) into hidden
temporary files next to the prefix, which are renamed into place only at the very end: the old
``.idx`` is removed first, then ``.bin`` and last ``.idx`` are renamed. A run killed at any
point therefore never leaves a ``.bin``/``.idx`` pair that looks complete; temporary files are
removed on errors, Ctrl-C and SIGTERM (under SIGKILL they stay behind, hidden, and never under
the final names).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from megatron_ext.data.chunks import (
    clear_state,
    input_kind,
    ordered_results,
    parse,
    plan_units,
    text_pieces,
)
from megatron_ext.data.errors import DataError
from megatron_ext.data.records import (
    DEFAULT_MAX_RECORD_BYTES,
    PIECE_BYTES,
    check_limit,
    open_records,
)
from megatron_ext.data.tokenizer import Tokenizer, load_tokenizer
from megatron_ext.platform.fs import check_disjoint, signals_deferred
from megatron_ext.platform.progress import Progress

TXT_MODES = ("blocks", "lines")
SUFFIXES = (".txt", ".jsonl", ".jsonl.gz")
SKIP_REASONS = {
    "malformed_json": "malformed JSON line",
    "missing_key": "JSON object without the text key",
    "not_a_string": "text value is not a string",
    "invalid_utf8": "invalid UTF-8",
    "empty_document": "empty document",
    "too_long": "record longer than --max-record-bytes",
}
MAX_EXAMPLES = 5
CHUNK_BYTES = 256 * 1024  # small enough that the 1 MB demo files still spread over 2 workers


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
        input_kind(path)
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
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
) -> PreprocessReport:
    """Tokenize ``inputs`` into ``output_prefix``.bin/.idx; see the module docstring."""
    inputs = list(inputs)
    check_limit(max_record_bytes, "--max-record-bytes")
    _validate(inputs, output_prefix, txt_mode, workers,
              tokenizer if isinstance(tokenizer, str) else getattr(tokenizer, "path", None))
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    # why here: megatron-core takes seconds to import; bad arguments are reported before
    from megatron_ext.data.indexed_writer import ChunkWriter, DType

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
        builder = ChunkWriter(tmp_bin, dtype)
        init_args = (tokenizer, json_key, append_eod, dtype.__name__, max_record_bytes)
        units = plan_units(inputs, txt_mode, chunk_bytes, max_record_bytes)
        results = ordered_results(units, workers, init_args)
        lines_before = [0] * len(inputs)  # workers count lines from their chunk's first line
        for (file_index, flat, lengths, skips, lines, blanks), done in results:
            report.blank_lines += blanks
            for reason, line_no in skips:
                where = f"{inputs[file_index]}:{lines_before[file_index] + line_no}"
                if strict:
                    raise DataError(f"{where}: {SKIP_REASONS[reason]} (--strict)")
                report.add_skip(reason, where)
            lines_before[file_index] += lines
            builder.add_documents(flat, lengths)
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
        clear_state()
        bar.close()
        if saved_env is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved_env
        if not committed:
            if builder is not None:
                builder.close()  # idempotent; the file may still be open on errors
            for path in (tmp_bin, tmp_idx):
                if os.path.exists(path):
                    os.remove(path)
    report.seconds = time.time() - start
    return report


def iter_valid_texts(
    inputs: Sequence[str], json_key: str = "text", txt_mode: str = "blocks",
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    on_skip: Callable[[str, str], None] | None = None,
) -> Iterator[str]:
    """Yield the text of every document preprocessing would keep (for tokenizer training), in
    pieces of at most ``records.PIECE_BYTES``; ``on_skip(reason, "file:line")`` hears of every
    record left out (``SKIP_REASONS``)."""
    check_limit(max_record_bytes, "--max-record-bytes")
    for path in inputs:
        if not os.path.isfile(path):
            raise DataError(f"input file not found: {path}")
        kind = input_kind(path)
        with open_records(path, kind == "txt" and txt_mode == "blocks",
                          max_record_bytes) as reader:
            for record in reader:
                texts, _, skips = parse(kind, [record], json_key)
                for reason, line_no in skips:
                    if on_skip is not None:
                        on_skip(reason, f"{path}:{line_no}")
                for text in texts:
                    yield from text_pieces(text, PIECE_BYTES)
