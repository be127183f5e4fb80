"""Comparison, plot and tables of the whole-run parity (``pipeline``).

The tolerance, fixed before ours is compared with theirs (docs/fidelity.md, "Whole-run parity",
has the measurements behind it):

1. Identity (fp32 only): over the first ``IDENTICAL_STEPS`` steps every metric agrees to
   ``IDENTICAL_RTOL``. Until a token's top-k choice flips, two correct implementations differ
   by rounding alone (~1e-7 here), while any difference of objective or optimizer (the
   load-balancing definition, the weight-decay scope, eps or clipping, the schedule) shows by
   the second step. After the first flip, fp32 runs diverge like chaotic systems do.
2. Whole run: the mean of each metric over windows of ``WINDOW`` steps agrees within
   ``FLOOR_FACTOR`` x the same statistic between ours and ours from weights moved by one ulp
   (``floor``: the spread rounding alone produces, measured in the same invocation), and at
   least ``MIN_RTOL``. A systematic gap (a bias that does not average out) exceeds it.
3. The learning rate agrees to ``IDENTICAL_RTOL`` at every step (moe-recipes writes pi as
   3.14159 and takes the cosine in float32: ~3e-6 at most).
"""

from __future__ import annotations

import json
from pathlib import Path

METRICS = ("loss", "aux_loss", "grad_norm", "lr")
IDENTICAL_STEPS, IDENTICAL_RTOL = 20, 1e-5
WINDOW, FLOOR_FACTOR, MIN_RTOL = 20, 3.0, 1e-5


def series(records: list[dict], metric: str) -> list[float]:
    return [float(r[metric]) for r in records]


def max_rel_diff(a: list[float], b: list[float]) -> tuple[float, int]:
    """(largest |a - b| / |a|, its 1-based step); (0, 0) for empty series."""
    worst, at = 0.0, 0
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        d = abs(x - y) / max(abs(x), 1e-30)
        if d > worst:
            worst, at = d, i + 1
    return worst, at


def window_means(values: list[float], window: int = WINDOW) -> list[float]:
    return [sum(values[i:i + window]) / len(values[i:i + window])
            for i in range(0, len(values), window)]


def _check(a: list[float], b: list[float], floor: list[float] | None, metric: str,
           fp32: bool) -> dict:
    entry: dict = {}
    entry["max_rel_diff"], entry["at_step"] = max_rel_diff(a, b)
    if metric == "lr":
        entry["pass"] = entry["max_rel_diff"] <= IDENTICAL_RTOL
        return entry
    first = min(IDENTICAL_STEPS, len(a))
    entry["identity_rel_diff"] = max_rel_diff(a[:first], b[:first])[0]
    ok = not fp32 or entry["identity_rel_diff"] <= IDENTICAL_RTOL
    entry["window_rel_diff"] = max_rel_diff(window_means(a), window_means(b))[0]
    if floor is not None:
        entry["floor_max_rel_diff"] = max_rel_diff(a, floor)[0]
        entry["floor_window_rel_diff"] = max_rel_diff(window_means(a), window_means(floor))[0]
        entry["window_tolerance"] = max(FLOOR_FACTOR * entry["floor_window_rel_diff"], MIN_RTOL)
        ok = ok and entry["window_rel_diff"] <= entry["window_tolerance"]
    entry["pass"] = ok
    return entry


def expert_load(record: dict) -> list[list[float]]:
    """Per layer (in order), each expert's share of the top-k assignments, from our record."""
    layers = sorted({int(k.split("/")[1][5:]) for k in record if k.startswith("moe/layer")
                     and "/load_e" in k})
    out = []
    for layer in layers:
        keys = sorted((k for k in record if k.startswith(f"moe/layer{layer}/load_e")),
                      key=lambda k: int(k.rsplit("_e", 1)[1]))
        out.append([float(record[k]) for k in keys])
    return out


def compare(ours: list[dict], theirs: list[dict], floor: list[dict] | None,
            load_theirs: list[list[float]], fp32: bool, clip: float) -> dict:
    """``clip``: the threshold on the (mean) gradient's norm, to count the clipped steps."""
    if len(ours) != len(theirs) or (floor is not None and len(floor) != len(ours)):
        raise ValueError(f"ours logged {len(ours)} steps, theirs {len(theirs)}")
    result: dict = {"steps": len(ours), "fp32": fp32, "criteria": {
        "identical_steps": IDENTICAL_STEPS, "identical_rtol": IDENTICAL_RTOL, "window": WINDOW,
        "floor_factor": FLOOR_FACTOR, "min_rtol": MIN_RTOL}, "metrics": {}}
    for m in METRICS:
        result["metrics"][m] = _check(series(ours, m), series(theirs, m),
                                      None if floor is None else series(floor, m), m, fp32)
    result["clipped_steps"] = {name: sum(r["grad_norm"] > clip > 0 for r in recs)
                               for name, recs in (("ours", ours), ("theirs", theirs))}
    load_ours = expert_load(ours[-1])
    result["expert_load"] = {"ours": load_ours, "theirs": load_theirs,
                             "max_abs_diff": _max_abs(load_ours, load_theirs)}
    if floor is not None:
        result["expert_load"]["floor_max_abs_diff"] = _max_abs(load_ours, expert_load(floor[-1]))
    result["pass"] = all(e["pass"] for e in result["metrics"].values())
    return result


def _max_abs(a: list[list[float]], b: list[list[float]]) -> float:
    return max((abs(x - y) for ra, rb in zip(a, b, strict=True)
                for x, y in zip(ra, rb, strict=True)), default=0.0)


def plot(ours: list[dict], theirs: list[dict], floor: list[dict] | None, result: dict,
         title: str, out_png: Path) -> None:
    import matplotlib  # why inside: only the report needs it (import time)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in ours]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, m in zip(axes.flat, METRICS, strict=False):
        ax.plot(steps, series(ours, m), label="ours (pretrain_moe.py)", lw=1.6)
        ax.plot(steps, series(theirs, m), "--", label="theirs (transformers + AdamW)", lw=1.2)
        if floor is not None:
            ax.plot(steps, series(floor, m), ":", color="0.4", lw=1.0,
                    label="ours from weights + 1 ulp")
        ax.set_title(m)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    ax = axes.flat[4]
    for m in METRICS:
        a = series(ours, m)
        ax.semilogy(steps, [max(abs(x - y) / max(abs(x), 1e-30), 1e-12)
                            for x, y in zip(a, series(theirs, m), strict=True)], label=m)
    if floor is not None:
        a = series(ours, "loss")
        ax.semilogy(steps, [max(abs(x - y) / abs(x), 1e-12)
                            for x, y in zip(a, series(floor, "loss"), strict=True)], "k:",
                    label="loss, ours vs ours + 1 ulp")
    ax.set_title("|ours - theirs| / |ours| per step")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    _plot_load(axes.flat[5], result["expert_load"])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def _plot_load(ax, load: dict) -> None:
    ours, theirs = load["ours"], load["theirs"]
    experts = len(ours[0]) if ours else 0
    for i, (lo, lt) in enumerate(zip(ours, theirs, strict=True)):
        xs = [i * (experts + 1) + e for e in range(experts)]
        ax.bar(xs, lo, width=0.8, color="C0", label="ours" if i == 0 else None)
        ax.plot(xs, lt, "x", color="C1", label="theirs" if i == 0 else None)
    ax.set_title("expert load, last step (share of top-k)")
    ax.set_xticks([i * (experts + 1) + experts / 2 - 0.5 for i in range(len(ours))],
                  [f"layer {i}" for i in range(len(ours))])
    ax.legend(fontsize=8)


def markdown(ours: list[dict], theirs: list[dict], result: dict, every: int = 20) -> str:
    lines = ["| step | loss ours | loss theirs | aux ours | aux theirs | grad norm ours | "
             "grad norm theirs | LR ours | LR theirs |", "|" + "---|" * 9]
    for i, (o, t) in enumerate(zip(ours, theirs, strict=True)):
        if (i + 1) % every and i not in (0, len(ours) - 1):
            continue
        lines.append(f"| {o['step']} | {o['loss']:.6f} | {t['loss']:.6f} | {o['aux_loss']:.6f} "
                     f"| {t['aux_loss']:.6f} | {o['grad_norm']:.5f} | {t['grad_norm']:.5f} | "
                     f"{o['lr']:.6e} | {t['lr']:.6e} |")
    lines += ["", "| metric | steps 1-20: max rel. diff | 20-step means: max rel. diff | "
              "same, ours vs ours 1-ulp | tolerance (20-step means) | any step: max rel. diff "
              "(step) | pass |", "|---|---|---|---|---|---|---|"]
    for m, e in result["metrics"].items():
        def f(key: str, e: dict = e) -> str:
            return f"{e[key]:.1e}" if key in e else "n/a"
        lines.append(f"| {m} | {f('identity_rel_diff')} | {f('window_rel_diff')} | "
                     f"{f('floor_window_rel_diff')} | {f('window_tolerance')} | "
                     f"{e['max_rel_diff']:.1e} ({e['at_step']}) | {'yes' if e['pass'] else 'NO'} |")
    clipped = result["clipped_steps"]
    lines += ["", f"Steps whose gradient was clipped: ours {clipped['ours']}, theirs "
              f"{clipped['theirs']} of {result['steps']}."]
    load = result["expert_load"]
    floor = (f"; ours vs ours + 1 ulp: {load['floor_max_abs_diff']:.2e}"
             if "floor_max_abs_diff" in load else "")
    lines += ["", f"Expert load at the last step (share of top-k assignments; largest "
              f"difference {load['max_abs_diff']:.2e}{floor}):", "",
              "| layer | ours | theirs |", "|---|---|---|"]
    for i, (lo, lt) in enumerate(zip(load["ours"], load["theirs"], strict=True)):
        lines.append(f"| {i} | {' '.join(f'{x:.4f}' for x in lo)} | "
                     f"{' '.join(f'{x:.4f}' for x in lt)} |")
    return "\n".join(lines) + "\n"


def write(output: Path, ours: list[dict], theirs: list[dict], floor: list[dict] | None,
          result: dict, title: str) -> None:
    (output / "parity.json").write_text(json.dumps(
        {**result, "ours": ours, "theirs": theirs, "floor": floor}, indent=1) + "\n")
    (output / "parity.md").write_text(markdown(ours, theirs, result))
    plot(ours, theirs, floor, result, title, output / "parity.png")
