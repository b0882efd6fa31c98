"""The factorization's route (:meth:`CurvatureOperator._swept`): the flop model's choice of the dense route is
checked against the dense route's products timed, where the sweep is priced above
``DENSE_ROUTE_TIMED_MIN_SECONDS`` -- the model prices a convolution's product 5-30x under its time (a 3-stage
Conv1d chain on 8 examples took 2.6 s by the dense route, 0.5 s by the sweep). The timing is replaced here
by a stand-in: what is tested is the rule, not the machine."""

from __future__ import annotations

import pytest
import torch
from reference import autograd_gradient_hessian
from torch import nn

import hessinv
import hessinv.curvature as hc


def _conv_hessian(batch: int) -> hessinv.Hessian:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(1, 8, 5, padding=2), nn.Tanh(), nn.Conv1d(8, 8, 5, padding=2), nn.Tanh(), nn.Flatten(),
        nn.Linear(8 * 40, 10),
    ).double()  # fmt: skip
    X = torch.randn(batch, 1, 40, dtype=torch.float64)
    y = torch.randint(0, 10, (batch,))
    return hessinv.hessian(model, nn.CrossEntropyLoss(), X, y)


@pytest.mark.parametrize("seconds, dense", [(1e3, False), (1e-3, True)])
def test_the_dense_route_is_left_for_the_sweep_where_its_products_are_dear(monkeypatch, seconds, dense):
    H = _conv_hessian(8)
    chain, dense_flops = hc._block_costs(H.blocks)
    assert hc._dense_route(chain, dense_flops, H.shape[0])  # (the flop model alone: the dense route)
    assert (
        hc._block_costs(H.blocks, pivots=True)[0] / hc._flop_rate(H.device) > hc.DENSE_ROUTE_TIMED_MIN_SECONDS
    )
    monkeypatch.setattr(type(H), "_dense_columns_seconds", lambda self: seconds)
    assert H._dense_cheaper() is dense
    assert (H._swept() is H) is not dense


def test_a_small_problem_keeps_the_flop_models_route_whatever_the_timing(monkeypatch):
    """Below the floor the timing is not consulted: a loaded machine does not move a small problem's route."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = torch.randn(400, 3, dtype=torch.float64), torch.randint(0, 2, (400,))
    H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    chain, dense_flops = hc._block_costs(H.blocks)
    assert hc._dense_route(chain, dense_flops, H.shape[0])

    def never(self):
        raise AssertionError("timed below the floor")

    monkeypatch.setattr(type(H), "_dense_columns_seconds", never)
    assert H._dense_cheaper()


def test_both_routes_give_the_same_factorization_of_the_conv_chain(monkeypatch):
    """Whichever route the timing picks, the answers are the same to rounding (checked against autograd)."""
    H = _conv_hessian(8)
    model, X, y = H.model, H.inputs, H.targets
    g, A = autograd_gradient_hessian(model, nn.CrossEntropyLoss(), X, y)
    A = A + 0.1 * torch.eye(A.shape[0], dtype=torch.float64)
    ref = torch.linalg.solve(A, g)
    for seconds in (1e3, 1e-3):
        monkeypatch.setattr(type(H), "_dense_columns_seconds", lambda self, s=seconds: s)
        Hs = hessinv.hessian(model, nn.CrossEntropyLoss(), X, y)
        F = Hs.factor(0.1)
        assert torch.allclose(F.solve(g), ref, rtol=1e-9, atol=1e-12 * float(ref.abs().max()))
        assert F.logdet() == pytest.approx(float(torch.linalg.slogdet(A)[1]), rel=1e-10)


def test_a_sweep_that_does_not_fit_takes_the_dense_route_even_where_it_is_timed_dearer(monkeypatch):
    """The timing vetoes the flop model's dense pick, not the memory rule: where the sweep's blocks do not
    fit, the dense route answers (a veto made factor() raise TooLargeError there; a review)."""
    H = _conv_hessian(8)
    monkeypatch.setattr(type(H), "_dense_columns_seconds", lambda self: 1e3)
    assert not H._dense_cheaper()

    def no_room(*args, **kwargs):
        raise hessinv.TooLargeError("the sweep's blocks do not fit (a stand-in)")

    monkeypatch.setattr(hc, "check_memory", no_room)
    assert H._dense_cheaper()


def test_eigenpairs_prices_a_certificate_by_the_dense_routes_timed_products(monkeypatch):
    """Where the sweep does not fit, the count's factorization forms ``H`` by ``n`` products: the default
    ``certify=None`` counts only where those, timed, are within ``CERTIFY_MAX_FLOPS`` at the flop rate (a
    ResNet with BatchNorm on 64 16x16 images, n = 1926: 28 ms a product column, 80 s for the 5 largest
    eigenpairs against 0.7 s for ARPACK on the products; a probe). Products only then, uncertified."""
    H = _conv_hessian(8)

    def no_room(*args, **kwargs):
        raise hessinv.TooLargeError("the sweep's blocks do not fit (a stand-in)")

    monkeypatch.setattr(hc, "check_memory", no_room)
    ref = torch.linalg.eigvalsh(H.to_dense())  # (before the stand-ins below)
    budget = hc.CERTIFY_MAX_FLOPS / hc._flop_rate(H.device)
    for seconds, affordable in ((2 * budget, False), (1e-3 * budget, True)):
        Hs = hessinv.hessian(H.model, nn.CrossEntropyLoss(), H.inputs, H.targets)
        monkeypatch.setattr(type(Hs), "_dense_columns_seconds", lambda self, s=seconds: s)
        assert Hs._dense_cheaper()
        assert Hs._certificate_affordable() is affordable
    monkeypatch.setattr(type(H), "_dense_columns_seconds", lambda self: 2 * budget)

    def never(self):
        raise AssertionError("formed the dense matrix for an unaffordable certificate")

    monkeypatch.setattr(type(H), "to_dense", never)
    e = H.eigenpairs(3, "largest")
    assert (e.certified, e.factorizations) == (False, 0)
    assert torch.allclose(e.values, ref[-3:], rtol=0, atol=1e-8 * float(ref.abs().max()))


def test_a_gauss_newton_certificate_is_priced_by_its_counts_route_not_woodburys(monkeypatch):
    """A count is at a shift, no damping: never the Woodbury form, whose price a factorization of ``G + eps
    I`` may take. The certificate priced by it counted where the dense route it runs cost more than
    ``CERTIFY_MAX_FLOPS`` (a review: n ~ 9.4k-12.3k, r ~ 2.4k-4.7k at the defaults; scaled down here)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 30), nn.Tanh(), nn.Linear(30, 30), nn.Tanh(), nn.Linear(30, 3)).double()
    X, y = torch.randn(400, 8, dtype=torch.float64), torch.randint(0, 3, (400,))
    monkeypatch.setattr(hc.GaussNewton, "EIG_ROOT_MAX_FLOPS", 0.0)  # (no spectrum from the root)
    G = hessinv.gauss_newton(net, nn.CrossEntropyLoss(), X, y)
    assert G._dense_cheaper()
    dense = G._dense_route_seconds() * hc._flop_rate(G.device)
    assert G._factor_flops() < dense / 2  # (the Woodbury form is the cheaper factorization)
    monkeypatch.setattr(hc, "CERTIFY_MAX_FLOPS", (G._factor_flops() + dense) / 2)
    assert not G._certificate_affordable()
    monkeypatch.setattr(hc, "CERTIFY_MAX_FLOPS", 2 * dense)
    assert G._certificate_affordable()
