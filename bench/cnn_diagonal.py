"""Exact Hessian and Gauss-Newton diagonals of CNNs: hessinv against BackPACK, side by side in one process.

hessinv carries the loss's curvature per example through the chain (``H.diagonal()``, ``G.diagonal()``;
convolutions and pooling pull each example's columns back through autograd); BackPACK's
``DiagHessian`` / ``DiagGGNExact`` propagate the same square-root factors through its module rules
(timed with the forward and backward pass they need). For each model and dtype: building the operator,
each diagonal from the model (the operator and its diagonal, median of ``--repeats``), BackPACK's, and
the largest difference relative to the largest entry. Process CPU time beside wall time, the load
average, a JSON record::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD/src .venv/bin/python bench/cnn_diagonal.py --out bench/results

BackPACK (``pip install backpack-for-pytorch``) is optional: without it only hessinv's columns.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cnn_curvature  # noqa: E402
from common import load_average, machine_info, timed  # noqa: E402

import hessinv  # noqa: E402


def models() -> dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]]:
    """name -> (model factory, input shape per example, batch): bench/cnn_curvature.py's 8 x 8 and
    CIFAR-shaped ReLU CNNs (the latter at batch 32), the thirty-fourth session's 28 x 28 CNN, a small
    sigmoid CNN."""
    curvature = cnn_curvature.models()
    small, cifar = curvature["cnn-8x8 (digits-sized)"], curvature["cnn-cifar (3x32x32)"]
    relu28 = lambda: nn.Sequential(  # noqa: E731
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 7 * 7, 10),
    )  # fmt: skip
    sigmoid8 = lambda: nn.Sequential(  # noqa: E731
        nn.Conv2d(1, 4, 3, padding=1), nn.Sigmoid(), nn.MaxPool2d(2), nn.Conv2d(4, 8, 3, padding=1),
        nn.Sigmoid(), nn.Flatten(), nn.Linear(128, 10),
    )  # fmt: skip
    return {
        "cnn-8x8 relu": small,
        "cnn-28x28 relu": (relu28, (1, 28, 28), 32),
        "cnn-8x8 sigmoid": (sigmoid8, (1, 8, 8), 16),
        "cnn-cifar relu": (cifar[0], cifar[1], 32),
    }


def _backpack(make: Callable[[], nn.Module], state: dict, X, y, kind: str) -> torch.Tensor | None:
    """BackPACK's diagonal (``kind`` "hessian" or "ggn") in model.parameters() order, or None."""
    try:
        from backpack import backpack, extend
        from backpack.extensions import DiagGGNExact, DiagHessian
    except ImportError:
        return None
    model = extend(make().to(X.dtype))
    model.load_state_dict(state)
    loss = extend(nn.CrossEntropyLoss())(model(X), y)
    ext, attr = (DiagHessian(), "diag_h") if kind == "hessian" else (DiagGGNExact(), "diag_ggn_exact")
    try:
        with backpack(ext):
            loss.backward()
    except RuntimeError as e:  # (BackPACK 1.7's pooling rules in float64: a float32 conv_transpose2d)
        print(f"  BackPACK {type(ext).__name__} failed: {' '.join(str(e).split())[:100]}", flush=True)
        return None
    return torch.cat([getattr(p, attr).reshape(-1) for p in model.parameters()])


def run(name: str, dtype: torch.dtype, repeats: int) -> dict:
    make, shape, batch = models()[name]
    torch.manual_seed(0)
    model = make().to(dtype)
    X = torch.randn(batch, *shape, dtype=dtype)
    y = torch.randint(0, 10, (batch,))
    loss_fn = nn.CrossEntropyLoss()
    rec: dict = {"model": name, "dtype": str(dtype), "batch": batch}
    for kind, op in (("hessian", hessinv.hessian), ("ggn", hessinv.gauss_newton)):
        rec[f"{kind}_build_cpu_s"], _, C = timed(lambda op=op: op(model, loss_fn, X, y), 1)
        rec["n"] = C.shape[0]
        # (from the model, as BackPACK's: the operator and its diagonal)
        rec[f"{kind}_diag_cpu_s"], rec[f"{kind}_diag_wall_s"], d = timed(
            lambda op=op: op(model, loss_fn, X, y).diagonal(), repeats
        )
        cpu, wall, ref = timed(lambda k=kind: _backpack(make, model.state_dict(), X, y, k), repeats)
        if ref is not None:
            rec[f"{kind}_backpack_cpu_s"], rec[f"{kind}_backpack_wall_s"] = cpu, wall
            rec[f"{kind}_rel_diff"] = float((d - ref).abs().max() / ref.abs().max())
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="directory for cnn_diagonal.json")
    ap.add_argument("--models", default=",".join(models()), help="comma-separated names")
    args = ap.parse_args()
    torch.set_num_threads(1)
    load0 = load_average()
    records = []
    for name in args.models.split(","):
        for dtype in (torch.float32, torch.float64):
            r = run(name, dtype, args.repeats)
            records.append(r)
            cols = []
            for kind in ("hessian", "ggn"):
                bp = r.get(f"{kind}_backpack_cpu_s")
                cols.append(
                    f"{kind} {r[f'{kind}_diag_cpu_s']:.3f}s (of it building {r[f'{kind}_build_cpu_s']:.3f}s)"
                    + ("" if bp is None else f" vs BackPACK {bp:.3f}s, diff {r[f'{kind}_rel_diff']:.1e}")
                )
            head = f"{name:16s} {r['dtype']:13s} n={r['n']:6d} B={r['batch']:3d} | "
            print(head + " | ".join(cols), flush=True)
    out = {"records": records, "machine": machine_info("cpu"), "load_average": [load0, load_average()]}
    print(json.dumps({"summary": records}))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cnn_diagonal.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
