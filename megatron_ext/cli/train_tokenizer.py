"""Train a byte-level BPE tokenizer (special tokens <|endoftext|> = EOD, <pad>) into a Hugging
Face tokenizer directory that transformers.AutoTokenizer and megatron_ext load."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from megatron_ext.config.args import field_arg, int_arg
from megatron_ext.data.records import DEFAULT_MAX_RECORD_BYTES
from megatron_ext.platform.cli import ArgumentParser, run_cli


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE",
                        help="training text (.txt, .jsonl, .jsonl.gz)")
    parser.add_argument("--vocab-size", type=field_arg("model.vocab_size"), required=True,
                        metavar="N",
                        help="vocabulary size including the 256 bytes and special tokens")
    parser.add_argument("--output", required=True, metavar="DIR", help="tokenizer directory")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DIR")
    parser.add_argument("--json-key", default="text", help="JSONL field holding the text")
    parser.add_argument("--min-frequency", type=int_arg(1, 2**31 - 1), default=2,
                        help="minimum pair count to merge")
    parser.add_argument("--max-record-bytes", type=int_arg(1, 2**40),
                        default=DEFAULT_MAX_RECORD_BYTES, metavar="N",
                        help="leave out longer lines/records, counted (default "
                             f"{DEFAULT_MAX_RECORD_BYTES} = 32 MiB)")
    parser.add_argument("--strict", action="store_true",
                        help="fail on the first record left out (too long, bad JSON, ...)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_train, argv)


def _train(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    # why inside: tokenizers takes a moment to import; --help does not wait
    from megatron_ext.data.tokenizer import load_tokenizer
    from megatron_ext.data.tokenizer_training import train_bpe_tokenizer

    out = train_bpe_tokenizer(
        args.input,
        args.vocab_size,
        args.output,
        overwrite=args.overwrite,
        min_frequency=args.min_frequency,
        json_key=args.json_key,
        max_record_bytes=args.max_record_bytes,
        strict=args.strict,
        skipped=(skipped := {}),
    )
    tok = load_tokenizer(out)
    print(f"wrote {out}: vocab_size={tok.vocab_size} eod={tok.eod} pad={tok.pad_id}")
    for reason, left_out in skipped.items():
        print(f"skipped {reason}: {left_out['count']} (first: {left_out['first']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
