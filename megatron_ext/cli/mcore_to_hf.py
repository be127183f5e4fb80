"""Convert one of our megatron-core checkpoints into an HF checkpoint directory.

    moe-mcore-to-hf --input CKPT --output HF_DIR [--max-shard-size 2GB]

CKPT: a checkpoint root (with ``latest``) or one ``iter_*`` directory, saved at any
expert-parallel size. Dense -> LlamaForCausalLM, all-MoE -> MixtralForCausalLM. A mixed
dense/MoE model gets Mixtral names plus ``mlp_only_layers`` in config.json, which stock Mixtral
loaders (transformers, vLLM) cannot read. --dtype auto keeps the precision the weights have
(the converted source's dtype, else bf16 when lossless, else fp32). The output carries the
run's tokenizer as files AutoTokenizer loads (--tokenizer, else a converted checkpoint's hf/
record, else data.tokenizer, else the demo tokenizer), generation_config.json and the special
token ids in config.json. Validated by default.
Exit codes: 0 ok, 1 validation or I/O failure, 2 bad input (one line on stderr); nothing is
left at --output unless everything succeeded.
"""

from __future__ import annotations

import argparse
import sys

from megatron_ext.config.args import size_arg
from megatron_ext.platform.cli import conversion_parser, run_cli
from megatron_ext.platform.quiet import quiet_process

PROG = "mcore_to_hf"


def build_parser() -> argparse.ArgumentParser:
    p = conversion_parser(
        PROG, __doc__, "checkpoint root or iter_* dir", "HF directory to create",
        "skip the logit comparison (loads a megatron and a transformers model)")
    p.add_argument("--max-shard-size", type=size_arg, default="2GB", help="e.g. 2GB, 500MB")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                   default="auto", help="weights dtype of the output")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="tokenizer to export (default: the checkpoint's hf/ record, else its "
                        "data.tokenizer, else the demo tokenizer of a data.demo_corpus run)")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(_convert, argv)


def _convert(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    quiet_process(all_from_internals=True)  # before megatron is imported: its warnings are noise
    # why inside: megatron-core and torch take seconds to import; --help and usage errors don't
    from megatron_ext.checkpoint.manifest import content_checks
    from megatron_ext.conversion.convert import mcore_to_hf_checkpoint
    from megatron_ext.conversion.hf_io import parse_size

    with content_checks(not args.no_verify_checksums):
        mcore_to_hf_checkpoint(args.input, args.output, overwrite=args.overwrite,
                               validate=not args.skip_validation, dtype=args.dtype,
                               tokenizer=args.tokenizer,
                               max_shard_bytes=parse_size(args.max_shard_size))
    print(f"{PROG}: wrote {args.output}")
    return 0


if __name__ == "__main__":  # the guard matters: dist_checkpointing starts worker processes
    sys.exit(main())
