"""The ``loss.png`` figure of ``hessinv train``.

Top row: train (solid) and test (dashed) loss of every optimizer against steps (log axis) and
against training wall-clock time. Bottom row (classification): test accuracy against steps and
time, with the chance level (always predicting the test split's most frequent class) marked. The target
loss, the time each optimizer reached it and runs that stopped early (x) are in the legend.

Drawn with matplotlib's object API on an Agg canvas (no pyplot, no display needed).
"""

from __future__ import annotations

import math
from pathlib import Path

from hessinv.cli.train import RunResult, target_cells  # (a real import: typing.get_type_hints(plot_runs))

__all__ = ["plot_runs"]

COLORS = {
    "newton": "#d62728",
    "gauss-newton": "#ff7f0e",
    "hessian-free": "#9467bd",
    "lbfgs": "#8c564b",
    "adam": "#1f77b4",
    "sgd": "#2ca02c",
    "newton-tr": "#e377c2",
    "soap": "#17becf",
    "psgd": "#bcbd22",
    "adahessian": "#7f7f7f",
    "sophiah": "#393b79",
}
#: for names without a colour of their own (``NAME=`` variants), in order: none of COLORS'
_SPARE = ("#8c6d31", "#843c39", "#637939", "#7b4173", "#3182bd", "#e6550d", "#31a354", "#756bb1")


def _colors(names: list[str]) -> dict[str, str]:
    """A distinct colour per run: its own from :data:`COLORS`, else the next spare one (then cycling)."""
    out, spare = {}, 0
    for name in names:
        if name in COLORS:
            out[name] = COLORS[name]
        elif name not in out:
            out[name] = _SPARE[spare % len(_SPARE)]
            spare += 1
    return out


def _loss_axis(ax, lo: float, hi: float, positive: bool) -> None:
    """Log scale with plain-number ticks when the losses span a decade or more (1, 2, 5 per decade over
    less than 3 decades, else powers of 10, every few decades when they are many: matplotlib's
    LogLocator places no tick at all when it must skip decades with several ``subs``), else a linear
    scale: a log axis over 0.4-2.5 has no labelled tick."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    if positive and hi / lo >= 10:
        ax.set_yscale("log")
        subs = (1.0, 2.0, 5.0) if hi / lo < 1e3 else (1.0,)
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(0.8 * lo, 1.25 * hi)
    else:
        pad = 0.05 * (hi - lo if hi > lo else abs(hi) or 1.0)
        ax.set_ylim(lo - pad, hi + pad)


def _log_steps(ax) -> None:
    """A log step axis; where nothing finite was drawn (every value NaN) its limits are set, since a
    log axis cannot autoscale an empty data range."""
    ax.set_xscale("log")
    if not (math.isfinite(ax.dataLim.x0) and ax.dataLim.x0 > 0):
        ax.set_xlim(1, 10)


def plot_runs(
    results: list[RunResult],
    path: str | Path,
    title: str = "",
    target: float | None = None,
    chance: float | None = None,
    loss_label: str = "loss",
) -> Path:
    """Write the loss (and accuracy) figure to ``path`` (PNG) and return the path.

    ``chance``: the chance-level test accuracy to mark on the accuracy panels (None: no accuracy
    panels unless the runs have ``test_acc``, and no chance line). ``loss_label``: the loss axes' label
    (what the loss is: ``hessinv.cli.train.loss_label``, e.g. the MSE of standardized targets).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import PercentFormatter

    has_acc = any("test_acc" in e for r in results for e in r.history)
    rows = 2 if has_acc else 1
    fig = Figure(figsize=(14, 4.4 * rows + 0.4), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 2, squeeze=False)
    ax_s, ax_t = axes[0]
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
    positive = True
    handles: list = []
    reached_any = False
    colors = _colors([r.name for r in results])
    for r in results:
        h = [e for e in r.history if "train_loss" in e]
        if not h:
            continue
        color = colors[r.name]
        label = f"{r.name} (lr {r.lr:g})" + ("" if r.status == "ok" else f" [{r.status}]")
        if r.time_to_target is not None:  # (as the table says it: a range where checked at evaluations)
            when, at = target_cells(r)
            label += f", target at {when} s / step{'s' if '-' in at else ''} {at}"
        steps = [e["step"] + 1 for e in h]
        times = [e["time"] for e in h]
        for key, ls in (("train_loss", "-"), ("test_loss", "--")):
            ys = [min(e[key], ceiling) if math.isfinite(e[key]) else math.nan for e in h if key in e]
            if len(ys) != len(h):
                continue
            positive = positive and all(y > 0 for y in ys if math.isfinite(y))
            lows += [y for y in ys if math.isfinite(y)]
            lw = 1.6 if ls == "-" else 1.1
            ax_s.plot(steps, ys, ls, color=color, lw=lw)
            ax_t.plot(times, ys, ls, color=color, lw=lw)
        handles.append(Line2D([], [], color=color, lw=1.6, label=label))
        if r.status != "ok":
            ys = [e["train_loss"] for e in h if math.isfinite(e["train_loss"])]
            if ys:
                y_end = min(ys[-1], ceiling)
                ax_s.plot(steps[len(ys) - 1], y_end, "x", color=color, ms=9, mew=2, clip_on=False)
                ax_t.plot(times[len(ys) - 1], y_end, "x", color=color, ms=9, mew=2, clip_on=False)
        if r.time_to_target is not None:
            reached_any = True
            ax_t.axvline(r.time_to_target, color=color, lw=0.9, ls=":")
            if r.steps_to_target is not None:
                ax_s.axvline(r.steps_to_target + 1, color=color, lw=0.9, ls=":")
        if has_acc:
            ax_as, ax_at = axes[1]
            acc = [(e["step"] + 1, e["time"], e["test_acc"]) for e in h if "test_acc" in e]
            if acc:
                s_, t_, a_ = zip(*acc, strict=True)
                ax_as.plot(s_, a_, "-", color=color, lw=1.6)
                ax_at.plot(t_, a_, "-", color=color, lw=1.6)
    handles += [
        Line2D([], [], color="0.3", lw=1.6, ls="-", label="train loss"),
        Line2D([], [], color="0.3", lw=1.1, ls="--", label="test loss"),
    ]
    if any(r.status != "ok" for r in results):
        handles.append(
            Line2D([], [], color="0.3", ls="", marker="x", mew=2, label="stopped (diverged/failed)")
        )
    if target is not None:
        handles.append(Line2D([], [], color="0.2", lw=1.2, ls="-.", label=f"target train loss {target:g}"))
    if reached_any:
        handles.append(Line2D([], [], color="0.3", lw=0.9, ls=":", label="reached the target (step / time)"))
    lo = min(lows + ([target] if target is not None else [])) if lows else 1.0
    hi = max(lows) if lows else 1.0
    for ax, xl in ((ax_s, "step + 1"), (ax_t, "training wall-clock time (s)")):
        if target is not None:
            ax.axhline(target, color="0.2", lw=1.2, ls="-.")
        _loss_axis(ax, lo, hi, positive)
        ax.set_xlabel(xl)
        ax.set_ylabel(loss_label)
        ax.grid(True, which="major", alpha=0.3)
    _log_steps(ax_s)
    ax_s.set_title("loss vs steps")
    ax_t.set_title("loss vs time")
    fig.legend(handles=handles, fontsize=8, loc="outside right upper")
    if has_acc:
        ax_as, ax_at = axes[1]
        for ax, xl in ((ax_as, "step + 1"), (ax_at, "training wall-clock time (s)")):
            if chance is not None:
                ax.axhline(
                    chance,
                    color="0.4",
                    lw=1.2,
                    ls="--",
                    label=f"chance: most frequent class ({100 * chance:.1f}%)",
                )
                ax.legend(fontsize=8, loc="lower right")
            ax.set_ylim(0, 1)
            ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
            ax.set_xlabel(xl)
            ax.set_ylabel("test accuracy")
            ax.grid(True, which="major", alpha=0.3)
        _log_steps(ax_as)
        ax_as.set_title("test accuracy vs steps")
        ax_at.set_title("test accuracy vs time")
    if title:
        fig.suptitle(title, fontsize=11)
    path = Path(path)
    fig.savefig(path)
    return path
