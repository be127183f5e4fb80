"""The all-layers load-balancing loss (moe.aux_loss_scope: all_layers, the paper configs') under
expert + data parallelism (EP=2 over 2 gloo processes, DP=2) and tensor + sequence parallelism
(TP=2, each rank routes half of the sequence: the counts are summed over the group, the
gradients stay local and megatron sums the router's over TP): the per-step LM loss, the logged
aux loss and the grad norm equal one process's, from the same initial weights and data, with
gradient accumulation (4 micro-batches per step at DP=1, 2 at DP=2). The coefficient is 1 (the
paper's 0.02 x 50) so that the balancing gradient weighs in the grad norm and the later losses.
The parallel runs start from the one-process run's step-1 checkpoint (weights, optimizer state
and data position, resharded on resume): the same starting point, and no separate run to make it.
The three runs (and the copy of that checkpoint between them) are forked from one driver
(tests.forkrun: one import of torch and megatron for the five processes).

Tolerance: 1e-4 absolute on the losses (~6 and ~2) and 1e-4 relative on the grad norm (fp32;
only the order of reductions differs: DP and TP all-reduces, the expert split).
"""

from __future__ import annotations

import json

from tests.conftest import set_args
from tests.forkrun import copy_checkpoint, run_clis

COMMON = ["--config", "configs/tiny-cpu.yaml", *set_args(
    "data.demo_corpus=false", "data.mock=true", "model.num_layers=3", "model.hidden_size=64",
    "model.ffn_hidden_size=128", "model.vocab_size=512", "data.seq_length=32",
    "moe.num_experts=4", "moe.aux_loss_coeff=1.0", "moe.aux_loss_scope=all_layers",
    "optimizer.weight_decay_scope=all",
    "optimizer.grad_divisor=4", "train.global_batch_size=8", "train.micro_batch_size=2",
    "train.eval_interval=0", "train.log_interval=1", "logging.expert_load=false",
    "logging.expert_similarity=false", "schedule.warmup_steps=0")]
STEPS = 3
LAYOUTS = {"ep": ["parallel.expert=2"],
           "tp": ["parallel.tensor=2", "parallel.sequence_parallel=true"]}


def _records(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def test_all_layers_loss_under_ep_dp_and_tp_sp(tmp_path):
    one = ["pretrain_moe.py", *COMMON, "--set", f"train.train_steps={STEPS + 1}",
           "--set", f"checkpoint.save={tmp_path}/one/ckpt",
           "--set", "checkpoint.save_interval=1",  # step 1's is the one used
           "--set", f"checkpoint.keep_last={STEPS + 1}",
           "--set", f"logging.output_dir={tmp_path}/one"]
    calls = [one, copy_checkpoint(tmp_path, tmp_path / "one/ckpt/iter_0000001",
                                  *(tmp_path / name / "ckpt" for name in LAYOUTS))]
    for name, sets in LAYOUTS.items():
        calls.append(["pretrain_moe.py", *COMMON, *set_args(*sets),
                      "--set", f"train.train_steps={STEPS + 1}",
                      "--set", f"checkpoint.save={tmp_path / name / 'ckpt'}",
                      "--set", "checkpoint.allow_config_change=true",
                      "--set", f"logging.output_dir={tmp_path}/{name}"])
    procs = run_clis(calls, tmp_path / "driver", nprocs=[1, 1, 2, 2])
    for proc in procs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {}
    for name, proc in zip(LAYOUTS, procs[2:]):
        assert "at step 1" in proc.stdout, proc.stdout[-3000:]
        runs[name] = _records(tmp_path / name)
    ref = _records(tmp_path / "one")[1:]  # steps 2 .. STEPS + 1
    assert len(ref) == STEPS and ref[0]["loss"] != ref[-1]["loss"]
    assert all(abs(r["aux_loss"] - 2.0) < 0.5 for r in ref)  # top_k at balance: the definition
    for name, recs in runs.items():
        assert len(recs) == STEPS, name
        for a, b in zip(ref, recs, strict=True):
            what = (name, a["step"])
            assert a["step"] == b["step"], what
            assert abs(a["loss"] - b["loss"]) <= 1e-4, (what, a["loss"], b["loss"])
            assert abs(a["aux_loss"] - b["aux_loss"]) <= 1e-4, (what, a["aux_loss"], b["aux_loss"])
            assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * a["grad_norm"], what
