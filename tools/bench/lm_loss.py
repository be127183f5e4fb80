"""LM head + cross-entropy, forward + backward: megatron-core's path vs our fused one.

Prints time and the peak memory each path adds over its inputs (see benchlib/lm_loss.py).
  python tools/bench/lm_loss.py                       # 8x152M head: 16k tokens, h512, V 99584
  python tools/bench/lm_loss.py --tokens 4096 --hidden 128 --dtype fp32   # CPU-sized
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from megatron_ext.platform.cli import ArgumentParser, run_cli
from megatron_ext.platform.quiet import quiet_process

quiet_process()  # before megatron is imported: its import-time notices are noise here

from benchlib.lm_loss import PATHS, LossBenchOptions, measure  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16384, help="micro-batch x sequence")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=99584)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--paths", default=",".join(PATHS), help=f"subset of {','.join(PATHS)}")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    paths = tuple(x for x in a.paths.split(",") if x)
    if not paths or set(paths) - set(PATHS):
        p.error(f"--paths: choose from {','.join(PATHS)}")
    if min(a.tokens, a.hidden, a.vocab, a.repeats) < 1:
        p.error("--tokens, --hidden, --vocab and --repeats must be >= 1")

    from megatron_ext.config.schema import Config
    from megatron_ext.platform.dist import init_distributed

    init_distributed(Config(), standalone=True)  # megatron's TP group (size 1) for its CE
    opts = LossBenchOptions(a.tokens, a.hidden, a.vocab, a.dtype, a.repeats, paths)
    res = measure(opts)
    print(f"{res['device']}: {a.tokens} tokens, hidden {a.hidden}, vocab {a.vocab}, {a.dtype}")
    print(f"{'path':16s} {'ms (mean/min)':>16s} {'extra peak GiB':>15s} {'grad_w rel diff':>16s}")
    for name, r in res["paths"].items():
        if r["status"] != "ok":
            print(f"{name:16s} {r['status']}: {r['why']}")
            continue
        print(f"{name:16s} {r['ms_mean']:8.1f}/{r['ms_min']:<7.1f} {r['extra_peak_gib']:15.2f} "
              f"{r['grad_w_rel_diff']:16.2e}")
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
