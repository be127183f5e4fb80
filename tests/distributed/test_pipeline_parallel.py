"""Pipeline parallelism does not change the math, and checkpoints move across pipeline layouts.

From one Drop-Upcycled checkpoint (moe-upcycle, mcore output) loaded with
``checkpoint.load`` as the initial weights, every pipeline layout trains with the losses of one
process at PP=1: interleaved (PP=2 x 2 chunks), PP=2 x EP=2 with the distributed optimizer,
1F1B with an uneven split (PP=2, 1 + 3 layers) x TP=2 with sequence parallelism. The step
loss, LM-loss validation, the MoE load-balancing and z-losses, the grad norm (clipping sees
every stage) and per-layer expert load of every stage's layers are compared; a NaN step is
skipped by every rank at PP=2 x TP=2. A checkpoint saved at PP=2 x TP=2 resumes at PP=1, and
one saved at PP=1 resumes interleaved at PP=2, model and optimizer state: the next losses equal
the uninterrupted PP=1 run's. (Bad layouts: tests/unit/test_pipeline_config.py; kill -9 at
PP=2: tests/distributed/test_preemption.py.)

Tolerance: 2e-5 absolute on losses of about 6 (fp32). A pipeline adds only reductions whose
order differs from one process (the loss summed over stages, the grad norm's squares summed per
stage first); EP and TP add their own (tests/distributed/test_ep_parity.py, test_reshard_resume.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli, set_args, torchrun

TOL = 2e-5
COMMON = ["--config", "configs/tiny-cpu.yaml", *set_args(
    "data.demo_corpus=false", "data.mock=true", "model.hidden_size=64",
    "model.ffn_hidden_size=128", "model.vocab_size=512", "data.seq_length=32",
    "train.global_batch_size=8", "train.micro_batch_size=2", "train.eval_interval=2",
    "train.log_interval=1", "schedule.warmup_steps=0",
    "schedule.decay_steps=5",  # the same LR at each step in 3- and 5-step runs
    "moe.z_loss_coeff=0.001", "checkpoint.save_interval=3")]
COMPARED = ("loss", "aux_loss", "z_loss", "grad_norm", "moe/expert_cos_mean")


@pytest.fixture(scope="module")
def upcycled(tmp_path_factory) -> Path:
    """A 4-layer Drop-Upcycled 8-expert MoE checkpoint, the initial weights of every run."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tmp = tmp_path_factory.mktemp("upcycled")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=128,
                                 vocab_size=512)).save_pretrained(tmp / "dense")
    r = run_cli(["-m", "megatron_ext.cli.upcycle", "--input", str(tmp / "dense"),
                 "--output", str(tmp / "moe"), "--output-format", "mcore", "--method", "drop",
                 "--ratio", "0.5", "--num-experts", "8", "--top-k", "2", "--skip-validation"])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return tmp / "moe"


def _train(tmp: Path, name: str, nproc: int, steps: int, *extra: str, load: Path | None = None,
           ckpt: Path | None = None, nan_steps: str | None = None) -> tuple[dict[int, dict], str]:
    """Run pretrain_moe.py (tests/nan_injection.py with ``nan_steps``); returns
    {step: train record} (+ ``val_loss``) and stdout."""
    script = "tests/nan_injection.py" if nan_steps else "pretrain_moe.py"
    args = [script, *COMMON, "--set", f"train.train_steps={steps}",
            "--set", f"logging.output_dir={tmp / name}",
            "--set", f"checkpoint.save={ckpt or tmp / name / 'ckpt'}",
            "--set", f"checkpoint.load={load}" if load else "checkpoint.load=null", *extra]
    env = {"NAN_STEPS": nan_steps} if nan_steps else None
    proc = run_cli(args, env=env) if nproc == 1 else torchrun(nproc, args, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    records: dict[int, dict] = {}
    for rec in map(json.loads, (tmp / name / "metrics.jsonl").read_text().splitlines()):
        records.setdefault(rec["step"], {}).update(
            rec if rec["kind"] == "train" else {"val_loss": rec.get("val_loss")})
    return records, proc.stdout


def _assert_same(got: dict[int, dict], want: dict[int, dict], steps, what: str) -> None:
    for step in steps:
        for key in (*COMPARED, *(["val_loss"] if "val_loss" in want[step] else [])):
            assert abs(got[step][key] - want[step][key]) <= TOL, (what, step, key, got, want)
        # Every stage's MoE layers are reported (megatron numbers layers globally).
        loads = sorted(k for k in got[step] if k.endswith("/load_e0"))
        assert loads == [f"moe/layer{n}/load_e0" for n in (0, 1, 2, 3)], (what, loads)
        for k in loads:
            assert abs(got[step][k] - want[step][k]) <= TOL, (what, step, k)


@pytest.mark.slow  # 6 CLI runs (1-4 processes each): ~130 s on 2 shared cores
def test_pipeline_layouts_match_one_process_and_reshard(tmp_path: Path, upcycled: Path) -> None:
    ref, _ = _train(tmp_path, "ref", 1, 5, load=upcycled)
    assert ref[1]["loss"] != ref[5]["loss"]  # it really trained
    # Saved at PP=1 (the reference's step-3 checkpoint) -> resumed interleaved at PP=2.
    three = tmp_path / "from_ref"
    three.mkdir()
    shutil.copytree(tmp_path / "ref/ckpt/iter_0000003", three / "iter_0000003")
    (three / "latest").write_text("iter_0000003\n")
    vpp, out = _train(tmp_path, "vpp", 2, 5, "--set", "parallel.pipeline=2",
                      "--set", "parallel.virtual_pipeline=2", ckpt=three)
    assert "pp=2 vpp=2" in out and "at step 3" in out
    _assert_same(vpp, ref, (4, 5), "pp1 -> pp2 x vpp2 resume")
    ep, out = _train(tmp_path, "ep", 4, 3, "--set", "parallel.pipeline=2",
                     "--set", "parallel.expert=2", "--set", "parallel.distributed_optimizer=true",
                     load=upcycled)
    assert "pp=2 ep=2 dp=2" in out and f"initial weights from {upcycled}" in out
    _assert_same(ep, ref, (1, 2, 3), "pp2 x ep2")
    # PP=2 (uneven: the first stage holds 1 layer, the last 3) x TP=2. Step 4's loss is made
    # NaN (every stage's output): every rank skips it, none hangs.
    tp, out = _train(tmp_path, "tp", 4, 4, "--set", "parallel.pipeline=2",
                     "--set", "parallel.first_stage_layers=1", "--set", "parallel.tensor=2",
                     "--set", "parallel.sequence_parallel=true", load=upcycled, nan_steps="4")
    assert "tp=2 pp=2" in out and "| skipped 1 |" in out.splitlines()[-1]
    _assert_same(tp, ref, (1, 2, 3), "pp2 uneven x tp2")
    assert tp[4]["loss"] == "nan"
    # Its step-3 checkpoint (before the NaN) resumes at one process.
    back = tmp_path / "from_tp"
    back.mkdir()
    shutil.copytree(tmp_path / "tp/ckpt/iter_0000003", back / "iter_0000003")
    (back / "latest").write_text("iter_0000003\n")
    resumed, out = _train(tmp_path, "back", 1, 5, "--set", "checkpoint.allow_config_change=true",
                          ckpt=back)
    assert "at step 3" in out
    _assert_same(resumed, ref, (4, 5), "pp2 uneven x tp2 -> pp1 resume")


@pytest.mark.slow  # one 2-process run and one conversion: ~30 s
def test_pipeline_keeps_mixed_layers_capacity_async_saves_and_conversion(tmp_path: Path) -> None:
    """Features the parity test does not exercise, at PP=2 from a random init: dense and MoE
    layers interleaved (each stage gets one of each), token dropping by capacity factor, async
    saves; the checkpoint verifies and converts to HF (validated against transformers)."""
    records, out = _train(tmp_path, "mixed", 2, 3, "--set", "parallel.pipeline=2",
                          "--set", "moe.layer_freq=[0,1,0,1]", "--set", "moe.capacity_factor=1.0",
                          "--set", "checkpoint.async_save=true")
    assert "pp=2" in out and "step 3/3 |" in out
    assert all(0 < records[s]["loss"] < 20 for s in (1, 2, 3))
    loads = sorted(k for k in records[3] if k.endswith("/load_e0"))
    assert loads == ["moe/layer1/load_e0", "moe/layer3/load_e0"]  # one MoE layer per stage
    r = run_cli(["-m", "megatron_ext.cli.mcore_to_hf", "--input", str(tmp_path / "mixed" / "ckpt"),
                 "--output", str(tmp_path / "hf")])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["mlp_only_layers"] == [0, 2]
