"""LocalTokenDispatcher (sync-free, EP=TP=1) against megatron's allgather dispatcher (CPU, fp32).

The same model (same seed, CPU init) is built with each dispatcher; loss, router losses and every
gradient must agree to fp32 rounding, for top-1 and top-2 routing and a layer pattern with dense
layers. The dispatcher itself is checked for megatron's expert-major order and its refusals.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import cpu_megatron_module, single_process_megatron

pytestmark = cpu_megatron_module()

from megatron.core import tensor_parallel  # noqa: E402
from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker  # noqa: E402
from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher  # noqa: E402

from megatron_ext.config.loader import load_config  # noqa: E402
from megatron_ext.model.builder import build_model, resolve_backends  # noqa: E402
from megatron_ext.model.dispatcher import LocalTokenDispatcher  # noqa: E402

SEQ, BATCH = 16, 3


@pytest.fixture(scope="module", autouse=True)
def model_parallel():
    yield from single_process_megatron()


def _model(dispatcher: str, top_k: int, layer_freq: str):
    cfg = load_config(None, [
        "model.num_layers=3", "model.hidden_size=32", "model.num_attention_heads=4",
        "model.ffn_hidden_size=48", "model.vocab_size=128", f"model.max_position_embeddings={SEQ}",
        "moe.num_experts=5", f"moe.top_k={top_k}", f"moe.layer_freq={layer_freq}",
        f"moe.token_dispatcher={dispatcher}", "train.precision=fp32",
        f"data.seq_length={SEQ}", "moe.aux_loss_coeff=0.02", "moe.z_loss_coeff=0.001",
    ])
    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    backends = resolve_backends(cfg, cuda=False)
    assert backends.dispatcher == dispatcher
    return build_model(cfg, backends)


def _run(model) -> tuple[torch.Tensor, torch.Tensor, dict]:
    tracker = get_moe_layer_wise_logging_tracker()
    tracker.clear()
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 128, (BATCH, SEQ + 1), generator=gen)
    pos = torch.arange(SEQ).expand(BATCH, SEQ)
    loss = model(tokens[:, :-1], pos, None, labels=tokens[:, 1:]).mean()
    loss.backward()
    aux = tracker["load_balancing_loss"]["values"].clone()
    tracker.clear()
    return loss.detach(), aux, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("top_k, layer_freq", [(2, "1"), (1, "[1,0,1]"), (3, "[0,1,1]")])
def test_matches_allgather_dispatcher(top_k: int, layer_freq: str) -> None:
    local, gather = _model("local", top_k, layer_freq), _model("allgather", top_k, layer_freq)
    dispatchers = [m.token_dispatcher for m in local.modules() if hasattr(m, "token_dispatcher")]
    assert dispatchers and all(isinstance(d, LocalTokenDispatcher) for d in dispatchers)
    assert all(isinstance(m.token_dispatcher, MoEAllGatherTokenDispatcher)
               for m in gather.modules() if hasattr(m, "token_dispatcher"))
    gather.load_state_dict(local.state_dict())
    loss_l, aux_l, grads_l = _run(local)
    loss_g, aux_g, grads_g = _run(gather)
    torch.testing.assert_close(loss_l, loss_g, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(aux_l, aux_g, rtol=1e-6, atol=1e-7)
    assert sorted(grads_l) == sorted(grads_g)
    assert any("router" in n for n in grads_l)
    for name, g in grads_g.items():
        torch.testing.assert_close(grads_l[name], g, rtol=1e-5, atol=1e-7,
                                   msg=lambda m: f"{name}: {m}")


def test_expert_major_order_and_device_counts() -> None:
    model = _model("local", 2, "1")
    d = next(m.token_dispatcher for m in model.modules() if hasattr(m, "token_dispatcher"))
    # 4 tokens, 5 experts, top-2; token t routed to experts (t, t+1) mod 5 with prob 0.1*(t+1)
    routing = torch.zeros(4, 5, dtype=torch.bool)
    probs = torch.zeros(4, 5)
    for t in range(4):
        for e in (t % 5, (t + 1) % 5):
            routing[t, e], probs[t, e] = True, 0.1 * (t + 1) + 0.01 * e
    hidden = torch.arange(4.0).view(4, 1, 1).expand(4, 1, 3).contiguous()  # row t holds t
    x, p = d.token_dispatch(*d.dispatch_preprocess(hidden, routing, probs))
    permuted, per_expert, permuted_probs = d.dispatch_postprocess(x, p)
    # expert 0: token 0; expert 1: tokens 0, 1; expert 2: 1, 2; expert 3: 2, 3; expert 4: 3
    assert permuted[:, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert per_expert.tolist() == [1, 2, 2, 2, 1] and per_expert.device == hidden.device
    want = [probs[t, e].item() for e, t in [(0, 0), (1, 0), (1, 1), (2, 1), (2, 2), (3, 2),
                                             (3, 3), (4, 3)]]
    assert permuted_probs.tolist() == pytest.approx(want)
    # Combine sums each token's expert outputs back into its row.
    out = d.combine_postprocess(d.token_combine(d.combine_preprocess(permuted * 10)))
    assert out.shape == hidden.shape and out[:, 0, 0].tolist() == [0, 20, 40, 60]


def test_refuses_token_dropping() -> None:
    model = _model("local", 2, "1")
    cfg = next(m.config for m in model.modules() if hasattr(m, "token_dispatcher"))
    import dataclasses

    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    dropping = dataclasses.replace(cfg, moe_expert_capacity_factor=1.0)
    with pytest.raises(ValueError, match="dropless"):
        LocalTokenDispatcher(5, dropping, get_default_pg_collection())
