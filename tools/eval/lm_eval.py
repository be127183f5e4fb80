"""The old path of ``moe-lm-eval`` (``python -m megatron_ext.cli.lm_eval``), kept for existing
commands. Python puts a script's directory first on ``sys.path``, where this file's name would
shadow the ``lm_eval`` package for the whole process, so the tool runs as a module in the
interpreter this one becomes (same process id, signals and exit code)."""

import os
import sys

if __name__ == "__main__":
    os.execv(sys.executable, [sys.executable, "-m", "megatron_ext.cli.lm_eval", *sys.argv[1:]])
