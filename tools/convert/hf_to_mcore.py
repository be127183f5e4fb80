"""Convert an HF Llama / Mixtral / mixed dense-MoE checkpoint into our megatron-core checkpoint.

    python tools/convert/hf_to_mcore.py --input HF_DIR --output CKPT_ROOT

CKPT_ROOT gets iter_0000000/ + latest (dist_checkpointing, loadable at any expert-parallel size),
config.yaml (a complete training config) and hf/ (source config.json and tokenizer files). Train
from it with ``pretrain_moe.py --config CKPT_ROOT/config.yaml --set checkpoint.load=CKPT_ROOT``.
Validated by default: transformers vs our megatron model logits, CPU fp32. One process, memory
about one model copy. Exit codes: 0 ok, 1 validation or I/O failure, 2 bad input (one line on
stderr); nothing is left at --output unless everything succeeded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout: make megatron_ext importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_ext.cli_utils import conversion_parser  # noqa: E402
from megatron_ext.cli_utils import run_tool  # noqa: E402

PROG = "hf_to_mcore"


def build_parser() -> argparse.ArgumentParser:
    return conversion_parser(
        PROG, __doc__, "HF checkpoint directory", "checkpoint root to create",
        "skip the logit comparison (loads a transformers and a megatron model)")


def main(argv: list[str] | None = None) -> int:
    from megatron_ext.checkpoint.mcore_io import quiet_megatron

    quiet_megatron()  # before megatron is imported: its import-time warnings are noise
    from megatron_ext.checkpoint.convert_mcore import hf_to_mcore_checkpoint
    from megatron_ext.checkpoint.keymaps import ConversionError
    from megatron_ext.checkpoint.manifest import content_checks
    from megatron_ext.upcycling.validate import ValidationError

    def work() -> Path:
        args = build_parser().parse_args(argv)
        with content_checks(not args.no_verify_checksums):  # the output's, in validation
            hf_to_mcore_checkpoint(args.input, args.output, overwrite=args.overwrite,
                                   validate=not args.skip_validation)
        return args.output

    return run_tool(PROG, work, usage=(ConversionError,), failures=(ValidationError,))

if __name__ == "__main__":  # the guard matters: dist_checkpointing starts worker processes
    sys.exit(main())
