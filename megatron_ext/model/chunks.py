"""A rank's model chunks under an interleaved pipeline (``parallel.virtual_pipeline``).

With one chunk per rank (no pipeline, or megatron's 1F1B schedule) a run's model is that chunk,
as it always was. With several it is a ``ModelChunks``: a module list, so whatever walks
modules or parameters (router hooks, expert metrics, ``eval()``/``train()``, finiteness checks)
sees every chunk, and ``model_chunks`` gives the list that megatron's schedule, optimizer and
checkpoint code take.
"""

from __future__ import annotations

import torch


class ModelChunks(torch.nn.ModuleList):
    """Several model chunks (each DDP-wrapped when training) that act as one model."""

    def zero_grad_buffer(self) -> None:
        for chunk in self:
            chunk.zero_grad_buffer()


def model_chunks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The chunks of ``model``, in pipeline order: itself unless it is a ``ModelChunks``."""
    return list(model) if isinstance(model, ModelChunks) else [model]


def as_model(chunks: list[torch.nn.Module]) -> torch.nn.Module:
    """One chunk as itself, several as a ``ModelChunks``."""
    return chunks[0] if len(chunks) == 1 else ModelChunks(chunks)
