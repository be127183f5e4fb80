"""Expert parallelism does not change the math: EP=2 over two gloo processes reproduces the
per-step losses of one process with EP=1, from the same initial weights and data, and the same
per-domain validation losses (data.valid_sets: each rank reads its share of the same fixed
samples; the losses are reduced over ranks)."""

import json

from tests.conftest import set_args, torchrun
from tests.forkrun import run_clis

COMMON = ["--config", "configs/tiny-cpu.yaml", *set_args(
    "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
    "moe.num_experts=4", "train.global_batch_size=8", "train.micro_batch_size=2",
    "train.eval_iters=1", "train.eval_interval=4", "train.log_interval=1",
    "logging.expert_load=false", "schedule.warmup_steps=0")]


def _records(run_dir, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_ep2_two_processes_match_ep1_one_process(tmp_path):
    # Shared starting point: a checkpoint after 1 step, loaded as initial weights by both runs.
    # It and the EP=1 run, one after the other, forked from one driver (tests.forkrun).
    steps = ["--set", "train.train_steps=4", "--set", f"checkpoint.load={tmp_path}/init",
             "--set", "checkpoint.save=null"]
    init, one = run_clis([
        ["pretrain_moe.py", *COMMON, "--set", "train.train_steps=1", "--set",
         "train.eval_interval=0", "--set", f"checkpoint.save={tmp_path}/init",
         "--set", f"logging.output_dir={tmp_path}/r0"],
        ["pretrain_moe.py", *COMMON, *steps, "--set", "parallel.expert=1",
         "--set", f"logging.output_dir={tmp_path}/r1"]], tmp_path / "driver")
    assert init.returncode == 0, init.stderr[-3000:]
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(2, ["pretrain_moe.py", *COMMON, *steps, "--set", "parallel.expert=2",
                       "--set", f"logging.output_dir={tmp_path}/r2"])
    assert two.returncode == 0, two.stderr[-3000:]
    assert "ep=2 dp=2" in two.stdout
    a, b = ([r["loss"] for r in _records(tmp_path / r, "train")] for r in ("r1", "r2"))
    assert len(a) == len(b) == 4
    # fp32; only the order of floating-point reductions differs (DP all-reduce, expert split).
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-4, (a, b)
    assert a[0] != a[-1]  # the runs really trained
    (va,), (vb,) = _records(tmp_path / "r1", "valid"), _records(tmp_path / "r2", "valid")
    keys = ["val_loss", "english/loss", "japanese/loss", "code/loss"]
    assert all(k in va and k in vb for k in keys), (va, vb)
    for k in keys:
        assert abs(va[k] - vb[k]) <= 1e-4, (k, va[k], vb[k])
