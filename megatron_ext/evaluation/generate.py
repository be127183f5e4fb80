"""Text generation with our megatron model: greedy, or temperature + nucleus (top-p) sampling.

The one library entry point (``moe-generate`` and lm-eval's ``generate_until`` call it)::

    generate(model, prompts, max_new_tokens, *, eos_id, vocab_size=None, temperature=0.0,
             top_p=1.0, seed=None, stop=None, batch_size=8, max_length=None) -> list[list[int]]

* ``model``: a megatron GPTModel from ``megatron_ext.checkpoint.load_model.load_model`` (eval
  mode); it is run through ``megatron_ext.model.inference``'s KV cache.
* ``prompts``: token ids, one list per prompt (non-empty; no BOS is added here).
* returns, per prompt and in the prompts' order, ONLY the generated ids: the prompt is not
  repeated and a final EOS is not included (a row that produced EOS simply ends).
* a row stops at ``eos_id`` (None: never), when ``stop(generated_ids_so_far)`` returns True (the
  token that made it true is kept; lm-eval trims its stop strings from the decoded text itself),
  after ``max_new_tokens``, or when prompt + generated reaches ``max_length`` (default: the
  model's ``max_position_embeddings``: RoPE was trained up to there, so we stop, not wrap).
* ``vocab_size``: the tokenizer's vocabulary (``cfg.model.vocab_size``); logits beyond it are
  megatron's vocabulary padding and are never chosen. None: every logit counts.
* ``temperature == 0``: greedy (argmax; ties to the lowest id, as ``torch.argmax``). Otherwise
  logits / temperature, then the smallest set of most likely tokens whose probability reaches
  ``top_p`` (always at least the most likely one), sampled from a CPU ``torch.Generator`` seeded
  with ``seed`` (None: a random seed). The same seed, prompts and batch size give the same ids.

Batching: ``batch_size`` prompts at a time, sorted by length so a batch pads little. A batch
runs with a KV cache (``megatron_ext.model.inference.new_cache``: the lean decoder's of
``megatron_ext.model.decode`` for single-process models, else megatron-core's static inference
context): one prefill over the prompts, then one step per new token that runs only the newest
token of each unfinished row against the cached keys and values; finished rows leave the
cache. Prompts of different lengths are left-padded and masked when every core attention takes
a padding mask (our SDPA attention); otherwise (Transformer Engine's or megatron's unfused
attention) the prefill covers the shortest prompt and longer prompts feed their remaining
tokens one step at a time, so no padding is ever attended to either way. Batched and
unbatched greedy give the same ids (RoPE depends on relative positions only), and both equal
transformers' ``generate`` on the HF export (tests/unit/test_generate.py).

Bad arguments (temperature < 0, top_p outside (0, 1], an empty prompt, a prompt that leaves no
room in the context) raise ``DataError`` (one line; exit 2 through ``run_cli``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from megatron_ext.data.errors import DataError
from megatron_ext.model.inference import extend, new_cache, padding_masks_supported

StopFn = Callable[[list[int]], bool]


def check_sampling(temperature: float, top_p: float) -> None:
    """Refuse sampling settings that mean nothing (shared by the library and the CLI)."""
    if not math.isfinite(temperature) or temperature < 0:
        raise DataError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise DataError(f"top_p must be in (0, 1], got {top_p}")


def model_max_length(model: torch.nn.Module) -> int:
    """The model's context length (``max_position_embeddings``), through DDP-style wrappers."""
    while not hasattr(model, "max_position_embeddings") and hasattr(model, "module"):
        model = model.module
    return int(model.max_position_embeddings)


def check_prompts(prompts: Sequence[Sequence[int]], max_length: int) -> None:
    """Every prompt non-empty and leaving room for at least one new token."""
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise DataError(f"prompt {i + 1} is empty (no tokens)")
        if len(prompt) >= max_length:
            raise DataError(f"prompt {i + 1} has {len(prompt)} tokens: no room to generate in the "
                            f"model's context of {max_length} tokens")


def next_tokens(logits_BV: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """One token id per row from last-position logits ``[b, vocab]`` (fp32, CPU)."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    probs_BV = torch.softmax(logits_BV / temperature, dim=-1)
    if top_p < 1:
        sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
        # Keep a token if the mass of the tokens ranked before it is still below top_p: the
        # smallest prefix reaching top_p, and the most likely token always.
        before_BV = sorted_BV.cumsum(dim=-1) - sorted_BV
        sorted_BV = sorted_BV.masked_fill(before_BV >= top_p, 0.0)
        probs_BV = torch.zeros_like(probs_BV).scatter_(-1, order_BV, sorted_BV)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


def _make_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    return generator


def _generate_batch(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int | None,
                    vocab_size: int | None, sampling: tuple[float, float],
                    generator: torch.Generator, stop: StopFn | None,
                    max_length: int) -> list[list[int]]:
    """Generate for one batch of prompts; see the module docstring for the stopping rules.

    Column c of the cache holds token c of every row's padded prompt + generated ids, padded
    on the left (``pad[i]`` columns) when the model masks padding, else not at all: then the
    prefill covers the shortest prompt and longer rows take their next prompt token while the
    others generate."""
    temperature, top_p = sampling
    out: list[list[int]] = [[] for _ in prompts]
    live = [i for i, p in enumerate(prompts) if max_new_tokens > 0 and len(p) < max_length]
    if not live:
        return out
    # Equal lengths need no padding, hence no mask to build and apply at every step.
    padded = (len({len(prompts[i]) for i in live}) > 1 and padding_masks_supported(model))
    width = max(len(prompts[i]) for i in live)
    pad = {i: width - len(prompts[i]) if padded else 0 for i in live}
    rows = {i: [0] * pad[i] + list(prompts[i]) for i in live}  # padding id: any, it is masked
    columns = max(pad[i] + min(len(prompts[i]) + max_new_tokens, max_length) for i in live)
    cache = new_cache(model, len(live), columns, padded)
    first = width if padded else min(len(prompts[i]) for i in live)
    pad_BS = (torch.tensor([[c < pad[i] for c in range(first)] for i in live])
              if padded else None)
    logits_BV = extend(model, torch.tensor([rows[i][:first] for i in live]), cache, pad_BS)
    while True:
        col = cache.length  # the column whose token is chosen now
        choosing = [b for b, i in enumerate(live) if len(rows[i]) <= col]
        chosen = iter(next_tokens(logits_BV[choosing, :vocab_size].cpu(), temperature, top_p,
                                  generator).tolist() if choosing else [])
        feed, still = [], []
        for b, i in enumerate(live):
            if len(rows[i]) > col:  # still inside its prompt (unpadded cache)
                feed.append(rows[i][col])
                still.append(b)
                continue
            token = next(chosen)
            if eos_id is not None and token == eos_id:
                continue
            out[i].append(token)
            rows[i].append(token)
            if not (len(out[i]) >= max_new_tokens or len(rows[i]) - pad[i] >= max_length
                    or (stop is not None and stop(list(out[i])))):
                feed.append(token)
                still.append(b)
        if not still:
            return out
        if len(still) < len(live):
            cache.keep_rows(still)
            live = [live[b] for b in still]
        logits_BV = extend(model, torch.tensor(feed)[:, None], cache)


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             eos_id: int | None, vocab_size: int | None = None, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, stop: StopFn | None = None,
             batch_size: int = 8, max_length: int | None = None) -> list[list[int]]:
    """Generated token ids for each prompt (prompt and EOS excluded); see the module docstring."""
    check_sampling(temperature, top_p)
    if max_new_tokens < 0 or batch_size < 1:
        raise DataError(f"max_new_tokens must be >= 0 and batch_size >= 1, got "
                        f"{max_new_tokens} and {batch_size}")
    max_length = max_length or model_max_length(model)
    check_prompts(prompts, max_length)
    generator = _make_generator(seed)
    # Longest first: similar lengths share a batch (less padding), and the first batch is the
    # most memory-hungry, so an out-of-memory shows at once rather than at the end.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        outs = _generate_batch(model, [list(prompts[i]) for i in chunk], max_new_tokens, eos_id,
                               vocab_size, (temperature, top_p), generator, stop, max_length)
        for i, ids in zip(chunk, outs, strict=True):
            results[i] = ids
    return results
