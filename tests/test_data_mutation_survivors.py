"""Data loading behaviour a mutation probe found unpinned (2026-12-07; tests/test_data.py passed on each
mutant). Each test passes on unmodified code; the mutant it kills is named in its docstring.
Expected values are computed by hand / with plain numpy, not with the code under test."""

from __future__ import annotations

import numpy as np
import pytest

from hessinv.cli.data import DataError, load_dataset


def _npz(tmp_path, name="d.npz", **arrays):
    p = tmp_path / name
    np.savez(p, **arrays)
    return str(p)


def _stratified(path, test_fraction, seeds=range(200)):
    """load_dataset at the first seed whose random split needs the stratified split."""
    for seed in seeds:
        ds = load_dataset(path, seed=seed, test_fraction=test_fraction, standardize=False)
        if any(n.startswith("split: stratified") for n in ds.notes):
            return ds
    raise AssertionError("no seed triggered the stratified split")


# -- split sizes (C02, C03, C04) ------------------------------------------------------------------------
def test_two_examples_give_one_train_and_one_test_example():
    """C02 (_test_size: max(.., 1) -> max(.., 0)): n_samples=2 is documented as 'a training and a test
    example'; round(2 * 0.2) = 0 must still hold one out."""
    ds = load_dataset("regression", seed=0, n_samples=2)
    assert (len(ds.X_train), len(ds.X_test)) == (1, 1)


def test_a_large_test_fraction_leaves_one_training_example():
    """C03 (_test_size: min(.., n - 1) -> min(.., n)): round(2 * 0.9) = 2 would leave no training data."""
    ds = load_dataset("regression", seed=0, n_samples=2, test_fraction=0.9)
    assert (len(ds.X_train), len(ds.X_test)) == (1, 1)


def test_test_split_size_is_rounded_to_nearest():
    """C04 (round -> floor): 10 examples at test_fraction 0.29 hold out round(2.9) = 3."""
    ds = load_dataset("regression", seed=0, n_samples=10, test_fraction=0.29)
    assert (len(ds.X_train), len(ds.X_test)) == (7, 3)


# -- the stratified split (C05, C06, C07, C35) -----------------------------------------------------------
def test_stratified_split_never_tests_a_class_of_one(tmp_path):
    """C05 (room = counts) and C06 (take += 1 without the room cap): class counts [5, 1, 4] at
    test_fraction 0.7: floors [3, 0, 2], remainders .5, .7, .8 -> the singleton (remainder .7) must not be
    drawn; by hand the test split holds [4, 0, 3] of the classes."""
    y = np.array([0] * 5 + [1] + [2] * 4)
    X = np.arange(10, dtype=float)[:, None]
    ds = _stratified(_npz(tmp_path, X=X, y=y), 0.7)
    assert np.bincount(ds.y_test.numpy(), minlength=3).tolist() == [4, 0, 3]
    assert np.bincount(ds.y_train.numpy(), minlength=3).tolist() == [1, 1, 1]


def test_stratified_split_rounds_the_largest_remainders_up(tmp_path):
    """C07 (argsort(share - take): smallest remainders first): counts [2, 3, 5] at 0.3 -> 3 test examples,
    shares .6, .9, 1.5, floors [0, 0, 1]; the largest remainders (.9, .6) get the other two: [1, 1, 1]
    (the mutant gives [1, 0, 2])."""
    y = np.array([0] * 2 + [1] * 3 + [2] * 5)
    X = np.arange(10, dtype=float)[:, None]
    ds = _stratified(_npz(tmp_path, X=X, y=y), 0.3, seeds=range(2000))
    assert np.bincount(ds.y_test.numpy(), minlength=3).tolist() == [1, 1, 1]


def test_stratified_split_fills_the_test_split_from_classes_with_room(tmp_path):
    """C35 (the second filling loop removed): six singletons and a class of 5, test_fraction 0.5: the test
    split is min(round(5.5), room 4) = 4 examples, all of the class of 5 (the mutant stops at 2)."""
    y = np.array([0, 1, 2, 3, 4, 5] + [6] * 5)
    X = np.arange(11, dtype=float)[:, None]
    ds = _stratified(_npz(tmp_path, X=X, y=y), 0.5)
    assert len(ds.y_test) == 4
    assert sorted(set(ds.y_test.tolist())) == [6]


# -- standardization (C11, C12, C16, C29) ----------------------------------------------------------------
def test_test_features_are_standardized_with_the_training_statistics(tmp_path):
    """C12 (X_test centred with its own mean): X_test = (raw - mean_train) / std_train, by hand."""
    rng = np.random.default_rng(0)
    X = rng.normal(3.0, 2.0, size=(40, 3))
    y = rng.normal(size=40)
    Xt = rng.normal(-5.0, 1.0, size=(10, 3))  # another mean: leaking the test mean shows
    yt = rng.normal(size=10)
    ds = load_dataset(_npz(tmp_path, X=X, y=y, X_test=Xt, y_test=yt))
    mu, sd = X.mean(0), X.std(0)
    np.testing.assert_allclose(ds.X_train.numpy(), (X - mu) / sd, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ds.X_test.numpy(), (Xt - mu) / sd, rtol=1e-12, atol=1e-12)


def test_a_column_constant_up_to_rounding_is_not_blown_up(tmp_path):
    """C11 (sd > 0 instead of sd > 64 eps |x|): a column of 0.3 and 0.1 + 0.2 (one ulp apart) is constant;
    dividing by its rounding-level spread turned it into a +-1 feature."""
    rng = np.random.default_rng(1)
    c = np.where(np.arange(30) % 2 == 0, 0.3, 0.1 + 0.2)
    assert np.unique(c).size == 2  # (they do differ in the last bit)
    X = np.column_stack([rng.normal(size=30), c])
    y = rng.normal(size=30)
    ds = load_dataset(_npz(tmp_path, X=X, y=y))
    assert float(ds.X_train[:, 1].abs().max()) < 1e-12
    assert float(ds.X_test[:, 1].abs().max()) < 1e-12


def test_target_mean_and_std_are_the_training_targets(tmp_path):
    """C16 (target_mean and target_std swapped): a file's targets 100 +- 10."""
    rng = np.random.default_rng(2)
    X, y = rng.normal(size=(50, 2)), rng.normal(100.0, 10.0, size=50)
    Xt, yt = rng.normal(size=(5, 2)), rng.normal(100.0, 10.0, size=5)
    ds = load_dataset(_npz(tmp_path, X=X, y=y, X_test=Xt, y_test=yt))
    np.testing.assert_allclose(ds.target_mean, [y.mean()], rtol=1e-12)
    np.testing.assert_allclose(ds.target_std, [y.std()], rtol=1e-12)
    np.testing.assert_allclose(ds.y_test.numpy()[:, 0], (yt - y.mean()) / y.std(), rtol=1e-10)


def test_describe_makes_no_mse_1_claim_with_a_constant_target_column(tmp_path):
    """C29 (all -> any): a constant target column is only centred (std 0), so 'predicting the training mean
    scores MSE 1' is false (that column's MSE is 0)."""
    rng = np.random.default_rng(3)
    X = rng.normal(size=(30, 2))
    y = np.column_stack([rng.normal(size=30), np.full(30, 7.0)])
    ds = load_dataset(_npz(tmp_path, X=X, y=y))
    assert ds.target_std[1] == 0.0
    assert "MSE 1" not in ds.describe()


# -- classes (C17, C18) ----------------------------------------------------------------------------------
def test_test_labels_use_the_training_class_indices(tmp_path):
    """C17 (y_test indexed by its own classes): classes 0, 1, 2 in training, y_test holding 0 and 2 only
    must stay [0, 2, 2, 0] (the mutant gives [0, 1, 1, 0])."""
    rng = np.random.default_rng(4)
    X, y = rng.normal(size=(9, 2)), np.array([0, 1, 2] * 3)
    Xt, yt = rng.normal(size=(4, 2)), np.array([0, 2, 2, 0])
    ds = load_dataset(_npz(tmp_path, X=X, y=y, X_test=Xt, y_test=yt))
    assert ds.y_test.tolist() == [0, 2, 2, 0]
    assert ds.n_classes == 3


def test_one_class_is_refused(tmp_path):
    """C18 (len(classes) < 1): every label the same is no classification problem."""
    rng = np.random.default_rng(5)
    path = _npz(tmp_path, X=rng.normal(size=(10, 2)), y=np.zeros(10, dtype=np.int64))
    with pytest.raises(DataError, match="at least 2 classes"):
        load_dataset(path, task="classification")


# -- task inference, the regression dataset, npz keys (C22, C23, C26) -------------------------------------
def test_a_float_label_of_exactly_2_to_the_53_is_a_regression_target(tmp_path):
    """C22 (>= 2**53 -> > 2**53): _infer_task's rule: classes are integer values *below* 2^53 in
    magnitude."""
    rng = np.random.default_rng(6)
    y = np.array([0.0, 1.0] * 5 + [2.0**53])
    ds = load_dataset(_npz(tmp_path, X=rng.normal(size=(11, 2)), y=y))
    assert ds.task == "regression"


def test_regression_inputs_span_minus_one_to_one():
    """C23 (uniform(0, 1)): the regression dataset's X is documented in [-1, 1]^4."""
    ds = load_dataset("regression", seed=0, n_samples=500, standardize=False)
    X = np.concatenate([ds.X_train.numpy(), ds.X_test.numpy()])
    assert X.min() < -0.9 and X.max() > 0.9


def test_npz_with_sklearn_style_train_keys(tmp_path):
    """C26 (the '_train' suffix branch skipped): X_train/y_train plus X_test/y_test are read."""
    rng = np.random.default_rng(7)
    X, y = rng.normal(size=(12, 2)), np.array([0, 1] * 6)
    Xt, yt = rng.normal(size=(4, 2)), np.array([1, 0, 1, 0])
    ds = load_dataset(_npz(tmp_path, X_train=X, y_train=y, X_test=Xt, y_test=yt), standardize=False)
    np.testing.assert_array_equal(ds.X_train.numpy(), X)
    np.testing.assert_array_equal(ds.y_test.numpy(), yt)


# -- .csv reading (C27, C30, C37, C40) --------------------------------------------------------------------
def _csv(tmp_path, text, name="d.csv"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_negative_target_column_counts_from_the_end(tmp_path):
    """C27 (width + k - 1): --target-column -1 is the last column, -3 the first."""
    rows = [f"{i}.5,{10 + i}.25,{i % 2}" for i in range(10)]
    path = _csv(tmp_path, "\n".join(rows) + "\n")
    last = load_dataset(path, target="-1", standardize=False, task="classification")
    first = load_dataset(path, target="-3", standardize=False, task="regression")
    X_all = np.concatenate([last.X_train.numpy(), last.X_test.numpy()])
    assert sorted(X_all[:, 0].tolist()) == [i + 0.5 for i in range(10)]
    assert sorted(X_all[:, 1].tolist()) == [10 + i + 0.25 for i in range(10)]
    y_all = np.concatenate([first.y_train.numpy()[:, 0], first.y_test.numpy()[:, 0]])
    assert sorted(y_all.tolist()) == [i + 0.5 for i in range(10)]


def test_an_unnamed_first_column_of_repeated_integers_is_a_feature(tmp_path):
    """C30 (the distinct-values check on pandas' index dropped): integers that repeat under an empty
    header cell are no row index -- the column must be kept."""
    rows = [f"{i % 3},{i}.5,{i % 2}" for i in range(12)]
    path = _csv(tmp_path, ",x,label\n" + "\n".join(rows) + "\n")
    ds = load_dataset(path, standardize=False)
    assert ds.input_dim == 2


def test_a_semicolon_file_with_decimal_points_does_not_read_1_500_as_1_5(tmp_path):
    """C37 (the 'no decimal point anywhere' condition dropped): in a ';' file that writes 2.5 with a point,
    '1,500' is a thousands separator (or garbage), not 1.5: refused, not silently read as 1.5."""
    rows = [f"{i}.5;1,500;{i % 2}" for i in range(10)]
    path = _csv(tmp_path, "\n".join(rows) + "\n")
    with pytest.raises(DataError):
        load_dataset(path)


def test_one_row_with_an_empty_label_is_a_missing_value_not_a_trailing_delimiter(tmp_path):
    """C40 (all -> any): only one row ends with an empty cell: its label is missing. The mutant strips the
    last cell of every row and silently trains on the second feature as the label."""
    rows = [f"{i}.5,{i % 3},{i % 2}" for i in range(12)]
    rows[4] = "4.5,1,"
    path = _csv(tmp_path, "\n".join(rows) + "\n")
    with pytest.raises(DataError, match="line 5"):
        load_dataset(path)


# -- subsampling (C39) ------------------------------------------------------------------------------------
def test_n_samples_draws_a_random_subset_not_the_first_rows(tmp_path):
    """C39 (X[:n_samples]): a file sorted by class, half of it asked for: the examples are drawn over the
    whole file (the first 50 rows hold classes 0, 1 and half of 2 only)."""
    X = np.arange(100, dtype=float)[:, None]
    y = np.repeat(np.arange(5), 20)
    ds = load_dataset(_npz(tmp_path, X=X, y=y), n_samples=50, seed=0, standardize=False)
    rows = np.concatenate([ds.X_train.numpy()[:, 0], ds.X_test.numpy()[:, 0]])
    assert rows.max() >= 50  # the mutant's all lie below 50
    assert ds.n_classes == 5


def test_stratified_note_names_the_class_the_random_split_tested_only(tmp_path):
    """C20 (setdiff arguments swapped): the only class that can be in the test split alone is the
    singleton class 1; the note must name it."""
    y = np.array([0] * 9 + [1])
    X = np.arange(10, dtype=float)[:, None]
    ds = _stratified(_npz(tmp_path, X=X, y=y), 0.2)
    note = next(n for n in ds.notes if n.startswith("split: stratified"))
    assert "a random split put class 1 (1 example) in the test split only" in note
