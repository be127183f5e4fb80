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
import signal
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout: make megatron_ext importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_ext.cli_utils import OneLineParser as _Parser  # noqa: E402
from megatron_ext.cli_utils import UsageError as _UsageError  # noqa: E402

PROG = "hf_to_mcore"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, type=Path, help="HF checkpoint directory")
    p.add_argument("--output", required=True, type=Path, help="checkpoint root to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--skip-validation", action="store_true",
                   help="skip the logit comparison (loads a transformers and a megatron model)")
    return p


def main(argv: list[str] | None = None) -> int:
    from megatron_ext.checkpoint.convert_mcore import hf_to_mcore_checkpoint
    from megatron_ext.checkpoint.mcore_io import quiet_megatron

    quiet_megatron()  # before megatron is imported: its import-time warnings are noise
    from megatron_ext.checkpoint.keymaps import ConversionError
    from megatron_ext.upcycling.validate import ValidationError

    # SIGTERM -> SystemExit so the staged output is removed on the way out, as for Ctrl-C.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        args = build_parser().parse_args(argv)
        hf_to_mcore_checkpoint(args.input, args.output, overwrite=args.overwrite,
                               validate=not args.skip_validation)
    except (_UsageError, ConversionError) as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except (ValidationError, OSError) as e:
        print(f"{PROG}: failed: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    print(f"{PROG}: wrote {args.output}")
    return 0


if __name__ == "__main__":  # the guard matters: dist_checkpointing starts worker processes
    sys.exit(main())
