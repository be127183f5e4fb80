"""Pretrain a Mixture-of-Experts GPT with megatron-core.

    python pretrain_moe.py --config configs/tiny-cpu.yaml [--set train.train_steps=10]
    torchrun --nproc-per-node 4 pretrain_moe.py --config configs/8x152M.yaml

The entry point is ``megatron_ext.cli.pretrain`` (also ``moe-pretrain`` and
``python -m megatron_ext.cli.pretrain``); see ``python pretrain_moe.py --help`` for exit codes
and options.
"""

import sys

# Imported at the top: megatron's helper processes import this file, and the import binds them
# to their parent (megatron_ext.cli.pretrain).
from megatron_ext.cli.pretrain import main

if __name__ == "__main__":  # the guard matters: dist_checkpointing starts worker processes
    sys.exit(main())
