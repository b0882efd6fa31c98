"""Spectrum edges a mutation probe of spectrum.py found unpinned (2026-12-07): each test fails on the named
mutant of the code. References: plain-autograd float64 Hessians, numpy's histogram."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import autograd_gradient_hessian
from torch import nn

import hessinv
from hessinv import spectrum
from hessinv.errors import InvalidArgumentError

DT = torch.float64


def _negative_definite_hessian():
    """H = -2 kron(X^T X, I) (a bias-free Linear under a negated squared error): every eigenvalue < 0."""
    torch.manual_seed(0)
    net = nn.Linear(3, 2, bias=False).double()
    X = torch.randn(6, 3, dtype=DT)
    y = torch.zeros(6, 2, dtype=DT)

    def loss(out, t):
        return -((out - t) ** 2).sum()

    _, H_ref = autograd_gradient_hessian(net, loss, X, y)
    return hessinv.hessian(net, loss, X, y), torch.linalg.eigvalsh(H_ref)


def test_spectral_range_of_a_negative_definite_hessian_ends_at_zero():
    """S05 (``if at0 == n: hi = 0.0`` skipped): every eigenvalue negative -> hi = 0, not ||H||."""
    H, lam = _negative_definite_hessian()
    assert float(lam[-1]) < 0
    lo, hi = spectrum.spectral_range(H)
    assert hi == 0.0 and lo <= float(lam[0])
    h = spectrum.spectral_histogram(H, bins=4)
    assert h.edges[-1] == 0.0 and (h.below, h.above) == (0, 0) and int(h.counts.sum()) == 6


def _small_hessian():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = torch.randn(6, 3, dtype=DT), torch.randint(0, 2, (6,))
    return hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)


@pytest.mark.parametrize("bins", [0, np.int64(0), -1])
def test_histogram_of_zero_bins_is_refused(bins):
    """S06 (``1 <= count`` -> ``0 <= count``): bins=0 gave an empty histogram silently."""
    with pytest.raises(InvalidArgumentError, match="bins must be in"):
        spectrum.spectral_histogram(_small_hessian(), bins=bins)


@pytest.mark.parametrize("edges", [[0.5], np.array([0.5]), torch.tensor([0.5], dtype=DT)])
def test_histogram_of_a_single_edge_is_refused(edges):
    """S09 (``len(edges) < 2`` -> ``< 1``): one edge is no bin; it gave an empty histogram silently."""
    with pytest.raises(InvalidArgumentError, match="at least two"):
        spectrum.spectral_histogram(_small_hessian(), bins=edges)


def test_histogram_edge_at_zero_stays_where_the_edge_below_is_within_two_tol():
    """S12 (``if i == 0 or edges[i - 1] < -2 * tol`` -> ``if True``): an edge at 0 whose lower neighbour
    is within 2 tol of it is counted at 0, not at -tol -- else an eigenvalue in [edges[i-1], 0) drops
    into the bin above (and the counts at -tol < edges[i-1] go non-monotone)."""
    c = torch.tensor([1.0, -0.5 * float(torch.finfo(DT).eps) ** 0.5], dtype=DT)  # H = diag(c)
    net = nn.Linear(1, 2, bias=False).double()
    X, y = torch.ones(1, 1, dtype=DT), torch.zeros(1, 2, dtype=DT)

    def loss(out, t):
        return 0.5 * (c * out**2).sum()

    _, H_ref = autograd_gradient_hessian(net, loss, X, y)
    assert torch.equal(torch.linalg.eigvalsh(H_ref), c.sort().values)
    H = hessinv.hessian(net, loss, X, y)
    tol = H.zero_tolerance()
    assert -0.9 * tol < float(c[1]) < 0
    edges = [-0.9 * tol, 0.0, 2.0]
    h = spectrum.spectral_histogram(H, bins=edges)
    want = np.histogram(c.numpy(), bins=edges)[0]
    assert h.counts.tolist() == want.tolist() == [1, 1] and (h.below, h.above) == (0, 0)
