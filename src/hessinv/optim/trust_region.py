r"""The trust-region subproblem, solved exactly (Moré–Sorensen) with the Riccati factorization.

The subproblem, for the curvature ``H`` (indefinite allowed), gradient ``g`` and radius ``Delta``::

    minimize  m(s) = g^T s + 1/2 s^T H s   subject to  ||s|| <= Delta

has a global solution ``s* = -(H + lambda* I)^{-1} g`` with ``lambda* >= max(0, -lambda_min(H))``
and ``lambda* (Delta - ||s*||) = 0`` (Gay 1981; Moré & Sorensen 1983). Because the Riccati sweep is
Gaussian elimination of ``H + lambda I`` itself, *"every pivot has a Cholesky factor"* is exactly
*"``H + lambda I`` is positive definite"* (math.md §2): the test that keeps ``lambda`` above
``-lambda_min`` costs one sweep that stops at the first bad pivot, and ``lambda_min`` is never computed.

Symbols -> names:

===========================  ===================================================================
symbol                       code
===========================  ===================================================================
``Delta``                    ``radius``
``lambda``                   ``lam``; bracket ``[lam_lo, lam_hi]`` for ``lambda*``
``s(lambda)``                ``s = -(H + lam I)^{-1} g``
``phi(lambda)``              ``1/||s|| - 1/Delta`` (concave, increasing on ``(-lambda_min, inf)``)
``||q||^2``                  ``s^T (H + lam I)^{-1} s`` (backward half of a solve, same factorization)
``u``                        unit vector with small ``u^T (H + lam I) u`` (inverse iteration)
``tau``                      ``||s + tau u|| = Delta`` (the hard case)
===========================  ===================================================================

Newton's method on the secular equation ``phi(lambda) = 0`` is

    lambda+ = lambda + (||s||^2 / ||q||^2) (||s|| - Delta) / Delta

(``d||s||/dlambda = -||q||^2 / ||s||``). From the left of ``lambda*`` (``||s|| > Delta``) the iterates
increase monotonically to ``lambda*``; from the right they may leave the positive definite region,
which the bracket safeguard catches. A ``lambda`` whose sweep fails the Cholesky test raises the lower
end of the bracket; an interior solve (``||s|| < Delta``, ``lambda > 0``) lowers the upper end and,
through the Rayleigh quotient of ``u``, gives ``lambda - u^T (H + lambda I) u <= -lambda_min``.

Termination (``sigma = rtol (2 - rtol)``, so ``1 - sigma = (1 - rtol)^2``); each gives
``m(s) <= (1 - sigma) m*`` (checked against a dense eigendecomposition in the tests):

* boundary: ``| ||s|| - Delta | <= rtol Delta`` (Moré & Sorensen's test; a step outside the ball is
  then scaled onto the sphere, which keeps it a descent direction of the model);
* interior: ``lambda (Delta^2 - ||s||^2) <= sigma / (1 - sigma) (s^T (H + lambda I) s + lambda ||s||^2)``
  -- the Lagrangian bound ``m* >= m(s) - lambda (Delta^2 - ||s||^2) / 2`` and
  ``-m(s) = (s^T (H + lambda I) s + lambda ||s||^2) / 2``; covers ``lambda = 0`` and a singular positive
  semi-definite ``H`` (cross-entropy's Hessian always is: softmax ignores a common shift of the logits);
* hard case: ``tau^2 u^T (H + lambda I) u <= sigma (s^T (H + lambda I) s + lambda Delta^2)``
  -- then ``s + tau u`` qualifies (Moré & Sorensen 1983, Lemma 3.4).

Warm starts: ``lambda = 0`` is tried first (a Newton step inside the region costs one factorization),
unless the caller passes the previous step's eigenvector estimate ``direction``, whose Rayleigh
quotient already proves negative curvature, or says the previous ``H`` was indefinite
(``start_at_guess``); then ``damping_init`` starts the iteration. :class:`TrustRegion` passes Newton's
secular update of the previous ``lambda`` to the new radius (exact for the model after a rejected
step): on the digits benchmark this and ``start_at_guess`` cut the factorizations per step from
about 3 to 2.5.

Example: the step on a small tanh chain lies in the ball, and ``H + lambda I`` is positive definite.

>>> import torch, hessinv
>>> from hessinv.optim.damping import Sweeps
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
>>> H = hessinv.hessian(net, torch.nn.MSELoss(), torch.randn(16, 3, dtype=torch.float64),
...                     torch.randn(16, 1, dtype=torch.float64))
>>> sol = solve_subproblem(Sweeps(H), H.gradient, radius=0.5)
>>> bool(sol.step.norm() <= 0.5 * (1 + 1e-12)), bool(H.is_positive_definite(sol.damping))
(True, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from hessinv.curvature import Factorization, _shift_limit
from hessinv.errors import InvalidArgumentError, SingularError
from hessinv.optim.damping import DampingRule, Proposal, State, Sweeps, _check_positive

__all__ = ["TrustRegion", "SubproblemSolution", "solve_subproblem"]


@dataclass
class SubproblemSolution:
    """What :func:`solve_subproblem` returns.

    Attributes:
        step: ``s`` with ``||s|| <= radius``.
        damping: ``lambda``; ``H + lambda I`` is positive definite.
        factor: the factorization of ``H + lambda I``.
        boundary: ``||s|| = radius`` to the solver's tolerance (``| ||s|| - radius | <= rtol radius``:
            up to ``rtol`` inside the sphere).
        hard_case: ``s`` was completed to the sphere along an approximate eigenvector ``u`` of
            ``lambda_min`` (``s(lambda) + tau u``, taken when Moré–Sorensen's Lemma 3.4 test stops the
            iteration): in the hard case, and wherever that test passes first -- near it, or where the
            step along ``u`` already gives the required model decrease -- and when ``max_iter`` or the
            bracket on ``lambda`` runs out (then only as accurate as the budget allowed: 0.56 of the
            optimal model decrease at ``max_iter = 1`` in a probe). Not a diagnosis that ``g`` is
            (nearly) orthogonal to ``u``: a probe saw it with ``|g . u1| / |g|`` up to 0.29.
        iterations: factorizations spent.
        lambda_lower: lower bound on ``-lambda_min(H)`` from the failed tests and Rayleigh quotients
            (``-inf``: none), which steers the next subproblem's start.
        lambda_proved: ``lambda_lower`` where it stands above the rounding ``sqrt(u) ||H||``
            (:meth:`Sweeps.resolution`), else ``-inf``: a proof of negative curvature.
        positive_definite_at_zero: whether ``H`` itself passed the Cholesky test (None: not tried).
        direction: the latest estimate of the eigenvector of ``lambda_min(H)`` (None if none was
            made); pass it as ``direction`` to the next solve.
        alternative: in the hard case, the step with the other root ``tau'`` (also on the sphere,
            with a model value no lower; for experiments). None otherwise.
        fallback: in the hard case, ``s = -(H + lambda I)^{-1} g`` alone: the exact solution of the
            subproblem with the smaller radius ``||s||`` (what to try if ``step`` is rejected).
    """

    step: Tensor
    damping: float
    factor: Factorization
    boundary: bool
    hard_case: bool
    iterations: int
    lambda_lower: float
    positive_definite_at_zero: bool | None
    direction: Tensor | None = None
    alternative: Tensor | None = None
    fallback: Tensor | None = None
    lambda_proved: float = -math.inf


def _dot(a: Tensor, b: Tensor) -> float:
    return float(torch.dot(a.double(), b.double()))


def _safeguard(lo: float, hi: float) -> float:
    """A point strictly inside ``(lo, hi)``, geometric when possible (Moré–Sorensen's rule)."""
    return max(math.sqrt(max(lo, 0.0) * hi), 1e-3 * hi, lo + 1e-2 * (hi - lo))


def _inverse_iteration(
    sweeps: Sweeps, F: Factorization, iters: int, start: Tensor | None = None
) -> tuple[Tensor, float]:
    """A unit ``u`` and ``u^T (H + lambda I) u`` by inverse iteration with the (PD) factorization ``F``.

    With ``w = (H + lambda I)^{-1} v``: ``u = w / ||w||`` has ``u^T (H + lambda I) u = (v . w) / ||w||^2``,
    so no product with ``H`` is needed. The start vector is ``start`` (e.g. the previous step's ``u``)
    or a fixed seeded one, so steps are reproducible.
    """
    if start is None:
        gen = torch.Generator(device="cpu").manual_seed(1234)
        start = torch.randn(sweeps.op.shape[0], generator=gen, dtype=torch.float64)
    v = start.to(dtype=sweeps.op.dtype, device=sweeps.op.device)
    v = v / v.norm()
    rq = math.inf
    for _ in range(max(iters, 1)):
        w = sweeps.solve(F, v)
        wn = float(w.norm())
        if not math.isfinite(wn) or wn == 0.0:
            break
        rq = _dot(v, w) / wn**2
        v = w / wn
    return v, max(rq, 0.0)


def _boundary_taus(s: Tensor, u: Tensor, radius: float, lam: float, uAu: float) -> tuple[float, float]:
    """The roots ``tau`` of ``||s + tau u|| = radius`` (``u`` unit), the smaller model value first."""
    su, ss = _dot(s, u), _dot(s, s)
    disc = math.sqrt(max(su * su + radius * radius - ss, 0.0))
    roots = sorted((-su - disc, -su + disc), key=lambda t: -t * lam * su + 0.5 * t * t * (uAu - lam))
    # m(s + tau u) - m(s) = -tau lam (s.u) + tau^2/2 (u^T H u),  u^T H u = uAu - lam
    return roots[0], roots[1]


#: the largest radius, and TrustRegion's max_radius (the subproblem squares radii in float64)
MAX_RADIUS = 1e150


def solve_subproblem(
    sweeps: Sweeps,
    gradient: Tensor,
    radius: float,
    *,
    damping_init: float = 0.0,
    direction: Tensor | None = None,
    rtol: float = 0.1,
    max_iter: int = 30,
    inverse_iterations: int = 3,
    start_at_guess: bool = False,
) -> SubproblemSolution:
    """Solve ``min g^T s + 1/2 s^T H s  s.t. ||s|| <= radius`` to relative accuracy ``rtol``.

    Args:
        sweeps: the operator ``H`` (``sweeps.op``) with counters for factorizations and solves.
        gradient: ``g`` (may differ from ``sweeps.op.gradient``, e.g. a larger batch than the curvature).
        radius: ``Delta > 0`` (beyond :data:`MAX_RADIUS`, or beyond ``1e-4 sqrt`` of the largest number of
            the operator's dtype -- 1.8e15 in float32 -- taken as that).
        damping_init: a guess for ``lambda*`` (the previous step's).
        direction: a guess for the eigenvector of ``lambda_min(H)`` (the previous step's ``u``). Its
            Rayleigh quotient proves ``-lambda_min >= -u^T H u`` for one product with ``H``, which spares
            failing Cholesky tests below that bound, and it starts the inverse iteration.
            Without a proof of negative curvature, ``lambda = 0`` is tried first, so a Newton step
            inside the region costs one factorization.
        rtol: boundary tolerance; the model value is within a factor ``1 - rtol (2 - rtol)`` of optimal.
        max_iter: factorizations after which the best step at hand is returned.
        inverse_iterations: solves per estimate of the eigenvector of ``lambda_min`` (hard case).
        start_at_guess: start from ``damping_init`` (if > 0) instead of testing ``lambda = 0`` first
            (for a caller that expects ``H`` to be indefinite, e.g. because the previous one was).
    """
    if not (math.isfinite(radius) and radius > 0):
        raise InvalidArgumentError(f"radius must be finite and > 0, got {radius}")
    # (its square stays a float64 number, and a step on the sphere a number of the model's dtype -- a
    # float32 model's step of 1e100 overflowed in its product with H; no step is that long)
    radius = min(radius, MAX_RADIUS, 1e-4 * math.sqrt(torch.finfo(sweeps.op.dtype).max))
    g = gradient
    gnorm = float(g.double().norm())
    sigma = rtol * (2 - rtol)
    lo, hi = 0.0, math.inf  # bracket for lambda*
    lam_psd = -math.inf  # proved: -lambda_min(H) >= lam_psd
    pd0: bool | None = None
    interior: tuple | None = None  # (F, s, u, uAu) of the latest PD interior point
    u_last: Tensor | None = None
    lam = 0.0
    if direction is not None and direction.shape == g.shape and bool(torch.isfinite(direction).all()):
        u_last = direction / direction.norm()
        rq = _dot(u_last, sweeps.matvec(u_last))  # >= lambda_min(H)
        lam_psd = max(lam_psd, -rq)
        if -rq > 0:  # H is indefinite: lambda* > -rq, skip the test at 0
            lo = -rq
            lam = max(damping_init, 1.05 * lo)
    if lam == 0.0 and start_at_guess and damping_init > 0:
        lam = damping_init
    it = 0
    if gnorm == 0.0 and lam_psd <= 0.0:
        # g = 0 (an exact fit: loss and gradient exactly 0): s = 0 is optimal where H has no negative
        # curvature -- the iteration below ran max_iter factorizations a step there, and a float32 one
        # overflowed (a probe). One sweep at 64 u ||H|| bounds lambda_min(H) > -64 u ||H||, and inverse
        # iteration with it finds a direction of curvature below -4 u ||H|| where there is one (a float32
        # saddle at -3e-6 ||H||, which a review found left unescaped by the sweep alone): the hard case
        # below takes it from there; else the step is zero
        it = 1
        u = torch.finfo(sweeps.op.dtype).eps
        norm = sweeps.resolution() / math.sqrt(u)  # (the resolution is sqrt(u) ||H||)
        F0 = sweeps.cholesky(max(64 * u * norm, torch.finfo(sweeps.op.dtype).tiny))
        if F0 is not None:
            v, _ = _inverse_iteration(sweeps, F0, inverse_iterations, u_last)
            rq = _dot(v, sweeps.matvec(v))  # >= lambda_min(H)
            if not rq < -4 * u * norm:
                return SubproblemSolution(
                    torch.zeros_like(g),
                    F0.damping - sweeps.shift,
                    F0,
                    False,
                    False,
                    it,
                    lam_psd,
                    None,
                    u_last,
                )
            u_last, lam_psd, lo = v, -rq, -rq
            lam = max(damping_init, 1.05 * lo)

    def result(step: Tensor, F: Factorization, boundary: bool, hard: bool) -> SubproblemSolution:
        # lambda is the rule's: F factors H + (lambda + shift) I, the shift a weight decay's (Sweeps)
        sol = SubproblemSolution(step, F.damping - sweeps.shift, F, boundary, hard, it, lam_psd, pd0, u_last)
        # what it proves: a positive semi-definite H's null space fails the Cholesky test, and gives
        # Rayleigh quotients below 0, at rounding level -- no negative curvature
        sol.lambda_proved = lam_psd if lam_psd > sweeps.resolution() else -math.inf
        return sol

    def hard_step(F: Factorization, s: Tensor, u: Tensor, uAu: float) -> SubproblemSolution:
        tau, tau_other = _boundary_taus(s, u, radius, F.damping, uAu)
        sol = result(s + tau * u, F, True, True)
        sol.alternative, sol.fallback = s + tau_other * u, s
        return sol

    def grow(lam: float) -> float:
        return max(4.0 * lam, gnorm / radius, 1e-12)

    # the largest damping the sweep takes (its shift limit): a radius shrunk towards 0 -- every step
    # rejected at a minimum where the loss no longer changes in working precision (a float32 loss of
    # exactly 0) -- asks for a lambda beyond it (an error about a damping the user never passed)
    cap = 0.5 * _shift_limit(sweeps.op.dtype) - abs(sweeps.shift)
    while True:
        it += 1
        capped = lam >= cap
        lam = min(lam, cap)
        F = sweeps.cholesky(lam)
        if capped and F is None:
            error = SingularError(
                f"the trust region's damping reached {cap:.3g}, the largest {sweeps.op.dtype} takes, with "
                "H + lambda I still not positive definite: H is beyond the dtype's range (rescale the "
                "loss or the outputs, use a float64 model, or mode='precondition')"
            )
            error.beyond_range = True  # (mode="auto"'s trust region hands back to preconditioning)
            raise error
        if lam == 0.0 and pd0 is None:
            pd0 = F is not None
        if F is None:  # lam <= -lambda_min: raise the lower end
            lam_psd = max(lam_psd, lam)
            lo = max(lo, lam)
            if math.isfinite(hi):
                if interior is not None and (hi - lo <= 1e-12 * hi or it > max_iter):
                    return hard_step(*interior)
                lam = _safeguard(lo, hi)
            elif lam == 0.0:
                lam = damping_init if damping_init > 0 else gnorm / radius
                if lam <= 0.0:  # g = 0 at a point of negative curvature
                    lam = max(sweeps.op.norm_estimate(iters=10), 1e-12)
            else:
                lam = grow(lam)
            continue

        s = -sweeps.solve(F, g)
        snorm = float(s.double().norm())
        if capped and snorm > radius:  # as damped as it gets: the step shortened onto the sphere
            return result(s * (radius / snorm), F, True, False)
        if not math.isfinite(snorm):  # numerically singular despite Cholesky: treat as too small
            lo = max(lo, lam)
            lam = _safeguard(lo, hi) if math.isfinite(hi) else grow(lam)
            continue
        if abs(snorm - radius) <= rtol * radius:
            return result(s * min(1.0, radius / snorm), F, True, False)
        if snorm > radius:  # lam < lambda*: Newton from the left (monotone)
            lo = max(lo, lam)
            if it >= max_iter:
                return result(s * (radius / snorm), F, True, False)
            qq = sweeps.quadratic(F, s)
            lam_new = lam + (snorm * snorm / qq) * (snorm - radius) / radius if qq > 0 else math.inf
            if not lo < lam_new < hi:
                lam_new = _safeguard(lo, hi) if math.isfinite(hi) else grow(lam)
            lam = lam_new
            continue

        # interior: ||s|| < (1 - rtol) Delta
        curv = -_dot(g, s)  # s^T (H + lam I) s
        if lam * (radius**2 - snorm**2) <= sigma / (1 - sigma) * (curv + lam * snorm**2):
            return result(s, F, False, False)
        hi = min(hi, lam)
        u, uAu = _inverse_iteration(sweeps, F, inverse_iterations, u_last)
        u_last = u
        lam_psd = max(lam_psd, lam - uAu)
        lo = max(lo, lam - uAu)
        interior = (F, s, u, uAu)
        tau = _boundary_taus(s, u, radius, lam, uAu)[0]
        if tau * tau * uAu <= sigma * (curv + lam * radius**2) or it >= max_iter or hi - lo <= 1e-12 * hi:
            return hard_step(F, s, u, uAu)
        qq = sweeps.quadratic(F, s)
        lam_new = lam + (snorm * snorm / qq) * (snorm - radius) / radius if qq > 0 else -math.inf
        lam = lam_new if lo < lam_new < hi else _safeguard(lo, hi)


class TrustRegion(DampingRule):
    """Trust-region damping: each step solves the subproblem exactly (:func:`solve_subproblem`).

    ``lambda`` is whatever puts the step on the sphere ``||s|| = radius`` (or 0 for an interior Newton
    step), never below ``-lambda_min(H)``: the step is a descent direction of the model even where
    ``H`` is indefinite, and along negative curvature it goes *down*. The radius follows the ratio
    ``rho`` of actual to predicted decrease: a step is accepted iff ``rho > eta``; the radius becomes
    ``shrink * min(radius, ||s||)`` if ``rho < 0.25`` and ``min(grow * radius, max_radius)`` if
    ``rho > 0.75`` on the boundary.

    Args:
        radius: the first radius ``Delta`` (in parameter units; at most :data:`MAX_RADIUS`, larger
            values are taken as it).
        max_radius: the radius never grows beyond this (nor beyond :data:`MAX_RADIUS`).
        eta: acceptance threshold on ``rho`` (``0 <= eta < 0.25``).
        shrink, grow: radius factors after a poor (``rho < 0.25``) and a very good boundary step.
        rtol: the subproblem's boundary tolerance (its model value is within ``1 - rtol (2 - rtol)`` of
            the optimum; see :func:`solve_subproblem`).
        max_iter: factorizations per subproblem after which the best step at hand is returned.
        inverse_iterations: solves per eigenvector estimate in the hard case.

    The state carries ``lambda`` for the next start (Newton's secular update to the new radius), the
    latest eigenvector estimate of ``lambda_min`` and whether ``H`` was indefinite (then the next
    subproblem skips the test at ``lambda = 0``).

    >>> tr = TrustRegion(radius=0.5)
    >>> tr.init()
    {'radius': 0.5, 'damping': 0.0, 'direction': None, 'indefinite': False}
    """

    name = "trust-region"
    setting_names = (
        "radius", "max_radius", "eta", "shrink", "grow", "rtol", "max_iter", "inverse_iterations",
    )  # fmt: skip

    def __init__(
        self,
        radius: float = 1.0,
        max_radius: float = 1e4,
        eta: float = 1e-4,
        shrink: float = 0.25,
        grow: float = 2.0,
        rtol: float = 0.1,
        max_iter: int = 30,
        inverse_iterations: int = 3,
    ):
        # (beyond MAX_RADIUS the subproblem's tests would square a radius out of float64's range; no step
        # is that long, so a larger value -- an old checkpoint's max_radius of 1e200 -- is that bound)
        self.radius = min(_check_positive("radius", radius), MAX_RADIUS)
        self.max_radius = min(_check_positive("max_radius", max_radius), MAX_RADIUS)
        self.eta = _check_positive("eta", eta, allow_zero=True)
        self.shrink = _check_positive("shrink", shrink)
        self.grow = _check_positive("grow", grow)
        self.rtol = _check_positive("rtol", rtol)
        if not (self.eta < 0.25):
            raise InvalidArgumentError(f"eta must be < 0.25 (the shrink threshold), got {eta}")
        if not (self.shrink < 1 < self.grow):
            raise InvalidArgumentError(f"need shrink < 1 < grow, got shrink={shrink}, grow={grow}")
        if not (self.rtol < 1):
            raise InvalidArgumentError(f"rtol must be in (0, 1), got {rtol}")
        if self.radius > self.max_radius:
            raise InvalidArgumentError(f"radius {radius} exceeds max_radius {max_radius}")
        if int(max_iter) < 1:
            raise InvalidArgumentError(f"max_iter must be >= 1, got {max_iter}")
        self.max_iter = int(max_iter)
        if int(inverse_iterations) < 1:
            raise InvalidArgumentError(f"inverse_iterations must be >= 1, got {inverse_iterations}")
        self.inverse_iterations = int(inverse_iterations)

    def __repr__(self) -> str:
        return f"TrustRegion(radius={self.radius}, max_radius={self.max_radius}, eta={self.eta})"

    def init(self) -> State:
        return {"radius": self.radius, "damping": 0.0, "direction": None, "indefinite": False}

    def propose(self, sweeps: Sweeps, gradient: Tensor, state: State) -> Proposal:
        radius = min(float(state["radius"]), self.max_radius)
        sol = solve_subproblem(
            sweeps,
            gradient,
            radius,
            damping_init=float(state["damping"]),
            direction=state.get("direction"),
            rtol=self.rtol,
            max_iter=self.max_iter,
            inverse_iterations=self.inverse_iterations,
            start_at_guess=bool(state.get("indefinite", False)),
        )
        slope = None
        if sol.boundary and not sol.hard_case:  # for the next start (see update): half a solve
            qq = sweeps.quadratic(sol.factor, sol.step)
            slope = _dot(sol.step, sol.step) / qq if qq > 0 else None
        return Proposal(
            sol.step, sol.damping, sol.factor, radius, sol.boundary, sol.hard_case,
            sol.lambda_lower, sol.positive_definite_at_zero, sol.direction, sol.fallback, slope,
            lambda_proved=sol.lambda_proved,
        )  # fmt: skip

    def update(self, state: State, proposal: Proposal, rho: float) -> tuple[State, bool]:
        """New radius from ``rho``; the next subproblem starts from Newton's secular update of this
        step's ``lambda`` to the new radius, ``lambda + ||s||^2 / ||q||^2 (||s|| - Delta') / Delta'`` (exact
        model after a rejected step, when ``H`` is the same; a prediction otherwise)."""
        radius = min(float(state["radius"]), self.max_radius)
        snorm = float(proposal.step.double().norm())
        # the ratio test judged the step taken, d = lr s, and the radius bounds s: a rejected step shrinks
        # it below ||s|| (the next d below shrink ||d|| at the same lr); a good boundary step grows it,
        # whatever lr -- by less where lr fell since the step before (a schedule's decay), which the growth
        # would otherwise undo (lr halved each step left ||d|| at 0.5 while the radius doubled to 8192)
        lr = 1.0 if proposal.lr is None else float(proposal.lr)
        previous = state.get("lr")
        if rho < 0.25:
            radius = self.shrink * min(radius, snorm) if snorm > 0 else self.shrink * radius
        elif rho > 0.75 and proposal.boundary:
            fell = lr / previous if previous is not None and 0 < lr < previous else 1.0
            radius = min(max(self.grow * fell, 1.0) * radius, self.max_radius)
        radius = max(radius, 1e-300)
        lam = proposal.damping
        if proposal.secular_slope is not None and snorm > 0:
            lam = max(lam + proposal.secular_slope * (snorm - radius) / radius, 0.0)
        direction = proposal.direction if proposal.direction is not None else state.get("direction")
        indefinite = proposal.lambda_lower > 0 or proposal.positive_definite_at_zero is False
        new = {"radius": radius, "damping": lam, "direction": direction, "indefinite": indefinite, "lr": lr}
        return new, self.accept(rho)
