"""Pretrain a Mixture-of-Experts GPT with megatron-core.

    python pretrain_moe.py --config configs/tiny-cpu.yaml [--set train.train_steps=10]
    torchrun --nproc-per-node 4 pretrain_moe.py --config configs/8x152M.yaml

See ``python pretrain_moe.py --help`` for exit codes and options.
"""

import sys

from megatron_ext.training.cli import main

if __name__ == "__main__":  # the guard matters: dist_checkpointing starts worker processes
    sys.exit(main())
