r"""The exact spectrum of a curvature operator by counting: ``N(s) = #{lambda_i < s}``.

By Sylvester's law of inertia the backward Riccati sweep of ``H - s I`` (a block congruence
``U D U^T``) has as many negative pivot eigenvalues as ``H`` has eigenvalues below ``s``. One
factorization per shift, ``O(L)`` in depth (or, where one dense ``eigvalsh`` of ``H`` costs less than
the shifts' factorizations, its eigenvalues, counted: :data:`hessinv.curvature.DENSE_COUNTS`), no
iteration and no randomness: counts and histograms are
exact for every eigenvalue farther than the sweep's backward error from the shifts -- about
``u ||H||`` in general, up to about ``sqrt(u) ||H||`` for a shift next to a cluster of eigenvalues
(the sweep does not pivot across stages; :meth:`hessinv.CurvatureOperator.inertia`) -- where the
stochastic Lanczos quadrature of PyHessian / curvlinops estimates a smoothed density.

==============================  ==================================================================
function                        returns
==============================  ==================================================================
:func:`eigenvalue_counts`       ``N(s)`` at each shift
:func:`spectral_histogram`      eigenvalue counts per bin ``[e_i, e_{i+1})`` (``N(e_{i+1}) - N(e_i)``)
:func:`num_negative_eigenvalues`  ``#{lambda < -tol}`` (``tol`` absorbs eigenvalues zero up to rounding)
:func:`logdet`                  ``(sign, log|det(H + eps I)|)`` from the pivots
==============================  ==================================================================

>>> import torch, hessinv
>>> from hessinv import spectrum
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
>>> H = hessinv.hessian(net, torch.nn.CrossEntropyLoss(), torch.randn(6, 3, dtype=torch.float64),
...                     torch.tensor([0, 1, 1, 0, 1, 0]))
>>> lam = torch.linalg.eigvalsh(H.to_dense())
>>> shifts = [-0.1, 0.05, 1.0]
>>> spectrum.eigenvalue_counts(H, shifts).tolist() == [int((lam < s).sum()) for s in shifts]
True
>>> h = spectrum.spectral_histogram(H, bins=4)
>>> int(h.counts.sum()) == H.shape[0]
True
>>> spectrum.num_negative_eigenvalues(H, tol=1e-6) == int((lam < -1e-6).sum())
True
>>> lo, hi = spectrum.spectral_range(H)  # bounds on the spectrum
>>> lo <= float(lam[0]) and float(lam[-1]) <= hi
True
>>> sign, logabs = spectrum.logdet(H, damping=1.0)  # like torch.linalg.slogdet(H + I)
>>> s, l = torch.linalg.slogdet(H.to_dense() + torch.eye(H.shape[0], dtype=torch.float64))
>>> sign == float(s), abs(logabs - float(l)) < 1e-9
(True, True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hessinv.chain import check_real
from hessinv.curvature import CurvatureOperator, GaussNewton, _integer
from hessinv.errors import AccuracyWarning, InvalidArgumentError, NonFiniteArgumentError, warn

__all__ = [
    "eigenvalue_counts", "spectral_histogram", "spectral_range", "Histogram", "num_negative_eigenvalues",
    "logdet",
]  # fmt: skip


def _check_operator(op: object) -> CurvatureOperator:
    """``op``, a curvature operator (else :class:`~hessinv.InvalidArgumentError`), in the stages' order
    (the counts here do not depend on the order of its vectors)."""
    if not isinstance(op, CurvatureOperator):
        raise InvalidArgumentError(
            f"expected a curvature operator (hessinv.hessian(...) or hessinv.gauss_newton(...)), got "
            f"{type(op).__module__}.{type(op).__name__}"
        )
    return op._stage_order()


def _real_array(x: object, what: str) -> np.ndarray:
    """``x`` (a number, a sequence, an array or a tensor of real numbers) as a float64 array, else
    :class:`InvalidArgumentError` naming ``what`` (None, strings, bools, complex numbers); NaN and
    infinities are left to the caller."""
    if isinstance(x, torch.Tensor) and x.device.type == "meta":
        raise InvalidArgumentError(f"{what} must be real numbers, got a meta tensor (it has no values)")
    try:
        a = np.asarray(x.tolist() if isinstance(x, torch.Tensor) else x)
    except (TypeError, ValueError):  # (ragged sequences)
        a = None
    if a is None or a.dtype.kind not in "iuf":
        raise InvalidArgumentError(f"{what} must be real numbers, got {x!r}")
    return a.astype(np.float64)


def eigenvalue_counts(
    op: CurvatureOperator, shifts: Sequence[float] | np.ndarray | torch.Tensor
) -> np.ndarray:
    """``N(s) = #{i : lambda_i(H) < s}`` for each shift (one Riccati factorization each, or ``H``'s dense
    eigenvalues where one ``eigvalsh`` is cheaper: :data:`hessinv.curvature.DENSE_COUNTS`), as int64.

    Exact for eigenvalues farther than the sweep's backward error from ``s`` (``~ u ||H||``; up to
    ``~ sqrt(u) ||H||`` when ``s`` is next to a cluster of eigenvalues, e.g. ``s`` near 0 for an
    over-parameterized net); an eigenvalue equal to a shift up to rounding counts as ``>= s`` where
    the sweep meets it as an exactly singular pivot, but a cluster within the backward error (the
    null space of a Gauss-Newton matrix at ``s = 0``) may be split either way: count negative
    eigenvalues with :func:`num_negative_eigenvalues`, whose tolerance counts those as zero.
    """
    op = _check_operator(op)
    s = _real_array(shifts, "shifts")
    if not np.isfinite(s).all():
        raise NonFiniteArgumentError("shifts must be finite")
    op._count_doubt = False
    op._dense_counts(s.size)
    out = np.array([op._count_below(float(v)) for v in s.reshape(-1)], dtype=np.int64)
    op._warn_count_doubt("eigenvalue_counts")
    return out.reshape(s.shape)


@dataclass
class Histogram:
    """Exact eigenvalue counts per bin: ``counts[i] = #{lambda : edges[i] <= lambda < edges[i+1]}``;
    ``below`` / ``above``: eigenvalues below ``edges[0]`` / at or above ``edges[-1]``. One exception
    (:func:`spectral_histogram`): at an edge of 0 the eigenvalues zero up to ``tol = sqrt(u) ||H||`` --
    those in ``[-tol, 0)`` too -- count as ``>= 0``."""

    counts: np.ndarray
    edges: np.ndarray
    below: int
    above: int

    @property
    def n(self) -> int:
        """The number of eigenvalues (the operator's size)."""
        return int(self.counts.sum()) + self.below + self.above


def spectral_range(op: CurvatureOperator) -> tuple[float, float]:
    """``(lo, hi)`` with every eigenvalue in ``[lo, hi)``, each within a factor ~2 of ``||H||`` -- or 0
    where no eigenvalue lies beyond it (a Gauss-Newton matrix: ``lo = 0``, so that a histogram spends no
    bins on an empty negative half): grown from the power-iteration estimate of ``||H||`` until ``N(lo)
    = 0`` and ``N(hi) = n``, after one count at 0 -- for a Gauss-Newton matrix (positive semi-definite)
    at ``-sqrt(u) ||G||`` (:meth:`~CurvatureOperator.zero_tolerance`): in float32 its null space counts
    partly below 0 by rounding; its ``lo`` is 0 all the same, and those are the histogram's ``below``."""
    op = _check_operator(op)
    r = 1.05 * max(op.norm_estimate(), torch.finfo(op.dtype).tiny)
    psd = isinstance(op, GaussNewton)
    n, at0 = op.shape[0], op._count_below(-op.zero_tolerance() if psd else 0.0)
    lo, hi = (0.0 if at0 == 0 else -r), r
    while lo < 0 and op._count_below(lo) > 0:
        lo *= 2
    while op._count_below(hi) < n:
        hi *= 2
    if at0 == n:  # every eigenvalue negative (zero ones count as >= 0)
        hi = 0.0
    return lo, hi


#: the most bins :func:`spectral_histogram` takes (one factorization per edge)
MAX_BINS = 10_000


def spectral_histogram(
    op: CurvatureOperator,
    bins: int | Sequence[float] | np.ndarray = 50,
    range: tuple[float, float] | None = None,  # noqa: A002  (numpy.histogram's name)
) -> Histogram:
    """The exact eigenvalue histogram of ``H``: ``bins + 1`` factorizations, or one dense ``eigvalsh`` where
    that is cheaper (:func:`eigenvalue_counts`) (``numpy.histogram``'s
    arguments: a number of equal bins over ``range`` -- default the whole spectrum, see
    :func:`spectral_range` -- or increasing bin edges). Bins are half-open ``[e_i, e_{i+1})``; at an
    edge ``e = 0`` the eigenvalues zero up to ``tol = sqrt(u) ||H||``
    (:meth:`~CurvatureOperator.zero_tolerance`) count as ``>= 0`` (the null space of an over-parameterized
    net falls whole into the bin that starts at 0; a count at exactly 0 could split it by rounding). Exact
    counts otherwise, to the resolution :func:`eigenvalue_counts` states.
    """
    op = _check_operator(op)
    if np.ndim(bins) == 0:  # a count: an int of any kind (Python, numpy, a 0-d integer tensor)
        count = _integer(bins)
        if count is None:
            raise InvalidArgumentError(
                f"bins must be an int (the number of bins) or a 1-d increasing sequence of edges, "
                f"got {bins!r}"
            )
        if not 1 <= count <= MAX_BINS:
            raise InvalidArgumentError(
                f"bins must be in [1, {MAX_BINS}] (each bin edge costs one factorization), got {count}"
            )
        if range is None:
            # the range's counts and the edges': from H's eigenvalues where that is cheaper
            op._dense_counts(count + 6)
            lo, hi = spectral_range(op)
        else:
            unordered = isinstance(range, (set, frozenset, dict, str, bytes))  # (no first and second)
            if unordered or not hasattr(range, "__getitem__") or len(range) != 2:
                raise InvalidArgumentError(f"range must be a pair (lo, hi) of numbers, got {range!r}")
            lo, hi = check_real(range[0], "range[0]"), check_real(range[1], "range[1]")
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise NonFiniteArgumentError(f"range must be finite, got {(lo, hi)}")
        if not lo < hi:
            raise InvalidArgumentError(f"range must be increasing, got {(lo, hi)}")
        with np.errstate(over="ignore", invalid="ignore"):
            edges = np.linspace(lo, hi, count + 1)
        if not np.isfinite(edges).all():
            raise NonFiniteArgumentError(f"range {(lo, hi)}: its bin edges overflow float64")
        if not (np.diff(edges) > 0).all():
            raise InvalidArgumentError(
                f"range {(lo, hi)} is too narrow for {count} bins in float64 (their edges coincide)"
            )
    else:
        edges = _real_array(bins, "bins (an int or bin edges)")
        if not np.isfinite(edges).all():
            raise NonFiniteArgumentError(f"bin edges must be finite, got {bins!r}")
        if edges.ndim != 1 or len(edges) < 2 or not (np.diff(edges) > 0).all():
            raise InvalidArgumentError("bin edges must be a 1-d increasing sequence of at least two numbers")
        if len(edges) > MAX_BINS + 1:
            raise InvalidArgumentError(f"at most {MAX_BINS + 1} bin edges (each costs one factorization)")
    # an edge at 0: the count there could split the null space of an over-parameterized net by rounding
    # (5 of a float32 Hessian's zero eigenvalues below it); it is taken at -tol, so that the eigenvalues
    # zero up to the counts' resolution all fall into the bin that starts at 0 (where the edge below is
    # farther than 2 tol: no other bin moves). Only at 0 itself: a small positive edge is a threshold the
    # caller chose (an effective rank), counted where it is
    at = edges.astype(np.float64).copy()
    # (0 up to the rounding of linspace against its neighbours: np.linspace(-0.3, 0.7, 11) puts that edge
    # at 5.6e-17, 1e-15 of the bin width; a log-spaced threshold 1e-10 below 1e-9 is not 0)
    near = np.maximum(np.abs(np.r_[at[1:], 0.0]), np.abs(np.r_[0.0, at[:-1]]))
    zero = np.flatnonzero(np.abs(at) <= 8 * np.finfo(np.float64).eps * near)
    if zero.size:
        tol, i = op.zero_tolerance(), int(zero[0])
        if i == 0 or edges[i - 1] < -2 * tol:
            at[i] = -tol
    N = eigenvalue_counts(op, at)
    if (np.diff(N) < 0).any():
        # edges closer than the counts' resolution (a float32 operator's null space counted at edges
        # within n u ||H|| of each other): no bin holds a negative count; those bins are merged into the
        # one above (the running maximum of the counts), and said
        bad = int((np.diff(N) < 0).sum())
        N = np.maximum.accumulate(N)
        warn(
            AccuracyWarning(
                f"spectral_histogram: the eigenvalue counts decrease across {bad} bin edge(s), which lie "
                f"closer together than the counts' resolution (about {op.zero_tolerance():.2g} here): "
                "those bins get the eigenvalues their edges cannot tell apart at the higher edge (counts "
                "made non-decreasing); use wider bins, or a float64 operator"
            )
        )
    return Histogram(np.diff(N), edges, int(N[0]), int(op.shape[0] - N[-1]))


def num_negative_eigenvalues(op: CurvatureOperator, tol: float | None = None) -> int:
    """``#{lambda < -tol}``; ``tol`` defaults to ``sqrt(u) ||H||`` (eigenvalues zero up to rounding are
    not counted; ``tol=0`` counts ``N(0)``). See :meth:`CurvatureOperator.inertia`."""
    op = _check_operator(op)
    if isinstance(tol, bool):  # (False == 0: it counted N(0))
        raise InvalidArgumentError(f"tol must be a number or None, got {tol!r}")
    if tol is not None:  # (before the test for 0: an array's comparison is not a truth value)
        tol = check_real(tol, "tol")
    if tol == 0:
        return int(eigenvalue_counts(op, [0.0])[0])
    return op.inertia(0.0, tol).negative


def logdet(op: CurvatureOperator, damping: float = 0.0) -> tuple[float, float]:
    """``(sign, log|det(H + damping I)|)`` from one factorization (``sum_l log|det Qxx_l|``); like
    :func:`torch.linalg.slogdet`. Raises :class:`~hessinv.SingularError` if ``H + damping I`` is
    singular to working precision, or where the sweep perturbed pivots (``H + damping I`` near singular)
    and the dense LU that then gives the answer does not fit (more than 12288 parameters, or too little
    memory; :meth:`hessinv.Factorization.logdet`)."""
    op = _check_operator(op)
    return op.factor(damping).slogdet()  # (factor validates the damping)
