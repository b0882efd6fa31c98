r"""``Newton``: SGD preconditioned by the exact (stochastic) Hessian, downhill even where ``H`` is indefinite.

One call of :meth:`Newton.step` on a batch ``(X, y)``:

1. *derivatives*: the curvature operator ``H`` (Hessian, or Gauss-Newton ``G``) of the loss on the
   curvature batch (all of ``X``, or a random subset of ``curvature_batch_size`` examples), and the
   gradient ``g`` and loss ``f`` on all of ``X``;
2. *proposal*: the damping rule turns ``(H, g)`` into ``s = -(H + lambda I)^{-1} g`` -- by default the
   exact trust-region step (:mod:`hessinv.optim.trust_region`), whose ``lambda >= -lambda_min(H)`` is
   certified by the Cholesky test of the Riccati sweep;
3. *ratio test*: the step taken is ``d = lr * s``; with the model ``m(d) = g^T d + 1/2 d^T H d``::

       pred = -m(d),   actual = f(x) - f(x + d),   rho = (actual + delta) / (pred + delta)

   where ``delta = 10 u |f(x)|`` (``u`` the unit roundoff of the model's dtype) keeps ``rho`` meaningful
   when both decreases are at rounding level (Conn, Gould & Toint 2000, §17.4.2). The rule accepts
   the step (trust region and Levenberg–Marquardt: iff ``rho > eta``) or the parameters are restored
   exactly, and the rule updates its radius / damping from ``rho``.

   *Hard-case fallback.* A trust-region step in the (near) hard case is ``s + tau u`` with ``u`` the
   eigenvector of ``lambda_min``: it goes to the sphere along the most negative curvature, where the
   loss's third-order terms are largest. When the ratio test rejects it, its interior part
   ``s = -(H + lambda I)^{-1} g`` is tried in the same call (one more forward pass): with
   ``H + lambda I`` positive definite, ``s`` is the *exact* solution of the subproblem on the smaller
   ball ``||x|| <= ||s||``, the step the next call would take after shrinking the radius; it is judged
   by the same rule (the radius still shrinks). On the digits benchmark this removed three quarters
   of the rejected steps. Optionally (``backtracking=k``) a rejected step is also halved up to ``k``
   times, each try judged by the same rule.

After a rejected step on the same batch (same tensors, unchanged) the operator is reused: the point
is the same, so is ``H``. Products with an operator are only valid while the parameters are those it
was built at (its blocks read the live weights), so every product is taken before the trial points.

``f`` and ``actual`` are measured on the batch the gradient is taken on (which *is* the curvature batch
unless ``curvature_batch_size`` subsamples it): the step is built to decrease that loss, so the test
judges it there, with the subsampled curvature in the model (the sub-sampled trust region of Xu,
Roosta & Mahoney 2020).

Example (a linear least-squares chain: the Hessian is exact and constant, so Newton converges at once):

>>> import torch, hessinv, hessinv.optim
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> X = torch.randn(64, 5, dtype=torch.float64)
>>> y = X @ torch.randn(5, 1, dtype=torch.float64) + 0.1 * torch.randn(64, 1, dtype=torch.float64)
>>> net = torch.nn.Sequential(torch.nn.Linear(5, 1)).double()
>>> opt = hessinv.optim.Newton(net, torch.nn.MSELoss())
>>> losses = [float(opt.step(X, y)) for _ in range(3)]
>>> g = hessinv.hessian(net, torch.nn.MSELoss(), X, y).gradient
>>> bool(g.norm() < 1e-10), opt.last_stats.accepted
(True, True)
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from hessinv.chain import Chain
from hessinv.curvature import CurvatureOperator, GaussNewton, Hessian
from hessinv.errors import NonFiniteError, SingularError
from hessinv.optim.damping import DampingRule, FixedDamping, LevenbergMarquardt, Sweeps
from hessinv.optim.trust_region import TrustRegion
from hessinv.riccati import Inertia

__all__ = ["Newton", "StepStats"]

_CURVATURES = {"hessian": Hessian, "gauss_newton": GaussNewton}
_RULES: dict[str, Callable[[], DampingRule]] = {
    "trust-region": TrustRegion,
    "levenberg-marquardt": LevenbergMarquardt,
}


@dataclass
class StepStats:
    """What one :meth:`Newton.step` did (``opt.last_stats``; also passed to ``callback``).

    Attributes:
        step: steps taken so far, this one included (accepted or not).
        loss: batch loss before the step (what ``step`` returns).
        loss_after: batch loss at the trial point ``x + d`` (the new loss if accepted).
        predicted_decrease: ``-(g^T d + 1/2 d^T H d)`` for the step tried, ``d = lr * s``.
        actual_decrease: ``loss - loss_after``.
        rho: the ratio of the two, with the rounding guard (see the module docstring).
        accepted: whether the parameters moved.
        damping: ``lambda`` of ``H + lambda I``.
        radius: the trust-region radius the step was computed for (None for other rules).
        step_norm: ``||d||``.
        boundary: the step is on the trust-region sphere.
        hard_case: the Moré–Sorensen hard case occurred.
        inertia: inertia of ``H + lambda I`` (the factorization the step was solved with; positive
            definite except with a fixed damping).
        inertia_at_zero: inertia of ``H`` itself (``Newton(track_inertia=True)``, two extra
            factorizations per step, zero eigenvalues counted with tolerance ``sqrt(u) ||H||``);
            else ``(0, 0, n)`` when ``H`` passed the Cholesky test at 0, else None.
        negative_curvature: ``H`` has a negative eigenvalue (True: proved by a failed Cholesky test
            at some ``lambda > 0`` or a Rayleigh quotient; False: ``H`` is positive definite; None: unknown).
        lr: the ``lr`` of the parameter group (the step taken is ``lr * s``).
        batch_size, curvature_batch_size: examples in the gradient and in the curvature batch.
        factorizations, solves: Riccati sweeps spent on this step.
        fallback: the hard-case step was rejected and its interior part ``s(lambda)`` taken instead.
        backtracks: halvings of the step before it was accepted (``Newton(backtracking=k)``).
        time_derivatives: building ``H`` (blocks, gradient) and the losses, seconds.
        time_factor, time_solve: factorizations; solves and ``H``-products, seconds.
        time_total: the whole step, seconds.
    """

    step: int
    loss: float
    loss_after: float
    predicted_decrease: float
    actual_decrease: float
    rho: float
    accepted: bool
    damping: float
    radius: float | None
    step_norm: float
    boundary: bool
    hard_case: bool
    inertia: Inertia | None
    inertia_at_zero: Inertia | None
    negative_curvature: bool | None
    lr: float
    batch_size: int
    curvature_batch_size: int
    factorizations: int
    solves: int
    fallback: bool
    backtracks: int
    time_derivatives: float
    time_factor: float
    time_solve: float
    time_total: float

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (inertias as lists)."""
        d = asdict(self)
        for k in ("inertia", "inertia_at_zero"):
            d[k] = None if d[k] is None else list(d[k])
        return d


def _rule_from(damping: str | float | DampingRule) -> DampingRule:
    if isinstance(damping, DampingRule):
        return damping
    if isinstance(damping, bool):
        raise ValueError(
            f"damping must be 'trust-region', 'levenberg-marquardt', a float >= 0 or a rule; got {damping!r}"
        )
    if isinstance(damping, (int, float)):
        if not (math.isfinite(damping) and damping >= 0):
            raise ValueError(f"a fixed damping must be a finite float >= 0, got {damping!r}")
        return FixedDamping(float(damping))
    if isinstance(damping, str):
        key = damping.lower().replace("_", "-")
        key = {"lm": "levenberg-marquardt", "tr": "trust-region"}.get(key, key)
        if key in _RULES:
            return _RULES[key]()
    raise ValueError(
        "damping must be 'trust-region', 'levenberg-marquardt', a float >= 0 or a DampingRule; "
        f"got {damping!r}"
    )


class Newton(torch.optim.Optimizer):
    """SGD preconditioned by the exact Hessian (or Gauss-Newton matrix) of the batch loss.

    Args:
        model: an ``nn.Sequential`` (or list of modules) that :func:`hessinv.hessian` accepts; its
            trainable parameters form the single parameter group.
        loss_fn: the loss module (e.g. ``nn.CrossEntropyLoss()``).
        lr: a multiplier on the step (``d = lr * s``); LR schedulers act on it.
        curvature: ``"hessian"`` (default) or ``"gauss_newton"``.
        damping: ``"trust-region"`` (default: exact Moré–Sorensen subproblem, radius from the ratio
            test), ``"levenberg-marquardt"``, a float ``eps`` (fixed damping, every step taken), or a
            rule object (:class:`~hessinv.optim.TrustRegion`, :class:`~hessinv.optim.LevenbergMarquardt`,
            :class:`~hessinv.optim.FixedDamping`) to set its parameters.
        curvature_batch_size: build the curvature on this many examples drawn at random (without
            replacement) from each batch; the gradient and the ratio test use the whole batch.
            None (default): the whole batch.
        seed: seed of the optimizer's own generator for that subsampling (default: drawn from
            ``torch``'s global generator). Its state is in ``state_dict``.
        track_inertia: also compute the inertia of ``H`` itself each step (two extra factorizations).
        callback: called with the :class:`StepStats` of every step.

    ``step(inputs, targets)`` needs the batch, unlike ``torch.optim`` optimizers that take a closure;
    it returns the batch loss *before* the step. ``state_dict()`` holds the rule's state (radius,
    damping), the step count and the subsampling generator, so that a resumed run is bit-identical.
    """

    def __init__(
        self,
        model: nn.Module | Sequence[nn.Module],
        loss_fn: nn.Module,
        *,
        lr: float = 1.0,
        curvature: str = "hessian",
        damping: str | float | DampingRule = "trust-region",
        curvature_batch_size: int | None = None,
        seed: int | None = None,
        track_inertia: bool = False,
        backtracking: int = 0,
        callback: Callable[[StepStats], None] | None = None,
    ):
        if not isinstance(loss_fn, nn.Module):
            raise ValueError(f"loss_fn must be a torch.nn loss module, got {type(loss_fn).__name__}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        if curvature not in _CURVATURES:
            raise ValueError(f"curvature must be one of {sorted(_CURVATURES)}, got {curvature!r}")
        if curvature_batch_size is not None and (
            isinstance(curvature_batch_size, bool)
            or not isinstance(curvature_batch_size, int)
            or curvature_batch_size < 1
        ):
            raise ValueError(
                f"curvature_batch_size must be None or an int >= 1, got {curvature_batch_size!r}"
            )
        if isinstance(backtracking, bool) or not isinstance(backtracking, int) or backtracking < 0:
            raise ValueError(f"backtracking must be an int >= 0, got {backtracking!r}")
        if callback is not None and not callable(callback):
            raise ValueError("callback must be callable")
        self.rule = _rule_from(damping)
        self.model, self.loss_fn = model, loss_fn
        self.chain = Chain(model, loss_fn)
        self.curvature = curvature
        self.curvature_batch_size = curvature_batch_size
        self.track_inertia = bool(track_inertia)
        self.backtracking = backtracking
        self.callback = callback
        self.last_stats: StepStats | None = None
        self._rejected: tuple | None = None  # (batch key, loss, operator) after a rejected step
        super().__init__(self.chain.params, {"lr": float(lr)})
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        self._generator = torch.Generator(device="cpu").manual_seed(int(seed))
        self._newton: dict[str, Any] = {
            "step": 0,
            "rule": self.rule.init(),
            "rng": self._generator.get_state(),
            "curvature": curvature,
            "damping": self.rule.name,
        }

    # -- state ------------------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        """Steps taken so far (accepted or not)."""
        return int(self._newton["step"])

    @property
    def rule_state(self) -> dict[str, Any]:
        """A copy of the damping rule's state (e.g. ``{'radius': ..., 'damping': ...}``)."""
        return dict(self._newton["rule"])

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim`` state dict plus ``"newton"``: step count, rule state, generator state."""
        sd = super().state_dict()
        sd["newton"] = copy.deepcopy(self._newton)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sd = dict(state_dict)
        ns = sd.pop("newton", None)
        if not isinstance(ns, dict) or not {"step", "rule", "rng"} <= set(ns):
            raise ValueError("not a Newton optimizer state dict (no 'newton' entry)")
        if ns.get("curvature") != self.curvature or ns.get("damping") != self.rule.name:
            raise ValueError(
                f"state dict is for curvature={ns.get('curvature')!r}, damping={ns.get('damping')!r}; "
                f"this optimizer has curvature={self.curvature!r}, damping={self.rule.name!r}"
            )
        super().load_state_dict(sd)
        self._newton = copy.deepcopy(ns)
        self._rejected = None

    # -- one step ---------------------------------------------------------------------------------
    def _operator(self, inputs: Tensor, targets: Tensor) -> CurvatureOperator:
        return _CURVATURES[self.curvature](self.model, self.loss_fn, inputs, targets)

    def _gradient(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """The gradient of the batch loss by backprop (when the curvature batch is a subset)."""
        with torch.enable_grad():
            z = inputs
            for stage in self.chain.stages:
                z = stage.forward(z)
            grads = torch.autograd.grad(self.loss_fn(z, targets), self.chain.params)
        return torch.cat([gr.reshape(-1) for gr in grads])

    def _learning_rate(self) -> float:
        """The ``lr`` of the single parameter group, validated."""
        groups = self.param_groups
        if len(groups) != 1 or [id(p) for p in groups[0]["params"]] != [id(p) for p in self.chain.params]:
            raise ValueError(
                "Newton takes one parameter group holding exactly the model's trainable parameters"
            )
        lr = float(groups[0]["lr"])
        if not (math.isfinite(lr) and lr >= 0):
            raise ValueError(f"lr must be a finite number >= 0, got {groups[0]['lr']!r}")
        return lr

    @torch.no_grad()
    def _apply(self, d: Tensor) -> None:
        offset = 0
        for p in self.chain.params:
            k = p.numel()
            p.add_(d[offset : offset + k].view_as(p))
            offset += k

    def _batch_key(self, inputs: Tensor, targets: Tensor) -> tuple:
        """Identifies batch and parameters (tensor versions change on every in-place write)."""
        params = tuple(p._version for p in self.chain.params)
        return (id(inputs), inputs._version, id(targets), targets._version, params)

    @torch.no_grad()
    def _restore(self, backup: list[Tensor]) -> None:
        for p, b in zip(self.chain.params, backup, strict=True):
            p.copy_(b)

    def _inertia_at_zero(self, op: CurvatureOperator, sweeps: Sweeps, proposal) -> Inertia | None:
        if self.track_inertia:
            t = time.perf_counter()
            try:
                inertia0: Inertia | None = op.inertia(0.0)
            except SingularError:
                inertia0 = None
            sweeps.factorizations += 2
            sweeps.time_factor += time.perf_counter() - t
            return inertia0
        return Inertia(0, 0, op.shape[0]) if proposal.positive_definite_at_zero else None

    @torch.no_grad()
    def step(self, inputs: Tensor, targets: Tensor) -> Tensor:  # type: ignore[override]
        """One Newton step on the batch ``(inputs, targets)``; returns the batch loss before the step."""
        t_start = time.perf_counter()
        ns = self._newton
        lr = self._learning_rate()
        batch = int(inputs.shape[0]) if isinstance(inputs, Tensor) and inputs.dim() > 0 else 0
        k = self.curvature_batch_size
        subsample = k is not None and 0 < k < batch

        # 1. derivatives (reused after a rejected step on the same batch: same point, same operator)
        cached = self._rejected
        self._rejected = None
        if cached is not None and not subsample and cached[0] == self._batch_key(inputs, targets):
            loss0, op, g, rng = cached[1], cached[2], cached[2].gradient, ns["rng"]
        elif subsample:
            loss0 = self.chain.loss(inputs, targets)
            self._generator.set_state(ns["rng"])
            idx = torch.randperm(batch, generator=self._generator)[:k].sort().values.to(inputs.device)
            rng = self._generator.get_state()
            op = self._operator(inputs[idx], targets[idx])
            g = self._gradient(inputs, targets)
        else:
            rng = ns["rng"]
            op = self._operator(inputs, targets)
            loss0, g = op.loss, op.gradient  # the loss module's value at the linearization point
        t_deriv = time.perf_counter() - t_start

        # 2. proposal
        sweeps = Sweeps(op)
        proposal = self.rule.propose(sweeps, g, ns["rule"])

        # 3. trial point and ratio test (then, if rejected, backtracking along d)
        f0 = float(loss0)
        t = time.perf_counter()
        g64 = g.double()
        delta = 10 * torch.finfo(op.dtype).eps * abs(f0)
        backup = [p.detach().clone() for p in self.chain.params]

        def trial(d: Tensor, gd: float, dHd: float, norm: float, scale: float) -> tuple[float, float, float]:
            """(loss, predicted decrease, rho) at x + scale * d; parameters left at that point."""
            pred_t = -(scale * gd + 0.5 * scale * scale * dHd)
            if norm == 0:
                return f0, pred_t, 1.0
            if not math.isfinite(norm):
                return math.nan, pred_t, -math.inf
            self._restore(backup)
            self._apply(d if scale == 1.0 else scale * d)
            try:
                f_t = float(self.chain.loss(inputs, targets))
            except NonFiniteError:
                f_t = math.nan
            if not math.isfinite(f_t) or pred_t + delta <= 0:
                return f_t, pred_t, -math.inf
            return f_t, pred_t, (f0 - f_t + delta) / (pred_t + delta)

        # Every product with H comes before the trial point: the operator's blocks read the live
        # parameters, which the trial moves.
        d = proposal.step * lr if lr != 1.0 else proposal.step
        d64 = d.double()
        gd, dHd, step_norm = float(g64 @ d64), float(d64 @ sweeps.matvec(d).double()), float(d64.norm())
        inertia0 = self._inertia_at_zero(op, sweeps, proposal)
        f1, pred, rho = trial(d, gd, dHd, step_norm, 1.0)
        rule_state, accepted = self.rule.update(ns["rule"], proposal, rho)
        used_fallback = False
        if not accepted and proposal.fallback is not None:
            self._restore(backup)  # the operator is valid again at the restored (bitwise) point
            e = proposal.fallback * lr if lr != 1.0 else proposal.fallback
            e64 = e.double()
            fb = (e, float(g64 @ e64), float(e64 @ sweeps.matvec(e).double()), float(e64.norm()))
            f1b, predb, rhob = trial(*fb, 1.0)
            if self.rule.accept(rhob):
                d, gd, dHd, step_norm = fb
                f1, pred, rho, accepted, used_fallback = f1b, predb, rhob, True, True
        scale, backtracks = 1.0, 0
        while not accepted and backtracks < self.backtracking and step_norm > 0 and math.isfinite(step_norm):
            backtracks += 1
            scale *= 0.5
            f1, pred, rho = trial(d, gd, dHd, step_norm, scale)
            accepted = self.rule.accept(rho)
        self._restore(backup)
        if accepted:
            self._apply(d if scale == 1.0 else scale * d)
        elif not subsample:
            self._rejected = (self._batch_key(inputs, targets), loss0, op)
        actual = f0 - f1
        step_norm *= scale
        t_deriv += time.perf_counter() - t

        # 4. statistics
        if proposal.lambda_lower > 0 or (inertia0 is not None and inertia0.negative > 0):
            negative_curvature: bool | None = True
        elif proposal.positive_definite_at_zero or (inertia0 is not None and inertia0.negative == 0):
            negative_curvature = False
        else:
            negative_curvature = None

        self._newton = {**ns, "step": ns["step"] + 1, "rule": rule_state, "rng": rng}
        stats = StepStats(
            step=self._newton["step"], loss=f0, loss_after=f1, predicted_decrease=pred,
            actual_decrease=actual, rho=rho, accepted=accepted, damping=proposal.damping,
            radius=proposal.radius, step_norm=step_norm, boundary=proposal.boundary,
            hard_case=proposal.hard_case, inertia=proposal.factor.inertia, inertia_at_zero=inertia0,
            negative_curvature=negative_curvature, lr=lr, batch_size=batch,
            curvature_batch_size=k if subsample else batch, factorizations=sweeps.factorizations,
            solves=sweeps.solves, fallback=used_fallback, backtracks=backtracks, time_derivatives=t_deriv,
            time_factor=sweeps.time_factor, time_solve=sweeps.time_solve,
            time_total=time.perf_counter() - t_start,
        )  # fmt: skip
        self.last_stats = stats
        if self.callback is not None:
            self.callback(stats)
        return loss0.detach()
