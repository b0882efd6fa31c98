r"""Amortized exact-curvature preconditioning: ``g -> (G_k + D_t)^{-1} g``.

``G_k`` is the Gauss-Newton matrix of a small *curvature batch* (``curvature_batch_size`` examples
drawn from a training batch), rebuilt every ``refresh`` steps; between refreshes the stored
factorization preconditions every gradient. ``D_t`` is a per-parameter damping from the running
second moment of the gradients (Adam's):

    ``v_t = beta2 v_{t-1} + (1 - beta2) g_t^2``,   ``D_t = damping * (sqrt(v_t / (1 - beta2^t)) + eps)``.

On the batch's curvature subspace (rank ``r <= B_c C``) the step follows the exact curvature; on its
complement ``(G + D)^{-1} g = g / D``, an Adam step of size ``1 / damping``. With ``basis="eigen"``
(default) ``D = Q D' Q^T`` is diagonal in the eigenbasis ``Q`` of each weight's Kronecker gradient
statistics (:class:`EigenBasis`; SOAP's basis), and ``v`` holds the second moments of the rotated
gradients: ``(G + Q D' Q^T)^{-1} = Q ((U Q)^T S (U Q) + D')^{-1} Q^T``, the same Woodbury solve on
rotated rows of ``U`` (docs/math.md §6). ``D_t`` is refreshed with
the factorization and, during the first ``warmup`` steps (while ``v`` is still a short average),
every step where that rebuild is cheap (:data:`WARMUP_REBUILD_FLOPS`), and between refreshes on the
entries where ``D_t`` has drifted by more than ``stale_ratio``
from the ``D_k`` the factorization holds (a cheap test: one pass over ``n`` numbers; typically 1-3 of
17k entries, so ``K`` takes a rank-|J| update instead of an ``r^2 n`` rebuild). The factorization is
:class:`hessinv.lowrank.WoodburyFactor` (``G = U^T S U`` from one
backward sweep of ``r`` right-hand sides): ``r^2 n`` flops to refresh, ``4 r n`` per solve, against
``O(L p^3)`` for a Riccati factorization (math.md §6).

``curvature="hessian"`` uses the Riccati sweep instead, with a scalar damping: every pivot's negative
eigenvalues replaced by their absolute value (:meth:`hessinv.Hessian.factor` with ``modify="abs"``:
a positive definite ``L |D| L^T`` equal to ``H + lambda I`` wherever that is positive definite). Its
direction is not scaled like the Gauss-Newton default's (an Adam step of size ``1 / delta`` off the
curvature): it is clipped to the norm ``||g|| / lambda``, so where the curvature is small or the
factorization ill-conditioned across stages its length is that of a gradient step of size ``1 / lambda``
-- choose the optimizer's learning rate for that (with ``lambda = 1``, SGD with ``lr = 1`` and momentum 0.9
diverged on a small ReLU CNN whose every step was clipped; a review).

The same object serves two uses: :class:`hessinv.optim.Newton` (momentum, then this preconditioner)
and the *preconditioner mode* -- ``precondition_()`` turns every ``p.grad`` into the preconditioned
direction so that any ``torch.optim`` optimizer applies it:

>>> import torch, hessinv.optim
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> net = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
>>> loss_fn = torch.nn.CrossEntropyLoss()
>>> X, y = torch.randn(256, 10), torch.randint(0, 3, (256,))
>>> pre = hessinv.optim.Preconditioner(net, loss_fn, curvature_batch_size=8, seed=0)
>>> sgd = torch.optim.SGD(net.parameters(), lr=1.0, momentum=0.9)  # the direction is already scaled
>>> first = loss_fn(net(X), y).item()
>>> for i in range(0, 256, 32):
...     sgd.zero_grad()
...     loss_fn(net(X[i:i + 32]), y[i:i + 32]).backward()
...     _ = pre.precondition_(X[i:i + 32], y[i:i + 32])   # p.grad <- (G + D)^{-1} p.grad
...     sgd.step()
>>> loss_fn(net(X), y).item() < first
True
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hessinv import linalg
from hessinv.chain import (
    LossFn,
    _tensor,
    dense_grad,
    deterministic_chain,
    layers_in_mode,
    training_layers,
    unshared,
)
from hessinv.curvature import GaussNewton, Hessian, normalize_curvature
from hessinv.errors import (
    InvalidArgumentError,
    NonFiniteError,
    NotFittedError,
    ShapeMismatchError,
    TooLargeError,
    UnsupportedStageError,
    out_of_memory,
    warn,
)
from hessinv.lowrank import (
    WoodburyFactor,
    _uncovered_runs,
    factor_columns,
    packed_columns,
    unpacked_columns,
    unread_spans,
    written_runs,
)
from hessinv.stages.losses import (
    count_examples,
    counted_examples,
    holds_batch_sized,
    ignored_index,
    nothing_to_learn,
    sums_examples,
)
from hessinv.stages.protocol import basis_product

__all__ = ["Preconditioner", "EigenBasis"]

# the preconditioner's solve is not refined: K = I + W W^T formed in the model's dtype when its expected
# rounding error sqrt(n r) u max K_ii is within 1e-3 of lambda_min(K) >= 1 (WoodburyFactor; at the
# default damping max K_ii is 1-6: MNIST-1D MLP, n = 15k, r = 72, 2 * 1.25e-4)
_GRAM_TOL = 1e-3


def _positive(name: str, value: Any, integer: bool = False, allow_zero: bool = False) -> Any:
    value = _plain(value)
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if (
        isinstance(value, bool)
        or not ok_type
        or not math.isfinite(float(value) if abs(value) < 1e308 else math.inf)
        or value < 0
        or (value == 0 and not allow_zero)
    ):
        kind = "an int" if integer else "a finite number"
        raise InvalidArgumentError(f"{name} must be {kind} {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return value


def _checked_settings(
    damping: Any,
    curvature_batch_size: Any,
    refresh: Any,
    beta2: Any,
    eps: Any,
    warmup: Any,
    stale_ratio: Any,
    max_rank: Any,
    basis_max_dim: Any,
    basis_refresh: Any = None,
) -> dict[str, Any]:
    """:class:`Preconditioner`'s numeric settings, validated (an :class:`InvalidArgumentError` naming the
    first bad one) and as it keeps them: its constructor's arguments, or a checkpoint's ``settings``."""
    beta2 = _plain(beta2)
    if isinstance(beta2, bool) or not (isinstance(beta2, (int, float)) and 0 <= beta2 < 1):
        raise InvalidArgumentError(f"beta2 must be in [0, 1), got {beta2!r}")
    stale = float(_positive("stale_ratio", stale_ratio))
    if stale <= 1:
        raise InvalidArgumentError(f"stale_ratio must be > 1, got {stale_ratio!r}")
    return {
        "damping": float(_positive("damping", damping)),
        "curvature_batch_size": _positive("curvature_batch_size", curvature_batch_size, integer=True),
        "refresh": _positive("refresh", refresh, integer=True),
        "beta2": float(beta2),
        "eps": float(_positive("eps", eps)),
        "warmup": _positive("warmup", warmup, integer=True, allow_zero=True),
        "stale_ratio": stale,
        "max_rank": (
            min(
                MAX_RANK,
                ROOT_ROWS_PER_EXAMPLE * _positive("curvature_batch_size", curvature_batch_size, integer=True),
            )
            if max_rank is None
            else _positive("max_rank", max_rank, integer=True)
        ),
        "basis_max_dim": _positive("basis_max_dim", basis_max_dim, integer=True),
        "basis_refresh": (
            None if basis_refresh is None else _positive("basis_refresh", basis_refresh, integer=True)
        ),
    }


def _plain(value: Any) -> Any:
    """A numpy scalar (``np.float32(0.5)``, ``np.int64(4)``) or a 0-dimensional tensor (``torch.optim``
    takes ``lr=torch.tensor(0.5)``) as the Python number it holds; else ``value``."""
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        return value.item()
    if isinstance(value, Tensor) and value.dim() == 0 and not value.requires_grad:
        return value.item()
    return value


def _cast_state(obj: Any, dtype: torch.dtype, device: torch.device) -> Any:
    """``obj`` (a state dict, or a part of one) with every floating-point tensor in ``dtype`` on ``device``,
    as ``torch.optim`` casts a loaded state to its parameters' (a float64 checkpoint into a float32 model
    crashed at the next step; the Woodbury factor's ``K``, float64 in every run, keeps its dtype); other
    values as they are (the generators' byte states stay on the CPU)."""
    if isinstance(obj, Tensor):
        return obj.to(device=device, dtype=dtype) if obj.is_floating_point() else obj
    if isinstance(obj, dict):  # (the Woodbury factor's K is float64 in any run: its device only)
        return {
            k: v.to(device) if k == "K" and isinstance(v, Tensor) else _cast_state(v, dtype, device)
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_cast_state(v, dtype, device) for v in obj)
    return obj


def generator_from_seed(seed: Any) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (an int in ``[-2^63, 2^64)``, as ``torch.manual_seed`` takes
    it; None: drawn from torch's global generator); a named error for anything else."""
    seed = _plain(seed)
    if isinstance(seed, Tensor) and seed.numel() == 1 and not seed.is_floating_point():
        seed = int(seed.item())  # (what torch.manual_seed takes too)
    if isinstance(seed, float) and seed.is_integer():
        seed = int(seed)
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64:
        raise InvalidArgumentError(f"seed must be None or an int in [-2**63, 2**64), got {seed!r}")
    return torch.Generator(device="cpu").manual_seed(seed)


def _tie_broken(M: Tensor) -> Tensor:
    """``M`` (``(..., a, a)``, symmetric) in float64 plus a ramp ``i * 1e-8 max|M_ii| / a`` on the diagonal:
    early on ``M = G G^T`` has a large null space, whose basis ``eigh`` (or an orthogonal iteration)
    would pick from rounding noise (two processes with all-reduced gradients would then disagree with
    one). In float64 only: ``M`` accumulated in float32 carries rounding of ~6e-8 ``max|M_ii|``, above the
    ramp, so a float32 run's basis follows its rounding (inputs changed by one ulp moved the parameters by
    10% of their travel within 3 steps; a ramp of ``1e3 u`` of the dtype made that 1e-4, but trained the
    tanh chain of the suite to 50% in 787 steps against 625, median of 4 seeds; factors accumulated in
    float64 made it 1e-6, not adopted: a probe, 2026-12-06)."""
    M64 = M.double()
    a = M64.shape[-1]
    top = M64.diagonal(dim1=-2, dim2=-1).abs().amax(-1, keepdim=True)  # (..., 1)
    ramp = torch.arange(a, dtype=torch.float64, device=M.device) * (1e-8 / a) * top
    return M64 + torch.diag_embed(ramp)


def _eigenvectors(M: Tensor) -> Tensor:
    """Eigenvectors of the symmetric ``M`` (``(..., a, a)``, ascending eigenvalues), ties broken by
    :func:`_tie_broken`."""
    # contiguous: eigh returns column-major factors, and a resumed run (whose loaded Q are row-major)
    # must multiply with the same memory layout to stay bit-identical
    return torch.linalg.eigh(_tie_broken(M)).eigenvectors.to(M.dtype).contiguous()


#: sides of Kronecker factors refreshed by an exact eigendecomposition at every refresh; wider ones by
#: one step of orthogonal iteration (:meth:`EigenBasis._next`)
_EIGH_MAX = 64


def _power_step(M: Tensor, Q: Tensor) -> Tensor:
    """One step of orthogonal (subspace) iteration towards the eigenvectors of the symmetric ``M`` from
    the orthogonal ``Q`` (both ``(..., a, a)``): ``Q``'s columns sorted by their Rayleigh quotients
    ``diag(Q^T M Q)``, descending, then ``qr(M Q)`` (SOAP's refresh after its first ``eigh``, Vyas et
    al. 2024): a QR instead of an eigendecomposition (100 x 100: 0.36 ms against 0.64), and the
    exponential average ``M`` moves little between refreshes, so one step tracks its eigenbasis. Ties
    broken as in :func:`_eigenvectors`."""
    Q64 = Q.double()
    Y = _tie_broken(M) @ Q64
    order = (Q64 * Y).sum(-2).argsort(dim=-1, descending=True)  # Rayleigh quotients q_j^T M q_j
    Y = torch.gather(Y, -1, order[..., None, :].expand_as(Y))
    return torch.linalg.qr(Y).Q.to(M.dtype).contiguous()


#: :class:`Preconditioner`'s default ``basis_refresh``: None, the eigenbasis refreshed with the curvature
#: (every ``refresh`` calls). ``basis_refresh=2`` (SOAP's frequency: one step of orthogonal iteration,
#: the stored curvature carried into the new basis) gains per step -- the suite's MNIST-1D tanh chain at
#: step 2000 53.2% against 49.4% (4 seeds), digits' 90% at 1000 steps against 1750 -- but its step took
#: 1.25-1.95x as long on the suite's narrow chains, and in the suite's time protocol it lost the tanh
#: chain's 50% to SOAP (5.84 s against 4.87; 2.57 s first before): not the default (docs/training.md)
BASIS_REFRESH: int | None = None
#: ... those of its weights whose rotated sides are all at most this wide (where there are any); the others
#: with the curvature (their orthogonal iteration, ``O(a^3)``, and ``K``'s rebuild show in the step: the
#: 40-100-100-10 MLP's step 5.7 ms against 3.3 with every weight's basis refreshed every 2 steps, Adam's
#: 0.7 ms -- and its test accuracy the same, 65% at 500 steps; a probe)
BASIS_REFRESH_MAX_SIDE = 64
#: sides of weights above this stay unrotated in the eigenbasis by default (:class:`EigenBasis`): the
#: weight is rotated on its other side only, or not at all
BASIS_MAX_DIM = 256
#: ... and so does a weight's wider side while its rotation costs more than this many flops per step,
#: ``4 a b (a [Q_L] + b [Q_R])``: a 512 x 512 hidden weight's two sides (1.1e9; 78 ms per step on the
#: 2-core machine, a step 16x Adam's where 513 wide, unrotated, was 4x); 256 x 256 costs 1.3e8
ROTATION_MAX_FLOPS = 1.4e8


def rotated_sides(a: int, b: int, max_dim: int = BASIS_MAX_DIM) -> tuple[bool, bool]:
    """Which sides of an ``a x b`` weight :class:`EigenBasis` rotates: each side up to ``max_dim``, less
    the wider rotated side while the rotation costs more than :data:`ROTATION_MAX_FLOPS` per step. A
    one-sided rotation (``Q_R`` alone for a 512 x 64 input layer) keeps the narrow side's basis at
    ``4 a b^2`` flops per step and a ``b x b`` refresh, where both sides cost ``4 a b (a + b)`` and an
    ``a x a`` eigenbasis every refresh.

    >>> rotated_sides(100, 40), rotated_sides(512, 64), rotated_sides(10, 512), rotated_sides(1024, 1024)
    ((True, True), (False, True), (True, False), (False, False))
    """
    left, right = a <= max_dim, b <= max_dim
    while (left or right) and 4 * a * b * (a * left + b * right) > ROTATION_MAX_FLOPS:
        if left and (not right or a >= b):
            left = False
        else:
            right = False
    return left, right


#: rows of the Gauss-Newton root at most by default (:class:`Preconditioner`): the exact root of 8
#: examples has ``8 (C - 1)`` rows for ``C`` classes (72 for 10), and a refresh costs about ``r`` backward
#: passes and an ``r^2 n`` Gram -- by default at most :data:`ROOT_ROWS_PER_EXAMPLE` rows per curvature
#: example, and this many in all
MAX_RANK = 256
#: the default ``max_rank`` is ``min(MAX_RANK, ROOT_ROWS_PER_EXAMPLE x curvature examples)``: every row up
#: to 10 outputs per example (so models of at most 11 classes keep the exact root at every curvature batch,
#: as with 256 before 2026-12-05); on models with many outputs per example (a transformer LM's vocab x
#: length, 100 or 1000 classes, a 64-output autoencoder) 64-80 rows of 8 examples gave the same progress
#: per step as 256 at 1.4-2.7x less CPU time (docs/training.md)
ROOT_ROWS_PER_EXAMPLE = 10

#: during warm-up ``K`` is rebuilt with every step's ``D`` while a rebuild costs at most this many flops
#: per parameter: a Linear weight's structured rows cost ``B^2 + r^2 / m`` per entry (``m`` its inputs;
#: the suite's chains 180-900), dense rows ``r^2`` (Linears on (B, T, d) tokens, generic stages: 5000 at
#: ``r = 72``; on a d-128 transformer layer 160 ms a warm-up step against 13 after it). Above it the
#: staleness test runs from the first step, as after warm-up
WARMUP_REBUILD_FLOPS = 2048
#: every this many curvature refreshes, the traced stages are compared with the model's own forward on the
#: curvature batch, and the model split again where a value the trace took as a constant changed (a
#: global, another object's field; :meth:`Preconditioner._follow_constants`): about 0.1 ms a step at the
#: default ``refresh`` on a 17-stage residual chain whose steps take 3-4 ms
FOLLOW_CONSTANTS_REFRESHES = 4
#: the settings of a :class:`Preconditioner` that its ``state_dict`` saves and ``load_state_dict`` restores
_SETTINGS = (
    "damping", "curvature_batch_size", "refresh", "beta2", "eps", "warmup", "stale_ratio", "max_rank",
    "basis_max_dim", "basis_refresh",
)  # fmt: skip
#: ... of which a checkpoint from before they were may lack these (then: None, the behaviour before them)
_LATER_SETTINGS = ("basis_refresh",)


def _deterministic_curvature(method: Callable) -> Callable:
    """The method run with the model's Dropout / BatchNorm layers in eval mode
    (:func:`hessinv.chain.training_layers`): the curvature of the deterministic network."""

    @functools.wraps(method)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        with layers_in_mode(training_layers(self.model, self._mode_modules), False):
            return method(self, *args, **kwargs)

    return run


class EigenBasis:
    """Per weight matrix ``W`` (``a x b``; a conv kernel as ``(out, rest)``), Shampoo's Kronecker factors
    ``L = E[G G^T]``, ``R = E[G^T G]`` of its gradients (exponential averages, factor ``beta``) and their
    eigenvectors ``Q_L``, ``Q_R``; :meth:`rotate` maps the flat parameter vector to the basis
    ``X -> Q_L^T X Q_R`` (orthogonal: :meth:`unrotate` is its inverse and transpose), the identity on
    every other parameter. Adam's second moments taken in this basis are SOAP's (Vyas et al. 2024).
    A side above ``max_dim`` stays unrotated (``Q = I`` there, never formed: :attr:`sides`), and so does a
    weight's wider side while its rotation costs more than :data:`ROTATION_MAX_FLOPS`
    (:func:`rotated_sides`); a weight with neither side rotated is left out (Adam's diagonal there):
    rotating an ``a x b`` weight on both sides costs ``4 a b (a + b)`` flops per step against ``6 B a b``
    for its gradient on a batch of ``B``, and its refresh ``O(a^3 + b^3)`` -- on a 784-256-10 MLP
    (upsampled digits, batch 64; ``bench/wide_mlp.py``) the rotated input layer made a step 32-33 ms
    against 5.2-5.8 ms unrotated (Adam: 1.1-1.2 ms), and 95% test accuracy came in 1.6-1.8 s against
    0.3-0.5 s; on a 64-512-10 MLP (digits) rotating only the narrow sides (``Q_R`` of the 512 x 64 input
    layer, ``Q_L`` of the 10 x 512 head) took the step from 9.9 ms to 2.1-2.3 ms (Adam 0.46 ms) and the
    training loss after 400 steps from 1.3-1.5e-3 to 3-7e-4.
    Weights of equal shape are stacked: one batched product per shape (a deep chain of equal stages
    rotates in a few calls, not a few per stage). The tensors of ``unrotated`` stay unrotated too: a lookup
    table's rows (``nn.Embedding``) are independent parameters, each seen only when its token is in the
    batch, and ``Q_L`` over the tokens mixes the second moments of rows seen with those of rows not
    (:class:`Preconditioner` passes its model's Embedding weights: on a 200-token Embedding model the
    training loss after 400 steps was 0.12-0.16 rotated, 0.002-0.003 not; Adam's 0.02-0.03).

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> basis = EigenBasis(list(net.parameters()))
    >>> basis.blocks                       # (offset, rows, columns) of each weight; biases stay as they are
    [(0, 4, 3), (16, 2, 4)]
    >>> n = sum(p.numel() for p in net.parameters())
    >>> basis.accumulate(torch.randn(n)); basis.refresh()
    >>> x = torch.randn(n)
    >>> bool(torch.allclose(basis.unrotate(basis.rotate(x)), x, atol=1e-6))
    True
    """

    _FIELDS = ("L", "R", "QL", "QR")

    def __init__(
        self,
        params: Sequence[Tensor],
        beta: float = 0.95,
        max_dim: int = BASIS_MAX_DIM,
        unrotated: Tensor | Sequence[Tensor] = (),
        _two_sided: bool = False,
    ):
        self.beta, self.max_dim = beta, max_dim
        tables = not (isinstance(unrotated, tuple) and not unrotated)  # (the default (): the older rule)
        self._rule = (tables, _two_sided)  # (lookup tables left unrotated, the older rotation rule)
        self.blocks: list[tuple[int, int, int]] = []  # (offset, a, b)
        self.sides: list[tuple[bool, bool]] = []  # (Q_L, Q_R) of each block rotated, or the identity
        skip = {id(t) for t in ([unrotated] if isinstance(unrotated, Tensor) else unrotated)}
        o = 0
        for p in params:
            k = p.numel()
            a = int(p.shape[0]) if p.dim() >= 2 else 1
            b = k // a if a else 0
            left, right = rotated_sides(a, b, max_dim)
            if _two_sided:  # (the rule of checkpoints before 2026-12-04's one-sided rotation: both or none)
                left = right = max(a, b) <= max_dim and 4 * a * b * (a + b) <= ROTATION_MAX_FLOPS
            if p.dim() >= 2 and a > 1 and b > 1 and (left or right) and id(p) not in skip:
                self.blocks.append((o, a, b))
                self.sides.append((left, right))
            o += k
        like = params[0] if len(params) else torch.zeros(())
        kw = {"dtype": like.dtype, "device": like.device}
        # groups of equally shaped weights rotated alike: (a, b, left, right, their flat indices (G a b,))
        keys = [(a, b, *lr) for (_, a, b), lr in zip(self.blocks, self.sides, strict=True)]
        shapes = list(dict.fromkeys(keys))
        self._where: list[tuple[int, int]] = []  # block i -> (group, member)
        self._groups: list[tuple[int, int, bool, bool, Tensor]] = []
        self._single: list[int | None] = []  # a group's offset when it is one weight (sliced, not indexed)
        for key in shapes:
            offs = [o for (o, _, _), k in zip(self.blocks, keys, strict=True) if k == key]
            a, b = key[:2]
            idx = torch.cat([torch.arange(o, o + a * b) for o in offs]).to(like.device)
            self._groups.append((*key, idx))
            self._single.append(offs[0] if len(offs) == 1 else None)
        for key in keys:
            gi = shapes.index(key)
            self._where.append((gi, sum(1 for w in self._where if w[0] == gi)))
        # an unrotated side's L and Q are empty (G, 0, 0): Q_L = I there, never formed
        self._L, self._R, self._QL, self._QR = [], [], [], []
        for a, b, left, right, idx in self._groups:
            G = int(idx.numel()) // (a * b)
            a, b = (a if left else 0), (b if right else 0)
            self._L.append(torch.zeros(G, a, a, **kw))
            self._R.append(torch.zeros(G, b, b, **kw))
            self._QL.append(torch.eye(a, **kw).repeat(G, 1, 1))
            self._QR.append(torch.eye(b, **kw).repeat(G, 1, 1))

    def _per_block(self, name: str) -> list[Tensor]:
        stacks = getattr(self, "_" + name)
        return [stacks[g][j] for g, j in self._where]

    @property
    def L(self) -> list[Tensor]:
        """``L`` of each weight (views, in :attr:`blocks` order)."""
        return self._per_block("L")

    @property
    def R(self) -> list[Tensor]:
        """``R`` of each weight (views)."""
        return self._per_block("R")

    @property
    def QL(self) -> list[Tensor]:
        """``Q_L`` of each weight (views)."""
        return self._per_block("QL")

    @property
    def QR(self) -> list[Tensor]:
        """``Q_R`` of each weight (views)."""
        return self._per_block("QR")

    def _gather(self, X: Tensor, g: int) -> Tensor:
        """The weights of group ``g`` in ``X`` (m, n) as (m, G, a, b) (a view for a single weight)."""
        a, b, _, _, idx = self._groups[g]
        o = self._single[g]
        if o is not None:
            return X[:, o : o + a * b].view(X.shape[0], 1, a, b)
        return X.index_select(1, idx).view(X.shape[0], -1, a, b)

    def _scatter(self, X: Tensor, g: int, W: Tensor) -> None:
        """Write ``W`` (m, G, a, b) into the weights of group ``g`` in ``X`` (m, n)."""
        a, b, _, _, idx = self._groups[g]
        o = self._single[g]
        if o is not None:
            X[:, o : o + a * b] = W.reshape(X.shape[0], -1)
        else:
            X.index_copy_(1, idx, W.reshape(X.shape[0], -1))

    def accumulate(self, g: Tensor) -> None:
        """``L <- beta L + (1 - beta) G G^T``, ``R <- beta R + (1 - beta) G^T G`` for every weight."""
        # new tensors, not in place: a step that fails later puts the old ones back (Preconditioner._atomic)
        for gi, (_, _, left, right, _) in enumerate(self._groups):
            G = self._gather(g[None], gi)[0]
            if left:
                self._L[gi] = (self._L[gi] * self.beta).baddbmm_(G, G.mT, alpha=1 - self.beta)
            if right:
                self._R[gi] = (self._R[gi] * self.beta).baddbmm_(G.mT, G, alpha=1 - self.beta)

    def refresh(
        self,
        v: Tensor | None = None,
        carry: Sequence[Tensor] = (),
        rows: Tensor | None = None,
        factors: list | None = None,
        power: bool = False,
        skip: Sequence[int] = (),
        max_side: int | None = None,
    ) -> list | None:
        """``Q_L, Q_R`` <- the eigenvectors of ``L, R`` (ascending eigenvalues; with ``power``, one step of
        orthogonal iteration from the current basis for every side, SOAP's refresh, :func:`_power_step`,
        after a first ``eigh``). With ``P_L = Q_L'^T Q_L``, ``P_R = Q_R'^T Q_R`` (new basis ``'`` against
        old), everything kept in the old basis is carried over in place: the second moments ``v`` (n,) -- a
        diagonal ``diag(v)`` rotated by ``P_L (x) P_R`` has diagonal ``(P_L o P_L) V (P_R o P_R)^T`` per
        weight -- each vector of ``carry`` (n,) and each row of ``rows`` (r, n), whose weight blocks ``M``
        become ``P_L M P_R^T`` (e.g. a momentum kept in the basis, a Gauss-Newton root's rows); and
        ``factors`` (:func:`hessinv.lowrank.gauss_newton_root`'s ``(offset, d, m, T, Z, idx)``, rows
        ``T[q] Z[idx[q]]^T`` of a weight in the basis) are returned as ``T P_L^T``, ``Z P_R^T``. The weights
        at the offsets ``skip`` are left as they are in ``rows`` (columns never read: the weights
        :class:`hessinv.lowrank.WoodburyFactor` solves through ``factors``). With ``max_side``, only the
        weights whose rotated sides are all at most that wide are refreshed (:meth:`narrow`); the others keep
        their basis (``P = I``)."""
        rotated: dict[int, tuple[Tensor | None, Tensor | None]] = {}
        for gi, (a, b, left, right, _) in enumerate(self._groups):
            if max_side is not None and not self.narrow(gi, max_side):
                continue
            QL = self._next(self._L[gi], self._QL[gi], power) if left else self._QL[gi]
            QR = self._next(self._R[gi], self._QR[gi], power) if right else self._QR[gi]
            PL = QL.mT @ self._QL[gi] if left else None
            PR = QR.mT @ self._QR[gi] if right else None
            if factors:
                for k, (g, j) in enumerate(self._where):
                    if g == gi:
                        rotated[k] = (None if PL is None else PL[j], None if PR is None else PR[j])
            if rows is not None and rows.shape[0]:
                for (o, a, b), (g, j) in zip(self.blocks, self._where, strict=True):
                    if g == gi and o not in skip:
                        W = rows[:, o : o + a * b].view(-1, a, b)
                        W.copy_(
                            basis_product(None if PL is None else PL[j], W, None if PR is None else PR[j].mT)
                        )
            if v is not None:
                V = self._gather(v[None], gi)[0]
                self._scatter(
                    v[None],
                    gi,
                    basis_product(
                        None if PL is None else PL.square(), V, None if PR is None else PR.square().mT
                    ),
                )
            for c in carry:
                M = self._gather(c[None], gi)[0]
                self._scatter(c[None], gi, basis_product(PL, M, None if PR is None else PR.mT))
            self._QL[gi], self._QR[gi] = QL, QR
        if not factors:
            return factors
        where = {o: k for k, (o, _, _) in enumerate(self.blocks)}
        out = []
        for off, d, m, T, Z, idx in factors:
            k = where.get(off)
            PL, PR = (
                rotated.get(k, (None, None))
                if k is not None and self.blocks[k][1:] == (d, m)
                else (None, None)
            )
            out.append((off, d, m, T if PL is None else T @ PL.mT, Z if PR is None else Z @ PR.mT, idx))
        return out

    def narrow(self, group: int, max_side: int) -> bool:
        """Whether the weights of ``group`` have every rotated side at most ``max_side`` wide."""
        a, b, left, right, _ = self._groups[group]
        return (left or right) and (not left or a <= max_side) and (not right or b <= max_side)

    @staticmethod
    def _next(M: Tensor, Q: Tensor, power: bool = False) -> Tensor:
        """The refreshed basis: the eigenvectors (``eigh``) of sides up to :data:`_EIGH_MAX` (none with
        ``power``) and at the first refresh (``Q`` still the identity); of wider sides, one step of
        orthogonal iteration from the current ``Q`` (:func:`_power_step`), where the eigendecomposition's
        cost shows in the step."""
        a = Q.shape[-1]
        if (a <= _EIGH_MAX and not power) or bool((Q == torch.eye(a, dtype=Q.dtype, device=Q.device)).all()):
            return _eigenvectors(M)
        return _power_step(M, Q)

    def _map(self, X: Tensor, inverse: bool, inplace: bool = False) -> Tensor:
        if not self.blocks:
            return X
        vec = X.dim() == 1
        Y = X[None] if vec else X
        Y = Y if inplace else Y.clone()
        # (G, a, a) per group, None for an unrotated side
        left = [
            (Q if inverse else Q.mT) if g[2] else None for Q, g in zip(self._QL, self._groups, strict=True)
        ]
        right = [
            (Q.mT if inverse else Q) if g[3] else None for Q, g in zip(self._QR, self._groups, strict=True)
        ]
        if Y.shape[0] == 1:  # a vector: one batched product per group of equal weights
            for gi in range(len(self._groups)):
                self._scatter(Y, gi, basis_product(left[gi], self._gather(Y, gi)[0], right[gi]))
        else:  # many rows (U at a refresh): per weight, its rows in place (GEMMs over all rows)
            for (o, a, b), (g, j) in zip(self.blocks, self._where, strict=True):
                W = Y[:, o : o + a * b].view(-1, a, b)
                L_, R_ = left[g], right[g]
                W.copy_(basis_product(None if L_ is None else L_[j], W, None if R_ is None else R_[j]))
        return Y[0] if vec else Y

    def blocks_in(self, offset: int, size: int) -> list[tuple[int, int, int, Tensor | None, Tensor | None]]:
        """``(offset, a, b, Q_L, Q_R)`` of the weights inside the flat range ``[offset, offset + size)``
        (the ``rotation`` of :func:`hessinv.lowrank.gauss_newton_root`: ``U``'s rows built in the basis)."""
        return [
            (o, a, b, self._QL[g][j] if left else None, self._QR[g][j] if right else None)
            for (o, a, b), (g, j), (left, right) in zip(self.blocks, self._where, self.sides, strict=True)
            if offset <= o and o + a * b <= offset + size
        ]

    def rotate(self, X: Tensor) -> Tensor:
        """``X`` (n,) or (m, n) in the eigenbasis (per weight ``Q_L^T W Q_R``)."""
        return self._map(X, inverse=False)

    def unrotate(self, X: Tensor, inplace: bool = False) -> Tensor:
        """The inverse of :meth:`rotate` (per weight ``Q_L W Q_R^T``); with ``inplace``, in ``X``'s memory (a
        vector the caller owns: no copy of all n entries, most of them unrotated on a table's model)."""
        return self._map(X, inverse=True, inplace=inplace)

    def state(self) -> dict[str, Any]:
        """Copies of ``L``, ``R``, ``Q_L``, ``Q_R`` of each weight, and the weights and sides rotated
        (``layout``: what :meth:`load` compares), for a checkpoint."""
        sd: dict[str, Any] = {k: [t.clone() for t in getattr(self, k)] for k in self._FIELDS}
        sd["layout"] = self._layout()
        return sd

    def _layout(self) -> list[tuple[int, int, int, bool, bool]]:
        return [(o, a, b, *lr) for (o, a, b), lr in zip(self.blocks, self.sides, strict=True)]

    @staticmethod
    def layout_of(saved: Any) -> list[tuple]:
        """A checkpoint's ``layout`` as :meth:`state` writes it, or an :class:`InvalidArgumentError`."""
        if not isinstance(saved, (list, tuple)) or not all(
            isinstance(x, (list, tuple)) and len(x) == 5 for x in saved
        ):
            raise InvalidArgumentError(
                f"basis state's layout must be a list of (offset, rows, columns, Q_L, Q_R), got {saved!r}"
            )
        return [tuple(x) for x in saved]

    def load(self, sd: dict[str, list[Tensor]]) -> None:
        """Restore what :meth:`state` returned; one of other weights (another model, another ``max_dim``)
        is an :class:`InvalidArgumentError` that changes nothing. A state that records its ``layout``
        (since 2026-12-04) must have this basis's."""
        layout = sd.get("layout") if isinstance(sd, dict) else None
        if layout is not None and self.layout_of(layout) != self._layout():
            raise InvalidArgumentError(
                f"basis state is for rotated weights (offset, rows, columns, Q_L, Q_R) {list(layout)}; this "
                f"basis rotates {self._layout()} (basis_max_dim={self.max_dim}): build the optimizer for "
                "the checkpoint's model and basis_max_dim"
            )
        loaded = {}
        for k in self._FIELDS:
            stacks = [t.clone() for t in getattr(self, "_" + k)]
            got = sd.get(k) if isinstance(sd, dict) else None
            if not isinstance(got, (list, tuple)) or len(got) != len(self._where):
                count = len(got) if isinstance(got, (list, tuple)) else "no"
                raise InvalidArgumentError(
                    f"basis state is for {count} rotated weights; this basis rotates {len(self._where)} "
                    f"(basis_max_dim={self.max_dim}): build the optimizer with the checkpoint's "
                    "basis_max_dim"
                )
            for (g, j), t in zip(self._where, got, strict=True):
                if not isinstance(t, Tensor) or t.shape != stacks[g][j].shape:
                    shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                    here = tuple(stacks[g][j].shape)
                    raise InvalidArgumentError(
                        f"basis state holds a {shape} factor where this basis has {here} "
                        f"(basis_max_dim={self.max_dim}; (0, 0): a side left unrotated): build the optimizer "
                        "for the checkpoint's model and basis_max_dim"
                    )
                stacks[g][j] = t
            loaded[k] = stacks
        for k, stacks in loaded.items():
            setattr(self, "_" + k, stacks)


def _model_parameters(model: Any) -> list[Tensor]:
    """The model's parameters, frozen ones too: a module's own ``parameters()`` (an ``nn.ModuleList``'s
    lists a parameter shared by two items once), a list's in turn."""
    mods = [model] if isinstance(model, nn.Module) else list(model)
    return [p for m in mods for p in m.parameters()]


def _param_places(model: Any) -> dict[int, int]:
    """Each parameter's place in :func:`_model_parameters`, by ``id``: a frozen parameter's group is kept
    by its place, and checkpoints record their parameters' places (ids do not survive pickling)."""
    return {id(p): i for i, p in enumerate(_model_parameters(model))}


def param_places(model: Any, params: Sequence[Tensor]) -> list[int]:
    """The places of ``params`` in the model's parameters (:func:`_param_places`; -1 for none)."""
    place = _param_places(model)
    return [place.get(id(p), -1) for p in params]


@contextlib.contextmanager
def trainable_as(model: Any, places: Sequence[int]) -> Iterator[None]:
    """The model's parameters trainable as a checkpoint records them (``places``: their places in
    :func:`_model_parameters`) inside the block; each put back as it was after."""
    params, want = _model_parameters(model), set(places)
    before = [p.requires_grad for p in params]
    try:
        for i, p in enumerate(params):
            p.requires_grad_(i in want)
        yield
    finally:
        for p, was in zip(params, before, strict=True):
            p.requires_grad_(was)


def load_in_saved_set(
    owner: Any, sd: Any, fresh: bool, follow: Callable[[], Any], load: Callable[[], None]
) -> None:
    """``load()`` a checkpoint ``sd`` (a Newton's ``"newton"`` entry or a Preconditioner's state dict) into
    ``owner`` (its ``model`` and ``chain``). Where ``owner`` is ``fresh`` (no step yet) and the checkpoint's
    ``param_places`` name another set of the model's parameters than ``owner``'s, trainable as the model's
    are (saved right after a layer was frozen or unfrozen, resumed in the configuration after the change,
    as ``torch.optim`` resumes it): ``owner`` first ``follow()``s the checkpoint's set (the flags set so
    for that call only, :func:`trainable_as`), then loads as the optimizer that saved it; its next step
    follows the model's layers. A refused load changes nothing."""
    places = sd.get("param_places") if isinstance(sd, dict) else None
    shapes = sd.get("param_shapes") if isinstance(sd, dict) else None
    params = _model_parameters(owner.model)
    valid = (
        isinstance(places, (list, tuple))
        and isinstance(shapes, (list, tuple))
        and len(places) == len(shapes)
        and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(params) for i in places)
        # (the shapes at those places: a checkpoint of another model is refused as one, not followed)
        and all(tuple(params[i].shape) == tuple(sh) for i, sh in zip(places, shapes, strict=True))
    )
    if (
        not fresh
        or not valid
        or list(places) == param_places(owner.model, owner.chain.params)
        or owner.chain.trainable_changed()
    ):
        load()
        return
    saved = _snapshot(owner)
    with trainable_as(owner.model, places):
        follow()
    try:
        load()
    except BaseException:
        _restore(owner, saved)  # (a refused load changes nothing: groups' order, homes and all)
        raise


def _snapshot(owner: Any) -> dict[str, Any]:
    """What following a trainable set rebinds in ``owner`` (a Newton or a Preconditioner) and its
    preconditioner and parameter groups (shallow: following makes new tensors, it does not write into
    them); :func:`_restore` puts it back."""
    pc = getattr(owner, "preconditioner", None)
    return {
        "attrs": dict(owner.__dict__),
        "newton": dict(owner._newton) if isinstance(owner.__dict__.get("_newton"), dict) else None,
        "groups": [(g, dict(g, params=list(g["params"]))) for g in getattr(owner, "param_groups", [])],
        "pc": None if pc is None else (pc, dict(pc.__dict__)),
    }


def _restore(owner: Any, saved: dict[str, Any]) -> None:
    owner.__dict__.clear()
    owner.__dict__.update(saved["attrs"])
    if saved["newton"] is not None:
        owner._newton.clear()
        owner._newton.update(saved["newton"])
    for g, content in saved["groups"]:
        g.clear()
        g.update(content)
    if saved["pc"] is not None:
        pc, attrs = saved["pc"]
        pc.__dict__.clear()
        pc.__dict__.update(attrs)


def saved_before_a_freeze(sd: Any, chain: Any, model: Any) -> bool:
    """Whether a checkpoint ``sd`` (a Newton's ``"newton"`` entry or a Preconditioner's state dict) is of
    the parameters the optimizer's ``chain`` had at its last step while the ``model``'s trainable set has
    changed since: saved right after a layer was frozen (or unfrozen), before a step followed it --
    loaded as it is, and the next step follows. Told by its ``param_places`` in the model's parameters
    (one layer frozen and another of its shape unfrozen: the shapes alike, the places not); a checkpoint
    without them, by its ``param_shapes``: those of the last step and not those trainable now."""
    if not isinstance(sd, dict) or not chain.trainable_changed():
        return False
    places, shapes = sd.get("param_places"), sd.get("param_shapes")
    if isinstance(places, (list, tuple)):
        return list(places) == param_places(model, chain.params)
    if shapes is None:
        return False
    try:
        saved = sorted(tuple(s) for s in shapes)
    except TypeError:  # (not a list of shapes: the load's own check names it)
        return False
    unique = {id(p): p for p in _model_parameters(model)}.values()
    now = sorted(tuple(p.shape) for p in unique if p.requires_grad)
    return saved == sorted(tuple(p.shape) for p in chain.params) and saved != now


def _offsets(params: Sequence[Tensor]) -> list[int]:
    """Each tensor's offset in the flat vector of ``params``."""
    out, o = [], 0
    for t in params:
        out.append(o)
        o += t.numel()
    return out


def _kept_offsets(old: Sequence[Tensor], new: Sequence[Tensor]) -> list[tuple[int, int, int]]:
    """``(new offset, old offset, size)`` of each tensor of ``new`` that ``old`` holds too."""
    at = {id(t): o for t, o in zip(old, _offsets(old), strict=True)}
    return [(o, at[id(t)], t.numel()) for t, o in zip(new, _offsets(new), strict=True) if id(t) in at]


def follow_params(x: Tensor, old: Sequence[Tensor], new: Sequence[Tensor]) -> Tensor:
    """The flat vector ``x`` over the tensors ``old``, laid out over ``new`` (a layer frozen or unfrozen):
    each kept tensor's entries moved to its place, zeros for a tensor new to it."""
    y = x.new_zeros(sum(t.numel() for t in new))
    for b, a, k in _kept_offsets(old, new):
        y[b : b + k] = x[a : a + k]
    return y


def _lookup_tables(model: nn.Module | Sequence[nn.Module]) -> list[Tensor]:
    """The trainable tensors of the model's lookup tables (``nn.Embedding``, ``nn.EmbeddingBag``), which
    :class:`EigenBasis` leaves unrotated: the ``weight`` parameter itself, or under a parametrization
    (``torch.nn.utils.parametrizations.weight_norm``, ``spectral_norm``) its original tensors, or the
    older hooks' ``weight_g``/``weight_v``/``weight_orig`` -- never ``m.weight``, which would run the
    parametrization (a power iteration that moves ``spectral_norm``'s buffers)."""
    mods = [model] if isinstance(model, nn.Module) else list(model)
    out: list[Tensor] = []
    for top in mods:
        for m in top.modules():
            if not isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
                continue
            own = m._parameters
            if own.get("weight") is not None:
                out.append(own["weight"])
            elif torch.nn.utils.parametrize.is_parametrized(m, "weight"):
                out.extend(m.parametrizations["weight"].parameters())
            else:  # the older torch.nn.utils.weight_norm / spectral_norm hooks
                out.extend(own[k] for k in ("weight_g", "weight_v", "weight_orig") if own.get(k) is not None)
    return out


@contextlib.contextmanager
def explained_subsample(k: int | None, loss_fn: Any, targets: Tensor) -> Iterator[None]:
    """Re-raise a :class:`NonFiniteError` met while building the curvature of ``k`` examples drawn from
    the batch of ``targets`` with its likely cause, where it may be one: class-index targets of a loss
    whose ignored targets hessinv cannot see (inside a function), and a drawn sample of ignored targets
    only, whose mean is 0/0."""
    try:
        yield
    except UnsupportedStageError as e:  # a loss called on the drawn examples failed (a batch-sized weight)
        batch = int(targets.shape[0])
        if k is None or k >= batch or "loss_fn(outputs, targets) failed" not in str(e):
            raise
        if not holds_batch_sized(loss_fn, batch):  # (another cause: its message stands)
            raise
        raise UnsupportedStageError(
            f"{e}. The curvature is taken on {k} examples drawn from the batch's {batch} "
            "(curvature_batch_size): a loss that holds tensors sized for the whole batch (a per-example "
            "weight) cannot be called on them -- pass curvature_batch_size at least the batch size, or a "
            "loss without batch-sized tensors"
        ) from e
    except NonFiniteError as e:
        batch = int(targets.shape[0])
        if k is None or k >= batch or targets.is_floating_point() or ignored_index(loss_fn) is not None:
            raise
        raise NonFiniteError(
            f"{e}, on the curvature batch of {k} examples drawn from the batch's {batch}. If the batch's "
            "own loss is finite, every drawn example's target is likely one the loss ignores (a mean over "
            "no targets: 0/0): hessinv draws among the examples a loss counts where it can read its "
            "ignore_index -- nn.CrossEntropyLoss / nn.NLLLoss(ignore_index=...), F.cross_entropy or a "
            "functools.partial of it, targets of shape (B,) or per position (B, d...) -- not inside a "
            "lambda (one process then draws again; data-parallel ranks cannot, as their draws must agree). "
            "Pass the loss in one of those forms, or a curvature_batch_size as large as the batch"
        ) from e


#: draws of a curvature batch whose loss is not finite before it doubles (:func:`curvature_batch`)
REDRAWS = 3


def curvature_batch(
    loss_fn: Any,
    targets: Tensor,
    k: int,
    generator: torch.Generator,
    finite: Callable[[Tensor], bool] | None = None,
) -> Tensor | None:
    """The sorted indices of ``k`` examples of a batch, drawn without replacement (None: the whole
    batch); with a loss that ignores a class index (``CrossEntropyLoss(ignore_index=...)``), drawn among
    the examples it does not ignore (an all-ignored sample has no loss, hence no curvature).

    Where that index cannot be read (the loss is a function, or a module of the user's) and the targets
    are class indices, ``finite(idx)`` -- whether the loss of those examples is finite -- tells a sample
    of ignored targets only (a mean over none: 0/0) from one the loss counts: such a draw is drawn again,
    up to :data:`REDRAWS` times, then with twice the examples, up to the whole batch. (Without ``finite``,
    or with a draw that counts, the generator's draws are those of one sample.)"""
    B = int(targets.shape[0])
    pool = counted_examples(loss_fn, targets)
    if pool is None:
        if k >= B:
            return None
        idx = torch.randperm(B, generator=generator)[:k].sort().values
        opaque = finite is not None and not targets.is_floating_point() and ignored_index(loss_fn) is None
        tries = 0
        while opaque and not finite(idx.to(targets.device)):
            tries += 1
            if tries % (REDRAWS + 1) == 0:
                k *= 2
            if k >= B:
                return None
            idx = torch.randperm(B, generator=generator)[:k].sort().values
    elif k >= len(pool):
        idx = pool
    else:
        idx = pool[torch.randperm(len(pool), generator=generator)[:k]].sort().values
    return idx.to(targets.device)


def sums_on(owner: Any, X: Tensor, y: Tensor) -> bool | None:
    """:func:`hessinv.stages.losses.sums_examples` of ``owner.loss_fn`` on the model's outputs for a few
    of the examples of ``(X, y)`` it counts (all of them where those cannot tell: a zero loss)."""
    idx = counted_examples(owner.loss_fn, y)
    idx = (idx if idx is not None else torch.arange(int(y.shape[0]))).to(X.device)
    for part in (idx[:4], idx):
        with torch.no_grad():
            out = owner.chain.forward(X[part])[-1]
        sums = sums_examples(owner.loss_fn, out, owner.chain.prepare_targets(y[part]))
        if sums is not None or part.numel() == idx.numel():
            return sums
    return None


def finite_loss_on(owner: Any, X: Tensor, y: Tensor, idx: Tensor) -> bool:
    """Whether ``owner.loss_fn`` is finite on the examples ``idx`` of ``(X, y)`` (one forward pass)."""
    with torch.no_grad():
        out = owner.chain.forward(X[idx])[-1]
        try:
            value = owner.loss_fn(out, unshared(owner.chain.prepare_targets(y[idx])))
        except (RuntimeError, ValueError, IndexError, TypeError) as e:  # (named as the curvature's own call)
            raise UnsupportedStageError(
                f"the loss: loss_fn(outputs, targets) failed on {len(idx)} examples drawn from the batch "
                f"({type(e).__name__}: {' '.join(str(e).split())[:160]})"
            ) from e
        return bool(torch.isfinite(value).all())


def curvature_weight(
    owner: Any, Xc: Tensor, yc: Tensor, targets: Tensor, k: int | None = None, count: int | None = None
) -> float:
    """``w`` such that ``w C_k`` estimates the curvature of the loss of the whole batch ``targets`` from
    that of a curvature batch ``(Xc, yc)`` of ``k`` examples (default: ``Xc``'s): 1 where
    ``owner.loss_fn`` averages over the examples, ``n / k`` where it sums them (``n``: ``count``, by
    default the examples of ``targets`` the loss counts). Whether it sums is found once (:func:`sums_on`)
    and kept in ``owner._sums``."""
    if owner._sums is None:
        owner._sums = sums_on(owner, Xc, yc)
    if not owner._sums:
        return 1.0
    n = count_examples(owner.loss_fn, targets) if count is None else count
    return n / (int(yc.shape[0]) if k is None else k)


class Preconditioner:
    """``g -> (C + D)^{-1} g`` with ``C`` the exact curvature of a curvature batch, refreshed every
    ``refresh``
    steps (see the module docstring for the math).

    Args:
        model: a chain-shaped model that :func:`hessinv.gauss_newton` accepts.
        loss_fn: its loss module.
        curvature: ``"gauss_newton"`` (default; Woodbury, per-parameter damping) or ``"hessian"``
            (Riccati sweep, pivots' negative eigenvalues by absolute value, scalar damping).
        damping: the scale ``delta`` of ``D = delta (sqrt(v) + eps)`` (Gauss-Newton), or the scalar
            ``lambda`` of ``H + lambda I`` (Hessian). Steps off the curvature subspace are Adam steps of
            size ``1 / damping``.
        curvature_batch_size: examples of each training batch the curvature is built on (scaled by
            ``n / k`` for a loss that sums over the examples, ``n`` the first batch's count, to which
            every batch's gradient is scaled: :meth:`reference_scale`, :func:`curvature_weight`).
        refresh: rebuild the curvature every this many calls.
        basis_refresh: between the curvature's refreshes, refresh the eigenbasis every this many calls
            (one step of orthogonal iteration, SOAP's refresh) for the weights whose rotated sides are
            all at most :data:`BASIS_REFRESH_MAX_SIDE` wide, and carry the stored curvature into it: the
            root's rows ``U Q`` become ``U Q'`` (the same ``G``) and ``K`` is rebuilt with the call's ``D``
            -- no backward pass. None: the basis is refreshed with the curvature only.
        beta2, eps: the second-moment average of ``D``.
        warmup: for the first ``warmup`` calls ``D`` is refreshed every call (where a rebuild of ``K``
            costs at most :data:`WARMUP_REBUILD_FLOPS` per parameter; else as after it).
        stale_ratio: between refreshes, every entry of ``D_t`` that leaves ``[D_k / stale_ratio,
            stale_ratio D_k]`` is taken into ``K`` (same curvature; ``2 r^2`` flops per entry, a rebuild of
            ``r^2 n`` when more than ``r`` moved): a gradient spike raises ``v`` at once, and the step
            stays damped as Adam's would.
        basis: ``"eigen"`` (default): ``D`` diagonal in each weight's eigenbasis (:class:`EigenBasis`);
            ``"identity"``: ``D`` diagonal in the parameters (Adam's). Gauss-Newton curvature only.
        basis_max_dim: a weight's sides above this stay unrotated in the eigenbasis (the weight is rotated
            on its other side, or not at all; :func:`rotated_sides`, :class:`EigenBasis`).
        max_rank: rows of the Gauss-Newton root ``U`` at most (at least one per example): where the
            curvature batch's ``B`` examples have more than ``max_rank / B`` output directions of
            curvature (many classes), each keeps its ``max(1, max_rank // B)`` leading eigenpairs
            (:func:`hessinv.lowrank.gauss_newton_root`); the exact root would cost ``(B C)^2 n`` per
            refresh (C = 1000: seconds). Default: ``min(MAX_RANK, ROOT_ROWS_PER_EXAMPLE x B)``, 80 at
            ``B = 8``.
        seed: seed of the generator that draws curvature batches.
        weight_decay: ``wd`` of an L2 penalty ``wd/2 |x|^2`` on the loss: :meth:`precondition_` adds its
            gradient ``wd x`` and ``D`` its curvature ``wd I`` (exact; the attribute may be an (n,)
            vector, one value per parameter).
    """

    # the settings that shape the state: saved by state_dict, restored by load_state_dict (_SETTINGS)
    damping: float
    curvature_batch_size: int
    refresh: int
    beta2: float
    eps: float
    warmup: int
    stale_ratio: float
    max_rank: int
    basis_max_dim: int
    basis_refresh: int | None

    def __init__(
        self,
        model: nn.Module | Sequence[nn.Module],
        loss_fn: LossFn,
        *,
        curvature: str = "gauss_newton",
        damping: float = 500.0,
        curvature_batch_size: int = 8,
        refresh: int = 10,
        beta2: float = 0.95,
        eps: float = 1e-8,
        warmup: int = 20,
        stale_ratio: float = 2.0,
        basis: str = "eigen",
        basis_max_dim: int = BASIS_MAX_DIM,
        max_rank: int | None = None,
        seed: int | None = None,
        weight_decay: float = 0.0,
        basis_refresh: int | None = BASIS_REFRESH,
    ):
        self.model, self.loss_fn = model, loss_fn
        settings = _checked_settings(
            damping, curvature_batch_size, refresh, beta2, eps, warmup, stale_ratio, max_rank, basis_max_dim,
            basis_refresh,
        )  # fmt: skip
        self.__dict__.update(settings)  # (the class's annotated settings)
        self.chain, self._mode_modules = deterministic_chain(model, loss_fn)
        self.params = self.chain.params
        self.curvature = normalize_curvature(curvature)
        if basis not in ("identity", "eigen"):
            raise InvalidArgumentError(f"basis must be 'identity' or 'eigen', got {basis!r}")
        self.basis: EigenBasis | None = (
            EigenBasis(self.params, max_dim=self.basis_max_dim, unrotated=_lookup_tables(model))
            if basis == "eigen" and self.curvature == "gauss_newton"
            else None
        )
        self.generator = generator_from_seed(seed)
        n = self.chain.num_params
        self.state: dict[str, Any] = {
            "t": 0,
            "v": torch.zeros(n, dtype=self.chain.dtype, device=self.chain.device),
            "refreshes": 0,
        }
        self._factor: WoodburyFactor | Any = None
        self._root_structured = False
        self._root_tables: list | None = None  # (offset, size, columns, values): gauss_newton_root's
        self._root_factors: list | None = None  # the latest root's Linear factors (lowrank.structured_gram)
        self._op: Any = None
        self._hweight = 1.0  # the Hessian curvature batch's weight (_weight)
        self._sums: bool | None = None  # whether the loss sums over examples (curvature_weight)
        self.time_refresh = 0.0
        #: the L2 penalty ``wd/2 |x|^2``: its curvature ``wd I`` joins ``D``; :meth:`precondition_` adds its
        #: gradient ``wd x`` (a number, or an (n,) vector per parameter; :class:`~hessinv.optim.Newton`
        #: sets it from its parameter groups every step)
        self.weight_decay: float | Tensor = float(_positive("weight_decay", weight_decay, allow_zero=True))

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Step count, second moments, the generator, the stored Gauss-Newton factor (``U``, ``S``, ``D``
        and ``K``, which rank-|J| updates made more than a function of the others) and the settings that
        shape them (``"settings"``: ``damping``, ``beta2``, ``refresh``, ``curvature_batch_size``,
        ``max_rank``, ``basis_max_dim``, ...; ``gauss_newton``: the curvature's kind), so that a resumed
        run is bit-identical. A Hessian factorization (``curvature="hessian"``) is not stored: it is
        rebuilt at the next call, on that call's batch (the resumed run then differs)."""
        sd = {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in self.state.items()}
        sd["rng"] = self.generator.get_state()
        sd["param_shapes"] = [tuple(p.shape) for p in self.params]
        sd["param_places"] = param_places(self.model, self.params)  # (for saved_before_a_freeze)
        # numbers and flags only (a checkpoint compared entry by entry with torch.testing.assert_close)
        sd["settings"] = {key: getattr(self, key) for key in _SETTINGS}
        sd["settings"]["gauss_newton"] = self.curvature == "gauss_newton"
        if not isinstance(self.weight_decay, Tensor):  # (a Newton's per-group vector: from its groups)
            sd["settings"]["weight_decay"] = float(self.weight_decay)
        f = self._factor
        if isinstance(f, WoodburyFactor):
            # columns never written (their factors and tables are saved): not saved (packed_columns)
            runs = _uncovered_runs(f.U.shape[1], f._unread)
            sd["factor"] = {"U": packed_columns(f.U, runs).clone(), "U_runs": runs, "U_columns": f.U.shape[1]}
            sd["factor"] |= {"S": f.S.clone(), "D": f.D.clone(), "K": f.K.clone()}
            sd["factor"]["structured_only"] = f.structured_only
            if f.tables:
                sd["factor"]["tables"] = [(o, size, c.clone(), v.clone()) for o, size, c, v in f.tables]
            if f.factors:
                sd["factor"]["factors"] = [
                    tuple(x.clone() if isinstance(x, Tensor) else x for x in t) for t in f.factors
                ]
        if self.basis is not None:
            sd["basis"] = self.basis.state()
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output, its settings included (as ``torch.optim`` restores its
        groups' hyper-parameters: this object's constructor arguments give way to the checkpoint's; one
        saved before the settings were keeps this object's). One that cannot be restored into this
        object -- of another model (other parameter count), another ``basis`` or another curvature --
        gets an :class:`InvalidArgumentError`, and a refused load changes nothing
        (:meth:`check_state_dict`). A new preconditioner (no call yet) takes the checkpoint's trainable set
        where the model's differs (saved right after a layer was frozen or unfrozen, resumed in the
        configuration after the change): it loads as the one that saved it, and follows at its next call."""
        load_in_saved_set(
            self, sd, self.state["t"] == 0, self.follow_trainable, lambda: self._load_state_dict(sd)
        )

    def _load_state_dict(self, sd: dict[str, Any]) -> None:
        """:meth:`load_state_dict` on the trainable set the model has."""
        # (a layer frozen or unfrozen since: the checkpoint is of the model now -- unless saved before a step
        # followed it)
        if not saved_before_a_freeze(sd, self.chain, self.model):
            self.follow_trainable()
        loaded = self._loaded(sd)
        ours = {k: getattr(self, k) for k in loaded["settings"]}
        moved = [f"{k} {ours[k]!r} -> {v!r}" for k, v in loaded["settings"].items() if ours[k] != v]
        if moved:  # (not in the param_groups a user sees: said, not silent; a probe)
            warn(
                f"load_state_dict: the checkpoint's settings replace this preconditioner's "
                f"({', '.join(moved)}), as torch.optim restores its groups' hyper-parameters; set them again "
                "after loading to keep them",
                UserWarning,
            )
        self.__dict__.update(loaded["settings"])
        self.basis = loaded["basis"]
        self.generator.set_state(loaded["rng"])
        self.state = loaded["state"]
        # a Hessian factorization is not stored: it is rebuilt at the next call
        self._factor = loaded["factor"]

    def check_state_dict(self, sd: dict[str, Any]) -> None:
        """The :class:`InvalidArgumentError` that :meth:`load_state_dict` gives ``sd`` (another model's,
        another basis's or curvature's, a basis of other rotated weights, settings out of range), before
        anything is loaded; None if it fits."""
        self._loaded(sd)

    def _loaded(self, sd: dict[str, Any]) -> dict[str, Any]:
        """What :meth:`load_state_dict` sets from ``sd``, built and checked without changing ``self``."""
        if not isinstance(sd, dict):
            raise InvalidArgumentError(f"a state dict is a dict, got {type(sd).__name__}")
        sd = _cast_state(dict(sd), self.chain.dtype, self.chain.device)
        n = self.chain.num_params
        v = sd.get("v")
        if not isinstance(v, Tensor) or v.shape != (n,):
            got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise InvalidArgumentError(
                f"state dict is for a model of {got} parameters; this preconditioner's model has ({n},)"
            )
        shapes = sd.pop("param_shapes", None)  # (absent: a checkpoint from before it was saved)
        sd.pop("param_places", None)  # (read by load_state_dict)
        if shapes is not None and [tuple(s) for s in shapes] != [tuple(p.shape) for p in self.params]:
            raise InvalidArgumentError(
                f"state dict is for another model: parameters of shapes {[tuple(s) for s in shapes]}; this "
                f"preconditioner's are {[tuple(p.shape) for p in self.params]}"
            )
        saved = sd.pop("settings", None)
        settings = {key: getattr(self, key) for key in _SETTINGS}  # (a checkpoint from before they were)
        gauss_newton = True if "factor" in sd or "basis" in sd else None  # (only a Gauss-Newton one has)
        if saved is not None:
            required = [key for key in _SETTINGS if key not in _LATER_SETTINGS]
            if not isinstance(saved, dict) or not set(required) <= set(saved):
                raise InvalidArgumentError(
                    f"state dict's settings must hold {', '.join(required)}; got {saved!r}"
                )
            settings = _checked_settings(**{key: saved.get(key) for key in _SETTINGS})
            gauss_newton = saved.get("gauss_newton", gauss_newton)
            if "weight_decay" in saved:  # (it shapes D and the gradient: the checkpoint's)
                settings["weight_decay"] = float(
                    _positive("weight_decay", saved["weight_decay"], allow_zero=True)
                )
        if gauss_newton is not None and bool(gauss_newton) != (self.curvature == "gauss_newton"):
            theirs = "gauss_newton" if gauss_newton else "hessian"
            raise InvalidArgumentError(
                f"state dict is for a preconditioner with curvature={theirs!r}; this one has "
                f"curvature={self.curvature!r}: build the optimizer with curvature={theirs!r}"
            )
        if ("basis" in sd) != (self.basis is not None):
            raise InvalidArgumentError(
                f"state dict is for basis={'eigen' if 'basis' in sd else 'identity'!r}; this preconditioner "
                f"has basis={'eigen' if self.basis is not None else 'identity'!r}"
            )
        rng = sd.pop("rng", None)
        try:
            torch.Generator(device=self.generator.device).set_state(rng)
        except (TypeError, RuntimeError, ValueError):
            raise InvalidArgumentError(
                f"state dict's 'rng' is not a generator state (torch.Generator.get_state()): got "
                f"{type(rng).__name__}"
            ) from None
        b = sd.pop("basis", None)
        basis = self.basis
        if basis is not None:  # a fresh one (the checkpoint's rotated weights), loaded: self's untouched
            dim, tables, beta = settings["basis_max_dim"], _lookup_tables(self.model), basis.beta
            # the basis the checkpoint's code built: today's, or (checkpoints of 2026-12-04 and before)
            # lookup tables rotated too, and weights rotated on both sides or not at all; the first that
            # takes the saved factors is resumed (bit-identical), else the refusal names today's
            # (a checkpoint that records its layout loads into the rule that gives that layout: one
            # resumed from an older checkpoint keeps the older rule)
            layout = b.get("layout") if isinstance(b, dict) else None
            want = None if layout is None else EigenBasis.layout_of(layout)
            kinds = [(tables, False), ((), False), (tables, True), ((), True)]
            for u, two in kinds:
                basis = EigenBasis(self.params, beta=beta, max_dim=dim, unrotated=u, _two_sided=two)
                if want is None or want == basis._layout():
                    with contextlib.suppress(InvalidArgumentError):
                        basis.load(b)
                        break
            else:  # none takes it: today's basis names why
                basis = EigenBasis(self.params, beta=beta, max_dim=dim, unrotated=tables)
                basis.load(b)
        f = sd.pop("factor", None)
        factor = None
        if f is not None:
            U = f["U"]
            if "U_runs" in f:  # (a checkpoint of 2026-12-07 or later: the read columns alone)
                U = unpacked_columns(U, [tuple(r) for r in f["U_runs"]], int(f["U_columns"]))
            factor = WoodburyFactor(
                U,
                f["S"],
                f["D"],
                K=f.get("K"),
                gram_tol=_GRAM_TOL,
                factors=f.get("factors"),
                structured_only=bool(f.get("structured_only", False)),
                tables=f.get("tables"),
            )
        state = {k: (x.clone() if isinstance(x, Tensor) else x) for k, x in sd.items()}
        if state.get("t", 0) > 0:  # a checkpoint from before the summed loss's count was kept (2026-12-07):
            state.setdefault("examples", None)  # its moments are in its batches' own units, as it stepped
        return {"settings": settings, "basis": basis, "rng": rng, "state": state, "factor": factor}

    def follow_trainable(self) -> bool:
        """Follow a layer frozen or unfrozen since this preconditioner was built (``requires_grad_``, the
        model otherwise the same): rebuilt in place for the new trainable set, keeping the step count, the
        generator and each kept parameter's second moments and Kronecker factors and basis (built by the
        same rule; the curvature is rebuilt at the next :meth:`update`, on the new parameters); a
        per-parameter ``weight_decay`` follows too (0 for a parameter new to it). Returns whether it
        followed. A data-parallel preconditioner refuses (its wrapper fixes the parameters)."""
        old = self.chain
        if not old.trainable_changed():
            return False
        if type(self) is not Preconditioner:
            raise InvalidArgumentError(
                "a layer was frozen or unfrozen during data-parallel training, whose wrapper "
                "(DistributedDataParallel) fixes the trainable parameters: build the DataParallel wrapper "
                "again for the new set"
            )
        new = Preconditioner(
            self.model,
            self.loss_fn,
            curvature=self.curvature,
            basis="eigen" if self.basis is not None else "identity",
            seed=0,  # (its generator takes this one's state below: no draw from torch's global one)
            **{k: getattr(self, k) for k in _SETTINGS},
        )
        rule = getattr(self.basis, "_rule", (True, False))  # (a basis pickled before it was kept)
        if self.basis is not None and rule != (True, False):  # (an older checkpoint's rule)
            tables, two = rule
            new.basis = EigenBasis(
                new.params,
                beta=self.basis.beta,
                max_dim=self.basis.max_dim,
                unrotated=_lookup_tables(self.model) if tables else (),
                _two_sided=two,
            )
        new.generator.set_state(self.generator.get_state())
        new._sums, new.time_refresh = self._sums, self.time_refresh
        if "_sums_tried" in self.__dict__:
            new._sums_tried = self._sums_tried
        moved = functools.partial(follow_params, old=old.params, new=new.params)
        wd = self.weight_decay
        new.weight_decay = moved(wd) if isinstance(wd, Tensor) else wd
        new.state.update({k: v for k, v in self.state.items() if k != "v"})
        new.state["v"] = moved(self.state["v"])
        if self.basis is not None and new.basis is not None:
            to_old = {b: a for b, a, _ in _kept_offsets(old.params, new.params)}
            where = {
                o: (g, j) for (o, _, _), (g, j) in zip(self.basis.blocks, self.basis._where, strict=True)
            }
            for (o, _, _), (g, j) in zip(new.basis.blocks, new.basis._where, strict=True):
                if to_old.get(o) in where:  # (the same weight: rotated alike)
                    g0, j0 = where[to_old[o]]
                    for f in EigenBasis._FIELDS:
                        getattr(new.basis, "_" + f)[g][j].copy_(getattr(self.basis, "_" + f)[g0][j0])
        warned = self.__dict__.get("_warned_world")  # (said once per preconditioner, not per layout)
        self.__dict__.clear()
        self.__dict__.update(new.__dict__)
        if warned:
            self._warned_world = True
        return True

    # -- the pieces -------------------------------------------------------------------------------
    def observe(self, g: Tensor) -> Tensor:
        """Add the gradient ``g`` (n,) to the second-moment average; return ``g`` in the preconditioner's
        basis (rotated by :class:`EigenBasis`, or ``g`` itself), which ``solve(..., rotated=True)``
        takes."""
        st = self.state
        st["t"] += 1
        if self.basis is not None:  # second moments in the eigenbasis (SOAP)
            self.basis.accumulate(g)
            g = self.basis.rotate(g)
        st["v"] = (st["v"] * self.beta2).addcmul_(g, g, value=1 - self.beta2)  # a new tensor (see _atomic)
        return g

    @contextlib.contextmanager
    def _atomic(self) -> Iterator[None]:
        """A step's updates all or none: when the block raises (a refresh out of memory, moments that
        overflowed, an interrupt), everything :meth:`observe`, :meth:`update` and :meth:`solve` changed is
        put back -- the step count, second moments, Kronecker factors and basis, the stored factor and
        the generator that draws curvature batches -- so that the step can be retried without counting
        its gradient twice. Cheap: those methods replace tensors rather than write into them (the
        references are kept; :meth:`WoodburyFactor.update_damping` runs on a shallow copy of the factor). The
        parameters are not in it: :class:`~hessinv.optim.Newton` moves them after the block."""
        saved, state = dict(self.__dict__), dict(self.state)
        fields = [] if self.basis is None else [getattr(self.basis, "_" + f) for f in EigenBasis._FIELDS]
        basis = [list(f) for f in fields]
        rng = self.generator.get_state()
        try:
            yield
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(saved)
            self.state.clear()
            self.state.update(state)
            for f, old in zip(fields, basis, strict=True):
                f[:] = old
            self.generator.set_state(rng)
            raise
        finally:  # (the batch's scale is the step's: a later direct call of diagonal() or penalized() has 1)
            self.__dict__.pop("_scale", None)

    def reference_scale(self, inputs: Tensor, targets: Tensor) -> float:
        """The factor ``s`` that brings the batch ``(inputs, targets)``'s penalized loss to the units the
        Gauss-Newton state is kept in, for this call's :meth:`penalized` and :meth:`diagonal`: 1 for a loss
        that averages over the examples; ``N / n`` for one that sums them (``reduction='sum'``), with ``n``
        the examples of this batch the loss counts and ``N`` those of the first batch (kept in
        ``state["examples"]``; the curvature is scaled to ``N`` too, :func:`curvature_weight`). The step
        ``(s C_n + s wd I + D)^{-1} s (g + wd x)`` is then the batch's own (``D`` follows the gradient's
        scale): a batch of another size -- an epoch's last, shorter one -- steps as the mean-reduced loss
        would (with the penalty ``wd/2 |x|^2`` on that batch's sum), instead of ``n / N`` times too far
        along the curvature's subspace and mixing sums of other scales into the second moments. 1 with
        ``curvature="hessian"``, whose damping is absolute (the curvature is scaled to each refresh's
        batch, the gradients are not)."""
        scale = 1.0
        if self.curvature == "gauss_newton":
            if self._sums is None and not self.__dict__.get("_sums_tried"):
                self._sums, self._sums_tried = sums_on(self, inputs, targets), True
            if self._sums:
                n = count_examples(self.loss_fn, targets)
                N = self.state.setdefault("examples", n)
                scale = 1.0 if N is None else N / n  # (None: a checkpoint from before the count was kept)
        self._scale = scale
        return scale

    def penalized(self, g: Tensor) -> Tensor:
        """``s (g + wd x)``: the gradient ``g`` (n,) of the loss plus that of the weight decay's penalty, in
        the state's units (``s``: :meth:`reference_scale` of the call's batch, 1 for a mean)."""
        wd, s = self.weight_decay, self.__dict__.get("_scale", 1.0)
        g = g + wd * self.chain.flat_params() if isinstance(wd, Tensor) or wd else g
        return g if s == 1.0 else g * s

    def diagonal(self) -> Tensor:
        """``D = damping (sqrt(v / (1 - beta2^t)) + eps) + s weight_decay`` (n,): the weight decay's penalty
        ``wd/2 |x|^2`` has the curvature ``wd I`` (a number, or per parameter; ``s``:
        :meth:`reference_scale`)."""
        t = max(self.state["t"], 1)
        # (in place after the first op: three fewer n-sized tensors, the same numbers); the second moments
        # raised to the smallest normal number first where that leaves D as it is -- sqrt(tiny) (1e-19 in
        # float32) below half an ulp of eps, eps > 4e-12 -- as torch's vectorized sqrt takes a slow path on
        # zeros (an Embedding(50000, 64) model's unseen rows, 75% of v: 15.6 against 1.7 ms for 3.2M entries)
        fi = torch.finfo(self.state["v"].dtype)
        X = self.state["v"] / (1 - self.beta2**t)
        if self.eps * fi.eps > 4 * math.sqrt(fi.tiny):
            X.clamp_min_(fi.tiny)
        D = X.sqrt_().add_(self.eps).mul_(self.damping)
        wd = self.weight_decay * self.__dict__.get("_scale", 1.0)  # (in the state's units: reference_scale)
        return D + wd if isinstance(wd, Tensor) or wd else D

    def _free_damping(self) -> Tensor:
        """``D_t`` for the solve's zero columns of ``U`` (:meth:`WoodburyFactor.solve`'s ``free``): the one
        :meth:`update` formed this step (the same ``t`` and second moments), else formed now."""
        kept = self.__dict__.get("_d_now")
        if kept is not None and kept[0] == self.state["t"] and kept[1] is self.state["v"]:
            return kept[2]
        return self.diagonal()

    #: the examples of the stored curvature's batch (:meth:`_curvature_batch`), 0 before the first
    curvature_examples = 0

    def due(self) -> bool:
        """Whether the next :meth:`update` rebuilds the curvature."""
        return self._factor is None or (self.state["t"] - 1) % self.refresh == 0

    def refresh_at_next_update(self) -> None:
        """Rebuild the curvature at the next :meth:`update`, whatever the schedule (e.g. after
        ``curvature_batch_size`` changed); the schedule of later refreshes is unchanged."""
        self._factor = None

    #: draw a curvature batch again where its loss is not finite (:func:`curvature_batch`)
    redraw = True

    def _curvature_batch(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        finite = functools.partial(finite_loss_on, self, inputs, targets) if self.redraw else None
        idx = curvature_batch(self.loss_fn, targets, self.curvature_batch_size, self.generator, finite)
        self.curvature_examples = int(targets.shape[0]) if idx is None else int(idx.numel())
        return (inputs, targets) if idx is None else (inputs[idx], targets[idx])

    @_deterministic_curvature
    def curvature_root(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """``(U, S)`` with ``G = U^T diag(S) U`` the Gauss-Newton matrix of a curvature batch drawn from
        ``(inputs, targets)`` (scaled to the batch's: :func:`curvature_weight`), ``U``'s rows in the
        preconditioner's basis (the step :mod:`hessinv.optim.distributed` shares between ranks)."""
        Xc, yc = self._curvature_batch(inputs, targets)
        U, S = self._root(Xc, yc)
        return self._weighted(U, curvature_weight(self, Xc, yc, targets, count=self.state.get("examples"))), S

    def _weighted(self, U: Tensor, w: float) -> Tensor:
        """``sqrt(w) U`` (``G`` times ``w``; ``S`` stays the signs the Woodbury form needs), and the kept
        Linear factors of its rows (:attr:`_root_factors`) alike."""
        if w == 1.0:
            return U
        r = math.sqrt(w)
        if self._root_factors:
            self._root_factors = [(o, d, m, T * r, Z, i) for o, d, m, T, Z, i in self._root_factors]
        if self._root_tables:
            self._root_tables = [(o, size, c, v * r) for o, size, c, v in self._root_tables]
        if not self._root_structured:
            return U * r
        # in place, on the columns written only (those of the solved-through weights and of the tables
        # are not: an Embedding(50000, 64)'s 1 GB of U is never touched)
        for a, b in written_runs(U.shape[1], self._root_factors, self._root_tables, U.device):
            U[:, a:b] *= r
        return U

    def _root(self, X: Tensor, y: Tensor, of: int | None = None, full: bool = False) -> tuple[Tensor, Tensor]:
        """``(U, S)`` of the Gauss-Newton matrix on ``(X, y)``, rows in the basis (built there: a Linear
        weight's rows are outer products, rotated factor by factor); their factors are kept for ``K``
        (:func:`hessinv.lowrank.structured_gram`) and the solves, and the large weights' columns of
        ``U`` are not written (``structured_only``) unless ``full`` (a caller that uses ``U`` alone).
        ``of``: the size of the curvature batch ``X`` is part of (default: ``X`` itself), whose share of
        the ``max_rank`` rows ``X``'s examples keep."""
        self._follow_constants(X)
        op = GaussNewton(self.model, self.loss_fn, X, y, chain=self.chain, _transient=True)
        self._root_factors = []
        self._root_tables = None if full else []
        self._root_structured = not full
        per_example = max(1, self.max_rank // (of or int(X.shape[0])))
        return op.root(
            None if self.basis is None else self.basis.blocks_in,
            self._root_factors,
            max_rows=per_example * int(X.shape[0]),
            structured_only=not full,
            tables=self._root_tables,
        )

    @_deterministic_curvature
    def update(self, inputs: Tensor, targets: Tensor, carry: Sequence[Tensor] = ()) -> None:
        """Rebuild the curvature on a curvature batch drawn from ``(inputs, targets)`` when due; refresh
        ``D`` when due or during warm-up. The vectors of ``carry`` (n,), kept in the preconditioner's
        basis (what :meth:`observe` returns), follow it in place when the basis is refreshed."""
        t0 = time.perf_counter()
        if self.due():
            self.state["refreshes"] += 1
            with explained_subsample(self.curvature_batch_size, self.loss_fn, targets):
                try:
                    self._refresh_curvature(inputs, targets, carry)
                except TooLargeError:
                    raise
                except (RuntimeError, MemoryError) as e:  # (the allocator's, past the root's own estimate)
                    if not out_of_memory(e):
                        raise
                    # (a width-512 transformer block's first step: a raw RuntimeError after 5 GB, a probe)
                    raise TooLargeError(
                        f"the curvature of {self.curvature_batch_size} example(s) ran out of memory "
                        f"({' '.join(str(e).split())[:120]}); take it on fewer examples "
                        "(curvature_batch_size=...) or with fewer rows (max_rank=...)"
                    ) from None
        elif self._basis_due():
            self._refresh_basis(carry)
        elif self.curvature == "gauss_newton":
            D = self.diagonal()
            if not linalg.all_finite(D):  # (named as at a refresh: it was the factor's "zero damping entry")
                raise self._overflowed()
            self._d_now = (self.state["t"], self.state["v"], D)
            if (
                self.state["t"] <= self.warmup
                and self._factor.damping_update_cost(D.new_zeros(0, dtype=torch.long))[1]
                <= WARMUP_REBUILD_FLOPS * D.numel()
            ):
                self._factor = self._factor.with_damping(D)
                self.state["redamped"] = self.state.get("redamped", 0) + 1
            else:
                J = self._stale(D)
                if J.numel():  # a few entries moved (a gradient spike): a rank-|J| update of K
                    # (only entries on nonzero columns of U enter K: an Embedding's unseen tokens do not)
                    update, rebuild = self._factor.damping_update_cost(J)
                    if update <= rebuild:  # on a copy: the stored factor stays as it was if the step fails
                        self._factor = copy.copy(self._factor)
                        self._factor.update_damping(J, D[J])
                    else:
                        self._factor = self._factor.with_damping(D)
                    self.state["redamped"] = self.state.get("redamped", 0) + 1
        self.time_refresh += time.perf_counter() - t0

    def _basis_due(self) -> bool:
        """Whether this call refreshes the eigenbasis alone (every ``basis_refresh`` calls between the
        curvature's refreshes)."""
        k = self.basis_refresh
        return (
            k is not None
            and self.basis is not None
            and isinstance(self._factor, WoodburyFactor)
            and (self.state["t"] - 1) % k == 0
            and any(self.basis.narrow(g, BASIS_REFRESH_MAX_SIDE) for g in range(len(self.basis._groups)))
        )

    def _refresh_basis(self, carry: Sequence[Tensor]) -> None:
        """The eigenbasis one step of orthogonal iteration on (SOAP's refresh), and the stored curvature's
        root carried into it -- ``G`` is unchanged, its rows ``U Q`` become ``U Q'``: a Linear weight's kept
        factors rotated (``T P_L^T``, ``Z P_R^T``) and its written columns formed again from them (``r d m``
        flops, not a rotation's ``r (d^2 m + d m^2)``), other weights' columns rotated -- factored with
        today's ``D``: ``K`` rebuilt (``r^2`` per weight row and ``B^2`` per weight entry), no backward
        pass."""
        self._check_moments()
        f = self._factor
        # a new U (the stored factor stays as it was if the step fails): the columns outside the Linear
        # weights and tables copied, the weights' written ones formed below (the unwritten never read)
        U = torch.empty_like(f.U)
        for lo, hi in _uncovered_runs(U.shape[1], [*(f.factors or ()), *unread_spans(None, f.tables)]):
            U[:, lo:hi] = f.U[:, lo:hi]
        covered = [off for off, *_ in f.factors or ()]
        factors = self.basis.refresh(
            self.state["v"], carry, rows=U, factors=f.factors, power=True, skip=covered,
            max_side=BASIS_REFRESH_MAX_SIDE,
        )  # fmt: skip
        # (the weights solved through their factors: columns never read, left unwritten)
        unwritten = {off for off, *_ in f._solve_factors}
        for off, d, m, T, Z, idx in factors or ():
            if off not in unwritten:
                U[:, off : off + d * m] = factor_columns(T, Z, idx)
        D = self.diagonal()  # (v rotated with the basis)
        self._root_factors = factors or []
        # the columns outside the weights of factors and the tables are f's where no other weight rotated:
        # their scan for zeros and their Gram matrix's columns carried over
        rotated_only_factors = set(covered) >= {o for o, *_ in self.basis.blocks}
        known = {k: f._columns[k] for k in ("scanned", "gram") if k in f._columns and rotated_only_factors}
        self._factor = WoodburyFactor(
            U, f.S, D, gram_tol=_GRAM_TOL, factors=factors, structured_only=True, tables=f.tables,
            _columns=known,
        )  # fmt: skip
        self._d_now = (self.state["t"], self.state["v"], D)
        self.state["basis_refreshes"] = self.state.get("basis_refreshes", 0) + 1

    def _check_moments(self) -> None:
        """:meth:`_overflowed`'s error where the second moments or the Kronecker factors are not finite."""
        moments = [self.state["v"], *(self.basis._L + self.basis._R if self.basis is not None else [])]
        if not all(linalg.all_finite(m) for m in moments):
            raise self._overflowed()

    def _overflowed(self) -> NonFiniteError:
        """The error for second moments beyond the dtype's range (gradient entries whose squares are not
        representable), at a refresh or between refreshes alike."""
        big = torch.finfo(self.chain.dtype).max ** 0.5
        return NonFiniteError(
            f"the gradients' second moments overflowed {self.chain.dtype} (gradient entries beyond "
            f"{big:.2g}, whose squares are not representable): rescale the loss or the model"
            + (", or use a float64 model" if self.chain.dtype != torch.float64 else "")
        )

    def _refresh_curvature(self, inputs: Tensor, targets: Tensor, carry: Sequence[Tensor]) -> None:
        """The curvature of a curvature batch drawn from ``(inputs, targets)``, factored with today's ``D``
        (Gauss-Newton: the basis refreshed first, ``carry`` following it) or the scalar damping."""
        if self.curvature == "gauss_newton":
            self._check_moments()
            if self.basis is not None:  # G = U^T S U = Q (U Q)^T S (U Q) Q^T: factor in Q's basis
                self.basis.refresh(self.state["v"], carry, power=self.basis_refresh is not None)
            self._root_factors = self._root_tables = None
            U, S = self.curvature_root(inputs, targets)  # rows in Q's basis (U Q)
            # K and every solve from the Linear rows' outer-product structure where the root left
            # it (a few ms less per refresh, and U not read per step), else from U itself
            self._factor = WoodburyFactor(
                U,
                S,
                self.diagonal(),
                gram_tol=_GRAM_TOL,
                factors=self._root_factors,
                structured_only=self._root_structured,
                tables=self._root_tables,
            )
        else:
            Xc, yc = self._curvature_batch(inputs, targets)
            self._follow_constants(Xc)
            self._op = Hessian(self.model, self.loss_fn, Xc, yc, chain=self.chain)
            # w H_k + lambda I = w (H_k + (lambda / w) I): solve() divides by w
            self._hweight = curvature_weight(self, Xc, yc, targets, count=self.state.get("examples"))
            shift = (self.damping + self.weight_decay) / self._hweight
            self._factor = self._op.factor(shift, modify="abs")

    def _follow_constants(self, X: Tensor) -> None:
        """Every :data:`FOLLOW_CONSTANTS_REFRESHES`-th refresh: the model split again where a value its
        traced forward took as a constant -- a global, another object's field: not watched -- changed
        (:meth:`hessinv.chain.Chain.follow_constants`; about 1 ms on a 17-stage residual chain's 8
        examples, mostly putting its modules' attributes back)."""
        if self.state.get("refreshes", 0) % FOLLOW_CONSTANTS_REFRESHES == 0:
            self.chain.follow_constants(X)

    def _stale(self, D: Tensor) -> Tensor:
        """The cheap staleness test: the entries where ``D_t`` left ``[D_k / r, r D_k]`` (``r =
        stale_ratio``), e.g. after a gradient spike. The stored ``K`` then takes ``D_t`` there (same
        curvature): a rank-|J| update, or a rebuild when more than ``rank`` entries moved."""
        live = self._factor.live_index()  # (U's zero columns take D_t itself in every solve: free)
        if live is not None and not live.numel():  # (U = 0: a loss with no curvature here)
            return live
        ratio = D / self._factor.D
        if live is not None:  # (1 is inside [1 / r, r]: the dead columns never count)
            ratio = torch.where(self._factor.live, ratio, 1.0)
        lo, hi = torch.aminmax(ratio)
        r = self.stale_ratio
        if not (float(hi) > r or float(lo) < 1.0 / r):
            return ratio.new_zeros(0, dtype=torch.long)
        return torch.nonzero((ratio > r) | (ratio < 1.0 / r)).flatten()

    def solve(self, g: Tensor, rotated: bool = False) -> Tensor:
        """``(C + D)^{-1} g`` with the stored factorization (no refinement), for ``g`` of shape (n,); with
        ``rotated``, ``g`` is given in the preconditioner's basis (as :meth:`observe` returns it: one
        rotation per step saved). The result is in the parameters' coordinates."""
        if self._factor is None:
            raise NotFittedError("no curvature yet: call update(inputs, targets) (or precondition_) first")
        if g.shape != (self.chain.num_params,):
            raise ShapeMismatchError(f"g must have shape ({self.chain.num_params},), got {tuple(g.shape)}")
        if self.curvature == "gauss_newton":
            free = self._free_damping() if self._factor.live_index() is not None else None
            if self.basis is None:
                return self._factor.solve(g[:, None], free)[:, 0]
            gr = g if rotated else self.basis.rotate(g)
            return self.basis.unrotate(self._factor.solve(gr[:, None], free)[:, 0], inplace=True)
        x = self._factor.solve(g, refine=False)
        if self._hweight != 1.0:
            x = x / self._hweight
        # the modified factorization M = U |D| U^T has every pivot eigenvalue >= damping, but U (the
        # elimination across stages) can be ill-conditioned, and then ||M^{-1}|| far exceeds the
        # 1 / damping meant (1e3 on a tanh net whose Hessian has eigenvalues near -damping): the
        # direction is clipped to the norm ||g|| / damping a matrix M >= damping I would give
        bound, norm = float(g.norm()) / self.damping, float(x.norm())
        if not math.isfinite(norm):  # the sweep overflowed (float32, that growth): a damped gradient step
            x, norm = g / self.damping, bound
            self.state["fallbacks"] = self.state.get("fallbacks", 0) + 1
        if norm > bound:
            x = x * (bound / norm)
            self.state["clipped"] = self.state.get("clipped", 0) + 1
        return x

    # -- preconditioner mode ------------------------------------------------------------------------
    def gradient(self) -> Tensor:
        """The flat ``p.grad`` of the model's trainable parameters (zeros where a grad is None: a parameter
        the loss did not reach); an :class:`InvalidArgumentError` where every grad is None (no
        ``backward()`` before :meth:`precondition_`)."""
        if all(p.grad is None for p in self.params):
            raise InvalidArgumentError(
                "no parameter has a .grad: call loss.backward() on the batch before precondition_(inputs, "
                "targets)"
            )
        return torch.cat(
            [
                (dense_grad(p.grad) if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                for p in self.params
            ]
        )

    def _warn_if_data_parallel(self) -> None:
        """Once: a plain preconditioner in a process group of several ranks (DDP's loop, a probe's): each
        rank draws its curvature batch from its own shard, so the replicas drift apart silently (1.2% of
        the parameters' movement in 10 steps) -- :meth:`DistributedPreconditioner.wrap` shares it."""
        if getattr(self, "strategy", None) is not None or self.__dict__.get("_warned_world"):
            return  # (a DistributedPreconditioner shares its curvature)
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self._warned_world = True
            warn(
                f"Preconditioner in a process group of {dist.get_world_size()} ranks: each rank's curvature "
                "comes from its own batch, so data-parallel replicas (DistributedDataParallel) drift apart; "
                "use pc = hessinv.optim.distributed.DistributedPreconditioner.wrap(pc) on every rank (the "
                "same curvature everywhere), or Newton with distribute()",
                UserWarning,
            )

    @torch.no_grad()
    @_deterministic_curvature
    def precondition_(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """Replace every ``p.grad`` by the preconditioned direction ``(C + D)^{-1} g`` (a new tensor: a
        reference to the old grad kept elsewhere still holds the gradient), for any ``torch.optim`` optimizer
        to apply; ``(inputs, targets)`` is the batch the gradient came from
        (its curvature batch is drawn from it). Returns the direction (flat, in :attr:`params`' order --
        ``model.parameters()``'s, or the stages' where forward uses them in another; its entries for a
        parameter whose grad is None -- counted as a zero gradient -- are not written: its grad stays None, so
        that the optimizer skips it, as torch's do). The grads this call wrote, unchanged since (no
        ``backward()`` in between), are an :class:`InvalidArgumentError`: they are a direction, not a
        gradient. With ``torch.amp.GradScaler``, call ``scaler.unscale_(optimizer)`` first: the direction is
        not invariant to the gradient's scale (``D`` follows ``|g|``), and the scaler's later division by
        its scale (65536) would leave steps that scale too small (the loss flat over 100 steps; a probe)."""
        ready = self._precondition_checks(inputs, targets)
        if ready is None:
            return torch.zeros(self.chain.num_params, dtype=self.chain.dtype, device=self.chain.device)
        return self._precondition(*ready)

    def _precondition_checks(self, inputs: Any, targets: Any) -> tuple[Tensor, Tensor, Tensor] | None:
        """:meth:`precondition_`'s checks of the call, the batch, the model and the gradient, before any
        state moves: ``(inputs, targets, g)``, or None where the batch has nothing to learn (warned)."""
        written = self.__dict__.get("_written")  # (the direction, and each grad and version it wrote)
        if (
            written is not None
            and all(  # (values too: p.grad.data.copy_(g) keeps the version counter)
                p.grad is w
                and (w is None or (w._version == v and torch.equal(w.reshape(-1), written[0][o:e])))
                for p, (w, v, o, e) in zip(self.params, written[1], strict=True)
            )
        ):
            raise InvalidArgumentError(
                "precondition_: every p.grad is still the direction the last call wrote (no backward() "
                "since); compute the new batch's gradient (zero_grad(), loss.backward()) first"
            )
        self.follow_trainable()  # (a layer frozen or unfrozen since the last call)
        inputs, targets = _tensor(inputs, "inputs"), _tensor(targets, "targets")
        self._warn_if_data_parallel()
        skip = nothing_to_learn(self.loss_fn, targets)
        if skip is not None:  # (the grads stay torch's zeros: the optimizer's step is its own to take)
            warn(f"precondition_: {skip}: the grads were left as they are, the state unchanged")
            return None
        g = self.gradient()
        if not linalg.all_finite(g):  # before it enters (and poisons) the second moments
            self.chain.check_inputs(inputs, targets)
            raise NonFiniteError("the gradient contains NaN or infinity; the step was not taken")
        # the model and batch before anything is updated: a refused call leaves the state as it was (the
        # model every call, microseconds: a layer frozen or a parameter replaced between
        # refreshes would otherwise go unseen until the next one)
        self.chain.check_model()
        self._checked = self.chain.check_batch_if_new(inputs, targets, self.__dict__.get("_checked"))
        return inputs, targets, g

    def _precondition(self, inputs: Tensor, targets: Tensor, g: Tensor) -> Tensor:
        """:meth:`precondition_` after its checks: the state's update and the grads written."""
        with linalg.one_thread_if(self.chain.small(inputs)):  # small work: more threads only wait
            with self._atomic():  # (reference_scale's first count too: a refused call leaves no trace)
                self.reference_scale(inputs, targets)
                g = self.penalized(g)
                self.observe(g)
                self.update(inputs, targets)
                d = self.solve(g)
        offset, written = 0, []
        for p in self.params:
            k = p.numel()
            if p.grad is not None:
                p.grad = d[offset : offset + k].view_as(p).clone()
            grad = p.grad
            written.append((grad, None if grad is None else grad._version, offset, offset + k))
            offset += k
        self._written = (d, written)
        return d
