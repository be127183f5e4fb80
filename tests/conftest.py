"""Shared test helpers: repo paths and running the real CLIs in subprocesses."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(args: list[str], timeout: int = 600, env: dict | None = None,
            cwd: Path = REPO) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
                    WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR", "SLURM_PROCID", "SLURM_NTASKS"):
        full_env.pop(k, None)
    full_env["MASTER_ADDR"] = "127.0.0.1"
    full_env["MASTER_PORT"] = str(free_port())
    full_env.update(env or {})
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def torchrun(nproc: int, args: list[str], timeout: int = 600,
             env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli(["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                    *args], timeout=timeout, env=env)


@pytest.fixture
def repo() -> Path:
    return REPO


def single_process_megatron(seed: int | None = None):
    """Generator for module fixtures that build megatron models in the pytest process:
    a one-process gloo group (reused if one exists) and TP=PP=EP=1 parallel state."""
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    created = not dist.is_initialized()
    if created:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=1)
    if seed is not None:
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    yield
    parallel_state.destroy_model_parallel()
    if created:
        dist.destroy_process_group()
