"""The old path of ``moe-upcycle`` (``python -m megatron_ext.cli.upcycle``), kept for
existing commands."""

import sys

from megatron_ext.cli.upcycle import main

if __name__ == "__main__":  # the guard matters: helper processes may import this file
    sys.exit(main())
