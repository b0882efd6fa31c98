"""Reproduce the *measured* facts quoted in docs/math.md §1-2 (float64, small tanh chains).

Each line printed is one figure of math.md, computed here against a dense reference from plain
``torch.autograd`` double backward (or ``torch.linalg`` on it). The chains are the benchmark chain of
``bench/common.py`` (tanh MLP, width ``w``, batch ``B``, ``L`` Linear layers, cross-entropy over 10
classes) unless stated. About a minute on one core::

    PYTHONPATH=src .venv/bin/python bench/math_facts.py

The timing figures of math.md come from ``bench/solve.py`` (docs/benchmarks.md) and
``bench/factor_solve.py``; the forward-LDU breakdown also from ``bench/forward_ldu.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from common import tanh_mlp  # noqa: E402
from forward_ldu import densify, forward_ldu_solve  # noqa: E402

import hessinv  # noqa: E402

torch.set_num_threads(1)
f64 = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def dense_hessian(P) -> torch.Tensor:
    """The Hessian of the loss in the flat parameters, one double-backward row at a time."""
    params = [p for p in P.model.parameters() if p.requires_grad]
    loss = P.loss_fn(P.model(P.inputs), P.targets)
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params, create_graph=True)])
    rows = [
        torch.cat([t.reshape(-1) for t in torch.autograd.grad(g[i], params, retain_graph=True)])
        for i in range(g.numel())
    ]
    return torch.stack(rows).detach()


def dense_gauss_newton(P) -> torch.Tensor:
    """``J^T Lambda J`` with the output Jacobian and the loss Hessian in the outputs (autograd)."""
    params = [p for p in P.model.parameters() if p.requires_grad]
    y = P.model(P.inputs)
    yf = y.reshape(-1)
    J = torch.stack(
        [
            torch.cat([t.reshape(-1) for t in torch.autograd.grad(yf[i], params, retain_graph=True)])
            for i in range(yf.numel())
        ]
    )
    y0 = y.detach().requires_grad_(True)
    gy = torch.autograd.grad(P.loss_fn(y0, P.targets), y0, create_graph=True)[0].reshape(-1)
    Lam = torch.stack(
        [torch.autograd.grad(gy[i], y0, retain_graph=True)[0].reshape(-1) for i in range(gy.numel())]
    )
    return (J.T @ Lam @ J).detach()


def gauss_newton_fact() -> None:
    worst = 0.0
    for L, w, B, loss in [(4, 4, 4, "ce"), (8, 6, 5, "ce"), (6, 5, 4, "mse"), (16, 4, 3, "mse")]:
        P = tanh_mlp(w, B, L, seed=L)
        if loss == "mse":
            P.loss_fn = nn.MSELoss()
            P.targets = torch.randn(B, P.C, dtype=f64, generator=torch.Generator().manual_seed(L))
        G = hessinv.gauss_newton(P.model, P.loss_fn, P.inputs, P.targets).to_dense()
        worst = max(worst, rel(G, dense_gauss_newton(P)))
    print(
        f"§1 Gauss-Newton: max |G_lifted - J^T Lambda J| / |G| = {worst:.1e} (4 chains, L=4..16, CE and MSE)"
    )


def forward_order_fact() -> None:
    for L in (16, 64):
        P = tanh_mlp(4, 4, L)
        H = hessinv.hessian(P.model, P.loss_fn, P.inputs, P.targets)
        Hd = dense_hessian(P)
        A = Hd + torch.eye(len(Hd), dtype=f64)
        ev = torch.linalg.eigvalsh(A)
        g = H.gradient
        ref = torch.linalg.solve(A, g)
        x = forward_ldu_solve(densify(H), g, 1.0, pivot=False)
        xp = forward_ldu_solve(densify(H), g, 1.0, pivot=True)
        xb = H.factor(1.0).solve(g)
        pd = "positive definite" if ev[0] > 0 else f"indefinite, {int((ev < 0).sum())} negative eigenvalues"
        cond = float(ev.abs().max() / ev.abs().min())
        print(
            f"§2 forward order (w=4, B=4, L={L}, eps=1, H + I {pd}, cond {cond:.2g}): "
            f"error {rel(x, ref):.1e} without pivoting across x, lambda, t, {rel(xp, ref):.1e} with; "
            f"backward sweep {rel(xb, ref):.1e}"
        )


def inertia_fact() -> None:
    cases = mismatches = 0
    for L, w, B in [(4, 4, 4), (8, 4, 3), (16, 3, 4), (6, 8, 2)]:
        P = tanh_mlp(w, B, L, seed=100 + L)
        H = hessinv.hessian(P.model, P.loss_fn, P.inputs, P.targets)
        ev = torch.linalg.eigvalsh(dense_hessian(P))
        for shift in (-0.5 * float(ev[0]), -float(ev[0]) + 1e-3, 0.1, 1.0, -0.9 * float(ev[-1])):
            tol = 1e-9 * float(ev.abs().max())
            want = (
                int((ev + shift < -tol).sum()),
                int(((ev + shift).abs() <= tol).sum()),
                int((ev + shift > tol).sum()),
            )
            got = tuple(H.factor(shift).inertia)
            cases += 1
            mismatches += got != want
    print(
        f"§2 inertia of H + eps I from the Qxx pivots vs eigvalsh: {cases - mismatches}/{cases} cases match"
    )


def lambda_min_fact() -> None:
    for L in (64, 256):
        P = tanh_mlp(4, 4, L, seed=7)
        H = hessinv.hessian(P.model, P.loss_fn, P.inputs, P.targets)
        calls = [0]

        def counted(shift: float = 0.0, test=H.is_positive_definite, calls=calls) -> bool:
            calls[0] += 1
            return test(shift)

        H.is_positive_definite = counted  # type: ignore[method-assign]
        lam = H.min_eigenvalue(tol=1e-10)
        line = (
            f"§2 lambda_min by min_eigenvalue (Lanczos, certified by positive definiteness tests; w=4, B=4, "
            f"L={L}, n={H.shape[0]}): {calls[0]} PD tests (sweeps)"
        )
        if L == 64:
            ref = float(torch.linalg.eigvalsh(dense_hessian(P))[0])
            line += f", |error| / |lambda_min| = {abs(lam - ref) / abs(ref):.1e} vs eigvalsh"
        print(line + " at tol 1e-10")


def indefinite_fact() -> None:
    P = tanh_mlp(4, 4, 8, seed=3)
    H = hessinv.hessian(P.model, P.loss_fn, P.inputs, P.targets)
    Hd = dense_hessian(P)
    ev = torch.linalg.eigvalsh(Hd)
    k = int((ev < 0).sum()) // 2  # an interior negative eigenvalue: H + eps I indefinite
    for gap in (1e-4, 1e-7):
        eps = -float(ev[k]) + gap * float(ev.abs().max())
        A = Hd + eps * torch.eye(len(Hd), dtype=f64)
        g = H.gradient
        ref = torch.linalg.solve(A, g)
        F = H.factor(eps)
        x0 = F.solve(g, refine=False)
        x, info = F.solve(g, return_info=True)
        ev_a = torch.linalg.eigvalsh(A).abs()
        cond = float(ev_a.max() / ev_a.min())
        print(
            f"§2 indefinite H + eps I (w=4, B=4, L=8, inertia {tuple(F.inertia)}, cond {cond:.1e}): "
            f"error unrefined {rel(x0, ref):.1e}, refined {rel(x, ref):.1e} ({info.refinement_steps} steps)"
        )


def float32_fact() -> None:
    P64 = tanh_mlp(8, 8, 16, seed=5)
    P32 = tanh_mlp(8, 8, 16, seed=5, dtype=torch.float32)
    H64 = hessinv.hessian(P64.model, P64.loss_fn, P64.inputs, P64.targets)
    H32 = hessinv.hessian(P32.model, P32.loss_fn, P32.inputs, P32.targets)
    ev = torch.linalg.eigvalsh(dense_hessian(P64))
    g = H64.gradient
    for eps in (1.0, -float(ev[0]) + 1e-3 * float(ev.abs().max())):
        ref = H64.factor(eps).solve(g)
        F = H32.factor(eps)
        x0 = F.solve(g.float(), refine=False).double()
        x, info = F.solve(g.float(), return_info=True)
        cond = float((ev[-1] + eps) / (ev[0] + eps))
        print(
            f"§2 float32 factorization (w=8, B=8, L=16, eps={eps:.3g}, cond {cond:.1e}, cond * 6e-8 = "
            f"{cond * 6e-8:.0e}): error {rel(x0, ref):.1e} unrefined, {rel(x.double(), ref):.1e} after "
            f"{info.refinement_steps} refinement steps with float64 residuals (float64 residual "
            f"{info.residual:.1e}; the solution is float32)"
        )


if __name__ == "__main__":
    gauss_newton_fact()
    forward_order_fact()
    inertia_fact()
    lambda_min_fact()
    indefinite_fact()
    float32_fact()
