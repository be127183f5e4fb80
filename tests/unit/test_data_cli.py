"""moe-preprocess as a subprocess: exit codes, one-line errors, report, interruption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_ext.data.tokenizer_training import train_bpe_tokenizer

REPO = Path(__file__).resolve().parents[2]
SCRIPT = ["-m", "megatron_ext.cli.preprocess"]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
EN = (REPO / "data" / "corpus" / "en_shakespeare.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("tok")
    (root / "en.txt").write_text(EN[:50_000], encoding="utf-8")
    return train_bpe_tokenizer([str(root / "en.txt")], 300, str(root / "bpe"))


@pytest.fixture(scope="module")
def big_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~16 MB of JSONL: several seconds of tokenizing, so a run can be interrupted mid-way."""
    path = tmp_path_factory.mktemp("big") / "big.jsonl"
    docs = [block for block in EN.split("\n\n") if block.strip()]
    line_block = "".join(json.dumps({"text": d}) + "\n" for d in docs)
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(16_000_000 // len(line_block) + 1):
            handle.write(line_block)
    return path


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *SCRIPT, *args], env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def test_missing_input_file(tok_dir: str, tmp_path: Path) -> None:
    result = _run("--input", str(tmp_path / "nope.jsonl"), "--output-prefix",
                  str(tmp_path / "o"), "--tokenizer", tok_dir)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: input file not found: {tmp_path / 'nope.jsonl'}"]
    assert os.listdir(tmp_path) == []


def test_missing_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello\n")
    result = _run("--input", str(tmp_path / "a.txt"), "--output-prefix", str(tmp_path / "o"),
                  "--tokenizer", str(tmp_path / "tok"))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: tokenizer not found: {tmp_path / 'tok'}"]
    assert os.listdir(tmp_path) == ["a.txt"]


def test_help_documents_txt_modes() -> None:
    result = _run("--help")
    assert result.returncode == 0
    assert "--txt-mode blocks (default)" in result.stdout and "blank lines" in result.stdout


def test_usage_errors_are_one_line(tmp_path: Path) -> None:
    result = _run("--input", "a.txt", "--tokenizer", "t")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: the following arguments are required: --output-prefix (see --help)"]
    result = _run("--input", "a.txt", "--tokenizer", "t", "--output-prefix", "o",
                  "--txt-mode", "pages")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1


BAD = '{"text": "fine"}\n{"text": "broken\n{"other": 1}\n{"text": ""}\n{"text": "fine too"}\n'


def test_bad_records_reported(tok_dir: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(BAD, encoding="utf-8")
    result = _run("--input", str(path), "--output-prefix", str(tmp_path / "o"),
                  "--tokenizer", tok_dir, "--append-eod")
    assert result.returncode == 0, result.stderr
    assert "documents: 2" in result.stdout
    assert f"skipped malformed_json (malformed JSON line): 1 (first: {path}:2)" in result.stdout
    assert f"skipped missing_key (JSON object without the text key): 1 (first: {path}:3)" in (
        result.stdout)
    assert f"skipped empty_document (empty document): 1 (first: {path}:4)" in result.stdout
    assert "tokens/s" in result.stdout
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "o.bin", "o.idx"]


def test_strict_exits_2_with_one_line(tok_dir: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(BAD, encoding="utf-8")
    result = _run("--input", str(path), "--output-prefix", str(tmp_path / "o"),
                  "--tokenizer", tok_dir, "--strict", "--workers", "2")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: {path}:2: malformed JSON line (--strict)"]
    assert os.listdir(tmp_path) == ["bad.jsonl"]


def _start(big_jsonl: Path, out_dir: Path, tok_dir: str, workers: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *SCRIPT, "--input", str(big_jsonl), "--output-prefix",
         str(out_dir / "out"), "--tokenizer", tok_dir, "--workers", str(workers), "--no-progress"],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group: SIGKILL reaches the pool workers too
    )


def _wait_for_partial_output(proc: subprocess.Popen, out_dir: Path) -> Path:
    """Block until the run has written some tokens to its temporary .bin."""
    deadline = time.time() + 90
    while time.time() < deadline:
        assert proc.poll() is None, "run finished before it could be interrupted"
        tmp = [p for p in out_dir.iterdir()
               if p.name.startswith(".out.tmp-") and p.suffix == ".bin"]
        if tmp and tmp[0].stat().st_size > 0:
            return tmp[0]
        time.sleep(0.02)
    raise AssertionError("no partial output appeared")


def test_sigkill_leaves_no_complete_pair(big_jsonl: Path, tok_dir: str, tmp_path: Path) -> None:
    proc = _start(big_jsonl, tmp_path, tok_dir, workers=1)
    try:
        partial = _wait_for_partial_output(proc, tmp_path)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not ((tmp_path / "out.bin").exists() and (tmp_path / "out.idx").exists())
    assert not (tmp_path / "out.idx").exists()
    # Only the hidden temporary file can survive SIGKILL (no handler runs); it is never final.
    assert partial.exists() and not partial.name.startswith("out")


def test_sigterm_cleans_up(big_jsonl: Path, tok_dir: str, tmp_path: Path) -> None:
    proc = _start(big_jsonl, tmp_path, tok_dir, workers=2)
    try:
        _wait_for_partial_output(proc, tmp_path)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=30)
    assert proc.returncode == 143
    assert stderr.splitlines() == ["error: terminated (SIGTERM), temporary outputs removed"]
    assert os.listdir(tmp_path) == []


RACE = """
import multiprocessing, multiprocessing.pool, sys, time
start = multiprocessing.pool.worker
def late(*args, **kwargs):  # worker 2 is still starting when the first result is refused
    if multiprocessing.current_process().name.endswith("-2"):
        time.sleep(3)
    return start(*args, **kwargs)
multiprocessing.pool.worker = late
from megatron_ext.data.preprocess import preprocess
from megatron_ext.platform.cli import run_cli
sys.exit(run_cli(lambda argv: preprocess([sys.argv[1]], sys.argv[2], sys.argv[3], strict=True,
                                         workers=2), []))
"""


def test_strict_while_a_worker_starts_is_still_one_line(tok_dir: str, tmp_path: Path) -> None:
    # The pool is terminated while worker 2 has not yet replaced the SIGTERM handler it inherited
    # (raise Terminated): it must die silently, not print a traceback under the error line.
    path = tmp_path / "bad.jsonl"
    path.write_text(BAD, encoding="utf-8")
    result = subprocess.run([sys.executable, "-c", RACE, str(path), str(tmp_path / "o"), tok_dir],
                            env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: {path}:2: malformed JSON line (--strict)"]
