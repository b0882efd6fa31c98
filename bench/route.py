"""The factorization's route (:meth:`hessinv.CurvatureOperator._swept`) against the other one, side by side:
for each shape, ``H.factor(eps)`` by the route hessinv picks and by each route forced (the chain's Riccati
sweep; the dense route: ``n`` products, then one dense factorization), and which one it picked. The dense
route's products are timed on a block of columns where the sweep is priced above
``DENSE_ROUTE_TIMED_MIN_SECONDS``: the flop model prices a convolution's or a generic stage's product 5-30x
under its time.

float64, one thread, medians of ``--repeat`` runs, process CPU time beside wall time; run under the lock::

    flock /tmp/hessinv-bench.lock env OMP_NUM_THREADS=1 PYTHONPATH=$PWD/src .venv/bin/python bench/route.py

Writes ``bench/results/route.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, machine_info, tanh_mlp, timed  # noqa: E402

import hessinv  # noqa: E402


def _conv(batch: int):
    """Two Conv1d layers on (B, 1, 40) signals, a Linear head: 3586 parameters."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(1, 8, 5, padding=2), nn.Tanh(), nn.Conv1d(8, 8, 5, padding=2), nn.Tanh(), nn.Flatten(),
        nn.Linear(8 * 40, 10),
    ).double()  # fmt: skip
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(batch, 1, 40, generator=g, dtype=torch.float64), torch.randint(0, 10, (batch,))


def _shapes():
    for B in (8, 32):
        yield f"conv1d 2x8 channels, B={B}", *_conv(B)
    for B in (256, 1024):
        p = tanh_mlp(8, B, 15)
        yield f"tanh MLP {p.label}", p.model, p.inputs, p.targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--eps", type=float, default=1e-2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for label, model, X, y in _shapes():
        loss = nn.CrossEntropyLoss()
        times = {}
        for route in ("picked", "sweep", "dense"):

            def run(route=route, model=model, loss=loss, X=X, y=y):
                H = hessinv.hessian(model, loss, X, y)
                if route == "sweep":
                    H._view = H
                elif route == "dense":
                    H._view = H._dense_view()
                picked = "dense" if H._swept() is not H else "sweep"
                H.factor(args.eps)
                return picked

            cpu, wall, picked = timed(run, args.repeat)
            times[route] = {"cpu_s": round(cpu, 3), "wall_s": round(wall, 3)}
            if route == "picked":
                times["picked_route"] = picked
        best = min(times["sweep"]["cpu_s"], times["dense"]["cpu_s"])
        row = {"shape": label, **times, "picked_over_best": round(times["picked"]["cpu_s"] / best, 2)}
        rows.append(row)
        print(
            f"{label:32s} picked {times['picked_route']:5s} {times['picked']['cpu_s']:7.2f} s | sweep "
            f"{times['sweep']['cpu_s']:7.2f} s | dense {times['dense']['cpu_s']:7.2f} s | picked/best "
            f"{row['picked_over_best']:.2f}  (CPU seconds, median of {args.repeat})",
            flush=True,
        )
    out = {"machine": machine_info("cpu"), "rows": rows, "load_average_end": load_average()}
    path = Path(__file__).resolve().parent / "results" / "route.json"
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
