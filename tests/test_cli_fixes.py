"""Fixes of a probe's CLI findings: pandas' integer header, first-row missing values, loss-axis ticks,
error messages that name the line or the cause, and ``python -m hessinv``."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import hessinv
from hessinv.cli import main
from hessinv.cli.data import DataError, load_dataset, load_file


def _write(path: Path, header: str | None, A: np.ndarray, fmt: str) -> Path:
    with open(path, "w") as f:
        if header is not None:
            f.write(header + "\n")
        np.savetxt(f, A, delimiter=",", fmt=fmt)
    return path


# -- 1. the column-number header pandas writes above integer data ---------------------------------------
@pytest.mark.parametrize("first", [0, 1])
def test_column_number_header_above_integer_data_is_no_example(tmp_path, first):
    """pd.DataFrame(int_array).to_csv(index=False) writes 0,1,...,k above integer rows: it was read as a
    row (digits: 11 classes, one example too many)."""
    rng = np.random.default_rng(0)
    X, y = rng.integers(0, 17, size=(300, 64)), np.arange(300) % 10
    A = np.column_stack([X, y])
    header = ",".join(str(i + first) for i in range(A.shape[1]))
    Xr, yr, _, _ = load_file(_write(tmp_path / "d.csv", header, A, "%d"))
    np.testing.assert_array_equal(Xr, X.astype(np.float64))
    np.testing.assert_array_equal(yr, y.astype(np.float64))
    ds = load_dataset(str(tmp_path / "d.csv"))
    assert ds.n_classes == 10 and len(ds.X_train) + len(ds.X_test) == 300


def test_column_number_header_above_integer_features_and_float_targets(tmp_path):
    rng = np.random.default_rng(0)
    Xi = rng.integers(0, 50, size=(200, 3))
    t = (Xi @ np.array([0.1, 0.2, 0.3]) + 0.01).round(3)
    p = tmp_path / "r.csv"
    rows = [f"{a},{b},{c},{float(v)!r}\n" for (a, b, c), v in zip(Xi, t, strict=True)]
    p.write_text("0,1,2,3\n" + "".join(rows))
    Xr, yr, _, _ = load_file(p)
    np.testing.assert_array_equal(Xr, Xi.astype(np.float64))
    np.testing.assert_array_equal(yr, t)


@pytest.mark.parametrize(
    "text, n",
    [
        # the first row's label is a class of the other rows: a data row
        ("0,1,2\n" + "".join(f"{i % 5},{i % 7},{i % 3}\n" for i in range(40)), 41),
        # the only example of its class, but among 4 rows: plausible data
        ("0,1,2\n5,3,0\n1,4,1\n2,2,0\n7,1,1\n", 5),
        # a counting series
        ("".join(f"{i},{i + 1},{i + 2}\n" for i in range(30)), 30),
    ],
)
def test_a_first_row_of_column_numbers_that_is_data_stays(tmp_path, text, n):
    p = tmp_path / "k.csv"
    p.write_text(text)
    X, y, _, _ = load_file(p)
    rows = np.array([[float(c) for c in line.split(",")] for line in text.splitlines()])
    np.testing.assert_array_equal(np.column_stack([X, y]), rows)
    assert len(y) == n


# -- 3. a missing value in the first row of a header-less file ------------------------------------------
@pytest.mark.parametrize(
    "first, match",
    [
        ("NA,0.25,1", "line 1, column 1: 'NA' is not a number"),
        ("?,0.25,1", "line 1, column 1: '?' is not a number"),
        (",0.25,1", "line 1, column 1 is empty"),
        ("0.5,n/a,1", "line 1, column 2: 'n/a' is not a number"),
        ("0.5,0.25,NA", "line 1: the label is 'NA', a missing value"),  # among numeric labels
    ],
)
def test_a_missing_value_in_the_first_row_is_an_error_naming_line_1(tmp_path, first, match):
    """The first row was taken for a header and silently dropped (39 of 40 rows loaded)."""
    p = tmp_path / "m.csv"
    p.write_text(first + "\n" + "".join(f"{i % 5}.5,{i % 3}.25,{i % 2}\n" for i in range(39)))
    with pytest.raises(DataError, match=re.escape(match)):
        load_dataset(str(p))


def test_a_header_is_still_a_header(tmp_path):
    p = tmp_path / "h.csv"
    p.write_text("x0,x1,y\n" + "".join(f"{i % 5}.5,{i % 3}.25,{i % 2}\n" for i in range(20)))
    X, y, _, _ = load_file(p)
    assert X.shape == (20, 2)
    np.testing.assert_array_equal(y, np.arange(20) % 2)


# -- a later probe's findings: headers that were read as data, a first row dropped, a batch said wrongly --
def _decimal_rows(n: int, k: int, classes: int) -> str:
    rng = np.random.default_rng(1)
    return "".join(
        ",".join(repr(float(v)) for v in rng.normal(size=k)) + f",{i % classes}\n" for i in range(n)
    )


def test_pandas_column_numbers_above_decimals_are_a_header_whatever_its_label(tmp_path):
    """DataFrame.to_csv(index=False) over 5 decimal features and labels 0..7 writes 0,1,2,3,4,5: its
    label 5 is a class, so the header was read as an example of class 5 (241 + 60 examples)."""
    p = tmp_path / "pd.csv"
    p.write_text("0,1,2,3,4,5\n" + _decimal_rows(300, 5, 8))
    X, y, _, _ = load_file(p)
    assert X.shape == (300, 5) and set(y.tolist()) == set(range(8))


def test_a_header_of_years_above_integer_classes_is_no_class(tmp_path):
    """2019,...,2024 above labels 0..2: the header became a fourth class '2024' (or, by the split, an
    error about test classes)."""
    p = tmp_path / "years.csv"
    p.write_text("2019,2020,2021,2022,2023,2024\n" + _decimal_rows(300, 5, 3))
    X, y, _, _ = load_file(p)
    assert X.shape == (300, 5) and set(y.tolist()) == {0.0, 1.0, 2.0}


def test_a_first_row_with_a_missing_feature_and_a_class_name_is_an_error(tmp_path):
    """NA,...,cat on line 1 of a header-less file: the class name made the row a 'header', dropped."""
    p = tmp_path / "na.csv"
    p.write_text(
        "NA,0.25,0.5,cat\n" + "".join(f"{i}.5,0.25,1.5,{'cat' if i % 2 else 'dog'}\n" for i in range(40))
    )
    with pytest.raises(DataError, match=re.escape("line 1, column 1: 'NA' is not a number")):
        load_dataset(str(p))


def test_pandas_index_header_with_a_label_name_is_a_header(tmp_path):
    """DataFrame(X) plus a 'label' column, to_csv() with its index: ',0,1,2,label' (a review: the rule for a
    first row with a missing value read it as a data row, 'line 1, column 1 is empty')."""
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(40, 3)).round(4), rng.integers(0, 2, 40)
    rows = [f"{i}," + ",".join(map(str, X[i])) + f",{y[i]}" for i in range(40)]
    p = tmp_path / "pl.csv"
    p.write_text(",0,1,2,label\n" + "\n".join(rows) + "\n")
    Xr, yr, _, _ = load_file(p)
    assert Xr.shape == (40, 3) and np.array_equal(yr, y.astype(np.float64))


def test_a_first_row_missing_its_first_value_is_no_pandas_header(tmp_path):
    """',0,2' above rows of two features: a data row with a missing value (an error naming line 1), not
    pandas' index header -- a second review: the rule for ',0,1,2,label' took any ',<column numbers>,<x>'
    (and with one feature any ',<x>')."""
    rows = "".join(f"{i % 3}.5,{i % 2},{i % 3}\n" for i in range(20))
    p = tmp_path / "m.csv"
    p.write_text(",0,2\n" + rows)
    with pytest.raises(DataError, match=re.escape("line 1, column 1 is empty")):
        load_dataset(str(p))


def test_unsorted_counts_with_a_rare_class_in_the_first_row_stay_data(tmp_path):
    """17,42,8,31,3 above count rows of classes 0-2 (20 each): an example of a rare class, not a header
    (a review: the rule for a header of years took any distinct integers)."""
    rng = np.random.default_rng(0)
    rows = ["17,42,8,31,3"] + [",".join(map(str, rng.poisson(20, 4))) + f",{i % 3}" for i in range(60)]
    p = tmp_path / "counts.csv"
    p.write_text("\n".join(rows) + "\n")
    _, y, _, _ = load_file(p)
    assert len(y) == 61 and y[0] == 3


def test_a_batch_size_beyond_the_training_set_is_said_to_be_full_batch(tmp_path, capsys):
    """--batch-size 100000 on 240 examples trained full batch but said 'batch 100000' (and wrote it)."""
    p = tmp_path / "c.csv"
    p.write_text("a,b,c,d,e,label\n" + _decimal_rows(300, 5, 3))
    out = tmp_path / "run"
    args = ["train", "--data", str(p), "--optimizers", "adam", "--no-tune", "--steps", "3", "--depth", "2"]
    assert main([*args, "--batch-size", "100000", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "--batch-size 100000 is not below the 240 training examples: full-batch training" in err
    assert "batch 100000" not in err
    assert json.loads((out / "summary.json").read_text())["config"]["batch_size"] is None


# -- 2. loss-axis ticks over many decades -------------------------------------------------------------
@pytest.mark.parametrize("lo, hi", [(0.1, 2.0), (1e-4, 2.0), (1e-12, 2.0), (1e-30, 10.0)])
def test_loss_axis_has_labelled_ticks_at_any_range(lo, hi):
    """LogLocator(subs=(1, 2, 5)) placed no tick at all once it had to skip decades (losses to 1e-12)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from hessinv.cli.plots import _loss_axis

    fig = Figure(figsize=(14, 9.2), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots(2, 2, squeeze=False)[0][0]
    ax.plot([1, 10], [hi, lo])
    _loss_axis(ax, lo, hi, True)
    fig.canvas.draw()
    y0, y1 = ax.get_ylim()
    ticks = [(t.get_position()[1], t.get_text()) for t in ax.get_yticklabels()]
    shown = [(value, text) for value, text in ticks if text and y0 <= value <= y1]
    decades = math.log10(y1 / y0)
    assert 2 <= len(shown) <= 15, shown
    assert len(shown) >= decades / 5  # at least one label every 5 decades
    for value, text in shown:  # each label is its tick's value
        assert math.isclose(float(text), value, rel_tol=1e-6)


# -- 4. messages that name the line or the cause ------------------------------------------------------
def test_a_stray_comment_line_is_named(tmp_path):
    p = tmp_path / "c.csv"
    rows = [f"{i % 7}.5,{i % 3}.25,{i % 2}\n" for i in range(100)]
    p.write_text("".join(rows[:60]) + "# re-exported 2024-01-02\n" + "".join(rows[60:]))
    with pytest.raises(DataError, match=r"line 61 has 1 where the other rows have 3 \(a '#' comment"):
        load_dataset(str(p))


def test_an_empty_data_path_is_named():
    for path in ("", "  "):
        with pytest.raises(DataError, match="the data path is empty"):
            load_dataset(path)


@pytest.mark.parametrize("task", ["auto", "regression", "classification"])
def test_targets_without_columns_are_named(tmp_path, task):
    p = tmp_path / "e.npz"
    np.savez(p, X=np.random.default_rng(0).normal(size=(40, 3)), y=np.zeros((40, 0)))
    with pytest.raises(DataError, match=re.escape("have no columns (shape (40, 0))")):
        load_dataset(str(p), task=task)


# -- 5. python -m hessinv -------------------------------------------------------------------------------
def test_python_dash_m_hessinv_is_the_console_script(capsys):
    assert main(["--version"]) == 0
    expected = capsys.readouterr().out.strip()
    env = dict(os.environ, PYTHONPATH=str(Path(hessinv.__file__).parents[1]))
    p = subprocess.run(
        [sys.executable, "-m", "hessinv", "--version"], env=env, capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == expected and expected.startswith("hessinv ")


def test_target_column_by_name_or_number(tmp_path):
    """The label in the first column: without --target the last feature was taken as a regression target,
    silently; --target picks the column by header name or number (negative from the end)."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 3))
    y = (X[:, 0] > 0).astype(int)
    path = tmp_path / "first.csv"
    rows = "".join(f"{c},{r[0]},{r[1]},{r[2]}\n" for c, r in zip(y, X, strict=True))
    path.write_text("kind,a,b,c\n" + rows)
    for target in ("kind", "1", "-4"):
        ds = load_dataset(str(path), target=target)
        assert ds.task == "classification" and ds.n_classes == 2 and ds.input_dim == 3
        Xf, yf, _, _ = load_file(path, target)
        np.testing.assert_array_equal(yf, y)
        np.testing.assert_array_equal(Xf, X)
    for bad, match in (("5", "outside the file's columns 1..4"), ("species", "no column 'species'")):
        with pytest.raises(DataError, match=match):
            load_file(path, bad)
    with pytest.raises(DataError, match="a column of a .csv file"):
        load_dataset("digits", target="1")
    # a number is a column number, also where the header names its columns 0, 1, ... (pandas); without
    # a header, class names in the first column keep the first row (it is data)
    path.write_text("0,1,2,3\n" + rows)
    np.testing.assert_array_equal(load_file(path, "1")[1], y)
    names = np.array(["cat", "dog"])[y]
    path.write_text("".join(f"{c},{r[0]},{r[1]},{r[2]}\n" for c, r in zip(names, X, strict=True)))
    Xf, yf, _, _ = load_file(path, "1")
    assert len(yf) == 40 and list(yf) == list(names)
    # numpy.savetxt's '# kind a b c' header, space-separated
    np.savetxt(path.with_suffix(".txt"), np.column_stack([y, X]), header="kind a b c")
    np.testing.assert_array_equal(load_file(path.with_suffix(".txt"), "kind")[1], y)


def test_file_regression_targets_are_standardized(tmp_path):
    """A file's targets of any scale (diabetes: 152 +- 77) are standardized with the training split's
    statistics: a loss of 1 is predicting the training mean, and the description says so."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(50, 2))
    t = 150 + 70 * X[:, 0] + rng.normal(size=50)
    path = tmp_path / "reg.csv"
    path.write_text("".join(f"{a},{b},{c}\n" for (a, b), c in zip(X, t, strict=True)))
    ds = load_dataset(str(path), task="regression")
    assert abs(float(ds.y_train.mean())) < 1e-12 and abs(float(ds.y_train.std(unbiased=False)) - 1) < 1e-12
    assert ds.target_mean is not None and ds.target_std is not None
    back = ds.y_test[:, 0].numpy() * ds.target_std[0] + ds.target_mean[0]
    assert all(np.isclose(t, v, rtol=0, atol=1e-9).any() for v in back)  # the test targets, unscaled
    assert "predicting the training mean scores MSE 1" in ds.describe()
    assert load_dataset("regression").target_std is None  # (the built-in task keeps its units)


def test_out_of_memory_is_one_line_not_a_traceback(monkeypatch, capsys):
    """``hessinv train --width 100000`` asked torch for 40 GB: its allocator's RuntimeError came out as a
    traceback (a new user's find). Out-of-memory errors are one line with what to do, exit status 2; other
    RuntimeErrors still propagate."""
    import hessinv.cli as cli

    def oom(args):
        raise RuntimeError(
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 40000000000 bytes"
        )

    monkeypatch.setattr(cli, "_cmd_train", oom)
    assert cli.main(["train", "--data", "iris"]) == 2
    err = capsys.readouterr().err
    assert "out of memory" in err and "--width" in err and "Traceback" not in err

    def other(args):
        raise RuntimeError("something else")

    monkeypatch.setattr(cli, "_cmd_train", other)
    with pytest.raises(RuntimeError, match="something else"):
        cli.main(["train", "--data", "iris"])


def test_messages_name_what_is_wrong(tmp_path, capsys):
    """A new user's finds: ``--bins 100000`` is an argument error naming the limit (it was the library's
    'at most 10001 bin edges'); non-integer test labels of an .npz name y_test."""
    import hessinv.cli as cli
    from hessinv.cli.data import DataError, load_dataset

    assert cli.main(["spectrum", "--bins", "100000"]) == 2
    assert "at most 10000 bins" in capsys.readouterr().err
    rng = np.random.default_rng(0)
    p = tmp_path / "t.npz"
    np.savez(
        p,
        X=rng.normal(size=(20, 3)),
        y=np.arange(20) % 2,
        X_test=rng.normal(size=(4, 3)),
        y_test=[0.5, 1, 0, 1],
    )
    with pytest.raises(DataError, match=r"must be integers \(in y_test\)"):
        load_dataset(str(p))


def test_spectrum_takes_the_task_as_train_does(monkeypatch):
    """``hessinv spectrum`` had no ``--task``: a file of over 100 integer classes was always read as
    regression (a new user's find)."""
    import hessinv.cli.data as data
    from hessinv.cli import main

    seen = {}

    def fake(*args, **kwargs):
        seen.update(kwargs)
        raise data.DataError("stop here")

    monkeypatch.setattr(data, "load_dataset", fake)
    assert main(["spectrum", "--task", "classification"]) == 2
    assert seen["task"] == "classification"
