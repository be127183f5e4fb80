"""Tokenize .txt/.jsonl/.jsonl.gz files into a megatron-core indexed dataset (PREFIX.bin/.idx)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from megatron_ext.config.args import int_arg
from megatron_ext.data.records import DEFAULT_MAX_RECORD_BYTES
from megatron_ext.platform.cli import ArgumentParser, run_cli

EPILOG = """\
documents:
  .txt         --txt-mode blocks (default): a document is a block of lines separated by
               blank lines; --txt-mode lines: every non-blank line is a document
  .jsonl(.gz)  one JSON object per line; the document is the string under --json-key
  Blank lines are separators in every format, never documents.

bad records (skipped, counted and reported with their first line numbers; --strict: exit 2):
  malformed JSON line, JSON object without --json-key, non-string value, invalid UTF-8,
  empty document, a record (line, block, JSON line) longer than --max-record-bytes (it is
  skipped without being read into memory)
documents over 1 MiB are tokenized in pieces cut at whitespace and kept as one document (the
same tokens as whole for byte-level BPE tokenizers such as moe-train-tokenizer's)

output is written to hidden temporary files and renamed to PREFIX.bin, then PREFIX.idx at the
very end, so an interrupted run never leaves a complete-looking pair.
exit codes: 0 ok, 2 bad input (one line on stderr), 130 Ctrl-C, 143 SIGTERM.
"""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE",
                        help="input files (.txt, .jsonl, .jsonl.gz)")
    parser.add_argument("--output-prefix", required=True, metavar="PREFIX",
                        help="writes PREFIX.bin and PREFIX.idx (the directory must exist)")
    parser.add_argument("--tokenizer", required=True, metavar="PATH",
                        help="SentencePiece .model file or Hugging Face tokenizer directory")
    parser.add_argument("--json-key", default="text", help="JSONL field holding the text")
    parser.add_argument("--append-eod", action="store_true",
                        help="append the end-of-document token to every document")
    parser.add_argument("--workers", type=int_arg(1, 1024), default=1, help="tokenizer processes")
    parser.add_argument("--strict", action="store_true", help="fail on the first bad record")
    parser.add_argument("--txt-mode", choices=("blocks", "lines"), default="blocks",
                        help="how .txt files split into documents (see below)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--max-record-bytes", type=int_arg(1, 2**40),
                        default=DEFAULT_MAX_RECORD_BYTES, metavar="N",
                        help="skip (--strict: refuse) longer records (default "
                             f"{DEFAULT_MAX_RECORD_BYTES} = 32 MiB)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_preprocess, argv)


def _preprocess(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    # why inside: tokenizers and megatron-core take seconds to import; --help does not wait
    from megatron_ext.data.preprocess import preprocess

    report = preprocess(
        args.input,
        args.output_prefix,
        args.tokenizer,
        json_key=args.json_key,
        append_eod=args.append_eod,
        workers=args.workers,
        strict=args.strict,
        txt_mode=args.txt_mode,
        progress=not args.no_progress,
        max_record_bytes=args.max_record_bytes,
    )
    print(report.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
