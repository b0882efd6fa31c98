"""What a mutation probe of the core math (2026-12-07) found unpinned: each mutated line passed its module's
tests. Each test below fails on its mutant; plain-autograd float64 dense references.

- ``slogdet``'s sign by the dense LU (pivots too ill-conditioned for the sweep's) without the row swaps'
  parity: wrong at 9 of 12 seeds;
- the sweep's power-of-two rescaling (``riccati._normalize``) off by 2, reached where a loss is scaled below
  ~1e-290: inertia and logdet wrong;
- the selected-inversion sweep (``riccati_inverse_diagonal``): a broken branch was hidden by
  ``Factorization.inverse_diagonal``'s probe check, which falls back to solves -- so it is tested on its own,
  and the public call is checked not to fall back."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from reference import autograd_hessian
from torch import nn

import hessinv
from hessinv import curvature as hc
from hessinv.riccati import riccati_inverse_diagonal

F64 = torch.float64


def _tanh_mlp(seed: int, sizes: tuple[int, ...], gain: float = 2.0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), nn.Tanh()]
    net = nn.Sequential(*layers[:-1]).double()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(gain)
    return net


def test_slogdet_sign_by_the_dense_lu_counts_row_swaps():
    """A damping 1e-6 ||H|| from an eigenvalue: the sweep's pivots are too ill-conditioned for its logdet, the
    dense LU answers, and its sign is the parity of negative pivots *and* row swaps."""
    lu_route = 0
    for seed in range(12):
        net = _tanh_mlp(seed, (3, 4, 2))
        X, y = torch.randn(6, 3, dtype=F64), torch.randn(6, 2, dtype=F64)
        Hd = autograd_hessian(net, nn.MSELoss(), X, y)
        ev = torch.linalg.eigvalsh(Hd)
        k = int((ev < 0).sum()) // 2
        eps = -float(ev[k]) + 1e-6 * float(ev.abs().max())
        sign, ref = torch.linalg.slogdet(Hd + eps * torch.eye(len(ev), dtype=F64))
        F = hessinv.hessian(net, nn.MSELoss(), X, y).factor(eps)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s, v = F.slogdet()
        lu_route += F._dense_sld is not None
        assert s == float(sign), seed
        assert abs(v - float(ref)) <= 1e-8 * max(1.0, abs(float(ref))), seed
    assert lu_route >= 6  # (the case: the dense LU's sign)


class _Scaled(nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.scale, self.mse = scale, nn.MSELoss()

    def forward(self, out, target):
        return self.scale * self.mse(out, target)


@pytest.mark.parametrize("scale", [1e-295, 1e-250])
def test_inertia_and_logdet_at_a_loss_scaled_to_the_bottom_of_float64(scale):
    """The sweep's products fall below tiny / u and are rescaled by powers of two: the inertia and
    ``logdet - n log(scale)`` must be those of the unscaled problem."""
    net = _tanh_mlp(0, (3, 4, 4, 2))
    X, y = torch.randn(6, 3, dtype=F64), torch.randn(6, 2, dtype=F64)
    Hd = autograd_hessian(net, nn.MSELoss(), X, y)
    n = Hd.shape[0]
    ev = torch.linalg.eigvalsh(Hd)
    assert float(ev[0]) < 0
    H = hessinv.hessian(net, _Scaled(scale), X, y)
    for eps in (0.5 * float(ev[-1]), -0.5 * float(ev[0] + ev[1])):
        lam = torch.linalg.eigvalsh(Hd + eps * torch.eye(n, dtype=F64))
        ref = (int((lam < 0).sum()), 0, int((lam > 0).sum()))
        sign, ref_ld = torch.linalg.slogdet(Hd + eps * torch.eye(n, dtype=F64))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert tuple(H.inertia(eps * scale, tol=0)) == ref
            F = H.factor(eps * scale)
            s, ld = F.slogdet()
        assert tuple(F.inertia) == ref
        assert s == float(sign)
        assert abs(ld - n * math.log(scale) - float(ref_ld)) <= 1e-8 * max(1.0, abs(float(ref_ld)))


def _no_fallback(monkeypatch) -> list[int]:
    calls: list[int] = []
    orig = hc.Factorization._inverse_diagonal_by_solves

    def spy(self):
        calls.append(1)
        return orig(self)

    monkeypatch.setattr(hc.Factorization, "_inverse_diagonal_by_solves", spy)
    return calls


CHAINS = {
    "low-rank last stage": ((3, 8, 2), 2),
    "wide stages after the first": ((3, 5, 5, 2), 4),
    "dense first pivot with 2x2 blocks": ((12, 6, 2), 10),
}


@pytest.mark.parametrize("chain", list(CHAINS))
def test_the_inverse_diagonal_sweep_itself_against_the_dense_inverse(chain, monkeypatch):
    sizes, B = CHAINS[chain]
    fallbacks = _no_fallback(monkeypatch)
    checked = two_by_two = 0
    for seed in range(8):
        net = _tanh_mlp(seed, sizes)
        X, y = torch.randn(B, sizes[0], dtype=F64), torch.randn(B, sizes[-1], dtype=F64)
        H = hessinv.hessian(net, nn.MSELoss(), X, y)
        Hd = autograd_hessian(net, nn.MSELoss(), X, y)
        ev = torch.linalg.eigvalsh(Hd)
        gaps = [(float(ev[j] - ev[j - 1]), j) for j in range(1, len(ev)) if ev[j - 1] < -1e-8]
        shifts = [1.0 - float(ev[0])]
        if gaps:
            j = max(gaps)[1]
            shifts.append(-0.5 * float(ev[j] + ev[j - 1]))  # (indefinite, midway between eigenvalues)
        for s in shifts:
            F = H.factor(s)
            ref = torch.linalg.inv(Hd + s * torch.eye(len(ev), dtype=F64)).diagonal()
            sweep = torch.cat(riccati_inverse_diagonal(H.blocks, F.factors))
            assert float((sweep - ref).abs().max() / ref.abs().max()) <= 1e-10, (seed, s)
            fallbacks.clear()
            got = F.inverse_diagonal()
            assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-10
            assert not fallbacks  # (the sweep's answer, not the solves')
            checked += 1
            two_by_two += any(f is not None and getattr(f.pivot, "off", None) is not None for f in F.factors)
    assert checked >= 8
    if chain == "dense first pivot with 2x2 blocks":
        assert two_by_two >= 1
