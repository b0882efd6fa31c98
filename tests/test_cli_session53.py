"""A CLI probe's findings in ``hessinv train`` (fifty-third session): the losses of a standardized regression
said in table.md and on the plot's axis, with the data notes; a partial failure's exit status; the plot's
legend saying an approximate target crossing as the table does; a tiny test split warned about; every
missing optional package named at once; the tuning's time cap recorded as used."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

import hessinv.cli.train as T
from hessinv.cli import main

SMALL = ["--depth", "2", "--width", "4", "--no-tune"]


def _run(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["train", *args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures ``hessinv train`` saves (their axes and legends to read)."""
    from matplotlib.figure import Figure

    saved: list = []
    savefig = Figure.savefig

    def keep(self, *args, **kwargs):
        saved.append(self)
        return savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return saved


def _legend_texts(fig) -> list[str]:
    return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


# -- 1. what the losses of a standardized regression are, and the data notes, in table.md and the plot -------
def test_standardized_regression_losses_are_said_in_the_table_and_on_the_axis(tmp_path, capsys, figures):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 3))
    y = 1000.0 + 50.0 * X[:, 0] + rng.normal(size=60)  # (far from standardized units)
    data = tmp_path / "house.csv"
    rows = "\n".join(",".join(f"{v:.6f}" for v in (*x, t)) for x, t in zip(X, y, strict=True))
    data.write_text("a,b,c,price\n" + rows + "\n")
    out = tmp_path / "o"
    rc, _, err = _run(
        capsys, "--data", str(data), "--optimizers", "adam", "--steps", "5", "--out", str(out), *SMALL
    )
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    (mean,), (std,) = summary["dataset"]["target_mean"], summary["dataset"]["target_std"]
    assert abs(mean - y[: summary["dataset"]["train"]].mean()) < 50 and std > 10  # (real statistics)
    md = (out / "table.md").read_text()
    head = md.split("| optimizer")[0]  # (the text above the table)
    assert "standardized" in head and "mean squared error" in head, head
    assert f"{mean:.4g} +- {std:.4g}" in head, head  # the mean and spread the losses are scaled by
    assert f"{std * std:.4g}" in head, head  # and the factor back to the target's units
    notes = summary["data_notes"]
    assert notes and any("header" in n for n in notes)  # (the header line was skipped)
    for note in notes:  # the terminal header's notes, in table.md too
        assert note in head and note in err
    # the plot's loss axes say the same
    (fig,) = figures
    labels = {ax.get_ylabel() for ax in fig.axes[:2]}
    assert len(labels) == 1 and "standardized" in labels.pop()


def test_classification_losses_are_said_as_cross_entropy(tmp_path, capsys, figures):
    out = tmp_path / "o"
    rc, _, err = _run(capsys, "--data", "digits", "--samples", "200", "--optimizers", "adam", "--steps", "3",
                      "--out", str(out), *SMALL)  # fmt: skip
    assert rc == 0, err
    head = (out / "table.md").read_text().split("| optimizer")[0]
    assert "cross-entropy" in head and "standardized" not in head
    assert "cross-entropy" in figures[0].axes[0].get_ylabel()


# -- 2. some optimizers failed, others finished: a nonzero exit status and a line naming them ----------------
def test_partial_failure_exits_3_naming_the_failed(tmp_path, capsys, monkeypatch):
    from hessinv.cli import baselines

    def boom(self, inputs, targets):
        raise RuntimeError("boom")

    monkeypatch.setattr(baselines.HessianFree, "step", boom)
    out = tmp_path / "o"
    rc, _, err = _run(capsys, "--data", "regression", "--samples", "200", "--optimizers",
                      "adam,hessian-free,sgd", "--lr", "sgd=1e30", "--steps", "20", "--out", str(out),
                      *SMALL)  # fmt: skip
    runs = json.loads((out / "summary.json").read_text())["runs"]
    assert runs["adam"]["status"] == "ok" and runs["hessian-free"]["status"] == "failed"
    assert runs["sgd"]["status"] == "diverged"
    assert rc == 3
    lines = [ln for ln in err.splitlines() if ln.startswith("hessinv:") and "failed with an error" in ln]
    assert len(lines) == 1 and "hessian-free" in lines[0], err
    assert "adam" not in lines[0] and "sgd" not in lines[0]  # (a divergence is a training outcome)


def test_all_ok_still_exits_0_and_all_failed_still_1(tmp_path, capsys):
    rc, _, err = _run(capsys, "--data", "regression", "--samples", "200", "--optimizers", "adam,sgd",
                      "--steps", "5", "--out", str(tmp_path / "a"), *SMALL)  # fmt: skip
    assert rc == 0 and "failed with an error" not in err
    rc, _, err = _run(capsys, "--data", "regression", "--samples", "200", "--optimizers", "sgd",
                      "--lr", "sgd=1e30", "--steps", "20", "--out", str(tmp_path / "b"), *SMALL)  # fmt: skip
    assert rc == 1 and "diverged" in err


# -- 3. the legend says an approximate target crossing as the table does -------------------------------------
def test_legend_says_a_coarse_target_crossing_as_the_table(tmp_path, figures):
    from hessinv.cli.plots import plot_runs

    hist = [{"step": s, "time": 0.006 * s, "train_loss": 2.0 / (1 + s), "test_loss": 2.2 / (1 + s)}
            for s in (0, 50, 100, 162, 175, 200)]  # fmt: skip
    exact = T.RunResult("adam", 1e-3, history=[dict(h) for h in hist])
    coarse = T.RunResult("sgd", 0.1, history=[dict(h) for h in hist])
    exact.time_to_target, exact.steps_to_target, exact.target_resolution = 0.97, 160, 1
    coarse.time_to_target, coarse.steps_to_target, coarse.target_resolution = 1.0234, 175, 13
    plot_runs([exact, coarse], tmp_path / "loss.png", target=0.0115)
    _, rows = T.time_to_target_table([exact, coarse], 0.0115, "regression")
    legend = _legend_texts(figures[0])
    for r, row in zip((exact, coarse), rows, strict=True):
        (label,) = [t for t in legend if t.startswith(r.name + " ")]
        when, steps = row[3], row[4]  # the table's time and steps to the target
        assert f"target at {when} s" in label and label.endswith(f" {steps}"), (label, row)
    assert rows[1][3].startswith("≤") and rows[1][4] == "163-175"  # (the coarse one is a range)


# -- 4. a test split of few examples is warned about, in the terminal and table.md ---------------------------
@pytest.mark.parametrize("fraction", ["0.001", "0.2"])
def test_a_tiny_test_split_is_warned_about(tmp_path, capsys, fraction):
    out = tmp_path / "o"
    rc, _, err = _run(capsys, "--data", "digits", "--samples", "150", "--test-fraction", fraction,
                      "--optimizers", "adam", "--steps", "3", "--out", str(out), *SMALL)  # fmt: skip
    assert rc == 0, err
    n_test = json.loads((out / "summary.json").read_text())["dataset"]["test"]
    warned = [ln for ln in err.splitlines() if "test split has" in ln]
    md = (out / "table.md").read_text()
    if n_test < T.MIN_TEST_EXAMPLES:
        assert len(warned) == 1 and f" {n_test} example" in warned[0], err
        assert warned[0].strip() in md
    else:
        assert not warned and "test split has" not in md


# -- 5. every missing optional package named in one message, with one pip command ----------------------------
def test_every_missing_package_is_named_at_once(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(T, "peer_available", lambda name: False)
    rc, _, err = _run(capsys, "--data", "regression", "--optimizers", "adam,soap,psgd,adahessian,sophiah",
                      "--steps", "2", "--out", str(tmp_path / "o"), *SMALL)  # fmt: skip
    assert rc == 2
    errors = [ln for ln in err.splitlines() if ln.startswith("hessinv: error:")]
    assert len(errors) == 1, err
    packages = {spec.package for spec in T.PEERS.values()}
    assert len(packages) >= 2 and all(p in errors[0] for p in packages), errors[0]
    for name in T.PEERS:
        assert re.search(rf"\b{name}\b", errors[0]), name
    m = re.search(r"pip install ([\w -]+)$", errors[0])
    assert m and set(m.group(1).split()) == packages, errors[0]  # one command installing all of them


# -- 6. summary.json records the tuning's time cap used ------------------------------------------------------
@pytest.mark.parametrize("budget", ["2s", "none"])
def test_summary_records_the_derived_tune_budget(tmp_path, capsys, budget):
    out = tmp_path / "o"
    rc, _, err = _run(capsys, "--data", "regression", "--samples", "200", "--optimizers", "adam",
                      "--steps", "10", "--budget", budget, "--depth", "2", "--width", "4",
                      "--out", str(out))  # fmt: skip
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runs"]["adam"]["tuning"]  # (adam's lr was tuned)
    used = summary["config"]["tune_budget_s"]
    cfg = T.TrainConfig(budget=summary["config"]["budget_s"])
    assert used is not None and math.isclose(used, T.tune_budget(cfg))
    if summary["config"]["budget_s"] is not None:
        assert math.isclose(used, summary["config"]["budget_s"] / 10)


def test_tune_budget_given_is_recorded_as_given(tmp_path, capsys):
    out = tmp_path / "o"
    rc, *_ = _run(capsys, "--data", "regression", "--samples", "200", "--optimizers", "adam", "--steps", "10",
                  "--tune-budget", "0.7s", "--depth", "2", "--width", "4", "--out", str(out))  # fmt: skip
    assert rc == 0
    assert json.loads((out / "summary.json").read_text())["config"]["tune_budget_s"] == 0.7
