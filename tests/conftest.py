"""Shared test helpers: repo paths and running the real CLIs in subprocesses."""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_ext.platform.launch import free_port  # noqa: F401 (the tests' one helper)
from tests.scheduling import order_longest_first

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def set_args(*settings: str) -> list[str]:
    """``--set`` options of the CLIs: set_args("a.b=1", "c.d=2") -> [--set, a.b=1, --set, c.d=2]."""
    return [arg for setting in settings for arg in ("--set", setting)]


def run_cli(args: list[str], timeout: int = 600, env: dict | None = None,
            cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=cli_env(env), capture_output=True,
                          text=True, timeout=timeout)


def cli_env(env: dict | None = None) -> dict:
    """The environment of a CLI run by a test: no rank variables of ours, ``env`` added."""
    # The repo first; keep what the caller's PYTHONPATH adds (e.g. wheels unpacked elsewhere).
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    full_env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1",
                    WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR", "SLURM_PROCID",
              "SLURM_NTASKS"):
        full_env.pop(k, None)
    # No MASTER_PORT: a single process picks a free one itself right before it binds it
    # (platform.dist); one chosen here could be taken during the seconds of start-up.
    full_env["MASTER_ADDR"] = "127.0.0.1"
    full_env.update(env or {})
    return full_env


def torchrun(nproc: int, args: list[str], timeout: int = 600,
             env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli(["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                    *args], timeout=timeout, env=env)


def pytest_collection_modifyitems(config, items):
    order_longest_first(items)  # with --no-loadscope-reorder: the two workers finish together


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


def spawn_workers(worker, args: tuple, nprocs: int, timeout_s: float, what: str) -> None:
    """Run ``worker(rank, *args)`` in ``nprocs`` spawned processes; a worker's exception fails
    the test (torch re-raises it), and so does running past ``timeout_s`` (workers killed)."""
    import time

    import torch.multiprocessing as mp

    context = mp.spawn(worker, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{what} workers did not finish within {timeout_s}s")


def cpu_megatron_module() -> list:
    """``pytestmark`` for a module that builds megatron models in the pytest process on CPU.
    Enables megatron_ext's CPU path now (before the module imports megatron's model code);
    on a CUDA machine the module is skipped, since the CPU path refuses to turn on there."""
    import torch

    from megatron_ext.platform import cpu

    if not torch.cuda.is_available():
        cpu.enable()
    return [
        pytest.mark.skipif(torch.cuda.is_available(),
                           reason="GPTModel on CPU needs the CPU path (off with CUDA)"),
        # megatron's RNG tracker warns on CPU, where "CUDA" and CPU RNG are one generator.
        pytest.mark.filterwarnings("ignore:CPU RNG state changed"),
    ]


# --- shared by the bounded-input class tests (issue 24) ---------------------------------------
HEADROOM = 768 * 2**20  # the fixed tools need < 0.5 GB above their imports (measured)


@pytest.fixture(scope="module")
def address_limit() -> int:
    """Bytes of address space: the tools' imports on this machine (VmPeak), plus HEADROOM."""
    probe = ("import megatron.core.datasets.indexed_dataset, tokenizers, torch\n"
             "print(open('/proc/self/status').read())")
    status = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True, env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    return int(re.search(r"VmPeak:\s+(\d+) kB", status).group(1)) * 1024 + HEADROOM


def run_limited(args: list[str], limit: int, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python args`` in the repository under an address-space limit of ``limit`` bytes."""
    def cap() -> None:  # in the child, before exec: the tool and its workers get the limit
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=cap)


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory) -> Path:
    """A tiny Llama saved by transformers (bf16 safetensors, config.json): an HF input."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("safetensors") / "dense"
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, vocab_size=256)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_dense(tmp_path_factory) -> Path:
    """A dense HF Llama of the shape that the shortened comparison's config
    (tests/unit/test_compare_inits.py) describes: a ``--dense`` base of moe-compare-inits."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("hf") / "dense"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=4096, max_position_embeddings=256,
        tie_word_embeddings=False)).save_pretrained(path)
    return path


@pytest.fixture
def keep_sigterm():
    """For a test calling a tool's ``main`` in process: run_cli installs its own SIGTERM handler
    while it runs; put pytest's back after."""
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)
