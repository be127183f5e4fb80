"""eval.tasks / eval.task_interval: lm-evaluation-harness tasks on the current weights during
training (the local tasks, no network), logged as tasks/<task>/<metric> beside the losses and kept
out of throughput; an unknown task stops the run before training, and a split model is refused
by the config check. Real pretrain_moe.py runs."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli
from tests.resilience import small_args

TASKS = ["--set", "eval.tasks=[demo_en_mc, demo_en_gen]", "--set", "eval.task_interval=2",
         "--set", "eval.limit=4", "--set", "eval.batch_size=4"]
DEMO = ["--set", "data.mock=false", "--set", "data.demo_corpus=true",
        "--set", "model.vocab_size=4096"]


@pytest.mark.slow
def test_tasks_are_logged_at_their_interval(tmp_path):
    proc = run_cli(small_args(tmp_path, 4, *DEMO, *TASKS), env={"HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in
               (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    tasks = [r for r in records if "tasks/demo_en_mc/acc" in r]
    assert [r["step"] for r in tasks] == [2, 4]
    for r in tasks:
        assert 0.0 <= r["tasks/demo_en_mc/acc"] <= 1.0
        assert 0.0 <= r["tasks/demo_en_gen/exact_match"] <= 1.0
    assert any("demo_en_mc/acc" in line for line in proc.stdout.splitlines()
               if line.startswith("validation at step 2"))
    # Task time is evaluation time, not training time: step 2's tasks run after its metrics
    # were logged, so the next interval (step 3, log_interval 1) reports them as time/eval_s.
    train = {r["step"]: r for r in records if r["kind"] == "train"}
    assert train[3]["time/eval_s"] > 0 and train[2]["time/eval_s"] == 0


def test_an_unknown_task_stops_before_training(tmp_path):
    proc = run_cli(small_args(tmp_path, 4, *DEMO, "--set", "eval.tasks=[demo_en_mcq]",
                              "--set", "eval.task_interval=2"),
                   env={"HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: unknown task 'demo_en_mcq'") and "demo_en_mc" in last
    assert not any(line.startswith("step ") for line in proc.stdout.splitlines())


def test_a_split_model_is_refused_by_the_config_check():
    proc = run_cli(["pretrain_moe.py", "--config", "configs/tiny-cpu.yaml", "--dry-run",
                    "--set", "parallel.expert=2", "--set", "parallel.world_size=2", *TASKS])
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "config error: eval.tasks: in-loop evaluation needs parallel.tensor = parallel.expert = "
        "parallel.pipeline = 1 (evaluate a checkpoint with moe-lm-eval instead)")
