"""Loss curves of several runs on one plot (e.g. Drop-Upcycling vs naive vs from scratch).

Reads each run's ``metrics.jsonl`` (written by the training loop), keeps the last record of every
step (a resumed run logs some steps twice), and plots training and validation loss against
consumed tokens. Smoothing is an exponential moving average over the logged points.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from megatron_ext.errors import UserError


class CurvesError(UserError, ValueError):
    """A run directory or metrics file that cannot be used; the message is one line."""


@dataclass
class Curve:
    label: str
    train: list[tuple[int, float]] = field(default_factory=list)  # (tokens, loss)
    valid: list[tuple[int, float]] = field(default_factory=list)


def read_run(label: str, run_dir: Path) -> Curve:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise CurvesError(f"{label}: {path} not found")
    train: dict[int, tuple[int, float]] = {}
    valid: dict[int, float] = {}
    tokens_at: dict[int, int] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise CurvesError(f"{label}: {path}:{n} is not JSON") from None
        step = rec.get("step")
        if rec.get("kind") == "train" and isinstance(rec.get("loss"), (int, float)):
            train[step] = (rec["tokens"], float(rec["loss"]))
            tokens_at[step] = rec["tokens"]
        elif rec.get("kind") == "valid" and isinstance(rec.get("val_loss"), (int, float)):
            valid[step] = float(rec["val_loss"])
    if not train:
        raise CurvesError(f"{label}: {path} has no training records")
    per_step = min(t for t, _ in train.values()) / min(train)  # tokens per step
    curve = Curve(label, sorted(train.values()))
    curve.valid = sorted((tokens_at.get(s, int(s * per_step)), v) for s, v in valid.items())
    return curve


def ema(values: list[float], weight: float) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else weight * acc + (1 - weight) * v
        out.append(acc)
    return out


def summary_table(curves: list[Curve], last_fraction: float = 0.1) -> str:
    """Markdown: final training loss (mean over the last ``last_fraction`` of points), final
    validation loss/perplexity, tokens."""
    rows = ["| run | tokens | train loss (last 10%) | val loss | val ppl |",
            "|---|---:|---:|---:|---:|"]
    for c in curves:
        k = max(1, int(len(c.train) * last_fraction))
        tail = [loss for _, loss in c.train[-k:]]
        val = c.valid[-1][1] if c.valid else float("nan")
        ppl = math.exp(min(val, 50.0)) if c.valid else float("nan")
        rows.append(f"| {c.label} | {c.train[-1][0]:,} | {sum(tail) / len(tail):.4f} | "
                    f"{val:.4f} | {ppl:.2f} |")
    return "\n".join(rows) + "\n"


def tokens_axis(ax, fontsize: float | None = None) -> None:
    """Label ``ax``'s x axis as tokens, in engineering notation (800k, 1.6M): raw token counts
    run into each other."""
    # why inside: matplotlib takes ~1 s to import and only the plot needs it
    from matplotlib.ticker import EngFormatter

    ax.set_xlabel("tokens", fontsize=fontsize)
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))


def plot(curves: list[Curve], out_png: Path, smooth: float = 0.0, log_x: bool = False) -> None:
    # why inside: matplotlib takes ~1 s to import and only the plot needs it
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=120)
    ax = fig.add_subplot()
    for i, c in enumerate(curves):
        color = f"C{i}"
        xs = [t for t, _ in c.train]
        ax.plot(xs, ema([v for _, v in c.train], smooth), color=color, lw=1.2,
                label=f"{c.label} (train)")
        if c.valid:
            ax.plot([t for t, _ in c.valid], [v for _, v in c.valid], color=color, ls="--",
                    marker="o", ms=3, lw=1.0, label=f"{c.label} (valid)")
    tokens_axis(ax)
    ax.set_ylabel("loss")
    if log_x:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png)
