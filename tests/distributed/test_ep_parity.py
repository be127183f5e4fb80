"""Expert parallelism does not change the math: EP=2 over two gloo processes reproduces the
per-step losses of one process with EP=1, from the same initial weights and data."""

import json

from tests.conftest import run_cli, torchrun

COMMON = ["--config", "configs/tiny-cpu.yaml", "--set", "data.demo_corpus=false",
          "--set", "data.mock=true", "--set", "train.eval_interval=0",
          "--set", "train.log_interval=1", "--set", "logging.expert_load=false",
          "--set", "schedule.warmup_steps=0"]


def _losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]


def test_ep2_two_processes_match_ep1_one_process(tmp_path):
    # Shared starting point: a checkpoint after 1 step, loaded as initial weights by both runs.
    init = run_cli(["pretrain_moe.py", *COMMON, "--set", "train.train_steps=1",
                    "--set", f"checkpoint.save={tmp_path}/init",
                    "--set", f"logging.output_dir={tmp_path}/r0"])
    assert init.returncode == 0, init.stderr[-3000:]
    steps = ["--set", "train.train_steps=4", "--set", f"checkpoint.load={tmp_path}/init",
             "--set", "checkpoint.save=null"]
    one = run_cli(["pretrain_moe.py", *COMMON, *steps, "--set", "parallel.expert=1",
                   "--set", f"logging.output_dir={tmp_path}/r1"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(2, ["pretrain_moe.py", *COMMON, *steps, "--set", "parallel.expert=2",
                       "--set", f"logging.output_dir={tmp_path}/r2"])
    assert two.returncode == 0, two.stderr[-3000:]
    assert "ep=2 dp=2" in two.stdout
    a, b = _losses(tmp_path / "r1"), _losses(tmp_path / "r2")
    assert len(a) == len(b) == 4
    # fp32; only the order of floating-point reductions differs (DP all-reduce, expert split).
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-4, (a, b)
    assert a[0] != a[-1]  # the runs really trained
