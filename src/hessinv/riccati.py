"""The backward Riccati sweep: factor ``H + eps I`` exactly, solve with it, read off its inertia.

Symbols (math.md §2) -> names:

==================  =====================================================================
symbol              code
==================  =====================================================================
``Sigma_l``         ``Sigma`` (B, d_l, B, d_l): curvature of the cost-to-go in ``z_l``
``Qxx_l``           ``pivot`` (factored: Cholesky, or eigendecomposition if indefinite;
                    :class:`LowRankPivot` through its rank-``B d`` part for wide Linear stages)
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

import functools
import math
import os
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hessinv import linalg
from hessinv.errors import (
    IndefiniteError,
    InvalidArgumentError,
    NonFiniteError,
    SingularError,
    TooLargeError,
    out_of_memory,
)
from hessinv.stages import Blocks
from hessinv.stages.protocol import ExampleCurvature

#: Sweeps whose work is mostly on blocks of at most this size run on one CPU thread
#: (:data:`hessinv.linalg.SMALL_BLOCKS`, :func:`_small_sweep`).
SMALL_BLOCKS = linalg.SMALL_BLOCKS


def _small_sweep(blocks: list[Blocks]) -> bool:
    """Whether most of a sweep's work is on small blocks (``p`` and ``a = batch x d_out`` at most
    :data:`SMALL_BLOCKS`), weighing each block by ``(p + a)^3``: one 10-class head (``a = 640`` at batch
    64) no longer sends the 63 small stages before it to two threads (2.4x slower beside a busy process)."""
    big = total = 0.0
    for b in blocks:
        a = b.batch * b.d_out
        work = float(b.p + a) ** 3
        total += work
        big += work if max(b.p, a) > SMALL_BLOCKS else 0.0
    return bool(blocks) and big <= 0.5 * total


def _sweep(fn):
    """Run a sweep over ``blocks`` (its first argument) with subnormal numbers flushed
    (:func:`hessinv.linalg.flush_subnormals`), and on one CPU thread when most of its work is on small
    blocks (:func:`_small_sweep`)."""

    @functools.wraps(fn)
    def wrapper(blocks, *args, **kwargs):
        small = _small_sweep(blocks) and all(t.is_cpu for t in args if isinstance(t, Tensor))
        try:
            with linalg.flush_subnormals(), linalg.one_thread_if(small):
                return fn(blocks, *args, **kwargs)
        except TooLargeError:  # (check_memory's own, a MemoryError too)
            raise
        except (RuntimeError, MemoryError) as e:  # the allocator's (check_memory's estimate fell short)
            if not out_of_memory(e):
                raise
            raise TooLargeError(
                f"the Riccati sweep ran out of memory ({' '.join(str(e).split())[:160]}); take the curvature "
                "on fewer examples (Newton/Preconditioner: a smaller curvature_batch_size), or use products "
                "(H @ v), which need no such matrices"
            ) from None

    return wrapper


class Inertia(NamedTuple):
    """Counts of negative, zero and positive eigenvalues."""

    negative: int
    zero: int
    positive: int


#: Static pivot perturbation threshold, relative to ``max|Qxx|``; None: ``p * u`` (``p`` the pivot's
#: order, ``u`` the unit roundoff): only pivots singular to working precision are perturbed. (The
#: ``sqrt(u)`` of sparse direct solvers perturbs far too often here: ``max|Qxx|`` carries the large
#: ``Jx^T Sigma Jx`` term of deep chains while eigenvalues near ``eps`` are legitimate; Bunch–Kaufman
#: is backward stable without it.)
PERTURB_THRESHOLD: float | None = None


def _perturb_tau(dtype: torch.dtype, scale: float, p: int) -> float:
    rel = p * torch.finfo(dtype).eps if PERTURB_THRESHOLD is None else PERTURB_THRESHOLD
    return rel * scale


class Pivot:
    """A factored pivot ``Qxx_l``: Cholesky when positive definite, else a symmetric indefinite
    ``P^T Qxx P = L D L^T`` (Bunch–Kaufman pivoting inside the block; ``D`` block diagonal with 1x1 and
    2x2 blocks).

    Both give the pivot's inertia exactly (Sylvester: ``inertia(Qxx) = inertia(D)``) and a
    backward-stable solve; Bunch–Kaufman costs about a Cholesky (``p^3/3`` flops), so an indefinite
    pivot is not much slower than a definite one. A pivot whose ``D`` has an eigenvalue of modulus below
    ``tau`` is near-singular; what happens then depends on the mode:

    - ``perturb`` (factorizations for solves, :class:`~hessinv.Factorization`): static pivot perturbation as
      in sparse direct solvers (MUMPS, SuperLU_DIST, PARDISO): each such eigenvalue of a ``D`` block is
      replaced by ``sign * tau`` with ``tau = p u max(max|Qxx|, hscale, |eps|)``
      (:data:`PERTURB_THRESHOLD` overrides ``p u``), so the sweep factors a matrix within about ``max|L|^2
      tau`` of ``H + eps I`` (Bunch-Kaufman
      does not bound ``L``: a pivot to perturb whose ``L`` has an entry above :data:`PERTURB_MAX_L` is also
      factored in the reversed order, and the smaller ``L`` kept -- a graded pivot eliminated from its small
      end gave 1.5e7, from its large end 1e2); solves are recovered by iterative refinement or a Krylov
      method
      preconditioned by the perturbed factorization. ``perturbed`` counts the replaced eigenvalues (the
      inertia is then no longer certified).
    - ``strict`` without ``perturb``: an eigenvalue of ``D`` below ``p * u * max|Qxx|`` raises
      :class:`SingularError`.
    - neither (inertia counts): only an exactly zero eigenvalue raises; an ill-conditioned but
      invertible pivot still gives a valid congruence.

    ``cholesky_first=False`` skips the Cholesky attempt (the sweep does so after an indefinite pivot,
    when the next one is most likely indefinite too). ``scale``: the perturbation's scale where ``Qxx``
    is zero (``tau = p u scale``; the sweep passes the largest diagonal entry of the blocks downstream).
    ``hscale``: the largest ``max|Qxx|`` of the positive definite pivots before this one in the sweep, while
    all were (a lower estimate of ``||H + eps I||``, see :func:`riccati_factor`); with ``perturb``, ``tau = p
    u max(max|Qxx|, hscale)``, normwise as in MUMPS' static pivoting: a pivot that cancellation left at the
    rounding level of the blocks it came from (the first layer of a zero-residual least-squares fit:
    ``max|Qxx| = 2e-13`` against ``||H|| = 41``) is all rounding error, its own scale no measure of it -- and
    a Cholesky pivot with ``min L_ii^2 < tau`` goes the indefinite way to be perturbed too.
    """

    def __init__(
        self,
        Q: Tensor,
        stage: int,
        name: str,
        damping: float,
        strict: bool = True,
        perturb: bool = False,
        cholesky_first: bool = True,
        modify: bool = False,
        scale: float = 0.0,
        hscale: float = 0.0,
    ):
        self.p = Q.shape[0]
        self.perturbed = 0
        self.modified = 0  # eigenvalues of D replaced by max(|lambda|, damping) (``modify``)
        self.stage, self.name, self.damping = stage, name, damping
        if not self.p:  # (a lookup table's pivot in the rows read, none read: LowRankPivot's inner)
            self.qmax, self.cholesky, self.L, self.inertia = 0.0, True, Q, Inertia(0, 0, 0)
            return
        if cholesky_first:
            L = linalg.cholesky(Q)  # None: not positive definite, or not finite
            if L is not None:
                self.qmax = _diagmax(Q)  # max|Q| of a positive definite Q
                if (
                    not perturb
                    or not self.p
                    or float(L.diagonal().min()) ** 2
                    >= _perturb_tau(Q.dtype, max(self.qmax, hscale, abs(damping)), self.p)
                ):
                    self.cholesky = True
                    self.L = L
                    self.inertia = Inertia(0, 0, self.p)
                    return
        self.cholesky = False
        self._factor_indefinite(Q, strict, perturb, modify, scale, hscale)

    @property
    def positive_definite(self) -> bool:
        """Whether the (unperturbed) pivot is positive definite."""
        return self.inertia.negative == 0 and self.inertia.zero == 0 and not self.perturbed

    def _factor_indefinite(
        self,
        Q: Tensor,
        strict: bool,
        perturb: bool,
        modify: bool = False,
        scale: float = 0.0,
        hscale: float = 0.0,
    ) -> None:
        # the p x p bookkeeping runs in numpy: a microsecond per operation where torch's small ops
        # cost several (the indefinite pivot must not cost much more than a Cholesky one)
        Qc = Q.detach().cpu()
        fi = torch.finfo(Qc.dtype)
        qmax = _maxabs(Qc)  # NaN propagates
        if not math.isfinite(qmax):
            raise NonFiniteError(f"{self.name}: the Riccati pivot Qxx contains NaN or infinity")
        qmax = max(qmax, fi.tiny)
        self.qmax = qmax
        T, perm, d, e, k = linalg.ldl(Qc)  # k: the first rows of D's 2x2 blocks
        ev = _block_eigenvalues(d, e, k)
        aev = np.abs(ev)
        lo = float(aev.min())  # min |eigenvalue| of D, kept current as D changes below
        if modify:  # |D| floored at the damping: P L |D| L^T P^T is positive definite (math.md §6)
            floor = max(self.damping, fi.tiny)
            d, e, ev, self.modified = _map_blocks(d, e, k, ev, lambda x: np.maximum(np.abs(x), floor))
            aev = np.abs(ev)
            lo = float(aev.min())
        elif perturb:
            # a zero pivot (to the smallest normal number) has no scale of its own: the sweep's so far
            # (scale, from the blocks downstream; the zero-initialized linear net's first pivot)
            # (|eps| too: Qxx = (H's block) + eps I is formed with rounding u |eps| at least -- a shift that
            # cancels H, H = I at eps = -1, left pivots of 1e-16 that measured themselves: nothing perturbed,
            # and slogdet, inverse_diagonal and the inertia came back from rounding noise unflagged)
            top = max(qmax if qmax > fi.tiny else scale, hscale, abs(self.damping), fi.tiny)
            tau = _perturb_tau(Q.dtype, top, self.p)
            if tau < fi.tiny and lo >= fi.tiny:
                # a curvature so small (a loss scaled by 1e-300) that no perturbation is representable:
                # none is needed where the pivot is nonsingular (refinement checks the result)
                tau = 0.0
            elif tau < fi.tiny:  # Qxx and every block downstream are zero
                raise SingularError(
                    f"{self.name}: pivot Qxx is zero at damping {self.damping:g}, and so is the curvature "
                    "downstream of it, to the float range (the stage's parameters do not reach the loss on "
                    "this batch, or the loss is so small that its curvature underflows: scale it up); "
                    "H + eps I is singular to working precision -- choose a damping > 0",
                    stage=self.stage,
                    damping=self.damping,
                )
            tmax = _maxabs_np(T) if lo < tau else 0.0
            if tmax > PERTURB_MAX_L:
                # the perturbation is scaled by L's entries, which Bunch-Kaufman does not bound: on a
                # graded, nearly rank-deficient pivot the elimination order decides (small end first:
                # max|L| 1.5e7, the perturbed solve's residual 1.0; large end first: below 1): the
                # reversed order too, keeping the smaller L (P^T J Q J P = T D T^T: Q's perm = p-1-perm)
                Tr, pr, dr, er, kr = linalg.ldl(Qc.flip(0, 1))
                if _maxabs_np(Tr) < tmax:
                    T, perm, d, e, k = Tr, (self.p - 1) - pr, dr, er, kr
                    ev = _block_eigenvalues(d, e, k)
                    aev = np.abs(ev)
                    lo = float(aev.min())
            if lo < tau:
                d, e, ev, self.perturbed = _map_blocks(
                    d, e, k, ev, lambda x: np.where(np.abs(x) < tau, np.where(x < 0, -tau, tau), x)
                )
                aev = np.abs(ev)
                lo = float(aev.min())
        elif lo <= (self.p * fi.eps * qmax if strict else 0.0):
            raise SingularError(
                f"{self.name}: pivot Qxx is singular at damping {self.damping:g} (smallest |eigenvalue| "
                f"of its LDL^T factor {lo:.3g}); H + eps I is singular or nearly so -- choose "
                "another damping",
                stage=self.stage,
                damping=self.damping,
            )
        # Sylvester: the inertia of Qxx is that of D
        hi = float(aev.max())
        neg = int(np.count_nonzero(ev < 0))
        nonzero = self.p if lo > 0 else int(np.count_nonzero(ev))
        self.inertia = Inertia(neg, self.p - nonzero, nonzero - neg)
        self._ev = ev  # log|det| from it, when asked
        self.top = hi  # max |eigenvalue| of D
        if not math.isfinite(hi):  # sytrf overflowed on a finite pivot: entries near the maximum, or so
            # small that a 2x2 block's determinant underflowed and its inverse did not
            what = "overflowed" if qmax >= 1 else "underflowed (a 2x2 block's determinant)"
            raise NonFiniteError(
                f"{self.name}: the LDL^T factorization of the Riccati pivot Qxx {what} (max|Qxx| "
                f"{qmax:.3g}); rescale the loss or the inputs"
                + (" (or use a float64 model)" if Qc.dtype != torch.float64 else "")
            )
        # a zero 1x1 block (inertia counts only) gives inf, as it must (2x2 blocks' rows are set below)
        dinv = 1.0 / d if d.all() else np.divide(1.0, d, out=np.full_like(d, np.inf), where=d != 0)
        dev, cpu = Q.device, Q.device.type == "cpu"
        self.off: Tensor | None = None
        if k.size:  # D^{-1} on a 2x2 block [[a, b], [b, c]]: [[c, -b], [-b, a]] / (l1 l2), its eigenvalues
            # l1, l2 divided one at a time (a c - b^2 itself over- or underflows at |b| ~ 1e+-160)
            k1 = k + 1
            l1, l2 = ev[k], ev[k1]
            dinv[k], dinv[k1] = d[k1] / l1 / l2, d[k] / l1 / l2
            off = np.zeros((self.p - 1, 1), dtype=T.dtype)
            off[k, 0] = -e[k] / l1 / l2  # the (k, k+1) entries
            self.off = torch.from_numpy(off) if cpu else torch.from_numpy(off).to(dev)
        # the unit lower triangular factor: P^T Qxx P = L D L^T
        self.L, self.perm = torch.from_numpy(T), torch.from_numpy(perm)
        self.dinv = torch.from_numpy(dinv.astype(T.dtype, copy=False)[:, None])
        if not cpu:
            self.L, self.perm, self.dinv = self.L.to(dev), self.perm.to(dev), self.dinv.to(dev)
        self._iperm: Tensor | None = None

    @property
    def iperm(self) -> Tensor:
        """The inverse of ``perm`` (``P R = R[iperm]``), formed when a solve first needs it."""
        if self._iperm is None:
            self._iperm = torch.argsort(self.perm)
        return self._iperm

    def _dsolve(self, W: Tensor) -> Tensor:
        """``D^{-1} W`` (``D^{-1}`` is tridiagonal: a diagonal and the ``(k, k+1)`` entries of 2x2 blocks)."""
        Y = self.dinv * W
        if self.off is not None:
            Y[:-1].addcmul_(self.off, W[1:])
            Y[1:].addcmul_(self.off, W[:-1])
        return Y

    def solve(self, R: Tensor) -> Tensor:
        """``Qxx^{-1} R`` for R of shape (p, m)."""
        if self.cholesky:  # two triangular solves (cholesky_solve's per-call overhead is higher)
            return linalg.solve_triangular(
                self.L.mT, linalg.solve_triangular(self.L, R, upper=False), upper=True
            )
        # P^T Qxx P = L D L^T: two unit triangular solves around D's
        Y = linalg.solve_triangular(self.L, R[self.perm], upper=False, unitriangular=True)
        Z = linalg.solve_triangular(self.L.mT, self._dsolve(Y), upper=True, unitriangular=True)
        return Z[self.iperm]

    def logdet(self) -> float:
        """``log |det Qxx|`` (of the perturbed pivot if ``perturbed``)."""
        if self.cholesky:
            return 2.0 * float(self.L.diagonal().log().sum())
        with np.errstate(divide="ignore"):  # a zero 1x1 block (inertia counts only): -inf
            return float(np.log(np.abs(self._ev)).sum())

    def conditioning(self) -> float:
        """A cheap estimate of ``1 / cond(Qxx)``: ``min|lambda(D)| / max|lambda(D)|`` (Bunch–Kaufman) or
        ``(min L_ii / max L_ii)^2`` (Cholesky, which can only overestimate it). A pivot far below
        ``sqrt(u)`` amplifies the sweep's rounding into the Schur complements of the stages before it
        (the sweep does not pivot across stages): their pivots' eigenvalues, hence the inertia and the
        log-determinant, are then exact only for a matrix further than ``u ||H||`` from ``H + eps I``."""
        if self.cholesky:
            dg = self.L.diagonal()
            lo, hi = torch.aminmax(dg.abs())
            return float(lo / hi) ** 2 if float(hi) > 0 else 0.0
        return float(np.abs(self._ev).min()) / self.top if self.top > 0 else 0.0

    def inverse_diagonal(self) -> Tensor:
        """``diag(Qxx^{-1})`` (p,): the column norms of ``L^{-1}`` (Cholesky), or ``w_i^T D^{-1} w_i``
        with ``w_i = L^{-1} P^T e_i`` (``LDL^T``): a triangular solve with the identity, ``p^3`` flops."""
        eye = torch.eye(self.p, dtype=self.L.dtype, device=self.L.device)
        if self.cholesky:
            return linalg.solve_triangular(self.L, eye, upper=False).square().sum(0)
        W = linalg.solve_triangular(self.L, eye[self.perm], upper=False, unitriangular=True)
        return (W * self._dsolve(W)).sum(0)

    def inverse_sqrt(self, Z: Tensor) -> Tensor:
        """``S Z`` for a square root ``S S^T = Qxx^{-1}`` of a positive definite pivot: ``L^{-T} Z``
        (Cholesky). Z: (p, m). ``S Z`` has covariance ``Qxx^{-1}`` for white noise ``Z``."""
        if self.cholesky:
            return linalg.solve_triangular(self.L.mT, Z, upper=True)
        raise IndefiniteError(
            "inverse_sqrt: the pivot Qxx is not positive definite; it has no real square root"
        )

    def schur(self, Qzz: Tensor, Qxz: Tensor, overwrite: bool = False) -> Tensor:
        """``Qzz - Qxz^T Qxx^{-1} Qxz`` (a, a), symmetric (its off-diagonal block mirrored exactly, its
        diagonal blocks up to rounding: the next pivot's factorization reads one triangle); with
        ``overwrite``, in ``Qzz``'s memory.

        Cholesky: ``W = L^{-1} Qxz``, then ``Qzz - W^T W`` (``p^2 a + 1.5 p a^2`` flops: the lower
        block triangle of ``W^T W`` in two products, mirrored; against ``2 p^2 a + 2 p a^2`` for
        ``Qxz^T (Qxx^{-1} Qxz)``); ``LDL^T``: ``W = L^{-1} P^T Qxz``, ``Qzz - W^T D^{-1} W`` (same flops).
        """
        if self.cholesky:  # W^T = Qxz^T L^{-T}, solved on the right: W comes out row-major
            W = linalg.solve_triangular(self.L.mT, Qxz.mT, upper=True, left=False).mT
            Wl = W
        else:
            # W = L^{-1} P^T Qxz, solved on the right as W^T (L column-major: linalg.ldl)
            W = linalg.solve_triangular(
                self.L.mT,
                Qxz.index_select(0, self.perm).mT,
                upper=True,
                left=False,
                unitriangular=True,
            ).mT
            Wl = self._dsolve(W)
        # ||D||_inf <= sqrt(2) ||D||_2 (blocks of order <= 2): the gain bound _normalize takes
        W, Wl, scale = _normalize(W, Wl, Qzz, 1.0 if self.cholesky else 1.5 * self.top)
        S = _sym_update(Qzz, Wl, W, scale, overwrite)
        return flush_negligible(S, _diagmax(S), inplace=True)


#: a pivot to be perturbed whose factor has an entry above this is also factored in the reversed order
#: (:meth:`Pivot._factor_indefinite`)
PERTURB_MAX_L = 1e3


def _maxabs_np(T: np.ndarray) -> float:
    """``max |T_ij|`` over the strict lower triangle of a unit lower triangular factor (its upper
    triangle and diagonal hold other numbers: :func:`hessinv.linalg.ldl`)."""
    return float(np.abs(np.tril(T, -1)).max()) if T.shape[0] > 1 else 0.0


def _block_eigenvalues(d: np.ndarray, e: np.ndarray, k: np.ndarray) -> np.ndarray:
    """The ``p`` eigenvalues of ``D``: ``d`` on 1x1 blocks; for the 2x2 block at rows ``k, k+1`` its
    smaller eigenvalue at ``k`` and its larger at ``k + 1``."""
    if not k.size:
        return d
    a, c, b = d[k], d[k + 1], e[k]
    mid, rad = 0.5 * (a + c), np.hypot(0.5 * (a - c), b)
    ev = d.copy()
    ev[k], ev[k + 1] = mid - rad, mid + rad
    return ev


def _map_blocks(d, e, k, ev, f) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``D`` with every eigenvalue ``lambda`` replaced by ``f(lambda)``, eigenvectors unchanged (a 2x2
    block ``[[a, b], [b, c]]`` at rows ``k, k+1`` is rotated by ``theta = atan2(2 b, a - c) / 2``, its
    eigenvalues mapped, and rotated back). Returns the new ``d, e``, their eigenvalues
    (:func:`_block_eigenvalues`) and the number of eigenvalues ``f`` changed. Used for the modified
    Cholesky of Cheng & Higham per Bunch–Kaufman block (``f = max(|.|, floor)``) and for static pivot
    perturbation (``|lambda| < tau -> +-tau``)."""
    count = int(np.count_nonzero(f(ev) != ev))
    ones = np.ones(d.shape[0], dtype=bool)
    ones[k] = False
    ones[k + 1] = False
    d, e = d.copy(), e.copy()
    d[ones] = f(d[ones])
    if k.size:
        a, c, b = d[k], d[k + 1], e[k]
        theta = 0.5 * np.arctan2(2 * b, a - c)
        cs, sn = np.cos(theta), np.sin(theta)
        m1 = f(a * cs * cs + 2 * b * cs * sn + c * sn * sn)  # the eigenvalue of (cs, sn)
        m2 = f(a * sn * sn - 2 * b * cs * sn + c * cs * cs)  # the eigenvalue of (-sn, cs)
        d[k], d[k + 1], e[k] = m1 * cs * cs + m2 * sn * sn, m1 * sn * sn + m2 * cs * cs, (m1 - m2) * cs * sn
    return d, e, _block_eigenvalues(d, e, k), count


def _maxabs(A: Tensor) -> float:
    """``max |A_ij|`` (NaN if ``A`` holds one)."""
    if not A.is_contiguous() and A.mT.is_contiguous():  # reductions are 3x slower on strided memory
        A = A.mT
    if A.is_cpu and A.dtype in (torch.float64, torch.float32) and A.is_contiguous():
        a = A.detach().numpy()  # numpy's min and max: 12 us at 256 x 256 against 26 us for torch.aminmax
        return max(-float(a.min()), float(a.max()))
    lo, hi = torch.aminmax(A)
    return max(-float(lo), float(hi))


def _diagmax(A: Tensor) -> float:
    """``max |A_ii|``: a cheap lower estimate of ``max |A|`` (equal for positive semidefinite ``A``)."""
    return float(A.diagonal().abs().max()) if A.numel() else 0.0


def _sym_update(S: Tensor, Wl: Tensor, W: Tensor, scale: float, overwrite: bool) -> Tensor:
    """``S - scale Wl^T W`` for a symmetric result (``Wl^T W`` symmetric): the lower block triangle by
    two products, the upper right block mirrored from the lower left. In ``S``'s memory if ``overwrite``."""
    S = S if overwrite else S.clone()
    if scale == 0.0:
        return S
    a = S.shape[0]
    h = a // 2
    S[:h].addmm_(Wl[:, :h].T, W, alpha=-scale)
    S[h:, h:].addmm_(Wl[:, h:].T, W[:, h:], alpha=-scale)
    S[h:, :h] = S[:h, h:].mT
    return S


def flush_negligible(A: Tensor, scale: float | None = None, inplace: bool = False) -> Tensor:
    """On CPU, ``A`` without the entries below both ``u * scale`` and ``sqrt(tiny / u)``, as a new
    tensor (in ``A``'s memory with ``inplace``); ``A`` itself on other devices. ``scale`` is
    ``max|A|`` or an estimate of it from below (default: ``max|A|``).

    A perturbation below the rounding error of every normwise backward-stable step that follows, and
    none at all unless a block holds numbers below ~1e-146 (float64) / ~4e-16 (float32). It keeps
    subnormal numbers out of the sweep: far from the loss of a deep chain the blocks scale like the
    backprop vector (1e-270 at L=1024 on a tanh MLP), products of them underflow, and CPUs process
    subnormals ~100x slower (a 3x slower factorization at L=1024 in float64, at L=64 in float32).
    NaN and infinity are kept.
    """
    if A.device.type != "cpu" or not A.numel():
        return A
    fi = torch.finfo(A.dtype)
    m = _maxabs(A) if scale is None else scale
    lambd = min(m * fi.eps, math.sqrt(fi.tiny / fi.eps))
    return torch.ops.aten.hardshrink.out(A, lambd, out=A) if inplace else F.hardshrink(A, lambd)


def _normalize(W: Tensor, Wl: Tensor, Qzz: Tensor, gain: float = math.inf) -> tuple[Tensor, Tensor, float]:
    """``(W', Wl', s)`` with ``s Wl'^T W' = Wl^T W`` (the update ``Qxz^T Qxx^{-1} Qxz``), on CPU.

    Unchanged (``s = 1``) unless the products of entries would be subnormal -- far from the loss of a
    deep chain the update is ~ b^2 -- then ``W' = 2^-e W``, ``Wl' = 2^-f Wl`` with entries below 1 and
    ``s = 2^{e+f}`` (exact: powers of two); ``s = 0`` when the update is entirely below the smallest
    normal number or below ``u * max|Qzz|`` (what :func:`flush_negligible` would remove anyway).
    ``gain``: a bound ``||D||_inf`` with ``W = D Wl``, so ``max|Wl| >= max|W| / gain`` (a pass over
    ``Wl`` saved where that settles it).
    """
    if W.device.type != "cpu" or not W.numel():
        return W, Wl, 1.0
    fi = torch.finfo(W.dtype)
    m = _maxabs(W)
    if Wl is not W and gain > 0 and m * (m / gain) >= fi.tiny / fi.eps:
        return W, Wl, 1.0
    ml = m if Wl is W else _maxabs(Wl)
    if m * ml >= fi.tiny / fi.eps or not math.isfinite(m * ml):
        return W, Wl, 1.0
    bound = m * ml * W.shape[0]  # >= every entry of the update
    if bound < fi.tiny or bound < fi.eps * _maxabs(Qzz):
        return W, Wl, 0.0
    e, f = max(math.frexp(m)[1], -1000), max(math.frexp(ml)[1], -1000)
    return W * math.ldexp(1.0, -e), Wl * math.ldexp(1.0, -f), math.ldexp(1.0, e + f)


def _shifted(Q0: Tensor, damping: float, overwrite: bool = False) -> Tensor:
    """``Q0 + damping I`` (negligible tiny entries flushed on CPU, see :func:`flush_negligible`), as a
    new tensor or, with ``overwrite``, in ``Q0``'s memory."""
    Q = Q0 if overwrite else Q0.clone()
    Q = flush_negligible(Q, max(_diagmax(Q), abs(damping)), inplace=True)
    Q.diagonal().add_(damping)
    return Q


class LowRankPivot:
    """A pivot ``Qxx = eps I_p + U A U^T`` with ``U = Qz (x) I_d`` (``Qz``: (m1, B), orthonormal
    columns; ``p = m1 d``; ``A``: (r, r), ``r = B d``), factored through ``eps I_r + A`` (Woodbury).

    Its eigenvalues are ``eps`` (``p - r`` times, on the complement of ``range(U)``) and those of
    ``eps I_r + A``, so inertia, the Cholesky test and solves need only an ``r x r`` factorization:
    ``Qxx^{-1} = U (eps I + A)^{-1} U^T + (I - U U^T) / eps``. ``C = Qxz^T (I - U U^T) Qxz`` (a, a)
    for the ``Qxz`` that :meth:`schur` will see (None: zero) comes from the stage's structure.

    A Linear+activation stage has this form (math.md §3: ``Qxx0 = Jt^T M Jt``, ``Jt = Z (x) I``,
    ``Z^T = Qz Rz``, ``A = (Rz (x) I) M (Rz (x) I)^T``); it pays when the inputs are wider than the
    batch: ``r^3 / 3 + O(p r a)`` flops instead of ``p^3 / 3 + p^2 a + 2 p a^2``. Same interface as
    :class:`Pivot`; rows in the stage's input-major order. ``Qz`` may also be a 1-D integer tensor of
    ``r`` rows: ``U`` is then those unit columns of ``I_p`` (a lookup table's rows that the batch's
    tokens read: :meth:`hessinv.stages.generic.LazyBlocks.riccati_native`).
    """

    def __init__(
        self,
        Qz: Tensor,
        A: Tensor,
        C: Tensor | None,
        p: int,
        stage: int,
        name: str,
        damping: float,
        strict: bool = True,
        perturb: bool = False,
        cholesky_first: bool = True,
        modify: bool = False,
        scale: float = 0.0,
        hscale: float = 0.0,
        c_exp: int = 0,
    ):
        self.Qz, self.C, self.p, self.eps, self.dtype = Qz, C, p, damping, A.dtype
        self.rows = Qz.dim() == 1  # (U: unit columns, the rows Qz names)
        self.c_exp = c_exp  # the C passed is 2^-c_exp times the true one (RiccatiBlocks.lowrank)
        r = A.shape[0]
        top = float((A.diagonal() + damping).abs().max()) if r else 0.0  # ~ max |eigenvalue| if PD
        self.inner = Pivot(
            _shifted(A, damping, overwrite=True), stage, name, damping, strict, perturb, cholesky_first,
            modify, scale, hscale,
        )  # fmt: skip
        self.modified = self.inner.modified
        if not self.inner.cholesky:
            top = max(top, self.inner.top)
        fi = torch.finfo(A.dtype)
        k = p - r
        self.perturbed = self.inner.perturbed
        self.qmax = max(top, abs(damping), self.inner.qmax)
        # (unit columns: each row no token reads holds eps alone, an exact eigenvalue coupled to nothing, so
        # its threshold is a 1 x 1 block's -- at p's, a float32 Embedding(50000, 16) had its 797024 unread
        # rows "perturbed" at eps = 1e-3, and its solves handed to the float64 twin, a probe)
        width = 1 if self.rows else p
        if perturb:  # the eigenvalue eps on the complement of range(U): perturbed like a D block's
            tau = _perturb_tau(A.dtype, max(top, abs(damping), hscale, fi.tiny), width)
            if k > 0 and abs(damping) < tau:
                self.eps = -tau if damping < 0 else tau
                self.perturbed += k
        elif not modify:  # (modify: eps on the complement is the floor itself, never "singular")
            if strict:
                tol = width * fi.eps * max(top, abs(damping), fi.tiny)
            else:  # counts: exact down to eps = 0, but C / eps must stay representable (a float32
                # shift of 1e-45 overflowed): below that the pivot is singular to working precision
                tol = 1e4 * float(C.abs().max()) / fi.max if k > 0 and C is not None else 0.0
            if k > 0 and abs(damping) <= tol:
                raise SingularError(
                    f"{name}: pivot Qxx is singular at damping {damping:g} (eigenvalue {damping:g} on the "
                    f"{k} directions the stage's inputs do not reach); H + eps I is singular or nearly so "
                    "-- choose another damping",
                    stage=stage,
                    damping=damping,
                )
        if k > 0 and self.eps == 0 and C is not None:  # (a perturbation below the float range)
            raise SingularError(
                f"{name}: pivot Qxx is zero on the {k} directions the stage's inputs do not reach, at "
                f"damping {damping:g}, and no perturbation is representable at the curvature's scale: H + "
                "eps I is singular to working precision (or the loss so small that its curvature leaves "
                "the float range: scale the loss up) -- choose another damping",
                stage=stage,
                damping=damping,
            )
        inner = self.inner.inertia
        self.inertia = Inertia(
            inner.negative + (k if self.eps < 0 else 0),
            inner.zero,
            inner.positive + (k if self.eps > 0 else 0),
        )
        self.cholesky = self.inner.cholesky and damping > 0

    @property
    def positive_definite(self) -> bool:
        """Whether the (unperturbed) pivot is positive definite."""
        return self.inertia.negative == 0 and self.inertia.zero == 0 and not self.perturbed

    def conditioning(self) -> float:
        """:meth:`Pivot.conditioning` of the inner pivot, and ``|eps| / max|eigenvalue|`` where the
        complement of ``range(U)`` is not empty (``eps`` is an eigenvalue there; a tiny shift makes the
        Schur complement's ``C / eps`` term dominate)."""
        if not self.inner.p:  # (no row read: the pivot is eps I, its conditioning 1)
            return 1.0
        c = self.inner.conditioning()
        if self.p > self.inner.p and not self.rows:  # (unit columns: eps I on rows coupled to nothing)
            top = self.inner.top if not self.inner.cholesky else float(self.inner.L.diagonal().max()) ** 2
            c = min(c, abs(self.eps) / max(top, abs(self.eps), torch.finfo(self.dtype).tiny))
        return c

    def logdet(self) -> float:
        """``log |det Qxx| = log |det(eps I_r + A)| + (p - r) log |eps|`` (perturbed values if
        ``perturbed``)."""
        return self.inner.logdet() + (self.p - self.inner.p) * math.log(abs(self.eps))

    def inverse_sqrt(self, Z: Tensor) -> Tensor:
        """``S Z`` with ``S S^T = Qxx^{-1}``: ``S = U S_r U^T + (I - U U^T) / sqrt(eps)``, ``S_r`` the
        inner pivot's root (the two terms act on orthogonal ranges, so their covariances add)."""
        if self.eps <= 0 and self.p > self.inner.p:
            raise IndefiniteError("inverse_sqrt: the pivot Qxx is not positive definite (damping <= 0)")
        P = self._UT(Z)
        return self._U(self.inner.inverse_sqrt(P)) + (Z - self._U(P)) / math.sqrt(self.eps)

    def inverse_diagonal(self) -> Tensor:
        """``diag(Qxx^{-1}) = diag(U (eps I + A)^{-1} U^T) + (1 - diag(U U^T)) / eps`` (p,), ``U = Qz (x)
        I``: ``diag[(c, i)] = sum_{s,t} Qz[c,s] Qz[c,t] Ainv[(s,i),(t,i)] + (1 - sum_s Qz[c,s]^2) / eps``."""
        Qz = self.Qz
        inner = self.inner.solve(torch.eye(self.inner.p, dtype=self.dtype, device=Qz.device))
        if self.rows:
            return inner.new_full((self.p,), 1.0 / self.eps).index_copy_(0, Qz, inner.diagonal())
        m1, rz = Qz.shape
        Ad = inner.view(rz, -1, rz, inner.shape[0] // rz).diagonal(dim1=1, dim2=3)  # (rz, rz, q): [s, t, i]
        T = (Qz @ Ad.reshape(rz, -1)).view(m1, rz, -1)  # [c, t, i]
        within = (T * Qz[:, :, None]).sum(1)  # (m1, q)
        outside = (1.0 - Qz.square().sum(1, keepdim=True)) / self.eps
        return (within + outside).reshape(-1)

    def _UT(self, R: Tensor) -> Tensor:
        """``U^T R``: (p, k) -> (r, k)."""
        if self.rows:
            return R[self.Qz]
        return (self.Qz.T @ R.reshape(self.Qz.shape[0], -1)).reshape(-1, R.shape[1])

    def _U(self, Y: Tensor) -> Tensor:
        """``U Y``: (r, k) -> (p, k)."""
        if self.rows:
            return Y.new_zeros(self.p, Y.shape[1]).index_copy_(0, self.Qz, Y)
        return (self.Qz @ Y.reshape(self.Qz.shape[1], -1)).reshape(-1, Y.shape[1])

    def solve(self, R: Tensor) -> Tensor:
        """``Qxx^{-1} R`` for R of shape (p, m)."""
        P = self._UT(R)
        return self._U(self.inner.solve(P)) + (R - self._U(P)) / self.eps

    def schur(self, Qzz: Tensor, Qxz: Tensor, overwrite: bool = False) -> Tensor:
        """``Qzz - Qxz^T Qxx^{-1} Qxz = Qzz - P^T (eps I + A)^{-1} P - C / eps`` with ``P = U^T Qxz``."""
        S = self.inner.schur(Qzz, self._UT(Qxz), overwrite)
        if self.C is None:
            return S
        S.sub_(self.C, alpha=math.ldexp(1.0 / self.eps, self.c_exp))
        return flush_negligible(S, _diagmax(S), inplace=True)


class StageFactor(NamedTuple):
    pivot: Pivot | LowRankPivot
    Qxz: Tensor  # (p, a_in), rows in the stage's Riccati order (``order``) when ``order`` is not None
    order: Tensor | None = None  # see :class:`RiccatiBlocks`: Riccati row q is model parameter order[q]
    inverse: Tensor | None = None


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().split()
        return int(text[0]) if text and text[0].isdigit() else None
    except (OSError, ValueError):
        return None


def _cgroup_files() -> list[tuple[str, str, str, str]]:
    """``(limit, usage, stat, inactive key)`` files of this process's memory cgroup: v2 and v1 (memory
    controller) under the paths ``/proc/self/cgroup`` names, then at their roots."""
    v2, v1 = ["/sys/fs/cgroup"], ["/sys/fs/cgroup/memory"]
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.strip().split(":", 2)
        if len(parts) != 3 or ".." in parts[2]:
            continue
        controllers, path = parts[1], parts[2].rstrip("/")
        if not controllers and path:
            v2.insert(0, "/sys/fs/cgroup" + path)
        elif "memory" in controllers.split(",") and path:
            v1.insert(0, "/sys/fs/cgroup/memory" + path)
    return [(f"{d}/memory.max", f"{d}/memory.current", f"{d}/memory.stat", "inactive_file") for d in v2] + [
        (
            f"{d}/memory.limit_in_bytes",
            f"{d}/memory.usage_in_bytes",
            f"{d}/memory.stat",
            "total_inactive_file",
        )
        for d in v1
    ]


def _stat(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                k, _, v = line.partition(" ")
                if k == key:
                    return int(v)
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_limit() -> tuple[int, int] | None:
    """``(limit, headroom)`` in bytes of the first memory cgroup with a limit (:func:`_cgroup_files`); the
    headroom counts reclaimable page cache (inactive files) as free. None: no limit."""
    for limit, usage, stat, key in _cgroup_files():
        lim, use = _read_int(limit), _read_int(usage)
        if lim is not None and use is not None and lim < 2**60:
            return lim, max(lim - max(use - _stat(stat, key), 0), 0)
    return None


def _address_space() -> tuple[int, int] | None:
    """``(limit, headroom)`` of ``ulimit -v`` (None: unlimited)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft == resource.RLIM_INFINITY:
            return None
        with open("/proc/self/statm") as f:
            size = int(f.read().split()[0]) * int(os.sysconf("SC_PAGE_SIZE"))
        return soft, max(soft - size, 0)
    except (ImportError, OSError, ValueError, IndexError):
        return None


@functools.cache
def _capacity_bytes(device: torch.device) -> int:
    """The most this process could hold on ``device`` in bytes (0: unknown): its total memory, or a
    cgroup's or ``ulimit -v``'s limit where lower; read once per device."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[1])
        if device.type == "cpu":
            limits = [int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))]
            limits += [b[0] for b in (_cgroup_limit(), _address_space()) if b is not None]
            return min(limits)
    except (ValueError, OSError, AttributeError, RuntimeError):
        pass
    return 0


def _cpu_available() -> int | None:
    """Bytes this process can still allocate on the CPU: the least of the system's ``MemAvailable``, the
    headroom of its cgroup and of its address-space limit; None where none of them can be read."""
    bounds = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    bounds.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    bounds += [b[1] for b in (_cgroup_limit(), _address_space()) if b is not None]
    return min(bounds) if bounds else None


def _memory_bytes(device: torch.device) -> int | None:
    """Bytes a sweep may still allocate on ``device`` (None: unknown): on the CPU :func:`_cpu_available`,
    on CUDA the free memory plus what torch's caching allocator holds unused."""
    try:
        if device.type == "cuda":
            free = int(torch.cuda.mem_get_info(device)[0])
            return free + int(torch.cuda.memory_reserved(device)) - int(torch.cuda.memory_allocated(device))
        if device.type == "cpu":
            return _cpu_available()
    except (ValueError, OSError, AttributeError, RuntimeError):
        pass
    return None


#: a sweep's measured peak over the numbers of its largest stage (:func:`_sweep_entries`): 2.1-2.2 on a
#: tanh MLP and a small CNN in float64 (products and their copies beside the held blocks; the factors kept
#: for the solves are small next to them), with a margin
PEAK_FACTOR = 2.5
#: The factors a sweep keeps per stage, measured against :func:`_kept_entries`' count: tanh MLPs of width 32,
#: batch 16, depth 256 / 384 peaked at 1.28 / 1.42x the estimate without it (11 MB per layer against 8.5
#: MB counted: the stages' own blocks and the allocator's slack), and the deeper one died in the allocator
KEPT_FACTOR = 1.4


def _first_with_parameters(blocks: list[Blocks]) -> int:
    """The index of the first stage with parameters (0 if none has): the Riccati sweep's last stage."""
    return next((l for l, b in enumerate(blocks) if b.p), 0)


def _sweep_entries(blk: Blocks, batch: int, first: bool) -> int:
    """Numbers the sweep holds at once at stage ``blk`` for ``batch`` examples: the downstream
    ``Sigma`` (``a_out^2``; after the last stage, the loss's coupling of the outputs) and ``Jx^T Sigma``
    (``p a_out``), the pivot (``p^2``) and,
    above the first stage, ``Qzz`` (``a_in^2``), ``Qxz`` (``p a_in``) and ``L^{-1} Qxz`` (``q a_in``: a
    low-rank pivot's in its ``q = r`` rows -- counted as ``p a_in`` it overestimated a 256-wide MLP's
    sweep 2.2-2.9x and refused one that ran in 5.5 of 8.3 GiB)."""
    a_in, a_out, p, q = batch * blk.d_in, batch * blk.d_out, blk.p, blk.pivot_order(batch)
    down = a_out * a_out + q * a_out  # (a low-rank pivot's stage forms Jx^T Sigma in its r rows)
    return down + q * q + (0 if first else a_in * a_in + (p + q) * a_in)


def _kept_entries(blk: Blocks, batch: int, first: bool) -> int:
    """Numbers a stage's factor keeps for the solves once the sweep has passed it: the pivot's factor,
    ``Qxz`` and, for a low-rank pivot, its ``C`` (none of the two at the first stage)."""
    q, a_in = blk.pivot_order(batch), batch * blk.d_in
    low = 0 if first or q >= blk.p else a_in * a_in  # a low-rank pivot's C (the Hessian's): a_in x a_in
    return q * q + low + (0 if first else blk.p * a_in)


def check_dense_memory(
    n: int, dtype: torch.dtype, device: torch.device, what: str, copies: float = 1.5
) -> None:
    """Raise :class:`TooLargeError` before ``what`` allocates a dense ``n x n`` matrix (``copies`` of it
    with its transients) that would not fit in the memory still available on ``device``."""
    need = int(copies * n * n * torch.empty(0, dtype=dtype).element_size())
    if need * 64 <= _capacity_bytes(device):
        return
    total = _memory_bytes(device)
    if total is not None and need > total:
        raise TooLargeError(
            f"{what}: a dense {n} x {n} matrix needs about {need / 2**30:.3g} GiB, and {total / 2**30:.3g} "
            "GiB of the device's memory is available; use products (H @ v), solves or the factorization, "
            "which never form it"
        )


def check_memory(
    blocks: list[Blocks], names: list[str], dtype: torch.dtype, device: torch.device, diagonal: bool = False
) -> None:
    """Raise :class:`TooLargeError` before a sweep whose dense blocks would not fit in the memory still
    available on the device (:func:`_memory_bytes`; an ``a x a`` matrix per stage, ``a`` = examples x the
    stage's input width, and the transients beside them: :data:`PEAK_FACTOR`), naming the number of
    examples that fits. ``diagonal``: for :func:`curvature_diagonal`'s sweep (no pivot, no factor kept:
    ``a_out^2 + p a_out + a_in^2`` per stage)."""
    item = torch.empty(0, dtype=dtype).element_size()
    model, L = blocks[:-1], len(blocks) - 1
    first = _first_with_parameters(model)

    suffixes: dict[int, list[int]] = {}

    def kept_after(j: int, batch: int) -> int:
        """sum of _kept_entries over the stages after j (suffix sums, once per batch: O(L), not O(L^2))."""
        if batch not in suffixes:
            acc, out = 0, [0] * (L + 1)
            for k in range(L - 1, -1, -1):
                out[k + 1] = acc
                if model[k].p:
                    acc += _kept_entries(model[k], batch, k == first)
            out[0] = acc
            suffixes[batch] = out
        return suffixes[batch][j + 1]

    def parts(j: int, batch: int) -> tuple[int, int]:
        """At stage j, in bytes: its own transients, and the factors the stages after it keep."""
        if j < first:
            return 0, 0
        if diagonal:
            blk = model[j]
            a_in, a_out = (0 if j == first else batch * blk.d_in), batch * blk.d_out
            return int(PEAK_FACTOR * (a_out * a_out + blk.p * a_out + a_in * a_in) * item), 0
        kept = kept_after(j, batch)
        return int(PEAK_FACTOR * _sweep_entries(model[j], batch, j == first) * item), int(
            KEPT_FACTOR * kept * item
        )

    def need(j: int, batch: int) -> int:
        """At stage j: its transients, and the factors the stages after it keep."""
        return sum(parts(j, batch))

    # a sweep far below what the process could ever hold needs no reading of what is free (file reads)
    if max((need(i, blk.batch) for i, blk in enumerate(model)), default=0) * 64 <= _capacity_bytes(device):
        return
    total = _memory_bytes(device)
    if total is None:
        return

    for i, blk in enumerate(model):
        if need(i, blk.batch) <= total:
            continue
        lo, hi = 0, blk.batch  # the largest batch whose blocks fit at every stage
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if all(need(j, mid) <= total for j in range(L)) else (lo, mid - 1)
        d = max(blk.d_in if i > first else 0, blk.d_out)  # (after the last stage: the loss's coupling)
        q = blk.pivot_order(blk.batch)
        big = (
            f"a {q} x {q} pivot"
            if q > blk.batch * d and not diagonal
            else f"{blk.p} parameters against a = {blk.batch} examples x {d} activations = {blk.batch * d}: "
            "p x a and a x a blocks"
        )
        worst = max(range(L), key=lambda j: need(j, 1))
        what = (
            f"Take the curvature on at most {lo} examples (Newton/Preconditioner: curvature_batch_size={lo})"
            if lo
            else f"Even one example does not fit ({names[worst]} needs {need(worst, 1) / 2**30:.3g} GiB with "
            "one, its blocks and the factors kept after it)"
        )
        own, held = parts(i, blk.batch)
        after = sum(1 for k in range(i + 1, L) if model[k].p)
        where = (
            f"({big})"
            if held <= own
            else f"(its own blocks {own / 2**30:.3g} GiB: {big}; the factors the {after} stages after it "
            f"keep {held / 2**30:.3g} GiB)"
        )
        sweep = "the diagonal's sweep (no elimination, but a x a blocks)" if diagonal else "the Riccati sweep"
        instead = (
            "a Gauss-Newton matrix's diagonal (hessinv.gauss_newton(...).diagonal()) is read off its root "
            "where its rows (examples x outputs) are few, without such matrices"
            if diagonal
            else "products, the gradient and the Gauss-Newton root (hessinv.gauss_newton(...).root()) need "
            "no such matrices"
        )
        raise TooLargeError(
            f"{names[i]}: {sweep} would need about {need(i, blk.batch) / 2**30:.3g} GiB there "
            f"{where}; {total / 2**30:.3g} GiB of the device's memory is available. {what}; {instead}"
        )


@_sweep
def riccati_factor(
    blocks: list[Blocks],
    damping: float,
    names: list[str],
    like: Tensor,
    stop_if_indefinite: bool = False,
    strict: bool = True,
    perturb: bool = False,
    modify: bool = False,
    stop_if_perturbed: bool = False,
) -> tuple[list[StageFactor | None], Inertia, bool]:
    """Backward sweep over ``blocks`` (model stages, then the loss stage).

    ``like`` gives the dtype and device. Returns the per-stage factors (None for parameter-free
    stages), the inertia of ``H + eps I``, and whether it is positive definite. ``strict`` is passed
    and ``perturb`` to :class:`Pivot` (with ``perturb``, near-singular pivots are perturbed instead of
    raising :class:`SingularError`; each pivot's ``perturbed`` counts the moved eigenvalues, and the
    returned inertia is that of the perturbed matrix). With ``stop_if_indefinite`` the sweep stops at
    the first pivot that is not positive definite (the PD test), and the returned factors are
    incomplete; likewise with ``stop_if_perturbed`` at the first perturbed pivot (a float32 sweep whose
    work would be thrown away: its caller factors the float64 twin instead). With ``modify`` (needs
    ``damping > 0``) every pivot without a Cholesky factor has the eigenvalues of its ``D`` blocks
    replaced by ``max(|lambda|, damping)``: the factors are then those
    of a positive definite ``M = L |D| L^T`` that equals ``H + eps I`` wherever every pivot is positive
    definite (math.md §6), and the returned inertia is ``M``'s.
    """
    if modify and not damping > 0:
        raise InvalidArgumentError(f"modify='abs' needs a damping > 0, got {damping}")
    out: list[StageFactor | None] = [None] * len(blocks)
    dtype, device = like.dtype, like.device
    check_memory(blocks, names, dtype, device)
    Sigma = torch.zeros(1, 1, 1, 1, dtype=dtype, device=device)
    neg = zero = pos = 0
    pd = True
    cholesky_first = True
    scale = 0.0  # the largest diagonal entry of the blocks downstream (perturbed zero pivots' scale)
    # the largest max|Qxx| of the pivots so far while all were positive definite (Pivot's normwise
    # perturbation threshold): the Schur complement of a positive definite trailing block is at most the
    # diagonal block it reduces, so this is at most ||H + eps I||; after an indefinite pivot the Schur
    # complements can grow (the sweep does not pivot across stages) and no longer bound it
    hscale = 0.0
    # the first stage with parameters is where the sweep ends: parameter-free stages before it (a
    # Flatten) carry no unknowns, and its input is data -- no Qxz, Qzz of the input side
    first = _first_with_parameters(blocks)
    for l in range(len(blocks) - 1, first - 1, -1):
        blk = blocks[l]
        if perturb:
            scale = max(scale, _diagmax(Sigma.reshape(Sigma.shape[0] * Sigma.shape[1], -1)))
        rb = blk.riccati_native(Sigma, coupled=l > first)
        if blk.p == 0:
            Sigma = rb.Qzz
            continue
        if perturb and l > first:
            # a zero pivot coupled to the input side is no evidence of a singular H + eps I ([[0, b], [b,
            # c]] is not): the coupling's scale is its perturbation's too (an L1 loss's last layer, whose
            # block of H is zero at damping 0, was refused as "not reaching the loss")
            scale = max(scale, _maxabs(rb.Qxz))
        if rb.lowrank is not None:
            Qz, A, C, c_exp = rb.lowrank
            piv: Pivot | LowRankPivot = LowRankPivot(
                Qz, A, C, blk.p, l, names[l], damping, strict, perturb, cholesky_first, modify, scale, hscale,
                c_exp,
            )  # fmt: skip
        else:
            Q = _shifted(rb.Qxx0, damping, overwrite=True)
            try:
                piv = Pivot(Q, l, names[l], damping, strict, perturb, cholesky_first, modify, scale, hscale)
            except NonFiniteError:
                # a finite pivot without a Cholesky factor whose LDL^T over- or underflowed (a curvature of
                # 1e-290): for the yes/no test it is not positive definite, which is all that was asked
                if stop_if_indefinite and bool(torch.isfinite(Q).all()):
                    return out, Inertia(neg, zero, pos), False
                raise
        neg, zero, pos = neg + piv.inertia.negative, zero + piv.inertia.zero, pos + piv.inertia.positive
        pd = pd and piv.positive_definite
        if pd:  # 0 < Qxx_l <= the diagonal block of H + eps I it reduces: max|Qxx_l| <= ||H + eps I||
            hscale = max(hscale, piv.qmax)
        # after an indefinite pivot the next one is most likely indefinite too: skip the Cholesky try
        cholesky_first = stop_if_indefinite or piv.inertia.negative == 0
        if not pd and stop_if_indefinite:
            return out, Inertia(neg, zero, pos), False
        Qxz = rb.Qxz.reshape(blk.p, -1)
        out[l] = StageFactor(piv, Qxz, rb.order, rb.inverse)
        if stop_if_perturbed and piv.perturbed:
            return out, Inertia(neg, zero, pos), False
        if l > first:
            a = Qxz.shape[1]
            # rb.Qzz is the stage's own fresh tensor unless the stage passed Sigma through
            Sigma = piv.schur(rb.Qzz.reshape(a, a), Qxz, overwrite=rb.Qzz is not Sigma).view(rb.Qzz.shape)
    return out, Inertia(neg, zero, pos), pd


#: :func:`curvature_diagonal` starts from the loss's ``Lambda_n`` in factored form (its eigenvectors, ``R =
#: C`` columns: Gauss-Newton keeps ``R`` there) up to this many outputs per example, and from the blocks
#: above it
EXAMPLE_FACTOR_MAX_OUTPUTS = 64
#: ... and holds at most this many (B, d, d) tensors at once (P, M, M W and the next P), on examples taken
#: a chunk at a time so that they hold at most EXAMPLE_PASS_ENTRIES numbers (any batch: the diagonal is a
#: sum over examples)
EXAMPLE_COPIES = 4
EXAMPLE_PASS_ENTRIES = 2**26


def examples_apart(blocks: list[Blocks]) -> bool:
    """Whether :func:`example_curvature_diagonal_sweep` can carry ``P_l`` as per-example blocks: a loss of
    per-example terms (its ``Lambda`` (B, C, C)) below stages that all give
    :meth:`~hessinv.stages.Blocks.example_curvature_diagonal` (Linear + activation, elementwise, and
    generic stages -- convolutions, pooling, normalizations -- that keep examples apart) on one batch."""
    loss, first = blocks[-1], _first_with_parameters(blocks)
    if len(blocks) < 2 or not isinstance(getattr(type(loss), "Lam", None), property):
        return False
    return all(
        b.batch == loss.batch and b.keeps_examples_apart(first=i == first)
        for i, b in enumerate(blocks[first:-1], start=first)
    )


def _example_rows(blocks: list[Blocks]) -> int:
    """How many examples :func:`example_curvature_diagonal_sweep` takes at once: all of them, or as many
    as keep :data:`EXAMPLE_COPIES` per-example curvatures within :data:`EXAMPLE_PASS_ENTRIES` numbers and
    a quarter of the memory still available (at least one). A curvature is ``d x d`` (the stage's
    width) from the loss (more than :data:`EXAMPLE_FACTOR_MAX_OUTPUTS` outputs) or the first stage that
    adds its own (:attr:`~hessinv.stages.Blocks.adds_example_curvature`: a tanh's ``b s''``) down, and
    ``d x C`` factored above it (a ReLU CNN's Gauss-Newton and Hessian: every example of a batch at
    once, not one at a time for its ``8 x 28 x 28`` activations)."""
    loss, first = blocks[-1], _first_with_parameters(blocks)
    C = loss.d_in
    dense = C > EXAMPLE_FACTOR_MAX_OUTPUTS
    per = EXAMPLE_COPIES * C * C
    for b in reversed(blocks[first:-1]):
        dense = dense or b.adds_example_curvature
        d = max(b.d_in, b.d_out)
        per = max(per, EXAMPLE_COPIES * d * (d if dense else C))
        if getattr(b, "pulls_per_example", False):  # (a generic stage: each example's columns pulled back
            # to its p parameters, (columns, p) numbers -- an Embedding(20000, 64)'s 1.3M: 4.8 GB at once
            # for a batch of 32, and a 100000-row table's killed the process: a size probe)
            per = max(per, EXAMPLE_COPIES * (d if dense else C) * b.p)
    rows = max(1, EXAMPLE_PASS_ENTRIES // per)
    if rows < loss.batch:
        total = _memory_bytes(loss.G.device)
        if total is not None:
            rows = max(1, min(rows, total // (4 * per * loss.G.element_size())))
    return min(rows, max(loss.batch, 1))


def example_sweep_pulls(blocks: list[Blocks]) -> int:
    """What :func:`example_curvature_diagonal_sweep` costs its generic stages, in backward passes of the
    batch (:meth:`~hessinv.stages.generic.LazyBlocks.example_sweep_passes`): the pull-backs of every
    example's columns where ``P`` is dense there (below a stage that adds its own curvature -- a
    normalization's ``Hzz_n`` -- or a loss of many outputs), and the products that form ``diag(Hxx)`` and
    ``Hzz_n``: what to weigh against the dense route's ``n`` products (a CNN with a GroupNorm on 32 x 32
    images: 40k of them, 122 s, against 1.5k products, 16 s)."""
    loss, first = blocks[-1], _first_with_parameters(blocks)
    dense = loss.d_in > EXAMPLE_FACTOR_MAX_OUTPUTS
    pulls = 0
    for l in range(len(blocks) - 2, first - 1, -1):
        b = blocks[l]
        passes = getattr(b, "example_sweep_passes", None)
        if passes is not None:
            pulls += passes(dense, l == first)
        dense = dense or b.adds_example_curvature
    return pulls


@_sweep
def example_curvature_diagonal_sweep(blocks: list[Blocks], like: Tensor) -> list[Tensor] | None:
    """:func:`curvature_diagonal` where :func:`examples_apart`: ``P_l`` is block-diagonal over the examples
    all the way down and goes per example (:meth:`~hessinv.stages.Blocks.example_curvature_diagonal`:
    factored while narrower, ``O(B d^2 R)`` or ``O(B d^3)`` per stage; a generic stage pulls each
    example's columns back through autograd), :func:`_example_rows` examples at a time -- no ``a x a``
    blocks. None where a stage turns out to mix examples after all (its pull-backs checked): the caller's
    sweep then. Where a generic stage's one-example graphs fail their check (at the sweep's end), the
    sweep again, through the batch's graphs."""
    for _ in range(2):
        ok = [getattr(b, "_per_example_ok", True) for b in blocks]
        out = _example_sweep(blocks, like)
        if out is not None or ok == [getattr(b, "_per_example_ok", True) for b in blocks]:
            return out
    return None


def _example_sweep(blocks: list[Blocks], like: Tensor) -> list[Tensor] | None:
    out = [like.new_zeros(b.p) for b in blocks]
    first = _first_with_parameters(blocks)
    loss = blocks[-1]
    step = _example_rows(blocks)
    # stage l's P_{l-1} is needed only on its diagonal where every stage from the last one with parameters
    # (in the sweep's order) to l - 1 reads only the diagonal of its P and, but that one, has no parameters
    only = [
        all((j == first or blocks[j].p == 0) and blocks[j].reads_diagonal for j in range(first, l))
        for l in range(len(blocks))
    ]
    for r0 in range(0, loss.batch, step):
        rows = slice(r0, min(loss.batch, r0 + step))
        k = rows.stop - r0
        exact = None
        if loss.d_in <= EXAMPLE_FACTOR_MAX_OUTPUTS:  # Lambda_n = F diag(S) F^T: R = C columns
            exact = getattr(loss, "example_factor", lambda rows: None)(rows)  # (the closed form's, exact)
        if exact is not None:
            P: ExampleCurvature = (exact[0].to(like.dtype), exact[1].to(like.dtype))
        else:  # (Lambda formed only where its closed form gives no factor)
            Lam = loss.Lam
            P = Lam[rows] if Lam is not None else like.new_zeros(k, loss.d_in, loss.d_in)
            if loss.d_in <= EXAMPLE_FACTOR_MAX_OUTPUTS:
                mu, V = torch.linalg.eigh(0.5 * (P + P.mT))
                P = (V, mu)
        for l in range(len(blocks) - 2, first - 1, -1):
            got = blocks[l].example_curvature_diagonal(P, l > first, only[l], rows)
            if got is None:  # (a generic stage whose pull-backs reach other examples)
                return None
            diag, Pin = got
            if blocks[l].p:
                out[l] += diag
            if l > first:
                assert Pin is not None
                P = Pin
    return out


@_sweep
def curvature_diagonal(blocks: list[Blocks], like: Tensor) -> list[Tensor]:
    """The diagonal of the curvature, per stage (model order; ``(0,)`` for parameter-free stages): the
    backward sweep of math.md §2 without the elimination. ``P_L = 0``, and for ``l = L .. 1`` the
    stage's ``Qxx0(P_l) = Hxx_l + Jx_l^T P_l Jx_l`` is ``H``'s diagonal block ``d^2 loss / dx_l^2``
    and ``P_{l-1} = Qzz(P_l) = Hzz_l + Jz_l^T P_l Jz_l`` the loss's Hessian in ``z_{l-1}``
    (:meth:`~hessinv.stages.Blocks.curvature_diagonal`). Costs a factorization's products,
    ``O(sum_l p_l a_l^2 + a_l^2 d_l)``, with no pivot to factor (where :func:`examples_apart`,
    :func:`example_curvature_diagonal_sweep` is the cheaper one). ``like`` gives dtype and device."""
    out = [like.new_zeros(b.p) for b in blocks]
    first = _first_with_parameters(blocks)
    P = torch.zeros(1, 1, 1, 1, dtype=like.dtype, device=like.device)
    for l in range(len(blocks) - 1, first - 1, -1):
        diag, Qzz = blocks[l].curvature_diagonal(P, coupled=l > first)
        if blocks[l].p:
            out[l] = diag
        if l > first:
            assert Qzz is not None
            P = Qzz
    return out


def _forward_map(blk: Blocks, t: Tensor | None, v: Tensor | None, k: int) -> Tensor:
    """``Jz t + Jx v`` as an (a_out, k) matrix, for ``t`` (a_in, k) or None and ``v`` (p, k, model order) or
    None (the stage's fused forward product, :meth:`~hessinv.stages.Blocks.hvp_forward`)."""
    out = blk.hvp_forward(None if t is None else t.view(blk.batch, blk.d_in, k), v)
    assert out is not None
    return out.reshape(-1, k)


def _check_inverse_diagonal_memory(
    blocks: list[Blocks], factors: list[StageFactor | None], first: int, last: int, like: Tensor
) -> None:
    """:class:`TooLargeError` before a forward sweep of :func:`riccati_inverse_diagonal` whose transients
    would not fit in the memory still available (the factors it reads are held already): at a stage,
    ``K`` and ``K Y`` (``p x a_in`` each), ``Y`` and ``(Jz - Jx K) Y`` (``a_in^2``, ``a_out a_in``), the
    next ``Y`` (``a_out^2``), and ``Qxx^{-1} Jx^T`` (``p x a_out``) or ``C`` (``p x p``)."""
    item = like.element_size()

    def need(l: int) -> int:
        b = blocks[l]
        a_in, a_out = (0 if l == first else b.batch * b.d_in), b.batch * b.d_out
        # (the first stage of a lookup table, as the sweep takes it: J on the rows its tokens read, r x a_out,
        # not p x a_out -- an Embedding(50000, 16) on 16 examples was refused for 30.6 GiB)
        f = factors[l]
        q = f.pivot.inner.p if l == first and f is not None and _reads_rows(f) else b.p
        wide = q * a_out if b.p > a_out else b.p * b.p
        return PEAK_FACTOR * item * (2 * b.p * a_in + a_in * a_in + 2 * a_out * a_in + a_out * a_out + wide)

    worst = max(range(first, last + 1), key=need, default=first)
    if need(worst) * 64 <= _capacity_bytes(like.device):
        return
    total = _memory_bytes(like.device)
    if total is not None and need(worst) > total:
        b = blocks[worst]
        raise TooLargeError(
            f"inverse_diagonal: the forward sweep would need about {need(worst) / 2**30:.3g} GiB at stage "
            f"{worst} ({b.p} parameters, a = {b.batch} examples x {b.d_in} inputs); {total / 2**30:.3g} GiB "
            "is available. Take the curvature on fewer examples"
        )


def _reads_rows(f: StageFactor) -> bool:
    """Whether the stage's pivot holds a lookup table's rows read (:class:`LowRankPivot` on unit columns)."""
    return isinstance(f.pivot, LowRankPivot) and f.pivot.rows


@_sweep
def riccati_inverse_diagonal(blocks: list[Blocks], factors: list[StageFactor | None]) -> list[Tensor]:
    """``diag((H + eps I)^{-1})`` per stage (model order), from the factors of the backward sweep by one
    forward sweep (selected inversion; for positive definite ``H + eps I`` the marginal variances of
    ``N(0, (H + eps I)^{-1})``, a Kalman smoother's forward pass).

    The solve's forward half ``x_l = k_l - K_l y_{l-1}``, ``y_l = Jx_l x_l + Jz_l y_{l-1}``
    (``K_l = Qxx_l^{-1} Qxz_l``) maps ``k`` with ``Cov(k_l) = Qxx_l^{-1}``, independent across stages,
    to ``x`` with ``Cov(x) = (H + eps I)^{-1}`` (the congruence ``H + eps I = U D U^T`` read backwards;
    algebraic, so it holds for an indefinite ``H + eps I`` too). With ``Y_l = Cov(y_l)`` (``Y_0 = 0``),
    ``C_l = Cov(x_l) = Qxx_l^{-1} + K_l Y_{l-1} K_l^T`` and ``Cov(x_l, y_{l-1}) = -K_l Y_{l-1}``:

        diag Cov(x_l) = diag(Qxx_l^{-1}) + diag(K_l Y_{l-1} K_l^T)
        Y_l = Jz (Y Jz^T - (K Y)^T Jx^T) + Jx (C Jx^T - K Y Jz^T)

    -- two fused forward products (``Jz t + Jx v``) of ``a`` columns. A stage wider than its output
    (``p > B d``) keeps no ``p x p`` ``C``: ``Y_l = Jx Qxx^{-1} Jx^T + (Jz - Jx K) Y (Jz - Jx K)^T``.
    ``O(p^3 + p^2 a + p a^2 + a^2 d)`` per stage, as the factorization."""
    first = _first_with_parameters(blocks)
    last = max((l for l, f in enumerate(factors) if f is not None), default=-1)
    like = next(f.Qxz for f in factors if f is not None)
    _check_inverse_diagonal_memory(blocks, factors, first, last, like)
    out = [like.new_zeros(b.p) for b in blocks]
    Y: Tensor | None = None  # Cov(y_{l-1}), (a_in, a_in); None: zero (the data at the first stage)
    for l in range(first, last + 1):
        blk, f = blocks[l], factors[l]
        a_out = blk.batch * blk.d_out
        if f is None:
            if Y is not None:  # Jz Y Jz^T
                T = _forward_map(blk, Y, None, Y.shape[0])
                Y = _forward_map(blk, T.T.contiguous(), None, a_out)
            continue

        def model(R: Tensor, f: StageFactor = f) -> Tensor:  # Riccati row order -> model order
            return R if f.inverse is None else R[f.inverse]

        K = KY = None
        if Y is not None:
            K = f.pivot.solve(f.Qxz)  # (p, a_in), Riccati order
            KY = _thin(K, Y) if K.shape[0] < Y.shape[0] else K @ Y
        if l == last or blk.p > a_out:  # the diagonal alone; no p x p block (a wide stage's p^2)
            diag = f.pivot.inverse_diagonal()
            if K is not None:
                assert KY is not None
                diag = diag + (KY * K).sum(1)
            out[l] = model(diag)
            if l == last:
                break
            if _reads_rows(f) and Y is None:
                # (a lookup table's rows read: Jx is zero outside them, J = (Jx^T)[rows] -- no p x a_out
                # block, 2 GB and 62 s for an Embedding(20000, 16) on 48 tokens)
                J = blk.read_jacobian()  # type: ignore[attr-defined]
                Y = J.T @ f.pivot.inner.solve(J)
                continue
            eye = torch.eye(a_out, dtype=like.dtype, device=like.device).view(blk.batch, blk.d_out, a_out)
            JxT = blk.jxT(eye)  # (p, a_out), model order
            X = f.pivot.solve(JxT if f.order is None else JxT[f.order])
            Ynew = _forward_map(blk, None, model(X), a_out)  # Jx Qxx^{-1} Jx^T
            if Y is not None:
                assert K is not None and KY is not None
                T = _forward_map(blk, Y, -model(KY), Y.shape[0])  # (Jz - Jx K) Y
                Tt = T.T.contiguous()
                Ynew += _forward_map(blk, Tt, -model(K @ Tt), a_out)
        else:  # through x_l's covariance C (p x p, p <= a_out): one p a^2 product
            C = f.pivot.solve(torch.eye(blk.p, dtype=like.dtype, device=like.device))
            if K is not None:
                assert KY is not None
                C = C + KY @ K.T
            out[l] = model(C.diagonal().clone())
            Cm = C if f.inverse is None else C[f.inverse][:, f.inverse]
            if KY is None:  # Jx C Jx^T
                Ynew = _forward_map(blk, None, _forward_map(blk, None, Cm, blk.p).T.contiguous(), a_out)
            else:
                KYm = model(KY)
                R1t = _forward_map(blk, -KYm.T.contiguous(), Cm, blk.p)  # (C Jx^T - K Y Jz^T)^T
                assert Y is not None
                T = _forward_map(blk, Y, -KYm, Y.shape[0])  # Jz Y - Jx K Y
                Ynew = _forward_map(blk, T.T.contiguous(), R1t.T.contiguous(), a_out)
        # (Y is symmetric up to rounding, left so: a symmetrizing pass over a x a numbers cost a fifth of
        # the sweep, and each stage's products read Y through the same side)
        Y = Ynew
    return out


def _thin(A: Tensor, X: Tensor) -> Tensor:
    """``A @ X`` (contiguous) for a thin ``X`` (k columns), as ``(X^T A^T)^T``: BLAS's kernels for a
    wide left operand and a few right-hand sides are slow (with ``A`` a transposed view and ``X``
    column-major, as a triangular solve leaves it, 17x slower at (768 x 156) @ (156 x 10); 1.4-4x in
    the other layouts), the transposed product is one well-shaped GEMM."""
    if X.shape[-1] == 1:
        return A @ X
    return (X.mT @ A.mT).mT.contiguous()


def _mm(A: Tensor, X: Tensor) -> Tensor:
    """``A @ X`` for a thin ``X`` (:func:`_thin`); on CPU a tiny ``X`` is first scaled by a power of two
    (exact), so that its products with the small entries of ``A`` far from the loss do not go
    subnormal."""
    if not X.is_cpu or not X.numel():
        return _thin(A, X)
    m = _maxabs(X)
    fi = torch.finfo(X.dtype)
    if not 0.0 < m < math.ldexp(1.0, math.frexp(fi.tiny)[1] // 4):  # 2^-256 (float64), 2^-32 (float32)
        return _thin(A, X)
    e = math.frexp(m)[1]
    return _thin(A, X * math.ldexp(1.0, -e)) * math.ldexp(1.0, e)


def _backward(
    blocks: list[Blocks], factors: list[StageFactor | None], rhs: list[Tensor], quadratic: bool = False
) -> tuple[list[Tensor | None], Tensor | None]:
    """The backward sweep: ``k_l = Qxx_l^{-1} ghat_l`` with ``ghat_l = g_l + Jx^T r_l`` (Riccati order),
    and (with ``quadratic``) ``sum_l ghat_l . k_l`` per column, which is ``g^T (H + eps I)^{-1} g``
    (the sweep is block Gaussian elimination ``H + eps I = U D U^T``, and ``ghat = U^{-1} g``)."""
    k = rhs[0].shape[1]
    ks: list[Tensor | None] = [None] * len(blocks)
    quad = rhs[0].new_zeros(k) if quadratic else None
    r = rhs[0].new_zeros(1, 1, k)
    first = _first_with_parameters(blocks)
    for l in range(len(blocks) - 1, first - 1, -1):
        blk, f = blocks[l], factors[l]
        if f is not None:
            g = rhs[l] + blk.jxT(r)
            g = g if f.order is None else g[f.order]
            kl = ks[l] = f.pivot.solve(g)
            if quad is not None:
                quad += (g * kl).sum(0)
            if l > first:
                r = blk.jzT(r) - _mm(f.Qxz.T, kl).view(blk.batch, blk.d_in, k)
        elif l > first:
            r = blk.jzT(r)
    return ks, quad


@_sweep
def riccati_quadratic(blocks: list[Blocks], factors: list[StageFactor | None], rhs: list[Tensor]) -> Tensor:
    """``g^T (H + eps I)^{-1} g`` per column of ``g`` (``rhs[l]``: (p_l, k)) from the backward sweep alone
    (half a solve); exact for any invertible factorization, positive definite or not."""
    quad = _backward(blocks, factors, rhs, quadratic=True)[1]
    assert quad is not None
    return quad


@_sweep
def riccati_solve(blocks: list[Blocks], factors: list[StageFactor | None], rhs: list[Tensor]) -> list[Tensor]:
    """Solve ``(H + eps I) x = g`` with the factored sweep; ``rhs[l]`` is (p_l, k); returns the same
    shapes."""
    return riccati_forward(blocks, factors, _backward(blocks, factors, rhs)[0])


@_sweep
def riccati_forward(
    blocks: list[Blocks], factors: list[StageFactor | None], ks: list[Tensor | None]
) -> list[Tensor]:
    """The forward sweep ``x = U^{-T} k`` of the block factorization ``H + eps I = U D U^T``: ``ks[l]``
    (p_l, k) in the stage's Riccati row order, None for parameter-free stages; returns model order.
    With ``k = D^{-1} U^{-1} g`` (the backward sweep) this is the solve; with ``k_l = S_l z_l``
    (``S_l S_l^T = Qxx_l^{-1}``, white ``z``) a sample of ``N(0, (H + eps I)^{-1})``."""
    n_blocks = len(blocks)
    like = next(t for t in ks if t is not None)
    k = like.shape[1]
    last = max(l for l in range(n_blocks) if blocks[l].p > 0)
    xs: list[Tensor] = [like.new_zeros(0, k)] * n_blocks
    y: Tensor | None = None  # y_0 = 0
    for l in range(last + 1):
        blk, f = blocks[l], factors[l]
        if f is not None:
            kl = ks[l]
            assert kl is not None
            x = kl if y is None else kl - f.pivot.solve(_mm(f.Qxz, y.reshape(-1, k)))
            xs[l] = x if f.inverse is None else x[f.inverse]
            if l < last:
                y = blk.jx(xs[l]) if y is None else blk.jx(xs[l]) + blk.jz(y)
        elif y is not None:
            y = blk.jz(y)
    return xs
