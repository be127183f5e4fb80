"""The old path of ``moe-parity`` (``python -m megatron_ext.cli.parity``), kept for existing
commands."""

import sys

from megatron_ext.cli.parity import main

if __name__ == "__main__":
    sys.exit(main())
