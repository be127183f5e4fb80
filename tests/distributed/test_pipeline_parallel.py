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
from pathlib import Path

import pytest
import torch

from tests.conftest import set_args
from tests.forkrun import copy_checkpoint, run_clis

TOL = 2e-5
COMMON = ["--config", "configs/tiny-cpu.yaml", *set_args(
    "data.demo_corpus=false", "data.mock=true", "model.hidden_size=64",
    "model.ffn_hidden_size=128", "model.vocab_size=512", "data.seq_length=32",
    "train.global_batch_size=8", "train.micro_batch_size=2", "train.eval_interval=2",
    "train.log_interval=1", "schedule.warmup_steps=0",
    "schedule.decay_steps=5",  # the same LR at each step in 3- and 5-step runs
    "moe.z_loss_coeff=0.001", "checkpoint.save_interval=3")]
COMPARED = ("loss", "aux_loss", "z_loss", "grad_norm", "moe/expert_cos_mean")


def _args(tmp: Path, name: str, steps: int, *extra: str, load: Path | None = None,
          ckpt: Path | str | None = None, script: str = "pretrain_moe.py") -> list[str]:
    return [script, *COMMON, "--set", f"train.train_steps={steps}",
            "--set", f"logging.output_dir={tmp / name}",
            "--set", f"checkpoint.save={ckpt or tmp / name / 'ckpt'}",
            "--set", f"checkpoint.load={load}" if load else "checkpoint.load=null", *extra]


def _records(run: Path) -> dict[int, dict]:
    """{step: train record} (+ ``val_loss``) of a run's metrics.jsonl."""
    records: dict[int, dict] = {}
    for rec in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()):
        records.setdefault(rec["step"], {}).update(
            rec if rec["kind"] == "train" else {"val_loss": rec.get("val_loss")})
    return records


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict[str, tuple[dict[int, dict], str]], Path]:
    """Every run of this module, ({name: (records, stdout)}, their directory; the upcycled
    checkpoint is its ``moe``, the HF conversion its ``hf``), all forked from one driver
    (tests.forkrun: one import of torch and megatron, the multi-rank runs included).

    First: a 4-layer Drop-Upcycled 8-expert MoE checkpoint (moe-upcycle, mcore output), the
    initial weights of ``ref`` (one process, 5 steps), ``ep`` (PP=2 x EP=2, distributed
    optimizer; nothing saved) and ``tp`` (PP=2 uneven, 1 + 3 layers, x TP=2; step 4's loss
    made NaN). Then,
    from ref's and tp's step-3 checkpoints: ``vpp`` (resumed at PP=2 x 2 chunks) and ``back``
    (resumed at one process); and ``mixed`` (PP=2 from a random init) converted to HF."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tmp = tmp_path_factory.mktemp("pipeline")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=128,
                                 vocab_size=512)).save_pretrained(tmp / "dense")
    upcycled = tmp / "moe"
    calls = {
        "upcycle": (["-m", "megatron_ext.cli.upcycle", "--input", str(tmp / "dense"),
                     "--output", str(upcycled), "--output-format", "mcore", "--method", "drop",
                     "--ratio", "0.5", "--num-experts", "8", "--top-k", "2",
                     "--skip-validation"], 1, {}),
        "ref": (_args(tmp, "ref", 5, load=upcycled), 1, {}),
        "ep": (_args(tmp, "ep", 3, "--set", "parallel.pipeline=2", "--set", "parallel.expert=2",
                     "--set", "parallel.distributed_optimizer=true", load=upcycled,
                     ckpt="null"), 4, {}),
        "tp": (_args(tmp, "tp", 4, "--set", "parallel.pipeline=2",
                     "--set", "parallel.first_stage_layers=1", "--set", "parallel.tensor=2",
                     "--set", "parallel.sequence_parallel=true", load=upcycled,
                     script="tests/nan_injection.py"), 4, {"NAN_STEPS": "4"}),
    }
    step3 = "ckpt/iter_0000003"  # ref's and tp's, resumed as the latest of a root of its own
    calls.update({
        "copy_ref": (copy_checkpoint(tmp, tmp / "ref" / step3, tmp / "from_ref"), 1, {}),
        "copy_tp": (copy_checkpoint(tmp, tmp / "tp" / step3, tmp / "from_tp"), 1, {}),
        "vpp": (_args(tmp, "vpp", 5, "--set", "parallel.pipeline=2",
                      "--set", "parallel.virtual_pipeline=2", ckpt=tmp / "from_ref"), 2, {}),
        "back": (_args(tmp, "back", 5, "--set", "checkpoint.allow_config_change=true",
                       ckpt=tmp / "from_tp"), 1, {}),
        "mixed": (_args(tmp, "mixed", 3, "--set", "parallel.pipeline=2",
                        "--set", "moe.layer_freq=[0,1,0,1]", "--set", "moe.capacity_factor=1.0",
                        "--set", "checkpoint.async_save=true"), 2, {}),
        "hf": (["-m", "megatron_ext.cli.mcore_to_hf", "--input", str(tmp / "mixed" / "ckpt"),
                "--output", str(tmp / "hf")], 1, {}),
    })
    procs = dict(zip(calls, run_clis([c for c, _, _ in calls.values()], tmp / "driver",
                                     envs=[e for _, _, e in calls.values()],
                                     nprocs=[n for _, n, _ in calls.values()])))
    for name, proc in procs.items():
        assert proc.returncode == 0, (name, proc.stdout[-2000:] + proc.stderr[-3000:])
    return {name: (_records(tmp / name), procs[name].stdout)
            for name in ("ref", "ep", "tp", "vpp", "back", "mixed")}, tmp


def _assert_same(got: dict[int, dict], want: dict[int, dict], steps, what: str) -> None:
    for step in steps:
        for key in (*COMPARED, *(["val_loss"] if "val_loss" in want[step] else [])):
            assert abs(got[step][key] - want[step][key]) <= TOL, (what, step, key, got, want)
        # Every stage's MoE layers are reported (megatron numbers layers globally).
        loads = sorted(k for k in got[step] if k.endswith("/load_e0"))
        assert loads == [f"moe/layer{n}/load_e0" for n in (0, 1, 2, 3)], (what, loads)
        for k in loads:
            assert abs(got[step][k] - want[step][k]) <= TOL, (what, step, k)


@pytest.mark.slow  # 6 CLI runs (1-4 processes each), forked from one driver
def test_pipeline_layouts_match_one_process_and_reshard(runs) -> None:
    runs, tmp = runs
    ref, upcycled = runs["ref"][0], tmp / "moe"
    assert ref[1]["loss"] != ref[5]["loss"]  # it really trained
    # Saved at PP=1 (the reference's step-3 checkpoint) -> resumed interleaved at PP=2.
    vpp, out = runs["vpp"]
    assert "pp=2 vpp=2" in out and "at step 3" in out
    _assert_same(vpp, ref, (4, 5), "pp1 -> pp2 x vpp2 resume")
    ep, out = runs["ep"]
    assert "pp=2 ep=2 dp=2" in out and f"initial weights from {upcycled}" in out
    _assert_same(ep, ref, (1, 2, 3), "pp2 x ep2")
    # PP=2 (uneven: the first stage holds 1 layer, the last 3) x TP=2. Step 4's loss is made
    # NaN (every stage's output): every rank skips it, none hangs.
    tp, out = runs["tp"]
    assert "tp=2 pp=2" in out and "| skipped 1 |" in out.splitlines()[-1]
    _assert_same(tp, ref, (1, 2, 3), "pp2 uneven x tp2")
    assert tp[4]["loss"] == "nan"
    # Its step-3 checkpoint (before the NaN) resumes at one process.
    resumed, out = runs["back"]
    assert "at step 3" in out
    _assert_same(resumed, ref, (4, 5), "pp2 uneven x tp2 -> pp1 resume")


@pytest.mark.slow  # one 2-process run and one conversion, in the module's driver
def test_pipeline_keeps_mixed_layers_capacity_async_saves_and_conversion(runs) -> None:
    """Features the parity test does not exercise, at PP=2 from a random init: dense and MoE
    layers interleaved (each stage gets one of each), token dropping by capacity factor, async
    saves; the checkpoint verifies and converts to HF (validated against transformers)."""
    records, out = runs[0]["mixed"]
    assert "pp=2" in out and "step 3/3 |" in out
    assert all(0 < records[s]["loss"] < 20 for s in (1, 2, 3))
    loads = sorted(k for k in records[3] if k.endswith("/load_e0"))
    assert loads == ["moe/layer1/load_e0", "moe/layer3/load_e0"]  # one MoE layer per stage
    config = json.loads((runs[1] / "hf" / "config.json").read_text())
    assert config["mlp_only_layers"] == [0, 2]
