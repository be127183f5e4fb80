"""Text for ``--plan`` (one ranked table) and ``--dry-run`` (the configured layout's step)."""

from __future__ import annotations

from megatron_ext.config.schema import Config
from megatron_ext.errors import UserError
from megatron_ext.model.planner.search import Candidate, candidates
from megatron_ext.model.planner.step import Prediction

HEADER = ("  #  tp pp ep   dp  mb  acc dopt graph  mem GiB fits  step s   tokens/s tok/s/GPU"
          "   MFU    days | compute bubble    tp    ep    pp    dp   opt (ms)")


def _ms(x: float) -> str:
    return f"{x * 1e3:.0f}"


def row(i: int | str, c: Candidate) -> str:
    p, lay = c.prediction, c.prediction.layout
    parts = [p.compute, p.bubble, *(p.comm[d] for d in ("tp", "ep", "pp", "dp")), p.optimizer]
    yes = {True: "yes", False: "no"}
    return (f"{i:>3}{'*' if c.configured else ' '}{lay.tensor:>2} {lay.pipeline:>2} "
            f"{lay.expert:>2} {lay.data:>4} {lay.micro_batch:>3} {lay.micro_batches:>4} "
            f"{yes[lay.distributed_optimizer]:>4} {yes[lay.cuda_graph]:>5} "
            f"{c.memory_gib:>8.1f} {'yes' if c.fits else 'NO':>4} {p.step_s:>7.3f} "
            f"{p.tokens_per_s:>10,.0f} {p.tokens_per_s / p.world:>9,.0f} {p.mfu:>6.1%} "
            f"{p.days:>7.1f} | {_ms(parts[0]):>7} " + " ".join(f"{_ms(x):>5}" for x in parts[1:]))


def plan_text(cfg: Config, nodes: int, top: int | None) -> str:
    """The ranked table of layouts on ``nodes`` nodes (``top`` best that fit; None: all,
    those that do not fit included)."""
    cl = cfg.cluster
    world = nodes * cl.gpus_per_node
    found = candidates(cfg, nodes)
    if not found:
        raise UserError(f"--nodes {nodes}: no layout of {world} GPUs is valid for this config "
                        f"(tensor within a node, pipeline dividing {cfg.model.num_layers} layers, "
                        f"global batch {cfg.train.global_batch_size} dividing over data parallel)")
    fitting = [c for c in found if c.fits]
    budget = cl.memory_gb * cl.usable_memory_fraction
    shown = found if top is None else fitting[:top]
    p = found[0].prediction
    lines = [
        f"plan: {nodes} node(s) x {cl.gpus_per_node} {cl.gpu} = {world} GPUs; "
        f"{p.tokens_per_step:,} tokens/step, {p.steps:,} steps "
        f"({p.steps * p.tokens_per_step / 1e9:,.1f}B tokens)",
        f"{len(found)} valid layouts, {len(fitting)} fit {budget:.1f} GiB/GPU "
        f"({cl.usable_memory_fraction:.0%} of {cl.memory_gb:g}); showing "
        f"{'all' if top is None else f'the best {len(shown)}'} (* = the config's layout, "
        f"acc = micro-batches per step, dopt = distributed optimizer)",
        HEADER,
        *(row(i + 1, c) for i, c in enumerate(shown)),
    ]
    mine = next((c for c in found if c.configured), None)
    if mine is not None and mine not in shown:
        lines.append(row("cfg", mine))
    if not fitting:
        lines.append(f"no layout fits: the smallest needs "
                     f"{min(c.memory_gib for c in found):.1f} GiB; add nodes or recompute")
    lines.append("model: megatron_ext/model/planner (assumptions: docs/scaling.md)")
    return "\n".join(lines)


def step_line(p: Prediction, cfg: Config) -> str:
    """``--dry-run``'s prediction for the configured layout."""
    cl = cfg.cluster
    nodes = -(-p.world // cl.gpus_per_node)
    comm = ", ".join(f"{d} {_ms(p.comm[d])} ms" for d in ("tp", "ep", "pp", "dp") if p.comm[d])
    return (f"predicted step on {nodes} node(s) of {cl.gpus_per_node}x {cl.gpu} "
            f"(cluster section): {p.step_s:.3f} s (compute {_ms(p.compute)} ms, bubble "
            f"{_ms(p.bubble)} ms, comm {comm or 'none'}, optimizer {_ms(p.optimizer)} ms); "
            f"{p.tokens_per_s:,.0f} tokens/s ({p.tokens_per_s / p.world:,.0f}/GPU), MFU "
            f"{p.mfu:.1%}, {p.days:.1f} days for {p.steps * p.tokens_per_step / 1e9:,.1f}B "
            f"tokens")
