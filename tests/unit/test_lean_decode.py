"""The lean decoder (megatron_ext.model.decode) against megatron's own forward, in process.

* ``unsupported`` (the one decision between the lean decoder and megatron's path): None for
  what ``model.builder`` builds in one process with SDPA attention; a reason for megatron's
  unfused attention, a capacity factor and anything that is not a GPTModel, and ``new_cache``
  follows it.
* On random tiny models (wide init: peaked attention and routing, so a wrong head, column or
  expert moves the logits far beyond rounding) the lean decoder's logits equal megatron's full
  forward (fp32, 1e-4): a prefill then one-token steps, a left-padded batch of different
  lengths with rows dropped and repeated, then a right-padded block of every column. Models:
  GQA with a MoE / dense / MoE layer pattern, top-2 grouped experts (Mixtral's softmax over the
  top k); and full multi-head attention, top-1 (softmax over all experts) SequentialMLP
  experts.
* ``generate`` through it gives the same greedy ids as through megatron's cache.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import cpu_megatron_module, single_process_megatron
from tests.unit.cache_scenarios import left_padded_rows

pytestmark = cpu_megatron_module()

from megatron.core import tensor_parallel  # noqa: E402

from megatron_ext.config.loader import load_config  # noqa: E402
from megatron_ext.evaluation.generate import generate  # noqa: E402
from megatron_ext.model.builder import build_model, resolve_backends  # noqa: E402
from megatron_ext.model.decode import LeanCache, unsupported  # noqa: E402
from megatron_ext.model.inference import KVCache, extend, logits, new_cache  # noqa: E402

VOCAB, CONTEXT = 512, 40
BASE = ["model.hidden_size=64", "model.num_attention_heads=4", "model.ffn_hidden_size=96",
        f"model.vocab_size={VOCAB}", f"model.max_position_embeddings={CONTEXT}",
        "moe.num_experts=4", "model.init_method_std=0.1", "train.precision=fp32",
        "data.seq_length=32"]
SHAPES = {
    "gqa-top2-dense-middle": ["model.num_layers=3", "model.num_kv_heads=2", "moe.top_k=2",
                              "moe.layer_freq=[1,0,1]"],
    "mha-top1-sequential": ["model.num_layers=2", "moe.top_k=1", "moe.grouped_gemm=false"],
}


@pytest.fixture(scope="module", autouse=True)
def model_parallel():
    yield from single_process_megatron()


def _build(overrides: list[str]) -> torch.nn.Module:
    cfg = load_config(None, [*BASE, *overrides])
    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    return build_model(cfg, resolve_backends(cfg, cuda=False)).eval()


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {name: _build(overrides) for name, overrides in SHAPES.items()}


def _tokens(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_the_decision_and_new_cache_follow_it(models) -> None:
    for model in models.values():
        assert unsupported(model) is None
        assert isinstance(new_cache(model, 2, 8), LeanCache)
    unfused = _build([*SHAPES["mha-top1-sequential"], "model.attention_backend=unfused"])
    assert "DotProductAttention" in unsupported(unfused)
    assert isinstance(new_cache(unfused, 2, 8), KVCache)
    dropping = _build([*SHAPES["mha-top1-sequential"], "moe.capacity_factor=1.0"])
    assert "moe_expert_capacity_factor" in unsupported(dropping)
    assert "not a megatron GPTModel" in unsupported(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("shape", SHAPES)
def test_prefill_then_steps_give_the_full_forward_logits(models, shape: str) -> None:
    model, tokens_BS = models[shape], _tokens(3, 12)
    full_BSV = logits(model, tokens_BS)
    cache = LeanCache(model, 3, 12)
    _close(extend(model, tokens_BS[:, :5], cache, every_column=True), full_BSV[:, :5])
    for col in range(5, 12):
        _close(extend(model, tokens_BS[:, col:col + 1], cache), full_BSV[:, col])
    assert cache.length == 12
    one = LeanCache(model, 1, 12)  # batch 1: the one-token expert loop
    for col in range(12):
        _close(extend(model, tokens_BS[1:2, col:col + 1], one), full_BSV[1:2, col])


@pytest.mark.parametrize("shape", SHAPES)
def test_left_padded_rows_give_each_rows_own_logits(models, shape: str) -> None:
    model = models[shape]
    left_padded_rows(model, lambda batch, length: new_cache(model, batch, length, padded=True),
                     VOCAB)


def test_generate_gives_megatrons_greedy_ids(models, monkeypatch) -> None:
    prompts = [_tokens(n, seed=30 + n).tolist() for n in (1, 4, 9, 15, 20)]
    for model in models.values():
        lean = {batch: generate(model, prompts, 12, eos_id=None, vocab_size=VOCAB,
                                batch_size=batch) for batch in (1, 5)}
        with monkeypatch.context() as patch:  # megatron's cache for the same model
            patch.setattr("megatron_ext.model.decode.unsupported", lambda model: "off")
            theirs = {batch: generate(model, prompts, 12, eos_id=None, vocab_size=VOCAB,
                                      batch_size=batch) for batch in (1, 5)}
        assert lean == theirs
        assert lean[1] == lean[5]
