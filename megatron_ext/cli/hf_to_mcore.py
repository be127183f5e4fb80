"""Convert an HF Llama / Mixtral / mixed dense-MoE checkpoint into our megatron-core checkpoint.

    moe-hf-to-mcore --input HF_DIR --output CKPT_ROOT [--config RUN.yaml [--set data.x=y]]

CKPT_ROOT gets iter_0000000/ + latest (dist_checkpointing, loadable at any expert-parallel size),
config.yaml (a complete training config) and hf/ (source config.json and tokenizer files). Train
from it with ``pretrain_moe.py --config CKPT_ROOT/config.yaml --set checkpoint.load=CKPT_ROOT``.
config.yaml's data section is --config's; without --config it has none (data.mock false,
data.blend empty, data.tokenizer the source's tokenizer in hf/ if it has one): training from it
refuses with one line until data.blend (or data.demo_corpus, or data.mock for random tokens) is
set, instead of training on random tokens.
Validated by default: transformers vs our megatron model logits, CPU fp32. One process, memory
about one model copy. Exit codes: 0 ok, 1 validation or I/O failure, 2 bad input (one line on
stderr); nothing is left at --output unless everything succeeded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_ext.config.loader import ConfigError, load_config
from megatron_ext.config.schema import DataConfig
from megatron_ext.errors import UserError
from megatron_ext.platform.cli import conversion_parser, run_cli
from megatron_ext.platform.fs import check_io
from megatron_ext.platform.quiet import quiet_process

PROG = "hf_to_mcore"


def build_parser() -> argparse.ArgumentParser:
    p = conversion_parser(
        PROG, __doc__, "HF checkpoint directory", "checkpoint root to create",
        "skip the logit comparison (loads a transformers and a megatron model)")
    p.add_argument("--config", type=Path, default=None, metavar="YAML",
                   help="training config of the run that will start from the output: its data "
                        "section goes into the output's config.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a --config field (repeatable), as pretrain_moe.py --set")
    return p


def run_data(path: Path | None, overrides: list[str]) -> DataConfig | None:
    """--config's data section, every field checked; None without --config."""
    if path is None:
        if overrides:
            raise UserError("--set needs --config")
        return None
    try:
        return load_config(path, overrides).data
    except ConfigError as e:
        message = " ".join(str(e).split())
        raise UserError(message if str(path) in message else f"--config {path}: {message}"
                        ) from None


def main(argv: list[str] | None = None) -> int:
    return run_cli(_convert, argv)


def _convert(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    check_io([("--output", args.output)], [("--config", args.config)], error=UserError)
    data = run_data(args.config, args.overrides)
    quiet_process(all_from_internals=True)  # before megatron is imported: its warnings are noise
    # why inside: megatron-core and torch take seconds to import; --help and usage errors don't
    from megatron_ext.checkpoint.manifest import content_checks
    from megatron_ext.conversion.convert import hf_to_mcore_checkpoint

    with content_checks(not args.no_verify_checksums):  # the output's, in validation
        hf_to_mcore_checkpoint(args.input, args.output, overwrite=args.overwrite,
                               validate=not args.skip_validation, data=data)
    print(f"{PROG}: wrote {args.output}")
    return 0


if __name__ == "__main__":  # the guard matters: dist_checkpointing starts worker processes
    sys.exit(main())
