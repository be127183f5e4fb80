"""The demo data: a byte-level BPE tokenizer and one indexed dataset per domain.

``ensure_demo_data()`` trains the tokenizer on ``data/corpus/*.txt`` and preprocesses each file
into its own prefix (``code``: CPython standard-library source, documents = blank-line-separated
blocks; ``en``: Shakespeare, documents = blank-line-separated speeches; ``ja``: Natsume Soseki,
documents = paragraphs, one per line), appending EOD to every document. Results are cached
under ``cache_dir/<key>`` where the key hashes the corpus contents, the vocabulary size and the
recipe version; a build happens at most once (an flock serializes concurrent callers, e.g. all
ranks of a job) and appears atomically (built in a temporary directory, then renamed).
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import shutil
import socket
import time

from megatron_ext.data.errors import DataError

RECIPE_VERSION = 1  # bump when the recipe below changes, to invalidate old caches
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS_DIR = os.path.join(_REPO, "data", "corpus")
TXT_MODES = {"en": "blocks", "ja": "lines"}  # the Japanese novel has blank lines only per chapter
MARKER = "COMPLETE.json"


def corpus_files(corpus_dir: str = CORPUS_DIR) -> list[str]:
    """The demo corpus: every .txt file in ``corpus_dir`` but the licence texts that travel
    with them (``*.LICENSE.txt``), sorted (code, en, ja)."""
    files = sorted(f for f in glob.glob(os.path.join(corpus_dir, "*.txt"))
                   if not f.endswith(".LICENSE.txt"))
    if not files:
        raise DataError(f"no demo corpus: no .txt files in {corpus_dir}")
    return files


def _language(path: str) -> str:
    # en_shakespeare.txt -> en, code_python.txt -> code
    return os.path.basename(path).split("_")[0].split(".")[0]


def _cache_key(files: list[str], vocab_size: int) -> str:
    digest = hashlib.sha256(f"recipe={RECIPE_VERSION};vocab={vocab_size}".encode())
    for path in files:
        with open(path, "rb") as handle:
            content = hashlib.sha256(handle.read()).hexdigest()
        digest.update(f";{os.path.basename(path)}={content}".encode())
    return digest.hexdigest()[:16]


def _layout(root: str, files: list[str]) -> tuple[str, list[str]]:
    return os.path.join(root, "tokenizer"), [os.path.join(root, _language(f)) for f in files]


def _is_complete(root: str) -> bool:
    return os.path.isfile(os.path.join(root, MARKER))


def ensure_demo_data(
    cache_dir: str = ".cache/demo",
    vocab_size: int = 4096,
    corpus_dir: str = CORPUS_DIR,
    workers: int = 1,
) -> tuple[str, list[str]]:
    """Return (tokenizer_dir, [prefix_en, prefix_ja]) as absolute paths, building them if needed."""
    files = corpus_files(corpus_dir)
    cache_dir = os.path.abspath(cache_dir)
    root = os.path.join(cache_dir, _cache_key(files, vocab_size))
    if _is_complete(root):
        return _layout(root, files)
    os.makedirs(cache_dir, exist_ok=True)
    with open(os.path.join(cache_dir, f".{os.path.basename(root)}.lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if we crash
        except OSError:
            pass  # file systems without flock: the atomic rename in _build still keeps it safe
        if not _is_complete(root):  # another process may have built it while we waited
            _build(root, files, vocab_size, workers)
    return _layout(root, files)


def _build(root: str, files: list[str], vocab_size: int, workers: int) -> None:
    from megatron_ext.data.preprocess import preprocess
    from megatron_ext.data.tokenizer_training import train_bpe_tokenizer

    start = time.time()
    tmp = f"{root}.tmp-{socket.gethostname()}-{os.getpid()}"  # unique across nodes too
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        tokenizer_dir, prefixes = _layout(tmp, files)
        train_bpe_tokenizer(files, vocab_size, tokenizer_dir)
        reports = {}
        for path, prefix in zip(files, prefixes, strict=True):
            mode = TXT_MODES.get(_language(path), "blocks")
            report = preprocess(
                [path], prefix, tokenizer_dir, append_eod=True, workers=workers, txt_mode=mode
            )
            reports[_language(path)] = {
                "source": os.path.basename(path),
                "txt_mode": mode,
                "documents": report.documents,
                "tokens": report.tokens,
            }
        marker = {"vocab_size": vocab_size, "seconds": round(time.time() - start, 2), **reports}
        with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as handle:
            json.dump(marker, handle, indent=2)
        if os.path.exists(root) and not _is_complete(root):  # leftover of a killed build
            shutil.rmtree(root, ignore_errors=True)
        try:
            os.rename(tmp, root)
        except OSError:
            if not _is_complete(root):  # not simply a concurrent builder finishing first
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
