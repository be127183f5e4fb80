"""The old path of ``moe-compare-inits`` (``python -m megatron_ext.cli.compare_inits``), kept for
existing commands."""

import sys

from megatron_ext.cli.compare_inits import main

if __name__ == "__main__":  # the guard matters: helper processes may import this file
    sys.exit(main())
