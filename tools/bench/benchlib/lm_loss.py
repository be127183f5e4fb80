"""LM head + cross-entropy alone: megatron-core's path against our fused one (memory and time).

One forward + backward of ``loss = CE(hidden @ W.T, labels)`` weighted per token, for
- ``megatron``: ``F.linear`` then megatron's ``vocab_parallel_cross_entropy`` (fp32 logits and
  softmax), what ``model.lm_loss=megatron`` runs;
- ``megatron-fused``: the same with megatron's ``fused_vocab_parallel_cross_entropy``
  (torch.compile'd elementwise parts; bf16 only, it casts the gradient to bf16);
- ``ours`` / ``ours-compiled``: ``megatron_ext.model.lm_loss.linear_cross_entropy`` eager /
  with its chunk functions compiled (``model.kernel_fusion``).

Peak memory is what the step adds on top of its inputs (hidden, weight, labels):
``torch.cuda.max_memory_allocated`` on GPU, the process peak RSS (reset before each path) on CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from . import report

PATHS = ("megatron", "megatron-fused", "ours", "ours-compiled")


@dataclass
class LossBenchOptions:
    tokens: int = 16384
    hidden: int = 512
    vocab: int = 99584
    dtype: str = "bf16"
    repeats: int = 3
    paths: tuple[str, ...] = PATHS


def _step_fn(path: str) -> Callable:
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy

    from megatron_ext.model.lm_loss import linear_cross_entropy

    def run(h, w, labels, weights):
        if path == "megatron":
            loss = tensor_parallel.vocab_parallel_cross_entropy(F.linear(h, w), labels)
        elif path == "megatron-fused":
            group = parallel_state.get_tensor_model_parallel_group()
            loss = fused_vocab_parallel_cross_entropy(F.linear(h, w), labels, group)
        else:
            loss = linear_cross_entropy(h, w, labels, fuse=path == "ours-compiled")
        (loss.float() * weights).sum().backward()
        return loss.detach()

    return run


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**30


def measure(opts: LossBenchOptions) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda") if cuda else torch.device("cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[opts.dtype]
    gen = torch.Generator().manual_seed(0)
    h0 = torch.randn(opts.tokens, 1, opts.hidden, generator=gen).to(dev, dtype)
    w0 = (torch.randn(opts.vocab, opts.hidden, generator=gen) * 0.02).to(dev, dtype)
    labels = torch.randint(0, opts.vocab, (opts.tokens, 1), generator=gen).to(dev)
    weights = torch.rand(opts.tokens, 1, generator=gen).to(dev)
    results: dict[str, Any] = {}
    reference = None
    for path in opts.paths:
        if path == "megatron-fused" and dtype != torch.bfloat16:
            results[path] = {"status": "skipped", "why": "megatron's fused CE is bf16-only"}
            continue
        step = _step_fn(path)
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        step(h, w, labels, weights)  # warm-up (and compilation)
        h.grad = w.grad = None
        if cuda:
            torch.cuda.synchronize()
        base = torch.cuda.memory_allocated() if cuda else _rss_gib() * 2**30
        report.reset_peak_memory()
        times = []
        for _ in range(opts.repeats):
            h.grad = w.grad = None
            t0 = time.perf_counter()
            loss = step(h, w, labels, weights)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else (
            report.peak_memory_gib()["gib"] - base / 2**30)
        grad_w = w.grad.float()
        if reference is None:
            reference = (loss.float(), grad_w)
        results[path] = {
            "status": "ok", "ms_mean": 1e3 * sum(times) / len(times), "ms_min": 1e3 * min(times),
            "extra_peak_gib": peak, "loss_mean": float(loss.float().mean()),
            "loss_max_abs_diff": float((loss.float() - reference[0]).abs().max()),
            "grad_w_rel_diff": float((grad_w - reference[1]).norm() / reference[1].norm()),
        }
        del h, w, loss, grad_w
        if cuda:
            torch.cuda.empty_cache()
    return {"device": report.device_name(), "options": vars(opts), "paths": results}
