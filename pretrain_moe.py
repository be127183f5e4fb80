"""Pretrain a Mixture-of-Experts GPT with megatron-core.

    python pretrain_moe.py --config configs/tiny-cpu.yaml [--set train.train_steps=10]
    torchrun --nproc-per-node 4 pretrain_moe.py --config configs/8x152M.yaml

See ``python pretrain_moe.py --help`` for exit codes and options.
"""

import sys

from megatron_ext.platform import children
from megatron_ext.training import signals

# Also run by the helper processes that megatron spawns (they import this file): each ends with
# the process that started it (megatron_ext.platform.children).
children.bind_helpers()


def _main() -> int:
    from megatron_ext.training.cli import main  # under the signal handlers: imports take seconds

    return main()


if __name__ == "__main__":  # the guard matters: dist_checkpointing starts worker processes
    sys.exit(signals.run(_main))
