"""The offline data loaders of ``hessinv train``: shapes, determinism, file round-trips, errors."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch

from hessinv.cli.data import DataError, load_dataset, load_file, regression_function, save_dataset


def test_digits_shapes_and_split():
    ds = load_dataset("digits", seed=0)
    assert ds.task == "classification" and ds.n_classes == 10
    assert ds.X_train.shape[1] == 64 and ds.input_dim == 64 and ds.output_dim == 10
    assert len(ds.X_train) + len(ds.X_test) == 1797
    assert len(ds.X_test) == round(0.2 * 1797)
    assert ds.X_train.dtype == torch.float64 and ds.y_train.dtype == torch.int64
    assert int(ds.y_train.min()) == 0 and int(ds.y_train.max()) == 9
    # standardized with the training statistics
    assert torch.allclose(ds.X_train.mean(0), torch.zeros(64, dtype=torch.float64), atol=1e-12)


def test_digits_match_sklearn():
    from sklearn.datasets import load_digits

    from hessinv.cli.data import _digits

    X, y = _digits()
    Xs, ys = load_digits(return_X_y=True)
    assert np.array_equal(X, Xs) and np.array_equal(y, ys)


def test_digits_deterministic_by_seed():
    a, b, c = load_dataset("digits", seed=1), load_dataset("digits", seed=1), load_dataset("digits", seed=2)
    assert torch.equal(a.X_train, b.X_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_train, c.y_train)


def test_digits_subsample():
    ds = load_dataset("digits", seed=0, n_samples=200, test_fraction=0.25)
    assert (len(ds.X_train), len(ds.X_test)) == (150, 50)


def test_mnist1d_offline_and_deterministic():
    np.random.seed(123)
    random.seed(123)
    before = (np.random.get_state()[1].copy(), random.getstate())
    a = load_dataset("mnist1d", seed=3, n_samples=300)
    # make_dataset seeds the global generators; the loader must put them back
    assert np.array_equal(np.random.get_state()[1], before[0]) and random.getstate() == before[1]
    b = load_dataset("mnist1d", seed=3, n_samples=300)
    c = load_dataset("mnist1d", seed=4, n_samples=300)
    assert a.task == "classification" and a.n_classes == 10 and a.input_dim == 40
    assert len(a.X_train) + len(a.X_test) == 300 and len(a.X_test) == 60
    assert torch.equal(a.X_train, b.X_train) and torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.X_train, c.X_train)


def test_regression_dataset():
    ds = load_dataset("regression", seed=0, n_samples=500)
    assert ds.task == "regression" and ds.output_dim == 1 and ds.input_dim == 4
    assert ds.y_train.shape == (400, 1) and ds.y_train.dtype == torch.float64
    assert torch.equal(ds.y_train, load_dataset("regression", seed=0, n_samples=500).y_train)
    X = np.random.default_rng(0).uniform(-1, 1, (5, 4))
    assert regression_function(X).shape == (5, 1)


@pytest.mark.parametrize("suffix", [".npz", ".csv"])
def test_file_round_trip_classification(tmp_path, suffix):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 3))
    y = rng.integers(3, 6, size=50)  # labels 3..5 are remapped to 0..2
    path = save_dataset(tmp_path / f"d{suffix}", X, y)
    Xr, yr, _, _ = load_file(path)
    np.testing.assert_array_equal(Xr, X)  # %.17g round-trips float64 exactly
    np.testing.assert_array_equal(yr, y)
    ds = load_dataset(str(path), seed=0, standardize=False)
    assert ds.task == "classification" and ds.n_classes == 3
    assert len(ds.X_train) == 40 and len(ds.X_test) == 10
    allX = torch.cat([ds.X_train, ds.X_test])
    assert sorted(map(tuple, allX.tolist())) == sorted(map(tuple, X.tolist()))


@pytest.mark.parametrize("suffix", [".npz", ".csv"])
def test_file_round_trip_regression(tmp_path, suffix):
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(40, 2)), rng.normal(size=40)
    ds = load_dataset(str(save_dataset(tmp_path / f"r{suffix}", X, y)), seed=0)
    assert ds.task == "regression" and ds.output_dim == 1 and ds.y_train.shape == (32, 1)


def test_npz_with_own_test_split_and_task_override(tmp_path):
    rng = np.random.default_rng(2)
    np.savez(
        tmp_path / "s.npz",
        features=rng.normal(size=(30, 4)),
        labels=rng.integers(0, 2, 30),
        features_test=rng.normal(size=(7, 4)),
        labels_test=rng.integers(0, 2, 7),
    )
    ds = load_dataset(str(tmp_path / "s.npz"))
    assert (len(ds.X_train), len(ds.X_test), ds.n_classes) == (30, 7, 2)
    reg = load_dataset(str(tmp_path / "s.npz"), task="regression")
    assert reg.task == "regression" and reg.y_train.dtype == torch.float64


def test_npz_with_class_names_as_labels(tmp_path):
    rng = np.random.default_rng(3)
    names = np.array(["cat", "dog", "emu"])[rng.integers(0, 3, 40)]
    np.savez(tmp_path / "n.npz", X=rng.normal(size=(40, 5)), y=names)
    ds = load_dataset(str(tmp_path / "n.npz"))
    assert ds.task == "classification" and ds.n_classes == 3
    assert sorted(set(ds.y_train.tolist()) | set(ds.y_test.tolist())) == [0, 1, 2]
    with pytest.raises(DataError, match="--task classification"):
        load_dataset(str(tmp_path / "n.npz"), task="regression")


def test_csv_without_header(tmp_path):
    p = tmp_path / "plain.csv"
    p.write_text("0.5,1.0,0\n1.5,2.0,1\n2.5,3.0,0\n3.5,4.0,1\n4.5,5.0,1\n")
    ds = load_dataset(str(p), test_fraction=0.4)
    assert ds.input_dim == 2 and ds.n_classes == 2 and len(ds.X_test) == 2


def test_byte_order_mark_padded_columns_and_huge_features(tmp_path):
    """A UTF-8 byte-order mark made the first row of a header-less file a 'header' (a row lost);
    numpy.savetxt's padded columns were one column; features of 1e200 overflowed the variance and were
    all set to 0 by the standardization."""
    rows = [(0.5 * i, (-1) ** i * 1e200 * (i + 1), i % 2) for i in range(10)]
    text = "".join(f"{a},{b},{c}\n" for a, b, c in rows)
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + text.encode())
    X, y, _, _ = load_file(bom)
    assert X.shape == (10, 2) and y.tolist() == [i % 2 for i in range(10)]
    padded = tmp_path / "padded.txt"
    np.savetxt(padded, np.array(rows, dtype=float)[:, [0, 2]] * [1, 1], fmt="%10.4f")
    X, y, _, _ = load_file(padded)
    assert X.shape == (10, 1) and y.tolist() == [i % 2 for i in range(10)]
    ds = load_dataset(str(bom), test_fraction=0.2)
    assert bool(torch.isfinite(ds.X_train).all()) and float(ds.X_train[:, 1].std()) > 0.5
    offset = tmp_path / "offset.npz"  # a large offset with a spread of 1e5: still a feature, not constant
    g = np.random.default_rng(0)
    np.savez(offset, X=1.7e18 + g.integers(0, 10**6, (40, 1)).astype(float), y=np.arange(40) % 2)
    ds = load_dataset(str(offset), test_fraction=0.25)
    assert 0.5 < float(ds.X_train[:, 0].std()) < 1.5


def test_labels_the_split_hides_get_the_split_advice(tmp_path):
    """Five rows, one of class 1 that the split sent to the test set: 'needs at least 2 classes' blamed
    the file (now the split is stratified there, the class in the training split); distinct integer
    targets read as classes get the --task hint."""
    few = tmp_path / "few.csv"
    few.write_text("".join(f"{i},{int(i == 4)}\n" for i in range(5)))
    notes = []
    for seed in range(20):  # the seeds whose random split sends the one class-1 row to the test set
        ds = load_dataset(str(few), test_fraction=0.2, seed=seed)
        assert ds.n_classes == 2 and len(ds.X_test) == 1 and int(ds.y_train.sum()) == 1
        notes += [n for n in ds.notes if n.startswith("split: stratified")]
    assert notes and all("class 1 (1 example)" in n for n in notes)
    # a handful of examples is not told its labels might be targets (2 examples of 2 classes were; a review)
    two = tmp_path / "two.csv"
    two.write_text("0.5,0\n1.5,1\n")
    with pytest.raises(DataError, match="classes the training labels do not") as e:
        load_dataset(str(two), test_fraction=0.5, seed=0)
    assert "--task regression" not in str(e.value)
    ints = tmp_path / "ints.csv"
    ints.write_text("".join(f"{i * 0.1},{i * 7 + 3}\n" for i in range(60)))
    with pytest.raises(DataError, match="--task regression"):
        load_dataset(str(ints))
    assert load_dataset(str(ints), task="regression").task == "regression"


@pytest.mark.parametrize(
    "content, match",
    [
        ("a,b,y\n1,q,0\n2,3,1\n", "line 2, column 2: 'q' is not a number"),
        ("a,b,y\n1,2,0\n1,,1\n2,3,1\n", "line 3, column 2 is empty"),  # not "different numbers of columns"
        ("1,2,cat\n3,4,1\n5,6,dog\n", "mixes class names and numbers (line 1: 'cat', line 2: '1')"),
        ("x,y\n", "no data rows"),
        ("1,2,3\n1,2\n", "different numbers of columns"),
        ("1\n2\n", "at least 2 columns"),
    ],
)
def test_bad_csv(tmp_path, content, match):
    p = tmp_path / "bad.csv"
    p.write_text(content)
    with pytest.raises(DataError, match=re.escape(match)):
        load_dataset(str(p))


def test_unreadable_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(str(tmp_path / "nope.npz"))
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"\x00\x01 this is not a zip file")
    with pytest.raises(DataError, match=r"cannot read .* not a \.npz \(zip\) archive") as e:
        load_dataset(str(garbage))
    assert "allow_pickle" not in str(e.value)  # numpy's advice for pickles: not this case
    np.savez(tmp_path / "keys.npz", a=np.zeros((3, 2)), b=np.zeros(3))
    with pytest.raises(DataError, match="must contain features"):
        load_dataset(str(tmp_path / "keys.npz"))
    other = tmp_path / "data.json"
    other.write_text("{}")
    with pytest.raises(DataError, match="unsupported file type"):
        load_dataset(str(other))
    nan = tmp_path / "nan.npz"
    np.savez(nan, X=np.array([[1.0], [np.nan], [2.0]]), y=np.array([0, 1, 0]))
    with pytest.raises(DataError, match="NaN"):
        load_dataset(str(nan))


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet")


def test_csv_with_class_names_as_labels(tmp_path):
    """The label column may hold class names, as in a .npz file; the same data read either way."""
    rng = np.random.default_rng(4)
    X, names = (
        rng.normal(size=(30, 3)),
        np.array(["setosa", "versicolor", "virginica"])[rng.integers(0, 3, 30)],
    )
    lines = ["a,b,c,species"] + [
        ",".join([*(repr(float(v)) for v in x), n]) for x, n in zip(X, names, strict=True)
    ]
    (tmp_path / "iris.csv").write_text("\n".join(lines) + "\n")
    np.savez(tmp_path / "iris.npz", X=X, y=names)
    a, b = load_dataset(str(tmp_path / "iris.csv")), load_dataset(str(tmp_path / "iris.npz"))
    assert a.task == "classification" and a.n_classes == 3
    assert torch.equal(a.X_train, b.X_train) and torch.equal(a.y_train, b.y_train)
    assert torch.equal(a.y_test, b.y_test)


@pytest.mark.parametrize("name", ["digits", "regression", "mnist1d"])
@pytest.mark.parametrize("n", [1, 0, -5])
def test_too_few_examples_refused(name, n):
    with pytest.raises(DataError, match=f"number of examples must be an integer >= 2 .*, got {n}"):
        load_dataset(name, n_samples=n)


def test_npz_label_and_target_shapes_checked(tmp_path):
    rng = np.random.default_rng(5)
    X, y = rng.normal(size=(40, 3)), rng.integers(0, 2, 40)
    np.savez(tmp_path / "y2d.npz", X=X, y=np.stack([y, y], 1))
    with pytest.raises(
        DataError, match=r"classification labels must be one per example, shape \(N,\); got \(40, 2\)"
    ):
        load_dataset(str(tmp_path / "y2d.npz"), task="classification")
    assert load_dataset(str(tmp_path / "y2d.npz")).task == "regression"  # (N, 2) integers: two targets
    np.savez(tmp_path / "y1.npz", X=X, y=y[:, None])  # (N, 1): one label per example
    assert load_dataset(str(tmp_path / "y1.npz"), task="classification").n_classes == 2
    np.savez(
        tmp_path / "t.npz",
        X=X[:30],
        y=rng.normal(size=(30, 2)),
        X_test=X[30:],
        y_test=rng.normal(size=(10, 3)),
    )
    with pytest.raises(DataError, match="same number of features and of targets per example"):
        load_dataset(str(tmp_path / "t.npz"))


# -- the probe of /tmp/probe_apps: malformed arrays, task inference, classes, headers, --samples -------
@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"X": np.zeros((0, 4)), "y": np.zeros(0)}, "e.npz: no examples (the features have shape (0, 4))"),
        (
            {"X": np.ones((6, 4)), "y": np.arange(6) % 2, "X_test": np.zeros((0, 4)), "y_test": np.zeros(0)},
            "e.npz (test): no examples (the features have shape (0, 4))",
        ),
        ({"X": np.array(3.0), "y": np.array(1)}, "e.npz: the features are a single number"),
        ({"X": np.ones((6, 2)), "y": np.array(1)}, "e.npz: 6 feature rows but labels/targets of shape ()"),
        ({"X": np.zeros((120, 0)), "y": np.arange(120) % 2}, "e.npz: no feature columns"),
        ({"X": np.zeros((120, 3, 0)), "y": np.arange(120) % 2}, "e.npz: no feature columns"),
    ],
)
def test_empty_scalar_and_featureless_arrays_refused(tmp_path, arrays, match):
    np.savez(tmp_path / "e.npz", **arrays)
    with pytest.raises(DataError, match=re.escape(match)):
        load_dataset(str(tmp_path / "e.npz"))


@pytest.mark.parametrize("distinct, task", [(150, "regression"), (100, "classification")])
def test_task_inference_is_the_same_for_every_source(tmp_path, distinct, task):
    """Integer-valued labels make a classification with at most 100 distinct values, whatever their
    dtype or file type (int64 in a .npz was a 150-class classification, the same values as floats or in
    a .csv a regression)."""
    rng = np.random.default_rng(6)
    X, y = rng.normal(size=(300, 2)), np.arange(300) % distinct
    np.savez(tmp_path / "int.npz", X=X, y=y)
    np.savez(tmp_path / "float.npz", X=X, y=y.astype(np.float64))
    save_dataset(tmp_path / "d.csv", X, y)
    for f in ("int.npz", "float.npz", "d.csv"):
        assert load_dataset(str(tmp_path / f)).task == task, f
    np.savez(tmp_path / "names.npz", X=X, y=np.array([f"c{v}" for v in y]))  # class names: always
    assert load_dataset(str(tmp_path / "names.npz"), test_fraction=0.01).task == "classification"


def test_huge_float_targets_are_a_regression(tmp_path):
    """Floats of magnitude 2^53 or more are integer-valued whatever they measure: 100 continuous targets
    of about 1e300 were taken as class labels, and a test split with values the training split lacks
    was then refused (a probe). Integer labels stay classes."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(100, 3))
    np.savez(tmp_path / "huge.npz", X=X, y=rng.normal(size=100) * 1e300)
    assert load_dataset(str(tmp_path / "huge.npz")).task == "regression"
    np.savez(tmp_path / "ids.npz", X=X, y=np.arange(100) % 3 + 2**60)  # int64 class ids
    assert load_dataset(str(tmp_path / "ids.npz")).task == "classification"


def test_test_labels_outside_the_training_classes_refused(tmp_path):
    rng = np.random.default_rng(7)
    np.savez(
        tmp_path / "t.npz",
        X=rng.normal(size=(40, 3)),
        y=np.arange(40) % 2,
        X_test=rng.normal(size=(9, 3)),
        y_test=np.arange(9) % 3 + 5,
    )
    with pytest.raises(DataError, match=re.escape("classes the training labels do not (5, 6, 7)")):
        load_dataset(str(tmp_path / "t.npz"))
    # a random split that leaves a class's only example in the test split: stratified instead
    y = np.array([0, 1] * 10 + [2])
    np.savez(tmp_path / "r.npz", X=rng.normal(size=(21, 3)), y=y)
    for seed in range(50):
        ds = load_dataset(str(tmp_path / "r.npz"), seed=seed)
        assert ds.n_classes == 3 and int((ds.y_train == 2).sum()) == 1  # the class is in the training split
        if ds.notes:
            assert "class 2 (1 example)" in ds.notes[0]
            break
    else:
        pytest.fail("no seed's random split put the single example of class 2 in the test split")


def test_numeric_looking_header_is_skipped(tmp_path):
    rows = "0.3,-1.2,cat\n1.5,0.2,dog\n-0.7,0.9,cat\n2.1,-0.4,dog\n0.1,0.5,cat\n"
    (tmp_path / "h.csv").write_text("1,2,label\n" + rows)
    X, y, _, _ = load_file(tmp_path / "h.csv")
    assert X.shape == (5, 2) and sorted(set(y.tolist())) == ["cat", "dog"]
    (tmp_path / "n.csv").write_text("1,2,3\n" + rows)  # a number above class names
    assert load_file(tmp_path / "n.csv")[0].shape == (5, 2)
    (tmp_path / "d.csv").write_text(rows)  # no header: the first row's class is also further down
    assert load_file(tmp_path / "d.csv")[0].shape == (5, 2)


def test_nan_classification_labels_named(tmp_path):
    np.savez(tmp_path / "n.npz", X=np.ones((6, 2)), y=np.array([0, 1, np.nan, 1, 0, 1]))
    with pytest.raises(DataError, match="classification labels contain NaN or infinity"):
        load_dataset(str(tmp_path / "n.npz"), task="classification")


def test_samples_and_test_fraction_not_silently_ignored(tmp_path):
    rng = np.random.default_rng(8)
    arrays = {"X": rng.normal(size=(30, 2)), "y": np.arange(30) % 2}
    np.savez(tmp_path / "s.npz", **arrays, X_test=rng.normal(size=(6, 2)), y_test=np.arange(6) % 2)
    for kwargs, option in (({"n_samples": 10}, "--samples"), ({"test_fraction": 0.5}, "--test-fraction")):
        with pytest.raises(DataError, match=f"own test split .*so {option} cannot apply"):
            load_dataset(str(tmp_path / "s.npz"), **kwargs)
    with pytest.raises(
        DataError, match=r"digits has 1797 examples, fewer than the 100000 asked for \(--samples\)"
    ):
        load_dataset("digits", n_samples=100000)
    np.savez(tmp_path / "p.npz", **arrays)
    assert len(load_dataset(str(tmp_path / "p.npz"), n_samples=30).X_train) == 24  # all of them: fine
    ds = load_dataset("mnist1d", n_samples=5, task="regression")  # generated: at least 10, subsampled
    assert len(ds.X_train) + len(ds.X_test) == 5


# -- a probe's findings (2026-12-03) ----------------------------------------------------------------
def test_a_header_of_column_numbers_is_no_example(tmp_path):
    """pandas writes a frame made from an array with the header 0,1,...,k: read as a row, its label made
    a phantom class (4 classes of 121 rows instead of 3 of 120)."""
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(120, 5)), np.arange(120) % 3
    for first in (0, 1):
        p = tmp_path / f"h{first}.csv"
        header = ",".join(str(i + first) for i in range(6))
        p.write_text(
            header
            + "\n"
            + "".join(",".join(f"{v:.6f}" for v in x) + f",{c}\n" for x, c in zip(X, y, strict=True))
        )
        ds = load_dataset(str(p))
        assert ds.n_classes == 3 and len(ds.X_train) + len(ds.X_test) == 120


@pytest.mark.parametrize("names", [True, False])
@pytest.mark.parametrize("target", [None, "label", "4"])
def test_pandas_index_column_is_not_a_feature(tmp_path, names, target):
    """DataFrame.to_csv's default writes the index as a first column under an empty header cell: it was
    read as a feature, and on rows sorted by class it leaked the label (96.7% test accuracy on noise
    features, a new user's find). It is dropped -- named header or pandas' column numbers, the label
    last or picked by name or number; a first column of other values under an empty cell stays."""
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, 2)), np.repeat(np.arange(3), 20)  # sorted by class
    head = ",a,b,label" if names else ",0,1,2"
    if not names and target == "label":
        target = None
    rows = "".join(f"{i},{a:.6f},{b:.6f},{c}\n" for i, ((a, b), c) in enumerate(zip(X, y, strict=True)))
    p = tmp_path / "frame.csv"
    p.write_text(head + "\n" + rows)
    Xr, yr, _, _ = load_file(p, target)
    assert Xr.shape == (60, 2) and np.allclose(Xr, X, atol=1e-6) and np.array_equal(yr, y)
    kept = tmp_path / "kept.csv"  # (an unnamed first column of measurements is data)
    kept.write_text(
        head
        + "\n"
        + "".join(
            f"{i / 7:.4f},{a:.6f},{b:.6f},{c}\n" for i, ((a, b), c) in enumerate(zip(X, y, strict=True))
        )
    )
    assert load_file(kept, target)[0].shape == (60, 3)


@pytest.mark.parametrize("target", ["2", "3", "-3"])
def test_pandas_index_header_with_a_feature_column_as_the_target(tmp_path, target):
    """``DataFrame(np.c_[X, y]).to_csv()`` (``,0,1,2`` above an index column) with --target-column naming a
    column other than the last: its header was read as data once the target was moved to the end ("line 1,
    column 1 is empty (a missing value)", a CLI probe)."""
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, 2)), np.repeat(np.arange(3), 20)
    rows = "".join(f"{i},{a:.6f},{b:.6f},{c}\n" for i, ((a, b), c) in enumerate(zip(X, y, strict=True)))
    p = tmp_path / "frame.csv"
    p.write_text(",0,1,2\n" + rows)
    Xr, yr, _, _ = load_file(p, target)
    t = 1 if target == "3" else 0  # (file columns 2 and -3 are X's first, 3 its second)
    assert np.allclose(yr, X[:, t], atol=1e-6)
    assert np.allclose(Xr, np.c_[X[:, 1 - t], y], atol=1e-6)  # (the index column dropped)


@pytest.mark.parametrize("sep, suffix", [("\t", ".tsv"), (";", ".csv"), ("\t", ".txt")])
def test_long_lines_of_other_delimiters(tmp_path, sep, suffix):
    """50 features written with %.6f: csv's sniffer (on a 4096-character sample that cut a line) failed
    and the reader fell back to commas ("need at least 2 columns")."""
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(40, 50)), np.arange(40) % 2
    p = tmp_path / f"wide{suffix}"
    p.write_text("".join(sep.join(f"{v:.6f}" for v in x) + f"{sep}{c}\n" for x, c in zip(X, y, strict=True)))
    ds = load_dataset(str(p))
    assert ds.input_dim == 50 and ds.n_classes == 2


def test_numpy_savetxt_with_its_header(tmp_path):
    """np.savetxt's default output with a header ('# x0 x1 ... y', space-separated)."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 40))  # (long lines: 41 cells of 25 characters)
    p = tmp_path / "s.txt"
    np.savetxt(p, np.column_stack([X, np.arange(30) % 3]), header=" ".join(f"x{i}" for i in range(40)) + " y")
    ds = load_dataset(str(p))
    assert ds.input_dim == 40 and ds.n_classes == 3 and len(ds.X_train) + len(ds.X_test) == 30


@pytest.mark.parametrize("n", [37, 501])
def test_mnist1d_takes_any_number_of_samples(n):
    """It was refused unless a multiple of 10 (the generator makes n // 10 per class)."""
    ds = load_dataset("mnist1d", seed=0, n_samples=n)
    assert len(ds.X_train) + len(ds.X_test) == n


def test_a_feature_in_small_units_is_standardized(tmp_path):
    """A varying column of values 0 or 1e-13 (standard deviation 5e-14) was taken as constant (an
    absolute 1e-12 threshold) and left unscaled."""
    rng = np.random.default_rng(0)
    y = np.arange(60) % 2
    X = np.column_stack([y * 1e-13, rng.normal(size=60), np.full(60, 5.0)])
    np.savez(tmp_path / "s.npz", X=X, y=y)
    ds = load_dataset(str(tmp_path / "s.npz"))
    sd = ds.X_train.std(0, unbiased=False)
    assert abs(float(sd[0]) - 1.0) < 1e-6 and float(sd[2]) == 0.0  # (the constant column stays constant)


def test_regression_targets_beyond_the_dtypes_range_are_named(tmp_path):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(60, 3))
    np.savez(tmp_path / "big.npz", X=X, y=X[:, 0] * 1e20)
    ds = load_dataset(str(tmp_path / "big.npz"), task="regression", standardize=False)
    ds.to(dtype=torch.float64)  # (fine in float64)
    with pytest.raises(DataError, match="rescale the targets"):
        ds.to(dtype=torch.float32)
    # standardized (the default for a file's targets): in range
    ds = load_dataset(str(tmp_path / "big.npz"), task="regression")
    assert float(ds.to(dtype=torch.float32).y_train.abs().max()) < 10


@pytest.mark.parametrize(
    "text, n",
    [
        ("0,1,2\n1,2,3\n2,3,4\n3,4,5\n4,5,6\n", 5),  # a counting series: integer data, no header
        ("0,1,2\n5,3,0\n1,4,1\n2,2,0\n7,1,1\n", 5),  # the first row the only example of class 2
        ("# f0 y\n-1, dog\n3, cat\n-8, emu\n", 3),  # a '#' header: the first data row stays
    ],
)
def test_first_rows_that_are_data_stay(tmp_path, text, n):
    p = tmp_path / "d.csv"
    p.write_text(text)
    X, y, _, _ = load_file(p)
    assert len(y) == n


def test_a_header_of_another_width_is_named_or_read_as_r_row_names(tmp_path):
    """R's write.table names every column but the row names' (its header one cell short): the row numbers
    were read as a feature -- 95% test accuracy on noise sorted by class -- and a header of another width
    was skipped silently (a probe). Row names (distinct integers or names) under such a header are dropped,
    with a note; any other mismatch is an error."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 3))
    lab = ["no"] * 20 + ["yes"] * 20
    cells = zip(X, lab, strict=True)
    rows = "".join(f'"{i + 1}" {a:.4f} {b:.4f} {c:.4f} "{y}"\n' for i, ((a, b, c), y) in enumerate(cells))
    p = tmp_path / "r.txt"
    p.write_text('"a" "b" "c" "label"\n' + rows)
    ds = load_dataset(str(p), test_fraction=0.25)
    assert ds.input_dim == 3 and ds.n_classes == 2
    from hessinv.cli.data import _read_csv

    feats, labels, notes = _read_csv(p)
    assert np.array_equal(feats, np.round(X, 4)) and list(labels) == lab
    assert any("row names" in n for n in notes)
    q = tmp_path / "short.csv"  # (a header one short above a numeric first column: not row names)
    q.write_text(
        "b,c,label\n" + "".join(f"{a:.4f},{b:.4f},{c:.4f},{i % 2}\n" for i, (a, b, c) in enumerate(X))
    )
    with pytest.raises(DataError, match="header line names 3 columns where the rows have 4"):
        load_dataset(str(q))
    r = tmp_path / "long.csv"
    r.write_text(
        "a,b,c,d,label\n" + "".join(f"{a:.4f},{b:.4f},{c:.4f},{i % 2}\n" for i, (a, b, c) in enumerate(X))
    )
    with pytest.raises(DataError, match="header line names 5 columns where the rows have 4"):
        load_dataset(str(r))


@pytest.mark.parametrize("name", ["digits", "mnist1d"])
def test_a_builtins_labels_as_regression_targets_are_standardized(name):
    """``--task regression`` on digits or MNIST-1D: the labels 0..9 were left as they are (a probe: train
    loss 23 after 10 steps, and the optimizer's advice to standardize them, which the CLI offers no way
    to); standardized with the training split's statistics like a file's targets, which the report keeps.
    The built-in regression's teacher outputs stay as generated."""
    ds = load_dataset(name, task="regression", n_samples=400 if name == "mnist1d" else None)
    assert ds.task == "regression"
    assert abs(float(ds.y_train.mean())) < 1e-12 and abs(float(ds.y_train.std(unbiased=False)) - 1) < 1e-12
    raw = load_dataset(
        name, task="regression", standardize=False, n_samples=400 if name == "mnist1d" else None
    )
    mu, sd = float(raw.y_train.mean()), float(raw.y_train.std(unbiased=False))
    assert torch.allclose(ds.y_test, (raw.y_test - mu) / sd, atol=1e-12)
    reg = load_dataset("regression", seed=0, n_samples=200)
    assert torch.equal(
        reg.y_train, load_dataset("regression", seed=0, n_samples=200, standardize=False).y_train
    )
