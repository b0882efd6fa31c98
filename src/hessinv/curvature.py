"""The curvature operators users hold: the Hessian and the Gauss-Newton matrix of a chain.

``H = sum_l [E_l; T_{l-1}]^T [[Hxx_l, Hxz_l], [Hxz_l^T, Hzz_l]] [E_l; T_{l-1}]`` (math.md §1), with
``T_l = dz_l/dx``. ``H @ v`` is Pearlmutter's product as two ``O(L)`` sweeps::

    forward:  t_l = Jz_l t_{l-1} + Jx_l v_l                            (t_0 = 0)
    backward: s_{l-1} = Jz_l^T s_l + Hxz_l^T v_l + Hzz_l t_{l-1}         (s_L = 0)
              (Hv)_l  = Jx_l^T s_l + Hxx_l v_l + Hxz_l t_{l-1}

The Gauss-Newton matrix ``G = J^T Lambda J`` is the same with every stage's ``H..`` zero except the
loss stage's ``Hzz = Lambda``. Solves, inertia and the positive-definiteness test use the backward
Riccati factorization of :mod:`hessinv.riccati`; no dense ``n x n`` matrix is formed except by
:meth:`CurvatureOperator.to_dense`.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from hessinv.chain import Chain, check_real
from hessinv.errors import (
    AccuracyWarning,
    DtypeMismatchError,
    IndefiniteError,
    InvalidArgumentError,
    NonFiniteError,
    ShapeMismatchError,
    SingularError,
)
from hessinv.lowrank import WoodburyFactor, gauss_newton_root
from hessinv.riccati import Inertia, riccati_factor, riccati_forward, riccati_solve

__all__ = [
    "CurvatureOperator",
    "Hessian",
    "GaussNewton",
    "Factorization",
    "WoodburyFactorization",
    "SolveInfo",
    "hessian",
    "gauss_newton",
    "curvature_class",
]


@dataclass
class SolveInfo:
    """How accurate a solve is: ``residual = max_j |rhs_j - (H + eps I) x_j| / |rhs_j|``.

    The residual is evaluated in float64 (also for float32 models), after ``refinement_steps``
    steps of iterative refinement.
    """

    residual: float
    refinement_steps: int


class CurvatureOperator:
    """A symmetric ``n x n`` curvature matrix of the mean (or summed) loss on one batch.

    ``n`` is the number of trainable parameters, ordered as ``model.parameters()``
    (``torch.nn.utils.parameters_to_vector`` order).
    """

    second_order: bool = True

    def __init__(
        self, model: nn.Module | Sequence[nn.Module], loss_fn: nn.Module, inputs: Tensor, targets: Tensor
    ):
        self.model, self.loss_fn, self.inputs, self.targets = model, loss_fn, inputs, targets
        self.chain = Chain(model, loss_fn)
        lin = self.chain.linearize(inputs, targets, second_order=self.second_order)
        self.blocks, self._sizes = lin.blocks, lin.sizes + [0]
        self.gradient: Tensor = lin.gradient
        self.loss: Tensor = lin.loss
        self.dtype, self.device = self.chain.dtype, self.chain.device
        n = self.chain.num_params
        self.shape = (n, n)
        self._names = [s.name for s in self.chain.stages] + ["loss stage"]
        self._twin: CurvatureOperator | None = None
        self._norm: float | None = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n={self.shape[0]}, stages={len(self.chain.stages)}, dtype={self.dtype})"
        )

    # -- vectors --------------------------------------------------------------------------------
    def _as_matrix(self, v: Tensor, what: str = "vector") -> tuple[Tensor, bool]:
        if not isinstance(v, Tensor):
            raise InvalidArgumentError(
                f"{what} must be a torch.Tensor, got {type(v).__module__}.{type(v).__name__}"
            )
        if v.dtype != self.dtype or v.device != self.device:
            raise DtypeMismatchError(
                f"{what} is {v.dtype} on {v.device}; operator is {self.dtype} on {self.device}"
            )
        if v.dim() not in (1, 2) or v.shape[0] != self.shape[0]:
            raise ShapeMismatchError(
                f"{what} must have shape ({self.shape[0]},) or ({self.shape[0]}, k); got {tuple(v.shape)}"
            )
        if v.dim() == 2 and v.shape[1] == 0:
            raise InvalidArgumentError(f"{what} has shape {tuple(v.shape)}: no columns to multiply or solve")
        if not torch.isfinite(v).all():
            raise NonFiniteError(f"{what} contains NaN or infinity")
        return (v[:, None] if v.dim() == 1 else v), v.dim() == 1

    def _split(self, V: Tensor) -> list[Tensor]:
        return list(torch.split(V, self._sizes, dim=0))

    # -- products -------------------------------------------------------------------------------
    def _apply(self, V: Tensor) -> Tensor:
        """``H V`` for V of shape (n, k) by the two ``O(L)`` sweeps."""
        vs, blocks = self._split(V), self.blocks
        t_in: list[Tensor | None] = [None] * len(blocks)
        t: Tensor | None = None  # t_0 = 0
        for l, blk in enumerate(blocks[:-1]):
            t_in[l] = t
            t = blk.hvp_forward(t, vs[l] if blk.p else None)
        t_in[-1] = t
        out: list[Tensor] = [None] * len(blocks)  # type: ignore[list-item]
        s = V.new_zeros(1, 1, V.shape[1])
        for l in range(len(blocks) - 1, -1, -1):
            blk, v, tl = blocks[l], vs[l], t_in[l]
            o, s_new = blk.hvp_backward(s, v if blk.p else None, tl, need_s=l > 0)
            out[l] = o if blk.p else v
            if l > 0:
                s = s_new
        return torch.cat(out, dim=0)

    def __matmul__(self, v: Tensor) -> Tensor:
        """``H v`` for ``v`` of shape (n,) or (n, k), in ``O(L)``."""
        V, vec = self._as_matrix(v)
        HV = self._apply(V)
        return HV[:, 0] if vec else HV

    matmul = __matmul__

    def to_dense(self) -> Tensor:
        """The dense ``n x n`` matrix (``n`` products at once). For small models and tests."""
        return self._apply(torch.eye(self.shape[0], dtype=self.dtype, device=self.device))

    def as_linear_operator(self):
        """A ``scipy.sparse.linalg.LinearOperator`` taking and returning float64 numpy arrays."""
        from scipy.sparse.linalg import LinearOperator

        def mm(X: np.ndarray) -> np.ndarray:
            T = torch.as_tensor(np.asarray(X, dtype=np.float64)).to(self.dtype).to(self.device)
            return (self @ T.reshape(self.shape[0], -1)).double().cpu().numpy()

        return LinearOperator(
            self.shape,
            matvec=lambda x: mm(x).ravel(),
            matmat=mm,
            rmatvec=lambda x: mm(x).ravel(),
            dtype=np.float64,
        )

    # -- factorization -------------------------------------------------------------------------
    def factor(self, damping: float = 0.0, modify: str | None = None) -> Factorization:
        """Factor ``H + damping * I`` with the backward Riccati sweep (reusable for many solves).

        Raises :class:`SingularError` if a pivot is singular at this damping. ``modify="abs"`` (needs
        ``damping > 0``) factors instead the positive definite ``M = L |D| L^T``: each Riccati pivot's
        eigenvalues below ``damping`` replaced by ``max(|lambda|, damping)`` (modified Cholesky per pivot
        block, math.md §6); ``M = H + damping I`` where every pivot is already above ``damping``.
        Solves with it are not refined (``M`` is not ``H + damping I``).
        """
        return Factorization(self, check_real(damping, "damping"), modify=_check_modify(modify))

    def solve(self, rhs: Tensor, damping: float = 0.0, **kw) -> Tensor | tuple[Tensor, SolveInfo]:
        """``(H + damping I)^{-1} rhs``; shortcut for ``self.factor(damping).solve(rhs, **kw)``."""
        return self.factor(damping).solve(rhs, **kw)

    def is_positive_definite(self, shift: float = 0.0) -> bool:
        """Whether ``H + shift I`` is positive definite: every Riccati pivot has a Cholesky factor."""
        shift = _check_shift(shift, self.dtype)
        names = self._names
        try:
            _, _, pd = riccati_factor(
                self.blocks, float(shift), names, self.gradient, stop_if_indefinite=True, strict=False
            )
        except SingularError:
            return False
        return pd

    def norm_estimate(self, iters: int = 30) -> float:
        """An estimate of ``||H||_2`` by power iteration (a lower bound, usually within 1%)."""
        if self._norm is None:
            g = torch.Generator(device="cpu").manual_seed(0)
            v = torch.randn(self.shape[0], 1, generator=g, dtype=torch.float64).to(self.dtype).to(self.device)
            est = 0.0
            for _ in range(iters):
                v = v / v.norm()
                w = self._apply(v)
                est = float(w.norm())
                if est == 0.0:
                    break
                v = w
            self._norm = est
        return self._norm

    def inertia(self, shift: float = 0.0, tol: float | None = None) -> Inertia:
        """Counts of eigenvalues of ``H + shift I`` below ``-tol``, within ``[-tol, tol]``, above ``tol``.

        ``tol`` defaults to ``sqrt(u) * ||H||`` (``u`` the unit roundoff), so that eigenvalues that are
        zero up to rounding count as zero. Two Riccati factorizations, at ``shift - tol`` and
        ``shift + tol``; ``tol=0`` uses one factorization at ``shift``.
        """
        shift = _check_shift(shift, self.dtype)
        if tol is None:
            tol = math.sqrt(torch.finfo(self.dtype).eps) * max(self.norm_estimate(), 1e-30)

        def count(s: float) -> Inertia:
            return riccati_factor(self.blocks, s, self._names, self.gradient, strict=False)[1]

        if tol == 0:
            return count(shift)
        neg, pos = count(shift + tol).negative, count(shift - tol).positive
        return Inertia(neg, self.shape[0] - neg - pos, pos)

    def min_eigenvalue(self, tol: float = 1e-8) -> float:
        """``lambda_min(H)`` to within ``tol * max(||H||, 1)`` by bisection on the positive-definiteness test.

        Each step is one Riccati sweep that stops at the first pivot without a Cholesky factor.
        """
        scale = max(self.norm_estimate(), 1e-30)
        hi = 1.1 * scale
        while not self.is_positive_definite(hi):
            hi *= 2
        lo = -1.1 * scale
        while self.is_positive_definite(lo):
            hi, lo = lo, lo - 2 * abs(lo)
        atol = tol * max(scale, 1.0)
        while hi - lo > atol:
            mid = 0.5 * (lo + hi)
            if self.is_positive_definite(mid):
                hi = mid
            else:
                lo = mid
        return -0.5 * (lo + hi)

    def _residual_operator(self) -> CurvatureOperator:
        """This operator in float64 (itself if already float64), for refinement residuals."""
        if self.dtype == torch.float64:
            return self
        if self._twin is None:
            model = copy.deepcopy(self.model)
            model = model.double() if isinstance(model, nn.Module) else [m.double() for m in model]
            targets = self.targets.double() if self.targets.is_floating_point() else self.targets
            self._twin = type(self)(model, self.loss_fn, self.inputs.double(), targets)
        return self._twin


def _check_modify(modify: str | None) -> bool:
    if modify is None:
        return False
    if modify != "abs":
        raise ValueError(f"modify must be None or 'abs', got {modify!r}")
    return True


def _check_shift(shift, dtype: torch.dtype, what: str = "shift") -> float:
    """A finite real ``shift``/``damping`` small enough that ``H + shift I`` is representable: at most
    ``1e-4 sqrt(max float)`` (1.3e150 in float64, 1.8e15 in float32), beyond which the sweep's
    products overflow or the solve loses its accuracy."""
    shift = check_real(shift, what)
    if not math.isfinite(shift):
        raise NonFiniteError(f"{what} must be finite, got {shift}")
    limit = 1e-4 * math.sqrt(torch.finfo(dtype).max)
    if abs(shift) > limit:
        raise InvalidArgumentError(
            f"{what} {shift:g} is too large for {dtype}: |{what}| must be <= {limit:.2g}"
        )
    return shift


class Hessian(CurvatureOperator):
    """The exact Hessian ``d2 z_L / dx2`` of the loss on one batch (math.md §1).

    >>> import torch, hessinv
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()
    >>> X, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
    >>> H = hessinv.hessian(net, torch.nn.CrossEntropyLoss(), X, y)
    >>> H.shape
    (23, 23)
    >>> x = H.solve(H.gradient, damping=1.0)
    >>> bool(torch.allclose(H @ x + x, H.gradient))
    True
    >>> H.inertia(-100.0).negative   # every eigenvalue of H is above -100
    23
    """


class GaussNewton(CurvatureOperator):
    """The generalized Gauss-Newton matrix ``G = J^T Lambda J`` (``Lambda`` = the loss Hessian
    in the model outputs, ``J`` = their Jacobian in the parameters); positive semi-definite for
    convex losses, so ``G + eps I`` with ``eps > 0`` always factors by Cholesky.

    Its rank is at most ``batch x outputs``, so besides the Riccati sweep it factors through its
    square root ``G = U^T S U`` (:mod:`hessinv.lowrank`): ``factor(damping=D)`` with a per-parameter
    damping vector ``D`` (or ``method="woodbury"``) uses Woodbury's identity.
    """

    second_order = False
    _root: tuple[Tensor, Tensor] | None = None

    def root(self) -> tuple[Tensor, Tensor]:
        """``(U, S)``: ``G = U^T diag(S) U``, ``U`` of shape (r, n) (cached; one backward sweep with ``r``
        right-hand sides, :func:`hessinv.lowrank.gauss_newton_root`)."""
        if self._root is None:
            self._root = gauss_newton_root(self.blocks, self.dtype)
        return self._root

    def factor(
        self, damping: float | Tensor = 0.0, method: str = "auto", modify: str | None = None
    ) -> Factorization:
        """Factor ``G + D``. ``D`` is a number (``method="auto"``/``"riccati"``: the Riccati sweep;
        ``"woodbury"``: through ``G``'s square root) or a (n,) tensor of per-parameter damping
        (always Woodbury)."""
        if method not in ("auto", "riccati", "woodbury"):
            raise ValueError(f"method must be 'auto', 'riccati' or 'woodbury', got {method!r}")
        if isinstance(damping, Tensor) or method == "woodbury":
            if method == "riccati":
                raise ValueError("a per-parameter damping needs method='woodbury' (or 'auto')")
            return WoodburyFactorization(self, damping)
        return Factorization(self, check_real(damping, "damping"), modify=_check_modify(modify))


class Factorization:
    """``H + eps I`` factored by the backward Riccati sweep; solve many right-hand sides with it.

    Attributes:
        damping: ``eps``.
        inertia: ``(negative, zero, positive)`` eigenvalue counts of ``H + eps I``
            (zero is always 0: a singular pivot raises :class:`SingularError` instead).
        positive_definite: whether every pivot had a Cholesky factor.
        last_info: the :class:`SolveInfo` of the latest solve.
    """

    def __init__(self, op: CurvatureOperator, damping: float, modify: bool = False):
        damping = _check_shift(damping, op.dtype, "damping")
        self.op, self.damping, self.modified = op, damping, modify
        self.factors, self.inertia, self.positive_definite = riccati_factor(
            op.blocks, damping, op._names, op.gradient, modify=modify
        )
        self.last_info: SolveInfo | None = None
        self._f64: Factorization | None = None

    def _raw(self, R: Tensor) -> Tensor:
        xs = riccati_solve(self.op.blocks, self.factors, self.op._split(R))
        return torch.cat(xs, dim=0)

    def _riccati_only(self, what: str) -> None:
        if getattr(self, "factors", None) is None:
            raise InvalidArgumentError(
                f"{what} needs the Riccati factorization (factor(..., method='riccati'))"
            )
        if self.modified and any(f.pivot.modified for f in self.factors if f is not None):
            raise InvalidArgumentError(
                f"{what}: this factorization modified its pivots (modify='abs'), so it is not one of "
                "H + eps I; factor without modify"
            )

    def slogdet(self) -> tuple[float, float]:
        """``(sign, log|det(H + eps I)|)`` like :func:`torch.linalg.slogdet`: the sign is
        ``(-1)^(number of negative eigenvalues)`` (the inertia), the log from :meth:`logdet`."""
        return (-1.0 if self.inertia.negative % 2 else 1.0), self.logdet()

    def logdet(self) -> float:
        """``log|det(H + eps I)| = sum_l log|det Qxx_l|``, from the pivots alone (in float64).

        The sweep is a block congruence ``H + eps I = U D U^T`` with unit block-triangular ``U`` and
        ``D = diag(Qxx_l)``, so ``det(H + eps I) = prod_l det Qxx_l``.
        """
        self._riccati_only("logdet")
        return float(sum(f.pivot.logdet() for f in self.factors if f is not None))

    def inverse_sqrt(self, Z: Tensor) -> Tensor:
        """``S Z`` for an ``n x n`` square root ``S S^T = (H + eps I)^{-1}``; ``Z``: (n,) or (n, k).

        With ``Qxx_l = C_l C_l^T`` (each pivot's Cholesky factor, or ``V lambda^{1/2}``) the sweep's
        congruence ``H + eps I = U D U^T`` is ``(U C)(U C)^T``, and ``S = (U C)^{-T}``: one triangular
        solve per pivot, then the forward half of a solve. (``S`` depends on the stages' internal row
        order; ``S S^T`` does not.) Raises :class:`IndefiniteError` unless ``H + eps I`` is positive
        definite.
        """
        self._riccati_only("inverse_sqrt")
        if self.inertia.negative:
            raise IndefiniteError(
                f"H + eps I at damping {self.damping:g} has {self.inertia.negative} negative eigenvalues: "
                "no Gaussian with this precision exists; use the Gauss-Newton matrix or a larger damping"
            )
        R, vec = self.op._as_matrix(Z, "Z")
        zs = self.op._split(R)
        ks = [None if f is None else f.pivot.inverse_sqrt(z) for f, z in zip(self.factors, zs, strict=True)]
        X = torch.cat(riccati_forward(self.op.blocks, self.factors, ks), dim=0)
        return X[:, 0] if vec else X

    def sample(self, k: int = 1, generator: torch.Generator | None = None) -> Tensor:
        """``k`` independent samples of ``N(0, (H + eps I)^{-1})``, the columns of an (n, k) tensor:
        ``S z`` for white ``z`` (:meth:`inverse_sqrt`)."""
        dev = generator.device if generator is not None else self.op.device
        z = torch.randn(self.op.shape[0], k, generator=generator, dtype=self.op.dtype, device=dev)
        return self.inverse_sqrt(z.to(self.op.device))

    def _damping_text(self) -> str:
        return f"{self.damping:g}"

    def _shift(self, X: Tensor) -> Tensor:
        """``eps X`` (the damping's part of ``(H + eps I) X``)."""
        return self.damping * X

    def solve(
        self, rhs: Tensor, refine: bool = True, max_refine: int = 5, return_info: bool = False
    ) -> Tensor | tuple[Tensor, SolveInfo]:
        """``(H + eps I)^{-1} rhs`` for ``rhs`` of shape (n,) or (n, k).

        With ``refine=False`` this is the bare ``O(L)`` sweep (no residual is computed;
        ``last_info.residual`` is NaN). With ``refine`` (default), iterative refinement
        ``x += F^{-1}(rhs - (H + eps I) x)`` runs with float64 residuals (the ``O(L)`` product)
        until the residual stops improving. The achieved relative residual is in ``self.last_info``
        (and returned with ``return_info``); an :class:`~hessinv.AccuracyWarning` is issued when it
        exceeds ``sqrt(u)`` of the model dtype.
        """
        R, vec = self.op._as_matrix(rhs, "rhs")
        X = self._raw(R)
        if not refine or getattr(self, "modified", False):  # no residual either: the caller asked for the raw sweep
            self.last_info = SolveInfo(float("nan"), 0)
            out = X[:, 0] if vec else X
            return (out, self.last_info) if return_info else out
        op64 = self.op._residual_operator()
        R64 = R.double()
        rnorm = R64.norm(dim=0).clamp_min(torch.finfo(torch.float64).tiny)
        X64 = X.double()

        def residual(X_: Tensor) -> tuple[Tensor, float]:
            res = R64 - op64._apply(X_.to(op64.dtype)).double() - self._shift(X_)
            return res, float((res.norm(dim=0) / rnorm).max())

        res, rel = residual(X64)
        steps = 0
        target = 4 * torch.finfo(torch.float64).eps
        while steps < max_refine and rel > target:
            cand = X64 + self._raw(res.to(self.op.dtype)).double()
            res_c, rel_c = residual(cand)
            if not rel_c < 0.9 * rel:
                break
            X64, res, rel, steps = cand, res_c, rel_c, steps + 1
        self.last_info = SolveInfo(rel, steps)
        if rel > math.sqrt(torch.finfo(self.op.dtype).eps):
            warnings.warn(
                f"solve at damping {self._damping_text()} reached relative residual {rel:.2e} only",
                AccuracyWarning,
                stacklevel=2,
            )
        X = X64.to(self.op.dtype)
        out = X[:, 0] if vec else X
        return (out, self.last_info) if return_info else out


def hessian(
    model: nn.Module | Sequence[nn.Module], loss_fn: nn.Module, inputs: Tensor, targets: Tensor
) -> Hessian:
    """The exact Hessian of ``loss_fn(model(inputs), targets)`` in the model's trainable parameters."""
    return Hessian(model, loss_fn, inputs, targets)


def gauss_newton(
    model: nn.Module | Sequence[nn.Module], loss_fn: nn.Module, inputs: Tensor, targets: Tensor
) -> GaussNewton:
    """The generalized Gauss-Newton matrix of ``loss_fn(model(inputs), targets)``."""
    return GaussNewton(model, loss_fn, inputs, targets)


def curvature_class(name: str) -> type[CurvatureOperator]:
    """The operator class for ``"hessian"`` or ``"gauss_newton"`` (also ``"gauss-newton"``, ``"ggn"``)."""
    key = name.lower().replace("-", "_")
    if key in ("hessian", "h"):
        return Hessian
    if key in ("gauss_newton", "ggn", "gn"):
        return GaussNewton
    raise ValueError(f"curvature must be 'hessian' or 'gauss_newton', got {name!r}")


class WoodburyFactorization(Factorization):
    """``G + D`` for the Gauss-Newton matrix through its square root (:class:`hessinv.lowrank.WoodburyFactor`).

    ``damping`` is a number or a per-parameter (n,) tensor ``D`` (no zero entry). Same interface as
    :class:`Factorization` (``solve`` with refinement, ``inertia``, ``positive_definite``, ``logdet``).
    """

    def __init__(self, op: GaussNewton, damping: float | Tensor):
        if not isinstance(damping, Tensor) and not math.isfinite(damping):
            raise NonFiniteError(f"damping must be finite, got {damping}")
        self.op, self.damping = op, damping
        U, S = op.root()
        self.woodbury = WoodburyFactor(U, S, damping)
        self.inertia, self.positive_definite = self.woodbury.inertia, self.woodbury.positive_definite
        self.last_info = None
        self._f64 = None

    def _raw(self, R: Tensor) -> Tensor:
        return self.woodbury.solve(R)

    def _shift(self, X: Tensor) -> Tensor:
        return self.woodbury.D.double()[:, None] * X

    def _damping_text(self) -> str:
        return "D (per parameter)" if isinstance(self.damping, Tensor) else f"{self.damping:g}"

    def logdet(self) -> float:
        """``log|det(G + D)|``."""
        return self.woodbury.logdet()
