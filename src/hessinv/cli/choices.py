"""Names, defaults and checks of the command line that need no torch (``hessinv --help`` stays fast).

Names are accepted in either spelling, ``gauss-newton`` or ``gauss_newton`` (the Python API spells
``curvature="gauss_newton"``), and in any case; they are stored hyphenated.

>>> canonical("Gauss_Newton"), canonical(" levenberg_marquardt ")
('gauss-newton', 'levenberg-marquardt')
>>> parse_per_optimizer(["adam=1e-3,newton=2"], "--lr", float)
{'adam': 0.001, 'newton': 2.0}
"""

from __future__ import annotations

import math
import signal
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

__all__ = [
    "ACTIVATIONS",
    "DAMPINGS",
    "DATASETS",
    "DATA_FORMAT",
    "DEFAULT_LR",
    "DEFAULT_STEPS",
    "DEFAULT_TARGET",
    "DeviceUnavailableError",
    "INITS",
    "Interrupted",
    "LR_GRID",
    "OPTIMIZERS",
    "PEER_LR",
    "TEST_FRACTION",
    "UserError",
    "canonical",
    "install_hint",
    "interrupt_reason",
    "interrupt_signal",
    "output_directory",
    "parse_per_optimizer",
    "resolve_device",
    "signal_name",
]

# Third-party optimizers (the ``bench`` extra) and their library-default learning rates; the grid
# --tune picks from is the default and a factor 3 either side (hessinv.cli.baselines.PEERS).
PEER_LR = {"soap": 3e-3, "psgd": 1e-3, "adahessian": 0.1, "sophiah": 0.06}
# The optimizers of ``hessinv train``, in the order of the default list and of the table.
OPTIMIZERS = ("newton", "newton-tr", "gauss-newton", "adam", "sgd", "lbfgs", "hessian-free", *PEER_LR)
# Steps per optimizer of the default job (``hessinv train`` without --steps): a step budget makes the
# table the same under any machine load. Chosen so that each run takes about 30-45 s on one idle core
# (a first-order step costs ~3 ms, an amortized newton step ~5 ms, a trust-region step ~150 ms on the
# default chain and batch).
DEFAULT_STEPS = {
    "newton": 15000,
    "newton-tr": 250,
    "gauss-newton": 250,
    "adam": 12000,
    "sgd": 12000,
    "lbfgs": 600,
    "hessian-free": 400,
}
# learning rates: the default of each optimizer, and the grid --tune picks from (sgd/adam/lbfgs)
DEFAULT_LR = {
    "newton": 1.0, "newton-tr": 1.0, "gauss-newton": 1.0, "adam": 3e-3, "sgd": 0.1, "lbfgs": 1.0,
    "hessian-free": 1.0,
}  # fmt: skip
DEFAULT_LR.update(PEER_LR)
LR_GRID = {
    "sgd": (0.01, 0.03, 0.1, 0.3),
    "adam": (1e-3, 3e-3, 1e-2, 3e-2),
    "lbfgs": (0.1, 0.3, 1.0),
    **{k: (lr / 3, lr, lr * 3) for k, lr in PEER_LR.items()},
}
DEFAULT_TARGET = {"digits": 1.0, "mnist1d": 1.0, "regression": 1e-4}  # train loss of the table
DATASETS = ("digits", "mnist1d", "regression")
TEST_FRACTION = 0.2  # the share of the examples held out as the test split (--test-fraction)
# The data-file format, shown by ``hessinv train --help`` (and in the README).
DATA_FORMAT = """\
data files (--data PATH):
  .npz  arrays X (or x, features, inputs, data): one example per row (N, d), higher-rank arrays are
        flattened per example; y (or labels, targets, target, label): N labels or (N, k) targets;
        optionally X_test and y_test (the file's own split: --test-fraction and --samples are refused).
  .csv  (also .tsv, .txt) one example per row, separated by commas, semicolons, tabs or spaces; the
        LAST column is the label or target (--target-column NUMBER or NAME picks another); an
        optional header line is skipped, and named in the run's header (names, or pandas' column
        numbers 0,1,...; a first row whose only non-numbers are missing values is data).
  Labels that are class names (strings), or integer-valued numbers (below 2^53 in magnitude, where
  a float can hold a fraction) with at most 100 distinct values, make a classification task (the
  classes of the training labels, mapped to 0..C-1; a split that would put a class in the test split
  only is stratified by class; a label of the file's own y_test outside them is an error); anything
  else regression (--task overrides). Features -- and a file's regression targets (a built-in's labels
  under --task regression too), so that a loss of 1 is predicting the training mean -- are
  standardized with the training split's mean and standard deviation. Nothing is downloaded."""
# activation name -> its torch.nn module class
ACTIVATIONS = {
    "tanh": "Tanh",
    "relu": "ReLU",
    "gelu": "GELU",
    "sigmoid": "Sigmoid",
    "softplus": "Softplus",
    "silu": "SiLU",
    "elu": "ELU",
}
INITS = ("torch", "xavier", "orthogonal")
DAMPINGS = ("trust-region", "levenberg-marquardt")  # hessinv.optim.Newton(damping=...)

T = TypeVar("T")


class UserError(Exception):
    """A mistake in the command line or its inputs: reported in one line, exit status 2."""


class DeviceUnavailableError(UserError):
    """The requested device (e.g. ``cuda``) does not exist on this machine."""


class Interrupted(KeyboardInterrupt):
    """A stop asked by a signal, ``signum`` (SIGTERM: ``kill``, ``timeout``, a scheduler's time limit; in
    the ranks of ``--nproc``, SIGINT too), handled as Ctrl-C's KeyboardInterrupt is: the runs so far are
    kept and written, and the exit status is 128 + ``signum``."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        super().__init__(signal_name(self.signum))


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def interrupt_signal(e: BaseException) -> int:
    """The signal behind a KeyboardInterrupt: an :class:`Interrupted`'s, else SIGINT (Ctrl-C)."""
    return getattr(e, "signum", int(signal.SIGINT))


def interrupt_reason(signum: int) -> str:
    """``interrupted by the user`` (SIGINT: Ctrl-C) or ``stopped by SIGTERM``."""
    return "interrupted by the user" if signum == signal.SIGINT else f"stopped by {signal_name(signum)}"


def install_hint(extra: str) -> str:
    """How to install the ``extra`` packages of hessinv (``cli``, ``bench``): the README installs from the
    checkout (``pip install '.[cli]'``); ``'hessinv[cli]'`` only works where hessinv came from an index."""
    return (
        f"pip install '.[{extra}]' in the hessinv checkout (or pip install 'hessinv[{extra}]' where hessinv "
        "was installed from a package index)"
    )


def canonical(name: str) -> str:
    """``name`` lower-cased and hyphenated: ``gauss_newton`` and ``Gauss-Newton`` -> ``gauss-newton``."""
    return name.strip().lower().replace("_", "-")


def parse_per_optimizer(
    items: list[str],
    option: str,
    convert: Callable[[str], T],
    value: str = "VALUE",
    example: str = "adam=1e-3",
    selected: Sequence[str] | None = None,
) -> dict[str, T]:
    """``NAME=VALUE`` pairs (repeatable, comma-separated) keyed by canonical optimizer name.

    ``convert`` turns the value text into a value or raises ``ValueError`` with the reason. With
    ``selected`` (the optimizers that run), a NAME not among them is refused: its value would be ignored.
    """
    out: dict[str, T] = {}
    for item in items:
        for part in filter(None, (s.strip() for s in item.split(","))):
            name, sep, val = part.partition("=")
            if not sep:
                raise UserError(f"{option} expects NAME={value} (e.g. {example}), got {part!r}")
            name = canonical(name)
            if name not in OPTIMIZERS:
                raise UserError(f"{option}: unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
            if selected is not None and name not in selected:
                raise UserError(
                    f"{option} {part}: {name} is not selected (--optimizers {','.join(selected)}); "
                    f"add it to --optimizers or leave {name} out of {option}"
                )
            if name in out:
                raise UserError(f"{option} gives {name} twice ({item}): give it once")
            try:
                out[name] = convert(val.strip())
            except ValueError as e:
                raise UserError(f"{option} {name}: {e}") from None
    return out


def positive_float(text: str) -> float:
    """A finite number > 0 (``ValueError`` otherwise)."""
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"not a number: {text!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"expected a positive number, got {text!r}")
    return v


def positive_int(text: str) -> int:
    """An integer >= 1 (``ValueError`` otherwise)."""
    try:
        v = int(text)
    except ValueError:
        raise ValueError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise ValueError(f"expected a positive integer, got {text!r}")
    return v


def out_path(text: str | Path) -> Path:
    """``--out`` as a path; :class:`UserError` for an empty one (what ``--out "$UNSET"`` gives:
    ``Path("")`` is the current directory)."""
    if not str(text).strip():
        raise UserError("--out is empty (an unset variable?); give a directory, e.g. --out runs/job")
    return Path(text)


def output_directory(path: str | Path) -> Path:
    """``path`` as a directory that exists and can be written (created if needed; checked by creating
    and removing a file in it); :class:`UserError` otherwise (a file, ``/proc``, a read-only mount, an
    empty path: what ``--out "$UNSET"`` gives, which would write into the current directory)."""
    out = out_path(path)
    for p in (out, *out.parents):  # (mkdir's errno text, "File exists", did not say which or why)
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                where = "it" if p == out else f"{p}, in its path,"
                raise UserError(
                    f"cannot write to the output directory {out}: {where} is a file, not a directory (give "
                    "a directory, new or existing)"
                )
            break
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".hessinv-write-check-"):
            pass
    except OSError as e:
        raise UserError(f"cannot write to the output directory {out}: {e.strerror or e}") from None
    return out


def resolve_device(text: str) -> str:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA if available) checked against this machine.

    Raises :class:`DeviceUnavailableError` for a CUDA device this machine does not have, and
    :class:`UserError` for anything else unknown.
    """
    import torch

    text = text.strip().lower()
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return text
    if text == "cuda" or text.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                f"--device {text}: CUDA is not available on this machine (use --device cpu)"
            )
        try:
            dev = torch.device(text)
        except RuntimeError as e:
            raise UserError(f"--device {text}: {e}") from None
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceUnavailableError(
                f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
        return text
    raise UserError(f"unknown device {text!r}; use cpu, cuda, cuda:N or auto")
