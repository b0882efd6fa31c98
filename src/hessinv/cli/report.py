"""Live progress and the final table of ``hessinv train`` (rich), on stderr/stdout."""

from __future__ import annotations

import math
import os
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from hessinv.cli.data import Dataset
from hessinv.cli.train import (
    RunResult,
    TrainConfig,
    budget_text,
    small_test_split_warning,
    target_heading,
    time_to_target_table,
)

__all__ = ["Reporter"]


def _fmt(x: Any, spec: str = ".4g") -> str:
    return format(x, spec) if isinstance(x, (int, float)) and math.isfinite(x) else str(x)


class Reporter:
    """One progress bar per optimizer (the fraction of its step or time budget used, whichever is
    larger), then the table."""

    def __init__(self, cfg: TrainConfig, ds: Dataset, quiet: bool = False):
        self.cfg, self.ds, self.quiet = cfg, ds, quiet
        wide = None if sys.stdout.isatty() else 160  # a readable table in logs and pipes
        self.console = Console(file=sys.stdout, highlight=False, width=wide)
        self.err = Console(file=sys.stderr, highlight=False)
        self.progress_bar: Progress | None = None
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> Reporter:
        cfg = self.cfg
        warning = small_test_split_warning(self.ds)  # (a few test examples: an accuracy of 0% or 100%)
        if self.quiet:  # (how the data was read is not progress: a row taken as a header, a guessed task)
            for note in self.ds.notes:
                self.err.print(escape(note))
            if warning:
                self.err.print(f"[yellow]{escape(warning)}[/yellow]", soft_wrap=True)  # (one line)
        else:
            bs = "full batch" if cfg.batch_size is None else f"batch {cfg.batch_size}"
            self.err.print(f"[bold]hessinv train[/bold]  {escape(self.ds.describe())}")
            for note in self.ds.notes:  # (a first row skipped as a header, a stratified split)
                self.err.print(escape(note))
            if warning:
                self.err.print(f"[yellow]{escape(warning)}[/yellow]", soft_wrap=True)  # (one line)
            self.err.print(
                f"model: depth {cfg.depth}, width {cfg.width}, {cfg.activation}"
                f"{', residual' if cfg.residual else ''}, "
                f"{cfg.dtype} on {cfg.device}; {bs}; {budget_text(cfg)}"
                + (f"; target train loss {cfg.target_loss:g}" if cfg.target_loss is not None else "")
            )
            self.progress_bar = Progress(
                TextColumn("{task.fields[name]:>13}"),
                BarColumn(bar_width=28),
                TimeElapsedColumn(),
                TextColumn("{task.fields[info]}"),
                console=self.err,
                transient=False,
            )
            self.progress_bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress_bar is not None:
            self.progress_bar.__exit__(*exc)
            self.progress_bar = None

    def run_started(self, name: str, lr: float) -> None:
        if self.progress_bar is None:
            return
        if name in self.tasks:
            self.progress_bar.reset(self.tasks[name], total=1.0)
        else:
            self.tasks[name] = self.progress_bar.add_task("", total=1.0, name=name, info=f"lr {lr:g}")

    def progress(self, name: str, rec: dict[str, Any]) -> None:
        if self.progress_bar is None:
            return
        if "tuning" in rec:
            if name not in self.tasks:
                self.tasks[name] = self.progress_bar.add_task("", total=1.0, name=name, info="")
            self.progress_bar.update(
                self.tasks[name], info=f"tuning: lr {rec['tuning']:g} -> train loss {_fmt(rec['train_loss'])}"
            )
            return
        if name not in self.tasks:
            return
        steps, budget = self.cfg.steps_for(name), self.cfg.budget
        done = max(rec["step"] / steps if steps else 0.0, rec["time"] / budget if budget else 0.0)
        of = f"/{steps}" if steps else ""
        info = f"step {rec['step']:>6}{of}  train {_fmt(rec.get('train_loss'))}"
        info += f"  test {_fmt(rec.get('test_loss'))}"
        if math.isfinite(rec.get("test_acc", math.nan)):
            info += f"  acc {100 * rec['test_acc']:.1f}%"
        self.progress_bar.update(self.tasks[name], completed=done, info=info)

    def finish(self, results: list[RunResult], summary: dict[str, Any]) -> None:
        cfg = self.cfg
        head, rows = time_to_target_table(results, cfg.target_loss, self.ds.task)
        table = Table(title=target_heading(cfg.target_loss, "training time, evaluation excluded"))
        for h in head:
            table.add_column(h, justify="left" if h in ("optimizer", "status") else "right")
        for r in rows:
            style = None if r[2] == "ok" else "red"
            table.add_row(*(escape(str(c)) for c in r), style=style)
        self.console.print(table)
        for r in results:
            if r.status != "ok":
                from hessinv.cli import _as_options

                why = escape(_as_options(str(r.message)))
                self.err.print(f"[red]{escape(r.name)}: {escape(r.status)}[/red]: {why}")
            if r.tuning:
                grid = ", ".join(f"{k}: {_fmt(v, '.3g')}" for k, v in r.tuning.items())
                self.console.print(f"{r.name}: lr {r.lr:g} chosen from the grid (final train loss) {grid}")
        load, cpus = summary.get("load_average_at_end"), os.cpu_count() or 1
        if load and load[1] > cpus:
            threads = summary.get("threads", 1)
            more = (
                " (the multi-threaded curvature sweeps more than the first-order steps)"
                if threads > 1
                else ""
            )
            self.err.print(
                f"[yellow]note[/yellow]: the load average was {load[1]:.1f} on {cpus} CPUs: other "
                f"processes slowed these timings down{more}"
            )
        plotted = "plot_error" not in summary
        self.console.print(
            f"logs, summary.json, table.md{' and loss.png' if plotted else ''} in {escape(str(cfg.out))}"
        )
        if not plotted:
            self.err.print(f"[red]the plot could not be drawn[/red]: {escape(str(summary['plot_error']))}")
