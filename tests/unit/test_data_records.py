"""The bounded record reader (megatron_ext/data/records.py) on real files.

Guarantees shown: byte ranges cut anywhere (inside a line, a CRLF, a UTF-8 character, a block)
give, range after range, exactly the records and line numbers of one whole-file read; a record
over the limit comes out as None without being held, a whitespace-only one is a blank line
whichever reader meets it; long texts split at whitespace, never inside a character; a small
file is read with a bound on the total (/dev/zero ends). Through preprocessing (every format,
any chunking) over-limit records are counted with their line numbers, long documents get the
tokens of whole ones; tokenizer training counts them too and reads .txt as the tokenizers
library's own reader did. The same class under real memory limits: test_record_bounds.py.
"""

from __future__ import annotations

import gzip
import io
import json
import random
from pathlib import Path

import pytest

from megatron_ext.data.chunks import encode_documents
from megatron_ext.data.errors import DataError
from megatron_ext.data.preprocess import preprocess
from megatron_ext.data.records import (
    PIECE_BYTES,
    RecordReader,
    read_line,
    read_prompts_file,
    read_text,
    split_pieces,
)
from megatron_ext.data.tokenizer import load_tokenizer
from megatron_ext.data.tokenizer_training import train_bpe_tokenizer
from tests.conftest import REPO

CORPUS = REPO / "data" / "corpus"
EN = (CORPUS / "en_shakespeare.txt").read_text(encoding="utf-8")
TOO_LONG = "record longer than --max-record-bytes"

NASTY = (
    "first line\r\nsecond line\n\n  \t\nblock one, line one\nblock one, line two ü\n\n\n"
    "日本語の文書、改行なしで続く\r\n\r\nx\n" + "long " * 30 + "\n \n\x0c\n"
    "{\"text\": \"json é\"}\nlast without newline"
).encode()


def _whole(data: bytes, blocks: bool, limit: int) -> tuple[list, int, int]:
    reader = RecordReader(io.BytesIO(data), blocks=blocks, limit=limit)
    return list(reader), reader.lines, reader.blank_lines


def _by_ranges(path: Path, cuts: list[int], blocks: bool, limit: int) -> tuple[list, int, int]:
    """Read [0, c1), [c1, c2), ... each with its own reader; line numbers made absolute."""
    records, lines, blanks = [], 0, 0
    bounds = [0, *cuts, None]
    with open(path, "rb") as handle:
        for start, end in zip(bounds, bounds[1:], strict=False):
            reader = RecordReader(handle, blocks=blocks, limit=limit, start=start, end=end)
            records += [(lines + n, rec) for n, rec in reader]
            lines += reader.lines
            blanks += reader.blank_lines
    return records, lines, blanks


def _reference(data: bytes, blocks: bool) -> list[bytes]:
    """What Python's own line iteration makes of the data (the reader before the bounds)."""
    docs: list[bytes] = []
    block: list[bytes] = []
    for line in io.BytesIO(data):
        if not line.strip():
            if block:
                docs.append(b"".join(block).rstrip(b"\r\n"))
                block = []
        elif blocks:
            block.append(line)
        else:
            docs.append(line.rstrip(b"\r\n"))
    if block:
        docs.append(b"".join(block).rstrip(b"\r\n"))
    return docs


@pytest.mark.parametrize("blocks", [True, False])
def test_ranges_cut_anywhere_read_every_record_once(blocks: bool, tmp_path: Path) -> None:
    path = tmp_path / "nasty.txt"
    path.write_bytes(NASTY)
    whole = _whole(NASTY, blocks, limit=1 << 20)
    assert [rec for _, rec in whole[0]] == _reference(NASTY, blocks)
    for cut in range(1, len(NASTY)):  # every single boundary: CRLF, UTF-8, blank runs, blocks
        assert _by_ranges(path, [cut], blocks, 1 << 20) == whole, cut
    rng = random.Random(0)
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(NASTY)), rng.randint(2, 40)))
        assert _by_ranges(path, cuts, blocks, 1 << 20) == whole, cuts


@pytest.mark.parametrize("blocks", [True, False])
def test_records_over_the_limit_are_none_and_agree_across_ranges(blocks: bool,
                                                                  tmp_path: Path) -> None:
    data = (b"short\n" + b"x" * 5000 + b"\nafter\n\n" + b" " * 5000 + b"\n"  # a long blank line
            b"ok\n\n" + b"y" * 3000 + b" tail\nnext line of the long block\n\nend\n")
    path = tmp_path / "long.txt"
    path.write_bytes(data)
    whole = _whole(data, blocks, limit=1000)
    expected = ([(1, None), (6, b"ok"), (8, None), (11, b"end")] if blocks else
                [(1, b"short"), (2, None), (3, b"after"), (6, b"ok"), (8, None),
                 (9, b"next line of the long block"), (11, b"end")])
    assert whole == (expected, 11, 4)  # the line of 5000 spaces is blank, not too long
    for cut in list(range(1, 40)) + list(range(4990, 5020)) + list(range(10000, len(data))):
        assert _by_ranges(path, [cut], blocks, 1000) == whole, cut


def test_read_line_holds_at_most_the_limit() -> None:
    handle = io.BytesIO(b"a" * 10_000_000 + b"\nnext\n" + b"\t " * 3_000_000)
    assert read_line(handle, 100) == (None, 10_000_001)
    assert read_line(handle, 100) == (b"next\n", 5)
    assert read_line(handle, 100) == (b"\n", 6_000_000)  # whitespace only: a blank line
    assert read_line(handle, 100) == (b"", 0)


def test_split_pieces_cuts_at_whitespace_never_inside_a_character() -> None:
    text = ("word " * 50 + "\n") * 40
    pieces = split_pieces(text.encode(), 1000)
    assert b"".join(pieces) == text.encode() and all(len(p) <= 1000 for p in pieces)
    assert all(p[:1].isspace() for p in pieces[1:])  # every cut just before whitespace
    assert all(not p[-1:].isspace() for p in pieces[:-1])
    japanese = ("吾輩は猫である名前はまだ無い" * 500).encode()  # no whitespace at all
    pieces = split_pieces(japanese, 1001)
    assert b"".join(pieces) == japanese and all(len(p) <= 1001 for p in pieces)
    assert "".join(p.decode("utf-8") for p in pieces) == japanese.decode()  # each decodes
    assert split_pieces(b"short", 1000) == [b"short"]


def test_small_files_are_read_with_a_bound(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"^/dev/zero: prompts file larger than 4096 bytes "):
        read_text("/dev/zero", 4096, "--max-prompts-bytes", "prompts file")
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\n\n  \ntwo\r\nthree", encoding="utf-8")
    assert read_prompts_file(prompts, 4096) == ["one", "two", "three"]
    with pytest.raises(DataError, match="larger than 1024 bytes"):
        prompts.write_text("x" * 1025, encoding="utf-8")
        read_prompts_file(prompts, 1024)
    with pytest.raises(DataError, match="must be an integer number of bytes"):
        read_prompts_file(prompts, -1)


# ---- through preprocessing and tokenizer training: every format, line numbers, pieces ----
@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("tok")
    (root / "en.txt").write_text(EN[:60_000], encoding="utf-8")
    (root / "ja.txt").write_text((CORPUS / "ja_neko.txt").read_text(encoding="utf-8")[:30_000],
                                 encoding="utf-8")
    return train_bpe_tokenizer([str(root / "en.txt"), str(root / "ja.txt")], 500,
                               str(root / "bpe"))


@pytest.mark.parametrize("kind", ["txt", "txt-lines", "jsonl", "jsonl.gz"])
def test_too_long_records_are_counted_with_their_lines(kind: str, tok_dir: str,
                                                       tmp_path: Path) -> None:
    long = "word " * 400  # 2000 bytes, over a limit of 1024
    docs = ["short one", long, "after it", " " * 3000, long + "\nsecond line", "last"]
    if kind.startswith("txt"):
        data = "\n\n".join(docs).encode()
    else:
        data = "".join(json.dumps({"text": d}) + "\n" if d.strip() else d + "\n"
                       for d in docs).encode()
    path = tmp_path / f"in.{kind.removesuffix('-lines')}"
    path.write_bytes(gzip.compress(data) if kind == "jsonl.gz" else data)
    mode = "lines" if kind == "txt-lines" else "blocks"
    for workers, chunk_bytes in [(1, 256 * 1024), (2, 300)]:  # 300: one line over many chunks
        report = preprocess([str(path)], str(tmp_path / "o"), tok_dir, txt_mode=mode,
                            workers=workers, chunk_bytes=chunk_bytes, max_record_bytes=1024)
        too_long = {"txt": [3, 9], "txt-lines": [3, 9]}.get(kind, [2, 5])
        assert report.examples["too_long"] == [f"{path}:{n}" for n in too_long]
        assert report.documents == {"txt": 3, "txt-lines": 4}.get(kind, 3)
    with pytest.raises(DataError, match=rf"^{path}:{too_long[0]}: {TOO_LONG} \(--strict\)$"):
        preprocess([str(path)], str(tmp_path / "s"), tok_dir, txt_mode=mode, strict=True,
                   max_record_bytes=1024)
    with pytest.raises(DataError, match="--max-record-bytes must be an integer"):
        preprocess([str(path)], str(tmp_path / "s"), tok_dir, max_record_bytes=0)


def test_long_documents_get_the_tokens_of_whole_ones(tok_dir: str, tmp_path: Path) -> None:
    tok = load_tokenizer(tok_dir)
    # byte-level BPE: pieces cut before whitespace give the same tokens as the whole text
    # (the Japanese novel has 31 KB lines without a space: 64 KiB pieces find a newline)
    for name, piece_bytes in [("en_shakespeare", 4096), ("code_python", 4096),
                              ("ja_neko", 65536)]:
        text = (CORPUS / f"{name}.txt").read_text(encoding="utf-8")[:200_000]
        pieced = encode_documents(tok, [text], piece_bytes)[0]
        assert pieced.tolist() == tok.encode(text), name
    no_space = "吾輩は猫である。名前はまだ無い。" * 500  # cut between characters only
    assert tok.decode(encode_documents(tok, [no_space], 1000)[0].tolist()) == no_space
    # end to end: a document over PIECE_BYTES, tokenized in pieces, written as one document
    block = "\n".join(line for line in EN.splitlines() if line.strip())
    document = (block + "\n") * (PIECE_BYTES // len(block) + 2)
    (tmp_path / "long.txt").write_text(document, encoding="utf-8")
    report = preprocess([str(tmp_path / "long.txt")], str(tmp_path / "o"), tok_dir)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(tmp_path / "o"))  # kept: its items are views of its mmap
    assert report.documents == 1 and len(document.encode()) > PIECE_BYTES
    assert dataset[0].tolist() == tok.encode(document.rstrip("\n"))


def test_tokenizer_training_reads_txt_as_the_library_does(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    files = []
    for name in ("en_shakespeare", "ja_neko"):
        files.append(str(tmp_path / f"{name}.txt"))
        Path(files[-1]).write_text((CORPUS / f"{name}.txt").read_text(encoding="utf-8")[:50_000],
                                   encoding="utf-8")
    ours = train_bpe_tokenizer(files, 600, str(tmp_path / "ours"))
    reference = Tokenizer(models.BPE())  # the same trainer fed by the library's file reader
    reference.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    reference.decoder = decoders.ByteLevel()
    reference.train(files, trainers.BpeTrainer(
        vocab_size=600, min_frequency=2, special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    assert Tokenizer.from_file(f"{ours}/tokenizer.json").to_str() == reference.to_str()
    (tmp_path / "bad.jsonl").write_text('{"text": "' + "x " * 800 + '"}\n{"text": "ok"}\n',
                                        encoding="utf-8")
    skipped: dict = {}
    train_bpe_tokenizer([str(tmp_path / "bad.jsonl")], 600, str(tmp_path / "t2"),
                        max_record_bytes=1024, skipped=skipped)
    assert skipped == {"too_long": {"count": 1, "first": f"{tmp_path / 'bad.jsonl'}:1"}}
    with pytest.raises(DataError, match=rf"bad.jsonl:1: {TOO_LONG} \(--strict\)"):
        train_bpe_tokenizer([str(tmp_path / "bad.jsonl")], 600, str(tmp_path / "t3"),
                            max_record_bytes=1024, strict=True)

