"""One scenario for every inference cache (model.inference's KVCache, model.decode's LeanCache):
left-padded rows, one-token steps, rows dropped and repeated, then a right-padded block."""

from __future__ import annotations

import torch


def left_padded_rows(model, make_cache, vocab: int) -> None:
    """Each row's logits equal the full forward of that row alone, at every point.
    ``make_cache(batch, length)`` gives the cache under test."""
    # here, not at the top: the test modules set up megatron-core's CPU path before importing it
    from megatron_ext.model.inference import extend, logits

    def tokens(*shape: int, seed: int) -> torch.Tensor:
        return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))

    def close(got: torch.Tensor, want: torch.Tensor) -> None:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    rows = [tokens(n, seed=n).tolist() for n in (1, 6, 11)]
    width = 11
    tokens_BS = torch.zeros(3, width, dtype=torch.long)
    pad_BS = torch.ones(3, width, dtype=torch.bool)
    for b, row in enumerate(rows):
        tokens_BS[b, width - len(row):] = torch.tensor(row)
        pad_BS[b, width - len(row):] = False
    cache = make_cache(3, width + 8)
    last_BV = extend(model, tokens_BS, cache, pad_BS)
    for b, row in enumerate(rows):
        close(last_BV[b], logits(model, torch.tensor([row]))[0, -1])
    for step in range(3):  # one-token steps
        new = tokens(3, seed=10 + step)
        step_BV = extend(model, new[:, None], cache)
        for b in range(3):
            rows[b].append(int(new[b]))
            close(step_BV[b], logits(model, torch.tensor([rows[b]]))[0, -1])
    # Rows 2 and 0 again, row 2 twice: then a right-padded block of 4, 1 and 2 tokens.
    cache.keep_rows([2, 0, 2])
    rows = [rows[2], rows[0], list(rows[2])]
    block = [tokens(n, seed=20 + n).tolist() for n in (4, 1, 2)]
    block_BS = torch.zeros(3, 4, dtype=torch.long)
    for b, extra in enumerate(block):
        block_BS[b, :len(extra)] = torch.tensor(extra)
    every_BSV = extend(model, block_BS, cache, block_BS == 0, every_column=True)
    for b, extra in enumerate(block):
        want_SV = logits(model, torch.tensor([rows[b] + extra]))[0, -len(extra):]
        close(every_BSV[b, :len(extra)], want_SV)
