r"""The Gauss-Newton matrix of a batch through its square root, and ``(G + D)^{-1}`` by Woodbury.

On a batch of ``B`` examples with ``C`` outputs, ``G = J^T Lambda J`` (``Lambda`` block-diagonal, one
``C x C`` loss Hessian per example) has rank at most ``r = B C``: with ``Lambda_n = V_n diag(mu_n) V_n^T``
(eigenvalues of magnitude below ``C u max|mu|`` dropped),

    ``G = U^T S U``,   ``U = diag(sqrt|mu|) V^T J``  (r x n),   ``S = diag(sign mu)``  (+1 for convex losses).

``U^T`` is one backward sweep of the chain with ``r`` right-hand sides (``Jz^T`` down the stages,
``Jx^T`` read off at each one): ``O(r)`` backprops, no ``n x n`` matrix. For any nonsingular diagonal
``D`` (a number, or one entry per parameter -- e.g. Adam's ``sqrt(v)``) Woodbury's identity gives

    ``(D + U^T S U)^{-1} = D^{-1} - D^{-1} U^T K^{-1} U D^{-1}``,   ``K = S + U D^{-1} U^T``  (r x r),

so a factorization costs ``r^2 n + r^3/3`` flops and a solve ``4 r n``: far below the Riccati sweep's
``O(L p^3)`` when the batch is small (``r = 80`` for 8 examples of 10 classes), which makes it the
engine of the amortized preconditioner (:class:`hessinv.optim.Preconditioner`). The inertia is exact
(Haynsworth: ``In(D + U^T S U) = In(D) + In(-K) - In(-S)``, from the inertia of the block matrix
``[[D, U^T], [U, -S]]`` eliminated both ways), and so is ``log|det(D + U^T S U)| = sum log|D| +
log|det K|`` (``|det S| = 1``).

>>> import torch, hessinv
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
>>> X, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
>>> G = hessinv.gauss_newton(net, torch.nn.CrossEntropyLoss(), X, y)
>>> D = torch.rand(G.shape[0], dtype=torch.float64) + 0.1       # any positive diagonal damping
>>> F = G.factor(damping=D)                                     # Woodbury, rank <= 5 * 2
>>> x = F.solve(G.gradient)
>>> bool(torch.allclose(G @ x + D * x, G.gradient)), F.inertia.negative
(True, 0)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from hessinv import linalg
from hessinv.errors import (
    InvalidArgumentError,
    ShapeMismatchError,
    SingularError,
    TooLargeError,
)
from hessinv.linalg import all_finite
from hessinv.riccati import Inertia, _capacity_bytes, _memory_bytes
from hessinv.stages.dense import DenseStage
from hessinv.stages.losses import check_output_curvature_size
from hessinv.stages.protocol import in_basis, own_rows_only

__all__ = ["gauss_newton_root", "structured_gram", "WoodburyFactor"]


def _check_damping(Dv: Tensor) -> None:
    # (a positive D, the usual: its smallest entry tells both at once)
    if Dv.numel() and Dv.is_floating_point():
        lo, hi = (float(x) for x in torch.aminmax(Dv))
        if lo > 0 and math.isfinite(hi):
            return
    if not bool((Dv != 0).all()) or not all_finite(Dv):
        raise SingularError(
            "the diagonal damping has a zero or non-finite entry: D + G is singular there -- "
            "use a damping with every entry > 0",
            damping=float(Dv.abs().min()) if Dv.numel() else 0.0,
        )


def _checked_factor_inputs(U: Any, S: Any, damping: Any) -> None:
    """Named errors for what :class:`WoodburyFactor` cannot take (a probe found each silently wrong or a raw
    error): ``U`` a real floating ``(r, n)`` tensor (an integer one truncated a damping of 1.7 to 1),
    ``S`` an ``(r,)`` tensor of signs -- ``K = diag(S) + U D^{-1} U^T`` is Woodbury's capacitance matrix
    for ``S = S^{-1}`` only (``S = 2``: solves 6% off) --, the damping a real number or a real floating
    tensor."""
    if not isinstance(U, Tensor) or U.dim() != 2 or not U.is_floating_point():
        what = f"{U.dtype} of shape {tuple(U.shape)}" if isinstance(U, Tensor) else type(U).__name__
        raise InvalidArgumentError(f"WoodburyFactor: U must be a real floating (r, n) tensor, got {what}")
    if isinstance(S, Tensor) and S.is_complex():
        raise InvalidArgumentError(f"WoodburyFactor: S must be real signs (+1 or -1), got {S.dtype}")
    if not isinstance(S, Tensor) or tuple(S.shape) != (U.shape[0],):
        what = f"shape {tuple(S.shape)}" if isinstance(S, Tensor) else type(S).__name__
        raise ShapeMismatchError(
            f"WoodburyFactor: S must be a ({U.shape[0]},) tensor (one sign per row of U), got {what}"
        )
    if S.numel() and not bool(((S == 1) | (S == -1)).all()):
        raise InvalidArgumentError(
            "WoodburyFactor: S must hold signs (+1 or -1): D + U^T diag(S) U with another diagonal is "
            "D + U'^T diag(sign S) U' with U' = diag(sqrt|S|) U (rows with S = 0 left out)"
        )
    if isinstance(damping, Tensor):
        if not damping.is_floating_point():
            raise InvalidArgumentError(
                f"WoodburyFactor: a damping tensor must be real floating, got {damping.dtype}"
            )
    elif isinstance(damping, bool) or not isinstance(damping, numbers.Real):  # (numpy's scalars too)
        raise InvalidArgumentError(
            f"WoodburyFactor: the damping must be a real number or tensor, got {damping!r}"
        )


#: ``rotation(offset, size)``: the weight blocks ``(offset, a, b, Q_L, Q_R)`` inside the flat parameter
#: range ``[offset, offset + size)`` whose rows are to be returned rotated, ``Q_L^T W Q_R``
Rotation = Callable[[int, int], list[tuple[int, int, int, Tensor, Tensor]]]


def gauss_newton_root(
    blocks: list,
    dtype: torch.dtype,
    device: torch.device,
    rotation: Rotation | None = None,
    factors: list | None = None,
    max_rows: int | None = None,
    structured_only: bool = False,
    tables: list | None = None,
) -> tuple[Tensor, Tensor]:
    """``(U, S)`` with ``G = U^T diag(S) U`` for the Gauss-Newton matrix of ``blocks`` (model stages,
    then the loss stage): ``U`` is (r, n), ``S`` holds ``+-1`` (r,). See the module docstring.

    ``structured_only`` (with ``factors``): the columns of the Linear weights that :class:`WoodburyFactor`
    solves through their factors (at least ``_STRUCTURED_SOLVE`` entries, rows known to be one example's
    each) are not written into ``U`` -- its memory there is left as allocated, never to be read: pass
    ``WoodburyFactor(..., structured_only=True)``. Writing them is most of a wide network's refresh.
    ``tables`` (a list, with ``structured_only``) receives ``(offset, size, columns, values)`` for each
    lookup table (``nn.Embedding``) whose columns of ``U`` are left unwritten likewise: its rows are
    nonzero only on the ``c`` columns of the batch's tokens, ``U[:, columns] = values`` (r, c) -- pass
    ``WoodburyFactor(..., tables=...)`` (an Embedding(50000, 64): 80 rows of 3.2M columns, 1 GB, not
    written nor read).

    ``max_rows``: a budget for ``r`` (None: exact, ``r`` up to ``B C`` for ``B`` examples of ``C``
    outputs; at least one row per example is kept, so ``r <= max(max_rows, B)``). Where ``B C`` exceeds
    it, each example keeps ``k = max(1, max_rows // B)`` eigenpairs of its output curvature ``Lambda_n``,
    those of largest modulus as found by randomized subspace iteration with ``Lambda_n``'s products
    (``O(B C (k + 8))`` per iteration, three iterations and a Rayleigh-Ritz step, instead of ``B`` dense
    eigendecompositions, ``O(B C^3)``): ``U^T S U`` approximates the best rank-``k``-per-example part of
    ``G`` (within a few percent of its error in the tests). The optimizer's preconditioner uses it so
    that many classes (``C`` = 100, 1000) keep the refresh cheap.

    With ``rotation`` (e.g. :meth:`hessinv.optim.EigenBasis.blocks_in`) the rows come out in a rotated
    basis: every weight block ``W`` it names as ``Q_L^T W Q_R``. A Linear stage's rows are outer products
    ``delta z^T`` per example, so it rotates ``delta`` and ``z`` before forming them (``B (a^2 r + b^2)``
    flops instead of ``r (a^2 b + a b^2)``); other stages' rows are rotated after.

    ``factors``, if a list, receives for each such Linear weight ``(offset, d, m, T, Z, idx)``: its rows
    are ``U[q, offset:offset + d m] = vec(T[q] Z[idx[q]]^T)`` (``T`` (r, d), ``Z`` (B, m), ``idx`` the
    example of row ``q``), the structure :func:`structured_gram` uses."""
    loss = blocks[-1]
    B, C = loss.batch, loss.d_in
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
        raise InvalidArgumentError(f"max_rows must be a positive integer or None, got {max_rows!r}")
    # each example's eigenvalues of Lambda_n are known to about C u ||Lambda_n|| (its entries' rounding, and
    # eigh's) -- the example's own scale: the Jacobian weighs the examples differently (a saturated sigmoid
    # under BCELoss has Lambda ~ 1e20 and J ~ 1e-10, and a batch-wide threshold dropped every other
    # example) -- and those of a diagonal Lambda_n (an elementwise loss) exactly: its entries
    exact = torch.zeros(B, 1, dtype=torch.bool, device=device)
    classes = getattr(loss, "classes", None) or C
    factor = None
    per_position = C > classes and getattr(loss, "softmax_p", None) is not None
    if per_position and (max_rows is None or B * C <= max_rows):
        # a softmax at each of several positions (per-pixel cross-entropy): Lambda_n is block diagonal
        # over the positions, whose scales differ, and a confident position's eigenvalues p (1 - p) sit
        # below eigh's resolution u ||Lambda_n|| (10% off, and amplified by its Jacobian: 1e-5 of G) --
        # the closed form's exact factor instead (C rows per position; one position keeps eigh's C - 1)
        factor = loss.example_factor()
    if factor is not None:
        check_output_curvature_size(B, C, "the Gauss-Newton root of a per-position softmax")
        F, w = factor  # Lambda_n = F_n diag(w_n) F_n^T, F_n (C, C)
        mu = w.to(torch.float64).expand(B, C).clone()
        mu[F.eq(0).all(1)] = 0.0  # (a column that is zero: a class of probability 0, or a weight 0)
        V = F.to(torch.float64)
        exact.fill_(True)
    elif max_rows is not None and B * C > max_rows:
        mu, V = _top_output_curvature(loss, B, C, max(1, max_rows // B), dtype, device)
    else:
        check_output_curvature_size(
            B, C, "the Gauss-Newton root (a row budget, max_rows, needs products only)"
        )
        eye = torch.eye(C, dtype=dtype, device=device).expand(B, C, C).contiguous()
        Lam = loss.hzz(eye)  # (B, C, C): column j is Lambda_n e_j
        Lam = 0.5 * (Lam + Lam.mT)
        exact = (Lam - torch.diag_embed(Lam.diagonal(dim1=1, dim2=2))).eq(0).flatten(1).all(1, keepdim=True)
        mu, V = torch.linalg.eigh(Lam.double())
    tol = C * torch.finfo(dtype).eps * mu.abs().amax(1, keepdim=True) * ~exact
    # (a loss whose Lambda is positive semidefinite by its closed form: its negative eigenvalues are
    # rounding, and a row of sign -1 would make K = diag(S) + U D^-1 U^T indefinite, not >= I)
    keep = (mu if getattr(loss, "psd", False) else mu.abs()) > tol
    n_idx, j_idx = keep.nonzero(as_tuple=True)
    r = int(n_idx.numel())
    # column q of the signal: sqrt|mu_{n,j}| V_n[:, j] at example n for the q-th kept (n, j), zero elsewhere
    cols = (V[n_idx, :, j_idx] * mu[n_idx, j_idx].abs().sqrt()[:, None]).to(dtype)  # (r, C)
    offsets = [0]
    for blk in blocks[:-1]:
        offsets.append(offsets[-1] + blk.p)
    # (factors and tables describe all rows at once: one pass)
    k = _rows_per_pass(blocks, r, offsets[-1], dtype, device, whole=factors is not None or tables is not None)
    U = cols.new_empty(r, offsets[-1])
    grouped = _grouped_dense_shapes(blocks) if structured_only else set()
    for q0 in range(0, max(r, 1), k):
        q1 = min(r, q0 + k)
        s = torch.zeros(B, C, q1 - q0, dtype=dtype, device=cols.device)
        s[n_idx[q0:q1], :, torch.arange(q1 - q0, device=cols.device)] = cols[q0:q1]
        _root_pass(
            blocks, s, n_idx[q0:q1], U[q0:q1], offsets, rotation, factors, structured_only, tables, grouped
        )
    # a grouped weight left unwritten that its factors do not solve through after all (fewer factors kept
    # than dense stages: a stage mixing examples above some of them): its columns from its factors
    through = {f[0] for f in _through_factors(factors or [])} if grouped else set()
    for off, d, m, T, Z, idx in factors if grouped else ():
        if (d, m) in grouped and off not in through:
            U[:, off : off + d * m] = factor_columns(T, Z, idx).to(U.dtype)
    S = torch.sign(mu[n_idx, j_idx]).to(dtype)
    return U, S


def factor_columns(T: Tensor, Z: Tensor, idx: Tensor) -> Tensor:
    """A Linear weight's columns of ``U`` (r, d m) from its factors (:func:`gauss_newton_root`'s): row
    ``q`` is ``vec(T[q] Z[idx[q]]^T)``."""
    return (T[:, :, None] * Z[idx][:, None, :]).reshape(T.shape[0], T.shape[1] * Z.shape[1])  # (r = 0 too)


def _dense_shape(blk: Any) -> tuple[int, int] | None:
    """``(d, m)`` of a dense Linear stage's weight (None for other stages)."""
    st = getattr(blk, "stage", None)
    return (st.d, st.m) if isinstance(st, DenseStage) else None


def _grouped_dense_shapes(blocks: list) -> set[tuple[int, int]]:
    """The weight shapes of dense Linear stages that :class:`WoodburyFactor` solves in a group
    (:func:`_through_factors`: :data:`_STRUCTURED_GROUP` entries in all) by the dense stages alone -- a
    lower bound of the factors' totals, so each is solved through its factors and its columns of ``U``
    need not be written (15 of a deep narrow chain's 17 weights)."""
    total: dict[tuple[int, int], int] = {}
    for blk in blocks:
        shape = _dense_shape(blk)
        if shape is not None:
            total[shape] = total.get(shape, 0) + shape[0] * shape[1]
    return {sh for sh, t in total.items() if t >= _STRUCTURED_GROUP}


#: numbers one pass of :func:`gauss_newton_root` holds in its signal ``s`` (B, width, k) at most: the
#: rows are formed ``k`` at a time below it (a 64-128-64-10 classifier's root on 1000 examples held a
#: 1000 x 128 x 10000 signal, 9.2 GB, in one pass)
ROOT_PASS_ENTRIES = 2**25
#: the signals a pass holds at once, in units of ``s``: ``s``, ``Jz^T s`` and a stage's scaled copy inside it
ROOT_COPIES = 4


def _rows_per_pass(
    blocks: list, r: int, n: int, dtype: torch.dtype, device: torch.device, whole: bool
) -> int:
    """How many of the root's ``r`` rows one pass of :func:`gauss_newton_root` forms (all of them where
    ``whole``); :class:`TooLargeError` where ``U`` (r x n) and one pass's signals would not fit in the
    memory still available."""
    item = torch.empty(0, dtype=dtype).element_size()
    B = blocks[-1].batch
    per_row = B * max((max(b.d_in, b.d_out) for b in blocks), default=1)
    k = max(1, r if whole else min(r, ROOT_PASS_ENTRIES // max(per_row, 1)))
    need = (r * n + ROOT_COPIES * per_row * k) * item
    if need * 64 <= _capacity_bytes(device):
        return k
    total = _memory_bytes(device)
    if total is not None and need > total:
        raise TooLargeError(
            f"the Gauss-Newton root U ({r} rows = examples x kept output directions, by {n} parameters) and "
            f"its working signals need about {need / 2**30:.3g} GiB, and {total / 2**30:.3g} GiB of the "
            "device's memory is available; take the curvature on fewer examples, or bound the rows "
            "(root(max_rows=...); hessinv.optim.Newton / Preconditioner: curvature_batch_size=... or "
            "max_rank=...)"
        )
    return k


def _root_pass(
    blocks: list,
    s: Tensor,
    n_idx: Tensor,
    U: Tensor,
    offsets: list[int],
    rotation: Rotation | None,
    factors: list | None,
    structured_only: bool,
    tables: list | None,
    grouped: set[tuple[int, int]] = frozenset(),  # type: ignore[assignment]
) -> None:
    """Write the rows ``U`` (k, n) of the root for the signal ``s`` (B, C, k) at the loss's input (column
    ``q`` nonzero at example ``n_idx[q]`` only): one backward sweep, ``Jx^T`` read off at each stage
    (:func:`gauss_newton_root`'s arguments; ``grouped``: :func:`_grouped_dense_shapes`)."""
    own: Tensor | None = n_idx  # column q nonzero at example own[q] only, while no stage couples examples
    for l in range(len(blocks) - 2, -1, -1):
        blk = blocks[l]
        if blk.p:
            # the weights to rotate, at their offsets within the stage's columns
            rot = (
                [(o - offsets[l], *q) for o, *q in rotation(offsets[l], blk.p)]
                if rotation is not None
                else []
            )
            got: list | None = [] if factors is not None else None
            cols = U[:, offsets[l] : offsets[l + 1]]
            # (a dense stage's weight of a shape solved in a group: never read, like the large ones)
            shape = _dense_shape(blk)
            skip = (
                (0 if shape in grouped else _STRUCTURED_SOLVE)
                if structured_only and got is not None
                else None
            )
            tab: list | None = [] if tables is not None and skip is not None else None
            rows = blk.jxT_rows(s, rot, got, own, out=cols, skip_from=skip, tables=tab)
            for o, t, z, verified in got if rows is not None and got else ():
                _record_factors(factors, offsets[l] + o, (t, z), n_idx, checked=verified)
            for o, size, c, vals in tab if rows is not None and tab else ():
                tables.append((offsets[l] + o, size, offsets[l] + c, vals))  # type: ignore[union-attr]
            if rows is None:  # generic: (p, r) rows, rotated after
                pulls = getattr(blk, "pulls_per_example", False)
                cols.copy_((blk.jxT(s, own=own) if pulls else blk.jxT(s)).T)
                for o, a, b, QL, QR in rot:
                    W = cols[:, o : o + a * b].unflatten(1, (a, b))
                    W.copy_(in_basis(QL, W, QR))
        if l > 0:
            pulls = getattr(blk, "pulls_per_example", False)
            s_in, s = s, blk.jzT(s, own=own) if pulls else blk.jzT(s)
            if not blk.per_example:  # (a generic stage's: its rows tell whether it kept examples apart)
                apart = own is not None and pulls and blk.kept_apart(s_in)
                own = n_idx if apart or own_rows_only(s, n_idx) else None
            del s_in


def _top_output_curvature(
    loss, B: int, C: int, k: int, dtype: torch.dtype, device: torch.device, iterations: int = 3
) -> tuple[Tensor, Tensor]:
    """``(mu, V)``, (B, k) and (B, C, k): for each example the ``k`` eigenpairs of largest modulus of
    its output curvature ``Lambda_n`` (``loss.hzz``), by randomized subspace iteration: ``q = k + 8``
    seeded Gaussian columns, ``iterations`` products with ``Lambda_n`` and orthonormalizations, then the
    Rayleigh-Ritz eigenpairs of ``Q^T Lambda_n Q`` (float64).

    Where the cut at ``k`` splits an eigenvalue (one tied, to rounding, with the ``k``-th kept is left
    out: an MSE's ``Lambda_n = 2 / (B C) I`` ties all ``C``), any directions of its eigenspace are
    eigenvectors, and rounding would pick them -- differently for another scale ``1 / B``, i.e. another
    batch size around the example. The kept directions of that eigenvalue are then the orthonormalized
    projections onto the eigenspace of the first seeded columns: the same for every batch size (the
    sharded distributed preconditioner forms the rows of one curvature batch on several ranks)."""
    q = min(C, k + 8)
    gen = torch.Generator(device="cpu").manual_seed(0)
    # one start block for every example: an example's eigenpairs do not depend on the batch around it
    # (the sharded distributed preconditioner forms the rows of its examples on different ranks)
    Y0 = torch.randn(C, q, generator=gen, dtype=torch.float64).to(device)
    Y = Y0.expand(B, C, q)

    def lam(X: Tensor) -> Tensor:
        return loss.hzz(X.to(dtype)).double()

    for _ in range(iterations):
        Y = lam(torch.linalg.qr(Y)[0])
    Q = torch.linalg.qr(Y)[0]
    T = Q.mT @ lam(Q)
    T = 0.5 * (T + T.mT)
    w, Z = torch.linalg.eigh(T)  # (B, q), (B, q, q)
    order = w.abs().argsort(dim=1, descending=True, stable=True)
    w, Z = w.gather(1, order), Z.gather(2, order[:, None, :].expand(B, q, q))  # by modulus, descending
    if k < q:
        tol = 64 * math.sqrt(C) * torch.finfo(dtype).eps * w[:, :1].abs()  # (B, 1): rounding of ties
        # equal to the k-th kept eigenvalue, where that one stands above the rounding (below it, nothing
        # is told apart: the subspace iteration's order stands)
        tied = ((w - w[:, k - 1 : k]).abs() <= tol) & (w[:, k - 1 : k].abs() > tol)  # (B, q)
        pos = torch.arange(q, device=w.device)
        split = (tied & (pos >= k)).any(1)  # examples whose cut falls inside an eigenspace
        if bool(split.any()):
            inside = tied & (pos < k) & split[:, None]  # (B, q): the kept directions to choose anew
            Zt = Z * tied[:, None, :].to(Z.dtype)  # the eigenspace's Ritz vectors (others zeroed)
            R = Q.mT @ Y0[:, :k]  # (B, q, k): the first seeded columns in Ritz coordinates
            # their projections onto the eigenspace, orthonormalized in order (a prefix of a QR is the
            # QR of the prefix): the j-th chosen direction spans the first j + 1 projections
            Znew = torch.linalg.qr(Zt @ (Zt.mT @ R))[0]  # (B, q, k)
            which = (inside.cumsum(1) - 1).clamp(min=0)[:, :k]  # (B, k): the chosen column of Znew
            Zk = torch.where(
                inside[:, None, :k], Znew.gather(2, which[:, None, :].expand(B, q, k)), Z[:, :, :k]
            )
            rayleigh = (Zk * (T @ Zk)).sum(1)  # (B, k): the new directions' eigenvalue
            return torch.where(inside[:, :k], rayleigh, w[:, :k]), Q @ Zk
    return w[:, :k], Q @ Z[:, :, :k]


def _record_factors(
    factors: list, offset: int, tz: tuple[Tensor, Tensor], n_idx: Tensor, checked: bool = False
) -> None:
    """Append ``(offset, d, m, T, Z, idx)`` for a Linear weight's rows formed from ``t`` (B, d, r) and
    ``z`` (B, m) -- if every column of ``t`` is nonzero at its own example only (each row of ``U`` is one
    example's; a stage mixing examples would break it, and is then left to the dense Gram matrix).
    ``checked``: known to hold (every stage above keeps examples apart, ``Blocks.per_example``)."""
    t, z = tz
    if not checked and not own_rows_only(t, n_idx):
        return
    own = t[n_idx, :, torch.arange(t.shape[-1], device=t.device)]  # (r, d)
    # z may be the caller's input batch itself (a bias-free first layer, unrotated): the factor outlives
    # the call (solves until the next refresh), so it keeps its own copy
    factors.append((offset, t.shape[1], z.shape[1], own, z.clone(), n_idx))


def _uncovered_runs(n: int, factors: list) -> list[tuple[int, int]]:
    """``[(lo, hi), ...]``, ascending: the columns of ``U`` (``n``) outside every Linear weight of ``factors``
    (``(offset, d, m, ...)`` spans), as ranges -- from the spans alone, no pass over ``n`` numbers."""
    runs, at = [], 0
    for a, b in sorted((off, off + d * m) for off, d, m, *_ in factors):
        if a > at:
            runs.append((at, a))
        at = max(at, b)
    if at < n:
        runs.append((at, n))
    return runs


def packed_columns(U: Tensor, runs: list[tuple[int, int]]) -> Tensor:
    """The columns of ``U`` in ``runs`` (:func:`_uncovered_runs`), side by side: what a checkpoint or a
    pickle keeps of a factor whose other columns are never read (unwritten: a large Linear weight's,
    rebuilt from its Kronecker factors -- a 784-1024-1024-10 MLP's (72, 1.9M) ``U`` had 2,000 such
    columns of data, 512 MB written to disk)."""
    return torch.cat([U[:, lo:hi] for lo, hi in runs], 1) if runs else U.new_zeros(U.shape[0], 0)


def unpacked_columns(P: Tensor, runs: list[tuple[int, int]], n: int) -> Tensor:
    """:func:`packed_columns`' inverse: an (r, n) tensor with ``P``'s columns in ``runs``, the others
    unwritten (as :func:`gauss_newton_root` leaves them)."""
    U, at = P.new_empty(P.shape[0], n), 0  # (the other columns are never read: left unwritten, no memory)
    for lo, hi in runs:
        U[:, lo:hi] = P[:, at : at + hi - lo]
        at += hi - lo
    return U


def _uncovered(n: int, factors: list, device: torch.device) -> Tensor:
    """The indices of the ``n`` columns of ``U`` outside every Linear weight of ``factors``."""
    pieces = [torch.arange(a, b, device=device) for a, b in _uncovered_runs(n, factors)]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long, device=device)


def written_runs(
    n: int, factors: list | None, tables: list | None, device: torch.device
) -> list[tuple[int, int]]:
    """``[(lo, hi), ...]``: the columns of a root ``U`` (n columns) that :func:`gauss_newton_root` with
    ``structured_only`` writes -- all but those of the Linear weights solved through their factors
    (:data:`_STRUCTURED_SOLVE` entries or more) and of the lookup ``tables`` -- as ranges."""
    return _uncovered_runs(n, unread_spans(factors, tables))


def unread_spans(factors: list | None, tables: list | None) -> list[tuple]:
    """The ``(offset, d, m, ...)`` spans of a root's columns left unwritten (``structured_only``): the
    Linear weights of ``factors`` solved through their structure and the lookup ``tables``."""
    return [
        *(f for f in factors or () if f[1] * f[2] >= _STRUCTURED_SOLVE),
        *((off, 1, size) for off, size, *_ in tables or ()),
    ]


def structured_gram(
    U: Tensor,
    S: Tensor,
    Dinv: Tensor,
    factors: list,
    rest: Tensor | None = None,
    U_rest: Tensor | None = None,
) -> Tensor:
    """``K = diag(S) + U diag(Dinv) U^T`` (r x r, float64) using the outer-product structure of the
    Linear weights' rows (``factors`` from :func:`gauss_newton_root`): with rows ``vec(T_q z_{n(q)}^T)``,
    ``K_qp += sum_i T_qi T_pi w_{n(q) n(p) i}``, ``w_{nn'} = Dinv_W (z_n o z_n')`` -- ``B^2 d m + r^2 d``
    flops per weight instead of ``r^2 d m``; the other columns (``rest``: default, all outside the
    weights of ``factors``; a caller may leave out columns of ``U`` that are zero; ``U_rest``, if given, is
    ``U[:, rest]``) by the dense product.
    Symmetric up to rounding (:class:`WoodburyFactor` symmetrizes what it is given)."""
    r, n = U.shape
    K = torch.diag(S.double())
    Dinv64 = Dinv.double()
    parts = []
    for off, d, m, T, Z, idx in factors:
        Dw = Dinv64[off : off + d * m].view(d, m)
        Z64 = Z.double()
        if r <= _GRAM_ROWS_PER_EXAMPLE * Z.shape[0]:
            # few rows per example (a regression's one): the weight's columns formed, one GEMM -- the
            # structure's B^2 d m flops would match the columns' r^2 d m, through (B, B, m) temporaries
            # and B^2 / 2 pair products (256 examples of one output: 125 ms a Gram, against ~15)
            Uw = factor_columns(T.double(), Z64, idx)
            K += (Uw * Dw.reshape(-1)) @ Uw.T
            continue
        w = (Z64[:, None, :] * Z64[None, :, :]) @ Dw.T  # (B, B, d): w_ab = Dinv_W (z_a o z_b)
        parts.append((T.double(), idx, w))
    if parts:
        K += _pair_grams(parts)
    if rest is None:
        rest = _uncovered(n, factors, U.device)
    if rest.numel():
        Ur = (U.index_select(1, rest) if U_rest is None else U_rest).double()
        K += (Ur * Dinv64[rest]) @ Ur.T
    return K


#: :func:`structured_gram` forms a Linear weight's columns (a GEMM) where the root has at most this many
#: rows per example, its structure where more (a classifier's ``C - 1``: ``C^2`` times fewer flops)
_GRAM_ROWS_PER_EXAMPLE = 2


def _structured_update(
    T: Tensor, Z: Tensor, n_idx: Tensor, loc: Tensor, delta: Tensor, m: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The :func:`_pair_gram` part ``(T_rows, n_idx, w)`` of ``U_J diag(delta) U_J^T`` (r x r, float64) for
    entries ``loc`` (flat, within the weight) of a Linear weight whose rows of ``U`` are ``vec(T_q
    z_{n(q)}^T)``: ``sum_i T_qi T_pi (Z diag(delta_i) Z^T)_{n(q) n(p)}`` over its changed rows ``i`` --
    ``B^2`` flops per entry and ``r^2`` per row, where the columns themselves would cost ``r^2`` per entry
    (a 1000-class head: 4160 entries of 64 rows)."""
    rows, pos = torch.unique(loc // m, return_inverse=True)
    Dm = torch.zeros(rows.numel(), m, dtype=torch.float64, device=T.device)
    Dm[pos, loc % m] = delta
    Z64 = Z.double()
    w = (Z64[:, None, :] * Z64[None, :, :]) @ Dm.T  # (B, B, k): Z diag(delta_i) Z^T per changed row
    return T.double()[:, rows], n_idx, w


def _pair_grams(parts: list[tuple[Tensor, Tensor, Tensor]]) -> Tensor:
    """The sum of :func:`_pair_gram` over ``parts`` ``(T, idx, w)`` (r x r; at least one part): one call
    for the parts whose rows belong to the same examples ``idx`` (every Linear weight of one root), their
    ``T`` and ``w`` side by side -- the sum over ``i`` runs over all of them at once (a deep chain's 17
    weights: one batched product instead of 17 rounds of small ones)."""
    out: Tensor | None = None
    while parts:
        idx = parts[0][1]
        mine = [q[1] is idx or torch.equal(q[1], idx) for q in parts]
        same = [q for q, m in zip(parts, mine, strict=True) if m]
        parts = [q for q, m in zip(parts, mine, strict=True) if not m]
        T = same[0][0] if len(same) == 1 else torch.cat([q[0] for q in same], 1)
        w = same[0][2] if len(same) == 1 else torch.cat([q[2] for q in same], 2)
        M = _pair_gram(T, idx, w)
        out = M if out is None else out + M
    assert out is not None
    return out


def _pair_gram(T: Tensor, idx: Tensor, w: Tensor) -> Tensor:
    """``M_qp = sum_i T_qi T_pi w_{n(q) n(p) i}`` (r x r) for ``T`` (r, d), ``idx`` = ``n(q)`` (ascending)
    and ``w`` (B, B, d) symmetric in its first two indices (``w_ab = w_ba``: every caller's is a product
    of ``z_a`` and ``z_b``): rows grouped by example and padded to ``C`` per example, ``M_ab = T_a
    diag(w_ab) T_b^T`` for the pairs ``a <= b`` and ``M_ba = M_ab^T`` -- ``r^2 d / 2`` flops, ``B^2 C d / 2``
    numbers (a 1000-class head's, ``B = 8``, ``C = 32``: 16.5 against 5.1 ms); its off-diagonal blocks
    mirror each other exactly (the diagonal ones only to rounding: :meth:`WoodburyFactor._factor_K`
    symmetrizes)."""
    B, r, d = w.shape[0], T.shape[0], T.shape[1]
    counts = torch.bincount(idx, minlength=B)
    C = int(counts.max())
    sel = idx * C + (torch.arange(r, device=idx.device) - (torch.cumsum(counts, 0) - counts)[idx])
    Tp = torch.zeros(B * C, d, dtype=T.dtype, device=T.device)
    Tp[sel] = T
    Tp = Tp.view(B, C, d)
    ia, ib = torch.triu_indices(B, B, device=idx.device)
    half = (Tp[ia] * w[ia, ib][:, None, :]) @ Tp[ib].mT  # (pairs, C, C)
    Kp = Tp.new_empty(B, B, C, C)
    Kp[ia, ib] = half
    Kp[ib, ia] = half.mT
    return Kp.permute(0, 2, 1, 3).reshape(B * C, B * C)[sel][:, sel]


#: Linear weights with at least this many entries are solved through their rows' structure
#: (:meth:`WoodburyFactor.solve`; their columns of ``U`` are not written, ``structured_only``); measured
#: on the MNIST-1D tasks: 100 x 100 and 100 x 40 gain, 32 x 32 lose one at a time (0.7 ms per solve)
_STRUCTURED_SOLVE = 2048
#: ... and so are smaller weights of one shape that together hold at least this many entries: solved in
#: one batched product per shape (:func:`_solve_groups`), they gain -- the tanh chain's fifteen 32 x 32
#: weights: 0.09 against 0.42 ms for their columns of ``U`` (its columns are still written)
_STRUCTURED_GROUP = 8192


def _shared_rows(factors: list) -> list:
    """``factors`` with equal row-to-example maps ``idx`` as one tensor: :func:`_solve_groups` groups the
    weights by it (one batched product per shape), and a checkpoint's copies -- one per weight after a
    save and load -- split a group and changed the solve's order of sums (a resumed float32 run left the
    uninterrupted one by 1e-3; a review)."""
    seen: list[Tensor] = []
    out = []
    for off, d, m, T, Z, idx in factors:
        same = next((i for i in seen if i is idx or (i.shape == idx.shape and torch.equal(i, idx))), None)
        if same is None:
            seen.append(idx)
            same = idx
        out.append((off, d, m, T, Z, same))
    return out


def _through_factors(factors: list) -> list:
    """The Linear weights of ``factors`` that :meth:`WoodburyFactor.solve` solves through their rows'
    structure: :data:`_STRUCTURED_SOLVE` entries or more, or a shape shared by weights of
    :data:`_STRUCTURED_GROUP` entries in all."""
    total: dict[tuple[int, int], int] = {}
    for f in factors:
        total[f[1], f[2]] = total.get((f[1], f[2]), 0) + f[1] * f[2]
    return [f for f in factors if f[1] * f[2] >= _STRUCTURED_SOLVE or total[f[1], f[2]] >= _STRUCTURED_GROUP]


def _solve_groups(factors: list) -> list[tuple]:
    """The Linear weights of ``factors`` (``(offset, d, m, T, Z, idx)``, as :func:`gauss_newton_root`
    records them) grouped by shape and rows, for :meth:`WoodburyFactor.solve`: one batched product per
    group instead of a few small ones per weight. Each group ``(offsets, d, m, T, Z, idx, stride)``:
    its weights by offset, ``T`` (G, r, d) and ``Z`` (G, B, m) stacked, and ``stride`` the distance
    between consecutive weights' offsets where it is one (a chain of equal stages: weight, bias, weight,
    ... -- the parameter vector viewed (G, stride) without a copy), else None (gathered by index)."""
    keyed: dict[tuple, list] = {}
    for f in factors:
        _, d, m, T, Z, idx = f
        keyed.setdefault((d, m, Z.shape[0], T.dtype, id(idx)), []).append(f)
    groups = []
    for (d, m, *_), fs in keyed.items():
        fs.sort(key=lambda f: f[0])
        offsets = [f[0] for f in fs]
        gaps = {b - a for a, b in zip(offsets[:-1], offsets[1:], strict=True)}
        stride = d * m if len(fs) == 1 else gaps.pop() if len(gaps) == 1 else None
        T = torch.stack([f[3] for f in fs])
        Z = torch.stack([f[4] for f in fs])
        groups.append((offsets, d, m, T, Z, fs[0][5], stride))
    return groups


def _group_view(X: Tensor, group: tuple) -> Tensor:
    """The weights of ``group`` (:func:`_solve_groups`) in ``X`` (n, k), as (G, d m, k): a view where the
    group has a stride, else a gathered copy."""
    offsets, d, m, *_, stride = group
    G, k = len(offsets), X.shape[1]
    if stride is not None:
        return X[offsets[0] : offsets[0] + (G - 1) * stride + d * m].as_strided(
            (G, d * m, k), (stride * X.stride(0), X.stride(0), X.stride(1))
        )
    return torch.stack([X[o : o + d * m] for o in offsets])


#: columns per block of :meth:`WoodburyFactor._live_columns`' scan for zero columns
_SCAN_COLUMNS = 2**14
#: columns up to which :meth:`WoodburyFactor._live_columns` picks a product's columns by a mask over all
#: of them (a few small ops; above, run by run: an Embedding's millions of columns)
_ONE_PASS_COLUMNS = 2**17


def _gram_in_blocks(U: Tensor, dinv: Tensor) -> Tensor:
    """``U diag(dinv) U^T`` in float64, over blocks of ``U``'s columns converted one at a time: no float64
    copy of ``U`` nor of ``U D^{-1}`` (a 1.9M-parameter MLP's 160-row root: 2.4 GB each, and its
    factorization ran out of memory in their product -- a probe); one block where ``U`` is small (the same
    sums as the whole product's)."""
    r, n = U.shape
    step = max(1, _GRAM_BLOCK_ENTRIES // max(r, 1))
    K = U.new_zeros(r, r, dtype=torch.float64)
    for a in range(0, n, step):
        Ub = U[:, a : a + step].double()
        K += (Ub * dinv[a : a + step].double()) @ Ub.T
    return K


#: float64 numbers of ``U`` one block of :func:`_gram_in_blocks` converts (128 MB)
_GRAM_BLOCK_ENTRIES = 2**24


class WoodburyFactor:
    """``D + U^T diag(S) U`` factored through ``K = diag(S) + U D^{-1} U^T`` (r x r, float64).

    ``D``: a nonzero number or a (n,) tensor with no zero entry. ``solve`` costs ``4 r n`` flops;
    :meth:`with_damping` refactors for a new ``D`` reusing ``U`` (``r^2 n`` flops);
    :meth:`update_damping` changes ``D`` on ``k`` entries in place (``2 r^2 k`` flops).
    ``K`` may be passed (a checkpoint's), else it is formed: in float64 by default, or -- ``gram_tol``
    given, ``U`` below float64 and ``S = +1`` (a convex loss: ``K = I + W W^T``, ``W = U D^{-1/2}``, so
    ``lambda_min(K) >= 1``) -- in ``U``'s dtype when the expected rounding error of ``K`` relative to
    ``lambda_min(K)``, ``sqrt(n r) u max_i K_ii`` (each entry a sum of ``n`` products, rounding errors
    of random sign: ``sqrt(n) u sqrt(K_ii K_jj)``; over the ``r x r`` matrix a further ``sqrt(r)``), is at
    most ``gram_tol`` (about 3x faster; for an unrefined preconditioner,
    :class:`hessinv.optim.Preconditioner`). The worst case is ``n r u max_i K_ii``.
    """

    def __init__(
        self,
        U: Tensor,
        S: Tensor,
        damping: float | Tensor,
        K: Tensor | None = None,
        _U64: Tensor | None = None,
        gram_tol: float | None = None,
        factors: list | None = None,
        structured_only: bool = False,
        _columns: dict | None = None,
        tables: list | None = None,
    ):
        _checked_factor_inputs(U, S, damping)
        self.U, self.S = U, S
        n = U.shape[1]
        if isinstance(damping, Tensor) and damping.dim() == 0:  # (a number held in a tensor)
            damping = float(damping)
        if isinstance(damping, Tensor):
            if damping.shape != (n,):
                raise ShapeMismatchError(
                    f"a diagonal damping must have shape ({n},), got {tuple(damping.shape)}"
                )
            Dv = damping.detach().to(
                device=U.device, dtype=U.dtype
            )  # numbers, not a graph (solves are detached)
        else:
            try:
                Dv = torch.full((n,), float(damping), dtype=U.dtype, device=U.device)
            except RuntimeError as e:  # (1e39 in float32: "cannot be converted without overflow")
                raise InvalidArgumentError(
                    f"WoodburyFactor: the damping {damping!r} is not a {U.dtype} number"
                ) from e
        _check_damping(Dv)
        self.D = Dv
        self._Dinv = 1.0 / Dv
        self._Ud: Tensor | None = None
        self._U64, self.gram_tol = _U64, gram_tol
        self.factors = _shared_rows(factors) if factors else None
        # solves through the structure of the Linear weights with at least _STRUCTURED_SOLVE entries, or
        # in groups of equal ones (a few small products each: for smaller weights their dispatch costs more
        # than reading U's columns); the other columns densely
        self._solve_factors = _through_factors(self.factors or [])
        self._solve_groups = _solve_groups(self._solve_factors)
        # the weights solved through their structure have columns of U never read --
        # gauss_newton_root(structured_only=True) leaves the large ones unwritten, a basis refresh every
        # one (Preconditioner._refresh_basis); not scanned for zeros: live, see live
        self.structured_only = structured_only and bool(self._solve_factors)
        # lookup tables whose columns of U are unwritten: (offset, size, columns, values), gauss_newton_root's
        self.tables = tables or None
        # the columns of U never read: the solved-through weights', the tables'
        self._unread = [*self._solve_factors, *unread_spans(None, self.tables)]
        # which columns of U each product reads, by U alone (shared with with_damping's factorizations):
        # those outside the structured weights, less the columns that are zero (an Embedding's rows of
        # tokens outside the curvature batch: most of its columns)
        self._columns = {} if _columns is None else _columns
        self._factor_K(self._gram() if K is None else K)

    def __copy__(self) -> WoodburyFactor:
        """A shallow copy sharing ``U`` (not through :meth:`__getstate__`'s packing: a preconditioner's
        damping update copies the factor every few steps)."""
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        return other

    def __getstate__(self) -> dict[str, Any]:
        """For ``pickle`` / ``copy.deepcopy``: ``U`` (and its float64 copy, ``U D^-1``) by the columns a
        product reads (:func:`packed_columns`); the rest is left unwritten."""
        state = self.__dict__.copy()
        if self._unread:
            n = self.U.shape[1]
            runs = _uncovered_runs(n, self._unread)
            for key in ("U", "_U64", "_Ud"):
                if isinstance(state.get(key), Tensor):
                    state[key] = packed_columns(state[key], runs)
            state["_packed"] = (runs, n)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        packed = state.pop("_packed", None)
        if packed is not None:
            for key in ("U", "_U64", "_Ud"):
                if isinstance(state.get(key), Tensor):
                    state[key] = unpacked_columns(state[key], *packed)
        self.__dict__.update(state)

    def _scanned(self) -> Tensor:
        """(n,) bool (cached): the nonzero columns of ``U`` outside the Linear weights of ``factors`` and the
        lookup tables (False there), by a pass over those columns -- in place, run by run, or (few of them:
        a deep narrow chain's biases between its weights) gathered at once."""
        if "scanned" not in self._columns:
            n, dev = self.U.shape[1], self.U.device
            nz = torch.zeros(n, dtype=torch.bool, device=dev)
            runs = _uncovered_runs(n, [*(self.factors or ()), *unread_spans(None, self.tables)])
            if not self.U.shape[0]:
                runs = []
            elif runs and sum(hi - lo for lo, hi in runs) <= _SCAN_COLUMNS:
                at = torch.cat([torch.arange(lo, hi, device=dev) for lo, hi in runs])
                nz[at] = ~(self.U.index_select(1, at).abs().amax(0) == 0)
                runs = []
            for lo, hi in runs:
                # (a column's largest |entry| is nonzero: 3x faster than ne(0).any(0) across rows; NaN
                # stays live), over blocks of columns that stay in cache (3x faster than at once on an
                # Embedding(50000, 64)'s 80 rows)
                for a in range(lo, hi, _SCAN_COLUMNS):
                    b = min(a + _SCAN_COLUMNS, hi)
                    nz[a:b] = ~(self.U[:, a:b].abs().amax(0) == 0)
            self._columns["scanned"] = nz
        return self._columns["scanned"]

    def _nonzero(self) -> Tensor:
        """(n,) bool (cached): the nonzero columns of ``U`` -- :meth:`_scanned`'s, and the Linear weights'
        from their factors, ``U`` not read there (``structured_only`` leaves some unwritten): column
        ``(i, j)`` of a weight is nonzero where a row has ``T_qi != 0`` and ``z_{n(q) j} != 0`` (a dead
        unit's row, a dead input's column zero), ``(T != 0)^T (Z[n(q)] != 0) > 0`` -- ``d r m`` flops. The
        tables' columns are False."""
        if "nonzero" not in self._columns:
            nz = self._scanned().clone()
            for group in _solve_groups(self.factors or []):  # (weights of one shape at once)
                offsets, d, m, T, Z, idx, stride = group
                T1, Z1 = T.ne(0).to(T.dtype), Z[:, idx].ne(0).to(T.dtype)  # (G, r, d), (G, r, m)
                hit = (T1.mT @ Z1).flatten(1).ne(0)  # (G, d m)
                if stride is not None:
                    _group_view(nz[:, None], group).copy_(hit[:, :, None])
                else:
                    for o, h in zip(offsets, hit, strict=True):
                        nz[o : o + d * m] = h
            self._columns["nonzero"] = nz
        return self._columns["nonzero"]

    def _live_columns(self, key: str, factors: list) -> tuple[Tensor, Tensor]:
        """``(idx, U[:, idx])``: the nonzero columns of ``U`` outside the weights of ``factors`` (cached)."""
        if key not in self._columns:
            idx, base, order = self._live_index(key, factors)
            if base is None:  # (every column: U itself)
                self._columns[key] = (idx, self.U)
            else:
                cols = self.U.index_select(1, base)  # (5x faster than U[:, idx] on row-major U)
                if order is not None:  # and the tables' columns from their values, in ascending order
                    cols = torch.cat([cols, *(v for *_, v in self.tables or ())], 1)[:, order]
                self._columns[key] = (idx, cols)
        return self._columns[key]

    def _live_index(self, key: str, factors: list) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """:meth:`_live_columns`' ``idx`` without the columns (cached: a solve that reads ``U`` whole never
        copies them -- a ReLU net's dead units left most of ``U``, 386 MB at 670k parameters, copied):
        ``(idx, base, order)`` with ``U``'s columns ``base`` (None: all of them) and, with lookup tables,
        the ``order`` that sorts them together with the tables' columns."""
        if key in self._columns:  # (the columns already taken)
            return self._columns[key][0], None, None
        index_key = key + " index"
        if index_key not in self._columns:
            n, dev = self.U.shape[1], self.U.device
            if factors is self.factors:  # (the scanned columns: outside every weight of factors)
                idx = self._scanned().nonzero().flatten()
            elif n <= _ONE_PASS_COLUMNS:  # (few columns: a mask, a few small ops in all)
                keep = self._nonzero().clone()
                for off, d, m, *_ in factors:
                    keep[off : off + d * m] = False
                idx = keep.nonzero().flatten()
            else:  # run by run (ascending): no pass over the n columns (an Embedding(50000, 64)'s 3.2M)
                nz = self._nonzero()
                parts = [lo + nz[lo:hi].nonzero().flatten() for lo, hi in _uncovered_runs(n, factors)]
                idx = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=dev)
            if idx.numel() == n and not self.tables:
                self._columns[index_key] = (torch.arange(n, device=dev), None, None)
            elif self.tables:
                every = torch.cat([idx, *(c for _, _, c, _ in self.tables)])
                order = torch.argsort(every)
                self._columns[index_key] = (every[order], idx, order)
            else:
                self._columns[index_key] = (idx, idx, None)
        return self._columns[index_key]

    @property
    def _rest(self) -> Tensor:
        """The columns of ``U`` a solve reads densely (:meth:`_live_columns`' ``idx`` for the solve)."""
        return self._live_index("solve", self._solve_factors)[0]

    @property
    def _U_rest(self) -> Tensor:
        """``U[:, _rest]`` (copied where first needed: the solve through the weights' structure, the Gram
        matrix of mostly zero columns)."""
        return self._live_columns("solve", self._solve_factors)[1]

    @property
    def live(self) -> Tensor:
        """(n,) bool: the columns of ``U`` that are nonzero -- those of the weights solved through their
        structure as their factors say (their columns are not read, written or not) -- and the lookup
        tables' columns of the batch's tokens. ``D`` changed elsewhere leaves ``K`` as it is."""
        if "live" not in self._columns:
            mask = self._nonzero().clone()  # (False on the tables' columns)
            for _off, _size, cols, _vals in self.tables or ():
                mask[cols] = True
            self._columns["live"] = mask
        return self._columns["live"]

    def live_index(self) -> Tensor | None:
        """The indices of :attr:`live` (cached), or None where every column is live."""
        if "live_index" not in self._columns:
            mask = self.live
            self._columns["live_index"] = None if bool(mask.all()) else mask.nonzero().flatten()
        return self._columns["live_index"]

    @property
    def Ud(self) -> Tensor:
        """``U D^{-1}`` (formed when first needed)."""
        self._full_U("U D^{-1}")
        if self._Ud is None:
            self._Ud = self.U * self._Dinv
        return self._Ud

    def _full_U(self, what: str) -> None:
        if self.structured_only or self.tables:
            raise InvalidArgumentError(
                f"{what}: U holds only the columns outside the structured Linear weights and lookup tables "
                "(built with structured_only=True)"
            )

    def columns(self, idx: Tensor) -> Tensor:
        """``U[:, idx]``, the columns of structured weights (``structured_only``) from their factors:
        ``U[q, off + i m + j] = T[q, i] Z[n(q), j]``; a lookup table's (``tables``) from its values.
        ``idx``: indices (negative ones count from the end) or a boolean mask, as ``U[:, idx]`` takes them."""
        n = self.U.shape[1]
        idx = torch.as_tensor(idx, device=self.U.device)
        if idx.dtype == torch.bool:
            if idx.shape != (n,):
                raise IndexError(f"a mask of shape {tuple(idx.shape)} for {n} columns")
            idx = idx.nonzero().flatten()
        elif idx.is_floating_point() or idx.is_complex():
            raise IndexError("column indices must be integers or a boolean mask")
        elif idx.numel() and not bool(((idx >= -n) & (idx < n)).all()):
            raise IndexError(f"a column index is out of range for {n} columns")
        idx = idx.reshape(-1).long() % n if idx.numel() else idx.reshape(-1).long()
        out = self.U.index_select(1, idx)
        for off, size, cols, vals in self.tables or ():
            inside = (idx >= off) & (idx < off + size)
            if bool(inside.any()):
                at = idx[inside]
                fill = out.new_zeros(out.shape[0], at.numel())
                if cols.numel():
                    pos = torch.searchsorted(cols, at).clamp(max=cols.numel() - 1)
                    hit = cols[pos] == at
                    fill[:, hit] = vals[:, pos[hit]].to(out.dtype)
                out[:, inside] = fill
        if self.structured_only:
            for off, d, m, T, Z, n_idx in self._solve_factors:
                inside = (idx >= off) & (idx < off + d * m)
                if bool(inside.any()):
                    loc = idx[inside] - off
                    out[:, inside] = T[:, loc // m] * Z[n_idx][:, loc % m]
        return out

    def _gram(self) -> Tensor:
        """``K = diag(S) + U D^{-1} U^T`` (``r^2 n`` flops), float64: from the Linear rows' structure where
        ``factors`` are given (:func:`structured_gram`), else the Gram matrix -- in float64 unless
        ``gram_tol`` allows ``U``'s dtype (class docstring): ``D^{-1}`` spans many orders of magnitude
        (Adam's ``sqrt(v)`` is tiny where gradients vanish), and a low-precision Gram matrix can lose
        ``K``'s small eigenvalues."""
        U, S = self.U, self.S
        if self.factors:
            rest, U_rest = self._live_columns("gram", self.factors)
            return structured_gram(U, S, self._Dinv, self.factors, rest=rest, U_rest=U_rest)
        rest = self._rest
        if self.tables or 2 * rest.numel() < U.shape[1]:  # mostly zero columns: the others' Gram matrix
            return torch.diag(S.double()) + _gram_in_blocks(self._U_rest, self._Dinv[rest])
        if self.gram_tol is not None and U.dtype != torch.float64 and bool((S > 0).all()):
            K = torch.diag(S) + self.Ud @ U.T
            r, n = U.shape
            if math.sqrt(n * r) * torch.finfo(U.dtype).eps * float(K.diagonal().max()) <= self.gram_tol:
                return K.double()
        # (the float64 copy where one is kept: no conversion)
        return torch.diag(S.double()) + _gram_in_blocks(U if self._U64 is None else self._U64, self._Dinv)

    @property
    def U64(self) -> Tensor:
        """``U`` in float64 (cached)."""
        self._full_U("U in float64")
        if self._U64 is None:
            self._U64 = self.U.double()
        return self._U64

    def _factor_K(self, K: Tensor, d_neg: int | None = None) -> None:
        """Cholesky of ``K`` (eigh where it is not positive definite), the inertia and ``log|det K|``.
        ``d_neg``: the negative entries of ``D`` where the caller knows (a pass over ``n`` numbers less)."""
        K = 0.5 * (K + K.T)
        self.K = K
        L, info = torch.linalg.cholesky_ex(K)
        self.cholesky = int(info) == 0
        d_neg = int((self.D < 0).sum()) if d_neg is None else d_neg
        self._d_neg = d_neg
        s_pos = int((self.S > 0).sum())
        if self.cholesky:
            self._L = L
            k_pos = K.shape[0]
            self._logdetK = 2.0 * float(L.diagonal().log().sum())
            dg = L.diagonal().abs()
            self.k_cond = float((dg.max() / dg.min()) ** 2) if dg.numel() else 1.0  # (a lower bound)
        else:
            try:
                lam, Vk = torch.linalg.eigh(K)
            except torch.linalg.LinAlgError:  # (entries beyond the float range: a subnormal damping)
                raise SingularError(
                    "D + G is singular to working precision (its Woodbury capacitance matrix K = S + U D^-1 "
                    "U^T cannot be decomposed: entries beyond the float range); choose a larger damping"
                ) from None
            # the rounding K carries is U's (a float32 root: a structural null vector of G + D is only
            # zero to float32's precision)
            tol = K.shape[0] * torch.finfo(self.U.dtype).eps * float(lam.abs().max())
            if bool((lam.abs() <= tol).any()):
                raise SingularError(
                    "D + G is singular to working precision (its Woodbury capacitance matrix is); "
                    "choose another damping"
                )
            self._lam, self._V = lam, Vk
            self.k_cond = float(lam.abs().max() / lam.abs().min())
            k_pos = int((lam > 0).sum())
            self._logdetK = float(lam.abs().log().sum())
        neg = d_neg + k_pos - s_pos
        n = self.U.shape[1]
        self.inertia = Inertia(neg, 0, n - neg)
        self.positive_definite = neg == 0

    def with_damping(self, damping: float | Tensor) -> WoodburyFactor:
        """The factorization of ``D' + G`` for a new damping ``D'`` (same ``U``, ``S``)."""
        return WoodburyFactor(self.U, self.S, damping, _U64=self._U64, **self.shared())

    def shared(self) -> dict[str, Any]:
        """What a factorization of the same ``U``, ``S`` at another damping reuses (:meth:`with_damping`),
        less the float64 copy of ``U``: its settings and the scans of ``U``'s columns."""
        return {
            "gram_tol": self.gram_tol,
            "factors": self.factors,
            "structured_only": self.structured_only,
            "_columns": self._columns,
            "tables": self.tables,
        }

    def _by_factor(self, idx: Tensor) -> tuple[list[tuple[tuple, Tensor]], Tensor]:
        """``([(factor, inside), ...], rest)``: for each Linear weight of ``factors`` that ``idx`` (column
        indices) enters, the mask of its entries there; ``rest``, the mask of the entries outside every
        weight. One search over the weights' offsets, then a loop over the weights hit only (a deep
        chain's few changed entries touch one or two of its weights)."""
        if not self.factors:
            return [], torch.ones_like(idx, dtype=torch.bool)
        if "offsets" not in self._columns:
            bounds = [(off, off + d * m) for off, d, m, *_ in self.factors]
            self._columns["offsets"] = tuple(
                torch.tensor(b, device=idx.device) for b in zip(*bounds, strict=True)
            )
        starts, ends = self._columns["offsets"]
        order = torch.argsort(starts)
        pos = torch.searchsorted(starts[order], idx, right=True) - 1
        which = order[pos.clamp(min=0)]
        inside = (pos >= 0) & (idx < ends[which])
        groups = [(self.factors[f], inside & (which == f)) for f in torch.unique(which[inside]).tolist()]
        return groups, ~inside

    def update_damping(self, idx: Tensor | list[int], values: Tensor) -> None:
        """``D[idx] = values``, in place: ``K += U_J diag(1 / values - 1 / D_J) U_J^T`` (``J = idx``) and a
        new ``r x r`` factorization; exact, for when a few entries of ``D`` moved (a gradient spike).
        ``idx``: distinct indices (a repeated one would enter ``K`` once per repeat; negative ones count
        from the end) or a boolean mask."""
        n = self.D.numel()
        idx = torch.as_tensor(idx, device=self.D.device)
        if idx.numel() == 0:  # (an empty list reads as float32)
            idx = idx.long()
        if idx.dtype == torch.bool:  # a mask, as D[mask] = values takes it
            if tuple(idx.shape) != (n,):
                raise ShapeMismatchError(
                    f"update_damping: a mask must have shape ({n},), got {tuple(idx.shape)}"
                )
            idx = idx.nonzero().flatten()
        if idx.is_floating_point() or idx.is_complex() or idx.dim() > 1:
            raise InvalidArgumentError(
                f"update_damping: idx must be integer indices or a mask, got {idx.dtype}"
            )
        idx = idx.long().reshape(-1)
        if idx.numel() and not (
            -n <= int(idx.min()) and int(idx.max()) < n
        ):  # (was taken modulo n, silently)
            raise InvalidArgumentError(f"update_damping: indices must be in [-{n}, {n}), got {idx.tolist()}")
        idx = idx % n  # negative indices as D[idx] reads them
        if int(torch.unique(idx).numel()) != int(idx.numel()):
            raise InvalidArgumentError("update_damping: idx names an entry twice; give each index once")
        values = torch.as_tensor(values, device=self.D.device)
        if values.is_complex():
            raise InvalidArgumentError(f"update_damping: the values must be real, got {values.dtype}")
        values = values.to(self.D.dtype)
        if values.numel() == 1 and idx.numel() > 1:  # (one value for every index, as D[idx] = v takes it)
            values = values.reshape(1).expand(idx.numel())
        if values.numel() != idx.numel():
            raise ShapeMismatchError(
                f"update_damping: {values.numel()} values for {idx.numel()} indices; give one value per index"
            )
        values = values.reshape(-1)
        _check_damping(values)
        # all or nothing: a failure below (out of memory, a singular K) changes nothing
        saved = dict(self.__dict__)
        try:
            self._update_damping(idx, values)
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(saved)
            raise

    def _update_damping(self, idx: Tensor, values: Tensor) -> None:
        live = self.live[idx]  # (a zero column of U: D changes there, K does not)
        idx_k = idx if bool(live.all()) else idx[live]
        delta = 1.0 / values[live].double() - self._Dinv[idx_k].double()
        K = self.K.clone()
        groups, rest = self._by_factor(idx_k)
        if groups:  # Linear weights: through their rows' structure
            K += _pair_grams(
                [
                    _structured_update(T, Z, n_idx, idx_k[inside] - off, delta[inside], m)
                    for (off, _d, m, T, Z, n_idx), inside in groups
                ]
            )
        if bool(rest.any()):
            cols = idx_k[rest]
            U_J = self._U64.index_select(1, cols) if self._U64 is not None else self.columns(cols).double()
            K += (U_J * delta[rest]) @ U_J.T
        was = self.__dict__.get("_d_neg")  # (negative entries of D, counted at the factorization)
        d_neg = None if was is None else was + int((values < 0).sum()) - int((self.D[idx] < 0).sum())
        self.D = self.D.clone()
        self.D[idx] = values
        self._Dinv = self._Dinv.clone()
        self._Dinv[idx] = 1.0 / values
        self._Ud = None  # (U D^-1, formed again when asked: the old one may be another factor's too)
        self._factor_K(K, d_neg)

    def damping_update_cost(self, idx: Tensor) -> tuple[float, float]:
        """Flops of :meth:`update_damping` on ``idx`` and of :meth:`with_damping` (a rebuild), roughly:
        a Linear weight's changed entries cost ``B^2`` each plus ``r^2`` per changed row
        (:func:`_structured_update`), other columns ``r^2`` each; a rebuild ``r^2`` per row of every
        weight and per other nonzero column, plus ``B^2`` per weight entry (:func:`structured_gram`)."""
        r = self.rank
        idx = idx[self.live[idx]]
        update = 0.0
        groups, rest = self._by_factor(idx)
        for (off, _d, m, _T, Z, _n), inside in groups:
            rows = int(torch.unique((idx[inside] - off) // m).numel())
            update += Z.shape[0] ** 2 * int(inside.sum()) + r * r * rows
        update += r * r * int(rest.sum())
        if "rebuild" not in self._columns:  # (U's and the factors' alone: one number per root)
            rebuild = 0.0
            for _off, d, m, _T, Z, _n in self.factors or []:
                rebuild += Z.shape[0] ** 2 * d * m + r * r * d
            gram_rest = self._live_columns("gram", self.factors or [])[0] if self.factors else self._rest
            self._columns["rebuild"] = rebuild + r * r * int(gram_rest.numel())
        return update, self._columns["rebuild"]

    def _kinv(self, W: Tensor) -> Tensor:
        W64 = W.double()
        if self.cholesky:
            return torch.cholesky_solve(W64, self._L)
        return self._V @ ((self._V.T @ W64) / self._lam[:, None])

    def solve(self, R: Tensor, free: Tensor | None = None) -> Tensor:
        """``(D + U^T S U)^{-1} R`` for R (n, k) (or (n,): the result a vector too): ``A - D^{-1} U^T K^{-1} U
        A`` with ``A = D^{-1} R``.

        ``free`` (n,): a damping for the columns of ``U`` that are zero (not :attr:`live`: an Embedding's
        rows of tokens outside the curvature batch, a dead unit's weights), in place of ``D`` there -- they
        are not in ``K``, so the solve is exactly that of ``D'`` = ``D`` on the live columns, ``free`` on
        the others (an optimizer's second moments move there every step: no update of the factor).

        With ``factors``, ``U A`` and ``U^T w`` on a large Linear weight come from its rows' structure
        ``U[q] = vec(T_q z_{n(q)}^T)``: ``(U A)_q = T_q . (A_W Z^T)[:, n(q)]`` and ``U^T w = vec(sum_q w_q
        T_q z_{n(q)}^T) = vec(Tw^T Z)`` with ``Tw[n] = sum_{n(q) = n} w_q T_q`` -- ``2 B d m + 2 r d``
        flops per weight instead of ``2 r d m``, and ``U`` itself (``r n`` numbers, megabytes) is not read."""
        R, vector = linalg.as_columns(R, self.U.shape[1], self.U.dtype, self.U.device, "solve: R", "factor")
        if free is not None:
            if not isinstance(free, Tensor) or tuple(free.shape) != (self.U.shape[1],):
                what = tuple(free.shape) if isinstance(free, Tensor) else type(free).__name__
                raise ShapeMismatchError(f"solve: free must be a ({self.U.shape[1]},) tensor, got {what}")
            _check_damping(free)  # (a zero there: the solve divides by it)
        X = self._solve(R, free)
        return X[:, 0] if vector else X

    def _solve(self, R: Tensor, free: Tensor | None) -> Tensor:
        Dinv = self._Dinv
        if free is not None and self.live_index() is not None:  # (1 / free on the dead columns)
            Dinv = torch.where(self.live, Dinv, free.to(Dinv.dtype).reciprocal())
        A = R * Dinv[:, None]
        if not self._unread and 2 * self._rest.numel() >= self.U.shape[1]:
            # (D^-1 U^T w rather than (U D^-1)^T w: no U D^-1 to form again after each damping update)
            return A - self._Dinv[:, None] * (self.U.T @ self._kinv(self.U @ A).to(R.dtype))
        k, r = R.shape[1], self.rank
        y = self._U_rest @ A[self._rest]  # (r, k)
        rows = torch.arange(r, device=R.device)
        for group in self._solve_groups:  # (the weights of one shape at once: (G, ...) batches)
            offsets, d, m, T, Z, idx, _ = group
            AW = _group_view(A, group).unflatten(1, (d, m)).permute(0, 3, 1, 2)  # (G, k, d, m)
            P = AW @ Z.mT[:, None]  # (G, k, d, B): A_W Z^T
            y += (T[:, None] @ P).sum(0)[:, rows, idx].T  # (T_q . (A_W Z^T)[:, n(q)]), summed over weights
        w = self._kinv(y).to(R.dtype)  # (r, k)
        X = A
        X[self._rest] -= self._Dinv[self._rest, None] * (self._U_rest.T @ w)
        for group in self._solve_groups:
            offsets, d, m, T, Z, idx, stride = group
            Tw = T.new_zeros(len(offsets), k, Z.shape[1], d)
            Tw.index_add_(2, idx, T[:, None] * w.T[None, :, :, None])  # (G, k, B, d): sum_q w_q T_q at n(q)
            Gm = (Tw.mT @ Z[:, None]).flatten(2).mT  # (G, d m, k): vec(Tw^T Z)
            Dw = _group_view(self._Dinv[:, None], group)  # (G, d m, 1)
            if stride is not None:
                _group_view(X, group).sub_(Dw * Gm)
            else:
                for o, upd in zip(offsets, Dw * Gm, strict=True):
                    X[o : o + d * m] -= upd
        return X

    def logdet(self) -> float:
        """``log|det(D + U^T S U)|``."""
        return float(self.D.double().abs().log().sum()) + self._logdetK

    def inverse_diagonal(self) -> tuple[Tensor, Tensor]:
        """``(d, err)``: ``d = diag((D + U^T S U)^{-1}) = D^{-1} - colsum(W * K^{-1} W)`` with ``W = U
        D^{-1}`` (``2 r^2 n`` flops, float64, no ``n x n`` matrix), and ``err``, an estimate of each
        entry's rounding error: the difference cancels where ``G_jj >> D_j``, and ``K^{-1} w_j`` carries
        ``u cond(K)`` -- ``err_j = u (r / D_j + cond(K) |w_j| |K^{-1} w_j|)``."""
        self._full_U("the inverse diagonal")
        u, n = torch.finfo(torch.float64).eps, self.U.shape[1]
        dinv = self._Dinv.double()
        d, err = dinv.clone(), u * self.rank * dinv.abs()
        step = max(1, 2**22 // max(self.rank, 1))  # (blocks of columns: r x step float64 numbers)
        for a in range(0, n, step):
            W = self.U64[:, a : a + step] * dinv[a : a + step]
            KW = self._kinv(W)
            d[a : a + step] -= (W * KW).sum(0)
            err[a : a + step] += u * self.k_cond * W.norm(dim=0) * KW.norm(dim=0)
        return d, err

    def inverse_sqrt(self, R: Tensor) -> Tensor | None:
        """``X = D^{-1/2} M^{-1/2} R`` with ``M = I + V^T S V``, ``V = U D^{-1/2}``: ``X X^T``-square root of
        ``(D + U^T S U)^{-1} = D^{-1/2} M^{-1} D^{-1/2}`` (R: (n, k)). With ``V^T = Q T`` (thin QR) and
        ``T S T^T = E diag(l) E^T``, ``M = I + P diag(l) P^T`` for the orthonormal ``P = Q E``, so ``M^{-1/2}
        = I + P diag((1 + l)^{-1/2} - 1) P^T`` (``O(n r^2)`` once, then ``4 r n`` flops per column).
        None where ``D`` has an entry ``<= 0`` or ``M`` is not positive definite to working precision
        (``1 + l <= r u max(1, l)``)."""
        self._full_U("the inverse square root")
        if not hasattr(self, "_sqrt"):
            self._sqrt: tuple[Tensor, Tensor, Tensor] | None = None
            D = self.D.double()
            if bool((D > 0).all()):
                s = D.rsqrt()
                Q, T = torch.linalg.qr((self.U64 * s).T)
                lam, E = torch.linalg.eigh(T @ (self.S.double()[:, None] * T.T))
                m = 1.0 + lam
                if bool((m > self.rank * torch.finfo(torch.float64).eps * lam.abs().clamp(min=1.0)).all()):
                    self._sqrt = (s, Q @ E, m.rsqrt() - 1.0)
        if self._sqrt is None:
            return None
        R, vector = linalg.as_columns(
            R, self.U.shape[1], self.U.dtype, self.U.device, "inverse_sqrt: R", "factor"
        )
        s, P, c = self._sqrt
        R64 = R.double()
        X = (s[:, None] * (R64 + P @ (c[:, None] * (P.T @ R64)))).to(R.dtype)
        return X[:, 0] if vector else X

    @property
    def rank(self) -> int:
        """``r``: rows of ``U`` (the rank of ``G`` at most)."""
        return int(self.U.shape[0])
