"""Loss curves of several runs on one plot (e.g. Drop-Upcycling vs naive vs from scratch).

Reads each run's ``metrics.jsonl`` (written by the training loop), keeps the last record of every
step (a resumed run logs some steps twice), and plots training and validation loss against
consumed tokens. Smoothing is an exponential moving average over the logged points.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from megatron_ext.analysis.metrics_log import finite, read_metrics
from megatron_ext.errors import UserError
from megatron_ext.platform.fs import atomic_write, check_run_files
from megatron_ext.platform.run_files import METRICS_FILE

OUTPUTS = ("loss_curves.png", "loss_curves.md")


class CurvesError(UserError, ValueError):
    """A run directory or metrics file that cannot be used; the message is one line."""


@dataclass
class Curve:
    label: str
    train: list[tuple[int, float]] = field(default_factory=list)  # (tokens, loss)
    valid: list[tuple[int, float]] = field(default_factory=list)


def read_run(label: str, run_dir: Path) -> Curve:
    """The training and validation loss of one run against tokens, from its metrics file
    (``metrics_log.read_metrics``: malformed lines skipped with one warning)."""
    log = read_metrics(Path(run_dir) / METRICS_FILE, label)
    train: dict[int, tuple[int, float]] = {}
    for step, rec in log.by_step("train").items():
        loss = finite(rec.get("loss"))
        if loss is not None:  # a skipped (non-finite) step has no point
            train[step] = (rec["tokens"], loss)
    if not train:
        raise CurvesError(f"{label}: {log.path} has no finite training loss")
    per_step = log.tokens_per_step()
    valid = []
    for step, rec in log.by_step("valid").items():
        loss = finite(rec.get("val_loss"))
        tokens = train[step][0] if step in train else (
            round(step * per_step) if per_step is not None else None)
        if loss is not None and tokens is not None:
            valid.append((tokens, loss))
    return Curve(label, sorted(train.values()), sorted(valid))


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


def write_report(curves: list[Curve], out_dir: Path, smooth: float = 0.0,
                 log_x: bool = False) -> tuple[Path, Path]:
    """``out_dir/loss_curves.png`` and ``loss_curves.md``, each written whole (never through a
    symbolic link: one there is refused, CurvesError)."""
    check_run_files(out_dir, OUTPUTS, "--output", error=CurvesError)
    out_dir.mkdir(parents=True, exist_ok=True)
    png, md = (out_dir / name for name in OUTPUTS)
    buf = io.BytesIO()
    plot(curves, buf, smooth, log_x)
    atomic_write(png, buf.getvalue())
    atomic_write(md, "# Loss curves\n\n" + summary_table(curves))
    return png, md


def plot(curves: list[Curve], out_png: Path | BinaryIO, smooth: float = 0.0,
         log_x: bool = False) -> None:
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
    fig.savefig(out_png, format="png")
