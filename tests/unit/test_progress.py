"""Progress of long tools (platform.progress): tqdm's bar on a terminal; in a log, plain lines with
an ETA every MOE_PROGRESS_INTERVAL seconds (none for a short run); and the real tools use it."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

import pytest
import torch

from megatron_ext.data.demo import ensure_demo_data
from megatron_ext.platform.progress import INTERVAL_ENV, Progress
from tests.conftest import REPO, run_cli

# desc: 45% (450/1,000 tensors) | 37.5 tensors/s | elapsed 00:12 | ETA 00:14 (? before any rate)
LINE = re.compile(r"^(?P<desc>[\w-]+): (?P<pct>\d+)% \((?P<done>[^)]*)\) \| (?P<rate>[^|]+/s) \| "
                  r"elapsed (?P<elapsed>[\d:]+) \| ETA (?P<eta>[\d:]+|\?)(?: \| (?P<info>.*))?$")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_gets_plain_lines_with_an_eta(monkeypatch) -> None:
    monkeypatch.setenv(INTERVAL_ENV, "0")
    log = io.StringIO()
    with Progress(4, "convert", unit="tensors", stream=log) as bar:
        for _ in range(4):
            time.sleep(0.01)
            bar.update()
    lines = log.getvalue().splitlines()
    assert len(lines) == 5 and "\r" not in log.getvalue()  # one per update, and the last again
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    assert [m["pct"] for m in parsed] == ["25", "50", "75", "100", "100"]
    assert parsed[1]["done"] == "2/4 tensors" and parsed[-1]["eta"] == "00:00"


def test_short_run_in_a_log_prints_nothing_and_sizes_scale(monkeypatch) -> None:
    monkeypatch.delenv(INTERVAL_ENV, raising=False)  # the default: a line every 10 s
    log = io.StringIO()
    with Progress(3 * 2**20, "preprocess", unit="B", unit_scale=True, stream=log) as bar:
        bar.update_to(2**20, docs=12, tokens=34_567)
    assert log.getvalue() == ""
    line = bar.line()
    assert LINE.match(line) and "(1.00MB/3.00MB)" in line and "docs 12, tokens 34,567" in line


def test_terminal_gets_tqdm_and_disabled_gets_nothing() -> None:
    term = Terminal()
    with Progress(4, "convert", unit="tensors", stream=term) as bar:
        bar.update(4, docs=1)
    assert "\r" in term.getvalue() and "100%" in term.getvalue() and "4/4" in term.getvalue()
    quiet = Terminal()
    with Progress(4, "convert", enabled=False, stream=quiet) as bar:
        bar.update(4)
    assert quiet.getvalue() == ""


def _tool_lines(stderr: str, desc: str) -> list[re.Match]:
    lines = [LINE.match(line) for line in stderr.splitlines() if line.startswith(f"{desc}: ")]
    assert lines and all(lines), stderr[-3000:]
    return lines


def test_tools_print_progress_lines_with_an_eta_to_a_log(tmp_path: Path) -> None:
    """Real tools with stderr a pipe (not a terminal): periodic plain lines that reach 100%."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, vocab_size=256)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    env = {INTERVAL_ENV: "0"}
    proc = run_cli(["-m", "megatron_ext.cli.hf_to_mcore", "--input", str(tmp_path / "hf"),
                    "--output", str(tmp_path / "mcore"), "--skip-validation"], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = _tool_lines(proc.stderr, "hf_to_mcore")
    assert lines[-1]["pct"] == "100" and lines[-1]["done"] == "3/3 layers"
    assert lines[-1]["eta"] == "00:00" and {m["done"] for m in lines} >= {"1/3 layers"}

    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(f"document {i} " * 20 for i in range(200)), encoding="utf-8")
    tok = ensure_demo_data(cache_dir=str(REPO / ".cache" / "demo"))[0]  # its tokenizer
    proc = run_cli(["-m", "megatron_ext.cli.preprocess", "--input", str(text),
                    "--output-prefix", str(tmp_path / "ds"), "--tokenizer", str(tok)], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = _tool_lines(proc.stderr, "preprocess")
    assert lines[-1]["pct"] == "100" and "docs 200" in lines[-1]["info"]


@pytest.mark.parametrize("value", ["nan", "-1", "soon"])
def test_a_bad_interval_falls_back_to_the_default(monkeypatch, value: str) -> None:
    monkeypatch.setenv(INTERVAL_ENV, value)
    assert Progress(1, "x", stream=io.StringIO()).interval == 10.0
