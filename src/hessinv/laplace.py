r"""The Laplace approximation of the whole network with the exact posterior precision.

Posterior ``N(theta*, P^{-1})`` with ``P = c G + delta I`` around a trained ``theta*``: ``G`` the
Gauss-Newton matrix (or the Hessian, where ``P`` is positive definite) of the *summed* negative log
likelihood, ``delta`` the prior precision of ``N(mu_0, delta^{-1} I)``, ``c = 1`` for classification
(cross-entropy) and ``c = 1 / (2 sigma^2)`` for regression (``G`` of ``sum |y - f|^2`` is
``2 J^T J``). laplace-torch approximates ``G`` (``kron``, ``diag``, low rank) or forms it densely
(``full``, cubic in the parameter count); here ``P = c (G + (delta / c) I)`` is one Riccati
factorization, ``O(L)`` in depth -- or, where ``G``'s root has few rows (``N C`` below ``n / 2``) and that
is cheaper, one Woodbury factorization through it (:meth:`hessinv.GaussNewton.factor`) -- and everything
is exact:

* log marginal likelihood (MacKay's evidence)::

      log p(D) ~ log p(D | theta*) - 1/2 [ log det P - n log delta + delta |theta* - mu_0|^2 ]

  with ``log det P = n log c + sum_l log det Qxx_l`` from the factorization's pivots (Woodbury: ``n log
  (delta / c) + log det K``);
* :meth:`Laplace.optimize_prior_precision`: a 1-D bounded search over ``log delta`` (and, for
  regression, ``log sigma``) -- from ``G``'s eigenvalues, taken once, where they cost less than the
  search's factorizations (:meth:`Laplace._spectrum`), else one factorization per evaluation;
* the linearized (GLM) predictive ``f ~ N(f(x; theta*), J(x) P^{-1} J(x)^T)`` by one batched solve,
  with the probit or Monte Carlo link for classification;
* posterior samples ``theta* + S z`` with ``S S^T = P^{-1}`` from the factors
  (:meth:`hessinv.Factorization.sample`; Woodbury: one solve with ``U^T z_1 + D^{1/2} z_2``), and the
  marginal variances ``diag(P^{-1})`` (:meth:`Laplace.posterior_variance`, selected inversion by one
  forward sweep; Woodbury: ``D^{-1} - colsum(W * K^{-1} W)``).

The posterior is the untempered one (laplace-torch's ``temperature=1``). The interface follows
laplace-torch's (``fit``, ``log_marginal_likelihood``,
``optimize_prior_precision``, ``la(x, pred_type="glm", link_approx="probit")``, ``sample``).

>>> import torch
>>> from hessinv.laplace import Laplace
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
>>> X, y = torch.randn(30, 2, dtype=torch.float64), torch.randint(0, 3, (30,))
>>> la = Laplace(net, "classification", prior_precision=1.0).fit(X, y)
>>> delta = la.optimize_prior_precision()
>>> la.log_marginal_likelihood() >= la.log_marginal_likelihood(prior_precision=10 * delta)
True
>>> probs = la(X[:4], link_approx="probit")
>>> probs.shape, bool(torch.allclose(probs.sum(1), torch.ones(4, dtype=torch.float64)))
(torch.Size([4, 3]), True)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from hessinv import linalg
from hessinv.chain import as_module, check_real, exact_no_grad, unshared
from hessinv.curvature import (
    CurvatureOperator,
    Factorization,
    GaussNewton,
    Hessian,
    check_generator,
    curvature_class,
)
from hessinv.errors import (
    DtypeMismatchError,
    HessinvError,
    IndefiniteError,
    InvalidArgumentError,
    NonFiniteArgumentError,
    NonFiniteError,
    NotFittedError,
    ShapeMismatchError,
    SingularError,
    TooLargeError,
    UnsupportedStageError,
    warn,
)
from hessinv.influence import _collect, _left_intact, _slots, output_jacobians
from hessinv.riccati import check_dense_memory

__all__ = ["Laplace"]

_LIKELIHOODS = ("classification", "regression")


def _likelihood_of(likelihood) -> str:
    """``'classification'`` / ``'regression'``, also from the loss a model was trained with
    (``nn.CrossEntropyLoss()``: categorical; ``nn.MSELoss()``: Gaussian, ``sigma_noise`` separate)."""
    if isinstance(likelihood, str) and likelihood in _LIKELIHOODS:
        return likelihood
    plain = isinstance(likelihood, nn.Module) and not any(True for _ in likelihood.buffers())
    if plain and type(likelihood) is nn.CrossEntropyLoss and likelihood.label_smoothing == 0:
        return "classification"
    if plain and type(likelihood) is nn.MSELoss:
        return "regression"
    raise InvalidArgumentError(
        f"likelihood must be 'classification' (categorical: nn.CrossEntropyLoss) or 'regression' "
        f"(Gaussian: nn.MSELoss), got {likelihood!r}; a weighted or smoothed cross-entropy, or another "
        "loss, is not the log-likelihood of a categorical or Gaussian model"
    )


class _Evidence(torch.autograd.Function):
    """:meth:`Laplace.log_marginal_likelihood` as a function of the prior precision and the noise (one-number
    tensors, or None / a number for a constant), differentiable in both: the gradients of its docstring,
    with ``tr P^{-1}`` from the factorization's exact inverse diagonal, formed when backward runs."""

    @staticmethod
    def forward(ctx, la: Laplace, delta: Any, sigma: Any) -> Tensor:  # type: ignore[override]
        like = next(v for v in (delta, sigma) if isinstance(v, Tensor))
        plain = [v.detach() if isinstance(v, Tensor) else v for v in (delta, sigma)]
        value = la.log_marginal_likelihood(*plain)
        ctx.la, ctx.point, ctx.args = la, la._args(*plain), plain
        dtype = like.dtype if like.is_floating_point() else torch.float64
        return torch.tensor(value, dtype=dtype, device=like.device)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor | None, Tensor | None]:  # type: ignore[override]
        if torch.is_grad_enabled():  # (create_graph: its gradients are numbers, so a second order would
            # be wrong -- 0.017 where the truth is -2.18, a review -- not an error)
            raise InvalidArgumentError(
                "log_marginal_likelihood: its gradient in the prior precision / noise is not differentiable "
                "again (create_graph=True): second derivatives are not supported"
            )
        la, (delta, sigma) = ctx.la, ctx.point
        fac, c = la._factor(delta, sigma)
        tr = float(fac.inverse_diagonal().double().sum()) / c  # tr P^{-1}
        d_delta = d_sigma = None
        if ctx.needs_input_grad[1]:  # (shaped as the input: a one-entry tensor of any shape)
            d = -0.5 * (tr - la.n_params / delta + la.scatter(1.0))
            d_delta = torch.full_like(ctx.args[0], d) * grad
        if ctx.needs_input_grad[2]:
            d = la.loss / sigma**3 - la.n_data * la.n_outputs / sigma + (la.n_params - delta * tr) / sigma
            d_sigma = torch.full_like(ctx.args[1], d) * grad
        return None, d_delta, d_sigma


def _grid_then_brent(
    f: Callable[[float], float], lo: float, hi: float, tol: float, points: int
) -> tuple[float, float]:
    """``(t, f(t))`` at the smallest ``f`` found in ``[lo, hi]``: ``f`` on a grid of ``points`` (``f`` need
    not be unimodal), then Brent's bounded search between the best grid point's neighbours, whose result
    is kept only where it is no worse. ``f`` may return ``inf`` (not evaluable there)."""
    from scipy.optimize import minimize_scalar

    grid = [lo + (hi - lo) * i / (points - 1) for i in range(points)]
    values = [f(t) for t in grid]
    i = min(range(points), key=values.__getitem__)
    if not math.isfinite(values[i]):
        return grid[i], values[i]
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, points - 1)]
    with np.errstate(invalid="ignore"):  # (Brent's steps between infinite values)
        r = minimize_scalar(f, bounds=(a, b), method="bounded", options={"xatol": tol})
    return (float(r.x), float(r.fun)) if float(r.fun) <= values[i] else (grid[i], values[i])


#: laplace-torch's ``optimize_prior_precision`` settings that do not change the marginal-likelihood search
#: here (gradient ascent's step count and rate, its start, the predictive's settings, its printing).
_LAPLACE_TORCH_UNUSED = {
    "pred_type",
    "n_steps",
    "lr",
    "init_prior_prec",
    "link_approx",
    "n_samples",
    "verbose",
    "progress_bar",
}


def _laplace_torch_search(kwargs: dict[str, Any]) -> None:
    """Refuse the laplace-torch ``optimize_prior_precision`` arguments whose search differs from this one's
    (a validation grid search, a per-parameter prior); accept the rest (:data:`_LAPLACE_TORCH_UNUSED`)."""
    ours = "bounds=(low, high) for delta, optimize_sigma_noise, sigma_bounds, tol"
    method = kwargs.pop("method", "marglik")
    method = str(getattr(method, "value", method)).lower()  # (laplace-torch's enums: the name is .value)
    if method != "marglik":
        raise InvalidArgumentError(
            f"optimize_prior_precision(method={method!r}): only the marginal-likelihood search is offered "
            f"(method='marglik', exact: a bracketed Brent search); its settings are {ours}"
        )
    structure = kwargs.pop("prior_structure", "scalar")
    structure = str(getattr(structure, "value", structure)).lower()
    if structure != "scalar":
        raise InvalidArgumentError(
            f"optimize_prior_precision(prior_structure={structure!r}): the prior here is one precision "
            "delta for every parameter (P = c G + delta I); use prior_structure='scalar' or leave it out"
        )
    unknown = sorted(k for k in kwargs if k not in _LAPLACE_TORCH_UNUSED)
    if unknown:
        raise InvalidArgumentError(
            f"optimize_prior_precision got {', '.join(unknown)}: a validation grid search is not offered "
            f"(the evidence is maximized exactly instead); its settings are {ours}"
        )


def _check_ported(subset_of_weights: Any, hessian_structure: Any, temperature: Any, backend: Any) -> None:
    """Refuse laplace-torch's constructor keywords where they ask for something other than the exact,
    full-network, untempered Laplace approximation this class computes."""
    if subset_of_weights != "all":
        raise InvalidArgumentError(
            f"subset_of_weights={subset_of_weights!r}: hessinv's Laplace is of all the weights (the exact "
            "posterior precision in time linear in depth); for a last-layer Laplace, fit it on the last "
            "layer as the model (its inputs: the features the frozen body computes)"
        )
    if hessian_structure != "full":
        raise InvalidArgumentError(
            f"hessian_structure={hessian_structure!r}: hessinv factors the full (exact) posterior precision, "
            "no diagonal / Kronecker / low-rank approximation; leave it 'full'"
        )
    if not (isinstance(temperature, (int, float)) and temperature == 1):
        raise InvalidArgumentError(
            f"temperature={temperature!r}: only the untempered posterior (temperature 1) is supported"
        )
    if backend is not None:
        raise InvalidArgumentError(
            f"backend={getattr(backend, '__name__', backend)!r}: hessinv computes the exact curvature "
            "itself; pick it with curvature='gauss_newton' (laplace-torch's GGN backends) or "
            "curvature='hessian'"
        )


#: numbers of the right-hand sides one solve of the predictive's variance takes at most (a solve keeps a
#: dozen copies of them in float64: 1.6 GB; 16 test points of 10 classes on a 670k-parameter MLP took ~10 GB
#: at once -- a probe)
PREDICTIVE_SOLVE_ENTRIES = 2**24
#: numbers of the output Jacobians (test points x outputs x parameters) the predictive forms at once
PREDICTIVE_JACOBIAN_ENTRIES = 2**26


def _examples_per(entries: int, C: int, n: int) -> int:
    """Test examples (of ``C`` outputs, ``n`` parameters) per block of ``entries`` numbers."""
    return max(1, entries // max(C * n, 1))


@linalg.protect_public_methods
class Laplace:
    """The full-network Laplace approximation with the exact (Riccati- or Woodbury-factored) posterior
    precision.

    Args:
        model: the trained ``nn.Sequential`` chain (its parameters are the MAP estimate ``theta*``).
        likelihood: ``"classification"`` (cross-entropy on logits, integer or probability targets) or
            ``"regression"`` (Gaussian with standard deviation ``sigma_noise``, targets (N, C)); the
            loss the model was trained with is accepted too (``nn.CrossEntropyLoss()`` /
            ``nn.MSELoss()``, unweighted and unsmoothed: other losses are no such likelihood).
        curvature: ``"gauss_newton"`` (default; always positive semi-definite) or ``"hessian"``.
        prior_precision: ``delta`` (a positive number).
        sigma_noise: regression noise ``sigma``.
        prior_mean: ``mu_0`` (a number or an (n,) tensor, ``n`` the number of trainable parameters).
        subset_of_weights, hessian_structure, temperature: laplace-torch's keywords, so that its
            constructor call ports as written: what this class is -- ``"all"``, ``"full"``, ``1`` -- is
            accepted; another value (``"last_layer"``, ``"kron"``, ``"diag"``, a temperature) is an
            :class:`InvalidArgumentError` that says so (no approximation is made here).
        backend: laplace-torch's curvature backend: refused unless None (hessinv computes the exact
            curvature itself; ``curvature=`` picks the Gauss-Newton matrix or the Hessian).

    >>> import math, torch, hessinv
    >>> from torch import nn
    >>> from hessinv.laplace import Laplace
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    >>> X, y = torch.randn(20, 3, dtype=torch.float64), torch.randint(0, 3, (20,))
    >>> la = Laplace(net, "classification", prior_precision=2.0).fit(X, y)
    >>> # the evidence against its dense formula: P = G (of the summed loss) + delta I
    >>> G = 20 * hessinv.gauss_newton(net, nn.CrossEntropyLoss(), X, y).to_dense()
    >>> theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    >>> n, log_lik = len(theta), -float(nn.CrossEntropyLoss(reduction="sum")(net(X), y).detach())
    >>> logdet_P = float(torch.logdet(G + 2.0 * torch.eye(n, dtype=torch.float64)))
    >>> dense = log_lik - 0.5 * (logdet_P - n * math.log(2.0) + 2.0 * float(theta @ theta))
    >>> abs(float(la.log_marginal_likelihood()) - dense) < 1e-9
    True
    >>> delta = la.optimize_prior_precision()  # the evidence's maximum over delta
    >>> la.log_marginal_likelihood(delta) >= la.log_marginal_likelihood(2.0)
    True
    >>> p = la(X[:4])  # the linearized (GLM) predictive, probit link: (4, 3) class probabilities
    >>> bool(torch.allclose(p.sum(-1), torch.ones(4, dtype=torch.float64)))
    True
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str | nn.Module,
        curvature: str = "gauss_newton",
        prior_precision: float = 1.0,
        sigma_noise: float = 1.0,
        prior_mean: float | Tensor = 0.0,
        *,
        subset_of_weights: str = "all",
        hessian_structure: str = "full",
        temperature: float = 1.0,
        backend: Any = None,
    ):
        _check_ported(subset_of_weights, hessian_structure, temperature, backend)
        # a cross-entropy's ignore_index: refused at fit where a target is ignored (the Laplace likelihood
        # counts every example it is fitted on) -- but for per-position padding with an index that is no
        # class (its positions are not data)
        module = likelihood if isinstance(likelihood, nn.Module) else None
        likelihood = _likelihood_of(likelihood)
        self._ignore = (
            getattr(module, "ignore_index", None)
            if module is not None
            else -100
            if likelihood == "classification"
            else None
        )  # (the string likelihood's cross-entropy: torch's default; a target of -100 was silently dropped)
        model = as_module(model)  # (a list of modules: their Sequential)
        self.model, self.likelihood = model, likelihood
        self.curvature_cls = curvature_class(curvature)
        self.prior_precision = prior_precision
        self.sigma_noise = sigma_noise
        if likelihood == "classification" and sigma_noise != 1.0:
            raise InvalidArgumentError("sigma_noise is for regression only")
        self.prior_mean = prior_mean
        self.loss_fn: nn.Module = (
            nn.CrossEntropyLoss(reduction="sum", ignore_index=-100 if self._ignore is None else self._ignore)
            if likelihood == "classification"
            else nn.MSELoss(reduction="sum")
        )
        self.operator: CurvatureOperator | None = None
        self._cache: tuple[float, Factorization] | None = None
        self._search_spectrum: Tensor | None = None  # G's eigenvalues during a search (_spectrum)
        self._held: list | None = None  # what the model reads besides its parameters, at fit

    # the settings, checked whenever set -- at construction, by optimize_prior_precision, or by the caller
    # afterwards as laplace-torch users do (a string, 0, a negative or a NaN reached the posterior's
    # solves unchecked: TypeError, ZeroDivisionError, a sign silently dropped, NaN evidence)
    @property
    def prior_precision(self) -> float:
        """``delta`` (a positive number)."""
        return self._prior_precision

    @prior_precision.setter
    def prior_precision(self, value: float) -> None:
        self._prior_precision = self._positive(value, "prior_precision")

    @property
    def sigma_noise(self) -> float:
        """The regression noise ``sigma`` (a positive number)."""
        return self._sigma_noise

    @sigma_noise.setter
    def sigma_noise(self, value: float) -> None:
        self._sigma_noise = self._positive(value, "sigma_noise")

    @property
    def prior_mean(self) -> float | Tensor:
        """``mu_0``: a number or an (n,) tensor."""
        return self._prior_mean

    @prior_mean.setter
    def prior_mean(self, value: float | Tensor) -> None:
        n = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self._prior_mean = self._check_prior_mean(value, n)

    @staticmethod
    def _positive(v: float, name: str) -> float:
        if isinstance(v, Tensor) and v.dim() > 0 and v.numel() > 1:  # (check_real would print all of it)
            raise InvalidArgumentError(
                f"{name} must be one positive number (an isotropic prior / noise), got a tensor of shape "
                f"{tuple(v.shape)}: per-parameter values are not supported"
            )
        v = check_real(v, name, setting=True)
        if not (v > 0 and math.isfinite(v)):
            raise InvalidArgumentError(f"{name} must be a positive number, got {v}")
        if name.startswith("sigma") and not 1e-150 <= v <= 1e150:  # (sigma^2 and 1 / sigma^2 in range)
            raise InvalidArgumentError(
                f"{name} = {v:g}: sigma^2 leaves float64's range (1e-150 <= sigma <= 1e150); rescale the "
                "targets"
            )
        return v

    @staticmethod
    def _check_prior_mean(prior_mean: float | Tensor, n: int) -> float | Tensor:
        """``prior_mean`` as a float or a detached (n,) tensor; a named error for another shape (an
        (n, 1) tensor would broadcast in :meth:`scatter`) or a NaN / infinite value."""
        if isinstance(prior_mean, Tensor) and prior_mean.dim() > 0:
            if prior_mean.shape != (n,):
                raise ShapeMismatchError(
                    f"prior_mean must be a number or an (n,) tensor with n = {n} (the trainable parameters), "
                    f"got shape {tuple(prior_mean.shape)}"
                )
            if prior_mean.is_complex() or not bool(torch.isfinite(prior_mean).all()):
                raise NonFiniteArgumentError(
                    "prior_mean must be real and finite; it has NaN or infinite entries"
                )
            return prior_mean.detach()
        mu = check_real(prior_mean, "prior_mean", setting=True)
        if not math.isfinite(mu):
            raise NonFiniteArgumentError(f"prior_mean must be finite, got {mu}")
        return mu

    @staticmethod
    def _count(n: int, name: str) -> int:
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise InvalidArgumentError(f"{name} must be an int >= 1, got {n!r}")
        return int(n)

    # -- fitting -------------------------------------------------------------------------------
    def fit(self, data: Tensor | Iterable, targets: Tensor | None = None) -> Laplace:
        """Linearize the model at its current parameters on the training set: ``fit(X, y)`` or
        ``fit(loader)`` (a loader's batches are concatenated into one set)."""
        X, y = _collect(data, targets)
        # everything computed first, then assigned: a refused fit leaves the previous one whole (the
        # operator first: its checks name a model or batch it cannot take, e.g. on the meta device)
        op = self.curvature_cls(self.model, self.loss_fn, X, y)
        if self.likelihood == "classification" and y.is_floating_point() and bool((y < 0).any()):
            raise InvalidArgumentError(
                "classification targets given as class probabilities must be >= 0 (the likelihood is the "
                "cross-entropy against them); for real-valued targets use likelihood='regression'"
            )
        if self.likelihood == "classification" and y.is_floating_point() and y.dim() >= 2 and y.numel():
            sums = y.double().sum(1)
            # (the rounding of C probabilities in y's dtype, summed: float32 softmax targets over 32k
            # classes sum to 1 within 1.5e-6; a multi-label row is off by a whole label)
            tol = min(0.25, max(1e-6, 4 * y.shape[1] * torch.finfo(y.dtype).eps))  # (a label off: 1)
            if not bool(((sums - 1).abs() <= tol).all()):
                raise InvalidArgumentError(
                    "classification targets given as class probabilities must sum to 1 over the classes "
                    f"(dim 1); these sum to {float(sums.min()):.8g}..{float(sums.max()):.8g}. Multi-label "
                    "0/1 targets are a Bernoulli likelihood per label, which likelihood='classification' "
                    "(one categorical per example) does not model"
                )
        with exact_no_grad():
            out = self.model(unshared(X[:1]))
        ignored = (
            int((y == self._ignore).sum()) if self._ignore is not None and not y.is_floating_point() else 0
        )
        # (per-position targets (N, T) padded with an index that is no class -- torch's -100, 255 -- are
        # tokens that are not data: the likelihood is of the others, as the loss's; an ignored class, or a
        # whole example ignored, is data dropped)
        padding = y.dim() >= 2 and out.dim() >= 2 and not 0 <= int(self._ignore or 0) < out.shape[1]
        if ignored and not padding:
            raise InvalidArgumentError(
                f"the likelihood CrossEntropyLoss(ignore_index={self._ignore}) ignores {ignored} of these "
                "targets, which the Laplace likelihood would count: drop those examples from the data"
            )
        mean = torch.cat([p.detach().reshape(-1) for p in self.model.parameters() if p.requires_grad])
        prior_mean = self._check_prior_mean(self.prior_mean, mean.numel())  # requires_grad may change
        n_outputs = int(out[0].numel())  # per example: (N, C, T) outputs count C T
        self.operator, self.mean, self.n_params, self.prior_mean = op, mean, mean.numel(), prior_mean
        self.n_data, self.n_outputs = len(X), n_outputs
        self.loss = float(op.loss)  # summed cross-entropy, or summed squared error
        self._held = op.chain.held_state(modes=False)
        self._cache = None
        return self

    def _op(self) -> CurvatureOperator:
        """The fitted operator, where the model is still at the fitted point: its evidence, posterior and
        samples are the fit's, and a model trained on since would have them silently stale."""
        if self.operator is None:
            raise NotFittedError("call fit(X, y) first")
        self.operator.chain.check_params(self.mean, "the Laplace approximation", self._held)
        return self.operator

    def _scale(self, sigma: float) -> float:
        """``c`` in ``P = c G + delta I``."""
        return 1.0 if self.likelihood == "classification" else 0.5 / sigma**2

    def _factor(self, delta: float, sigma: float) -> tuple[Factorization, float]:
        """The factorization of ``G + (delta / c) I`` (cached for the latest damping) and ``c``."""
        op = self._op()
        c = self._scale(sigma)
        d = delta / c
        if self._cache is None or self._cache[0] != d:
            try:
                self._cache = (d, op.factor(d))
            except InvalidArgumentError as e:  # (its message speaks of a damping the user never gave)
                regression = self.likelihood == "regression"
                raise InvalidArgumentError(
                    f"the prior precision {delta:g} over c = {c:g}"
                    + (" (c = 1 / (2 sigma_noise^2))" if regression else "")
                    + f" is the damping of G + (delta / c) I, {d:g}, which the factorization does not take "
                    f"({str(e).split(';')[0]}): choose a smaller prior precision"
                    + (" or a smaller sigma_noise" if regression else "")
                ) from None
            except SingularError as e:
                raise SingularError(
                    f"the posterior precision c G + delta I at prior precision delta = {delta:g} (c = {c:g}"
                    + (", 1 / (2 sigma_noise^2)" if self.likelihood == "regression" else "")
                    + f") is singular to working precision -- the sweep's damping is delta / c = {d:g}: {e}. "
                    "Choose a larger prior precision (bounds= of optimize_prior_precision)"
                    + (" or a larger sigma_noise" if self.likelihood == "regression" else ""),
                    stage=e.stage,
                    damping=d,
                ) from None
        fac = self._cache[1]
        if not fac.positive_definite and fac.perturbed and fac.inertia.negative == 0:
            # (pivots perturbed, none negative: c G + delta I is singular to working precision, not shown
            # indefinite -- a positive semi-definite G at a prior precision below its resolution)
            raise SingularError(
                f"the posterior precision at prior precision delta = {delta:g} (c = {c:g}) is singular to "
                f"working precision (the sweep perturbed pivots at damping delta / c = {delta / c:g}; no "
                "eigenvalue was found negative): choose a larger prior precision (bounds= of "
                "optimize_prior_precision)",
                damping=delta / c,
            )
        if not fac.positive_definite:
            if self.curvature_cls is Hessian:
                advice = "use curvature='gauss_newton' or a larger prior precision"
            else:  # (positive semi-definite for a convex loss: the targets make the loss non-convex)
                advice = (
                    "the Gauss-Newton matrix of this likelihood is positive semi-definite for targets it "
                    "defines (class indices, or class probabilities >= 0): check the targets, or use a "
                    "larger prior precision"
                )
            what = "H" if self.curvature_cls is Hessian else "G"
            raise IndefiniteError(
                f"the posterior precision c {what} + delta I (delta = {delta:g}) is indefinite, inertia "
                f"{tuple(fac.inertia)}: no Laplace posterior; {advice}"
            )
        return fac, c

    def _args(self, prior_precision: float | None, sigma_noise: float | None) -> tuple[float, float]:
        delta = (
            self.prior_precision
            if prior_precision is None
            else self._positive(prior_precision, "prior_precision")
        )
        if sigma_noise is not None and self.likelihood == "classification":
            raise InvalidArgumentError("sigma_noise is for regression only")
        sigma = self.sigma_noise if sigma_noise is None else self._positive(sigma_noise, "sigma_noise")
        return delta, sigma

    # -- evidence ------------------------------------------------------------------------------
    def log_likelihood(self, sigma_noise: float | None = None) -> float:
        """``log p(D | theta*)``: minus the summed cross-entropy, or the Gaussian log likelihood."""
        self._op()
        if self.likelihood == "classification":
            return -self.loss
        sigma = self._args(None, sigma_noise)[1]
        return -self.loss / (2 * sigma**2) - self.n_data * self.n_outputs * math.log(
            sigma * math.sqrt(2 * math.pi)
        )

    def log_det_posterior_precision(
        self, prior_precision: float | None = None, sigma_noise: float | None = None
    ) -> float:
        """``log det P = n log c + log det(G + (delta / c) I)``, exact from the factorization's pivots."""
        delta, sigma = self._args(prior_precision, sigma_noise)
        w = self._search_spectrum
        if w is not None:  # (a search: G's eigenvalues, where every one of G + (delta / c) I is resolved)
            c = self._scale(sigma)
            shifted = w + delta / c
            if float(shifted.min()) > 1e3 * w.numel() * 2.2e-16 * max(float(w.abs().max()), delta / c):
                return self.n_params * math.log(c) + float(shifted.log().sum())
        fac, c = self._factor(delta, sigma)
        try:
            return self.n_params * math.log(c) + fac.logdet()
        except SingularError as e:  # (its message names the damping delta / c, which the user never gave)
            raise SingularError(
                f"log det of the posterior precision at prior precision delta = {delta:g} (c = {c:g}): "
                f"{e} -- choose a larger prior precision (bounds= of optimize_prior_precision)",
                damping=delta / c,
            ) from None

    def _spectrum(self, evaluations: int) -> Tensor | None:
        """``G``'s eigenvalues (float64: from its root where that has fewer rows than ``G`` has
        parameters, :meth:`GaussNewton._root_spectrum`; else one dense ``eigvalsh`` where that costs less
        than ``evaluations`` factorizations of ``G + (delta / c) I``) -- ``log det(G + d I) = sum
        log(lambda_i + d)`` then serves every ``(delta, sigma)`` of a search -- else None (large ``n``: a
        factorization per evaluation)."""
        op = self._op()
        if isinstance(op, GaussNewton):  # G's root has fewer rows than parameters: its spectrum, exactly
            spectrum = op._residual_operator()._root_spectrum()
            if spectrum is not None:
                return spectrum[0].cpu()
        if not op._dense_eigenvalues_cheaper(evaluations):
            return None
        # (a float32 model's G from its float64 twin, as its factorizations' log det: the float32 matrix's
        # null space is rounding noise of 1e-8 ||G||, 0.26 nats of log det at delta = 1e-6)
        A = op._residual_operator().to_dense().double()
        return torch.linalg.eigvalsh(0.5 * (A + A.T)).cpu()

    def scatter(self, prior_precision: float | None = None) -> float:
        """``delta |theta* - mu_0|^2``."""
        delta = self._args(prior_precision, None)[0]
        self._op()
        return delta * self._distance2()

    def _distance2(self) -> float:
        """``|theta* - mu_0|^2``, summed in float64 (a float32 model's parameters are exact there; summed in
        float32 the evidence was 44 nats off at ``delta = 1e8`` on 667 parameters -- a probe)."""
        mu0 = self.prior_mean
        mu0 = mu0.double() if isinstance(mu0, Tensor) else mu0
        return float(((self.mean.double() - mu0) ** 2).sum())

    def log_marginal_likelihood(
        self, prior_precision: float | Tensor | None = None, sigma_noise: float | Tensor | None = None
    ) -> float | Tensor:
        """The Laplace evidence ``log p(D|theta*) - 1/2 [log det P - n log delta + delta |theta* - mu_0|^2]``
        (laplace-torch's ``log_likelihood - 0.5 * (log_det_ratio + scatter)``), at the given or the
        stored prior precision / noise. One factorization (cached for the latest value).

        Given a one-number tensor that requires grad (``log_prior.exp()``, laplace-torch's tuning loop),
        the evidence comes back as a 0-dim tensor differentiable in it: ``d/d delta = -1/2 [tr P^{-1} - n /
        delta + |theta* - mu_0|^2]`` and, for regression, ``d/d sigma = |y - f|^2 / sigma^3 - N C / sigma +
        (n - delta tr P^{-1}) / sigma`` (``d log det P / d sigma = -(2 / sigma)(n - delta tr P^{-1})``, as
        ``P = c (G + (delta / c) I)`` with ``c = 1 / (2 sigma^2)``), with ``tr P^{-1}`` the sum of the exact
        marginal variances (:meth:`posterior_variance`, one more sweep) -- computed when backward runs.

        >>> import torch
        >>> from hessinv.laplace import Laplace
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1)).double()
        >>> X = torch.randn(20, 2, dtype=torch.float64)
        >>> la = Laplace(net, "regression").fit(X, X.sum(1, keepdim=True))
        >>> log_prior = torch.zeros((), dtype=torch.float64, requires_grad=True)
        >>> log_sigma = torch.zeros((), dtype=torch.float64, requires_grad=True)
        >>> evidence = la.log_marginal_likelihood(log_prior.exp(), log_sigma.exp())
        >>> evidence.backward()
        >>> log_prior.grad.shape, bool(torch.isfinite(log_sigma.grad))
        (torch.Size([]), True)
        """
        if any(isinstance(v, Tensor) and v.requires_grad for v in (prior_precision, sigma_noise)):
            if torch.is_grad_enabled():
                return _Evidence.apply(self, prior_precision, sigma_noise)
        delta, sigma = self._args(prior_precision, sigma_noise)
        s = sigma if self.likelihood == "regression" else None
        log_det_ratio = self.log_det_posterior_precision(delta, s) - self.n_params * math.log(delta)
        return self.log_likelihood(s) - 0.5 * (log_det_ratio + self.scatter(delta))

    def optimize_prior_precision(
        self,
        bounds: tuple[float, float] = (1e-6, 1e6),
        optimize_sigma_noise: bool = False,
        sigma_bounds: tuple[float, float] = (1e-4, 1e4),
        tol: float = 1e-6,
        **laplace_torch: Any,
    ) -> float:
        """Maximize the log marginal likelihood over ``log delta`` in ``bounds`` (a grid of 13 points, then
        Brent's bounded search between the best point's neighbours -- the evidence need not be unimodal: a
        Hessian's rises toward the bound where ``P`` nears singularity, and Brent's search over the whole
        interval stopped at an interior local maximum 2.5 nats below it, unwarned; each evaluation from the
        curvature's eigenvalues, taken once where that is cheaper, else one factorization); with
        ``optimize_sigma_noise`` (regression) jointly over
        ``(delta, sigma)`` in ``bounds`` x ``sigma_bounds``, by a search over ``kappa = delta / c`` alone
        (:meth:`_joint_search`: the noise has a closed-form optimum at each ``kappa``). Stores and returns
        ``delta`` (and stores ``sigma_noise``); warns where the optimum lies on a bound. With the
        Hessian, ``P`` is positive definite for every ``delta`` in ``bounds`` or the evidence has no
        maximum there: it grows without bound as ``delta / c`` approaches ``-lambda_min(H)`` from above
        (``log det P -> -inf``), and :class:`~hessinv.errors.IndefiniteError` says so (checked first, by
        one factorization at the lower bound).

        A laplace-torch call ports as written where it means the same search: ``method="marglik"`` (its
        default), ``prior_structure="scalar"``, and the gradient-ascent and prediction settings
        (``pred_type``, ``n_steps``, ``lr``, ``init_prior_prec``, ``link_approx``, ``n_samples``,
        ``verbose``, ``progress_bar``; also ``pred_type`` given first, as laplace-torch takes it) are
        accepted and unused -- the search here is exact. A validation grid search (``method="gridsearch"``,
        ``val_loader``, ``loss``, ``grid_size``, ``log_prior_prec_*``) or a per-parameter prior
        (``prior_structure="diag"`` or ``"layerwise"``) is refused by name."""
        if isinstance(bounds, str):  # (laplace-torch's positional arguments: pred_type, then method)
            laplace_torch.setdefault("pred_type", bounds)
            bounds = (1e-6, 1e6)
            if not isinstance(optimize_sigma_noise, bool):
                laplace_torch.setdefault("method", optimize_sigma_noise)
                optimize_sigma_noise = False
        if not isinstance(optimize_sigma_noise, (bool, np.bool_)):
            raise InvalidArgumentError(
                f"optimize_sigma_noise must be True or False, got {optimize_sigma_noise!r} (laplace-torch's "
                "method goes by keyword, method='marglik', or after pred_type: ('glm', 'marglik'))"
            )
        _laplace_torch_search(laplace_torch)
        self._op()
        if optimize_sigma_noise and self.likelihood != "regression":
            raise InvalidArgumentError("optimize_sigma_noise is for regression only")
        bounds, sigma_bounds = self._bounds(bounds, "bounds"), self._bounds(sigma_bounds, "sigma_bounds")
        tol = self._positive(tol, "tol")

        s0 = math.log(self.sigma_noise) if self.likelihood == "regression" else None
        lo, hi = math.log(bounds[0]), math.log(bounds[1])
        self._check_bounded(bounds, sigma_bounds if optimize_sigma_noise else None)

        # every evaluation's log det from one eigendecomposition where that is cheaper (the grid and Brent
        # take about 25 evaluations, the joint search about 60): 0.14 s against 16 factorizations' 16 s at
        # n = 610 on digits
        self._search_spectrum = self._spectrum(60 if optimize_sigma_noise else 25)
        try:
            if optimize_sigma_noise:
                delta, sigma = self._joint_search(bounds, sigma_bounds, tol)
                t = math.log(delta)
                self.sigma_noise = sigma
            else:
                sigma0 = math.exp(s0) if s0 is not None else None

                def neg(t: float) -> float:
                    try:
                        return -self.log_marginal_likelihood(math.exp(t), sigma0)
                    except (SingularError, IndefiniteError):  # delta below G's resolution (bounds down to
                        # 1e-40: the first probe at 3.7e-23 raised), as the joint search's
                        return math.inf

                t, value = _grid_then_brent(neg, lo, hi, tol, 13)
                if not math.isfinite(value):
                    raise SingularError(
                        f"optimize_prior_precision: the evidence could not be evaluated in bounds {bounds}: "
                        "G + (delta / c) I is singular to working precision wherever it was tried (delta / c "
                        "below G's resolution); raise the lower bound"
                    )
        finally:
            self._search_spectrum = None
        self.prior_precision = math.exp(t)
        # at a bound (scipy's bounded search stops ~3e-7 inside it): the evidence may grow beyond it
        edge = max(2 * tol, 1e-5)
        if min(t - lo, hi - t) <= edge:
            warn(
                f"optimize_prior_precision: the optimum {self.prior_precision:.6g} is at the search's bound "
                f"{bounds}: the evidence may have no maximum inside; widen bounds=",
                UserWarning,
            )
        if optimize_sigma_noise:
            ls = math.log(self.sigma_noise)
            if min(ls - math.log(sigma_bounds[0]), math.log(sigma_bounds[1]) - ls) <= edge:
                warn(
                    f"optimize_prior_precision: the noise's optimum {self.sigma_noise:.6g} is at the "
                    f"search's bound {sigma_bounds}: the evidence may have no maximum inside; widen "
                    "sigma_bounds=",
                    UserWarning,
                )
        return self.prior_precision

    def _joint_search(
        self, bounds: tuple[float, float], sigma_bounds: tuple[float, float], tol: float
    ) -> tuple[float, float]:
        """The ``(delta, sigma)`` of the largest evidence in ``bounds`` x ``sigma_bounds`` (regression).

        With ``c = 1 / (2 sigma^2)`` and ``kappa = delta / c``, ``log det P - n log delta = log det(G +
        kappa I) - n log kappa`` depends on ``kappa`` alone, and the evidence's other terms are ``-(L +
        kappa S / 2) / (2 sigma^2) - N log sigma`` (``L`` the summed squared error, ``S = |theta* -
        mu_0|^2``, ``N`` the number of outputs): at fixed ``kappa`` it is unimodal in ``sigma^2``, with its
        maximum at ``sigma^2 = (L + kappa S / 2) / N``, clamped to what both bounds allow there. So the
        two-dimensional search is one over ``log kappa``: a grid of 25 points (the profile need not be
        unimodal), then Brent's bounded search between the best point's neighbours, one log det per
        evaluation. (Nelder-Mead from the best ``delta`` at the starting ``sigma`` stopped 43-75 nats below
        the maximum on targets of scale 10-50.)"""
        N = self.n_data * self.n_outputs
        S = self._distance2()
        d_lo, d_hi = bounds
        v_lo, v_hi = sigma_bounds[0] ** 2, sigma_bounds[1] ** 2

        def point(log_kappa: float) -> tuple[float, float]:
            kappa = math.exp(log_kappa)
            # delta = kappa / (2 sigma^2) in bounds: sigma^2 in [kappa / (2 d_hi), kappa / (2 d_lo)]
            a, b = max(v_lo, kappa / (2 * d_hi)), min(v_hi, kappa / (2 * d_lo))
            v = min(max((self.loss + 0.5 * kappa * S) / N, a), b) if a <= b else a
            return min(max(kappa / (2 * v), d_lo), d_hi), math.sqrt(v)

        def neg(log_kappa: float) -> float:
            try:
                return -self.log_marginal_likelihood(*point(log_kappa))
            except (SingularError, IndefiniteError):  # G + kappa I singular (or, for a Gauss-Newton G,
                # not positive definite) to working precision: a tiny kappa below G's resolution, where the
                # evidence falls as (rank G / 2) log kappa -- no maximum there
                return math.inf

        best, value = _grid_then_brent(neg, math.log(2 * d_lo * v_lo), math.log(2 * d_hi * v_hi), tol, 25)
        if not math.isfinite(value):
            raise SingularError(
                f"optimize_prior_precision: the evidence cannot be evaluated anywhere in bounds {bounds} x "
                f"sigma_bounds {sigma_bounds}: every G + (delta / c) I there is singular to working "
                "precision (delta / c below G's resolution); raise the lower bounds"
            )
        return point(best)

    def _check_bounded(self, bounds: tuple[float, float], sigma_bounds: tuple[float, float] | None) -> None:
        """Raise :class:`IndefiniteError` unless ``c H + delta I`` is positive definite at every ``delta`` in
        ``bounds`` (and every ``sigma`` in ``sigma_bounds`` if given): else the evidence is unbounded above
        there, or undefined everywhere. ``c H + delta I`` is positive definite at the lower bound iff it is
        at every larger ``delta``; one factorization decides."""
        op = self._op()
        if self.curvature_cls is not Hessian:
            return
        sigmas = [self.sigma_noise] if sigma_bounds is None else [sigma_bounds[0]]  # the largest c
        c = max(self._scale(sg) for sg in sigmas) if self.likelihood == "regression" else 1.0
        if op.is_positive_definite(bounds[0] / c):
            return
        # c = 1 / sigma^2 (regression): the noise search's smallest sigma gives the largest c
        by = (
            f" (c = {c:.3g} at sigma_bounds[0] = {sigma_bounds[0]:g}, the noise search's smallest sigma: c "
            "grows as 1 / sigma^2, and a larger sigma_bounds[0] lowers it)"
            if sigma_bounds is not None and self.likelihood == "regression"
            else ""
        )
        if not op.is_positive_definite(bounds[1] / c):
            raise IndefiniteError(
                f"the posterior precision c H + delta I is indefinite at every prior precision in bounds "
                f"{bounds}{by}: use curvature='gauss_newton', or bounds above c times the Hessian's most "
                "negative eigenvalue"
            )
        edge = -c * op.min_eigenvalue()
        raise IndefiniteError(
            f"the log marginal likelihood has no maximum in bounds {bounds}: it grows without bound as the "
            f"prior precision approaches {edge:.6g} from above, where c H + delta I turns indefinite (log "
            f"det -> -inf){by}; use curvature='gauss_newton' (positive semi-definite), or bounds above that"
        )

    @classmethod
    def _bounds(cls, bounds: tuple[float, float], name: str) -> tuple[float, float]:
        """``(low, high)`` with ``0 < low < high`` (a search over the logarithm)."""
        try:
            lo, hi = bounds
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"{name} must be a pair (low, high), got {bounds!r}") from None
        lo, hi = cls._positive(lo, f"{name}[0]"), cls._positive(hi, f"{name}[1]")
        if not lo < hi:
            raise InvalidArgumentError(f"{name} must be (low, high) with low < high, got {bounds!r}")
        return lo, hi

    # -- posterior -----------------------------------------------------------------------------
    def posterior_covariance(self) -> Tensor:
        """The dense ``n x n`` ``P^{-1}`` (``n`` solves; small models and tests)."""
        self._op()  # (fitted: n_params and the mean are set by fit)
        check_dense_memory(self.n_params, self.mean.dtype, self.mean.device, "posterior_covariance()", 3.0)
        fac, c = self._factor(self.prior_precision, self.sigma_noise)
        return fac.solve(torch.eye(self.n_params, dtype=self.mean.dtype, device=self.mean.device)) / c

    def posterior_variance(self) -> Tensor:
        """``diag(P^{-1})`` (n,): each parameter's marginal posterior variance, exact, by one forward sweep
        over the factorization (:meth:`hessinv.Factorization.inverse_diagonal`), never the ``n x n``
        matrix (the diagonal of laplace-torch's ``posterior_covariance`` of its ``full`` structure; its
        ``diag`` structure's ``posterior_variance`` approximates it)."""
        fac, c = self._factor(self.prior_precision, self.sigma_noise)
        return fac.inverse_diagonal() / c

    def sample(self, n_samples: int = 100, generator: torch.Generator | None = None) -> Tensor:
        """``(n_samples, n)`` draws of ``theta ~ N(theta*, P^{-1})``: ``theta* + S z / sqrt(c)`` with
        ``S S^T = (G + (delta / c) I)^{-1}`` from the factorization (no dense matrix)."""
        n_samples = self._count(n_samples, "n_samples")
        fac, c = self._factor(self.prior_precision, self.sigma_noise)
        return self.mean + fac.sample(n_samples, generator).T / math.sqrt(c)

    def functional_variance(self, J: Tensor) -> Tensor:
        """``J P^{-1} J^T`` per example for Jacobians ``J`` of shape (N, C, n), as (N, C, C): one solve
        with ``N C`` right-hand sides, or, where those are more than ``2 n`` and the ``n x n`` matrix fits,
        one with the ``n`` columns of the identity -- ``P^{-1}`` itself -- and products with it (200
        classes at 50 test points on a last layer of n = 3400: 10000 right-hand sides, 11.6 s, against
        the covariance's 7 s)."""
        fac, c = self._factor(self.prior_precision, self.sigma_noise)
        n_params = fac.op.shape[0]
        if not isinstance(J, Tensor) or J.dim() != 3 or J.shape[2] != n_params:
            got = tuple(J.shape) if isinstance(J, Tensor) else type(J).__name__
            raise ShapeMismatchError(f"J must be an (N, C, {n_params}) tensor of output Jacobians, got {got}")
        N, C, n = J.shape
        if N * C > 2 * n:
            try:
                check_dense_memory(n, J.dtype, J.device, "the posterior covariance", 3.0)
            except TooLargeError:
                pass
            else:
                cov = fac.solve(torch.eye(n, dtype=J.dtype, device=J.device)) / c
                return J @ (cov @ J.mT)  # (N, C, n) (N, n, C): per example
        parts, m = [], _examples_per(PREDICTIVE_SOLVE_ENTRIES, C, n)
        for a in range(0, N, m):  # (solves of a bounded number of columns)
            Ja = J[a : a + m]
            S = fac.solve(Ja.reshape(-1, n).T.contiguous()) / c  # (n, m C)
            parts.append(torch.einsum("icn,nid->icd", Ja, S.reshape(n, len(Ja), C)))
        return torch.cat(parts)

    def _outputs(self, X: Tensor, theta: Tensor) -> Tensor:
        """The network at the parameters ``theta`` (flat, in ``parameters()`` order): every place a
        parameter sits (a layer reached by two names, a parameter held by two modules) takes its value,
        and the model keeps its own parameter objects (``functional_call`` restoring a layer reached by
        two paths left a sample in the model in their place; a probe)."""
        slots, params = _slots(self.model)
        values = dict(zip(map(id, params), torch.split(theta, [p.numel() for p in params]), strict=True))
        tree = {k: values[id(p)].view_as(p) for k, p in slots}
        with _left_intact(self.model):
            return functional_call(self.model, tree, (X,), tie_weights=False)

    def __call__(
        self,
        X: Tensor,
        pred_type: str = "glm",
        link_approx: str = "probit",
        n_samples: int = 100,
        generator: torch.Generator | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """The posterior predictive at inputs ``X``.

        ``pred_type="glm"`` (linearized model, ``f ~ N(f_mu, f_var)``, ``f_var = J P^{-1} J^T``):
        regression returns ``(f_mu, f_var)`` ((N, C), (N, C, C); (N,), (N,) for a model with outputs
        of shape (N,); add ``sigma_noise^2`` for the predictive of ``y``); classification returns class
        probabilities with ``link_approx`` ``"probit"`` (``softmax(f_mu / sqrt(1 + pi/8 diag f_var))``)
        or ``"mc"`` (mean softmax of ``n_samples`` draws of ``f``). ``pred_type="nn"``: the network at
        ``n_samples`` posterior samples of the parameters (mean probabilities; or output mean and sample
        covariance for regression, ``n_samples >= 2``). Outputs of shape (N, C, T) (per position) are
        refused here.

        ``pred_type="glm"`` is differentiable in ``X`` where ``X`` requires grad (mean and variance: the
        variance through the output Jacobians' own derivatives); ``pred_type="nn"`` returns plain numbers.
        """
        self._op()  # (fitted, at the fitted point)
        if not isinstance(X, Tensor):
            raise InvalidArgumentError(f"X must be a torch.Tensor, got {type(X).__name__}")
        if X.device != self.mean.device or (X.is_floating_point() and X.dtype != self.mean.dtype):
            raise DtypeMismatchError(
                f"X is {X.dtype} on {X.device}, the model {self.mean.dtype} on {self.mean.device}: convert "
                f"with X.to({self.mean.dtype}) (and the model's device)"
            )
        if X.dim() < (2 if X.is_floating_point() else 1) or len(X) == 0:  # (N,) token ids for an Embedding
            raise ShapeMismatchError(f"X must be a batch (N, features...) with N >= 1, got {tuple(X.shape)}")
        if X.is_floating_point() and not bool(torch.isfinite(X).all()):
            raise NonFiniteError("X contains NaN or infinity")
        chain = self._op().chain
        f_mu = chain.forward(X)[-1]  # the model's outputs; named errors for inputs it cannot take
        try:
            mixed = chain.alone_against_batch(X, f_mu) if len(X) > 1 else None
        except HessinvError:
            raise
        except Exception:  # noqa: BLE001 - the model alone on one example fails: nothing to compare
            mixed = None
        if mixed is not None and mixed[2]:  # (the GLM's Jacobians and nn's samples are of examples alone)
            raise UnsupportedStageError(
                "the model's output for an example depends on the rest of its batch (test example "
                f"{mixed[0]} alone gives outputs {mixed[1]:.3g} away from its outputs in the batch: a branch "
                "on a batch statistic, a batch-wide normalization): a predictive per test point is not "
                "defined -- make the model act on each example separately (eval-mode BatchNorm, no branch "
                "on batch sums)"
            )
        if f_mu.dim() > 2:
            raise ShapeMismatchError(
                f"the predictive needs outputs of shape (N, C) or (N,); the model gives {tuple(f_mu.shape)} "
                "(per-position outputs): the evidence and the posterior (log_marginal_likelihood, sample, "
                "functional_variance) are exact for it, the predictive is not implemented"
            )
        if pred_type == "glm":
            C = f_mu.shape[-1] if f_mu.dim() == 2 else 1
            m = _examples_per(PREDICTIVE_JACOBIAN_ENTRIES, C, self.n_params)
            # (the test points' Jacobians a block at a time: N x C x n numbers at once ran out of memory)
            blocks = [X[a : a + m] for a in range(0, len(X), m)]
            f_var = torch.cat([self.functional_variance(output_jacobians(self.model, Xa)) for Xa in blocks])
            if X.requires_grad and torch.is_grad_enabled():
                # the variance is differentiable in X through its Jacobians: the mean too (detached, the
                # predictive's gradient in X left it out silently -- a probe's acquisition mu + k sigma)
                with torch.enable_grad():
                    f_mu = self._outputs(X, self.mean)
            if self.likelihood == "regression":
                return f_mu, (f_var[:, 0, 0] if f_mu.dim() == 1 else f_var)
            if link_approx == "probit":
                kappa = 1.0 / torch.sqrt(1.0 + math.pi / 8.0 * f_var.diagonal(dim1=1, dim2=2))
                return torch.softmax(kappa * f_mu, dim=-1)
            if link_approx == "mc":  # f = f_mu + V sqrt(w) z with f_var = V diag(w) V^T (PSD)
                n_samples = self._count(n_samples, "n_samples")
                check_generator(generator)
                w, V = torch.linalg.eigh(f_var)
                root = V * w.clamp_min(0).sqrt()[:, None, :]
                dev = generator.device if generator is not None else X.device
                z = torch.randn(n_samples, *f_mu.shape, generator=generator, dtype=f_mu.dtype, device=dev)
                f = f_mu + torch.einsum("icd,sid->sic", root, z.to(X.device))
                return torch.softmax(f, dim=-1).mean(0)
            raise InvalidArgumentError(f"link_approx must be 'probit' or 'mc', got {link_approx!r}")
        if pred_type == "nn":
            if self.likelihood == "regression" and self._count(n_samples, "n_samples") < 2:
                # (one draw has no spread: its sample variance came out exactly 0, unremarked -- a review)
                raise InvalidArgumentError(
                    "pred_type='nn' estimates a regression's predictive variance from the samples' spread: "
                    f"n_samples must be at least 2, got {n_samples}"
                )
            with exact_no_grad():
                fs = torch.stack([self._outputs(X, th) for th in self.sample(n_samples, generator)])
            if self.likelihood == "classification":
                return torch.softmax(fs, dim=-1).mean(0)
            d = fs - fs.mean(0)
            if d.dim() == 2:  # outputs (N,): variances (N,), as the GLM predictive gives
                return fs.mean(0), d.square().sum(0) / max(n_samples - 1, 1)
            return fs.mean(0), torch.einsum("sic,sid->icd", d, d) / max(n_samples - 1, 1)
        raise InvalidArgumentError(f"pred_type must be 'glm' or 'nn', got {pred_type!r}")
