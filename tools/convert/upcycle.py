"""Upcycle a dense Llama checkpoint into a Mixtral-style MoE (Drop-Upcycling and baselines).

    python tools/convert/upcycle.py --input DENSE --output MOE --method drop --ratio 0.5 \\
        --num-experts 8 --top-k 2 --seed 1234

Streams shard by shard (memory ~ one layer), validates with transformers by default, and leaves
nothing at --output unless everything succeeded. Exit codes: 0 ok, 1 validation or I/O failure,
2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout: make megatron_ext importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_ext.checkpoint.hf_io import parse_size  # noqa: E402
from megatron_ext.checkpoint.keymaps import ConversionError  # noqa: E402
from megatron_ext.upcycling.spec import (  # noqa: E402
    INDEX_SHARING, METHODS, ROUTER_INITS, UpcycleError, UpcycleSpec,
)

from megatron_ext.cli_utils import conversion_parser  # noqa: E402
from megatron_ext.cli_utils import run_tool  # noqa: E402

PROG = "upcycle"


def _layers(text: str) -> frozenset[int]:
    try:
        return frozenset(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad layer list {text!r} (use e.g. 0,2,4)") from None


def build_parser() -> argparse.ArgumentParser:
    p = conversion_parser(
        PROG, __doc__, "dense HF Llama checkpoint directory", "MoE checkpoint directory to create",
        "skip the transformers load + logit check (2 fp32 models in RAM)")
    p.add_argument("--method", choices=METHODS, default="drop")
    p.add_argument("--ratio", type=float, default=0.5,
                   help="share r of d_ff neurons re-initialized (drop) or perturbed (noise)")
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234, help="the only source of randomness")
    p.add_argument("--index-sharing", choices=INDEX_SHARING, default="per_projection")
    p.add_argument("--router-init", choices=ROUTER_INITS, default="uniform_std002")
    p.add_argument("--noise-std", type=float, default=0.02, help="noise method: std of the noise")
    p.add_argument("--init-std", type=float, default=0.02, help="scratch method: weight std")
    p.add_argument("--btx-sources", type=Path, nargs="+", default=[], metavar="DIR",
                   help="btx: the other dense models (the input is source 0)")
    p.add_argument("--moe-layers", type=_layers, default=None,
                   help="comma-separated layers to make MoE (default all; others stay dense)")
    p.add_argument("--input-format", choices=("auto", "hf", "mcore"), default="auto")
    p.add_argument("--output-format", choices=("hf", "mcore"), default=None,
                   help="default: the input's format")
    p.add_argument("--max-shard-size", default="2GB", help="e.g. 2GB, 500MB")
    return p


def main(argv: list[str] | None = None) -> int:
    from megatron_ext.checkpoint.manifest import content_checks
    from megatron_ext.upcycling.convert import upcycle_checkpoint
    from megatron_ext.upcycling.validate import ValidationError

    def work() -> Path:
        args = build_parser().parse_args(argv)
        spec = UpcycleSpec(
            method=args.method, ratio=args.ratio, num_experts=args.num_experts, top_k=args.top_k,
            seed=args.seed, index_sharing=args.index_sharing, router_init=args.router_init,
            noise_std=args.noise_std, init_std=args.init_std, moe_layers=args.moe_layers)
        with content_checks(not args.no_verify_checksums):  # mcore inputs (and outputs)
            upcycle_checkpoint(
                args.input, args.output, spec, btx_dirs=args.btx_sources,
                input_format=args.input_format, output_format=args.output_format,
                overwrite=args.overwrite, validate=not args.skip_validation,
                max_shard_bytes=parse_size(args.max_shard_size))
        return args.output

    return run_tool(PROG, work, usage=(ConversionError, UpcycleError),
                    failures=(ValidationError,))

if __name__ == "__main__":
    sys.exit(main())
