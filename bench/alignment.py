"""Alignment and contraction on a teacher-student deep tanh chain (docs/theory.md, last section).

The teacher is a random tanh chain (depth 6, width 8, 8 inputs and outputs, 432 parameters); the
training set is 128 Gaussian inputs labelled by the teacher, without noise, so the teacher's
parameters ``x*`` are a global minimizer of the MSE training loss (zero loss). The student starts
at ``x* + 2% noise`` (inside the teacher's basin: damped Newton from there converges to ``x*``, which
the script checks with :func:`hessinv.diagnostics.estimate_minimizer`). Everything is float64.

Runs, each recorded by :class:`hessinv.diagnostics.AlignmentTracker` (the direction of a step is
read off the parameters: ``d_t = x_t - x_{t+1}``):

* ``GD``: full-batch gradient descent, ``lr`` tuned on a grid by the final training loss;
* ``SGD``: mini-batches of 16, ``lr`` tuned the same way;
* ``Adam``: full batch, ``lr`` tuned the same way;
* ``Newton``: :class:`hessinv.optim.Newton` (exact Hessian, ``mode="trust-region"``), full batch;
* ``Newton b_H=64``: the same with the Hessian of 64 random examples per step (full gradient);
* ``Gauss-Newton``: :class:`hessinv.optim.Newton` with ``curvature="gauss_newton"``.

Two more measurements:

* a *radius sweep* for Conjecture 2 of theory.md: at ``x = x* + r u`` (``u`` the direction of the
  student's initial error) the alignment of the gradient, the (shifted) Newton direction, the
  Gauss-Newton direction and sub-sampled Newton directions, for ``r`` from 0.3 down to ``1e-7``;
* a check of Theorem 4 along the SGD run: every few steps, the expected factor predicted from 32
  mini-batch gradients drawn at the current point against the factors the SGD steps achieved.

Outputs ``alignment.json`` and ``alignment.png`` in ``--out`` (default ``runs/bench``; the recorded
``bench/results/alignment.json`` and ``docs/figures/alignment.png`` with ``--update-repo``); prints a
summary.
``python bench/alignment.py --quick`` is a smoke run (fewer steps and radii, under a minute).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import hessinv
import hessinv.optim
from hessinv import diagnostics as dg

F64 = torch.float64
ROOT = Path(__file__).resolve().parent.parent


# -- the problem ----------------------------------------------------------------------------------
def tanh_chain(depth: int, width: int, gain: float, gen: torch.Generator) -> nn.Sequential:
    """``depth`` layers ``Linear(width, width)``, tanh between them; weights ``N(0, gain^2 / width)``."""
    mods: list[nn.Module] = []
    for i in range(depth):
        lin = nn.Linear(width, width).double()
        with torch.no_grad():
            lin.weight.copy_(torch.randn(width, width, generator=gen, dtype=F64) * gain / math.sqrt(width))
            lin.bias.copy_(0.1 * torch.randn(width, generator=gen, dtype=F64))
        mods.append(lin)
        if i < depth - 1:
            mods.append(nn.Tanh())
    return nn.Sequential(*mods)


def make_problem(args: argparse.Namespace) -> dict:
    gen = torch.Generator().manual_seed(args.seed)
    teacher = tanh_chain(args.depth, args.width, args.gain, gen)
    X = torch.randn(args.examples, args.width, generator=gen, dtype=F64)
    with torch.no_grad():
        y = teacher(X)
    x_star = dg.flat_parameters(teacher)
    n = x_star.numel()
    noise = torch.randn(n, generator=gen, dtype=F64)
    x0 = x_star + args.init_noise * float(x_star.norm()) / math.sqrt(n) * noise
    return {"teacher": teacher, "X": X, "y": y, "x_star": x_star, "x0": x0, "n": n, "loss_fn": nn.MSELoss()}


def student(P: dict) -> nn.Sequential:
    net = copy.deepcopy(P["teacher"])
    dg.set_flat_parameters(net, P["x0"])
    return net


def full_loss(net: nn.Module, P: dict) -> float:
    with torch.no_grad():
        return float(P["loss_fn"](net(P["X"]), P["y"]))


# -- first-order runs -----------------------------------------------------------------------------
def run_first_order(P: dict, kind: str, lr: float, steps: int, batch: int | None, seed: int) -> dict:
    """GD / SGD / Adam for ``steps`` steps; returns the tracker's records and the loss curve."""
    net = student(P)
    opt = (torch.optim.Adam if kind == "adam" else torch.optim.SGD)(net.parameters(), lr=lr)
    tracker = dg.AlignmentTracker(net, P["x_star"])
    gen = torch.Generator().manual_seed(seed)
    probe_gen = torch.Generator().manual_seed(seed + 1)  # Theorem 4 probes do not perturb SGD's batches
    N = P["X"].shape[0]
    X, y, loss_fn = P["X"], P["y"], P["loss_fn"]
    perm, pos = torch.randperm(N, generator=gen), 0
    stoch: list[dict] = []
    for t in range(steps):
        if batch is None:
            idx = None
        else:
            if pos + batch > N:
                perm, pos = torch.randperm(N, generator=gen), 0
            idx, pos = perm[pos : pos + batch], pos + batch
        if batch is not None and P.get("theorem4_every") and t % P["theorem4_every"] == 0:
            stoch.append(theorem4_probe(net, P, lr, batch, probe_gen, t))
        Xb, yb = (X, y) if idx is None else (X[idx], y[idx])
        opt.zero_grad()
        loss = loss_fn(net(Xb), yb)
        loss.backward()
        opt.step()
        rec = tracker.update(loss=loss.item())
        if not math.isfinite(rec.error) or rec.error > 1e6:
            break
    return {"tracker": tracker, "final_loss": full_loss(net, P), "theorem4": stoch}


def theorem4_probe(net: nn.Module, P: dict, lr: float, batch: int, gen: torch.Generator, t: int) -> dict:
    """Theorem 4 at the current point from 32 mini-batch gradients (batches drawn like SGD's)."""
    X, y, N = P["X"], P["y"], P["X"].shape[0]
    draws = []
    for _ in range(32):
        idx = torch.randperm(N, generator=gen)[:batch]
        draws.append(dg.gradient_direction(net, P["loss_fn"], X[idx], y[idx]))
    s = dg.stochastic_contraction(torch.stack(draws), dg.flat_parameters(net), P["x_star"], lr)
    return {"step": t, "cos_bar": s.cos_bar, "nu": s.nu, "rho_bar": s.rho_bar, "predicted": s.predicted,
            "predicted_best": s.predicted_best, "best_lr": s.best_eta}  # fmt: skip


def tune_lr(
    P: dict, kind: str, grid: list[float], steps: int, batch: int | None, seed: int
) -> tuple[float, dict]:
    """The ``lr`` on ``grid`` with the lowest final full-batch training loss after ``steps`` steps."""
    P = {**P, "theorem4_every": 0}
    losses = {}
    for lr in grid:
        res = run_first_order(P, kind, lr, steps, batch, seed)
        del res["tracker"]
        fl = res["final_loss"]
        losses[lr] = fl if math.isfinite(fl) else math.inf
    best = min(losses, key=lambda k: losses[k])
    return best, {str(k): v for k, v in losses.items()}


# -- Newton runs ----------------------------------------------------------------------------------
def run_newton(
    P: dict, curvature: str, steps: int, curvature_batch: int | None, seed: int, tol: float
) -> dict:
    net = student(P)
    # the full-batch trust region, named: mode="auto" takes it only while one factorization costs at most
    # TRUST_REGION_MAX_FLOPS (3e8), and this chain's, 6 stages of 72 parameters and 1024 activations, costs
    # about 5e8 -- auto preconditioned here (since 2026-12-03), and the exact-Newton rows stopped reproducing
    opt = hessinv.optim.Newton(
        net, P["loss_fn"], mode="trust-region", curvature=curvature, curvature_batch_size=curvature_batch,
        seed=seed,
    )  # fmt: skip
    tracker = dg.AlignmentTracker(net, P["x_star"])
    extra = []
    for _ in range(steps):
        loss = opt.step(P["X"], P["y"])
        tracker.update(loss=float(loss))
        st = getattr(opt, "last_stats", None)
        extra.append({"accepted": getattr(st, "accepted", None), "damping": getattr(st, "damping", None)})
        if tracker.error < tol:
            break
    return {"tracker": tracker, "final_loss": full_loss(net, P), "optimizer": extra}


# -- radius sweep (Conjecture 2) ------------------------------------------------------------------
def radius_sweep(P: dict, radii: list[float], hbatches: list[int], draws: int, seed: int) -> list[dict]:
    net = copy.deepcopy(P["teacher"])
    X, y, loss_fn, x_star = P["X"], P["y"], P["loss_fn"], P["x_star"]
    u = (P["x0"] - x_star) / (P["x0"] - x_star).norm()
    gen = torch.Generator().manual_seed(seed)
    out = []
    for r in radii:
        x = x_star + r * u
        dg.set_flat_parameters(net, x)
        row: dict = {"radius": r}
        nd = dg.newton_direction(net, loss_fn, X, y)
        row["gradient"] = dg.alignment(nd.gradient, x, x_star)
        row["newton"] = dg.alignment(nd.direction, x, x_star)
        row["newton_shift"] = nd.damping
        row["newton_lambda_min"] = nd.min_eigenvalue  # None: H was positive definite (pure Newton)
        gn = dg.newton_direction(net, loss_fn, X, y, curvature="gauss_newton")
        row["gauss_newton"] = dg.alignment(gn.direction, x, x_star)
        row["gauss_newton_shift"] = gn.damping
        for b in hbatches:
            cs, unit = [], []
            for _ in range(draws):
                idx = torch.randperm(X.shape[0], generator=gen)[:b].sort().values
                # the sub-sampled direction with the full gradient (Theorem 7's setting)
                sub = dg.newton_direction(net, loss_fn, X[idx], y[idx], gradient=nd.gradient)
                cs.append(dg.alignment(sub.direction, x, x_star))
                unit.append(dg.observed_contraction(x, x - sub.direction, x_star))
            row[f"newton_bH{b}"] = sum(cs) / len(cs)
            row[f"newton_bH{b}_unit_step_factor"] = sum(unit) / len(unit)
        out.append(row)
    return out


def theorem7_at_minimizer(P: dict, hbatches: list[int], draws: int, seed: int) -> dict:
    """Theorem 7's constants at ``x*`` (dense): ``eps_H = E |H_S - H|_2^2``, ``mu = min lambda_min(H_S)``.

    ``q = eps_H / mu^2`` bounds the expected unit-step factor of sub-sampled Newton; ``q >= 1`` makes
    the theorem vacuous.
    """
    X, y, loss_fn, net = P["X"], P["y"], P["loss_fn"], P["teacher"]
    H = hessinv.hessian(net, loss_fn, X, y).to_dense()
    gen = torch.Generator().manual_seed(seed + 2)
    out = {"lambda_min_H": float(torch.linalg.eigvalsh(H)[0])}
    for b in hbatches:
        eps, mus = [], []
        for _ in range(draws):
            idx = torch.randperm(X.shape[0], generator=gen)[:b].sort().values
            HS = hessinv.hessian(net, loss_fn, X[idx], y[idx]).to_dense()
            eps.append(float(torch.linalg.matrix_norm(HS - H, ord=2)) ** 2)
            mus.append(float(torch.linalg.eigvalsh(0.5 * (HS + HS.T))[0]))
        e, mu = sum(eps) / len(eps), min(mus)
        out[f"bH{b}"] = {"eps_H": e, "mu": mu, "q": e / mu**2 if mu > 0 else math.inf}
    return out


def sweep_keys(sweep: list[dict]) -> list[str]:
    """The direction columns of the radius sweep: gradient, newton, gauss_newton, newton_bH<b>..."""
    sub = sorted(
        (k for k in sweep[0] if k.startswith("newton_bH") and k[9:].isdigit()), key=lambda k: int(k[9:])
    )
    return ["gradient", "newton", "gauss_newton", *sub]


# -- figure ---------------------------------------------------------------------------------------
STYLE = {
    "GD": ("tab:blue", "-"),
    "SGD": ("tab:cyan", "-"),
    "Adam": ("tab:purple", "-"),
    "Newton": ("tab:red", "-"),
    "Newton b_H=64": ("tab:orange", "-"),
    "Newton b_H=96": ("tab:orange", "-"),
    "Gauss-Newton": ("tab:green", "-"),
}


def _window_mean(t: list[int], v: list[float], w: int) -> tuple[list[float], list[float]]:
    """Means of ``v`` over consecutive windows of ``w`` steps, at the windows' mean step."""
    out_t, out_v = [], []
    for i in range(0, len(v) - w + 1, w):
        out_t.append(sum(t[i : i + w]) / w)
        out_v.append(sum(v[i : i + w]) / w)
    return out_t, out_v


def plot(results: dict, sweep: list[dict], path: Path) -> None:
    """(a) cos(theta) per step; (b) per-step gain, observed vs predicted; (c) the radius sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 5.4))
    floor = 1e-5  # gains below this (including negative ones: the error grew) are drawn on the floor
    for name, res in results.items():
        color = STYLE.get(name, ("black", "-"))[0]
        ok = [r for r in res["records"] if r["cos_theta"] is not None and r["observed"] is not None]
        t = [r["step"] + 1 for r in ok]
        cos = [r["cos_theta"] for r in ok]
        gain = [-math.log(max(r["observed"], 1e-300)) for r in ok]
        best = [-math.log(max(r["predicted_best"], 1e-300)) for r in ok]
        ident = [-math.log(max(r["predicted_step"], 1e-300)) for r in ok]
        many = len(t) > 60
        ax1.plot(
            t, cos, "-", color=color, label=name, lw=1.0 if many else 1.4, marker=None if many else "o", ms=3
        )
        if many:  # first-order runs: means over windows of 10 steps (log of a geometric mean factor)
            tw, gw = _window_mean(t, gain, 10)
            _, bw = _window_mean(t, best, 10)
            ax2.plot(tw, [max(g, floor) for g in gw], "-", color=color, lw=1.6)
            ax2.plot(tw, bw, "--", color=color, lw=1.2)
        else:
            ax2.plot(t, [max(g, floor) for g in gain], "o", color=color, mfc="none", ms=7, mew=1.4)
            ax2.plot(t, best, "--", color=color, lw=1.2)
            ax2.plot(t, [max(g, floor) for g in ident], "+", color="black", ms=5, mew=0.8)
    ax1.set(xscale="log", xlabel="step t + 1", ylabel=r"$\cos\theta_t$",
            title=r"(a) alignment of the step taken $x_t - x_{t+1}$ with $x_t - x^\star$",
            ylim=(-0.05, 1.03))  # fmt: skip
    ax1.grid(alpha=0.3)
    title_b = (
        "(b) observed gain (o; solid: 10-step means) vs best step $-\\ln(1-\\cos^2\\theta)$ (dashed);\n"
        "+ = step taken, $-\\ln(1-2\\rho\\cos\\theta+\\rho^2)$ (Lemma 1); floor = error grew"
    )
    ylabel_b = r"per-step gain $-\ln(|e_{t+1}|^2/|e_t|^2)$  (higher = faster)"
    ax2.set(
        xscale="log",
        yscale="log",
        xlabel="step t + 1",
        ylim=(floor / 2, None),
        ylabel=ylabel_b,
        title=title_b,
    )
    ax2.title.set_fontsize(9)
    ax2.grid(alpha=0.3)
    r = [row["radius"] for row in sweep]
    keys = [("gradient", "gradient", "tab:blue", "o"), ("newton", "Newton", "tab:red", "o"),
            ("gauss_newton", "Gauss-Newton", "tab:green", "o")]  # fmt: skip
    for k, c, m in zip(sweep_keys(sweep)[3:], ["tab:orange", "tab:brown", "tab:gray"], "sv^", strict=False):
        keys.append((k, k.replace("newton_bH", "sub-sampled Newton, b_H = "), c, m))
    for key, label, color, marker in keys:
        ax3.plot(r, [max(1 - row[key], 1e-17) for row in sweep], "-", marker=marker, color=color, label=label,
                 ms=4, lw=1.2)  # fmt: skip
    ref = [x for x in r if x <= 1e-4]
    if ref:
        y0 = max(1 - sweep[r.index(ref[0])]["newton"], 1e-17)
        ax3.plot(
            ref, [3 * y0 * (x / ref[0]) ** 2 for x in ref], "k:", lw=1, label=r"slope 2 ($\propto|e|^2$)"
        )
    ax3.set(
        xscale="log",
        yscale="log",
        xlabel=r"$r = |x - x^\star|$  ($x = x^\star + r u$, $u$ = initial error)",
        ylabel=r"$1-\cos\theta$",
        title=r"(c) radius sweep: alignment of directions at $x^\star + r u$",
    )
    ax3.legend(fontsize=8, loc="lower right")
    ax3.grid(alpha=0.3)
    handles, labels = ax1.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False,
               bbox_to_anchor=(0.36, 0.0))  # fmt: skip
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--gain", type=float, default=2.0)
    ap.add_argument("--examples", type=int, default=128)
    ap.add_argument("--init-noise", type=float, default=0.02, help="relative size of the student's offset")
    ap.add_argument("--first-order-steps", type=int, default=300)
    ap.add_argument("--newton-steps", type=int, default=25)
    ap.add_argument("--sgd-batch", type=int, default=16)
    ap.add_argument("--hessian-batch", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer steps, radii and checks")
    ap.add_argument("--no-verify", action="store_true", help="skip estimate_minimizer (saves ~15 s)")
    ap.add_argument(
        "--out", type=Path, default=Path("runs/bench"), help="output directory (default: runs/bench)"
    )
    ap.add_argument(
        "--update-repo",
        action="store_true",
        help="write the recorded bench/results/alignment.json and docs/figures/alignment.png (default: off)",
    )
    ap.add_argument("--json", type=Path, default=None, help="JSON output (default: <out>/alignment.json)")
    ap.add_argument("--figure", type=Path, default=None, help="figure output (default: <out>/alignment.png)")
    ap.add_argument("--replot", action="store_true", help="only redraw the figure from the JSON")
    args = ap.parse_args(argv)
    if args.json is None:
        args.json = (
            ROOT / "bench" / "results" / "alignment.json" if args.update_repo else args.out / "alignment.json"
        )
    if args.figure is None:
        args.figure = (
            ROOT / "docs" / "figures" / "alignment.png" if args.update_repo else args.out / "alignment.png"
        )
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    if args.replot:
        out = json.loads(args.json.read_text())
        plot(out["runs"], out["radius_sweep"], args.figure)
        print_summary(out)
        return out
    if args.quick:
        args.first_order_steps, args.newton_steps = 60, 8
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    P = make_problem(args)
    n, x_star, tol = P["n"], P["x_star"], 1e-10
    timings: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], object]):
        t = time.perf_counter()
        out = fn()
        timings[name] = round(time.perf_counter() - t, 2)
        print(f"  {name}: {timings[name]:.1f} s", file=sys.stderr, flush=True)
        return out

    # the reference point: curvature there, and (optionally) Newton from the student's init
    H_star = hessinv.hessian(P["teacher"], P["loss_fn"], P["X"], P["y"])
    ev = torch.linalg.eigvalsh(H_star.to_dense())
    info = {"n": n, "residuals": P["y"].numel(), "x_star_norm": float(x_star.norm()),
            "initial_error": float((P["x0"] - x_star).norm()), "initial_loss": full_loss(student(P), P),
            "H_star_min_eig": float(ev[0]), "H_star_max_eig": float(ev[-1]),
            "H_star_cond": float(ev[-1] / ev[0])}  # fmt: skip
    if not args.no_verify and not args.quick:
        est = timed(
            "estimate_minimizer", lambda: dg.estimate_minimizer(student(P), P["loss_fn"], P["X"], P["y"])
        )
        info["estimate_minimizer"] = {"iterations": est.iterations, "gradient_norm": est.gradient_norm,
                                      "loss": est.loss, "distance_to_teacher": float((est.x - x_star).norm()),
                                      "min_eigenvalue": est.min_eigenvalue}  # fmt: skip

    # first-order runs, lr tuned on a grid
    grids = {
        "GD": ("sgd", None, [0.01, 0.02, 0.04, 0.06]),
        "SGD": ("sgd", args.sgd_batch, [0.005, 0.01, 0.02, 0.04]),
        "Adam": ("adam", None, [1e-3, 3e-3, 1e-2, 3e-2]),
    }
    if args.quick:
        grids = {k: (a, b, g[1:3]) for k, (a, b, g) in grids.items()}
    runs: dict[str, dict] = {}
    tuning: dict[str, dict] = {}
    for name, (kind, batch, grid) in grids.items():
        T = args.first_order_steps
        lr, losses = timed(f"tune {name}", lambda: tune_lr(P, kind, grid, T, batch, args.seed))  # noqa: B023
        tuning[name] = {"lr": lr, "final_loss_by_lr": losses}
        Pn = {**P, "theorem4_every": 25 if name == "SGD" else 0}
        runs[name] = timed(name, lambda: run_first_order(Pn, kind, lr, T, batch, args.seed))  # noqa: B023
    K, bH = args.newton_steps, args.hessian_batch
    runs["Newton"] = timed("Newton", lambda: run_newton(P, "hessian", K, None, args.seed, tol))
    runs[f"Newton b_H={bH}"] = timed("Newton b_H", lambda: run_newton(P, "hessian", K, bH, args.seed, tol))
    runs["Gauss-Newton"] = timed(
        "Gauss-Newton", lambda: run_newton(P, "gauss_newton", K, None, args.seed, tol)
    )
    radii = [0.3, 0.1, 3e-2, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7] if not args.quick else [0.1, 1e-3, 1e-5]
    hb = [64, 120]
    sweep = timed("radius sweep", lambda: radius_sweep(P, radii, hb, 1 if args.quick else 2, args.seed))
    info["theorem7_at_x_star"] = timed(
        "Theorem 7 constants", lambda: theorem7_at_minimizer(P, hb, 4, args.seed)
    )

    results = {}
    for name, res in runs.items():
        d = res["tracker"].as_dict()
        d["final_loss"] = res["final_loss"]
        for k in ("theorem4", "optimizer"):
            if res.get(k):
                d[k] = res[k]
        results[name] = d
    # Theorem 4 against the SGD steps that followed each probe
    sgd_recs = results["SGD"]["records"]
    t4 = []
    for pr in results["SGD"].get("theorem4", []):
        window = [r["observed"] for r in sgd_recs[pr["step"] : pr["step"] + 25] if r["observed"] is not None]
        t4.append({**pr, "observed_mean_next_25": sum(window) / len(window) if window else None})
    results["SGD"]["theorem4"] = t4

    timings["total"] = round(time.perf_counter() - t_start, 1)
    out = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "problem": info,
        "lr_tuning": tuning,
        "runs": results,
        "radius_sweep": sweep,
        "timings_s": timings,
        "environment": {
            "torch": torch.__version__,
            "hessinv": hessinv.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
        },
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(dg._json_safe(out), indent=1))
    plot(dg._json_safe(results), dg._json_safe(sweep), args.figure)
    print_summary(out)
    return out


def print_summary(out: dict) -> None:
    p = out["problem"]
    print(f"teacher-student chain: n = {p['n']} parameters, {p['residuals']} residuals; "
          f"|x0 - x*| = {p['initial_error']:.3g}, loss(x0) = {p['initial_loss']:.3g}; "
          f"H(x*) eigenvalues in [{p['H_star_min_eig']:.3g}, {p['H_star_max_eig']:.3g}]")  # fmt: skip
    if "estimate_minimizer" in p:
        e = p["estimate_minimizer"]
        print(f"estimate_minimizer from x0: {e['iterations']} iterations, |g| = {e['gradient_norm']:.2g}, "
              f"|x_hat - teacher| = {e['distance_to_teacher']:.2g}")  # fmt: skip
    if "theorem7_at_x_star" in p:
        t7 = p["theorem7_at_x_star"]
        print("Theorem 7 at x*: " + ", ".join(
            f"{k}: eps_H = {v['eps_H']:.3g}, mu = {v['mu']:.3g}, q = {v['q']:.3g}"
            for k, v in t7.items() if isinstance(v, dict)))  # fmt: skip
    print(f"{'run':<15}{'lr':>8}{'steps':>7}{'median cos':>12}{'geomean obs':>13}{'geomean 1-cos^2':>17}"
          f"{'max |obs-pred|':>16}{'|e_T|':>10}{'loss_T':>10}")  # fmt: skip
    for name, r in out["runs"].items():
        s = r["summary"]
        lr = out["lr_tuning"].get(name, {}).get("lr")
        print(f"{name:<15}{(f'{lr:g}' if lr else '-'):>8}{s['steps']:>7}{s['median_cos_theta']:>12.4f}"
              f"{s['geomean_observed']:>13.4g}{s['geomean_predicted_best']:>17.4g}{s['max_identity_gap']:>16.2g}"
              f"{s['final_error']:>10.3g}{r['final_loss']:>10.3g}")  # fmt: skip
    print("radius sweep, 1 - cos(theta):")
    keys = sweep_keys(out["radius_sweep"])
    print("  " + f"{'r':>8}" + "".join(f"{k:>16}" for k in keys))
    for row in out["radius_sweep"]:
        print("  " + f"{row['radius']:>8.0e}" + "".join(f"{1 - row[k]:>16.3e}" for k in keys))
    t4 = out["runs"]["SGD"].get("theorem4", [])
    if t4:
        print("Theorem 4 along SGD (step: cos_bar, nu, predicted E factor, observed mean of next 25):")
        for pr in t4:
            print(f"  {pr['step']:>4}: {pr['cos_bar']:.4f} {pr['nu']:.3g} {pr['predicted']:.6f} "
                  f"{pr['observed_mean_next_25']:.6f}")  # fmt: skip
    print("timings (s):", out["timings_s"])


if __name__ == "__main__":
    main()
