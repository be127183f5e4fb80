"""The all-layers load-balancing loss (moe.aux_loss_scope: all_layers) against transformers'
``load_balancing_loss_func``, the function the paper's stack trained with: same value and same
gradient on the same router logits (fp32, 1e-6 relative); written without host syncs and with
shapes that do not depend on the data (what a captured CUDA graph needs), checked here on the
CPU by recording every aten op of a forward and backward; and what validation refuses."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from megatron_ext.config.loader import ConfigError, load_config
from megatron_ext.config.validate import validate
from megatron_ext.model.load_balancing import all_layers_loss, routing_statistics
from tests.conftest import run_cli

RTOL = 1e-6


def _ours(logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    counts = sums = 0
    for layer in logits:
        c, s = routing_statistics(layer, top_k)
        counts, sums = counts + c, sums + s
    rows = sum(x.shape[0] for x in logits)
    return all_layers_loss(counts, sums, rows, logits[0].shape[1])


@pytest.mark.parametrize("experts, top_k, layers, tokens, scale", [
    (8, 2, 4, 96, 1.0), (8, 2, 12, 50, 3.0), (4, 1, 3, 64, 1.0), (16, 4, 2, 33, 0.1)])
def test_value_and_gradient_equal_transformers(experts, top_k, layers, tokens, scale):
    gen = torch.Generator().manual_seed(experts * layers + tokens)
    # Skewed logits (a per-expert bias): imbalance that the loss's gradient acts on.
    bias = torch.randn(experts, generator=gen) * 2
    base = [(torch.randn(tokens, experts, generator=gen) * scale + bias) for _ in range(layers)]
    theirs_in = [x.clone().requires_grad_() for x in base]
    ours_in = [x.clone().requires_grad_() for x in base]
    theirs = load_balancing_loss_func(tuple(theirs_in), experts, top_k)
    ours = _ours(ours_in, top_k)
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=0)
    assert theirs.item() > top_k * 1.01, "balanced logits: the check would prove little"
    g_theirs = torch.autograd.grad(theirs, theirs_in)
    g_ours = torch.autograd.grad(ours, ours_in)
    for a, b in zip(g_ours, g_theirs, strict=True):
        assert (a - b).norm() <= RTOL * b.norm(), ((a - b).norm(), b.norm())


def test_value_is_top_k_at_perfect_balance():
    # Every expert chosen equally often with equal mean probability: loss = k.
    top_k = 2
    logits = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]).repeat(8, 1)
    torch.testing.assert_close(_ours([logits, logits], top_k), torch.tensor(float(top_k)))


class _OpLog(TorchDispatchMode):
    """Every aten op with its output shapes; host syncs (``.item()``, ``bool()``, data-dependent
    output sizes) are the ops below."""

    SYNCS = ("aten._local_scalar_dense", "aten.nonzero", "aten.unique", "aten.masked_select",
             "aten.bincount", "aten.histc")

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        assert not name.startswith(self.SYNCS), f"{name}: a host sync in the loss"
        flat = out if isinstance(out, (tuple, list)) else (out,)
        self.ops.append((name, tuple(tuple(t.shape) for t in flat if isinstance(t, torch.Tensor))))
        return out


def _trace(seed: int) -> list:
    gen = torch.Generator().manual_seed(seed)
    logits = [torch.randn(40, 8, generator=gen).requires_grad_() for _ in range(3)]
    with _OpLog() as log:
        _ours(logits, 2).backward()
    return log.ops


def test_no_host_sync_and_shapes_independent_of_the_data():
    a, b = _trace(0), _trace(1)
    assert len(a) > 10 and a == b


def _cfg(*sets: str):
    return load_config("configs/8x152M.yaml", ["parallel.world_size=8", *sets])


@pytest.mark.parametrize("sets, message", [
    (["parallel.pipeline=2", "train.cuda_graph=false"], "needs parallel.pipeline = 1"),
    (["train.recompute=full", "train.cuda_graph=false"], "recomputing whole MoE layers"),
    (["train.recompute=selective", "train.recompute_modules=[moe]", "train.cuda_graph=false"],
     "recomputing whole MoE layers"),
])
def test_refused_where_it_cannot_be_exact(sets, message):
    with pytest.raises(ConfigError, match=f"moe.aux_loss_scope: .*{message}"):
        validate(_cfg(*sets))
    validate(_cfg(*sets, "moe.aux_loss_scope=per_layer"))  # megatron's loss works there


def test_cli_refusal_is_one_line_exit_2():
    proc = run_cli(["pretrain_moe.py", "--config", "configs/8x152M.yaml", "--dry-run",
                    "--set", "parallel.pipeline=2", "--set", "train.cuda_graph=false"])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "moe.aux_loss_scope: all_layers" in lines[0], proc.stderr
