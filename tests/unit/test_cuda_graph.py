"""train.cuda_graph on the CPU: the combinations it cannot capture are refused in one line, a
CPU run warns and runs eagerly, and the bench's activation probe frees the graph it measures.
The capture itself is tested on a GPU (tests/gpu/test_gpu_cuda_graph.py)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from tests.conftest import run_cli


@pytest.mark.parametrize("overrides, message", [
    (["parallel.expert=2", "parallel.world_size=2"], "needs the local token dispatcher"),
    (["moe.capacity_factor=1.0"], "needs the local token dispatcher"),
    (["moe.token_dispatcher=allgather"], "needs the local token dispatcher"),
    (["moe.grouped_gemm=false"], "needs moe.grouped_gemm: true"),
    (["train.recompute=full"], "cannot be combined with train.recompute"),
])
def test_uncapturable_combinations_are_one_line(overrides, message):
    args = ["pretrain_moe.py", "--config", "configs/tiny-cpu.yaml", "--dry-run",
            "--set", "train.cuda_graph=true"]
    for o in overrides:
        args += ["--set", o]
    proc = run_cli(args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"train.cuda_graph: {message}" in lines[0], proc.stderr


def test_capturable_config_passes_validation():
    proc = run_cli(["pretrain_moe.py", "--config", "configs/8x152M.yaml", "--dry-run",
                    "--set", "train.cuda_graph=true"])
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback")
def test_cpu_training_run_warns_and_runs_eagerly(tmp_path):
    """configs/8x152M.yaml turns it on; the same file must still run on a CPU."""
    proc = run_cli(["pretrain_moe.py", "--config", "configs/tiny-cpu.yaml",
                    "--set", "train.cuda_graph=true", "--set", "train.train_steps=2",
                    "--set", "schedule.warmup_steps=1", "--set", "data.demo_corpus=false",
                    "--set", "data.mock=true",
                    "--set", f"logging.output_dir={tmp_path}/run",
                    "--set", f"checkpoint.save={tmp_path}/ckpt"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "train.cuda_graph: no CUDA device, so steps run eagerly" in proc.stderr + proc.stdout
    assert "summary: completed | steps 2" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal")
def test_step_graph_needs_cuda():
    from megatron_ext.training.cuda_graph import GraphCaptureError, StepGraph

    with pytest.raises(GraphCaptureError, match="needs a CUDA device"):
        StepGraph()


def test_activation_probe_frees_the_graph():
    """sigmoid saves its output: a pack hook returning the tensor itself would tie the output
    to its own grad_fn in a cycle gc cannot free (the leak the H100 bench showed)."""
    from tools.bench.benchlib.activations import saved_activation_bytes

    w = torch.randn(64, 64, requires_grad=True)
    with saved_activation_bytes([w]) as held:
        y = torch.sigmoid(torch.randn(32, 64) @ w)
        n = held()
    assert n >= y.numel() * y.element_size()
    ref = weakref.ref(y)
    del y
    gc.collect()
    assert ref() is None, "the probed graph outlived the measurement"


def test_activation_probe_keeps_backward_working():
    from tools.bench.benchlib.activations import saved_activation_bytes

    x = torch.randn(8, 16)
    w = torch.randn(16, 16, requires_grad=True)
    (torch.sigmoid(x @ w) ** 2).sum().backward()
    expected = w.grad.clone()
    w.grad = None
    with saved_activation_bytes([w]):
        loss = (torch.sigmoid(x @ w) ** 2).sum()
    loss.backward()
    torch.testing.assert_close(w.grad, expected)
