"""The old path of ``moe-loss-curves`` (``python -m megatron_ext.cli.loss_curves``), kept for
existing commands."""

import sys

from megatron_ext.cli.loss_curves import main

if __name__ == "__main__":  # the guard matters: helper processes may import this file
    sys.exit(main())
