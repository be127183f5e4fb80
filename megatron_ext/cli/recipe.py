"""The paper recipe's first step: check everything, then upcycle the dense base if needed.

    moe-recipe --config configs/8x152M.yaml --check      # before sbatch: every problem at once
    moe-recipe --config configs/8x152M.yaml [--set upcycling.dense_base=llm-jp/llm-jp-3-150m]

A config naming ``upcycling.dense_base`` (a local HF directory, one of our checkpoints, or a
Hugging Face repo id resolved through its cache) is upcycled with its ``upcycling`` section into
``checkpoint.load``, where its training starts; the scripts/slurm jobs run this before training,
so ``sbatch scripts/slurm/8x152M.sh`` does both. It is skipped when ``checkpoint.load`` already
holds that upcycled MoE and verifies, or when ``checkpoint.save`` has a checkpoint to resume.

Before anything runs, one report names every problem found: the config's checks, missing data
prefixes (.bin/.idx), a tokenizer larger than the model's vocabulary, a dense base that is
missing or has another shape than the config's model, a ``checkpoint.load`` holding something
else. On the login node, ``--check`` also downloads a Hub dense base into the cache that jobs
then read offline (HF_HUB_OFFLINE=1). Other pretrain_moe.py options are ignored, so the job
scripts pass their arguments through. Exit codes: 0 ready or done, 1 upcycling failed
(validation or I/O), 2 problems found (the report on stderr).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_ext.config.loader import load_config
from megatron_ext.errors import EXIT_OK, EXIT_USER
from megatron_ext.platform.cli import ArgumentParser, run_cli
from megatron_ext.platform.quiet import quiet_process

PROG = "moe-recipe"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True, help="the MoE run's training config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a config field (repeatable), as pretrain_moe.py --set")
    p.add_argument("--check", action="store_true",
                   help="only check (and fetch a Hub dense base); upcycle nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    args, _ = build_parser().parse_known_args(argv)  # the rest belongs to pretrain_moe.py
    cfg = load_config(args.config, args.overrides)  # a config that does not load: one line
    quiet_process(all_from_internals=True)  # before megatron-core's import-time warnings
    # why inside: --help is instant (the checks and the upcycle load torch and megatron-core
    # only where they need them: a config without a dense base is checked in a second)
    from megatron_ext.experiments.recipe import plan, upcycle

    found = plan(cfg)
    if found.problems:
        n = len(found.problems)
        print(f"{PROG}: {args.config}: {n} problem{'s' if n > 1 else ''}; nothing was started:",
              *(f"  - {p}" for p in found.problems), sep="\n", file=sys.stderr, flush=True)
        return EXIT_USER
    if args.check or found.step != "upcycle":
        print(f"{PROG}: {args.config}: ready; {found.note}", flush=True)
        return EXIT_OK
    print(f"{PROG}: {found.note}", flush=True)
    upcycle(cfg, found.dense, log=lambda line: print(f"{PROG}: {line}", flush=True))
    print(f"{PROG}: wrote {cfg.checkpoint.load}; training starts from it", flush=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
