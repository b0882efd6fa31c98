"""Arguments of unusual kinds, from a probe of odd inputs (2026-12-07): a damping that requires grad (its
graph was dropped without a word), Newton's damping as a numpy or 0-d tensor number (refused, where every
other number argument takes them), influence vectors of another dtype (cast silently), a numpy damping
vector (named for the wrong reason)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import hessinv
import hessinv.optim as ho
from hessinv.influence import InfluenceFunction

F64 = torch.float64


def _problem():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = torch.randn(6, 3, dtype=F64), torch.randint(0, 2, (6,))
    return m, X, y


def test_a_damping_that_requires_grad_is_refused_not_detached():
    m, X, y = _problem()
    H = hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    G = hessinv.gauss_newton(m, nn.CrossEntropyLoss(), X, y)
    eps = torch.tensor(0.05, dtype=F64, requires_grad=True)
    with pytest.raises(hessinv.InvalidArgumentError, match=r"damping requires grad.*detach\(\)"):
        H.factor(eps)
    with pytest.raises(hessinv.InvalidArgumentError, match="damping requires grad"):
        H.solve(H.gradient, damping=eps)
    D = torch.full((H.shape[0],), 0.05, dtype=F64, requires_grad=True)
    with pytest.raises(hessinv.InvalidArgumentError, match="requires grad"):
        G.factor(D)
    # detached, or where no graph is being recorded, the same numbers are taken
    want = torch.linalg.solve(H.to_dense() + 0.05 * torch.eye(H.shape[0], dtype=F64), H.gradient)
    torch.testing.assert_close(H.solve(H.gradient, damping=eps.detach()), want)
    with torch.no_grad():
        torch.testing.assert_close(H.factor(eps).solve(H.gradient), want)
        G.factor(D)


@pytest.mark.parametrize("damping", [np.float32(1e-3), np.int64(1), torch.tensor(1e-3)])
def test_newton_takes_a_fixed_damping_of_any_number_kind(damping):
    m, X, y = _problem()
    twin = _problem()[0]
    opt = ho.Newton(m, nn.CrossEntropyLoss(), damping=damping, mode="trust-region")
    ref = ho.Newton(twin, nn.CrossEntropyLoss(), damping=float(damping), mode="trust-region")
    opt.step(X, y)
    ref.step(X, y)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), twin.parameters(), strict=True))
    with pytest.raises(hessinv.InvalidArgumentError, match=">= 0"):
        ho.Newton(m, nn.CrossEntropyLoss(), damping=np.float32(-1.0))


def test_influence_vectors_of_another_dtype_are_named_not_cast():
    m, X, y = _problem()
    inf = InfluenceFunction(m, nn.CrossEntropyLoss(), "ggn", 0.1).fit(X, y)
    n = sum(p.numel() for p in m.parameters())
    for v in (torch.ones(n, dtype=torch.float32), torch.ones(2, n, dtype=torch.int64), torch.ones(n).bool()):
        with pytest.raises(hessinv.DtypeMismatchError, match="vectors are"):
            inf.inverse_hvp(v)
    assert inf.inverse_hvp(torch.ones(n, dtype=F64)).dtype == F64


def test_a_numpy_damping_vector_is_told_to_become_a_tensor():
    m, X, y = _problem()
    G = hessinv.gauss_newton(m, nn.CrossEntropyLoss(), X, y)
    with pytest.raises(hessinv.InvalidArgumentError, match=r"torch\.as_tensor\(damping\)"):
        G.factor(np.full(G.shape[0], 0.1))


def test_mixed_precision_takes_a_damping_beyond_float32_in_float64():
    """A float64 model's ``factor(eps, precision="mixed")`` with ``eps`` beyond float32's range (a loss in
    raw units: ||H|| 1.7e18): refused with "use a float64 model" -- it was one; now float64 throughout, as
    where the float32 pivots cannot precondition (a probe)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = torch.randn(8, 3, dtype=F64), 1e17 * torch.randn(8, 2, dtype=F64)
    H = hessinv.hessian(model, nn.MSELoss(reduction="sum"), X, y)
    eps = 1e-2 * float(torch.linalg.matrix_norm(H.to_dense(), 2))
    assert eps > 1e16
    want = torch.linalg.solve(H.to_dense() + eps * torch.eye(H.shape[0], dtype=F64), H.gradient)
    x = H.factor(eps, precision="mixed").solve(H.gradient)
    assert float((x - want).norm() / want.norm()) <= 1e-10
    model32 = model.float()
    H32 = hessinv.hessian(model32, nn.MSELoss(reduction="sum"), X.float(), torch.randn(8, 2))
    with pytest.raises(hessinv.InvalidArgumentError, match="float64 model"):
        H32.factor(1e16, precision="mixed")


def test_settings_that_require_grad_are_stored_as_numbers():
    """A value tuned by autograd stored as a setting (laplace-torch's loop: ``la.prior_precision =
    log_prior.exp()``, ``InfluenceFunction(damping=t)``, ``Newton(damping=t)``): its value, where the
    refusal for a dropped derivative (meant for solves) named a derivative a setting never has (a review)."""
    from hessinv.laplace import Laplace

    m, X, y = _problem()
    la = Laplace(m, "classification").fit(X, y)
    t = torch.tensor(1.5, dtype=F64, requires_grad=True)
    la.prior_precision = t * 1.0
    assert la.prior_precision == 1.5
    la.prior_mean = t * 0.0
    assert InfluenceFunction(m, nn.CrossEntropyLoss(), "ggn", t * 1.0).damping == 1.5
    ho.Newton(m, nn.CrossEntropyLoss(), damping=t * 1.0)
    with pytest.raises(hessinv.InvalidArgumentError, match="one number"):
        ho.Newton(m, nn.CrossEntropyLoss(), damping=torch.ones(3))
    with pytest.raises(hessinv.InvalidArgumentError, match="one number"):
        ho.Newton(m, nn.CrossEntropyLoss(), damping=np.ones(2))
