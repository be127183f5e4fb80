"""The SLURM scripts end to end: submission, training, checkpoint, USR1 -> requeue -> resume.

The jobs run the real scripts/slurm/8x152M.sh on the private single-node cluster of conftest.py,
switched to the tiny CPU model through the launcher's documented knobs (MOE_CONFIG,
GPUS_PER_NODE) and with the #SBATCH lines a CPU-only node cannot satisfy overridden on the sbatch
command line, exactly as a user would.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_ext.platform.launch import free_port
from tests.conftest import set_args

REPO = Path(__file__).resolve().parents[2]
SLURM_DIR = REPO / "scripts" / "slurm"
SCRIPTS = sorted(SLURM_DIR.glob("*.sh"))
MODEL_SCRIPTS = {"8x152M": 2, "dense-152M": 2, "8x1.5B": 8, "8x3.7B": 16}  # name -> nodes
TINY_CONFIG = "configs/tiny-cpu.yaml"
# USR1 is sent at the first logged step; this leaves ample steps for it to land mid-training
# (it reaches the ranks within a step or two; SMALL_MODEL steps take 0.05-0.4 s, loaded).
REQUEUE_STEPS = 60
# The requeue test's model: the signal, save, requeue and resume are its subject, not the
# shapes, and tiny-cpu's steps (~1 s each on 2 loaded cores) were most of its time. Mock tokens:
# the demo corpus's tokenizer needs tiny-cpu's vocabulary.
SMALL_MODEL = set_args(
    "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
    "model.vocab_size=512", "moe.num_experts=4", "data.demo_corpus=false", "data.mock=true",
    "data.seq_length=32", "train.global_batch_size=8", "train.micro_batch_size=4",
    "train.eval_interval=0")
TERMINAL_STATES = {
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
    "PREEMPTED", "TIMEOUT",
}  # fmt: skip
LOSS_LINE = re.compile(r"^.*\bstep\s+(\d+)\s*/\s*(\d+)\b.*\bloss\b.*$", re.MULTILINE)


def _entry_point_present() -> None:
    needed = ("pretrain_moe.py", TINY_CONFIG, "configs/8x152M.yaml")
    missing = [p for p in needed if not (REPO / p).is_file()]
    if missing:
        pytest.skip(f"training entry point not in the repository: missing {', '.join(missing)}")


def _submit(cluster, tmp_path: Path, *overrides: str,
            env: dict[str, str] | None = None) -> tuple[str, Path]:
    """Submit 8x152M.sh as a one-node CPU job of the tiny model (``env``: more of the submitting
    shell's environment); returns (job id, ckpt dir)."""
    _entry_point_present()
    ckpt = tmp_path / "ckpt"
    (tmp_path / "logs").mkdir(exist_ok=True)
    job = cluster.sbatch(
        "scripts/slurm/8x152M.sh",
        "--set", f"checkpoint.save={ckpt}",
        "--set", f"logging.output_dir={tmp_path / 'run'}",
        "--set", "schedule.warmup_steps=1",  # the demo's 10 would not fit these short runs
        *overrides,
        options=(
            "--nodes=1",
            # The local node has no GPUs (no gres); 0 lifts the script's --gpus-per-node=4.
            "--gpus-per-node=0",
            # A bound on a broken run; above the USR1 lead time so the warning never fires here.
            "--time=15:00",
            f"--output={tmp_path / 'logs' / '%x-%j.out'}",
        ),
        env={
            "MOE_CONFIG": TINY_CONFIG,
            "GPUS_PER_NODE": "2",
            # The launcher derives the port from the job id, and every private test cluster
            # numbers its jobs from 1: a free port keeps concurrent test sessions apart.
            "MOE_RDZV_PORT": str(free_port()),
            # The job runs with the interpreter running these tests (the project's venv).
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), cluster.env["PATH"]]),
            **(env or {}),
        },
    )  # fmt: skip
    return job, ckpt


def _log(info: dict[str, str]) -> str:
    path = Path(info["StdOut"])
    return path.read_text(errors="replace") if path.is_file() else ""


def _finished(info: dict[str, str]) -> bool:
    return info["JobState"] in TERMINAL_STATES


def test_usr1_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path):
    """One job shows the whole life: it trains, USR1 saves and requeues it, the requeued run
    resumes and completes with its final checkpoint. (One job, not two: each costs two
    torchrun ranks of start-up.)"""
    job, ckpt = _submit(
        slurm_cluster, tmp_path,
        *SMALL_MODEL,
        "--set", f"train.train_steps={REQUEUE_STEPS}",
        "--set", "train.log_interval=1",
        # No periodic checkpoint before the end: one that exists earlier is the preemption save.
        "--set", f"checkpoint.save_interval={REQUEUE_STEPS}",
    )  # fmt: skip
    info = slurm_cluster.wait_job(
        job, lambda i: _finished(i) or LOSS_LINE.search(_log(i)), timeout=180, what="training steps"
    )
    assert info["JobState"] == "RUNNING", f"finished before it could be signalled:\n{_log(info)}"

    # What SLURM does at `--signal=B:USR1@...` before the time limit: signal the batch shell.
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job)
    info = slurm_cluster.wait_job(
        job, lambda i: int(i["Restarts"]) >= 1 or _finished(i), timeout=120, what="the requeue"
    )
    assert int(info["Restarts"]) >= 1, f"job was not requeued:\n{_log(info)}"
    saved = (ckpt / "latest").is_file() and any(p.is_dir() for p in ckpt.iterdir())
    assert saved, f"no checkpoint saved on USR1:\n{_log(info)}"

    info = slurm_cluster.wait_job(job, _finished, timeout=240, what="the resumed run to finish")
    log = _log(info)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert "requeueing job" in log, log
    first_run, _, resumed_run = log.partition("resumed from")
    assert resumed_run, f"the second run did not resume from the checkpoint:\n{log}"
    # The log is appended to across runs (--open-mode=append): both runs trained.
    assert LOSS_LINE.search(first_run) and LOSS_LINE.search(resumed_run), log
    resumed_steps = [int(step) for step, _ in LOSS_LINE.findall(resumed_run)]
    assert min(resumed_steps) > 1, f"the second run started again from step 1:\n{log}"
    # Only rank 0 logs: in each run each step appears once although two processes train.
    for run in (first_run, resumed_run):
        steps = [int(step) for step, _ in LOSS_LINE.findall(run)]
        assert len(steps) == len(set(steps)), log
    assert max(resumed_steps) == REQUEUE_STEPS, log
    latest = (ckpt / "latest").read_text().strip()
    assert latest == f"iter_{REQUEUE_STEPS:07d}", f"no final checkpoint in {ckpt}:\n{log}"


def test_shellcheck_is_clean(shellcheck):
    assert len(SCRIPTS) >= 5, SCRIPTS
    others = [REPO / "tools/bench/gpu_session.sh", REPO / ".ci/run"]
    result = subprocess.run(
        [shellcheck, "--shell=bash", *map(str, SCRIPTS + others)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", sorted(MODEL_SCRIPTS))
def test_model_script_is_thin_and_wired_for_requeue(name):
    text = (SLURM_DIR / f"{name}.sh").read_text()
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, re.MULTILINE))
    assert sbatch["nodes"] == str(MODEL_SCRIPTS[name])
    assert sbatch["ntasks-per-node"] == "1"  # one torchrun per node
    assert sbatch["output"] == "logs/%x-%j.out"
    assert sbatch["open-mode"] == "append"  # a requeued run continues the same log
    # B: signals the batch shell, which is the launcher (exec): that is where USR1 is trapped.
    assert re.fullmatch(r"B:USR1@\d+", sbatch["signal"])
    assert "requeue" in sbatch
    assert f"export CONFIG=configs/{name}.yaml" in text
    assert re.search(r'^exec bash "\S*/scripts/slurm/launcher\.sh" "\$@"$', text, re.MULTILINE)


def test_launcher_refuses_to_run_outside_slurm():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run(
        ["bash", str(SLURM_DIR / "launcher.sh")], env=env, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "sbatch" in result.stderr
