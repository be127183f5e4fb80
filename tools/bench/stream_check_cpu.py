"""CPU cost of the upcycler's streaming check (upcycling/stream_check.py) for one MoE layer.

One random dense layer MLP at the 8x3.7B shape (hidden 3072, d_ff 8192, bf16, std 0.02), 8 real
drop experts (r = 0.5, ``perturb_expert`` with the layer's ``mlp_sums``, seed 0), fed to
``StreamCheck.check`` as the upcycler streams them (router, then w1, w3, w2 per expert). The
check's functions are wrapped with timers of this thread's CPU time (``time.thread_time``:
other processes on a shared machine do not count), each part reported exclusive of the parts
it calls; "other" is the rest of the layer's check (gathers, counts, the permutation rules).
Run with OMP_NUM_THREADS=1: the issue's machine has 2 cores for the converter and its check.

    OMP_NUM_THREADS=1 PYTHONPATH=. python tools/bench/stream_check_cpu.py [--repeat 3]

``--repeat`` checks the layer that many times (a fresh ``StreamCheck`` each) and reports the
fastest, since a shared machine only ever adds time.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch

from megatron_ext.conversion.keymaps import HF_DENSE_MLP, HF_EXPERT, HF_ROUTER, Arch
from megatron_ext.platform.cli import ArgumentParser, run_cli
from megatron_ext.upcycling import UpcycleSpec, neuron_match, neuron_stats, stream_check
from megatron_ext.upcycling.perturb import mlp_sums, perturb_expert

HIDDEN, D_FF, EXPERTS, RATIO = 3072, 8192, 8, 0.5
# (label, owner, attribute): the parts timed, where the checked code has them (names differ
# between revisions; a missing one is skipped)
PARTS: list[tuple[str, object, str]] = [
    ("setup: NeuronSums", neuron_stats.NeuronSums, "__init__"),
    ("setup: dense neurons (rest)", neuron_match, "DenseNeurons.__init__"),
    ("setup: dense neurons (rest)", stream_check, "_DenseNeurons.__init__"),  # before 2026-12-07
    ("fingerprint", neuron_match, "fingerprint"),
    ("fingerprint", stream_check, "fingerprint"),
    ("match: bit comparison", neuron_match, "DenseNeurons.match"),
    ("match: bit comparison", stream_check, "_DenseNeurons.match"),
    ("fresh statistics", stream_check, "check_stats"),
    ("down: neurons as rows", stream_check, "as_rows"),
]


class Timers:
    """Exclusive thread CPU seconds per label: a timed call's time minus its timed callees'."""

    def __init__(self) -> None:
        self.total: dict[str, float] = {}
        self._stack: list[float] = []  # per open call: time spent in its timed callees

    def wrap(self, label: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self._stack.append(0.0)
            start = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.thread_time() - start
                inner = self._stack.pop()
                self.total[label] = self.total.get(label, 0.0) + spent - inner
                if self._stack:
                    self._stack[-1] += spent
        return timed


def _install(timers: Timers) -> list[tuple[object, str, Callable]]:
    undo = []
    for label, owner, attr in PARTS:
        if "." in attr:
            cls_name, attr = attr.split(".")
            owner = getattr(owner, cls_name, None)
        fn = getattr(owner, attr, None) if owner is not None else None
        if fn is None:
            continue
        undo.append((owner, attr, fn))
        setattr(owner, attr, timers.wrap(label, fn))
    return undo


def make_layer() -> tuple[dict[str, torch.Tensor], list[tuple[str, torch.Tensor]]]:
    """The dense tensors (HF names, layer 0) and the drop layer's stream (router, experts)."""
    g = torch.Generator().manual_seed(0)
    shapes = {"gate": (D_FF, HIDDEN), "up": (D_FF, HIDDEN), "down": (HIDDEN, D_FF)}
    mlp = {r: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for r, s in shapes.items()}
    spec = UpcycleSpec(method="drop", ratio=RATIO, num_experts=EXPERTS)
    sums = mlp_sums(mlp)
    stream = [(HF_ROUTER.format(layer=0), (torch.randn(EXPERTS, HIDDEN, generator=g) * 0.02)
               .to(torch.bfloat16))]
    for e in range(EXPERTS):
        expert = perturb_expert(mlp, spec, g, sums)
        stream += [(HF_EXPERT[r].format(layer=0, expert=e), expert[r]) for r in shapes]
    dense = {HF_DENSE_MLP[r].format(layer=0): w for r, w in mlp.items()}
    return dense, stream


def check_layer(dense: dict, stream: list) -> tuple[float, dict[str, float]]:
    arch = Arch(num_layers=1, hidden_size=HIDDEN, num_heads=24, num_kv_heads=24, head_dim=128,
                ffn_hidden_size=D_FF, vocab_size=128)
    check = stream_check.StreamCheck([dense.__getitem__], arch,
                                     UpcycleSpec(method="drop", ratio=RATIO, num_experts=EXPERTS))
    timers = Timers()
    undo = _install(timers)
    try:
        start = time.thread_time()
        for name, t in stream:
            check.check(name, t)
        total = time.thread_time() - start
    finally:
        for owner, attr, fn in undo:
            setattr(owner, attr, fn)
    assert check.experts_checked == EXPERTS
    return total, timers.total


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dense, stream = make_layer()
    best: tuple[float, dict[str, float]] | None = None
    for _ in range(args.repeat):
        run = check_layer(dense, stream)
        if best is None or run[0] < best[0]:
            best = run
    total, parts = best
    print(f"streaming check, one 8x3.7B drop layer (H {HIDDEN}, d_ff {D_FF}, {EXPERTS} experts, "
          f"r {RATIO}, bf16), thread CPU s, best of {args.repeat}, torch threads "
          f"{torch.get_num_threads()}")
    print("| part | CPU s |\n|---|---:|")
    for label in dict.fromkeys(label for label, _, _ in PARTS):
        if label in parts:
            print(f"| {label} | {parts[label]:.3f} |")
    print(f"| other | {total - sum(parts.values()):.3f} |")
    print(f"| **total per layer** | **{total:.3f}** |")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
