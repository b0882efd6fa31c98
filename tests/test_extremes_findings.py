"""A probe of numerically extreme inputs (fifty-third session): a float64 shift that is an eigenvalue to
working precision on a chain whose pivot blocks stay singular around it was counted at the resolution
sqrt(u) ||H|| (90% of the spectrum as zero); it is counted on the dense eigenvalues at n u ||H|| now."""

from __future__ import annotations

import warnings

import pytest
import torch
from reference import autograd_gradient_hessian
from torch import nn

import hessinv


def test_deep_chain_factor_inertia_not_lumped_at_resolution():
    """100-stage width-4 tanh chain (n = 2006, under DENSE_RECOUNT_N = 2048), H + 1e-12 I: the nearest
    eigenvalue is 1.75e-13 away (cond ~6e12, F.solve reaches residual 1e-16), and a dense Bunch-Kaufman
    LDL^T (scipy.linalg.ldl) counts (131, 0, 1875), as eigvalsh does. ``F.inertia`` came back (95, 1814, 97)
    -- 90% of the spectrum counted as zero, no warning (only inertia_certified=False) -- and
    ``H.inertia(1e-12, tol=0)`` warns "H + shift I is singular to working precision" and counts at
    sqrt(u)||H|| = 1.5e-8 instead of n u ||H|| (4.5e-13) further out as its docstring says."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    layers = []
    for i in range(100):
        layers += [nn.Linear(3 if i == 0 else 4, 4), nn.Tanh()]
    layers.append(nn.Linear(4, 2))
    m = nn.Sequential(*layers).double()
    torch.randn(8, 5, generator=gen, dtype=torch.float64)  # (the probe's generator state)
    torch.randint(0, 3, (8,), generator=gen)
    X = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (4,), generator=gen)
    _, Hd = autograd_gradient_hessian(m, nn.CrossEntropyLoss(), X, y)
    ev = torch.linalg.eigvalsh(Hd) + 1e-12
    n, u = ev.numel(), torch.finfo(torch.float64).eps
    near = int((ev.abs() < 2 * n * u * float(ev.abs().max())).sum())  # within 2 n u ||H||: may count as zero
    H = hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        F = H.factor(1e-12)
        neg, zero, pos = F.inertia
    assert zero <= near + 2, (tuple(F.inertia), near)
    assert abs(neg - int((ev < 0).sum())) <= near + 2


def test_newton_float32_large_outputs_does_not_crash():
    """A float32 net with outputs ~1e9 (MSE loss ~1e17): ``Newton``'s automatic mode switches to the
    trust region on the repeated batch and its second step raises SingularError "the trust region's
    damping reached 9.22e+14, the largest torch.float32 takes ... H is beyond the dtype's range" -- a
    mode the user did not choose, and no fix named; auto hands back to preconditioning now, with a warning."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(8, 5, generator=gen)
    torch.randint(0, 3, (8,), generator=gen)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    with torch.no_grad():
        m[2].weight.mul_(1e9)
    y = torch.randn(8, 3, generator=gen)
    opt = hessinv.optim.Newton(m, nn.MSELoss())
    with pytest.warns(UserWarning, match="beyond the dtype's range.*goes on preconditioning"):
        losses = [float(opt.step(X, y)) for _ in range(5)]
    assert opt.mode == "precondition"
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert losses[-1] <= losses[0]
