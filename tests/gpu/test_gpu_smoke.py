"""GPU smoke test: the full-size 8x152M model trains 3 steps on one GPU through our real setup
(megatron DDP + distributed optimizer, bf16, the auto dispatcher -- our local one at EP=1 --,
SDPA, grouped experts, the fused LM loss, torch.compile'd fusions). Also: the fused loss against
megatron's on the 8x152M head, and no host sync in a MoE layer's forward + backward.

Skipped without CUDA. Run: ``python -m pytest -q -s tests/gpu`` (prints tokens/s).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from megatron_ext.platform.launch import free_port

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

SEQ, MICRO_BATCH, STEPS = 1024, 2, 3
OVERRIDES = [
    "data.mock=true", f"data.seq_length={SEQ}", f"train.micro_batch_size={MICRO_BATCH}",
    f"train.global_batch_size={MICRO_BATCH}", f"train.train_steps={STEPS}",
    "train.train_tokens=null", "schedule.warmup_steps=1", "parallel.expert=1",
    "parallel.world_size=1", "logging.wandb.mode=disabled", "checkpoint.save=null",
]


@dataclass
class SmokeResult:
    losses: list[float]
    tokens_per_s: float
    run: Any
    router_gemm_defined: bool  # before this test's fallback, see test_router_gemm_name_defined


def train_steps(config_path: str, overrides: list[str], steps: int) -> SmokeResult:
    """Build the run as pretrain_moe.py does and take ``steps`` optimizer steps."""
    from megatron.core.transformer.moe import moe_utils

    from megatron_ext.config.derived import derive
    from megatron_ext.config.loader import load_config
    from megatron_ext.config.validate import validate
    from megatron_ext.platform.dist import init_distributed
    from megatron_ext.training.batches import MicroBatches
    from megatron_ext.training.forward import forward_backward, reduce_loss
    from megatron_ext.training.optim import clip_and_step, prepare_and_norm
    from megatron_ext.training.setup import build_run

    cfg = load_config(config_path, overrides)
    validate(cfg, world_size=1)
    layout = init_distributed(cfg)
    run = build_run(cfg, derive(cfg), layout)
    # megatron-core 0.16.1's router reads moe_utils.te_general_gemm, a name that only exists
    # when Transformer Engine imports; init_distributed (platform.compat) must have defined it.
    defined = getattr(moe_utils, "HAVE_TE", False) or hasattr(moe_utils, "te_general_gemm")
    tr = cfg.train
    micro = MicroBatches(run.train_ds, tr.global_batch_size, tr.micro_batch_size, 1, 0,
                         layout.device)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    losses, times = [], []
    for step in range(steps):
        batches = list(micro.step(step * tr.global_batch_size))
        sync()
        t0 = time.perf_counter()
        run.model.zero_grad_buffer()
        run.optimizer.zero_grad()
        # The trainer's own step (megatron_ext.training.trainer), timed without its callbacks.
        reports = forward_backward(run, batches, forward_only=False)
        found_inf, grad_norm = prepare_and_norm(run.optimizer)
        assert not found_inf and math.isfinite(grad_norm), (step, grad_norm)
        clip_and_step(run.optimizer, grad_norm, cfg.optimizer.clip_grad)
        run.scheduler.step(increment=1)
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(reduce_loss(reports, layout.device))
    timed = times[1:] or times  # the first step carries one-time setup (allocator, autotune)
    tokens = tr.global_batch_size * cfg.data.seq_length
    return SmokeResult(losses, tokens * len(timed) / sum(timed), run, defined)


@pytest.fixture(scope="module")
def smoke() -> Iterator[SmokeResult]:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(key, None)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(free_port())
    try:
        yield train_steps("configs/8x152M.yaml", OVERRIDES, STEPS)
    finally:
        from megatron_ext.platform.dist import shutdown

        shutdown()


def test_8x152m_trains_three_steps_bf16(smoke: SmokeResult) -> None:
    from megatron_ext.platform import cpu

    run, losses = smoke.run, smoke.losses
    print(f"\n8x152M bf16 seq {SEQ} mb {MICRO_BATCH}: backends {run.backends.describe()}; "
          f"losses {[round(x, 4) for x in losses]}; {smoke.tokens_per_s:,.0f} tokens/s "
          f"(3-step smoke run incl. DDP + distributed optimizer)")
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), losses
    # Random init over a ~100k vocabulary: the loss starts near ln(vocab) ~ 11.5.
    assert 5.0 < losses[0] < 15.0, losses
    assert run.backends.precision == "bf16" and run.backends.dispatcher == "local"
    assert run.backends.experts in ("grouped", "te-grouped")
    assert run.backends.lm_loss == "fused" and run.backends.fusion
    from megatron.core.transformer import TransformerConfig

    configs = [m.config for m in run.model.modules()
               if isinstance(getattr(m, "config", None), TransformerConfig)]
    assert configs and all(c.apply_rope_fusion and c.bias_activation_fusion for c in configs)
    assert run.layout.backend == "nccl" and run.distributed_optimizer
    # The CPU redirections must never be active on a GPU machine.
    assert not cpu.is_enabled()
    assert next(run.model.parameters()).is_cuda


def test_router_gemm_name_defined(smoke: SmokeResult) -> None:
    """Without Transformer Engine, megatron-core 0.16.1's router forward raises NameError
    (``te_general_gemm``) unless the framework sets ``moe_utils.te_general_gemm = None`` on
    GPU too (megatron_ext.platform.compat, called from init_distributed)."""
    assert smoke.router_gemm_defined, (
        "moe_utils.te_general_gemm undefined on GPU without TE: training would fail with "
        "NameError in the router")


def test_compiled_fusions_ran(smoke: SmokeResult) -> None:
    """Training used the torch.compile'd loss chunks / RMSNorm, not the eager fallback."""
    from megatron_ext.model import fusion

    assert not fusion.FAILED, f"torch.compile failed on GPU for {sorted(fusion.FAILED)}"


def test_fused_loss_matches_megatron_bf16_on_gpu(smoke: SmokeResult) -> None:  # TP group
    """The 8x152M head (16k tokens, 99,584 vocabulary) in bf16: loss and gradients of the fused
    loss (compiled) against megatron's vocab_parallel_cross_entropy; it also uses less memory."""
    import torch.nn.functional as F
    from megatron.core import tensor_parallel

    from megatron_ext.model.lm_loss import linear_cross_entropy

    gen = torch.Generator(device="cuda").manual_seed(0)
    tokens, hidden, vocab = 16384, 512, 99584
    h0 = torch.randn(tokens, 1, hidden, device="cuda", generator=gen).bfloat16()
    w0 = (torch.randn(vocab, hidden, device="cuda", generator=gen) * 0.02).bfloat16()
    labels = torch.randint(0, vocab, (tokens, 1), device="cuda", generator=gen)
    weights = torch.rand(tokens, 1, device="cuda", generator=gen)
    out = {}
    for name in ("megatron", "fused"):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        if name == "megatron":
            loss = tensor_parallel.vocab_parallel_cross_entropy(F.linear(h, w), labels)
        else:
            loss = linear_cross_entropy(h, w, labels, fuse=True)
        (loss.float() * weights).sum().backward()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        out[name] = (loss.detach().float(), h.grad.float(), w.grad.float(), peak)
    ref, got = out["megatron"], out["fused"]
    print(f"\nLM head peak memory: megatron {ref[3]:.2f} GiB, fused {got[3]:.2f} GiB")
    torch.testing.assert_close(got[0], ref[0], rtol=1e-2, atol=1e-2)
    for a, b in zip(got[1:3], ref[1:3], strict=False):
        assert float((a - b).norm() / b.norm()) < 2e-2
    assert got[3] < 0.6 * ref[3]


def test_moe_layer_forward_backward_has_no_host_sync(smoke: SmokeResult) -> None:
    """Router + LocalTokenDispatcher + GroupedGemmExperts never block the CPU on the GPU
    (torch's sync debug mode raises on any synchronizing call)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_ext.model.dispatcher import LocalTokenDispatcher

    layer = next(m for m in smoke.run.model.modules() if isinstance(m, MoELayer))
    assert isinstance(layer.token_dispatcher, LocalTokenDispatcher)
    hidden = layer.config.hidden_size
    x = torch.randn(1024, 2, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for sync_mode in (0, "error"):  # the first pass compiles and warms up
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode(sync_mode)
        try:
            out, _ = layer(x)
            out.float().sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_async_save_writes_the_state_at_the_call_on_gpu(smoke: SmokeResult, tmp_path) -> None:
    """checkpoint.async_save on GPU: megatron copies the shards to host memory, then forks the
    writer; parameters changed right after save() returns must not reach the checkpoint.
    Model only (0.8 GB, not 6 GB with the optimizer) to keep the GPU session's smoke step short;
    the optimizer's path is the same code and is checked on CPU. Last in this module: it changes
    the smoke run's parameters (and restores them)."""
    from tests.resilience import check_async_snapshot

    check_async_snapshot(smoke.run.model, None, tmp_path / "ckpt")
