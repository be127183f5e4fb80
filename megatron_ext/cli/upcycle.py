"""Upcycle a dense Llama checkpoint into a Mixtral-style MoE (Drop-Upcycling and baselines).

    moe-upcycle --input DENSE --output MOE --method drop --ratio 0.5 \\
        --num-experts 8 --top-k 2 --seed 1234
    moe-upcycle --input DENSE --output MOE --config configs/8x152M.yaml

--config takes the experts, top-k, MoE layers and the ``upcycling`` section from the training
config that will load the result (``--set`` overrides it, explicit flags override both), and
refuses a dense input whose shape disagrees with the config's model. An mcore output's
config.yaml takes --config's data section; without --config, an HF input gives it none (training
from it refuses until data is set) and an mcore input its own run's.

Streams shard by shard (memory ~ one layer) and validates by default, streaming too: every
tensor against the dense model as it is produced (exact copies, re-initialized neuron counts and
statistics, a probe batch per layer for r = 0); the full-model logit check runs only when both
models fit --logit-check-memory. Leaves nothing at --output unless everything succeeded.
Exit codes: 0 ok, 1 validation or I/O failure, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from megatron_ext.checkpoint.manifest import content_checks
from megatron_ext.config.args import field_arg, int_list_arg, size_arg
from megatron_ext.config.loader import ConfigError, load_config
from megatron_ext.config.schema import Config, DataConfig
from megatron_ext.config.validate import planned_world_size, validate
from megatron_ext.conversion.hf_io import parse_size
from megatron_ext.platform.cli import conversion_parser, run_cli
from megatron_ext.platform.fs import check_io
from megatron_ext.upcycling.from_config import config_values, shape_differences
from megatron_ext.upcycling.spec import (
    INDEX_SHARING,
    METHODS,
    ROUTER_INITS,
    UpcycleError,
    UpcycleSpec,
)

PROG = "upcycle"


_layer_list = int_list_arg(0, 1023, 1024)  # indices of model.num_layers (at most 1024)


def _layers(text: str) -> frozenset[int]:
    return frozenset(_layer_list(text))


def _budget(text: str) -> int:
    """A size, or 0 (never run the check)."""
    return 0 if text.strip() == "0" else size_arg(text)


def build_parser() -> argparse.ArgumentParser:
    p = conversion_parser(
        PROG, __doc__, "dense HF Llama checkpoint directory", "MoE checkpoint directory to create",
        "skip every check of the output (the streaming checks and the full-model logit check)")
    p.add_argument("--config", type=Path, default=None, metavar="YAML",
                   help="training config of the MoE run: supplies the flags marked (config) "
                        "and must match the dense input's shape")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a --config field (repeatable), as pretrain_moe.py --set")
    # default=None: a flag given overrides --config; one not given falls back to the config,
    # then to UpcycleSpec's default (shown).
    d = UpcycleSpec()
    p.add_argument("--method", choices=METHODS, help=f"(config) default {d.method}")
    p.add_argument("--ratio", type=field_arg("upcycling.ratio"),
                   help="(config) share r of d_ff neurons re-initialized "
                   f"(drop) or perturbed (noise); default {d.ratio}")
    p.add_argument("--num-experts", type=field_arg("moe.num_experts"),
                   help=f"(config) default {d.num_experts}")
    p.add_argument("--top-k", type=field_arg("moe.top_k"), help=f"(config) default {d.top_k}")
    p.add_argument("--seed", type=field_arg("upcycling.seed"),
                   help=f"(config) the only source of randomness; default {d.seed}")
    p.add_argument("--index-sharing", choices=INDEX_SHARING,
                   help=f"(config) default {d.index_sharing}")
    p.add_argument("--router-init", choices=ROUTER_INITS, help=f"(config) default {d.router_init}")
    p.add_argument("--noise-std", type=field_arg("upcycling.noise_std"),
                   help=f"(config) noise method: std of the noise; default {d.noise_std}")
    p.add_argument("--init-std", type=field_arg("model.init_method_std"), default=0.02,
                   help="scratch method: weight std")
    p.add_argument("--btx-sources", type=Path, nargs="+", default=[], metavar="DIR",
                   help="btx: the other dense models (the input is source 0)")
    p.add_argument("--moe-layers", type=_layers, default=None,
                   help="(config: moe.layer_freq) comma-separated layers to make MoE "
                        "(default all; others stay dense)")
    p.add_argument("--input-format", choices=("auto", "hf", "mcore"), default="auto")
    p.add_argument("--output-format", choices=("hf", "mcore"), default=None,
                   help="default: the input's format")
    p.add_argument("--max-shard-size", type=size_arg, default="2GB", help="e.g. 2GB, 500MB")
    p.add_argument("--logit-check-memory", type=_budget, default=None, metavar="SIZE",
                   help="run the full-model logit check (whole fp32 models, ~8 bytes per MoE "
                        "parameter) only if it fits this (e.g. 16GB; 0: never); default: half "
                        "the RAM available")
    return p


# Flags --config supplies: the training config's upcycling section and MoE shape.
CONFIG_FLAGS = ("method", "ratio", "seed", "index_sharing", "router_init", "noise_std",
                "num_experts", "top_k", "moe_layers")
def read_config(path: Path, overrides: list[str]) -> Config:
    """The training config, checked as pretrain_moe.py checks it, at the layout it plans (or
    the smallest one its parallel sizes allow); problems are one UpcycleError naming the file."""
    try:
        cfg = load_config(path, overrides)
        p = cfg.parallel
        validate(cfg, world_size=planned_world_size(cfg, p.tensor * p.pipeline * p.expert))
    except ConfigError as e:
        message = " ".join(str(e).split())
        raise UpcycleError(message if str(path) in message else f"--config {path}: {message}"
                           ) from None
    if cfg.moe.num_experts == 0:
        raise UpcycleError(f"--config {path}: moe.num_experts is 0, a dense model; give the "
                           "config of the MoE run that will load the upcycled checkpoint")
    return cfg


def check_dense_shape(cfg: Config, args: argparse.Namespace) -> None:
    """UpcycleError unless the dense input has the shape the config's model has."""
    # why: upcycling.convert takes seconds to import; --help and flag errors stay fast.
    from megatron_ext.upcycling.convert import open_dense

    with content_checks(not args.no_verify_checksums):  # an mcore input is verified as below
        have = open_dense(args.input, args.input_format).arch
    diffs = shape_differences(cfg, have)
    if diffs:
        raise UpcycleError(f"--config {args.config} does not match the dense input {args.input} "
                           f"(config vs input): {', '.join(diffs)}")


def spec_from_args(args: argparse.Namespace) -> tuple[UpcycleSpec, DataConfig | None]:
    """The recipe: each flag given, else --config's value, else UpcycleSpec's default; and
    --config's data section (for an mcore output's config.yaml), None without --config."""
    if args.overrides and args.config is None:
        raise UpcycleError("--set needs --config")
    given = {k: getattr(args, k) for k in CONFIG_FLAGS if getattr(args, k) is not None}
    if args.config is not None:
        cfg = read_config(args.config, args.overrides)
        spec = UpcycleSpec(**{**config_values(cfg), **given}, init_std=args.init_std)
        # a bad recipe is reported before the input is read
        spec.with_placeholder_sources(len(args.btx_sources)).validate()
        check_dense_shape(cfg, args)
        return spec, cfg.data
    return UpcycleSpec(**given, init_std=args.init_std), None


def main(argv: list[str] | None = None) -> int:
    # Every expert is a fresh tensor of tens of MB: in 4 KB pages its page faults cost more CPU
    # than the gather that fills it (measured: 53 vs 13 ms per 50 MB expert). torch's allocator
    # asks for transparent huge pages (madvise) when this is set, read at its large allocations.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    return run_cli(_convert, argv)


def _convert(argv: list[str] | None) -> int:
    # why inside: these import megatron-core and transformers (seconds); --help does not wait
    from megatron_ext.checkpoint.manifest import content_checks
    from megatron_ext.upcycling.convert import upcycle_checkpoint

    args = build_parser().parse_args(argv)
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        # The upcycle is a pipeline of three busy threads (draws, experts, checks; the writes
        # wait on the disk), so each torch op gets the cores left over, at least one. Every
        # core per op oversubscribes a small machine (2 cores: 420-440 MB/s, 510-550 with 1).
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // 3))
    check_io([("--output", args.output)], [("--config", args.config)], error=UpcycleError)
    spec, data = spec_from_args(args)
    with content_checks(not args.no_verify_checksums):  # mcore inputs (and outputs)
        upcycle_checkpoint(
            args.input, args.output, spec, btx_dirs=args.btx_sources,
            input_format=args.input_format, output_format=args.output_format,
            overwrite=args.overwrite, validate=not args.skip_validation,
            max_shard_bytes=parse_size(args.max_shard_size), data=data,
            logit_check_bytes=args.logit_check_memory)
    print(f"{PROG}: wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
