"""Per-domain validation under expert and data parallelism: EP=2 over two gloo processes
reports the same data.valid_sets losses as one process with EP=1, from the same initial weights
(each rank reads its share of the same fixed samples; the losses are reduced over ranks)."""

import json

from tests.conftest import run_cli, torchrun

COMMON = ["--config", "configs/tiny-cpu.yaml", "--set", "model.num_layers=2",
          "--set", "model.hidden_size=64", "--set", "model.ffn_hidden_size=128",
          "--set", "moe.num_experts=4", "--set", "train.global_batch_size=8",
          "--set", "train.micro_batch_size=2", "--set", "train.eval_iters=1",
          "--set", "train.eval_interval=2", "--set", "train.log_interval=1",
          "--set", "logging.expert_load=false", "--set", "schedule.warmup_steps=0"]


def _valid(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "valid"]


def test_ep2_two_processes_report_the_same_domain_losses(tmp_path):
    init = run_cli(["pretrain_moe.py", *COMMON, "--set", "train.train_steps=1",
                    "--set", "train.eval_interval=0", "--set", f"checkpoint.save={tmp_path}/init",
                    "--set", f"logging.output_dir={tmp_path}/r0"])
    assert init.returncode == 0, init.stderr[-3000:]
    steps = ["--set", "train.train_steps=2", "--set", f"checkpoint.load={tmp_path}/init",
             "--set", "checkpoint.save=null"]
    one = run_cli(["pretrain_moe.py", *COMMON, *steps, "--set", "parallel.expert=1",
                   "--set", f"logging.output_dir={tmp_path}/r1"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(2, ["pretrain_moe.py", *COMMON, *steps, "--set", "parallel.expert=2",
                       "--set", f"logging.output_dir={tmp_path}/r2"])
    assert two.returncode == 0, two.stderr[-3000:]
    assert "ep=2 dp=2" in two.stdout
    (a,), (b,) = _valid(tmp_path / "r1"), _valid(tmp_path / "r2")
    keys = ["val_loss", "english/loss", "japanese/loss", "code/loss"]
    assert all(k in a and k in b for k in keys), (a, b)
    for k in keys:  # fp32; only the order of reductions differs
        assert abs(a[k] - b[k]) <= 1e-4, (k, a[k], b[k])
    assert len({round(a[k], 3) for k in keys[1:]}) == 3  # three different domains
