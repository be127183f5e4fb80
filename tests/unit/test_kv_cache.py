"""The KV cache behind generation and lm-eval scoring (megatron_ext.model.inference), in process.

Guarantees shown, on one random tiny MoE built twice with the same weights -- once with our
SDPA core attention (padded caches: explicit masks) and once with megatron's unfused attention
(unpadded caches: one column per step):
* a prefill then one-token steps give the logits of the full forward at every position;
* left-padded rows of different lengths (prefill, steps, then a multi-token block after the
  cache, right-padded) give each row's own logits, as if it ran alone; rows can be dropped
  and repeated between calls;
* ``generate`` (both ways of handling different prompt lengths, batched and one prompt at a
  time) picks at every step a token whose full-forward logit is the maximum (teacher-forced
  check: exact ties aside, the greedy token), stops at EOS, a stop function, ``max_new_tokens``
  and the context length; seeded sampling repeats;
* lm-eval scoring through shared prefixes (SDPA) equals scoring whole rows (unfused) request
  by request.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import REPO, cpu_megatron_module, single_process_megatron
from tests.unit.cache_scenarios import left_padded_rows

pytestmark = cpu_megatron_module()

from megatron.core import tensor_parallel  # noqa: E402

from megatron_ext.config.loader import load_config  # noqa: E402
from megatron_ext.evaluation.generate import generate  # noqa: E402
from megatron_ext.model.builder import build_model, resolve_backends  # noqa: E402
from megatron_ext.model.inference import (  # noqa: E402
    KVCache,
    extend,
    logits,
    padding_masks_supported,
)

VOCAB, CONTEXT = 4096, 48
BASE = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.num_kv_heads=2", "model.ffn_hidden_size=96", f"model.vocab_size={VOCAB}",
        f"model.max_position_embeddings={CONTEXT}", "moe.num_experts=4", "moe.top_k=2",
        # Weights wider than the default 0.02: attention far from uniform, so attending to a
        # padding column (or missing a real one) moves the logits well beyond rounding.
        "model.init_method_std=0.1", "train.precision=fp32", "data.seq_length=32"]


@pytest.fixture(scope="module", autouse=True)
def model_parallel():
    yield from single_process_megatron()


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    """backend -> model; both hold the same weights."""
    built = {}
    for backend in ("sdpa", "unfused"):
        cfg = load_config(None, [*BASE, f"model.attention_backend={backend}"])
        torch.manual_seed(0)
        tensor_parallel.model_parallel_cuda_manual_seed(0)
        built[backend] = build_model(cfg, resolve_backends(cfg, cuda=False)).eval()
    built["unfused"].load_state_dict(built["sdpa"].state_dict())
    return built


def _tokens(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_only_our_attention_takes_padding_masks(models) -> None:
    assert padding_masks_supported(models["sdpa"])
    assert not padding_masks_supported(models["unfused"])


@pytest.mark.parametrize("backend", ["sdpa", "unfused"])
def test_steps_after_a_prefill_give_the_full_forward_logits(models, backend: str) -> None:
    model, tokens_BS = models[backend], _tokens(3, 12)
    full_BSV = logits(model, tokens_BS)
    cache = KVCache(3, 12, padded=False)
    _close(extend(model, tokens_BS[:, :5], cache), full_BSV[:, 4])
    for col in range(5, 12):
        _close(extend(model, tokens_BS[:, col:col + 1], cache), full_BSV[:, col])
    assert cache.length == 12
    cache = KVCache(3, 12, padded=False)
    extend(model, tokens_BS[:, :3], cache)
    with pytest.raises(ValueError, match="one token per row"):
        extend(model, tokens_BS[:, 3:5], cache)  # unmasked: the block would see its future


def test_left_padded_rows_give_each_rows_own_logits(models) -> None:
    left_padded_rows(models["sdpa"], lambda batch, length: KVCache(batch, length, padded=True),
                     VOCAB)


PROMPTS = [_tokens(n, seed=30 + n).tolist() for n in (1, 3, 4, 7, 9, 12, 15, 20, 26)]


def _greedy_everywhere(model, prompts, outs) -> None:
    """Each generated token has the largest full-forward logit at its position."""
    for prompt, out in zip(prompts, outs, strict=True):
        if not out:
            continue
        row = torch.tensor([prompt + out[:-1]])
        chosen_SV = logits(model, row)[0, len(prompt) - 1:, :VOCAB]
        picked = chosen_SV.gather(1, torch.tensor(out)[:, None]).squeeze(1)
        assert (picked >= chosen_SV.max(dim=1).values - 1e-4).all(), (prompt, out)


@pytest.mark.parametrize("backend", ["sdpa", "unfused"])
@pytest.mark.parametrize("batch", [1, 8])
def test_generate_is_greedy_at_every_step(models, backend: str, batch: int) -> None:
    model = models[backend]
    outs = generate(model, PROMPTS, 10, eos_id=None, vocab_size=VOCAB, batch_size=batch)
    assert [len(o) for o in outs] == [10] * len(PROMPTS)
    _greedy_everywhere(model, PROMPTS, outs)
    # The context ends rows: a prompt of 20 in a context of 24 gets 4 tokens.
    short = generate(model, PROMPTS[:8], 10, eos_id=None, vocab_size=VOCAB, batch_size=batch,
                     max_length=24)
    assert [len(o) for o in short] == [min(10, 24 - len(p)) for p in PROMPTS[:8]]
    _greedy_everywhere(model, PROMPTS[:8], short)
    # EOS (not kept) and a stop function (its token kept) end rows early.
    eos = outs[3][2]
    cut = generate(model, PROMPTS, 10, eos_id=eos, vocab_size=VOCAB, batch_size=batch,
                   stop=lambda ids: len(ids) >= 6)
    assert all(eos not in got and len(got) <= 6 for got in cut)
    assert len(cut[3]) <= 2 and max(len(got) for got in cut) == 6
    _greedy_everywhere(model, PROMPTS, cut)


@pytest.mark.parametrize("backend", ["sdpa", "unfused"])
def test_seeded_sampling_repeats(models, backend: str) -> None:
    sample = lambda seed: generate(models[backend], PROMPTS, 8, eos_id=None,  # noqa: E731
                                   vocab_size=VOCAB, temperature=1.0, top_p=0.9, seed=seed,
                                   batch_size=4)
    first = sample(1)
    assert first == sample(1) and first != sample(2)


def test_shared_prefix_scoring_equals_whole_rows(models) -> None:
    from megatron_ext.data.demo import ensure_demo_data
    from megatron_ext.data.tokenizer import load_tokenizer
    from megatron_ext.evaluation.lm_eval_model import MegatronLM

    tok = load_tokenizer(ensure_demo_data(cache_dir=str(REPO / ".cache" / "demo"))[0])
    context = _tokens(20, seed=40).tolist()
    requests = [(None, context, _tokens(n, seed=41 + n).tolist()) for n in (1, 1, 3, 7)]
    requests += [(None, _tokens(5, seed=50).tolist(), _tokens(2, seed=51).tolist()),
                 (None, _tokens(40, seed=52).tolist(), _tokens(12, seed=53).tolist()),  # cut
                 (None, [7], _tokens(CONTEXT, seed=54).tolist())]  # a whole-context window
    requests.append(requests[2])  # the same request twice
    scores = {}
    for backend, model in models.items():
        cfg = load_config(None, [*BASE, f"model.attention_backend={backend}"])
        lm = MegatronLM(cfg=cfg, model=model, tok=tok, batch_size=3)
        scores[backend] = lm._loglikelihood_tokens(requests)
    for (shared, greedy), (whole, greedy_whole) in zip(scores["sdpa"], scores["unfused"],
                                                       strict=True):
        assert abs(shared - whole) <= 1e-4 * max(1.0, abs(whole))
        assert greedy == greedy_whole
    assert scores["sdpa"][2] == scores["sdpa"][-1]


def test_native_torch_lifts_the_device_redirection_for_a_block_only() -> None:
    from megatron_ext.platform import cpu

    assert cpu.is_enabled()  # this module runs with the CPU path on
    assert torch.zeros(1, device="cuda").device.type == "cpu"  # redirected
    with cpu.native_torch(), pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1, device="cuda")  # the real call: no CUDA here
    assert torch.zeros(1, device="cuda").device.type == "cpu"  # redirected again
