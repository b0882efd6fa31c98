"""The ``hessinv`` command line.

``hessinv train``  second-order vs first-order training on real data, with logs, a table and plots.
``hessinv bench solve ...``  the solve benchmark (``bench/solve.py`` of the repository).
``hessinv spectrum``  the exact eigenvalue histogram of the curvature, with a plot (``cli/spectrum.py``).

::

    hessinv train      # digits, depth-16 width-8 tanh chain, newton/gauss-newton/adam/sgd, fixed steps
    hessinv train --data mnist1d --depth 24 --width 16 \
        --optimizers newton,gauss-newton,adam,sgd,lbfgs,hessian-free \
        --budget 120s --steps none --target-loss 0.05 --out runs/mnist1d
    hessinv train --data my.csv --steps 500 --lr adam=1e-3 --no-tune
    hessinv bench solve --quick

``hessinv train`` writes ``<optimizer>.jsonl`` (one line per step: step, training time, batch loss,
the optimizer's statistics, and train/test loss and accuracy where evaluated), ``summary.json``,
``table.md`` (time to the target train loss) and ``loss.png`` to ``--out`` (default
``runs/<data>``). Each optimizer stops at its step budget or the time budget, whichever comes
first; the time counts optimizer steps only (evaluation excluded).

Exit status: 0 when the job ran (at least one optimizer finished without diverging, none failed), 3
when some optimizer failed with an error and another finished (a line on stderr names the failed ones;
a diverged run is a training outcome, marked in the table), 1 when every run diverged or failed (or the
results could not be written), 2 for a usage error (unknown
dataset or optimizer, unreadable data file, bad option, a value the library refuses, an output
directory that cannot be written, unavailable device), 130 when interrupted (Ctrl-C, SIGINT) and 143
when stopped by SIGTERM (``kill``, ``timeout``, a scheduler) -- ``hessinv train`` then writes what it
measured, also with ``--nproc N`` (:mod:`hessinv.cli.distributed`). Errors are reported in one line,
without a traceback.

Importing this module imports neither torch nor matplotlib: ``hessinv --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
import textwrap
import types
import warnings
from pathlib import Path

from hessinv import __version__
from hessinv.cli.choices import (
    ACTIVATIONS,
    DAMPINGS,
    DATA_FORMAT,
    DATASETS,
    DEFAULT_LR,
    DEFAULT_STEPS,
    DEFAULT_TARGET,
    INITS,
    LR_GRID,
    OPTIMIZERS,
    TEST_FRACTION,
    Interrupted,
    UserError,
    canonical,
    install_hint,
    interrupt_reason,
    interrupt_signal,
    out_path,
    parse_per_optimizer,
    positive_float,
    positive_int,
    resolve_device,
)
from hessinv.errors import HessinvError, out_of_memory

__all__ = ["main", "parse_duration", "build_parser"]

DEFAULT_OPTIMIZERS = "newton,gauss-newton,adam,sgd"
DEFAULT_BUDGET = 120.0  # seconds per optimizer: a cap; the default job stops at DEFAULT_STEPS first
DEFAULT_OUT = "runs/{data}"
MAX_SEED = 2**32 - 1  # mnist1d seeds numpy's legacy generator, which takes 32 bits
SAMPLES_DEFAULT = "all of them; digits 1797, mnist1d 5000, regression 2000"  # --samples of train, spectrum


#: ``train`` notes, before the run, an optimizer whose every step factors a curvature of more flops than
#: this (about a second on a CPU core)
COSTLY_FACTORIZATION_FLOPS = 2e10


def parse_duration(text: str) -> float:
    """Seconds from ``120``, ``120s``, ``2m``, ``2min``, ``1.5h``, or parts of those in decreasing units:
    ``1m30s``, ``1h 30m`` (units in any case).

    >>> parse_duration("120s"), parse_duration("2m"), parse_duration("0.5"), parse_duration("1m30s")
    (120.0, 120.0, 0.5, 90.0)
    """
    number = r"[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?"
    unit = r"(?:s|sec|secs|seconds?|m|min|mins|minutes?|h|hrs?|hours?)"
    bad = argparse.ArgumentTypeError(f"invalid duration {text!r}; use e.g. 120s, 2m, 1m30s or 90")
    m = re.fullmatch(rf"\s*([-+]?)((?:{number}\s*{unit}\s*)+|{number}\s*)", text.lower())
    if not m:
        raise bad
    parts = re.findall(rf"({number})\s*({unit})?", m.group(2))
    scale = {"s": 1.0, "m": 60.0, "h": 3600.0}
    units = [scale[(u or "s")[0]] for _, u in parts]
    if any(a <= b for a, b in zip(units[:-1], units[1:], strict=True)):  # (1m30s, not 30s1m or 1m1m)
        raise bad
    value = sum(float(v) * u for (v, _), u in zip(parts, units, strict=True))
    value = -value if m.group(1) == "-" else value
    if not value > 0:
        raise argparse.ArgumentTypeError(f"the budget must be positive, got {text!r}")
    if not math.isfinite(value):  # (1e400: beyond float's range, an endless run the guard did not see)
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: beyond any finite time; use 'none'")
    return value


def _budget(text: str) -> float | None:
    return None if text.strip().lower() == "none" else parse_duration(text)


def _argtype(convert):
    """An argparse type from a converter that raises ValueError with the reason."""

    def parse(text: str):
        try:
            return convert(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = convert.__name__
    return parse


_positive_int = _argtype(positive_int)
_positive_float = _argtype(positive_float)


def _batch_size(text: str) -> int | None:
    if text.lower() in ("full", "all", "0"):
        return None
    return _positive_int(text)


def _test_fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"--test-fraction must be in (0, 1), got {text}")
    return v


def _non_negative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return v


def _seed(text: str) -> int:
    """A seed: an integer from 0 to :data:`MAX_SEED`."""
    v = _non_negative_int(text)
    if v > MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to {MAX_SEED}, got {text!r}")
    return v


def _threads(text: str) -> int:
    """A number of torch CPU threads: 0 (torch's choice) up to this machine's CPU count."""
    v, cpus = _non_negative_int(text), os.cpu_count() or 1
    if v > cpus:
        raise argparse.ArgumentTypeError(f"this machine has {cpus} CPUs: use at most {cpus} threads, got {v}")
    return v


def _choice(names, what: str):
    """An argparse type accepting ``names`` in either spelling (``_`` or ``-``, any case)."""

    def parse(text: str) -> str:
        c = canonical(text)
        if c not in names:
            raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(names)})")
        return c

    parse.__name__ = what
    return parse


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line (exit 2) without the usage block; ``commands`` are
    the subcommands' parsers (``hessinv train``: the one whose ``--help`` an error points to)."""

    commands: dict[str, argparse.ArgumentParser]

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}{_dash_value_hint(message)} (see {self.prog} --help)\n")


_ARGV: list[str] = []  # the arguments main() parses (for the hint of _dash_value_hint)


def _dash_value_hint(message: str) -> str:
    """argparse's ``argument --data: expected one argument`` where the value given starts with ``-``
    (``--data -d9.csv``, a file named so): it took the value for an option. The hint: ``--data=-d9.csv``."""
    m = re.fullmatch(r"argument (--[\w-]+)(?:/\S+)?: expected one argument", message)
    if not m:
        return ""
    for opt, value in zip(_ARGV, _ARGV[1:], strict=False):
        if opt.startswith("--") and m.group(1).startswith(opt) and len(opt) > 2:
            if value.startswith("-") and not value.startswith("--") and value not in ("-", "-h"):
                return f"; a value that starts with '-' needs '=': {m.group(1)}={value}"
    return ""


_DASH_VALUE = re.compile(r"-\.?[0-9]")


def _attach_dash_values(argv: list[str]) -> list[str]:
    """``--range -1,1`` as ``--range=-1,1``: argparse takes a value that starts with ``-`` for an
    option unless it is a plain negative number (``-1``, ``-0.5``), which refused ``-1,1``, ``-1e-3``
    and ``-5s`` as written."""
    out: list[str] = []
    for a in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and _DASH_VALUE.match(a):
            out[-1] += "=" + a
        else:
            out.append(a)
    return out


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        torch = version("torch")  # the installed distribution, without importing torch
    except PackageNotFoundError:
        torch = "not installed"
    return f"hessinv {__version__} (torch {torch}, python {sys.version.split()[0]})"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hessinv", description="Exact curvature of deep chains: training jobs and benchmarks.")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", parser_class=_Parser, metavar="{train,bench,spectrum}")
    sub.required = True

    steps_default = ", ".join(f"{k} {v}" for k, v in DEFAULT_STEPS.items())
    t = sub.add_parser(
        "train",
        help="second-order vs first-order training, with logs, a table and plots",
        description=textwrap.fill(
            "Train one deep MLP chain from the same initialization with several optimizers, each until "
            "its step budget or the time budget, whichever comes first, and compare their time to a "
            "target training loss. Writes <optimizer>.jsonl, summary.json, table.md and loss.png under "
            "--out. Names of optimizers, activations and damping rules may be spelled with - or _ "
            "(gauss-newton = gauss_newton).",
            100,
        ),
        epilog=DATA_FORMAT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = t.add_argument_group("data")
    g.add_argument(
        "--data",
        default="digits",
        help=f"{' | '.join(DATASETS)} | path to a .npz/.csv file (format below) (default: digits)",
    )
    g.add_argument(
        "--target-column",
        default=None,
        metavar="COLUMN",
        help="the label/target column of a .csv file: a column number (1-based; negative from the end) or a "
        "header name (default: the last column)",
    )
    g.add_argument(
        "--task",
        default="auto",
        type=_choice(("auto", "classification", "regression"), "task"),
        help="auto | classification | regression (default: auto, from the labels; see below)",
    )
    g.add_argument(
        "--samples",
        type=_positive_int,
        default=None,
        help=f"number of examples, train + test; not for a file with its own test split (default: "
        f"{SAMPLES_DEFAULT})",
    )
    g.add_argument(
        "--test-fraction",
        type=_test_fraction,
        default=None,
        help=f"fraction held out as the test split; not for a file with its own test split (default: "
        f"{TEST_FRACTION:g})",
    )
    g = t.add_argument_group("model")
    g.add_argument("--depth", type=_positive_int, default=16, help="number of Linear layers (default: 16)")
    g.add_argument("--width", type=_positive_int, default=8, help="hidden width (default: 8)")
    g.add_argument(
        "--activation",
        default="tanh",
        type=_choice(tuple(ACTIVATIONS), "activation"),
        help=f"{' | '.join(ACTIVATIONS)} (default: tanh)",
    )
    g.add_argument("--residual", action="store_true", help="residual blocks z + act(W z + b) (default: off)")
    g.add_argument(
        "--init",
        default="torch",
        type=_choice(INITS, "init"),
        help="torch (PyTorch's default uniform) | xavier | orthogonal (default: torch)",
    )
    g.add_argument(
        "--dtype",
        default="float64",
        type=_choice(("float64", "float32"), "dtype"),
        help="float64 | float32 (default: float64)",
    )
    g = t.add_argument_group("optimization")
    g.add_argument(
        "--optimizers",
        default=DEFAULT_OPTIMIZERS,
        help=f"comma-separated, from {', '.join(OPTIMIZERS)} (default: {DEFAULT_OPTIMIZERS})",
    )
    g.add_argument(
        "--steps",
        action="append",
        default=[],
        metavar="N | NAME=N | none",
        help="step budget per optimizer: one number for all, NAME=N for one (repeatable or "
        f"comma-separated), or none (default: {steps_default}; any other: none)",
    )
    g.add_argument(
        "--budget",
        type=_budget,
        default=DEFAULT_BUDGET,
        metavar="TIME | none",
        help="wall-clock training time per optimizer, e.g. 120s or 2m, or none; each optimizer stops "
        f"at its step budget or this, whichever comes first (default: {DEFAULT_BUDGET:g}s)",
    )
    g.add_argument(
        "--batch-size",
        type=_batch_size,
        default=64,
        help="mini-batch size, or 'full' (also 'all' or 0; lbfgs always uses the full batch) (default: 64)",
    )
    g.add_argument(
        "--target-loss",
        type=lambda text: "none" if text.strip().lower() == "none" else _positive_float(text),
        default=None,
        metavar="LOSS | none",
        help="train loss of the time-to-target table, checked after every step where that costs at most "
        "a step (else at the evaluations: a range of steps) (default: per dataset and its own task: "
        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_TARGET.items())
        + "; none for a data file)",
    )
    g.add_argument(
        "--lr",
        action="append",
        default=[],
        metavar="NAME=LR",
        help="learning rate of an optimizer, e.g. --lr adam=1e-3 (repeatable or comma-separated) "
        f"(default: {', '.join(f'{k} {v:g}' for k, v in DEFAULT_LR.items() if k not in LR_GRID)}; "
        f"{'/'.join(LR_GRID)} from their grids with --tune, else "
        f"{', '.join(f'{k} {DEFAULT_LR[k]:g}' for k in LR_GRID)})",
    )
    g.add_argument(
        "--tune",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"pick the {'/'.join(LR_GRID)} learning rates not given with --lr from a small grid "
        f"({'; '.join(k + ' ' + ', '.join(f'{v:g}' for v in g) for k, g in LR_GRID.items())}): the lowest "
        "train loss after 1/10 of the step and time budgets (default: on)",
    )
    g.add_argument(
        "--tune-budget",
        type=parse_duration,
        default=None,
        metavar="TIME",
        help="time cap of one grid point of --tune (default: --budget / 10, or 2.5s with --budget "
        "none; the step cap is the optimizer's steps / 10)",
    )
    g.add_argument(
        "--newton-damping",
        default=None,
        type=_choice(DAMPINGS, "damping"),
        help="damping rule of newton-tr and gauss-newton, hessinv.optim.Newton(damping=...): "
        f"{' | '.join(DAMPINGS)} (default: trust-region)",
    )
    g.add_argument(
        "--curvature-batch-size",
        type=_positive_int,
        default=None,
        help="newton/newton-tr/gauss-newton: build the curvature on this many examples of each batch "
        "(default: 8 for newton's amortized mode, the whole batch for the trust region)",
    )
    g.add_argument(
        "--seed",
        type=_seed,
        default=0,
        help=f"seed of the data split, initialization and batches, 0 to {MAX_SEED} (default: 0)",
    )
    g.add_argument(
        "--device",
        default="cpu",
        help="cpu | cuda | cuda:N | auto (cuda if available) (default: cpu)",
    )
    g.add_argument(
        "--threads",
        type=_threads,
        default=1,
        help="torch CPU threads, 0 = torch's choice, at most the CPU count (default: 1). The per-stage "
        "blocks are small: at load 2.8 on 2 cores, one thread gave Newton 36 steps in 8 s against 5 steps "
        "in 35 s with two",
    )
    g.add_argument(
        "--nproc",
        type=_positive_int,
        default=1,
        help="data-parallel processes on this machine (torch.distributed: gloo on CPU, NCCL on CUDA); "
        "--batch-size is the global batch (see hessinv.cli.distributed) (default: 1)",
    )
    g.add_argument(
        "--dist-strategy",
        default=None,
        help="with --nproc > 1 and newton: how the ranks share Newton's curvature: sharded, replicated, "
        "rotate, average (docs/distributed.md) (default: sharded)",
    )
    g = t.add_argument_group("output")
    g.add_argument("--out", default=None, help="output directory (default: runs/<data>, e.g. runs/digits)")
    g.add_argument("--quiet", action="store_true", help="no live progress, only the table (default: off)")

    b = sub.add_parser(
        "bench",
        help="benchmarks (solve)",
        description="Benchmarks from the repository's bench/ (run from a checkout). "
        "`hessinv bench solve --help` lists the benchmark's own options.",
    )
    b.add_argument(
        "what", choices=["solve"], nargs="?", default=None, help="which benchmark: solve (bench/solve.py)"
    )
    b.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed on to the benchmark")

    from hessinv.cli.spectrum import add_parser as add_spectrum

    add_spectrum(sub)
    p.commands = sub.choices
    return p


def _parse_lrs(items: list[str], opts: list[str]) -> dict[str, float]:
    """The --lr values by optimizer; each must be one of ``opts``, the optimizers that run."""

    def lr(text: str) -> float:
        try:
            return positive_float(text)
        except ValueError:
            raise ValueError(f"the learning rate must be a positive number, got {text!r}") from None

    return parse_per_optimizer(items, "--lr", lr, "LR", "adam=1e-3", selected=opts)


def _parse_steps(items: list[str], opts: list[str]) -> dict[str, int | None]:
    """The step budget of each optimizer in ``opts`` from the --steps values: a plain count for every
    optimizer, ``NAME=N`` for one, in any order (``--steps adam=5000 --steps 1000`` keeps adam's 5000;
    it was dropped); one optimizer named twice, or two plain counts, is refused, as --lr does."""
    steps: dict[str, int | None] = {o: DEFAULT_STEPS.get(o) for o in opts}  # unlisted: time budget only
    named: set[str] = set()
    plain: str | None = None

    def count(text: str) -> int | None:
        return None if text.lower() == "none" else positive_int(text)

    # (each comma-separated part on its own: "--steps 3,adam=5" is one count for all and one for adam;
    # empty parts skipped, as --lr's are: "adam=5,")
    for item in [part for it in items for part in it.split(",") if part.strip()]:
        if "=" in item:
            got = parse_per_optimizer([item], "--steps", count, "N", "adam=5000", selected=opts)
            twice = sorted(named & set(got))
            if twice:
                raise UserError(f"--steps gives {twice[0]} twice ({item}): give it once")
            named |= set(got)
            steps.update(got)
        else:
            try:
                n = count(item.strip())
            except ValueError as e:
                raise UserError(f"--steps: {e} (or NAME=N, or none)") from None
            if plain is not None:
                raise UserError(
                    f"--steps gives a count for every optimizer twice ({plain}, {item}): give it once"
                )
            plain = item
            steps.update({o: n for o in opts if o not in named})
    return {o: steps[o] for o in opts}


def _dist_strategy(text: str | None) -> str | None:
    """The ``--dist-strategy`` name (checked before whether it applies)."""
    if text is None:
        return None
    from hessinv.optim.distributed import STRATEGIES

    strategy = canonical(text)
    if strategy not in STRATEGIES:
        raise UserError(f"--dist-strategy must be one of {', '.join(STRATEGIES)}, got {text!r}")
    return strategy


def _refuse_unused(option: str, given: bool, users: tuple[str, ...], opts: list[str]) -> None:
    """A :class:`UserError` for ``option``, ``given`` on the command line, when none of the optimizers
    it applies to (``users``) is in ``opts``: it would be silently ignored."""
    if given and not set(users) & set(opts):
        raise UserError(
            f"{option} applies to {', '.join(users)} only, and --optimizers {','.join(opts)} has none of "
            f"them: add one or leave {option} out"
        )


def _cmd_train(args: argparse.Namespace) -> int:
    from hessinv.cli.data import DataError, load_dataset
    from hessinv.cli.train import FULL_BATCH, TrainConfig, exact_factorizations, train

    names = args.optimizers.split(",")
    opts = [canonical(o) for o in names if o.strip()]
    if not opts:
        raise UserError("--optimizers is empty")
    if len(opts) != len(names):
        raise UserError(f"--optimizers has an empty name: {args.optimizers!r}")
    for o in opts:
        if o not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {o!r}; choose from {', '.join(OPTIMIZERS)}")
    if len(set(opts)) != len(opts):
        raise UserError(f"--optimizers lists an optimizer twice: {args.optimizers}")
    strategy = _dist_strategy(args.dist_strategy)
    if strategy is not None and args.nproc == 1:
        raise UserError("--dist-strategy applies with --nproc > 1 only: add --nproc N or leave it out")
    lrs = _parse_lrs(args.lr, opts)
    steps = _parse_steps(args.steps, opts)
    _refuse_unused("--newton-damping", args.newton_damping is not None, ("newton-tr", "gauss-newton"), opts)
    _refuse_unused(
        "--curvature-batch-size",
        args.curvature_batch_size is not None,
        ("newton", "newton-tr", "gauss-newton"),
        opts,
    )
    _refuse_unused("--dist-strategy", strategy is not None, ("newton",), opts)
    if args.tune_budget is not None and not any(args.tune and o in LR_GRID and o not in lrs for o in opts):
        raise UserError(
            "--tune-budget applies only when a learning rate is tuned (--tune and one of "
            f"{', '.join(LR_GRID)} without its --lr), not here: leave it out"
        )
    budget = args.budget
    if budget is None and any(steps[o] is None for o in opts):
        raise UserError(
            "--budget none with no step budget for "
            + ", ".join(o for o in opts if steps[o] is None)
            + ": the run would never stop"
        )
    device = resolve_device(args.device)
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)  # within 1..os.cpu_count() (_threads)
    try:
        ds = load_dataset(
            args.data,
            seed=args.seed,
            test_fraction=args.test_fraction,
            n_samples=args.samples,
            task=args.task,
            target=args.target_column,
        )
    except DataError as e:
        raise UserError(str(e)) from None
    n_train = len(ds.X_train)
    batch_size = args.batch_size
    if all(o in FULL_BATCH for o in opts):  # (the header and summary said "batch 32" for lbfgs alone)
        batch_size = None
    elif batch_size is not None and batch_size >= n_train:
        print(
            f"hessinv: note: --batch-size {batch_size} is not below the {n_train} training examples: "
            "full-batch training",
            file=sys.stderr,
        )
        batch_size = None
    curvature_batch = args.curvature_batch_size
    if curvature_batch is not None and curvature_batch >= min(batch_size or n_train, n_train):
        print(
            f"hessinv: note: --curvature-batch-size {curvature_batch} is not below the batch "
            f"({batch_size or n_train} examples): the curvature is the whole batch's",
            file=sys.stderr,
        )
    native = {"digits": "classification", "mnist1d": "classification", "regression": "regression"}
    # (a built-in dataset's default target is for its own task: digits' cross-entropy 1.0 is no MSE's)
    default = DEFAULT_TARGET.get(ds.name) if native.get(ds.name) == ds.task else None
    target = args.target_loss if args.target_loss is not None else default
    target = None if target == "none" else target
    if args.out is None:
        out = Path(DEFAULT_OUT.format(data=Path(ds.name).stem))
    else:
        out = out_path(args.out)
    if args.residual and args.depth < 3:  # (the blocks sit between the first and the last layer)
        raise UserError(
            f"--residual needs --depth 3 or more (residual blocks between the first and last "
            f"layers); --depth {args.depth} has none"
        )
    cfg = TrainConfig(
        optimizers=opts,
        depth=args.depth,
        width=args.width,
        activation=args.activation,
        residual=args.residual,
        init=args.init,
        batch_size=batch_size,
        budget=budget,
        steps=steps,
        target_loss=target,
        lrs=lrs,
        tune=args.tune,
        tune_budget=args.tune_budget,
        newton_damping=args.newton_damping or TrainConfig.newton_damping,
        curvature_batch_size=args.curvature_batch_size,
        seed=args.seed,
        device=device,
        dtype=args.dtype,
        out=out,
        command=("hessinv", *_ARGV),
    )
    exact, flops, covered = exact_factorizations(cfg, ds)
    full = covered == len(ds.X_train)
    # (newton only where it takes its trust region; else it preconditions, one factorization of 8 examples;
    # on mini-batches where a factorization is costly: one newton-tr step of a width-64 chain took 48 s
    # against a 3 s --budget with no word, a probe)
    if exact and ((full and covered > 512) or flops > COSTLY_FACTORIZATION_FLOPS):
        verb = "factors" if len(exact) == 1 else "factor"
        what = (
            f"full-batch {', '.join(exact)} on {covered} examples {verb} the exact curvature of the whole "
            "training set"
            if full
            else f"{', '.join(exact)} {verb} the exact curvature of {covered} examples"
        )
        print(
            f"hessinv: note: {what} at every step ({flops:.2g} flops a factorization, a few a step for "
            "newton-tr; --budget is checked between steps): "
            + (
                "mini-batches (--batch-size 64), or --curvature-batch-size N for a subsample of the "
                "curvature, make a step cheaper"
                if full
                else "a smaller --curvature-batch-size, --batch-size or --width makes a step cheaper"
            ),
            file=sys.stderr,
        )
    if args.nproc > 1:
        from hessinv.cli.distributed import train_data_parallel

        cpus = os.cpu_count() or 1
        if args.nproc > cpus:  # (each rank's step waits for the slowest: its timings measure the sharing)
            print(
                f"hessinv: note: --nproc {args.nproc} on {cpus} CPUs: the ranks share cores, and the "
                "times measure that sharing",
                file=sys.stderr,
            )

        return train_data_parallel(ds, cfg, args.nproc, strategy=strategy, quiet=args.quiet)
    from hessinv.cli.report import Reporter

    rep = Reporter(cfg, ds, quiet=args.quiet)
    with rep:
        results, summary = train(ds, cfg, progress=rep.progress, on_run_start=rep.run_started)
    rep.finish(results, summary)
    if summary.get("interrupted"):
        return interrupted_status(summary)
    return finished_status({r.name: r.status for r in results})


#: the exit status of a job where some optimizers failed with an error and another finished
PARTIAL_FAILURE = 3


def finished_status(statuses: dict[str, str]) -> int:
    """The exit status of a job that ran to its end, from each optimizer's status: 1 when none finished
    (``ok``); else :data:`PARTIAL_FAILURE` (3, with a line on stderr naming them) when some failed with an
    error (a diverged run is a training outcome, which the table marks: not a failure of the job); else 0."""
    if not any(status == "ok" for status in statuses.values()):
        return 1
    failed = [name for name, status in statuses.items() if status == "failed"]
    if not failed:
        return 0
    print(
        f"hessinv: {len(failed)} of {len(statuses)} optimizers failed with an error: {', '.join(failed)} "
        f"(their messages are in summary.json); exit status {PARTIAL_FAILURE}",
        file=sys.stderr,
    )
    return PARTIAL_FAILURE


def interrupted_status(summary: dict) -> int:
    """The exit status of a job that a signal stopped: 128 + its number (130 for Ctrl-C's SIGINT, 143 for
    SIGTERM), as a shell reports a process the signal killed."""
    import signal

    return 128 + int(getattr(signal, str(summary.get("interrupted_by") or "SIGINT"), signal.SIGINT))


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM (``kill``, ``timeout``, a batch scheduler's time limit or preemption) raises
    :class:`Interrupted`, a KeyboardInterrupt: the job stops as on Ctrl-C, keeping and writing what it
    measured (it killed the process silently, losing the summary). Where SIGTERM is not at its default
    (ignored, or a handler of the embedding program) or outside the main thread, nothing changes."""
    import signal

    def stop(signum, frame):
        raise Interrupted(signum)

    try:
        previous = signal.getsignal(signal.SIGTERM)
        if previous is not signal.SIG_DFL:
            previous = None
        else:
            signal.signal(signal.SIGTERM, stop)
    except ValueError:  # (not the main thread)
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _find_bench(name: str) -> Path | None:
    here = Path(__file__).resolve()
    candidates = [Path.cwd() / "bench" / f"{name}.py"] + [p / "bench" / f"{name}.py" for p in here.parents]
    for c in candidates:
        if c.is_file():
            return c
    return None


def _run_script(path: Path, argv: list[str]) -> None:
    """Run the script ``path`` as ``__main__`` with ``sys.argv = argv``, as ``runpy.run_path`` does
    except that ``argv[0]`` is kept: argparse names the program after it (``hessinv bench solve``)."""
    module = types.ModuleType("__main__")
    module.__file__ = str(path)
    saved = sys.argv, sys.modules["__main__"]
    sys.argv, sys.modules["__main__"] = argv, module
    try:
        exec(compile(path.read_bytes(), str(path), "exec"), module.__dict__)  # noqa: S102 - our bench/
    finally:
        sys.argv, sys.modules["__main__"] = saved


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.what is None:  # (argparse's own message named the optional args as required too)
        raise UserError("hessinv bench needs the benchmark's name: hessinv bench solve [its arguments]")
    path = _find_bench(args.what)
    if path is None:
        raise UserError(
            f"bench/{args.what}.py was not found (looked in ./bench and next to the package); "
            "run this from a checkout of the hessinv repository"
        )
    prog = f"hessinv bench {args.what}"
    # the benchmark hands --threads to torch.set_num_threads, which raises (a traceback) below 0
    checks = _Parser(prog=prog, add_help=False)
    checks.add_argument("--threads", type=_threads)
    try:
        checks.parse_known_args(args.args)
        _run_script(path, [prog, *args.args])
    except SystemExit as e:
        code = e.code
        if isinstance(code, str):  # (a message: it was dropped, and the run ended with 1)
            print(f"{prog}: error: {code}", file=sys.stderr)
            return 2
        return code if isinstance(code, int) else 0
    return 0


#: the packages of the ``cli`` extra each command imports (the datasets' are checked where they load)
_EXTRAS = {"train": ("rich", "matplotlib"), "spectrum": ("matplotlib",)}


def _require_extras(command: str) -> None:
    """A :class:`UserError` naming the ``cli`` extra where a package ``command`` needs is missing."""
    import importlib.util

    missing = [m for m in _EXTRAS[command] if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(
            f"hessinv {command} needs the command line's extra packages (missing: {', '.join(missing)}): "
            + install_hint("cli")
        )


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """A warning as the command line says things: ``hessinv: warning: ...`` on stderr, its library
    keyword arguments as the options that set them (not ``<frozen runpy>:88: UserWarning: ...``)."""
    print(f"hessinv: warning: {_as_options(str(message))}", file=sys.stderr if file is None else file)


def _as_options(text: str) -> str:
    """The library's keyword arguments a message suggests, as this command's options."""
    return re.sub(r"\bcurvature_batch_size=(\d+)", r"--curvature-batch-size \1", text)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hessinv`` console script; returns the exit status."""
    if argv is None:  # (the console script's process: its warnings in its own words)
        warnings.showwarning = _show_warning
    parser = build_parser()
    _ARGV[:] = _attach_dash_values(sys.argv[1:] if argv is None else argv)
    try:
        args, extra = parser.parse_known_args(_ARGV)
        if extra:  # a typo in a subcommand's options: point to that subcommand's --help
            parser.commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        if args.command in _EXTRAS:
            _require_extras(args.command)
        if args.command == "train":
            with _sigterm_interrupts():
                return _cmd_train(args)
        if args.command == "spectrum":  # (SIGTERM: stopped as on Ctrl-C, said, exit 143; it died silently)
            from hessinv.cli.spectrum import run as run_spectrum

            with _sigterm_interrupts():
                return run_spectrum(args)
        return _cmd_bench(args)
    except UserError as e:
        print(f"hessinv: error: {e}", file=sys.stderr)
        return 2
    except HessinvError as e:  # a value the library refused (its message says what to do)
        text = " ".join(str(e).split())
        if args.command == "spectrum":  # (the library's advice in this command's terms)
            text = re.sub(r"\(Newton/Preconditioner: curvature_batch_size=(\d+)\)", r"(--batch \1)", text)
        print(f"hessinv: error: {type(e).__name__}: {text}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. writing the results failed (disk full, removed directory)
        print(f"hessinv: error: {e}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        print(
            "hessinv: error: out of memory (" + " ".join(str(e).split())[:200] + "): use a smaller model "
            "(--width, --depth), batch or --samples",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt as e:  # (before or after the training loop, which keeps its runs)
        sig = interrupt_signal(e)
        print(f"hessinv: {interrupt_reason(sig)}", file=sys.stderr)
        return 128 + sig
