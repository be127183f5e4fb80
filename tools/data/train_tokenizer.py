"""The old path of ``moe-train-tokenizer`` (``python -m megatron_ext.cli.train_tokenizer``),
kept for existing commands."""

import sys

from megatron_ext.cli.train_tokenizer import main

if __name__ == "__main__":  # the guard matters: helper processes may import this file
    sys.exit(main())
