"""Preprocessing through the library: round trips, bad-record accounting, --strict, atomicity."""

from __future__ import annotations

import gzip
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from megatron_ext.data.errors import DataError
from megatron_ext.data.preprocess import preprocess
from megatron_ext.data.tokenizer import load_tokenizer
from megatron_ext.data.tokenizer_training import train_bpe_tokenizer

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "data" / "corpus"


def _indexed(prefix: str):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(prefix)


@pytest.fixture(scope="module")
def texts() -> dict[str, str]:
    return {
        "en": (CORPUS / "en_shakespeare.txt").read_text(encoding="utf-8")[:40_000],
        "ja": (CORPUS / "ja_neko.txt").read_text(encoding="utf-8")[:20_000],
    }


@pytest.fixture(scope="module")
def tok_dir(texts: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("tok")
    files = []
    for name, text in texts.items():
        (root / f"{name}.txt").write_text(text, encoding="utf-8")
        files.append(str(root / f"{name}.txt"))
    return train_bpe_tokenizer(files, 400, str(root / "bpe"))


def _documents(texts: dict[str, str]) -> list[str]:
    """Expected documents of the blocks mode: blank-line separated, internal newlines kept."""
    docs = []
    for text in texts.values():
        blocks = [b.strip("\n") for b in text.replace("\r\n", "\n").split("\n\n")]
        docs += [b for b in blocks if b.strip()]
    return docs


def _write_input(kind: str, docs: list[str], path: Path) -> None:
    if kind == "txt":
        path.write_text("\n\n\n".join(docs) + "\n", encoding="utf-8")
        return
    lines = "".join(json.dumps({"text": d, "id": i}, ensure_ascii=False) + "\n"
                    for i, d in enumerate(docs))
    opener = gzip.open if kind == "jsonl.gz" else open
    with opener(path, "wt", encoding="utf-8") as handle:
        handle.write(lines)


def _read_back(prefix: str, tok_dir: str, eod: bool = True) -> list[str]:
    tok = load_tokenizer(tok_dir)
    dataset = _indexed(prefix)
    out = []
    for i in range(len(dataset)):
        ids = dataset[i].tolist()
        if eod:
            assert ids[-1] == tok.eod and tok.eod not in ids[:-1]
            ids = ids[:-1]
        out.append(tok.decode(ids))
    return out


@pytest.mark.parametrize("kind", ["txt", "jsonl", "jsonl.gz"])
def test_round_trip(kind: str, texts: dict[str, str], tok_dir: str, tmp_path: Path) -> None:
    docs = [d for d in _documents(texts) if "\n\n" not in d]
    path = tmp_path / f"corpus.{kind}"
    _write_input(kind, docs, path)
    report = preprocess([str(path)], str(tmp_path / "out"), tok_dir, append_eod=True)
    assert report.documents == len(docs) and not report.skipped
    assert _read_back(str(tmp_path / "out"), tok_dir) == docs
    assert report.tokens == int(_indexed(str(tmp_path / "out")).sequence_lengths.sum())
    assert _indexed(str(tmp_path / "out")).index.dtype == np.uint16  # vocab 400 < 65500
    assert sorted(os.listdir(tmp_path)) == sorted([path.name, "out.bin", "out.idx"])


def test_txt_lines_mode_and_multiple_files(tok_dir: str, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("line one\n\nline two\r\nline three\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"body": "from json"}\n', encoding="utf-8")
    files = [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]
    report = preprocess(files, str(tmp_path / "o"), tok_dir, json_key="body", txt_mode="lines")
    assert report.documents == 4 and report.blank_lines == 1
    assert _read_back(str(tmp_path / "o"), tok_dir, eod=False) == [
        "line one", "line two", "line three", "from json"]


def test_workers_preserve_order(texts: dict[str, str], tok_dir: str, tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    _write_input("jsonl", _documents(texts), path)
    one = preprocess([str(path)], str(tmp_path / "w1"), tok_dir, append_eod=True, workers=1)
    # Tiny chunks: dozens of chunks in flight across 2 processes, results must stay in order.
    two = preprocess([str(path)], str(tmp_path / "w2"), tok_dir, append_eod=True, workers=2,
                     chunk_bytes=2048)
    assert (one.documents, one.tokens) == (two.documents, two.tokens)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"w1{suffix}").read_bytes() == (tmp_path / f"w2{suffix}").read_bytes()


BAD_JSONL = [
    b'{"text": "good one"}',          # 1
    b'{"text": "broken',              # 2 malformed_json
    b'{"title": "no text key"}',      # 3 missing_key
    b'',                              # 4 blank line: ignored, not an error
    b'{"text": 42}',                  # 5 not_a_string
    b'{"text": "bad \xff\xfe bytes"}',  # 6 invalid_utf8
    b'{"text": "   "}',               # 7 empty_document
    b'["a", "list"]',                 # 8 malformed_json (not an object)
    b'{"text": "lone \\ud800 surrogate"}',  # 9 invalid_utf8 (cannot be encoded)
    b'{"text": "good two"}',          # 10
]


def test_bad_records_are_counted(tok_dir: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(BAD_JSONL) + b"\n")
    report = preprocess([str(path)], str(tmp_path / "o"), tok_dir)
    assert report.documents == 2 and report.blank_lines == 1
    assert report.skipped == {"malformed_json": 2, "missing_key": 1, "not_a_string": 1,
                              "invalid_utf8": 2, "empty_document": 1}
    assert report.examples["malformed_json"] == [f"{path}:2", f"{path}:8"]
    assert report.examples["invalid_utf8"] == [f"{path}:6", f"{path}:9"]
    assert report.examples["empty_document"] == [f"{path}:7"]
    text = report.format()
    assert f"skipped missing_key (JSON object without the text key): 1 (first: {path}:3)" in text
    assert _read_back(str(tmp_path / "o"), tok_dir, eod=False) == ["good one", "good two"]


def test_examples_are_capped(tok_dir: str, tmp_path: Path) -> None:
    path = tmp_path / "many.jsonl"
    path.write_text('{"text": "ok"}\n' + "{oops\n" * 12, encoding="utf-8")
    report = preprocess([str(path)], str(tmp_path / "o"), tok_dir)
    assert report.skipped == {"malformed_json": 12}
    assert report.examples["malformed_json"] == [f"{path}:{n}" for n in range(2, 7)]


def test_invalid_utf8_in_txt_block_names_the_line(tok_dir: str, tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_bytes(b"fine block\n\nfirst line\nsecond \xc3\x28 line\nthird\n\nlast block\n")
    report = preprocess([str(path)], str(tmp_path / "o"), tok_dir)
    assert report.documents == 2 and report.examples["invalid_utf8"] == [f"{path}:4"]


def test_strict_fails_on_first_bad_record_and_leaves_nothing(tok_dir: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(BAD_JSONL) + b"\n")
    with pytest.raises(DataError, match=rf"^{path}:2: malformed JSON line \(--strict\)$"):
        preprocess([str(path)], str(tmp_path / "o"), tok_dir, strict=True, workers=2)
    assert os.listdir(tmp_path) == ["bad.jsonl"]


@pytest.mark.parametrize(
    "name, content, message",
    [("all_bad.jsonl", b"{x\n{y\n", "no documents to write: all 2 records"),
     ("empty.txt", b"", "no documents to write"),
     ("broken.jsonl.gz", b"this is not gzip", "cannot read"),
     ("data.csv", b"a,b\n", "unsupported input type")],
)
def test_unusable_inputs(
    name: str, content: bytes, message: str, tok_dir: str, tmp_path: Path
) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message):
        preprocess([str(tmp_path / name)], str(tmp_path / "o"), tok_dir)
    assert os.listdir(tmp_path) == [name]


def test_argument_errors(tok_dir: str, tmp_path: Path) -> None:
    good = tmp_path / "g.txt"
    good.write_text("hello\n")
    with pytest.raises(DataError, match="input file not found"):
        preprocess([str(tmp_path / "missing.txt")], str(tmp_path / "o"), tok_dir)
    with pytest.raises(DataError, match="output directory does not exist"):
        preprocess([str(good)], str(tmp_path / "no" / "o"), tok_dir)
    with pytest.raises(DataError, match="tokenizer not found"):
        preprocess([str(good)], str(tmp_path / "o"), str(tmp_path / "tok"))
    with pytest.raises(DataError, match="unknown txt mode"):
        preprocess([str(good)], str(tmp_path / "o"), tok_dir, txt_mode="paragraphs")
    with pytest.raises(DataError, match="workers"):
        preprocess([str(good)], str(tmp_path / "o"), tok_dir, workers=0)
    assert os.listdir(tmp_path) == ["g.txt"]


def test_rerun_replaces_previous_output(tok_dir: str, tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    path.write_text("first version\n")
    preprocess([str(path)], str(tmp_path / "o"), tok_dir)
    path.write_text("second\n\nversion\n")
    preprocess([str(path)], str(tmp_path / "o"), tok_dir)
    assert _read_back(str(tmp_path / "o"), tok_dir, eod=False) == ["second", "version"]
    assert sorted(os.listdir(tmp_path)) == ["o.bin", "o.idx", "x.txt"]


def test_sentencepiece_tokenizer_preprocesses(tmp_path: Path, texts: dict[str, str]) -> None:
    import sentencepiece as spm

    (tmp_path / "en.txt").write_text(texts["en"], encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "en.txt"), model_prefix=str(tmp_path / "sp"), vocab_size=300,
        model_type="bpe", minloglevel=2,
    )
    report = preprocess([str(tmp_path / "en.txt")], str(tmp_path / "o"),
                        str(tmp_path / "sp.model"), append_eod=True)
    dataset = _indexed(str(tmp_path / "o"))
    assert len(dataset) == report.documents > 100
    assert all(dataset[i][-1] == 2 for i in range(len(dataset)))  # SentencePiece </s> id


# ---- chunked work: any chunking and any number of workers write the same bytes ----

NASTY_DOCS = ["first document, one line", "a block\r\nof three lines ü\nwith CRLF",
              "日本語の文書です。改行も\nあります", "x", "tabs\tand  spaces  ", "é" * 300]


def _nasty_input(kind: str, path: Path) -> None:
    if kind.startswith("txt"):
        seps = ["\n\n", "\r\n\r\n", "\n \t\n", "\n\n\n", "\n\x0c\n"]
        body = "".join(d + seps[i % len(seps)] for i, d in enumerate(NASTY_DOCS * 4))
        path.write_bytes(body.rstrip("\n").encode())  # no newline at the very end
        return
    lines = "".join(json.dumps({"text": d}, ensure_ascii=i % 2 == 0) + ("\r\n" if i % 3 else "\n")
                    for i, d in enumerate(NASTY_DOCS * 4))
    data = lines.encode()
    path.write_bytes(gzip.compress(data, mtime=0) if kind == "jsonl.gz" else data)


def _expected_documents(kind: str, path: Path) -> list[str]:
    """The documents by Python's own line iteration (how the reader worked before chunks);
    ``kind`` "txt": blank-line separated blocks, "txt-lines": lines, "jsonl(.gz)": JSON lines."""
    data = gzip.decompress(path.read_bytes()) if kind == "jsonl.gz" else path.read_bytes()
    docs: list[bytes] = []
    block: list[bytes] = []
    for line in io.BytesIO(data):
        if not line.strip():
            if block:
                docs.append(b"".join(block).rstrip(b"\r\n"))
                block = []
        elif kind == "txt":
            block.append(line)
        else:
            docs.append(line.rstrip(b"\r\n"))
    if block:
        docs.append(b"".join(block).rstrip(b"\r\n"))
    texts = [d.decode("utf-8") for d in docs]
    return [json.loads(t)["text"] for t in texts] if kind.startswith("jsonl") else texts


def _per_document_writes(docs: list[str], tok_dir: str, prefix: str) -> None:
    """The reference: megatron-core's builder, one add_document per document (the old path)."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    tok = load_tokenizer(tok_dir)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(tok.vocab_size))
    for doc in docs:
        ids = tok.encode(doc) + [tok.eod]
        builder.add_document(np.array(ids), [len(ids)])
    builder.finalize(prefix + ".idx")


@pytest.mark.parametrize("kind", ["txt", "txt-lines", "jsonl", "jsonl.gz"])
def test_chunks_cut_anywhere_write_the_bytes_of_per_document_writes(
    kind: str, tok_dir: str, tmp_path: Path
) -> None:
    path = tmp_path / f"in.{kind.removesuffix('-lines')}"
    _nasty_input(kind, path)
    mode = "lines" if kind == "txt-lines" else "blocks"
    docs = _expected_documents(kind, path)
    _per_document_writes(docs, tok_dir, str(tmp_path / "ref"))
    expected = [(tmp_path / f"ref{s}").read_bytes() for s in (".bin", ".idx")]
    # chunk_bytes 1: a chunk boundary at every byte -- inside documents, lines, UTF-8
    # characters and CRLFs; 7 and 100: boundaries at odd places, several per worker
    for workers, chunk_bytes in [(1, 256 * 1024), (3, 1), (3, 7), (2, 100)]:
        report = preprocess([str(path)], str(tmp_path / "out"), tok_dir, append_eod=True,
                            workers=workers, txt_mode=mode, chunk_bytes=chunk_bytes)
        assert report.documents == len(docs) and not report.skipped
        got = [(tmp_path / f"out{s}").read_bytes() for s in (".bin", ".idx")]
        assert got == expected, (workers, chunk_bytes)


def test_bad_record_lines_do_not_depend_on_chunks(tok_dir: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(BAD_JSONL * 3) + b"\n")
    reports = [preprocess([str(path)], str(tmp_path / "o"), tok_dir, workers=w, chunk_bytes=c)
               for w, c in [(1, 256 * 1024), (3, 5), (2, 64)]]
    assert all((r.skipped, r.examples, r.blank_lines) ==
               (reports[0].skipped, reports[0].examples, reports[0].blank_lines)
               for r in reports)
    assert reports[0].examples["malformed_json"] == [f"{path}:{n}" for n in (2, 8, 12, 18, 22)]
