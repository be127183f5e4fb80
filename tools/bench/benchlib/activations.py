"""Activation memory, measured the same way on any device: the bytes of the tensors autograd
keeps for backward, excluding parameters, as live when asked (outputs that megatron's
output-discarding checkpoints free after forward count zero). Storages shared by several saved
tensors count once."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch


@contextmanager
def saved_activation_bytes(params: Iterable[torch.Tensor]) -> Iterator[Callable[[], int]]:
    """``with saved_activation_bytes(model.parameters()) as held: loss = fwd(); n = held()``."""
    skip = {p.untyped_storage()._cdata for p in params}
    storages: dict[int, torch.UntypedStorage] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st._cdata not in skip:
            storages[st._cdata] = st
        # Detached: returning ``t`` itself would make a saved *output* point back at the node
        # that saved it (t.grad_fn), a cycle through C++ that Python's gc cannot free; the whole
        # graph then outlives the measurement (GBs per bench variant on the GPU).
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield lambda: sum(st.nbytes() for st in storages.values())
    storages.clear()
