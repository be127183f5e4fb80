"""pretrain_moe.py with a test hook: the training loss is NaN at the steps listed in the
environment variable NAN_STEPS (e.g. ``3,4``), which exercises the non-finite guard.

The hook is not in the library or its config: it is a callback this launcher hands to the run
(``cli.main(argv, extra_callbacks=...)``). Run it as ``pretrain_moe.py`` is run:
``python tests/nan_injection.py --config ... --set ...``.
"""

import math
import os
import sys

import torch

from megatron_ext.model.chunks import model_chunks
from megatron_ext.platform import children
from megatron_ext.training import signals
from megatron_ext.training.callbacks.base import Callback

children.bind_helpers()  # as pretrain_moe.py: megatron's helper processes import this file too


class NanInjection(Callback):
    """Multiplies the model's output (per-token losses) by NaN during the forward of the listed
    steps (1-based), so the loss and every gradient are non-finite; validation is untouched."""

    def __init__(self, steps: set[int]):
        self.steps = steps

    def on_start(self, trainer) -> None:
        def poison(module, inputs, output):
            if torch.is_grad_enabled() and trainer.state.step + 1 in self.steps:
                return output * math.nan
            return output

        # every chunk of an interleaved pipeline (its ModelChunks is never called itself)
        self.handles = [chunk.register_forward_hook(poison)
                        for chunk in model_chunks(trainer.run.model)]

    def close(self, trainer, aborted: bool) -> None:
        for handle in self.handles:
            handle.remove()


def _main() -> int:
    from megatron_ext.training.cli import main

    steps = {int(s) for s in os.environ["NAN_STEPS"].split(",")}
    return main(sys.argv[1:], extra_callbacks=[lambda run: NanInjection(steps)])


if __name__ == "__main__":
    sys.exit(signals.run(_main))
