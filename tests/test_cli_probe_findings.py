"""What a new user's probe of the command line found (data files, the time to target, options accepted
and ignored, the summary), each against what the run should have done."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import hessinv.cli.train as train_mod
from hessinv.cli import _parse_steps, main
from hessinv.cli.data import DataError, load_dataset
from hessinv.cli.models import build_model
from hessinv.cli.train import TrainConfig, loss_for, run_one, train_loss


def _csv(tmp_path, text: str, name: str = "d.csv"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _rows(n: int, label) -> str:
    rng = np.random.default_rng(0)
    return "".join(f"{rng.normal():.3f},{rng.normal():.3f},{label(i)}\n" for i in range(n))


def test_a_repeated_header_name_is_not_taken_for_the_label(tmp_path):
    """``a,a,y,y`` with ``--target-column y``: the first ``y`` (a feature) was the regression target and
    the real class column went in as a feature, silently."""
    rng = np.random.default_rng(0)
    body = "".join(f"{rng.normal():.3f},{rng.normal():.3f},{rng.normal():.3f},{i % 2}\n" for i in range(40))
    path = _csv(tmp_path, "a,a,y,y\n" + body)
    with pytest.raises(DataError, match=r"names 2 columns 'y' \(columns 3, 4\)"):
        load_dataset(path, target="y")
    assert load_dataset(path, target="4").task == "classification"  # (its number still picks it)


@pytest.mark.parametrize("marker", ["?", "NA", "n/a", "null", "missing"])
def test_a_missing_label_is_not_a_class_of_its_own(tmp_path, marker):
    """Labels yes/no with a '?' (or 'NA') on one line made three classes, that row trained and tested on
    as one; an error naming the line now, as a missing feature gets."""
    path = _csv(tmp_path, _rows(40, lambda i: marker if i == 6 else ("yes" if i % 2 else "no")))
    with pytest.raises(DataError, match=rf"line 7: the label is '{re.escape(marker)}', a missing value"):
        load_dataset(path)
    numeric = _csv(tmp_path, _rows(40, lambda i: marker if i == 6 else i % 2), "n.csv")
    with pytest.raises(DataError, match="a missing value"):  # (was: 'mixes class names and numbers')
        load_dataset(numeric)


def test_the_step_that_reaches_the_target_is_the_one_reported(tmp_path, monkeypatch):
    """Steps and time to the target were those of the next evaluation after the crossing (every 125 steps
    of a 15,000-step run; a run checked at every step said 84 where the table said 91). The training
    loss is now checked after every step until the target is met, where that is cheap: the step the
    reference loop (the same run, evaluated at every step) finds, and ``target_resolution`` 1."""
    monkeypatch.setattr(train_mod, "CHECK_COST", 1e9)  # (checks at every step whatever the timings)
    ds = load_dataset("digits", seed=0, n_samples=300)
    loss_fn = loss_for(ds)
    init = build_model(ds.input_dim, ds.output_dim, 3, 8, "tanh", seed=0)
    cfg = TrainConfig(optimizers=["adam"], depth=3, width=8, batch_size=32, target_loss=1.5, out=tmp_path)
    r = run_one("adam", 3e-3, ds, init, loss_fn, cfg, None, 400, None)
    ref_cfg = TrainConfig(**{**cfg.__dict__, "eval_points": 400, "target_loss": 1.5})
    ref = run_one("adam", 3e-3, ds, init, loss_fn, ref_cfg, None, 400, None)  # (every step evaluated)
    losses = [h["train_loss"] for h in ref.history]
    assert ref.history[r.steps_to_target]["step"] == r.steps_to_target  # (evaluated at every step)
    first = next(h["step"] for h in ref.history if h["train_loss"] <= 1.5)
    assert r.steps_to_target == first and r.target_resolution == 1 and len(losses) == 401
    # where a check costs too much the evaluations decide, and the table says how finely
    cfg.__dict__["eval_points"] = 10
    monkeypatch.setattr(train_mod, "CHECK_COST", 0.0)
    coarse = run_one("adam", 3e-3, ds, init, loss_fn, cfg, None, 400, None)
    assert coarse.steps_to_target >= first and coarse.target_resolution > 1
    row = train_mod.time_to_target_table([coarse], 1.5, ds.task)[1][0]
    assert row[3].startswith("≤ ") and "-" in row[4]
    assert train_loss(init, loss_fn, ds) > 1.5  # (the target is not met at the start)


def test_options_that_did_nothing_are_refused_or_described(tmp_path, capsys):
    """``--residual`` with ``--depth`` 1 or 2 built no block while the table and summary said residual;
    ``--depth 1`` is one Linear layer, titled 'width 500 tanh MLP'; ``--steps adam=5 --steps 7`` dropped
    adam's 5."""
    common = ["train", "--data", "digits", "--samples", "200", "--no-tune", "--quiet", "--optimizers", "adam"]
    assert main([*common, "--depth", "2", "--residual", "--steps", "2", "--out", str(tmp_path / "r")]) == 2
    assert "--residual needs --depth 3" in capsys.readouterr().err
    assert (
        main([*common, "--depth", "1", "--width", "500", "--steps", "2", "--out", str(tmp_path / "d")]) == 0
    )
    assert "a linear model" in (tmp_path / "d" / "table.md").read_text().splitlines()[0]
    assert _parse_steps(["adam=5", "7"], ["adam", "sgd"]) == {"adam": 5, "sgd": 7}
    assert _parse_steps(["7", "adam=5"], ["adam", "sgd"]) == {"adam": 5, "sgd": 7}
    # comma-separated, as the help says (a count and NAME=N in one list were refused: "expects NAME=N")
    assert _parse_steps(["7,adam=5"], ["adam", "sgd"]) == {"adam": 5, "sgd": 7}
    assert _parse_steps(["adam=5,none"], ["adam", "sgd"]) == {"adam": 5, "sgd": None}
    assert _parse_steps(["adam=5,,sgd=7,"], ["adam", "sgd"]) == {"adam": 5, "sgd": 7}


def test_the_summary_says_how_the_run_was_made(tmp_path, capsys):
    """``summary.json`` lacked the command line, what reading the data decided (a header skipped, a
    stratified split), the chance level and a standardized target's mean and scale."""
    path = _csv(tmp_path, "x1,x2,price\n" + _rows(60, lambda i: f"{1000.0 + 37.5 * i:.1f}"))
    out = tmp_path / "o"
    args = ["train", "--data", path, "--depth", "3", "--width", "4", "--steps", "2", "--no-tune", "--quiet",
            "--optimizers", "adam", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["command"] == ["hessinv", *args]
    assert any("header" in note for note in summary["data_notes"])
    assert summary["dataset"]["task"] == "regression" and summary["dataset"]["target_mean"][0] > 1000


def test_an_interrupted_runs_last_row_is_at_the_step_it_stopped(tmp_path, interrupt_at):
    """The table row of a run stopped by Ctrl-C said 4155 steps with the losses of step 3781, its last
    evaluation, unmarked: the run is evaluated once more where it stopped."""
    interrupt_at(300)
    ds = load_dataset("digits", seed=0, n_samples=300)
    init = build_model(ds.input_dim, ds.output_dim, 3, 8, "tanh", seed=0)
    cfg = TrainConfig(optimizers=["adam"], depth=3, width=8, batch_size=32, out=tmp_path)
    log = tmp_path / "adam.jsonl"
    r = run_one("adam", 3e-3, ds, init, loss_for(ds), cfg, None, 1000, log)
    assert r.status == "interrupted" and r.steps == 299 and r.final["step"] == 299
    # that row is in the log too, and the run's time is that of its last step done (a CLI probe: the
    # summary's final losses were in no log line, its time counted the step the interrupt cut short)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert rows[-1]["step"] == 299 and rows[-1]["train_loss"] == r.final["train_loss"]
    assert r.train_time == rows[-1]["time"]
    assert [x["step"] for x in rows] == list(range(300)) and "batch_loss" in rows[-1]  # (one row a step)


def test_a_failed_runs_last_row_is_its_last_steps_row(tmp_path, monkeypatch):
    """A step that raises ends the run: its last completed step is evaluated into that step's log row --
    the evaluation had been a second row for the same step, timed with the failed step's time in it (a
    review)."""
    from hessinv.cli import baselines

    real_step, calls = baselines.FirstOrder.step, {"n": 0}

    def step(self, inputs, targets):
        calls["n"] += 1
        if calls["n"] == 40:
            raise RuntimeError("boom")
        return real_step(self, inputs, targets)

    monkeypatch.setattr(baselines.FirstOrder, "step", step)
    ds = load_dataset("digits", seed=0, n_samples=300)
    init = build_model(ds.input_dim, ds.output_dim, 3, 8, "tanh", seed=0)
    cfg = TrainConfig(optimizers=["adam"], depth=3, width=8, batch_size=32, out=tmp_path)
    log = tmp_path / "adam.jsonl"
    r = run_one("adam", 3e-3, ds, init, loss_for(ds), cfg, None, 1000, log)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert r.status == "failed" and r.steps == 39 and r.final["step"] == 39
    assert [x["step"] for x in rows] == list(range(40))
    assert rows[-1]["train_loss"] == r.final["train_loss"] and r.train_time == rows[-1]["time"]


def test_a_guess_of_the_task_that_may_be_wrong_is_said(tmp_path):
    """Whole-number prices (72 values) became 72 classes at 0% accuracy, 150 species ids a regression,
    one-hot labels two regression targets -- by the documented rule, with no word in the run's header."""
    prices = _csv(tmp_path, _rows(80, lambda i: 1000 * (i % 72)))
    assert any("--task regression if they are quantities" in n for n in load_dataset(prices).notes)
    ids = _csv(tmp_path, _rows(400, lambda i: i % 150), "ids.csv")
    assert any("--task classification if they are classes" in n for n in load_dataset(ids).notes)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "h.npz", X=rng.normal(size=(40, 3)), y=np.eye(2)[np.arange(40) % 2])
    assert any("one-hot" in n for n in load_dataset(str(tmp_path / "h.npz")).notes)
    assert not load_dataset("digits", seed=0, n_samples=300).notes  # (ten classes: nothing to say)
    # floats of 2^53 and more are no class ids (the task rule): nothing to say either (a probe's 1e40)
    np.savez(tmp_path / "big.npz", X=rng.normal(size=(150, 3)), y=1e40 * np.arange(150.0))
    assert not any("task" in n for n in load_dataset(str(tmp_path / "big.npz")).notes)


def test_a_second_job_into_one_folder_says_it_replaces_the_first(tmp_path, capsys):
    """A second run into the same ``--out`` replaced the summary and deleted the first run's logs
    without a word; and ``--data digits --task regression`` took digits' cross-entropy target (1.0) for
    its MSE."""
    common = ["train", "--data", "digits", "--samples", "200", "--depth", "3", "--width", "4", "--steps", "2",
              "--no-tune", "--quiet", "--out", str(tmp_path)]  # fmt: skip
    assert main([*common, "--optimizers", "adam,sgd"]) == 0
    assert "earlier job" not in capsys.readouterr().err
    assert main([*common, "--optimizers", "adam", "--task", "regression"]) == 0
    assert "holds an earlier job's results (adam, sgd)" in capsys.readouterr().err
    assert json.loads((tmp_path / "summary.json").read_text())["config"]["target_loss"] is None


def test_a_missing_value_marker_as_common_as_a_class_is_a_class(tmp_path):
    """'NA' for North America in a third of the rows was refused as a missing label (a second probe's
    find): a marker that common is read as a class, and the run's header says so."""
    path = _csv(tmp_path, "a,b,region\n" + _rows(60, lambda i: ["NA", "EU", "APAC"][i % 3]))
    ds = load_dataset(path)
    assert ds.n_classes == 3 and any("'NA' (20 rows) read as a class" in n for n in ds.notes)


def test_the_spectrum_command_says_what_it_read_and_what_fell_outside(tmp_path, capsys):
    """``hessinv spectrum`` on a file said nothing of the data (a header skipped, a task guessed -- 72
    integer 'classes' ran silently) and, with a narrow ``--range``, not that 25 of 30 eigenvalues fell
    outside it (only the JSON and the plot's title did)."""
    path = _csv(tmp_path, "a,b,price\n" + _rows(80, lambda i: 1000 * (i % 24)))
    out = tmp_path / "s"
    args = ["spectrum", "--data", path, "--depth", "2", "--width", "3", "--bins", "4", "--batch", "16",
            "--range=-1e-9,1e-9", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr()
    assert "hessinv: note: header: line 1" in printed.err and "--task regression" in printed.err
    assert "eigenvalues below the range" in printed.out
    rec = json.loads((out / "spectrum.json").read_text())
    assert rec["below"] + rec["above"] > 0 and any("header" in n for n in rec["data_notes"])


def test_a_skipped_first_row_of_numbers_says_how_to_keep_it(tmp_path):
    """A file without a header whose first row is the only example of its class is read as a header (a
    label in no other row), as a row of wavelengths above spectra must be (``908.1,914.5,920.9,species``:
    taken as data, it made a class 'species' of one example, a review): the note says how to keep the
    row where the skipped row's features are all numbers (an example dropped with only the header note,
    a probe)."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 3))
    labels = ["zebra"] + ["cat" if v > 0 else "dog" for v in X[1:, 0]]
    body = "".join(",".join(f"{v:.4f}" for v in x) + f",{lab}\n" for x, lab in zip(X, labels, strict=True))
    p = tmp_path / "rare.csv"
    p.write_text(body)
    ds = load_dataset(str(p), seed=0)
    assert len(ds.X_train) + len(ds.X_test) == 39 and ds.output_dim == 2
    assert any("if it is an example, not a header, put a header line above it" in n for n in ds.notes)
    q = tmp_path / "spectra.csv"
    q.write_text("908.1,914.5,920.9,species\n" + body.split("\n", 1)[1])
    ds = load_dataset(str(q), seed=0)
    assert len(ds.X_train) + len(ds.X_test) == 39 and ds.output_dim == 2
    r = tmp_path / "named.csv"
    r.write_text("a,b,c,species\n" + body.split("\n", 1)[1])
    ds = load_dataset(str(r), seed=0)
    assert not any("if it is an example" in n for n in ds.notes)


def test_a_header_below_comment_lines_is_skipped(tmp_path):
    """``#`` comment lines above a header line: the header was read as data, and the error blamed its
    'a' as "not a number" (a probe). A first row naming its features is a header there too; a '#' line
    above numbers is still numpy.savetxt's header."""
    rows = "0.1,0.2,0\n0.3,0.1,1\n0.5,0.7,0\n0.2,0.9,1\n0.4,0.4,0\n0.8,0.3,1\n"
    p = tmp_path / "c.csv"
    p.write_text("# exported by my tool\n# 2026-12-07\na,b,label\n" + rows)
    ds = load_dataset(str(p), seed=0)
    assert len(ds.X_train) + len(ds.X_test) == 6 and ds.input_dim == 2
    assert any(n.startswith("header: line 3") for n in ds.notes)
    ds = load_dataset(str(p), seed=0, target="label")  # (named: from the header line, not a comment)
    assert len(ds.X_train) + len(ds.X_test) == 6 and ds.input_dim == 2
    q = tmp_path / "s.csv"
    q.write_text("# a,b,label\n" + rows)
    ds = load_dataset(str(q), seed=0)
    assert len(ds.X_train) + len(ds.X_test) == 6 and not any(n.startswith("header") for n in ds.notes)
