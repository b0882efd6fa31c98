r"""Alignment and contraction: how well a step direction points at the minimizer (docs/theory.md).

Symbols (docs/theory.md §0, §2, §4) -> names:

=====================================================  =========================================
symbol                                                 code
=====================================================  =========================================
``x``, ``x*``, ``e = x - x*``                          ``x``, ``x_star``, ``x - x_star``
step ``x+ = x - eta d``                                ``d``, ``eta`` (``d`` is *subtracted*)
``cos(theta) = <d, e> / (|d| |e|)``                    :func:`alignment`
``rho = eta |d| / |e|``                                :func:`step_ratio`
``|e+|^2 / |e|^2``                                     :func:`observed_contraction`
best step: ``1 - cos^2(theta)`` (Thm 1)                :func:`predicted_contraction` (``rho=None``)
step taken: ``1 - 2 rho cos(theta) + rho^2`` (Lem 1)   :func:`predicted_contraction` (``rho``)
``cos(bar theta)``, ``nu``, ``bar rho`` (Thm 4)        :func:`stochastic_contraction`
=====================================================  =========================================

Sign convention: a direction ``d`` is *good* when it points from ``x*`` to ``x`` (``cos > 0``), because
the step subtracts it. The gradient, the Newton direction ``(H + lambda I)^{-1} g`` and Adam's
``m_hat / (sqrt(v_hat) + eps)`` all follow this convention.

Everything is computed in float64 on flat parameter vectors (the ``parameters_to_vector`` order of
the trainable parameters, which is the order of ``H.gradient``), in the Euclidean geometry unless a
``metric`` ``W`` (SPD; a matrix or a callable ``v -> W v``) is passed, e.g. ``metric=H`` for the
``H``-geometry in which a quadratic's loss is ``F - F* = 1/2 |e|_H^2``.

Quantities that are undefined (``d = 0`` or ``x = x*``) are returned as ``nan``, never as a number.

>>> import torch
>>> x_star = torch.zeros(2, dtype=torch.float64)
>>> x = torch.tensor([1.0, 1.0], dtype=torch.float64)
>>> d = torch.tensor([1.0, 0.0], dtype=torch.float64)      # 45 degrees off
>>> round(alignment(d, x, x_star), 12), round(predicted_contraction(alignment(d, x, x_star)), 12)
(0.707106781187, 0.5)
>>> observed_contraction(x, x - 1.0 * d, x_star)            # eta = 1 is the best step here
0.5
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from hessinv import linalg
from hessinv.chain import (
    Chain,
    LossFn,
    batch_sizes_differ,
    check_real,
    dense_grad,
    exact_no_grad,
    model_parts,
    unshared,
)
from hessinv.curvature import CurvatureOperator, _check_tol, _integer, curvature_class
from hessinv.errors import (
    AccuracyWarning,
    HessinvError,
    InvalidArgumentError,
    NonFiniteArgumentError,
    SingularError,
)
from hessinv.influence import _check_model_inputs
from hessinv.riccati import Inertia
from hessinv.stages.losses import LossStage, loss_in_dtype, prepare_targets

__all__ = [
    "flat_parameters", "set_flat_parameters", "alignment", "step_ratio", "predicted_contraction",
    "observed_contraction", "best_step", "StepRecord", "analyze_step", "AlignmentTracker",
    "gradient_direction", "NewtonDirection", "newton_direction", "adam_direction", "direction_alignments",
    "StochasticContraction", "stochastic_contraction", "MinimizerEstimate", "estimate_minimizer",
]  # fmt: skip

Metric = Tensor | Callable[[Tensor], Tensor] | None


# -- flat parameter vectors ---------------------------------------------------------------------
def _trainable(model: nn.Module | Iterable[Tensor]) -> list[Tensor]:
    params = model.parameters() if isinstance(model, nn.Module) else model
    return [p for p in params if p.requires_grad]


def flat_parameters(model: nn.Module | Iterable[Tensor]) -> Tensor:
    """A float64 copy of the trainable parameters as one vector (``parameters_to_vector`` order)."""
    return torch.cat([p.detach().reshape(-1).to(torch.float64) for p in _trainable(model)])


@torch.no_grad()
def set_flat_parameters(model: nn.Module | Iterable[Tensor], x: Tensor) -> None:
    """Write the flat vector ``x`` into the trainable parameters (cast to each parameter's dtype)."""
    params = _trainable(model)
    n = sum(p.numel() for p in params)
    if not isinstance(x, Tensor):
        raise InvalidArgumentError(
            f"x must be a torch.Tensor of length {n}, got {type(x).__name__}: convert with torch.as_tensor"
        )
    if x.dim() != 1 or x.numel() != n:
        raise InvalidArgumentError(f"x must be a vector of length {n}, got shape {tuple(x.shape)}")
    offset = 0
    for p in params:
        k = p.numel()
        p.copy_(x[offset : offset + k].view_as(p).to(p.dtype))
        offset += k


# -- the one-step quantities --------------------------------------------------------------------
def _vec(v: Tensor, name: str) -> Tensor:
    if not isinstance(v, Tensor):
        raise InvalidArgumentError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
    if v.is_complex():
        raise InvalidArgumentError(f"{name} is complex; the diagnostics are for real parameter vectors")
    return v.detach().reshape(-1).to(torch.float64)


def _error(x: Tensor, x_star: Tensor, name: str = "x") -> Tensor:
    """``x - x_star`` as a float64 vector; :class:`InvalidArgumentError` if their lengths differ (they
    would broadcast)."""
    x, xs = _vec(x, name), _vec(x_star, "x_star")
    if x.shape != xs.shape:
        raise InvalidArgumentError(f"{name} has {x.numel()} entries, x_star has {xs.numel()}")
    return x - xs


def _along(d: Tensor, e: Tensor, name: str = "d") -> Tensor:
    """``d`` as a float64 vector of the length of ``e = x - x_star``, else :class:`InvalidArgumentError`."""
    d = _vec(d, name)
    if d.shape != e.shape:
        raise InvalidArgumentError(f"{name} has {d.numel()} entries, x - x_star has {e.numel()}")
    return d


def _matrix(metric: Tensor, n: int) -> Tensor:
    """A matrix metric as float64, scaled by a power of two to max-norm in [1, 2): every quantity computed
    with a metric is a ratio in which its scale cancels (``W = 1e200 I`` overflowed to nan). An integer or
    bool matrix is converted (exactly up to 2^53; ``torch.finfo`` of it raised a TypeError); a complex one
    is refused (its imaginary part was dropped)."""
    if metric.is_complex():
        raise InvalidArgumentError("metric is complex; pass a real symmetric positive definite matrix")
    if metric.shape != (n, n):
        raise InvalidArgumentError(f"metric must be a ({n}, {n}) matrix, got {tuple(metric.shape)}")
    return _unit(metric.detach().to(torch.float64))


def _apply(metric: Metric, v: Tensor) -> Tensor:
    """``W v`` (float64) for a metric given as a matrix (float64, from :func:`_matrix`), an operator or a
    callable."""
    n = v.numel()
    if isinstance(metric, Tensor):
        return metric @ v
    if isinstance(metric, CurvatureOperator):
        if metric.shape != (n, n):
            raise InvalidArgumentError(f"metric is an operator of shape {metric.shape}, the vectors have {n}")
        Wv = metric @ v.to(metric.dtype)
    elif callable(metric):
        Wv = metric(v)
    else:
        raise InvalidArgumentError(
            f"metric must be a matrix, a curvature operator or a callable, got {type(metric).__name__}"
        )
    if not isinstance(Wv, Tensor) or Wv.numel() != n:
        got = tuple(Wv.shape) if isinstance(Wv, Tensor) else type(Wv).__name__
        raise InvalidArgumentError(f"metric(v) must return {n} numbers, got {got}")
    if Wv.is_complex():
        raise InvalidArgumentError("metric(v) returned complex numbers; pass a real (symmetric) metric")
    return Wv.detach().reshape(-1).to(torch.float64)


def _metric_norm(metric: Metric, pairs: Sequence[tuple[Tensor, Tensor]]) -> float:
    """An estimate of ``||W||`` for rounding tolerances: the Frobenius norm of a matrix, the power
    iteration's of an operator, else the largest ``|W x| / |x|`` of the ``(x, W x)`` pairs."""
    if metric is None:
        return 1.0
    if isinstance(metric, Tensor):
        return float(metric.detach().to(torch.float64).norm())
    if isinstance(metric, CurvatureOperator):
        return metric.norm_estimate()
    return max((float(Wx.norm()) / float(x.norm()) for x, Wx in pairs if float(x.norm()) > 0), default=0.0)


def _metric_norm2(metric: Metric, pairs: Sequence[tuple[Tensor, Tensor]]) -> float:
    """An estimate of ``||W||_2`` (not an upper bound): an operator's power iteration, 20 power steps on a
    matrix, else the largest ``|W x| / |x|`` of the ``(x, W x)`` pairs."""
    if isinstance(metric, Tensor):
        W = metric.detach().to(torch.float64)
        x = torch.ones(W.shape[0], dtype=torch.float64)
        for _ in range(20):
            y = W @ x
            ny = float(y.norm())
            if ny == 0.0 or not math.isfinite(ny):
                return ny
            x = y / ny
        return float((W @ x).norm())
    return _metric_norm(metric, pairs)


def _gram(u: Tensor, v: Tensor, metric: Metric, names: tuple[str, str]) -> tuple[float, float, float]:
    """``(u^T W u, u^T W v, v^T W v)`` (two products with ``W``). ``W`` must be positive semi-definite on the
    span of ``u`` and ``v``: :class:`InvalidArgumentError` where it is not by more than rounding (a
    negative ``u^T W u``: no norm; or ``|u^T W v| > |u|_W |v|_W``: Cauchy-Schwarz fails, and a ratio is
    no cosine). Rounding-level squares of either sign (a vector in the null space of a PSD ``W``: its
    norm is 0, and a cosine with it undefined, not the rounding's -0.74) are 0.

    A matrix ``W`` is used scaled to unit max-norm (:func:`_matrix`): the callers' ratios do not depend on
    its scale; an operator or callable is linear, and the callers scale ``u`` and ``v`` instead."""
    dtype = torch.float64  # the precision of W's products, for the rounding tolerances
    if isinstance(metric, Tensor):
        dtype = metric.dtype if metric.is_floating_point() else torch.float64
        metric = _matrix(metric, u.numel())
    elif isinstance(metric, CurvatureOperator):
        dtype = metric.dtype
    Wu, Wv = (u, v) if metric is None else (_apply(metric, u), _apply(metric, v))
    uu, uv, vv = float(u @ Wu), float(u @ Wv), float(v @ Wv)
    if metric is not None or uv * uv > uu * vv:  # measure the rounding
        eps = u.numel() * torch.finfo(dtype).eps * _metric_norm(metric, ((u, Wu), (v, Wv)))  # W's rounding
        nu, nv = float(u.norm()), float(v.norm())
        # a positive square at the rounding of the product itself (~ u ||W||_2 |u|^2: a null vector of W
        # gave 1e-17 ||W||) is a zero norm; the bound above, pessimistic by up to n ||W||_F / ||W||_2, only
        # tells rounding from an indefinite W (it zeroed a float32 eigenvalue of 1e-3: cosines went nan)
        zero = 16 * torch.finfo(dtype).eps * _metric_norm2(metric, ((u, Wu), (v, Wv)))
        uu = 0.0 if 0 <= uu <= zero * nu * nu else uu
        vv = 0.0 if 0 <= vv <= zero * nv * nv else vv
        for q, n, name in ((uu, nu, names[0]), (vv, nv, names[1])):
            if q < -eps * n * n:
                raise InvalidArgumentError(
                    f"the metric is not positive definite along {name}: |{name}|_W^2 = {q:.3g} < 0; pass an "
                    "SPD metric (e.g. the Gauss-Newton matrix, or H + lambda I with lambda > -lambda_min(H))"
                )
        uu, vv = max(uu, 0.0), max(vv, 0.0)
        if abs(uv) - eps * nu * nv > math.sqrt((uu + eps * nu * nu) * (vv + eps * nv * nv)):
            raise InvalidArgumentError(
                f"the metric is not positive definite on the span of {names[0]} and {names[1]}: "
                f"|<{names[0]}, {names[1]}>_W| = {abs(uv):.6g} > |{names[0]}|_W |{names[1]}|_W = "
                f"{math.sqrt(uu * vv):.6g} (Cauchy-Schwarz fails); pass an SPD metric"
            )
    return uu, uv, vv


def _pow2_scaled(vs: tuple[Tensor, ...], top: float) -> tuple[Tensor, ...]:
    """``vs`` all times the power of two ``2^s`` that brings ``top`` (finite, > 0) to [1, 2), applied in
    factors a float holds: for a subnormal ``top`` (< 2^-1022) ``2^s`` is up to 2^1074, which overflows
    (a probe's ``1e-310 * ones`` raised OverflowError). Scaling up is exact."""
    s = 1 - math.frexp(top)[1]
    while s != 0:
        step = max(-1022, min(1022, s))
        vs = tuple(v * math.ldexp(1.0, step) for v in vs)
        s -= step
    return vs


def _unit(v: Tensor) -> Tensor:
    """``v`` scaled by a power of two to max-norm in [1, 2) (exact; zero and non-finite ``v`` unchanged)."""
    top = float(v.abs().max()) if v.numel() else 0.0
    return v if not (0.0 < top < math.inf) else _pow2_scaled((v,), top)[0]


def _common_unit(*vs: Tensor) -> tuple[Tensor, ...]:
    """``vs`` all scaled by the one power of two that brings the largest entry to [1, 2) (exact; ratios of
    their norms unchanged, none of their squares over- or underflows unless the vectors differ in scale
    by ~1e150)."""
    top = max((float(v.abs().max()) for v in vs if v.numel()), default=0.0)
    return vs if not (0.0 < top < math.inf) else _pow2_scaled(vs, top)


def _norm(v: Tensor) -> float:
    """``|v|`` without over- or underflow of the squares (torch's norm of ``1e-170 * ones`` is 0, of
    ``1e160 * ones`` inf): the norm of :func:`_unit` ``(v)``, scaled back."""
    top = float(v.abs().max()) if v.numel() else 0.0
    if not 0.0 < top < math.inf:
        return float(v.norm())  # 0, inf or nan
    try:
        return math.ldexp(float(_unit(v).norm()), math.frexp(top)[1] - 1)
    except OverflowError:  # beyond the largest float
        return math.inf


def alignment(d: Tensor, x: Tensor, x_star: Tensor, metric: Metric = None) -> float:
    r"""``cos(theta) = <d, x - x*> / (|d| |x - x*|)`` in ``[-1, 1]``; ``nan`` if ``d = 0`` or ``x = x*``.

    With ``metric=W`` the inner product is ``<u, v>_W = u^T W v`` (theory.md §1). ``W`` must be positive
    definite on the span of ``d`` and ``x - x*``; where it is not (a negative ``|d|_W^2``, or a ratio
    beyond 1 by more than rounding, which is no cosine): :class:`~hessinv.InvalidArgumentError`. ``W`` is a
    real matrix (an integer one is converted to float64; a complex one is refused), a curvature operator
    or a callable ``v -> W v`` (real). The cosine depends on the scale of neither ``d``, ``x - x*`` nor a
    matrix ``W`` (each is scaled to unit size first: ``1e160 * d`` or ``1e200 * W`` gave nan).

    >>> import torch
    >>> e = torch.tensor([3.0, 4.0], dtype=torch.float64)
    >>> alignment(e, e, torch.zeros(2, dtype=torch.float64)), alignment(-e, e, 0 * e)
    (1.0, -1.0)
    """
    e = _error(x, x_star)
    # a cosine is scale-free: unit max-norm first (|d|^2 of 1e160 overflowed to nan, with a metric too)
    d, e = _unit(_along(d, e)), _unit(e)
    dd, de, ee = _gram(d, e, metric, ("d", "x - x_star"))
    nd, ne = math.sqrt(dd), math.sqrt(ee)
    if nd == 0.0 or ne == 0.0 or not (math.isfinite(nd) and math.isfinite(ne)):
        return math.nan
    return max(-1.0, min(1.0, de / (nd * ne)))  # |ratio| <= 1 up to rounding


def step_ratio(d: Tensor, x: Tensor, x_star: Tensor, eta: float = 1.0, metric: Metric = None) -> float:
    r"""``rho = eta |d| / |x - x*|`` (Lemma 1), signed like ``eta`` (a negative ``eta`` steps along
    ``+d``: ``predicted_contraction(cos, rho)`` is then still the observed factor); ``nan`` if ``x = x*``."""
    eta = check_real(eta, "eta")
    e = _error(x, x_star)
    d, e = _common_unit(_along(d, e), e)  # a ratio: scale-free (|d|^2 of 1e-170 underflowed to nan)
    dd, _, ee = _gram(d, e, metric, ("d", "x - x_star"))
    return math.nan if ee == 0.0 else eta * (math.sqrt(dd) / math.sqrt(ee))


def predicted_contraction(cos_theta: float, rho: float | None = None) -> float:
    r"""The predicted ``|e+|^2 / |e|^2``.

    * ``rho=None``: the best step size's factor (Theorem 1), ``1 - cos^2(theta)`` if ``cos > 0``, else
      ``1`` (the best ``eta >= 0`` is then 0).
    * ``rho`` given: the factor of the step taken (Lemma 1), ``1 - 2 rho cos(theta) + rho^2``.
      This is an identity: it equals the observed factor whenever the update was ``x - eta d``.

    >>> predicted_contraction(0.6), predicted_contraction(0.6, rho=0.6), predicted_contraction(-0.5)
    (0.64, 0.64, 1.0)
    >>> predicted_contraction(1.0, rho=2.0)   # overshoot by a factor 2: back to the same distance
    1.0
    """
    c = check_real(cos_theta, "cos_theta")
    if math.isnan(c):
        return math.nan
    if not -1.0 <= c <= 1.0:
        raise InvalidArgumentError(
            f"cos_theta must be a cosine in [-1, 1], got {c!r}: pass alignment(d, x, x_star)"
        )
    if rho is None:
        return 1.0 - c * c if c > 0 else 1.0
    r = check_real(rho, "rho")
    return 1.0 - 2.0 * r * c + r * r


def observed_contraction(x: Tensor, x_next: Tensor, x_star: Tensor, metric: Metric = None) -> float:
    r"""``|x_next - x*|^2 / |x - x*|^2``; ``nan`` if ``x = x*``."""
    e, e_next = _common_unit(_error(x, x_star), _error(x_next, x_star, "x_next"))
    ee, _, nn = _gram(e, e_next, metric, ("x - x_star", "x_next - x_star"))
    return math.nan if ee == 0.0 else nn / ee


def best_step(d: Tensor, x: Tensor, x_star: Tensor, metric: Metric = None) -> float:
    r"""The oracle step ``eta* = <d, e> / |d|^2`` of Theorem 1 (it needs ``x*``); ``nan`` if ``d = 0``."""
    e = _error(x, x_star)
    d, e = _common_unit(_along(d, e), e)  # a ratio: scale-free
    dd, de, _ = _gram(d, e, metric, ("d", "x - x_star"))
    return math.nan if dd == 0.0 else de / dd


# -- one recorded step --------------------------------------------------------------------------
@dataclass
class StepRecord:
    """One step ``x_t -> x_{t+1}``, seen as ``x_{t+1} = x_t - d`` with ``d = x_t - x_{t+1}`` (``eta = 1``).

    Attributes:
        step: index ``t``.
        error: ``|x_t - x*|``.
        step_norm: ``|x_t - x_{t+1}|`` (``eta |d|`` for any split into ``eta`` and ``d``).
        cos_theta: alignment of the step taken (``nan`` for a zero step).
        rho: ``step_norm / error``.
        predicted_best: ``1 - cos^2`` (or 1 if ``cos <= 0``): what the best step size along the same
            direction would have achieved (Theorem 1).
        predicted_step: ``1 - 2 rho cos + rho^2``: the identity of Lemma 1 for the step taken.
        observed: ``|x_{t+1} - x*|^2 / |x_t - x*|^2``.
        loss: the loss at ``x_t`` if it was passed, else None.
        alignments: ``cos(theta)`` at ``x_t`` of named directions (gradient, Newton, ...), if passed.
    """

    step: int
    error: float
    step_norm: float
    cos_theta: float
    rho: float
    predicted_best: float
    predicted_step: float
    observed: float
    loss: float | None = None
    alignments: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (``nan`` becomes None)."""
        return _json_safe(asdict(self))


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def analyze_step(
    x: Tensor,
    x_next: Tensor,
    x_star: Tensor,
    *,
    step: int = 0,
    loss: float | None = None,
    directions: Mapping[str, Tensor] | None = None,
) -> StepRecord:
    r"""Measure one step ``x -> x_next`` against ``x*`` (see :class:`StepRecord`).

    ``directions`` are named directions evaluated at ``x`` (e.g. the gradient there); their
    alignments with ``x - x*`` are recorded too.

    >>> import torch
    >>> x, xs = torch.tensor([2.0, 0.0], dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    >>> r = analyze_step(x, torch.tensor([1.0, 1.0], dtype=torch.float64), xs)
    >>> [round(v, 12) for v in (r.cos_theta, r.rho, r.observed, r.predicted_step, r.predicted_best)]
    [0.707106781187, 0.707106781187, 0.5, 0.5, 0.5]
    """
    _error(x, x_star)  # the lengths agree (no broadcasting)
    _error(x_next, x_star, "x_next")
    x, x_next, xs = _vec(x, "x"), _vec(x_next, "x_next"), _vec(x_star, "x_star")
    d = x - x_next
    err, sn = _norm(x - xs), _norm(d)
    cos = alignment(d, x, xs)
    rho = step_ratio(d, x, xs)
    # 1 - cos^2 and 1 - 2 rho cos + rho^2 cancel catastrophically once cos ~ 1 (a step that contracts
    # by 1e-16 reads as 0): from the vectors, |e - proj_d e|^2 / |e|^2 and |e - d|^2 / |e|^2
    e_u, d_u = _common_unit(x - xs, d)
    ee = float(e_u @ e_u)
    if ee == 0.0 or not math.isfinite(ee):
        pred_best = pred_step = math.nan
    else:
        r = e_u - d_u
        pred_step = float(r @ r) / ee  # (exactly 1 for no move)
        if not cos > 0:  # the best eta >= 0 is 0 (or d = 0: no move)
            pred_best = 1.0 if math.isfinite(cos) else math.nan
        else:
            u = _unit(d_u)
            r = e_u - (float(u @ e_u) / float(u @ u)) * u
            pred_best = float(r @ r) / ee
    aligns = {k: alignment(v, x, xs) for k, v in (directions or {}).items()}
    return StepRecord(
        step=int(step),
        error=err,
        step_norm=sn,
        cos_theta=cos,
        rho=rho,
        predicted_best=pred_best,
        predicted_step=pred_step,
        observed=observed_contraction(x, x_next, xs),
        loss=None if loss is None else float(loss),
        alignments=aligns,
    )


class AlignmentTracker:
    r"""Record alignment and contraction of every step an optimizer takes, from parameter differences.

    The direction of step ``t`` is read off the parameters, ``d_t = x_t - x_{t+1}``, so momentum,
    weight decay, clipping or a trust region are all included: the tracker measures what was done.

    Usage::

        tracker = AlignmentTracker(model, x_star)      # snapshots x_0
        for t in range(T):
            dirs = {"gradient": g}                      # optional: directions at x_t
            opt.step()                                  # any optimizer
            rec = tracker.update(directions=dirs, loss=loss_t)   # records x_t -> x_{t+1}

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 1, bias=False)).double()
    >>> with torch.no_grad():
    ...     _ = net[0].weight.copy_(torch.tensor([[3.0, 4.0]]))
    >>> tracker = AlignmentTracker(net, torch.zeros(2, dtype=torch.float64))
    >>> with torch.no_grad():
    ...     _ = net[0].weight.mul_(0.5)                  # halve the error: a perfectly aligned step
    >>> rec = tracker.update()
    >>> rec.cos_theta, rec.observed, rec.predicted_best
    (1.0, 0.25, 0.0)
    """

    def __init__(self, model: nn.Module | Iterable[Tensor], x_star: Tensor):
        self._params = _trainable(model)
        self.x_star = _vec(x_star, "x_star").clone()
        self._x = flat_parameters(self._params)
        if self._x.shape != self.x_star.shape:
            raise InvalidArgumentError(
                f"x_star has {self.x_star.numel()} entries, the model {self._x.numel()}"
            )
        self.records: list[StepRecord] = []

    @property
    def x(self) -> Tensor:
        """The parameters at the start of the next step (float64 copy)."""
        return self._x.clone()

    @property
    def error(self) -> float:
        """``|x - x*|`` now."""
        return _norm(self._x - self.x_star)

    def reset(self) -> None:
        """Re-snapshot the parameters without recording a step (after moving them by other means)."""
        self._x = flat_parameters(self._params)

    def update(self, directions: Mapping[str, Tensor] | None = None, loss: float | None = None) -> StepRecord:
        """Record the step from the last snapshot to the current parameters, then re-snapshot."""
        x_next = flat_parameters(self._params)
        rec = analyze_step(
            self._x, x_next, self.x_star, step=len(self.records), loss=loss, directions=directions
        )
        self.records.append(rec)
        self._x = x_next
        return rec

    def column(self, name: str) -> list[float]:
        """One attribute over all records, e.g. ``tracker.column("cos_theta")``; ``alignments.<key>`` too."""
        if name.startswith("alignments."):
            key = name.split(".", 1)[1]
            return [r.alignments.get(key, math.nan) for r in self.records]
        fields = [f.name for f in dataclasses.fields(StepRecord)]
        if name not in fields:
            raise InvalidArgumentError(f"no column {name!r}; the columns are {fields} and 'alignments.<key>'")
        return [getattr(r, name) for r in self.records]

    def summary(self) -> dict[str, float]:
        """Median alignment, geometric-mean observed / predicted factors, the largest identity gap."""
        recs = [r for r in self.records if math.isfinite(r.observed)]
        if not recs:
            return {"steps": 0}
        cos = sorted(r.cos_theta for r in recs if math.isfinite(r.cos_theta))

        def gmean(v: Sequence[float]) -> float:  # of factors >= 0: one exact 0 makes it 0 (not log 0)
            v = [a for a in v if math.isfinite(a)]
            if not v:
                return math.nan
            if min(v) <= 0.0:
                return 0.0
            return math.exp(sum(math.log(a) for a in v) / len(v))

        return {
            "steps": len(recs),
            "median_cos_theta": cos[len(cos) // 2] if cos else math.nan,
            "geomean_observed": gmean([r.observed for r in recs]),
            "geomean_predicted_best": gmean([r.predicted_best for r in recs]),
            "max_identity_gap": max(abs(r.observed - r.predicted_step) for r in recs),
            "initial_error": recs[0].error,
            "final_error": _norm(self._x - self.x_star),
        }

    def as_dict(self) -> dict[str, Any]:
        """All records and the summary, JSON-friendly."""
        return _json_safe({"summary": self.summary(), "records": [asdict(r) for r in self.records]})


# -- named directions at the current point ------------------------------------------------------
def gradient_direction(
    model: nn.Module | Sequence[nn.Module], loss_fn: LossFn, inputs: Tensor, targets: Tensor
) -> Tensor:
    """The gradient ``g`` of ``loss_fn(model(inputs), targets)`` (flat; model dtype), by backprop; 0 on a
    trainable parameter that the loss does not use.

    The batch is checked first as :class:`hessinv.Chain` checks it (on the whole model's output where the
    model is no chain): a dtype, device or batch-size mismatch, non-finite values, or targets that the
    loss would broadcast against the outputs (MSE targets ``(N,)`` for outputs ``(N, 1)``) raise a named
    :class:`~hessinv.HessinvError` instead of giving the gradient of another loss."""
    net = model if isinstance(model, nn.Module) else nn.Sequential(*model)
    _check_batch(net, loss_fn, inputs, targets)
    return _gradient(net, loss_fn, inputs, targets)


def _gradient(net: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor) -> Tensor:
    """:func:`gradient_direction` without the batch checks (a batch checked already)."""
    return _flat_gradient(net, _grads(net, loss_fn, inputs, targets))


def _flat_gradient(net: nn.Module, grads: list[Tensor | None]) -> Tensor:
    """:func:`_grads` as one flat vector, 0 for an unused parameter (the loss does not depend on it)."""
    pairs = zip(_trainable(net), grads, strict=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in pairs])


def _grads(net: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor) -> list[Tensor | None]:
    """The gradient of each trainable parameter, None for one the loss does not use (autograd raised a
    RuntimeError for it; ``backward()`` leaves its ``.grad`` None, and Adam's step skips it)."""
    with torch.enable_grad():
        grads = linalg.grad(
            loss_fn(net(unshared(inputs)), unshared(targets)), _trainable(net), allow_unused=True
        )
    return [None if g is None else dense_grad(g).detach() for g in grads]


def _check_batch(net: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor) -> None:
    """:meth:`hessinv.Chain.check_batch` of ``(inputs, targets)``; for a model that is no chain (a
    parameter used twice, a residual), its checks of dtypes, devices, batch sizes and finite values, and
    the loss's check of the targets against the whole model's output."""
    try:
        with warnings.catch_warnings():  # (a model called whole: its factorizations' cost is not at issue)
            warnings.filterwarnings("ignore", message=".*called whole")
            chain = Chain(net, loss_fn)
    except HessinvError:
        chain = None
    if chain is not None:
        chain.check_batch(inputs, targets)
        return
    params = _trainable(net)
    _check_model_inputs(inputs, params)
    _check_model_inputs(targets, params, "targets")
    if len(targets) != len(inputs):
        raise batch_sizes_differ(inputs, targets)
    dtype = params[0].dtype
    with exact_no_grad():
        out = net(unshared(inputs))
    LossStage(0, loss_fn, prepare_targets(loss_fn, targets, dtype), out)


@dataclass
class NewtonDirection:
    r"""A shifted Newton direction ``d = (C + lambda I)^{-1} g`` (``C`` = Hessian or Gauss-Newton).

    Attributes:
        direction: ``d`` (flat, model dtype).
        damping: ``lambda``.
        min_eigenvalue: ``lambda_min(C)`` if it was computed (``C`` was not positive definite), else None.
        inertia: inertia of ``C + lambda I`` (positive definite unless a fixed damping was asked for).
        gradient: ``g``.
        loss: the loss at the point.
    """

    direction: Tensor
    damping: float
    min_eigenvalue: float | None
    inertia: Inertia
    gradient: Tensor
    loss: float


def _min_eigenvalue(op: CurvatureOperator) -> float:
    """``lambda_min`` of a curvature operator: dense (``n`` products at once, then ``eigvalsh``) for
    ``n <= 2000``; else Lanczos (ARPACK) on the ``O(L)`` product, with bisection on the Cholesky test
    (:meth:`CurvatureOperator.min_eigenvalue`) as the fallback. Callers re-check positive
    definiteness of the shifted matrix with a factorization."""
    n = op.shape[0]
    if n <= 2000:
        A = op.to_dense().double()
        return float(torch.linalg.eigvalsh(0.5 * (A + A.T))[0])
    from scipy.sparse.linalg import ArpackNoConvergence, eigsh

    try:
        vals = eigsh(op.as_linear_operator(), k=1, which="SA", tol=1e-8, maxiter=20 * n,
                     return_eigenvectors=False)  # fmt: skip
        return float(vals[0])
    except ArpackNoConvergence:
        return op.min_eigenvalue()


def newton_direction(
    model: nn.Module | Sequence[nn.Module],
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    *,
    curvature: str | None = None,
    damping: float | None = None,
    delta: float = 1e-8,
    operator: CurvatureOperator | None = None,
    gradient: Tensor | None = None,
) -> NewtonDirection:
    r"""The (shifted) Newton direction ``d = (C + lambda I)^{-1} g`` at the model's current parameters.

    ``C`` is the Hessian (``curvature="hessian"``, the default) or the Gauss-Newton matrix
    (``"gauss_newton"``, also spelled ``"gauss-newton"``) of the loss on ``(inputs, targets)``; pass
    ``operator`` to reuse one already built at this point -- of this model, and of ``curvature`` where
    both are given (else :class:`~hessinv.InvalidArgumentError`).
    ``g`` is that batch's gradient unless ``gradient`` is given (e.g. the full-batch gradient with a
    mini-batch curvature, the sub-sampled Newton direction of theory.md §4.1).

    ``damping=None`` (default) chooses ``lambda`` as in theory.md §5.3:

    * ``lambda = 0`` (pure Newton) if ``C`` is positive definite (one Riccati factorization at 0);
    * else ``lambda = max(0, -lambda_min(C)) + delta * ||C||``, the smallest shift that makes ``d`` a
      descent direction, up to the margin ``delta`` (finite and > 0, else
      :class:`~hessinv.InvalidArgumentError`). The factorization's inertia certifies that
      ``C + lambda I`` is positive definite; the margin grows tenfold until it is.

    A float ``damping`` is used as is (it may leave ``C + lambda I`` indefinite).

    >>> import torch
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> X = torch.randn(20, 3, dtype=torch.float64); w = torch.randn(3, 1, dtype=torch.float64)
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 1, bias=False)).double()
    >>> nd = newton_direction(net, torch.nn.MSELoss(), X, X @ w)    # a quadratic: Newton hits x*
    >>> nd.damping, abs(alignment(nd.direction, flat_parameters(net), w.reshape(-1)) - 1) < 1e-12
    (0.0, True)
    """
    delta = _check_tol(delta, "delta")  # a margin <= 0 would leave C + lambda I singular
    if operator is None:
        op = curvature_class(curvature or "hessian")(model, loss_fn, inputs, targets)
    else:
        if not isinstance(operator, CurvatureOperator):
            raise InvalidArgumentError(
                f"operator must be a hessinv curvature operator, got {type(operator).__name__}"
            )
        # (the same parameters: a list of modules and the nn.Sequential of them are one model)
        own = {id(t) for m in model_parts(model) for t in m.parameters() if t.requires_grad}
        if {id(t) for t in operator.chain.params} != own:
            raise InvalidArgumentError(
                "operator was built for another model (its direction would have that model's parameters): "
                "pass the operator of this model, or none"
            )
        if curvature is not None and not isinstance(operator, curvature_class(curvature)):
            raise InvalidArgumentError(
                f"curvature={curvature!r} but operator is a {type(operator).__name__}: pass one of them"
            )
        op = operator
    if gradient is not None and not isinstance(gradient, Tensor):
        raise InvalidArgumentError(
            f"gradient must be a torch.Tensor of shape ({op.shape[0]},), got {type(gradient).__name__}: "
            "convert with torch.as_tensor"
        )
    g = op.gradient if gradient is None else gradient.detach().reshape(-1).to(op.dtype)
    lam_min: float | None = None
    if damping is not None:
        lam = check_real(damping, "damping")
        F = op.factor(lam)
    else:
        lam, F = 0.0, None
        try:
            F0 = op.factor(0.0)
            if F0.inertia.negative == 0:
                F = F0
        except SingularError:
            pass
        if F is None:
            lam_min = _min_eigenvalue(op)
            scale = max(op.norm_estimate(), abs(lam_min), torch.finfo(torch.float64).tiny)
            margin = delta * scale
            for _ in range(12):
                lam = max(0.0, -lam_min) + margin
                try:
                    F = op.factor(lam)
                    if F.inertia.negative == 0:
                        break
                except SingularError:
                    pass
                F, margin = None, 10.0 * margin
            if F is None:
                raise SingularError(f"C + lambda I stays indefinite (lambda_min ~ {lam_min:g})")
    if damping is not None:  # the caller's damping: a poorly solved system is theirs to hear about
        d = F.solve(g)
    else:
        with warnings.catch_warnings():  # lambda chosen here, a margin beyond -lambda_min
            warnings.simplefilter("ignore", AccuracyWarning)
            d = F.solve(g)
    return NewtonDirection(d, lam, lam_min, F.inertia, g, float(op.loss))


def adam_direction(optimizer: torch.optim.Optimizer, gradient: Tensor | None = None) -> Tensor:
    r"""The direction ``d`` of the step ``torch.optim.Adam`` / ``AdamW`` would take next: ``x+ = x - lr d``.

    With ``m, v`` the optimizer's moment estimates, ``t`` its step count, and ``g`` the gradient
    (``gradient``, flat in the parameter order of the optimizer's groups, or else each ``p.grad``)::

        g <- g + wd x                      (Adam's L2 weight decay)
        m' = b1 m + (1 - b1) g,   v' = b2 v + (1 - b2) g^2
        d  = (m' / (1 - b1^(t+1))) / (sqrt(v' / (1 - b2^(t+1))) + eps)      (v' -> max(v_max, v'): amsgrad)
        d <- d + wd x                      (AdamW's decoupled weight decay)

    Each group uses its own ``betas``, ``eps``, ``weight_decay`` and ``lr``, as the optimizer does: with
    ``lr`` the largest group ``lr``, a group of learning rate ``lr_g`` has its ``d`` scaled by
    ``lr_g / lr``, so that ``x+ = x - lr d`` is the step taken (with one ``lr`` for all groups, ``d``
    excludes it). The optimizer's state is not changed. ``maximize=True`` is not supported.
    A parameter without a gradient (``p.grad`` is None: unused by the loss, or frozen after the optimizer
    was built) is skipped by the optimizer's step, so its entries of ``d`` are 0 (a probe found it refused);
    :class:`~hessinv.InvalidArgumentError` only where no parameter has a gradient and none is passed.
    """
    _check_adam(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grads: list[Tensor | None] = []
    if gradient is not None:
        gradient = _vec(gradient, "gradient")
        if gradient.numel() != sum(p.numel() for p in params):
            raise InvalidArgumentError("gradient has the wrong length for the optimizer's parameters")
        offset = 0
        for p in params:
            grads.append(gradient[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
    else:
        grads = [None if p.grad is None else p.grad.detach() for p in params]
        if all(g is None for g in grads):
            raise InvalidArgumentError("no gradient: pass `gradient` or call backward() first")
    return torch.cat(_adam_steps(optimizer, grads))


def _check_adam(optimizer: Any) -> None:
    if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        raise InvalidArgumentError(f"expected torch.optim.Adam or AdamW, got {type(optimizer).__name__}")


def _adam_steps(optimizer: torch.optim.Optimizer, grads: Sequence[Tensor | None]) -> list[Tensor]:
    """:func:`adam_direction`'s ``d`` per parameter of the optimizer's groups (flat, float64), for the
    gradients ``grads`` in that order; a zero ``d`` where the gradient is None (the step skips it)."""
    out: list[Tensor] = []
    grad_of = iter(grads)
    lrs = [check_real(group["lr"], "lr") for group in optimizer.param_groups]
    lr_max = max(lrs, default=0.0)
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        rel_lr = lr / lr_max if lr_max > 0 else 1.0  # the step is lr_g d_g: relative to the largest lr
        if group.get("maximize", False):
            raise InvalidArgumentError("maximize=True is not supported (the direction is of a minimizer)")
        b1, b2 = group["betas"]
        b1, b2, eps, wd = float(b1), float(b2), float(group["eps"]), float(group["weight_decay"])
        decoupled = isinstance(optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay"))
        for p in group["params"]:
            g = next(grad_of)
            if g is None:  # torch's step skips p (its weight decay too): no move
                out.append(torch.zeros(p.numel(), dtype=torch.float64, device=p.device))
                continue
            g = dense_grad(g).to(torch.float64)
            x = p.detach().to(torch.float64)
            if wd != 0 and not decoupled:
                g = g + wd * x
            st = optimizer.state.get(p, {})
            t = int(float(st["step"])) if "step" in st else 0
            m = st["exp_avg"].to(torch.float64) if "exp_avg" in st else torch.zeros_like(g)
            v = st["exp_avg_sq"].to(torch.float64) if "exp_avg_sq" in st else torch.zeros_like(g)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            if group.get("amsgrad", False) and "max_exp_avg_sq" in st:
                v = torch.maximum(st["max_exp_avg_sq"].to(torch.float64), v)
            bc1, bc2 = 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)
            d = (m / bc1) / (v.sqrt() / math.sqrt(bc2) + eps)
            if wd != 0 and decoupled:
                d = d + wd * x
            out.append(rel_lr * d.reshape(-1))
    return out


def _in_model_order(optimizer: torch.optim.Optimizer, net: nn.Module, grads: list[Tensor | None]) -> Tensor:
    """:func:`adam_direction` for the gradients ``grads`` of the model's trainable parameters (None: unused),
    returned in the model's flat order (:func:`flat_parameters`): the optimizer reads and writes its
    groups' order, which may differ. A frozen parameter of the model in the optimizer
    (``requires_grad_(False)`` after it was built) has no gradient, and the step skips it."""
    _check_adam(optimizer)
    mine = _trainable(net)
    theirs = [p for group in optimizer.param_groups for p in group["params"]]
    if not {id(p) for p in mine} <= {id(p) for p in theirs} <= {id(p) for p in net.parameters()}:
        raise InvalidArgumentError(
            "the optimizer's parameter groups must hold the model's trainable parameters (and may hold its "
            "frozen ones), no other"
        )
    of = dict(zip(map(id, mine), grads, strict=True))
    d = _adam_steps(optimizer, [of.get(id(p)) for p in theirs])
    steps = dict(zip(map(id, theirs), d, strict=True))
    return torch.cat([steps[id(p)] for p in mine])


def direction_alignments(
    model: nn.Module | Sequence[nn.Module],
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    x_star: Tensor,
    which: Sequence[str] = ("gradient", "newton", "gauss_newton"),
    *,
    adam: torch.optim.Optimizer | None = None,
    delta: float = 1e-8,
) -> dict[str, float]:
    r"""``cos(theta)`` at the current parameters of named directions.

    ``which`` may contain ``"gradient"``, ``"newton"`` (Hessian, shifted as in :func:`newton_direction`),
    ``"gauss_newton"`` (``(G + lambda I)^{-1} g``, same rule), and ``"adam"`` (needs ``adam``: the
    step that optimizer would take next with the gradient at this point; it skips a parameter the loss
    does not use, and one frozen after it was built).
    """
    net = model if isinstance(model, nn.Module) else nn.Sequential(*model)
    x = flat_parameters(net)
    out: dict[str, float] = {}
    grads: list[Tensor | None] | None = None
    for name in which:
        if name == "gradient" or name == "adam":
            if grads is None:
                _check_batch(net, loss_fn, inputs, targets)
                grads = _grads(net, loss_fn, inputs, targets)
            if name == "gradient":
                out[name] = alignment(_flat_gradient(net, grads), x, x_star)
            else:
                if adam is None:
                    raise InvalidArgumentError("'adam' needs the optimizer: pass adam=<torch.optim.Adam>")
                out[name] = alignment(_in_model_order(adam, net, grads), x, x_star)
        elif name in ("newton", "gauss_newton"):
            curvature = "hessian" if name == "newton" else name
            nd = newton_direction(model, loss_fn, inputs, targets, curvature=curvature, delta=delta)
            out[name] = alignment(nd.direction, x, x_star)
        else:
            raise InvalidArgumentError(
                f"unknown direction {name!r}; use gradient, newton, gauss_newton or adam"
            )
    return out


# -- stochastic directions (Theorem 4) -----------------------------------------------------------
@dataclass
class StochasticContraction:
    r"""Theorem 4 for directions drawn at one point ``x`` (the expectation is over the given draws).

    Attributes:
        cos_bar: alignment of the mean direction ``m``.
        nu: variance ratio ``tr Cov d / |m|^2``.
        rho_bar: ``eta |m| / |e|``.
        predicted: ``1 - 2 rho_bar cos_bar + (1 + nu) rho_bar^2``: the expected factor at ``eta``.
        predicted_best: ``(sin^2 + nu) / (1 + nu)`` at the best ``eta`` (1 if ``cos_bar <= 0``).
        best_eta: that ``eta``, ``<m, e> / (|m|^2 + tr Cov d)``.
        observed_mean: the mean over the draws of ``|e - eta d_i|^2 / |e|^2``.
        samples: number of draws.

    At ``x = x*`` (``e = 0``) ``cos_bar``, ``rho_bar``, the factors and ``best_eta`` are ``nan``.
    """

    cos_bar: float
    nu: float
    rho_bar: float
    predicted: float
    predicted_best: float
    best_eta: float
    observed_mean: float
    samples: int


def stochastic_contraction(samples: Tensor, x: Tensor, x_star: Tensor, eta: float) -> StochasticContraction:
    r"""Theorem 4 evaluated on ``k`` draws ``samples[i]`` (e.g. mini-batch gradients) of a direction at ``x``.

    The mean ``m`` and ``tr Cov`` are those of the empirical distribution of the draws (``1/k``
    normalization), so ``predicted`` equals ``observed_mean`` up to rounding; with few draws both
    estimate the expectation over batches. ``samples`` must be real, ``k >= 1`` draws of ``n >= 1``
    entries (else :class:`~hessinv.InvalidArgumentError`).

    >>> import torch
    >>> e = torch.tensor([1.0, 0.0], dtype=torch.float64)
    >>> draws = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)   # m = e, tr Cov = 1
    >>> s = stochastic_contraction(draws, e, 0 * e, eta=0.5)
    >>> s.cos_bar, s.nu, s.predicted, s.observed_mean, s.predicted_best
    (1.0, 1.0, 0.5, 0.5, 0.5)
    """
    if not isinstance(samples, Tensor) or samples.dim() < 1 or samples.shape[0] < 1:
        shape = tuple(samples.shape) if isinstance(samples, Tensor) else type(samples).__name__
        raise InvalidArgumentError(f"samples must be a (k, n) tensor of k >= 1 draws, got {shape}")
    if samples.is_complex():  # (as d and x are: .to(float64) dropped the imaginary part)
        raise InvalidArgumentError("samples is complex; the diagnostics are for real parameter vectors")
    eta = check_real(eta, "eta")
    D = samples.detach().to(torch.float64).reshape(samples.shape[0], -1)
    e = _error(x, x_star)
    if D.shape[1] != e.numel():
        raise InvalidArgumentError(f"samples have {D.shape[1]} entries, x - x_star has {e.numel()}")
    if e.numel() == 0:
        raise InvalidArgumentError("x, x_star and the samples have no entries: pass vectors of length n >= 1")
    if not (bool(torch.isfinite(D).all()) and bool(torch.isfinite(e).all())):
        raise NonFiniteArgumentError("samples, x or x_star contain NaN or infinity")
    k = D.shape[0]
    D, e = _common_unit(D, e)  # every quantity is a ratio: scale-free (squares of 1e170 overflowed)
    m = D.mean(0)
    # a mean within the rounding of the sum of the draws is 0 (symmetric draws): no direction to align
    if float(m.abs().max()) <= k * torch.finfo(torch.float64).eps * float(D.abs().max()):
        m = torch.zeros_like(m)
    tr_cov = float(((D - m) ** 2).sum(1).mean())
    nm, ne = float(m.norm()), float(e.norm())
    cos = alignment(m, e, torch.zeros_like(e))
    nu = tr_cov / nm**2 if nm > 0 else math.inf
    rho = float(eta) * nm / ne if ne > 0 else math.nan
    if ne == 0:  # x = x*: no contraction to speak of
        pred = math.nan
    elif nm > 0:
        pred = 1 - 2 * rho * cos + (1 + nu) * rho**2
    else:
        pred = 1 + (float(eta) ** 2) * tr_cov / ne**2
    if ne == 0:  # x = x*: no best step either (as analyze_step; 1.0 and 0.0 were reported)
        best_eta = best = math.nan
    else:
        best_eta = max(float(m @ e), 0.0) / (nm**2 + tr_cov) if nm**2 + tr_cov > 0 else math.nan
        best = (1 - cos**2 + nu) / (1 + nu) if (nm > 0 and cos > 0) else 1.0
    obs = float(((e - float(eta) * D) ** 2).sum(1).mean()) / ne**2 if ne > 0 else math.nan
    return StochasticContraction(cos, nu, rho, pred, best, best_eta, obs, k)


# -- the reference point x* ----------------------------------------------------------------------
@dataclass
class MinimizerEstimate:
    """Result of :func:`estimate_minimizer`.

    Attributes:
        x: the estimated minimizer (flat, float64).
        gradient_norm: ``|g(x)|`` there.
        loss: the loss there.
        iterations: Newton iterations taken.
        converged: ``gradient_norm <= gtol``.
        min_eigenvalue: ``lambda_min`` of the *Hessian* at ``x``, whichever ``curvature`` took the steps
            (the Gauss-Newton matrix is positive semi-definite at a saddle too, so its eigenvalues certify
            nothing).
        strict: ``converged`` with ``min_eigenvalue`` above ``sqrt(u) ||H||`` (``zero_tolerance``: the
            resolution of eigenvalues that rounding and the gradient left can move): a strict local
            minimizer. False where ``lambda_min`` is zero to that resolution -- a degenerate minimizer (one
            of a line of minimizers came out +1e-17 to +2e-15; a rescaling symmetry +1e-13) -- or negative.
        history: ``(loss, |g|, lambda)`` per iteration.
        stopped: why the iteration ended: ``"converged"``, ``"max_iter"``, ``"no_progress"`` (no step
            size lowered the loss or the gradient norm) or ``"stalled"`` (the step no longer changes
            ``x`` in float64, or the loss and gradient norm stopped changing: ``|g|`` is at its rounding
            floor above ``gtol``).
    """

    x: Tensor
    gradient_norm: float
    loss: float
    iterations: int
    converged: bool
    min_eigenvalue: float
    history: list[tuple[float, float, float]]
    stopped: str = "converged"
    strict: bool = False


def estimate_minimizer(
    model: nn.Module | Sequence[nn.Module],
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    *,
    x0: Tensor | None = None,
    curvature: str = "hessian",
    gtol: float = 1e-12,
    max_iter: int = 200,
) -> MinimizerEstimate:
    r"""Estimate ``x*`` by running damped Newton on one fixed batch, in float64, until ``|g| <= gtol``.

    The model is copied (and converted to float64); it is not changed. Start at ``x0`` (flat) or at
    the model's parameters. Each iteration solves ``(C + lambda I) d = g`` with
    ``lambda = max(0, -lambda_min(C)) + mu`` (:func:`newton_direction`'s rule plus a
    Levenberg–Marquardt margin ``mu``) and takes ``x - d`` if it lowers the loss (or, once the loss
    is at rounding level, the gradient norm); ``mu`` shrinks tenfold after an accepted step and grows
    tenfold after a rejected one, so the iteration ends as pure Newton, quadratically convergent at a
    nondegenerate minimizer (theory.md §6). Which minimizer it finds depends on ``x0`` (symmetries:
    theory.md §6). ``min_eigenvalue`` is the Hessian's at the end (also with
    ``curvature="gauss_newton"``, which may converge to a saddle); ``strict`` says whether it certifies
    a strict local minimizer (positive beyond its rounding, with ``converged``). The iteration also
    stops, with ``converged=False`` and the reason in ``stopped``, when a step no longer changes ``x``
    or makes no progress. ``gtol`` must be finite and ``>= 0``, ``max_iter`` an integer ``>= 0`` (else
    :class:`~hessinv.InvalidArgumentError`).

    >>> import torch
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> X = torch.randn(30, 2, dtype=torch.float64)
    >>> y = torch.tanh(X @ torch.tensor([[1.0], [-2.0]], dtype=torch.float64))
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 1, bias=False), torch.nn.Tanh()).double()
    >>> est = estimate_minimizer(net, torch.nn.MSELoss(), X, y)
    >>> est.converged, [round(v, 8) for v in est.x.tolist()]
    (True, [1.0, -2.0])
    """
    Op = curvature_class(curvature)
    gtol = _check_tol(gtol, "gtol", allow_zero=True)
    iters = _integer(max_iter)
    if iters is None or iters < 0:
        raise InvalidArgumentError(f"max_iter must be an integer >= 0, got {max_iter!r}")
    net = copy.deepcopy(model if isinstance(model, nn.Module) else nn.Sequential(*model))
    linalg.module_in_precision(net, torch.float64)  # (complex buffers and plain tensor attributes too)
    loss_fn = loss_in_dtype(loss_fn, torch.float64)
    X = inputs.detach().double() if inputs.is_floating_point() else inputs.detach()
    Y = targets.detach().double() if targets.is_floating_point() else targets.detach()
    if x0 is not None:
        set_flat_parameters(net, _vec(x0, "x0"))

    def loss_at() -> float:
        with exact_no_grad():  # (the function the curvature is of: no fused transformer path)
            return float(loss_fn(net(unshared(X)), unshared(Y)))

    def grad_norm() -> float:
        return float(_gradient(net, loss_fn, X, Y).norm())

    history: list[tuple[float, float, float]] = []
    mu_rel, it = 1e-4, 0
    op = Op(net, loss_fn, X, Y)
    gnorm = float(op.gradient.norm())
    radius = 0.5 * max(float(flat_parameters(net).norm()), 1.0)  # step-length cap (a crude trust region)
    stopped = "max_iter"
    while gnorm > gtol and it < iters:
        it += 1
        f0, x = float(op.loss), flat_parameters(net)
        scale = max(op.norm_estimate(), 1e-300)
        lam_base: float | None = None  # max(0, -lambda_min), computed only when C + mu I is indefinite
        accepted, lam = False, math.nan
        for _ in range(80):
            lam = (lam_base or 0.0) + mu_rel * scale
            try:
                F = op.factor(lam)
                if F.inertia.negative:
                    if lam_base is None:
                        lam_base = max(0.0, -_min_eigenvalue(op))
                        continue
                    raise SingularError("C + lambda I is indefinite")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", AccuracyWarning)
                    d = F.solve(op.gradient).to(torch.float64)
            except SingularError:
                mu_rel *= 10.0
                continue
            step = float(d.norm())
            if not math.isfinite(step) or step > radius:  # |d| decreases as lambda grows
                mu_rel *= 10.0
                continue
            if torch.equal(x - d, x):  # below the rounding of x: no step can move it any more
                stopped = "stalled"
                break
            set_flat_parameters(net, x - d)
            f1 = loss_at()
            tiny = 10 * torch.finfo(torch.float64).eps * abs(f0)
            if f1 < f0 - tiny or (f1 <= f0 + tiny and grad_norm() < gnorm):
                accepted = True
                break
            set_flat_parameters(net, x)
            mu_rel, radius = 10.0 * mu_rel, 0.5 * step
        history.append((f0, gnorm, lam))
        if not accepted:
            stopped = stopped if stopped == "stalled" else "no_progress"
            break
        mu_rel, radius = max(mu_rel / 10.0, 1e-16), max(radius, 4.0 * step)
        op = Op(net, loss_fn, X, Y)
        g_prev, gnorm = gnorm, float(op.gradient.norm())
        tiny = 10 * torch.finfo(torch.float64).eps
        if abs(float(op.loss) - f0) <= tiny * abs(f0) and gnorm >= (1.0 - tiny) * g_prev and gnorm > gtol:
            stopped = "stalled"  # accepted on the rounding of two gradient norms: x jitters in place
            break
    if gnorm <= gtol:
        stopped = "converged"
    hessian = (
        op if isinstance(op, curvature_class("hessian")) else curvature_class("hessian")(net, loss_fn, X, Y)
    )
    lam_min = _min_eigenvalue(hessian)
    # zero up to rounding and to what the gradient left (a rescaling symmetry's lambda_min = 0 came out
    # +1e-13 at |g| = 7e-14): sqrt(u) ||H||, the inertia counts' resolution
    resolution = hessian.zero_tolerance()
    return MinimizerEstimate(
        x=flat_parameters(net),
        gradient_norm=gnorm,
        loss=float(op.loss),
        iterations=it,
        converged=gnorm <= gtol,
        min_eigenvalue=lam_min,
        history=history,
        stopped=stopped,
        strict=gnorm <= gtol and lam_min > resolution,
    )
