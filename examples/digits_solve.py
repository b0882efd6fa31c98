"""Exact Newton solve on a 32-stage tanh chain on sklearn's digits, against dense autograd.

Run: ``.venv/bin/python examples/digits_solve.py`` (about a minute on 2 cores).
Prints the time of hessinv's factor+solve vs dense ``torch.func.hessian`` + ``torch.linalg.solve``,
their agreement, ``lambda_min(H)`` (block Lanczos certified by an inertia count), and the
inertia of ``H`` at 0 (an ``AccuracyWarning``, if the sweep says its count may be off, is printed and
the dense count shows whether it was).
"""

from __future__ import annotations

import time
import warnings

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.func import functional_call

import hessinv


def main(depth: int = 32, width: int = 8, batch: int = 64, damping: float = 1e-2) -> None:
    torch.manual_seed(0)
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X[:batch] / 16.0, dtype=torch.float64)
    y = torch.tensor(y[:batch])
    layers: list[nn.Module] = [nn.Linear(64, width), nn.Tanh()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(width, 10)).double()
    loss_fn = nn.CrossEntropyLoss()
    n = sum(p.numel() for p in model.parameters())
    print(
        f"digits: {batch} examples; chain of {depth} Linear layers (width {width}, tanh); n = {n} parameters"
    )

    # torch's first double backward in a process imports sympy (about 1 s), whichever library runs first:
    # paid here, before either timing
    w = next(model.parameters())
    (gw,) = torch.autograd.grad(loss_fn(model(X), y), w, create_graph=True)
    torch.autograd.grad(gw.sum(), w)
    t0 = time.perf_counter()
    H = hessinv.hessian(model, loss_fn, X, y)
    t1 = time.perf_counter()
    x, info = H.solve(H.gradient, damping=damping, return_info=True)
    t2 = time.perf_counter()
    print(
        f"hessinv   derivatives {t1 - t0:6.2f} s   factor+solve {t2 - t1:6.2f} s   "
        f"relative residual {info.residual:.1e}"
    )

    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    x0 = torch.nn.utils.parameters_to_vector(model.parameters()).detach()

    def loss_of(v: torch.Tensor) -> torch.Tensor:
        params = dict(zip(names, torch.split(v, [s.numel() for s in shapes]), strict=True))
        params = {k: t.view(s) for (k, t), s in zip(params.items(), shapes, strict=True)}
        return loss_fn(functional_call(model, params, (X,)), y)

    t3 = time.perf_counter()
    Hd = torch.func.hessian(loss_of)(x0)
    t4 = time.perf_counter()
    xd = torch.linalg.solve(Hd + damping * torch.eye(n, dtype=torch.float64), H.gradient)
    t5 = time.perf_counter()
    err = float((x - xd).norm() / xd.norm())
    print(f"dense     hessian     {t4 - t3:6.2f} s   solve        {t5 - t4:6.2f} s")
    print(
        f"agreement |x - x_dense| / |x_dense| = {err:.1e}; speed-up {(t5 - t3) / (t2 - t0):.0f}x "
        f"(end to end, derivatives included)"
    )
    lam = H.min_eigenvalue()
    ev = torch.linalg.eigvalsh(Hd)
    print(f"lambda_min(H) = {lam:.6e} by Lanczos + inertia (dense eigvalsh: {float(ev[0]):.6e})")
    tol = torch.finfo(torch.float64).eps ** 0.5 * H.norm_estimate()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", hessinv.AccuracyWarning)
        neg, zero, pos = H.inertia(0.0, tol=tol)
    for w in caught:
        print(f"note (AccuracyWarning): {' '.join(str(w.message).split())}")
    dense = (int((ev < -tol).sum()), int((ev.abs() <= tol).sum()), int((ev > tol).sum()))
    print(
        f"inertia of H at 0: {neg} negative, {zero} zero (|lambda| <= {tol:.1e}), {pos} positive; "
        f"dense eigvalsh: {dense}"
    )


if __name__ == "__main__":
    main()
