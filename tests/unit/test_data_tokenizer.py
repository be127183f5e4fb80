"""Tokenizer loading (Hugging Face directory, SentencePiece .model), training and vocab padding."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_ext.config.derived import padded_vocab
from megatron_ext.config.loader import ConfigError, load_config
from megatron_ext.config.ranges import check_ranges
from megatron_ext.data.errors import DataError
from megatron_ext.data.tokenizer import load_tokenizer
from megatron_ext.data.tokenizer_training import EOD_TOKEN, PAD_TOKEN, train_bpe_tokenizer

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "data" / "corpus"
EN_SAMPLE = "First Citizen:\nBefore we proceed any further, hear me speak.\n\n  Odd  spacing\t!"
JA_SAMPLE = "吾輩わがはいは猫である。名前はまだ無い。\n　どこで生れたかとんと見当がつかぬ。🐈"


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("corpus")
    paths = []
    for name, chars in (("en_shakespeare.txt", 60_000), ("ja_neko.txt", 30_000)):
        text = (CORPUS / name).read_text(encoding="utf-8")[:chars]
        (root / name).write_text(text, encoding="utf-8")
        paths.append(str(root / name))
    return paths


@pytest.fixture(scope="module")
def bpe_dir(small_corpus: list[str], tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("tok") / "bpe"
    return train_bpe_tokenizer(small_corpus, 400, str(out))


def test_trained_bpe_loads_and_round_trips(bpe_dir: str) -> None:
    tok = load_tokenizer(bpe_dir)
    assert tok.vocab_size == 400
    assert tok.eod == tok.token_to_id(EOD_TOKEN) == 0
    assert tok.pad_id == tok.token_to_id(PAD_TOKEN) == 1
    for text in (EN_SAMPLE, JA_SAMPLE):
        ids = tok.encode(text)
        assert ids and max(ids) < tok.vocab_size
        assert tok.decode(ids) == text  # byte-level BPE is lossless, even for unseen emoji
        assert tok.encode_batch([text, text]) == [ids, ids]
    assert os.stat(bpe_dir).st_mode & 0o055 == 0o055, "tokenizer dir must not stay private"


def test_trained_bpe_loads_with_transformers(bpe_dir: str) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(bpe_dir)
    ours = load_tokenizer(bpe_dir)
    assert hf.eos_token == EOD_TOKEN and hf.eos_token_id == ours.eod
    assert hf.pad_token_id == ours.pad_id
    ids = hf(JA_SAMPLE, add_special_tokens=False)["input_ids"]
    assert ids == ours.encode(JA_SAMPLE)
    assert hf.decode(ids) == JA_SAMPLE


def test_tokenizer_pickles_by_path(bpe_dir: str) -> None:
    tok = pickle.loads(pickle.dumps(load_tokenizer(bpe_dir)))
    assert tok.decode(tok.encode(EN_SAMPLE)) == EN_SAMPLE
    assert tok.unique_identifiers["sha256"] == load_tokenizer(bpe_dir).sha256


def test_sentencepiece_model(small_corpus: list[str], tmp_path: Path) -> None:
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        input=small_corpus[0], model_prefix=str(tmp_path / "sp"), vocab_size=300,
        model_type="bpe", minloglevel=2,
    )
    tok = load_tokenizer(str(tmp_path / "sp.model"))
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    assert tok.vocab_size == 300 == sp.get_piece_size()
    assert tok.eod == sp.eos_id() >= 0
    text = "Before we proceed any further, hear me speak."
    assert tok.encode(text) == sp.encode(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch([text]) == [sp.encode(text)]


# The one padding rule (config.derived.padded_vocab): up to a multiple of model.vocab_multiple,
# independent of the tensor-parallel size, so a checkpoint loads at any TP.
@pytest.mark.parametrize(
    "vocab, multiple, tp, expected",
    [(4096, 128, 1, 4096), (4097, 128, 1, 4224), (400, 128, 1, 512), (300, 128, 4, 384),
     (50257, 128, 8, 50304), (1, 64, 1, 64)],
)
def test_padded_vocab_size(vocab: int, multiple: int, tp: int, expected: int) -> None:
    cfg = load_config(None, [f"model.vocab_size={vocab}", f"model.vocab_multiple={multiple}",
                             f"parallel.tensor={tp}"])
    assert padded_vocab(cfg.model) == expected


def test_padded_vocab_size_rejects_nonpositive() -> None:
    for override in ("model.vocab_size=0", "model.vocab_multiple=0"):
        with pytest.raises(ConfigError, match=override.split("=")[0]):
            check_ranges(load_config(None, [override]))


def test_load_errors_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "vocab.txt").write_text("a\n")
    (tmp_path / "broken.model").write_bytes(b"not a sentencepiece model")
    cases = {
        str(tmp_path / "missing"): "tokenizer not found",
        str(tmp_path / "empty_dir"): "not a tokenizer directory",
        str(tmp_path / "vocab.txt"): "unsupported tokenizer file",
        str(tmp_path / "broken.model"): "cannot load SentencePiece model",
        "": "no tokenizer path",
    }
    for path, message in cases.items():
        with pytest.raises(DataError, match=message) as info:
            load_tokenizer(path)
        assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


def test_training_refuses_bad_requests(small_corpus: list[str], tmp_path: Path) -> None:
    with pytest.raises(DataError, match="too small"):
        train_bpe_tokenizer(small_corpus, 200, str(tmp_path / "t"))
    with pytest.raises(DataError, match="input file not found"):
        train_bpe_tokenizer([str(tmp_path / "nope.txt")], 400, str(tmp_path / "t"))
    assert not (tmp_path / "t").exists()
    (tmp_path / "t").mkdir()
    with pytest.raises(DataError, match="--overwrite"):
        train_bpe_tokenizer(small_corpus, 400, str(tmp_path / "t"))
    train_bpe_tokenizer(small_corpus, 300, str(tmp_path / "t"), overwrite=True)
    assert load_tokenizer(str(tmp_path / "t")).vocab_size == 300
    assert sorted(os.listdir(tmp_path)) == ["t"], "no temporary or backup directories left"


def test_training_reads_jsonl(small_corpus: list[str], tmp_path: Path) -> None:
    import gzip
    import json

    lines = Path(small_corpus[1]).read_text(encoding="utf-8").splitlines()
    with gzip.open(tmp_path / "ja.jsonl.gz", "wt", encoding="utf-8") as handle:
        for line in lines:
            handle.write(json.dumps({"content": line}, ensure_ascii=False) + "\n")
    out = train_bpe_tokenizer([str(tmp_path / "ja.jsonl.gz")], 320, str(tmp_path / "t"),
                              json_key="content")
    tok = load_tokenizer(out)
    assert tok.vocab_size == 320 and tok.decode(tok.encode(JA_SAMPLE)) == JA_SAMPLE
    # merges were learned from the Japanese text, not from JSON syntax
    assert len(tok.encode(lines[2])) < 0.75 * len(lines[2].encode("utf-8"))


def test_train_tokenizer_cli(small_corpus: list[str], tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = [sys.executable, "-m", "megatron_ext.cli.train_tokenizer", "--input", *small_corpus,
           "--vocab-size", "350"]
    ok = subprocess.run([*run, "--output", str(tmp_path / "cli")], env=env,
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "vocab_size=350 eod=0" in ok.stdout
    bad = subprocess.run([*run, "--output", str(tmp_path / "cli")], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"error: output exists: {tmp_path / 'cli'} (pass --overwrite to replace it)"
    ]
