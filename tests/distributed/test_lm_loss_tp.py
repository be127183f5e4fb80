"""The fused LM loss with the vocabulary split over TP=2 (2 gloo processes on CPU).

Each rank holds half of the output weight's rows; the loss and every gradient must equal plain
single-process cross-entropy on the full weight -- with replicated hidden states (TP only) and
with sequence-sharded ones (sequence parallelism). Labels fall on both ranks' halves.
"""

from __future__ import annotations

import os
import warnings

import torch

from tests.conftest import free_port, spawn_workers

WORLD_SIZE, S, B, H, V = 2, 6, 2, 8, 20
TIMEOUT_S = 120


def _worker(rank: int, port: int) -> None:
    from megatron_ext.platform import cpu

    cpu.enable_if_needed()
    warnings.filterwarnings("ignore")
    import torch.distributed as dist
    import torch.nn.functional as F

    from megatron_ext.model.lm_loss import linear_cross_entropy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    group = dist.new_group([0, 1])
    gen = torch.Generator().manual_seed(0)
    h_full = torch.randn(S, B, H, generator=gen)
    w_full = torch.randn(V, H, generator=gen)
    labels = torch.randint(0, V, (S, B), generator=gen)
    weights = torch.rand(S, B, generator=gen)
    assert (labels < V // 2).any() and (labels >= V // 2).any()

    h_ref = h_full.clone().requires_grad_()
    w_ref = w_full.clone().requires_grad_()
    ref = F.cross_entropy((h_ref @ w_ref.t()).view(-1, V), labels.view(-1), reduction="none")
    (ref * weights.view(-1)).sum().backward()
    ref = ref.view(S, B).detach()

    rows = slice(rank * V // 2, (rank + 1) * V // 2)
    seq = slice(rank * S // 2, (rank + 1) * S // 2)
    for sequence_parallel in (False, True):
        h = (h_full[seq] if sequence_parallel else h_full).clone().requires_grad_()
        w = w_full[rows].clone().requires_grad_()
        loss = linear_cross_entropy(h, w, labels, tp_group=group,
                                    sequence_parallel=sequence_parallel)
        (loss * weights).sum().backward()
        what = f"rank {rank} sp={sequence_parallel}"
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")
        want_h = h_ref.grad[seq] if sequence_parallel else h_ref.grad
        torch.testing.assert_close(h.grad, want_h, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{what} grad_h: {m}")
        torch.testing.assert_close(w.grad, w_ref.grad[rows], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{what} grad_w: {m}")
    dist.destroy_process_group()


def test_fused_lm_loss_vocab_parallel(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the CPU path (gloo), also on a GPU host
    spawn_workers(_worker, (free_port(),), WORLD_SIZE, TIMEOUT_S, "TP=2")
