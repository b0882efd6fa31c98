"""Exact factorizations of models with a lookup table: the pivot in the rows the batch reads against the
table's full pivot, side by side in one process.

An ``nn.Embedding(V, D)`` stage's Riccati pivot is ``Jx^T Sigma Jx + eps I`` over all ``V D`` entries of the
table, but ``Jx`` is zero outside the rows the batch's tokens read: hessinv factors it through ``eps I_r +
A`` on those ``r`` rows (``A`` in closed form), ``eps`` on the rest. For each table size: the Hessian's
``factor(1e-2)`` and a solve of ``(H + eps I) x = g`` (its relative residual by the O(L) product), and the
full-pivot route (the rows' route switched off) where its ``(V D)^2`` pivot fits in ``--full-max``
entries -- a ratio of the two, and of their log-determinants; also scipy's MINRES on
``H.as_linear_operator()`` (shift ``eps``, ``rtol=1e-10``), the route a user without a factorization would
take. Wall and process CPU time, medians of ``--repeats``, the load average, a JSON record::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD/src .venv/bin/python bench/table_factor.py --out bench/results
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import scipy.sparse.linalg as sla
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, machine_info, timed  # noqa: E402

import hessinv  # noqa: E402
from hessinv.stages.generic import LazyBlocks  # noqa: E402


class _Mean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1)


def _problem(V: int, D: int, B: int, T: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """``Embedding(V, D)`` -> mean over ``T`` tokens -> 16 tanh -> 10 classes, float64, seeded batch."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(V, D), _Mean(), nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, 10)).double()
    g = torch.Generator().manual_seed(1)
    return net, torch.randint(0, V, (B, T), generator=g), torch.randint(0, 10, (B,), generator=g)


def _factor_solve(net: nn.Module, X: torch.Tensor, y: torch.Tensor, eps: float) -> dict:
    H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    cpu, wall, F = timed(lambda: H.factor(eps))
    x = F.solve(H.gradient)
    res = float((H @ x + eps * x - H.gradient).norm() / H.gradient.norm())
    return {"wall_s": wall, "cpu_s": cpu, "residual": res, "logdet": F.logdet(), "n": H.shape[0]}


def _minres(net: nn.Module, X: torch.Tensor, y: torch.Tensor, eps: float) -> dict:
    H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    op, g = H.as_linear_operator(), H.gradient.numpy()
    cpu, wall, out = timed(lambda: sla.minres(op, g, shift=-eps, rtol=1e-10, maxiter=2000))
    x = torch.from_numpy(out[0])  # type: ignore[index]
    res = float((H @ x + eps * x - H.gradient).norm() / H.gradient.norm())
    return {"wall_s": wall, "cpu_s": cpu, "residual": res}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tables", default="500,5000,20000", help="table sizes V")
    ap.add_argument("--width", type=int, default=16, help="D")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=12, help="T")
    ap.add_argument("--damping", type=float, default=1e-2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--full-max", type=float, default=1e8, help="largest full pivot tried, in entries")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for V in [int(v) for v in a.tables.split(",")]:
        net, X, y = _problem(V, a.width, a.batch, a.tokens)
        runs = [_factor_solve(net, X, y, a.damping) for _ in range(a.repeats)]
        row = {
            "V": V,
            "n": runs[0]["n"],
            "rows_read": int(X.unique().numel()),
            "rows": {k: statistics.median(r[k] for r in runs) for k in ("wall_s", "cpu_s", "residual")},
            "logdet": runs[0]["logdet"],
            "minres": _minres(net, X, y, a.damping),
        }
        if float(V * a.width) ** 2 <= a.full_max:
            kept = LazyBlocks._read_rows
            LazyBlocks._read_rows = lambda self: None  # type: ignore[method-assign]  # the full pivot
            try:
                full = [_factor_solve(net, X, y, a.damping) for _ in range(a.repeats)]
            finally:
                LazyBlocks._read_rows = kept  # type: ignore[method-assign]
            row["full"] = {k: statistics.median(r[k] for r in full) for k in ("wall_s", "cpu_s", "residual")}
            row["full_logdet"] = full[0]["logdet"]
            row["speedup_cpu"] = row["full"]["cpu_s"] / row["rows"]["cpu_s"]
        rows.append(row)
        full_txt = (
            f"full pivot {row['full']['wall_s']:.2f} s wall / {row['full']['cpu_s']:.2f} s CPU, "
            f"{row['speedup_cpu']:.1f}x, log det agree to {abs(row['logdet'] - row['full_logdet']):.1e}"
            if "full" in row
            else "full pivot not tried"
        )
        print(
            f"V={V} n={row['n']} rows read {row['rows_read']}: factor {row['rows']['wall_s']:.2f} s wall / "
            f"{row['rows']['cpu_s']:.2f} s CPU, residual {row['rows']['residual']:.1e}; {full_txt}; MINRES "
            f"{row['minres']['wall_s']:.2f} s, residual {row['minres']['residual']:.1e}",
            flush=True,
        )
    record = {
        "machine": machine_info("cpu"),
        "load": load_average(),
        "settings": vars(a) | {"out": str(a.out)},
    }
    record["rows"] = rows
    print(json.dumps(record, default=str))
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "table_factor.json").write_text(json.dumps(record, indent=1, default=str))


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
