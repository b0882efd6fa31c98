"""The backward Riccati sweep: factor ``H + eps I`` exactly, solve with it, read off its inertia.

Symbols (math.md §2) -> names:

==================  =====================================================================
symbol              code
==================  =====================================================================
``Sigma_l``         ``Sigma`` (B, d_l, B, d_l): curvature of the cost-to-go in ``z_l``
``Qxx_l``           ``pivot`` (factored: Cholesky, or eigendecomposition if indefinite)
``Qxz_l``           ``Qxz`` (p_l, a_{l-1})
``K_l``             ``Qxx^{-1} Qxz`` (transient; applied as ``pivot.solve(Qxz y)``)
``k_l, r_l``        backward solve sweep;  ``x_l, y_l``: forward solve sweep
==================  =====================================================================

::

    Sigma_L = 0
    for l = L..1:   Qxx = Hxx + eps I + Jx^T Sigma Jx;  Qxz = Hxz + Jx^T Sigma Jz
                    Qzz = Hzz + Jz^T Sigma Jz;          Sigma_{l-1} = Qzz - Qxz^T Qxx^{-1} Qxz
    backward:  r_L = 0;   k_l = Qxx^{-1}(g_l + Jx^T r_l);   r_{l-1} = Jz^T r_l - Qxz^T k_l
    forward:   y_0 = 0;   x_l = k_l - Qxx^{-1} Qxz y_{l-1};  y_l = Jx x_l + Jz y_{l-1}

This is block Gaussian elimination of ``H + eps I`` itself, last stage first, so by Sylvester's law
``inertia(H + eps I) = sum_l inertia(Qxx_l)``, and ``H + eps I`` is positive definite iff every
``Qxx_l`` has a Cholesky factor. Cost per stage ``p^3/3 + 2 p^2 a + p a^2``; never the forward
(input -> loss) order, whose pivots can be singular on well-conditioned positive definite systems.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from hessinv.errors import NonFiniteError, SingularError
from hessinv.stages import Blocks


class Inertia(NamedTuple):
    """Counts of negative, zero and positive eigenvalues."""

    negative: int
    zero: int
    positive: int


class Pivot:
    """A factored pivot ``Qxx_l``: Cholesky when positive definite, else a symmetric eigendecomposition.

    The eigendecomposition gives the pivot's inertia exactly and a backward-stable solve. With
    ``strict`` (solves), a pivot eigenvalue below ``p * u * max|lambda|`` makes the pivot singular
    (:class:`SingularError`); without it (inertia counts), only an exactly zero eigenvalue does:
    an ill-conditioned but invertible pivot still gives a valid congruence, so the counts stay right
    for eigenvalues farther than the rounding error from the shift.
    """

    def __init__(self, Q: Tensor, stage: int, name: str, damping: float, strict: bool = True):
        self.p = Q.shape[0]
        if not torch.isfinite(Q).all():
            raise NonFiniteError(f"{name}: the Riccati pivot Qxx contains NaN or infinity")
        L, info = torch.linalg.cholesky_ex(Q)
        self.cholesky = int(info) == 0
        if self.cholesky:
            self.L = L
            self.inertia = Inertia(0, 0, self.p)
            return
        lam, V = torch.linalg.eigh(Q)
        tol = self.p * torch.finfo(Q.dtype).eps * lam.abs().max().clamp_min(torch.finfo(Q.dtype).tiny)
        if (lam.abs() <= (tol if strict else 0.0)).any():
            raise SingularError(
                f"{name}: pivot Qxx is singular at damping {damping:g} "
                f"(smallest |eigenvalue| {lam.abs().min().item():.3g}); H + eps I is singular or "
                "nearly so -- choose another damping",
                stage=stage,
                damping=damping,
            )
        self.lam, self.V = lam, V
        self.inertia = Inertia(int((lam < 0).sum()), 0, int((lam > 0).sum()))

    def solve(self, R: Tensor) -> Tensor:
        """``Qxx^{-1} R`` for R of shape (p, m)."""
        if self.cholesky:
            return torch.cholesky_solve(R, self.L)
        return self.V @ ((self.V.T @ R) / self.lam[:, None])


class StageFactor(NamedTuple):
    pivot: Pivot
    Qxz: Tensor  # (p, a_in)


def riccati_factor(
    blocks: list[Blocks],
    damping: float,
    names: list[str],
    like: Tensor,
    stop_if_indefinite: bool = False,
    strict: bool = True,
) -> tuple[list[StageFactor | None], Inertia, bool]:
    """Backward sweep over ``blocks`` (model stages, then the loss stage).

    ``like`` gives the dtype and device. Returns the per-stage factors (None for parameter-free stages), the inertia of ``H + eps I``,
    and whether it is positive definite. ``strict`` is passed to :class:`Pivot`. With ``stop_if_indefinite`` the sweep stops at the first
    pivot without a Cholesky factor (the PD test), and the returned factors are incomplete.
    """
    out: list[StageFactor | None] = [None] * len(blocks)
    dtype, device = like.dtype, like.device
    Sigma = torch.zeros(1, 1, 1, 1, dtype=dtype, device=device)
    neg = pos = 0
    pd = True
    for l in range(len(blocks) - 1, -1, -1):
        blk = blocks[l]
        rb = blk.riccati(Sigma, need_qzz=l > 0)
        if blk.p == 0:
            Sigma = rb.Qzz
            continue
        Qxx = rb.Qxx0 + damping * torch.eye(blk.p, dtype=dtype, device=device)
        piv = Pivot(Qxx, l, names[l], damping, strict)
        neg, pos = neg + piv.inertia.negative, pos + piv.inertia.positive
        pd = pd and piv.cholesky
        if not pd and stop_if_indefinite:
            return out, Inertia(neg, 0, pos), False
        Qxz = rb.Qxz.reshape(blk.p, -1)
        out[l] = StageFactor(piv, Qxz)
        if l > 0:
            a = Qxz.shape[1]
            S = rb.Qzz.reshape(a, a) - Qxz.T @ piv.solve(Qxz)
            Sigma = (0.5 * (S + S.T)).reshape(rb.Qzz.shape)
    return out, Inertia(neg, 0, pos), pd


def riccati_solve(blocks: list[Blocks], factors: list[StageFactor | None], rhs: list[Tensor]) -> list[Tensor]:
    """Solve ``(H + eps I) x = g`` with the factored sweep; ``rhs[l]`` is (p_l, k), returns the same shapes."""
    n_blocks = len(blocks)
    k = rhs[0].shape[1]
    last = max(l for l in range(n_blocks) if blocks[l].p > 0)
    ks: list[Tensor | None] = [None] * n_blocks
    r = rhs[0].new_zeros(1, 1, k)
    for l in range(n_blocks - 1, -1, -1):
        blk, f = blocks[l], factors[l]
        if f is not None:
            ks[l] = f.pivot.solve(rhs[l] + blk.jxT(r))
            if l > 0:
                r = blk.jzT(r) - (f.Qxz.T @ ks[l]).view(blk.batch, blk.d_in, k)
        elif l > 0:
            r = blk.jzT(r)
    xs: list[Tensor] = [r.new_zeros(0, k)] * n_blocks
    y: Tensor | None = None  # y_0 = 0
    for l in range(last + 1):
        blk, f = blocks[l], factors[l]
        if f is not None:
            x = ks[l] if y is None else ks[l] - f.pivot.solve(f.Qxz @ y.reshape(-1, k))
            xs[l] = x
            if l < last:
                y = blk.jx(x) if y is None else blk.jx(x) + blk.jz(y)
        elif y is not None:
            y = blk.jz(y)
    return xs
