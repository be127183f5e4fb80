"""Damaged data is named, not traced back.

Guarantee: a truncated, corrupt or mismatched ``.bin``/``.idx`` pair, an empty dataset or token ids
outside the vocabulary are refused when the dataset is opened, with one ``DataError`` line naming
the file (``pretrain_moe.py``: exit 2, one stderr line, before the model is built); a damaged
megatron index cache is removed with one warning and rebuilt, never loaded; a damaged ``.gz``
input makes ``moe-preprocess`` and ``moe-train-tokenizer`` exit 2 with one line
naming the file, writing nothing. All damage is done to real files made by the real tools.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pytest

# After megatron_ext.data, whose import already silenced megatron's optional-GPU-library warnings.
from megatron.core.datasets.indexed_dataset import (  # noqa: E402
    IndexedDataset,
    IndexedDatasetBuilder,
)

from megatron_ext.data import integrity
from megatron_ext.data.datasets import build_gpt_datasets, max_token_id, token_counts
from megatron_ext.data.errors import DataError
from megatron_ext.data.integrity import check_indexed_dataset
from megatron_ext.data.preprocess import preprocess
from megatron_ext.data.tokenizer_training import train_bpe_tokenizer
from tests.conftest import REPO, run_cli

EN = (REPO / "data" / "corpus" / "en_shakespeare.txt").read_text(encoding="utf-8")
SEQ = 16
HEADER = 34  # magic 9, version 8, dtype 1, sequence count 8, document count 8


@pytest.fixture(scope="module")
def sound(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tokenizer (vocab 400) and a real dataset of ~100 documents made by preprocess()."""
    root = tmp_path_factory.mktemp("sound")
    (root / "en.txt").write_text(EN[:40_000], encoding="utf-8")
    tok = train_bpe_tokenizer([str(root / "en.txt")], 400, str(root / "tok"))
    preprocess([str(root / "en.txt")], str(root / "en"), tok, append_eod=True)
    return {"tok": tok, "prefix": str(root / "en")}


def _copy(prefix: str, dest: Path) -> str:
    out = str(dest / "data")
    for ext in (".bin", ".idx"):
        shutil.copyfile(prefix + ext, out + ext)
    return out


def _counts(prefix: str) -> tuple[int, int]:
    with open(prefix + ".idx", "rb") as handle:
        head = handle.read(HEADER)
    return struct.unpack("<QQ", head[18:34])


def _poke(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def _pointer_offset(prefix: str, i: int) -> int:
    sequences, _ = _counts(prefix)
    return HEADER + 4 * sequences + 8 * i


# Each damage: (what is done to a copy, which file the message must name, words it must contain)
DAMAGE = {
    "idx cut inside the magic": (lambda p: os.truncate(p + ".idx", 5), ".idx", "truncated"),
    "idx cut inside the header": (lambda p: os.truncate(p + ".idx", 20), ".idx", "truncated"),
    "idx cut inside the lengths": (lambda p: os.truncate(p + ".idx", HEADER + 10), ".idx",
                                   "truncated"),
    "idx cut by 3 bytes": (lambda p: os.truncate(p + ".idx", os.path.getsize(p + ".idx") - 3),
                           ".idx", "truncated"),
    "magic flipped": (lambda p: _poke(p + ".idx", 0, b"XX"), ".idx", "not a megatron"),
    "version bumped": (lambda p: _poke(p + ".idx", 9, struct.pack("<Q", 2)), ".idx",
                       "index version 2"),
    "dtype code unknown": (lambda p: _poke(p + ".idx", 17, b"\x63"), ".idx",
                           "unknown token dtype code 99"),
    "dtype float": (lambda p: _poke(p + ".idx", 17, b"\x06"), ".idx", "not an integer type"),
    "sequence count +1": (lambda p: _poke(p + ".idx", 18, struct.pack("<Q", _counts(p)[0] + 1)),
                          ".idx", "header is wrong"),
    "sequence count huge": (lambda p: _poke(p + ".idx", 18, struct.pack("<Q", 1 << 62)), ".idx",
                            "header is wrong"),
    "document count -1": (lambda p: _poke(p + ".idx", 26, struct.pack("<Q", _counts(p)[1] - 1)),
                          ".idx", "header is wrong"),
    "idx garbage of the same size": (
        lambda p: Path(p + ".idx").write_bytes(
            np.random.default_rng(0).bytes(os.path.getsize(p + ".idx"))),
        ".idx", "not a megatron"),
    "negative length": (lambda p: _poke(p + ".idx", HEADER + 4, struct.pack("<i", -7)), ".idx",
                        "negative length"),
    "pointer past the .bin": (
        lambda p: _poke(p + ".idx", _pointer_offset(p, _counts(p)[0] - 1),
                        struct.pack("<q", os.path.getsize(p + ".bin") + 4096)),
        ".idx", "corrupt pointers"),
    "pointers out of order": (
        lambda p: _poke(p + ".idx", _pointer_offset(p, 1), struct.pack("<q", 0)), ".idx",
        "corrupt pointers"),
    "document boundary past the end": (
        lambda p: _poke(p + ".idx", os.path.getsize(p + ".idx") - 8, struct.pack("<q", 10**6)),
        ".idx", "document boundaries"),
    "document boundary backwards": (
        lambda p: _poke(p + ".idx", os.path.getsize(p + ".idx") - 24, struct.pack("<q", 10**6)),
        ".idx", "goes backwards"),
    "bin truncated": (lambda p: os.truncate(p + ".bin", os.path.getsize(p + ".bin") // 2), ".bin",
                      "truncated"),
    "bin longer than described": (
        lambda p: os.truncate(p + ".bin", os.path.getsize(p + ".bin") + 64), ".bin",
        "not one pair"),
    "bin missing": (lambda p: os.remove(p + ".bin"), ".bin", "has no"),
    "idx missing": (lambda p: os.remove(p + ".idx"), ".idx", "has no"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_dataset_is_named_when_opened(damage: str, sound: dict, tmp_path: Path) -> None:
    prefix = _copy(sound["prefix"], tmp_path)
    change, file_suffix, words = DAMAGE[damage]
    change(prefix)
    with pytest.raises(DataError) as info:
        build_gpt_datasets([prefix], "1,0,0", SEQ, 1, (10, 0, 0), sound["tok"],
                           str(tmp_path / "cache"))
    message = str(info.value)
    assert prefix + file_suffix in message and words in message, message
    assert not (tmp_path / "cache").exists()  # refused before megatron built anything


def test_sound_datasets_match_megatrons_reader(sound: dict, tmp_path: Path) -> None:
    """The checks accept what megatron writes (uint16 and int32, multi-sequence documents) and
    agree with its reader; the copy used by the damage tests is itself sound."""
    summary = check_indexed_dataset(_copy(sound["prefix"], tmp_path))
    reference = IndexedDataset(sound["prefix"])
    assert (summary.sequences, summary.documents, summary.tokens) == (
        len(reference), len(reference.document_indices) - 1,
        int(reference.sequence_lengths.sum()))
    rng = np.random.default_rng(1)
    for dtype in (np.uint16, np.int32):
        prefix = str(tmp_path / dtype.__name__)
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
        for _ in range(30):
            lengths = list(rng.integers(1, 50, size=rng.integers(1, 4)))
            builder.add_document(rng.integers(0, 300, size=sum(lengths)), lengths)
        builder.finalize(prefix + ".idx")
        summary = check_indexed_dataset(prefix)
        reference = IndexedDataset(prefix)
        assert summary.dtype is dtype and summary.documents == 30
        assert summary.tokens == int(reference.sequence_lengths.sum()) == token_counts([prefix])[0]


def _build_raw(prefix: str, docs: list[list[int]], dtype=np.int32) -> str:
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in docs:
        builder.add_document(np.array(doc, dtype=np.int64), [len(doc)])
    builder.finalize(prefix + ".idx")
    return prefix


def test_empty_dataset_is_refused(tmp_path: Path) -> None:
    prefix = _build_raw(str(tmp_path / "empty"), [])
    with pytest.raises(DataError, match=f"{prefix}.idx holds no sequences"):
        check_indexed_dataset(prefix)


def test_token_ids_outside_the_vocabulary(sound: dict, tmp_path: Path) -> None:
    """Ids >= the vocabulary name the .bin; negative ids (a corrupt int32 .bin) too; a .bin
    above the full-scan size is sampled, and the sample still finds ids spread through it."""
    high = _build_raw(str(tmp_path / "high"), [[1, 2, 450, 3]] * 50)
    with pytest.raises(DataError, match=f"{high}.bin contains token id 450 but the tokenizer"):
        build_gpt_datasets([high], "1,0,0", 2, 1, (10, 0, 0), sound["tok"], None,
                           model_vocab_size=512, scan_max_token=True)
    negative = _build_raw(str(tmp_path / "neg"), [[1, -3, 2]] * 50)
    with pytest.raises(DataError, match=f"{negative}.bin contains a negative token id"):
        max_token_id([negative])
    spread = _build_raw(str(tmp_path / "spread"), [[1] * 999 + [700]] * 300)  # 1.2 MB
    assert max_token_id([spread], full_scan_bytes=0) == 700
    assert integrity.token_range(spread, full_scan_bytes=0)[2] is False


def _cache_files(directory: Path, suffix: str) -> list[Path]:
    return sorted(p for p in directory.rglob(f"*{suffix}") if "GPTDataset" in p.name)


def _pickle_array(path: Path) -> None:
    np.save(path, np.array([{"not": "an index"}], dtype=object), allow_pickle=True)


CACHE_DAMAGE = {
    "last file cut mid-write": lambda p: os.truncate(p, os.path.getsize(p) - 5),
    "cut inside the npy header": lambda p: os.truncate(p, 20),
    "empty file": lambda p: os.truncate(p, 0),
    "a pickle instead of an index": _pickle_array,
}


@pytest.mark.parametrize("damage", list(CACHE_DAMAGE))
@pytest.mark.parametrize("where", ["cache_dir", "default next to the prefix"])
def test_damaged_index_cache_is_rebuilt(damage: str, where: str, sound: dict, tmp_path: Path,
                                        capfd: pytest.CaptureFixture) -> None:
    prefix = _copy(sound["prefix"], tmp_path)
    cache = tmp_path / "cache" if where == "cache_dir" else Path(prefix) / "cache"
    args = ([prefix], "90,10,0", SEQ, 1, (40, 5, 0), sound["tok"],
            str(cache) if where == "cache_dir" else None)
    reference = build_gpt_datasets(*args)[0]
    expected = [reference[i]["tokens"].numpy() for i in range(20)]
    victims = _cache_files(cache, "shuffle_index.npy")  # megatron writes this one last
    assert len(victims) == 2, victims  # train and valid
    CACHE_DAMAGE[damage](victims[0])
    capfd.readouterr()
    rebuilt = build_gpt_datasets(*args)[0]
    warnings = [line for line in capfd.readouterr().err.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and str(victims[0]) in warnings[0], warnings
    assert all(np.array_equal(rebuilt[i]["tokens"].numpy(), expected[i]) for i in range(20))
    assert integrity._cache_problem(str(victims[0])) is None  # rewritten whole
    build_gpt_datasets(*args)  # and trusted again, silently
    assert "WARNING" not in capfd.readouterr().err


# ---- gzip inputs: the tools exit 2 with one line and write nothing ----

def _jsonl_gz(path: Path, lines: int = 3000) -> bytes:
    docs = [b for b in EN.split("\n\n") if b.strip()]
    text = "".join(json.dumps({"text": docs[i % len(docs)]}) + "\n" for i in range(lines))
    path.write_bytes(gzip.compress(text.encode(), mtime=0))
    return path.read_bytes()


def _corrupt_middle(path: Path) -> None:
    data = bytearray(_jsonl_gz(path))
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)
    path.write_bytes(bytes(data))


GZ_DAMAGE = {
    "truncated": (lambda p: p.write_bytes(_jsonl_gz(p)[:-4000]), "EOFError"),
    "corrupt middle": (_corrupt_middle, "after line"),
    "not gzip": (lambda p: p.write_bytes(b'{"text": "plain json"}\n'), "BadGzipFile"),
}
CLI = "megatron_ext.cli"


@pytest.mark.parametrize("damage", list(GZ_DAMAGE))
def test_damaged_gzip_input(damage: str, sound: dict, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    path = src / "docs.jsonl.gz"
    make, words = GZ_DAMAGE[damage]
    make(path)
    out = tmp_path / "out"
    out.mkdir()
    result = run_cli(["-m", f"{CLI}.preprocess", "--input", str(path), "--output-prefix",
                      str(out / "o"), "--tokenizer", sound["tok"], "--no-progress"], timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot read {path}"), lines
    assert words in lines[0] and "Traceback" not in result.stderr
    assert os.listdir(out) == []
    if damage == "corrupt middle":  # with a worker pool too: same error, nothing left behind
        with pytest.raises(DataError, match=f"cannot read {path} after line"):
            preprocess([str(path)], str(out / "o"), sound["tok"], workers=2)
        assert os.listdir(out) == []


def test_damaged_gzip_for_tokenizer_training(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl.gz"
    path.write_bytes(_jsonl_gz(path)[:-4000])
    result = run_cli(["-m", f"{CLI}.train_tokenizer", "--input", str(path), "--vocab-size",
                      "300", "--output", str(tmp_path / "tok")], timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot read {path} after line"), lines
    assert sorted(os.listdir(tmp_path)) == ["docs.jsonl.gz"]


def test_invalid_utf8_inside_gzip_is_still_counted(sound: dict, tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "fine"}\n{"text": "bad \xff byte"}\n'
                                   b'{"text": "fine too"}\n'))
    report = preprocess([str(path)], str(tmp_path / "o"), sound["tok"])
    assert report.documents == 2 and report.skipped == {"invalid_utf8": 1}
    assert report.examples["invalid_utf8"] == [f"{path}:2"]


# ---- end to end: training start-up ----

def _overrides(sound: dict, prefix: str, tmp_path: Path) -> list[str]:
    return ["data.demo_corpus=false", f"data.blend=[{prefix}]", f"data.tokenizer={sound['tok']}",
            "model.vocab_size=512", "train.train_steps=2", "schedule.warmup_steps=0",
            "train.eval_interval=0",
            f"checkpoint.save={tmp_path}/ckpt", f"logging.output_dir={tmp_path}/run"]


def test_build_run_opens_the_data_before_building_the_model(
    sound: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A probe, not a fake failure: the damage is real, and building a model would be reported."""
    from megatron_ext.config.derived import derive
    from megatron_ext.config.loader import load_config
    from megatron_ext.training import setup

    def model_built(*args, **kwargs):
        raise AssertionError("the model was built before the data was checked")

    monkeypatch.setattr(setup, "build_model_chunks", model_built)
    prefix = _copy(sound["prefix"], tmp_path)
    os.truncate(prefix + ".bin", 100)
    cfg = load_config(str(REPO / "configs" / "tiny-cpu.yaml"), _overrides(sound, prefix, tmp_path))
    with pytest.raises(DataError, match=f"{prefix}.bin is 100 bytes"):
        setup.build_run(cfg, derive(cfg), layout=None)


def _train(sound: dict, prefix: str, tmp_path: Path):
    args = ["pretrain_moe.py", "--config", "configs/tiny-cpu.yaml"]
    for item in _overrides(sound, prefix, tmp_path):
        args += ["--set", item]
    start = time.time()
    result = run_cli(args, timeout=300)
    return result, time.time() - start


def test_training_refuses_damaged_data_before_the_model(sound: dict, tmp_path: Path) -> None:
    # One damage end to end (each start-up imports torch and megatron): which damage is found
    # is test_damaged_dataset_is_named_when_opened's (every kind, through the build_gpt_datasets
    # that training calls), a truncated .bin at start-up test_build_run_opens_the_data_...'s.
    damage = "idx cut inside the header"
    prefix = _copy(sound["prefix"], tmp_path)
    change, file_suffix, words = DAMAGE[damage]
    change(prefix)
    result, seconds = _train(sound, prefix, tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and prefix + file_suffix in lines[0]
    assert words in lines[0] and "Traceback" not in result.stderr
    # Refused before the model: no "backends:" line (test_build_run_opens_the_data_... shows the
    # order itself), and nothing was trained or saved.
    assert "backends:" not in result.stdout and "step 1" not in result.stdout
    assert not list((tmp_path / "ckpt").glob("iter_*"))
    print(f"{damage}: refused in {seconds:.1f}s", file=sys.stderr)
