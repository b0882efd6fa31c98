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

import contextlib
import copy
import functools
import math
import numbers
import operator
import time
import types
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, overload

import numpy as np

# (as_linear_operator's annotation names scipy.sparse.linalg: typing.get_type_hints resolves it in this
# module's globals; scipy loads that submodule on first use, so the import costs ~17 ms after numpy)
import scipy
import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from hessinv import linalg
from hessinv.chain import Chain, LossFn, _autocast_on, _tensor, check_real, operator_chain, targets_as_data
from hessinv.errors import (
    AccuracyWarning,
    ConvergenceError,
    DtypeMismatchError,
    HessinvError,
    IndefiniteError,
    InvalidArgumentError,
    NonFiniteArgumentError,
    NonFiniteError,
    ShapeMismatchError,
    SingularError,
    TooLargeError,
    UnsupportedStageError,
    out_of_memory,
    warn,
)
from hessinv.linalg import all_finite, symmetric_in_rhs
from hessinv.lowrank import WoodburyFactor, gauss_newton_root
from hessinv.riccati import (
    Inertia,
    Pivot,
    _first_with_parameters,
    _memory_bytes,
    check_dense_memory,
    check_memory,
    curvature_diagonal,
    example_curvature_diagonal_sweep,
    example_sweep_pulls,
    examples_apart,
    riccati_factor,
    riccati_forward,
    riccati_inverse_diagonal,
    riccati_quadratic,
    riccati_solve,
)
from hessinv.stages import Blocks, RiccatiBlocks
from hessinv.stages.generic import LazyBlocks, NoDoubleBackward, held_tensors, plain_settings
from hessinv.stages.losses import loss_in_dtype, uncompiled

__all__ = [
    "CurvatureOperator",
    "Hessian",
    "GaussNewton",
    "Factorization",
    "WoodburyFactorization",
    "MixedFactorization",
    "SolveInfo",
    "Eigenpairs",
    "hessian",
    "gauss_newton",
    "curvature_class",
    "normalize_curvature",
]


@dataclass
class SolveInfo:
    """How accurate a solve is: ``residual = max_j |rhs_j - (H + eps I) x_j| / |rhs_j|``.

    The residual is evaluated in float64 (also for float32 models; but with ``solve(refine="working")``
    in the model's own dtype, which can understate a float32 solve's by 10x and more, as its rounding is
    the residual's size -- :attr:`returned_residual` is in float64 there too), after ``refinement_steps``
    steps of iterative refinement and, where refinement stalled or ran out of steps (or the
    factorization was perturbed, see :class:`Factorization`), ``krylov_iterations`` iterations of
    flexible GMRES preconditioned by the factorization. It is that of the float64 iterate: for a
    float32 model the returned ``x`` is that iterate rounded to float32, whose own residual is larger
    by up to about ``u32 cond(H + eps I)`` (its forward error is at float32's rounding);
    :attr:`returned_residual` is that one (one more float64 product, made on first access).
    Where ``(H + eps I)`` is nearly singular the float64 residual is itself computed with rounding of
    about ``u ||H + eps I|| |x_j| / |rhs_j|``, and a value near that scale may understate the true
    residual by several times (5-8x at condition numbers 1e7-1e9 against an extended-precision product,
    a review); the solution is no less accurate than a dense LU's there.
    """

    residual: float
    refinement_steps: int
    krylov_iterations: int = 0
    _returned: Callable[[], float] | None = field(default=None, repr=False, compare=False)

    @property
    def returned_residual(self) -> float:
        """``max_j |rhs_j - (H + eps I) x_j| / |rhs_j|`` of the ``x`` returned (rounded to the model
        dtype), in float64; equal to :attr:`residual` for float64 models and bare sweeps (NaN)."""
        if self._returned is not None:
            self._value, self._returned = self._returned(), None
        return getattr(self, "_value", self.residual)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (``torch.save`` of a factorization after a float32 solve, a fitted ``Laplace``) with
        :attr:`returned_residual` measured: its deferred product is a closure, which does not pickle."""
        _ = self.returned_residual
        return dict(self.__dict__)


class Eigenpairs(NamedTuple):
    """Eigenvalues of ``H`` found by shift-invert Lanczos, with their certificate.

    Attributes:
        values: (k,) float64, ascending.
        vectors: (n, k) float64 orthonormal eigenvectors (columns in the order of ``values``).
        residuals: (k,) ``|H v - lambda v|`` (float64 products): each ``values[i]`` is within
            ``residuals[i]`` of an eigenvalue of ``H``.
        interval: ``(lo, hi)``: the inertia count says that ``H`` has exactly ``k`` eigenvalues in it
            (where none was made: the interval the pairs span, padded by their residuals).
        certified: whether that count matched (no eigenvalue missed in ``interval``); False when a
            count could not be made exactly (a perturbed pivot), did not match after retries, or was not
            made (``eigenpairs(certify=False)``, or by default where a factorization is too dear) -- a
            Gauss-Newton spectrum read whole from its root is counted there, whatever ``certify`` says.
        factorizations: Riccati sweeps used (factorizations and inertia counts).
        solves: solves with the shift-invert factorization.

    (An example: :class:`Factorization`'s.)
    """

    values: Tensor
    vectors: Tensor
    residuals: Tensor
    interval: tuple[float, float]
    certified: bool
    factorizations: int
    solves: int


#: :meth:`CurvatureOperator.eigenpairs` certifies its pairs by default where one factorization (an inertia
#: count) costs at most this many flops by the cost model, which errs high (a 16 x 32 tanh chain on 32
#: examples: 3.2e10 modelled, 0.5 s on one core here; a 64-256-256-10 MLP: 7e12 modelled, 53 s)
CERTIFY_MAX_FLOPS = 2.0**38
#: :meth:`CurvatureOperator.eigenpairs` at an end of the spectrum tries ARPACK on ``H``'s products with
#: about this many products before shift-invert (:meth:`CurvatureOperator._lanczos_eigenpairs`)
LANCZOS_PRODUCTS = 1000
#: uncertified pairs at an end of the spectrum (``eigenpairs(certify=False)``): at most this many more
#: ARPACK runs with the pairs found deflated, for copies of a repeated eigenvalue the first run missed
DEFLATION_ROUNDS = 4
#: Operators up to this size get their eigenvalue estimates from the dense matrix (then certified).
#: zero entries of a per-parameter damping factored exactly by :class:`WoodburyFactorization`
ZERO_DAMPING_MAX = 4096
_TINY64 = float(np.finfo(np.float64).tiny)  # the floor of the relative scales of ||H||
_DENSE_EIG = 64
#: Block size of the Lanczos run of :meth:`CurvatureOperator.min_eigenvalue`: products with 4 columns
#: cost 1.2-1.3x one column at width 16 (small stages: the sweeps' cost is per call, not per column).
_LANCZOS_BLOCK = 4
#: Shift-invert Lanczos that does not converge within this many ARPACK restarts (or asks for more than
#: an eighth of the spectrum) falls back to dense ``eigh`` up to this size.
_ARPACK_RESTARTS = 100
_DENSE_EIG_MAX = 4096
_DENSE_FRACTION = 8


def _check_tol(tol: float, name: str = "tol", allow_zero: bool = False, relative: bool = False) -> float:
    """``tol`` as a float; :class:`InvalidArgumentError` unless it is a real number (not a bool or a
    string), finite (else :class:`NonFiniteArgumentError`) and positive (or zero), and below 1 where it
    is ``relative`` (an accuracy relative to ``||H||``: 1 or more asks for no digit)."""
    t = check_real(tol, name)
    need = "finite and >= 0" if allow_zero else "in (0, 1)" if relative else "finite and > 0"
    if not math.isfinite(t):
        raise NonFiniteArgumentError(f"{name} must be {need}, got {tol!r}")
    if t < 0 or (t == 0 and not allow_zero) or (relative and t >= 1):
        raise InvalidArgumentError(f"{name} must be {need}, got {tol!r}")
    return t


def _identity_columns(n: int, rows: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """The columns ``e_i`` of the ``n x n`` identity for ``i`` in ``rows``, as an (n, len(rows)) matrix."""
    E = torch.zeros(n, len(rows), dtype=dtype, device=device)
    E[torch.as_tensor(rows, device=device), torch.arange(len(rows), device=device)] = 1
    return E


def _integer(x: object) -> int | None:
    """``x`` as an int where it is an integer of any kind (Python, numpy, a 0-d integer tensor), else
    None (a bool, a float, a string, a tensor of more than one dimension or of bools)."""
    if isinstance(x, bool) or (isinstance(x, Tensor) and (x.dim() != 0 or x.dtype == torch.bool)):
        return None
    try:
        return operator.index(x)  # type: ignore[arg-type]
    except TypeError:
        return None


#: :meth:`Factorization.inverse_diagonal` checks the forward sweep at this many random entries per stage
#: against refined solves
INVERSE_DIAGONAL_PROBES = 4
#: ... and at most this many in all (stages drawn at random beyond, but for the
#: :data:`INVERSE_DIAGONAL_WORST_STAGES` of the worst-conditioned pivots): the check stays a few solves,
#: linear in depth
INVERSE_DIAGONAL_MAX_PROBES = 48
INVERSE_DIAGONAL_WORST_STAGES = 4
#: :meth:`CurvatureOperator._rough_norm` stops once two power steps in a row raised its estimate by less than
#: this fraction of it
NORM_RTOL = 1e-5

#: The dense route (:meth:`CurvatureOperator._swept`) is taken up to this many parameters (``n^2`` numbers,
#: where they fit; 6144 until a probe's 10-512-3 tanh MLP on 32 examples, n = 7171: the sweep took 15 s and
#: 8.3 GB, its dense matrix and LU 10 s and 0.4 GB; 8192 until a 64-64-64-10 MLP on 256 examples, n = 8970:
#: the sweep 52 s and 10 GB, the dense route 27 s and 2.5 GB, one thread)
DENSE_ROUTE_MAX_N = 12288
#: ... and where the chain's sweep would cost over this many flops and three times the dense route's
#: (below, both take about a millisecond). It was 1e9: a 10-16-1 tanh MLP on the 442 diabetes examples
#: (n = 193, ``a = 7072`` activations at its last stage: 8.6e8 modelled flops, mostly memory-bound passes
#: over ``a^2`` numbers) took 0.83 s per factorization and solve by the sweep, 11 ms by the dense route
DENSE_ROUTE_MIN_FLOPS = 1e7
#: ... on other devices (not measured there: the rule before 2026-12-04, when a dense indefinite ``H``
#: is factored on the CPU -- the pivots' ``LDL^T`` bookkeeping runs in numpy -- after a copy off the device)
DENSE_ROUTE_MIN_FLOPS_DEVICE = 1e9
#: :meth:`CurvatureOperator._dense_dearer_timed`: the dense route the flop model chose is timed where the
#: sweep is priced above this many seconds, and left for the sweep where it is dearer by this margin
DENSE_ROUTE_TIMED_MIN_SECONDS = 0.5
DENSE_ROUTE_TIMED_MARGIN = 1.5


def _dense_route(chain: float, dense: float, n: int, cpu: bool = True) -> bool:
    """Whether a factorization takes the dense route, by the modelled flops of the chain's sweep and of
    the dense route (:func:`_factorization_costs`), the size ``n`` and the device (CPU or not)."""
    floor = DENSE_ROUTE_MIN_FLOPS if cpu else DENSE_ROUTE_MIN_FLOPS_DEVICE
    return n <= DENSE_ROUTE_MAX_N and chain > floor and chain > 3 * dense


def _factorization_costs(
    sizes: Sequence[int],
    widths: Sequence[int],
    batches: Sequence[int],
    outputs: int = 0,
    pivots: Sequence[int] | None = None,
) -> tuple[float, float]:
    """``(Riccati sweep, dense route)`` flops of one factorization: the sweep's ``sum_l (p_l^3 / 3 + 2 p_l^2
    a_l + p_l a_l^2)`` with ``a_l = batches[l] * widths[l]`` (stage ``l``'s input width; 0 at the first
    stage with parameters, whose input is data), plus that first stage's ``p a^2`` on its output's ``a``
    (``Jx^T Sigma Jx``, ``Sigma`` the Schur complement on its ``B d_out`` outputs: a 30-16-2 MLP on 455
    examples, 2.8e10 flops where the sum without it said 1.9e9 -- 0.75 s, against 0.15 s by the dense
    route), plus the loss's coupling of the ``outputs`` (examples x outputs each) through
    the last stage with parameters (``p a^2 + 2 p^2 a``: an image's pixels), the dense route's ``n^3 / 3``
    plus ``n`` products of ``sum_l 8 B_l max(p_l, d_in + d_out)`` (a convolution's weights are shared by
    its positions: a product costs about its inputs and outputs, not its few parameters). ``pivots``: the
    order of each pivot as the sweep factors it (:meth:`~hessinv.stages.Blocks.pivot_order`: a wide
    stage's rank-``B d`` pivot) in place of ``p`` in its ``p^3 / 3 + 2 p^2 a`` (default: ``sizes``)."""
    first = next((l for l, p in enumerate(sizes) if p), 0)
    qs = sizes if pivots is None else pivots
    chain = sum(
        q**3 / 3 + 2 * q**2 * a + p * a * a
        for l, (p, q) in enumerate(zip(sizes, qs, strict=True))
        if p
        for a in [batches[l] * widths[l] if l > first else 0]
    )
    last = next((q for p, q in zip(reversed(sizes), reversed(qs), strict=True) if p), 0)
    chain += last * float(outputs) ** 2 + 2.0 * last**2 * outputs
    n = sum(sizes)
    outs = [*widths[1:], outputs / max(batches[-1], 1) if batches else 0]  # (each stage's output width)
    if sizes and sizes[first] and any(sizes[first + 1 :]):  # (a first stage that is the last: above)
        chain += qs[first] * (batches[first] * float(outs[first])) ** 2
    product = sum(8.0 * max(p, w + o) * b for p, w, o, b in zip(sizes, widths, outs, batches, strict=True))
    return chain, n**3 / 3 + n * product


def _block_costs(blocks: Sequence[Blocks], pivots: bool = False) -> tuple[float, float]:
    """:func:`_factorization_costs` of a linearized chain (model stages, then the loss stage); ``pivots``:
    with the pivots' orders as factored."""
    stages, loss = blocks[:-1], blocks[-1]
    return _factorization_costs(
        [b.p for b in stages],
        [b.d_in for b in stages],
        [b.batch for b in stages],
        loss.batch * loss.d_in,
        [b.pivot_order(b.batch) for b in stages] if pivots else None,
    )


def factorization_flops(
    sizes: Sequence[int], widths: Sequence[int], batch: int, cpu: bool = True, outputs: int = 0
) -> float:
    """The flops of one factorization of a chain's curvature on ``batch`` examples of ``outputs`` outputs
    each, before any is built (:func:`_factorization_costs`): the Riccati sweep's, or the dense route's
    where the factorization takes it (:func:`_dense_route`, on the CPU or, ``cpu=False``, another device;
    :meth:`CurvatureOperator._swept` also takes it where the sweep would not fit in memory)."""
    chain, dense = _factorization_costs(sizes, widths, [batch] * len(sizes), batch * outputs)
    return dense if _dense_route(chain, dense, sum(sizes), cpu) else chain


class _DenseMatrixBlocks(Blocks):
    """The whole ``H`` as one stage of a one-stage chain (the dense route of
    :meth:`CurvatureOperator._swept`): the Riccati sweep over it is a Cholesky or Bunch-Kaufman ``LDL^T`` of
    ``H + eps I`` itself (perturbation, inertia, log-determinant and solves as for any pivot), products
    are ``H V``."""

    per_example = False

    def __init__(self, A: Tensor):
        self.A, self.p, self.batch, self.d_in, self.d_out = A, int(A.shape[0]), 1, 0, 0

    def riccati_native(self, Sigma: Tensor, coupled: bool = True) -> RiccatiBlocks:
        return RiccatiBlocks(self.A.clone(), self.A.new_zeros(self.p, 1, 0), None)

    riccati = riccati_native

    def jxT(self, s: Tensor) -> Tensor:
        return s.new_zeros(self.p, s.shape[-1])

    def hvp_forward(self, t: Tensor | None, v: Tensor | None) -> Tensor | None:
        return None

    def hvp_backward(self, s, v, t_in, need_s=True):  # type: ignore[no-untyped-def]
        return self.A @ v, None

    def _no_chain(self, *args: object) -> Tensor:  # a one-stage chain has no state to propagate
        raise NotImplementedError("the dense route's single stage has no input or output state")

    jx = jz = jzT = hxx = hxz = hxzT = hzz = _no_chain


#: the device types whose ``torch.autocast`` hessinv's operators and factorizations switch off
_AUTOCAST_DEVICES = ("cpu", "cuda")


def _autocast_off(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` run with ``torch.autocast`` off: an operator or factorization made outside an autocast
    context answers for its model's dtype inside one too (autocast would run its products, sweeps and the
    stage functions they call in bfloat16: ``H @ v`` 3.5e-3 off, ``factor`` a raw dtype error -- a probe;
    making an operator under autocast is refused by :meth:`Chain.check_model`)."""

    @functools.wraps(method)
    def run(*args: Any, **kwargs: Any) -> Any:
        on = [d for d in _AUTOCAST_DEVICES if _autocast_on(d)]
        with contextlib.ExitStack() as stack, linalg.library_call():  # (one thread on a busy machine)
            for d in on:
                stack.enter_context(torch.autocast(d, enabled=False))
            return method(*args, **kwargs)

    return run


class _AutocastOff:
    """Base of the operator and factorization classes: every method a class defines (``__init__`` and the
    other dunders aside, ``@`` included) and its properties' getters run with autocast off
    (:func:`_autocast_off`), the subclasses' too, and -- the outermost call on a thread -- on one torch
    thread where the machine is busy (:func:`hessinv.linalg.library_call`; an operator's ``__init__``
    too, which keeps autocast as it is)."""

    #: the dunders wrapped too (a factorization's ``__init__`` runs the sweep; an operator's keeps the
    #: refusal to be made under autocast)
    _autocast_dunders: tuple[str, ...] = ("__matmul__", "__rmatmul__")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, value in list(vars(cls).items()):
            if (
                name == "__init__"
                and name not in cls._autocast_dunders
                and isinstance(value, types.FunctionType)
            ):
                setattr(cls, name, linalg.protect_threads(value))  # (the derivatives an operator takes)
                continue
            if name.startswith("__") and name not in cls._autocast_dunders:
                continue
            if isinstance(value, property) and value.fget is not None:
                setattr(cls, name, property(_autocast_off(value.fget), value.fset, value.fdel, value.__doc__))
            elif isinstance(value, (staticmethod, classmethod)):
                setattr(cls, name, type(value)(_autocast_off(value.__func__)))
            elif isinstance(value, types.FunctionType):
                setattr(cls, name, _autocast_off(value))


class CurvatureOperator(_AutocastOff):
    """A symmetric ``n x n`` curvature matrix of the mean (or summed) loss on one batch.

    ``n`` is the number of trainable parameters, ordered as ``model.parameters()``
    (``torch.nn.utils.parameters_to_vector`` order).
    """

    second_order: bool = True
    #: the chain whose :meth:`~hessinv.Chain.to_public` orders this operator's vectors where the stages
    #: hold the parameters in another order than ``model.parameters()`` (None: the same order); such an
    #: operator answers every call from ``_plain``, a copy of itself in the stages' order
    _order: Chain | None = None

    def __init__(
        self,
        model: nn.Module | Sequence[nn.Module],
        loss_fn: LossFn,
        inputs: Tensor,
        targets: Tensor,
        *,
        chain: Chain | None = None,
        _transient: bool = False,
    ):
        """``chain``: the :class:`~hessinv.Chain` of ``(model, loss_fn)`` when the caller already holds one
        (an optimizer that builds an operator every few steps: splitting a traced model into stages
        costs milliseconds); by default it is built here (:func:`~hessinv.chain.operator_chain`), and the
        vectors are ordered like ``model.parameters()`` -- also where the forward uses the parameters in
        another order (a head registered before the body, a model's own parameter used last): that chain's
        stages hold them in the order of use, and every vector in and out is permuted
        (:meth:`~hessinv.Chain.to_public`). With ``chain`` given, the vectors follow ``chain.params``:
        ``model.parameters()``'s order, except for an optimizer's chain of such a model
        (``Chain(..., ordered=False)``), which takes the stages' order.

        ``_transient`` (the library's own optimizers): a Gauss-Newton operator its caller uses at once and
        drops -- the refresh's root, on a curvature batch drawn from a batch the caller has checked. No
        copy of the batch or of the point is kept (no float64 twin: refined solves, ``logdet`` and
        eigenvalues of a float32 one are refused) and, where :meth:`Chain.linearize` can leave it out,
        no gradient (``gradient`` is None)."""
        if chain is not None and (chain.model is not model or chain.loss_fn is not uncompiled(loss_fn)):
            raise InvalidArgumentError("chain= must be the Chain of this model and loss_fn")
        self.chain = chain if chain is not None else operator_chain(model, loss_fn)
        _tensor(inputs, "inputs")  # the rest: linearize's checks (which see the copies made below)
        targets_as_data(_tensor(targets, "targets"), self.chain.params)
        # the point is kept: copies of the batch (blocks may hold the inputs; a caller's buffer is
        # refilled in place) and, for the float64 twin of a float32 operator, of the parameters
        self._transient = _transient
        if not _transient:
            inputs, targets = inputs.detach().clone(), targets.detach().clone()
        self.model, self.loss_fn, self.inputs, self.targets = model, loss_fn, inputs, targets
        self._point = (
            [t.detach().clone() for t in self.chain.params]
            if self.chain.dtype != torch.float64 and not _transient
            else None
        )
        lin = self.chain.linearize(
            inputs, targets, second_order=self.second_order, checked=_transient, gradient=not _transient
        )
        # the float64 twin's model is a copy of this one made when needed: what it must match besides the
        # trainable parameters -- buffers and plain tensor attributes, restored from copies (attributes by
        # their place: a forward may rebind one, self.last = x.detach()); frozen parameters, fingerprinted
        # (a backbone may be large: one changed since is refused); the hooks and traced attributes, checked
        self._held_point: list[tuple[Tensor, Tensor]] = []
        self._plain_point: list[tuple[int, str, str, Any]] = []
        self._loss_point: LossFn | None = None
        self._frozen_point: list[tuple[Tensor, tuple]] = []
        self._attr_point: list[tuple[int, str, str, Tensor]] = []
        if self._point is not None:
            mods = [model] if isinstance(model, nn.Module) else list(model)
            trained = {id(t) for t in self.chain.params}
            bufs = {id(b) for top in mods for b in top.buffers()}
            held = [t for t in held_tensors(mods, plain=False) if id(t) not in trained]
            self._held_point = [(t, t.detach().clone()) for t in held if id(t) in bufs]
            self._frozen_point = [(t, _fingerprint(t)) for t in held if id(t) not in bufs]
            self._attr_point = [
                (i, name, k, v.detach().clone())
                for i, top in enumerate(mods)
                for name, m in top.named_modules()
                for k, v in vars(m).items()
                if isinstance(v, Tensor)
            ]
            # and the modules' plain settings (a training flag, Softplus's beta, a list of scales) and the
            # loss (class weights, label smoothing) as they are now: the copy is made later
            self._plain_point = plain_settings(mods)
            self._loss_point = _loss_snapshot(loss_fn)
        self._model_key = self.chain.model_key()
        self.blocks, self._sizes = lin.blocks, lin.sizes + [0]
        self.gradient: Tensor = lin.gradient  # type: ignore[assignment]  # (None: _transient only)
        self.loss: Tensor = lin.loss
        self.dtype, self.device = self.chain.dtype, self.chain.device
        n = self.chain.num_params
        self.shape = (n, n)
        self._names = [s.name for s in self.chain.stages[lin.first :]] + ["loss stage"]
        self._twin: CurvatureOperator | None = None
        self._norm: float | None = None
        self._rough: float | None = None  # (_rough_norm's, where no norm estimate is cached)
        self._norm_iters = 0  # (the power iterations the cached estimate took)
        self._dense_h: Tensor | None = None  # the dense float64 matrix, for counts (formed when needed)
        self._count_doubt = False  # a count since the last reset kept an ill-conditioned sweep's result
        if chain is None and self.chain.permuted:
            # the public vectors in model.parameters()'s order: every call answered by a copy in the
            # stages' order (its products, factorizations, caches and float64 twin), permuted at the door
            self._plain, self._order = copy.copy(self), self.chain
            if self.gradient is not None:
                self.gradient = self.chain.to_public(self.gradient)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n={self.shape[0]}, stages={len(self.chain.stages)}, dtype={self.dtype})"
        )

    # -- vectors --------------------------------------------------------------------------------
    def _as_matrix(self, v: Tensor, what: str = "vector") -> tuple[Tensor, bool]:
        V, vector = linalg.as_columns(v, self.shape[0], self.dtype, self.device, what)
        if V.shape[1] == 0:
            raise InvalidArgumentError(f"{what} has shape {tuple(V.shape)}: no columns to multiply or solve")
        if not all_finite(V):
            raise NonFiniteError(f"{what} contains NaN or infinity")
        return V, vector

    def _split(self, V: Tensor) -> list[Tensor]:
        return list(torch.split(V, self._sizes, dim=0))

    def _stage_order(self) -> CurvatureOperator:
        """This operator with its vectors in the stages' order: itself, or where its public vectors are
        permuted (:attr:`_order`) the copy that answers its calls."""
        return self if self._order is None else self._plain

    def _stage_damping(self, damping: Any) -> Any:
        """A per-parameter damping (a dense (n,) tensor: GaussNewton's) in the stages' order; anything
        else as given (the factorization names what it cannot take)."""
        n = self.shape[0]
        if (
            self._order is not None
            and isinstance(damping, Tensor)
            and damping.shape == (n,)
            and damping.layout == torch.strided
        ):
            return self._order.to_stages(damping)
        return damping

    def _public_factor(self, F: Any) -> Any:
        """``F``, a factorization of :meth:`_stage_order`'s (or None), with its vectors in this operator's
        order."""
        if F is not None and self._order is not None:
            F._order = self._order
        return F

    def _swept(self) -> CurvatureOperator:
        """The operator whose blocks the factorizations sweep: this one, or -- where a batch's coupling
        blocks make the chain's sweep far dearer than the dense matrix (``a = B x width`` well above the
        stages' ``p``: a large curvature batch on a small model) -- a one-stage view holding ``H`` densely
        (:class:`_DenseMatrixBlocks`, ``H`` formed once by ``n`` products). The chain's sweep costs
        ``sum_l (p_l^3 / 3 + 2 p_l^2 a_l + p_l a_l^2)`` flops and ``a_l^2`` numbers per stage; the dense
        one ``n^3 / 3`` after ``n`` products of about ``sum_l 8 B p_l`` flops. Taken where ``n <=``
        :data:`DENSE_ROUTE_MAX_N` (where the dense matrix and its factors fit) and the sweep would not fit in
        memory, or costs over
        :data:`DENSE_ROUTE_MIN_FLOPS` and three times the dense route's (a rough rule -- the sweep's
        passes over ``a^2`` numbers are memory-bound, so it errs towards the sweep: on the demo's
        1618-parameter chain with 1024 examples the sweep took 41 s, the dense route 18 s; a 193-parameter
        MLP on 442 examples 0.83 s against 11 ms). Products keep the chain's ``O(L)`` sweeps."""
        view = self.__dict__.get("_view")
        if view is None:
            view = self._view = self._dense_view() if self._dense_cheaper() else self
        return view

    def _dense_cheaper(self) -> bool:
        n = self.shape[0]
        if n > DENSE_ROUTE_MAX_N:
            return False
        try:  # (the dense matrix and its factors: 3.6 GB at the largest n, float64)
            check_dense_memory(n, self.dtype, self.device, "the dense route", 3.0)
        except TooLargeError:
            return False
        chain_flops, dense_flops = _block_costs(self.blocks)
        if (
            _dense_route(chain_flops, dense_flops, n, self.device.type == "cpu")
            and not self._dense_dearer_timed()
        ):
            return True
        try:
            check_memory(self.blocks, self._names, self.dtype, self.device)
        except TooLargeError:
            return True
        return False

    def _dense_dearer_timed(self) -> bool:
        """Whether the dense route, which the flop model chose, is dearer than the sweep by more than
        :data:`DENSE_ROUTE_TIMED_MARGIN` with its ``n`` products timed (:meth:`_dense_columns_seconds`)
        and the sweep priced by its flops with the pivots' orders as factored, at :func:`_flop_rate`: the
        model prices a product at ``8 B max(p, d_in + d_out)`` flops a column, 5-30x under a convolution's
        or a generic stage's products (a 3-stage Conv1d chain on 8 examples, n = 3586: the dense route
        2.6 s, the sweep 0.5 s). Only where the sweep so priced takes over
        :data:`DENSE_ROUTE_TIMED_MIN_SECONDS`: a small problem keeps the model's route, however loaded the
        machine."""
        rate = _flop_rate(self.device)
        sweep = _block_costs(self.blocks, pivots=True)[0] / rate
        if not sweep > DENSE_ROUTE_TIMED_MIN_SECONDS:
            return False
        n = float(self.shape[0])
        return self._dense_columns_seconds() + n**3 / 3 / rate > DENSE_ROUTE_TIMED_MARGIN * sweep

    def _dense_columns_seconds(self) -> float:
        """The time :meth:`to_dense` would take, from one timed product of a block of at most 16 of its
        columns (cached): the cost model's ``8 B max(p, d_in + d_out)`` flops a column is 10-30x under a
        generic stage's autograd products (a probe); a block of columns amortizes a product's overhead
        in matrix stages, so the block's time per column over-prices their dense matrix a little."""
        if "_dense_seconds" not in self.__dict__:
            n = self.shape[0]
            k = min(n, 16)
            cols = _identity_columns(n, range(k), self.dtype, self.device)
            self._dense_seconds = _seconds(lambda: self._apply(cols), self.device) * n / max(k, 1)
        return self._dense_seconds

    def _check_sweep_memory(self) -> None:
        """:func:`~hessinv.riccati.check_memory` for the sweep this operator's factorizations run, before
        the products that come first (``min_eigenvalue``'s Lanczos ran 17-125 s, ``inertia``'s norm
        estimate 7 s, before the sweep refused)."""
        sw = self._swept()
        check_memory(sw.blocks, sw._names, sw.dtype, sw.device)

    def _dense_view(self) -> CurvatureOperator:
        view = copy.copy(self)
        A = self.to_dense()
        view.blocks, view._sizes = [_DenseMatrixBlocks(0.5 * (A + A.T))], [self.shape[0]]
        view._names = [f"H as one dense {self.shape[0]} x {self.shape[0]} block"]
        view._view = view
        return view

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

    @symmetric_in_rhs
    def __matmul__(self, v: Tensor) -> Tensor:
        """``H v`` for ``v`` of shape (n,) or (n, k), in ``O(L)``; differentiable in ``v`` where it requires
        grad (one more product in the backward pass, ``H`` being symmetric)."""
        V, vec = self._as_matrix(v)
        if self._order is not None:
            HV = self._order.to_public(self._plain @ self._order.to_stages(V))
            return HV[:, 0] if vec else HV
        HV = self._apply(V)
        if not all_finite(HV):  # an intermediate overflowed: again on V scaled to unit size
            HV = _linear_scaled(self._apply, V, "H v")
        return HV[:, 0] if vec else HV

    matmul = __matmul__
    #: numpy hands ``ndarray @ H`` to :meth:`__rmatmul__` (which names the tensor it takes) instead of
    #: failing inside its own matmul
    __array_ufunc__ = None

    @symmetric_in_rhs
    def __rmatmul__(self, v: Tensor) -> Tensor:
        """``v H`` for ``v`` of shape (n,) or (k, n): ``(H v^T)^T``, ``H`` being symmetric."""
        if isinstance(v, Tensor) and v.dim() == 2:
            return (self @ v.T.contiguous()).T
        return self @ v

    def to_dense(self) -> Tensor:
        """The dense ``n x n`` matrix (``n`` products, on blocks of columns that keep each product's
        ``(B, width, k)`` tensors near 2^24 numbers; the dense route's matrix where it holds one)."""
        if self._order is not None:
            return self._order.to_public(self._order.to_public(self._plain.to_dense(), 0), 1)
        n = self.shape[0]
        check_dense_memory(n, self.dtype, self.device, "to_dense()")
        view = self.__dict__.get("_view")
        if view is not None and view is not self:
            return view.blocks[0].A.clone()
        width = max((b.batch * max(b.d_in, b.d_out, 1) for b in self.blocks), default=1)
        k = max(1, min(n, 2**24 // width))
        out = torch.empty(n, n, dtype=self.dtype, device=self.device)
        for j in range(0, n, k):  # (the identity one block of columns at a time)
            cols = _identity_columns(n, range(j, min(j + k, n)), self.dtype, self.device)
            out[:, j : j + cols.shape[1]] = self._apply(cols)
        return out

    def diagonal(self) -> Tensor:
        """The exact diagonal of ``H`` (n,), in one backward sweep -- no probes.

        The sweep of the factorization (math.md §2) without the elimination: with ``P_l`` the Hessian
        of the loss in stage ``l``'s output through every later stage (``P_L = 0``,
        ``P_{l-1} = Hzz_l + Jz_l^T P_l Jz_l``), the diagonal block of ``H`` for stage ``l``'s parameters
        is ``Hxx_l + Jx_l^T P_l Jx_l``, of which a Linear stage forms only the diagonal
        (``O(B^2 m d)``, never the ``p x p`` block). Below a loss of per-example terms through stages that
        keep examples apart (Linear + activation, elementwise, and generic stages -- convolutions,
        pooling, normalizations, attention over an example's tokens -- whose pull-backs stay within their
        example: :func:`~hessinv.riccati.examples_apart`) ``P_l`` is block-diagonal over the examples and is
        carried per example, factored while that is smaller (``O(B d^2 R)`` or ``O(B d^3)`` per stage;
        a generic stage pulls each example's ``R`` columns back through autograd, BackPACK's form;
        examples a chunk at a time: any batch size, no dense route). Otherwise it costs about a
        factorization's products and memory (``a x a`` per stage, ``a`` = examples x width), and where the
        factorization takes the dense route (a large batch on a small model) it is the dense matrix's
        diagonal (``n`` products, once for every use of that route). Hutchinson's estimator
        (PyHessian, AdaHessian) needs ``O(1 / rel. error^2)`` products for the same numbers.

        >>> import torch, hessinv
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
        >>> X, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
        >>> H = hessinv.hessian(net, torch.nn.CrossEntropyLoss(), X, y)
        >>> torch.allclose(H.diagonal(), H.to_dense().diagonal())
        True
        """
        if self._order is not None:
            return self._order.to_public(self._plain.diagonal())
        view = self.__dict__.get("_view")
        parts = None
        if (
            (view is None or view is self)
            and examples_apart(self.blocks)
            and not (example_sweep_pulls(self.blocks) > self.shape[0] and self._dense_cheaper())
        ):
            # (per-example blocks, B d^2 numbers: no dense route, no a x a memory to check)
            parts = example_curvature_diagonal_sweep(self.blocks, self.gradient)
        if parts is None:
            sw = self._swept()
            check_memory(sw.blocks, sw._names, sw.dtype, sw.device, diagonal=True)
            parts = curvature_diagonal(sw.blocks, self.gradient)
        diag = torch.cat(parts)
        if not bool(torch.isfinite(diag).all()):
            raise NonFiniteError(
                f"the diagonal of the curvature is not finite in {self.dtype}: its entries or the products "
                "of the sweep overflow -- scale the loss down"
                + (
                    ""
                    if self.dtype == torch.float64
                    else ", or take the operator of a float64 copy of the model"
                )
            )
        return diag

    def trace(self) -> float:
        """``tr H = sum_i H_ii``, exact (:meth:`diagonal`); ``diagonal()`` split by the parameters' sizes
        gives each tensor's (a layer's) trace, the sensitivity that Hessian-aware quantization and
        pruning rank layers by.

        >>> import torch, hessinv
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
        >>> H = hessinv.hessian(net, torch.nn.MSELoss(), torch.randn(8, 3, dtype=torch.float64),
        ...                     torch.randn(8, 1, dtype=torch.float64))
        >>> abs(H.trace() - float(H.to_dense().trace())) < 1e-12 * abs(H.trace())
        True
        """
        return float(self.diagonal().sum())

    def as_linear_operator(self) -> scipy.sparse.linalg.LinearOperator:
        """A ``scipy.sparse.linalg.LinearOperator`` taking and returning float64 numpy arrays."""
        from scipy.sparse.linalg import LinearOperator

        def mm(X: np.ndarray) -> np.ndarray:
            X = np.asarray(X)
            if np.iscomplexobj(X):  # H is real: its product with a + ib is H a + i H b
                return mm(X.real) + 1j * mm(X.imag)
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
    def factor(
        self, damping: float = 0.0, modify: str | None = None, precision: str = "working"
    ) -> Factorization:
        """Factor ``H + damping * I`` with the backward Riccati sweep (reusable for many solves).

        Raises :class:`SingularError` if a pivot is singular at this damping. ``modify="abs"`` (needs
        ``damping > 0``) factors instead the positive definite ``M = L |D| L^T``: each Riccati pivot's
        eigenvalues below ``damping`` replaced by ``max(|lambda|, damping)`` (modified Cholesky per pivot
        block, math.md §6); ``M = H + damping I`` where every pivot is already above ``damping``.
        Solves with it are not refined (``M`` is not ``H + damping I``); its ``inertia`` and
        ``positive_definite`` are still those of ``H + damping I`` (recounted by one more sweep when first
        read, where a pivot was modified).

        ``precision="mixed"`` (float64 operators): the sweep runs in float32 -- about half the time --
        and every solve is refined in float64 to float64 accuracy (:class:`MixedFactorization`); a
        float32 model's factorization (a plain :class:`Factorization` of its float32 sweep) refines its
        solves in float64 alike.
        """
        if self._order is not None:
            return self._public_factor(self._plain.factor(damping, modify, precision))
        return _factorization(self, damping, modify, precision)

    @overload
    def solve(
        self,
        rhs: Tensor,
        damping: float = ...,
        *,
        refine: bool = ...,
        max_refine: int = ...,
        rtol: float | None = ...,
        return_info: Literal[False] = ...,
    ) -> Tensor: ...

    @overload
    def solve(
        self,
        rhs: Tensor,
        damping: float = ...,
        *,
        refine: bool = ...,
        max_refine: int = ...,
        rtol: float | None = ...,
        return_info: Literal[True],
    ) -> tuple[Tensor, SolveInfo]: ...

    @symmetric_in_rhs
    def solve(
        self,
        rhs: Tensor,
        damping: float = 0.0,
        *,
        refine: bool = True,
        max_refine: int = 5,
        rtol: float | None = None,
        return_info: bool = False,
    ) -> Tensor | tuple[Tensor, SolveInfo]:
        """``(H + damping I)^{-1} rhs``: ``self.factor(damping).solve(rhs, ...)``
        (:meth:`Factorization.solve`), except where one factorization is modelled to cost over
        :data:`KRYLOV_FIRST_RATIO` products per right-hand side (a number as damping, ``refine=True``):
        MINRES on the ``O(L)`` products (a float32 operator's float64 twin's) is tried first, restarted from
        its true residual, for at most :data:`KRYLOV_SHARE` of the factorization's modelled flops, and its
        answer kept where every column's relative residual is within the factorization's own target
        (:meth:`_krylov_solve`) -- a well-conditioned system then costs tens of products instead of a
        factorization (a 64-64-64-10 MLP's Gauss-Newton matrix on 256 examples at damping 1: 12 products,
        0.01 s, against 27 s). ``return_info``: the :class:`SolveInfo` (there ``krylov_iterations`` counts
        the products, ``refinement_steps = 0``). Gauss-Newton takes that route only at a positive damping;
        a Hessian singular to working precision whose right-hand side lies in its range (a consistent
        system: ``factor(eps).solve`` raises :class:`SingularError`) may get MINRES's answer there, the
        minimum-norm solution, at the residual reported. Where no factorization fits in memory (the
        :class:`TooLargeError` ``factor`` raises), MINRES runs whatever the cost model says, for up to
        :data:`KRYLOV_RTOL_MAX_ITERATIONS` products, and that refusal follows if it does not get there.

        ``rtol``: the relative residual ``|b - (H + eps I) x| / |b|`` asked for, where less than the
        factorization's (about 1e-12) will do: MINRES on the products then runs first whatever the cost
        model says, to ``rtol``, for up to :data:`KRYLOV_RTOL_MAX_ITERATIONS` products and a factorization's
        time (its modelled flops against one product timed; under :data:`KRYLOV_MIN_ITERATIONS` products
        it is not tried) (a 64-256-256-10 MLP's
        Gauss-Newton at damping 1e-3, batch 32, to 1e-8: 0.94 s through its Woodbury factorization,
        against 52 ms for CG on autograd products); where it does not get there, the factorization
        answers (to its own accuracy). A float32 operator's residual is its float64 iterate's, as
        ``SolveInfo.residual`` always reports it; the float32 ``x`` returned is within
        ``SolveInfo.returned_residual`` (about ``u32 cond``). :class:`InvalidArgumentError` for an ``rtol``
        outside ``(0, 1)``.

        >>> import torch, hessinv
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
        >>> X, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,))
        >>> G = hessinv.gauss_newton(net, torch.nn.CrossEntropyLoss(), X, y)
        >>> x, info = G.solve(G.gradient, damping=1e-2, rtol=1e-8, return_info=True)
        >>> info.residual <= 1e-8, info.refinement_steps
        (True, 0)
        """
        if rtol is not None:
            rtol = _check_tol(rtol, "rtol", relative=True)
        if self._order is not None:
            R, vec = self._as_matrix(rhs, "rhs")
            X, info = self._plain.solve(
                self._order.to_stages(R),
                self._stage_damping(damping),
                refine=refine,
                max_refine=max_refine,
                rtol=rtol,
                return_info=True,
            )
            X = self._order.to_public(X)
            X = X[:, 0] if vec else X
            return (X, info) if return_info else X
        started = time.perf_counter()
        # a sweep that cannot fit leaves MINRES as the only route: it gets the products an rtol gets (a size
        # probe: 3 x 3000 products, about 50 min on a wide model, then the refusal below)
        too_large = self._sweep_too_large() if refine is True else None
        if refine is True and return_info in (True, False):
            got = self._krylov_solve(rhs, damping, rtol, capped=too_large is not None)
            if got is not None:
                return got if return_info else got[0]
        spent = time.perf_counter() - started
        try:  # (where the sweep does not fit, a Gauss-Newton factorization may still: through its root)
            F = self.factor(damping)
        except TooLargeError as e:
            if spent < 1.0 and too_large is None:
                raise
            # (a size probe: 95 s of MINRES, then this refusal, which said nothing of them)
            raise TooLargeError(
                f"{e} -- MINRES on the operator's products ran first ({spent:.2g} s) and did not reach the "
                "accuracy asked: a looser rtol=... or a larger damping may let it"
            ) from None
        return F.solve(rhs, refine=refine, max_refine=max_refine, return_info=return_info)

    def _factor_flops(self) -> float:
        """The modelled flops of one factorization (:func:`_block_costs`: the sweep's, with its pivots'
        orders as factored -- a lookup table's rows that the batch reads, not its ``p`` -- or the dense
        route's)."""
        chain, dense = _block_costs(self.blocks, pivots=True)
        return min(chain, dense)

    def _sweep_too_large(self) -> TooLargeError | None:
        """The refusal a factorization of this operator would end in for its size (the sweep's memory, where
        the dense route is not taken instead), found without a product; None where it fits."""
        try:
            check_memory(self.blocks, self._names, self.dtype, self.device)
        except TooLargeError as e:
            return None if self._dense_cheaper() else e
        return None

    def _krylov_solve(
        self, rhs: Tensor, damping: float, rtol: float | None = None, capped: bool = False
    ) -> tuple[Tensor, SolveInfo] | None:
        """``(x, info)`` from MINRES where that is cheaper than a factorization and reaches its accuracy,
        else None (the caller factors); in float64 (a float32 operator's float64 twin: ``x`` is the
        float64 iterate rounded, as the factorization's refined solves return it). Each column is kept
        where its true relative residual (a float64 product) is at most ``min(1e-12, max(1e-14, 32 u ||H +
        eps I|| |x| / |b|))`` -- the factorization's refinement accepts the same stall at the rounding of
        the residual itself -- ``||H + eps I||`` bounded from below by the Lanczos coefficients; with
        ``rtol``, at most ``max(rtol, that)``, tried whatever the cost ratio, for up to
        :data:`KRYLOV_RTOL_MAX_ITERATIONS` products and a factorization's time (:data:`KRYLOV_RTOL_SHARE`,
        timed as the default's share). ``capped``: no
        factorization fits (:meth:`_sweep_too_large`): tried whatever the cost ratio, for up to
        :data:`KRYLOV_RTOL_MAX_ITERATIONS` products."""
        if isinstance(damping, Tensor):
            return None
        try:
            eps = _check_shift(damping, self.dtype, "damping")
            R, vec = self._as_matrix(rhs, "rhs")
        except HessinvError:
            return None  # (the factorization names it)
        R = R.double()
        if isinstance(self, GaussNewton) and not eps > 0:
            return None  # (G + eps I singular or indefinite: the factorization says which)
        n, k = R.shape
        _, dense = _block_costs(self.blocks)
        product = max((dense - float(n) ** 3 / 3) / max(n, 1), 1.0)
        ratio = self._factor_flops() / product
        if not bool(torch.isfinite(R).all()) or (
            rtol is None and not capped and not ratio >= KRYLOV_FIRST_RATIO * k
        ):
            return None
        if capped:
            budget = KRYLOV_RTOL_MAX_ITERATIONS
        elif rtol is None:
            budget = int(min(KRYLOV_SHARE * ratio / k, KRYLOV_MAX_ITERATIONS))
        else:
            budget = int(min(ratio / k, KRYLOV_RTOL_MAX_ITERATIONS))
        if budget < 1:
            return None
        try:  # (a float32 operator: MINRES on its float64 twin's products, as refinement's residuals)
            op64 = self._residual_operator()
        except HessinvError:
            return None

        def apply(V: Tensor) -> Tensor:
            return op64._apply(V) + eps * V

        if not capped:
            # the flop model prices a product far below its time where each stage's products are small
            # (a 16-stage tanh chain of width 16: a factorization took the time of ~20 products, the model
            # said 1780, and MINRES spent 77-178 products, 7-10x the factorization, before it ran; a probe):
            # the products this solve's share buys, from one product timed against the factorization's
            # flops at the sweep's rate (KRYLOV_FACTOR_RATE) -- with rtol, a factorization's time (an
            # indefinite system MINRES could not bring to rtol=1e-3 took 3.5x the default solve's time)
            per_product = max(_seconds(lambda: apply(R[:, :1]), self.device), 1e-9)
            share = KRYLOV_SHARE if rtol is None else KRYLOV_RTOL_SHARE
            factor_products = self._factor_seconds() / per_product / k
            budget = min(budget, int(share * factor_products))
            if budget < KRYLOV_MIN_ITERATIONS:
                return None

        # each column scaled to unit largest entry (exact: a power of 2), so that no norm underflows (a
        # right-hand side of entries 1e-200: |b|^2 = 0) or overflows; zero columns solve to zero
        top = R.abs().amax(0)
        if not bool((top > 0).any()):
            return None
        scale = torch.where(top > 0, torch.exp2(torch.floor(torch.log2(top.clamp_min(1e-300)))), 1.0)
        Rs = R / scale
        X, spent = torch.zeros_like(Rs), 0
        bnorm = Rs.norm(dim=0)
        Res, anorm = Rs, 0.0
        u = torch.finfo(torch.float64).eps
        for _ in range(KRYLOV_RESTARTS):
            D, its, est, converged = minres(apply, Res, 1e-15 if rtol is None else rtol / 4, budget - spent)
            spent += its + 1  # (and the true residual's product)
            anorm = max(anorm, est)
            X = X + D
            Res = Rs - apply(X)
            if not bool(torch.isfinite(Res).all()):
                return None
            rel = Res.norm(dim=0) / bnorm.clamp_min(1e-300)
            accept = (32 * u * anorm * X.norm(dim=0) / bnorm.clamp_min(1e-300)).clamp(1e-14, 1e-12)
            if rtol is not None:
                accept = accept.clamp_min(rtol)
            if bool((rel <= accept).all()):
                X = X * scale
                out = X.to(self.dtype)
                if not bool(torch.isfinite(out).all()):
                    return None  # (beyond the dtype's range: the factorization's named error)
                info = SolveInfo(float(rel.max()), 0, spent)
                info = _returned_info(out, R, info, apply, "solve by MINRES")
                return (out[:, 0] if vec else out), info
            if not capped and spent >= budget and rtol is None:
                # out of products but converging: on while the contraction so far reaches the target within
                # KRYLOV_CONTINUE_SHARE of a factorization's time (MINRES at 37 products against a
                # 42 s factorization of a Conv1d chain, given 15; a probe)
                worst = float((rel / accept).max())
                rate_per = float(rel.max()) ** (1.0 / max(spent, 1))
                if 0 < rate_per < 1 and worst > 1:
                    more = math.ceil(1.2 * math.log(worst) / -math.log(rate_per)) + 2
                    if spent + more <= KRYLOV_CONTINUE_SHARE * factor_products:
                        budget = spent + more
                        continue
            if spent >= budget or not converged:  # (given up, or out of products: the factorization)
                return None
        return None

    def _factor_seconds(self) -> float:
        """The modelled time of one factorization by the route it takes (:meth:`_dense_cheaper`), at
        :func:`_flop_rate`; the dense route's ``n`` products timed (:meth:`_dense_columns_seconds`)."""
        rate, flops = _flop_rate(self.device), self._factor_flops()
        chain, dense = _block_costs(self.blocks, pivots=True)
        if flops < min(chain, dense):  # (another form: a Gauss-Newton matrix's Woodbury factorization)
            return flops / rate
        if self._dense_cheaper():
            return self._dense_route_seconds()
        return chain / rate  # (the sweep, where its route is not the dense one however the models compare)

    def _dense_route_seconds(self) -> float:
        """The dense route's modelled time, at :func:`_flop_rate`: its ``n`` products as timed
        (:meth:`_dense_columns_seconds`) or as modelled if dearer, and its ``n^3 / 3`` factorization."""
        rate, n = _flop_rate(self.device), float(self.shape[0])
        dense = _block_costs(self.blocks, pivots=True)[1]
        return max(dense / rate, self._dense_columns_seconds() + n**3 / 3 / rate)

    def factor_if_positive_definite(self, damping: float = 0.0) -> Factorization | None:
        """The factorization of ``H + damping I`` if it is positive definite, else None.

        ``H + eps I`` is positive definite iff every Riccati pivot ``Qxx_l`` is (Sylvester's law for the
        sweep's block congruence), so the test *is* the factorization: each pivot tries Cholesky and
        the sweep stops at the first that has none. A failed test costs a fraction of a factorization
        (and proves ``eps <= -lambda_min(H)``); a passed one returns the factorization, ready to solve.
        This is the call a trust-region or Levenberg-Marquardt loop makes at each trial damping.

        >>> import torch, hessinv
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
        >>> X, y = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1] * 3)
        >>> H = hessinv.hessian(net, torch.nn.CrossEntropyLoss(), X, y)
        >>> H.factor_if_positive_definite(-10.0) is None     # H - 10 I is not positive definite
        True
        >>> F = H.factor_if_positive_definite(10.0)
        >>> F.positive_definite, F.inertia.negative
        (True, 0)
        """
        if self._order is not None:
            return self._public_factor(self._plain.factor_if_positive_definite(damping))
        damping = _check_shift(damping, self.dtype, "damping")
        try:
            sw = self._swept()
            factors, inertia, pd = riccati_factor(
                sw.blocks, damping, sw._names, self.gradient, stop_if_indefinite=True
            )
        except SingularError:
            return None
        return Factorization(self, damping, _factors=(factors, inertia, True)) if pd else None

    def _positive_definite_at(self, damping: float | Tensor) -> bool:
        """Whether ``H + D`` is positive definite by construction, with no sweep (:class:`GaussNewton` of a
        convex loss: every ``D_j > 0``); False here."""
        return False

    def is_positive_definite(self, shift: float = 0.0) -> bool:
        """Whether ``H + shift I`` is positive definite: every Riccati pivot has a Cholesky factor."""
        return self.factor_if_positive_definite(_check_shift(shift, self.dtype)) is not None

    def norm_estimate(self, iters: int = 30) -> float:
        """An estimate of ``||H||_2`` by power iteration (a lower bound, usually within a few percent: 3.4%
        low on a model with a zero-initialized last layer); cached, and
        recomputed only for more ``iters`` than the cached one had. The norms are taken scaled by the
        vector's largest entry: a Hessian of scale 1e-200 has squared entries below float64's range
        (its estimate was 0, and ``min_eigenvalue`` then returned 0)."""
        if self._order is not None:
            return self._plain.norm_estimate(iters)
        if isinstance(iters, bool) or not isinstance(iters, numbers.Integral) or iters < 1:
            raise InvalidArgumentError(f"iters must be an integer >= 1, got {iters!r}")
        if self._norm is None or self._norm_iters < iters:
            self._norm, self._norm_iters = self._power_norm(int(iters)), int(iters)
        return self._norm

    def _rough_norm(self) -> float:
        """``||H||_2`` to its first digits, for a threshold that needs its scale only: :meth:`norm_estimate`'s
        cached value where there is one, else power iteration stopped once two steps in a row raised the
        estimate by less than :data:`NORM_RTOL` of it (on the robustness grid's chains after 5-16 products
        instead of 30, equal to 4 digits: a refined solve's first stall test spent 310 of its 430 ms in
        the 30 on a 64-stage chain). Not cached as the norm estimate: a start nearly orthogonal to the top
        eigenvector, above a flat bulk, can stop it at the bulk's eigenvalue (a constructed ``0.5 I + 0.5
        u u^T``: 0.5 against 1), which the full iteration grows out of."""
        if self._norm is not None:
            return self._norm
        if self._rough is None:
            self._rough = self._power_norm(30, NORM_RTOL)
        return self._rough

    def _power_norm(self, iters: int, rtol: float = 0.0) -> float:
        """``iters`` power-iteration steps from a fixed random start; with ``rtol``, fewer once two steps in a
        row raised the estimate by at most ``rtol`` of it (the estimates ``|H^{k+1} v| / |H^k v|`` of a
        symmetric ``H`` never decrease, by Cauchy-Schwarz)."""
        g = torch.Generator(device="cpu").manual_seed(0)
        v = torch.randn(self.shape[0], 1, generator=g, dtype=torch.float64).to(self.dtype).to(self.device)
        est, rises = 0.0, [math.inf, math.inf]
        for _ in range(iters):
            # norms in float64: a float32 w of entries ~1e20 (a finite product) has a sum of
            # squares beyond float32's range, and the estimate collapsed to 0
            v64 = v.double()
            v = (v64 / _scaled_norm(v64)).to(self.dtype)
            w = self._apply(v)
            est, before = _scaled_norm(w.double()), est
            if est == 0.0 or not math.isfinite(est):
                break
            rises = [rises[1], abs(est - before)]
            if rtol > 0 and max(rises) <= rtol * est:  # (rtol = 0: every step, as norm_estimate asks)
                break
            v = w
        if not math.isfinite(est):
            self._overflow()
        return est

    def zero_tolerance(self, iters: int = 30) -> float:
        """``sqrt(u) ||H||`` (``u`` the unit roundoff of the operator's dtype, ``||H||`` by
        :meth:`norm_estimate` with ``iters`` power iterations): the resolution of the sweep's eigenvalue
        counts next to a cluster of eigenvalues, and :meth:`inertia`'s default ``tol``; eigenvalues
        within it of a shift are equal to it up to rounding (e.g. the null space of a Gauss-Newton
        matrix at 0)."""
        return math.sqrt(torch.finfo(self.dtype).eps) * max(
            self.norm_estimate(iters), torch.finfo(self.dtype).tiny
        )

    def inertia(self, shift: float = 0.0, tol: float | None = None) -> Inertia:
        """Counts of eigenvalues of ``H + shift I`` below ``-tol``, within ``[-tol, tol]``, above ``tol``.

        ``tol`` defaults to ``sqrt(u) * ||H||`` (``u`` the unit roundoff; ``||H||`` to its first digits by
        power iteration, or :meth:`norm_estimate`'s where it was taken), so that eigenvalues that are
        zero up to rounding count as zero. Two Riccati factorizations, at ``shift - tol`` and
        ``shift + tol``; ``tol=0`` uses one factorization at ``shift``. The counts are exact
        (Sylvester's law; no pivot is perturbed here) for a matrix within the sweep's backward error of
        ``H``: about ``u ||H||`` away from clusters of eigenvalues, but up to about ``sqrt(u) ||H||``
        next to one -- the sweep does not pivot across stages, and a shift that close to a cluster
        (e.g. the null space of an over-parameterized net at ``shift = 0``) makes pivots nearly
        singular. Where a pivot is conditioned below ``sqrt(u)`` (singular to working precision while
        ``H + shift I`` is not) the count comes from a dense ``LDL^T`` instead (``n <=``
        :data:`DENSE_RECOUNT_N`; above, an :class:`AccuracyWarning`). A ``0 < tol < sqrt(u) ||H|| / 2``
        (below half of :meth:`zero_tolerance`) therefore gets an :class:`AccuracyWarning` (eigenvalues
        within that distance of ``shift +- tol`` may be counted on the wrong side). Where
        ``shift +- tol`` is an eigenvalue to working precision (a pivot exactly singular), that count
        is taken ``n u max(||H||, |shift|)`` further out, or that resolution where the sweep is still
        singular there: the eigenvalues passed count as zero (with ``tol=0``, an :class:`AccuracyWarning`
        says so; a float64 ``tol=0`` count at a singular sweep with ``n <=`` :data:`DENSE_RECOUNT_N` is
        taken from the dense eigenvalues at ``n u max(||H||, |shift|)``).
        A Gauss-Newton matrix whose root has fewer rows than parameters counts in its whole spectrum
        instead (:meth:`GaussNewton._root_spectrum`: no sweep; ``tol = 0`` becomes ``eigh``'s resolution).
        Raises :class:`InvalidArgumentError` for a NaN or infinite ``shift`` or a ``tol`` that is
        negative or not finite.
        """
        if self._order is not None:
            return self._plain.inertia(shift, tol)
        shift = _check_shift(shift, self.dtype)
        self._check_sweep_memory()  # (before the norm estimate's products)
        # (||H|| to its first digits: the 30 products of the full estimate cost 11 factorizations of a
        # depth-1000 chain, a probe; zero_tolerance's own value where it has been taken)
        fi = torch.finfo(self.dtype)
        floor = math.sqrt(fi.eps) * max(self._rough_norm(), fi.tiny)
        if tol is None:
            tol = floor
        tol = _check_tol(tol, allow_zero=True)
        if 0 < tol < 0.5 * floor:
            warn(
                f"inertia(tol={tol:g}): next to a cluster of eigenvalues the sweep's counts are exact only "
                f"up to about sqrt(u) ||H|| = {floor:.2g}: eigenvalues within that distance of shift +- tol "
                "may be counted on the wrong side (use the default tol)",
                AccuracyWarning,
            )

        self._count_doubt = False
        asked = tol
        out, tol = self._inertia_at(shift, tol)
        if asked == 0 and tol > 0 and out.zero:  # (documented; said: these counts are not those asked for)
            warn(
                f"inertia({shift:g}, tol=0): H + shift I is singular to working precision, so the counts "
                f"were taken at tol={tol:.3g} (n u ||H|| on the dense eigenvalues where n <= "
                f"{DENSE_RECOUNT_N} in float64, else the counts' resolution sqrt(u) ||H||): the {out.zero} "
                "eigenvalue(s) within it of -shift count as zero",
                AccuracyWarning,
            )
        self._warn_count_doubt(f"inertia({shift:g}, tol={tol:g})")
        return out

    def _inertia_at(self, shift: float, tol: float) -> tuple[Inertia, float]:
        """:meth:`inertia`'s counts (``shift`` and ``tol`` checked) and the ``tol`` they were taken with:
        ``tol = 0`` where the sweep at ``shift`` is singular (or overflows) becomes the counts'
        resolution, and eigenvalues within it of ``-shift`` count as zero. Sets ``_count_doubt``."""
        if tol == 0:
            try:
                return self._counts(shift), 0.0
            except (SingularError, NonFiniteError):
                # -shift an eigenvalue to working precision: in float64, where the dense recount is
                # affordable, those that rounding cannot tell from it (within n u max(||H||, |shift|)) count
                # as zero, from the dense eigenvalues -- the sweeps next to it can stay singular (a 100-stage
                # chain's pivot blocks were, and 1814 of 2006 eigenvalues counted as zero at the resolution
                # where 14 lie within n u ||H||, a probe); else those within the resolution sqrt(u) ||H||
                if (
                    self.shape[0] <= DENSE_RECOUNT_N and self.dtype == torch.float64
                ):  # (float32: its resolution)
                    if self.__dict__.get("_dense_eigs") is None:
                        self._dense_eigs = torch.linalg.eigvalsh(self._dense64())
                    return _eigenvalue_inertia(self._dense_eigs, shift, 0.0)
                tol = self.zero_tolerance()
        # H + (shift +- tol) I beyond the sweep's range and definite (|lambda| <= ||H||, twice its
        # estimate): no negative (positive) eigenvalue, without a sweep (a float32 operator's tol = 1e60
        # overflowed a pivot -- a NonFiniteError naming the model -- where every eigenvalue counts as zero)
        n, limit, hi, lo = self.shape[0], _shift_limit(self.dtype), shift + tol, shift - tol
        neg = 0 if hi > limit and hi > 2 * self.norm_estimate() else self._counts(hi, 1.0).negative
        pos = 0 if lo < -limit and lo < -2 * self.norm_estimate() else self._counts(lo, -1.0).positive
        return Inertia(neg, n - neg - pos, pos), tol

    def _warn_count_doubt(self, what: str) -> None:
        """The :class:`AccuracyWarning` for counts whose sweep had a pivot conditioned below ``sqrt(u)``
        on a system too large to recount densely (:meth:`_count` sets ``_count_doubt``)."""
        if self._count_doubt:
            self._count_doubt = False
            warn(
                f"{what}: a pivot of the Riccati sweep is conditioned below sqrt(u), so eigenvalues within "
                f"about u ||H|| / (its conditioning) of the shift may be counted on the wrong side (n = "
                f"{self.shape[0]} is above the dense recount's {DENSE_RECOUNT_N}); move the shift",
                AccuracyWarning,
            )

    def _count_below(self, x: float) -> int:
        """``#{lambda_i < x}``: the negative pivot eigenvalues of the sweep of ``H - x I`` (one Riccati
        sweep, exact count). A shift on an eigenvalue to working precision (a pivot exactly singular, e.g.
        ``x = 0`` for a Gauss-Newton matrix with a null space) is moved down by ``n u max(||H||, |x|)``, or
        by the counts' resolution where that is not enough (:meth:`_counts`):
        the eigenvalues that equal ``x`` up to rounding count as ``>= x``. A named error for an ``x`` beyond
        the dtype's shift limit (:func:`_check_shift`), as :meth:`inertia` gives. Where
        :meth:`_dense_counts` kept the dense eigenvalues, counted from them (eigenvalues within ``n u
        max(||H||, |x|)`` below ``x`` count as ``>= x``, as the sweep's singular pivots do; ``u`` of
        float64, the eigenvalues' precision, also for a float32 operator)."""
        x = _check_shift(x, self.dtype)
        w = self.__dict__.get("_dense_eigs")
        if w is not None:  # (float64 eigenvalues of this operator's matrix: float64's rounding)
            small = self.shape[0] * torch.finfo(torch.float64).eps * max(float(w.abs().max()), abs(x))
            return int((w < x - small).sum())
        return self._counts(-x, 1.0).negative

    def _dense_eigenvalues_cheaper(self, evaluations: int) -> bool:
        """Whether one dense ``eigvalsh`` of ``H`` (its ``n`` products and about ``2 n^3`` flops: the values
        alone, a tridiagonal reduction's ``4/3 n^3`` at a lower rate than a product's; ``9 n^3`` is ``eigh``'s
        with vectors, which overcharged it: a 40-bin histogram at n = 2116 took 40 sweeps, 2.1 s, against
        0.85 s; a probe) costs less than ``evaluations`` factorizations (:func:`_block_costs`; ``n <=``
        :data:`DENSE_ROUTE_MAX_N`)."""
        n = self.shape[0]
        if n > DENSE_ROUTE_MAX_N:
            return False
        chain, dense = _block_costs(self.blocks)
        # the dense route's products and LDL^T (n^3 / 3), with eigvalsh (about 2 n^3) in place of the latter
        return dense + (2.0 - 1 / 3) * n**3 <= evaluations * min(chain, dense)

    def _dense_counts(self, counts: int) -> None:
        """Keep ``H``'s eigenvalues (one dense ``eigvalsh`` of this operator's own matrix, in float64) for
        :meth:`_count_below` where that is cheaper than ``counts`` factorizations: a histogram of 40 bins
        on a 682-parameter MLP took 41 factorizations, 4.4 s, against 0.1 s."""
        if not DENSE_COUNTS:
            return
        if self.__dict__.get("_dense_eigs") is None and self._dense_eigenvalues_cheaper(counts):
            self._dense_eigs = torch.linalg.eigvalsh(self._dense64())

    def _counts(self, s: float, nudge: float = 0.0) -> Inertia:
        """The inertia of ``H + s I`` by one Riccati sweep. Where a pivot is exactly singular there (``-s``
        an eigenvalue to working precision) and ``nudge`` is +-1, ``s`` is moved by ``nudge n u
        max(||H||, |s|)`` (what rounding cannot tell from ``s``), or by the counts' resolution
        (:meth:`zero_tolerance`) where the sweep is still singular: the eigenvalues passed count on the
        side ``nudge`` moves them to. :class:`SingularError` with ``nudge=0`` or where both fail. A sweep
        that overflows (finite blocks: a pivot eigenvalue like ``1e-300`` next to a null space, whose
        inverse the Schur complements carry) is singular to working precision there too; only where
        it still overflows at the resolution is its :class:`NonFiniteError` raised."""
        try:
            return self._count(s)
        except (SingularError, NonFiniteError):
            if not nudge:
                raise
        n = self.shape[0]
        if self.norm_estimate() == 0.0:  # H v = 0 for a random v: H = 0, and H + s I = s I exactly
            side = s if s != 0 else nudge  # (s = 0: the n zero eigenvalues count on nudge's side)
            return Inertia(n, 0, 0) if side < 0 else Inertia(0, 0, n)
        small = self.shape[0] * torch.finfo(self.dtype).eps * max(self.norm_estimate(), abs(s), 1e-300)
        try:
            return self._count(s + nudge * small)
        except (SingularError, NonFiniteError):
            floor = self.zero_tolerance()
            if small >= floor:
                raise
        return self._count(s + nudge * floor)

    def _count(self, s: float) -> Inertia:
        """The inertia of ``H + s I``: the Riccati sweep's (Sylvester's law on its pivots) where every
        pivot is conditioned beyond ``sqrt(u)``. Otherwise the sweep -- which does not pivot across
        stages -- counts a matrix whose distance from ``H + s I`` grows like ``u / conditioning`` (a
        first-layer pivot singular at ``s = 0`` while ``H`` is not: 5 of 155 eigenvalues 2.6e-5 and more
        from 0 were counted on the wrong side), and systems of ``n <=`` :data:`DENSE_RECOUNT_N` are
        counted by a Bunch-Kaufman ``LDL^T`` of the dense float64 ``H + s I`` (``H`` formed once by
        ``n`` products and kept; backward stable); larger ones keep the sweep's count with an
        :class:`AccuracyWarning`. :class:`SingularError` where a pivot is exactly singular (or the sweep
        overflows) and ``n`` is above that size or the operator float32; else the dense count decides (a
        pivot block can be singular where ``H + s I`` is not: a 100-stage tanh chain's at ``s = 1e-12``,
        cond 6e12, was counted at the resolution instead -- 1814 of 2006 eigenvalues as zero, a probe)."""
        sw = self._swept()
        n = self.shape[0]
        try:
            factors, inertia, _ = riccati_factor(sw.blocks, s, sw._names, self.gradient, strict=False)
        except (SingularError, NonFiniteError):
            if n > DENSE_RECOUNT_N or self.dtype != torch.float64:  # (float32: singular at its precision)
                raise
        else:
            floor = math.sqrt(torch.finfo(self.dtype).eps)
            if all(f.pivot.conditioning() >= floor for f in factors if f is not None):
                return inertia
            if n > DENSE_RECOUNT_N:
                self._count_doubt = True  # the public caller warns (or withholds a certificate)
                return inertia
        A = self._dense64().clone()
        A.diagonal().add_(s)
        # strict: an eigenvalue of D below n u max|H + s I| is a singular H + s I to working precision
        # (SingularError, as from the sweep at an exact eigenvalue: the callers move the shift)
        return Pivot(A, 0, f"H + ({s:g}) I", s, strict=True).inertia

    def _dense64(self) -> Tensor:
        """This operator's matrix, dense, in float64 on the CPU, symmetrized (``n`` products); kept for
        ``n <=`` :data:`DENSE_FALLBACK_N` (the counts' and the eigensolver's dense fallbacks share it)."""
        if self._dense_h is not None:
            return self._dense_h
        A = self.to_dense().double().cpu()
        A = 0.5 * (A + A.T)
        if self.shape[0] <= DENSE_FALLBACK_N:
            self._dense_h = A
        return A

    def _check_sweepable(self, scale: float, what: str) -> None:
        """A :class:`NonFiniteError` where ``||H|| ~ scale`` is beyond the shifts a sweep takes (the shifts
        below / above the spectrum would not be representable: :func:`_shift_limit`)."""
        limit = _shift_limit(self.dtype)
        if 2 * scale > limit:
            raise NonFiniteError(
                f"{what}: ||H|| ~ {scale:.2g} is too large for {self.dtype} sweeps (their shifts must stay "
                f"below {limit:.2g}); "
                + (
                    "rescale the loss or the inputs"
                    if self.dtype == torch.float64
                    else "use a float64 model or rescale the loss"
                )
            )

    def _overflow(self) -> None:
        """Raise the :class:`NonFiniteError` of products with ``H`` that overflow its dtype."""
        hint = "use a float64 model or rescale" if self.dtype != torch.float64 else "rescale"
        raise NonFiniteError(
            f"products with H overflow {self.dtype} (||H|| beyond its range): {hint} the loss or the inputs"
        )

    def _lanczos(
        self,
        steps: int,
        done: Callable[[np.ndarray, np.ndarray], bool] | None = None,
        block: int = 1,
    ) -> tuple[np.ndarray, np.ndarray, Tensor, np.ndarray, float]:
        """Block Lanczos with full reorthogonalization on ``H`` (working-precision products, float64
        recurrences) from a fixed random start of ``block`` orthonormal vectors, until the basis holds
        ``steps`` vectors (whole blocks: at most ``max(block, min(steps, n))``); after each block
        ``done(theta, res)`` may stop it early. With ``Q_j`` the
        blocks, ``H Q_j = Q_{j-1} R_{j-1}^T + Q_j A_j + Q_{j+1} R_j`` (``A_j = Q_j^T H Q_j``; ``Q_{j+1} R_j``
        what is left after orthogonalizing against the whole basis, twice -- Kahan-Parlett),
        so ``T = Q^T H Q`` is block tridiagonal and its eigenpairs ``(theta_i, s_i)`` give Ritz pairs
        ``(theta_i, Q s_i)`` with residual ``|H Q s_i - theta_i Q s_i| = |W_last s_i[last block]|``.
        A product with a few columns costs about as much as with one where the stages are small (four
        columns: 1.2x one at width 16), so a block of them reaches an accuracy in fewer of them.
        Singular directions of ``W`` below ``1e-12 |W|`` (a block that is partly an invariant subspace)
        continue with fresh random vectors orthogonal to the basis, and the coupling is taken as
        ``Q_{j+1}^T W`` so that ``T = Q^T H Q`` holds to rounding: every Ritz value is a Rayleigh
        quotient, never below ``lambda_min``. Returns the Ritz values ``theta`` (ascending), the
        eigenvectors ``S`` of ``T``, the basis ``Q`` (n, m) (Ritz vectors are ``Q @ S``), the residuals
        ``res`` of the Ritz pairs and ``|W_last|_2`` (0 where the basis spans an invariant subspace)."""
        n = self.shape[0]
        bs = max(1, min(int(block), n))
        m = max(bs, min(steps, n))
        g = torch.Generator(device="cpu").manual_seed(1)
        Q = torch.empty(m, n, dtype=torch.float64)  # rows: contiguous slices for the products
        Q[:bs] = torch.linalg.qr(torch.randn(n, bs, generator=g, dtype=torch.float64))[0].T
        T = np.zeros((m, m))
        j = 0  # the current block: rows j:j+bs of Q
        while True:
            k = j + bs
            # W: the product's columns as rows (bs, n), so that every product below reads contiguous rows
            W = self._apply(Q[j:k].T.contiguous().to(self.dtype).to(self.device))
            W = W.double().cpu().T.contiguous()
            A = W @ Q[j:k].T
            Qk = Q[:k]
            w0 = float(W.norm())  # (the product's size: its rounding along the basis is u times it)
            W -= (W @ Qk.T) @ Qk
            W -= (W @ Qk.T) @ Qk  # twice is enough (Kahan-Parlett)
            # W's singular values and right singular vectors from a thin QR (a product with a (bs, bs)
            # SVD: 4x faster than LAPACK's SVD of the wide W)
            Qw, Rw = torch.linalg.qr(W.T)
            U, sv, _ = torch.linalg.svd(Rw)
            b = float(sv[0])
            if not (math.isfinite(b) and bool(torch.isfinite(A).all())):  # (QR's norms do not overflow)
                self._overflow()
            T[j:k, j:k] = (0.5 * (A + A.T)).numpy()
            theta, S = np.linalg.eigh(T[:k, :k])
            if b <= 1e-14 * float(np.abs(theta).max()):  # an invariant subspace: the Ritz pairs are exact
                return theta, S, Qk.T, np.zeros(k), 0.0
            # residuals |W^T s_i[last block]| = |Rw s_i[last block]| (Qw orthonormal; scaled: ||H|| ~ 1e160)
            res = b * np.linalg.norm((Rw / b).numpy() @ S[j:k], axis=0)
            if k + bs > m or (done is not None and done(theta, res)):  # (a full block, or none)
                return theta, S, Qk.T, res, b
            # W's rounding-level part along the basis (u times the product's size |H Q_j|, before the
            # projection) comes out amplified by |H Q_j| / sigma_i in its singular vectors: where that
            # could show (sigma_i < 1e-4 |H Q_j|: a converging block, whose W is far below the product),
            # the block is orthogonalized against the basis again, and directions below 1e-12 |W| (a
            # block that is partly an invariant subspace) are replaced by fresh random vectors
            C = (Qw @ U).T
            if float(sv[-1]) < 1e-4 * max(b, w0):
                C = C[sv > 1e-12 * b]
                C = torch.cat([C, torch.randn(bs - C.shape[0], n, generator=g, dtype=torch.float64)])
                for _ in range(2):
                    C -= (C @ Qk.T) @ Qk
                C = torch.linalg.qr(C.T)[0].T
            Q[k : k + bs] = C
            R = (C @ W.T).numpy()  # the coupling Q_{j+1}^T H Q_j (what is left of W beyond C: < 1e-12 b)
            T[k : k + bs, j:k] = R
            T[j:k, k : k + bs] = R.T
            j = k

    def _lanczos_extremes(self, steps: int = 20) -> tuple[float, float, float]:
        """``(theta_min, theta_max, beta)``: extreme Ritz values of ``steps`` Lanczos steps on ``H``
        (products only; ``theta_min >= lambda_min``, ``theta_max <= lambda_max``) and the last
        off-diagonal, a scale for how far the Ritz values may still be from the extremes."""
        theta, _, _, _, b = self._lanczos(steps)
        return float(theta[0]), float(theta[-1]), b

    def _shift_invert(
        self,
        F: Factorization,
        sigma: float,
        k: int,
        tol: float,
        dense: bool = False,
        target: float | None = None,
        scale: float | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, int]:
        """The ``k`` eigenpairs of ``H`` nearest ``sigma`` by Lanczos on ``(H - sigma I)^{-1}`` (ARPACK,
        ``scipy.sparse.linalg.eigsh`` with ``OPinv`` = sweeps with ``F``), then Rayleigh quotients and
        residuals in float64. Returns values (ascending), vectors, residual norms, and the solve count.

        ARPACK gets the problem scaled by ``c = scale`` (default :meth:`norm_estimate`): ``H / c``,
        ``sigma / c`` and ``OPinv = c (H - sigma I)^{-1}``, whose Ritz values ``c / (lambda - sigma)`` are
        of order 1 whatever ``||H||``; its convergence test ``|r| <= tol max(eps^(2/3), |theta|)`` is
        absolute for Ritz values below ``eps^(2/3)``, which unscaled at ``||H|| ~ 1e20`` left residuals
        of 7e-2 ``||H||``. The eigenvectors are the same, and the values are Rayleigh quotients of ``H``."""
        from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, LinearOperator, eigsh

        n = self.shape[0]
        nsolves = 0
        c = max(self.norm_estimate() if scale is None else scale, _TINY64)

        def opinv(x: np.ndarray) -> np.ndarray:
            nonlocal nsolves
            nsolves += 1
            X = torch.as_tensor(np.asarray(x, dtype=np.float64).reshape(n, -1))
            Y = F._raw(X.to(self.dtype).to(self.device)).double().cpu().numpy()
            return c * Y.reshape(x.shape)

        OP = LinearOperator((n, n), matvec=opinv, dtype=np.float64)
        ncv = min(n, max(2 * k + 1, k + 8))
        v0 = np.random.default_rng(0).standard_normal(n)
        atol = max(tol, 10 * torch.finfo(self.dtype).eps)
        try:
            # small operators, and many eigenpairs of a moderate one, go dense: ARPACK needs k < n - 1,
            # and with k a fair fraction of n its restarts cost more than eigh (k=54 of n=246: 88 s)
            if k >= n - 1 or n <= _DENSE_EIG or ((dense or _DENSE_FRACTION * k > n) and n <= _DENSE_EIG_MAX):
                raise ArpackError(-9999)
            vecs = eigsh(
                self.as_linear_operator() / c,
                k=k,
                sigma=sigma / c,
                which="LM",
                OPinv=OP,
                tol=atol,
                ncv=ncv,
                v0=v0,
                maxiter=_ARPACK_RESTARTS,
            )[1]
        except (ArpackError, ArpackNoConvergence) as e:  # (a nonzero Krylov space is needed too)
            if n > _DENSE_EIG_MAX:
                raise ConvergenceError(
                    f"eigenpairs: shift-invert Lanczos for {k} eigenvalues near {sigma:g} did not converge "
                    f"({nsolves} solves; {e}), and n = {n} is above the dense fallback's {_DENSE_EIG_MAX}: "
                    "ask for fewer eigenvalues or a larger tol"
                    + (", or eigenvalues near another sigma" if target is not None else "")
                    + " (many exactly repeated eigenvalues -- a Linear layer's kron(I_m, A) block repeats "
                    "each m times -- converge slowly: k up to one multiplicity converges at once)"
                ) from None
            # (the whole spectrum: the k nearest the caller's target, where the factorization's shift
            # had to move off it -- inside a cluster the k nearest either differ)
            w, U = np.linalg.eigh(self._dense64().numpy())
            at = sigma if target is None else target
            idx = np.sort(np.argsort(np.abs(w - at), kind="stable")[:k])
            vecs = U[:, idx]
        return (*self._ritz_pairs(vecs), nsolves)

    def _ritz_pairs(self, vecs: np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
        """``(values, vectors, residuals)`` of the orthonormalized columns ``V`` of ``vecs``, ascending:
        Rayleigh quotients ``v^T H v`` and ``|H v - lambda v|`` with float64 products."""
        V = torch.linalg.qr(torch.as_tensor(vecs, dtype=torch.float64))[0]  # (orthonormal to rounding)
        op64 = self._residual_operator()
        HV = op64._apply(V.to(op64.dtype).to(op64.device)).double().cpu()
        lam = (V * HV).sum(0)
        res = (HV - V * lam).norm(dim=0)
        order = torch.argsort(lam)
        return lam[order], V[:, order], res[order]

    def _nonsingular_shift(self, sigma: float, step: float) -> tuple[Factorization, float, int]:
        """A factorization of ``H - s I`` at ``s = sigma`` or, where ``H - sigma I`` is singular (e.g.
        ``sigma`` an exact eigenvalue), at the nearest of ``sigma +- step, +- 4 step, ...`` that is not
        (shift-invert needs an invertible shift, not an exact one)."""
        sweeps = 0
        for i in range(8):
            for s in (sigma,) if i == 0 else (sigma + step * 4 ** (i - 1), sigma - step * 4 ** (i - 1)):
                sweeps += 1
                try:
                    return Factorization(self, -s, _rescue=False), s, sweeps
                except (SingularError, NonFiniteError):  # (a sweep that overflowed next to singular)
                    pass
        raise SingularError(f"H - s I is singular for every shift s tried near {sigma:g}")

    def _definite_shift(self, below: bool, start: float, step: float) -> tuple[Factorization, float, int]:
        """A factorization of ``H - sigma I`` with ``sigma`` below (``below``) or above every eigenvalue,
        found from ``start`` by steps growing 4x; returns it, ``sigma`` and the sweeps spent."""
        sweeps = 0
        sigma = start
        for _ in range(60):
            sweeps += 1
            if below:
                Fp = self.factor_if_positive_definite(-sigma)
                if Fp is not None:
                    return Fp, sigma, sweeps
            else:
                try:
                    F = Factorization(self, -sigma)
                    if F.inertia_certified and F.inertia.positive == 0:
                        return F, sigma, sweeps
                except SingularError:
                    pass
            sigma = sigma - step if below else sigma + step
            step *= 4
        raise SingularError("no definite shift found (H has non-finite eigenvalues?)")

    def _eigenpairs_from_root(self, k: int, which: str, sigma: float | None) -> Eigenpairs | None:
        """The whole spectrum from a low-rank square root, where the operator has one (None here)."""
        return None

    def eigenpairs(
        self,
        k: int = 1,
        which: str = "smallest",
        sigma: float | None = None,
        tol: float = 1e-10,
        certify: bool | None = None,
    ) -> Eigenpairs:
        """The ``k`` smallest, largest, or nearest-``sigma`` eigenpairs of ``H``, certified by inertia.

        At an end of the spectrum (a float64 operator), first ARPACK on the products, certified
        by one inertia count (:meth:`_lanczos_eigenpairs`); where it does not converge or the count
        disagrees:
        Shift-invert Lanczos (ARPACK through ``scipy.sparse.linalg.eigsh``) on ``(H - s I)^{-1}``, applied
        by the sweeps of one Riccati factorization at ``s``: for ``which="smallest"`` (``"largest"``),
        ``s`` is below (above) every eigenvalue (a shift where the factorization is definite, from a
        short Lanczos run on ``H``), so that the nearest eigenvalues to ``s`` are the smallest (largest);
        for ``which="nearest"``, ``s = sigma``. Values are Rayleigh quotients with float64 products;
        an inertia count (one more sweep; two for ``"nearest"``) then checks that ``H`` has exactly
        ``k`` eigenvalues in the interval they span (widened by ``tol * ||H||`` plus the
        residuals, and at least by ``sqrt(u) ||H||``, the sweep's backward error with margin; relative
        accuracy, whatever the scale of ``H``):
        no eigenvalue was missed; ``certified`` also needs every residual within ``sqrt(max(tol, u))
        ||H||`` (a Rayleigh quotient is then within ``tol ||H||`` of an eigenvalue ~ ``||H||`` from the
        rest). If the count says otherwise, ``k`` is raised to the count and the run repeated (twice
        at most; dense ``eigh`` up to ``n = 4096``, above it Lanczos if that is at most ``n / 8``
        pairs, else no rerun: a cluster, returned with ``certified=False``) -- only where the counts
        show ``k`` eigenvalues nearer than the ``k``-th value by more than their resolution
        ``sqrt(u) ||H||`` (else a rerun would find the same interval: a cluster, or a float32
        spectrum's bulk). A Gauss-Newton matrix's ``"smallest"`` with over ``n / 8`` eigenvalues
        within that resolution of the Lanczos estimate of ``lambda_min`` (its null space) goes to
        dense ``eigh`` at once (``n <= 4096``). ``H = 0``: zero values and the first ``k`` unit
        vectors, certified only for ``k = n``.
        A residual beyond ``sqrt(max(tol, u)) ||H||`` (Lanczos through a float32 factorization at a shift
        on an eigenvalue can resolve a pair that poorly) reruns with dense ``eigh`` up to ``n = 4096``,
        before any count; pairs still that inaccurate (above that size) are returned uncertified, with an
        :class:`AccuracyWarning`.
        ``tol``: relative accuracy asked of ARPACK. ARPACK gets 100 restarts; where it does not
        converge (or ``k > n / 8``) eigenvalues of ``n <= 4096`` come from dense ``eigh`` (then
        certified the same way), larger ones raise :class:`~hessinv.errors.ConvergenceError`.
        A Gauss-Newton matrix whose root has fewer rows than parameters takes none of these routes: its
        whole spectrum comes from the root (:meth:`GaussNewton._root_spectrum`; ``eigh``'s accuracy,
        whatever ``tol``), ``certified`` with the same meaning.

        ``certify`` (``"smallest"`` / ``"largest"``): the inertia count costs a factorization, which on
        wide layers is far dearer than the products (a 64-256-256-10 MLP, n = 85k, batch 32: ARPACK 0.4 s,
        the count 53 s and 9 GB; a transformer's sweep does not fit in memory). ``None`` (default): count
        where one factorization is within :data:`CERTIFY_MAX_FLOPS` (the dense route's ``n`` products priced
        as timed: a convolution's are dear) and fits in memory, else return
        ARPACK's pairs from the products with ``certified=False`` (each value still within its
        ``residuals`` entry of an eigenvalue; uncertified only in that no count proves none was missed,
        which Lanczos rarely does at an end of the spectrum: ARPACK is rerun with the pairs found deflated
        until a run changes none of the ``k``, for copies of a repeated eigenvalue -- the interval then the
        one the pairs span, padded by their residuals) -- where ARPACK does not converge there (or
        ``k > n / 8``), the certified routes above, however dear. ``True``: always count (the routes
        above); ``False``: never, and a :class:`ConvergenceError` where ARPACK does not converge above
        ``n = 4096``. ``"nearest"`` always factors (shift-invert).

        Raises :class:`InvalidArgumentError` for a ``tol`` outside ``(0, 1)``, a NaN ``sigma`` (or one
        given with another ``which``), a bad ``k`` or ``certify``.

        >>> import torch, hessinv
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 30), nn.Tanh(), nn.Linear(30, 3)).double()
        >>> X, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
        >>> H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
        >>> top = H.eigenpairs(2, "largest", certify=False)  # products only: no factorization
        >>> bool(torch.allclose(top.values, torch.linalg.eigvalsh(H.to_dense())[-2:], atol=1e-8))
        True
        >>> top.certified, top.factorizations
        (False, 0)
        """
        if self._order is not None:
            e = self._plain.eigenpairs(k, which, sigma, tol, certify)
            return e._replace(vectors=self._order.to_public(e.vectors))
        tol = _check_tol(tol, relative=True)
        if certify is not None and not isinstance(certify, bool):
            raise InvalidArgumentError(f"certify must be True, False or None, got {certify!r}")
        n = self.shape[0]
        kk = _integer(k)
        if kk is None or not 1 <= kk <= n:
            raise InvalidArgumentError(f"k must be an integer in [1, {n}], got {k!r}")
        k = kk
        if which not in ("smallest", "largest", "nearest"):
            raise InvalidArgumentError(f"which must be 'smallest', 'largest' or 'nearest', got {which!r}")
        if which == "nearest":
            if sigma is None:
                raise InvalidArgumentError("which='nearest' needs sigma")
            sigma = _check_shift(sigma, self.dtype, "sigma")
        elif sigma is not None:
            raise InvalidArgumentError(f"sigma is used with which='nearest' only, got which={which!r}")
        exact = self._eigenpairs_from_root(k, which, sigma)
        if exact is not None:
            return exact
        lo_r, hi_r, beta = self._lanczos_extremes()
        if lo_r == hi_r == beta == 0.0 and self.norm_estimate() == 0.0:  # H v = 0 for random v: H = 0
            # every eigenvalue is 0 and every vector an eigenvector (no sweep: H - s I is singular at
            # s = 0); certified only for k = n, as the count of eigenvalues in [0, 0] is n
            return Eigenpairs(
                torch.zeros(k, dtype=torch.float64), torch.eye(n, k, dtype=torch.float64),
                torch.zeros(k, dtype=torch.float64), (0.0, 0.0), k == n, 0, 0,
            )  # fmt: skip
        scale = max(abs(lo_r), abs(hi_r), torch.finfo(self.dtype).tiny)  # relative: ||H|| may be 1e-9
        self._check_sweepable(scale, "eigenpairs")
        if which != "nearest":
            count = self._certificate_affordable() if certify is None else certify
            quick = self._lanczos_eigenpairs(k, which, tol, scale, (lo_r, hi_r), count)
            if quick is not None:
                return quick
            if certify is False and n > _DENSE_EIG_MAX:  # (None: the certified routes, however dear)
                raise ConvergenceError(
                    f"eigenpairs({k}, {which!r}): ARPACK on the products did not converge (or k > n / 8) "
                    "and a certified route needs factorizations beyond CERTIFY_MAX_FLOPS or memory: ask for "
                    "fewer pairs or a larger tol, or pass certify=True to factor anyway"
                )
        step = max(beta, 1e-3 * (hi_r - lo_r), 1e-8 * scale)
        missed = 0  # eigenvalues the counts find nearer than the pairs returned, where no rerun can take them
        ends = which  # which end of the spectrum the pairs come from ("nearest": neither, unless sigma
        if which == "nearest":  # is beyond a definite shift: then the k smallest or largest are its nearest)
            assert sigma is not None
            F = None
            if not lo_r - step <= sigma <= hi_r + step:
                # sigma outside the spectrum: shift-invert at a sigma far out squeezes (H - sigma I)^{-1}'s
                # eigenvalues together, and Lanczos's relative tolerance no longer pins the values down
                # (1e-6 ||H|| off at sigma = 1e6 ||H||, certified by the counts). Beyond a definite shift
                # the k nearest sigma are the k smallest (largest): factor there instead
                below = sigma < lo_r
                F, s, sweeps = self._definite_shift(below, lo_r - step if below else hi_r + step, step)
                if (sigma > s) if below else (sigma < s):  # sigma is not beyond it after all
                    F = None
                else:  # (their interval from the definite shift: sigma +- r would cancel at |sigma| >> ||H||)
                    ends = "smallest" if below else "largest"
            if F is None:
                F, s, sweeps = self._nonsingular_shift(sigma, 1e-6 * scale)
        elif which == "smallest":
            F, s, sweeps = self._definite_shift(True, lo_r - step, step)
        else:
            F, s, sweeps = self._definite_shift(False, hi_r + step, step)
        self._count_doubt = False
        dense = False
        if which == "smallest" and isinstance(self, GaussNewton) and n <= _DENSE_EIG_MAX:
            # G's rank is at most batch x outputs: its null space, a cluster at 0 that shift-invert from
            # below the spectrum resolves slowly (and whose count is never k), is the rule. One count
            # just above the Lanczos estimate of lambda_min (by the counts' resolution) finds it: over
            # n / 8 eigenvalues there go to dense eigh
            sweeps += 1
            at = lo_r + math.sqrt(torch.finfo(self.dtype).eps) * scale
            dense = _DENSE_FRACTION * self._count_below(at) > n
        delta = tol * scale
        # the counts' resolution, and the residuals a certificate allows (a Rayleigh quotient is within
        # rho^2 / gap of an eigenvalue: tol ||H|| where the gap is ~ ||H||)
        floor = math.sqrt(torch.finfo(self.dtype).eps) * scale
        reach = math.sqrt(max(tol, torch.finfo(self.dtype).eps)) * scale
        kk, solves, certified = k, 0, False
        for attempt in range(3):
            # a rerun (the count found more eigenvalues in the interval than Ritz pairs: a cluster,
            # where Lanczos converges slowly) is dense up to n = 4096
            target = sigma if ends == "nearest" else None  # (an end: nearest the definite shift s)
            vals, vecs, res, ns = self._shift_invert(
                F, s, min(kk, n), tol, dense or attempt > 0, target, scale
            )
            solves += ns
            # the inertia counts are exact for a matrix within the sweep's backward error of H: an
            # eigenvalue that close to an end of the interval may be counted on either side, so the
            # interval is widened by at least sqrt(u) ||H||
            pad = max(delta + float(res.max()), floor)
            if ends == "smallest":
                vals, vecs, res = vals[:k], vecs[:, :k], res[:k]
            elif ends == "largest":
                vals, vecs, res = vals[-k:], vecs[:, -k:], res[-k:]
            else:  # nearest the asked sigma (the factorization's s may have moved off an eigenvalue)
                assert sigma is not None
                idx = torch.argsort((vals - sigma).abs())[:k].sort().values
                vals, vecs, res = vals[idx], vecs[:, idx], res[idx]
            if float(res.max()) > reach and ns > 0 and n <= _DENSE_EIG_MAX:
                # a residual beyond the accuracy asked: Lanczos through a float32 factorization at a
                # shift on (or next to) an eigenvalue resolved a pair poorly (a value 1e-2 ||H|| off,
                # returned uncertified and unflagged before): dense, before any count
                dense = True
                continue
            # (the counts are exact or flagged -- see _count -- whatever the shift factorization's
            # own certificate: it only preconditions Lanczos)
            if ends == "smallest":
                lo, hi = s, float(vals[-1]) + pad
                count = self._count_below(hi)
                sweeps += 1
            elif ends == "largest":
                lo, hi = float(vals[0]) - pad, s
                count = n - self._count_below(lo)
                sweeps += 1
            else:
                r = float((vals - sigma).abs().max()) + pad
                lo, hi = sigma - r, sigma + r
                count = self._count_below(hi) - self._count_below(lo)
                sweeps += 2
            certified = True
            if count == k:
                break
            certified = False
            if count < k or kk >= n or ns == 0:  # (ns == 0: dense eigh, which a rerun would repeat)
                break
            # a rerun finds other values only where Lanczos missed eigenvalues nearer (to the end, or
            # to sigma) than its k-th value by more than the counts' resolution: extra eigenvalues
            # within it of that value (a cluster, or a float32 spectrum's bulk, spaced below sqrt(u)
            # ||H||) stay in any rerun's interval, and the rerun (dense eigh up to n = 4096) only costs
            # -- unless Lanczos missed one of those nearer eigenvalues itself (a copy of an exactly
            # repeated one: the counts find more of them than it returned), which a rerun does find
            margin = max(delta, floor)
            if ends == "smallest":
                inner = self._count_below(float(vals[-1]) - margin)
                found = int((vals < float(vals[-1]) - margin).sum())
                sweeps += 1
            elif ends == "largest":
                inner = n - self._count_below(float(vals[0]) + margin)
                found = int((vals > float(vals[0]) + margin).sum())
                sweeps += 1
            else:
                r_in = float((vals - sigma).abs().max()) - margin
                inner = self._count_below(sigma + r_in) - self._count_below(sigma - r_in) if r_in > 0 else 0
                found = int(((vals - sigma).abs() < r_in).sum()) if r_in > 0 else 0
                sweeps += 2 if r_in > 0 else 0
            if inner < k and inner <= found:
                break
            kk = count + (count - k)  # more Ritz pairs than there are eigenvalues in the interval
            if _DENSE_FRACTION * kk > n > _DENSE_EIG_MAX:
                # a cluster (e.g. the null space of an over-parameterized net at sigma = 0) too large
                # for Lanczos to resolve and the matrix too large for dense eigh: returned uncertified
                # (below that size the rerun is dense; Lanczos with thousands of pairs took 248 s), and
                # said: eigenvalues nearer than the k-th value by more than the counts' resolution
                missed = inner
                break
        doubt, self._count_doubt = self._count_doubt, False  # a count that may be off certifies nothing
        # nor do residuals beyond the accuracy asked (a value is only within its residual of an eigenvalue)
        accurate = float(res.max()) <= reach
        certified = certified and count == k and not doubt and accurate
        if not accurate:
            warn(
                AccuracyWarning(
                    f"eigenpairs: residual |H v - lambda v| up to {float(res.max()):.2g} (||H|| ~ "
                    f"{scale:.2g}), beyond the {reach:.2g} asked (tol={tol:g}); the values are Rayleigh "
                    "quotients, each within its residual of an eigenvalue -- not certified (use a float64 "
                    "model, or another sigma)"
                )
            )
        elif missed:
            where = ends if ends in ("smallest", "largest") else f"nearest {sigma}"
            warn(
                AccuracyWarning(
                    f"eigenpairs: the inertia counts {missed} eigenvalues nearer than the last of the {k} "
                    f"values found ({count} in [{lo:.3g}, {hi:.3g}]): a cluster (e.g. a Gauss-Newton "
                    f"matrix's null space) that Lanczos does not resolve, at n = {n} too large for dense "
                    f"eigh; each value is within its residual of an eigenvalue, but they are not the {k} "
                    f"{where} -- not certified"
                )
            )
        return Eigenpairs(vals, vecs, res, (lo, hi), certified, sweeps, solves)

    def _certificate_affordable(self) -> bool:
        """Whether one factorization (an inertia count) costs at most :data:`CERTIFY_MAX_FLOPS` by the cost
        model of :meth:`_swept`'s routes, and fits in memory. The dense route's ``n`` products are priced
        as timed (:meth:`_dense_route_seconds`, at :func:`_flop_rate`): the model's ``8 B p`` flops a column
        is far under a generic stage's autograd products (a ResNet with BatchNorm on 64 16x16 images,
        n = 1926, whose sweep does not fit: 28 ms a column, 80 s to certify the 5 largest eigenpairs
        against 0.7 s for ARPACK on the products; a probe)."""
        view = self.__dict__.get("_view")
        if view is not None and view is not self:  # the dense matrix is at hand
            return float(self.shape[0]) ** 3 / 3 <= CERTIFY_MAX_FLOPS
        chain, dense = _block_costs(self.blocks, pivots=True)
        if self._dense_cheaper():  # (the count's shift is no damping: never a Woodbury form, its own route)
            return self._dense_route_seconds() * _flop_rate(self.device) <= CERTIFY_MAX_FLOPS
        try:
            check_memory(self.blocks, self._names, self.dtype, self.device)
        except TooLargeError:
            return False
        return chain <= CERTIFY_MAX_FLOPS

    def _lanczos_eigenpairs(
        self, k: int, which: str, tol: float, scale: float, ends: tuple[float, float], count: bool = True
    ) -> Eigenpairs | None:
        """:meth:`eigenpairs` at an end of the spectrum by implicitly restarted Lanczos on ``H`` itself
        (ARPACK, products only), certified by one inertia count -- where that works: a float64 operator
        above :data:`_DENSE_EIG` parameters, ``k <= n / 8``, ARPACK converged within
        :data:`LANCZOS_PRODUCTS` products (each residual within ``max(tol, 64 u) ||H||``, as shift-invert's),
        and the count finding exactly ``k`` eigenvalues beyond the interval's inner end. Else None, and
        shift-invert Lanczos (a factorization at a definite shift, then solves: two sweeps or more)
        answers. ARPACK sees ``(H - e I) / ||H|| +- 2 I`` (``e`` the end's Lanczos estimate ``ends``),
        whose wanted eigenvalues are about ``+-2``: its test, relative to the Ritz value, is then
        relative to ``||H||`` (at the end of a positive semi-definite ``G``, ``lambda ~ 0``, it would
        ask for residuals of ``tol eps^(2/3)``). One sweep instead of two or more: a 24-stage width-16
        tanh chain on 64 examples (n = 6245), the 3 largest 1.1 -> 0.5 s, the 3 smallest 1.4 -> 0.6 s
        (scipy's eigsh on the products, uncertified: 0.12 and 0.43 s). ``count=False``: no count, the
        pairs returned uncertified (a float32 operator too: ARPACK to its products' accuracy, the values
        and residuals from float64 products)."""
        from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, LinearOperator, eigsh

        n = self.shape[0]
        if (
            (count and self.dtype != torch.float64)
            or n <= _DENSE_EIG
            or _DENSE_FRACTION * k > n
            or k >= n - 1
        ):
            return None  # (ARPACK takes k < n - 1)
        u = torch.finfo(self.dtype).eps
        want = max(tol, 64 * u) * scale
        top = which == "largest"
        e, sign = (ends[1], -2.0) if top else (ends[0], 2.0)

        ncv = min(n, max(2 * k + 1, 20))
        g = torch.Generator().manual_seed(1)

        def arpack(Q: np.ndarray | None) -> np.ndarray | None:
            """ARPACK's k vectors at the wanted end of ``(H - e I) / ||H|| +- 2 I``, with the columns of
            ``Q`` (orthonormal) pushed beyond the other end (``+-4``: the spectrum spans 2 to 4); None where
            it does not converge."""

            def mm(X: np.ndarray) -> np.ndarray:
                T = torch.as_tensor(np.asarray(X, dtype=np.float64)).reshape(n, -1)
                HX = self._apply(T.to(self.device, self.dtype)).double().cpu()
                out = ((HX - e * T) / scale + sign * T).numpy()
                return out if Q is None else out + 2.0 * sign * (Q @ (Q.T @ T.numpy()))

            op = LinearOperator((n, n), matvec=lambda x: mm(x).ravel(), matmat=mm, dtype=np.float64)
            try:
                return eigsh(
                    op, k=k, which="LA" if top else "SA", tol=max(tol, 64 * u) / 2, ncv=ncv,
                    v0=torch.randn(n, generator=g, dtype=torch.float64).numpy(),
                    maxiter=max(1, LANCZOS_PRODUCTS // max(ncv - k, 1)),
                )[1]  # fmt: skip
            except (ArpackNoConvergence, ArpackError):
                return None

        vecs = arpack(None)
        if vecs is None:
            return None
        vals, V, res = self._ritz_pairs(vecs)
        if not count:
            # Lanczos from one start vector finds one copy of a repeated eigenvalue (the others, if at all,
            # through rounding): ARPACK again with the pairs found deflated, until a run finds none that
            # changes the k wanted (a linear layer's kron(I_m, A) block repeats each eigenvalue m times:
            # 3 of 8 copies were returned, 10% of ||H|| off, a probe)
            for rerun in range(DEFLATION_ROUNDS + 1):
                if rerun == DEFLATION_ROUNDS:
                    warn(
                        f"eigenpairs({k}, {which!r}, certify=False): after {DEFLATION_ROUNDS} deflated "
                        "Lanczos runs, copies of a repeated eigenvalue were still being found: some may be "
                        "missing; certify=True counts them",
                        AccuracyWarning,
                    )
                    break
                pad = max(tol * scale + float(res.max()), math.sqrt(u) * scale)
                more = arpack(V.numpy())
                if more is None:  # (the deflated run did not converge: copies may be missing -- a Linear
                    # layer's kron(I_10, A) gave 3 copies each of three eigenvalues for 10 of the smallest,
                    # 1.5% of ||H|| off, unremarked; a probe)
                    warn(
                        f"eigenpairs({k}, {which!r}, certify=False): the deflated Lanczos run that looks for "
                        "further copies of a repeated eigenvalue did not converge: some copies may be "
                        "missing from the pairs returned; certify=True counts them",
                        AccuracyWarning,
                    )
                    break
                both, W, wres = self._ritz_pairs(np.concatenate([V.numpy(), more], axis=1))
                keep = slice(len(both) - k, None) if top else slice(0, k)
                changed = float((both[keep] - vals).abs().max()) > pad
                vals, V, res = both[keep], W[:, keep], wres[keep]
                if not changed:
                    break
        if not float(res.max()) <= 4 * want:  # (NaN too)
            return None
        pad = max(tol * scale + float(res.max()), math.sqrt(u) * scale)
        if not count:  # (no count: the interval the pairs span, padded by their residuals)
            return Eigenpairs(vals, V, res, (float(vals[0]) - pad, float(vals[-1]) + pad), False, 0, 0)
        self._count_doubt = False
        if top:
            lo, hi = float(vals[0]) - pad, math.inf
            count = n - self._count_below(lo)
        else:
            lo, hi = -math.inf, float(vals[-1]) + pad
            count = self._count_below(hi)
        doubt, self._count_doubt = self._count_doubt, False
        if count != k or doubt:
            return None
        return Eigenpairs(vals, V, res, (lo, hi), True, 1, 0)

    def min_eigenvalue(self, tol: float = 1e-8) -> float:
        """``lambda_min(H)`` to within ``(tol + 10 u) * ||H||`` (``10 u``: a margin for the
        positive-definiteness sweep's rounding, 2e-15 in float64, 1.2e-6 in float32), certified by an
        inertia count.

        A Rayleigh quotient ``lambda = v^T H v`` (float64 product) is never below ``lambda_min``, and it
        is within ``rho^2 / gap`` of an eigenvalue (``rho = |H v - lambda v|``, ``gap`` the distance to
        the rest of the spectrum). Block Lanczos (4 columns a product, :meth:`_lanczos`) on the
        ``O(L)`` products stops as soon as its smallest Ritz
        value is that close by this estimate (about half the products of asking for a small
        ``rho``); one positive-definiteness sweep at ``lambda - (tol + 10 u) ||H||`` then proves
        that no eigenvalue lies below: ``lambda_min`` is in ``(lambda - (tol + 10 u) ||H||,
        lambda]`` (the norm estimated from below by the Ritz values or ``|H v|``). Where
        that certificate fails (Lanczos missed the smallest eigenvalue, or the gap estimate was
        wrong), shift-invert Lanczos with a factorization below the spectrum (:meth:`eigenpairs`)
        takes over, and bisection on the positive-definiteness test is the last resort. A float32
        operator answers with its float64 twin's (the model and batch in float64, as its solves'
        refinement): a float32 sweep decides definiteness only up to its backward error, far above
        ``u32 ||H||`` next to a null space (a Gauss-Newton matrix got -4.8e-6 at ``||H||`` ~ 0.2).
        The certificate is a factorization whatever it costs: where the sweep does not fit in memory that is
        the dense route's ``n`` products (a ResNet with BatchNorm on 64 16x16 images, n = 1926: 130 s);
        ``eigenpairs(1, "smallest")`` prices it first and answers from the products alone where it is dear.
        Raises :class:`InvalidArgumentError` for a ``tol`` outside ``(0, 1)`` or not a number.
        """
        if self._order is not None:
            return self._plain.min_eigenvalue(tol)
        tol = _check_tol(tol, relative=True)
        if self.dtype != torch.float64:
            return self._residual_operator().min_eigenvalue(tol)
        n = self.shape[0]
        # the sweep decides definiteness up to its backward error: a certificate shift closer to
        # lambda than a few ulps of ||H|| (float32 operators) proves nothing
        slack = 10 * torch.finfo(self.dtype).eps
        known = 0.0
        if n <= _DENSE_EIG:  # small: the dense matrix, then the same certificate
            A = self.to_dense().double().cpu()
            if not bool(A.any()):  # H = 0 (a relative accuracy of 0)
                return 0.0
            w, V = torch.linalg.eigh(A)
            v, known = V[:, 0], float(w.abs().max())  # (||H||: |H v| of a null vector is no scale)
        # (below: the dense branch's ||H||; a float32 operator answered with its twin's above)
        else:
            try:  # (the certificate's sweep: refused before the Lanczos products)
                self._check_sweep_memory()
            except TooLargeError as e:
                raise TooLargeError(
                    f"{e}; min_eigenvalue certifies its answer by a sweep -- eigenpairs(1, 'smallest', "
                    "certify=False) takes products only (its answer not certified by a count)"
                ) from None

            def close(theta: np.ndarray, res: np.ndarray) -> bool:
                scale = max(float(np.abs(theta).max()), _TINY64)
                rho = float(res[0])
                if rho <= tol * scale:
                    return True
                if len(theta) < 2:
                    return False
                gap = float(theta[1] - theta[0]) - float(res[1])
                return gap > 0 and rho * rho / gap <= tol * scale  # the estimate runs 7-15x high

            theta, S, Q, _, b = self._lanczos(min(n, 300), close, block=_LANCZOS_BLOCK)
            # H q = 0 for the random start q: H = 0 (a relative accuracy of 0). Lanczos says so itself:
            # a first call no longer pays the 30 products of a norm estimate for this test
            if b == 0.0 and not np.any(theta):
                return 0.0
            v = Q @ torch.as_tensor(S[:, 0], dtype=torch.float64)
        if n > _DENSE_EIG and self.dtype == torch.float64:
            # float64 products: the Ritz value is the Rayleigh quotient of v up to rounding
            lam, scale = float(theta[0]), max(float(np.abs(theta).max()), _TINY64)
        else:
            op64 = self._residual_operator()
            v = v / _scaled_norm(v)
            Hv = op64._apply(v[:, None].to(op64.dtype).to(op64.device))[:, 0].double().cpu()
            lam = float(v @ Hv)
            scale = max(abs(lam), _scaled_norm(Hv), known, _TINY64)  # (|Hv|^2 overflows from 1e154)
        if not (math.isfinite(lam) and math.isfinite(scale)):
            self._overflow()
        self._check_sweepable(scale, "min_eigenvalue")
        if self.is_positive_definite(-(lam - (tol + slack) * scale)):
            return lam
        with warnings.catch_warnings():  # an inaccurate pair is not used: the bisection below decides
            warnings.simplefilter("ignore", AccuracyWarning)
            try:
                e = self.eigenpairs(1, "smallest", tol=min(tol, 1e-6), certify=True)
            except ConvergenceError:  # (a cluster at the bottom that Lanczos did not resolve: 4 eigenvalues
                # of a 2-1200-2 tanh MLP on one example, n = 6002; a probe)
                return self._min_eigenvalue_bisection(tol)
        lam = float(e.values[0])
        scale = max(abs(e.interval[0]), abs(lam), _TINY64)  # interval[0]: the definite shift, beyond |lambda|
        if e.certified and float(e.residuals[0]) <= max(tol, slack) * scale:
            return lam
        return self._min_eigenvalue_bisection(tol)

    def _min_eigenvalue_bisection(self, tol: float) -> float:
        """``lambda_min(H)`` by bisection on the positive-definiteness test (one sweep per step)."""
        scale = max(self.norm_estimate(), torch.finfo(self.dtype).tiny)
        hi = 1.1 * scale
        while not self.is_positive_definite(hi):
            hi *= 2
        lo = -1.1 * scale
        while self.is_positive_definite(lo):
            hi, lo = lo, lo - 2 * abs(lo)
        atol = tol * scale
        while hi - lo > atol:
            mid = 0.5 * (lo + hi)
            if self.is_positive_definite(mid):
                hi = mid
            else:
                lo = mid
        return -0.5 * (lo + hi)

    def _residual_operator(self) -> CurvatureOperator:
        """This operator in float64 (itself if already float64), for refinement residuals; in the stages'
        order (:meth:`_stage_order`)."""
        if self._order is not None:  # (one twin: the copy that answers this operator's calls holds it)
            return self._plain._residual_operator()
        if self.dtype == torch.float64:
            return self
        if self._twin is None:
            self._twin = self._converted(torch.float64)
        return self._twin

    def _converted(self, dtype: torch.dtype) -> CurvatureOperator:
        """The same operator on a copy of the model, inputs and targets in ``dtype``, at this operator's
        point (the parameters as they were at its construction, whatever happened to them since)."""
        if self._transient:  # (no point was kept: the copy would be at today's parameters)
            raise InvalidArgumentError(
                f"this operator was built for one use (an optimizer's refresh) and has no {dtype} copy; "
                "build the operator with hessinv.gauss_newton(...)"
            )
        # a replaced layer: named (not a Dropout switched to training mode since: the copy takes the modes
        # of this operator's point, as its parameters; a float32 refined solve was refused, a probe)
        self.chain.check_model(modes=False)
        if self.chain.model_key() != self._model_key:
            raise InvalidArgumentError(
                f"hooks were added or removed, or an attribute the traced forward reads changed, since this "
                f"{self.dtype} operator was built; its {dtype} copy (refined solves, logdet, eigenvalues) "
                "needs the model as it was: build the operator again"
            )
        memo: dict[int, Any] = {}
        mods = [self.model] if isinstance(self.model, nn.Module) else list(self.model)
        for t in _graph_attributes(mods):  # (deepcopy refuses a tensor with a graph: copied as numbers)
            memo[id(t)] = t.detach().clone()
        try:
            model = copy.deepcopy(self.model, memo)
        except Exception as e:  # noqa: BLE001 - what deepcopy cannot copy: a lock, a file, a script function
            if out_of_memory(e):  # (no room for the copy: not a refusal of the model)
                raise
            raise UnsupportedStageError(_copy_failed(self.dtype, dtype, e)) from e
        copies = [model] if isinstance(model, nn.Module) else list(model)  # (Module.to keeps each)
        if self._point is not None:
            if any(id(t) not in memo for t, _ in self._held_point + self._frozen_point) or any(
                _fingerprint(t) != saved for t, saved in self._frozen_point
            ):
                raise InvalidArgumentError(
                    f"a frozen parameter or buffer the model held when this {self.dtype} operator was built "
                    f"was replaced or changed since; its {dtype} copy (refined solves, logdet, eigenvalues) "
                    "needs the model as it was: build the operator again"
                )
            with torch.no_grad():  # (frozen weights edited in place, BatchNorm statistics moved since)
                for t, saved in zip(self.chain.params, self._point, strict=True):
                    memo[id(t)].copy_(saved)
                for t, saved in self._held_point:
                    memo[id(t)].copy_(saved)
            for i, name, k, saved in self._attr_point:  # plain tensor attributes as they were
                setattr(copies[i].get_submodule(name), k, saved.clone())
            for i, name, k, saved in self._plain_point:  # and plain settings
                setattr(copies[i].get_submodule(name), k, copy.deepcopy(saved))
        for top in copies:
            linalg.module_in_precision(top, dtype)
        _rebind(copies, mods, memo)
        targets = self.targets.to(dtype) if self.targets.is_floating_point() else self.targets
        inputs = self.inputs.to(dtype) if self.inputs.is_floating_point() else self.inputs  # token ids stay
        try:
            with warnings.catch_warnings():  # (said once already, by this operator's own construction)
                warnings.filterwarnings("ignore", message=".*Gauss-Newton matrix is zero")
                loss_fn = self.loss_fn if self._loss_point is None else self._loss_point
                twin = type(self)(model, loss_in_dtype(loss_fn, dtype), inputs, targets)._stage_order()
        except HessinvError as e:
            # (a cast in forward -- x.float(), a no-op in the model's own dtype -- is refused in the copy:
            # a float64 model would be refused too, so the remedy is to remove the cast)
            cast = isinstance(e, DtypeMismatchError) and "cast" in str(e)
            # (a loss function kept live, not copied -- a lambda or closure -- that uses a tensor it
            # captured in the model's dtype, weight=w: a float64 model with that loss fails the same way)
            captured = (
                self._loss_point is None
                and "loss_fn(outputs, targets) failed" in str(e)
                and any(k in str(e) for k in ("scalar type", "dtype", "Double", "Float"))
            )
            fix = (
                "remove the dtype cast from forward (the model's dtype follows its parameters)"
                if cast
                else "the loss function uses a tensor in the model's dtype that the copy cannot convert, one "
                "it captured (weight=w) or creates (torch.eye(3)): make it in the outputs' dtype "
                "(w.to(outputs.dtype), torch.eye(3, dtype=outputs.dtype)), or pass a captured one through "
                "a loss module (nn.CrossEntropyLoss(weight=w)) or a functools.partial, which the copy "
                "converts"
                if captured
                else "create such tensors with dtype=x.dtype (a float64 model fails the same way)"
                if isinstance(e, DtypeMismatchError) and "default dtype" in str(e)
                else "use a float64 model"
            )
            raise type(e)(
                f"a {self.dtype} operator refines its solves (and computes eigenvalues, log-determinants) "
                f"against a {dtype} copy of the model and loss, which failed ({e}): {fix}; or, for a solve "
                "alone, solve(..., refine=False)"
            ) from e
        except Exception as e:  # noqa: BLE001 - a hook that looks up the original modules (names[m])
            if out_of_memory(e):
                raise
            raise UnsupportedStageError(_copy_failed(self.dtype, dtype, e)) from e
        # the copy must compute with its own tensors: one the functions kept on its modules still reach
        # (_rebind redirects closures, bound methods, partials and weak references; not a global, a
        # default argument, a detached view) makes it another function of its own -- every refined solve,
        # log-determinant and eigenvalue would answer for that one (a residual of 0.2 reported as 4e-16):
        # its forward is watched for any operand whose storage is one of the original's tensors
        out_scale, read = 0.0, None
        try:
            with _OriginalReads(mods) as watch:
                out = twin.chain._own_forward(twin.inputs)
            read = watch.hit
            out_scale = float(out.detach().abs().max()) if out.numel() else 0.0
        except Exception:  # noqa: BLE001 - the model's own forward is checked elsewhere (Chain._check_traced)
            pass
        if read is not None:
            raise UnsupportedStageError(
                f"a {self.dtype} operator refines its solves (and computes eigenvalues, log-determinants) "
                f"against a {dtype} copy of the model made by copy.deepcopy, which still computes with the "
                f"original model's {read}, reached through what the copy cannot redirect (a global "
                "variable, a default argument, an object outside the model): reach it through the module "
                "that holds it (self.<name> in its forward), or use a float64 model; or, for a solve "
                "alone, solve(..., refine=False)"
            )
        # ... and should be this operator's function: one that reads something of the original the copy
        # does not hold (a setting reached through a global or a default argument) computes with what
        # that is now, and its loss at the point moves (5-60% in the probes) -- but so does a float32
        # forward that rounds much (a chaotic chain, a loss that cancels to ~0): said, not refused
        u = torch.finfo(self.dtype).eps
        loss, loss64 = float(self.loss), float(twin.loss)
        if not abs(loss64 - loss) <= 30 * math.sqrt(u) * max(abs(loss), abs(loss64)) + 100 * u * out_scale:
            warn(
                AccuracyWarning(
                    f"the {dtype} copy of this {self.dtype} operator's model, which its refined solves, "
                    f"log-determinants and eigenvalues use, has the loss {loss64:.6g} at its point, not "
                    f"{loss:.6g}: either the {self.dtype} forward rounds that much (a chaotic chain, a loss "
                    f"that cancels to ~0: the answers are then the {dtype} model's), or the copy reads "
                    "something of the original model changed since this operator was built (a setting "
                    "through a global or a default argument: build the operator again after such a change)"
                )
            )
        return twin

    def _rounded(self, dtype: torch.dtype) -> CurvatureOperator:
        """This operator with its blocks and gradient rounded to ``dtype`` (the float32 sweep operator of
        :class:`MixedFactorization`): the same matrix up to one rounding of each block entry -- closer
        to this one than a linearization in ``dtype`` would be -- for a fraction of a millisecond
        instead of a model copy, a traced chain and a linearization. Products, the chain and the
        model are shared; its float64 twin is this operator."""
        low = copy.copy(self)
        low.blocks = [_rounded_blocks(b, dtype) for b in self.blocks]
        low.gradient, low.dtype = self.gradient.to(dtype), dtype
        low._twin, low._norm, low._rough = (self if self.dtype == torch.float64 else None), None, None
        low._dense_h = None
        low._view = low if self.__dict__.get("_view") is self else None  # a dense view stays one
        if "_root" in vars(low):  # a cached Gauss-Newton root is this operator's
            low._root = None
        return low


def _cast(name: str) -> Callable[[_CastBlocks, Tensor], Tensor]:
    """:class:`_CastBlocks`' product ``name``: the stage's, on its input in the stage's dtype, rounded."""

    def product(self: _CastBlocks, x: Tensor) -> Tensor:
        return self._out(getattr(self.blk, name)(self._in(x)))  # type: ignore[return-value]

    product.__name__ = name
    return product


class _CastBlocks(Blocks):
    """A lazy stage's blocks answering in ``dtype``: each product and the Riccati blocks computed by the
    stage in its own dtype and rounded (:func:`_rounded_blocks` for a lookup table's stage, whose dense
    blocks hold every row of the table, where its pivot holds the rows read)."""

    def __init__(self, blk: LazyBlocks, dtype: torch.dtype):
        self.blk, self.dtype = blk, dtype
        self.p, self.batch, self.d_in, self.d_out = blk.p, blk.batch, blk.d_in, blk.d_out
        self.per_example = blk.per_example

    def _in(self, t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(self.blk._b_out.dtype)

    def _out(self, t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(self.dtype)

    def pivot_order(self, batch: int) -> int:
        return self.blk.pivot_order(batch)

    def read_jacobian(self) -> Tensor:
        return self.blk.read_jacobian().to(self.dtype)

    def riccati_native(self, Sigma: Tensor, coupled: bool = True) -> RiccatiBlocks:
        rb = self.blk.riccati_native(self._in(Sigma), coupled)  # type: ignore[arg-type]
        low = rb.lowrank
        if low is not None:
            low = (low[0] if low[0].dim() == 1 else low[0].to(self.dtype), low[1].to(self.dtype),
                   self._out(low[2]), low[3])  # fmt: skip
        return RiccatiBlocks(
            self._out(rb.Qxx0),
            self._out(rb.Qxz),
            self._out(rb.Qzz),
            rb.order,
            rb.inverse,
            low,  # type: ignore[arg-type]
        )

    riccati = riccati_native

    jx, jxT, jz, jzT = _cast("jx"), _cast("jxT"), _cast("jz"), _cast("jzT")
    hxx, hxz, hxzT, hzz = _cast("hxx"), _cast("hxz"), _cast("hxzT"), _cast("hzz")

    def hvp_forward(self, t: Tensor | None, v: Tensor | None) -> Tensor | None:
        return self._out(self.blk.hvp_forward(self._in(t), self._in(v)))


def _rounded_blocks(blk: Blocks, dtype: torch.dtype) -> Blocks:
    """A shallow copy of ``blk`` with every floating tensor attribute (and those inside tuples) in
    ``dtype``; index tensors, numbers and the stage are shared. A generic stage's lazy blocks are
    rounded as their dense form (the module itself stays in its dtype), a lookup table's stage
    (its pivot in the rows read) as it answers (:class:`_CastBlocks`)."""
    if isinstance(blk, LazyBlocks):
        if blk.__dict__.get("_dense_blocks") is None and blk._read_rows() is not None:
            return _CastBlocks(blk, dtype)
        blk = blk.dense

    def cast(v):
        if isinstance(v, Tensor) and v.is_floating_point():
            return v.to(dtype)
        if isinstance(v, tuple) and any(isinstance(x, Tensor) for x in v):
            return tuple(cast(x) for x in v)
        return v

    out = copy.copy(blk)
    for k, v in vars(blk).items():
        setattr(out, k, cast(v))
    return out


def check_precision(precision: str) -> str:
    """``precision`` of :meth:`CurvatureOperator.factor`: ``"working"`` or ``"mixed"``."""
    if precision not in ("working", "mixed"):
        raise InvalidArgumentError(f"precision must be 'working' or 'mixed', got {precision!r}")
    return precision


def _factorization(
    op: CurvatureOperator, damping: float, modify: str | None, precision: str
) -> Factorization:
    check_precision(precision)
    damping, modify_ = check_real(damping, "damping"), _check_modify(modify)
    if precision == "mixed" and op.dtype == torch.float64:
        if modify_:
            raise InvalidArgumentError("precision='mixed' refines solves of H + eps I: it excludes modify")
        return MixedFactorization(op, damping)
    return Factorization(op, damping, modify=modify_)


def _check_modify(modify: str | None) -> bool:
    if modify is None:
        return False
    if modify != "abs":
        raise InvalidArgumentError(f"modify must be None or 'abs', got {modify!r}")
    return True


def check_generator(generator: object) -> None:
    """:class:`InvalidArgumentError` unless ``generator`` is a ``torch.Generator`` or None."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise InvalidArgumentError(f"generator must be a torch.Generator or None, got {generator!r}")


def _shift_limit(dtype: torch.dtype) -> float:
    """The largest ``|shift|`` a sweep in ``dtype`` takes: ``1e-4 sqrt(max float)``."""
    return 1e-4 * math.sqrt(torch.finfo(dtype).max)


def _check_shift(shift, dtype: torch.dtype, what: str = "shift") -> float:
    """A finite real ``shift``/``damping`` small enough that ``H + shift I`` is representable: at most
    ``1e-4 sqrt(max float)`` (1.3e150 in float64, 1.8e15 in float32), beyond which the sweep's
    products overflow or the solve loses its accuracy."""
    shift = check_real(shift, what)
    if not math.isfinite(shift):
        raise NonFiniteArgumentError(f"{what} must be finite, got {shift}")
    limit = _shift_limit(dtype)
    if abs(shift) > limit:
        fix = "use a float64 model (model.double() and float64 inputs), or " if dtype != torch.float64 else ""
        raise InvalidArgumentError(
            f"{what} {shift:g} is too large for {dtype}: |{what}| must be <= {limit:.2g} (the sweep's "
            f"products would overflow); {fix}scale the loss down and the {what} with it"
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

    >>> import torch, hessinv
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    >>> X, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0])
    >>> G = hessinv.gauss_newton(net, nn.CrossEntropyLoss(), X, y)
    >>> U, S = G.root()  # G = U^T diag(S) U, at most 5 examples x 2 rows (3 classes, softmax)
    >>> U.shape[0] <= 10 < G.shape[0]
    True
    >>> bool(torch.allclose(U.T @ (S[:, None] * U), G.to_dense()))
    True
    >>> D = torch.linspace(0.1, 1.0, G.shape[0], dtype=torch.float64)  # a per-parameter damping
    >>> F = G.factor(damping=D)  # Woodbury, through the root
    >>> x = F.solve(G.gradient)
    >>> bool(torch.allclose(G @ x + D * x, G.gradient))
    True
    """

    second_order = False
    _root: tuple[Tensor, Tensor] | None = None

    def _apply(self, V: Tensor) -> Tensor:
        """``G V`` by the two ``O(L)`` sweeps -- or, through a stage autograd cannot differentiate twice (its
        ``J v`` on the graph is a double backward: ``nn.EmbeddingBag``), from the root, ``U^T (S (U V))``:
        exact (``G = U^T diag(S) U``), first derivatives only. A bag model's ``G @ v``, refined solves and
        Gauss-Newton influence scores were refused where its factorization ran."""
        if not self.__dict__.get("_by_root"):
            try:
                return super()._apply(V)
            except NoDoubleBackward:
                self._by_root = True  # (every later product too)
        U, S = self._cached_root()
        return (U.T @ (S[:, None].to(U.dtype) * (U @ V.to(U.dtype)))).to(V.dtype)

    def to_dense(self) -> Tensor:
        """:meth:`CurvatureOperator.to_dense`; where ``G``'s rank bound ``r = batch x outputs`` is below
        ``2 n``, ``U^T diag(S) U`` from its root (:meth:`root`: one backward sweep of ``r`` right-hand sides
        instead of ``n`` products, each a pass over the whole batch -- a CNN of 4.8k parameters on 64
        examples: 192 against 4787; a CNN of 1360 on 200 examples, r = 2000: 4.6 s against 27 s)."""
        if self._order is not None:
            return super().to_dense()
        view = self.__dict__.get("_view")
        loss = self.blocks[-1]
        n = self.shape[0]
        if (view is None or view is self) and loss.batch * loss.d_in < 2 * n:
            check_dense_memory(n, self.dtype, self.device, "to_dense()")
            U, S = self._cached_root()
            A = U.T @ (S[:, None] * U)
            return 0.5 * (A + A.T)
        return super().to_dense()

    #: :meth:`diagonal` takes the root where ``r n`` (its rows times the parameters) is below this share of
    #: the sweep's ``sum_l a_l^2 d_l`` (measured, one thread: 64-100-100-10 on 64 examples 0.17 against 0.94
    #: s; a 784-256-10 on 32 examples, ``r n = 6.5e7``, 0.75 against 0.51 s)
    ROOT_DIAGONAL_SHARE = 0.01

    def diagonal(self) -> Tensor:
        """:meth:`CurvatureOperator.diagonal`; where ``G``'s root ``G = U^T diag(S) U`` is small against
        the sweep (:data:`ROOT_DIAGONAL_SHARE`), ``sum_q S_q U_qj^2`` from it: ``r = batch x outputs``
        backward passes instead of the sweep's ``a x a`` blocks. Where every stage keeps examples apart
        (Linear + activation, convolutions, ...), the sweep's per-example blocks (``O(B d^3)`` or ``O(B d^2
        R)`` per stage), whether or not the root is at hand."""
        if self._order is not None:
            return super().diagonal()
        view = self.__dict__.get("_view")
        # (the per-example sweep even where the root is at hand, from a factorization: sum_q S_q U_qj^2 over
        # r n entries is memory-bound, 94 ms against 1.7 ms at width 128, depth 6; a probe)
        if (view is None or view is self) and examples_apart(self.blocks):
            return super().diagonal()
        loss, n = self.blocks[-1], self.shape[0]
        r = loss.batch * loss.d_in
        first = _first_with_parameters(self.blocks)  # (its input is data: no a x a)
        sweep = sum(float(b.batch * b.d_in) ** 2 * b.d_out for b in self.blocks[first + 1 : -1])
        # a generic stage (an Embedding's table, a convolution) forms its dense per-example blocks first:
        # p + d_in backward passes, a (B d_out) x p Jacobian and a p x p Hxx
        sweep += sum(
            float(b.p) * (b.p + (b.batch * b.d_out) ** 2)
            for b in self.blocks[:-1]
            if isinstance(b, LazyBlocks)
        )
        if (view is None or view is self) and r < n and r * n <= min(self.ROOT_DIAGONAL_SHARE * sweep, 2**27):
            U, S = self._cached_root()
            return torch.einsum("q,qj,qj->j", S.to(U.dtype), U, U)
        return super().diagonal()

    #: :meth:`eigenpairs` takes the whole spectrum from the root where its thin QR, ``2 n r^2`` flops, is
    #: below this (about 10 s on one core of this machine)
    EIG_ROOT_MAX_FLOPS = 2.0**37
    #: ... and where ``r n``, the numbers in each of its float64 copies of ``U`` (``U`` itself and ``Q``),
    #: is at most this (512 MB each; above it, Lanczos on products, a few vectors of ``n``)
    EIG_ROOT_MAX_ENTRIES = 2**26

    def _root_spectrum(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """``(values, Q, E)``: every eigenvalue of ``G = U^T diag(S) U`` from its root where that has fewer
        rows than ``G`` has parameters (``r = batch x outputs < n``). With the thin QR ``U^T = Q R`` (``Q``:
        n x r), ``G = Q (R S R^T) Q^T``: ``G``'s eigenvalues are those of the r x r matrix ``R S R^T = E
        diag(mu) E^T`` (eigenvectors ``Q E``) and ``n - r`` exact zeros, whose eigenvectors span the
        orthogonal complement of ``Q``; ``values`` is ``mu`` followed by those zeros (float64, on the CPU).
        ``2 n r^2`` flops, no factorization; cached. A float32 operator's is its float64 twin's (the one
        its residuals and Rayleigh quotients use: the float32 root's eigenvalues carry ``1e-8 ||G||``).
        None where ``r >= n``, on a dense view, or where the QR would cost over
        :data:`EIG_ROOT_MAX_FLOPS` or its copies of ``U`` hold over :data:`EIG_ROOT_MAX_ENTRIES` numbers."""
        if self.dtype != torch.float64:
            twin = self._residual_operator()
            return None if twin is self or not isinstance(twin, GaussNewton) else twin._root_spectrum()
        if "_spectrum" in self.__dict__:
            return self._spectrum
        if isinstance(self.blocks[-1], _DenseMatrixBlocks):  # (a dense view's one block: no root)
            return None
        n, r = self.shape[0], self.blocks[-1].batch * self.blocks[-1].d_in
        if r >= n or 2.0 * n * r * r > self.EIG_ROOT_MAX_FLOPS or r * n > self.EIG_ROOT_MAX_ENTRIES:
            self._spectrum: tuple[Tensor, Tensor, Tensor] | None = None
            return None
        try:
            U, S = self._cached_root()
        except TooLargeError:  # (the root's passes do not fit: the routes on products)
            return None
        U64, S64 = U.detach().double().cpu(), S.detach().double().cpu()
        r = U64.shape[0]  # (at most batch x outputs: cross-entropy's output curvature has rank C - 1)
        Q, R = torch.linalg.qr(U64.T)
        mu, E = torch.linalg.eigh((R * S64) @ R.T)
        self._spectrum = (torch.cat([mu, mu.new_zeros(n - r)]), Q, E)  # (kept only once it is whole)
        return self._spectrum

    def _eigenpairs_from_root(self, k: int, which: str, sigma: float | None) -> Eigenpairs | None:
        """The ``k`` eigenpairs asked from :meth:`_root_spectrum` (``Q E``'s columns; null vectors drawn at
        random and projected off ``Q``, twice). The whole spectrum is known, so no eigenvalue is missed;
        ``certified`` as on the other routes: whether ``interval`` (the values widened by their residuals
        and ``eigh``'s backward error) holds exactly ``k`` eigenvalues -- not where it cuts through a
        multiple eigenvalue, e.g. ``k`` of ``G``'s ``n - r`` zeros. Values and residuals as on every other
        route: Rayleigh quotients and ``|G v - lambda v|`` with float64 products. None where there is no
        such spectrum."""
        spectrum = self._root_spectrum()
        if spectrum is None:
            return None
        values, Q, E = spectrum
        n, r = values.shape[0], E.shape[0]
        if which == "smallest":
            pick = torch.argsort(values, stable=True)[:k]
        elif which == "largest":
            pick = torch.argsort(values, descending=True, stable=True)[:k]
        elif sigma >= float(values.max()):  # (beyond the spectrum the nearest are its end: |v - sigma|
            pick = torch.argsort(values, descending=True, stable=True)[:k]  # ties in float64 far out,
        elif sigma <= float(values.min()):  # sigma = 1e16 ||G||, and gave the first k stored)
            pick = torch.argsort(values, stable=True)[:k]
        else:
            pick = torch.argsort((values - sigma).abs(), stable=True)[:k]
        null = int((pick >= r).sum())
        V = [Q @ E[:, pick[pick < r]]]
        if null:
            Z = torch.randn(n, null, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
            for _ in range(2):  # (twice is enough: Kahan's "twice is enough" for Gram-Schmidt)
                Z -= Q @ (Q.T @ Z)
            V.append(Z)
        vals, vecs, res = self._ritz_pairs(torch.cat(V, dim=1).numpy())
        # (the interval: the values within their residuals and eigh's backward error, n u ||G||)
        pad = float(res.max()) + n * torch.finfo(torch.float64).eps * float(values.abs().max())
        lo, hi = float(vals[0]) - pad, float(vals[-1]) + pad
        inside = int(((values >= lo) & (values <= hi)).sum())
        return Eigenpairs(vals, vecs, res, (lo, hi), inside == k, 0, 0)

    def _psd(self) -> bool:
        """Whether ``G`` is positive semidefinite by construction: a loss whose output curvature is
        (cross-entropy with targets of nonnegative mass, MSE, BCE)."""
        return bool(getattr(self.blocks[-1], "psd", False))

    def _positive_definite_at(self, damping: float | Tensor) -> bool:
        """Whether ``G + D`` is positive definite by construction: :meth:`_psd` and every ``D_j > 0``."""
        if not self._psd():
            return False
        if isinstance(damping, Tensor):
            return bool((damping > 0).all())
        return damping > 0

    def is_positive_definite(self, shift: float = 0.0) -> bool:
        """:meth:`CurvatureOperator.is_positive_definite`; ``True`` without a sweep where ``G + shift I`` is
        positive definite by construction (:meth:`_positive_definite_at`: ``shift > 0``)."""
        shift = _check_shift(shift, self.dtype)
        return self._positive_definite_at(shift) or super().is_positive_definite(shift)

    def factor_if_positive_definite(self, damping: float = 0.0) -> Factorization | None:
        """:meth:`CurvatureOperator.factor_if_positive_definite`; where ``G + damping I`` is positive
        definite by construction (:meth:`_positive_definite_at`) and the sweep's pivots say otherwise
        (rounding far above ``||G||``: stage blocks of order 1 around a ``G`` of 1e-9, a model nearly
        invariant to its parameters), the factorization all the same, its solves refined."""
        if self._order is not None:
            return super().factor_if_positive_definite(damping)
        damping = _check_shift(damping, self.dtype, "damping")
        woodbury = self._positive_definite_at(damping) and self._woodbury_cheaper(damping)
        if woodbury and damping >= 1e-8 * self.norm_estimate():  # (cond < 1e8: not singular to working
            # precision, which the sweep's route below judges)
            # (positive definite by construction: no test to make, and through the root where that is
            # cheaper -- the trust region's and Levenberg-Marquardt's every trial damping ran the sweep,
            # 0.86 s against 0.017 s on an Embedding(1000, 16) model, a probe)
            try:
                return WoodburyFactorization(self, damping)
            except SingularError:
                return None
        F = super().factor_if_positive_definite(damping)
        if F is None and self._positive_definite_at(damping):
            try:
                return Factorization(self, damping)
            except SingularError:  # (positive definite, but singular to working precision: G + 1e-20 I)
                return None
        return F

    def _count(self, s: float) -> Inertia:
        """:meth:`CurvatureOperator._count`; ``(0, 0, n)`` without a sweep where ``G + s I`` is positive
        definite by construction (:meth:`_positive_definite_at`): the sweep's count there can only be wrong
        (a ``G`` nearly invariant to every parameter, ``||G||`` 1e-9 with stage blocks of order 1, was
        counted with 1-3 negative eigenvalues at ``s = 0.1 ||G||``)."""
        if self._positive_definite_at(s):
            return Inertia(0, 0, self.shape[0])
        return super()._count(s)

    def _inertia_at(self, shift: float, tol: float) -> tuple[Inertia, float]:
        """:meth:`CurvatureOperator._inertia_at`, counted in :meth:`_root_spectrum` where ``G`` has one (no
        sweep; ``tol = 0`` becomes ``eigh``'s resolution ``n u ||G||``, as a singular sweep's becomes its
        own); ``(0, 0, n)`` where ``G + (shift - tol) I`` is positive definite by construction."""
        if self._positive_definite_at(shift - tol):
            return Inertia(0, 0, self.shape[0]), tol
        spectrum = self._root_spectrum() if DENSE_COUNTS else None
        if spectrum is None:
            return super()._inertia_at(shift, tol)
        return _eigenvalue_inertia(spectrum[0], shift, tol)

    def _dense_counts(self, counts: int) -> None:
        """:meth:`CurvatureOperator._dense_counts`, from :meth:`_root_spectrum` where ``G`` has one."""
        spectrum = self._root_spectrum() if DENSE_COUNTS else None
        if spectrum is not None:
            self._dense_eigs = spectrum[0]
        else:
            super()._dense_counts(counts)

    def min_eigenvalue(self, tol: float = 1e-8) -> float:
        """:meth:`CurvatureOperator.min_eigenvalue`, never below 0 where ``G`` is positive semidefinite by
        construction (a loss whose output curvature is: cross-entropy with targets of nonnegative mass,
        MSE, BCE), as its rounding could otherwise make it (-3e-9 to -8e-9 on a batch of one). There, with
        fewer root rows ``r = batch x outputs`` than parameters, ``rank(G) <= r < n``: ``lambda_min = 0``
        exactly, with no product or sweep (a 10-512-3 MLP on 32 examples, ``n = 7171``: 4.8 s for 6e-16)."""
        if self._order is not None:
            return self._plain.min_eigenvalue(tol)
        loss = self.blocks[-1]
        if getattr(loss, "psd", False) and loss.batch * loss.d_in < self.shape[0]:
            _check_tol(tol, relative=True)
            return 0.0
        lam = super().min_eigenvalue(tol)
        return max(lam, 0.0) if getattr(self.blocks[-1], "psd", False) else lam

    def root(
        self,
        rotation: Callable[..., Any] | None = None,
        factors: list | None = None,
        max_rows: int | None = None,
        structured_only: bool = False,
        tables: list | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(U, S)``: ``G = U^T diag(S) U``, ``U`` of shape (r, n) (one backward sweep with ``r``
        right-hand sides, :func:`hessinv.lowrank.gauss_newton_root`; cached). With ``rotation``, ``U``'s
        rows in that basis; ``factors`` receives the Linear weights' outer-product structure; ``max_rows``
        truncates each example's output curvature to its leading eigenpairs so that ``r <= max(max_rows,
        B)`` (then ``U^T S U`` approximates ``G``); ``structured_only`` and ``tables``: as
        :func:`hessinv.lowrank.gauss_newton_root` (none of these results is cached)."""
        if self._order is not None:
            if rotation is not None or factors is not None or tables is not None:
                raise InvalidArgumentError(
                    "root(rotation=, factors=, tables=) describe U's columns in the chain's stages' order, "
                    "which is not model.parameters()'s for this model (its forward uses its parameters in "
                    "another order): take root() or root(max_rows=...) here"
                )
            U, S = self._plain.root(None, None, max_rows, structured_only, None)
            return self._order.to_public(U, 1), S
        if rotation is not None and not callable(rotation):
            raise InvalidArgumentError(
                f"root(rotation=...) takes a callable (EigenBasis.blocks_in), got {type(rotation).__name__}: "
                "pass max_rows by keyword, root(max_rows=...)"
            )
        if rotation is not None or factors is not None or max_rows is not None:
            return gauss_newton_root(
                self.blocks, self.dtype, self.device, rotation, factors, max_rows, structured_only, tables
            )
        U, S = self._cached_root()
        return U.clone(), S.clone()  # (the cache stays as computed: a caller's U.mul_(2) changed logdet)

    def _cached_root(self) -> tuple[Tensor, Tensor]:
        """:meth:`root`'s ``(U, S)`` as cached (not to be modified: products and factorizations read it)."""
        if self._root is None:
            self._root = gauss_newton_root(self.blocks, self.dtype, self.device)
        return self._root

    def factor(  # type: ignore[override]  # damping may be a tensor here
        self,
        damping: float | Tensor = 0.0,
        modify: str | None = None,
        precision: str = "working",
        *,
        method: str = "auto",
    ) -> Factorization:
        """Factor ``G + D``. ``D`` is a number (``method="auto"``/``"riccati"``: the Riccati sweep --
        ``"auto"``: through ``G``'s square root instead where that is cheaper (:meth:`_woodbury_cheaper`),
        or where the sweep's blocks do not fit in memory and that root has fewer rows, ``B C``, than ``G``
        has parameters; ``"woodbury"``: through the root)
        or a (n,) tensor of per-parameter damping (always Woodbury). ``modify``, ``precision``: as
        :meth:`CurvatureOperator.factor` (the Riccati sweep only), in the same positions."""
        if self._order is not None:
            damping = self._stage_damping(damping)
            return self._public_factor(self._plain.factor(damping, modify, precision, method=method))
        if method not in ("auto", "riccati", "woodbury"):
            raise InvalidArgumentError(f"method must be 'auto', 'riccati' or 'woodbury', got {method!r}")
        if isinstance(damping, Tensor) and damping.numel() == 1:
            damping = check_real(damping, "damping")  # a number, as a one-entry tensor (as Hessian.factor)
        if isinstance(damping, Tensor) or method == "woodbury":
            if method == "riccati":
                raise InvalidArgumentError("a per-parameter damping needs method='woodbury' (or 'auto')")
            if precision != "working":
                raise InvalidArgumentError("precision='mixed' is for the Riccati sweep (a scalar damping)")
            if modify is not None:
                raise InvalidArgumentError(
                    f"modify={modify!r} is for the Riccati sweep (a scalar damping, method='riccati'); the "
                    "Woodbury factorization takes G + D as it is"
                )
            return WoodburyFactorization(self, damping)
        if method == "auto" and modify is None and precision == "working" and self._woodbury_cheaper(damping):
            return WoodburyFactorization(self, damping)
        # where the sweep cannot answer, G + eps I = eps I + U^T S U through the root may (fewer rows than
        # parameters, a positive number as damping, the factorization of G + eps I itself)
        # (and where a stage has no double backward, whose dense blocks the sweep would need)
        root_can = (
            method == "auto"
            and modify is None
            and precision == "working"
            and isinstance(damping, numbers.Real)
            and not isinstance(damping, bool)
            and damping > 0
        )
        root_may = root_can and self.blocks[-1].batch * self.blocks[-1].d_in < self.shape[0]
        try:
            F = _factorization(self, damping, modify, precision)
            if root_may and not F._pivots_exact():
                # pivots perturbed or ill-conditioned beyond sqrt(u) (eps on G's null space, far below
                # ||G||): the solves are refined, but the log det is the perturbed matrix's, or off by up to u
                # cond^2; through the root it is exact (a Laplace evidence refused in a band of prior
                # precisions, 3e-3 nats off above it, while smaller ones were exact through the root: a probe)
                try:
                    return WoodburyFactorization(self, damping)
                except HessinvError:
                    pass
            return F
        except SingularError as e:
            # the sweep finds G + eps I singular to working precision -- a tiny eps on G's null space
            # (cond = ||G|| / eps) -- but through the root the capacitance matrix K = S + U U^T / eps is
            # well conditioned there: its log-determinant is (n - r) log eps + sum log(mu_i + eps) to
            # rounding (a Laplace evidence at a prior precision of 1e-300), and its solves say their residuals
            if not root_may:
                raise
            try:
                return WoodburyFactorization(self, damping)
            except HessinvError:
                raise e from None
        except TooLargeError:
            # the sweep's a x a blocks do not fit (a whole training set: a = B d), but G's square root has
            # r <= B C rows (a 20-64-64-10 MLP on 300 examples, n = 6154: the Laplace evidence refused as
            # 18.7 GiB, answered in 4.7 s by the Woodbury form)
            if not root_may:
                raise
            return WoodburyFactorization(self, damping)
        except NoDoubleBackward:
            # a stage autograd cannot differentiate twice has no dense blocks for the sweep, but G's root
            # needs first derivatives only (an nn.EmbeddingBag model with as many root rows as parameters:
            # refused where method="woodbury" solved it to 1e-15, a fuzzer's finding)
            if not root_can:
                raise
            return WoodburyFactorization(self, damping)

    def _factor_flops(self) -> float:
        """:meth:`CurvatureOperator._factor_flops`, or the Woodbury form's (the root's ``8 r n``, ``K``'s
        ``r^2 n`` and its ``r^3 / 3``) where it is less."""
        loss = self.blocks[-1]
        r, n = float(loss.batch * loss.d_in), float(self.shape[0])
        return min(super()._factor_flops(), 8 * r * n + r * r * n + r**3 / 3)

    def _woodbury_cheaper(self, damping: float) -> bool:
        """Whether ``G + eps I`` (``eps > 0``) is factored through ``G``'s square root (``r = B C`` rows)
        rather than by the route the factorization would take: where ``2 r < n`` and the Woodbury form's
        modelled flops -- the root's ``8 r n``, ``K``'s ``r^2 n``, its Cholesky ``r^3 / 3`` -- are under half
        of that route's (:func:`_factorization_costs`: the dense route's, where :meth:`_dense_cheaper`; else
        the sweep's with each pivot's order as factored). A 20-64-64-10 MLP's Laplace posterior on 300
        examples (``n = 6154``, ``r = 3000``): 49 s by the dense route, 2.8 s through the root; a 64-128-64-10
        MLP on 64 examples (``n = 17226``, ``r = 640``): 13.8 s by the sweep, 0.3 s through the root."""
        try:  # (an invalid damping: the sweep's named refusal)
            eps = _check_shift(damping, self.dtype, "damping")
        except HessinvError:
            return False
        B, C = self.blocks[-1].batch, self.blocks[-1].d_in
        r, n = float(B * C), float(self.shape[0])
        # a damping far below the float range's square root (1.5e-154 in float64): K = S + U U^T / eps
        # may overflow, and eigh fails on it (the sweep names the system singular)
        if not eps >= math.sqrt(torch.finfo(self.dtype).tiny) or 2 * r >= n:
            return False
        # the sweep's cost with its rank-(B d) pivots of wide stages as factored (counted as p^3 / 3 it is
        # 100x too high there: 16-64-1000 on 8 examples, the sweep 9.7 s, Woodbury 158 s)
        route = _block_costs(self.blocks)[1] if self._dense_cheaper() else _block_costs(self.blocks, True)[0]
        return 2 * (8 * r * n + r * r * n + r**3 / 3) < route


class Factorization(_AutocastOff):
    """``H + eps I`` factored by the backward Riccati sweep; solve many right-hand sides with it.

    Each pivot ``Qxx_l`` is factored by Cholesky if positive definite, else by a symmetric indefinite
    ``LDL^T`` with Bunch–Kaufman pivoting inside the block (math.md §2). A pivot block can be singular
    while ``H + eps I`` is not (the elimination order across stages is fixed); such near-singular
    pivots are perturbed statically (eigenvalues of ``D`` below ``tau = p u max|Qxx|`` moved to
    ``+-tau``, with ``max|Qxx|`` the largest of this pivot's and those eliminated before it: normwise,
    as MUMPS does), the factorization is then that of a nearby matrix, and :meth:`solve`
    recovers the exact solution by iterative refinement and, if that stalls, flexible GMRES
    preconditioned by the factorization; where that stalls too (a perturbation of rank in the
    thousands: an over-parameterized net's cluster of zero eigenvalues), by a dense LU for ``n <=``
    :data:`DENSE_FALLBACK_N` and above it by GMRES preconditioned by the sweep at a larger damping
    (:meth:`_shifted_gmres`). When pivots were perturbed, a probe solve with a random
    right-hand side checks at construction that ``H + eps I`` is nonsingular to working precision;
    :class:`SingularError` is raised only where it is not.

    Attributes:
        op: the operator factored -- for an operator of a model whose forward uses its parameters in
            another order than ``model.parameters()`` lists them, its copy in the stages' order (the
            factorization's own methods take and give vectors in ``model.parameters()``'s order).
        damping: ``eps``.
        inertia: ``(negative, zero, positive)`` eigenvalue counts of ``H + eps I``, by Sylvester's law
            on the pivots. Where the pivots cannot certify them (a perturbed pivot: the counts would be
            the perturbed matrix's; or one ill-conditioned beyond ``sqrt(u)``), they are recounted when
            first read, as ``op.inertia(eps, tol=0)`` does: one sweep without perturbation, and a dense
            ``LDL^T`` of ``H + eps I`` where that sweep is ill-conditioned too (``n <=``
            :data:`DENSE_RECOUNT_N`). With ``modify``, too: the counts of ``H + eps I``, not of the
            modified matrix ``M`` the factors hold (recounted when first read, where a pivot was modified).
        inertia_certified: whether ``inertia`` is an exact count -- of the operator's own matrix: a
            float32 operator's is evaluated in float32, and where ``cond(H + eps I) >~ 1 / u32`` its
            count may differ from the float64 model's. False only where the recount itself had an
            ill-conditioned pivot above ``n =`` :data:`DENSE_RECOUNT_N`, where it counted at the
            resolution (a pivot exactly singular at ``eps``: eigenvalues within ``sqrt(u) ||H||`` of
            ``-eps`` count as zero, so ``inertia.zero`` may exceed the true nullity), or
            (:class:`MixedFactorization`) for the float32 sweep's count. Reading it runs the recount
            where one is due.
        perturbed: ``{stage index: number of perturbed pivot eigenvalues}`` (empty if none; below
            float64 only the first such stage: the sweep stops there and the float64 twin takes over).
        positive_definite: whether every pivot is positive definite (unperturbed; with ``modify``:
            unmodified, so that ``M = H + eps I``).
        last_info: the :class:`SolveInfo` of the latest solve.

    >>> import torch, hessinv
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    >>> X, y = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1, 0])
    >>> H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    >>> F = H.factor(damping=-0.01)  # H - 0.01 I: indefinite here
    >>> ev = torch.linalg.eigvalsh(H.to_dense()) - 0.01  # the dense reference
    >>> tuple(F.inertia) == (int((ev < 0).sum()), 0, int((ev > 0).sum())), F.positive_definite
    (True, False)
    >>> abs(F.logdet() - float(ev.abs().log().sum())) < 1e-9
    True
    >>> x, info = F.solve(H.gradient, return_info=True)
    >>> info.residual < 1e-12  # |g - (H - 0.01 I) x| / |g|, in float64
    True
    >>> pairs = H.eigenpairs(2, "smallest")  # Lanczos, certified by an inertia count (Eigenpairs)
    >>> bool(torch.allclose(pairs.values, ev[:2] + 0.01, atol=1e-8)), pairs.certified
    (True, True)
    """

    _autocast_dunders = ("__init__",)

    _twin_only = False  # solves, inertia and log-det from the float64 twin alone (see __init__)
    _recount_due = False  # whether `inertia` must be recounted when first read (see _recount)
    #: where the operator's public vectors are permuted (:attr:`CurvatureOperator._order`), the chain that
    #: orders this factorization's (its ``op`` is the operator's copy in the stages' order); None: none
    _order: Chain | None = None

    def _public_factor_of(self, op: CurvatureOperator) -> CurvatureOperator:
        """``op`` as this factorization holds it -- in the stages' order -- taking its public order."""
        if op._order is not None:
            self._order, op = op._order, op._plain
        return op

    def _stages(self, R: Tensor) -> Tensor:
        """Rows of ``R`` from the public order to the stages' (:meth:`hessinv.Chain.to_stages`)."""
        return R if self._order is None else self._order.to_stages(R)

    def _public(self, X: Tensor) -> Tensor:
        """Rows of ``X`` from the stages' order to the public one (:meth:`hessinv.Chain.to_public`)."""
        return X if self._order is None else self._order.to_public(X)

    @property
    def _sweep_op(self) -> CurvatureOperator:
        """The operator whose blocks the sweep factored: ``op``'s (:meth:`CurvatureOperator._swept`; its
        float32 copy's for :class:`MixedFactorization`)."""
        return self.op._swept()

    @property
    def _sweep_dtype(self) -> torch.dtype:
        """The precision the sweep runs in."""
        return self._sweep_op.dtype

    def __init__(
        self,
        op: CurvatureOperator,
        damping: float,
        modify: bool = False,
        _factors: tuple | None = None,
        _rescue: bool = True,
    ):
        """``_rescue=False``: no :meth:`_shifted_gmres` for this factorization (shift-invert, whose
        operator is the bare sweep: a perturbed one that only the rescue solves is refused, and the next
        shift tried)."""
        op = self._public_factor_of(op)
        damping = _check_shift(damping, op.dtype, "damping")
        if not _rescue:
            self._shift_rescue = False
        self.op, self.damping, self.modified = op, damping, modify
        # below float64, a sweep that must perturb a pivot is abandoned there (the float64 twin takes
        # over, below): its remaining stages would be work thrown away
        overflowed = False
        try:
            self.factors, self.inertia, self.positive_definite = _factors or riccati_factor(
                op._swept().blocks,
                damping,
                op._swept()._names,
                op.gradient,
                perturb=not modify,
                modify=modify,
                stop_if_perturbed=op.dtype != torch.float64 and not modify,
            )
        except NonFiniteError as e:
            if modify or _factors is not None:
                raise
            if op.dtype == torch.float64:
                try:  # an operator of moderate scale (else the overflow is its size's: re-raised)
                    big = not op.norm_estimate() <= _shift_limit(op.dtype)
                except HessinvError:
                    big = True
                if big:
                    raise
                raise SingularError(
                    f"{e}: the sweep at damping {damping:g} overflowed next to singular pivots (a cluster "
                    "of eigenvalues at -damping: H + eps I singular to working precision, or nearly) -- "
                    "choose another damping",
                    damping=damping,
                ) from e
            # a sweep below float64 that overflowed next to singular pivots (a cluster of zero
            # eigenvalues): the float64 twin takes over, as where a pivot must be perturbed (it solves,
            # or says SingularError where H + eps I is singular)
            self.factors, self.inertia = [None] * len(op._swept().blocks), Inertia(0, 0, op.shape[0])
            self.positive_definite, overflowed = False, True
        self.perturbed: dict[int, int] = {
            l: f.pivot.perturbed for l, f in enumerate(self.factors) if f is not None and f.pivot.perturbed
        }
        # (a modified factorization's pivots count M's eigenvalues, not those of H + eps I: recounted)
        # G + eps I positive definite by construction (GaussNewton._positive_definite_at) whose sweep found a
        # pivot that is not: its counts, log-determinant and unrefined sums are rounding (stage blocks of
        # order 1 around a G of 1e-9), so the pivots are not taken as exact; recounted (by construction)
        self._rounding_dominated = (
            not self.positive_definite and not modify and not overflowed and op._positive_definite_at(damping)
        )
        if self._rounding_dominated:
            self.positive_definite = True
        self._certified = (
            not self.perturbed and not overflowed and not self._pivots_modified and self._well_pivoted()
        )
        self._recount_due = not self._certified  # the pivots' counts are not exact
        if modify:  # (the sweep's answer is M's, positive definite by construction)
            self.positive_definite = not self._pivots_modified
        self.last_info: SolveInfo | None = None
        self._f64: Factorization | None = None
        self._dense: Tensor | None = None  # H + eps I in float64, formed if the dense fallback runs
        self._dense_sld: tuple[float, float] | None = None  # its (sign, log|det|), once computed
        self._twin_only = (bool(self.perturbed) or overflowed) and op.dtype != torch.float64 and not modify
        if self._twin_only:
            # a sweep below float64 that had to perturb pivots: cond(H + eps I) is near 1 / sqrt(u) of
            # the model dtype or beyond, where its factorization rarely preconditions refinement or
            # GMRES; the float64 twin is factored at once (solves, inertia and log-det come from it)
            self._f64 = Factorization(op._residual_operator(), damping)
            self._recount_due = True  # the twin's counts, when first read
            self.positive_definite = self._f64.positive_definite
        elif self.perturbed:
            self._check_nonsingular()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(damping={self._damping_text()}, n={self.op.shape[0]}, "
            f"dtype={self.op.dtype}, positive_definite={self.positive_definite})"
        )

    @property
    def inertia(self) -> Inertia:
        """``(negative, zero, positive)`` eigenvalue counts of ``H + eps I`` (Sylvester's law on the
        pivots; recounted when first read where the pivots cannot certify them: the class docstring)."""
        if self._recount_due:
            self._recount()
        return self._inertia

    @inertia.setter
    def inertia(self, value: Inertia) -> None:
        self._inertia = value

    @property
    def inertia_certified(self) -> bool:
        """Whether :attr:`inertia` is an exact count of the operator's own matrix (the class docstring
        says where it is not)."""
        if self._recount_due:
            self._recount()
        return self._certified

    @inertia_certified.setter
    def inertia_certified(self, value: bool) -> None:  # a subclass's own judgement: no recount
        self._certified, self._recount_due = value, False

    def _recount(self) -> None:
        """The exact inertia of ``H + eps I`` where the pivots' counts are not (see ``inertia``): the
        operator's count at ``eps`` with ``tol = 0`` (:meth:`CurvatureOperator._inertia_at`, what
        ``op.inertia(eps, tol=0)`` counts), certified unless it was left in doubt (``n`` above the dense
        recount's limit) or counted at the resolution (a pivot exactly singular at ``eps``: eigenvalues
        within ``sqrt(u) ||H||`` count as zero); where a float64 twin took over, its counts."""
        self._recount_due = False
        if self._f64 is not None:  # a float64 twin took over (a float32 sweep that perturbed a pivot)
            self._inertia, self._certified = self._f64.inertia, self._f64.inertia_certified
            return
        op = self.op
        op._count_doubt = False
        try:
            self._inertia = op._inertia_at(self.damping, 0.0)[0]
        except (SingularError, NonFiniteError):
            return
        finally:
            doubt, op._count_doubt = op._count_doubt, False
        self._certified = not doubt and not self._inertia.zero  # (a zero: counted at the resolution)

    def _pivots_exact(self) -> bool:
        """Whether the pivots are those of ``H + eps I`` to its backward error: none perturbed, each
        conditioned beyond ``sqrt(u)`` (:meth:`_well_pivoted`)."""
        return not self.perturbed and self._well_pivoted()

    def _well_pivoted(self) -> bool:
        """Whether every pivot's :meth:`~hessinv.riccati.Pivot.conditioning` is at least ``sqrt(u)`` of the
        sweep's precision (the counts and the log-determinant are then those of ``H + eps I`` up to its
        backward error)."""
        if getattr(self, "_rounding_dominated", False):
            return False
        floor = math.sqrt(torch.finfo(self._sweep_dtype).eps)
        return all(f.pivot.conditioning() >= floor for f in self.factors if f is not None)

    def _logdet_error(self) -> float:
        """An estimate of the sweep's log-determinant error without perturbed pivots: ``u / c^2`` for the
        smallest pivot conditioning ``c`` (:meth:`~hessinv.riccati.Pivot.conditioning`) -- a pivot's
        inverse is good to ``u / c``, and that error reaches the later Schur complements, whose small
        eigenvalues are again ``c`` of their scale (measured on a LayerNorm/BatchNorm/Conv1d chain with 17
        null directions: 4.6e-3 at c = 6.3e-8, 2.9e-4 at 4.2e-7, 6.9e-6 at 1.2e-6, 2.8e-9 at 7.8e-6, a
        probe; ``u / c^2`` bounds each). A bound, often far from sharp: 7.2e-6 where the sweep was 7e-12
        off on a dead-ReLU net -- the dense LU it sends :meth:`logdet` to is the cost of that (``n <=``
        :data:`DENSE_FALLBACK_N`), and the warning above it is kept for estimates beyond 1e-4."""
        if getattr(self, "_rounding_dominated", False):
            return math.inf
        c = min((f.pivot.conditioning() for f in self.factors if f is not None), default=1.0)
        return torch.finfo(self._sweep_dtype).eps / max(c, 1e-300) ** 2

    def _check_nonsingular(self, unsolved: bool = True) -> None:
        """Raise :class:`SingularError` where ``H + eps I`` is singular to working precision: a random
        right-hand side ``b`` is not solved to a relative residual of ``sqrt(u)``, and (a) its residual
        is above 1e-2 and more than 10x what a backward-stable solve leaves (``u |A| |x| / |b|``: no
        solution was found), (b) a second solve, with ``x / |x|`` as right-hand side (one step of power
        iteration on ``A^-1``, into the near-null space), leaves 0.5 or more, or (c) the cond estimate
        ``|A| |A^-1 x| / |x|`` exceeds ``1 / u`` (``|A|`` from :meth:`CurvatureOperator.norm_estimate`).
        Without ``unsolved``, (a) is not asked (a factorization without perturbed pivots whose solve
        failed: a broken sweep is not a singular matrix). Above :data:`DENSE_FALLBACK_N`, where the
        dense matrix fits (:meth:`_dense_fits`), a refusal is confirmed by the same probe with a dense
        LU (GMRES can stall on the second right-hand side of a nonsingular system), and where the LU
        solves it, later solves go to the LU (not for shift-invert's factorizations, ``_rescue=False``).
        A nonsingular system of cond 1e8-1e15 leaves a
        residual above ``sqrt(u)`` (about ``u cond``, as any backward-stable solver's) and is solved, not
        refused (the solve reports its residual); on 443 probed perturbed factorizations (eps =
        -lambda_i + 0 / 1e-14 / 1e-13 |H| on saturated tanh chains, dead-ReLU and one-example
        Gauss-Newton matrices) the refusals and acceptances that disagree with cond against 1 / u were
        all within 3x of 1 / u. The first solve stops early, before a Krylov method or after GMRES, where
        its iterate already proves ``sigma_min <= 11 u |A|`` (:meth:`_shows_singular`), and the second is
        not run where ``|A| |x| / |b|`` alone reaches ``1 / u`` (refused whatever it leaves). On a review's
        1256 probed cases two decisions moved, at cond 1.06 / u and 0.65 / u; the latter came from an early
        exit on the second right-hand side, withdrawn."""
        g = torch.Generator(device="cpu").manual_seed(0)
        b = torch.randn(self.op.shape[0], 1, generator=g, dtype=torch.float64)
        u = torch.finfo(self.op.dtype).eps

        def probe(solve: Callable[[Tensor, bool], tuple[Tensor, float]]) -> tuple[float, float, float, float]:
            """(residual of b, of x / |x|, cond estimate, a backward-stable residual) by ``solve`` (its second
            argument: whether this is the first right-hand side)."""
            x, residual = solve(b, True)
            xn = float(x.norm())
            cond, stuck, explained = math.inf, math.inf, 0.0
            if residual > math.sqrt(u) and math.isfinite(xn) and xn > 0:
                norm = self.op.norm_estimate() + self._damping_scale()
                explained = 10 * u * norm * xn / float(b.norm())  # a backward-stable residual, 10x over
                cond = norm * xn / float(b.norm())
                if cond * u >= 1:
                    # |A| |x| / |b| alone puts the cond estimate at 1 / u or beyond: refused whatever the
                    # second solve leaves (a 64-stage tanh chain's Hessian at eps = 0: 38 s of GMRES spared)
                    return residual, math.nan, cond, explained
                # one step of power iteration on A^-1 = (H + eps I)^-1 from x = A^-1 b, which leans
                # toward the eigenvectors of the smallest |eigenvalues|: A^-1 x is solved to a residual
                # of about u cond (a backward-stable solve: 0.02 at cond 1e14) where A is nonsingular,
                # and not at all (about 1) where A is singular to working precision (x / |x| then lies
                # in its null space, outside its range), whatever b's share of that space (1 / sqrt(n)
                # for a random b: the first residual alone cannot tell); |A^-1 x| / |x| estimates
                # 1 / min|lambda|
                y, stuck = solve(x / xn, False)
                cond = max(cond, norm * float(y.norm()))
            # (else no solution was found, x too small to explain the residual)
            return residual, stuck, cond, explained

        def refused(residual: float, stuck: float, cond: float, explained: float) -> bool:
            found = not unsolved or residual < 1e-2 or residual <= explained
            return residual > math.sqrt(u) and not (found and stuck < 0.5 and cond * u < 1)

        krylov = [0]  # (the probe's Krylov iterations, for the message)

        def by_sweep(r: Tensor, first: bool) -> tuple[Tensor, float]:
            # (the early exit on the first right-hand side only: the second's verdict -- stuck < 0.5, |y|
            # -- was calibrated on solved iterates, and an unsolved y refused a system of cond 0.65 / u)
            x, info = self._solve64(r, max_refine=5, singular_exit=first)
            krylov[0] += info.krylov_iterations
            return x, info.residual

        residual, stuck, cond, explained = verdict = probe(by_sweep)
        if self._f64 is not None:  # float32 sweep too inaccurate: the float64 factorization's counts
            self._recount_due = True  # the twin's counts, when first read
            self.positive_definite = self._f64.positive_definite
        n = self.op.shape[0]
        found = not unsolved or residual < 1e-2 or residual <= explained
        if (
            refused(*verdict)
            and found  # only the second solve stalled, at a cond estimate below 1 / u (a singular
            and cond * u < 1  # matrix: first residuals 30-60, cond estimates 1e18 -- no dense LU to pay)
            and self._shift_rescue  # (shift-invert's bare sweep: refused, the next shift tried)
            and self._dense_lu is None
            and n > DENSE_FALLBACK_N
            and self._dense_fits(n)
        ):
            # above the dense fallback a stalled GMRES (a right-hand side in the near-null space of a
            # nonsingular H + eps I of cond 3e9, n = 4575: 0.91 by the shifted sweep) is not evidence of
            # singularity: the dense LU decides where it fits, and later solves go to it (as a stalled
            # solve's many columns do)

            def by_lu(r: Tensor, first: bool) -> tuple[Tensor, float]:
                x = self._dense_solve(r)
                if x is None:  # LU met an exact zero pivot
                    return torch.zeros_like(r), 1.0
                return x, float((r - self._apply64(x)).norm() / r.norm())

            dense = probe(by_lu)
            if not refused(*dense):
                self._rescued = True
                return
            residual, stuck, cond, explained = dense
        if not refused(residual, stuck, cond, explained):
            return  # nonsingular, ill-conditioned (cond below 1 / u): the solve reports its residual
        named = [f"{self._sweep_op._names[l]} ({c})" for l, c in sorted(self.perturbed.items())]
        if len(named) > 6:  # (a deep chain's: 163 stages, 5 KB, burying the advice at its end)
            total = sum(self.perturbed.values())
            named = [*named[:3], f"... {len(named) - 4} more ({total} eigenvalues in all) ...", named[-1]]
        stages = ", ".join(named)
        where = (
            f"{stages}: pivot Qxx perturbed at damping {self._damping_text()} (number of perturbed "
            "eigenvalues in parentheses), and H + eps I is singular to working precision"
            if self.perturbed
            else f"H + eps I at damping {self._damping_text()} is singular to working precision, though no "
            "Riccati pivot is (its null space spans stages)"
        )
        raise SingularError(
            f"{where}: a random "
            f"right-hand side still leaves relative residual {residual:.2e} after refinement"
            f"{', GMRES' if krylov[0] else ''}{' and a dense LU' if self._dense_lu is not None else ''} (a "
            f"backward-stable solve: below {max(explained, 1e-2):.2e})"
            + ("" if math.isnan(stuck) else f", and its solution as right-hand side {stuck:.2e}")
            + f" (cond estimate {cond:.2e}, 1 / u = {1 / u:.2e}). "
            "Choose another damping (eps > 0 for a Gauss-Newton matrix; eps > -H.min_eigenvalue() "
            "for a positive definite H + eps I)",
            stage=max(self.perturbed) if self.perturbed else None,
            damping=self.damping,
        )

    def _raw(self, R: Tensor) -> Tensor:
        """The bare sweep ``F^{-1} R``. Each column is first scaled by a power of two (exact) to unit
        max-norm and scaled back after: a residual of a tiny right-hand side (gradients of a deep chain
        can be ``1e-16``, their residuals ``1e-30``) would otherwise underflow inside a float32 sweep.
        A factorization that handed over to its float64 twin (see ``__init__``) sweeps with the twin's."""
        if self._twin_only:
            assert self._f64 is not None
            return self._f64._raw(R.double()).to(R.dtype)
        sop = self._sweep_op
        s = _pow2_scale(R)
        xs = riccati_solve(sop.blocks, self.factors, sop._split((R / s).to(sop.dtype)))
        return torch.cat(xs, dim=0).to(R.dtype) * s

    def _riccati_only(self, what: str) -> None:
        if getattr(self, "factors", None) is None:
            raise InvalidArgumentError(
                f"{what} needs the Riccati factorization: factor a scalar damping with "
                "method='riccati' (a per-parameter damping is factored through Woodbury only)"
            )
        self._unmodified(what)

    @property
    def _pivots_modified(self) -> bool:
        """Whether ``modify="abs"`` changed a pivot: the factorization is then not one of ``H + eps I``."""
        factors = getattr(self, "factors", None) or ()
        return bool(self.modified) and any(f.pivot.modified for f in factors if f is not None)

    def _unmodified(self, what: str) -> None:
        """Refuse ``what`` where pivots were modified (:attr:`_pivots_modified`)."""
        if self._pivots_modified:
            raise InvalidArgumentError(
                f"{what}: this factorization modified its pivots (modify='abs'), so it is not one of "
                "H + eps I; factor without modify"
            )

    def inverse_diagonal(self, tol: float = 1e-8) -> Tensor:
        """``diag((H + eps I)^{-1})`` (n,), by one forward sweep over the factors (selected inversion,
        :func:`~hessinv.riccati.riccati_inverse_diagonal`): about two factorizations' cost (more on stages
        wider than ``B d``: docs/applications.md), and its check a few refined solves (at depth 128, width
        16: 2.2 s in all against a 0.35 s factorization, linear in depth), where ``n`` solves with the
        identity's columns cost ``n`` times a solve's. For a positive definite ``H + eps I`` these are the
        marginal variances of ``N(theta, (H + eps I)^{-1})`` (a Laplace posterior's,
        :meth:`hessinv.laplace.Laplace.posterior_variance`); ``[(H + eps I)^{-1}]_qq`` is also what Optimal
        Brain Surgeon's saliency ``w_q^2 / (2 [H^{-1}]_qq)`` divides by.

        The sweep is not refined, and where pivots are ill-conditioned (an indefinite shift inside the
        spectrum, a small damping on a wide stage) it loses digits beyond ``cond u``: its result is checked
        at a few entries per stage (:data:`INVERSE_DIAGONAL_PROBES`, at most
        :data:`INVERSE_DIAGONAL_MAX_PROBES` in all, and its largest) against refined
        solves with those columns of the identity, and taken where they agree to a tenth of ``tol`` of its
        largest entry (or of ``100 u cond``, or of the solves' own error, if larger:
        :meth:`_inverse_diagonal_checks`). Elsewhere -- a failed
        check, a perturbed pivot -- it comes from the dense float64 inverse (``n <=``
        :data:`DENSE_ROUTE_MAX_N`, or up to :data:`DENSE_RESCUE_N` where it fits in memory) or from
        refined solves with all ``n`` columns of the identity (``n / 256`` batched solves: minutes for a
        large model). ``tol`` is relative to the largest entry: at a
        tiny damping (``1 / eps`` variances in the curvature's null space dominate) the small entries may
        keep few digits. Below float64 (a float32 operator, ``precision="mixed"``) from the float64
        twin's factorization. :class:`SingularError` where ``H + eps I`` is singular to working precision;
        refused for a modified (``modify="abs"``) factorization (:class:`WoodburyFactorization` has its own).

        >>> import torch, hessinv
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
        >>> X, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
        >>> H = hessinv.hessian(net, torch.nn.CrossEntropyLoss(), X, y)
        >>> F = H.factor(0.1)
        >>> A = H.to_dense() + 0.1 * torch.eye(H.shape[0], dtype=torch.float64)
        >>> torch.allclose(F.inverse_diagonal(), torch.linalg.inv(A).diagonal())
        True
        """
        return self._public(self._inverse_diagonal(tol))

    def _inverse_diagonal(self, tol: float) -> Tensor:
        """:meth:`inverse_diagonal` in the stages' order."""
        tol = _check_tol(tol, "tol", relative=True)
        self._riccati_only("inverse_diagonal")
        if self._twin_only or self._sweep_dtype != torch.float64:
            return self._float64().inverse_diagonal(tol).to(self.op.dtype)
        if self._dense_inverse_cheaper():
            return self._inverse_diagonal_by_solves()
        if not self.perturbed:
            d = torch.cat(riccati_inverse_diagonal(self._sweep_op.blocks, self.factors))
            if bool(torch.isfinite(d).all()) and self._inverse_diagonal_checks(d, tol):
                return d.to(self.op.dtype)
        return self._inverse_diagonal_by_solves()

    def _inverse_diagonal_checks(self, d: Tensor, tol: float) -> bool:
        """Whether the sweep's ``d`` agrees with solves at :data:`INVERSE_DIAGONAL_PROBES` random entries of
        each stage (and at its largest entry) to a tenth of ``max|d|`` times the largest of ``tol``, ``100
        u cond`` and the solves' own forward error -- ``cond`` times their normwise backward error ``|r| /
        (||H + eps I|| ||x|| + |b|)`` (``cond >= ||H + eps I|| ||X||``, ``X`` the probes' solutions: a lower
        estimate). The tenth: the probes are a sample (a review found the worst of 687 entries 3x over
        the bound where the probes were within it). The solves are refined by at most three sweeps, no
        GMRES (whose residual target, relative to ``|b|``, a column ``e_j`` of an ill-conditioned system
        cannot reach: 17.8 s of GMRES for a check of a 0.012 s sweep). Where their own error exceeds 1e-2
        they cannot judge the sweep: False up to :data:`DENSE_ROUTE_MAX_N` parameters (the dense inverse,
        backward stable, answers); above, the sweep's ``d`` is kept with an
        :class:`~hessinv.AccuracyWarning`."""
        g = torch.Generator(device="cpu").manual_seed(0)
        per_stage, start = [], 0
        for l, size in enumerate(self._sweep_op._sizes):
            if size:
                # (a lookup table's probes among the rows its tokens read: the others' entry is 1 / eps
                # by construction, and nearly every probe landed there at a large vocabulary)
                f = self.factors[l] if l < len(self.factors) else None
                read = f.pivot.Qz if f is not None and getattr(f.pivot, "rows", False) else None
                pool = read.cpu() if read is not None and read.numel() and f.order is None else None
                n_pool = size if pool is None else pool.numel()
                pick = torch.randperm(n_pool, generator=g)[: min(n_pool, INVERSE_DIAGONAL_PROBES)]
                per_stage.append((start + (pick if pool is None else pool[pick])).tolist())
            start += size
        idx = [int(d.abs().argmax())] + [i for probes in per_stage for i in probes]
        if len(idx) > INVERSE_DIAGONAL_MAX_PROBES:  # (a sample of the stages': the check's solves of 4L
            # columns made inverse_diagonal quadratic in depth, 26x a factorization at depth 128; a probe) --
            # the worst-conditioned pivots' stages always among them (where the sweep loses digits)
            conditioning = [f.pivot.conditioning() for f in self.factors if f is not None]
            worst = sorted(range(len(per_stage)), key=conditioning.__getitem__)[
                :INVERSE_DIAGONAL_WORST_STAGES
            ]
            first = [idx[0]] + [i for s_ in worst for i in per_stage[s_]]
            rest = [i for i in idx[1:] if i not in set(first)]
            keep = torch.randperm(len(rest), generator=g)[: max(INVERSE_DIAGONAL_MAX_PROBES - len(first), 0)]
            idx = first + [rest[int(i)] for i in keep]
        idx = sorted(set(idx))
        E = _identity_columns(d.shape[0], idx, torch.float64, self.op.device)
        cols = torch.arange(len(idx))
        u = torch.finfo(torch.float64).eps
        norm = self.op.norm_estimate() + self._damping_scale()
        X = self._raw(E)
        R = E - self._apply64(X)
        for _ in range(3):  # refinement with float64 residuals, until backward stable (|e_j| = 1)
            if bool((R.norm(dim=0) <= 32 * u * (norm * X.norm(dim=0) + 1.0)).all()):
                break  # (each step is a sweep and a product over n columns: 30 s at n = 1.6e6, a probe)
            X = X + self._raw(R)
            R = E - self._apply64(X)
        res = R.norm(dim=0)
        exact = X[idx, cols].to(d)
        top = max(float(d.abs().max()), float(exact.abs().max()), torch.finfo(torch.float64).tiny)
        err = float((d[idx] - exact).abs().max()) / top
        cols_norm = X.norm(dim=0)
        cond = norm * max(top, float(cols_norm.max()))
        ref = cond * float((res / (norm * cols_norm + 1.0)).max())  # (|b| = 1)
        if not ref < 1e-2:  # (NaN included)
            if self.op.shape[0] <= DENSE_ROUTE_MAX_N:
                return False
            warn(
                f"inverse_diagonal at damping {self._damping_text()}: cond(H + eps I) >= {cond:.1e}, and "
                f"refined solves are good to {ref:.1e} only, so the sweep's diagonal could not be checked "
                f"(it agrees with them to {err:.1e} of its largest entry)",
                AccuracyWarning,
            )
            return True
        return err <= 0.1 * max(tol, 100 * u * cond, ref)

    def _dense_inverse_cheaper(self) -> bool:
        """Whether forming ``H`` and inverting it densely (``n^3`` flops after the products,
        :func:`_factorization_costs`) is cheaper than the forward sweep of :meth:`inverse_diagonal`, which
        costs about two factorizations of the chain (``n <=`` :data:`DENSE_ROUTE_MAX_N`; a factorization
        that took the dense route sweeps its one block instead). Measured, one thread: a 64-16-16-10 tanh
        MLP's Laplace posterior on 300 examples (``a = 4800 > n = 1482``), 1.4 s by the sweep against
        0.4 s dense; a 24-stage width-12 chain on 64 examples, 0.07 s against 2 s."""
        op, n = self.op, self.op.shape[0]
        if n > DENSE_ROUTE_MAX_N or op._swept() is not op:
            return False
        chain, dense = _block_costs(op.blocks)
        return 2 * chain > dense + float(n) ** 3

    def _dense_fits(self, n: int) -> bool:
        """Whether ``n <=`` :data:`DENSE_RESCUE_N` and ``H + eps I`` with its LU or inverse fits in memory:
        the inverse diagonal that the sweep cannot give then comes from the dense inverse, not from ``n``
        refined solves (a perturbed n = 7150 factorization: 13.5 s against 28-107 s by dense-LU solves 256
        columns at a time), and many stalled columns from the dense LU (:meth:`_dense_for_columns`)."""
        if n > DENSE_RESCUE_N:
            return False
        try:
            check_dense_memory(n, torch.float64, self.op.device, "the dense LU of H + eps I", 3.0)
        except TooLargeError:
            return False
        return True

    def _inverse_diagonal_by_solves(self) -> Tensor:
        """:meth:`inverse_diagonal` from the dense float64 inverse (``n <=`` :data:`DENSE_ROUTE_MAX_N`, or
        :meth:`_dense_fits`) or from refined solves with the identity's columns, 256 at a time
        (each warns as :meth:`solve` does where its residual is poor)."""
        n = self.op.shape[0]
        if self._dense_fits(n):
            A = self._dense_matrix()
            inv, info = torch.linalg.inv_ex(A)
            # LU rarely meets an exact zero pivot: singular to working precision where cond_1 >= 1 / u
            cond = max(float(torch.linalg.matrix_norm(A, 1)), self._damping_scale()) * float(
                torch.linalg.matrix_norm(inv, 1)
            )
            u = torch.finfo(torch.float64).eps
            if int(info) != 0 or not math.isfinite(cond) or cond * u >= 1:
                raise SingularError(
                    f"inverse_diagonal at damping {self._damping_text()}: H + eps I is singular to working "
                    f"precision (1-norm condition number {cond:.2e}, 1 / u = {1 / u:.2e}); choose another "
                    "damping (eps > -H.min_eigenvalue() for a positive definite H + eps I)",
                    damping=self.damping if isinstance(self.damping, float) else None,
                )
            return inv.diagonal().to(self.op.dtype)
        out = torch.empty(n, dtype=self.op.dtype, device=self.op.device)
        for j in range(0, n, 256):
            k = min(256, n - j)
            E = _identity_columns(n, range(j, j + k), self.op.dtype, self.op.device)
            out[j : j + k] = self._solve(E, True, 5)[torch.arange(j, j + k), torch.arange(k)]
        return out

    def inverse_quadratic(self, v: Tensor) -> float:
        """``v^T (H + eps I)^{-1} v`` for ``v`` of shape (n,): for the Riccati factorization
        ``sum_l k_l^T Qxx_l^{-1} k_l`` from the backward half of a solve alone (``H + eps I = U D U^T``
        gives ``v^T (U D U^T)^{-1} v = k^T D^{-1} k`` with ``k = U^{-1} v``), unrefined, where ``H + eps
        I`` is positive definite (a sum of positive terms) -- where it is indefinite (terms of both signs
        cancel), a pivot was perturbed or is ill-conditioned beyond ``sqrt(u)`` (that sum then carries an
        error of up to about ``u cond^2``: 46% at damping 1e-12 on a small tanh net), ``v^T x`` of a
        refined solve. For
        a float32 operator the sum is the float32 sweep's (about ``cond u32``: 8.5e-4 at cond 1e4): use
        ``v @ F.solve(v)`` for the float64-refined value. The Woodbury factorization (a per-parameter
        damping, or ``G + eps I`` through ``G``'s root) answers with ``v^T x`` of a refined solve always."""
        if isinstance(v, Tensor) and (v.dim() != 1 or v.shape[0] != self.op.shape[0]):  # (_as_matrix's
            # message would offer (n, k))
            raise ShapeMismatchError(
                f"v must have shape ({self.op.shape[0]},), one vector; got {tuple(v.shape)} (for the columns "
                "of a matrix V: (V * F.solve(V)).sum(0))"
            )
        R = self._stages(self.op._as_matrix(v, "v")[0])
        self._unmodified("inverse_quadratic")
        if self._twin_only:
            assert self._f64 is not None
            return self._f64.inverse_quadratic(R[:, 0].double())
        # v scaled by a power of two (exact) to unit max-norm: a float32 sum of v of 1e19 would overflow
        # (NaN), of 1e-20 underflow (0); the scale comes back squared in float64
        s = _pow2_scale(R)
        if (
            getattr(self, "factors", None) is None
            or not self._pivots_exact()
            or self._sweep_dtype != self.op.dtype  # a mixed-precision sweep: its float32 sum is ~ cond u32
            # an indefinite H + eps I: the sum's terms of both signs cancel (2.7e-7 off at cond 1e3, where
            # the refined solve's is exact: a fuzzer's find)
            or not self.positive_definite
        ):
            # Woodbury (one solve is good to about u cond(K), and K holds 1 / D_j: cond(K) can exceed
            # cond(G + D) by orders -- 18% off at one D_j = 1e-17 among 0.1s, cond(G + D) = 77), or a
            # sweep whose pivots cannot give the sum: v^T x of the refined solve, with its first-order
            # correction x^T r (r = v - (H + eps I) x: v^T (H + eps I)^-1 v = v^T x + x^T r + r^T (H + eps
            # I)^-1 r exactly). A scalar shows no residual: a refined residual above u^(1/4) raises (G +
            # 1e-30 I gave -1.8e18 where the truth is 3.8e31), above sqrt(u) warns as solve does
            R64 = (R / s).double()
            X64, info = self._solve64(R64, max_refine=5)
            q = float((R64 * X64).sum() + (X64 * (R64 - self._apply64(X64))).sum())
            u = torch.finfo(self.op.dtype).eps
            if info.residual > u**0.25 or not math.isfinite(q):
                raise SingularError(
                    f"inverse_quadratic at damping {self._damping_text()}: the refined solve reached "
                    f"relative residual {info.residual:.2e} only -- H + eps I is singular or nearly so at "
                    "working precision, and v^T (H + eps I)^-1 v has no reliable value; choose another "
                    "damping",
                    damping=self.damping if isinstance(self.damping, float) else None,
                )
            if info.residual > math.sqrt(u):
                warn(
                    f"inverse_quadratic at damping {self._damping_text()}: the refined solve reached "
                    f"relative residual {info.residual:.2e} only; the value carries an error of about that "
                    "relative size",
                    AccuracyWarning,
                )
        else:
            sop = self._sweep_op
            q = float(riccati_quadratic(sop.blocks, self.factors, sop._split((R / s).to(sop.dtype)))[0])
        out = q * float(s) * float(s)  # (float products overflow to inf, ** raises)
        if not math.isfinite(out):
            raise NonFiniteError(
                f"inverse_quadratic: v^T (H + eps I)^-1 v = {q:.3g} x {float(s):.3g}^2 overflows float64; "
                "it is quadratic in v: scale v down and the result back up"
            )
        return out

    def slogdet(self) -> tuple[float, float]:
        """``(sign, log|det(H + eps I)|)`` like :func:`torch.linalg.slogdet`: the sign is
        ``(-1)^(number of negative eigenvalues)`` (the inertia), the log from :meth:`logdet` (both from
        the dense fallback there). A factorization below float64 answers with its float64 twin's
        (:meth:`logdet`)."""
        if self._twin_only or self._logdet_from_twin():  # its sign, with its dense fallback where taken
            return self._float64().slogdet()
        value = self.logdet()  # (sets _dense_sld where the dense fallback gave it)
        dense = getattr(self, "_dense_sld", None)  # (subclasses without the fallback lack it)
        return (dense[0] if dense is not None else -1.0 if self.inertia.negative % 2 else 1.0), value

    def logdet(self) -> float:
        """``log|det(H + eps I)| = sum_l log|det Qxx_l|``, from the pivots alone (in float64).

        The sweep is a block congruence ``H + eps I = U D U^T`` with unit block-triangular ``U`` and
        ``D = diag(Qxx_l)``, so ``det(H + eps I) = prod_l det Qxx_l``. Where pivots were perturbed
        (``perturbed``) the product is that of a matrix within ``sqrt(u)`` of ``H + eps I``, whose
        smallest eigenvalues -- those that moved -- it does not know (solves recover from the
        perturbation by refinement; a determinant cannot), and where a pivot is ill-conditioned it carries
        an error of about ``u / c^2`` for the smallest pivot conditioning ``c`` (:meth:`_logdet_error`; 4.6e-3
        at ``c = 6.3e-8``, above ``sqrt(u)``): where that exceeds :data:`LOGDET_DENSE_ERROR`, systems of
        ``n <=`` :data:`DENSE_FALLBACK_N` take a dense float64 LU of ``H + eps I`` instead (formed by
        ``n`` products, as the solves' fallback), and perturbed ones up to :data:`DENSE_RESCUE_N` where
        the dense matrix fits in memory. Larger ones raise :class:`SingularError` (perturbed; also where
        LU finds the matrix singular) or warn (:class:`~hessinv.AccuracyWarning`, where the estimate
        exceeds :data:`LOGDET_WARN_ERROR`).
        """
        self._riccati_only("logdet")
        if self._twin_only or self._logdet_from_twin():
            return self._float64().logdet()
        dense = self._dense_slogdet()
        if dense is not None:
            return dense[1]
        if self.perturbed:
            stages = ", ".join(f"{self._sweep_op._names[l]} ({c})" for l, c in sorted(self.perturbed.items()))
            raise SingularError(
                f"logdet at damping {self._damping_text()}: pivot eigenvalues below sqrt(u) max|Qxx| were "
                f"perturbed at {stages} (the sweep does not pivot across stages), so the factorization "
                f"is not one of H + eps I and its log-determinant would be that of another matrix (n = "
                f"{self.op.shape[0]} is above the dense LU's {DENSE_RESCUE_N}, or its matrix does not fit "
                "in memory). Choose a larger damping",
                stage=max(self.perturbed),
                damping=self.damping if isinstance(self.damping, float) else None,
            )
        error = self._logdet_error()
        if error > LOGDET_WARN_ERROR:
            warn(
                f"logdet at damping {self._damping_text()}: a Riccati pivot is ill-conditioned (the sweep "
                f"does not pivot across stages), so the log-determinant carries an error of up to about "
                f"{min(error, 1e300):.1e} (u / c^2 for the smallest pivot conditioning c; n = "
                f"{self.op.shape[0]} is above the dense LU's {DENSE_FALLBACK_N}); choose a larger damping",
                AccuracyWarning,
            )
        return float(sum(f.pivot.logdet() for f in self.factors if f is not None))

    def _logdet_from_twin(self) -> bool:
        """Whether :meth:`logdet` comes from the float64 twin: a sweep below float64 sums ``n``
        logarithms of pivots each good to about ``u cond`` of its own precision (a float32 tanh net at
        cond 4e4: 1.8e-2 off in -621.07, with every pivot well conditioned), which no float64 user of a
        log-determinant (the Laplace evidence, a log-likelihood) expects. With ``modify``, where no pivot
        was modified (``M = H + eps I``: a float32 ``modify="abs"`` factorization summed its own pivots,
        3.5e-2 off where the plain one was 4e-12, a probe)."""
        return (
            getattr(self, "factors", None) is not None
            and not self._pivots_modified
            and self._sweep_dtype != torch.float64
            and self.op.dtype != torch.float64
        )

    def _dense_slogdet(self) -> tuple[float, float] | None:
        """``(sign, log|det(H + eps I)|)`` by a dense float64 LU where the sweep's pivots cannot give it
        accurately (perturbed, or an error estimate above :data:`LOGDET_DENSE_ERROR`) and ``n <=``
        :data:`DENSE_FALLBACK_N` (perturbed: :meth:`_dense_fits`); None where the pivots can (or ``n`` is
        larger). Raises
        :class:`SingularError` where LU finds ``H + eps I`` singular to working precision: a pivot of
        ``U`` at most ``u max|H + eps I| / n`` (partial pivoting keeps ``|L_ij| <= 1``, so
        ``sigma_min(H + eps I) <= n min|U_ii|``, and then ``cond(H + eps I) >= 1 / u``)."""
        if self._dense_sld is not None:  # the LU is not repeated by a second call
            return self._dense_sld
        if self._twin_only or (not self.perturbed and self._logdet_error() <= LOGDET_DENSE_ERROR):
            return None
        n = self.op.shape[0]
        # perturbed pivots give another matrix's determinant: a dense LU rather than a refusal wherever
        # it fits (up to DENSE_RESCUE_N, minutes at the top of that range); an ill-conditioned pivot only
        # warns above DENSE_FALLBACK_N (its product is still the determinant of a nearby matrix)
        if n > DENSE_FALLBACK_N and not (self.perturbed and self._dense_fits(n)):
            return None
        return self._lu_slogdet()

    def _lu_slogdet(self) -> tuple[float, float]:
        """:meth:`_dense_slogdet`'s dense LU (kept in ``_dense_sld``), whatever the pivots."""
        A = self._dense_matrix()
        LU, piv, _ = torch.linalg.lu_factor_ex(A)  # an exactly zero pivot is judged below
        u = LU.diagonal()
        n = A.shape[0]
        # (|eps| too: H + eps I is formed with rounding u |eps| at least; a shift that cancels H leaves
        # entries of rounding size that would measure themselves)
        small, top = float(u.abs().min()), max(float(A.abs().max()), self._damping_scale())
        eps = torch.finfo(A.dtype).eps
        singular, ratio = not small > eps * top / n, None  # (also NaN)
        if not singular and small <= math.sqrt(eps) * top:
            # a pivot at rounding level need not mean a singular matrix, nor its absence a nonsingular
            # one (a blocked, multithreaded LU of a matrix with two equal rows left a pivot of rounding
            # size): decide by the singular values, cond >= 1 / (8 u) -- svdvals' own error is a small
            # multiple of u sigma_max
            sv = torch.linalg.svdvals(A)
            ratio = float(sv[-1]) / max(float(sv[0]), self._damping_scale())
            singular = not ratio > 8 * eps
        if singular:
            extra = "" if ratio is None else f", sigma_min / sigma_max = {ratio:.3g}"
            raise SingularError(
                f"logdet at damping {self._damping_text()}: H + eps I is singular to working precision (a "
                f"dense LU of it, n = {n}, has a pivot of {small:.3g} against max|H + eps I| = {top:.3g}"
                f"{extra}); choose another damping",
                damping=self.damping if isinstance(self.damping, float) else None,
            )
        swaps = int((piv != torch.arange(1, n + 1, dtype=piv.dtype, device=piv.device)).sum())
        negative = int((u < 0).sum())
        self._dense_sld = (-1.0 if (swaps + negative) % 2 else 1.0), float(u.abs().log().sum())
        return self._dense_sld

    def inverse_sqrt(self, Z: Tensor) -> Tensor:
        """``S Z`` for an ``n x n`` square root ``S S^T = (H + eps I)^{-1}``; ``Z``: (n,) or (n, k).

        With ``Qxx_l = C_l C_l^T`` (each pivot's Cholesky factor, or ``V lambda^{1/2}``) the sweep's
        congruence ``H + eps I = U D U^T`` is ``(U C)(U C)^T``, and ``S = (U C)^{-T}``: one triangular
        solve per pivot, then the forward half of a solve. (``S`` depends on the stages' internal row
        order; ``S S^T`` does not.) Raises :class:`IndefiniteError` unless ``H + eps I`` is positive
        definite.
        """
        R, vec = self.op._as_matrix(Z, "Z")  # (before the twin's branch: it takes R as checked here)
        R = self._stages(R)
        self._riccati_only("inverse_sqrt")
        if self.inertia.negative:
            raise IndefiniteError(
                f"H + eps I at damping {self._damping_text()} has {self.inertia.negative} negative "
                "eigenvalues: no Gaussian with this precision exists; use the Gauss-Newton matrix or a "
                "larger damping"
            )
        X = _linear_scaled(self._inverse_sqrt, R, f"inverse_sqrt at damping {self._damping_text()}: S Z")
        X = self._public(X)
        return X[:, 0] if vec else X

    def _inverse_sqrt(self, R: Tensor) -> Tensor:
        """:meth:`inverse_sqrt` of ``R`` (n, k)."""
        if self._twin_only:
            assert self._f64 is not None
            return self._f64.inverse_sqrt(R.double()).to(self.op.dtype)
        if not self._pivots_exact():
            L = self._dense_cholesky("inverse_sqrt")
            if L is not None:  # S = L^{-T} for H + eps I = L L^T
                return torch.linalg.solve_triangular(L.mT, R.double(), upper=True).to(R.dtype)
        sw = self.op._swept()
        zs = sw._split(R)
        ks = [None if f is None else f.pivot.inverse_sqrt(z) for f, z in zip(self.factors, zs, strict=True)]
        return torch.cat(riccati_forward(sw.blocks, self.factors, ks), dim=0)

    def _dense_cholesky(self, what: str) -> Tensor | None:
        """The Cholesky factor ``L`` of the dense float64 ``H + eps I`` (``n <=`` :data:`DENSE_FALLBACK_N`),
        for where the sweep's pivots were perturbed or are ill-conditioned beyond ``sqrt(u)`` (a square
        root from them is then another matrix's: ``|A S S^T A - A| / |A|`` 1e3 at damping 1e-12 on a
        small tanh net); larger systems warn (:class:`~hessinv.AccuracyWarning`) and get None.
        :class:`SingularError` where the dense matrix has no Cholesky factor (positive definite only to
        rounding)."""
        if self.op.shape[0] > DENSE_FALLBACK_N:
            warn(
                f"{what} at damping {self._damping_text()}: a Riccati pivot was perturbed or is "
                "ill-conditioned beyond sqrt(u) (the sweep does not pivot across stages), so the square "
                f"root is that of a nearby matrix (n = {self.op.shape[0]} is above the dense fallback's "
                f"{DENSE_FALLBACK_N}); choose a larger damping",
                AccuracyWarning,
            )
            return None
        if getattr(self, "_dense_chol", None) is None:
            L, info = torch.linalg.cholesky_ex(self._dense_matrix())
            if int(info):
                raise SingularError(
                    f"{what} at damping {self._damping_text()}: H + eps I is positive definite only to "
                    "rounding (a dense Cholesky of it fails): no Gaussian with this precision can be "
                    "sampled accurately; choose a larger damping",
                    damping=self.damping if isinstance(self.damping, float) else None,
                )
            self._dense_chol = L
        return self._dense_chol

    def sample(self, k: int = 1, generator: torch.Generator | None = None) -> Tensor:
        """``k`` independent samples of ``N(0, (H + eps I)^{-1})``, the columns of an (n, k) tensor:
        ``S z`` for white ``z`` (:meth:`inverse_sqrt`)."""
        self._unmodified("sample")  # (refused by inverse_sqrt too, under the name the caller did not use)
        return self.inverse_sqrt(self._white(self.op.shape[0], k, generator))

    def _white(self, rows: int, k: object, generator: torch.Generator | None) -> Tensor:
        """``k`` columns of white noise (``rows`` each) for :meth:`sample`, on the operator's device."""
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise InvalidArgumentError(f"k (the number of samples) must be an integer >= 1, got {k!r}")
        check_generator(generator)
        # (the noise, the samples and a solve's transients: torch's allocator error before, 208 TB)
        need = 3 * rows * int(k) * torch.empty(0, dtype=self.op.dtype).element_size()
        free = _memory_bytes(self.op.device)
        if free is not None and need > free:
            raise TooLargeError(
                f"{k} samples of {rows} parameters need about {need / 2**30:.3g} GiB, and {free / 2**30:.3g} "
                "GiB of the device's memory is available: draw them in smaller batches"
            )
        dev = generator.device if generator is not None else self.op.device
        z = torch.randn(rows, int(k), generator=generator, dtype=self.op.dtype, device=dev)
        return z.to(self.op.device)

    def _damping_text(self) -> str:
        return f"{self.damping:g}"

    def _damping_scale(self) -> float:
        """``max |eps|`` (of a per-parameter damping, its largest entry): ``H + eps I`` is formed with
        rounding ``u |eps|`` at least, the scale that singularity is judged against where the shift
        cancels ``H``."""
        D = self.damping
        return float(D.abs().max()) if isinstance(D, Tensor) else abs(float(D))

    def _shift(self, X: Tensor) -> Tensor:
        """``eps X`` (the damping's part of ``(H + eps I) X``)."""
        return self.damping * X

    def _solve64(
        self,
        R64: Tensor,
        max_refine: int,
        X64: Tensor | None = None,
        float64: bool = False,
        singular_exit: bool = False,
    ) -> tuple[Tensor, SolveInfo]:
        """Refined solve of ``(H + eps I) X = R64`` in float64; returns ``X`` (float64) and its info. Each
        column is scaled by a power of two (exact) to unit max-norm first, so that the residual norms
        neither overflow (a right-hand side of 1e200: the residual was NaN) nor underflow (1e-300: 0,
        and refinement skipped). ``singular_exit`` (:meth:`_check_nonsingular`'s probe): no Krylov
        method after refinement where the iterate already shows ``H + eps I`` singular to working
        precision (:meth:`_shows_singular`)."""
        s = _pow2_scale(R64)
        X, info = self._solve64_unit(
            R64 / s, max_refine, None if X64 is None else X64 / s, float64, singular_exit
        )
        return X * s, info

    def _shows_singular(self, X64: Tensor, rel: float, rnorm: Tensor) -> bool:
        """Whether an iterate ``x`` of relative residual ``rel`` proves ``A = H + eps I`` singular to working
        precision: ``rel <= 10 u |A| |x| / |b|`` (what rounding of ``x``'s own size explains) and ``|A| |x|
        / |b| >= 1 / u`` -- ``x`` solves a system within ``10 u |A|`` of ``A`` and ``|b| / |x| <= u |A|``,
        so ``sigma_min(A) <= 11 u |A|`` (``u`` of the model's dtype, ``|A|`` estimated by power
        iteration): :meth:`_check_nonsingular`'s refusal, whatever a Krylov method would add."""
        u = torch.finfo(self.op.dtype).eps
        if not self.perturbed or not rel > math.sqrt(u):  # (solved: no norm estimate's products)
            return False
        size = float((X64.norm(dim=0) / rnorm).min()) * (self.op.norm_estimate() + self._damping_scale())
        return math.isfinite(size) and rel <= 10 * u * size and size * u >= 1

    def _solve64_unit(
        self,
        R64: Tensor,
        max_refine: int,
        X64: Tensor | None = None,
        float64: bool = False,
        singular_exit: bool = False,
    ) -> tuple[Tensor, SolveInfo]:
        """:meth:`_solve64` on right-hand sides of unit max-norm."""
        if self._twin_only and not float64:  # see __init__
            assert self._f64 is not None
            return self._f64._solve64(R64, max_refine, X64, float64=True, singular_exit=singular_exit)
        op64 = self.op._residual_operator()
        dtype = self.op.dtype
        low = self._sweep_dtype != torch.float64 and not float64  # a float64 factorization can take over
        rnorm = R64.norm(dim=0).clamp_min(torch.finfo(torch.float64).tiny)
        if self._rescued and self._dense_lu is not None and not low:
            # an earlier solve needed the dense LU: this one goes there at once (its refinement by this
            # sweep stalls; inverse_diagonal's n columns by solves of 256 at a time, n = 7150: 107 s -> 54 s)
            X2 = self._dense_solve(R64)
            if X2 is not None:
                rel2 = float(((R64 - self._apply64(X2)).norm(dim=0) / rnorm).max())
                return X2, SolveInfo(rel2, 0, 0)
        if X64 is None:
            X64 = self._raw(R64.to(dtype)).double()

        apply = self._apply64

        def residual(X_: Tensor) -> tuple[Tensor, float]:
            res = R64 - apply(X_)
            return res, float((res.norm(dim=0) / rnorm).max())

        res, rel = residual(X64)
        steps = 0
        # float64 models: as accurate as float64 residuals allow -- 16 u (3.6e-15): a float64 residual
        # of a matrix with thousands of entries per row carries rounding of about that size itself,
        # so a tighter target only buys a last sweep and product that stall (mixed-precision influence
        # scores: 1.2e-15 after two steps, a third step no better). Below float64 the returned x is
        # rounded to the model dtype anyway; the float64 iterate stops at 1e-13 (each further step
        # is a sweep plus a float64 product for digits the caller never sees)
        target = 16 * torch.finfo(torch.float64).eps if dtype == torch.float64 else 1e-13
        krylov_above = 1e-14 if dtype == torch.float64 else 1e-13
        stalled = False
        while steps < max_refine and rel > target:
            cand = X64 + self._raw(res.to(dtype)).double()
            res_c, rel_c = residual(cand)
            if not rel_c < 0.9 * rel:
                stalled = True
                break
            slow = rel_c > 0.1 * rel  # contraction ~ cond(H + eps I) u of the sweep
            halved = rel_c <= 0.5 * rel
            X64, res, rel, steps = cand, res_c, rel_c, steps + 1
            if not low and not halved and rel <= krylov_above:
                # below 1e-14 and contracting by less than 2x: rounding, not error, is left (LAPACK's
                # xGERFS stops there too); a further step (a sweep and a product) would buy noise
                break
            if low and slow and rel > 1e-12:
                # a float32 sweep contracting by less than 10x per step (cond u32 >~ 0.1): GMRES with it
                # as preconditioner (below) needs fewer sweeps and float64 products than the steps left
                stalled = True
                break
        if singular_exit and self._shows_singular(X64, rel, rnorm):
            # (a rank-64 Gauss-Newton matrix of a 16-stage chain at eps = 0: refused in 8.7 s, 7.x of them
            # GMRES and the shifted sweep's, before)
            return X64, SolveInfo(rel, steps, 0)
        its = 0
        # refinement stalled above float64 accuracy, ran out of steps, or is slow on a perturbed
        # factorization (a preconditioner by design): flexible GMRES, with F as preconditioner (a
        # sweep below float64: the capped GMRES below, then the float64 twin)
        krylov = not low and (stalled or self.perturbed or steps >= max_refine) and rel > krylov_above
        if krylov and stalled and not self.perturbed:
            # stalled at the rounding of the residual itself -- a column within 32 u ||A|| ||x_j|| / ||b_j||
            # is solved as a backward-stable solve can -- nothing gets below it: a Laplace predictive's
            # 2000 columns (n = 3466) stalled at 2.7e-14, went to a dense LU (3.4 s of a 7.5 s solve), and
            # came back at 2.4e-14
            norm = op64._rough_norm() + self._damping_scale()
            floor = 32 * torch.finfo(torch.float64).eps * norm * X64.norm(dim=0) / rnorm
            krylov = bool((res.norm(dim=0) / rnorm > torch.clamp(floor, min=krylov_above)).any())
        if krylov and self._dense_for_columns(res, rnorm, krylov_above, self.op.shape[0] / 64):
            # GMRES column by column on many columns of a small system (self-influence scores of 4000
            # examples at n = 778, indefinite: 1297 iterations, 9.5 s): one dense LU instead (0.2 s)
            X2 = self._dense_solve(R64)
            if X2 is not None:
                X64 = X2
                res, rel = residual(X64)
                krylov = False
                self._rescued = True  # (later solves: to the dense LU at once)
        if krylov and not self._rescued:
            its = self._gmres_columns(apply, R64, X64, res, rnorm, krylov_above, 30, 4)
            res, rel = residual(X64)
        if rel > 1e-12 and low and self._f64 is None:
            # refinement by a float32 sweep slow, stalled or out of steps (cond(H + eps I) u32 >~ 0.1):
            # flexible GMRES on the float64 operator, preconditioned by the sweep, still converges in a
            # few iterations (GMRES-IR, Carson & Higham 2018); capped per column below the cost of the
            # float64 twin it spares, and stopped early where its rate cannot reach the target (1e-13;
            # 1e-14 for precision="mixed") within 1.25 times the cap (LOW_GMRES_ITERATIONS). A column
            # left above 1e-12 hands every column over
            cap = LOW_GMRES_ITERATIONS
            its += self._gmres_columns(apply, R64, X64, res, rnorm, krylov_above, cap, 1, True, 1e-12)
            res, rel = residual(X64)
        if rel > 1e-12 and low:
            # a float32 factorization too inaccurate to precondition even GMRES (or one whose float64
            # twin is already factored): solve with the float64 twin's factorization (factored once, kept)
            X2, info2 = self._float64()._solve64(R64, max_refine, float64=True)
            if info2.residual < rel:
                return X2, SolveInfo(
                    info2.residual, steps + info2.refinement_steps, its + info2.krylov_iterations
                )
        if its and singular_exit and self._shows_singular(X64, rel, rnorm):
            # (GMRES's iterate shows it: no dense LU, no shifted sweep)
            return X64, SolveInfo(rel, steps, its)
        stalled_column = False
        if its and not low and 1e-12 < rel <= DENSE_FALLBACK_ABOVE and op64.shape[0] <= DENSE_FALLBACK_N:
            # GMRES stalled on a column far above what a backward-stable solve leaves (u ||A|| ||x_j|| /
            # ||b_j||): below DENSE_FALLBACK_ABOVE, yet its error is cond times that (two columns of a
            # perturbed factorization at cond 4.3e8: the gradient at 4.8e-9, error 1.4e-2, where alone
            # it reached 1e-14, a probe) -- the dense LU at this size
            norm = op64._rough_norm() + self._damping_scale()
            floor = 1e3 * torch.finfo(torch.float64).eps * norm * X64.norm(dim=0) / rnorm
            stalled_column = bool((res.norm(dim=0) / rnorm > torch.clamp(floor, min=1e-12)).any())
        if (rel > DENSE_FALLBACK_ABOVE or stalled_column) and not low:
            # refinement and GMRES both failed (a perturbed sweep whose 1 / tau directions make the
            # Krylov basis too ill-conditioned): at this size a dense LU of H + eps I decides (backward
            # stable, its residual one that any float64 product confirms); above it, GMRES preconditioned
            # by a sweep at a larger damping that is stable (_shifted_gmres)
            if op64.shape[0] <= DENSE_FALLBACK_N or self._dense_for_columns(res, rnorm, DENSE_FALLBACK_ABOVE):
                X2 = self._dense_solve(R64)
            else:
                X2, its2 = self._shifted_gmres(apply, R64, X64, res, rnorm, krylov_above)
                its += its2
            if X2 is not None:
                res2, rel2 = residual(X2)
                if rel2 < rel:
                    X64, rel = X2, rel2
                    # later solves go to this route at once: GMRES with the factorization itself (up to
                    # 120 iterations a column) is known to stall (inverse_diagonal's n columns: hours)
                    self._rescued = True
        return X64, SolveInfo(rel, steps, its)

    #: whether a solve needed the dense LU or the shifted sweep (then later ones skip GMRES with this one)
    _rescued = False

    #: whether :meth:`_shifted_gmres` may run (a Riccati sweep with a scalar damping)
    _shift_rescue = True
    #: the shifted sweep that preconditions GMRES where this one fails (:meth:`_shifted_gmres`); False:
    #: none did, and none is tried again
    _shift_prec: Factorization | Literal[False] | None = None

    def _dense_for_columns(self, res: Tensor, rnorm: Tensor, above: float, columns: float = 0.0) -> bool:
        """Whether a solve whose refinement stalled (residual above ``above``) on at least ``max(columns,``
        :data:`DENSE_RESCUE_COLUMNS` ``)`` columns -- an inverse diagonal, a posterior covariance,
        self-influence scores -- goes to a dense LU instead of GMRES column by column: its ``n`` products
        and ``n^3 / 3`` flops, once (the LU is kept), against up to a few hundred GMRES iterations per
        column (n = 7150 above the dense fallback, :meth:`_shifted_gmres`: 1.2 s a column,
        ``inverse_diagonal`` 2.8 h) -- up to :data:`DENSE_RESCUE_N` and where the matrix and its LU fit in
        memory."""
        if self.op.shape[0] > DENSE_RESCUE_N:
            return False
        if self._dense_lu is not None:
            return True
        stalled = int((res.norm(dim=0) / rnorm > above).sum())
        return stalled >= max(columns, DENSE_RESCUE_COLUMNS) and self._dense_fits(self.op.shape[0])

    def _shifted_gmres(
        self,
        apply: Callable[[Tensor], Tensor],
        R64: Tensor,
        X64: Tensor,
        res: Tensor,
        rnorm: Tensor,
        tol: float,
    ) -> tuple[Tensor | None, int]:
        """Flexible GMRES on ``(H + eps I) x = b`` preconditioned by the sweep of ``H + (eps + delta) I``
        (float64, no pivot perturbed), for a factorization whose own sweep failed to precondition it and
        a system above the dense LU's size (:data:`DENSE_FALLBACK_N`).

        Where the elimination order across stages is unstable at ``eps`` -- a cluster of eigenvalues of
        ``H`` at zero (an over-parameterized net on a small batch) leaves pivots with eigenvalues near
        ``eps`` coupled to the stages before them, and the perturbation that makes the sweep stable is
        of rank in the thousands, beyond what GMRES can recover -- the shifted matrix ``M = H + (eps +
        delta) I`` is factored stably, and ``M^{-1} (H + eps I)`` has eigenvalues ``(lambda + eps) /
        (lambda + eps + delta)``: the whole cluster at one point ``~ eps / delta``, the rest near 1 where
        ``|lambda| >> delta``, so GMRES converges in a few dozen iterations (measured: a 20-60-60-10 tanh
        MLP's Hessian on 8 examples, n = 5530 with 3650 zero eigenvalues, eps = 1e-8 to 1e-12 ||H||:
        residuals 8e-9 to 8e-5, 40-80x below the dense LU's, in 75-300 iterations per solve;
        ``bench/robustness.py --only-zero-cluster``). ``delta``
        is tried at the relative sizes :data:`SHIFTED_PRECONDITIONER` of ``||H + eps I||`` (a shift at an
        eigenvalue of an indefinite ``H`` makes a poor preconditioner: the best is kept), and the first
        that improves the residual 10x is kept for later solves; where none does, none is tried again.
        Not tried on an unperturbed factorization whose residual is what rounding explains (``100 u
        ||H + eps I|| |x| / |b|``: a shift-invert solve near an eigenvalue, at ``u cond``). Each column
        stops where a cycle of 60 iterations does not halve its residual. Returns ``X`` (None where no
        shift helped) and the iterations run."""
        if not self._shift_rescue or not isinstance(self.damping, float) or self._shift_prec is False:
            return None, 0
        norm = self.op.norm_estimate() + self._damping_scale()
        if not math.isfinite(norm) or norm <= 0:
            return None, 0
        rel = res.norm(dim=0) / rnorm
        if not self.perturbed:
            explained = 100 * torch.finfo(torch.float64).eps * norm * X64.norm(dim=0) / rnorm
            if bool((rel <= explained).all()):
                return None, 0
        res0 = float(rel.max())
        chosen = [self._shift_prec] if self._shift_prec is not None else None
        its, best, best_X, best_F = 0, res0, None, None
        for rel_delta in SHIFTED_PRECONDITIONER if chosen is None else (None,):
            F = chosen[0] if chosen is not None else self._shifted_sweep(rel_delta * norm)
            if F is None:
                continue
            X, k = X64.clone(), 0
            for j in range(X.shape[1]):
                x, kj = fgmres(apply, F._raw, R64[:, j], X[:, j], tol, 60, 4, stall=0.5)
                X[:, j], k = x, k + kj
            its += k
            rel = float(((R64 - apply(X)).norm(dim=0) / rnorm).max())
            if rel < best:
                best, best_X, best_F = rel, X, F
            if best <= tol or chosen is not None:
                break
        if chosen is None:
            self._shift_prec = best_F if best_F is not None and best <= 0.1 * res0 else False
        return best_X, its

    def _shifted_sweep(self, delta: float) -> Factorization | None:
        """The float64 sweep of ``H + (eps + delta) I`` (None where a pivot would be perturbed, or the
        sweep fails): a preconditioner for :meth:`_shifted_gmres`."""
        op = self.op._residual_operator()
        sop = op._swept()
        try:
            shifted = self.damping + delta
            factors = riccati_factor(
                sop.blocks, shifted, sop._names, op.gradient, perturb=True, stop_if_perturbed=True
            )
        except HessinvError:
            return None
        if any(f is not None and f.pivot.perturbed for f in factors[0]):
            return None
        return Factorization(op, shifted, _factors=factors)

    def _gmres_columns(
        self,
        apply: Callable[[Tensor], Tensor],
        R64: Tensor,
        X64: Tensor,
        res: Tensor,
        rnorm: Tensor,
        tol: float,
        restart: int,
        max_restarts: int,
        give_up: bool = False,
        stop_above: float | None = None,
    ) -> int:
        """:func:`fgmres` on each column of ``X64`` (in place) whose residual ``res`` is above ``tol``,
        preconditioned by this factorization's sweep; with ``stop_above``, the columns after one left
        above it are not tried (the caller hands all of them over). Returns the iterations."""
        dtype, its, ncol = self.op.dtype, 0, X64.shape[1]
        for j in range(ncol):
            if float(res[:, j].norm() / rnorm[j]) <= tol:
                continue
            precond = lambda v: self._raw(v.to(dtype)).double()  # noqa: E731
            args = (apply, precond, R64[:, j], X64[:, j], tol, restart, max_restarts)
            x, k = fgmres(*args, give_up=True) if give_up else fgmres(*args)
            X64[:, j], its = x, its + k
            if stop_above is not None and j + 1 < ncol:
                if float((R64[:, j] - apply(x[:, None])[:, 0]).norm() / rnorm[j]) > stop_above:
                    break
        return its

    def _overflowed(self, R: Tensor) -> NonFiniteError:
        """The error for a solution (or its residual) beyond the dtype's range."""
        return NonFiniteError(
            f"solve at damping {self._damping_text()}: the solution or its residual overflowed "
            f"(max|rhs| {float(R.abs().max()):.3g}); x is linear in the right-hand side: scale it down "
            "and the solution back up"
        )

    def _as_returned(self, X: Tensor, R: Tensor, info: SolveInfo) -> SolveInfo:
        """:func:`_returned_info` with this factorization's float64 product; a non-finite ``X`` (scaling back
        left the dtype's range) is a :class:`NonFiniteError`."""
        if not linalg.all_finite(X):
            raise self._overflowed(R)
        return _returned_info(X, R, info, self._apply64, f"solve at damping {self._damping_text()}")

    def _refine_working(self, R: Tensor, max_refine: int) -> tuple[Tensor, SolveInfo]:
        """:meth:`solve` with ``refine="working"``: refinement with residuals in the model's dtype; the
        best iterate (smallest largest-column relative residual) and its residual."""
        scale = _pow2_scale(R)  # (columns at unit size, exactly, as _raw takes them)
        R = R / scale
        norms = R.norm(dim=0).clamp(min=torch.finfo(R.dtype).tiny)  # (unit max-norm: no overflow)
        X = self._raw(R)
        best: tuple[Tensor, float, int] | None = None
        for step in range(max_refine + 1):
            res = R - (self.op._apply(X) + self._shift(X))
            rel = float((res.norm(dim=0) / norms).max())
            if not math.isfinite(rel) or (best is not None and rel >= best[1]):
                break  # (stalled: rounding of the residual itself, or the sweep cannot precondition)
            best = (X, rel, step)
            if step == max_refine:
                break
            X = X + self._raw(res)
        if best is None:
            raise NonFiniteError(
                f"solve at damping {self._damping_text()}: the sweep's solution or its residual is not finite"
            )
        X, rel, steps = best
        X = X * scale
        if rel > math.sqrt(torch.finfo(self.op.dtype).eps):
            warn(
                f"solve at damping {self._damping_text()} reached relative residual {rel:.2e} only in "
                f"{self.op.dtype} (refine='working'); refine=True refines with float64 residuals",
                AccuracyWarning,
            )
        return X, SolveInfo(rel, steps)

    def _apply64(self, X: Tensor) -> Tensor:
        """``(H + eps I) X`` in float64 (the float64 twin's ``O(L)`` product), for residuals -- by the dense
        matrix where the operator holds one (the dense route: a large batch makes each of the chain's
        products cost about as much as a dense one, and one matrix product serves every column)."""
        op64 = self.op._residual_operator()
        view = op64.__dict__.get("_view")
        if view is not None and view is not op64:
            return view.blocks[0].A @ X.to(view.blocks[0].A.dtype) + self._shift(X)
        return op64._apply(X.to(op64.dtype)).double() + self._shift(X)

    _dense_lu: tuple[Tensor, Tensor, int] | None = None  # the LU of _dense_matrix(), once factored

    def _dense_solve(self, R64: Tensor) -> Tensor | None:
        """``(H + eps I)^{-1} R64`` by a dense float64 LU (``H`` formed once by products, and its LU
        factored once: both kept), refined with the ``O(L)`` product's residuals (up to three steps, each
        kept per column where it halves the residual: the LU's own answer left residuals 10-50x those of
        the sweep's refinement and GMRES on ill-conditioned systems), or None where LU finds the matrix
        exactly singular or the result is not finite."""
        if self._dense_lu is None:
            LU, piv, info = torch.linalg.lu_factor_ex(self._dense_matrix())
            self._dense_lu = (LU, piv, int(info))
        LU, piv, info = self._dense_lu
        if info != 0:
            return None
        R = R64.to(LU.device)
        X = torch.linalg.lu_solve(LU, piv, R)
        if not bool(torch.isfinite(X).all()):
            return None
        # each step kept per column where it halves the residual (a smaller gain is the product's rounding):
        # on 64 columns of a Gauss-Newton system at cond 1e11 the first step took the dense-measured
        # residual from 1.2e-5 to 2.3e-6; at cond 1e14-1e15 (a dead-ReLU net) both products' residuals
        # fell, the O(L) one's by 4-5x and a dense product's by 2.5-3x
        res = R - self._apply64(X).to(LU.device)
        rel = res.norm(dim=0)
        for _ in range(3):
            cand = X + torch.linalg.lu_solve(LU, piv, res)
            res_c = R - self._apply64(cand).to(LU.device)
            rel_c = res_c.norm(dim=0)
            better = rel_c <= 0.5 * rel
            if not bool(better.any()) or not bool(torch.isfinite(cand).all()):
                break
            X = torch.where(better, cand, X)
            res = torch.where(better, res_c, res)
            rel = torch.where(better, rel_c, rel)
        return X

    def _dense_matrix(self) -> Tensor:
        """``H + eps I`` as a dense float64 matrix (``n`` products with the float64 operator), formed once."""
        if self._dense is None:
            A = self.op._residual_operator().to_dense().double()
            self._dense = A + self._shift(torch.eye(A.shape[0], dtype=A.dtype, device=A.device))
        return self._dense

    def _float64(self) -> Factorization:
        """The factorization of the float64 twin operator (for float32 models whose own sweep cannot
        precondition the system)."""
        if self._f64 is None:
            self._f64 = Factorization(self.op._residual_operator(), self.damping)
        return self._f64

    @overload
    def solve(
        self,
        rhs: Tensor,
        refine: bool | Literal["working"] = ...,
        max_refine: int = ...,
        return_info: Literal[False] = ...,
    ) -> Tensor: ...

    @overload
    def solve(
        self,
        rhs: Tensor,
        refine: bool | Literal["working"] = ...,
        max_refine: int = ...,
        *,
        return_info: Literal[True],
    ) -> tuple[Tensor, SolveInfo]: ...

    @symmetric_in_rhs
    def solve(
        self,
        rhs: Tensor,
        refine: bool | Literal["working"] = True,
        max_refine: int = 5,
        return_info: bool = False,
    ) -> Tensor | tuple[Tensor, SolveInfo]:
        """``(H + eps I)^{-1} rhs`` for ``rhs`` of shape (n,) or (n, k).

        With ``refine=False`` this is the bare ``O(L)`` sweep (no residual is computed;
        ``last_info.residual`` is NaN). Its error is not bounded by ``u cond(H + eps I)``: the sweep
        does not pivot across stages, so rounding grows through ill-conditioned pivots (relative
        residuals of 1e-2 to 58 were seen in float32 at cond 1e3-1e4); use it as a preconditioner
        (as the optimizers do), not as an answer. With ``refine="working"``, iterative refinement in the
        model's own dtype: ``x += F^{-1}(rhs - (H + eps I) x)`` with the operator's ``O(L)`` product in that
        dtype (no float64 copy of the model: a float32 solve by itself, e.g. on a GPU), up to
        ``max_refine`` steps while the residual falls -- fixed-precision refinement makes the solve's
        residual about that of a backward-stable one in that dtype (a float32 GELU/LayerNorm MLP at cond
        1e3: bare sweep 3.5e-2, refined 7e-7 in three steps, a float32 dense LU 1e-5; Skeel 1980);
        ``last_info.residual`` is the residual computed in that dtype. It lowers the residual, not
        necessarily the error: beyond cond ``~1 / u`` of the dtype, where the product's own rounding
        is the residual's size, a sweep whose answer was accurate (a Woodbury factorization of a float32
        Gauss-Newton matrix at cond 1e6) can come out less so; ``refine=True`` is then the accurate
        choice -- and is what a factorization that handed over to its float64 twin does here too (one
        with modified pivots, ``modify=``, is not ``H + eps I``'s: its bare sweep, as with ``refine``). With
        ``refine`` (default), iterative refinement ``x += F^{-1}(rhs - (H + eps I) x)`` runs with float64
        residuals (the ``O(L)`` product) until the residual stops improving or ``max_refine`` steps ran;
        if it is then above float64 accuracy (a perturbed factorization; ``max_refine=0``: the bare
        sweep's residual), flexible GMRES preconditioned by the factorization takes over -- ``refine=False``
        is the solve with neither. The achieved relative residual is in ``self.last_info`` (and returned with
        ``return_info``); an :class:`~hessinv.AccuracyWarning` is issued when it exceeds ``sqrt(u)`` of
        the model dtype. Differentiable in ``rhs`` where it requires grad (one more solve in the backward
        pass, the matrix being symmetric; first order).
        """
        R, vec = self.op._as_matrix(rhs, "rhs")
        if isinstance(max_refine, bool) or not isinstance(max_refine, numbers.Integral) or max_refine < 0:
            raise InvalidArgumentError(f"max_refine must be an integer >= 0, got {max_refine!r}")
        working = isinstance(refine, str) and refine == "working"
        for name, flag in (("refine", False if working else refine), ("return_info", return_info)):
            if not isinstance(flag, (bool, np.bool_, numbers.Integral)) or flag not in (0, 1):  # ("no", None)
                more = ", or 'working'" if name == "refine" else ""
                raise InvalidArgumentError(f"{name} must be True or False{more}, got {flag!r}")
        X = self._public(self._solve(self._stages(R), refine, max_refine))
        out = X[:, 0] if vec else X
        return (out, self.last_info) if return_info else out

    def _solve(self, R: Tensor, refine: bool | Literal["working"], max_refine: int) -> Tensor:
        """:meth:`solve` of ``R`` (n, k) in the stages' order (:meth:`_stages`), the arguments checked; sets
        ``last_info``."""
        working = isinstance(refine, str) and refine == "working"
        if working and not getattr(self, "modified", False) and not self._twin_only:
            X, self.last_info = self._refine_working(R, max_refine)
            self.last_info = self._as_returned(X, R, self.last_info)
            return X
        if not refine or getattr(
            self, "modified", False
        ):  # no residual either: the caller asked for the raw sweep
            X = self._raw(R)
            self.last_info = SolveInfo(float("nan"), 0)
            if not linalg.all_finite(X):
                raise self._overflowed(R)
            return X
        # (no first sweep where the dense LU answers: _solve64_unit)
        X0 = None if self._rescued and self._dense_lu is not None else self._raw(R).double()
        X64, self.last_info = self._solve64(R.double(), max_refine, X0)
        rel = self.last_info.residual
        if not math.isfinite(rel) or not bool(torch.isfinite(X64).all()):
            raise self._overflowed(R)
        poor = rel > math.sqrt(torch.finfo(self.op.dtype).eps)
        if poor and not self.perturbed and self.inertia.zero:
            # the factorization's own count found an eigenvalue zero to working precision (a pivot exactly
            # singular at this damping), as logdet and inverse_quadratic do: not a solution, a refusal
            raise SingularError(
                f"H + eps I at damping {self._damping_text()} is singular to working precision: its inertia "
                f"counts {self.inertia.zero} zero eigenvalue(s), and the solve reached relative residual "
                f"{rel:.2e} only. Choose another damping (eps > -H.min_eigenvalue() for a positive "
                "definite H + eps I)",
                damping=self.damping if isinstance(self.damping, float) else None,
            )
        if rel > 1e-2 and not self.perturbed and not self._twin_only and not self.__dict__.get("_probed"):
            # no solution at all (a perturbed factorization was probed when made): singular to working
            # precision with no pivot singular on its own (eps = -lambda exactly)? SingularError if so
            self._probed = True
            self._check_nonsingular(unsolved=False)
            if self._rescued and self._dense_lu is not None:  # the probe's dense LU solved it: this too
                X64, self.last_info = self._solve64(R.double(), max_refine)
                rel = self.last_info.residual
                poor = rel > math.sqrt(torch.finfo(self.op.dtype).eps)
        if poor:
            warn(
                f"solve at damping {self._damping_text()} reached relative residual {rel:.2e} only",
                AccuracyWarning,
            )
        X = X64.to(self.op.dtype)
        self.last_info = self._as_returned(X, R, self.last_info)
        return X


class MixedFactorization(Factorization):
    """``H + eps I`` of a float64 operator factored by a float32 sweep, every solve refined in float64
    (``op.factor(eps, precision="mixed")``; mixed-precision iterative refinement, as LAPACK's
    ``dsgesv``): the sweep's ``O(L (p^3 + p^2 a + p a^2))`` flops run at float32 speed, and while
    ``cond(H + eps I) u32 < 1`` each refinement step ``x += F^{-1}(b - (H + eps I) x)`` (float64
    residual, the ``O(L)`` product) gains ``log10(1 / (cond u32))`` digits, to float64 accuracy.
    Beyond that -- refinement and GMRES stall above ``1e-12`` -- the solve falls back to a float64
    factorization (made once, kept); so does the whole factorization if the float32 sweep must perturb
    a pivot.

    ``inertia`` is the float32 sweep's count: exact for ``H + eps I`` unless an eigenvalue lies within
    the float32 rounding of zero, so ``inertia_certified`` is False (``precision="working"`` certifies
    it); ``positive_definite`` follows that count (an eigenvalue within float32's rounding of zero may be
    counted on either side, while :meth:`slogdet`'s sign is the float64 factorization's). :meth:`logdet`,
    :meth:`slogdet`, :meth:`inverse_sqrt` and :meth:`sample` use the float64
    factorization, :meth:`inverse_quadratic` a refined solve. A float32 sweep that cannot run at all
    (curvature below float32's normal range) leaves the whole factorization to float64.

    >>> import torch, hessinv
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    >>> X, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    >>> H = hessinv.hessian(net, torch.nn.CrossEntropyLoss(), X, y)
    >>> F = H.factor(0.1, precision="mixed")
    >>> x = F.solve(H.gradient)
    >>> x.dtype, F.last_info.residual < 1e-14
    (torch.float64, True)
    """

    def __init__(self, op: CurvatureOperator, damping: float):
        op = self._public_factor_of(op)
        damping = _check_shift(damping, op.dtype, "damping")
        if abs(damping) > _shift_limit(torch.float32):  # (a float64 model's: beyond the float32 twin's range)
            self._low = None
            super().__init__(op, damping)
            return
        self._low: CurvatureOperator | None = op._swept()._rounded(torch.float32)
        low = self._low
        try:
            factors = riccati_factor(
                low.blocks, damping, low._names, low.gradient, perturb=True, stop_if_perturbed=True
            )
        except (SingularError, NonFiniteError):  # e.g. curvature below float32's range (flushed to 0)
            factors = None
        if factors is None or any(f is not None and f.pivot.perturbed for f in factors[0]):
            self._low = None  # float32 pivots too near singular to precondition: float64 throughout
            super().__init__(op, damping)
            return
        super().__init__(op, damping, _factors=factors)
        self.inertia_certified = False

    @property
    def _sweep_op(self) -> CurvatureOperator:
        return self.op._swept() if self._low is None else self._low

    def logdet(self) -> float:
        return super().logdet() if self._low is None else self._float64().logdet()

    def slogdet(self) -> tuple[float, float]:
        # the sign from the float64 factorization too: the float32 sweep's inertia can be off by
        # eigenvalues within its rounding of zero, which flips the sign of an ill-conditioned system
        return super().slogdet() if self._low is None else self._float64().slogdet()

    def inverse_sqrt(self, Z: Tensor) -> Tensor:
        if self._low is None:
            return super().inverse_sqrt(Z)
        R, vec = self.op._as_matrix(Z, "Z")
        X = self._public(self._float64().inverse_sqrt(self._stages(R)))
        return X[:, 0] if vec else X


def _contents(v: Any) -> list:
    """What a list, tuple, set or dict holds (a dict's values), else nothing."""
    if isinstance(v, dict):
        return list(v.values())
    return list(v) if isinstance(v, (list, tuple, set, frozenset)) else []


def _graph_attributes(mods: Sequence[nn.Module]) -> list[Tensor]:
    """The tensors with a graph (``grad_fn``) the modules hold outside their parameters -- attributes,
    also inside lists, tuples and dicts nested at most 4 deep: prune's, the old ``weight_norm``'s and
    ``spectral_norm``'s computed ``weight``, an activation kept after a training step. ``copy.deepcopy``
    refuses them."""
    found: list[Tensor] = []

    def visit(v: Any, depth: int) -> None:
        if isinstance(v, Tensor):
            if v.grad_fn is not None:
                found.append(v)
        elif depth < 4:
            for x in _contents(v):
                visit(x, depth + 1)

    for top in mods:
        for m in top.modules():
            for k, v in vars(m).items():
                if k not in ("_modules", "_parameters"):
                    visit(v, 0)
    return found


def _rebind(copies: Sequence[nn.Module], originals: Sequence[nn.Module], memo: dict[int, Any]) -> None:
    """Redirect, in a ``copy.deepcopy`` of the model (``copies``; ``memo`` the deepcopy's memo), the
    functions its modules keep -- attributes, hooks, and those in lists, tuples and dicts -- from the
    original's modules, parameters, buffers and attributes to their copies: deepcopy copies a function as
    itself, so a lambda over ``self`` (LayerScale's ``self.scale = lambda h: h * self.g``), a forward
    wrapped on the instance, or a hook over the model (``o * net.mask``) still read the original (the copy
    was another function of its own parameters, and a float32 operator's refined solves answered for it:
    a residual of 0.21 reported as 4e-16). Called once the copy's attributes are final (set back to the
    operator's point, converted to the copy's dtype): an original attribute maps to what the copy's module
    holds in its place. Closures (each original cell replaced by one new cell, shared as it was),
    bound methods, a plain ``functools.partial``'s function, ``__wrapped__`` and weak references are
    followed, 6 deep; an object the copy shares with the original (deepcopy returned it) is not changed.
    What cannot be redirected -- a global, a default argument -- is the caller's checks' business."""
    remap: dict[int, Any] = {}  # an original attribute -> what the copy's module holds in its place
    shared: set[int] = set()  # objects of the original (never changed here)
    for otop, ctop in zip(originals, copies, strict=True):
        cmods = dict(ctop.named_modules())
        for q, om in otop.named_modules():
            shared.add(id(om))
            cm = cmods.get(q)
            for k, ov in vars(om).items():
                shared.add(id(ov))
                cv = vars(cm).get(k) if cm is not None else None
                if cv is not None and cv is not ov and k not in ("_parameters", "_buffers", "_modules"):
                    remap[id(ov)] = cv
    cells: dict[int, Any] = {}  # an original cell -> its replacement (two functions sharing one keep sharing)
    seen: dict[int, Any] = {}

    def copy_of(v: Any) -> Any:
        w = remap.get(id(v))
        if w is None and id(v) in memo:
            w = memo[id(v)]
        return v if w is None else w

    def redirect(v: Any, depth: int) -> Any:
        if not isinstance(v, (types.FunctionType, types.MethodType, functools.partial)):
            w = copy_of(v)
            if w is not v:
                return w  # (an original the copy holds a copy of)
        if depth > 6:
            return v
        if isinstance(v, types.MethodType):
            f, obj = redirect(v.__func__, depth + 1), redirect(v.__self__, depth + 1)
            return v if f is v.__func__ and obj is v.__self__ else types.MethodType(f, obj)
        if isinstance(v, functools.partial):  # (a subclass keeps its class and what it adds)
            f = redirect(v.func, depth + 1)
            if f is v.func:
                return v
            try:
                w = type(v)(f, *v.args, **v.keywords)
                w.__dict__.update(vars(v))
            except Exception:  # noqa: BLE001 - a subclass built otherwise: kept (the checks then judge)
                return v
            return w
        if type(v) is weakref.ReferenceType:
            target = v()
            w = copy_of(target) if target is not None else None
            return weakref.ref(w) if w is not None and w is not target else v
        if not isinstance(v, types.FunctionType):
            return v
        if id(v) in seen:
            return seen[id(v)]
        seen[id(v)] = v  # (a function that refers to itself)
        new_cells, changed = [], False
        for c in v.__closure__ or ():
            if id(c) in cells:
                new_cells.append(cells[id(c)])
                changed = True
                continue
            try:
                x = c.cell_contents
            except ValueError:  # (an empty cell)
                new_cells.append(c)
                continue
            y = redirect(x, depth + 1)
            if y is not x:
                cells[id(c)] = types.CellType(y)
                changed = True
            new_cells.append(cells.get(id(c), c))
        wrapped = v.__dict__.get("__wrapped__")
        new_wrapped = redirect(wrapped, depth + 1) if wrapped is not None else None
        if not changed and new_wrapped is wrapped:
            return v
        f = types.FunctionType(v.__code__, v.__globals__, v.__name__, v.__defaults__, tuple(new_cells))
        f.__kwdefaults__, f.__qualname__ = v.__kwdefaults__, v.__qualname__
        f.__dict__.update(v.__dict__)
        if wrapped is not None:
            f.__wrapped__ = new_wrapped  # type: ignore[attr-defined]
        seen[id(v)] = f
        return f

    def in_place(holder: Any) -> None:
        """Redirect the values of a (copied) dict or list in place."""
        if id(holder) in shared:
            return
        keys = holder.keys() if isinstance(holder, dict) else range(len(holder))
        for k in list(keys):
            w = redirect(holder[k], 0)
            if w is not holder[k]:
                holder[k] = w

    for top in copies:
        for m in top.modules():
            if id(m) in shared:  # (a module deepcopy did not copy: the original's own)
                continue
            d = vars(m)
            for k, v in list(d.items()):
                if k in ("_parameters", "_buffers", "_modules"):
                    continue
                if isinstance(v, (dict, list)):  # (hooks, and functions kept in containers)
                    in_place(v)
                elif type(v) is tuple:
                    w = tuple(redirect(x, 0) for x in v)
                    if any(a is not b for a, b in zip(w, v, strict=True)):
                        d[k] = w
                else:
                    w = redirect(v, 0)
                    if w is not v:
                        d[k] = w


def _copy_failed(low: torch.dtype, dtype: torch.dtype, e: BaseException) -> str:
    """The refusal where the ``dtype`` copy of a ``low`` operator's model cannot be made or called."""
    return (
        f"a {low} operator refines its solves (and computes eigenvalues, log-determinants) against a "
        f"{dtype} copy of the model made by copy.deepcopy, which failed ({type(e).__name__}: {e}): a module "
        "or hook that holds what deepcopy cannot copy (a lock, a file, a scripted function), or looks up "
        "the original modules (a dict keyed by them), cannot serve the copy; use a float64 model; or, "
        "for a solve alone, solve(..., refine=False)"
    )


class _OriginalReads(TorchFunctionMode):
    """Watches a forward for an operand whose storage is one of the original model's tensors (parameters,
    frozen ones too, buffers, tensor attributes): ``hit`` names the first one read, else None."""

    def __init__(self, mods: Sequence[nn.Module]):
        super().__init__()
        self.names: dict[int, str] = {}
        for top in mods:
            for q, m in top.named_modules():
                for k, t in [*m._parameters.items(), *m._buffers.items(), *vars(m).items()]:
                    if isinstance(t, Tensor) and t.numel() and t.device.type != "meta":
                        kind = (
                            "parameter" if k in m._parameters else "buffer" if k in m._buffers else "tensor"
                        )
                        where = f"{q}.{k}" if q else k
                        self.names.setdefault(t.untyped_storage().data_ptr(), f"{kind} {where!r}")
        self.hit: str | None = None

    def __torch_function__(self, func, _types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if self.hit is None:
            flat = [*args, *kwargs.values()]
            flat += [x for a in flat if isinstance(a, (list, tuple)) for x in a]  # (torch.cat's list)
            for t in flat:
                if isinstance(t, Tensor) and t.device.type != "meta":
                    try:
                        name = self.names.get(t.untyped_storage().data_ptr())
                    except (RuntimeError, NotImplementedError):  # (a tensor without storage)
                        continue
                    if name is not None:
                        self.hit = name
                        break
        return func(*args, **kwargs)


def _loss_snapshot(loss_fn: LossFn) -> LossFn | None:
    """The loss as it is now, for a float32 operator's float64 copy made later: a copy of a loss module
    (its buffers, tensors, settings and submodules), or a ``functools.partial`` with its tensor arguments
    cloned and its function copied where that is a module -- not what a bound method's object reaches
    (``partial(trainer.loss)`` would copy the trainer, its data and the model); None for a plain function
    or a closure (the live loss is used: what it reads is not copied) or a loss that cannot be copied."""
    loss_fn = uncompiled(loss_fn)
    if isinstance(loss_fn, functools.partial):
        inner = isinstance(loss_fn.func, (nn.Module, functools.partial))  # (not a bound method's object)
        func = _loss_snapshot(loss_fn.func) if inner else loss_fn.func

        def kept(t: Any) -> Any:
            return t.detach().clone() if isinstance(t, Tensor) else t

        args, kw = [kept(a) for a in loss_fn.args], {k: kept(v) for k, v in loss_fn.keywords.items()}
        return functools.partial(func if func is not None else loss_fn.func, *args, **kw)
    if not isinstance(loss_fn, nn.Module):
        return None
    try:
        return copy.deepcopy(loss_fn)
    except Exception:  # noqa: BLE001 - an object deepcopy cannot copy (a lock, a generator): the live loss
        return None


def _fingerprint(t: Tensor) -> tuple:
    """A tensor's shape, dtype and float64 sum and norm, unchanged exactly while its values are: what a
    float32 operator keeps of a frozen parameter (a copy of a large backbone would double it)."""
    with torch.no_grad():
        r = torch.view_as_real(t) if t.is_complex() else t  # (a complex one's parts: a raw dtype error)
        r = r if r.is_floating_point() else r.double()  # (an int8-quantized weight, a bool mask)
        return (
            tuple(t.shape),
            t.dtype,
            float(torch.sum(r, dtype=torch.float64)),
            float(torch.linalg.vector_norm(r, dtype=torch.float64)),
        )


def _scaled_norm(x: Tensor) -> float:
    """``||x||_2`` computed as ``m ||x / m||`` with ``m = max|x|``: no underflow of the squares (entries of
    1e-200) nor overflow (1e200)."""
    m = float(x.abs().max()) if x.numel() else 0.0
    if m == 0.0 or not math.isfinite(m):
        return m
    return m * float((x / m).norm())


def _linear_scaled(fn: Callable[[Tensor], Tensor], R: Tensor, what: str) -> Tensor:
    """``fn(R)`` for a linear ``fn``, on ``R``'s columns scaled by powers of two to unit size and scaled
    back (exact): intermediates that would overflow do not (a product with a vector of 1.7e308 was all
    NaN, its true value finite); a result beyond the dtype's range is a :class:`NonFiniteError`."""
    s = _pow2_scale(R)
    X = fn(R / s) * s
    if not bool(torch.isfinite(X).all()):
        raise NonFiniteError(
            f"{what} overflows {X.dtype} (max|input| {float(R.abs().max()):.3g}); it is linear in its input: "
            "scale it down and the result back up"
        )
    return X


def _returned_info(
    X: Tensor, R: Tensor, info: SolveInfo, apply64: Callable[[Tensor], Tensor], what: str
) -> SolveInfo:
    """``info`` for the solution ``X`` as returned (the model's dtype), whose iterate was solved and measured
    with every column at unit size: where a column's largest entry is within ``1 / u`` of the smallest
    normal number (a right-hand side of 1e-320, or a solution of 1e-318: entries subnormal, with a few
    digits or none), the residual of ``X`` itself -- measured on ``X / s`` and ``R / s``, ``s`` the
    right-hand side's power-of-two scale (exact), ``apply64`` the float64 ``(H + eps I)`` -- with an
    :class:`AccuracyWarning` above ``sqrt(u)``: the iterate's 1e-16 had been reported for a returned ``x``
    whose residual was 1.6e-4 (a probe). Else ``info`` itself -- below float64 with the returned ``x``'s
    residual to be measured when ``returned_residual`` is first read (one more product)."""
    fi = torch.finfo(X.dtype)
    if not bool(((X.abs().amax(0) < fi.tiny / fi.eps) & (R != 0).any(0)).any()):
        if X.dtype != torch.float64:  # (the float64 iterate's residual; the returned x's on demand)
            kept = R.clone()  # (in its own dtype: exact in float64 later, half a float64 copy's memory)

            def returned() -> float:
                R64 = kept.double()
                res = R64 - apply64(X.double())
                return float((res.norm(dim=0) / R64.norm(dim=0).clamp_min(1e-300)).max())

            info._returned = returned
        return info
    sc = _pow2_scale(R).double()
    Rs = R.double() / sc
    res = Rs - apply64(X.double() / sc)
    rel = float((res.norm(dim=0) / Rs.norm(dim=0).clamp_min(1e-300)).max())
    if rel > math.sqrt(fi.eps) and rel > 2 * info.residual:
        warn(
            f"{what}: the solution's entries reach below {X.dtype}'s smallest normal number "
            f"({fi.tiny:.3g}) and carry fewer digits: relative residual {rel:.2e}; x is linear in the "
            "right-hand side: scale it up and the solution back down",
            AccuracyWarning,
        )
    return SolveInfo(max(rel, info.residual), info.refinement_steps, info.krylov_iterations)


def _pow2_scale(R: Tensor) -> Tensor:
    """Per column of ``R`` (n, k): the largest power of two not above its max-norm (1 for a zero or
    non-finite column), (1, k): ``R / s`` has max-norm in ``[1, 2)`` (``2^e`` with ``e`` frexp's exponent
    overflowed for a max-norm of 1.7e308)."""
    m = R.abs().amax(dim=0, keepdim=True)
    e = torch.where((m > 0) & torch.isfinite(m), torch.frexp(m).exponent - 1, 0).to(R.dtype)
    return torch.pow(torch.tensor(2.0, dtype=R.dtype, device=R.device), e)


#: Refined solves whose residual stays above this after refinement and GMRES fall back to a dense LU of
#: ``H + eps I`` (formed once by ``n`` products) where ``n`` is at most :data:`DENSE_FALLBACK_N`.
DENSE_FALLBACK_ABOVE = 1e-8

#: :meth:`Factorization.logdet` takes the dense LU (``n <=`` :data:`DENSE_FALLBACK_N`) where the sweep's
#: estimated error (:meth:`Factorization._logdet_error`, ``u / c^2``) exceeds this, and warns above it
#: where its estimate exceeds :data:`LOGDET_WARN_ERROR` (a pivot conditioned just above ``sqrt(u)`` left
#: 4.6e-3 unwarned)
LOGDET_DENSE_ERROR = 1e-8
LOGDET_WARN_ERROR = 1e-4
#: whether :mod:`hessinv.spectrum`'s counts come from one dense ``eigvalsh`` where that is cheaper than
#: their factorizations (:meth:`CurvatureOperator._dense_counts`); the tests turn it off, so that the sweep's
#: counts stay tested on their small chains
DENSE_COUNTS = True
#: Shifts ``delta / ||H + eps I||`` tried, in order, for the preconditioner of
#: :meth:`Factorization._shifted_gmres` (each one sweep and up to 300 GMRES iterations per column)
SHIFTED_PRECONDITIONER = (1e-6, 1e-4, 1e-8)
#: ... and where at least this many columns stalled, the dense LU instead, up to ``n =``
#: :data:`DENSE_RESCUE_N` (:meth:`Factorization._dense_for_columns`)
DENSE_RESCUE_COLUMNS = 8
DENSE_RESCUE_N = 12288
DENSE_FALLBACK_N = 4096
#: inertia counts whose sweep had a pivot conditioned below ``sqrt(u)`` are recounted by a dense ``LDL^T``
#: up to this size (above it, an :class:`AccuracyWarning`): a count is asked many times (a bisection, a
#: histogram, a trust-region step with ``track_inertia``), and a recount of n = 3605 took 3.3 s against
#: the sweep's 0.5 s
DENSE_RECOUNT_N = 2048
#: Flexible GMRES iterations per column (one cycle) where a float32 sweep's refinement is slow, before
#: the float64 twin is factored instead. Each is a float32 sweep plus a float64 product, measured at
#: 1/11 to 1/17 of the twin's factorization and refined solve (kaiming tanh chains, eps 1, w 12-32, L
#: 16-64); on 36 such chains GMRES ran in 17 and converged in 1-11 iterations in 16 (from the fourth
#: iteration on their rates projected at most 10.3); fgmres's give_up stops a column from the fourth
#: iteration where its rate projects more than 15 (1.25 times the cap) -- 12 cost as much as the twin.
LOW_GMRES_ITERATIONS = 12


#: :meth:`CurvatureOperator.solve` tries MINRES first where a factorization is modelled to cost more than
#: this many products per right-hand side, spending at most :data:`KRYLOV_SHARE` of its flops (and
#: :data:`KRYLOV_MAX_ITERATIONS` products per column, in at most :data:`KRYLOV_RESTARTS` cycles)
KRYLOV_FIRST_RATIO = 300.0
KRYLOV_SHARE = 0.1
#: ... the share counted in time too: a factorization's modelled flops at this rate (per CPU thread; 50x on
#: another device) against one product's measured time; under :data:`KRYLOV_MIN_ITERATIONS` products
#: MINRES is not tried
KRYLOV_FACTOR_RATE = 1e10
KRYLOV_MIN_ITERATIONS = 8
#: ... and with ``solve(rtol=)``: tried whatever the cost ratio, for at most this many products and a
#: factorization's modelled flops (a well-conditioned system reaches 1e-8 in tens; MINRES that stalls -- an
#: indefinite system near singular -- costs at most that much on top of the factorization)
KRYLOV_RTOL_MAX_ITERATIONS = 300
#: ... and the share of a factorization's time they may take (timed, as for KRYLOV_SHARE): a MINRES that
#: stalls costs at most the solve's time again
KRYLOV_RTOL_SHARE = 1.0
KRYLOV_MAX_ITERATIONS = 3000
KRYLOV_RESTARTS = 3
#: a MINRES solve out of its products goes on while its contraction so far reaches the target within this
#: share of a factorization's modelled time (:meth:`CurvatureOperator._krylov_solve`)
KRYLOV_CONTINUE_SHARE = 0.5


def _seconds(run: Callable[[], Any], device: torch.device) -> float:
    """The wall time of ``run()`` (on CUDA, to its kernels' end, not only their launch)."""
    t = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def _eigenvalue_inertia(eigs: Tensor, shift: float, tol: float) -> tuple[Inertia, float]:
    """The inertia of ``diag(eigs) + shift I`` (float64 eigenvalues of ``H``), those within ``tol`` of
    ``-shift`` counted as zero, and the ``tol`` used: ``0`` becomes what rounding cannot tell from the shift,
    ``n u max(||H||, |shift|)``."""
    n, w = eigs.numel(), eigs + shift
    if tol == 0:
        tol = n * torch.finfo(torch.float64).eps * max(float(eigs.abs().max()) if n else 0.0, abs(shift))
    neg, pos = int((w < -tol).sum()), int((w > tol).sum())
    return Inertia(neg, n - neg - pos, pos), tol


def _flop_rate(device: torch.device) -> float:
    """The flops a second that the cost models price a factorization at: :data:`KRYLOV_FACTOR_RATE` per
    CPU thread, 50x it on an accelerator."""
    cpu = device.type == "cpu"
    return KRYLOV_FACTOR_RATE * (max(torch.get_num_threads(), 1) if cpu else 50.0)


def minres(
    apply: Callable[[Tensor], Tensor], B: Tensor, tol: float, maxiter: int
) -> tuple[Tensor, int, float, bool]:
    """MINRES (Paige and Saunders 1975) for a symmetric, possibly indefinite ``A X = B`` from ``X = 0``,
    the columns of ``B`` (n, k) at once: the Lanczos recurrence on each column, ``|b - A x|`` minimized
    over its Krylov space by Givens rotations, ``x`` updated by a three-term recurrence (no basis kept).
    Stops where every column's recursive residual estimate is at most ``tol |b|``, after ``maxiter``
    products, or -- from the 30th -- where the slowest column's mean contraction per product so far would
    need more than twice ``maxiter`` of them. Returns ``(X, products, a lower bound on ||A||, converged)``
    (the bound: the largest row norm of the Lanczos tridiagonal matrix; ``converged``: the estimates
    reached ``tol``, which drift from the true residuals by rounding -- restart from ``B - A X`` for
    more)."""
    n, k = B.shape
    X = torch.zeros_like(B)
    if maxiter < 1 or n == 0:
        return X, 0, 0.0, n == 0
    beta1 = B.norm(dim=0)
    ones = torch.ones_like(beta1)

    def safe(t: Tensor) -> Tensor:
        return torch.where(t > 0, t, ones)

    r1, r2, y = B, B, B
    oldb, beta = torch.zeros_like(beta1), beta1
    dbar, epsln, phibar = torch.zeros_like(beta1), torch.zeros_like(beta1), beta1.clone()
    cs, sn = -ones, torch.zeros_like(beta1)
    w, w2 = torch.zeros_like(B), torch.zeros_like(B)
    anorm, its, worst = 0.0, 0, 1.0
    tiny = torch.finfo(B.dtype).tiny
    while its < maxiter:
        its += 1
        v = y / safe(beta)
        y = apply(v)
        if its >= 2:
            y = y - (beta / safe(oldb)) * r1
        alfa = (v * y).sum(0)
        y = y - (alfa / safe(beta)) * r2
        r1, r2 = r2, y
        oldb, beta = beta, y.norm(dim=0)
        row = alfa.square() + beta.square() + (oldb.square() if its >= 2 else 0.0)  # (beta_1 = |b|: no row)
        anorm = max(anorm, float(row.sqrt().max()))
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        gamma = torch.sqrt(gbar.square() + beta.square()).clamp_min(tiny)
        cs, sn = gbar / gamma, beta / gamma
        phi = cs * phibar
        phibar = sn * phibar
        w1, w2 = w2, w
        w = (v - oldeps * w1 - delta * w2) / gamma
        X = X + phi * w
        rel = phibar / safe(beta1)
        worst = float(rel.max())
        if not worst > tol:  # (NaN included: the caller's true residual tells)
            break
        if its >= 30:
            rate = math.log(worst) / its if 0 < worst < 1 else 0.0
            if rate == 0.0 or math.log(tol) / rate > 2 * maxiter:
                break
    return X, its, anorm, worst <= tol


def fgmres(
    apply: Callable[[Tensor], Tensor],
    precond: Callable[[Tensor], Tensor],
    b: Tensor,
    x0: Tensor,
    tol: float,
    restart: int = 30,
    max_restarts: int = 4,
    give_up: bool = False,
    stall: float = 0.99,
) -> tuple[Tensor, int]:
    """Flexible GMRES (Saad 1993) for ``A x = b``, right-preconditioned by ``precond`` (which may be
    inexact, e.g. a float32 sweep): minimizes ``|b - A x|`` over ``x0 + span(Z)``, ``z_j = M^{-1} v_j``.
    Stops at relative residual ``tol``, on stagnation (a cycle that left the residual above ``stall``
    times the best before it), or after ``max_restarts`` cycles of ``restart`` iterations; with
    ``give_up``, also from the fourth iteration on where the residual's geometric rate so far would need
    over ``1.25 restart max_restarts`` iterations (more than this call may run) to reach ``tol``. Returns
    the iterate of smallest true residual met (a cycle that made it worse is undone) and the number of
    iterations (one ``precond`` and one ``apply`` each)."""
    bnorm = float(b.norm()) or 1.0
    x, total = x0.clone(), 0
    best, x_best = float("inf"), x
    for cycle in range(max_restarts + 1):
        r = b - apply(x[:, None])[:, 0]
        beta = float(r.norm())
        if not beta < best:  # (also NaN) the last cycle made it worse: undo it
            x, beta = x_best, best
        if beta / bnorm <= tol or not beta < stall * best or cycle == max_restarts:
            break
        best, x_best = beta, x
        V, Z = [r / beta], []
        Hm = np.zeros((restart + 1, restart))
        y = np.zeros(0)
        for j in range(restart):
            z = precond(V[j][:, None])[:, 0]
            w = apply(z[:, None])[:, 0]
            Z.append(z)
            for _ in range(2):  # classical Gram-Schmidt, twice
                Vm = torch.stack(V, dim=1)
                h = Vm.T @ w
                w = w - Vm @ h
                Hm[: j + 1, j] += h.numpy() if h.is_cpu else h.cpu().numpy()
            Hm[j + 1, j] = float(w.norm())
            if not np.isfinite(Hm[: j + 2, j]).all():  # (a sweep or product that overflowed: keep the rest)
                Z.pop()
                break
            total += 1
            e1 = np.zeros(j + 2)
            e1[0] = beta
            try:
                y = np.linalg.lstsq(Hm[: j + 2, : j + 1], e1, rcond=None)[0]
            except np.linalg.LinAlgError:  # (LAPACK's SVD did not converge: entries 1e11 apart, cond 1e14)
                import scipy.linalg

                try:  # a QR-based least squares instead; else the iterate of the step before
                    y = scipy.linalg.lstsq(Hm[: j + 2, : j + 1], e1, lapack_driver="gelsy")[0]
                except (np.linalg.LinAlgError, ValueError):
                    Z.pop()
                    break
            est = float(np.linalg.norm(e1 - Hm[: j + 2, : j + 1] @ y))
            if est / bnorm <= tol or Hm[j + 1, j] <= 1e-300:
                break
            if give_up and j >= 3 and tol > 0:  # the mean contraction per iteration so far, projected
                rate = math.log(est / beta) / (j + 1) if 0 < est < beta else 0.0
                if rate == 0.0 or math.log(tol * bnorm / beta) / rate > 1.25 * restart * max_restarts:
                    break
            V.append(w / Hm[j + 1, j])
        if Z:
            x = x + torch.stack(Z, dim=1) @ torch.as_tensor(y, dtype=x.dtype, device=x.device)
    return x, total


def hessian(
    model: nn.Module | Sequence[nn.Module], loss_fn: LossFn, inputs: Tensor, targets: Tensor
) -> Hessian:
    """The exact Hessian of ``loss_fn(model(inputs), targets)`` in the model's trainable parameters.

    >>> import torch, hessinv
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    >>> X, y = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1, 0])
    >>> H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    >>> H.shape
    (26, 26)
    >>> v = torch.randn(26, dtype=torch.float64)
    >>> params = list(net.parameters())  # H @ v against plain autograd's double backward:
    >>> g = torch.autograd.grad(nn.CrossEntropyLoss()(net(X), y), params, create_graph=True)
    >>> Hv = torch.autograd.grad(torch.cat([t.reshape(-1) for t in g]) @ v, params)
    >>> bool(torch.allclose(H @ v, torch.cat([t.reshape(-1) for t in Hv])))
    True
    """
    return Hessian(model, loss_fn, inputs, targets)


def gauss_newton(
    model: nn.Module | Sequence[nn.Module], loss_fn: LossFn, inputs: Tensor, targets: Tensor
) -> GaussNewton:
    """The generalized Gauss-Newton matrix of ``loss_fn(model(inputs), targets)``.

    >>> import torch, hessinv
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    >>> X, Y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    >>> G = hessinv.gauss_newton(net, nn.MSELoss(), X, Y)
    >>> out, params = net(X), list(net.parameters())  # the Jacobian J of the 12 outputs, by autograd:
    >>> rows = [torch.autograd.grad(o, params, retain_graph=True) for o in out.reshape(-1)]
    >>> J = torch.stack([torch.cat([t.reshape(-1) for t in row]) for row in rows])
    >>> bool(torch.allclose(G.to_dense(), 2 / out.numel() * J.T @ J))  # the mean square: Lambda = 2/(N C) I
    True
    """
    return GaussNewton(model, loss_fn, inputs, targets)


def normalize_curvature(name: str) -> str:
    """``"hessian"`` or ``"gauss_newton"``; accepts ``gauss-newton``, ``GN``, ``ggn`` spellings."""
    key = str(name).lower().replace("-", "_")
    key = {"gn": "gauss_newton", "ggn": "gauss_newton", "h": "hessian"}.get(key, key)
    if key not in ("hessian", "gauss_newton"):
        raise InvalidArgumentError(
            f"curvature must be 'hessian' or 'gauss_newton' (or 'gauss-newton'), got {name!r}"
        )
    return key


def curvature_class(name: str) -> type[CurvatureOperator]:
    """The operator class of a curvature name (:func:`normalize_curvature`)."""
    return Hessian if normalize_curvature(name) == "hessian" else GaussNewton


def _undamped_rows(
    U: Tensor, S: Tensor, damping: Tensor, idx: Tensor, gjj: Tensor, Dd: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``(U', S', D')`` with ``U'^T S' U' + D' = U^T S U + D``: on the entries ``idx`` of ``D``, ``D'``
    takes ``D_j + c_j`` and ``G`` the correction ``-c_j e_j e_j^T`` (rows ``sqrt(c_j) e_j`` with sign
    -1), ``c_j`` the power of 4 nearest ``gjj`` (its square root and inverse exact)."""
    k = int(idx.numel())
    c = torch.pow(4.0, torch.round(torch.log2(gjj[idx]) / 2))
    D = damping.to(device=U.device, dtype=U.dtype).clone()
    D[idx] = (Dd[idx] + c).to(D.dtype)
    E = U.new_zeros(k, U.shape[1])
    E[torch.arange(k, device=U.device), idx] = c.sqrt().to(U.dtype)
    return torch.cat([U, E]), torch.cat([S, S.new_full((k,), -1.0)]), D


#: :meth:`WoodburyFactorization.logdet` factors apart at most ``rank + this`` entries of a per-parameter
#: damping (each a row of an ``eigh``-factored capacitance matrix)
SMALL_DAMPING_ROWS = 64


#: :class:`WoodburyFactorization` factors ``G + D`` densely (an ``n x n`` ``eigh``, about ``9 n^3`` flops)
#: where the root has at least this many times as many rows as there are parameters (the Woodbury system's
#: ``r^3 / 3 + r^2 n`` is then the larger)
DENSE_ROWS_RATIO = 3


class WoodburyFactorization(Factorization):
    """``G + D`` for the Gauss-Newton matrix through its square root
    (:class:`hessinv.lowrank.WoodburyFactor`).

    ``damping`` is a number or a per-parameter (n,) tensor ``D`` (copied: a caller's buffer refilled later
    does not change the factorization). Zero entries of ``D`` (parameters left undamped, e.g. biases) are
    exact too: on those ``k`` entries ``D`` takes ``c_j`` (the power of 4 nearest ``sum_q U_qj^2``, which
    is ``G_jj`` for a convex loss: the square roots and inverses below are exact, and the correction is at
    ``G``'s own scale) and ``G`` the rank-``k`` correction ``-E^T C E`` (``E`` their rows of the
    identity), appended to the square root with signs ``-1`` -- ``K`` grows by ``k`` rows (at most
    :data:`ZERO_DAMPING_MAX`) and is then indefinite, factored by ``eigh``. Entries whose ``|D_j| / c_j``
    is below 1e-3 of the median of that ratio (at most ``rank +`` :data:`SMALL_DAMPING_ROWS` of them) get
    the same treatment (``D_j + c_j``) for :meth:`logdet`, in a second factorization made when it is asked
    (left in ``D`` they put outlying ``c_j / D_j`` into ``K``, and ``log|det(G + D)| = log|det D| +
    log|det K|`` cancels: 0.26 off at one ``D_j = 1e-17`` among 0.1s; a uniformly small ``D`` is no
    trouble), and for the factorization itself where ``K`` is singular to working precision without it
    (a tiny negative ``D_j``) -- :meth:`logdet` takes this route only where ``K`` is ill-conditioned and
    ``n`` is above the dense LU's limit. Where ``K`` stays singular to working precision even so
    (``cond(K)`` is not ``cond(G + D)``: zero entries of ``D`` at 1e-6 ``||G||`` made a float64 ``K``
    singular at ``cond(G + D) = 3.6e11``), ``G + D`` is factored densely instead for ``n <=``
    :data:`DENSE_FALLBACK_N` (float64 ``eigh``, :meth:`_factor_dense`) and every method answers from that;
    larger systems are refused. A zero entry whose column of ``G`` is zero is a :class:`SingularError`.
    A zero damping of the number kind is the Riccati sweep's (``method="auto"``).
    Same interface as :class:`Factorization` (``solve`` with refinement, ``inertia``,
    ``positive_definite``, ``logdet``). The ``damping`` attribute holds a per-parameter ``D`` in the
    sweeps' order (:meth:`hessinv.Chain.to_stages`): ``model.parameters()``'s, except for a model whose
    forward uses its parameters in another order than it lists them.
    """

    def _pivots_exact(self) -> bool:
        """No Riccati pivots: callers that take the sweep's exact quadratic form where its pivots are
        exact (the trust region's) take ``v^T x`` of a solve instead."""
        return False

    _shift_rescue = False  # (refined by its own route: see _solve64 and _factor_dense)

    def __init__(self, op: GaussNewton, damping: float | Tensor):
        op = self._public_factor_of(op)
        if not isinstance(damping, Tensor):
            damping = check_real(damping, "damping")
            if not math.isfinite(damping):
                raise NonFiniteArgumentError(f"damping must be finite, got {damping}")
        if isinstance(damping, Tensor):
            if (
                damping.layout != torch.strided
                or damping.is_complex()
                or damping.dtype == torch.bool
                or damping.device.type == "meta"
            ):
                raise InvalidArgumentError(
                    "the per-parameter damping must be a dense real tensor with values (float or integer), "
                    f"got a {damping.layout} {damping.dtype} tensor on {damping.device}"
                )
            if damping.requires_grad and torch.is_grad_enabled():
                raise InvalidArgumentError(
                    "the per-parameter damping requires grad: the factorization takes its values, and "
                    "their derivative through it would be lost; pass damping.detach()"
                )
            damping = damping.detach().clone()
            if self._order is not None and damping.shape == (op.shape[0],):  # (held in the stages' order)
                damping = self._order.to_stages(damping)
            if not damping.is_floating_point():  # integers: the entries' values (their zeros too)
                damping = damping.to(op.dtype)
            if not bool(torch.isfinite(damping).all()):
                raise NonFiniteArgumentError(
                    "the per-parameter damping has a NaN or infinite entry: give every entry a finite value"
                )
        self.op, self.damping = op, damping
        self._f64: Factorization | None = None
        self._apart: WoodburyFactor | None = None  # (see _solver)
        self._dense: Tensor | None = None  # G + D in float64: a solve's dense LU fallback, _factor_dense's
        self._dense_sld: tuple[float, float] | None = None
        self._eig: tuple[Tensor, Tensor] | None = None  # (eigenvalues, eigenvectors) of it (_factor_dense)
        self._small = None  # entries of D below 1e-3 c_j, for logdet (see the class docstring)
        self.woodbury: WoodburyFactor | None  # None where the dense factorization answers (_refactor)
        n, loss = op.shape[0], op.blocks[-1]
        if loss.batch * loss.d_in >= DENSE_ROWS_RATIO * n and n <= DENSE_FALLBACK_N:
            # far more root rows than parameters (a large batch of a small model): the dense n x n G + D
            # (n products), not the root and the Woodbury system's r x r (n = 31, 4000 examples: 5-12 s
            # for K of 8000 rows, against 0.06 s for the sweep at the same damping as a number; a probe)
            self._factor_dense()
            self.woodbury = None
        else:
            self._factor_woodbury(op, damping)
        self.factors, self.modified = None, False
        self.perturbed: dict[int, int] = {}
        self.last_info = None
        if self._twin_only:  # the float64 twin's counts (its own Woodbury or dense factorization)
            twin = self._float64()
            self.inertia, self.positive_definite = twin.inertia, twin.positive_definite
            self.inertia_certified = twin.inertia_certified
        elif self.woodbury is not None:
            self.inertia, self.positive_definite = self.woodbury.inertia, self.woodbury.positive_definite
            self.inertia_certified = True  # Haynsworth's inertia additivity: exact, nothing perturbed
        else:
            assert self._eig is not None
            neg = int((self._eig[0] < 0).sum())
            self.inertia, self.positive_definite = Inertia(neg, 0, op.shape[0] - neg), neg == 0
            self.inertia_certified = True  # every |eigenvalue| beyond n u ||G + D||: Weyl (_factor_dense)

    def _factor_woodbury(self, op: GaussNewton, damping: float | Tensor) -> None:
        """``G + D`` through the root: the Woodbury factor (``woodbury``; None where the dense one answers,
        :meth:`_refactor`), with ``D``'s zero and outlying small entries apart (see the class docstring)."""
        U, S = op._cached_root()
        D = damping
        if isinstance(damping, Tensor) and damping.shape == (U.shape[1],) and damping.is_floating_point():
            gjj = (U.double() * U.double()).sum(0)  # |G_jj| where S = +1 (signed S: the column's scale)
            Dd = damping.to(device=U.device, dtype=torch.float64)
            zero = torch.nonzero(Dd == 0).flatten()
            k = int(zero.numel())
            if k > ZERO_DAMPING_MAX:
                raise SingularError(
                    f"the per-parameter damping has {k} zero entries; up to {ZERO_DAMPING_MAX} are factored "
                    "exactly (one row of the Woodbury system each): give the others a small positive value",
                    damping=0.0,
                )
            if k and not bool((gjj[zero] > 0).all()):
                j = int(zero[torch.nonzero(gjj[zero] <= 0).flatten()[0]])
                raise SingularError(
                    f"parameter {j} has zero damping and no curvature on this batch (its column of G is "
                    "zero): G + D is singular there -- give it a damping > 0",
                    damping=0.0,
                )
            # entries whose D_j / c_j is far below the others' (a uniformly small D is no trouble: K's
            # eigenvalues scale together)
            ratio = Dd.abs() / gjj
            covered = (gjj > 0) & (Dd != 0)
            if bool(covered.any()):
                typical = float(ratio[covered].median())
                small = torch.nonzero(covered & (ratio < 1e-3 * typical)).flatten()
                if small.numel():
                    self._small = (torch.cat([zero, small]), gjj, Dd)
            if k:
                U, S, D = _undamped_rows(U, S, damping, zero, gjj, Dd)
        try:
            # (one root, many dampings -- a prior-precision search: the operator keeps the first factor's
            # WoodburyFactor.shared, not the factor; each damping rescanned a 256 x 800k root, 28.6 s of a
            # Laplace search of which 0.6 s per damping was K's factorization, a probe)
            held = op.__dict__.get("_woodbury_template")
            if held is not None and held[0] is U and held[1] is S:
                self.woodbury = WoodburyFactor(U, S, D, **held[2])
            else:
                self.woodbury = WoodburyFactor(U, S, D)
                if U is op._cached_root()[0]:
                    op._woodbury_template = (U, S, self.woodbury.shared())
        except SingularError:
            self.woodbury = self._refactor(op, damping)

    def _refactor(self, op: GaussNewton, damping: float | Tensor) -> WoodburyFactor | None:
        """The factorization where ``K`` was singular to working precision: with the tiny entries of ``D``
        factored apart (``K`` holds no ``1 / D_j`` then); failing that, in float64 the dense one
        (:meth:`_factor_dense`; None is returned), below float64 the float64 twin's (``U`` is rounded to
        the model dtype, and so are ``K``'s small eigenvalues, whose size is not ``G + D``'s: a float32
        ``K`` was refused at ``cond(G + D) = 3e4``) -- solves, inertia and log-det then come from the twin
        (``_twin_only``; its ``woodbury``, None where the twin is dense). :class:`SingularError` where
        that fails too."""
        if self._small is not None and self._small[0].numel() <= ZERO_DAMPING_MAX:
            try:
                W = self._factor_apart()
                self._small = None  # (its logdet is the accurate one)
                return W
            except SingularError:
                pass
        if op.dtype == torch.float64:
            self._factor_dense()
            return None
        twin = self._float64()
        self._twin_only = True
        assert isinstance(twin, WoodburyFactorization)
        return twin.woodbury

    def _factor_dense(self) -> None:
        """``G + D = V diag(lam) V^T`` by a dense float64 ``eigh`` (``G`` formed by ``n`` products), for
        where ``K`` is singular to working precision while ``G + D`` need not be: sets ``_eig`` and
        ``_dense_sld``. :class:`SingularError` where ``G + D`` is singular to working precision itself --
        its smallest ``|lam|`` at most ``n u max|lam|`` (``eigh`` is backward stable: beyond that every
        computed sign is exact, Weyl) -- or where ``n`` is above :data:`DENSE_FALLBACK_N`."""
        n = self.op.shape[0]
        if n > DENSE_FALLBACK_N:
            raise SingularError(
                "the Woodbury capacitance matrix K = S + U D^-1 U^T of G + D is singular to working "
                "precision (with D's zero and outlying small entries factored apart too); cond(K) is "
                "not cond(G + D), which may be nonsingular, but n = "
                f"{n} is above the dense fallback's {DENSE_FALLBACK_N}: give the zero (or tiny) entries "
                "of the per-parameter damping a small positive value (e.g. 1e-8 of G's diagonal there)"
            )
        A = self._dense_matrix()
        lam, V = torch.linalg.eigh(0.5 * (A + A.mT))
        top, low = float(lam.abs().max()), float(lam.abs().min())
        if not low > n * torch.finfo(torch.float64).eps * top:  # also NaN, and G + D = 0
            raise SingularError(
                f"G + D is singular to working precision: its smallest |eigenvalue| is {low:.3g} against "
                f"||G + D|| = {top:.3g} (n = {n}; a dense float64 eigendecomposition, as the Woodbury "
                "capacitance matrix is singular too); "
                + (
                    "give the parameters with zero or tiny damping a damping > 0, or a larger one"
                    if isinstance(self.damping, Tensor)
                    else "choose another damping (-damping is an eigenvalue of G to working precision)"
                ),
                damping=self.damping if isinstance(self.damping, float) else None,
            )
        self._eig = (lam, V)
        neg = int((lam < 0).sum())
        self._dense_sld = (-1.0 if neg % 2 else 1.0), float(lam.abs().log().sum())

    def _factor_apart(self) -> WoodburyFactor:
        """``G + D`` factored with the entries of ``_small`` apart (``D_j + c_j`` and rows ``-c_j e_j``)."""
        assert self._small is not None
        idx, gjj, Dd = self._small
        U, S = self.op._cached_root()
        return WoodburyFactor(*_undamped_rows(U, S, self.damping, idx, gjj, Dd))

    def _solver(self) -> WoodburyFactor:
        """The factorization solves use: with the outlying entries of ``D`` (``_small``, at most ``rank +``
        :data:`SMALL_DAMPING_ROWS`) factored apart where there are any -- made when first needed, kept. A
        single solve is good to about ``u cond(K)``, and ``K`` holds ``1 / D_j``: at one ``D_j = 1e-15``
        among 0.024s (``cond(G + D) = 3e7``) its relative residual was 1e-5, and refinement and GMRES stalled
        with a forward error of 1e-10; factored apart, 2e-10 and 5e-12."""
        assert self.woodbury is not None  # (the dense factorization answers without it)
        if self._apart is None:
            self._apart = self.woodbury
            if self._small is not None and self._small[0].numel() <= self.woodbury.rank + SMALL_DAMPING_ROWS:
                try:
                    self._apart = self._factor_apart()
                except SingularError:  # (K singular without them too: the factorization as it is)
                    pass
        return self._apart

    def _raw(self, R: Tensor) -> Tensor:
        if self._twin_only:
            return super()._raw(R)
        if self._eig is not None:  # the dense factorization (_factor_dense): V diag(1 / lam) V^T R
            lam, V = self._eig
            return (V @ ((V.mT @ R.to(V.dtype)) / lam[:, None])).to(R.dtype)
        return self._solver().solve(R)

    def _float64(self) -> Factorization:
        if self._f64 is None:
            D = self.damping.double() if isinstance(self.damping, Tensor) else self.damping
            self._f64 = WoodburyFactorization(self.op._residual_operator(), D)
        return self._f64

    def _shift(self, X: Tensor) -> Tensor:
        D = self.damping
        return D.to(X.dtype)[:, None] * X if isinstance(D, Tensor) else D * X

    def _damping_text(self) -> str:
        return "D (per parameter)" if isinstance(self.damping, Tensor) else f"{self.damping:g}"

    def _riccati_only(self, what: str) -> None:
        """Nothing to refuse: every method has a Woodbury form (or the dense one's)."""

    @property
    def _sweep_op(self) -> CurvatureOperator:
        """The operator itself: no sweep ran (its dense view, ``op._swept()``, would be formed by ``n``
        products only to be read for its dtype: 2.6 s of a 3.9 s Laplace ``sample``)."""
        return self.op

    def inverse_diagonal(self, tol: float = 1e-8) -> Tensor:
        """``diag((G + D)^{-1}) = D^{-1} - colsum(W * K^{-1} W)``, ``W = U D^{-1}`` (``2 r^2 n`` flops, no
        ``n x n`` matrix; :meth:`hessinv.lowrank.WoodburyFactor.inverse_diagonal`), taken where its
        rounding estimate (the difference cancels where ``G_jj >> D_j``, and ``K^{-1}`` carries ``u cond(K)``)
        is within a tenth of ``tol`` of the largest entry; else from the dense float64 inverse or refined
        solves, as :meth:`Factorization.inverse_diagonal`. A float32 operator answers with its float64
        twin's.

        >>> import torch, hessinv
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
        >>> X, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
        >>> G = hessinv.gauss_newton(net, torch.nn.CrossEntropyLoss(), X, y)
        >>> F = G.factor(0.1, method="woodbury")
        >>> A = G.to_dense() + 0.1 * torch.eye(G.shape[0], dtype=torch.float64)
        >>> torch.allclose(F.inverse_diagonal(), torch.linalg.inv(A).diagonal())
        True
        """
        return self._public(self._inverse_diagonal(tol))

    def _inverse_diagonal(self, tol: float) -> Tensor:
        tol = _check_tol(tol, "tol", relative=True)
        if self._twin_only or self.op.dtype != torch.float64:
            return self._float64().inverse_diagonal(tol).to(self.op.dtype)
        if self.woodbury is None:  # the dense factorization: V diag(1 / lam) V^T
            assert self._eig is not None
            lam, V = self._eig
            return ((V * V) / lam).sum(1).to(self.op.dtype)
        W = self._solver()
        if not (W.structured_only or W.tables):
            d, err = W.inverse_diagonal()
            top = float(d.abs().max()) if d.numel() else 0.0
            if bool(torch.isfinite(d).all()) and float(err.max()) <= 0.1 * tol * top:
                return d.to(self.op.dtype)
        return self._inverse_diagonal_by_solves()

    def sample(self, k: int = 1, generator: torch.Generator | None = None) -> Tensor:
        """``k`` samples of ``N(0, (G + D)^{-1})`` (n, k): ``x = (G + D)^{-1} (U^T z_1 + D^{1/2} z_2)`` for
        white ``z_1`` (r) and ``z_2`` (n) -- its covariance is ``A^{-1} (U^T U + D) A^{-1} = A^{-1}``, ``A = G
        + D`` -- one refined solve, no square root; where ``S`` has a ``-1`` row (zero entries of ``D``
        factored apart) or ``D`` an entry ``<= 0``, ``S z`` with the square root of :meth:`inverse_sqrt`."""
        W = self.woodbury
        D = self.damping
        if (
            self._twin_only
            or W is None
            or W.structured_only
            or W.tables
            or not bool((W.S > 0).all())
            or not (bool((D > 0).all()) if isinstance(D, Tensor) else D > 0)
        ):
            return super().sample(k, generator)
        if self.inertia.negative:  # (D > 0 and S > 0: never; as inverse_sqrt says it)
            raise IndefiniteError(f"G + D has {self.inertia.negative} negative eigenvalues")
        r, n = W.rank, self.op.shape[0]
        z = self._white(r + n, k, generator)
        root = D.sqrt().to(z)[:, None] if isinstance(D, Tensor) else math.sqrt(D)
        rhs = W.U.T.to(z) @ z[:r] + root * z[r:]
        return self._public(self._solve(rhs, True, 5))

    def _inverse_sqrt(self, R: Tensor) -> Tensor:
        """:meth:`inverse_sqrt` of ``R`` (n, k): ``D^{-1/2} (I + V^T S V)^{-1/2}`` through a thin QR of ``V^T
        = (U D^{-1/2})^T`` (:meth:`hessinv.lowrank.WoodburyFactor.inverse_sqrt`); where ``D`` has an entry
        ``<= 0`` (``G + D`` positive definite all the same) the dense float64 Cholesky factor's
        (``n <=`` :data:`DENSE_FALLBACK_N`)."""
        if self._twin_only:
            assert self._f64 is not None
            return self._f64.inverse_sqrt(R.double()).to(self.op.dtype)
        if self.woodbury is None:  # the dense factorization: V diag(lam^{-1/2})
            assert self._eig is not None
            lam, V = self._eig
            return (V @ ((V.mT @ R.double()) * lam.rsqrt()[:, None])).to(R.dtype)
        W = self._solver()
        X = None if W.structured_only or W.tables else W.inverse_sqrt(R)
        if X is not None and bool(torch.isfinite(X).all()):
            return X
        if self.op.shape[0] > DENSE_FALLBACK_N:
            raise SingularError(
                f"inverse_sqrt at damping {self._damping_text()}: the Woodbury square root needs every entry "
                "of D > 0 and I + V^T S V positive definite to working precision, and n = "
                f"{self.op.shape[0]} is above the dense Cholesky's {DENSE_FALLBACK_N}: give every parameter "
                "a damping > 0",
                damping=self.damping if isinstance(self.damping, float) else None,
            )
        L = self._dense_cholesky("inverse_sqrt")
        assert L is not None  # (n <= DENSE_FALLBACK_N)
        return torch.linalg.solve_triangular(L.mT, R.double(), upper=True).to(R.dtype)

    def logdet(self) -> float:
        """``log|det(G + D)| = log|det D| + log|det K|``: from the float64 twin for a float32 operator
        (its root is float32-accurate only); where ``K`` is ill-conditioned (``r u cond(K) > 1e-10``: the
        sum cancels) by a dense float64 LU for ``n <=`` :data:`DENSE_FALLBACK_N`, else with the outlying
        entries factored apart (class docstring); from the eigenvalues where ``G + D`` was factored
        densely (:meth:`_factor_dense`)."""
        if self.op.dtype != torch.float64:
            return self._float64().logdet()
        W = self.woodbury
        if W is None:
            assert self._dense_sld is not None
            return self._dense_sld[1]
        if W.rank * torch.finfo(torch.float64).eps * W.k_cond <= 1e-10:
            return W.logdet()
        if self.op.shape[0] <= DENSE_FALLBACK_N:
            return (self._dense_sld or self._lu_slogdet())[1]
        if self._small is not None:
            idx = self._small[0]
            if idx.numel() <= self.woodbury.rank + SMALL_DAMPING_ROWS:
                apart = self._solver()  # (where it failed, the SingularError again)
                return (apart if apart is not self.woodbury else self._factor_apart()).logdet()
            warn(
                f"{idx.numel()} entries of the per-parameter damping are zero or far smaller relative to "
                "G's diagonal than the others (below 1e-3 of their median ratio), more than are factored "
                "apart: log|det| may lose digits to cancellation",
                AccuracyWarning,
            )
        return self.woodbury.logdet()
