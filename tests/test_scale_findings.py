"""A probe of models larger than the benchmarks (0.3-2M parameters) found raw allocator errors where a named
error or an answer was due: Laplace's predictive solved every test point's right-hand sides at once (~10 GB
for 16 points on a 670k-parameter MLP), a Woodbury factorization formed float64 copies of ``U`` and of ``U
D^-1`` for its Gram matrix (2.4 GB each on a 1.9M-parameter MLP). These are now solved / summed in blocks,
and an allocation that still fails in a public call is a :class:`TooLargeError` naming it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hessinv
from hessinv import lowrank
from hessinv.errors import HessinvError, TooLargeError
from hessinv.laplace import Laplace

RAW = (
    "[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory: you tried to allocate "
    "2621440000 bytes."
)


def _mlp(seed: int = 0, out: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(4, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, out)
    ).double()


def test_an_allocation_failure_in_a_public_call_is_a_named_too_large_error(monkeypatch):
    model = _mlp()
    X, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    G = hessinv.gauss_newton(model, nn.CrossEntropyLoss(), X, y)
    D = torch.full((G.shape[0],), 0.1, dtype=torch.float64)

    def fail(self):
        raise RuntimeError(RAW)

    monkeypatch.setattr(lowrank.WoodburyFactor, "_gram", fail)
    with pytest.raises(TooLargeError, match="out of memory.*can't allocate memory") as info:
        G.factor(damping=D)
    assert isinstance(info.value, HessinvError) and isinstance(info.value.__cause__, RuntimeError)

    def other(self):  # another RuntimeError passes as it is
        raise RuntimeError("something else")

    monkeypatch.setattr(lowrank.WoodburyFactor, "_gram", other)
    with pytest.raises(RuntimeError, match="something else") as info:
        G.factor(damping=D)
    assert not isinstance(info.value, HessinvError)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_woodbury_gram_summed_in_blocks_keeps_no_float64_copy_of_u(monkeypatch, dtype):
    """``K = diag(S) + U D^-1 U^T`` over blocks of columns: the Gram matrix of one product to rounding, no
    float64 ``U`` (nor ``U D^-1``) kept, and the solves exact against a dense float64 reference."""
    g = torch.Generator().manual_seed(0)
    r, n = 7, 300
    U = torch.randn(r, n, generator=g, dtype=torch.float64).to(dtype)
    S = torch.ones(r, dtype=dtype)
    D = (0.5 + torch.rand(n, generator=g, dtype=torch.float64)).to(dtype)
    whole = lowrank.WoodburyFactor(U, S, D)
    monkeypatch.setattr(lowrank, "_GRAM_BLOCK_ENTRIES", 5 * r)  # 5 columns a block: 60 blocks
    blocked = lowrank.WoodburyFactor(U, S, D)
    assert blocked._U64 is None  # (no float64 copy of U held for the Gram matrix)
    U64, D64 = U.double(), D.double()
    K = torch.diag(S.double()) + (U64 * (1.0 / D).double()) @ U64.T  # (D^-1 as the factor holds it)
    for other in (K, whole._gram()):  # (the same sums in another order: rounding apart)
        assert float((blocked._gram() - other).norm() / other.norm()) < 1e-14
    b = torch.randn(n, generator=g, dtype=torch.float64)
    x = blocked.solve(b.to(dtype)).double()
    ref = torch.linalg.solve(torch.diag(D64) + U64.T @ U64, b)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert float((x - ref).norm() / ref.norm()) < tol


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_the_laplace_predictive_solved_a_test_point_at_a_time_is_the_same(monkeypatch, likelihood):
    """The predictive's variance in blocks of test points (one point a solve here): the one solve's."""
    model = _mlp(out=3)
    X = torch.randn(24, 4, dtype=torch.float64)
    y = (
        torch.randint(0, 3, (24,))
        if likelihood == "classification"
        else torch.randn(24, 3, dtype=torch.float64)
    )
    la = Laplace(model, likelihood, prior_precision=0.5).fit(X, y)
    Xq = torch.randn(9, 4, dtype=torch.float64)
    at_once = la(Xq)
    monkeypatch.setattr("hessinv.laplace.PREDICTIVE_SOLVE_ENTRIES", 1)
    monkeypatch.setattr("hessinv.laplace.PREDICTIVE_JACOBIAN_ENTRIES", 1)
    one_by_one = la(Xq)
    for a, b in zip(
        at_once if isinstance(at_once, tuple) else (at_once,),
        one_by_one if isinstance(one_by_one, tuple) else (one_by_one,),
        strict=True,
    ):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-15)
    J = torch.randn(5, 3, la.n_params, dtype=torch.float64)  # functional_variance itself, in blocks too
    monkeypatch.setattr("hessinv.laplace.PREDICTIVE_SOLVE_ENTRIES", 2**24)
    whole = la.functional_variance(J)
    monkeypatch.setattr("hessinv.laplace.PREDICTIVE_SOLVE_ENTRIES", 2 * 3 * la.n_params)
    assert torch.allclose(la.functional_variance(J), whole, rtol=1e-12, atol=1e-15)


class _Branch(nn.Module):
    """A Python ``if`` on a tensor's value: vmap cannot run it (the Jacobians one example at a time)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.sum() > -1e9):
            return torch.tanh(x)
        return x


def test_the_predictive_gradient_in_x_through_the_one_at_a_time_jacobians():
    """Where vmap cannot run the model its Jacobians came back detached: the variance had no graph while
    the mean had one, and the gradient of mu + 2 var in X silently left the variance out (0.96 off)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), _Branch(), nn.Linear(8, 1), nn.Flatten(0)).double()
    X, Y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    la = Laplace(net, "regression", prior_precision=1.0).fit(X, Y)

    def f(z: torch.Tensor) -> torch.Tensor:
        mu, var = la(z)
        return (mu + 2 * var).sum()

    x = torch.randn(3, 3, dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(xr), xr)
    fd = torch.zeros(x.numel(), dtype=torch.float64)
    for i in range(x.numel()):
        e = torch.zeros(x.numel(), dtype=torch.float64)
        e[i] = 1e-6
        with torch.no_grad():
            fd[i] = (f(x + e.view_as(x)) - f(x - e.view_as(x))) / 2e-6
    assert torch.allclose(g.reshape(-1), fd, rtol=1e-6, atol=1e-9)


def test_the_diagonals_memory_refusal_names_its_own_sweep(monkeypatch):
    """The diagonal's sweep eliminates nothing: its TooLargeError says so, and names the Gauss-Newton
    diagonal read off the root (a transformer's Hessian diagonal was refused as "the Riccati sweep would
    need 41 GiB" while G.diagonal() answered in 1.4 s)."""
    import hessinv.riccati as R

    model = _mlp()
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    H = hessinv.hessian(model, nn.CrossEntropyLoss(), X, y)
    monkeypatch.setattr(R, "_memory_bytes", lambda device: 1000)
    monkeypatch.setattr(R, "_capacity_bytes", lambda device: 1000)
    with pytest.raises(TooLargeError, match=r"the diagonal's sweep .*gauss_newton\(\.\.\.\)\.diagonal\(\)"):
        R.check_memory(H.blocks, H._names, H.dtype, H.device, diagonal=True)
    with pytest.raises(TooLargeError, match=r"the Riccati sweep .*root\(\)"):
        R.check_memory(H.blocks, H._names, H.dtype, H.device)


def test_a_woodbury_factor_reading_u_whole_copies_none_of_its_columns():
    """Most columns live, some zero (a ReLU net's dead units): the solve reads ``U`` whole, so the live
    columns are not copied (they were, at construction: 386 MB at 670k parameters, twice in a solve);
    the solves stay exact, and the columns come when a product needs them."""
    g = torch.Generator().manual_seed(1)
    r, n = 6, 200
    U = torch.randn(r, n, generator=g, dtype=torch.float64)
    U[:, 10:30] = 0.0  # dead columns
    S = torch.ones(r, dtype=torch.float64)
    D = 0.5 + torch.rand(n, generator=g, dtype=torch.float64)
    f = lowrank.WoodburyFactor(U, S, D)
    assert "solve" not in f._columns  # (only the index of the live columns)
    b = torch.randn(n, generator=g, dtype=torch.float64)
    ref = torch.linalg.solve(torch.diag(D) + U.T @ U, b)
    assert float((f.solve(b) - ref).norm() / ref.norm()) < 1e-13
    assert "solve" not in f._columns
    assert torch.equal(f._U_rest, U[:, f._rest]) and f._rest.numel() == n - 20


def test_an_allocation_failure_without_a_message_is_named_too(monkeypatch):
    """A bare ``MemoryError()`` (numpy's, a test's) has no text to quote: still a TooLargeError."""
    model = _mlp()
    X, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    G = hessinv.gauss_newton(model, nn.CrossEntropyLoss(), X, y)

    def fail(self):
        raise MemoryError

    monkeypatch.setattr(lowrank.WoodburyFactor, "_gram", fail)
    with pytest.raises(TooLargeError, match=r"out of memory \(MemoryError\)"):
        G.factor(damping=torch.full((G.shape[0],), 0.1, dtype=torch.float64))
