"""The old path of ``moe-mcore-to-hf`` (``python -m megatron_ext.cli.mcore_to_hf``), kept for
existing commands."""

import sys

from megatron_ext.cli.mcore_to_hf import main

if __name__ == "__main__":  # the guard matters: helper processes may import this file
    sys.exit(main())
