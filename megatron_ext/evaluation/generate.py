"""Text generation with our megatron model: greedy, or temperature + nucleus (top-p) sampling.

The one library entry point (``moe-generate`` and lm-eval's ``generate_until`` call it)::

    generate(model, prompts, max_new_tokens, *, eos_id, vocab_size=None, temperature=0.0,
             top_p=1.0, seed=None, stop=None, batch_size=8, max_length=None) -> list[list[int]]

* ``model``: a megatron GPTModel from ``megatron_ext.checkpoint.load_model.load_model`` (eval
  mode); it is run through ``megatron_ext.model.inference.logits``.
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

Batching: ``batch_size`` prompts at a time, sorted by length so a batch pads little. Each step
runs ONE forward over every unfinished row, right-padded to the longest; each row's next token
is read from the logits at its own last position. Attention is causal, so padding to the right
of a row never changes the logits of its real tokens: batched and unbatched greedy give the
same ids. There is no KV cache: each step recomputes the whole sequence, O(length^2) per row,
which is fine at the model sizes evaluated here (and is exactly what the parity tests run).

Bad arguments (temperature < 0, top_p outside (0, 1], an empty prompt, a prompt that leaves no
room in the context) raise ``DataError`` (one line; exit 2 through ``run_cli``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from megatron_ext.data.errors import DataError
from megatron_ext.model.inference import logits as model_logits

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
    """Generate for one batch of prompts; see the module docstring for the stopping rules."""
    temperature, top_p = sampling
    rows = [list(p) for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    live = [i for i, row in enumerate(rows)
            if max_new_tokens > 0 and len(row) < max_length]
    while live:
        width = max(len(rows[i]) for i in live)
        tokens_BS = torch.zeros(len(live), width, dtype=torch.long)
        for b, i in enumerate(live):
            tokens_BS[b, : len(rows[i])] = torch.tensor(rows[i])
        logits_BSV = model_logits(model, tokens_BS)
        last_B = torch.tensor([len(rows[i]) - 1 for i in live], device=logits_BSV.device)
        logits_BV = logits_BSV[torch.arange(len(live), device=last_B.device), last_B]
        logits_BV = logits_BV[:, :vocab_size].float().cpu()
        chosen_B = next_tokens(logits_BV, temperature, top_p, generator).tolist()
        still = []
        for i, token in zip(live, chosen_B, strict=True):
            if eos_id is not None and token == eos_id:
                continue
            rows[i].append(token)
            out[i].append(token)
            done = (len(out[i]) >= max_new_tokens or len(rows[i]) >= max_length
                    or (stop is not None and stop(list(out[i]))))
            if not done:
                still.append(i)
        live = still
    return out


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
