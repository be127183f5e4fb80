"""megatron_ext.cli.upcycle end to end: bad inputs exit 2 with one line and leave nothing behind.

The bad inputs run the tool's ``main`` in this process (a subprocess would cost seconds of
imports each); the conversions and a refused output run it as a real subprocess, whose stderr
would also show import-time warnings."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CLI = ["-m", "megatron_ext.cli.upcycle"]


def _llama(path: Path, intermediate: int = 128) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=intermediate, vocab_size=256)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    (path / "tokenizer.json").write_text('{"version": "1.0"}')
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from transformers import MixtralConfig, MixtralForCausalLM

    root = tmp_path_factory.mktemp("cli")
    dense = _llama(root / "dense")
    mixtral = root / "mixtral"
    MixtralForCausalLM(MixtralConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=256,
                                     num_local_experts=2)).save_pretrained(mixtral)
    truncated = root / "truncated"
    shutil.copytree(dense, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    return {"dense": dense, "mixtral": mixtral, "truncated": truncated,
            "other": _llama(root / "other"), "narrow": _llama(root / "narrow", intermediate=64)}


def _run(*args: str | Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *CLI, *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300)


def test_drop_with_validation_then_overwrite(models, tmp_path: Path) -> None:
    out = tmp_path / "moe"
    r = _run("--input", models["dense"], "--output", out, "--method", "drop", "--ratio", "0.5",
             "--num-experts", "4", "--top-k", "2", "--seed", "1234", "--max-shard-size", "300KB")
    assert r.returncode == 0, r.stderr
    assert "validation:" in r.stdout and "PASS" in r.stdout
    assert (out / "model.safetensors.index.json").exists() and (out / "tokenizer.json").exists()
    assert json.loads((out / "upcycling.json").read_text())["seed"] == 1234
    r = _run("--input", models["dense"], "--output", out, "--method", "naive", "--num-experts",
             "2", "--overwrite", "--skip-validation")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe"]  # no temp dirs left


BAD = {
    "missing input": (["--input", "{root}/nope"], "does not exist"),
    "not llama": (["--input", "{mixtral}"], "model_type 'mixtral'"),
    "truncated": (["--input", "{truncated}"], "truncated"),
    "ratio": (["--input", "{dense}", "--ratio", "1.5"], "--ratio: must be <= 1 (upcycling.ratio)"),
    "top-k": (["--input", "{dense}", "--num-experts", "4", "--top-k", "5"], "top_k 5"),
    "btx shapes": (["--input", "{dense}", "--method", "btx", "--num-experts", "4",
                    "--btx-sources", "{narrow}"], "btx source"),
    "btx divisible": (["--input", "{dense}", "--method", "btx", "--num-experts", "4",
                       "--btx-sources", "{other}", "{other}"], "divisible"),
    "not mcore": (["--input", "{dense}", "--input-format", "mcore"], "no checkpoint found"),
    "bad flag": (["--input", "{dense}", "--ratio", "half"], "--ratio: expected a number"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_with_one_line(models, tmp_path: Path, capsys, case: str) -> None:
    from megatron_ext.cli import upcycle

    args, match = BAD[case]
    fmt = {k: str(v) for k, v in models.items()} | {"root": str(tmp_path)}
    out = tmp_path / "out"
    capsys.readouterr()
    code = upcycle.main([a.format(**fmt) for a in args] + ["--output", str(out),
                                                          "--skip-validation"])
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and match in lines[0], stderr
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_existing_output_is_left_alone(models, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("mine")
    r = _run("--input", models["dense"], "--output", out)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "--overwrite" in r.stderr and [p.name for p in out.iterdir()] == ["keep"]
