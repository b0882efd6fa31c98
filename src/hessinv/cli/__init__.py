"""The ``hessinv`` command line.

``hessinv train``  second-order vs first-order training on real data, with logs, a table and plots.
``hessinv bench solve ...``  the solve benchmark (``bench/solve.py`` of the repository).
``hessinv spectrum``  the exact eigenvalue histogram of the curvature, with a plot (``cli/spectrum.py``).

::

    hessinv train      # digits, depth-16 width-8 tanh chain, newton/gauss-newton/adam/sgd, 35 s each
    hessinv train --data mnist1d --depth 24 --width 16 \
        --optimizers newton,gauss-newton,adam,sgd,lbfgs,hessian-free \
        --budget 120s --target-loss 0.05 --out runs/mnist1d
    hessinv train --data my.csv --steps 500 --lr adam=1e-3 --no-tune
    hessinv bench solve --quick

``hessinv train`` writes ``<optimizer>.jsonl`` (one line per step: step, training time, batch loss,
the optimizer's statistics, and train/test loss and accuracy where evaluated), ``summary.json``,
``table.md`` (time to the target train loss) and ``loss.png`` to ``--out`` (default
``runs/<data>``). The budget counts optimizer steps only; evaluation is excluded.

Exit status: 0 when the job ran (at least one optimizer finished without diverging), 1 when
every run diverged or failed, 2 for a usage error (unknown dataset or optimizer, unreadable data
file, bad option), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import math
import re
import runpy
import sys
from pathlib import Path

__all__ = ["main", "parse_duration"]

DEFAULT_TARGET = {"digits": 1.0, "mnist1d": 1.0, "regression": 1e-4}
DEFAULT_OPTIMIZERS = "newton,gauss-newton,adam,sgd"
DEFAULT_BUDGET = 35.0  # seconds per optimizer: the default job takes about 3 minutes
DEFAULT_OUT = "runs/{data}"


def parse_duration(text: str) -> float:
    """Seconds from ``120``, ``120s``, ``2m``, ``2min``, ``1.5h``.

    >>> parse_duration("120s"), parse_duration("2m"), parse_duration("0.5")
    (120.0, 120.0, 0.5)
    """
    m = re.fullmatch(
        r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(s|sec|secs|seconds?|m|min|mins|minutes?|h|hours?)?\s*",
        text,
    )
    if not m:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}; use e.g. 120s, 2m or 90")
    value, unit = float(m.group(1)), (m.group(2) or "s")[0]
    value *= {"s": 1.0, "m": 60.0, "h": 3600.0}[unit]
    if not value > 0:
        raise argparse.ArgumentTypeError(f"the budget must be positive, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _batch_size(text: str) -> int | None:
    if text.lower() in ("full", "all", "0"):
        return None
    return _positive_int(text)


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line (exit 2) without the usage block."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from hessinv.cli.models import ACTIVATIONS, INITS
    from hessinv.cli.train import OPTIMIZERS

    p = _Parser(prog="hessinv", description="Exact curvature of deep chains: training jobs and benchmarks.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser, metavar="{train,bench,spectrum}")
    sub.required = True

    t = sub.add_parser(
        "train",
        help="second-order vs first-order training, with logs, a table and plots",
        description="Train one deep MLP chain from the same initialization with several optimizers, "
        "each for the same wall-clock budget, and compare their time to a target training loss. "
        "Writes <optimizer>.jsonl, summary.json, table.md and loss.png under --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = t.add_argument_group("data")
    g.add_argument(
        "--data", default="digits", help="digits | mnist1d | regression | path to a .npz/.csv file"
    )
    g.add_argument("--task", default="auto", choices=["auto", "classification", "regression"])
    g.add_argument("--samples", type=_positive_int, default=None, help="number of examples (train + test)")
    g.add_argument("--test-fraction", type=float, default=0.2)
    g = t.add_argument_group("model")
    g.add_argument("--depth", type=_positive_int, default=16, help="number of Linear layers")
    g.add_argument("--width", type=_positive_int, default=8)
    g.add_argument("--activation", default="tanh", choices=sorted(ACTIVATIONS))
    g.add_argument("--residual", action="store_true", help="residual blocks z + act(W z + b)")
    g.add_argument("--init", default="torch", choices=INITS)
    g.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    g = t.add_argument_group("optimization")
    g.add_argument(
        "--optimizers", default=DEFAULT_OPTIMIZERS, help=f"comma-separated, from {','.join(OPTIMIZERS)}"
    )
    g.add_argument(
        "--budget",
        type=parse_duration,
        default=None,
        help=f"wall-clock training time per optimizer, e.g. 120s or 2m (default {DEFAULT_BUDGET:g}s, "
        "or none with --steps)",
    )
    g.add_argument("--steps", type=_positive_int, default=None, help="steps per optimizer")
    g.add_argument(
        "--batch-size", type=_batch_size, default=64, help="mini-batch size, or 'full' (lbfgs: always full)"
    )
    g.add_argument(
        "--target-loss",
        type=_positive_float,
        default=None,
        help="train loss for the time-to-target table (default: per dataset; digits 0.1, "
        "mnist1d 0.5, regression 1e-4)",
    )
    g.add_argument(
        "--lr",
        action="append",
        default=[],
        metavar="NAME=LR",
        help="learning rate of an optimizer, e.g. --lr adam=1e-3 (repeatable or comma-separated)",
    )
    g.add_argument(
        "--tune",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pick the sgd/adam/lbfgs learning rates from a small grid (best train loss after a short run) "
        "unless given with --lr",
    )
    g.add_argument("--tune-budget", type=parse_duration, default=2.5, help="per grid point (s)")
    g.add_argument(
        "--newton-damping",
        default="trust-region",
        choices=["trust-region", "levenberg-marquardt"],
        help="damping rule of newton and gauss-newton (hessinv.optim.Newton(damping=...))",
    )
    g.add_argument(
        "--curvature-batch-size",
        type=_positive_int,
        default=None,
        help="newton/gauss-newton: build the curvature on this many examples of each batch",
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    g.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1; 0 = torch's choice). The per-stage blocks are small: at "
        "load 2.8 on 2 cores, one thread gave Newton 36 steps in 8 s against 5 steps in 35 s with two",
    )
    g.add_argument(
        "--nproc",
        type=_positive_int,
        default=1,
        help="data-parallel processes on this machine (torch.distributed: gloo on CPU, NCCL on CUDA); "
        "--batch-size is the global batch (see hessinv.cli.distributed)",
    )
    g.add_argument(
        "--dist-strategy",
        default=None,
        help="with --nproc > 1: how the ranks share Newton's curvature: sharded (default), replicated, "
        "rotate, average (docs/benchmarks.md)",
    )
    g = t.add_argument_group("output")
    g.add_argument("--out", default=None, help=f"output directory (default {DEFAULT_OUT})")
    g.add_argument("--quiet", action="store_true", help="no live progress, only the table")

    b = sub.add_parser(
        "bench", help="benchmarks (solve)", description="Benchmarks from the repository's bench/."
    )
    b.add_argument("what", choices=["solve"], help="which benchmark")
    b.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed on to the benchmark")

    from hessinv.cli.spectrum import add_parser as add_spectrum

    add_spectrum(sub)
    return p


def _parse_lrs(items: list[str]) -> dict[str, float]:
    from hessinv.cli.train import OPTIMIZERS, UserError

    out: dict[str, float] = {}
    for item in items:
        for part in filter(None, (s.strip() for s in item.split(","))):
            name, sep, val = part.partition("=")
            if not sep:
                raise UserError(f"--lr expects NAME=LR (e.g. adam=1e-3), got {part!r}")
            name = name.strip()
            if name not in OPTIMIZERS:
                raise UserError(f"--lr: unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
            try:
                v = float(val)
            except ValueError:
                raise UserError(f"--lr {name}: not a number: {val!r}") from None
            if not (v > 0 and math.isfinite(v)):
                raise UserError(f"--lr {name}: the learning rate must be positive, got {val}")
            out[name] = v
    return out


def _resolve_device(text: str) -> str:
    import torch

    from hessinv.cli.train import UserError

    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {text}: CUDA is not available on this machine (use --device cpu)")
        try:
            torch.device(text)
        except RuntimeError as e:
            raise UserError(f"--device {text}: {e}") from None
        return text
    if text != "cpu":
        raise UserError(f"unknown device {text!r}; use cpu, cuda, cuda:N or auto")
    return text


def _cmd_train(args: argparse.Namespace) -> int:
    from hessinv.cli.data import DataError, load_dataset
    from hessinv.cli.train import OPTIMIZERS, TrainConfig, UserError, train

    opts = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    if not opts:
        raise UserError("--optimizers is empty")
    for o in opts:
        if o not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {o!r}; choose from {', '.join(OPTIMIZERS)}")
    if len(set(opts)) != len(opts):
        raise UserError(f"--optimizers lists an optimizer twice: {args.optimizers}")
    if not 0 < args.test_fraction < 1:
        raise UserError(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    lrs = _parse_lrs(args.lr)
    device = _resolve_device(args.device)
    if args.threads < 0:
        raise UserError(f"--threads must be >= 0, got {args.threads}")
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    budget = args.budget
    if budget is None and args.steps is None:
        budget = DEFAULT_BUDGET
    try:
        ds = load_dataset(
            args.data,
            seed=args.seed,
            test_fraction=args.test_fraction,
            n_samples=args.samples,
            task=args.task,
        )
    except DataError as e:
        raise UserError(str(e)) from None
    target = args.target_loss if args.target_loss is not None else DEFAULT_TARGET.get(ds.name)
    if args.out is None:
        out = Path(DEFAULT_OUT.format(data=Path(ds.name).stem))
    else:
        out = Path(args.out)
    cfg = TrainConfig(
        optimizers=opts,
        depth=args.depth,
        width=args.width,
        activation=args.activation,
        residual=args.residual,
        init=args.init,
        batch_size=args.batch_size,
        budget=budget,
        steps=args.steps,
        target_loss=target,
        lrs=lrs,
        tune=args.tune,
        tune_budget=args.tune_budget,
        newton_damping=args.newton_damping,
        curvature_batch_size=args.curvature_batch_size,
        seed=args.seed,
        device=device,
        dtype=args.dtype,
        out=out,
    )
    if args.nproc > 1:
        from hessinv.cli.distributed import train_data_parallel

        return train_data_parallel(ds, cfg, args.nproc, strategy=args.dist_strategy, quiet=args.quiet)
    from hessinv.cli.report import Reporter

    rep = Reporter(cfg, ds, quiet=args.quiet)
    with rep:
        results, summary = train(ds, cfg, progress=rep.progress, on_run_start=rep.run_started)
    rep.finish(results, summary)
    if summary.get("interrupted"):
        return 130
    return 0 if any(r.status == "ok" for r in results) else 1


def _find_bench(name: str) -> Path | None:
    here = Path(__file__).resolve()
    candidates = [Path.cwd() / "bench" / f"{name}.py"] + [p / "bench" / f"{name}.py" for p in here.parents]
    for c in candidates:
        if c.is_file():
            return c
    return None


def _cmd_bench(args: argparse.Namespace) -> int:
    from hessinv.cli.train import UserError

    path = _find_bench(args.what)
    if path is None:
        raise UserError(
            f"bench/{args.what}.py was not found (looked in ./bench and next to the package); "
            "run this from a checkout of the hessinv repository"
        )
    old_argv = sys.argv
    sys.argv = [str(path), *args.args]
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as e:
        code = e.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = old_argv
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hessinv`` console script; returns the exit status."""
    from hessinv.cli.train import UserError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        if args.command == "train":
            return _cmd_train(args)
        if args.command == "spectrum":
            from hessinv.cli.spectrum import run as run_spectrum

            return run_spectrum(args)
        return _cmd_bench(args)
    except UserError as e:
        print(f"hessinv: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hessinv: interrupted", file=sys.stderr)
        return 130
