"""Our optimized model path matches megatron-core's reference path on a fixed batch (CPU).

optimized: our builder with SDPA core attention + GroupedGemmExperts + the fused LM loss;
reference: our builder with megatron's unfused DotProductAttention + SequentialMLP + megatron's
output layer and vocab_parallel_cross_entropy, i.e. the local spec as megatron ships it. Both
get identical weights (the reference's state dict loaded into the optimized model through
GroupedGemmExperts' SequentialMLP-key load hook).

fp32: LM loss, router load-balancing losses and every gradient within 1e-5.
bf16: both paths with bf16 parameters and activations (CPU kernels, no autocast), copied from
the same fp32 weights. Tolerances: loss within 2e-2 relative of each other and of the fp32
loss; gradients within 2e-2 relative (global norm of the difference over the norm) -- bf16 has
8 mantissa bits (~4e-3 per rounding) and the two paths round in different places.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import cpu_megatron_module, single_process_megatron

pytestmark = cpu_megatron_module()

from megatron.core import tensor_parallel  # noqa: E402
from megatron.core.transformer.dot_product_attention import DotProductAttention  # noqa: E402
from megatron.core.transformer.module import Float16Module  # noqa: E402
from megatron.core.transformer.moe.experts import SequentialMLP  # noqa: E402
from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker  # noqa: E402

from megatron_ext.config.loader import load_config  # noqa: E402
from megatron_ext.config.schema import Config  # noqa: E402
from megatron_ext.model.attention import SDPAttention  # noqa: E402
from megatron_ext.model.builder import build_model, resolve_backends  # noqa: E402
from megatron_ext.model.experts import GroupedGemmExperts, grouped_to_sequential_state  # noqa: E402
from megatron_ext.model.lm_loss import FusedLossGPTModel  # noqa: E402

BATCH, SEQ, LAYERS = 2, 32, 3
FP32_TOL = dict(rtol=1e-5, atol=1e-5)
BF16_LOSS_RTOL, BF16_GRAD_RTOL = 2e-2, 2e-2


@pytest.fixture(scope="module", autouse=True)
def model_parallel():
    yield from single_process_megatron()


def _cfg(path: str, precision: str) -> Config:
    # GQA (4 query / 2 kv heads), 4 experts top-2, all layers MoE, untied embeddings.
    return load_config(None, [
        f"model.num_layers={LAYERS}", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.num_kv_heads=2", "model.ffn_hidden_size=96", "model.vocab_size=256",
        f"model.max_position_embeddings={SEQ}", f"model.attention_backend={path}",
        "moe.num_experts=4", "moe.top_k=2", "moe.aux_loss_coeff=0.02",
        f"moe.grouped_gemm={'true' if path == 'sdpa' else 'false'}",
        "moe.token_dispatcher=allgather", f"train.precision={precision}",
        f"model.lm_loss={'fused' if path == 'sdpa' else 'megatron'}",
        f"data.seq_length={SEQ}",
    ])


def _build(path: str, precision: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    cfg = _cfg(path, precision)
    backends = resolve_backends(cfg, cuda=False)
    expected = ("sdpa", "grouped") if path == "sdpa" else ("unfused", "sequential")
    assert (backends.attention, backends.experts) == expected, backends.describe()
    model = build_model(cfg, backends)
    assert isinstance(model, FusedLossGPTModel) == (path == "sdpa"), type(model)
    layer = model.decoder.layers[0]
    modules = (type(layer.self_attention.core_attention), type(layer.mlp.experts))
    assert modules == ((SDPAttention, GroupedGemmExperts) if path == "sdpa"
                       else (DotProductAttention, SequentialMLP)), modules
    return model


def _batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (BATCH, SEQ + 1), generator=gen)
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
            "position_ids": torch.arange(SEQ).expand(BATCH, SEQ)}


def _run(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(LM loss, per-layer load-balancing losses, gradients by SequentialMLP-style name)."""
    tracker = get_moe_layer_wise_logging_tracker()
    # Drop entries, not just zero them: their size is the layer count of whichever model
    # (possibly another test module's) saved first.
    tracker.clear()
    model.zero_grad(set_to_none=True)
    per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    loss = per_token.float().mean()
    loss.backward()  # the aux loss joins here (megatron's MoEAuxLossAutoScaler)
    aux = tracker["load_balancing_loss"]["values"].clone()
    tracker.clear()
    grads = {n.removeprefix("module."): p.grad.float()
             for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), aux, grouped_to_sequential_state(grads)


@pytest.fixture(scope="module")
def reference_state() -> dict:
    return _build("unfused", "fp32", seed=1).state_dict()


def _pair(precision: str, state: dict) -> tuple[torch.nn.Module, torch.nn.Module]:
    # Different seeds: parity below is due to the copied weights, not to a shared init.
    ref, opt = _build("unfused", precision, seed=1), _build("sdpa", precision, seed=2)
    ref.load_state_dict(state, strict=True)
    opt.load_state_dict(state, strict=True)  # SequentialMLP keys -> stacked expert weights
    if precision == "bf16":
        # As the training setup does: all parameters (norms too) in bf16, fp32 outputs.
        return Float16Module(ref.config, ref), Float16Module(opt.config, opt)
    return ref, opt


def test_fp32_loss_and_gradients_match(reference_state: dict) -> None:
    ref, opt = _pair("fp32", reference_state)
    batch = _batch()
    loss_ref, aux_ref, g_ref = _run(ref, batch)
    loss_opt, aux_opt, g_opt = _run(opt, batch)
    print(f"fp32 loss {loss_ref.item():.6f} vs {loss_opt.item():.6f}")
    torch.testing.assert_close(loss_opt, loss_ref, **FP32_TOL)
    torch.testing.assert_close(aux_opt, aux_ref, **FP32_TOL)
    assert aux_ref.abs().sum() > 0, "aux loss not recorded: the check above proves nothing"
    assert sorted(g_opt) == sorted(g_ref) and len(g_ref) > 10
    for name, g in g_ref.items():
        torch.testing.assert_close(g_opt[name], g, **FP32_TOL, msg=lambda m: f"{name}: {m}")
    assert any(".router." in n for n in g_ref) and any("local_experts" in n for n in g_ref)


def _rel_err(a: dict, b: dict) -> float:
    diff = torch.stack([(a[n] - b[n]).norm() for n in b]).norm()
    return float(diff / torch.stack([b[n].norm() for n in b]).norm())


def test_bf16_loss_and_gradients_close(reference_state: dict) -> None:
    batch = _batch()
    ref32, _ = _pair("fp32", reference_state)
    loss_32, _, g_32 = _run(ref32, batch)
    ref, opt = _pair("bf16", reference_state)
    assert next(opt.parameters()).dtype == torch.bfloat16
    loss_ref, _, g_ref = _run(ref, batch)
    loss_opt, _, g_opt = _run(opt, batch)
    print(f"bf16 losses ref {loss_ref.item():.5f} opt {loss_opt.item():.5f} fp32 "
          f"{loss_32.item():.5f}; grad rel err opt/ref {_rel_err(g_opt, g_ref):.3g} "
          f"opt/fp32 {_rel_err(g_opt, g_32):.3g} ref/fp32 {_rel_err(g_ref, g_32):.3g}")
    for loss in (loss_ref, loss_opt):
        assert abs(loss.item() - loss_32.item()) <= BF16_LOSS_RTOL * loss_32.item()
    assert abs(loss_opt.item() - loss_ref.item()) <= BF16_LOSS_RTOL * loss_ref.item()
    assert sorted(g_opt) == sorted(g_ref)
    assert _rel_err(g_opt, g_ref) < BF16_GRAD_RTOL
    assert _rel_err(g_opt, g_32) < BF16_GRAD_RTOL


def test_compiled_fusions_match_eager(reference_state: dict) -> None:
    """kernel_fusion (the GPU default): megatron's torch.compile'd SwiGLU in our experts, our
    compiled RMSNorm, RoPE and loss chunks give the eager path's loss and gradients (CPU
    inductor, fp32)."""
    from megatron_ext.model import fusion

    eager = _build("sdpa", "fp32", seed=2)
    cfg = _cfg("sdpa", "fp32")
    cfg.model.kernel_fusion = True
    fused = build_model(cfg, resolve_backends(cfg, cuda=False))
    assert fused.fuse_kernels and fused.config.bias_activation_fusion
    assert fused.config.apply_rope_fusion and not eager.config.apply_rope_fusion
    assert fused.decoder.layers[0].mlp.experts._fused_swiglu
    norms = [fused.decoder.final_layernorm, *(m for layer in fused.decoder.layers
                                              for m in (layer.input_layernorm,
                                                        layer.pre_mlp_layernorm))]
    assert all(n.fused for n in norms) and not eager.decoder.final_layernorm.fused
    for model in (eager, fused):
        model.load_state_dict(reference_state, strict=True)
    batch = _batch()
    loss_e, aux_e, g_e = _run(eager, batch)
    loss_f, aux_f, g_f = _run(fused, batch)
    assert not fusion.FAILED, f"compiled functions fell back to eager: {fusion.FAILED}"
    torch.testing.assert_close(loss_f, loss_e, **FP32_TOL)
    torch.testing.assert_close(aux_f, aux_e, **FP32_TOL)
    for name, g in g_e.items():
        torch.testing.assert_close(g_f[name], g, **FP32_TOL, msg=lambda m: f"{name}: {m}")
