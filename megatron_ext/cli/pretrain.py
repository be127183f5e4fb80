"""Pretrain a Mixture-of-Experts GPT with megatron-core: the training entry point.

    moe-pretrain --config configs/tiny-cpu.yaml [--set train.train_steps=10]
    torchrun --nproc-per-node 4 -m megatron_ext.cli.pretrain --config configs/8x152M.yaml

The same as ``python pretrain_moe.py`` (which imports this module) and
``python -m megatron_ext.cli.pretrain``. See ``--help`` for exit codes and options; the command
line itself is ``megatron_ext.training.cli``.
"""

import sys

from megatron_ext.platform import children
from megatron_ext.training import signals

# At import, not in main: the helper processes that megatron spawns import the main module (this
# one, pretrain_moe.py or a console script, each of which imports this one), and each must end
# with the process that started it (megatron_ext.platform.children).
children.bind_helpers()


def main(argv: list[str] | None = None) -> int:
    """Train (``megatron_ext.training.cli.main``) under the start-up signal handlers, which are
    installed before the training modules are imported (that takes seconds)."""
    return signals.run(lambda: _train(argv))


def _train(argv: list[str] | None) -> int:
    from megatron_ext.training.cli import main as train  # under the signal handlers (see above)

    return train(argv)


if __name__ == "__main__":  # the guard matters: dist_checkpointing starts worker processes
    sys.exit(main())
