"""The comparison's report: ``DIR/report.json`` (every number), ``DIR/report.md`` (tables, the
plot, each stage's command and wall time) and ``DIR/curves.png`` (training loss, every
validation set and the experts' mean cosine similarity against tokens, one line per method).

Inputs are the stages' own outputs: each training run's ``metrics.jsonl`` (the last record of
each step counts: a resumed run logs some steps twice), ``routing.json`` of the routing tool and
lm-eval's ``results.json``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from megatron_ext.analysis.curves import tokens_axis
from megatron_ext.analysis.metrics_log import finite
from megatron_ext.analysis.metrics_log import read_metrics as read_metrics_log
from megatron_ext.experiments.plan import Experiment
from megatron_ext.platform.fs import atomic_write

COS = "moe/expert_cos_mean"
ROUTING_KEYS = ("mean_tv", "usage_entropy", "token_router_entropy", "top_expert_share")


def read_metrics(path: Path) -> dict:
    """Series of one run: ``train`` [(tokens, loss)], ``cos`` [(tokens, value)], and per
    validation key (``val_loss``, ``english/loss``, ...) [(tokens, loss)]; finite values only,
    from the one reader of metrics files (``analysis.metrics_log``: bad lines skipped, one
    warning)."""
    log = read_metrics_log(path)
    per_step = log.tokens_per_step() or 0
    series: dict[str, list] = {"train": [], "cos": []}
    for _, rec in sorted(log.by_step("train").items()):
        for key, name in (("loss", "train"), (COS, "cos")):
            value = finite(rec.get(key))
            if value is not None:
                series[name].append((rec["tokens"], value))
    for step, rec in sorted(log.by_step("valid").items()):
        for key, value in rec.items():
            if (key == "val_loss" or key.endswith("/loss")) and finite(value) is not None:
                series.setdefault(key, []).append((round(step * per_step), finite(value)))
    return series


def _routing(path: Path) -> dict:
    summary = json.loads(path.read_text())
    return {"average": {k: summary["average"].get(k) for k in ROUTING_KEYS},
            "per_domain": summary.get("per_domain"), "paper": summary.get("paper")}


def _task_scores(path: Path) -> dict:
    results = json.loads(path.read_text()).get("results", {})
    return {f"{task}/{metric.split(',')[0]}": value for task, row in results.items()
            for metric, value in row.items()
            if isinstance(value, (int, float)) and "stderr" not in metric}


def _layer_of(heatmap: Path) -> int:
    """The layer of ``heatmap_layer{L}.png``, so that layer 10 comes after layer 2."""
    return int(heatmap.stem.removeprefix("heatmap_layer"))


def collect(exp: Experiment, ledger: list[dict]) -> dict:
    """Every number of the report, per method, plus the stages."""
    methods = {}
    for m in exp.methods:
        series = read_metrics(exp.output / "train" / m.slug / "run" / "metrics.jsonl")
        final = {key: points[-1][1] for key, points in series.items() if points}
        final["cos_first"] = series["cos"][0][1] if series["cos"] else None
        routing = exp.output / "routing" / m.slug
        row = {"final": final, "series": series, "routing": _routing(routing / "routing.json"),
               "heatmaps": [str(p.relative_to(exp.output))
                            for p in sorted(routing.glob("heatmap_layer*.png"), key=_layer_of)]}
        if exp.tasks:
            row["tasks"] = _task_scores(exp.output / "eval" / m.slug / "results.json")
        methods[m.label] = row
    return {"experiment": exp.fingerprint(), "tokens_per_step": exp.tokens_per_step,
            "train_steps": exp.steps(exp.tokens), "methods": methods, "stages": ledger}


def plot(data: dict, out_png: Path) -> None:
    # why inside: matplotlib takes ~1 s to import and only the plot needs it
    from matplotlib.figure import Figure

    panels = ["train"] + sorted({k for row in data["methods"].values() for k in row["series"]
                                 if k not in ("train", "cos")}) + ["cos"]
    cols = 3
    fig = Figure(figsize=(4.2 * cols, 3.2 * -(-len(panels) // cols)), dpi=110)
    for i, key in enumerate(panels):
        ax = fig.add_subplot(-(-len(panels) // cols), cols, i + 1)
        for j, (label, row) in enumerate(data["methods"].items()):
            points = row["series"].get(key, [])
            ax.plot([t for t, _ in points], [v for _, v in points], color=f"C{j}", lw=1.2,
                    marker="o" if key not in ("train", "cos") else None, ms=3, label=label)
        ax.set_title({"train": "training loss", "cos": "expert cosine similarity (mean)",
                      "val_loss": "validation loss (blend)"}.get(key, f"validation: {key}"),
                     fontsize=9)
        tokens_axis(ax, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write(out_png, buf.getvalue())


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _wall(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows), ""]


def markdown(data: dict) -> str:
    methods, exp = data["methods"], data["experiment"]
    loss_keys = sorted({k for row in methods.values() for k in row["final"]
                        if k == "val_loss" or k.endswith("/loss")})
    lines = [f"# Comparison of MoE initializations ({exp['fingerprint']})", "",
             f"Methods {', '.join(exp['methods'])}; {data['train_steps']} steps x "
             f"{data['tokens_per_step']} tokens each, same data order, seed and schedule.", "",
             "![curves](curves.png)", "", "## Final losses", ""]
    lines += _table(["method", "train", *loss_keys, "expert cos (first log -> last)"], [
        [label, row["final"].get("train"), *(row["final"].get(k) for k in loss_keys),
         f"{_fmt(row['final'].get('cos_first'))} -> {_fmt(row['final'].get('cos'))}"]
        for label, row in methods.items()])
    tasks = sorted({k for row in methods.values() for k in row.get("tasks", {})})
    if tasks:
        lines += ["## Downstream tasks", ""] + _table(["method", *tasks], [
            [label, *(row["tasks"].get(t) for t in tasks)] for label, row in methods.items()])
    lines += ["## Routing by domain", "",
              "Held-out end of each demo corpus file (never trained on), mean over MoE layers; "
              "TV: distance of each domain's expert usage to the mean usage.", ""]
    lines += _table(["method", *ROUTING_KEYS], [
        [label, *(row["routing"]["average"][k] for k in ROUTING_KEYS)]
        for label, row in methods.items()])
    paper = next(iter(methods.values()))["routing"].get("paper") or {}
    if paper:
        lines += ["The paper's numbers:", ""] + _table(["method", "mean_tv", "usage_entropy"], [
            [name, p.get("mean_tv"), p.get("usage_entropy")] for name, p in paper.items()])
    lines += ["## Routing heatmaps", "", "Expert usage per domain and MoE layer (layers "
              "numbered from 0, as in the metrics), from the routing tool "
              "(`DIR/routing/<method>/`).", ""]
    for label, row in methods.items():
        lines += [f"{label}: " + " ".join(f"![{label} {Path(h).stem}]({h})"
                                          for h in row.get("heatmaps", [])), ""]
    lines += ["## Stages", ""] + _table(["stage", "state", "wall s", "tokens", "command"], [
        [s["name"], s["state"], _wall(s["wall_s"]), s["tokens"], f"`{' '.join(s['command'])}`"]
        for s in data["stages"]])
    return "\n".join(lines)


def write_report(exp: Experiment, ledger: list[dict]) -> dict:
    data = collect(exp, ledger)
    plot(data, exp.output / "curves.png")
    atomic_write(exp.output / "report.json", json.dumps(data, indent=1) + "\n")
    atomic_write(exp.output / "report.md", markdown(data))
    return data
