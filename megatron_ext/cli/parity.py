"""Whole-run parity against the paper's training stack (moe-recipes v1.0.0 on transformers).

    moe-parity --output runs/parity --steps 200
    moe-parity --output runs/parity-gpu --config configs/8x152M.yaml \\
        --shape config --device cuda --dtype bf16 --steps 200 --set ...

A dense Llama is Drop-Upcycled (moe-upcycle's library) into a Mixtral; ours trains it with
moe-pretrain, theirs with transformers' MixtralForCausalLM, torch AdamW and moe-recipes'
schedule, on the micro-batches our run read. --shape tiny (default) shrinks the config's model
to a CPU size and trains on the demo corpus; --shape config keeps the config's model and data.
Ours also trains from weights moved by one ulp (the spread rounding alone makes), unless
--no-floor. The tolerance: megatron_ext/experiments/parity/report.py (docs/fidelity.md).
Outputs in --output: parity.png, parity.md (table every 20 steps, expert load), parity.json,
logs/. Rerunning reuses finished stages. Exit codes: 0 within tolerance, 1 not (or a stage
failed), 2 bad input (one line).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_ext.config.args import field_arg, int_arg
from megatron_ext.platform.cli import ArgumentParser, run_cli
from megatron_ext.platform.quiet import quiet_process


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--config", type=Path, default=Path("configs/8x152M.yaml"))
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    p.add_argument("--shape", choices=("tiny", "config"), default="tiny")
    p.add_argument("--steps", type=int_arg(1, 10**6), default=200)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--seed", type=field_arg("train.seed"), default=1234)
    p.add_argument("--no-floor", action="store_true",
                   help="skip the 1-ulp run (then only the identity phase and the LR are checked)")
    args = p.parse_args(argv)
    quiet_process()
    # why inside: torch and transformers take seconds to import; --help does not need them
    from megatron_ext.experiments.parity.pipeline import ParityRun, run_parity

    result = run_parity(ParityRun(args.config, args.overrides, args.output, args.steps,
                                  args.shape == "tiny", args.device, args.dtype, args.seed,
                                  not args.no_floor))
    for name, e in result["metrics"].items():
        print(f"{name}: {'ok' if e['pass'] else 'OUTSIDE TOLERANCE'}: "
              + ", ".join(f"{k} {v:.2e}" for k, v in e.items() if isinstance(v, float)))
    print(f"parity {'within' if result['pass'] else 'OUTSIDE'} tolerance: "
          f"{args.output / 'parity.md'}, {args.output / 'parity.png'}")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
