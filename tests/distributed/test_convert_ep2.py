"""A converted Mixtral trains at expert-parallel size 2 (two gloo processes), and the checkpoint
that run saves (at EP = 2) converts back to an HF Mixtral bit-exact to the original.

The step must not move the weights. ``optimizer.lr = 0`` is refused by config validation
(lr > 0), so the run uses lr = 1e-30, min_lr = 0 and no weight decay: AdamW's first update is at
most lr in magnitude (m / sqrt(v) = +-1), far below half an fp32 ulp of any non-zero weight
(~1e-9 at |w| = 0.02; norms are 1.0). Only the zero padding rows of the output layer can move,
and the conversion back cuts them off. Bit-exactness below is the check that this holds.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.conftest import run_cli, torchrun


def test_ep2_trained_checkpoint_converts_back_bit_exact(tmp_path: Path) -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    hf = tmp_path / "mixtral"
    MixtralForCausalLM(MixtralConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=250, num_local_experts=4, num_experts_per_tok=2,
    )).save_pretrained(hf)
    root, save, back = tmp_path / "mcore", tmp_path / "save", tmp_path / "back"
    r = run_cli(["-m", "megatron_ext.cli.hf_to_mcore", "--input", str(hf), "--output", str(root),
                 "--skip-validation"])
    assert r.returncode == 0, r.stderr[-3000:]

    r = torchrun(2, ["pretrain_moe.py", "--config", str(root / "config.yaml"),
                     "--set", "parallel.expert=2", "--set", f"checkpoint.load={root}",
                     "--set", "data.mock=true",  # config.yaml names no data (issue 25.3)
                     "--set", f"checkpoint.save={save}", "--set", "train.train_steps=1",
                     "--set", "optimizer.lr=1e-30", "--set", "optimizer.min_lr=0",
                     "--set", "optimizer.weight_decay=0", "--set", "schedule.warmup_steps=0",
                     "--set", "data.seq_length=32", "--set", f"logging.output_dir={tmp_path}/run"])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "initial weights from" in r.stdout and "step 1/1" in r.stdout
    meta = json.loads((save / "iter_0000001" / "meta.json").read_text())
    assert meta["layout"]["expert"] == 2 and meta["layout"]["world_size"] == 2

    r = run_cli(["-m", "megatron_ext.cli.mcore_to_hf", "--input", str(save), "--output", str(back)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "PASS" in r.stdout and "MixtralForCausalLM" in r.stdout
    a, b = load_file(hf / "model.safetensors"), load_file(back / "model.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
