"""Shared pieces of the checkpoint-resilience tests: a very small, fast, deterministic run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO, set_args

SMALL = ["--config", "configs/tiny-cpu.yaml", *set_args(
    "data.demo_corpus=false", "data.mock=true", "model.num_layers=2", "model.hidden_size=64",
    "model.ffn_hidden_size=128", "model.vocab_size=512", "moe.num_experts=4",
    "data.seq_length=32", "train.global_batch_size=8", "train.micro_batch_size=4",
    "train.eval_interval=0", "train.log_interval=1", "schedule.warmup_steps=2",
    "checkpoint.keep_last=5")]


def small_args(tmp: Path, steps: int, *extra: str) -> list[str]:
    return ["pretrain_moe.py", *SMALL, "--set", f"train.train_steps={steps}",
            "--set", f"checkpoint.save={tmp}/ckpt", "--set", f"logging.output_dir={tmp}/run",
            *extra]


def env() -> dict:
    # No MASTER_PORT (see conftest.run_cli): the process picks a free one as it binds it.
    e = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
             MASTER_ADDR="127.0.0.1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        e.pop(k, None)
    return e


def popen(args: list[str]) -> subprocess.Popen:
    """In its own session, so that ``kill_job`` can take down everything it started."""
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL to the run's whole process group, as a scheduler ends a job: the trainer, its
    checkpoint writers and the result-queue manager that megatron's writer starts. (Since
    ``megatron_ext.platform.children`` those also die with a trainer killed alone; tests/unit/
    test_signals.py checks both.)"""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # nothing of it left
        pass
    proc.wait()


def wait_for_line(proc: subprocess.Popen, predicate, timeout: float = 300) -> list[str]:
    """Read lines until one satisfies ``predicate``; returns the lines read."""
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if predicate(line):
            return lines
    raise AssertionError("expected line not seen:\n" + "".join(lines[-40:]))


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """Last logged loss of every step (a restarted run appends to the same file)."""
    out = {}
    for rec in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()):
        if rec["kind"] == "train":
            out[rec["step"]] = rec["loss"]
    return out


def check_async_snapshot(model, optimizer, root: Path) -> None:
    """An async save holds the state of the moment it was called: parameters changed in place
    right after ``save`` returns must not reach the checkpoint, and ``latest`` appears only
    once the save is waited for."""
    import torch

    from megatron_ext.checkpoint import plan
    from megatron_ext.checkpoint import store as ckpt
    from megatron_ext.checkpoint.saver import Saver

    inner = ckpt.unwrap(model)
    before = {k: v.detach().float().cpu().clone() for k, v in inner.state_dict().items()
              if isinstance(v, torch.Tensor) and "_extra_state" not in k}
    saver = Saver(root, keep_last=1, fully_reshardable=True, async_save=True)
    # the saved config is checked on load: an empty one is a valid (all-defaults) tree
    assert saver.save(ckpt.TrainState(step=3), model, optimizer, {}, {"world_size": 1}) == []
    with torch.no_grad():
        for p in inner.parameters():
            p.add_(1.0)
    assert not (root / "latest").exists()  # committed by the trainer, not by the writer
    assert [p.name for p, _ in saver.wait()] == ["iter_0000003"]
    assert (root / "latest").read_text().strip() == "iter_0000003"
    # Loading it back into the (changed) model restores exactly the earlier parameters.
    assert plan.load_weights(root, model) == root / "iter_0000003"
    after = inner.state_dict()
    assert before
    for key, value in before.items():
        assert torch.equal(after[key].float().cpu(), value), key
