"""The old path of ``moe-preprocess`` (``python -m megatron_ext.cli.preprocess``), kept for
existing commands."""

import sys

from megatron_ext.cli.preprocess import main

if __name__ == "__main__":  # the guard matters: helper processes may import this file
    sys.exit(main())
