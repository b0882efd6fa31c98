"""The eigenbasis refreshed between the curvature's refreshes (``basis_refresh``): the stored Gauss-Newton
root carried into the new basis is the same matrix in the parameters' coordinates, and the solve is
``(G + Q D Q^T)^{-1}`` with today's ``D`` -- checked against dense float64 linear algebra."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import hessinv.optim as ho

F64 = torch.float64


def _dense_parts(pc: ho.Preconditioner) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G, M)``: the stored curvature in the parameters' coordinates, and the matrix the solve inverts
    (the stored ``D`` between refreshes: the staleness test moves it only where it drifted)."""
    f, n = pc._factor, pc.chain.num_params
    Ub = f.columns(torch.arange(n))  # rows in the basis, every column (structured ones from their factors)
    Gb = Ub.T @ (f.S[:, None] * Ub)
    Q = torch.stack([pc.basis.unrotate(e) for e in torch.eye(n, dtype=F64)], 1)  # x_param = Q x_basis
    D = torch.where(f.live, f.D, pc.diagonal())  # (the factor's D; U's zero columns take today's)
    return Q @ Gb @ Q.T, Q @ (Gb + torch.diag(D)) @ Q.T


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), width=st.sampled_from([3, 6, 12]), depth=st.integers(1, 3))
def test_a_basis_refresh_carries_the_curvature_and_solves_with_todays_damping(seed, width, depth):
    # (the 12 x 12 hidden weights solved through their factors: _STRUCTURED_SOLVE lowered -- 48 x 48 ones,
    # above the default, made the dense reference n ~ 5000 and an example minutes of n^3 products)
    from unittest import mock

    import hessinv.lowrank

    with mock.patch.object(hessinv.lowrank, "_STRUCTURED_SOLVE", 100):
        _carries_the_curvature(seed, width, depth)


def _carries_the_curvature(seed: int, width: int, depth: int) -> None:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(4, width), nn.Tanh()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.Tanh()]
    net = nn.Sequential(*layers, nn.Linear(width, 3)).double()
    X, y = torch.randn(96, 4, dtype=F64), torch.randint(0, 3, (96,))
    pc = ho.Preconditioner(net, nn.CrossEntropyLoss(), refresh=6, basis_refresh=2, seed=seed, warmup=0)
    g = torch.Generator().manual_seed(seed)
    for t in range(1, 6):
        before = _dense_parts(pc)[0] if pc._factor is not None else None
        refreshes = pc.state["refreshes"]
        idx = torch.randint(0, 96, (32,), generator=g)
        net.zero_grad()
        nn.CrossEntropyLoss()(net(X[idx]), y[idx]).backward()
        grad = torch.cat([p.grad.reshape(-1) for p in net.parameters()]).clone()
        pc.precondition_(X[idx], y[idx])
        G, M = _dense_parts(pc)
        if t in (3, 5):  # (calls 3 and 5: the basis alone, the curvature kept, today's D)
            assert pc.state["refreshes"] == refreshes
            assert torch.equal(pc._factor.D, pc.diagonal())
            assert torch.allclose(G, before, rtol=1e-10, atol=1e-12 * float(before.abs().max()))
        out = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
        ref = torch.linalg.solve(M, grad)
        assert torch.allclose(out, ref, rtol=1e-8, atol=1e-10 * float(ref.abs().max()))
    assert pc.state["basis_refreshes"] == 2


def test_basis_refresh_none_refreshes_the_basis_with_the_curvature_only():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    X, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    opt = ho.Newton(net, nn.CrossEntropyLoss(), basis_refresh=None, seed=0)
    for i in range(12):
        opt.step(X[i % 2 * 32 : i % 2 * 32 + 32], y[i % 2 * 32 : i % 2 * 32 + 32])
    assert "basis_refreshes" not in opt.preconditioner.state
    with pytest.raises(Exception, match="basis_refresh"):
        ho.Newton(net, nn.CrossEntropyLoss(), basis_refresh=0)


def test_a_basis_refresh_leaves_wide_weights_to_the_curvature_refresh():
    """Only the weights whose rotated sides are all at most BASIS_REFRESH_MAX_SIDE wide are refreshed between
    the curvature's refreshes (the wider ones' orthogonal iteration and K's rebuild show in the step)."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 80), nn.Tanh(), nn.Linear(80, 3)).double()
    X, y = torch.randn(96, 4, dtype=F64), torch.randint(0, 3, (96,))
    pc = ho.Preconditioner(net, nn.CrossEntropyLoss(), refresh=6, basis_refresh=2, seed=0, warmup=0)
    g = torch.Generator().manual_seed(0)
    for t in range(1, 4):
        if t == 3:
            before = _dense_parts(pc)[0]
            Q = [q.clone() for q in pc.basis.QL + pc.basis.QR]
        idx = torch.randint(0, 96, (32,), generator=g)
        net.zero_grad()
        nn.CrossEntropyLoss()(net(X[idx]), y[idx]).backward()
        grad = torch.cat([p.grad.reshape(-1) for p in net.parameters()]).clone()
        pc.precondition_(X[idx], y[idx])
    assert pc.state["basis_refreshes"] == 1 and pc.state["refreshes"] == 1
    moved = [not torch.equal(a, b) for a, b in zip(Q, pc.basis.QL + pc.basis.QR, strict=True)]
    assert moved == [True, False, False, True, False, False]  # (the 8 x 4 weight's Q_L, Q_R only)
    G, M = _dense_parts(pc)
    assert torch.allclose(G, before, rtol=1e-10, atol=1e-12 * float(before.abs().max()))
    out = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    ref = torch.linalg.solve(M, grad)
    assert torch.allclose(out, ref, rtol=1e-8, atol=1e-10 * float(ref.abs().max()))


def test_a_checkpoint_from_before_basis_refresh_resumes_as_it_ran():
    """A state dict saved before the setting existed has no ``basis_refresh``: it loads as None, the
    basis refreshed with the curvature only, as the run that saved it did."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    X, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    opt = ho.Newton(net, nn.CrossEntropyLoss(), seed=0, basis_refresh=2)
    opt.step(X[:32], y[:32])
    sd = opt.state_dict()
    del sd["newton"]["preconditioner"]["settings"]["basis_refresh"]
    new = ho.Newton(net, nn.CrossEntropyLoss(), seed=0, basis_refresh=2)
    new.load_state_dict(sd)
    assert new.preconditioner.basis_refresh is None and opt.preconditioner.basis_refresh == 2


@pytest.mark.parametrize(
    "width, thresholds",
    [(8, {"_STRUCTURED_GROUP": 4 * 64}), (12, {"_STRUCTURED_SOLVE": 100, "_STRUCTURED_GROUP": 10**9})],
)
def test_a_basis_refresh_of_a_net_with_dead_units_keeps_zero_columns_apart(width, thresholds):
    """Dead ReLU units leave zero columns in ``U``; after a basis refresh (whose weights solved through
    their factors have no columns written) the factor's ``live`` columns are the nonzero ones of ``U`` as
    every column formed would hold them -- the weights' from their factors, the others carried over --
    and the solve is the dense ``(G + D')^{-1}`` with ``D'`` the factor's ``D`` there, today's elsewhere.
    ``width, thresholds``: weights grouped by shape (``_STRUCTURED_GROUP`` lowered) or solved through one
    by one (``_STRUCTURED_SOLVE`` lowered to the 12 x 12 weights: 48 x 48 ones, above the default, made
    the dense reference n = 9795 -- minutes of n^3 products on one core)."""
    from unittest import mock

    import hessinv.lowrank

    torch.manual_seed(1)
    layers: list[nn.Module] = [nn.Linear(4, width), nn.ReLU()]
    for _ in range(4):
        layers += [nn.Linear(width, width), nn.ReLU()]
    net = nn.Sequential(*layers, nn.Linear(width, 3)).double()
    with torch.no_grad():
        net[2].bias[: width // 2] = -50.0  # half the second layer's units dead on every input
    X, y = torch.randn(64, 4, dtype=F64), torch.randint(0, 3, (64,))
    patch = mock.patch.multiple(hessinv.lowrank, **thresholds)
    with patch:
        pc = ho.Preconditioner(net, nn.CrossEntropyLoss(), refresh=6, basis_refresh=2, seed=0, warmup=0)
        g = torch.Generator().manual_seed(0)
        for _ in range(3):
            idx = torch.randint(0, 64, (32,), generator=g)
            net.zero_grad()
            nn.CrossEntropyLoss()(net(X[idx]), y[idx]).backward()
            grad = torch.cat([p.grad.reshape(-1) for p in net.parameters()]).clone()
            pc.precondition_(X[idx], y[idx])
            f, n = pc._factor, pc.chain.num_params
            assert len(f._solve_factors) >= 4  # (the hidden weights solved through their structure)
            full = f.columns(torch.arange(n))
            nonzero = full.ne(0).any(0)
            assert not bool(nonzero.all())
            assert torch.equal(f.live, nonzero)
            live = nonzero.nonzero().flatten()
            assert torch.equal(f._rest, live[~_in_weights(f, live)])
            _, M = _dense_parts(pc)
            out = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
            # (a backward-stable solve's residual: the dead units' tiny damping makes M ill-conditioned)
            assert float((M @ out - grad).norm() / grad.norm()) <= 1e-12
    assert pc.state["basis_refreshes"] == 1  # (call 3)


def _in_weights(f, idx: torch.Tensor) -> torch.Tensor:
    """Which of the column indices ``idx`` lie in a weight the factor ``f`` solves through its factors."""
    inside = torch.zeros_like(idx, dtype=torch.bool)
    for off, d, m, *_ in f._solve_factors:
        inside |= (idx >= off) & (idx < off + d * m)
    return inside
