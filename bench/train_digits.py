"""Memorize sklearn digits with a deep narrow tanh chain: Newton (Hessian, Gauss-Newton) against SGD+momentum,
Adam and L-BFGS. Wall-clock and steps to 100 % train accuracy.

Problem (issue 4): ``64 -> 8 (x15, tanh) -> 10``, PyTorch's default init, cross-entropy, float32.

* ``full``:   the first 32 digits, full batch, every method until 100 % train accuracy or the time limit;
* ``stream``: a fresh random batch of 64 of all 1797 digits each step (the same sequence for every
  method); accuracy on all 1797 digits, measured every ``--eval-every`` steps.

The clock runs only inside the methods' steps: accuracy checks are not timed. Learning rates of
SGD+momentum and Adam are a small grid; every grid point is reported. Run::

    .venv/bin/python bench/train_digits.py                 # both settings, table + JSON
    .venv/bin/python bench/train_digits.py --only full --time-limit 60
    .venv/bin/python bench/train_digits.py --newton 'tr05={"damping": {"rule": "trust-region", "shrink": .5}}'

Each run uses ``--threads`` torch threads (default 1: the tiny matrices gain little from more, and on a
shared machine oversubscribed threads dominate the timings). ``--jobs N`` runs N methods at once, for
exploration on a machine with at least ``N * threads`` idle cores only: timings are not comparable otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

DEPTH, WIDTH = 15, 8


def make_net(seed: int, dtype: torch.dtype) -> nn.Sequential:
    """``64 -> 8 (x15 tanh) -> 10`` with PyTorch's default init under ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(64, WIDTH), nn.Tanh()]
    for _ in range(DEPTH - 1):
        layers += [nn.Linear(WIDTH, WIDTH), nn.Tanh()]
    layers.append(nn.Linear(WIDTH, 10))
    return nn.Sequential(*layers).to(dtype)


def load(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data / 16.0, dtype=dtype), torch.tensor(d.target, dtype=torch.long)


# -- methods: each returns step(X, y) -> None --------------------------------------------------------
def newton_stepper(net: nn.Module, cfg: dict[str, Any]):
    import hessinv.optim as ho

    if cfg.get("default"):  # hessinv.optim.Newton(model, loss_fn) exactly as a new user calls it
        opt = ho.Newton(net, nn.CrossEntropyLoss(), seed=0)

        def default_step(X, y):
            opt.step(X, y)
            return opt.last_stats

        return default_step
    damping = cfg.get("damping", "trust-region")
    if isinstance(damping, dict):
        kw = dict(damping)
        rule = kw.pop("rule")
        damping = {"trust-region": ho.TrustRegion, "levenberg-marquardt": ho.LevenbergMarquardt}[rule](**kw)
    opt = ho.Newton(
        net,
        nn.CrossEntropyLoss(),
        curvature=cfg.get("curvature", "hessian"),
        damping=damping,
        curvature_batch_size=cfg.get("curvature_batch_size"),
        backtracking=cfg.get("backtracking", 0),
        seed=0,
    )

    def step(X, y):
        opt.step(X, y)
        return opt.last_stats

    return step


def first_order_stepper(net: nn.Module, cfg: dict[str, Any]):
    loss_fn = nn.CrossEntropyLoss()
    if cfg["kind"] == "sgd":
        opt = torch.optim.SGD(net.parameters(), lr=cfg["lr"], momentum=0.9)
    else:
        opt = torch.optim.Adam(net.parameters(), lr=cfg["lr"])

    def step(X, y):
        opt.zero_grad(set_to_none=True)
        loss_fn(net(X), y).backward()
        opt.step()

    return step


def lbfgs_stepper(net: nn.Module, cfg: dict[str, Any]):
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.LBFGS(
        net.parameters(),
        lr=1.0,
        max_iter=1,
        history_size=cfg.get("history", 20),
        line_search_fn="strong_wolfe",
    )

    def step(X, y):
        def closure():
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(X), y)
            loss.backward()
            return loss

        opt.step(closure)

    return step


def methods(newton_extra: dict[str, dict]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {
        "newton-default": {"kind": "newton", "default": True},
        "newton-hessian": {"kind": "newton"},
        "newton-gauss-newton": {
            "kind": "newton",
            "curvature": "gauss_newton",
            "damping": "levenberg-marquardt",
        },
        "newton-hessian-lm": {"kind": "newton", "damping": "levenberg-marquardt"},
    }
    for lr in (0.03, 0.3):
        out[f"sgd-momentum lr={lr:g}"] = {"kind": "sgd", "lr": lr}
    for lr in (1e-3, 1e-2):
        out[f"adam lr={lr:g}"] = {"kind": "adam", "lr": lr}
    out["lbfgs"] = {"kind": "lbfgs"}
    for name, cfg in newton_extra.items():
        out[name] = {"kind": "newton", **cfg}
    return out


def make_stepper(net, cfg):
    kind = cfg["kind"]
    if kind == "newton":
        return newton_stepper(net, cfg)
    if kind == "lbfgs":
        return lbfgs_stepper(net, cfg)
    return first_order_stepper(net, cfg)


# -- one run -----------------------------------------------------------------------------------------
def run(name: str, cfg: dict[str, Any], setting: str, args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, cfg.get("dtype", "float32"))
    X_all, y_all = load(dtype)
    net = make_net(args.seed, dtype)
    if setting == "stream" and cfg["kind"] == "newton" and "curvature_batch_size" not in cfg:
        cfg = {**cfg, "curvature_batch_size": args.stream_curvature_batch}
    step = make_stepper(net, cfg)
    if setting == "full":
        X_eval, y_eval = X_all[: args.examples], y_all[: args.examples]
        limit, every = args.time_limit, 1
    else:
        X_eval, y_eval = X_all, y_all
        limit, every = args.stream_time_limit, args.eval_every
        gen = torch.Generator().manual_seed(args.seed + 1)

    def accuracy() -> float:
        with torch.no_grad():
            return float((net(X_eval).argmax(1) == y_eval).float().mean())

    clock, steps, hit, best = 0.0, 0, None, 0.0
    thresholds = {0.5: None, 0.9: None, 1.0: None}
    newton_stats = {"accepted": 0, "factorizations": 0, "hard_case": 0}
    loss = math.nan
    while clock < limit and steps < args.max_steps:
        if setting == "full":
            X, y = X_eval, y_eval
        else:
            idx = torch.randint(0, X_all.shape[0], (args.batch,), generator=gen)
            X, y = X_all[idx], y_all[idx]
        t = time.perf_counter()
        st = step(X, y)
        clock += time.perf_counter() - t
        steps += 1
        if st is not None:
            newton_stats["accepted"] += int(st.accepted)
            newton_stats["factorizations"] += st.factorizations
            newton_stats["hard_case"] += int(st.hard_case)
        if steps % every == 0:
            acc = accuracy()
            best = max(best, acc)
            for th in thresholds:
                if thresholds[th] is None and acc >= th:
                    thresholds[th] = (steps, round(clock, 3))
            if acc >= 1.0:
                hit = (steps, clock)
                break
    with torch.no_grad():
        loss = float(nn.CrossEntropyLoss()(net(X_eval), y_eval))
    best = max(best, accuracy())
    res = {
        "method": name,
        "setting": setting,
        "config": {k: v for k, v in cfg.items() if k != "kind"},
        "reached_100": hit is not None,
        "steps_to_100": hit[0] if hit else None,
        "seconds_to_100": round(hit[1], 3) if hit else None,
        "steps": steps,
        "seconds": round(clock, 3),
        "seconds_per_step": round(clock / max(steps, 1), 5),
        "final_accuracy": accuracy(),
        "best_accuracy": best,
        "final_loss": loss,
        "first_reached": {str(k): v for k, v in thresholds.items()},
    }
    if cfg["kind"] == "newton":
        res["newton"] = newton_stats
    return res


def table(results: list[dict[str, Any]], setting: str) -> str:
    rows = [r for r in results if r["setting"] == setting]
    rows.sort(key=lambda r: (not r["reached_100"], r["seconds_to_100"] or math.inf, -r["best_accuracy"]))
    head = (
        f"{'method':<28} {'100%?':>5} {'s to 100%':>9} {'steps':>6} {'s/step':>8} {'best acc':>8} {'loss':>9}"
    )
    head += "  s to 50% / 90%"
    lines = [head, "-" * len(head)]
    for r in rows:
        fr = r["first_reached"]
        t50 = "-" if fr["0.5"] is None else f"{fr['0.5'][1]:.1f}"
        t90 = "-" if fr["0.9"] is None else f"{fr['0.9'][1]:.1f}"
        lines.append(
            f"{r['method']:<28} {'yes' if r['reached_100'] else 'no':>5} "
            f"{(r['seconds_to_100'] if r['reached_100'] else float('nan')):>9.2f} "
            f"{(r['steps_to_100'] or r['steps']):>6} {r['seconds_per_step']:>8.4f} "
            f"{r['best_accuracy']:>8.3f} "
            f"{r['final_loss']:>9.2e}  {t50} / {t90}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=["full", "stream"], help="run one setting only")
    ap.add_argument("--methods", help="comma-separated method names (default: all)")
    ap.add_argument("--time-limit", type=float, default=20.0, help="seconds per method, full batch")
    ap.add_argument("--stream-time-limit", type=float, default=4.0, help="seconds per method, stream")
    ap.add_argument("--max-steps", type=int, default=1_000_000)
    ap.add_argument("--examples", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--stream-curvature-batch", type=int, default=32)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--newton", action="append", default=[], metavar="NAME=JSON", help="extra Newton config")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "train_digits.json"))
    args = ap.parse_args(argv)

    extra = {}
    for spec in args.newton:
        name, _, js = spec.partition("=")
        extra[name] = json.loads(js)
    all_methods = methods(extra)
    names = list(all_methods) if not args.methods else [m.strip() for m in args.methods.split(",")]
    unknown = [n for n in names if n not in all_methods]
    if unknown:
        ap.error(f"unknown methods {unknown}; known: {list(all_methods)}")
    settings = [args.only] if args.only else ["full", "stream"]
    jobs = [(n, all_methods[n], s) for s in settings for n in names]

    results: list[dict[str, Any]] = []
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
            futs = [ex.submit(run, n, c, s, args) for n, c, s in jobs]
            results = [f.result() for f in futs]
    else:
        for n, c, s in jobs:
            results.append(run(n, c, s, args))
            r = results[-1]
            print(f"  {s:<6} {n:<28} reached={r['reached_100']} steps={r['steps']} t={r['seconds']}s "
                  f"best={r['best_accuracy']:.3f}", file=sys.stderr, flush=True)  # fmt: skip

    for s in settings:
        title = f"{s}: " + (
            f"{args.examples} digits, full batch, limit {args.time_limit:g} s"
            if s == "full"
            else f"fresh batches of {args.batch} from 1797 digits, accuracy on all, "
            f"limit {args.stream_time_limit:g} s"
        )
        print(f"\n{title}\n{table(results, s)}")
    meta = {
        "problem": f"64 -> {WIDTH} x{DEPTH} tanh -> 10, default init, cross-entropy",
        "torch": torch.__version__,
        "threads": args.threads,
        "jobs": args.jobs,
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "args": {k: v for k, v in vars(args).items() if k != "newton"},
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
