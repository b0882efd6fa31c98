r"""``Newton``: SGD preconditioned by the exact curvature of the batch -- amortized on mini-batches, the
exact-Hessian trust region on a full batch.

*Mini-batches* (``mode="precondition"``, what ``mode="auto"`` does while the batches change): the
momentum of the gradients is preconditioned by a stored factorization of the damped Gauss-Newton matrix
of a small curvature batch (:class:`hessinv.optim.Preconditioner`, math.md §6); see :class:`Newton`.

*Full batch* (``mode="trust-region"``, what ``mode="auto"`` switches to when a step gets the batch of
the step before): one call of :meth:`Newton.step` on a batch ``(X, y)``:

1. *derivatives*: the curvature operator ``H`` (Hessian, or Gauss-Newton ``G``) of the loss on the
   curvature batch (all of ``X``, or a random subset of ``curvature_batch_size`` examples), and the
   gradient ``g`` and loss ``f`` on all of ``X``;
2. *proposal*: the damping rule turns ``(H, g)`` into ``s = -(H + lambda I)^{-1} g`` -- by default the
   exact trust-region step (:mod:`hessinv.optim.trust_region`), whose ``lambda >= -lambda_min(H)`` is
   certified by the Cholesky test of the Riccati sweep;
3. *ratio test*: the step taken is ``d = lr * s``; with the model ``m(d) = g^T d + 1/2 d^T H d``::

       pred = -m(d),   actual = f(x) - f(x + d),   rho = (actual + delta) / (pred + delta)

   where ``delta = 10 eps |f(x)|`` (``eps`` the machine epsilon of the model's dtype) keeps ``rho`` meaningful
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
is the same, so is ``H``. An operator answers for the parameters it was built at (its blocks hold the
values taken then), so every product is taken before the trial points.

``f`` and ``actual`` are measured on the batch the gradient is taken on (which *is* the curvature batch
unless ``curvature_batch_size`` subsamples it): the step is built to decrease that loss, so the test
judges it there, with the subsampled curvature in the model (the sub-sampled trust region of Xu,
Roosta & Mahoney 2020).

Example (a linear least-squares chain, full batch: after one preconditioned step ``mode="auto"`` sees the
same batch again and takes trust-region Newton steps; the Hessian is exact and constant, so they converge
at once):

>>> import torch, hessinv, hessinv.optim
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> X = torch.randn(64, 5, dtype=torch.float64)
>>> y = X @ torch.randn(5, 1, dtype=torch.float64) + 0.1 * torch.randn(64, 1, dtype=torch.float64)
>>> net = torch.nn.Sequential(torch.nn.Linear(5, 1)).double()
>>> opt = hessinv.optim.Newton(net, torch.nn.MSELoss())
>>> losses = [float(opt.step(X, y)) for _ in range(3)]
>>> g = hessinv.hessian(net, torch.nn.MSELoss(), X, y).gradient
>>> bool(g.norm() < 1e-10), opt.last_stats.accepted, opt.last_stats.mode
(True, True, 'trust-region')
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import math
import numbers
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from hessinv import linalg
from hessinv.chain import (
    _tensor,
    check_real,
    dense_grad,
    deterministic_chain,
    layers_in_mode,
    model_parts,
    same_tensor,
    training_layers,
    unshared,
)
from hessinv.curvature import (
    CurvatureOperator,
    curvature_class,
    factorization_flops,
    normalize_curvature,
)
from hessinv.errors import (
    DistributedError,
    HessinvError,
    InvalidArgumentError,
    NonFiniteError,
    SingularError,
    UnsupportedStageError,
    warn,
)
from hessinv.optim.damping import DampingRule, FixedDamping, LevenbergMarquardt, Sweeps
from hessinv.optim.precondition import (
    BASIS_MAX_DIM,
    BASIS_REFRESH,
    Preconditioner,
    _cast_state,
    _deterministic_curvature,
    _param_places,
    _plain,
    _positive,
    curvature_batch,
    curvature_weight,
    explained_subsample,
    finite_loss_on,
    follow_params,
    generator_from_seed,
    load_in_saved_set,
    param_places,
    saved_before_a_freeze,
)
from hessinv.optim.trust_region import TrustRegion
from hessinv.riccati import Inertia
from hessinv.stages.generic import NoExactHessian, NoFastPath
from hessinv.stages.losses import nothing_to_learn, uncompiled

__all__ = ["Newton", "StepStats"]

_MODES = ("auto", "trust-region", "precondition")
#: a constructor ``lr`` at most this is warned about: Adam's habitual 1e-3 (3e-3, 1e-2) left a new user's
#: loss at chance (2.329 -> 2.325 in 10 s, where lr = 1 reached 0.099)
ADAM_SIZED_LR = 0.01
#: the default ``diagonal_damping`` (docs/training.md: why 200)
DIAGONAL_DAMPING = 200.0
#: ``mode="auto"`` takes the trust region for full-batch training only where one factorization costs at
#: most this (a few tenths of a second on one core, a trust-region step spending 2-4; the memorization
#: benchmark's: 1.3e8; a 30-16-2 MLP on 455 examples, 1.9e9, took 1.7-2.7 s per step in 2026-12-03's code,
#: 50 ms a factorization today, timed below; a 30-32-32-2 one 1.5 s)
TRUST_REGION_MAX_FLOPS = 3e8
#: ... and above it, up to this many modelled flops, where one factorization timed (the dense route's
#: products included: a trust-region step forms them once and factors a few times) takes at most
#: :data:`TRUST_REGION_MAX_SECONDS` (:meth:`Newton._trust_region_affordable`: the model prices small blocks
#: 10-40x over their time)
TRUST_REGION_TIMED_FLOPS = 30 * TRUST_REGION_MAX_FLOPS
TRUST_REGION_MAX_SECONDS = 0.1
#: ... and preconditions it where not -- on the curvature of the whole batch where its root and Gram
#: matrix cost at most this, ``2 B^2 n`` flops per refresh (``B`` rows at least, one per example: a
#: 10-32-32-1 regression on 100 examples, 2.8e7), else on ``curvature_batch_size`` examples
FULL_BATCH_CURVATURE_FLOPS = 3e8
#: ``mode="auto"`` leaves the trust region for preconditioning when its radius falls below this times
#: ``sqrt(u) max(1, ||x||)``: steps that small change the loss by rounding-level amounts, and the quadratic
#: model has stopped describing the loss -- the radius collapses at a kink of a ReLU network (iris,
#: 4-16-16-3 ReLU: the loss stuck at 0.0424 for hundreds of steps, radius 1e-5 in float32, 1e-14 in
#: float64, where Adam went on to 0.005); the memorization benchmark's smallest is 0.34 (float32)
TRUST_REGION_STALL = 1e-2
#: ... or where the loss has not fallen below its best by ``sqrt(u)`` of it in this many trust-region steps: a
#: float32 regression that saturated a tanh unit sat at 1.904e-3 for hundreds of steps, its radius growing
#: on rounding noise, 61 of 100 steps at ``max_iter`` factorizations (77 ms against 8 ms; a probe)
TRUST_REGION_PATIENCE = 50
_RULES: dict[str, Callable[[], DampingRule]] = {
    "trust-region": TrustRegion,
    "levenberg-marquardt": LevenbergMarquardt,
}


@dataclass
class StepStats:
    """What one :meth:`Newton.step` did (``opt.last_stats``; also passed to ``callback``).

    Attributes:
        step: steps taken so far, this one included (accepted or not).
        loss: batch loss before the step (what ``step`` returns); in the trust region with a weight decay,
            the function its ratio test models: the batch loss plus the penalty ``wd/2 |x|^2``.
        loss_after: the same at the trial point ``x + d`` (the new loss if accepted).
        predicted_decrease: ``-(g^T d + 1/2 d^T H d)`` for the step tried, ``d = lr * s``.
        actual_decrease: ``loss - loss_after``.
        rho: the ratio of the two, with the rounding guard (see the module docstring); ``-inf`` for a trial
            loss that is not finite or (trust region, Levenberg-Marquardt) a predicted decrease ``<= 0``,
            NaN for the latter under a fixed damping (the step is taken).
        accepted: whether the parameters moved.
        damping: ``lambda`` of ``H + lambda I``.
        radius: the trust-region radius the step was computed for (None for other rules).
        step_norm: ``||d||``.
        boundary: the step is on the trust-region sphere (to the subproblem's tolerance ``rtol``).
        hard_case: the step was completed to the sphere along an approximate eigenvector of
            ``lambda_min`` (Moré–Sorensen's ``s + tau u``: in the hard case and near it, see
            :class:`~hessinv.optim.trust_region.SubproblemSolution`).
        inertia: inertia of ``H + lambda I`` (the factorization the step was solved with; positive
            definite except with a fixed damping).
        inertia_at_zero: inertia of the objective's Hessian without damping, ``H + wd I`` with a
            ``weight_decay`` ``wd`` (``Newton(track_inertia=True)``, two extra factorizations per step,
            zero eigenvalues counted with tolerance ``sqrt(u) ||H||``); else ``(0, 0, n)`` when it
            passed the Cholesky test at 0, else None.
        negative_curvature: that matrix has a negative eigenvalue (True: proved by a failed Cholesky
            test at some ``lambda > 0`` -- the trust region's and Levenberg-Marquardt's -- or a Rayleigh
            quotient, beyond the rounding ``sqrt(u) ||H||`` in the trust region: a positive
            semi-definite ``H``'s null space fails the tests at rounding level; False: it is positive
            definite; None: unknown).
        lr: the ``lr`` of the parameter groups, their largest where they differ (the step taken is ``lr *
            s``, each group's part with its own).
        batch_size, curvature_batch_size: examples in the gradient batch, and in the curvature batch of
            the curvature the step used (drawn among the examples the loss counts: fewer than asked
            where fewer are counted; in the precondition mode, the last refresh's).
        factorizations, solves: Riccati sweeps spent on this step.
        fallback: the hard-case step was rejected and its interior part ``s(lambda)`` taken instead.
        backtracks: halvings of the step before it was accepted (``Newton(backtracking=k)``).
        time_derivatives: building ``H`` (blocks, gradient) and the losses, seconds.
        time_factor, time_solve: factorizations; solves and ``H``-products, seconds.
        time_total: the whole step, seconds.
        mode: ``"trust-region"`` or ``"precondition"`` (see :class:`Newton`).
        refreshed: the preconditioner rebuilt its curvature on this step (``"precondition"`` mode).

    In ``"precondition"`` mode there is no ratio test: ``loss_after`` and ``rho`` are NaN, every step is
    accepted, ``predicted_decrease`` is the first-order ``-g^T d``, ``damping`` is the preconditioner's
    damping scale and ``factorizations`` counts curvature refreshes.
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
    mode: str = "trust-region"
    refreshed: bool = False

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
        raise InvalidArgumentError(
            f"damping must be 'trust-region', 'levenberg-marquardt', a float >= 0 or a rule; got {damping!r}"
        )
    if isinstance(damping, (np.ndarray, Tensor)) and math.prod(damping.shape) != 1:
        raise InvalidArgumentError(
            f"Newton's damping is one number (or 'trust-region', 'levenberg-marquardt', a DampingRule), got "
            f"a {type(damping).__name__} of shape {tuple(damping.shape)}; a damping per parameter comes from "
            "the gradients' second moments (diagonal_damping=)"
        )
    if isinstance(damping, (numbers.Real, np.ndarray, Tensor)):  # (numpy scalars, a 0-d tensor: as factor's)
        value = check_real(damping, "damping", setting=True)
        if not (math.isfinite(value) and value >= 0):
            raise InvalidArgumentError(f"a fixed damping must be a finite float >= 0, got {damping!r}")
        return FixedDamping(value)
    if isinstance(damping, str):
        key = damping.lower().replace("_", "-")
        key = {"lm": "levenberg-marquardt", "tr": "trust-region"}.get(key, key)
        if key in _RULES:
            return _RULES[key]()
    raise InvalidArgumentError(
        "damping must be 'trust-region', 'levenberg-marquardt', a float >= 0 or a DampingRule; "
        f"got {damping!r}"
    )


def _step_arguments(
    args: tuple, inputs: Any, targets: Any, closure: Any
) -> tuple[Tensor | None, Tensor | None, Callable[[], Any] | None]:
    """``(inputs, targets, closure)`` of :meth:`Newton.step` from its positional and keyword arguments."""
    given = {"inputs": inputs, "targets": targets, "closure": closure}
    names = ["inputs", "targets", "closure"]
    if args and callable(args[0]) and not isinstance(args[0], Tensor):  # step(closure, X, y)
        names = ["closure", "inputs", "targets"]
    if len(args) > 3:
        raise InvalidArgumentError(
            f"step takes at most 3 positional arguments ({', '.join(names)}), got {len(args)}"
        )
    for name, value in zip(names, args, strict=False):
        if given[name] is not None:
            raise InvalidArgumentError(f"step got {name} twice: positionally and by keyword")
        given[name] = value
    closure = given["closure"]
    if closure is not None and (not callable(closure) or isinstance(closure, Tensor)):
        raise InvalidArgumentError(
            f"step's closure must be callable (a function that computes the loss), got {closure!r}; the "
            "positional arguments are inputs, targets, closure"
        )
    return given["inputs"], given["targets"], closure


def _warn_adam_sized_lr(lr: float, what: str) -> bool:
    """Warn where ``lr`` is Adam-sized (in ``(0, ADAM_SIZED_LR]``: a new user's habit, with which the loss sat
    at chance, silently); returns whether it warned."""
    if not 0 < lr <= ADAM_SIZED_LR:
        return False
    warn(
        f"{what}: the step is already scaled (a Newton step on the curvature's subspace, an Adam step of "
        "size 1 / diagonal_damping off it) and lr multiplies it -- an Adam-sized lr makes every step "
        "hundreds of times too short; start from lr=1.0 (the default; schedulers scale from there)",
        UserWarning,
    )
    return True


class Newton(torch.optim.Optimizer):
    """SGD preconditioned by the exact Hessian or Gauss-Newton matrix of the loss: mini-batch and full-batch.

    Two modes, chosen by ``mode``:

    * ``"precondition"`` (mini-batches): every gradient ``g_t`` of a batch goes into a momentum average
      ``m_t = momentum m_{t-1} + (1 - momentum) g_t`` and the step is ``-lr (C_k + D_t)^{-1} m_t / (1 -
      momentum^t)`` with a stored factorization of the damped curvature ``C_k`` of a small curvature
      batch drawn from the current batch, refreshed every ``refresh`` steps, and a per-parameter damping
      ``D_t`` from the gradients' second moments (:class:`~hessinv.optim.Preconditioner`; between
      refreshes the factorization holds ``D_t`` up to a factor ``stale_ratio`` per entry: an entry is
      updated where it drifts further). Cost per
      step: one gradient and one ``O(r n)`` solve, plus a refresh every ``refresh`` steps.
    * ``"trust-region"`` (full batch, or one fixed batch): the exact trust-region Newton step on the
      Hessian, judged by the ratio test (see the module docstring).
    * ``"auto"`` (default): decided at the second step, for good: ``"trust-region"`` when it is given
      the same batch as the first (the same rows, in any order: full-batch training, shuffled or not)
      and one factorization of its curvature costs at most :data:`TRUST_REGION_MAX_FLOPS` (a large
      full batch preconditions) and the parameter groups share one ``weight_decay`` (the trust
      region's shift of ``H``), else ``"precondition"`` (a
      repeat later on, e.g. a batch of one example drawn twice, does not switch). From the trust
      region it goes back to ``"precondition"`` for good at the first batch with other examples
      (several steps per mini-batch, or a first phase on one small batch, then mini-batches: the
      trust region would fit each batch's noise; a full batch that changes, e.g. a training set that
      grows, too: pass ``mode="trust-region"`` to keep it) and where the radius collapses (below
      :data:`TRUST_REGION_STALL` ``sqrt(u) max(1, ||x||)``: at a kink of a ReLU network the quadratic
      model fails at every scale), unless the loss is fitted to rounding (at most ``sqrt(u)`` times the
      trust region's first loss) or the gradient is zero, and where the groups' ``weight_decay`` values
      are made to differ (the trust region takes one). Passing a
      trust-region setting (``damping`` -- but a number with ``curvature="hessian"``, which is the
      preconditioner's damping too --, ``track_inertia``, ``backtracking``) selects ``"trust-region"``.

    Dropout, RReLU and BatchNorm (with running statistics) in training mode: preconditioning takes each
    batch's gradient as the model computes it (dropout masks, batch statistics, running statistics
    updated) and the curvature of the deterministic network -- those layers in eval mode while it is
    refreshed (:func:`hessinv.chain.training_layers`), their modes put back after every step. The trust
    region models the batch loss of a deterministic network and refuses them (``"auto"`` preconditions).

    Forward hooks and a forward's own side effects see more than one call per step: the step's forward
    (the batch, in the model's mode), and on a refresh step the curvature's passes (the curvature batch,
    those layers in eval mode, some without autograd) -- a hook that accumulates statistics should count
    only the calls it wants (e.g. those with ``torch.is_grad_enabled()`` and the full batch). Buffers
    that a user's module changes in place in forward (a call counter) are put back after the curvature's
    passes, as are its plain attributes.

    Args:
        model: a chain-shaped model that :func:`hessinv.hessian` accepts.
        loss_fn: the loss module (e.g. ``nn.CrossEntropyLoss()``).
        params: the parameters to optimize as ``torch.optim`` expects them -- an iterable of tensors or
            of group dicts (``{"params": [...], "lr": ...}``) for per-group ``lr``; together they must be
            exactly the model's trainable parameters. Default: all of them, one group.
        lr: a multiplier on the step (``d = lr * s``); LR schedulers act on it (per group). The step is
            already scaled (a Newton step; off the curvature subspace an Adam step of size ``1 /
            diagonal_damping``): keep ``lr=1`` to start with -- Adam's ``1e-3`` here is a step a thousand
            times shorter, and training barely moves.
        mode: ``"auto"``, ``"precondition"`` or ``"trust-region"`` (see above).
        curvature: ``"hessian"`` or ``"gauss_newton"`` (``"gauss-newton"`` too). Default: the Hessian
            for the trust region, Gauss-Newton for preconditioning (where it trains better and is cheaper,
            docs/benchmarks.md). The attribute ``opt.curvature`` is the trust region's;
            ``opt.preconditioner.curvature`` the preconditioner's.
        damping: trust-region mode: ``"trust-region"`` (default: exact Moré–Sorensen subproblem, radius
            from the ratio test), ``"levenberg-marquardt"``, a float ``eps`` (fixed damping, every step
            taken), or a rule object (:class:`~hessinv.optim.TrustRegion`, ...). Precondition mode with
            ``curvature="hessian"``: the scalar damping (default 1.0) -- with ``mode="auto"`` a number
            ``> 0`` is both (the preconditioner's on mini-batches, the fixed damping on a full batch).
        diagonal_damping: precondition mode: the scale ``delta`` of ``D = delta (sqrt(v) + eps)`` (default
            200); off the curvature batch's subspace a step is an Adam step of size ``lr / delta``.
            Settings of the other mode are refused (``diagonal_damping`` with the trust region;
            ``track_inertia``, ``backtracking`` or a rule as ``damping`` with ``mode="precondition"``).
        max_relative_step: precondition mode: an optional budget ``c`` for the relative change of the
            network per step, split equally over its ``L`` stages with parameters: each stage's parameters
            ``x_s`` (a Linear's weight and bias together, ``n_s`` numbers) move by at most ``(c / L)
            max(||x_s||, sqrt(n_s / n) ||x||)`` (the step is shortened, its direction kept; the floor, the
            stage's size at the network's mean entry, lets a zero- or tiny-initialized layer grow at the
            others' scale). A chain's output moves by at most about the sum of its stages' relative
            changes, so this holds a deep chain's steps to its depth. Default ``None`` (no limit; it was
            0.05 until 2026-12-04, when ``beta2`` was 0.99: with ``beta2 = 0.95`` the unlimited step
            reached 8 of the 9 probed targets in 6-38% fewer steps, docs/training.md). Read at every
            step (a schedule may change it); not used by the trust region.
        basis: precondition mode (Gauss-Newton): ``"eigen"`` (default) takes ``D`` diagonal, and ``v``, in
            the eigenbasis of each weight's Kronecker gradient statistics (SOAP's basis;
            :class:`~hessinv.optim.EigenBasis`); ``"identity"`` in the parameters (Adam's).
        basis_max_dim: a weight's sides above this (default 256) stay unrotated: it is rotated on its
            other side only (a 512 x 64 input layer by ``Q_R``), or, both sides above, not at all (Adam's
            diagonal). Rotating both sides costs ``4 a b (a + b)`` flops per step and an ``a x a`` and a
            ``b x b`` eigenbasis per refresh (a 64-512-10 MLP: 9.9 ms per step, one-sided 2.1-2.3 ms;
            Adam 0.46 ms); the wider side is dropped too while the rotation costs more than
            :data:`~hessinv.optim.precondition.ROTATION_MAX_FLOPS`
            (:func:`~hessinv.optim.precondition.rotated_sides`).
        max_rank: precondition mode (Gauss-Newton): rows of the curvature root at most (default
            ``min(256, 10 x curvature examples)``: 80 for the default 8);
            with more output directions than that in the curvature batch (many classes), each example
            keeps its leading ones (:class:`~hessinv.optim.Preconditioner`). Each refresh costs about
            ``max_rank`` backward passes and a ``max_rank^2 n`` Gram: on models with many outputs per
            example (a transformer LM's ``vocab x length``, 1000 classes) 64-80 rows made the same
            progress per step as 256 at 1.6-2.7x less CPU time (docs/training.md; 256 at any curvature
            batch until 2026-12-05).
        curvature_batch_size: build the curvature on this many examples drawn at random from each batch
            (precondition mode default 8 -- the whole batch in full-batch training where its Gauss-Newton
            root costs at most :data:`FULL_BATCH_CURVATURE_FLOPS`; trust-region default: the whole batch).
            For a loss that sums over the examples (``reduction='sum'``;
            :func:`hessinv.stages.losses.sums_examples`) the ``k``-example curvature is scaled by ``n / k``
            to match the batch's gradient, so that the steps are those of the mean-reduced loss (the trust
            region's model is of ``(k / n) f``); in precondition mode every batch's gradient is scaled to
            the first batch's count ``n`` (:meth:`Preconditioner.reference_scale`), so that a batch of
            another size steps as the mean's too, ``weight_decay`` a penalty on that batch's sum (with the
            Gauss-Newton curvature; ``curvature="hessian"`` damps by an absolute ``lambda``, so its steps
            follow the loss's scale). Exact where the mean divides by the examples (with class weights or
            per-position targets it divides by their sum or count: nearly so).
        refresh: precondition mode: rebuild the curvature every this many steps.
        basis_refresh: precondition mode: refresh the eigenbasis of the weights whose rotated sides are
            all at most 64 wide every this many steps (2: SOAP's frequency; one step of orthogonal
            iteration), carrying the stored curvature into it (:class:`Preconditioner`); None (default):
            with the curvature only. ``basis_refresh=2`` gains per step on deep narrow chains at up to 2x
            the step's time (docs/training.md: not the default).
        momentum, beta2: precondition mode: the gradient average (default 0.9) and the second-moment
            average of ``D`` (default 0.95, SOAP's; 0.99 until 2026-12-04: a second moment that follows a
            growing gradient within a few steps shortens the step there at once, which the deep tanh
            chain of docs/training.md needs once the step budget is off).
        seed: seed of the optimizer's own generator for the subsampling (default: drawn from ``torch``'s
            global generator). Its state is in ``state_dict``.
        track_inertia: also compute the inertia of ``H`` itself each trust-region step (two sweeps;
            where a pivot is conditioned below ``sqrt(u)``, as next to the null space of an
            over-parameterized net, a dense ``LDL^T`` of ``H`` for ``n <= 2048``: 4-6x the step time
            at ``n ~ 2000``).
        callback: called with the :class:`StepStats` of every step.
        backtracking: trust-region mode: halve a rejected step up to this many times, judging each half
            by the same ratio test, before giving it up (default 0: a rejected step is not taken).
        weight_decay: ``wd`` of an L2 penalty ``wd/2 |x|^2`` added to the loss, exactly: its gradient ``wd x``
            joins the batch gradient and its curvature ``wd I`` the curvature (precondition mode: in
            ``D``; trust region: ``H + wd I``, and the ratio test judges the penalized loss). Per group
            in precondition mode (``{"params": biases, "weight_decay": 0.0}``); one value in the trust
            region. ``p.grad`` and the returned loss stay the batch loss's. In precondition mode,
            as with ``torch.optim.Adam(weight_decay=...)`` (L2, not AdamW's decoupled decay), the
            penalty's gradient goes through the Adam-style damping ``D``, which normalizes it: where the
            loss's gradient is small, a weight moves towards zero by about ``lr / diagonal_damping`` per
            step whatever ``wd`` is -- on the MNIST-1D deep tanh chain (bench/train_suite.py) ``wd =
            3e-4`` kept test accuracy at chance for 1500 steps, as it did for Adam at lr 2e-3.

    ``step(inputs, targets)`` returns the batch loss *before* the step and writes the batch gradient into
    every ``p.grad``. ``step(closure)`` follows ``torch.optim``: the closure zeroes the gradients, runs the
    model and the loss *module* ``loss_fn`` on a batch, calls ``backward()`` and returns the loss; the
    optimizer takes the gradient from ``.grad`` and the batch from the model and loss calls it watched
    (or pass ``inputs=``/``targets=``). ``state_dict()`` holds the rule's state, the moments, the step
    count and the generators, so that a resumed run is bit-identical -- except in precondition mode
    with ``curvature="hessian"``, whose factorization is not stored: a resumed run rebuilds it at its
    first step, on that step's batch, and then follows its own schedule of refreshes.

    >>> import torch, hessinv.optim
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    >>> loss_fn = torch.nn.CrossEntropyLoss()
    >>> X, y = torch.randn(512, 10), torch.randint(0, 3, (512,))
    >>> opt = hessinv.optim.Newton(net, loss_fn, seed=0)
    >>> first = loss_fn(net(X), y).item()
    >>> for epoch in range(3):
    ...     for i in range(0, 512, 32):                      # mini-batches: the preconditioned mode
    ...         loss = opt.step(X[i:i + 32], y[i:i + 32])
    >>> loss_fn(net(X), y).item() < first, opt.last_stats.mode
    (True, 'precondition')
    >>> def closure():                                       # the torch.optim closure form
    ...     opt.zero_grad()
    ...     loss = loss_fn(net(X[:32]), y[:32])
    ...     loss.backward()
    ...     return loss.detach()
    >>> loss = opt.step(closure)
    """

    def __init__(
        self,
        model: nn.Module | Sequence[nn.Module],
        loss_fn: nn.Module | Callable[[Tensor, Tensor], Tensor] | None = None,
        *,
        params: Any = None,
        lr: float = 1.0,
        mode: str = "auto",
        curvature: str | None = None,
        damping: str | float | DampingRule | None = None,
        diagonal_damping: float | None = None,
        max_relative_step: float | None = None,
        basis: str = "eigen",
        basis_max_dim: int = BASIS_MAX_DIM,
        max_rank: int | None = None,
        curvature_batch_size: int | None = None,
        refresh: int = 10,
        basis_refresh: int | None = BASIS_REFRESH,
        momentum: float = 0.9,
        beta2: float = 0.95,
        seed: int | None = None,
        track_inertia: bool = False,
        backtracking: int = 0,
        callback: Callable[[StepStats], None] | None = None,
        weight_decay: float = 0.0,
    ):
        if not _is_model(model):
            raise InvalidArgumentError(
                "Newton needs the model and its loss to build the curvature: "
                "Newton(model, loss_fn, params=model.parameters()) -- got "
                f"{type(model).__name__} as the model"
            )
        if not callable(loss_fn):
            raise InvalidArgumentError(
                "loss_fn must be a loss module (e.g. nn.CrossEntropyLoss()) or a function "
                f"loss_fn(outputs, targets), got {type(loss_fn).__name__}"
            )
        _positive("lr", lr, allow_zero=True)  # a schedule may start at 0 (warm-up), as torch.optim allows
        self._lr_warned = _warn_adam_sized_lr(float(lr), f"Newton(lr={float(lr):g})")
        _positive("weight_decay", weight_decay, allow_zero=True)
        if mode not in _MODES:
            raise InvalidArgumentError(f"mode must be one of {_MODES}, got {mode!r}")
        if curvature is not None:
            curvature = normalize_curvature(curvature)
        curvature_batch_size = _checked_curvature_batch_size(curvature_batch_size)
        backtracking = _plain(backtracking)
        if isinstance(backtracking, bool) or not isinstance(backtracking, int) or backtracking < 0:
            raise InvalidArgumentError(f"backtracking must be an int >= 0, got {backtracking!r}")
        track_inertia = _plain(track_inertia)
        if not isinstance(track_inertia, bool):  # (-1, NaN, "no" and [0] were taken as True)
            raise InvalidArgumentError(f"track_inertia must be True or False, got {track_inertia!r}")
        if callback is not None and not callable(callback):
            raise InvalidArgumentError("callback must be callable")
        momentum = _plain(momentum)
        if isinstance(momentum, bool) or not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
            raise InvalidArgumentError(f"momentum must be in [0, 1), got {momentum!r}")
        asked = mode
        # a number with curvature="hessian" is also the Hessian preconditioner's damping (its documented
        # default 1.0, passed explicitly, switched mini-batch training to the fixed-damping trust region,
        # which diverged: loss 2.5e5 in 25 steps on digits): auto keeps it for the preconditioner, and its
        # trust-region phase (a full batch) takes it as the fixed damping, as before
        number = isinstance(damping, (int, float)) and not isinstance(damping, bool)
        pc_number = curvature == "hessian" and number and damping > 0  # (0: pure Newton, the trust region)
        if mode == "auto" and ((damping is not None and not pc_number) or track_inertia or backtracking):
            mode = "trust-region"
        _check_mode_settings(mode, curvature, damping, diagonal_damping, track_inertia, backtracking)
        # precondition-mode settings given where nothing reads them (no silent no-op)
        given = {
            "max_relative_step": max_relative_step, "refresh": refresh, "momentum": momentum, "beta2": beta2,
            "basis": basis, "basis_max_dim": basis_max_dim, "max_rank": max_rank,
        }  # fmt: skip
        defaults = inspect.signature(Newton.__init__).parameters
        gn_only = ("basis", "basis_max_dim", "max_rank")  # (the Gauss-Newton preconditioner's)
        unused = [
            k
            for k, v in given.items()
            if v != defaults[k].default
            and (mode == "trust-region" or (curvature == "hessian" and k in gn_only))
        ]
        if unused:
            why = " (mode='auto' with damping, track_inertia or backtracking is the trust region)"
            raise InvalidArgumentError(
                f"{', '.join(unused)}: precondition-mode settings, not used by the trust region"
                f"{why if asked == 'auto' else ''}; drop them, or use mode='precondition' (or 'auto' for "
                "mini-batches, without trust-region settings)"
                if mode == "trust-region"
                else f"{', '.join(unused)}: settings of the Gauss-Newton preconditioner, not used with "
                "curvature='hessian'; drop them, or use curvature='gauss_newton'"
            )
        self.mode = self._mode_asked = mode
        self.rule = _rule_from("trust-region" if damping is None or mode == "precondition" else damping)
        self.model, self.loss_fn = model, loss_fn
        self.chain, self._mode_modules = deterministic_chain(model, loss_fn)
        self.curvature = curvature or "hessian"  # the trust region's
        self.curvature_batch_size = curvature_batch_size
        self.track_inertia = bool(track_inertia)
        self.backtracking = backtracking
        self.callback = callback
        self.last_stats: StepStats | None = None
        self._rejected: tuple | None = None  # (batch key, loss, operator) after a rejected step
        self._sums: bool | None = None  # whether loss_fn sums over examples (precondition.curvature_weight)
        self._group_memo: dict[str, tuple] = {}  # key -> (the groups' values, _group_values' answer)
        # momentum in the groups, where schedulers that cycle it (OneCycleLR, CyclicLR) find it
        defaults = {"lr": float(lr), "weight_decay": float(weight_decay), "momentum": float(momentum)}
        groups, homes = _param_groups(params, self.chain.params, model, mode)
        super().__init__(groups, defaults)
        self._groups_frozen = True
        self._generator = generator_from_seed(seed)
        seed = self._generator.initial_seed()
        self.preconditioner: Preconditioner | None = None
        if mode != "trust-region":
            pc_curv = curvature or "gauss_newton"
            if pc_curv != "hessian":  # (the Hessian's preconditioner takes `damping`)
                pc_damping = _positive_number(
                    "diagonal_damping", DIAGONAL_DAMPING if diagonal_damping is None else diagonal_damping
                )
            else:
                pc_damping = float(damping) if isinstance(damping, (int, float)) else 1.0
            self.preconditioner = Preconditioner(
                model, loss_fn, curvature=pc_curv, damping=pc_damping,
                curvature_batch_size=curvature_batch_size or 8, refresh=refresh, basis_refresh=basis_refresh,
                beta2=beta2, basis=basis, basis_max_dim=basis_max_dim, max_rank=max_rank,
                seed=(seed + 1) % 2**64,
            )  # fmt: skip
        self._newton: dict[str, Any] = {
            "step": 0,
            "rule": self.rule.init(),
            "rng": self._generator.get_state(),
            "curvature": self.curvature,
            "damping": self.rule.name,
            "mode": mode,
            "momentum": None,
            "previous": None,  # auto mode: the previous batch, to recognize full-batch training
            "homes": homes,  # a frozen parameter's group (by its place in the model), for when unfrozen
            "max_relative_step": None,  # (in the state: a resumed run keeps a value changed mid-run)
        }
        self.max_relative_step = max_relative_step

    # -- state ------------------------------------------------------------------------------------
    @property
    def max_relative_step(self) -> float | None:
        """The precondition mode's step budget ``c`` (see :class:`Newton`); may be changed between steps
        (validated; saved in ``state_dict``)."""
        return self._newton["max_relative_step"]

    @max_relative_step.setter
    def max_relative_step(self, value: float | None) -> None:
        self._newton["max_relative_step"] = (
            None if value is None else _positive_number("max_relative_step", value)
        )

    @property
    def steps(self) -> int:
        """Steps taken so far (accepted or not)."""
        return int(self._newton["step"])

    @property
    def rule_state(self) -> dict[str, Any]:
        """A copy of the damping rule's state (e.g. ``{'radius': ..., 'damping': ...}``)."""
        return dict(self._newton["rule"])

    def __getstate__(self) -> dict[str, Any]:
        """The whole object (``torch.optim.Optimizer`` keeps only its groups and state, and a copy made by
        ``copy.deepcopy`` or ``pickle`` would lack the model, the chain and the preconditioner);
        ``copy.deepcopy((model, opt))`` gives a copy that trains the copied model -- less the wrapper an LR
        scheduler puts on ``opt.step`` (it calls the original optimizer; ``torch.optim`` drops it too)."""
        state = self.__dict__.copy()
        state.pop("step", None)
        state.pop("_tr_batch", None)  # (weak references to the caller's batch: the copy checks it in full)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        old = state.pop("max_relative_step", None)  # a copy made while it was a plain attribute
        self.__dict__.update(state)
        self._newton.setdefault("max_relative_step", old)  # (None: a copy from before it existed)

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim`` state dict plus ``"newton"``: step count, mode, rule state, momentum (in the
        preconditioner's basis), generators, ``max_relative_step``, ``curvature_batch_size`` and the
        preconditioner's state with its settings (:meth:`Preconditioner.state_dict`): the state of the
        last step, for the parameters trainable then (a layer frozen since is followed at the next step,
        or by :meth:`load_state_dict`; saving changes nothing). ``torch.optim``'s state-dict post hooks
        (``register_state_dict_post_hook``) see the whole dict, ``"newton"`` included."""
        with _hooks_held(self, "_optimizer_state_dict_post_hooks") as post_hooks:
            sd = super().state_dict()
        ns = {k: v for k, v in self._newton.items() if k != "previous"}
        sd["newton"] = copy.deepcopy(ns)
        sd["newton"]["previous"] = (
            None if self._newton["previous"] is None else tuple(t.clone() for t in self._newton["previous"])
        )
        sd["newton"]["curvature_batch_size"] = self.curvature_batch_size
        sd["newton"]["rule_settings"] = self.rule.settings()
        sd["newton"]["param_shapes"] = [tuple(p.shape) for p in self.chain.params]
        sd["newton"]["param_places"] = param_places(self.model, self.chain.params)
        if self.preconditioner is not None:
            sd["newton"]["preconditioner"] = self.preconditioner.state_dict()
        for hook in post_hooks.values():
            out = hook(self, sd)
            sd = sd if out is None else out
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; see :meth:`_load_state_dict`. A new optimizer (no step yet)
        takes the checkpoint's trainable set where the model's differs (saved right after a layer was
        frozen or unfrozen, before a step followed it, and resumed in the configuration after the change,
        as ``torch.optim`` resumes it): it loads as the optimizer that saved it, and its next step follows
        the model's layers, as that one's would have. ``torch.optim``'s load hooks run around the whole
        load: the pre hooks (``register_load_state_dict_pre_hook``) see the dict with ``"newton"``, the
        post hooks run once Newton's own state is restored."""
        if isinstance(state_dict, dict):
            state_dict = dict(state_dict)
            for hook in self._optimizer_load_state_dict_pre_hooks.values():
                out = hook(self, state_dict)
                state_dict = state_dict if out is None else out
        with _hooks_held(
            self, "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks"
        ) as post_hooks:
            load_in_saved_set(
                self,
                state_dict.get("newton") if isinstance(state_dict, dict) else None,
                self._newton["step"] == 0,
                self._follow_trainable,
                lambda: self._load_state_dict(state_dict),
            )
        for hook in post_hooks.values():
            hook(self)

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output. As ``torch.optim`` restores its groups' hyper-parameters
        (``lr``, ``momentum``, ``weight_decay`` here), the settings that shape the saved state are the
        checkpoint's, not this optimizer's constructor arguments: ``max_relative_step``,
        ``curvature_batch_size``, the damping rule's settings (a fixed damping's value, a trust region's
        ``eta``...: ``self.rule`` is then a copy of the rule given, with them) and the preconditioner's
        ``diagonal_damping`` (or its ``damping``), ``beta2``, ``refresh``, ``curvature_batch_size``,
        ``max_rank``, ``basis_max_dim`` (:meth:`Preconditioner.load_state_dict`); a checkpoint saved before a
        setting was keeps this optimizer's. What cannot be restored into this object -- another model,
        ``curvature``, ``damping`` rule or ``basis`` kind, or a precondition-mode state into the trust-region
        mode -- is an :class:`~hessinv.errors.InvalidArgumentError`, and a refused load changes nothing."""
        if not isinstance(state_dict, dict):
            raise InvalidArgumentError(f"a state dict is a dict, got {type(state_dict).__name__}")
        # a layer frozen or unfrozen since the last step: followed first -- unless the checkpoint is of the
        # parameters trainable at that step and not of those trainable now (saved right after a layer was
        # frozen, before a step followed it: loaded as it is, and the next step follows)
        if not saved_before_a_freeze(state_dict.get("newton"), self.chain, self.model):
            self._follow_trainable()
        sd = dict(state_dict)
        ns = sd.pop("newton", None)
        # the checkpoint's tensors in this model's dtype and device (as torch.optim casts its state)
        ns = _cast_state(ns, self.chain.dtype, self.chain.device)
        if not isinstance(ns, dict) or not {"step", "rule", "rng"} <= set(ns):
            raise InvalidArgumentError("not a Newton optimizer state dict (no 'newton' entry)")
        # (a state in precondition mode stays there -- only "auto" or a trust region from it changes mode --
        # so the trust region's curvature and damping rule are never used again: not compared)
        tr_used = ns.get("mode", "trust-region") != "precondition"
        if tr_used and (ns.get("curvature") != self.curvature or ns.get("damping") != self.rule.name):
            raise InvalidArgumentError(
                f"state dict is for curvature={ns.get('curvature')!r}, damping={ns.get('damping')!r}; "
                f"this optimizer has curvature={self.curvature!r}, damping={self.rule.name!r}"
            )
        if ns.get("mode", "trust-region") != "trust-region" and self.preconditioner is None:
            raise InvalidArgumentError(
                f"state dict is for mode={ns.get('mode')!r}; this optimizer has mode='trust-region'"
            )
        if ns.get("mode", "trust-region") == "trust-region" and self._mode_asked == "precondition":
            raise InvalidArgumentError(
                "state dict is for mode='trust-region'; this optimizer has mode='precondition' (its settings "
                "would be ignored): build it with mode='trust-region' or 'auto' to resume that run"
            )
        data_parallel = getattr(self.preconditioner, "strategy", None) is not None  # (distribute()d)
        if data_parallel and ns.get("mode", "trust-region") == "trust-region":
            raise InvalidArgumentError(
                "state dict is for mode='trust-region' (full-batch training), which is not data-parallel: "
                "resume it in one process, or load a checkpoint of a preconditioned run"
            )
        shapes = ns.get("param_shapes")  # (absent: a checkpoint from before it was saved)
        if shapes is not None and [tuple(s) for s in shapes] != [tuple(p.shape) for p in self.chain.params]:
            raise InvalidArgumentError(
                f"state dict is for another model: parameters of shapes {[tuple(s) for s in shapes]}; this "
                f"optimizer's are {[tuple(p.shape) for p in self.chain.params]} (the trainable ones at the "
                "checkpoint's last step count: freeze or unfreeze layers as they were then, load, then "
                "change them)"
            )
        # the rule's settings (a fixed damping's value, a trust region's eta...) are the checkpoint's; absent
        # from a checkpoint from before they were saved, and not restored into another rule (a state in
        # precondition mode with another rule: never used again)
        settings = ns.get("rule_settings")
        rule = self.rule
        if settings is not None and ns.get("damping") == self.rule.name:
            rule = self.rule.with_settings(settings)
        momentum_state = ns.get("momentum")
        n = self.chain.num_params
        if momentum_state is not None and (
            not isinstance(momentum_state, Tensor) or tuple(momentum_state.shape) != (n,)
        ):
            what = tuple(momentum_state.shape) if isinstance(momentum_state, Tensor) else type(momentum_state)
            raise InvalidArgumentError(
                f"state dict's momentum is {what}, not a vector of this model's {n} "
                "trainable parameters: a checkpoint of another model or a damaged one"
            )
        limit = ns.get("max_relative_step", self.max_relative_step)  # (absent: from before it was saved)
        if limit is not None:
            limit = _positive_number("max_relative_step", limit)  # before anything is loaded
        momentum = self.momentum
        ns = dict(ns)
        k = _checked_curvature_batch_size(ns.pop("curvature_batch_size", self.curvature_batch_size))
        pcs = ns.pop("preconditioner", None)
        pc = self.preconditioner if pcs is not None else None
        if pc is not None:  # another model's, another basis's: refused before anything is loaded
            pc.check_state_dict(pcs)
        groups, state = self.param_groups, self.state  # (torch's load replaces both)
        regrouped = False
        try:
            try:
                super().load_state_dict(sd)
            except ValueError as e:  # torch's: another number or size of parameter groups
                regrouped = self._regrouped(sd)
                if not regrouped:
                    raise InvalidArgumentError(f"state dict does not fit this optimizer's groups: {e}") from e
                # the same parameters grouped otherwise (a layer unfrozen into a group of its own): the state
                # is per parameter (under "newton"), the groups' settings this optimizer's
                warn(
                    "the state dict's parameter groups differ from this optimizer's (the same parameters, "
                    "grouped otherwise): its state is loaded, and the groups' lr, momentum and weight_decay "
                    "are this optimizer's, not the checkpoint's"
                )
            for g in self.param_groups:  # a state dict from before the momentum was a group value
                g.setdefault("momentum", momentum)
            if pc is not None:
                pc.load_state_dict(pcs)
        except BaseException:
            self.param_groups, self.state = groups, state
            raise
        ns.setdefault("mode", "trust-region")
        ns.setdefault("momentum", None)
        ns.setdefault("previous", None)
        if ns["mode"] == "auto" and (data_parallel or self._mode_asked == "precondition"):
            # pinned, as distribute() pins it; or the mode this optimizer was asked for (an undecided auto
            # run's state is a preconditioned run's)
            ns["mode"] = "precondition"
        if self.preconditioner is None or self._mode_asked == "trust-region":
            ns["from_auto"] = False  # (this optimizer's trust region stays: it has nothing to hand back to)
        ns["max_relative_step"] = limit
        if regrouped:  # (a frozen parameter's group is one of this optimizer's groups, not the checkpoint's)
            ns["homes"] = dict(self._newton.get("homes", {}))
        else:  # (a parameter the checkpoint has no group for keeps the one this optimizer gave it: a layer
            # frozen when the checkpoint was written, in a group of this one -- unfrozen, it joins that)
            ns["homes"] = {**self._newton.get("homes", {}), **ns.get("homes", {})}
        ns.pop("rule_settings", None)
        self.rule = rule
        self._newton = copy.deepcopy(ns)
        self.mode = ns["mode"]
        self.curvature_batch_size = k
        self._rejected = None
        self._tr_batch = None  # (the batch check's fast path was this optimizer's, not the checkpoint's)

    # -- one step ---------------------------------------------------------------------------------
    def _operator(self, inputs: Tensor, targets: Tensor) -> CurvatureOperator:
        return curvature_class(self.curvature)(self.model, self.loss_fn, inputs, targets, chain=self.chain)

    @property
    def momentum(self) -> float:
        """The precondition mode's momentum: one value for every parameter group (a scheduler may change it
        between steps)."""
        m = self._group_values("momentum")
        if isinstance(m, Tensor) or not m < 1:
            raise InvalidArgumentError(
                "momentum must be one value in [0, 1) for all parameter groups (the momentum average is "
                "kept in the preconditioner's basis); the groups have "
                f"{[g.get('momentum') for g in self.param_groups]}"
            )
        return float(m)

    @momentum.setter
    def momentum(self, value: float) -> None:
        for g in self.param_groups:
            g["momentum"] = float(value)

    def _learning_rate(self) -> float | Tensor:
        """The step multiplier: the groups' common ``lr``, or a per-parameter (n,) vector when they differ."""
        return self._group_values("lr")

    def _weight_decay(self) -> float | Tensor:
        """The groups' ``weight_decay``: a number, or a per-parameter (n,) vector when they differ."""
        return self._group_values("weight_decay")

    def _group_values(self, key: str) -> float | Tensor:
        """The groups' common ``key``, or a per-parameter (n,) vector when they differ (kept while the
        groups' values stay the same: a scheduler changes them between steps -- a one-entry tensor's by
        its number, which a scheduler changes in place, ``fill_``)."""
        for g in self.param_groups:
            v = g.get(key)
            if isinstance(v, Tensor) and v.numel() != 1:
                raise InvalidArgumentError(
                    f"a parameter group's {key} must be a number or a one-entry tensor; got a tensor of "
                    f"shape {tuple(v.shape)}"
                )
        sig = tuple((_number_of(g.get(key, 0.0)), len(g["params"])) for g in self.param_groups)
        memo = self._group_memo
        if key not in memo or memo[key][0] != sig:
            memo[key] = (sig, self._group_values_now(key))
        return memo[key][1]

    def _group_values_now(self, key: str) -> float | Tensor:
        order = {id(p): i for i, p in enumerate(self.chain.params)}
        seen: list[int] = []
        values: dict[int, float] = {}
        for group in self.param_groups:
            v = _positive(key, group.get(key, 0.0), allow_zero=True)
            for p in group["params"]:
                if id(p) not in order:
                    raise InvalidArgumentError(
                        "Newton's parameter groups must hold exactly the model's trainable parameters; "
                        "a group holds a tensor that is not one of them (add_param_group with other "
                        "parameters is not supported: build a new Newton over the whole model)"
                    )
                seen.append(id(p))
                values[id(p)] = float(v)
        if sorted(seen) != sorted(order):
            raise InvalidArgumentError(
                "Newton's parameter groups must hold each trainable parameter of the model exactly once"
            )
        distinct = set(values.values())
        if len(distinct) == 1:
            return distinct.pop()
        return torch.cat(
            [
                torch.full((p.numel(),), values[id(p)], dtype=p.dtype, device=p.device)
                for p in self.chain.params
            ]
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Only while building the optimizer: the curvature is of the whole model, so a group with other
        tensors is refused at once (build a new ``Newton`` over the model, with ``params=`` groups; a
        frozen layer's group given there is filled when the layer is unfrozen)."""
        if getattr(self, "_groups_frozen", False):
            raise InvalidArgumentError(
                "Newton's parameter groups must hold exactly the model's trainable parameters; "
                "add_param_group after construction is not supported (a layer unfrozen with "
                "requires_grad_(True) joins by itself at the next step, into group 0 -- or into its own "
                "group, given at construction while it is frozen: params=[{'params': frozen.parameters(), "
                "'lr': ...}, {'params': rest}]). To regroup now, build a new Newton with "
                "params=[{'params': ..., 'lr': ...}, ...] and load this one's state_dict() into it"
            )
        super().add_param_group(param_group)

    def _regrouped(self, sd: dict[str, Any]) -> bool:
        """Whether the state dict ``sd`` is of this optimizer's parameters grouped otherwise: no
        per-parameter entries of torch's kind (Newton's state is kept under ``"newton"``) and as many
        parameters in its groups as in this optimizer's (their shapes were compared already)."""
        groups = sd.get("param_groups")
        if sd.get("state") or not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
            return False
        saved = sorted(i for g in groups for i in g.get("params", ()))
        return saved == list(range(sum(len(g["params"]) for g in self.param_groups)))

    def _write_grad(self, g: Tensor, run_hooks: bool = True) -> Tensor:
        """``p.grad <- g`` (the batch gradient) for every trainable parameter, as views of a copy: an
        in-place edit of ``p.grad`` (gradient clipping, ``zero_grad``) must not reach the ``g`` that a
        retry after a rejected step reuses. A parameter's gradient hooks (``Tensor.register_hook``:
        ``wandb.watch``'s) run here, once a step, on its piece of ``g`` in their order, as a backward pass
        runs them (hessinv's own derivative passes do not: :func:`hessinv.linalg.tensor_hooks_suspended`);
        returned: ``g`` itself, or where a hook changed a piece the gradient as the hooks left it. Without
        ``run_hooks``, ``g`` is written as it is."""
        params = self.chain.params
        sizes = [p.numel() for p in params]
        written, pieces, changed = {}, [], False
        for p, piece, orig in zip(params, g.clone().split(sizes), g.split(sizes), strict=True):
            piece = piece.view_as(p)
            for hook in list((p._backward_hooks or {}).values()) if run_hooks else ():
                out = hook(piece)
                if out is not None:
                    if out.shape != p.shape:
                        raise InvalidArgumentError(
                            f"a gradient hook (Tensor.register_hook) returned a tensor of shape "
                            f"{tuple(out.shape)} for a parameter of shape {tuple(p.shape)}"
                        )
                    piece = out.detach().to(p.dtype)
            mine = run_hooks and bool(p._backward_hooks) and not torch.equal(piece.reshape(-1), orig)
            changed |= mine
            pieces.append(piece)
            p.grad = piece
            # (and the values: an in-place op that leaves them, clip_grad_norm_ at an infinite norm to log
            # the norm, bumps the version alone -- it warned)
            written[id(p)] = (p.grad, p.grad._version, piece.reshape(-1).clone() if mine else orig)
        self._grads_written = written
        return torch.cat([q.reshape(-1) for q in pieces]) if changed else g

    def _warn_if_unscaled_targets(self, targets: Tensor) -> None:
        """Warn where a regression's targets are far from unit scale (root mean square above
        :data:`UNSCALED_TARGETS`, or below :data:`TINY_TARGETS`, where the outputs' initial scale swamps
        them): the gradient, and with it the diagonal damping ``D ~ sqrt(v)``, grows
        with the residuals while the Gauss-Newton matrix does not, so ``(G + D)^{-1} g`` is an Adam step
        of size ``1 / diagonal_damping``: each weight moves by about ``1 / diagonal_damping`` a step at
        most, however exact the curvature (targets of std 1.4e3: 16x Adam's training loss; 1.4e4: no
        progress; linear least squares with targets of rms 4.7, an offset of 3: MSE 3.6 after 300 steps of
        32 examples, 0.0097 -- the noise floor -- with the targets standardized, as SGD's 0.0096)."""
        loss = uncompiled(self.loss_fn)
        if not isinstance(loss, _REGRESSION_LOSSES) or not targets.is_floating_point() or not targets.numel():
            return
        rms = float(targets.detach().double().pow(2).mean().sqrt())
        if 0 < rms < TINY_TARGETS:
            warn(
                f"the regression targets' root mean square is {rms:.3g}: far below unit scale, the network's "
                "outputs at initialization are residuals many times the targets, and the fit relative to "
                "the targets' spread stalls at that scale (standardized diabetes targets times 1e-4: MSE / "
                "var 82 after 300 steps, 0.25 at unit scale). Standardize the targets (y - mean) / std (and "
                "the predictions back)",
                UserWarning,
            )
        if rms > UNSCALED_TARGETS:
            warn(
                f"the regression targets' root mean square is {rms:.3g}: far from unit scale, the "
                "preconditioner's diagonal damping (which grows with the gradient, hence with the residuals) "
                "swamps the curvature, and the steps become Adam steps of size 1 / diagonal_damping (and a "
                "full batch's trust region fits them slowly too). Standardize the targets (y - mean) / std "
                "(and the predictions back), or pass a smaller diagonal_damping",
                UserWarning,
            )

    def _warn_if_grads_set(self) -> None:
        """Warn (once) where ``.grad`` was set or changed since this optimizer's last step wrote it -- a
        ``backward()``, gradient clipping -- before ``step(inputs, targets)``, which computes the batch
        gradient itself and would silently ignore it (``zero_grad`` is fine: no gradient, or zeros)."""
        written = self.__dict__.get("_grads_written")
        if self.__dict__.get("_warned_grads") or not written:  # (before its first step: another optimizer's)
            return
        for p in self.chain.params:
            g = p.grad
            if g is None:
                continue
            kept = written.get(id(p))
            if (
                kept is not None
                and kept[0] is g
                and (kept[1] == g._version or torch.equal(g.reshape(-1), kept[2]))
            ):
                continue
            if bool((g != 0).any()):
                self._warned_grads = True
                warn(
                    "Newton.step(inputs, targets) computes the batch gradient itself: the .grad set or "
                    "changed since the last step (a backward(), gradient clipping) is not used. Pass a "
                    "closure (step(closure)) to step with your own gradient (a penalty, clipping), or an L2 "
                    "penalty as weight_decay=",
                    UserWarning,
                )
                return

    def _limited(self, d: Tensor) -> Tensor:
        """``d`` (n,) with each stage's part shortened to at most ``(c / L) max(||x_s||, sqrt(n_s / n)
        ||x||)`` (``c = max_relative_step``, ``L`` stages with parameters, ``n_s`` of them in stage ``s``; see
        :class:`Newton`)."""
        c = self.max_relative_step
        if c is None:
            return d
        seg = self.__dict__.get("_segments")
        key = (d.device, tuple(self.chain.sizes))  # (a hook added since can regroup the stages)
        if seg is None or seg[0] != key:
            sizes = torch.tensor([p for p in self.chain.sizes if p], device=d.device)
            ids = torch.repeat_interleave(torch.arange(len(sizes), device=d.device), sizes)
            seg = self._segments = (key, ids, sizes)
        _, ids, sizes = seg
        L = int(sizes.numel())  # (>= 1: a chain has parameters)
        sq = torch.stack([d.square(), self.chain.flat_params().to(d.dtype).square()])
        norms = sq.new_zeros(2, L).index_add_(1, ids, sq)
        # a stage's size, floored at the network's mean entry (a zero- or tiny-initialized layer, e.g. a
        # Fixup branch, grows at the scale of the others, not by 1 + c / L per step)
        floor = sizes.to(d.dtype) * (norms[1].sum() / ids.numel())
        cap = (c / L) * torch.maximum(norms[1], floor).sqrt_()
        dn = norms[0].sqrt_()
        # d = 0, or every parameter zero (cap 0): unchanged
        scale = torch.where((dn > cap) & (cap > 0), cap / dn, 1.0)
        return d * scale[ids]

    def _parts(self, d: Tensor) -> list[Tensor]:
        """The flat ``d`` (n,) as views shaped like the parameters."""
        params = self.chain.params
        return [x.view_as(p) for x, p in zip(d.split([p.numel() for p in params]), params, strict=True)]

    @torch.no_grad()
    def _apply(self, d: Tensor, parts: list[Tensor] | None = None) -> None:
        """``x <- x + d`` for the flat ``d`` (n,) (or its :meth:`_parts`), in one ``_foreach_add_`` (no
        Python between the parameters: an interrupt moves all of them or none)."""
        torch._foreach_add_(self.chain.params, self._parts(d) if parts is None else parts)

    def _batch_key(self, inputs: Tensor, targets: Tensor) -> tuple[Any, ...]:
        """Copies of the batch and the parameters' values, compared by :meth:`_same_point` (tensor versions
        would miss ``p.data.mul_()``, ``vector_to_parameters`` and ``p.data = ...``), and what else the
        curvature reads (:meth:`~hessinv.chain.Chain.held_state`)."""
        params = torch.cat([p.detach().reshape(-1) for p in self.chain.params])
        return (inputs.detach().clone(), targets.detach().clone(), params, self.chain.held_state())

    def _same_point(self, key: tuple[Any, ...], inputs: Tensor, targets: Tensor) -> bool:
        """Whether the batch, the parameters and the rest the curvature reads are those
        :meth:`_batch_key` recorded in ``key``."""
        now = (
            inputs.detach(),
            targets.detach(),
            torch.cat([p.detach().reshape(-1) for p in self.chain.params]),
        )
        return all(map(same_tensor, key[:3], now)) and self.chain.same_held(key[3])

    @torch.no_grad()
    def _restore(self, backup: list[Tensor]) -> None:
        for p, b in zip(self.chain.params, backup, strict=True):
            p.copy_(b)

    def _inertia_at_zero(
        self, op: CurvatureOperator, sweeps: Sweeps, proposal, shift: float = 0.0
    ) -> Inertia | None:
        if self.track_inertia:
            t = time.perf_counter()
            try:
                inertia0: Inertia | None = op.inertia(shift)
            except SingularError:
                inertia0 = None
            sweeps.factorizations += 2
            sweeps.time_factor += time.perf_counter() - t
            return inertia0
        return Inertia(0, 0, op.shape[0]) if proposal.positive_definite_at_zero else None

    def step(  # type: ignore[override]
        self,
        *args: Any,
        inputs: Tensor | None = None,
        targets: Tensor | None = None,
        closure: Callable[[], Any] | None = None,
    ) -> Tensor:
        """One step on the batch ``(inputs, targets)`` -- or ``step(closure)`` (see the class docstring);
        returns the batch loss before the step. Positional arguments are ``inputs, targets, closure``, or,
        where the first is a closure, ``closure, inputs, targets`` (``step(closure, X, y)``, ``step(closure,
        inputs=X, targets=y)``, as torch's ``step(closure)``); an argument given twice is refused."""
        inputs, targets, closure = _step_arguments(args, inputs, targets, closure)
        if self._newton["step"] == 0 and not self.__dict__.get("_lr_warned", True):
            self._lr_warned = self._warn_group_lrs()
        self._follow_trainable()
        # Dropout / BatchNorm in training mode: the gradient as the model computes it, the curvature (and
        # every check of the chain) with them in eval mode. A refused step leaves BatchNorm's running
        # statistics as they were (the closure's forward, or the step's own in training mode, moves them
        # before the gradient's checks can refuse the batch); not a step taken whose callback raised
        layers = training_layers(self.model, self._mode_modules)
        held = [(b, b.clone()) for m in layers for b in m.buffers(recurse=False)]
        taken = self._newton["step"]
        if closure is None:
            self._warn_if_grads_set()
        # and "auto"'s decision: a step that fails after it was taken (an interrupt, out of memory) has not
        # seen the batch (retried, a mini-batch would look like full-batch training's second step)
        decided = (
            {k: self._newton[k] for k in _MODE_KEYS if k in self._newton},
            self.mode,
            self.__dict__.get("_tr_batch"),
        )
        try:
            return self._step(inputs, targets, closure, layers)
        except BaseException:  # (an interrupt too)
            if self._newton["step"] == taken:
                with torch.no_grad():
                    for b, v in held:
                        b.copy_(v)
                for k in _MODE_KEYS:
                    self._newton.pop(k, None)
                self._newton.update(decided[0])
                self.mode, self._tr_batch = decided[1], decided[2]
            raise

    def _follow_trainable(self) -> None:
        """A layer frozen or unfrozen since the last step (``requires_grad_``; fine-tuning): the optimizer
        follows the model's new trainable set -- the step count, and each kept parameter's momentum and
        preconditioner state, carry over (:meth:`Preconditioner.follow_trainable`); a parameter new to
        it starts from zero state. A frozen parameter leaves its parameter group (its ``.grad`` is set to
        None, as ``zero_grad`` would) and comes back to it when unfrozen; one no group held joins the
        only group, and with several groups is an :class:`InvalidArgumentError` (build a new ``Newton``
        with groups that hold it), nothing changed."""
        chain = self.chain
        if not chain.trainable_changed():
            return  # (any other change: the model check names it)
        new_chain, modes = deterministic_chain(self.model, self.loss_fn)
        # a frozen parameter's group, by its place in the model's parameters (ids do not survive pickling)
        homes = dict(self._newton.get("homes", {}))  # (saved with the state: a resumed run keeps it)
        place = _param_places(self.model)
        kept = {id(p) for p in chain.params}
        added = [p for p in new_chain.params if id(p) not in kept]
        lost = [p for p in added if place[id(p)] not in homes]
        if len(self.param_groups) > 1 and lost:
            raise InvalidArgumentError(
                f"{len(lost)} parameter(s) were unfrozen that none of Newton's {len(self.param_groups)} "
                "parameter groups held: build a new Newton with params=[...] groups that include them"
            )
        pc = self.preconditioner
        if pc is not None:  # (it may have followed already: a step interrupted after it did)
            pc.follow_trainable()
        m = self._newton["momentum"]
        if m is not None:
            self._newton["momentum"] = follow_params(m, chain.params, new_chain.params)
        now = {id(p) for p in new_chain.params}
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if id(p) not in now:
                    homes[place[id(p)]] = gi
                    p.grad = None
            group["params"] = [p for p in group["params"] if id(p) in now]
        for p in added:
            self.param_groups[homes.pop(place[id(p)], 0)]["params"].append(p)
        if len(self.param_groups) == 1:  # (in the chain's order, as a new optimizer's)
            self.param_groups[0]["params"] = list(new_chain.params)
        self._newton["homes"] = homes
        self.chain, self._mode_modules = new_chain, modes
        self._group_memo.clear()
        self._rejected = None

    def _step(
        self,
        inputs: Tensor | None,
        targets: Tensor | None,
        closure: Callable[[], Any] | None,
        layers: Sequence[nn.Module],
    ) -> Tensor:
        g = loss = skip = None
        # (distribute(); DataParallel.step agrees on its batch before it calls this)
        data_parallel = getattr(self.preconditioner, "strategy", None) is not None
        data_parallel = data_parallel and not self.__dict__.get("_batch_agreed", False)
        failed: HessinvError | None = None
        raised_inside: list[bool] = []  # (an exception out of the closure itself, not _run_closure's check)
        if closure is not None and data_parallel:
            user_closure = closure

            def closure() -> Any:
                try:
                    return user_closure()
                except BaseException:
                    raised_inside.append(True)
                    raise

        try:
            if closure is not None:
                loss, (inputs, targets), g = self._run_closure(closure, inputs, targets)
            if inputs is None or targets is None:
                raise InvalidArgumentError(
                    "Newton.step needs the batch: step(inputs, targets), or step(closure) with a closure "
                    "that calls the model and loss_fn (or step(closure=..., inputs=..., targets=...))"
                    + (
                        self._bare_step_hint()
                        if closure is None and inputs is None and targets is None
                        else ""
                    )
                )
            inputs, targets = _tensor(inputs, "inputs"), _tensor(targets, "targets")
            skip = nothing_to_learn(self.loss_fn, targets)
        except HessinvError as e:
            if not data_parallel or raised_inside:
                # (out of the closure: DataParallel.step's closure agrees on its forward's failures itself --
                # a second agreement here waited for the rank whose raw error had propagated, a review)
                raise
            # hessinv's own refusal of the closure's call (after its backward pass): the other ranks learn
            # of it first, as they would wait in the step's collectives; a user's exception from inside the
            # closure propagates as it is (it may come before the backward pass, where the other ranks wait
            # in DDP's all-reduce: launch() stops the job with its traceback, which an agreement here hid)
            failed = e
        if data_parallel:
            self._agree_on_the_batch(inputs, targets, skip, layers, loss, failed)
        if skip is not None:  # (an all-padding batch: torch's loss is NaN, Adam's step a momentum step)
            warn(f"Newton.step: {skip}: the step was skipped, the optimizer's state unchanged", UserWarning)
            return torch.full((), math.nan, dtype=self.chain.dtype, device=self.chain.device)
        with layers_in_mode(layers, False):
            self._check_batch(inputs, targets)
            auto = self._newton["mode"] == "auto"
            mode = self._resolve_mode(inputs, targets, layers)
            before = self.last_stats
            with linalg.one_thread_if(self.chain.small(inputs)):  # small work: more threads only wait
                if (
                    mode == "trust-region"
                    and g is not None
                    and not self._closure_is_batch(inputs, targets, g, auto)
                ):
                    mode = self._newton["mode"] = self.mode = "precondition"  # (auto, switching now)
                if mode == "precondition":
                    out = self._step_precondition(inputs, targets, g, loss, layers)
                else:
                    try:
                        out = self._step_trust_region(inputs, targets, hooks_ran=g is not None)
                    except SingularError as e:
                        if not (self._newton.get("from_auto") and getattr(e, "beyond_range", False)):
                            raise
                        # auto's trust region on a curvature beyond the dtype's range (a float32 net with
                        # outputs ~1e9: step 2 raised, a probe): the preconditioning it chose first, for good
                        warn(
                            f"Newton: {e}; mode='auto' goes on preconditioning the gradient",
                            UserWarning,
                        )
                        self._hand_back()
                        out = self._step_precondition(inputs, targets, g, loss, layers)
                    except NoExactHessian:
                        if not self._newton.get("from_auto"):
                            raise
                        # auto's full-batch trust region needs the exact Hessian, which a stage autograd
                        # cannot differentiate twice has not (an nn.EmbeddingBag: the second step on the
                        # same batch raised), nor one whose second derivatives are not symmetric
                        # (weight_norm): the Gauss-Newton preconditioning it chose first, for good
                        self._newton["mode"] = self.mode = "precondition"
                        self._newton["from_auto"] = False
                        out = self._step_precondition(inputs, targets, g, loss, layers)
        # the callback after the step's thread count and layer modes are put back (it ran on one thread,
        # with Dropout / BatchNorm in eval mode: an evaluation inside it was slowed down)
        if self.callback is not None and self.last_stats is not before and self.last_stats is not None:
            self.callback(self.last_stats)
        return out

    def _agree_on_the_batch(
        self,
        inputs: Tensor | None,
        targets: Tensor | None,
        skip: str | None,
        layers: Sequence[nn.Module],
        loss: Tensor | None,
        failed: Exception | None = None,
    ) -> None:
        """Data-parallel (:func:`hessinv.optim.distributed.distribute`): every rank learns whether another
        rank's shard was refused (:meth:`_check_batch`, an empty shard; its closure's call refused by
        :meth:`_run_closure`), has no target the loss counts, or a closure's loss that is not finite,
        before the step's collectives -- where the other ranks waited until the collective timeout, then
        got gloo's bare error (probes of the closure loop). The refusal is the same on every rank; a batch
        with nothing to learn on every rank is skipped on every rank, as one process skips it."""
        from hessinv.optim.distributed import _any_rank

        error: Exception | None = failed  # (the closure's own, or the batch's, on this rank)
        if error is None and skip is None:
            assert inputs is not None and targets is not None
            try:
                with layers_in_mode(layers, False):
                    if inputs.dim() >= 1 and inputs.shape[0] == 0:
                        self.chain.check_inputs(inputs, targets)  # (its named error for an empty shard)
                    self._check_batch(inputs, targets)
            except HessinvError as e:
                error = e
        finite = error is not None or loss is None or bool(torch.isfinite(loss.detach()).all())
        refused, some_skip, some_learn, diverged = _any_rank(
            [error is not None, skip is not None, skip is None, skip is None and not finite],
            self.preconditioner.group,
        )
        if error is not None:
            raise error
        if refused:
            raise DistributedError(
                "another rank's shard of this batch was refused (its error names the cause): the step was "
                "taken on no rank"
            )
        if diverged:
            where = "this rank's shard" if skip is None and not finite else "another rank's shard"
            raise NonFiniteError(
                f"the closure's loss on {where} is not finite: the step was taken on no rank"
            )
        if some_skip and some_learn:
            where = f"this rank's shard ({skip})" if skip is not None else "another rank's shard"
            raise DistributedError(
                f"{where} has no target the loss counts, while others have: each rank's loss is the mean "
                "over its own targets, which this one's has none of; the step was taken on no rank (shard "
                "the batches so that every rank holds labelled targets)"
            )

    def _closure_is_batch(self, inputs: Tensor, targets: Tensor, g: Tensor, auto: bool) -> bool:
        """Whether a closure's gradient ``g`` is that of ``loss_fn(model(inputs), targets)``, which the trust
        region models (its loss, gradient and curvature; a penalty or clipping inside the closure would be
        ignored). If not: False in ``"auto"`` mode (it then preconditions, which uses the closure's
        gradient), else an :class:`InvalidArgumentError`."""
        _, g0 = self._loss_and_gradient(inputs, targets)
        diff = float((g.double() - g0.double()).norm())
        if diff <= math.sqrt(torch.finfo(g0.dtype).eps) * float(g0.double().norm()):
            return True
        if auto:
            return False
        raise InvalidArgumentError(
            f"mode='trust-region' models loss_fn(model(inputs), targets) on the batch, but the closure's "
            f"gradient differs from that one's (by {diff:.3g}: a penalty, clipping or another loss inside "
            "the closure), which the trust region would ignore; use mode='precondition' (it takes the "
            "closure's gradient), or an L2 penalty as weight_decay= (its curvature is exact)"
        )

    def _bare_step_hint(self) -> str:
        """Why ``step()`` came without a batch, told by the gradients: torch's ``loss.backward();
        opt.step()`` leaves nonzero ones (Newton takes the gradient itself), torch.distributed.checkpoint's
        ``set_optimizer_state_dict`` zero ones (it calls ``step()`` to create an empty state)."""
        grads = [p.grad for gr in self.param_groups for p in gr["params"] if p.grad is not None]
        if any(bool(g.any()) for g in grads):
            return (
                " -- Newton computes the gradient (and the curvature) from the batch itself: call "
                "opt.step(inputs, targets), no loss.backward() before it"
            )
        return (
            " -- torch.distributed.checkpoint's set_optimizer_state_dict calls step() to create an empty "
            "state, and its get_optimizer_state_dict keeps only 'state' and 'param_groups' (Newton's own "
            "state is under 'newton'): save and load Newton with opt.state_dict() and opt.load_state_dict()"
        )

    def _check_batch(self, inputs: Tensor, targets: Tensor) -> None:
        """Named errors for a batch or model the steps cannot take. The model (:meth:`Chain.check_model`:
        dtype, device, Dropout/BatchNorm modes) every step, microseconds; the batch in full (shapes,
        dtypes, non-finite values, the targets against the outputs) when it differs in kind from the last
        batch checked (:meth:`Chain.check_batch_if_new`). The preconditioner's own split of the model,
        through which its refreshes form the curvature, is checked alike (a traced attribute changed or a
        hook added since: it is split again too -- it kept the old function's curvature, silently)."""
        self.chain.check_model()
        if self.preconditioner is not None and self.preconditioner.chain is not self.chain:
            self.preconditioner.chain.check_model()
        self._newton["checked"] = self.chain.check_batch_if_new(inputs, targets, self._newton.get("checked"))

    def _resolve_mode(self, inputs: Tensor, targets: Tensor, layers: Sequence[nn.Module] = ()) -> str:
        """``"auto"`` resolves itself at the second step: ``"trust-region"`` when it gets the same batch as
        the first (full-batch training), else ``"precondition"`` (mini-batches; a later repeat, e.g. a
        batch of one example drawn twice, no longer switches); the trust region hands back to
        preconditioning, for good, at the first batch with other examples. ``layers``: the model's Dropout or
        BatchNorm in training mode (:func:`hessinv.chain.training_layers`), whose batch loss the trust
        region cannot model: ``"auto"`` preconditions, ``"trust-region"`` is refused."""
        ns = self._newton
        random = bool(layers)
        if self.preconditioner is None:  # (mode="trust-region": no preconditioning to hand back to)
            ns["from_auto"] = False
        if random and ns["mode"] == "trust-region" and ns.get("from_auto"):
            ns["mode"] = self.mode = "precondition"
            ns["from_auto"] = False
        if random and ns["mode"] == "trust-region":
            names = sorted({type(m).__name__ for m in layers})
            raise InvalidArgumentError(
                f"mode='trust-region' models the batch loss of a deterministic per-example network, and "
                f"{', '.join(names)} in training mode make it random or mix the batch's examples: call "
                "model.eval() for the trust region, or train with mode='precondition' (or 'auto')"
            )
        if random and ns["mode"] == "auto":
            ns["mode"] = self.mode = "precondition"
            ns["previous"], ns["from_auto"] = None, False
        if ns["mode"] != "auto":
            rows = ns.get("trust_region_rows")  # (None: a checkpoint from before it was kept)
            if (
                ns.get("from_auto")
                and ns["mode"] == "trust-region"
                and (
                    not self._same_batch(rows, inputs, targets)
                    if rows is not None
                    else inputs.shape[:1] != tuple(ns.get("trust_region_batch", inputs.shape[:1]))
                    and not self._trust_region_affordable(inputs)
                )
                or ns.get("from_auto")
                and ns["mode"] == "trust-region"
                and isinstance(self._weight_decay(), Tensor)
            ):  # full-batch training was over (a first phase on one batch, or several steps per
                # mini-batch): mini-batches now, whose trust-region steps fit the batch's noise; or the
                # groups' weight decays were made to differ (the trust region takes one: it shifts H --
                # auto's choice is redone, as at the second step, rather than refused)
                self._hand_back()
            return ns["mode"]
        prev = ns["previous"]
        if prev is None:
            ns["previous"] = (inputs.detach().clone(), targets.detach().clone())
            return "precondition"
        same = _same_rows(prev, (inputs, targets))
        # full batch: the trust region, where its factorizations are affordable on the batch (a 2k-parameter
        # MLP on 455 examples: 3 s per step, 1800x Adam's; 1437 digits: beyond memory) and it takes the
        # groups' weight decay (one number: it shifts H; per-group values stay with preconditioning)
        tr = (
            same
            and not isinstance(self._weight_decay(), Tensor)
            and self._trust_region_affordable(inputs, targets)
        )
        ns["mode"] = self.mode = "trust-region" if tr else "precondition"
        pc = self.preconditioner
        B = int(inputs.shape[0])
        if (
            same
            and not tr
            and pc is not None
            and pc.curvature == "gauss_newton"  # (the Hessian's factorization grows as B^2 too, and more)
            and self.curvature_batch_size is None
            and 2.0 * B * B * self.chain.num_params <= FULL_BATCH_CURVATURE_FLOPS
        ):
            # full-batch training, preconditioned: the curvature of the whole batch -- outside an 8-example
            # curvature's subspace the step is Adam's at a fixed lr, whose loss floor a full-batch
            # regression met (1e-4 against 1e-13 with the batch's curvature; 128 of 350 examples did not
            # lift it; a probe)
            if B > pc.curvature_batch_size:  # (and now: the next refresh was nine steps away, a probe)
                pc.curvature_batch_size = B
                pc.refresh_at_next_update()
        ns["previous"] = None
        ns["from_auto"] = tr  # (the trust region may hand back to preconditioning: _leave_if_stalled)
        ns["trust_region_best"] = ns["trust_region_since"] = None
        ns["trust_region_batch"] = list(inputs.shape[:1])
        # (and at the first batch with other rows: 13 floats, which the state dict keeps as they are)
        ns["trust_region_rows"] = _row_fingerprint(inputs, targets) if tr else None
        self._tr_batch = _storage_key(inputs, targets) if tr else None
        return ns["mode"]

    def _same_batch(self, fingerprint: list[float], inputs: Tensor, targets: Tensor) -> bool:
        """Whether ``(inputs, targets)`` holds the examples the trust region was chosen on: the same tensors
        again, unchanged by their version counters and by 256 sampled entries (microseconds), or a batch
        of that :func:`_row_fingerprint` (a pass over the batch). An empty batch: left to the step's own
        named error, with no change of mode."""
        kept = self.__dict__.get("_tr_batch")
        if kept is not None and _same_storage(kept, inputs, targets):
            return True
        if inputs.dim() == 0 or inputs.shape[0] == 0:
            return True
        if not _same_fingerprint(fingerprint, _row_fingerprint(inputs, targets)):
            self._tr_batch = None
            return False
        self._tr_batch = _storage_key(inputs, targets)
        return True

    def _leave_if_stalled(self) -> None:
        """``mode="auto"``'s trust region: back to preconditioning, for good, where the radius collapsed
        (:data:`TRUST_REGION_STALL`) or the loss stopped falling (:data:`TRUST_REGION_PATIENCE`)."""
        ns = self._newton
        radius = ns["rule"].get("radius") if isinstance(ns["rule"], dict) else None
        if (
            not ns.get("from_auto")
            or radius is None
            or self.preconditioner is None
            or self.last_stats is None
        ):
            return
        # converged, not stalled: a loss fitted to rounding (an exact fit: the ratio test is noise at f = 0,
        # and the radius collapses there too) or a zero gradient -- the trust region keeps it
        f, f0 = self.last_stats.loss, ns.setdefault("trust_region_loss0", self.last_stats.loss)
        eps = torch.finfo(self.chain.dtype).eps
        grads = [p.grad for p in self.chain.params if p.grad is not None]
        if (0 <= f <= math.sqrt(eps) * f0) or not any(bool(g.any()) for g in grads):
            return
        x_norm = float(self.chain.flat_params().double().norm())
        floor = TRUST_REGION_STALL * math.sqrt(eps) * max(1.0, x_norm)
        best = ns.get("trust_region_best")
        if best is None or f < best - math.sqrt(eps) * abs(best):
            ns["trust_region_best"], ns["trust_region_since"] = f, 0
        else:
            ns["trust_region_since"] = ns.get("trust_region_since", 0) + 1
        if radius < floor or ns["trust_region_since"] >= TRUST_REGION_PATIENCE:
            self._hand_back()

    def _hand_back(self) -> None:
        """``mode="auto"``'s trust region hands back to preconditioning, for good, its momentum started
        afresh: the first step's, kept through the trust region with a bias correction that counted its
        steps, made the first preconditioned steps after it 4.6x short (a probe)."""
        ns = self._newton
        ns["mode"] = self.mode = "precondition"
        ns["from_auto"] = False
        ns["momentum"], ns["momentum_since"] = None, ns["step"]

    def _warn_group_lrs(self) -> bool:
        """At the first step: :func:`_warn_adam_sized_lr` for an Adam-sized lr that came some other way than
        the constructor's -- a parameter group's own, one set in ``param_groups`` since, or a scheduler's
        (its ``max_lr``, or the ``initial_lr`` it scales from: a warm-up from a small fraction of ``lr=1``
        is not one; a probe: ``OneCycleLR(max_lr=1e-3)`` sat at chance, 2.33 after 3 epochs against 0.64,
        unwarned). Whether it warned."""
        for i, g in enumerate(self.param_groups):
            key = next((k for k in ("max_lr", "initial_lr") if isinstance(g.get(k), (int, float))), "lr")
            lr = g.get(key)
            if isinstance(lr, (int, float)) and _warn_adam_sized_lr(
                float(lr), f"parameter group {i}'s {key} = {float(lr):g}"
            ):
                return True
        return False

    def _trust_region_affordable(self, inputs: Tensor, targets: Tensor | None = None) -> bool:
        """Whether one factorization of the curvature of the batch ``inputs`` costs at most
        :data:`TRUST_REGION_MAX_FLOPS` (:func:`hessinv.curvature.factorization_flops`; the trust region
        spends a few per step) -- or, priced above that but within :data:`TRUST_REGION_TIMED_FLOPS`, with
        ``targets`` given, whether one factorization, timed, takes at most :data:`TRUST_REGION_MAX_SECONDS`:
        on small blocks the model prices a factorization 10-40x over its time (a 64-8-10 tanh MLP on 100-200
        digits: 5.6e8-6.7e8 flops modelled, a factorization 11-30 ms, trust-region steps of 16-25 ms; auto
        preconditioned, loss 1.81 after 60 steps against the trust region's 0 and Adam's 0.4; a probe). The
        timing only adds: what the model accepts is never timed."""
        k = self.curvature_batch_size
        batch = int(inputs.shape[0]) if k is None else min(k, int(inputs.shape[0]))
        with torch.no_grad():
            zs = self.chain.forward(inputs[:1])
        widths = [int(z[0].numel()) for z in zs[:-1]]
        cpu = self.chain.device.type == "cpu"
        flops = factorization_flops(self.chain.sizes, widths, batch, cpu, int(zs[-1][0].numel()))
        if flops <= TRUST_REGION_MAX_FLOPS:
            return True
        if targets is None or flops > TRUST_REGION_TIMED_FLOPS:
            return False
        t0 = time.perf_counter()
        try:  # (the operator of the first `batch` examples, factored at a unit damping: any will do for time)
            self._operator(inputs[:batch], targets[:batch]).factor(1.0)
        except HessinvError:
            return False
        return time.perf_counter() - t0 <= TRUST_REGION_MAX_SECONDS

    def _run_closure(
        self, closure: Callable[[], Any], inputs: Tensor | None, targets: Tensor | None
    ) -> tuple[Tensor | None, tuple[Tensor | None, Tensor | None], Tensor]:
        """Run a ``torch.optim`` closure, watching the model's input and the loss module's target (of the
        calls with autograd on, where there are any: a forward under ``torch.no_grad()`` -- a validation
        batch logged inside the closure -- is not the one trained)."""
        seen: dict[str, list[Tensor]] = {"inputs": [], "targets": [], "extra": [], "off": [], "toff": []}
        first = model_parts(self.model)[0]
        me = threading.get_ident()  # (another thread's calls of a loss module shared with it are not ours)

        def on_model(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            if threading.get_ident() != me:
                return
            x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
            if isinstance(x, Tensor):
                seen["inputs" if torch.is_grad_enabled() else "off"].append(x)
            extra = [a for a in args[1:] if a is not None] + [v for v in kwargs.values() if v is not None]
            if args and extra:
                seen["extra"].append(extra)

        def on_loss(_m: nn.Module, args: tuple, kwargs: dict) -> None:  # (input, target), or by keyword
            if threading.get_ident() != me:
                return
            t = args[1] if len(args) >= 2 else kwargs.get("target")
            if isinstance(t, Tensor):
                seen["targets" if torch.is_grad_enabled() else "toff"].append(t)

        handles = [first.register_forward_pre_hook(on_model, with_kwargs=True)]
        if isinstance(self.loss_fn, nn.Module):
            handles.append(self.loss_fn.register_forward_pre_hook(on_loss, with_kwargs=True))
        try:
            with torch.enable_grad():
                loss = closure()
        finally:
            for h in handles:
                h.remove()
        if seen["extra"] and not self.__dict__.get("_warned_extra"):
            self._warned_extra = True
            warn(
                "the closure called the model with more than its input (model(x, ...)): the curvature is "
                "that of model(inputs) alone, the other arguments left at their defaults -- pack them into "
                "the inputs (a module whose forward unpacks them) for a curvature of the function trained",
                UserWarning,
            )
        calls = seen["inputs"] or seen["off"]
        inputs = inputs if inputs is not None else _one_batch(calls, "model", "inputs")
        targets = (
            targets
            if targets is not None
            else _one_batch(seen["targets"] or seen["toff"], "loss_fn", "targets")
        )
        if inputs is None or targets is None:
            missing = "the model" if inputs is None else "this optimizer's loss_fn"
            watch = (
                "the very loss module Newton was built with: another instance, e.g. a new "
                "nn.CrossEntropyLoss() inside the closure, is not seen -- call opt.loss_fn); or pass the "
                if isinstance(self.loss_fn, nn.Module)
                else "the loss module Newton was built with, and this loss_fn is a function, which cannot "
                "be watched); pass the "
            )
            raise InvalidArgumentError(
                f"the closure did not call {missing} on a batch (the batch is read from the calls of the "
                f"model and of {watch}batch: step(closure=closure, inputs=X, targets=y)"
            )
        if any(p.grad is None for p in self.chain.params):
            raise InvalidArgumentError(
                "the closure must call backward() on the loss: some parameters have no .grad"
            )
        g = torch.cat([dense_grad(p.grad).reshape(-1) for p in self.chain.params]).detach()
        # (a closure may return None, as torch.optim allows: the batch loss is then computed)
        loss_t = (
            None
            if loss is None
            else loss.detach()
            if isinstance(loss, Tensor)
            else torch.as_tensor(float(loss), dtype=self.chain.dtype, device=self.chain.device)
        )  # (a Python number: in the model's dtype -- torch's default would round a float64 model's loss)
        # (the caller's own tensors where they hold no graph: the trust region's check of the batch then
        # sees the same objects again, and takes its fast path)
        plain = [t.detach() if t.requires_grad else t for t in (inputs, targets)]
        return loss_t, (plain[0], plain[1]), g

    @torch.no_grad()
    def _step_precondition(
        self,
        inputs: Tensor,
        targets: Tensor,
        g: Tensor | None,
        closure_loss: Tensor | None = None,
        layers: Sequence[nn.Module] = (),
    ) -> Tensor:
        """``x <- x - lr (C_k + D_t)^{-1} m_t / (1 - momentum^t)`` (see the class docstring); the batch's
        loss and gradient with ``layers`` (:func:`hessinv.chain.training_layers`) in training mode."""
        t_start = time.perf_counter()
        ns = self._newton
        pc = self.preconditioner
        if not getattr(self, "_targets_checked", False):
            # (auto's first step too: the full-batch trust region after it fits unscaled targets slowly as
            # well -- targets of scale 1e4: 531 steps to beat predicting their mean, 3 standardized; a probe)
            self._targets_checked = True
            self._warn_if_unscaled_targets(targets)
        assert pc is not None
        pc._warn_if_data_parallel()  # (a Newton not distribute()d in a process group: the replicas drift)
        lr = self._learning_rate()
        try:
            if g is None:
                with layers_in_mode(layers, True):
                    loss0, g = self._loss_and_gradient(inputs, targets)
                g = self._write_grad(g)  # (as the parameters' gradient hooks leave it)
            else:  # the closure's loss is the batch loss here (no second forward pass; a closure that
                # returns None: the deterministic network's, which moves no running statistics)
                loss0 = closure_loss if closure_loss is not None else self._batch_loss(inputs, targets)
        except (RuntimeError, ValueError, IndexError, TypeError):
            self._explain_failure(inputs, targets)
            raise
        if not linalg.all_finite(g) or not bool(torch.isfinite(loss0)):
            self._explain_failure(inputs, targets)  # e.g. every target ignored: 0/0
            raise NonFiniteError(f"the loss ({float(loss0)}) or the gradient contains NaN or infinity")
        t_deriv = time.perf_counter() - t_start
        wd = self._weight_decay()  # the penalty wd/2 |x|^2: gradient wd x, curvature wd I (D)
        if isinstance(wd, Tensor) and pc.curvature == "hessian":  # (before any state moves)
            raise InvalidArgumentError(
                "curvature='hessian' takes one weight_decay for all parameters (it shifts H); per-group "
                "values need the Gauss-Newton curvature"
            )
        pc.weight_decay = wd
        with pc._atomic():  # a step that fails (out of memory in a refresh, an interrupt) changes nothing
            scale = pc.reference_scale(inputs, targets)  # (a summed loss: to the first batch's count)
            g = pc.penalized(g)
            # the momentum is kept in the preconditioner's basis (one rotation per step fewer); a basis
            # refresh carries it over (a new tensor: the old one stays as it was if the step fails)
            gr = pc.observe(g)
            m = ns["momentum"]
            mom = self.momentum
            m = gr * (1 - mom) if m is None else (m * mom).add_(gr, alpha=1 - mom)
            refreshed = pc.due()
            t = time.perf_counter()
            pc.update(inputs, targets, carry=(m,))
            t_factor = time.perf_counter() - t
            t = time.perf_counter()
            step = ns["step"] + 1
            direction = pc.solve(m / (1 - mom ** (step - ns.get("momentum_since", 0))), rotated=True)
            d = self._limited(_scaled(direction, lr))
            parts = self._parts(-d)
        self._apply(d, parts)  # (one foreach call: all parameters or none; the state committed just before)
        ns.update(step=step, momentum=m)
        t_solve = time.perf_counter() - t
        batch = int(inputs.shape[0])
        lr_f = max(float(g["lr"]) for g in self.param_groups)
        stats = StepStats(
            step=step, loss=float(loss0), loss_after=math.nan, predicted_decrease=float(g @ d) / scale,
            actual_decrease=math.nan, rho=math.nan, accepted=True, damping=pc.damping, radius=None,
            step_norm=float(d.norm()), boundary=False, hard_case=False, inertia=None, inertia_at_zero=None,
            negative_curvature=None, lr=lr_f, batch_size=batch,
            curvature_batch_size=pc.curvature_examples, factorizations=int(refreshed),
            solves=1, fallback=False, backtracks=0, time_derivatives=t_deriv, time_factor=t_factor,
            time_solve=t_solve, time_total=time.perf_counter() - t_start, mode="precondition",
            refreshed=refreshed,
        )  # fmt: skip
        self.last_stats = stats
        return loss0.detach()

    @_deterministic_curvature
    def _explain_failure(self, inputs: Tensor, targets: Tensor) -> None:
        """After the plain forward/backward failed on a batch: raise the named error that the chain's
        own checks give for it (inputs, then the loss stage's targets: shape, dtype, class range), if
        any; else return, and the caller re-raises the original error. (The chain is the deterministic
        network's: Dropout / BatchNorm in eval mode, as a caller in training mode may have left them.)"""
        self.chain.check_inputs(inputs, targets)
        try:
            self.chain.linearize(inputs, targets, second_order=False)
        except HessinvError:
            raise
        except Exception:  # noqa: BLE001 - not the inputs' fault: the original error explains it
            return

    def _batch_loss(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """The batch loss at the current parameters, through the model's own forward (the function
        itself, fastest) or, for a list of stages, their forwards."""
        with NoFastPath():  # (the function the curvature is of: no fused transformer path)
            if isinstance(self.model, nn.Module) and not isinstance(self.model, nn.ModuleList):
                z = self.model(unshared(inputs))
            else:
                z = inputs
                for stage in self.chain.stages:
                    z = stage.forward(z)
        return self.loss_fn(z, unshared(self.chain.prepare_targets(targets)))

    def _loss_and_gradient(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """The batch loss and its gradient by backprop (zero for a parameter this batch's forward did not
        use: a block that LayerDrop or stochastic depth skipped in training mode)."""
        with torch.enable_grad():
            loss = self._batch_loss(inputs, targets)
            grads = linalg.grad(loss, self.chain.params, allow_unused=True, materialize_grads=True)
        return loss.detach(), torch.cat([dense_grad(gr).reshape(-1) for gr in grads])

    @torch.no_grad()
    def _step_trust_region(self, inputs: Tensor, targets: Tensor, hooks_ran: bool = False) -> Tensor:
        """One trust-region Newton step on the batch ``(inputs, targets)`` (the module docstring);
        ``hooks_ran``: the parameters' gradient hooks ran on this step's gradient (a closure's backward)."""
        t_start = time.perf_counter()
        ns = self._newton
        lr = self._learning_rate()
        batch = int(inputs.shape[0]) if isinstance(inputs, Tensor) and inputs.dim() > 0 else 0
        k = self.curvature_batch_size
        subsample = k is not None and 0 < k < batch
        if subsample:
            self._generator.set_state(ns["rng"])
            finite = functools.partial(finite_loss_on, self, inputs, targets)
            idx = curvature_batch(self.loss_fn, targets, k, self._generator, finite)
            subsample = idx is not None

        # 1. derivatives (reused after a rejected step on the same batch: same point, same operator)
        cached = self._rejected
        self._rejected = None
        if cached is not None and not subsample and self._same_point(cached[0], inputs, targets):
            loss0, op, g, rng = cached[1], cached[2], cached[2].gradient, ns["rng"]
        elif subsample:
            rng = self._generator.get_state()
            with explained_subsample(k, self.loss_fn, targets):
                op = self._operator(inputs[idx], targets[idx])
            loss0, g = self._loss_and_gradient(inputs, targets)
        else:
            rng = ns["rng"]
            op = self._operator(inputs, targets)
            loss0, g = op.loss, op.gradient  # the loss module's value at the linearization point
        # a loss that sums over the examples: the model is that of omega f, omega = k / n, whose
        # curvature the k-example operator estimates (the steps are then those of the mean's)
        omega = 1.0
        if subsample:
            omega = 1.0 / curvature_weight(self, inputs[idx], targets[idx], targets)
        t_deriv = time.perf_counter() - t_start
        wd = self._weight_decay()  # the penalty wd/2 |x|^2: gradient wd x, Hessian wd I, in the model too
        if isinstance(wd, Tensor):
            raise InvalidArgumentError(
                "the trust region takes one weight_decay for all parameters (it shifts H by wd I); "
                "per-group values need mode='precondition'"
            )
        loss_data, g_data = loss0, g
        hooked = g_data if hooks_ran else self._write_grad(g_data)
        if hooked is not g_data:
            if ns.get("from_auto"):  # (auto's trust region: preconditioning, which follows the hooks)
                self._hand_back()
                return self._step_precondition(inputs, targets, hooked, loss_data)
            raise UnsupportedStageError(
                "a gradient hook (Tensor.register_hook) changed the gradient: the trust region's step and "
                "its ratio test are the loss's own derivatives and cannot follow it. Use a hook that only "
                "reads the gradient (wandb.watch's), mode='precondition' (which preconditions the gradient "
                "as the hooks leave it), or a closure"
            )
        if wd:
            x0 = self.chain.flat_params()
            loss0, g = loss0 + 0.5 * wd * float(x0 @ x0), g + wd * x0
        if omega != 1.0:
            loss0, g = omega * loss0, omega * g

        # 2. proposal
        sweeps = Sweeps(op, shift=omega * wd, unit=omega)
        proposal = self.rule.propose(sweeps, g, ns["rule"])
        # float32: an interior step to ~cond u (Sweeps.refine); a boundary step is shrunk onto the sphere
        # and no longer solves the system (refining it would undo the shrinking)
        if proposal.step.dtype != torch.float64 and not (proposal.hard_case or proposal.boundary):
            proposal.step = sweeps.refine(proposal.factor, -g, proposal.step)

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
                f_t = float(self._batch_loss(inputs, targets))
                if wd:
                    xt = self.chain.flat_params()
                    f_t += 0.5 * wd * float(xt @ xt)
                f_t *= omega
            except NonFiniteError:
                f_t = math.nan
            except BaseException:  # (out of memory, an interrupt): the step not taken, x as it was
                self._restore(backup)
                raise
            if not math.isfinite(f_t):
                return f_t, pred_t, -math.inf
            if pred_t + delta <= 0:  # (no ratio: the model predicts no decrease -- the rule decides)
                return f_t, pred_t, math.nan if self.rule.takes_every_step else -math.inf
            return f_t, pred_t, (f0 - f_t + delta) / (pred_t + delta)

        # Every product with H comes before the trial point: the operator's blocks read the live
        # parameters, which the trial moves.
        self._write_grad(g_data, run_hooks=False)  # (the hooks ran on it above)
        d = _scaled(proposal.step, lr)
        d64 = d.double()
        gd, dHd, step_norm = float(g64 @ d64), float(d64 @ sweeps.matvec(d).double()), float(d64.norm())
        inertia0 = self._inertia_at_zero(op, sweeps, proposal, omega * wd)
        f1, pred, rho = trial(d, gd, dHd, step_norm, 1.0)
        if isinstance(lr, Tensor) or lr != 0:
            # (the rule's radius bounds s; the step taken is d = lr s: the groups' largest lr)
            proposal.lr = float(lr.max()) if isinstance(lr, Tensor) else float(lr)
            rule_state, accepted = self.rule.update(ns["rule"], proposal, rho)
        else:  # lr = 0 (a schedule's warm-up): a zero step says nothing about the radius or damping
            rule_state, accepted = ns["rule"], True
        used_fallback = False
        if not accepted and proposal.fallback is not None:
            self._restore(backup)  # the operator is valid again at the restored (bitwise) point
            e = _scaled(proposal.fallback, lr)
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
            self._rejected = (self._batch_key(inputs, targets), loss_data, op)
        actual = f0 - f1
        step_norm *= scale
        t_deriv += time.perf_counter() - t

        # 4. statistics
        proved = proposal.lambda_lower if proposal.lambda_proved is None else proposal.lambda_proved
        if proved > 0 or (inertia0 is not None and inertia0.negative > 0):
            negative_curvature: bool | None = True
        elif proposal.positive_definite_at_zero or (inertia0 is not None and inertia0.negative == 0):
            negative_curvature = False
        else:
            negative_curvature = None

        self._newton = {**ns, "step": ns["step"] + 1, "rule": rule_state, "rng": rng}
        stats = StepStats(
            step=self._newton["step"], loss=f0 / omega, loss_after=f1 / omega,
            predicted_decrease=pred / omega, actual_decrease=actual / omega, rho=rho, accepted=accepted,
            damping=proposal.damping / omega,
            radius=proposal.radius, step_norm=step_norm, boundary=proposal.boundary and not used_fallback,
            hard_case=proposal.hard_case, inertia=proposal.factor.inertia, inertia_at_zero=inertia0,
            negative_curvature=negative_curvature, lr=max(float(g["lr"]) for g in self.param_groups),
            batch_size=batch, curvature_batch_size=int(idx.numel()) if subsample else batch,
            factorizations=sweeps.factorizations,
            solves=sweeps.solves, fallback=used_fallback, backtracks=backtracks, time_derivatives=t_deriv,
            time_factor=sweeps.time_factor, time_solve=sweeps.time_solve,
            time_total=time.perf_counter() - t_start,
        )  # fmt: skip
        self.last_stats = stats
        self._leave_if_stalled()
        return loss_data.detach()


def _check_mode_settings(
    mode: str,
    curvature: str | None,
    damping: Any,
    diagonal_damping: Any,
    track_inertia: bool,
    backtracking: int,
) -> None:
    """A named error for settings the chosen mode would ignore (no silent no-op)."""
    if mode == "precondition":
        if track_inertia or backtracking:
            raise InvalidArgumentError(
                "track_inertia and backtracking are trust-region settings; mode='precondition' takes no "
                "ratio test: drop them, or use mode='trust-region'"
            )
        number = isinstance(damping, (int, float)) and not isinstance(damping, bool)
        if damping is not None and not (curvature == "hessian" and number):
            raise InvalidArgumentError(
                f"damping={damping!r} is a trust-region setting; in mode='precondition' the damping is "
                "diagonal_damping= (Gauss-Newton; with curvature='hessian', damping= is a number)"
            )
        if curvature == "hessian" and diagonal_damping is not None:
            raise InvalidArgumentError(
                "diagonal_damping is the Gauss-Newton preconditioner's; with curvature='hessian' the "
                "preconditioner's damping is damping= (a number)"
            )
    if mode == "trust-region" and diagonal_damping is not None:
        raise InvalidArgumentError(
            "diagonal_damping is a precondition-mode setting, not used by the trust region; drop it, or "
            "use mode='precondition' (or 'auto' for mini-batches)"
        )


def _one_batch(seen: list[Tensor], what: str, name: str) -> Tensor | None:
    """The one batch a closure gave ``what`` (None if none); calls on different batches (a validation
    batch beside the training one) are ambiguous and refused."""
    if any(t is not seen[0] and (t.shape != seen[0].shape or not torch.equal(t, seen[0])) for t in seen[1:]):
        raise InvalidArgumentError(
            f"the closure called {what} on {len(seen)} different batches; say which one the step is on: "
            f"step(closure=closure, inputs=X, targets=y)"
        )
    return seen[0] if seen else None


def _same_rows(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> bool:
    """Whether the batches ``a`` and ``b`` (inputs, targets) hold the same examples, in any order (a
    ``DataLoader(shuffle=True)`` over the whole training set hands over the same rows permuted): the
    rows of each, sorted by a fixed random projection of inputs and targets, compared exactly (two rows
    tied by the projection but different read as other batches: the safe side)."""
    (xa, ya), (xb, yb) = a, b
    if xa.shape != xb.shape or ya.shape != yb.shape or xa.dtype != xb.dtype or ya.dtype != yb.dtype:
        return False
    if torch.equal(xa, xb) and torch.equal(ya, yb):
        return True
    if xa.dim() == 0 or xa.shape[0] < 2:
        return False
    ia, ib = torch.argsort(_projections(xa, ya)), torch.argsort(_projections(xb, yb))
    return torch.equal(xa[ia], xb[ib]) and torch.equal(ya[ia], yb[ib])


def _projections(x: Tensor, y: Tensor) -> Tensor:
    """(B,) float64: each example's row of inputs and targets projected onto a fixed random direction."""
    B = int(x.shape[0]) if x.dim() else 1
    width = x.numel() // max(B, 1) + y.numel() // max(B, 1)
    r = torch.randn(width, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(x.device)
    return torch.cat([x.reshape(B, -1).double(), y.reshape(B, -1).double()], dim=1) @ r


def _storage_key(x: Tensor, y: Tensor) -> tuple:
    """What :func:`_same_storage` compares: weak references to the tensors (the same objects, not kept
    alive: a copy of the optimizer does not carry the batch), their version counters, and 256 sampled
    entries of each (a refill written through numpy, which the version counter does not see, changes
    them; a write to a few entries elsewhere is not seen -- :func:`_row_fingerprint` is what tells
    batches apart)."""

    def key(t: Tensor) -> tuple:
        flat = t.detach().reshape(-1)
        idx = torch.linspace(0, max(flat.numel() - 1, 0), 256).long().unique().to(t.device)
        return (weakref.ref(t), t._version, idx, flat[idx].clone() if flat.numel() else flat.clone())

    return key(x), key(y)


def _same_storage(kept: tuple, x: Tensor, y: Tensor) -> bool:
    """Whether ``(x, y)`` are the tensors of :func:`_storage_key` ``kept``, unchanged as far as it sees."""
    for (ref, version, idx, values), t in zip(kept, (x, y), strict=True):
        if ref() is not t or t._version != version:
            return False
        flat = t.detach().reshape(-1)
        if flat.numel() and not torch.equal(flat[idx], values):
            return False
    return True


#: random frequencies and phases of :func:`_row_fingerprint`'s cosine sums
_FREQUENCIES = torch.rand(4, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 6 + 1
_PHASES = torch.rand(4, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 6.2832


def _row_fingerprint(x: Tensor, y: Tensor, chunk: int = 65536) -> list[float]:
    """A batch's fingerprint, the same for the same examples in any order: the projections ``p``, ``q`` of
    each example's row of inputs and targets onto two fixed random directions (float64, ``chunk`` rows
    at a time), then ``[B, sum p, sum q, max|p|, max|q|]`` and, of the centred ``P = p - mean p``, ``Q``:
    ``[sum P^2, sum Q^2, sum P Q, max|P|]`` and ``sum_i cos(w_k P_i / max|P| + f_k)`` for 4 random ``w_k``,
    ``f_k``. Centred, a change of one example moves ``sum P^2`` by about ``1 / B`` of itself whatever the
    data's offset (a timestamp-like 1e9), and the cosines tell apart batches whose low moments agree (a
    reflection of the rows, a mirrored centred set, shuffled labels)."""
    x, y = x.detach(), y.detach()
    B = int(x.shape[0]) if x.dim() else 1
    if B == 0 or x.numel() == 0:
        return [float(B)]
    xf, yf = x.reshape(B, -1), y.reshape(B, -1)
    dx = xf.shape[1]
    R = torch.randn(dx + yf.shape[1], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    R = R.to(x.device)
    P = torch.cat(
        [
            xf[i : i + chunk].double() @ R[:dx] + yf[i : i + chunk].double() @ R[dx:]
            for i in range(0, B, chunk)
        ]
    )  # (B, 2)
    C = P - P.mean(0)
    top = float(C[:, 0].abs().max()) or 1.0
    waves = torch.cos((C[:, :1] / top) * _FREQUENCIES.to(x.device) + _PHASES.to(x.device)).sum(0)
    head = [
        P.sum(0),
        P.abs().amax(0),
        (C * C).sum(0),
        (C[:, 0] * C[:, 1]).sum()[None],
        C[:1, 0].new_tensor([top]),
    ]
    return [float(B), *torch.cat([*head, waves]).cpu().tolist()]


def _same_fingerprint(a: list[float], b: list[float]) -> bool:
    """Whether two :func:`_row_fingerprint` are of the same examples, up to the rounding of their sums:
    ``1e-10`` of each sum's scale plus the rounding the centring carries over from the raw projections
    (``u max|p|`` per row)."""
    if len(a) != len(b) or a[0] != b[0]:
        return False
    if len(a) == 1:
        return True
    B, (Mp, Mq), (Sp, Sq), top = a[0], a[3:5], a[5:7], max(a[8], 1e-300)
    u = 1e-13  # (a generous float64 rounding per operation)
    tols = [
        u * B * Mp, u * B * Mq, u * Mp, u * Mq,
        1e-10 * Sp + u * math.sqrt(B * Sp) * Mp, 1e-10 * Sq + u * math.sqrt(B * Sq) * Mq,
        1e-10 * math.sqrt(Sp * Sq) + u * (math.sqrt(B * Sq) * Mp + math.sqrt(B * Sp) * Mq),
        1e-10 * top + u * Mp,
    ] + [B * (1e-10 + 10 * u * Mp / top)] * (len(a) - 9)  # fmt: skip
    return all(abs(p - q) <= t + 1e-300 for p, q, t in zip(a[1:], b[1:], tols, strict=True))


def _checked_curvature_batch_size(value: Any) -> int | None:
    """``curvature_batch_size`` (None or an int >= 1, a numpy integer too), else an
    :class:`InvalidArgumentError`."""
    value = _plain(value)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InvalidArgumentError(f"curvature_batch_size must be None or an int >= 1, got {value!r}")
    return value


def _positive_number(name: str, value: Any) -> float:
    """``value`` as a float > 0, a numpy scalar (``np.float32(0.05)``) too; else a named error."""
    return float(_positive(name, value))


def _scaled(v: Tensor, lr: float | Tensor) -> Tensor:
    """``lr * v`` (``v`` itself for ``lr == 1``)."""
    return v * lr if isinstance(lr, Tensor) or lr != 1.0 else v


def _is_model(model: Any) -> bool:
    if isinstance(model, nn.Module):
        return True
    return isinstance(model, (list, tuple)) and bool(model) and all(isinstance(m, nn.Module) for m in model)


#: :meth:`Newton._warn_if_unscaled_targets`: a regression loss's targets of a larger root mean square
UNSCALED_TARGETS = 3.0
#: ... and below this (:meth:`Newton._warn_if_unscaled_targets`)
TINY_TARGETS = 1e-2
_REGRESSION_LOSSES = (nn.MSELoss, nn.L1Loss, nn.HuberLoss, nn.SmoothL1Loss)

#: the entries of the state that "auto" mode's decision writes (:meth:`Newton._resolve_mode`)
_MODE_KEYS = ("mode", "previous", "from_auto", "trust_region_batch", "trust_region_rows")


@contextlib.contextmanager
def _hooks_held(opt: torch.optim.Optimizer, *names: str) -> Iterator[OrderedDict]:
    """``opt``'s ``torch.optim`` hook tables ``names`` emptied for the block (``torch.optim``'s own
    ``state_dict`` / ``load_state_dict`` would run them on a part of Newton's dict), then put back; yields
    the last table's hooks, for the caller to run on the whole."""
    held = {n: getattr(opt, n) for n in names}
    for n in names:
        setattr(opt, n, OrderedDict())
    try:
        yield held[names[-1]]
    finally:
        for n, table in held.items():
            setattr(opt, n, table)


def _number_of(v: Any) -> Any:
    """A one-entry tensor's number (as it is now), anything else as it is."""
    return float(v) if isinstance(v, Tensor) and v.numel() == 1 else v


def _param_groups(
    params: Any, trainable: list[Tensor], model: Any, mode: str = "auto"
) -> tuple[list[dict[str, Any]], dict]:
    """``torch.optim`` parameter groups over exactly the model's trainable parameters, and the groups of
    the model's frozen parameters that they name (``{place in model.parameters(): group}``: left out now,
    they join that group when unfrozen -- gradual unfreezing with a learning rate per group)."""
    if params is None:
        return [{"params": list(trainable)}], {}
    if isinstance(params, (dict, Tensor)) or _not_tensors(params) is not None:
        fix = {dict: "wrap one group in a list: params=[{...}]", Tensor: "wrap it in a list: params=[t]"}
        kind = next((k for k in fix if isinstance(params, k)), None)
        raise InvalidArgumentError(
            "params must be an iterable of tensors or of parameter-group dicts, got "
            f"{type(params).__name__}; "
            + (fix[kind] if kind else "pass model.parameters() (or omit params: every trainable parameter)")
        )
    items = list(params)
    if not items:
        raise InvalidArgumentError("params is empty; omit it to optimize every trainable parameter")
    groups = [dict(i) if isinstance(i, dict) else None for i in items]
    if all(gr is None for gr in groups):
        groups = [{"params": items}]
    elif any(gr is None for gr in groups):
        raise InvalidArgumentError("params must be all tensors or all group dicts, not a mix")
    for gr in groups:
        _check_group_keys(gr, mode)
    groups = [{**gr, "params": _as_list(gr["params"])} for gr in groups]
    place = _param_places(model)
    homes: dict[int, int] = {}
    for gi, gr in enumerate(groups):
        frozen = [p for p in gr["params"] if not p.requires_grad]
        if any(id(p) not in place for p in frozen):
            raise InvalidArgumentError(
                "params holds a frozen tensor (requires_grad=False) that is not one of the model's "
                "parameters; hessinv optimizes the model's trainable parameters"
            )
        for p in frozen:
            homes[place[id(p)]] = gi
        gr["params"] = [p for p in gr["params"] if p.requires_grad]
    ids = [id(p) for gr in groups for p in gr["params"]]
    if sorted(ids) != sorted(id(p) for p in trainable):
        raise InvalidArgumentError(
            "params must hold each trainable parameter of the model exactly once (the curvature is of "
            "the whole model); freeze a parameter with requires_grad_(False) to leave it out"
        )
    return groups, homes


def _as_list(params: Any) -> list[Tensor]:
    """A group's ``params``: one tensor, or an iterable of them (a generator is read once)."""
    if isinstance(params, Tensor):
        return [params]
    if isinstance(params, dict):
        params = params.values()
    what = _not_tensors(params)
    if what is not None:
        raise InvalidArgumentError(f"a parameter group's params must be tensors; got {what}")
    out = list(params)
    for p in out:
        if isinstance(p, tuple) and len(p) == 2 and isinstance(p[1], Tensor):  # named_parameters()
            raise InvalidArgumentError(
                "params holds (name, tensor) pairs (named_parameters()); pass model.parameters() or omit it"
            )
        if not isinstance(p, Tensor):
            what = "a module: pass its .parameters()" if isinstance(p, nn.Module) else type(p).__name__
            raise InvalidArgumentError(f"params must hold tensors (model.parameters()); got {what}")
    return out


def _not_tensors(params: Any) -> str | None:
    """What ``params`` is, for a refusal, where it cannot be an iterable of tensors -- a module other than
    ``nn.ParameterList`` (which iterates its tensors, as torch's optimizers take it), or no iterable --
    else None."""
    if isinstance(params, nn.Module) and not isinstance(params, nn.ParameterList):
        return "a module: pass its .parameters()"
    return None if isinstance(params, Iterable) else type(params).__name__


#: the settings a parameter group may change for its own parameters (the rest are the optimizer's)
_GROUP_SETTINGS = ("lr", "weight_decay", "momentum")
#: other torch optimizers' group settings, which Newton has no use for (refused rather than ignored)
_FOREIGN_SETTINGS = frozenset(
    "betas eps nesterov dampening maximize amsgrad foreach fused capturable differentiable lr_decay "
    "initial_accumulator_value alpha centered rho momentum_decay decoupled_weight_decay".split()
)


def _check_group_keys(group: dict[str, Any], mode: str) -> None:
    """A parameter group given at construction: its ``params``, and no setting it would ignore --
    Newton's own settings are the whole optimizer's (``beta2``, ``diagonal_damping``, ...), other
    optimizers' (``betas``, ``maximize``) have no meaning here, and the trust region takes no momentum.
    Other keys (a group's ``name`` for logging) pass, as torch's optimizers let them."""
    if "params" not in group:
        raise InvalidArgumentError(
            f"a parameter group needs a 'params' entry (its tensors); got the keys {sorted(map(str, group))}"
        )
    own = set(inspect.signature(Newton.__init__).parameters) - {"self", "model", "loss_fn", "params"}
    for key in group:
        if key in _GROUP_SETTINGS and not (key == "momentum" and mode == "trust-region"):
            continue
        if key == "momentum":
            raise InvalidArgumentError(
                "a parameter group's 'momentum' has no use in the trust region (mode='trust-region', or "
                "'auto' with damping, track_inertia or backtracking): it takes no momentum; drop it, or use "
                "mode='precondition'"
            )
        if key in own:
            raise InvalidArgumentError(
                f"a parameter group's {key!r} is not a per-group setting of Newton (per group: "
                f"{', '.join(_GROUP_SETTINGS)}): pass Newton(..., {key}=...) for the whole model"
            )
        if key in _FOREIGN_SETTINGS:
            raise InvalidArgumentError(
                f"a parameter group's {key!r} is another optimizer's setting, which Newton does not have "
                f"(per group: {', '.join(_GROUP_SETTINGS)}); drop it"
            )
