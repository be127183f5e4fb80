"""Train a byte-level BPE tokenizer with the ``tokenizers`` library.

The output directory loads with ``transformers.AutoTokenizer.from_pretrained(DIR)`` and with
``megatron_ext.data.tokenizer.load_tokenizer(DIR)``. Byte-level BPE (GPT-2 style) never produces an
unknown token, so any UTF-8 text, Japanese included, round-trips exactly through encode/decode.

Special tokens get the lowest ids in the order given: ``<|endoftext|>`` (end of document, also
used as BOS/EOS by the Hugging Face config, as in GPT-2) is id 0 and ``<pad>`` is id 1.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence

from megatron_ext.data.chunks import text_pieces
from megatron_ext.data.errors import DataError
from megatron_ext.data.preprocess import SKIP_REASONS, iter_valid_texts
from megatron_ext.data.records import (
    DEFAULT_MAX_RECORD_BYTES,
    READ_BUFFER,
    check_limit,
    read_line,
)
from megatron_ext.platform.fs import check_disjoint, recover_interrupted, staging

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
DEFAULT_SPECIAL_TOKENS = (EOD_TOKEN, PAD_TOKEN)
BYTE_ALPHABET_SIZE = 256


class _Skips:
    """Records left out of training, by reason; with ``strict`` the first one is fatal."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.counts: dict[str, int] = {}
        self.first: dict[str, str] = {}

    def __call__(self, reason: str, where: str) -> None:
        if self.strict:
            raise DataError(f"{where}: {SKIP_REASONS[reason]} (--strict)")
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.first.setdefault(reason, where)


def _txt_lines(path: str, limit: int, on_skip: _Skips) -> Iterator[str]:
    """Every line of a .txt file with its line ending, as the tokenizers library's own file
    reader feeds them to the trainer (same merges), but each at most ``limit`` bytes."""
    line_no = 0
    try:
        with open(path, "rb", buffering=READ_BUFFER) as handle:
            while True:
                line, taken = read_line(handle, limit)
                if not taken:
                    return
                line_no += 1
                if line is None:
                    on_skip("too_long", f"{path}:{line_no}")
                    continue
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError:
                    on_skip("invalid_utf8", f"{path}:{line_no}")
                    continue
                yield from text_pieces(text)
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None


def _iter_texts(inputs: Sequence[str], json_key: str, limit: int,
                on_skip: _Skips) -> Iterator[str]:
    if all(path.endswith(".txt") for path in inputs):
        for path in inputs:
            yield from _txt_lines(path, limit, on_skip)
        return
    # The preprocessing reader, so the tokenizer sees exactly the documents that get tokenized
    # later (and .jsonl/.jsonl.gz work); records that would be skipped are skipped here.
    yield from iter_valid_texts(inputs, json_key=json_key, max_record_bytes=limit,
                                on_skip=on_skip)


def train_bpe_tokenizer(
    inputs: Sequence[str],
    vocab_size: int,
    output_dir: str,
    overwrite: bool = False,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    min_frequency: int = 2,
    json_key: str = "text",
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    strict: bool = False,
    skipped: dict[str, dict] | None = None,
) -> str:
    """Train byte-level BPE on text files and write a Hugging Face tokenizer directory.

    ``inputs`` may be .txt, .jsonl or .jsonl.gz (``json_key`` selects the text field). The first
    special token is the end-of-document token. The directory is built next to ``output_dir`` under
    a temporary name and renamed into place, so a failed run leaves nothing at ``output_dir``.
    Inputs are read through ``megatron_ext.data.records``: a line (.txt) or record (.jsonl) over
    ``max_record_bytes`` is left out and counted into ``skipped`` (reason -> {"count", "first"
    file:line}, reasons as preprocessing's ``SKIP_REASONS``; ``strict``: the first is a
    DataError), and long texts are
    fed in pieces at whitespace (the trainer counts the same words). Returns ``output_dir``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not inputs:
        raise DataError("no input files given")
    check_limit(max_record_bytes, "--max-record-bytes")
    for path in inputs:
        if not os.path.isfile(path):
            raise DataError(f"input file not found: {path}")
    if not special_tokens or len(set(special_tokens)) != len(special_tokens):
        raise DataError(f"special tokens must be non-empty and unique, got {list(special_tokens)}")
    minimum = BYTE_ALPHABET_SIZE + len(special_tokens)
    if vocab_size <= minimum:
        raise DataError(
            f"vocab size {vocab_size} too small: byte-level BPE needs more than {minimum} "
            f"(256 byte tokens + {len(special_tokens)} special tokens)"
        )
    check_disjoint(output_dir, [("--input", path) for path in inputs], error=DataError)
    output_dir = os.path.normpath(output_dir)
    parent = os.path.dirname(os.path.abspath(output_dir))
    recover_interrupted(output_dir)  # an old output that a killed fallback swap left aside
    if os.path.exists(output_dir) and not overwrite:
        raise DataError(f"output exists: {output_dir} (pass --overwrite to replace it)")
    os.makedirs(parent, exist_ok=True)

    start = time.time()
    tokenizer = Tokenizer(models.BPE())
    # add_prefix_space=False keeps decode(encode(text)) == text for every text.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        # All 256 bytes up front, so text unseen in training still encodes without <unk>.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Not tokenizer.train(files): its reader holds a whole line, however long, in memory.
    on_skip = _Skips(strict)
    tokenizer.train_from_iterator(_iter_texts(inputs, json_key, max_record_bytes, on_skip),
                                  trainer)
    left_out = {reason: {"count": count, "first": on_skip.first[reason]}
                for reason, count in sorted(on_skip.counts.items())}
    if skipped is not None:
        skipped.update(left_out)

    with staging(output_dir) as tmp_dir:  # replaces a previous tokenizer whole, or not at all
        tokenizer.save(os.path.join(tmp_dir, "tokenizer.json"))
        _write_json(os.path.join(tmp_dir, "tokenizer_config.json"), _hf_config(special_tokens))
        _write_json(
            os.path.join(tmp_dir, "training_info.json"),
            {
                "inputs": [os.path.abspath(path) for path in inputs],
                "requested_vocab_size": vocab_size,
                "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
                "special_tokens": list(special_tokens),
                "min_frequency": min_frequency,
                "max_record_bytes": max_record_bytes,
                "skipped": left_out,
                "seconds": round(time.time() - start, 3),
            },
        )
    return output_dir


def _hf_config(special_tokens: Sequence[str]) -> dict:
    eod = special_tokens[0]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eod,
        "eos_token": eod,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        # Byte-level decode is already exact; transformers' space cleanup would break it.
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,
    }
    if PAD_TOKEN in special_tokens:
        config["pad_token"] = PAD_TOKEN
    return config


def _write_json(path: str, payload: dict) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, ensure_ascii=False)
        handle.write("\n")
