"""Datasets for ``hessinv train``: all generated or read locally, never downloaded.

* ``digits``: scikit-learn's bundled 8x8 digits (1797 images, 10 classes, 64 features).
* ``mnist1d``: generated with the ``mnist1d`` package's ``make_dataset`` (40 features, 10 classes).
* ``regression``: a smooth synthetic function of 4 inputs, to be fitted to high precision (MSE).
* a path to the user's own ``.npz`` or ``.csv`` file.

The file format is :data:`hessinv.cli.choices.DATA_FORMAT` (also in ``hessinv train --help``):
``.npz`` files hold ``X`` and ``y`` (optionally ``X_test``/``y_test``); ``.csv`` files hold one
example per row, the last column being the label or target.

>>> ds = load_dataset("regression", seed=0, n_samples=100)
>>> ds.task, ds.X_train.shape, ds.y_train.shape, ds.X_test.shape
('regression', torch.Size([80, 4]), torch.Size([80, 1]), torch.Size([20, 4]))
"""

from __future__ import annotations

import csv
import io
import math
import random
import re
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from hessinv.cli.choices import DATASETS, TEST_FRACTION, install_hint

__all__ = ["DATASETS", "DataError", "Dataset", "load_dataset", "load_file", "save_dataset"]

MAX_CLASSES = 100  # see DATA_FORMAT
_X_KEYS = ("X", "x", "features", "inputs", "data")
_Y_KEYS = ("y", "labels", "targets", "target", "label")


class DataError(Exception):
    """A dataset name is unknown or a data file cannot be read; the message says which and why."""


@dataclass
class Dataset:
    """A train/test split as tensors.

    Classification targets are ``int64`` class indices ``0..n_classes-1``; regression targets are
    ``(N, k)`` floats -- a file's (and a built-in's labels taken as targets) standardized,
    ``(y - target_mean) / target_std`` per column with the
    training split's statistics (None where not; a constant column: ``target_std`` 0, only centered).
    ``output_dim`` is the width the model's last layer needs. ``notes``: what reading the data decided
    that a user should see (a first row skipped as a header, a stratified split), one line each.
    """

    name: str
    task: str  # "classification" | "regression"
    X_train: Tensor
    y_train: Tensor
    X_test: Tensor
    y_test: Tensor
    n_classes: int | None = None
    target_mean: tuple[float, ...] | None = None
    target_std: tuple[float, ...] | None = None
    notes: tuple[str, ...] = ()

    @property
    def input_dim(self) -> int:
        return int(self.X_train.shape[1])

    @property
    def output_dim(self) -> int:
        return int(self.n_classes) if self.task == "classification" else int(self.y_train.shape[1])

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Dataset:
        def cv(t: Tensor, floating: bool) -> Tensor:
            return t.to(device=device, dtype=dtype if floating and dtype is not None else t.dtype)

        reg = self.task == "regression"
        if reg and dtype is not None and dtype.is_floating_point:
            top = max((float(t.abs().max()) for t in (self.y_train, self.y_test) if t.numel()), default=0.0)
            if 16 * top * top > torch.finfo(dtype).max:  # the squared error overflows at the first step
                raise DataError(
                    f"{self.name}: regression targets as large as {top:.3g} have a squared error beyond "
                    f"{dtype}'s range; rescale the targets (e.g. divide by their standard deviation)"
                )
        return Dataset(
            self.name,
            self.task,
            cv(self.X_train, True),
            cv(self.y_train, reg),
            cv(self.X_test, True),
            cv(self.y_test, reg),
            self.n_classes,
            self.target_mean,
            self.target_std,
            self.notes,
        )

    def describe(self) -> str:
        kind = (
            f"{self.n_classes} classes" if self.task == "classification" else f"{self.output_dim} target(s)"
        )
        scaled = ""
        if self.target_std is not None:  # the losses are in these units: the mean's MSE on train is 1
            pairs = zip(self.target_mean or (), self.target_std, strict=True)
            stats = ", ".join(f"{m:.4g} +- {s:.4g}" if s > 0 else f"{m:.4g}, constant" for m, s in pairs)
            mean = ": predicting the training mean scores MSE 1" if all(self.target_std) else ""
            scaled = f" standardized ({stats}{mean})"
        return (
            f"{self.name}: {len(self.X_train)} train / {len(self.X_test)} test examples, "
            f"{self.input_dim} features, {kind}{scaled}"
        )


# -- built-in datasets --------------------------------------------------------------------------
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled ``digits.csv.gz``, read directly (importing sklearn costs seconds)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            A = np.loadtxt(path, delimiter=",")
            return A[:, :-1].astype(np.float64), A[:, -1].astype(np.int64)
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise DataError(
            f"the digits dataset needs scikit-learn ({e}): {install_hint('cli')}, or pip install scikit-learn"
        ) from None
    X, y = load_digits(return_X_y=True)
    return X.astype(np.float64), y.astype(np.int64)


def _mnist1d(seed: int, n_samples: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``mnist1d.data.make_dataset`` (offline; it seeds the global RNGs, which we restore)."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise DataError(
            f"the mnist1d package is not importable ({e}): {install_hint('cli')}, or pip install mnist1d"
        ) from e
    args = get_dataset_args()
    want = int(n_samples or args.num_samples)
    # the generator makes num_samples // 10 per class (in shuffled order): a multiple of 10, then the
    # first `want` of them
    args.num_samples = max(10 * math.ceil(want / 10), 10)
    args.seed = int(seed)
    args.train_split = 1.0  # we split ourselves, like every other dataset
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return np.asarray(d["x"], dtype=np.float64)[:want], np.asarray(d["y"], dtype=np.int64)[:want]


def regression_function(X: np.ndarray) -> np.ndarray:
    """The smooth target of the ``regression`` dataset, for ``X`` of shape (N, 4) in [-1, 1]^4."""
    x1, x2, x3, x4 = X.T
    return (np.sin(np.pi * x1) * np.cos(0.5 * np.pi * x2) + 0.5 * x3 * x4 + 0.25 * np.tanh(2 * x1 + x4))[
        :, None
    ]


def _regression(seed: int, n_samples: int | None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1.0, 1.0, size=(int(n_samples or 2000), 4))
    return X, regression_function(X)


# -- files --------------------------------------------------------------------------------------
def _pick(names: list[str], keys: tuple[str, ...], suffix: str) -> str | None:
    """The first of ``keys`` (with ``suffix``) among an archive's array ``names``."""
    for k in keys:
        if k + suffix in names:
            return k + suffix
    return None


def _read_npz(
    path: Path,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None, list[str]]:
    """``(X, y, X_test, y_test, notes)``: the training arrays under a name of :data:`_X_KEYS` /
    :data:`_Y_KEYS` (or with ``_train`` appended, sklearn's split), the test arrays with ``_test``; the
    notes name the arrays not read (a validation split ``X_val``)."""
    if not zipfile.is_zipfile(path):  # np.load would try to unpickle it (and advise allow_pickle)
        raise DataError(f"cannot read {path} as .npz: it is not a .npz (zip) archive")
    try:
        with np.load(path, allow_pickle=False) as f:
            names = list(f.files)
            train = ""
            if _pick(names, _X_KEYS, "") is None and _pick(names, _X_KEYS, "_train") is not None:
                train = "_train"
            picked = [
                _pick(names, _X_KEYS, train),
                _pick(names, _Y_KEYS, train),
                _pick(names, _X_KEYS, "_test"),
                _pick(names, _Y_KEYS, "_test"),
            ]
            if picked[0] is None or picked[1] is None:
                raise DataError(
                    f"{path} must contain features under one of {list(_X_KEYS)} and labels/targets under one "
                    f"of {list(_Y_KEYS)} (or with _train appended); it has {sorted(names)}"
                )
            if (picked[2] is None) != (picked[3] is None):
                raise DataError(f"{path}: X_test and y_test must come together")
            # only the arrays used are loaded: an object array beside them (np.savez(..., feature_names=
            # df.columns.values), a common habit) refused the whole file
            arrays = []
            for name in picked:
                try:
                    arrays.append(None if name is None else f[name])
                except ValueError as e:  # (an object array: it would need pickle)
                    raise DataError(
                        f"cannot read array {name!r} of {path}: {e}; save it as a numeric array "
                        "(np.asarray(a, dtype=float), or class labels as strings or integers)"
                    ) from None
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read {path} as .npz: {e}") from None
    X, y, Xt, yt = arrays
    unread = sorted(set(names) - {n for n in picked if n is not None})
    split = (
        "the test split is read from X_test and y_test"
        if Xt is not None
        else "the test split is drawn from X and y"
    )
    notes = [f"arrays not read: {', '.join(unread)} ({split})"] if unread else []
    return X, y, Xt, yt, notes


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


#: header names (compared lower-cased) that say a column is the label: a note where one is not the last
_LABEL_NAMES = frozenset({"label", "labels", "y", "target", "targets", "class", "classes", "outcome"})
#: cells that mark a missing value (compared lower-cased): in a first row otherwise of numbers they make
#: it a data row with a missing value (an error naming line 1), not a header; as a label, an error naming
#: its line (not a class of its own)
_MISSING = frozenset({"", "na", "n/a", "nan", "?", "null", "missing", "#n/a"})


def _column_numbers(cells: list[str]) -> bool:
    """Whether ``cells`` are ``0,1,...,k-1`` or ``1,2,...,k``: the column numbers pandas writes as the
    header of a frame made from an array."""
    return cells in ([str(i) for i in range(len(cells))], [str(i + 1) for i in range(len(cells))])


def _is_header(head: list[str], rest: list[list[str]]) -> bool:
    """Whether ``head``, the first row, is a header line above the rows ``rest``:

    * a feature cell that is not a number (``x1,x2,label``), unless the row's only non-numbers are
      missing values (``NA``, ``?``, empty: data with a missing value, reported as such) or it is
      pandas' header above its index column (an empty cell, then the column numbers);
    * a label unlike every other: a name above numbers, a number above names, or a name that no
      other row has (``1,2,label`` above class names);
    * the column numbers ``0,1,...,k-1`` (or ``1..k``, what pandas writes) where that is implausible for
      data: some column of the other rows is written as decimals (``0.25``, ``1e-3``) unlike the row's
      plain integers, or its label is no other row's and the other rows have at least 10 per distinct
      label (a first row that is the only example of its class, among classes of 10 or more on average);
    * other increasing integers (years: ``2019,...,2024``) whose label is no other row's, above classes of
      10 or more rows on average. Otherwise (``0,1,2`` above ``5,3,0``, ``1,4,1``, ... or a counting
      series ``1,2,3``, ...) it stays data.
    """
    cells = [c.strip() for c in head]
    labels = [r[-1].strip() for r in rest]
    named_label = cells[-1].lower() not in _MISSING and not _is_number(cells[-1])
    if (
        cells[0] == ""
        and len(cells) > 2
        and (_column_numbers(cells[1:]) or (named_label and _column_numbers(cells[1:-1])))
    ):
        return True  # (pandas' header above its index column: the column numbers, and the label's name)
    # a row with a missing value (a feature's, or the label's) and numbers in the other feature cells is
    # data -- whatever its label (a class name does not make it a header)
    features = cells[:-1]
    present = [c for c in features if c.lower() not in _MISSING]
    missing = len(present) < len(features) or cells[-1].lower() in _MISSING
    if missing and present and all(_is_number(c) for c in present):
        return False
    if not all(_is_number(c) for c in cells[:-1]):
        return True
    integers = all(c.lstrip("+-").isdigit() for c in cells)
    if len(rest) >= 2 and integers and all(_is_number(c) for c in labels):
        values = {float(c) for c in labels}
        same = [[c.strip() for c in r] for r in rest if len(r) == len(cells)]
        written_as_decimals = any(
            same and all(_is_number(r[j]) and any(ch in r[j] for ch in ".eE") for r in same)
            for j in range(len(cells))
        )
        alone = float(cells[-1]) not in values and len(rest) >= 10 * len(values)
        if _column_numbers(cells) and (written_as_decimals or alone):
            return True
        # other integers in increasing order (years: 2019,...,2024) above classes of 10 or more rows each,
        # whose label no other row has: a row of names, not an example (unsorted counts stay data)
        numbers = [int(c) for c in cells]
        if alone and all(a < b for a, b in zip(numbers[:-1], numbers[1:], strict=True)):
            return True
    kinds = {_is_number(c) for c in labels}
    if len(kinds) != 1:  # no other rows, or numbers and names mixed (an error, reported later)
        return False
    if _is_number(cells[-1]) != kinds.pop():
        return True
    return not _is_number(cells[-1]) and cells[-1] not in set(labels)


class _Spaces(csv.excel):
    """Cells separated by runs of spaces (the empty cells between them are dropped below)."""

    delimiter = " "
    skipinitialspace = True


#: a number written with a decimal comma (a whole cell): "20,4", "-0,132", "1,5e-3"
_DECIMAL_COMMA = re.compile(r"^(\s*[+-]?\d+),(\d+(?:[eE][+-]?\d+)?\s*)$")


def _decimal_commas(rows: list[tuple[int, list[str]]]) -> bool:
    """Whether a file not separated by commas writes its numbers with decimal commas: some cell is one
    (:data:`_DECIMAL_COMMA`) and no cell is a number with a decimal point."""
    cells = [c.strip() for _, r in rows for c in r]
    return any(_DECIMAL_COMMA.match(c) for c in cells) and not any("." in c and _is_number(c) for c in cells)


def _numbers(lines: list[str], delimiter: str) -> int:
    """How many cells of ``lines`` split at ``delimiter`` are numbers (a decimal comma as a point where
    the delimiter is not a comma)."""
    comma = delimiter != ","
    return sum(
        _is_number(cell.strip().replace(",", ".") if comma else cell.strip())
        for line in lines
        for cell in line.split(delimiter)
    )


def _delimited(d: str) -> type[csv.Dialect]:
    """Excel's dialect with the delimiter ``d`` (its tab dialect for a tab)."""
    return csv.excel_tab if d == "\t" else type("_Delimited", (csv.excel,), {"delimiter": d})


def _dialect(body: str, suffix: str) -> type[csv.Dialect] | csv.Dialect:
    """The delimiter of the text ``body``: csv's sniffer on its first lines, else the one delimiter (tab for
    a ``.tsv``, then ``,``, ``;``) that every one of those lines holds equally often, else runs of spaces
    where every line splits into the same number (>1) of cells, else commas."""
    head = [ln for ln in body.splitlines()[:50] if ln.strip()]

    def every_line(d: str) -> bool:  # the same number (> 0) of ``d`` on every line
        return bool(head) and all(ln.count(d) == head[0].count(d) > 0 for ln in head)

    if suffix == ".tsv" and every_line("\t"):
        return csv.excel_tab
    try:
        sniffed = csv.Sniffer().sniff("\n".join(head), delimiters=",;\t ")
    except csv.Error:
        pass
    else:
        # a headerless ';' file with decimal commas (a European spreadsheet's "20,4;0;1") sniffs as ','
        # where some columns are integers: the rows were split into "20" and a label "4;0;1" and trained
        # as 78 classes of one feature, silently. ';' where it holds the same number of times on every
        # line and its cells (decimal commas read as points) are numbers more often than ','s
        if sniffed.delimiter == "," and every_line(";") and _numbers(head, ";") > _numbers(head, ","):
            return _delimited(";")
        return sniffed
    for d in ("\t", ",", ";"):
        if every_line(d):
            return _delimited(d)
    # columns padded with runs of spaces (numpy.savetxt with a width) defeat the sniffer
    spaced = head and "," not in body and len({len(ln.split()) for ln in head}) == 1
    return _Spaces if spaced and len(head[0].split()) > 1 else csv.excel


def _target_column(target: str, names: list[str] | None, width: int, path: Path) -> int:
    """The 0-based column of ``--target-column``: a 1-based column number (negative: from the end, ``-1``
    the last) -- a number is always one, also where a header names its columns 0, 1, ... -- or else a
    header name."""
    try:
        k = int(target)
    except ValueError:
        if names is not None and target.strip() in names:
            where = [i + 1 for i, name in enumerate(names) if name == target.strip()]
            if len(where) > 1:  # (the first was taken: a feature as the label, the label as a feature)
                raise DataError(
                    f"{path}: the header names {len(where)} columns {target.strip()!r} (columns "
                    f"{', '.join(map(str, where))}); give --target-column the label's column number"
                ) from None
            return names.index(target.strip())
        have = f"the header names {names}" if names is not None else "no header line"
        raise DataError(
            f"{path}: no column {target!r} for --target-column ({have}); give a header name or a column "
            f"number 1..{width} (negative: from the end)"
        ) from None
    if not (1 <= k <= width or -width <= k <= -1):
        raise DataError(
            f"{path}: --target-column {k} is outside the file's columns 1..{width} (or -{width}..-1)"
        )
    return k - 1 if k > 0 else width + k


def _header_note(line: int, cells: list[str]) -> str:
    """``header: line 1, x1,x2,label (skipped)``: a first row read as a header (a guess where its cells are
    numbers), said in the run's header so that a data row taken for one shows."""
    cells = [c.strip() for c in cells]
    shown = ",".join(cells if len(cells) <= 8 else [*cells[:6], "...", cells[-1]])
    more = f" ({len(cells)} columns)" if len(cells) > 8 else ""
    return f"header: line {line}, {shown}{more} (skipped)"


def _read_csv(path: Path, target: str | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Features (floats) and labels (floats, or strings: class names) of a delimited text file, and the
    notes for the run's header (the first row where it was skipped as a header, :func:`_header_note`; a
    missing-value marker as common as a class, read as one): the label
    is the last column, or ``target`` (a column number or a header name, :func:`_target_column`); errors
    name the line of the file (1-based, the header included) and the column. A first column under an
    empty header cell holding distinct integers is pandas' index (``DataFrame.to_csv``), not a feature:
    it is dropped."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:  # (-sig: a byte-order mark is no cell)
            text = fh.read()
    except UnicodeDecodeError:
        zipped = zipfile.is_zipfile(path)
        raise DataError(
            f"cannot read {path} as text (not UTF-8)"
            + (
                "; it is a zip archive -- an .npz? name it with the .npz suffix"
                if zipped
                else "; save it as UTF-8 (Excel: 'CSV UTF-8'; pandas: to_csv(..., encoding='utf-8'))"
            )
        ) from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from None
    lines = text.splitlines(keepends=True)
    # Excel's "sep=;" first line names the delimiter (it was read as a header of the wrong width)
    sep = re.fullmatch(r"\s*sep=(.)\s*", lines[0]) if lines else None
    lines = lines[1:] if sep else lines
    skipped = 0
    while skipped < len(lines) and lines[skipped].lstrip().startswith("#"):  # numpy.savetxt's header
        skipped += 1
    body = "".join(lines[skipped:])
    dialect = _dialect(body, path.suffix.lower()) if sep is None else _delimited(sep.group(1))
    reader = csv.reader(io.StringIO(body, newline=""), dialect)
    rows = [(reader.line_num + skipped + bool(sep), r) for r in reader if r and any(c.strip() for c in r)]
    if not rows:
        raise DataError(f"{path} is empty")
    if dialect.delimiter == " ":  # columns aligned with runs of spaces: empty cells are separators
        rows = [(n, [c for c in r if c.strip()]) for n, r in rows]
    elif all(r[-1].strip() == "" for _, r in rows):  # a delimiter at the end of every line
        rows = [(n, r[:-1]) for n, r in rows]
    notes: list[str] = []
    if dialect.delimiter != "," and _decimal_commas(rows):  # (a European spreadsheet's "20,4;0;1")
        rows = [(n, [_DECIMAL_COMMA.sub(r"\1.\2", c) for c in r]) for n, r in rows]
        notes.append(f"decimal commas read as decimal points ({dialect.delimiter!r}-separated file)")

    width = Counter(len(r) for _, r in rows).most_common(1)[0][0]
    first = rows[0]  # (as in the file: the note names it where it is skipped as a header)
    order = list(range(width))
    header: list[str] | None = None  # the header line's cells, in the file's order
    numbered = target is not None and target.strip().lstrip("+-").isdigit()
    if target is not None and not numbered:  # a name: of the '#' header, or of the first row (then skipped)
        cells: list[str] = []
        in_first = target.strip() in [c.strip() for c in rows[0][1]]
        if skipped and not in_first:  # numpy.savetxt's '# a b c' (its cells without the '#' and empty ones)
            cells = next(csv.reader([lines[skipped - 1].lstrip().lstrip("#").strip()], dialect), [])
        elif in_first:  # (a header line, below '#' comments or not)
            cells = header = rows[0][1]
            rows = rows[1:]
        elif not all(_is_number(c) or not c.strip() for c in rows[0][1][:-1]):  # a header without it
            raise DataError(
                f"{path}: no column {target!r} for --target-column (the header names "
                f"{[c.strip() for c in rows[0][1]]}); give a header name or a column number 1..{width} "
                "(negative: from the end)"
            )
        named = [c.strip() for c in cells if c.strip()]
        if len(named) != width and len(cells) == width and named == [c.strip() for c in cells[1:]]:
            named = [c.strip() for c in cells]  # pandas' header: an empty cell above its index column
        elif len(named) != width and named:  # (a header line of other width: its names, for the message)
            raise DataError(
                f"{path}: no column {target!r} for --target-column: the header names {named} do not fit "
                f"the rows' {width} columns; give a column number 1..{width} (negative: from the end)"
            )
        t = _target_column(target, named if len(named) == width else None, width, path)
    elif target is not None:
        t = _target_column(target, None, width, path)
    # pandas' column numbers as the header, in the file's order (moved, the label's may look like data)
    # (with or without the empty cell above its index column: DataFrame.to_csv()'s default)
    top = [c.strip() for c in rows[0][1]]
    pandas = numbered and top in ([str(k) for k in range(width)], ["", *(str(k) for k in range(width - 1))])
    if target is not None:  # that column to the end: the checks below read the label as the last
        order = [k for k in range(width) if k != t] + [t]
        rows = [(n, [r[k] for k in order] if len(r) == width else r) for n, r in rows]
    # ('#' line above: that is the header -- unless the first row names its features too: comments above
    # a header line, "# exported by ..." -- where its 'a' was reported as "not a number", a probe)
    named_first = bool(rows) and not all(
        _is_number(c) or c.strip().lower() in _MISSING for c in rows[0][1][:-1]
    )
    headed = (target is None or numbered) and (not skipped or named_first) and rows
    row_names = False
    if headed and (pandas or _is_header(rows[0][1], [r for _, r in rows[1:]])):
        head = rows[0][1]
        header = [head[order.index(k)] for k in range(width)] if len(head) == width else None
        rows = rows[1:]
        if len(head) != width and rows:
            # a header of another width was skipped silently: R's write.table's (row names in a first
            # column it does not name) made the row numbers a feature, 95% test accuracy on noise sorted
            # by class (a probe)
            ids = [r[0].strip() for _, r in rows]
            named_rows = all(len(r) == width for _, r in rows) and len(set(ids)) == len(ids)
            if target is None and len(head) == width - 1 and width > 2 and named_rows:
                # (R's default row names 1..N in order, or names: distinct integers of another kind may be
                # a genuine feature under a header that leaves out the label's name -- an error, not a guess)
                if ids == [str(k) for k in range(1, len(ids) + 1)] or not any(_is_number(c) for c in ids):
                    rows = [(n, r[1:]) for n, r in rows]
                    width, order, row_names = width - 1, list(range(width - 1)), True
            if not row_names:
                raise DataError(
                    f"{path}: the header line names {len(head)} columns where the rows have {width}: which "
                    "name goes with which column is unclear; fix the header (or remove it)"
                )
    if not rows:
        raise DataError(f"{path} has a header but no data rows")
    if rows[0][0] != first[0]:
        notes.append(_header_note(*first))
        if all(_is_number(c) for c in first[1][:-1]):  # (a guess either way: wavelengths above spectra,
            # or the only example of a class in a file without a header, a probe)
            notes.append(
                "the skipped first row's features are numbers: if it is an example, not a header, put a "
                "header line above it"
            )
    if row_names:
        notes.append("column 1: row names under no header name (R's write.table), not a feature: dropped")
    comment = lines[skipped - 1].lstrip().lstrip("#") if skipped else ""
    comment_names = [c.strip() for c in comment.replace(dialect.delimiter, " ").split()]
    names = (  # (the header's, or numpy.savetxt's header= on a '#' line)
        [c.strip() for c in header]
        if header is not None and len(header) == width
        else comment_names
        if len(comment_names) == width
        else None
    )
    if target is None and names is not None:
        # a header naming another column as the label: the last is the target all the same (documented;
        # an np.c_[y, X] file ran as a regression on its last feature without a word; a probe)
        labelled = [k for k, c in enumerate(names[:-1]) if c.lower() in _LABEL_NAMES]
        if labelled and names[-1].lower() not in _LABEL_NAMES:
            k = labelled[0]
            notes.append(
                f"target: the last column, {names[-1]!r}, though the header names column {k + 1} "
                f"{names[k]!r}: --target-column {k + 1} to predict that one"
            )
    for n, r in rows:
        if len(r) != width:
            comment = r[0].lstrip().startswith("#")
            raise DataError(
                f"{path}: rows have different numbers of columns: line {n} has {len(r)} where the "
                f"other rows have {width}"
                + (" (a '#' comment, allowed only at the top of the file)" if comment else "")
                + "; every row needs the same columns (features..., label)"
            )
    k0 = order.index(0)
    if header is not None and not header[0].strip() and k0 < width - 1 and width > 2:
        # pandas' index (DataFrame.to_csv's default): an unnamed header cell above distinct integers --
        # row numbers, not a feature (kept, rows sorted by class would leak the label)
        first = [r[k0].strip() for _, r in rows]
        if all(c.lstrip("+-").isdigit() for c in first) and len(set(first)) == len(first):
            rows = [(n, r[:k0] + r[k0 + 1 :]) for n, r in rows]
            order = order[:k0] + order[k0 + 1 :]
    if len(rows[0][1]) < 2:
        raise DataError(f"{path}: need at least 2 columns (features..., label); got {len(rows[0][1])}")
    for n, r in rows:
        for k, c in enumerate(r):
            if not c.strip():
                raise DataError(
                    f"{path}: line {n}, column {order[k] + 1} is empty (a missing value): drop the row, or "
                    "fill it in (impute the value, e.g. with the column's mean)"
                )
            if k < len(r) - 1 and not _is_number(c):
                thousands = re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+(\.\d+)?", c.strip()) is not None
                comma = _is_number(c.strip().replace(",", ".", 1)) and "," in c
                raise DataError(
                    f"{path}: line {n}, column {order[k] + 1}: {c.strip()!r} is not a number (features "
                    "must be numeric; only the label, the last column or --target-column's, may be a class "
                    "name)"
                    + (
                        "; a thousands separator or a decimal comma? write plain numbers (52300, or 52.3)"
                        if thousands
                        else "; a decimal comma? write numbers with a decimal point"
                        if comma
                        else ""
                    )
                )
    X = np.array([[float(c) for c in r[:-1]] for _, r in rows], dtype=np.float64)
    bad = ~np.isfinite(X)
    if bad.any():  # 'nan', 'inf' (numbers to float(), but no features)
        hit = np.flatnonzero(bad.any(1))
        j = int(np.flatnonzero(bad[hit[0]])[0])
        n, r = rows[hit[0]]
        raise DataError(
            f"{path}: line {n}, column {order[j] + 1} is {r[j].strip()!r}: features must be finite numbers "
            f"({_non_finite_advice(len(hit))})"
        )
    labels = [r[-1].strip() for _, r in rows]
    missing = [i for i, c in enumerate(labels) if c.lower() in _MISSING]
    others_numbers = bool(missing) and all(
        _is_number(c) for i, c in enumerate(labels) if c.lower() not in _MISSING
    )
    if missing and 20 * len(missing) > len(labels) and not others_numbers:
        # (as common as a class among class names: 'NA' for North America; among numbers, missing values)
        marker = labels[missing[0]]
        notes.append(
            f"labels: {marker!r} ({len(missing)} rows) read as a class, not as a missing value (remove those "
            "rows if it marks one)"
        )
    elif missing:  # (not a class of its own: 'yes', 'no' and '?' made three)
        n = rows[missing[0]][0]
        raise DataError(
            f"{path}: line {n}: the label is {labels[missing[0]]!r}, a missing value"
            + (
                f" ({len(missing)} rows in all); remove those rows or give their labels"
                if len(missing) > 1
                else "; remove the row or give its label"
            )
        )
    numeric = [_is_number(c) for c in labels]
    if all(numeric):
        return X, np.array([float(c) for c in labels], dtype=np.float64), notes
    if any(numeric):
        i, j = numeric.index(False), numeric.index(True)
        raise DataError(
            f"{path}: the label column mixes class names and numbers (line {rows[i][0]}: "
            f"{labels[i]!r}, line {rows[j][0]}: {labels[j]!r}); use numbers or names throughout"
        )
    return X, np.array(labels), notes  # class names


def _non_finite_advice(k: int) -> str:
    """What to do about ``k`` rows with NaN or infinity in their features."""
    if k == 1:
        return "the only row with NaN or infinity: drop it, or impute the value, e.g. with the column's mean"
    return f"{k} rows have NaN or infinity: drop them, or impute the values, e.g. with the columns' means"


def load_file(
    path: str | Path, target: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``(X, y, X_test, y_test)`` from a ``.npz`` or ``.csv`` file (the test arrays may be None);
    ``target``: the label column of a ``.csv`` file (:func:`_read_csv`; default the last)."""
    return _load_file(path, target)[:4]


def _load_file(
    path: str | Path, target: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None, list[str]]:
    """:func:`load_file`'s arrays, and notes for the run's header (:func:`_read_csv`'s)."""
    if not str(path).strip():  # (Path("") is ".", a directory)
        raise DataError(
            "the data path is empty (an unset variable?): give a file (.npz, .csv) or one of "
            + ", ".join(DATASETS)
        )
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if not path.is_file():
        raise DataError(f"{path} is not a file")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        if target is not None:
            raise DataError(
                f"{path}: --target-column picks a column of a .csv file; an .npz file names its arrays"
            )
        return _read_npz(path)
    if suffix in (".csv", ".tsv", ".txt"):
        X, y, notes = _read_csv(path, target)
        return X, y, None, None, notes
    raise DataError(f"{path}: unsupported file type {suffix or '(none)'}; use .npz or .csv")


def save_dataset(path: str | Path, X: np.ndarray, y: np.ndarray) -> Path:
    """Write ``X`` (N, d) and ``y`` (N,) as ``.npz`` or ``.csv`` (by suffix) readable by :func:`load_file`."""
    path = Path(path)
    X, y = np.asarray(X), np.asarray(y)
    if path.suffix.lower() == ".npz":
        np.savez(path, X=X, y=y)
    elif path.suffix.lower() == ".csv":
        A = np.column_stack([X.reshape(len(X), -1), y.reshape(len(y), -1)])
        header = ",".join([f"x{i}" for i in range(A.shape[1] - 1)] + ["y"])
        fmt = "%.17g" if not np.issubdtype(y.dtype, np.integer) else ["%.17g"] * (A.shape[1] - 1) + ["%d"]
        np.savetxt(path, A, delimiter=",", header=header, comments="", fmt=fmt)
    else:
        raise DataError(f"{path}: unsupported file type; use .npz or .csv")
    return path


# -- assembling a Dataset -----------------------------------------------------------------------
def _as_features(X: np.ndarray, what: str, name: str = "X") -> np.ndarray:
    """``X`` as a float64 ``(N, d)`` array with ``N, d >= 1``; :class:`DataError` otherwise (``name``: the
    array's, for the position of a NaN)."""
    X = np.asarray(X)
    if X.dtype.kind not in "biuf":
        raise DataError(f"{what}: features must be numeric, got dtype {X.dtype}")
    if X.ndim == 0:
        raise DataError(
            f"{what}: the features are a single number; they must be an array, one row per example"
        )
    if len(X) == 0:
        raise DataError(f"{what}: no examples (the features have shape {X.shape})")
    if X.ndim == 1:
        X = X[:, None]
    shape = X.shape
    X = X.reshape(len(X), -1).astype(np.float64)
    if X.shape[1] == 0:
        raise DataError(
            f"{what}: no feature columns (the features have shape {X.shape}); each example needs at "
            "least one feature"
        )
    bad = ~np.isfinite(X)
    if bad.any():
        hit = np.flatnonzero(bad.any(1))
        i, j = int(hit[0]), int(np.flatnonzero(bad[hit[0]])[0])
        at = ", ".join(str(int(k)) for k in (i, *np.unravel_index(j, shape[1:] or (1,))))
        raise DataError(
            f"{what}: {name}[{at}] is {X[i, j]} (0-based row, column): features must be finite numbers "
            f"({_non_finite_advice(len(hit))})"
        )
    return X


def _infer_task(y: np.ndarray) -> str:
    """``classification`` for one label per example that is a class name (a string) or an integer
    value (of any dtype: 3 and 3.0 alike; a float below 2^53 in magnitude) with at most
    :data:`MAX_CLASSES` distinct values; else
    ``regression``: the rule of :data:`hessinv.cli.choices.DATA_FORMAT`, the same for every source."""
    y = np.asarray(y)
    if y.ndim > 1 and math.prod(y.shape[1:]) > 1:
        return "regression"
    v = y.reshape(-1)
    if v.dtype.kind in "US":  # class names
        return "classification"
    if v.dtype.kind not in "biuf":
        return "regression"  # refused there with the reason
    # (a float of magnitude 2^53 or more is integer-valued whatever it measures: 1e300 is no class id)
    small = v.dtype.kind != "f" or not bool((np.abs(v.astype(np.float64)) >= 2.0**53).any())  # (float16: 2^53
    # overflowed its cast, a warning for an ordinary file)
    v = v.astype(np.float64)
    if small and np.isfinite(v).all() and np.all(v == np.round(v)) and len(np.unique(v)) <= MAX_CLASSES:
        return "classification"
    return "regression"


def _task_note(y: np.ndarray, task: str) -> str | None:
    """A run header's line where :func:`_infer_task`'s rule may have guessed wrong: integer labels with
    many values (classes, or counts and prices?), more integer values than :data:`MAX_CLASSES` (read as
    quantities), or one-hot rows (read as several regression targets)."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1 and y.dtype.kind in "biuf":
        v = y.astype(np.float64)
        if np.isin(v, (0.0, 1.0)).all() and (v.sum(1) == 1).all():
            return (f"task: regression on {y.shape[1]} targets -- the labels look one-hot: for classes, "
                    "give one class index per example (y.argmax(1))")  # fmt: skip
        return None
    v = y.reshape(-1)
    if v.dtype.kind not in "biuf" or not np.isfinite(v.astype(np.float64)).all():
        return None
    # (floats of magnitude 2^53 or more are whole numbers whatever they measure: no class ids, as in
    # _infer_task -- targets of 1e40 were noted "--task classification if they are classes")
    big = v.dtype.kind == "f" and bool((np.abs(v.astype(np.float64)) >= 2.0**53).any())
    whole = not big and bool(np.all(v == np.round(v)))
    k = len(np.unique(v))
    if task == "classification" and whole and k > 20:
        return f"task: classification, {k} classes (integer labels); --task regression if they are quantities"
    if task == "regression" and whole and k > MAX_CLASSES:
        return (f"task: regression ({k} distinct integer values, above {MAX_CLASSES} classes); "
                "--task classification if they are classes")  # fmt: skip
    return None


def _test_size(n: int, test_fraction: float) -> int:
    return min(max(int(round(n * test_fraction)), 1), n - 1)


def _split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_test = _test_size(n, test_fraction)
    return perm[n_test:], perm[:n_test]


def _stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """Train and test indices with every class in the training split: each class holds out about
    ``test_fraction`` of its examples (the largest remainders rounded up, as many test examples in all as
    :func:`_split` where the classes leave room) but never its last one -- a class of one example is in the
    training split only. None where no class has two examples (no test example is possible)."""
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    room = counts - 1
    if not room.sum():
        return None
    n = len(labels)
    n_test = min(_test_size(n, test_fraction), int(room.sum()))
    share = counts * (n_test / n)
    take = np.minimum(np.floor(share).astype(np.int64), room)
    for c in np.argsort(take - share, kind="stable"):  # (the largest remainders first, then any room)
        if take.sum() >= n_test:
            break
        take[c] += take[c] < room[c]
    for c in range(len(classes)):
        while take.sum() < n_test and take[c] < room[c]:
            take[c] += 1
    rng = np.random.default_rng(seed)
    test = [rng.permutation(np.flatnonzero(inverse == c))[: take[c]] for c in range(len(classes))]
    test = rng.permutation(np.concatenate(test))
    train = rng.permutation(np.setdiff1d(np.arange(n), test))
    return train, test


def _classes_text(values: np.ndarray, labels: np.ndarray, counts: bool = True) -> str:
    """``class 2 (1 example)``, ``classes 2 (1 example), 7 (3 examples)``: ``values`` and their counts in
    ``labels`` (the first 5); ``counts=False``: ``2, 7``."""
    values = np.asarray(values).reshape(-1)
    shown = []
    for v in values[:5]:
        x = v.item() if hasattr(v, "item") else v
        # (integer-valued labels read as floats from a file: 0, not 0.0)
        x = int(x) if isinstance(x, float) and x.is_integer() and abs(x) < 2**53 else x
        k = int(np.sum(labels == v))
        shown.append(f"{x} ({k} example{'s' if k != 1 else ''})" if counts else str(x))
    if not counts:
        return ", ".join(shown) + (", ..." if len(values) > 5 else "")
    more = f", ... ({len(values)} in all)" if len(values) > 5 else ""
    return f"class{'es' if len(values) > 1 else ''} {', '.join(shown)}{more}"


def _many_values(labels: np.ndarray) -> bool:
    """Numbers with many distinct values (an age, a count): maybe regression targets -- not said of a
    handful of examples (2 examples of 2 classes were told --task regression; a review)."""
    n = len(labels)
    return labels.dtype.kind in "biuf" and n >= 10 and len(np.unique(labels)) > min(n // 2, 20)


def _stratified_note(labels: np.ndarray, alone: np.ndarray, targets_hint: bool) -> str:
    """The run header's line on a stratified split (:func:`_stratified_split`)."""
    classes, counts = np.unique(labels, return_counts=True)
    single = classes[counts == 1]
    text = f"split: stratified by class (a random split put {_classes_text(alone, labels)} in the test split"
    text += " only)"
    if len(single):
        verb = "is" if len(single) == 1 else "are"
        text += f"; {_classes_text(single, labels)} {verb} in the training split only (not tested)"
    if targets_hint and _many_values(labels):
        text += "; if the labels are numeric targets: --task regression"
    return text


def load_dataset(
    name: str,
    *,
    seed: int = 0,
    test_fraction: float | None = None,
    n_samples: int | None = None,
    task: str = "auto",
    standardize: bool = True,
    target: str | None = None,
) -> Dataset:
    """A :class:`Dataset` (float64 CPU tensors) by name or file path; deterministic in ``seed``.

    ``n_samples`` caps the number of examples (train + test; built-ins generate that many), and
    ``test_fraction`` (default :data:`TEST_FRACTION`) is held out as the test split; a file with its own
    test split (``X_test``/``y_test``) takes neither. Classification classes are those of the
    training labels; ``target`` picks a ``.csv`` file's label column (a 1-based column number, or a header
    name; default the last). Raises :class:`DataError` for an unknown name, an unreadable/malformed
    file, or data these settings cannot apply to.
    """
    if test_fraction is not None and not 0.0 < test_fraction < 1.0:
        raise DataError(f"test fraction must be in (0, 1), got {test_fraction}")
    if n_samples is not None and not n_samples >= 2:
        raise DataError(
            f"the number of examples must be an integer >= 2 (a training and a test example), got {n_samples}"
        )
    Xt = yt = None
    from_file = False
    asked = task
    notes: list[str] = []
    key = name.lower()
    if key == "digits":
        X, y = _digits()
        label = "digits"
    elif key == "mnist1d":
        X, y = _mnist1d(seed, n_samples)
        label = "mnist1d"
    elif key == "regression":
        X, y = _regression(seed, n_samples)
        label = "regression"
    elif (
        Path(name).suffix.lower() in (".npz", ".csv", ".tsv", ".txt")
        or Path(name).exists()
        or not key.strip()  # (load_file says it is empty)
    ):
        X, y, Xt, yt, notes = _load_file(name, target)
        label = Path(name).name
        from_file = True
    else:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)} or a .npz/.csv file")
    if target is not None and key in ("digits", "mnist1d", "regression"):
        raise DataError(f"--target-column picks a column of a .csv file; {name} has its own labels")

    X = _as_features(X, label)
    y = np.asarray(y)
    if y.ndim == 0 or len(y) != len(X):
        raise DataError(f"{label}: {len(X)} feature rows but labels/targets of shape {y.shape}")
    if y.ndim > 1 and math.prod(y.shape[1:]) == 0:
        raise DataError(
            f"{label}: the labels/targets have no columns (shape {y.shape}); give one label or at least "
            "one target per example"
        )
    if len(X) < 2:
        raise DataError(f"{label}: need at least 2 examples, got {len(X)}")
    own_test = Xt is not None
    if own_test:
        given = [
            o for o, v in (("--samples", n_samples), ("--test-fraction", test_fraction)) if v is not None
        ]
        if given:
            raise DataError(
                f"{label} has its own test split (X_test, y_test), so {' and '.join(given)} cannot apply: "
                "leave it out, or remove X_test and y_test from the file to split it"
            )
        Xt = _as_features(Xt, label + " (test)", "X_test")
        yt = np.asarray(yt)
        if (
            Xt.shape[1] != X.shape[1]
            or yt.ndim == 0
            or len(yt) != len(Xt)
            or math.prod(yt.shape[1:]) != math.prod(y.shape[1:])
        ):
            raise DataError(
                f"{label}: test arrays {Xt.shape}/{yt.shape} do not match train {X.shape}/{y.shape} (the "
                "same number of features and of targets per example; one label or target per test row)"
            )
    if task == "auto":
        task = _infer_task(y)
        guess = _task_note(y, task)
        if guess:
            notes.append(guess)
    if task not in ("classification", "regression"):
        raise DataError(f"unknown task {task!r}; use auto, classification or regression")
    if task == "classification" and math.prod(y.shape[1:]) != 1:
        raise DataError(
            f"{label}: classification labels must be one per example, shape (N,); got {y.shape} (for "
            "several targets per example: --task regression)"
        )

    if not own_test:
        if n_samples is not None and n_samples > len(X):
            raise DataError(
                f"{label} has {len(X)} examples, fewer than the {n_samples} asked for (--samples); "
                "leave --samples out to use all of them"
            )
        if n_samples is not None and n_samples < len(X):
            keep = np.sort(np.random.default_rng(seed + 1).permutation(len(X))[:n_samples])
            X, y = X[keep], y[keep]
        fraction = TEST_FRACTION if test_fraction is None else test_fraction
        tr, te = _split(len(X), fraction, seed)
        labels = y.reshape(-1)
        if (
            task == "classification"
            and (labels.dtype.kind != "f" or np.isfinite(labels).all())  # (NaN: refused below)
            and not np.isin(labels[te], labels[tr]).all()
        ):  # a class in the test split only, which a classifier cannot learn: split each class instead
            stratified = _stratified_split(labels, fraction, seed)
            if stratified is not None:
                alone = np.setdiff1d(labels[te], labels[tr])
                notes.append(_stratified_note(labels, alone, targets_hint=asked == "auto"))
                tr, te = stratified
        X, Xt, y, yt = X[tr], X[te], y[tr], y[te]

    n_classes = None
    target_stats: tuple[tuple[float, ...] | None, tuple[float, ...] | None] = (None, None)
    if task == "classification":
        yy = np.concatenate([y.reshape(-1), yt.reshape(-1)])  # one dtype for both splits
        where = None
        if own_test and yy.dtype.kind == "f":  # which array: an .npz's own test split names its labels
            ok = [bool(np.isfinite(a).all() and np.all(a == np.round(a))) for a in (y, yt)]
            where = "y" if not ok[0] else ("y_test" if not ok[1] else None)
        of = f" (in {where})" if where else ""
        if yy.dtype.kind == "f" and not np.isfinite(yy).all():
            raise DataError(f"{label}: classification labels contain NaN or infinity{of}")
        if yy.dtype.kind == "f" and not np.all(yy == np.round(yy)):
            raise DataError(
                f"{label}: classification labels must be integers{of}; for real-valued targets use --task "
                "regression"
            )
        y, yt = yy[: len(y)], yy[len(y) :]
        classes = np.unique(y)
        unseen = np.setdiff1d(yt, classes).tolist()
        numeric = yy.dtype.kind in "biuf"
        if unseen:
            shown = _classes_text(np.asarray(unseen), yt, counts=False)
            many = numeric and asked == "auto" and _many_values(yy)
            raise DataError(
                f"{label}: the test labels have classes the training labels do not ({shown}), which a "
                "classifier cannot learn: "
                + (
                    f"y_test holds {_classes_text(np.asarray(unseen), yt)}; y_test must use the classes of "
                    "y: drop those rows of X_test and y_test, or add examples of them to X and y"
                    if own_test
                    # (the split is stratified where a class has 2 examples: here every class has one)
                    else f"every class has a single example ({_classes_text(np.unique(yy), yy)}), so none "
                    "can be in both splits: give at least 2 examples of a class"
                    + (" (--samples larger)" if label in DATASETS else "")
                )
                + ("; if the labels are numeric targets: --task regression" if many else "")
            )
        if len(classes) < 2:
            raise DataError(f"{label}: classification needs at least 2 classes, got {len(classes)}")
        y = np.searchsorted(classes, y).astype(np.int64)
        yt = np.searchsorted(classes, yt).astype(np.int64)
        n_classes = len(classes)
        ytr_t, yte_t = torch.from_numpy(y), torch.from_numpy(yt)
    else:
        if y.dtype.kind not in "biuf":
            raise DataError(
                f"{label}: regression targets must be numeric (got {y.dtype}; "
                "for class labels: --task classification)"
            )
        y = y.reshape(len(y), -1).astype(np.float64)
        yt = yt.reshape(len(yt), -1).astype(np.float64)
        if not (np.isfinite(y).all() and np.isfinite(yt).all()):
            bad = int((~np.isfinite(y).all(1)).sum() + (~np.isfinite(yt).all(1)).sum())
            raise DataError(
                f"{label}: targets contain NaN or infinity ({bad} example{'s' if bad > 1 else ''}): drop "
                "those examples, or fill the values in"
            )
        if standardize and (from_file or key != "regression") and len(y):
            # a file's targets have any scale (diabetes: 152 +- 77; 2000 steps ended above the MSE of
            # predicting the mean), a built-in's class labels taken as targets (--task regression) too
            # (digits' 0..9: Newton warned to standardize them, which the CLI offered no way to):
            # standardized like the features, the statistics kept for the report; the built-in
            # regression's teacher outputs are its own (DEFAULT_TARGET is an MSE of them)
            top = np.abs(y).max(0)
            top = np.where(np.isfinite(top) & (top > 0), top, 1.0)
            mu_y, sd_y = (y / top).mean(0) * top, (y / top).std(0) * top
            sd_y = np.where(sd_y > 64 * np.finfo(np.float64).eps * top, sd_y, 0.0)  # 0: constant
            y, yt = (y - mu_y) / np.where(sd_y > 0, sd_y, 1.0), (yt - mu_y) / np.where(sd_y > 0, sd_y, 1.0)
            target_stats = (tuple(map(float, mu_y)), tuple(map(float, sd_y)))
        ytr_t, yte_t = torch.from_numpy(y), torch.from_numpy(yt)

    if standardize:
        # the mean and spread of each column scaled by its largest |value| (the variance of values beyond
        # ~1e154 overflows), then scaled back: both at most that value, finite
        top = np.abs(X).max(0) if len(X) else np.ones(X.shape[1:])
        top = np.where(np.isfinite(top) & (top > 0), top, 1.0)
        mu, sd = (X / top).mean(0) * top, (X / top).std(0) * top
        # constant up to the rounding of the mean and spread above (a few u of the column's size)
        sd = np.where(sd > 64 * np.finfo(np.float64).eps * top, sd, 1.0)
        X, Xt = (X - mu) / sd, (Xt - mu) / sd
    return Dataset(
        label,
        task,
        torch.from_numpy(np.ascontiguousarray(X)),
        ytr_t,
        torch.from_numpy(np.ascontiguousarray(Xt)),
        yte_t,
        n_classes,
        *target_stats,
        tuple(notes),
    )
