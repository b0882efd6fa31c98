"""Curvature products of CNNs: hessinv against plain autograd and torch.func, side by side in one process.

Convolutions and pooling on images are generic stages whose dense per-example blocks are huge (a
16 x 16 image's first convolution: 2048 x 256 per example); hessinv takes their products lazily by
autograd at the linearization point. For each model: building the operator, one Hessian-vector product
(median of ``--repeats``), the same product by plain autograd double backward and by ``torch.func``
(forward-over-reverse), the relative difference to plain autograd, a Gauss-Newton product, and the 3
largest Hessian eigenvalues by ``scipy.sparse.linalg.eigsh`` on each product. Process CPU time beside
wall time (the machine is shared), the load average, a JSON record::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD/src .venv/bin/python bench/cnn_curvature.py --out bench/results
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.sparse.linalg as sla
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, machine_info, timed  # noqa: E402

import hessinv  # noqa: E402


def models() -> dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]]:
    """name -> (model factory, input shape per example, batch)."""
    return {
        "cnn-8x8 (digits-sized)": (
            lambda: nn.Sequential(
                nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1),
                nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(64, 10),
            ),
            (1, 8, 8), 64,
        ),
        "cnn-16x16": (
            lambda: nn.Sequential(
                nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1),
                nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, 10),
            ),
            (1, 16, 16), 32,
        ),
        "cnn-cifar (3x32x32)": (
            lambda: nn.Sequential(
                nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1),
                nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2048, 64), nn.ReLU(), nn.Linear(64, 10),
            ),
            (3, 32, 32), 64,
        ),
    }  # fmt: skip


def run(name: str, dtype: torch.dtype, repeats: int) -> dict:
    make, shape, batch = models()[name]
    torch.manual_seed(0)
    model = make().to(dtype)
    X = torch.randn(batch, *shape, dtype=dtype)
    y = torch.randint(0, 10, (batch,))
    loss_fn = nn.CrossEntropyLoss()
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    v = torch.randn(n, dtype=dtype, generator=torch.Generator().manual_seed(1))

    def autograd_hvp(vec: torch.Tensor) -> torch.Tensor:
        g = torch.autograd.grad(loss_fn(model(X), y), params, create_graph=True)
        flat = torch.cat([t.reshape(-1) for t in g])
        return torch.cat([t.reshape(-1) for t in torch.autograd.grad(flat @ vec, params)])

    names = [k for k, _ in model.named_parameters()]
    values = tuple(p.detach() for p in params)

    def func_loss(*ps: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, dict(zip(names, ps, strict=True)), (X,))
        return loss_fn(out, y)

    def func_hvp(vec: torch.Tensor) -> torch.Tensor:
        tangents = tuple(
            t.reshape(p.shape) for t, p in zip(vec.split([p.numel() for p in params]), params, strict=True)
        )
        _, hv = torch.func.jvp(
            lambda *ps: torch.func.grad(func_loss, argnums=tuple(range(len(ps))))(*ps), values, tangents
        )
        return torch.cat([t.reshape(-1) for t in hv])

    rec: dict = {"model": name, "dtype": str(dtype), "n": n, "batch": batch}
    rec["build_cpu_s"], rec["build_wall_s"], H = timed(lambda: hessinv.hessian(model, loss_fn, X, y), 1)
    rec["hessinv_hvp_cpu_s"], rec["hessinv_hvp_wall_s"], hv = timed(lambda: H @ v, repeats)
    rec["autograd_hvp_cpu_s"], rec["autograd_hvp_wall_s"], ref = timed(lambda: autograd_hvp(v), repeats)
    rec["func_hvp_cpu_s"], rec["func_hvp_wall_s"], fref = timed(lambda: func_hvp(v), repeats)
    rec["hvp_rel_diff_vs_autograd"] = float((hv - ref).norm() / ref.norm())
    rec["func_rel_diff_vs_autograd"] = float((fref - ref).norm() / ref.norm())
    G = hessinv.gauss_newton(model, loss_fn, X, y)
    rec["hessinv_gnvp_cpu_s"], rec["hessinv_gnvp_wall_s"], _ = timed(lambda: G @ v, repeats)

    def top3(matvec: Callable[[torch.Tensor], torch.Tensor]) -> list[float]:
        def mv(x: np.ndarray) -> np.ndarray:
            t = torch.from_numpy(np.asarray(x, dtype=np.float64).ravel()).to(dtype)
            return matvec(t).double().numpy()

        op = sla.LinearOperator((n, n), matvec=mv, dtype=np.float64)
        return sorted(float(w) for w in sla.eigsh(op, k=3, which="LA", return_eigenvectors=False, tol=1e-6))

    rec["hessinv_eigsh_cpu_s"], _, rec["hessinv_top3"] = timed(lambda: top3(lambda t: H @ t), 1)
    rec["autograd_eigsh_cpu_s"], _, rec["autograd_top3"] = timed(lambda: top3(autograd_hvp), 1)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None, help="directory for cnn_curvature.json")
    ap.add_argument("--models", default=",".join(models()), help="comma-separated names")
    args = ap.parse_args()
    torch.set_num_threads(1)
    load0 = load_average()
    records = []
    for name in args.models.split(","):
        for dtype in (torch.float32, torch.float64):
            r = run(name, dtype, args.repeats)
            records.append(r)
            ms = {
                k: 1e3 * r[f"{k}_cpu_s"] for k in ("hessinv_hvp", "autograd_hvp", "func_hvp", "hessinv_gnvp")
            }
            print(
                f"{name:22s} {r['dtype']:13s} n={r['n']:6d} B={r['batch']:3d} | build {r['build_cpu_s']:.2f}s"
                f" | H@v hessinv {ms['hessinv_hvp']:.1f} ms, autograd {ms['autograd_hvp']:.1f} ms"
                f" ({ms['hessinv_hvp'] / ms['autograd_hvp']:.2f}x), torch.func {ms['func_hvp']:.1f} ms"
                f" | diff {r['hvp_rel_diff_vs_autograd']:.1e} | G@v {ms['hessinv_gnvp']:.1f} ms"
                f" | eigsh top-3 {r['hessinv_eigsh_cpu_s']:.2f}s vs {r['autograd_eigsh_cpu_s']:.2f}s",
                flush=True,
            )
    out = {"records": records, "machine": machine_info("cpu"), "load_average": [load0, load_average()]}
    print(
        json.dumps(
            {
                "summary": [
                    {k: r[k] for k in ("model", "dtype", "hessinv_hvp_cpu_s", "autograd_hvp_cpu_s")}
                    for r in records
                ]
            }
        )
    )
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cnn_curvature.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
