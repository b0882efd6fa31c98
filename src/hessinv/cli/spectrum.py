"""``hessinv spectrum``: the exact eigenvalue histogram of a deep chain's Hessian or Gauss-Newton matrix.

::

    hessinv spectrum                                   # digits, depth-8 width-8 tanh chain at init
    hessinv spectrum --data mnist1d --depth 16 --curvature gauss-newton --train-steps 200 --bins 80
    hessinv spectrum --range=-0.1,0.1 --out runs/spectrum

Counts come from the inertia of ``H - s I`` at every bin edge (one Riccati factorization each,
:mod:`hessinv.spectrum`), so they are exact, not a stochastic density estimate. Writes
``spectrum.json`` (edges, counts, the number of negative eigenvalues, ``log|det(H + eps I)|``, the
exact trace from :meth:`hessinv.CurvatureOperator.trace`) and ``spectrum.png`` to ``--out``.
Eigenvalues zero up to rounding (within ``sqrt(u) ||H||`` of 0, e.g. a Gauss-Newton matrix's null
space) count as ``>= 0``, as in :func:`hessinv.spectrum.num_negative_eigenvalues`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

__all__ = ["add_parser", "run", "plot_histogram"]


def _finite(text: str) -> float:
    """A finite number (``--damping``, the ends of ``--range``) within the float64 sweep's range, 1e150
    (``--range=-1e308,1e308`` overflowed the bins' width into numpy warnings and a NaN edge; ``1e200`` was
    told to "scale the loss down", which the command line cannot)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    if abs(v) > 1e150:
        raise argparse.ArgumentTypeError(
            f"{text!r} is beyond what a curvature sweep takes: give a value within +-1e150"
        )
    return v


def _range(text: str) -> tuple[float, float]:
    """``LO,HI`` with finite ``LO < HI``."""
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(
            f"expected LO,HI (e.g. --range -0.1,0.1 or --range=-0.1,0.1), got {text!r}"
        )
    lo, hi = _finite(parts[0]), _finite(parts[1])
    if not lo < hi:
        raise argparse.ArgumentTypeError(f"--range needs LO < HI, got {text!r}")
    return lo, hi


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``spectrum`` on the ``hessinv`` subparsers; every option's help states its default."""
    from hessinv.cli import (
        MAX_SEED,
        SAMPLES_DEFAULT,
        _choice,
        _non_negative_int,
        _positive_int,
        _seed,
        _threads,
    )
    from hessinv.cli.choices import ACTIVATIONS, DATASETS  # torch-free: ``hessinv --help`` stays fast

    s = sub.add_parser(
        "spectrum",
        help="exact eigenvalue histogram of the Hessian / Gauss-Newton matrix (inertia counts), with a plot",
        description="Exact eigenvalue counts N(s) = #{lambda < s} of a deep MLP chain's curvature on a "
        "batch of the training split, one Riccati factorization per bin edge; writes spectrum.json and "
        "spectrum.png under --out.",
    )
    s.add_argument(
        "--data",
        default="digits",
        help=f"{' | '.join(DATASETS)} | path to a .npz/.csv file (format: hessinv train --help) "
        "(default: digits)",
    )
    s.add_argument(
        "--target-column",
        default=None,
        metavar="COLUMN",
        help="the label/target column of a .csv file: a column number (1-based; negative from the end) or "
        "a header name (default: the last column)",
    )
    s.add_argument(
        "--task",
        default="auto",
        type=_choice(("auto", "classification", "regression"), "task"),
        help="auto | classification | regression, as for hessinv train (default: auto, from the labels)",
    )
    s.add_argument(
        "--samples",
        type=_positive_int,
        default=None,
        help=f"number of examples, train + test; not for a file with its own test split (default: "
        f"{SAMPLES_DEFAULT})",
    )
    s.add_argument(
        "--batch",
        type=_positive_int,
        default=64,
        help="training examples the curvature is built on, at most all of them (default: 64)",
    )
    s.add_argument("--depth", type=_positive_int, default=8, help="number of Linear layers (default: 8)")
    s.add_argument("--width", type=_positive_int, default=8, help="hidden width (default: 8)")
    s.add_argument(
        "--activation",
        default="tanh",
        type=_choice(tuple(ACTIVATIONS), "activation"),
        help=f"{' | '.join(ACTIVATIONS)} (default: tanh)",
    )
    s.add_argument(
        "--curvature",
        default="hessian",
        type=_choice(("hessian", "gauss-newton"), "curvature"),
        help="hessian | gauss-newton (default: hessian)",
    )
    s.add_argument(
        "--train-steps",
        type=_non_negative_int,
        default=0,
        help="Adam steps (lr 1e-2, full batch) before the analysis (default: 0)",
    )

    def bins(text: str) -> int:
        from hessinv.spectrum import MAX_BINS

        k = _positive_int(text)
        if k > MAX_BINS:
            raise argparse.ArgumentTypeError(
                f"at most {MAX_BINS} bins (each bin edge costs one factorization)"
            )
        return k

    s.add_argument(
        "--bins", type=bins, default=40, help="number of histogram bins, at most 10000 (default: 40)"
    )
    s.add_argument(
        "--range",
        type=_range,
        default=None,
        metavar="LO,HI",
        help="the histogram's range, e.g. --range -0.1,0.1 (or --range=-0.1,0.1) (default: the whole "
        "spectrum, hessinv.spectrum.spectral_range)",
    )
    s.add_argument(
        "--damping",
        type=_finite,
        default=1e-3,
        help="eps of the reported log|det(C + eps I)|, C the --curvature matrix (default: 0.001)",
    )
    s.add_argument(
        "--seed",
        type=_seed,
        default=0,
        help=f"seed of the data split and initialization, 0 to {MAX_SEED} (default: 0)",
    )
    s.add_argument(
        "--threads",
        type=_threads,
        default=1,
        help="torch CPU threads, 0 = torch's choice, at most the CPU count (default: 1, as hessinv train: "
        "the per-stage blocks are small)",
    )
    s.add_argument("--out", default="runs/spectrum", help="output directory (default: runs/spectrum)")
    return s


def plot_histogram(edges, counts, path: str | Path, title: str = "", below: int = 0, above: int = 0) -> Path:
    """A bar chart of exact eigenvalue counts per bin (log count axis) to ``path`` (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    widths = [b - a for a, b in zip(edges[:-1], edges[1:], strict=True)]
    ax.bar(
        edges[:-1],
        [c if c > 0 else float("nan") for c in counts],
        width=widths,
        align="edge",
        color="#d62728",
    )
    ax.set_yscale("log")
    ax.axvline(0.0, color="0.4", lw=0.8, ls=":")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("exact count per bin")
    note = f"outside the range: {below} below, {above} above" if below or above else ""
    ax.set_title(title + (f"\n{note}" if note else ""), fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def _edges(lo: float, hi: float, bins: int, tol: float):
    """``bins`` equal bins over ``[lo, hi]``, with an edge at 0 -- the range's end given as 0, or an inner
    edge within ``tol`` of 0 (``linspace``'s rounding of one) -- moved to ``-tol``: the eigenvalues that are
    zero up to rounding then fall in the bin that starts at 0, as they count as ``>= 0`` (the count of
    negative eigenvalues is ``N(-tol)``), not half of them below it. A small nonzero end the caller gave
    is a threshold and stays (``--range 1e-9,0.4`` put the null space in its first bin)."""
    import numpy as np

    edges = np.linspace(lo, hi, bins + 1)
    i = int(np.abs(edges).argmin())
    given = i in (0, bins)
    if (edges[i] == 0 if given else abs(edges[i]) <= tol) and (i == 0 or edges[i - 1] < -tol):
        edges[i] = -tol
    return edges


def run(args: argparse.Namespace) -> int:
    """Build the model and data, optionally train, count, write the JSON and the plot; exit status."""
    import torch

    from hessinv import spectrum
    from hessinv.cli.choices import output_directory
    from hessinv.cli.data import DataError, load_dataset
    from hessinv.cli.models import build_model
    from hessinv.cli.train import UserError
    from hessinv.curvature import curvature_class
    from hessinv.errors import AccuracyWarning, SingularError

    if args.threads > 0:
        torch.set_num_threads(args.threads)  # within 1..os.cpu_count() (_threads)
    try:
        ds = load_dataset(
            args.data, seed=args.seed, n_samples=args.samples, target=args.target_column, task=args.task
        )
    except DataError as e:
        raise UserError(str(e)) from None
    for note in ds.notes:  # (what the train command's header says of the data: a header skipped, a guess)
        print(f"hessinv: note: {note}", file=sys.stderr)
    out = output_directory(args.out)  # (after the data: a bad --data leaves no empty folder behind)
    net = build_model(ds.input_dim, ds.output_dim, args.depth, args.width, args.activation, seed=args.seed)
    loss_fn = torch.nn.CrossEntropyLoss() if ds.task == "classification" else torch.nn.MSELoss()
    X, y = ds.X_train, ds.y_train
    if args.train_steps:
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        for _ in range(args.train_steps):
            opt.zero_grad()
            loss_fn(net(X), y).backward()
            opt.step()
    Xb, yb = X[: args.batch], y[: args.batch]
    if args.batch > len(X):
        print(
            f"hessinv: note: --batch {args.batch} is more than the {len(X)} training examples: the curvature "
            f"is built on all {len(X)}",
            file=sys.stderr,
        )
    t0 = time.perf_counter()
    op = curvature_class(args.curvature)(net, loss_fn, Xb, yb)
    tol = op.zero_tolerance()
    lo, hi = spectrum.spectral_range(op) if args.range is None else args.range
    with warnings.catch_warnings(record=True) as doubts:  # (the library's advice, in this command's terms)
        warnings.simplefilter("always", AccuracyWarning)
        hist = spectrum.spectral_histogram(op, bins=_edges(lo, hi, args.bins, tol))
        n_neg = spectrum.num_negative_eigenvalues(op, tol)
    for w in doubts:
        if not issubclass(w.category, AccuracyWarning) or "counted on the wrong side" not in str(w.message):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if any("counted on the wrong side" in str(w.message) for w in doubts):
        print(
            "hessinv: note: a count at a bin edge or at 0 may be off by eigenvalues within about u ||H|| / c "
            "of that edge (a pivot of the sweep conditioned below sqrt(u) at c; n = "
            f"{op.shape[0]} is too large to recount densely); --range and --bins move the edges",
            file=sys.stderr,
        )
    trace = op.trace()
    singular = None
    try:
        sign, logdet = spectrum.logdet(op, args.damping)
    except SingularError as e:  # (the histogram stands: only the log-determinant has no value)
        sign, logdet, singular = 0.0, -math.inf, str(e)
    seconds = time.perf_counter() - t0
    record = {
        "data": ds.name,
        "curvature": args.curvature,
        "depth": args.depth,
        "width": args.width,
        "activation": args.activation,
        "train_steps": args.train_steps,
        "batch": len(Xb),
        "n_params": op.shape[0],
        "loss": float(op.loss),
        "edges": hist.edges.tolist(),
        "counts": hist.counts.tolist(),
        "below": hist.below,
        "above": hist.above,
        "eigenvalues_below_zero": n_neg,
        "zero_tolerance": tol,
        "trace": trace,
        "damping": args.damping,
        "logdet_sign": sign,
        "logabsdet": logdet if singular is None else None,
        "logdet_singular": singular,
        "seconds": seconds,
        "data_notes": list(ds.notes),  # (what reading the data decided: a header skipped, a task guessed)
    }
    (out / "spectrum.json").write_text(json.dumps(record, indent=1))
    title = (
        f"{args.curvature} of {ds.name} (batch {len(Xb)}), depth {args.depth} width {args.width} "
        f"{args.activation}, n = {op.shape[0]}: {n_neg} eigenvalues < 0"
    )
    png = plot_histogram(hist.edges, hist.counts, out / "spectrum.png", title, hist.below, hist.above)
    outside = (
        f" ({hist.below} eigenvalues below the range and {hist.above} at or above it)"
        if hist.below or hist.above
        else ""
    )
    print(
        f"{title} (eigenvalues within {tol:.2g} of 0 count as zero)\n"
        f"range [{hist.edges[0]:.4g}, {hist.edges[-1]:.4g}){outside}, {args.bins} bins, "
        f"log|det({'H' if op.second_order else 'G'} {'-' if args.damping < 0 else '+'} "
        f"{abs(args.damping):g} I)| = {logdet:.6g} "
        + (f"(sign {sign:+.0f})" if singular is None else "(singular to working precision)")
        + f", trace {trace:.6g} (mean eigenvalue {trace / op.shape[0]:.4g}); "
        f"{seconds:.2f} s\n"
        f"wrote {out / 'spectrum.json'} and {png}"
    )
    return 0
