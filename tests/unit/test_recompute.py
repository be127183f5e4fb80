"""train.recompute: selective with train.recompute_modules. Each choice must give the same loss
and gradients as no recomputation (CPU, fp32) and must actually hold less activation memory after
forward (autograd's saved tensors, tools/bench/benchlib/activations.py); bad choices are config
errors."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import cpu_megatron_module, run_cli, single_process_megatron

pytestmark = cpu_megatron_module()

from megatron.core import tensor_parallel  # noqa: E402

from megatron_ext.config.loader import load_config  # noqa: E402
from megatron_ext.model.builder import build_model, resolve_backends  # noqa: E402
from tools.bench.benchlib.activations import saved_activation_bytes  # noqa: E402

SEQ, BATCH = 32, 2
BASE = [
    "model.num_layers=3", "model.hidden_size=32", "model.num_attention_heads=4",
    "model.ffn_hidden_size=64", "model.vocab_size=128", f"model.max_position_embeddings={SEQ}",
    "moe.num_experts=4", "moe.layer_freq=[1,0,1]", "train.precision=fp32",
    f"data.seq_length={SEQ}",
]


@pytest.fixture(scope="module", autouse=True)
def model_parallel():
    yield from single_process_megatron()


def _step(overrides: list[str]) -> tuple[torch.Tensor, dict, int]:
    cfg = load_config(None, BASE + overrides)
    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    model = build_model(cfg, resolve_backends(cfg, cuda=False))
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 128, (BATCH, SEQ + 1), generator=gen)
    pos = torch.arange(SEQ).expand(BATCH, SEQ)
    with saved_activation_bytes(model.parameters()) as held:
        loss = model(tokens[:, :-1], pos, None, labels=tokens[:, 1:]).mean()
        kept = held()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, kept


@pytest.fixture(scope="module")
def reference():
    return _step([])


@pytest.mark.parametrize("modules", ["[moe_act]", "[layernorm]", "[moe]", "[mlp]",
                                     "[core_attn,layernorm,moe_act]"])
def test_selective_recompute_is_exact_and_holds_less(reference, modules):
    loss0, grads0, kept0 = reference
    loss, grads, kept = _step(["train.recompute=selective", f"train.recompute_modules={modules}"])
    torch.testing.assert_close(loss, loss0, rtol=0, atol=0)
    assert grads.keys() == grads0.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, grads0[name], rtol=1e-6, atol=1e-7, msg=name)
    assert kept < kept0, (modules, kept, kept0)


def test_full_recompute_is_exact_and_holds_least(reference):
    loss0, grads0, kept0 = reference
    loss, grads, kept = _step(["train.recompute=full"])
    torch.testing.assert_close(loss, loss0, rtol=0, atol=0)
    for name, g in grads.items():
        torch.testing.assert_close(g, grads0[name], rtol=1e-6, atol=1e-7, msg=name)
    assert kept < kept0 / 2, (kept, kept0)


@pytest.mark.parametrize("overrides, message", [
    (["train.recompute=selective", "train.recompute_modules=[attn]"],
     "train.recompute_modules: unknown ['attn']"),
    (["train.recompute_modules=[moe_act]"],
     "train.recompute_modules: only used with train.recompute: selective"),
    (["train.recompute=selective", "train.recompute_modules=[moe_act]", "moe.num_experts=0"],
     "train.recompute_modules: moe_act/moe need MoE layers"),
    (["train.recompute=selective", "train.recompute_modules=[moe_act]",
      "moe.grouped_gemm=false"], "train.recompute_modules: moe_act needs grouped experts"),
    (["train.recompute=selective", "train.recompute_modules=[]"],
     "train.recompute_modules: empty"),
])
def test_bad_recompute_choices_are_one_line(overrides, message):
    args = ["pretrain_moe.py", "--config", "configs/tiny-cpu.yaml", "--dry-run"]
    for o in overrides:
        args += ["--set", o]
    proc = run_cli(args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_dry_run_estimate_follows_recompute_and_the_loss_head():
    from megatron_ext.model.params import memory_estimate_gb

    def acts(*overrides):
        return memory_estimate_gb(load_config("configs/8x152M.yaml", list(overrides)),
                                  world_size=8)["activations"]

    cfg = load_config("configs/8x152M.yaml", [])
    logits_fp32_gib = (cfg.data.seq_length * cfg.train.micro_batch_size * 99584 * 4) / 1024**3
    assert acts("model.lm_loss=megatron") - acts() == pytest.approx(logits_fp32_gib)
    assert acts("train.recompute=full") < acts() / 2
    assert acts("train.recompute=selective", "train.recompute_modules=[moe_act]") == acts()


def test_models_of_different_depth_in_one_process():
    """megatron's aux-loss tracker is process-global and sized by the first model that logs to it;
    a deeper model built later in the same process (tests, tools) must still run (it indexed past
    the end of the old tracker before build_model reset it)."""
    shallow = ["model.num_layers=2", "moe.layer_freq=[1,1]"]
    loss, _, _ = _step(shallow)
    assert torch.isfinite(loss)
    loss, _, _ = _step(["model.num_layers=4", "moe.layer_freq=[1,1,1,1]"])
    assert torch.isfinite(loss)
