"""lm-evaluation-harness's LM interface over our megatron model (registered as ``megatron_ext``).

    lm = MegatronLM.from_checkpoint("runs/x/checkpoints", batch_size=16)
    lm_eval.simple_evaluate(model=lm, tasks=["demo_en_mc"], task_manager=...)
    # or, once this module is imported: simple_evaluate(model="megatron_ext",
    #     model_args="checkpoint=runs/x/checkpoints,batch_size=16")

It scores exactly as lm-eval's own HF model (``HFLM``) does, so that a checkpoint and its HF export
give the same numbers (tests/unit/test_lm_eval.py checks it):

* requests are tokenized by lm-eval's ``TemplateLM`` (context/continuation split, an empty
  context replaced by EOD) with the checkpoint's tokenizer (``data.run_tokenizer``); our data
  never has BOS, so none is added;
* ``loglikelihood``: HFLM's model input ``(context + continuation)[-(L+1):][:-1]`` with
  L = ``model.max_position_embeddings``, split where the continuation's first token is
  predicted into a prefix and the continuation's other tokens. Where a prefix is shared and
  computing it once saves a quarter of the tokens or more (``plan_batches``: the context of a
  multiple-choice item), it runs once into a KV cache (``model.inference``; left-padded,
  masked) and every continuation after it in a cache row of its own (right-padded, masked),
  the LM head only where a continuation token is predicted; HFLM shares a context only for
  one-token continuations. Everything else (rolling windows, single continuations), and
  everything on a model whose attention takes no padding mask (Transformer Engine's,
  megatron's unfused), runs HFLM's way: whole rows, right-padded (causal attention: the
  padding never changes a row's real logits), ``batch_size`` rows a batch, longest first.
  The softmax runs over the tokenizer's vocabulary (megatron's vocabulary padding cut off);
* ``loglikelihood_rolling``: disjoint windows of L tokens (lm-eval's ``get_rolling_token_windows``,
  as HFLM), all scored in batches, summed per document;
* ``generate_until``: ``evaluation.generate`` (greedy unless the request samples), stopping at
  EOD, at any ``until`` string or after ``max_gen_toks``; the context is left-truncated to
  L - max_gen_toks tokens; the text is cut at the first stop string.

Token dropping (``moe.capacity_factor``) is switched off: with it a token's experts would depend
on the rest of the batch. Single process: a checkpoint saved with any expert/tensor-parallel
layout is resharded into this one process on load (``checkpoint.load_model``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from megatron_ext.checkpoint.load_model import load_model
from megatron_ext.config.schema import Config
from megatron_ext.data.errors import DataError
from megatron_ext.data.run_tokenizer import checkpoint_tokenizer
from megatron_ext.data.tokenizer import Tokenizer
from megatron_ext.evaluation.generate import generate
from megatron_ext.model.inference import extend, new_cache, padding_masks_supported
from megatron_ext.model.inference import logits as model_logits
from megatron_ext.platform.progress import Progress

# One request as TemplateLM hands it over: ((context, continuation) | None, context ids, cont ids).
TokenRequest = tuple[Any, list[int], list[int]]
# What is scored: the model input up to the continuation's first prediction, and the continuation.
Piece = tuple[tuple[int, ...], list[int]]
DEFAULT_MAX_GEN_TOKS = 256  # as HFLM
# A prefix is computed once for its continuations when that saves this share of the tokens;
# a batch of shared prefixes then holds up to SHARED_ROWS continuations per prefix row.
SHARE_MIN, SHARED_ROWS = 0.25, 4


def plan_batches(pieces: list[Piece], batch_size: int, share: bool
                 ) -> list[tuple[bool, list[tuple[tuple[int, ...], list[int]]]]]:
    """Batches of (prefix, piece indices), each flagged shared (KV cache) or not (whole rows).

    A prefix is shared when it is worth it: at least two continuations, and the prefix tokens
    computed once instead of once per continuation are at least ``SHARE_MIN`` of the tokens the
    whole rows would take (a multiple-choice context, not the one EOD token that every rolling
    window of a document set starts with). A shared batch holds up to ``batch_size`` prefixes
    (its prefill is a batch like HFLM's) and up to ``SHARED_ROWS * batch_size`` continuations,
    each a short row after the cache; larger groups are split. The other pieces go
    ``batch_size`` to a batch. Longest first within each kind."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (prefix, _) in enumerate(pieces):
        groups.setdefault(prefix, []).append(i)

    def worth(prefix: tuple[int, ...], members: list[int]) -> bool:
        rows = sum(len(prefix) + len(pieces[i][1]) - 1 for i in members)
        return len(members) > 1 and (len(members) - 1) * len(prefix) >= SHARE_MIN * rows

    most = SHARED_ROWS * batch_size
    shared, single = [], []
    for prefix, members in groups.items():
        if share and worth(prefix, members):
            shared += [(prefix, members[k:k + most]) for k in range(0, len(members), most)]
        else:
            single += [(prefix, [i]) for i in members]
    length = lambda group: -len(group[0]) - max(len(pieces[i][1]) for i in group[1])  # noqa: E731
    batches: list[tuple[bool, list]] = []
    for group in sorted(shared, key=length):
        last = batches[-1][1] if batches else None
        if (last is None or len(last) >= batch_size
                or sum(len(m) for _, m in last) + len(group[1]) > most):
            batches.append((True, []))
        batches[-1][1].append(group)
    single.sort(key=length)
    batches += [(False, single[k:k + batch_size]) for k in range(0, len(single), batch_size)]
    return batches


def _positive_int(name: str, value: Any) -> int:
    # lm-eval passes model_args from its command line as strings ("batch_size=8").
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise DataError(f"{name} must be a positive integer, got {value!r}")
    return number


@register_model("megatron_ext")
class MegatronLM(TemplateLM):
    """lm-eval LM backed by one of our megatron models (see the module docstring)."""

    def __init__(self, checkpoint: str | None = None, batch_size: int | str = 8,
                 tokenizer: str | None = None, max_gen_toks: int | str = DEFAULT_MAX_GEN_TOKS,
                 *, cfg: Config | None = None, model: torch.nn.Module | None = None,
                 tok: Tokenizer | None = None, **_lm_eval_extras: Any) -> None:
        """Load ``checkpoint`` (lm-eval's registry path), or wrap an already built ``model`` with
        its ``cfg`` and ``tok`` (in-loop evaluation). ``_lm_eval_extras``: what lm-eval passes to
        every model (device, max_batch_size, ...): the device is the model's own."""
        super().__init__()
        if model is None:
            if checkpoint is None:
                raise DataError("megatron_ext: pass checkpoint=PATH")
            cfg, model = load_model(checkpoint)
        if cfg is None:
            raise DataError("megatron_ext: a model needs its config (cfg=)")
        self.cfg, self.model = cfg, model
        self.tok = tok if tok is not None else checkpoint_tokenizer(cfg, tokenizer)
        self.batch_size = _positive_int("batch_size", batch_size)
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        self.vocab_size = cfg.model.vocab_size

    @classmethod
    def from_checkpoint(cls, path: str | Path, batch_size: int = 8,
                        tokenizer: str | None = None) -> MegatronLM:
        return cls(str(path), batch_size=batch_size, tokenizer=tokenizer)

    # --- what TemplateLM asks of a model ------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eod

    @property
    def max_length(self) -> int:
        return int(self.cfg.model.max_position_embeddings)

    @property
    def tokenizer_name(self) -> str:
        return self.tok.path

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs: Any) -> list[int]:
        ids = self.tok.encode(string)  # never BOS: our training data has none
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids: Sequence[int]) -> str:
        # As HFLM's decode(skip_special_tokens=True) for the specials our tokenizers carry.
        special = {self.tok.eod, self.tok.pad_id}
        return self.tok.decode([i for i in ids if i not in special])

    # --- scoring -----------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests: list[TokenRequest], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), greedy?) per request, in request order."""
        limit = self.max_length
        pieces: list[Piece] = []
        for _, context, continuation in requests:
            if not context or not continuation or len(continuation) > limit:
                raise DataError(f"cannot score a request of {len(context)} context and "
                                f"{len(continuation)} continuation tokens "
                                f"(context length {limit})")
            # HFLM's model input, cut where the continuation's first prediction is made.
            row = (context + continuation)[-(limit + 1):][:-1]
            pieces.append((tuple(row[:len(row) - len(continuation) + 1]), continuation))
        share = padding_masks_supported(self.model)
        results: list[tuple[float, bool]] = [(0.0, False)] * len(pieces)
        bar = Progress(len(pieces), "lm-eval scoring", unit="requests", enabled=not disable_tqdm)
        for shared, groups in plan_batches(pieces, self.batch_size, share):
            members = [i for _, group in groups for i in group]
            if shared:
                answers = self._score_shared(groups, pieces)
            else:
                answers = self._score_rows([pieces[i] for i in members])
            for i, answer in zip(members, answers, strict=True):
                results[i] = answer
            bar.update(len(members))
        bar.close()
        for (key, _, _), answer in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def _answer(self, logits_CV: torch.Tensor, cont: list[int]) -> tuple[float, bool]:
        """Sum of log-probs of ``cont`` and whether each token is the argmax, from the logits
        that predict it (softmax over the tokenizer's vocabulary: megatron's padding cut)."""
        logp_CV = F.log_softmax(logits_CV[:, :self.vocab_size].float(), dim=-1)
        targets_C = torch.tensor(cont, dtype=torch.long, device=logp_CV.device)
        picked_C = logp_CV.gather(-1, targets_C[:, None]).squeeze(-1)
        return float(picked_C.sum()), bool((logp_CV.argmax(-1) == targets_C).all())

    def _score_shared(self, groups: list[tuple[tuple[int, ...], list[int]]],
                      pieces: list[Piece]) -> list[tuple[float, bool]]:
        """One batch of (prefix, its pieces): each prefix runs once into a KV cache (left-padded),
        then every continuation after it in a cache row of its own (right-padded, masked).
        Answers in the order of the groups' pieces."""
        prefixes = [prefix for prefix, _ in groups]
        owner = [b for b, (_, members) in enumerate(groups) for _ in members]
        conts = [pieces[i][1] for _, members in groups for i in members]
        width = max(len(p) for p in prefixes)
        longest = max(len(c) for c in conts) - 1  # the continuation tokens fed
        cache = new_cache(self.model, len(prefixes), width + longest, padded=True)
        tokens_PS, pad_PS = self._padded(prefixes, width, left=True)
        first_RV = extend(self.model, tokens_PS, cache, pad_PS)[owner]
        tail_RTV = None
        if longest:
            cache.keep_rows(owner)  # one row per continuation
            tokens_RT, pad_RT = self._padded([c[:-1] for c in conts], longest, left=False)
            tail_RTV = extend(self.model, tokens_RT, cache, pad_RT, every_column=True)
        answers = []
        for r, cont in enumerate(conts):
            logits_CV = first_RV[r:r + 1]
            if len(cont) > 1:
                logits_CV = torch.cat([logits_CV, tail_RTV[r, :len(cont) - 1]])
            answers.append(self._answer(logits_CV, cont))
        return answers

    def _padded(self, rows, width: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [b, width] padded with EOD (masked, never attended to), and where the
        padding is."""
        tokens_BS = torch.full((len(rows), width), self.tok.eod, dtype=torch.long)
        pad_BS = torch.ones(len(rows), width, dtype=torch.bool)
        for b, row in enumerate(rows):
            cols = slice(width - len(row), width) if left else slice(0, len(row))
            tokens_BS[b, cols] = torch.tensor(row, dtype=torch.long)
            pad_BS[b, cols] = False
        return tokens_BS, pad_BS

    def _score_rows(self, pieces: list[Piece]) -> list[tuple[float, bool]]:
        """One batch as HFLM runs it: each piece's whole input row, right-padded (causal
        attention: padding right of a row never changes its real logits)."""
        rows = [list(prefix) + cont[:-1] for prefix, cont in pieces]
        tokens_BS, _ = self._padded(rows, max(len(r) for r in rows), left=False)
        logits_BSV = model_logits(self.model, tokens_BS)
        # Position p predicts token p + 1: the continuation is predicted from the prefix's
        # last position on (the padding further right is never read).
        return [self._answer(logits_BSV[b, len(prefix) - 1:len(prefix) - 1 + len(cont)], cont)
                for b, (prefix, cont) in enumerate(pieces)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents in disjoint windows of ``max_length`` tokens."""
        windows: list[TokenRequest] = []
        owners: list[int] = []
        for r, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.eot_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(r)
        totals = [0.0] * len(requests)
        scored = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        for r, (logp, _) in zip(owners, scored, strict=True):
            totals[r] += logp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- generation --------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations of each context; requests with equal generation settings run batched."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        out = [""] * len(requests)
        bar = Progress(len(requests), "lm-eval generation", unit="requests",
                       enabled=not disable_tqdm)
        for indices in groups.values():
            contexts = [requests[i].args[0] for i in indices]
            texts = self._generate_group(contexts, dict(requests[indices[0]].args[1]))
            for i, text in zip(indices, texts, strict=True):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
            bar.update(len(indices))
        bar.close()
        return out

    def _generate_group(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None),
                                      eos=self.tok.decode([self.eot_token_id]))
        max_gen_toks = int(kwargs.pop("max_gen_toks"))
        if max_gen_toks >= self.max_length:
            raise DataError(f"max_gen_toks {max_gen_toks} leaves no room for a context in the "
                            f"model's {self.max_length} tokens")
        sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature") or 0) > 0
        prompts = [self.tok_encode(c, left_truncate_len=self.max_length - max_gen_toks)
                   for c in contexts]

        def stop(ids: list[int]) -> bool:  # a stop string anywhere in the text so far
            text = self.tok.decode(ids)
            return any(s and s in text for s in until)

        ids = generate(self.model, prompts, max_gen_toks, eos_id=self.eot_token_id,
                       vocab_size=self.vocab_size, stop=stop, batch_size=self.batch_size,
                       temperature=float(kwargs["temperature"]) if sample else 0.0,
                       top_p=float(kwargs.get("top_p") or 1.0) if sample else 1.0,
                       seed=kwargs.get("seed"), max_length=self.max_length)
        return [postprocess_generated_text(self.tok_decode(x), stop=until, think_end_token=None)
                for x in ids]
