"""Operators, factorizations and what holds them, pickled (``torch.save``/``torch.load``, ``pickle``,
``copy.deepcopy``) after use: the same numbers as before, against plain-autograd float64 references. A
probe's findings (2026-12-07): an operator whose stage keeps autograd's graph (a LayerNorm or convolution
stage's lazy products) lost it in the round trip and answered 23-60% off with no error (deepcopy raised
torch's raw RuntimeError); a float32 factorization did not pickle after its first solve."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from reference import autograd_gauss_newton, autograd_hessian_vector_product
from torch import nn

import hessinv
from hessinv.laplace import Laplace


def _saved(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


ROUND_TRIPS = {
    "torch.save": _saved,
    "pickle": lambda o: pickle.loads(pickle.dumps(o)),
    "deepcopy": copy.deepcopy,
}

MODELS = {
    "layernorm": lambda: (
        nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)),
        torch.randn(10, 5, dtype=torch.float64),
    ),
    "conv1d": lambda: (
        nn.Sequential(nn.Conv1d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)),
        torch.randn(10, 1, 8, dtype=torch.float64),
    ),
    "conv2d, lazy products": lambda: (
        nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 32 * 32, 3)),
        torch.randn(4, 1, 32, 32, dtype=torch.float64),
    ),
}


@pytest.mark.parametrize("trip", list(ROUND_TRIPS))
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("kind", ["gauss_newton", "hessian"])
def test_an_operator_answers_the_same_after_a_round_trip(trip, model, kind):
    torch.manual_seed(0)
    m, X = MODELS[model]()
    m = m.double()
    y = torch.randint(0, 3, (X.shape[0],))
    loss = nn.CrossEntropyLoss()
    op = getattr(hessinv, kind)(m, loss, X, y)
    v = torch.randn(op.shape[0], dtype=torch.float64)
    before = op @ v
    loaded = ROUND_TRIPS[trip](op)
    if kind == "gauss_newton":
        ref = autograd_gauss_newton(m, loss, X, y) @ v
    else:  # (H v, not the dense Hessian: of the 12k-parameter CNN it took 13 s)
        ref = autograd_hessian_vector_product(m, loss, X, y, v)
    assert float((loaded @ v - ref).norm() / ref.norm()) <= 1e-12
    assert float((before - ref).norm() / ref.norm()) <= 1e-12
    if model != "conv2d, lazy products":  # (n = 12.3k there: the products suffice)
        assert torch.allclose(loaded.to_dense() @ v, ref, rtol=1e-10, atol=1e-14)


def test_a_float32_factorization_pickles_after_a_solve():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    X, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    H = hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    F = H.factor(damping=0.1)
    x, info = F.solve(H.gradient, return_info=True)
    returned = info.returned_residual
    for trip in ROUND_TRIPS.values():
        F2 = trip(F)
        assert F2.last_info.returned_residual == returned
        assert torch.equal(F2.solve(H.gradient), F.solve(H.gradient))


def test_a_used_float32_laplace_posterior_saves_and_loads():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    X, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
    la = Laplace(m, "classification", prior_precision=1.0).fit(X, y)
    probs = la(X[:5])
    lml = float(la.log_marginal_likelihood())
    la2 = _saved(la)
    assert torch.equal(la2(X[:5]), probs)
    assert float(la2.log_marginal_likelihood()) == lml
