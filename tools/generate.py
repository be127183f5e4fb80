"""The old path of ``moe-generate`` (``python -m megatron_ext.cli.generate``), kept for
existing commands."""

import sys

from megatron_ext.cli.generate import main

if __name__ == "__main__":  # the guard matters: helper processes may import this file
    sys.exit(main())
