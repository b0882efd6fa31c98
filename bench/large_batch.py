"""Large batches on small models, against BackPACK and curvlinops (the shapes where an ``a x a`` sweep is
the wrong tool: ``a = B x width`` far above the parameters).

* diagonal: ``H.diagonal()`` / ``G.diagonal()`` (per-example blocks) against BackPACK's exact
  ``DiagHessian`` / ``DiagGGNExact``: time, and their agreement (two exact methods: they must agree to
  rounding).
* solve: ``H.solve(g, eps)`` / ``G.solve(g, eps)`` (MINRES first where a factorization costs far more,
  else the factorization) against the factorization route alone (``op.factor(eps).solve(g)``, what
  ``solve`` did before) and scipy's ``minres`` (Hessian: indefinite) / ``cg`` (Gauss-Newton) on
  curvlinops' linear operators at ``rtol = 1e-10``: time and the true relative residual (hessinv's
  float64 product).

float64, one thread, medians of ``--repeat`` runs (the factorization route: one run), process CPU time
beside wall time; run under the shared lock::

    flock /tmp/hessinv-bench.lock env OMP_NUM_THREADS=1 PYTHONPATH=$PWD/src \\
        .venv/bin/python bench/large_batch.py

Writes ``bench/results/large_batch.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from common import load_average, machine_info, timed  # noqa: E402

import hessinv  # noqa: E402

CASES = {  # name: (layer sizes, batch)
    "mlp-16": ([64, 16, 16, 10], 128),
    "mlp-64": ([64, 64, 64, 10], 256),
    "wide-512": ([10, 512, 3], 32),
    "mlp-128": ([64, 128, 64, 10], 64),
}


def problem(sizes: list[int], batch: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), nn.Tanh()]
    net = nn.Sequential(*layers[:-1]).double()
    return net, torch.randn(batch, sizes[0], dtype=torch.float64), torch.randint(0, sizes[-1], (batch,))


def backpack_diagonal(net: nn.Module, X, y, which: str) -> torch.Tensor:
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact, DiagHessian

    model, loss_fn = extend(copy.deepcopy(net)), extend(nn.CrossEntropyLoss())  # (its hooks: on a copy)
    model.zero_grad()
    ext = DiagHessian() if which == "hessian" else DiagGGNExact()
    with backpack(ext):
        loss_fn(model(X), y).backward()
    field = "diag_h" if which == "hessian" else "diag_ggn_exact"
    return torch.cat([getattr(p, field).reshape(-1) for p in model.parameters()])


def curvlinops_solve(net: nn.Module, X, y, which: str, eps: float, g: torch.Tensor) -> tuple[np.ndarray, int]:
    import scipy.sparse.linalg as sla
    from curvlinops import GGNLinearOperator, HessianLinearOperator

    cls = HessianLinearOperator if which == "hessian" else GGNLinearOperator
    params = [p for p in net.parameters() if p.requires_grad]
    op = cls(net, nn.CrossEntropyLoss(), params, [(X, y)], check_deterministic=False).to_scipy()
    A = sla.LinearOperator(op.shape, matvec=lambda v: op @ v + eps * v, dtype=np.float64)
    count = [0]

    def cb(_):
        count[0] += 1

    method = sla.minres if which == "hessian" else sla.cg
    x, _ = method(A, g.numpy(), rtol=1e-10, maxiter=5000, callback=cb)
    return x, count[0]


def residual(op, eps: float, x, g: torch.Tensor) -> float:
    x = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    return float((g - (op @ x + eps * x)).norm() / g.norm())


def run_case(name: str, repeat: int, epsilons: list[float], factor: bool) -> dict:
    """One case's record: per curvature, the diagonal's and each damping's solve timings."""
    sizes, batch = CASES[name]
    net, X, y = problem(sizes, batch)
    rec: dict = {"case": name, "sizes": sizes, "batch": batch}
    for which, make in (("hessian", hessinv.hessian), ("gauss_newton", hessinv.gauss_newton)):
        op = make(net, nn.CrossEntropyLoss(), X, y)
        n, g = op.shape[0], op.gradient
        rec["n"] = n

        def fresh(make=make):  # (each timed call on a new operator: nothing cached)
            return make(net, nn.CrossEntropyLoss(), X, y)

        c, w, d = timed(lambda: fresh().diagonal(), repeat)
        row: dict = {"hessinv_diagonal_s": w, "hessinv_diagonal_cpu_s": c}
        try:
            c2, w2, ref = timed(lambda which=which: backpack_diagonal(net, X, y, which), repeat)
            row |= {"backpack_s": w2, "backpack_cpu_s": c2, "ratio_backpack_over_hessinv": w2 / w}
            row["agreement"] = float((d - ref).abs().max() / ref.abs().max())
        except ImportError as e:
            row["backpack"] = f"skipped: {e}"
        for eps in epsilons:
            s: dict = {}
            c, w, (x, info) = timed(lambda eps=eps, g=g: fresh().solve(g, eps, return_info=True), repeat)
            s |= {"hessinv_s": w, "hessinv_cpu_s": c, "hessinv_residual": info.residual}
            # (the MINRES route: products spent, no refinement step; None: the factorization answered)
            minres = info.refinement_steps == 0 and info.krylov_iterations > 0
            s["hessinv_products"] = info.krylov_iterations if minres else None
            if factor:
                c2, w2, x2 = timed(lambda eps=eps, g=g: fresh().factor(eps).solve(g))
                s |= {"factor_s": w2, "factor_cpu_s": c2, "factor_residual": residual(op, eps, x2, g)}
            try:
                c3, w3, (x3, its) = timed(
                    lambda eps=eps, g=g, which=which: curvlinops_solve(net, X, y, which, eps, g), repeat
                )
                s |= {"curvlinops_s": w3, "curvlinops_cpu_s": c3, "curvlinops_iterations": its}
                s["curvlinops_residual"] = residual(op, eps, x3, g)
            except ImportError as e:
                s["curvlinops"] = f"skipped: {e}"
            row[f"solve_eps_{eps:g}"] = s
        rec[which] = row
    return rec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--eps", default="1,1e-3", help="dampings of the solves ('' for none)")
    ap.add_argument("--no-factor", action="store_true", help="skip the factorization route (minutes)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "large_batch.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    record = {"machine": machine_info("cpu"), "load_start": load_average(), "cases": []}
    for name in args.cases.split(","):
        eps = [float(e) for e in args.eps.split(",") if e]
        rec = run_case(name, args.repeat, eps, not args.no_factor)
        record["cases"].append(rec)
        for which in ("hessian", "gauss_newton"):
            r = rec[which]
            line = f"{name:9s} n={rec['n']:6d} {which:12s} diagonal {r['hessinv_diagonal_s'] * 1e3:8.1f} ms"
            if "backpack_s" in r:
                ratio = r["ratio_backpack_over_hessinv"]
                line += f"  BackPACK {r['backpack_s'] * 1e3:8.1f} ms ({ratio:.1f}x)"
                line += f"  agree {r['agreement']:.1e}"
            print(line)
            for key, s in r.items():
                if key.startswith("solve_"):
                    line = f"    {key:15s} hessinv {s['hessinv_s']:7.2f} s (res {s['hessinv_residual']:.1e})"
                    if "factor_s" in s:
                        line += f"  factor {s['factor_s']:7.2f} s (res {s['factor_residual']:.1e})"
                    if "curvlinops_s" in s:
                        line += (
                            f"  curvlinops {s['curvlinops_s']:7.2f} s (res {s['curvlinops_residual']:.1e}, "
                            f"{s['curvlinops_iterations']} its)"
                        )
                    print(line, flush=True)
    record["load_end"] = load_average()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(json.dumps({"load_start": record["load_start"], "load_end": record["load_end"]}))


if __name__ == "__main__":
    main()
