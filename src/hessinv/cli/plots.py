"""The ``loss.png`` figure of ``hessinv train``: train (solid) and test (dashed) loss of every
optimizer, against steps (left, log axis) and against training wall-clock time (right).

Drawn with matplotlib's object API on an Agg canvas (no pyplot, no display needed).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from hessinv.cli.train import RunResult

__all__ = ["plot_runs"]

COLORS = {
    "newton": "#d62728",
    "gauss-newton": "#ff7f0e",
    "hessian-free": "#9467bd",
    "lbfgs": "#8c564b",
    "adam": "#1f77b4",
    "sgd": "#2ca02c",
}


def plot_runs(
    results: list[RunResult], path: str | Path, title: str = "", target: float | None = None
) -> Path:
    """Write the two-panel loss figure to ``path`` (PNG) and return the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    ax_s, ax_t = fig.subplots(1, 2)
    positive = True
    starts = [
        r.history[0][k]
        for r in results
        if r.history
        for k in ("train_loss", "test_loss")
        if k in r.history[0]
    ]
    starts = [v for v in starts if math.isfinite(v)]
    ceiling = 3 * max(starts) if starts else math.inf  # diverging runs leave the plot at the top
    lows: list[float] = []
    for r in results:
        h = [e for e in r.history if "train_loss" in e]
        if not h:
            continue
        color = COLORS.get(r.name)
        label = f"{r.name} (lr {r.lr:g})" + ("" if r.status == "ok" else f" [{r.status}]")
        steps = [e["step"] + 1 for e in h]
        times = [e["time"] for e in h]
        for key, ls, lab in (("train_loss", "-", label), ("test_loss", "--", None)):
            ys = [e[key] if math.isfinite(e[key]) else math.nan for e in h]
            positive = positive and all(y > 0 for y in ys if math.isfinite(y))
            lows += [y for y in ys if math.isfinite(y)]
            ax_s.plot(steps, ys, ls, color=color, label=lab, lw=1.6 if ls == "-" else 1.1)
            ax_t.plot(times, ys, ls, color=color, label=lab, lw=1.6 if ls == "-" else 1.1)
        if r.status != "ok":
            ys = [e["train_loss"] for e in h if math.isfinite(e["train_loss"])]
            if ys:
                y_end = min(ys[-1], ceiling)
                ax_s.plot(steps[len(ys) - 1], y_end, "x", color=color, ms=9, mew=2, clip_on=False)
                ax_t.plot(times[len(ys) - 1], y_end, "x", color=color, ms=9, mew=2, clip_on=False)
        if r.time_to_target is not None:
            ax_t.axvline(r.time_to_target, color=color, lw=0.8, ls=":")
    for ax, xl in ((ax_s, "step + 1"), (ax_t, "training wall-clock time (s)")):
        if target is not None:
            ax.axhline(
                target, color="0.4", lw=0.9, ls=":", label=f"target {target:g}" if ax is ax_s else None
            )
        if positive:
            ax.set_yscale("log")
        if lows and math.isfinite(ceiling):
            lo = min(lows + ([target] if target is not None else []))
            hi = min(ceiling, max(lows))
            ax.set_ylim(
                0.7 * lo if positive else lo - 0.05 * abs(lo), 1.15 * hi if positive else hi + 0.05 * abs(hi)
            )
        ax.set_xlabel(xl)
        ax.set_ylabel("loss (solid: train, dashed: test)")
        ax.grid(True, which="major", alpha=0.3)
    ax_s.set_xscale("log")
    ax_s.set_title("loss vs steps")
    ax_t.set_title("loss vs time")
    ax_s.legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path
