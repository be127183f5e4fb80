"""The old path of ``moe-routing`` (``python -m megatron_ext.cli.routing``), kept for
existing commands."""

import sys

from megatron_ext.cli.routing import main

if __name__ == "__main__":  # the guard matters: helper processes may import this file
    sys.exit(main())
