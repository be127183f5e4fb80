"""ensure_demo_data: builds once, caches by corpus hash + vocab size, outputs load in megatron."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from megatron_ext.data.demo import CORPUS_DIR, ensure_demo_data
from megatron_ext.data.errors import DataError
from megatron_ext.data.tokenizer import load_tokenizer


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    """The real corpus files, cut short so that the recipe runs in about a second."""
    root = tmp_path / "corpus"
    root.mkdir()
    for name, chars in (("en_shakespeare.txt", 30_000), ("ja_neko.txt", 15_000)):
        text = (Path(CORPUS_DIR) / name).read_text(encoding="utf-8")[:chars]
        (root / name).write_text(text, encoding="utf-8")
    return root


def test_demo_data_is_built_once_and_cached(corpus: Path, tmp_path: Path) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    cache = tmp_path / "cache"
    tok_dir, prefixes = ensure_demo_data(str(cache), vocab_size=400, corpus_dir=str(corpus))
    assert [os.path.basename(p) for p in prefixes] == ["en", "ja"]
    tok = load_tokenizer(tok_dir)
    assert tok.vocab_size == 400
    for prefix in prefixes:
        dataset = IndexedDataset(prefix)
        assert len(dataset) > 10 and int(dataset[0][-1]) == tok.eod
        del dataset
    stamp = os.path.getmtime(prefixes[0] + ".bin")

    start = time.time()
    assert ensure_demo_data(str(cache), vocab_size=400, corpus_dir=str(corpus)) == (
        tok_dir, prefixes)
    assert time.time() - start < 1.0 and os.path.getmtime(prefixes[0] + ".bin") == stamp

    # A different vocabulary or corpus content is a different cache entry.
    other_tok, _ = ensure_demo_data(str(cache), vocab_size=300, corpus_dir=str(corpus))
    assert other_tok != tok_dir and load_tokenizer(other_tok).vocab_size == 300
    with open(corpus / "ja_neko.txt", "a", encoding="utf-8") as handle:
        handle.write("\n吾輩は猫である。\n")
    changed_tok, _ = ensure_demo_data(str(cache), vocab_size=400, corpus_dir=str(corpus))
    assert changed_tok != tok_dir
    assert not [name for name in os.listdir(cache) if ".tmp-" in name]


def test_incomplete_cache_entry_is_rebuilt(corpus: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    tok_dir, prefixes = ensure_demo_data(str(cache), vocab_size=400, corpus_dir=str(corpus))
    root = Path(tok_dir).parent
    (root / "COMPLETE.json").unlink()  # as if a build had been killed before finishing
    os.remove(prefixes[1] + ".idx")
    assert ensure_demo_data(str(cache), vocab_size=400, corpus_dir=str(corpus)) == (
        tok_dir, prefixes)
    assert os.path.isfile(prefixes[1] + ".idx") and (root / "COMPLETE.json").is_file()


def test_missing_corpus(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no demo corpus"):
        ensure_demo_data(str(tmp_path / "cache"), corpus_dir=str(tmp_path))
