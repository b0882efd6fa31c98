"""Damping rules: how the Newton optimizer turns ``H`` and ``g`` into a step ``s = -(H + lambda I)^{-1} g``.

Every rule is a small object with one contract (optax style): its mutable state is a plain ``dict``
of Python numbers (so it goes into ``state_dict`` as is), and

================================  ================================================================
method                            does
================================  ================================================================
``init() -> state``               the state before the first step
``propose(sweeps, g, state)``     a :class:`Proposal`: the step ``s`` (before ``lr``) and its ``lambda``
``update(state, proposal, rho)``  ``(new_state, accepted)`` from the ratio ``rho`` of actual to
                                  predicted decrease of the step that was tried
================================  ================================================================

Rules here: :class:`LevenbergMarquardt` (``lambda`` adapted by Nielsen's rule from ``rho``; meant for
the Gauss-Newton matrix, kept positive definite for the Hessian too) and :class:`FixedDamping`
(``lambda = eps`` every step, every step taken: the published baseline that goes uphill along
negative curvature when ``H + eps I`` is indefinite). The default rule, the trust region, lives in
:mod:`hessinv.optim.trust_region`.

Symbols -> names: ``lambda`` -> ``damping``, ``nu`` -> ``nu``, ``rho`` -> ``rho``, ``g`` -> ``gradient``.
"""

from __future__ import annotations

import abc
import copy
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from hessinv.curvature import CurvatureOperator, Factorization
from hessinv.errors import AccuracyWarning, InvalidArgumentError, NonFiniteError, SingularError, warn

__all__ = ["DampingRule", "LevenbergMarquardt", "FixedDamping", "Proposal", "Sweeps"]

State = dict[str, Any]


class Sweeps:
    """The factorizations, solves and products of one optimizer step on one operator, counted and timed.

    A thin meter around the public API: ``op.factor_if_positive_definite`` (the trust region's and
    Levenberg-Marquardt's test-and-factor), ``op.factor``, unrefined ``Factorization.solve`` (the
    trust-region ratio test catches what rounding would spoil), ``Factorization.inverse_quadratic``
    and ``op @ v``.
    """

    def __init__(self, op: CurvatureOperator, shift: float = 0.0, unit: float = 1.0):
        """``shift``: a constant added to the curvature (``H + shift I``, a weight decay's ``lam I``).
        ``unit``: what the objective is scaled by in the model ``op`` is the curvature of (the trust region's
        ``omega f`` for a subsampled loss that sums over the examples): a fixed damping given for ``f``
        is ``unit`` times it here."""
        self.op, self.shift, self.unit = op, float(shift), float(unit)
        self.factorizations = self.solves = self.products = 0
        self.time_factor = self.time_solve = 0.0

    def resolution(self) -> float:
        """:meth:`CurvatureOperator.zero_tolerance`, ``sqrt(u) ||H||`` (three power iterations, cached):
        a failed Cholesky test at a damping below it, or a Rayleigh quotient within it of zero, is rounding
        (a positive semi-definite ``H`` with a null space, e.g. the softmax's shift) and proves no negative
        curvature."""
        return self.op.zero_tolerance(iters=3)  # (3 power iterations: a threshold, not a value)

    def cholesky(self, damping: float) -> Factorization | None:
        """The factorization of ``H + damping I`` if it is positive definite, else None."""
        t = time.perf_counter()
        self.factorizations += 1
        try:
            F = self.op.factor_if_positive_definite(float(damping) + self.shift)
        except (SingularError, NonFiniteError):  # singular (a float32 pivot whose LDL^T broke down): not PD
            F = None
        self.time_factor += time.perf_counter() - t
        return F

    def factor(self, damping: float) -> Factorization:
        """The full factorization of ``H + damping I`` (indefinite allowed; singular raises)."""
        t = time.perf_counter()
        self.factorizations += 1
        try:
            return self.op.factor(float(damping) + self.shift)
        finally:
            self.time_factor += time.perf_counter() - t

    def solve(self, F: Factorization, rhs: Tensor) -> Tensor:
        """``(H + damping I)^{-1} rhs`` for ``rhs`` of shape (n,), without refinement."""
        t = time.perf_counter()
        self.solves += 1
        x = F.solve(rhs, refine=False)
        self.time_solve += time.perf_counter() - t
        assert isinstance(x, Tensor)
        return x

    def refine(self, F: Factorization, rhs: Tensor, x: Tensor) -> Tensor:
        """``x`` after one step of refinement in working precision, ``x + (H + damping I)^{-1} (rhs - (H +
        damping I) x)`` (one product, one sweep). Below float64 an unrefined sweep's error can exceed
        ``cond u`` by 10-400x where a stage has more parameters than its pivot has curvature directions
        (pivot eigenvalues at ``damping`` beside large ones: 0.04-0.8 at ``cond u = 1e-3`` on small
        nets); one step brings it to about ``cond u``."""
        self.products += 1
        r = rhs - (self.op @ x + F.damping * x)  # F.damping includes the shift
        return x + self.solve(F, r)

    def quadratic(self, F: Factorization, v: Tensor) -> float:
        """``v^T (H + damping I)^{-1} v`` from the backward sweep alone (half a solve; counted as one) --
        where the pivots are not exact (:meth:`Factorization._pivots_exact`), ``v^T x`` of an unrefined
        solve: a working-precision value, as the search needs."""
        t = time.perf_counter()
        self.solves += 1
        q = None
        # (the search needs a working-precision value: where the pivots are not exact, inverse_quadratic's
        # refined one escalated to GMRES and a dense LU after an exact fit, 2-5 s a step against 0.1 s; a
        # probe)
        if F._pivots_exact():
            try:
                with warnings.catch_warnings():  # (the ratio test judges the step it leads to)
                    warnings.simplefilter("ignore", AccuracyWarning)
                    q = F.inverse_quadratic(v)
            except (SingularError, NonFiniteError):
                pass  # (a float32 factorization positive definite by rounding whose float64 twin is not)
        if q is None:
            q = float(v.double() @ F.solve(v, refine=False).double())
        self.time_solve += time.perf_counter() - t
        return q

    def matvec(self, v: Tensor) -> Tensor:
        """``H v`` (the ``O(L)`` product)."""
        t = time.perf_counter()
        self.products += 1
        out = self.op @ v
        if self.shift:
            out = out + self.shift * v
        self.time_solve += time.perf_counter() - t
        return out


@dataclass
class Proposal:
    """A step proposed by a damping rule, before ``lr`` scales it.

    Attributes:
        step: ``s`` with ``(H + damping I) s = -g`` (plus, in the trust region's hard case, a multiple of
            an eigenvector for ``lambda_min``).
        damping: ``lambda``.
        factor: the factorization of ``H + lambda I`` the step was solved with.
        radius: the trust-region radius the step was computed for (None for other rules).
        boundary: ``||s|| = radius`` to the subproblem's tolerance (trust region only).
        hard_case: the step was completed to the sphere along an approximate eigenvector of
            ``lambda_min`` (Moré–Sorensen's ``s + tau u``; trust region only).
        lambda_lower: a lower bound on ``-lambda_min(H)`` from failed Cholesky tests (``-inf`` if none);
            the trust region's includes Rayleigh quotients.
        lambda_proved: the part of ``lambda_lower`` that proves negative curvature, above rounding
            (None: the rule does not tell the two apart, ``lambda_lower`` itself).
        positive_definite_at_zero: whether ``H`` itself passed the Cholesky test (None: not tested).
        direction: an estimate of the eigenvector of ``lambda_min(H)`` (trust region only; None if none).
        fallback: a shorter step to try if ``step`` is rejected (the trust region's hard case).
        secular_slope: ``||s||^2 / s^T (H + lambda I)^{-1} s`` at a boundary step (trust region only),
            the slope of Newton's update of ``lambda`` for a new radius (None if not computed).
        lr: the step the ratio test judged is ``d = lr * s`` (the parameter groups' largest ``lr``; set
            by the optimizer before :meth:`DampingRule.update`; None: ``d = s``).
    """

    step: Tensor
    damping: float
    factor: Factorization
    radius: float | None = None
    boundary: bool = False
    hard_case: bool = False
    lambda_lower: float = -math.inf
    positive_definite_at_zero: bool | None = None
    direction: Tensor | None = None
    fallback: Tensor | None = None
    secular_slope: float | None = None
    lambda_proved: float | None = None
    lr: float | None = None


class DampingRule(abc.ABC):
    """The contract every damping rule follows (see the module docstring)."""

    #: what ``Newton(damping=...)`` and the state dict call the rule
    name: str = "rule"
    #: a step is accepted iff ``rho > eta``
    eta: float = 0.0
    #: whether the rule takes a step its model predicts no decrease for (``rho`` is then NaN, not ``-inf``):
    #: a fixed damping's step is taken whatever the prediction (an indefinite ``H + eps I`` may predict an
    #: increase); the trust region and Levenberg-Marquardt reject it
    takes_every_step: bool = False
    #: the constructor arguments that shape the steps: saved with ``Newton``'s state dict and restored from
    #: it, as ``torch.optim`` restores its groups' hyper-parameters
    setting_names: tuple[str, ...] = ()

    def settings(self) -> dict[str, Any]:
        """This rule's :attr:`setting_names` and their values."""
        return {k: getattr(self, k) for k in self.setting_names}

    def with_settings(self, settings: dict[str, Any]) -> DampingRule:
        """This rule with ``settings`` (a checkpoint's :meth:`settings`): itself where they are its own, else
        a copy, the values validated as the constructor validates them (:class:`InvalidArgumentError`)."""
        if (
            not isinstance(settings, dict)
            or not set(settings) <= set(self.setting_names)
            or not all(
                v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
                for v in settings.values()
            )
        ):
            raise InvalidArgumentError(
                f"damping rule settings {settings!r} are not {type(self).__name__}'s {self.setting_names} "
                "as numbers"
            )
        if all(getattr(self, k) == v for k, v in settings.items()):
            return self
        declared = next(c for c in type(self).__mro__ if "setting_names" in vars(c))
        try:
            checked = declared(**{**self.settings(), **settings})  # (the constructor's validation)
        except (TypeError, ValueError, OverflowError) as e:  # (other arguments; int(nan), int(inf))
            raise InvalidArgumentError(
                f"{type(self).__name__} cannot take the checkpoint's settings {settings!r}: {e}"
            ) from e
        rule = copy.copy(self)
        for k in settings:
            setattr(rule, k, getattr(checked, k))
        return rule

    def accept(self, rho: float) -> bool:
        """Whether a step with ratio ``rho`` is accepted (used for backtracked steps too)."""
        return rho > self.eta

    @abc.abstractmethod
    def init(self) -> State:
        """The rule's state before the first step."""

    @abc.abstractmethod
    def propose(self, sweeps: Sweeps, gradient: Tensor, state: State) -> Proposal:
        """The step to try, for the curvature in ``sweeps.op`` and the (batch) gradient."""

    @abc.abstractmethod
    def update(self, state: State, proposal: Proposal, rho: float) -> tuple[State, bool]:
        """``(new_state, accepted)`` given ``rho`` = actual / predicted decrease of the tried step."""


def _check_positive(name: str, value: float, allow_zero: bool = False) -> float:
    value = float(value)
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise InvalidArgumentError(
            f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}"
        )
    return value


class LevenbergMarquardt(DampingRule):
    """Levenberg–Marquardt damping with Nielsen's update.

    ``s = -(H + lambda I)^{-1} g``. A step is accepted when ``rho > eta``; then
    ``lambda <- lambda * max(1/3, 1 - (2 rho - 1)^3)`` and ``nu <- 2``; otherwise
    ``lambda <- lambda * nu`` and ``nu <- 2 nu`` (Nielsen 1999, as in levmar and Ceres).
    If ``H + lambda I`` is not positive definite (possible for the Hessian, never for Gauss-Newton
    with ``lambda > 0``), ``lambda`` is multiplied by 4 until it is, so the step is always a descent
    direction. The first ``lambda`` defaults to ``1e-3 * ||H||`` (a power-iteration estimate).

    >>> LevenbergMarquardt(damping=1.0).init()
    {'damping': 1.0, 'nu': 2.0}
    """

    name = "levenberg-marquardt"
    setting_names = ("damping", "eta", "min_damping", "max_damping")

    def __init__(
        self,
        damping: float | None = None,
        eta: float = 1e-4,
        min_damping: float = 1e-12,
        max_damping: float = 1e12,
    ):
        self.damping = None if damping is None else _check_positive("damping", damping)
        self.eta = _check_positive("eta", eta, allow_zero=True)
        self.min_damping = _check_positive("min_damping", min_damping)
        self.max_damping = _check_positive("max_damping", max_damping)
        if self.min_damping > self.max_damping:
            raise InvalidArgumentError(f"min_damping {min_damping} exceeds max_damping {max_damping}")

    def __repr__(self) -> str:
        return f"LevenbergMarquardt(damping={self.damping}, eta={self.eta})"

    def init(self) -> State:
        return {"damping": -1.0 if self.damping is None else self.damping, "nu": 2.0}

    def propose(self, sweeps: Sweeps, gradient: Tensor, state: State) -> Proposal:
        lam = float(state["damping"])
        if lam <= 0:  # first step: scale by the curvature
            lam = min(max(1e-3 * sweeps.op.norm_estimate(iters=10), self.min_damping), self.max_damping)
        F = sweeps.cholesky(lam)
        failed = -math.inf  # the largest lambda whose Cholesky test failed: lambda_min(H) < -failed
        while F is None:
            failed = lam
            if lam >= self.max_damping:
                raise SingularError(
                    f"H + lambda I is not positive definite even at lambda = {lam:g}", damping=lam
                )
            lam = min(4 * lam, self.max_damping)
            F = sweeps.cholesky(lam)
        step = -sweeps.solve(F, gradient)
        return Proposal(step, lam, F, lambda_lower=failed)

    def update(self, state: State, proposal: Proposal, rho: float) -> tuple[State, bool]:
        lam, nu = proposal.damping, float(state["nu"])
        accepted = self.accept(rho)
        if accepted:
            lam, nu = lam * max(1 / 3, 1 - (2 * min(rho, 1.0) - 1) ** 3), 2.0
        else:
            lam, nu = lam * nu, 2 * nu
        lam = min(max(lam, self.min_damping), self.max_damping)
        return {"damping": lam, "nu": nu}, accepted


class FixedDamping(DampingRule):
    """``s = -(H + eps I)^{-1} g`` with a fixed ``eps``, every step taken (for experiments).

    With an indefinite ``H + eps I`` this step can go uphill (its predicted decrease is negative):
    this is the baseline the trust region exists to beat; the first such step warns (once per rule).
    Raises :class:`~hessinv.SingularError` when ``H + eps I`` is singular.

    >>> FixedDamping(0.1).init()
    {}
    """

    name = "fixed"
    setting_names = ("damping",)

    def __init__(self, damping: float):
        self.damping = _check_positive("damping", damping, allow_zero=True)

    def __repr__(self) -> str:
        return f"FixedDamping({self.damping})"

    def init(self) -> State:
        return {}

    def propose(self, sweeps: Sweeps, gradient: Tensor, state: State) -> Proposal:
        eps = self.damping * sweeps.unit  # in the units of the model the sweeps' operator is of
        F = sweeps.factor(eps)
        if not F.positive_definite and not getattr(self, "_warned", False):
            # once per rule: a review passed damping=1e-2 to Newton on mini-batches (it selects this rule)
            # and every one of 100 steps met an indefinite H + eps I; the loss rose to 7e4 unremarked
            self._warned = True
            warn(
                f"FixedDamping({self.damping:g}): H + eps I is indefinite ({F.inertia.negative} negative "
                "eigenvalues), so the step -(H + eps I)^-1 g may go uphill, and every step is taken; "
                "damping='trust-region' (Newton's default) never steps uphill, and a larger eps or "
                "curvature='gauss_newton' gives a positive definite system"
            )
        return Proposal(-sweeps.solve(F, gradient), eps, F)

    takes_every_step = True

    def accept(self, rho: float) -> bool:
        """Every step, uphill too (``rho`` NaN where the model predicted no decrease) -- but not one to a
        non-finite loss (``rho = -inf``): it is undone."""
        return rho != -math.inf

    def update(self, state: State, proposal: Proposal, rho: float) -> tuple[State, bool]:
        return dict(state), self.accept(rho)
