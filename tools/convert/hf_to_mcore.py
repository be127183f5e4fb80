"""The old path of ``moe-hf-to-mcore`` (``python -m megatron_ext.cli.hf_to_mcore``), kept for
existing commands."""

import sys

from megatron_ext.cli.hf_to_mcore import main

if __name__ == "__main__":  # the guard matters: helper processes may import this file
    sys.exit(main())
