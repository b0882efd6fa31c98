"""Any per-example stage as dense per-example blocks, by plain ``torch.autograd`` double backward.

For one example ``n`` the stage is ``f(x, z_n)``. We form the dense blocks

* ``Jx_n = df/dx`` (d_out, p), ``Jz_n = df/dz`` (d_out, d_in),
* the Hessian of ``phi = sum_n <b_n, f(x, z_n)>`` in ``(x, z_n)``,

and keep them per example: ``Hxx = sum_n Hxx_n`` (p, p), ``Hxz`` (B, p, d_in), ``Hzz`` (B, d_in, d_in).
Memory ``O(B (p + d)^2)``; use the structured stages of :mod:`hessinv.stages.dense` for Linear layers.

How (:meth:`GenericStage.linearize`): one forward pass of the module on the batch with the real
leaf parameters ``x`` (hooks, parametrizations and all), ``phi(u) = <u, f(x, z)>`` with a free
``u`` (B, d_out), and its first derivatives ``gx = Jx^T u``, ``gz = Jz^T u`` with ``create_graph``.
Then ``p + d_in`` backward passes of that graph (double backward):

* ``d gx[j] / d(u, z, x)`` = column ``j`` of ``Jx`` for every example, row ``j`` of ``Hxz`` for every
  example, row ``j`` of ``Hxx``;
* ``d (sum_n gz[n, i]) / d(u, z)`` = column ``i`` of ``Jz_n`` and row ``i`` of ``Hzz_n`` for every
  ``n`` (exact because the stage acts on each example separately).

Cost: ``p + d_in`` double-backward passes of the stage per linearization, run as
``ceil((p + d_in) / 128)`` vmapped backward calls (``is_grads_batched``), plus one unbatched probe
pass: the blocks are accepted only if they reproduce, on a random ``(v, t)``, the plain autograd
products of the whole batch (``Jx v + Jz t`` and the Hessian product) and ``Hxx``/``Hzz_n`` are
symmetric. Otherwise the ``p + d_in`` passes are redone one by one (unbatched) and checked again; a
mismatch then means that the stage mixes examples (or that torch's double backward of one of its
operations is not symmetric, e.g. ``weight_norm``) and raises :class:`UnsupportedStageError`.
Measured (rough, one thread, loaded machine): 15 generic residual blocks of width 32 at batch 32,
4.2 s CPU one pass at a time, 1.4 s batched; the structured residual stage takes 0.04 s
(``bench/residual.py``). We do not use ``torch.func`` (``vmap(hessian)``): in torch 2.13 its mixed
weight x input second derivative of an affine ``layer_norm`` is wrong, while plain autograd is exact.
"""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
import re
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hessinv import linalg
from hessinv.errors import (
    InvalidArgumentError,
    NoDoubleBackward,
    NoExactHessian,
    NonFiniteError,
    NotAChainError,
    TooLargeError,
    UnsupportedStageError,
    out_of_memory,
)
from hessinv.stages.protocol import (
    Blocks,
    ExampleCurvature,
    ParameterFreeBlocks,
    RiccatiBlocks,
    Stage,
    add_blockdiag,
    example_diagonal,
    in_basis,
    own_rows_only,
    sandwich_blockdiag,
    unshared,
)


class DenseBlocks(Blocks):
    """Blocks stored densely per example (math.md §1 table). ``H..`` may be None (= zero)."""

    per_example = True  # Jz is one block per example (a stage that mixes examples is rejected)

    def __init__(self, Jx: Tensor, Jz: Tensor, Hxx: Tensor | None, Hxz: Tensor | None, Hzz: Tensor | None):
        self.Jx, self.Jz, self.Hxx, self.Hxz, self.Hzz = Jx, Jz, Hxx, Hxz, Hzz
        self.batch, self.d_out, self.d_in = Jz.shape
        self.p = Jx.shape[2]

    def jx(self, v: Tensor) -> Tensor:
        return torch.einsum("nop,pk->nok", self.Jx, v)

    def jxT(self, s: Tensor) -> Tensor:
        return torch.einsum("nop,nok->pk", self.Jx, s)

    def per_example_jxT(self, s: Tensor, out: Tensor | None = None) -> Tensor:
        rows = torch.einsum("nop,no->np", self.Jx, s)
        return rows if out is None else out.copy_(rows)

    def jz(self, t: Tensor) -> Tensor:
        return torch.bmm(self.Jz, t)

    def jzT(self, s: Tensor) -> Tensor:
        return torch.bmm(self.Jz.transpose(1, 2), s)

    def hxx(self, v: Tensor) -> Tensor:
        return torch.zeros_like(v) if self.Hxx is None else self.Hxx @ v

    def hxz(self, t: Tensor) -> Tensor:
        if self.Hxz is None:
            return t.new_zeros(self.p, t.shape[-1])
        return torch.einsum("npi,nik->pk", self.Hxz, t)

    def hxzT(self, v: Tensor) -> Tensor:
        if self.Hxz is None:
            return v.new_zeros(self.batch, self.d_in, v.shape[-1])
        return torch.einsum("npi,pk->nik", self.Hxz, v)

    def hzz(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t) if self.Hzz is None else torch.bmm(self.Hzz, t)

    def riccati(self, Sigma: Tensor, coupled: bool = True) -> RiccatiBlocks:
        B, o = self.batch, self.d_out
        JxF = self.Jx.reshape(B * o, self.p)
        SJx = Sigma.reshape(B * o, B * o) @ JxF  # (a_out, p)
        Qxx0 = JxF.T @ SJx
        if self.Hxx is not None:
            Qxx0 = Qxx0 + self.Hxx
        if not coupled:
            return RiccatiBlocks(Qxx0, Qxx0.new_empty(self.p, B, 0), None)
        Qxz = torch.einsum("nop,noi->pni", SJx.reshape(B, o, self.p), self.Jz)
        if self.Hxz is not None:
            Qxz = Qxz + self.Hxz.transpose(0, 1)
        return RiccatiBlocks(Qxx0, Qxz, self._qzz(Sigma))

    def _qzz(self, Sigma: Tensor) -> Tensor:
        """``Qzz = Hzz + Jz^T Sigma Jz``."""
        Qzz = sandwich_blockdiag(self.Jz, Sigma)
        return Qzz if self.Hzz is None else add_blockdiag(Qzz, self.Hzz)

    def curvature_diagonal(self, Sigma: Tensor, coupled: bool = True) -> tuple[Tensor, Tensor | None]:
        """:meth:`Blocks.curvature_diagonal` without the ``p x p`` block: ``diag(Hxx) + colsum(Jx * (Sigma
        Jx))``."""
        JxF = self.Jx.reshape(self.batch * self.d_out, self.p)
        diag = (JxF * (Sigma.reshape(JxF.shape[0], JxF.shape[0]) @ JxF)).sum(0)
        if self.Hxx is not None:
            diag = diag + self.Hxx.diagonal()
        return diag, (self._qzz(Sigma) if coupled else None)

    @property
    def adds_example_curvature(self) -> bool:
        return self.Hzz is not None

    def example_curvature_diagonal(
        self,
        P: ExampleCurvature,
        coupled: bool = True,
        only_diagonal: bool = False,
        rows: slice = slice(None),
    ) -> tuple[Tensor, ExampleCurvature | None]:
        """:meth:`Blocks.example_curvature_diagonal` from the per-example ``Jx_n``, ``Jz_n``, ``Hzz_n``
        (:func:`example_pass`); ``diag(Hxx)`` (the batch's) with the first examples."""
        Jx, Jz = self.Jx[rows], self.Jz[rows]

        def pull(E: Tensor | tuple[int, int]) -> tuple[Tensor, Tensor]:
            if isinstance(E, tuple):  # (the identity's columns j0 .. j1 - 1)
                return Jx[:, E[0] : E[1]].mT, Jz[:, E[0] : E[1]].mT
            return Jx.mT @ E, Jz.mT @ E

        first = rows.start in (None, 0)
        hxx = self.Hxx.diagonal() if self.Hxx is not None and first else None
        hzz = None if self.Hzz is None else self.Hzz[rows]
        return example_pass(P, pull, self.p, self.d_in, hxx, hzz, coupled, only_diagonal)


#: :class:`_ExamplePulls` vmaps over the examples with ``torch.func``, whose first use imports
#: ``torch._dynamo`` (1.2 s, once a process), where that is imported already or once the process has
#: pulled this many examples back one at a time (about 1 ms each): a one-off diagonal does not pay the
#: import, repeated ones (an optimizer's refreshes, Laplace fits) pay it once
VMAP_AFTER_CALLS = 1000
_LOOPED = [0]
#: a per-example sweep's pull-backs (:func:`example_pass`) take the identity's columns in chunks that keep
#: about this many numbers at once
EXAMPLE_PULL_ENTRIES = 2**24


#: :func:`example_pass` takes a dense ``P_n`` of at most this side apart by ``eigh`` where the stage's input
#: is wider than its output
EXAMPLE_EIGH_SIDE = 1024


def example_pass(
    P: ExampleCurvature,
    pull: Callable[[Tensor | tuple[int, int]], tuple[Tensor, Tensor]],
    p: int,
    d_in: int,
    hxx: Tensor | None,
    hzz: Tensor | None,
    coupled: bool,
    only_diagonal: bool,
) -> tuple[Tensor, ExampleCurvature | None]:
    """One stage of the per-example diagonal sweep (:meth:`Blocks.example_curvature_diagonal`) for a
    stage given by its pull-backs: ``pull(E) = (Jx_n^T E_n, Jz_n^T E_n)`` ((k, p, m), (k, d_in, m)) for
    the ``k`` examples of ``P`` and columns ``E`` (k, d_out, m), or ``(j0, j1)`` for the identity's
    columns ``j0 .. j1 - 1``; ``hxx`` the diagonal of ``Hxx`` to add (or None), ``hzz`` the examples'
    ``Hzz_n`` (k, d_in, d_in) or None (zero).

    ``diag(Qxx0) = hxx + sum_n diag(Jx_n^T P_n Jx_n)`` and ``P_{l-1,n} = Hzz_n + Jz_n^T P_n Jz_n``. With
    ``P_n = F_n diag(S_n) F_n^T`` (factored, ``R`` columns): ``A = Jx_n^T F_n``, ``Z = Jz_n^T F_n``,
    ``diag = sum_r S_r A_r^2`` and ``P_{l-1,n} = Z diag(S) Z^T`` (factored while ``R <= d_in`` and
    ``Hzz = 0``) -- ``R`` pull-backs per example, BackPACK's form. A diagonal ``P_n`` is the factored form
    with ``F = I``; a dense one takes the identity's columns and ``P_n``'s: ``diag = sum_j (Jx^T e_j) .
    (Jx^T P e_j)`` and ``Jz^T P Jz`` as ``Jz^T Y^T`` with ``Y = Jz^T P`` -- ``2 d_out + d_in``
    pull-backs, no eigendecomposition -- unless ``d_out < d_in`` (at most :data:`EXAMPLE_EIGH_SIDE`): then
    ``P_n = V diag(lambda) V^T`` (``eigh``, ``9 d_out^3`` flops an example) is the factored form with
    ``d_out`` columns, pulled back as such (a global average pooling of 16 x 12 x 12 features below a
    20-class head: 2336 pull-backs an example, 67 s for ``G.diagonal()`` where 10 classes, factored
    throughout, took 0.26 s; a probe)."""
    if not isinstance(P, tuple) and P.dim() == 3 and P.shape[1] < d_in and P.shape[1] <= EXAMPLE_EIGH_SIDE:
        lam, V = torch.linalg.eigh(0.5 * (P + P.mT))
        P = (V, lam)
    if isinstance(P, tuple):
        F, S = P
        A, Z = pull(F)
        diag = torch.einsum("kpr,kr->p", A.square(), S.to(A.dtype))
        return _with_hxx(diag, hxx), _example_in(Z, S, hzz, coupled, only_diagonal)
    k, d_out = P.shape[0], P.shape[1]
    step = max(1, EXAMPLE_PULL_ENTRIES // max(1, 2 * k * (p + d_in)))
    diag = P.new_zeros(p)
    dense = P.dim() == 3
    factored = not dense and hzz is None and d_out <= d_in and not only_diagonal
    Zs: list[Tensor] = []
    # P_{l-1}: its diagonal, or Y = Jz^T P (k, d_in, d_out) and then Jz^T Y^T -- d_in more pull-backs
    # instead of the sum of d_out outer products (d_in^2 d_out flops: 1e11 an example for a pooling of
    # 8 x 28 x 28)
    Pd = P.new_zeros(k, d_in) if coupled and only_diagonal else None
    Y = P.new_zeros(k, d_in, d_out) if coupled and not (factored or only_diagonal) else None
    for j0 in range(0, d_out, step):
        j1 = min(d_out, j0 + step)
        A, Z = pull((j0, j1))
        if dense:
            Ap, PZ = pull(P[:, :, j0:j1])  # (Jx^T P e_j, Jz^T P e_j)
            diag += (A * Ap).sum((0, 2))
        else:
            w = P[:, j0:j1]
            diag += torch.einsum("kpr,kr->p", A.square(), w)
            PZ = Z * w[:, None, :]
        if factored and coupled:
            Zs.append(Z)
        elif Pd is not None:
            Pd += (PZ * Z).sum(-1)
        elif Y is not None:
            Y[:, :, j0:j1] = PZ
    diag = _with_hxx(diag, hxx)
    if not coupled:
        return diag, None
    if factored:
        return diag, (torch.cat(Zs, dim=-1), P)
    if Pd is not None:
        return diag, Pd if hzz is None else Pd + hzz.diagonal(dim1=1, dim2=2)
    assert Y is not None
    Pin = torch.cat([pull(Y[:, i0 : i0 + step].mT)[1] for i0 in range(0, d_in, step)], dim=-1)
    Pin = 0.5 * (Pin + Pin.mT)
    return diag, Pin if hzz is None else Pin + hzz


def _with_hxx(diag: Tensor, hxx: Tensor | None) -> Tensor:
    return diag if hxx is None else diag + hxx.to(diag.dtype)


def _example_in(
    Z: Tensor, S: Tensor, hzz: Tensor | None, coupled: bool, only_diagonal: bool
) -> ExampleCurvature | None:
    """``P_{l-1,n} = Hzz_n + Z_n diag(S_n) Z_n^T`` in the cheapest form asked for."""
    if not coupled:
        return None
    if only_diagonal:
        d = (Z.square() * S[:, None, :]).sum(-1)
        return d if hzz is None else d + hzz.diagonal(dim1=1, dim2=2)
    if hzz is None and Z.shape[-1] <= Z.shape[1]:
        return Z, S
    M = (Z * S[:, None, :]) @ Z.mT
    return M if hzz is None else M + hzz


def _without_zero_blocks(blk: DenseBlocks) -> DenseBlocks:
    """``blk`` with its second-derivative blocks that are exactly zero set to None: a stage linear in its
    input (a convolution, a pooling, a reshape) has ``Hzz = 0``, stored as ``(B, d_in, d_in)`` (256 MiB
    for a MaxPool over 8 x 16 x 16 features at batch 8) and multiplied in every product otherwise."""
    for name in ("Hxx", "Hxz", "Hzz"):
        t = getattr(blk, name)
        if t is not None and t.numel() and not bool(t.any()):
            setattr(blk, name, None)
    return blk


def _grads(
    out: Tensor, inputs: list[Tensor], create_graph: bool = False, seed: Tensor | None = None
) -> list[Tensor]:
    """``d out / d inputs`` (``d <seed, out> / d inputs``) by plain autograd; zeros for inputs ``out``
    does not depend on."""
    if not out.requires_grad:
        return [torch.zeros_like(t) for t in inputs]
    gs = linalg.grad(
        out, inputs, grad_outputs=seed, retain_graph=True, create_graph=create_graph, allow_unused=True,
        materialize_grads=True,
    )  # fmt: skip
    # an Embedding(sparse=True)'s gradient is sparse: dense, the same numbers (and differentiable)
    return [g.to_dense() if g.is_sparse else g for g in gs]


#: Rows per vmapped backward pass (``is_grads_batched``) in :class:`GenericStage`.
CHUNK = 128
#: :meth:`LazyBlocks._second_columns` takes about this many numbers over ``B (d_in + d_out)`` columns per
#: vmapped double-backward pass (cache-sized: vmap keeps that many copies of the stage's intermediates)
SECOND_CHUNK_ENTRIES = 2**18
#: a generic stage pulls the Gauss-Newton root's columns back one example at a time
#: (:meth:`LazyBlocks._vjp_per_example`) only where the columns times the stage's per-example inputs and
#: outputs reach this: each one-example call costs about 1 ms of dispatch, the batch's graph about 27 ns
#: per column, example, input and output (a LayerNorm stage of 32 on 64 examples, 256 columns: 2x slower
#: one example at a time; a conv stage of 600 inputs and 96 outputs on 200 examples, 2000 columns: the
#: batch's graph took 7 s)
PER_EXAMPLE_MIN_WORK = 65536


def _global_hooks() -> bool:
    """Whether module forward hooks are registered globally (``register_module_forward_hook``)."""
    mm = nn.modules.module
    return bool(getattr(mm, "_global_forward_hooks", None) or getattr(mm, "_global_forward_pre_hooks", None))


def _unit_rows(j: int, k: int, p: int, like: Tensor) -> Tensor:
    """Seeds ``e_j .. e_{j+k-1}`` for the flat vector ``gx`` (p,): shape (k, p)."""
    E = like.new_zeros(k, p)
    E[torch.arange(k), j + torch.arange(k)] = 1
    return E


def _unit_cols(i: int, k: int, like: Tensor) -> Tensor:
    """Seeds selecting column ``i .. i+k-1`` of ``gz`` (B, d_in) in every example: (k, B, d_in)."""
    E = like.new_zeros(k, *like.shape)
    E[torch.arange(k), :, i + torch.arange(k)] = 1
    return E


def _backward_rows(out: Tensor, wrt: list[Tensor], n: int, seeds, batched: bool) -> list[Tensor] | None:
    """``R[w][j] = d <seed_j, out> / d wrt[w]`` for ``j < n`` by plain autograd: one backward pass per
    row, or (``batched``) ``torch.autograd.grad(..., is_grads_batched=True)`` over chunks of rows;
    None when the batched backward fails. Shapes ``(n, *wrt[w].shape)``."""
    if not out.requires_grad or n == 0:
        return [t.new_zeros(n, *t.shape) for t in wrt]
    parts: list[list[Tensor]] = [[] for _ in wrt]
    step = CHUNK if batched else 1
    for j in range(0, n, step):
        k = min(step, n - j)
        E = seeds(j, k)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "no batching rule for ...": a slower but exact fallback
                gs = linalg.grad(
                    out, wrt, grad_outputs=E if batched else E[0], retain_graph=True, allow_unused=True,
                    is_grads_batched=batched, materialize_grads=True,
                )  # fmt: skip
        except RuntimeError as e:  # (no batching rule: None, the caller's exact fallback; not memory)
            if out_of_memory(e):
                raise TooLargeError(
                    f"a generic stage's backward passes for {k} rows ran out of memory "
                    f"({' '.join(str(e).split())[:160]}): take the curvature on fewer examples "
                    "(Newton/Preconditioner: a smaller curvature_batch_size)"
                ) from None
            if batched:
                return None
            raise
        for w, (g, t) in enumerate(zip(gs, wrt, strict=True)):
            g = g.to_dense() if g.is_sparse else g  # (an Embedding(sparse=True)'s)
            if batched:
                parts[w].append(
                    g if g.shape[:1] == (k,) and g.dim() == t.dim() + 1 else g.expand(k, *t.shape)
                )
            else:
                parts[w].append(g[None])
    return [torch.cat(ps) for ps in parts]


class NoFastPath:
    """A context in which torch's fused transformer inference path is off: without gradients, or with no
    parameter of the module requiring one (a frozen backbone), ``nn.TransformerEncoder(Layer)`` and
    ``nn.MultiheadAttention`` in eval mode take a "fast path" whose outputs differ from the differentiable
    function's (a ``src_key_padding_mask``'s positions come out as zeros, which a mean over positions then
    reads). The setting is process-wide: off while any thread is inside, put back as found when the last
    leaves. A class, not a generator: a microsecond, entered on every step's forward."""

    _inside = 0
    _saved = True
    _lock = threading.Lock()
    _mha = getattr(torch.backends, "mha", None)

    def __enter__(self) -> None:
        if self._mha is not None:
            with self._lock:
                if NoFastPath._inside == 0:
                    NoFastPath._saved = self._mha.get_fastpath_enabled()
                    self._mha.set_fastpath_enabled(False)
                NoFastPath._inside += 1

    def __exit__(self, *exc: object) -> None:
        if self._mha is not None:
            with self._lock:
                NoFastPath._inside -= 1
                if NoFastPath._inside == 0:
                    self._mha.set_fastpath_enabled(NoFastPath._saved)


@contextlib.contextmanager
def exact_attention() -> Iterator[None]:
    """Attention as plain autograd differentiates it twice: ``scaled_dot_product_attention`` through its
    math kernel (the fused CPU/CUDA kernels have no double backward) and torch's fused transformer
    inference path off (:class:`NoFastPath`)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        kernel = contextlib.nullcontext()
    else:
        kernel = sdpa_kernel([SDPBackend.MATH])
    with NoFastPath(), kernel:
        yield


@contextlib.contextmanager
def dense_lookup_grads(module: Any) -> Iterator[None]:
    """During it, ``nn.Embedding`` / ``nn.EmbeddingBag`` layers of ``module`` built with ``sparse=True``
    give dense gradients: the same numbers (the flag changes only the gradient's layout), through a
    graph that autograd differentiates twice and ``torch.func`` takes (a sparse gradient's
    ``to_dense()`` has no graph: its stage could only be taken through dense ``p x p`` blocks, refused
    at a 5000-row table)."""
    mods = module.modules() if isinstance(module, nn.Module) else ()
    sparse = [m for m in mods if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse]
    for m in sparse:
        m.sparse = False
    try:
        yield
    finally:
        for m in sparse:
            m.sparse = True


def _buffers_equal(a: list[Tensor], b: list[Tensor]) -> bool:
    return all(
        x.shape == y.shape and torch.equal(torch.nan_to_num(x), torch.nan_to_num(y))
        for x, y in zip(a, b, strict=True)
    )


class GenericStage(Stage):
    """Any module applied to each example separately; blocks by plain autograd double backward.

    The module is called on the whole batch with its real parameters (so forward hooks,
    parametrizations and ``weight_norm``'s pre-hooks are part of the function); derivatives are taken
    with respect to ``params`` (by default its trainable parameters; frozen ones are constants). A
    module that mixes examples, is random, or changes its buffers on every call is rejected.

    Args:
        index: position in the chain.
        module: the stage ``z -> f(z)`` (a module, or a traced piece of one).
        params: the trainable parameters it uses, in ``model.parameters()`` order.
        label: what error messages call it (default: the module's type).
    """

    #: Refuse a stage whose dense blocks (Jx, Jz, Hxx, Hxz, Hzz) would hold more numbers than this.
    MAX_BLOCK_ENTRIES = 2**28
    #: Hessian blocks above this many numbers are taken lazily (:meth:`linearize`): 4M (32 MiB in float64)
    LAZY_ENTRIES = 2**22

    def __init__(
        self,
        index: int,
        module: nn.Module,
        params: list[nn.Parameter] | None = None,
        label: str | None = None,
    ):
        self.index, self.modules, self.module = index, (module,), module
        if params is None:
            params = [t for t in module.parameters() if t.requires_grad]
        self.params = list(params)
        self.label = label
        self._checked = False

    @property
    def name(self) -> str:
        """The stage's name (:attr:`Stage.name`), or ``'stage i (label)'`` where the split gave a label."""
        if self.label is None:
            return super().name
        return f"stage {self.index} ({self.label})"

    def _call(self, z: Tensor) -> Tensor:
        # a copy (unshared): in-place modules (ReLU(inplace=True), x.mul_()) must not overwrite the caller's
        # z.
        # Attention through the math kernel of scaled_dot_product_attention: the fused CPU/CUDA kernels
        # (flash, memory-efficient) have no double backward, the math one is plain autograd
        with exact_attention(), dense_lookup_grads(self.module):
            try:
                out = self.module(unshared(z))
            except AttributeError as e:  # (a stash an earlier stage sets, gone when this one is called alone)
                raise NotAChainError(
                    f"{self.name} failed when called on its own ({e}): where it reads a value set elsewhere "
                    "in the model's forward -- an activation an earlier stage stashes on a module "
                    "(self.a.stash), an attribute a parent module sets -- put the modules from the one that "
                    "sets it to the one that reads it into one nn.Module with its own forward (a stage; a "
                    "nested nn.Sequential is split into its layers), or set it in __init__"
                ) from e
        if not isinstance(out, Tensor):
            mods = self.module.modules() if isinstance(self.module, nn.Module) else ()
            rnn = isinstance(out, tuple) and any(isinstance(m, nn.RNNBase) for m in mods)
            hint = (
                " (nn.RNN/LSTM/GRU return (output, state): wrap the module to return output or output[:, -1])"
                if rnn
                else "; a chain's stages pass one tensor: wrap the module in one whose forward returns the "
                "tensor the next stage (or the loss) reads, e.g. out[0] or out['logits']"
            )
            raise NotAChainError(f"{self.name} returns {type(out).__name__}, not one tensor{hint}")
        return out

    def _live(self) -> list[Tensor]:
        """The module's parameters and buffers."""
        mod = self.module
        return [*mod.parameters(), *mod.buffers()] if isinstance(mod, nn.Module) else []

    def _state(self, copy: bool = True) -> list[Tensor]:
        """The values of :meth:`_live` (copies, or the tensors detached)."""
        return [t.detach().clone() if copy else t.detach() for t in self._live()]

    def forward(self, z: Tensor) -> Tensor:
        if self._checked:
            return self._call(z)
        renorm = [
            (m, m.weight.detach().clone())
            for m in (self.module.modules() if isinstance(self.module, nn.Module) else ())
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None
        ]
        held = self._state()  # (the parameters too: a forward may write them, ActNorm's first call)
        out = self._call(z)
        if len(self._live()) != len(held):  # one registered or filled on first use (a mask): from here on
            held = self._state()
            out = self._call(z)
        first = self._state()
        again = self._call(z)
        # (the rows an embedding with max_norm renormalizes at every call, torch's semantics: named below)
        renormed = {id(m.weight) for m, _ in renorm}
        live = self._live()
        kept = [i for i, t in enumerate(live) if id(t) not in renormed]
        after = self._state(copy=False)
        changed = not _buffers_equal([held[i] for i in kept], [after[i] for i in kept])
        # (moved on the first call only: a data-dependent initialization)
        initialized = changed and _buffers_equal([first[i] for i in kept], [after[i] for i in kept])
        if changed:  # put back
            with torch.no_grad():
                for i in kept:
                    live[i].copy_(held[i])
        same = out.shape == again.shape and torch.equal(torch.nan_to_num(out), torch.nan_to_num(again))
        moved = [m for m, w in renorm if not torch.equal(w, m.weight)]  # (rows renormalized by the calls)
        if not same and moved:
            raise UnsupportedStageError(
                f"{self.name} returns different outputs on every call: its {type(moved[0]).__name__}"
                f"(max_norm={moved[0].max_norm:g}) renormalizes the rows it looks up, in place, at every "
                "call (torch's semantics); renormalize every row once before (under torch.no_grad(), call "
                "the embedding on torch.arange(num_embeddings)), or set max_norm=None"
            )
        if initialized and same:
            raise UnsupportedStageError(
                f"{self.name} changed its parameters or buffers on its first call only (a data-dependent "
                "initialization, as Glow's ActNorm does; put back as they were): run the model once on real "
                "data (under torch.no_grad()) before using hessinv"
            )
        if changed or not same:
            mods = list(self.module.modules()) if isinstance(self.module, nn.Module) else []
            hooked = [m for m in mods if m._forward_hooks or m._forward_pre_hooks]
            if changed and same and not hooked:
                raise UnsupportedStageError(
                    f"{self.name} writes its parameters or buffers on every call, though its output stays "
                    "the same (a running statistic of its input): hessinv's own calls of it would move them; "
                    "update them only under `if self.training:` and call model.eval() (hessinv.optim does so "
                    "for the curvature itself), or update them outside forward"
                )
            what = "updates its parameters or buffers" if changed else "returns different outputs"
            hooks = (
                f"; its {type(hooked[0]).__name__} has a forward hook: a hook that keeps state between "
                "calls (a counter, a running statistic, noise) must be removed or made a function of its "
                "input"
                if hooked
                else ""
            )
            if mods and not any(m.training for m in mods):  # (in eval mode already: not the layers' mode)
                raise UnsupportedStageError(
                    f"{self.name} {what} on every call, in eval mode: it is random or stateful whatever "
                    "its mode (FractionalMaxPool, F.dropout without training=self.training, a forward that "
                    "draws noise or counts its calls) and has no curvature: replace it with a deterministic "
                    "one" + hooks
                )
            raise UnsupportedStageError(
                f"{self.name} {what} on every call: it is random or stateful (Dropout, RReLU, BatchNorm "
                "with batch statistics, spectral_norm's power iteration in training mode); call model.eval() "
                "(hessinv.optim does so for the curvature itself, for torch's layers of these kinds and a "
                "module whose forward reads self.training) -- a layer random in eval mode too "
                "(FractionalMaxPool, F.dropout without training=self.training, a forward that draws noise) "
                "has no curvature: replace it with a deterministic one" + hooks
            )
        self._checked = True
        return out

    def linearize(self, z_in: Tensor, b_out: Tensor, second_order: bool) -> Blocks:
        """Dense per-example blocks -- or :class:`LazyBlocks`, which form them only when the Riccati sweep
        asks and take every product by autograd at the linearization point: always for Gauss-Newton
        (``second_order=False``), and for the Hessian where the dense blocks would hold more than
        :attr:`LAZY_ENTRIES` numbers (a convolution or pooling on images: a 10k-parameter CNN's blocks
        took 25 s and gigabytes, one Hessian-vector product through them 0.5 s). Lazy Hessian blocks are
        probed at once (mixing of examples, finiteness, a differentiable backward, symmetric second
        derivatives: :meth:`LazyBlocks.probe`)."""
        if not second_order:
            return LazyBlocks(self, z_in, b_out)
        B = z_in.shape[0]
        d_in = z_in.reshape(B, -1).shape[1] if z_in.is_floating_point() else 0
        if self.dense_fits(B, d_in, b_out.reshape(B, -1).shape[1])[0] > min(
            self.LAZY_ENTRIES, self.MAX_BLOCK_ENTRIES
        ):
            with self._twice():
                blk = LazyBlocks(self, z_in, b_out, second_order=True)
                blk.probe()
            return blk
        return self.dense_blocks(z_in, b_out, second_order)

    @contextlib.contextmanager
    def _twice(self) -> Iterator[None]:
        """Autograd's refusal to differentiate the stage twice (``derivative for aten::... is not
        implemented``) as an :class:`UnsupportedStageError` saying what to do."""
        try:
            yield
        except UnsupportedStageError:  # (a RuntimeError too)
            raise
        except RuntimeError as e:
            hint = next((h for op, h in _NO_DOUBLE_BACKWARD.items() if op in str(e)), "")
            raise NoDoubleBackward(
                f"{self.name}: autograd cannot differentiate it twice: {str(e).rstrip('.')}. "
                + (hint or "Write the stage with operations autograd can differentiate twice")
            ) from e

    def dense_blocks(self, z_in: Tensor, b_out: Tensor, second_order: bool) -> DenseBlocks:
        """``Jx, Jz`` (and with ``second_order`` the ``H..`` blocks) per example, by plain autograd double
        backward, checked against whole-batch products on a random probe."""
        with self._twice():
            return self._linearize(z_in, b_out, second_order)

    def differentiable_input(self, z_in: Tensor, dtype: torch.dtype) -> tuple[Tensor, Callable]:
        """``(z, f)``: the stage's input as a leaf that requires grad and ``f(z)`` the stage on it. Data
        that is not differentiable (token ids of an ``nn.Embedding``) becomes an input of width 0."""
        if z_in.is_floating_point():
            return z_in.detach().clone().requires_grad_(True), self._call
        z = torch.zeros(z_in.shape[0], 0, dtype=dtype, device=z_in.device, requires_grad=True)
        return z, lambda _: self._call(z_in)

    def _bad_output(self, out: Tensor) -> str:
        """Why an output does not fit the next stage's input (the message of a refusal)."""
        if not out.is_floating_point():
            return (
                f"{self.name} returns {out.dtype} values (one_hot, argmax, a comparison): they have no "
                "derivative, and the stage after it takes them as data; compute them outside the model "
                "and pass them as the inputs (e.g. F.one_hot(x, C).to(dtype))"
            )
        return f"{self.name}: output of shape {tuple(out.shape)} per batch"

    def dense_fits(self, B: int, d_in: int, d_out: int) -> tuple[int, int]:
        """``(numbers, examples)``: what this stage's dense blocks (``Jx, Jz, Hxx, Hxz, Hzz``) hold for
        ``B`` examples, and the most examples whose blocks stay within :attr:`MAX_BLOCK_ENTRIES`."""
        p = self.p
        size = B * d_out * (p + d_in) + p * p + B * d_in * (p + d_in)
        per = (size - p * p) / B if B else 0  # per example
        return size, int((self.MAX_BLOCK_ENTRIES - p * p) // per) if per else B

    def check_dense_size(self, B: int, d_in: int, d_out: int, fits: int | None = None) -> None:
        """:class:`TooLargeError` where the dense blocks for ``B`` examples exceed :attr:`MAX_BLOCK_ENTRIES`;
        ``fits``: the batch to suggest (default: this stage's; the chain passes the smallest over its
        stages, so that the advice holds for all of them)."""
        size, own = self.dense_fits(B, d_in, d_out)
        if size <= self.MAX_BLOCK_ENTRIES:
            return
        fits = own if fits is None else fits
        p = self.p
        if p * p > self.MAX_BLOCK_ENTRIES:  # (an embedding table of 5000 x 32: no batch helps)
            what = (
                f"its {p} parameters' p x p block alone exceeds it, whatever the batch (the Hessian's "
                "factorization, inertia and eigenvalue counts need it); H @ v, hessinv.gauss_newton "
                "(factored through its low-rank root) and the optimizers' mini-batch mode (Newton's "
                "default, Preconditioner) need no such blocks, and H.solve(g, damping, rtol=...) answers "
                "from H's products where MINRES reaches rtol"
            )
        elif fits >= 1:
            what = (
                f"a batch of at most {fits} examples for the curvature (Newton/Preconditioner: "
                f"curvature_batch_size={fits}) fits; else use smaller inputs to it, or split it into a chain "
                "of smaller stages"
            )
        else:
            what = "use smaller inputs to it, or split it into a chain of smaller stages"
        raise TooLargeError(
            f"{self.name}: its dense per-example blocks would hold {size:.3g} numbers (p={p}, "
            f"d_in={d_in}, d_out={d_out}, B={B}; the limit is {self.MAX_BLOCK_ENTRIES:.3g}): a stage "
            "without a structured form (convolutions, pooling, normalization, lookups) is stored densely "
            f"per example: {what}"
        )

    def _linearize(self, z_in: Tensor, b_out: Tensor, second_order: bool) -> DenseBlocks:
        B = z_in.shape[0]
        params = self.params
        z, call = self.differentiable_input(z_in, b_out.dtype)
        self._in_shape = tuple(z.shape)  # (for _one_element_norm's diagnosis)
        u = b_out.detach().reshape(B, -1).clone().requires_grad_(True)
        zf = z.reshape(B, -1)
        self.check_dense_size(B, zf.shape[1], u.shape[1])
        d_in, p = zf.shape[1], self.p
        with torch.enable_grad():
            out = call(z).reshape(B, -1)
            if out.shape != u.shape:
                raise UnsupportedStageError(self._bad_output(out))
            first = _grads((out * u).sum(), [*params, z], create_graph=True)
            gx = torch.cat([g.reshape(-1) for g in first[:-1]]) if params else z.new_zeros(0)
            gz = first[-1].reshape(B, d_in)
            wrt = [u, z, *params] if second_order else [u]
            blocks = None
            for batched in (True, False):
                R = _backward_rows(gx, wrt, p, lambda j, k: _unit_rows(j, k, p, gx), batched)
                S = _backward_rows(gz, wrt[:2], d_in, lambda i, k: _unit_cols(i, k, gz), batched)
                if R is None or S is None:  # batched backward failed: loop
                    continue
                Jx, Jz = R[0].permute(1, 2, 0), S[0].permute(1, 2, 0)
                Hxx = Hxz = Hzz = None
                if second_order:
                    Hxz = R[1].reshape(p, B, d_in).permute(1, 0, 2)
                    # (by each parameter's size, not (p, -1): a parameter with no entries is (p, 0))
                    rows = [g.reshape(p, q.numel()) for g, q in zip(R[2:], params, strict=True)]
                    Hxx = torch.cat(rows, 1) if params else z.new_zeros(0, 0)
                    Hzz = S[1].reshape(d_in, B, d_in).permute(1, 0, 2)
                blocks = DenseBlocks(Jx, Jz, Hxx, Hxz, Hzz)
                if not batched:
                    self._check_finite(blocks)
                    break
                if self._non_finite(blocks) is not None:  # (the loop of single backward passes decides)
                    blocks = None
                    continue
                try:  # vmapped backward: accepted only if the unbatched probe agrees
                    self._probe(blocks, gx, gz, u, z, params, second_order, out)
                    self._check_first_order(blocks, gx, gz, u)
                except UnsupportedStageError:
                    blocks = None
                else:
                    break
            assert blocks is not None
            if not batched:
                self._probe(blocks, gx, gz, u, z, params, second_order, out)
                self._check_first_order(blocks, gx, gz, u)
            if second_order:
                blk = blocks

                def second(v: Tensor, t: Tensor | None) -> tuple[Tensor, Tensor | None]:
                    if t is None:
                        return blk.hxx(v), None
                    return blk.hxx(v) + blk.hxz(t), blk.hxzT(v) + blk.hzz(t)

                def first(v: Tensor, t: Tensor | None) -> Tensor:
                    return blk.jx(v) + (blk.jz(t) if t is not None and blk.d_in else 0)

                self._check_by_differences(out, z_in, u.detach(), first, second)
        return _without_zero_blocks(blocks)

    def _check_by_differences(
        self,
        out: Tensor,
        z_in: Tensor,
        b: Tensor,
        first: Callable[[Tensor, Tensor | None], Tensor],
        second: Callable[[Tensor, Tensor | None], tuple[Tensor, Tensor | None]],
    ) -> None:
        """Where the stage's graph holds a custom ``autograd.Function``: its second derivatives
        ``H(b) (v, t)`` (``second(v, t)``: the parameter and input parts, autograd's double backward) against
        central differences of its *first* backward ``g(x, z) = d <b, f(x, z)> / d(x, z)`` along a random
        ``(v, t)``: ``(g(w + h (v, t)) - g(w - h (v, t))) / 2h``. A custom backward computed from detached
        or non-differentiable values (``x.detach()``, ``ctx.x = x.detach()``, arithmetic under
        ``torch.no_grad``) is exact to first order -- every other check passes -- while its derivative, the
        Hessian, misses terms (a Swish written so: 29% off).

        The direction is scaled tensor by tensor (``v_i ~ ||x_i|| / sqrt(n_i)``, the input likewise) and the
        step is ``h = u^(1/3)`` of it; the differences are taken at ``h`` and ``2 h``, whose disagreement
        measures their own error (rounding, third derivatives, a kink crossed). The check is made only where
        the differences of the *outputs* reproduce autograd's first-order product ``first(v, t)`` (``J (v,
        t)``, which every other check trusts): a parameter the functional call does not replace (held in a
        list, cached, read by the backward through the module) would otherwise look like a missing second
        derivative. The stage is refused (:class:`NoExactHessian`; the Gauss-Newton matrix rests on first
        derivatives and stays exact) where autograd's ``H(b) (v, t)`` is off the differences by more than 10
        times their own error and ``100 u^(2/3)`` relative."""
        custom = _custom_functions(out)
        module = self.module
        if not custom or not isinstance(module, nn.Module):
            return
        names = {id(t): n for n, t in module.named_parameters(remove_duplicate=False)}
        if any(id(t) not in names for t in self.params):
            return  # (parameters not the module's own: no functional call to perturb them with)
        keys = [names[id(t)] for t in self.params]
        B, dt = z_in.shape[0], b.dtype
        floating = z_in.is_floating_point()
        gen = torch.Generator(device="cpu").manual_seed(2718 + self.index)
        x0 = [t.detach() for t in self.params]
        z0 = z_in.detach().to(dt) if floating else z_in

        def direction(a: Tensor) -> Tensor:
            size = float(a.double().norm()) / max(a.numel(), 1) ** 0.5
            w = torch.randn(a.shape, generator=gen, dtype=torch.float64)
            return (w * (size if size > 0 else 1.0)).to(a)

        v = [direction(a) for a in x0]
        t_ = direction(z0) if floating else None
        h = torch.finfo(dt).eps ** (1 / 3)

        def at(step: float) -> tuple[Tensor, Tensor]:
            """The output and the first backward ``g`` at ``(x + step v, z + step t)``, float64."""
            xs = [(a + step * w).requires_grad_(True) for a, w in zip(x0, v, strict=True)]
            zs = (z0 + step * t_).requires_grad_(True) if floating else z0
            with torch.enable_grad(), exact_attention(), dense_lookup_grads(module):
                o = torch.func.functional_call(module, dict(zip(keys, xs, strict=True)), (unshared(zs),))
                gs = _grads((o.reshape(B, -1) * b).sum(), [*xs, zs] if floating else xs)
            g = torch.cat([q.reshape(-1) for q in gs]) if gs else o.new_zeros(0)
            return o.detach().reshape(-1).double(), g.detach().double()

        try:
            (o1p, g1p), (o1m, g1m) = at(h), at(-h)
            (o2p, g2p), (o2m, g2m) = at(2 * h), at(-2 * h)
        except Exception:  # noqa: BLE001 - a stage that cannot be called so: the check cannot be made
            return
        vp = torch.cat([w.reshape(-1, 1) for w in v]) if v else b.new_zeros(0, 1)
        tz = t_.reshape(B, -1, 1) if floating else None
        floor = 100 * torch.finfo(dt).eps ** (2 / 3)

        def off(d1: Tensor, d2: Tensor, ref: Tensor) -> tuple[float, float]:
            """(|d1 - ref|, the differences' own error |d1 - d2|), relative to the largest of the three."""
            scale = max(float(d1.norm()), float(d2.norm()), float(ref.norm()), torch.finfo(dt).tiny)
            return float((d1 - ref).norm()) / scale, float((d1 - d2).norm()) / scale

        # the gate: the outputs' differences against autograd's J (v, t)
        gap, noise = off((o1p - o1m) / (2 * h), (o2p - o2m) / (4 * h), first(vp, tz).reshape(-1).double())
        if gap > max(10 * noise, floor):
            return  # (the functional call does not move all the stage reads: no check can be made)
        hx, hz = second(vp, tz)
        auto = torch.cat([hx.reshape(-1), *([hz.reshape(-1)] if floating else [])]).double()
        gap, noise = off((g1p - g1m) / (2 * h), (g2p - g2m) / (4 * h), auto)
        if gap > max(10 * noise, floor):
            raise NoExactHessian(
                _custom_backward_message(
                    self.name,
                    custom,
                    f"disagree with finite differences of its first derivatives ({gap:.1%} off)",
                )  # fmt: skip
            )

    def _check_finite(self, blk: DenseBlocks) -> None:
        """A :class:`NonFiniteError` for NaN or infinite derivatives at this batch (autograd's double
        backward of ``x / ||x||`` at an all-zero ``x``: ``F.normalize`` after a ReLU that zeroed an
        example). Multiplied by an exact zero elsewhere in the chain they made a Hessian of NaNs."""
        name = self._non_finite(blk)
        if name is not None:
            self.not_finite(name)

    def not_finite(self, name: str) -> None:
        """Raise the :class:`NonFiniteError` of :meth:`_check_finite` for the derivatives ``name``."""
        raise NonFiniteError(
            f"{self.name}: its derivatives at this batch are not finite (NaN or infinity in "
            f"{name}; e.g. F.normalize or a norm of an all-zero vector, a square root at 0): "
            "make the stage differentiable there (F.normalize(x, eps=...) divides by max(||x||, "
            "eps) but autograd's second derivative at 0 is still NaN: add eps inside the norm, "
            "x / torch.sqrt((x * x).sum(-1, keepdim=True) + eps))"
        )

    @staticmethod
    def _non_finite(blk: DenseBlocks) -> str | None:
        """The name of a block with a NaN or infinite entry, or None."""
        for name in ("Jx", "Jz", "Hxx", "Hxz", "Hzz"):
            t = getattr(blk, name, None)
            if isinstance(t, Tensor) and t.numel() and not bool(torch.isfinite(t).all()):
                return name
        return None

    def _check_first_order(self, blk: DenseBlocks, gx: Tensor, gz: Tensor, u: Tensor) -> None:
        """The blocks' ``Jx^T u``, ``Jz^T u`` against autograd's first backward ``gx``, ``gz`` (which they
        are differentiated from): a backward that is not itself differentiable (a custom
        ``autograd.Function`` with ``@once_differentiable``: its rows come out as zeros) or whose double
        backward disagrees with it (torch's ``prelu`` at an input of exactly 0) is refused -- the
        gradient, Gauss-Newton matrix and Hessian would be another function's."""
        s = u.detach()[..., None]
        # what this catches is O(1) (rows of zeros: 1; prelu's default slope 0.25 against 1: 0.75);
        # sqrt(u) in float64, 0.25 below it leave room for the rounding of derivatives that cancel (a
        # GroupNorm of 2 per group in float32, inputs x30: autograd's own backward 5% off its blocks)
        tol = math.sqrt(torch.finfo(gz.dtype).eps) if gz.dtype == torch.float64 else 0.25
        pairs = [
            (blk.jxT(s)[:, 0], gx.detach(), torch.einsum("nop,no->p", blk.Jx.abs(), s[..., 0].abs())),
            (blk.jzT(s)[..., 0], gz.detach(), torch.bmm(blk.Jz.abs().transpose(1, 2), s.abs())[..., 0]),
        ]
        for got, ref, size in pairs:
            if ref.numel() == 0:
                continue
            scale = max(float(size.max()), float(ref.abs().max()))
            if float((got - ref).abs().max()) > tol * scale:
                self._refuse_one_element_norm()
                dt = gz.dtype
                rounding = (
                    ""
                    if dt == torch.float64
                    else f" beyond their rounding in {dt} (cancellation -- a LayerNorm or GroupNorm over 2 "
                    "features, large inputs -- or "
                )
                # (float64: a backward autograd cannot differentiate -- Gauss-Newton takes its root; below
                # float64 cancellation may explain it too, which the root would not escape: refused)
                raise (NoDoubleBackward if dt == torch.float64 else UnsupportedStageError)(
                    f"{self.name}: autograd's derivatives of its backward pass disagree with the backward "
                    f"pass itself{rounding or ' ('}a custom autograd.Function whose backward is not "
                    "differentiable, e.g. @once_differentiable, or an operation whose double backward "
                    "differs from its backward, e.g. prelu at an input of exactly 0): its Jacobian and "
                    "curvature cannot be taken; make the backward differentiable, move the inputs off the "
                    "kink (a nonzero initialization)" + (f"; or {_remedy(dt)}" if rounding else "")
                )

    def _refuse_one_element_norm(self) -> None:
        """Raise the documented :class:`UnsupportedStageError` where this stage is a normalization whose
        groups hold one element on this batch's input (a GroupNorm of one channel per group after a
        convolution down to 1x1, ``LayerNorm(1)``): its output is its bias, and autograd's derivatives are
        differences of large terms that cancel only at special parameters -- not a non-differentiable
        backward, which the generic message would blame (a probe)."""
        m, shape = self.module, getattr(self, "_in_shape", None)
        if shape is None or len(shape) < 2:
            return
        size = None
        if isinstance(m, nn.GroupNorm):
            size = shape[1] // max(m.num_groups, 1) * math.prod(shape[2:])
        elif isinstance(m, nn.LayerNorm):
            size = math.prod(m.normalized_shape)
        elif isinstance(m, nn.modules.instancenorm._InstanceNorm):
            size = math.prod(shape[2:])
        if size == 1:
            raise UnsupportedStageError(
                f"{self.name}: a normalization over one element ({type(m).__name__} on input "
                f"{tuple(shape)}): its output is its bias, and its derivatives are differences of large "
                "terms that do not cancel at these parameters; remove it or normalize over more elements"
            )

    def _probe(self, blk: DenseBlocks, gx, gz, u, z, params, second_order: bool, out: Tensor) -> None:
        """Check the per-example blocks against the whole-batch autograd products on a random probe,
        and the symmetry of the second derivatives (``out``: the stage's output, with its graph)."""
        B, d_in = gz.shape
        gen = torch.Generator(device="cpu").manual_seed(1234 + self.index)
        v = torch.randn(blk.p, 1, generator=gen, dtype=torch.float64).to(gz)
        t = torch.randn(B, d_in, 1, generator=gen, dtype=torch.float64).to(gz)
        wrt = [u, z, *params]

        def products(v_: Tensor, t_: Tensor) -> tuple[Tensor, ...]:
            return tuple(_grads((gx * v_[:, 0]).sum() + (gz * t_[..., 0]).sum(), wrt))

        d = products(v, t)
        tol = 1e3 * torch.finfo(gz.dtype).eps * (1 + blk.p + d_in) ** 0.5
        noise: list[Tensor] | None = None

        def close(terms: tuple[Tensor, ...], ref: Tensor, i: slice) -> bool:
            """``sum(terms) == ref`` up to rounding relative to the largest term, or up to autograd's own
            rounding in the products ``d[i]`` that ``ref`` is made of, measured as their defect of
            linearity ``|d(v + w) - d(v) - d(w)|``: derivatives that are small differences of large
            intermediate terms (a LayerNorm over 2 features, whose outputs are +-1) carry rounding far
            above ``u`` times their size, in the blocks and in the reference alike. That allowance
            holds only while the rounding stays below ``sqrt(u64)`` of the products (float64 stages):
            beyond it the blocks themselves are that inaccurate, and a stage that mixes examples
            could hide in it, so the stage is refused (named: its derivatives cancel)."""
            nonlocal noise
            if ref.numel() == 0:
                return True
            scale = max(float(ref.abs().max()), *(float(t.abs().max()) for t in terms))
            err = float((sum(terms) - ref).abs().max())
            if err <= tol * scale:
                return True
            if noise is None:
                v2 = torch.randn(blk.p, 1, generator=gen, dtype=torch.float64).to(gz)
                t2 = torch.randn(B, d_in, 1, generator=gen, dtype=torch.float64).to(gz)
                d2, d3 = products(v2, t2), products(v + v2, t + t2)
                noise = [float((c - a - b).abs().max()) for a, b, c in zip(d, d2, d3, strict=True)]
            rounding = max(noise[i], default=0.0)
            if err > 10 * rounding:
                return False
            if rounding > _SQRT_U64 * scale:
                raise UnsupportedStageError(
                    f"{self.name}: its derivatives are small differences of large terms (autograd's own "
                    f"products reproduce only to {rounding / scale:.1e} relative in {gz.dtype}), so its "
                    f"blocks cannot be taken exactly nor checked for mixing examples; {_remedy(gz.dtype)}"
                )
            return True

        def refuse(what: str) -> None:
            """Mixing, or rounding beyond what was measured: told apart structurally. With the input
            direction on one example alone (each in turn, up to 256: mixing can flow one way only, as in
            ``x + x[-1:]``, or through one example alone, as in ``h - h.max()``), a stage that acts on each
            example separately has exactly zero derivatives at the other examples (autograd multiplies by
            exact zeros there). (A refusal's cost: only a stage about to be refused gets here.)"""
            for i in range(min(B, 256)) if B > 1 else ():
                ti = torch.zeros_like(t)
                ti[i] = t[i]
                di = products(torch.zeros_like(v), ti)
                others = torch.arange(B, device=ti.device) != i
                if bool((di[0][others] != 0).any() or (di[1][others] != 0).any()):
                    raise mixing_error(self.name, what, self.module, z)
            custom = _custom_functions(out) if what == "second derivatives" else []
            if custom:  # (a custom backward autograd differentiates wrongly: inconsistent, not cancelling)
                raise NoExactHessian(
                    _custom_backward_message(self.name, custom, "do not agree with each other", False)
                )
            self._refuse_one_element_norm()
            raise UnsupportedStageError(
                f"{self.name}: its per-example {what} do not reproduce autograd's products to rounding in "
                f"{gz.dtype} (cancellation, e.g. a saturated softmax or a LayerNorm over 2 features), so "
                f"its blocks cannot be taken exactly; {_remedy(gz.dtype)}"
            )

        if not close((blk.jx(v), blk.jz(t)), d[0][..., None], slice(0, 1)):
            refuse("derivatives")
        if not second_order:
            return
        hv = torch.cat([g.reshape(-1) for g in d[2:]]) if params else gz.new_zeros(0)
        xs, zs = slice(2, None), slice(1, 2)  # the products' parameter and input parts
        symmetric = close((blk.Hxx,), blk.Hxx.T, xs) and close((blk.Hzz,), blk.Hzz.transpose(1, 2), zs)
        consistent = close((blk.hxx(v), blk.hxz(t)), hv[:, None], xs) and close(
            (blk.hxzT(v), blk.hzz(t)), d[1].reshape(B, d_in, 1), zs
        )
        if not symmetric or (B == 1 and not consistent):
            custom = _custom_functions(out)
            if custom:
                raise NoExactHessian(_custom_backward_message(self.name, custom, "are not symmetric", False))
            self._refuse_one_element_norm()
            raise NoExactHessian(
                f"{self.name}: autograd's second derivatives of this stage are not symmetric: torch has no "
                "exact double backward for an operation in it (e.g. weight_norm's _weight_norm: written out "
                "in forward, w = g * v / v.norm(dim=1, keepdim=True), it is exact), or they are small "
                "differences of large terms (a normalization over 2 values); its Hessian cannot be taken "
                "exactly (the Gauss-Newton matrix can)"
            )
        if not consistent:
            refuse("second derivatives")


_SQRT_U64 = 1.5e-8  # sqrt(float64's unit roundoff): the probe's rounding allowance's limit


#: :class:`LazyBlocks` form their dense blocks for a product of at least an eighth as many columns as they
#: have rows (``p + d_in``) where those hold at most this many numbers (32M: 256 MiB in float64)
DENSE_SWITCH_ENTRIES = 2**25


class LazyBlocks(Blocks):
    """Blocks of a :class:`GenericStage` (Gauss-Newton, or with ``second_order`` the Hessian's), formed as
    needed.

    ``Jx^T s`` and ``Jz^T s`` -- all that the gradient and the low-rank Gauss-Newton root
    (:func:`hessinv.lowrank.gauss_newton_root`, the optimizer's refresh) ask of a stage -- are one batched
    vector-Jacobian product of the stage at its linearization point (``k`` right-hand sides: one backward
    pass with ``is_grads_batched``), ``O(k)`` backward passes of the stage instead of the ``p + d_in``
    double-backward passes that dense ``Jx``, ``Jz`` cost (a 2-layer CNN's refresh on 8 examples:
    180 -> a few ms). The other products are autograd's too, on the graph of ``g(u) = d <u, f> / d(x,
    z)`` at ``u = b`` (the signal at the output): ``Jx v + Jz t`` is the derivative of ``<g(u), (v, t)>``
    in ``u`` (``g`` is linear in ``u``), and ``Jx^T s + H(b) (v, t)`` (both parts, ``H(b) = sum_k b_k
    d^2 f_k``) the derivative of ``<s, f> + <g(b), (v, t)>`` in ``(x, z)`` -- one (double) backward pass
    each, whatever the sizes of ``Jz`` and ``Hzz`` (a convolution on images: a Hessian-vector product
    0.5 s through dense blocks, milliseconds so). The Riccati blocks (and products asked after them) use
    the dense per-example blocks (:meth:`GenericStage.dense_blocks`), built once.

    The linearization point is kept: a copy of the stage's input, and copies of its parameters and
    buffers, the modules' train/eval modes and plain attributes, against which the module is checked
    before it is used again (parameters or buffers changed in between -- an optimizer step, ``p.data``
    edits -- raise a named error; the modes and plain attributes (``GroupNorm.eps``) are put back while
    the dense blocks are formed).
    """

    per_example = False  # not probed: gauss_newton_root checks the rows' structure itself

    def __init__(self, stage: GenericStage, z_in: Tensor, b_out: Tensor, second_order: bool = False):
        self.stage, self._b_out, self.second_order = stage, b_out, second_order
        self._g: tuple[Tensor, list[Tensor]] | None = None  # (u, g(u)) with its graph: _graph()
        self._probed = False
        self._z_in = z_in.detach().clone()  # the caller's batch may change in place afterwards
        self.batch, self.p = z_in.shape[0], stage.p
        mods = list(stage.module.modules())
        # plain tensor attributes as they are before the call (a memo the call creates is the call's own)
        self._plain = [v for m in mods for v in vars(m).values() if isinstance(v, Tensor)]
        self._run()
        # after the call: a module may edit its parameters as it runs (Embedding(max_norm=...)); frozen
        # parameters and plain tensor attributes too (a frozen layer's stage has no other values)
        self._state = [t.detach().clone() for t in self._values()]
        self._modes = [(m, m.training) for m in mods]
        # plain attributes (GroupNorm.eps, Conv's padding_mode): the dense blocks call the module later
        self._attrs = [
            (m, k, v) for m in mods for k, v in vars(m).items() if k != "training" and watchable(v)
        ]
        self._hooks = _hook_keys(mods)
        self._versions = self._graph_versions()  # (the graph's tensors: rewritten in place -> a new graph)
        self._flags = [t.requires_grad for t in stage.params]
        self.d_in = self._z.reshape(self.batch, -1).shape[1]
        self.d_out = b_out.reshape(self.batch, -1).shape[1]
        if self._out.reshape(self.batch, -1).shape[1] != self.d_out:
            raise UnsupportedStageError(stage._bad_output(self._out))
        self._dense_blocks: DenseBlocks | None = None
        self._memo: tuple[Tensor, str, Tensor] | None = None  # (s, which, the product not yet returned)

    def _run(self) -> None:
        """Call the stage on its input (a fresh leaf ``_z``) with autograd's graph into ``_out``, recording
        the calls of its plain ``nn.Linear``, ``nn.Embedding`` and ``nn.EmbeddingBag`` layers (input, output,
        the output's version) for :meth:`jxT_rows`."""
        stage = self.stage
        self._z, self._call = stage.differentiable_input(self._z_in, self._b_out.dtype)
        self._linear_calls: list[tuple[nn.Module, Tensor | None, Tensor | None, int]] = []
        self._linears: list[tuple[int, Tensor, Tensor]] | None = None
        # (weight index, token ids, output, padding_idx, an EmbeddingBag's (bag, share) per token)
        self._tables: list[tuple[int, Tensor, Tensor, int | None, tuple[Tensor, Tensor] | None]] = []
        mods = list(stage.module.modules())
        record = [m for m in mods if _plain_linear(m, stage.params) or _plain_embedding(m, stage.params)]
        # (before the user's forward hooks: the layer's own output, whatever a hook makes of it)
        handles = [m.register_forward_hook(self._record_linear, prepend=True) for m in record]
        try:
            with torch.enable_grad():
                self._out = self._call(self._z)
        finally:
            for h in handles:
                h.remove()

    def __getstate__(self) -> dict[str, Any]:
        """Pickling (``torch.save``, ``copy.deepcopy``) keeps the point, not autograd's graph: a graph does
        not survive it (the loaded tensors are cut from each other, and the products read zeros from them:
        a LayerNorm model's Gauss-Newton products 60% off after ``torch.load``, deepcopy a raw RuntimeError).
        The stage is called again at the kept point when the blocks are loaded (:meth:`__setstate__`)."""
        state = dict(self.__dict__)
        state["_graph"] = state.get("_out") is not None
        for k in ("_z", "_call", "_out", "_g", "_memo", "_linears", "_linear_calls", "_tables", "_apart"):
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        graph = state.pop("_graph")
        self.__dict__.update(state)
        self._g = self._memo = self._apart = None
        self._z = self._call = self._out = None
        self._linears, self._linear_calls, self._tables = [], [], []
        if graph:  # (the stage and its module are loaded before the blocks that hold them)
            with self._at_point():
                self._run()
            self._versions = self._graph_versions()

    def _record_linear(self, m: nn.Module, args: tuple, out: Any) -> None:
        z = args[0] if len(args) == 1 and isinstance(args[0], Tensor) else None
        wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda t: False)
        if z is None or not isinstance(out, Tensor) or wrapped(z) or wrapped(out):
            self._linear_calls.append((m, None, None, -1))  # (a keyword input, or inside torch.vmap)
        else:
            self._linear_calls.append((m, z, out, out._version))

    def _structured_linears(self) -> list[tuple[int, Tensor, Tensor]]:
        """``(weight index in stage.params, z, u)`` of each ``nn.Linear`` called once
        on a (B, m) input of this batch, its output ``u`` not edited in place afterwards: the candidates
        whose Gauss-Newton rows :meth:`jxT_rows` checks against the outer products ``t z^T`` of the signal
        ``t`` at ``u`` and the input ``z``. The same for each ``nn.Embedding`` called once on token ids
        of this batch (``z``: the ids), into :attr:`_tables`: rows scattered into the rows of the tokens."""
        if self._linears is None:
            self._linears = []
            calls: dict[int, list] = {}
            for m, z, u, version in self._linear_calls:
                calls.setdefault(id(m), []).append((m, z, u, version))
            index = {id(p): i for i, p in enumerate(self.stage.params)}
            for seen in calls.values():
                m = seen[0][0]
                table = isinstance(m, (nn.Embedding, nn.EmbeddingBag))
                # (a table may be read more than once -- a skip-gram's centre and context: its rows read
                # are those of every call; a Linear's rows come from one call's input)
                if len(seen) != 1 and not table:
                    continue
                ok = []
                for _, z, u, version in seen:
                    if z is None or z.dim() < 1 or z.shape[0] != self.batch or u._version != version:
                        break
                    if not u.requires_grad or tuple(u.shape) != _own_output_shape(m, z):
                        break  # (edited in place, or not the layer's own output: a hook's, 4 of 6 columns)
                    if table and (z.is_floating_point() or z.is_complex()):
                        break
                    if table and isinstance(m, nn.EmbeddingBag) and z.dim() != 2:
                        break
                    ok.append((z.detach(), u))
                if len(ok) != len(seen):
                    continue
                for z, u in ok:
                    if table:
                        self._tables.append((index[id(m.weight)], z, u, m.padding_idx, _bag_spread(m, z)))
                    elif z.dim() == 2:
                        self._linears.append((index[id(m.weight)], z, u))
            self._linear_calls = []
        return self._linears

    def jxT_rows(
        self,
        s: Tensor,
        rotation: list,
        factors: list | None = None,
        own: Tensor | None = None,
        out: Tensor | None = None,
        skip_from: int | None = None,
        tables: list | None = None,
    ) -> Tensor | None:
        """:meth:`Blocks.jxT_rows` (rows in parameter order): one batched backward pass to the stage's
        parameters, its input and the outputs ``u`` of its ``nn.Linear`` layers
        (:meth:`_structured_linears`). Where ``own`` holds, the signal ``t`` at ``u`` is nonzero at example
        ``own[q]`` only and the weight's rows equal ``t_{own[q],q} z_{own[q]}^T`` (checked against
        autograd's gradient of one seeded random combination of the columns, to the columns' rounding: a
        weight read elsewhere too, a hook on ``u``, a layer that sees its examples in another order fail
        it; a failed weight's rows come from a second batched backward pass), ``factors`` receives
        ``(offset, t, z, True)`` -- rotated as ``(Q_L^T t, z Q_R)`` where ``rotation`` names the weight --
        and the rows are left unwritten if the weight has ``skip_from`` entries or more. A plain
        ``nn.Embedding`` called once on token ids of the batch gets the signal at its output scattered
        into its tokens' rows (checked the same way): with ``tables`` and ``skip_from``, handed over as
        the nonzero columns only, the table's rows left unwritten. Other rows come
        out as autograd gives them, rotated where ``rotation`` names them. None where the stage has no
        such layer or has dense blocks already (the caller's ``jxT``)."""
        linears = self._structured_linears() if self._dense_blocks is None else []
        lookups = self._tables if self._dense_blocks is None else []
        k = s.shape[-1]
        if not (linears or lookups) or k == 0:
            return None
        self._unchanged()
        params = self.stage.params
        seeds = s.permute(2, 0, 1).reshape(k, *self._out.shape)
        rows_of = lambda wrt: _backward_rows(self._out, wrt, k, lambda j, c: seeds[j : j + c], True)  # noqa: E731
        cand = {w for w, _, _ in linears}
        cand_tables = {w for w, *_ in lookups}
        rest = [i for i in range(len(params)) if i not in cand and i not in cand_tables]
        got = rows_of(
            [*(params[i] for i in rest), self._z, *(u for _, _, u in linears), *(t[2] for t in lookups)]
        )
        if got is None:  # no batching rule for an operation in the stage: the caller's jxT (dense blocks)
            return None
        offsets = [0]
        for p in params:
            offsets.append(offsets[-1] + p.numel())
        out = s.new_empty(k, self.p) if out is None else out
        for i, g in zip(rest, got, strict=False):
            out[:, offsets[i] : offsets[i + 1]] = g.reshape(k, -1)
        q = torch.arange(k, device=s.device)
        outer = {}  # weight -> (t (B, d, k), z (B, m)) where t is nonzero at the row's own example only
        for (w, z, _), tu in zip(linears, got[len(rest) + 1 : len(rest) + 1 + len(linears)], strict=True):
            t = tu.permute(1, 2, 0)
            if own is not None and own_rows_only(t, own):
                outer[w] = (t, z.to(t.dtype))
        # a lookup table's rows: the signal at its output scattered into the rows of the batch's tokens
        # (an Embedding(50000, 64)'s rows without a batched backward pass into a dense table per row)
        scattered: dict[int, tuple[tuple[Tensor, Tensor], Tensor]] = {}
        for (w, ids, _, pad, spread), tu in zip(lookups, got[len(rest) + 1 + len(linears) :], strict=True):
            (flat, keep), t = _table_rows(ids, pad), _per_token(tu.reshape(k, -1, params[w].shape[1]), spread)
            if w in scattered:  # (the table read again in the stage: its tokens and signals joined)
                (flat0, keep0), t0 = scattered[w]
                flat, keep, t = torch.cat([flat0, flat]), torch.cat([keep0, keep]), torch.cat([t0, t], 1)
            scattered[w] = ((flat, keep), t)
        # checked against autograd: the weights' gradients for one random combination c of the k columns
        # equal sum_q c_q t_q z_q^T (a weight read elsewhere too, a hook on u, ... fail it); a table's,
        # the scatter of sum_q c_q t_q
        if outer or scattered:
            c = torch.randn(k, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            c = c.to(device=s.device, dtype=seeds.dtype)
            seed_c = torch.tensordot(c, seeds, dims=1)
            ws = [*outer, *scattered]
            gs = _grads(self._out, [params[w] for w in ws], seed=seed_c)
            for w, g in zip(ws, gs, strict=True):
                if w in scattered:
                    (ids, keep), t = scattered[w]
                    tc = torch.tensordot(c.to(t.dtype), t, dims=1).double()  # (tokens, D)
                    want = tc.new_zeros(params[w].shape).index_add_(0, ids[keep], tc[keep])
                    # norm-wise, of the absolute values scattered alike: a frequent token's row is a sum
                    # of many positions' signals, rounded as autograd adds them (a token in 30% of a
                    # batch's 2048 positions: far above the rounding of one position's)
                    tabs = torch.tensordot(c.abs().to(t.dtype), t.abs(), dims=1).double()
                    size = tabs.new_zeros(params[w].shape).index_add_(0, ids[keep], tabs[keep])
                    bound = 64 * torch.finfo(g.dtype).eps * float(size.norm())
                    if float((want - g.double()).norm()) > bound:
                        del scattered[w]
                    continue
                t, z = outer[w]
                to, zo = (t[own, :, q] * c[:, None].to(t.dtype)).double(), z[own].double()  # (k, d), (k, m)
                # norm-wise, in float64: the rounding of the k columns' signals t and of the combination's
                # backward pass, a few u of |t||z| summed over k random signs (~ sqrt(k) of it); a weight
                # also read elsewhere adds its other use's share (a hook, another op)
                bound = 64 * torch.finfo(g.dtype).eps * float((to.abs().T @ zo.abs()).norm()) / math.sqrt(k)
                if float((to.T @ zo - g.double()).norm()) > bound:
                    del outer[w]
        named = {o for o, *_ in rotation}
        for w, ((ids, keep), t) in scattered.items():
            V, D = params[w].shape
            if tables is not None and skip_from is not None and offsets[w] not in named:
                # the rows on the batch's tokens only: the table's other columns of out stay unwritten
                tokens, at = torch.unique(ids[keep], return_inverse=True)
                vals = t.new_zeros(k, tokens.numel(), D).index_add_(1, at, t[:, keep]).to(out.dtype)
                cols = (tokens[:, None] * D + torch.arange(D, device=tokens.device)).reshape(-1)
                tables.append((offsets[w], V * D, offsets[w] + cols, vals.reshape(k, -1)))
                continue
            W = out[:, offsets[w] : offsets[w + 1]].view(k, V, D)
            W.zero_()
            W.index_add_(1, ids[keep], t[:, keep].to(out.dtype))
        failed = [w for w in sorted(cand | cand_tables) if w not in outer and w not in scattered]
        if failed:
            more = rows_of([params[w] for w in failed])
            if more is None:
                return None
            for w, g in zip(failed, more, strict=True):
                out[:, offsets[w] : offsets[w + 1]] = g.reshape(k, -1)
        rotated = {o: (a, b, QL, QR) for o, a, b, QL, QR in rotation}  # (offsets within the stage)
        for w, (t, z) in outer.items():
            d, m = params[w].shape
            tw, zw = t.to(s.dtype), z.to(s.dtype)
            if offsets[w] in rotated:
                _, _, QL, QR = rotated.pop(offsets[w])
                tw, zw = in_basis(QL, tw, None), in_basis(None, zw, QR)
            if factors is not None:
                factors.append((offsets[w], tw, zw, True))
            if skip_from is None or d * m < skip_from:
                W = out[:, offsets[w] : offsets[w + 1]].unflatten(1, (d, m))
                W.copy_(tw[own, :, q][:, :, None] * zw[own][:, None, :])
        for o, (a, b, QL, QR) in rotated.items():  # the other weights the rotation names
            Wo = out[:, o : o + a * b].unflatten(1, (a, b))
            Wo.copy_(in_basis(QL, Wo, QR))
        self._memo = (s, "z", got[len(rest)].reshape(k, self.batch, self.d_in).permute(1, 2, 0))
        return out

    def couples_examples(self) -> bool:
        """Whether a backward pass seeded on one example (the first, then the last) reaches another
        example's input: a stage that acts on each example separately has exact zeros there. A cheap
        structural test (two vector-Jacobian products, no dense blocks), for :class:`hessinv.Chain` to
        call a traced module whole where one of its pieces is not per-example on its own."""
        B = self.batch
        for i in {0, B - 1} if B > 1 else ():
            s = self._b_out.new_zeros(B, self.d_out, 1)
            s[i] = 1.0
            gz = self.jzT(s)
            if bool((gz[torch.arange(B, device=gz.device) != i] != 0).any()):
                return True
        return False

    def _values(self) -> list[Tensor]:
        """The tensors the stage's module reads: its parameters (frozen too) and buffers as they are now,
        and the plain tensor attributes it had at the linearization (put back while the blocks form)."""
        return [*held_tensors([self.stage.module], plain=False), *self._plain]

    def _unchanged(self) -> None:
        now = self._values()
        if len(now) != len(self._state) or not all(
            a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.detach(), b)
            for a, b in zip(now, self._state, strict=False)
        ):
            raise InvalidArgumentError(
                f"{self.stage.name}: its parameters (frozen ones too), buffers or tensor attributes changed "
                "after this curvature was taken; take it again at the new point (hessinv.hessian(...) or "
                "hessinv.gauss_newton(...))"
            )
        if [t.requires_grad for t in self.stage.params] != self._flags:
            raise InvalidArgumentError(
                f"{self.stage.name}: a parameter was frozen or unfrozen (requires_grad) after this curvature "
                "was taken; take it again for the model as it is now"
            )
        if _hook_keys(m for m, _ in self._modes) != self._hooks:  # the blocks would be the hooked module's
            raise InvalidArgumentError(
                f"{self.stage.name}: hooks were added or removed after this curvature was taken; take it "
                "again for the model as it is now (hessinv.hessian(...) or hessinv.gauss_newton(...))"
            )
        if self._out is not None:
            self._fresh_graph()

    @property
    def dense(self) -> DenseBlocks:
        """The dense per-example blocks (formed on first use, at the linearization point)."""
        if self._dense_blocks is None:
            self._unchanged()
            with self._at_point():
                self._dense_blocks = self.stage.dense_blocks(self._z_in, self._b_out, self.second_order)
            self._out = self._z = self._g = None  # the graph is no longer needed
            self._linears, self._linear_calls, self._tables = [], [], []
        return self._dense_blocks

    @contextlib.contextmanager
    def _at_point(self) -> Iterator[None]:
        """The modules as they were at the linearization point (train/eval modes, plain attributes), put
        back as they are now afterwards."""
        now = [(m, m.training) for m, _ in self._modes]
        attrs = [(m, k, vars(m).get(k, MISSING)) for m, k, _ in self._attrs]
        try:
            for m, mode in self._modes:
                m.training = mode
            for m, k, v in self._attrs:
                vars(m)[k] = v
            yield
        finally:
            for m, mode in now:
                m.training = mode
            for m, k, v in attrs:
                if v is MISSING:
                    vars(m).pop(k, None)
                else:
                    vars(m)[k] = v

    def _graph_versions(self) -> list[int]:
        return [t._version for t in held_tensors([self.stage.module], plain=False)]

    def _fresh_graph(self) -> None:
        """Where the stage's parameters or buffers were written in place with the same values since (a
        ``load_state_dict`` of the same state; the trust region's trial step and its undo), autograd would
        refuse the kept graph: the stage is called again at the point (same values, modes, attributes)."""
        if self._graph_versions() == self._versions:
            return
        with self._at_point(), torch.enable_grad():
            self._out = self._call(self._z)
        self._g, self._memo, self._linears, self._linear_calls, self._tables = None, None, [], [], []
        self._versions = self._graph_versions()

    def _vjp(self, s: Tensor, which: str, own: Tensor | None = None) -> Tensor:
        """``Jx^T s`` (``which="x"``) or ``Jz^T s`` (``"z"``) for ``s`` (B, d_out, k); the other of the pair,
        formed by the same backward pass, is kept for the next call with the same ``s``. ``own``: where
        given, column ``q`` of ``s`` is nonzero at example ``own[q]`` only (:meth:`_vjp_per_example`)."""
        if self._memo is not None and self._memo[0] is s and self._memo[1] == which:
            out, self._memo = self._memo[2], None
            return out
        if self._dense_blocks is not None:
            return self._dense_blocks.jxT(s) if which == "x" else self._dense_blocks.jzT(s)
        B, k = self.batch, s.shape[-1]
        if k == 0:  # (no columns: a zero Gauss-Newton matrix's root)
            return s.new_zeros(self.p, 0) if which == "x" else s.new_zeros(B, self.d_in, 0)
        if self._table_only():  # (no graph: the products of a factorization kept after a step still run)
            return self._table_jxT(s) if which == "x" else s.new_zeros(B, 0, k)
        self._unchanged()
        pair = self._vjp_per_example(s, own)
        if pair is not None:
            gx, gz = pair
        else:
            wrt = [*self.stage.params, self._z]
            seeds = s.permute(2, 0, 1).reshape(k, *self._out.shape)
            rows = _backward_rows(self._out, wrt, k, lambda j, m: seeds[j : j + m], True)
            if rows is None:  # no batching rule for an operation in the stage: the dense blocks
                return self.dense.jxT(s) if which == "x" else self.dense.jzT(s)
            gx = torch.cat([g.reshape(k, -1) for g in rows[:-1]], 1).T if self.p else s.new_zeros(0, k)
            gz = rows[-1].reshape(k, B, self.d_in).permute(1, 2, 0)
        self._memo = (s, "z", gz) if which == "x" else (s, "x", gx)
        return gx if which == "x" else gz

    #: whether :meth:`_vjp_per_example` may run on this stage (False once its check failed)
    _per_example_ok = True

    #: a weak reference to the ``s`` last pulled back example by example (:meth:`kept_apart`; not the
    #: tensor itself: a stage's signal is B d_out k numbers, 587 MB kept on a segmentation net)
    _apart: weakref.ref | None = None

    def kept_apart(self, s: Tensor) -> bool:
        """Whether ``Jz^T s`` was formed example by example (and checked): each column then stays nonzero
        at its own example only, without a pass over the result to tell."""
        return self._apart is not None and self._apart() is s

    def _vjp_per_example(self, s: Tensor, own: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
        """``(Jx^T s, Jz^T s)`` where every column of ``s`` (B, d_out, k) is nonzero at one example at most
        -- the Gauss-Newton root's columns, one example's outputs each (a per-pixel or per-token loss: up
        to ``max_rank`` of them) -- by pulling each example's columns back through a graph of that example
        alone (:class:`_ExamplePulls`: all examples in one ``torch.func.vmap`` where the stage allows): ``k``
        backward passes of one example instead of ``k`` of the whole batch (a conv stage's 256 columns on
        8 examples of 32 x 32: 488 -> 30 ms). Valid where the stage treats its examples independently,
        which is checked: autograd's pull-back of one random combination of the columns through the
        batch's graph must agree to rounding (else this stage keeps the batch's graph from then on;
        likewise where the one-example forward raises, a stage that reads a tensor of the batch's size).
        None where it does not apply: one example, columns times per-example inputs and outputs below
        :data:`PER_EXAMPLE_MIN_WORK`, a column spanning examples, a module in training mode that holds
        buffers (a forward would move its running statistics), a forward hook (it would see ``B`` more
        calls)."""
        B, k = self.batch, s.shape[-1]
        if not self._one_example_calls(k):
            return None
        if own is not None and own.shape == (k,):  # (the caller knows: no pass over s)
            nz = own[None, :] == torch.arange(B, device=own.device)[:, None]
        else:
            nz = s.reshape(B, -1, k).any(1)  # (B, k): the examples each column touches
            if bool((nz.sum(0) > 1).any()):
                return None
        # each example's columns side by side, zero-padded to the most any example has, pulled back by
        # _ExamplePulls (every example at once under vmap, or one at a time; checked)
        cols = [nz[b].nonzero().squeeze(1) for b in range(B)]
        m = max(int(c.numel()) for c in cols)
        E = s.new_zeros(B, self.d_out, m)
        for b, c in enumerate(cols):
            E[b, :, : c.numel()] = s[b][:, c]
        pulls = _ExamplePulls(self)
        pulls.alone = True
        try:
            A, Z = pulls(E)
        except _MixesExamples:
            self._per_example_ok = False
            return None
        if not pulls.check():
            return None
        gx, gz = s.new_zeros(self.p, k), s.new_zeros(B, self.d_in, k)
        for b, c in enumerate(cols):
            gx[:, c] = A[b, :, : c.numel()]
            gz[b][:, c] = Z[b, :, : c.numel()]
        self._apart = weakref.ref(s)
        return gx, gz

    def _one_example_calls(self, k: int, examples: int | None = None) -> bool:
        """Whether ``k`` columns at each of ``examples`` (default: the batch's) are pulled back through
        graphs of one example each (:meth:`_example_graph`): not where they failed before, on one
        example, where the columns times the per-example inputs and outputs stay below
        :data:`PER_EXAMPLE_MIN_WORK` (the batch's graph is cheaper), where a module in training mode
        holds buffers (a forward would move its running statistics) or a forward hook is set (it would
        see ``B`` more calls)."""
        if not self._per_example_ok or self.batch < 2:
            return False
        if k * (self.d_in + self.d_out) * (examples or 1) < PER_EXAMPLE_MIN_WORK:
            return False
        if any(mode and any(True for _ in m.buffers(recurse=False)) for m, mode in self._modes):
            return False
        mods = [m for m, _ in self._modes]
        return not (_global_hooks() or any(m._forward_hooks or m._forward_pre_hooks for m in mods))

    def _example_graph(self, b: int, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
        """``(z_b, f(z_b))``: the stage called on example ``b`` alone, with its graph (under
        :meth:`_at_point` and ``enable_grad``). None, and no more one-example calls on this stage, where
        that call raises or gives another shape (a stage that reads a tensor of the batch's size)."""
        z_b, call = self.stage.differentiable_input(self._z_in[b : b + 1], dtype)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # (a std over the batch: of one example here)
                out_b = call(z_b)
        except Exception:  # noqa: BLE001 - a stage that cannot run on one example: the batch's graph
            out_b = None
        if not isinstance(out_b, Tensor) or out_b.shape != (1, *self._out.shape[1:]):
            self._per_example_ok = False
            return None
        return z_b, out_b

    #: jxT and jzT take ``own`` (:func:`hessinv.lowrank.gauss_newton_root` passes it)
    pulls_per_example = True

    def jxT(self, s: Tensor, own: Tensor | None = None) -> Tensor:
        return self._vjp(s, "x", own)

    def jzT(self, s: Tensor, own: Tensor | None = None) -> Tensor:
        return self._vjp(s, "z", own)

    # -- the other products, by autograd at the linearization point (the class docstring) ----------------
    def _graph(self) -> tuple[Tensor, list[Tensor]]:
        """``(u, g(u))``: ``u`` a leaf equal to the signal ``b``, ``g(u) = d <u, f> / d(x, z)`` with its graph
        (parameters first, then the input), built on first use."""
        if self._g is None:
            u = self._b_out.detach().reshape(self._out.shape).to(self._out.dtype).clone().requires_grad_(True)
            with torch.enable_grad():
                g = _grads((u * self._out).sum(), [*self.stage.params, self._z], create_graph=True)
            self._g = (u, g)
        return self._g

    def _split(self, v: Tensor | None, t: Tensor | None) -> list[Tensor | None]:
        """``v`` (p, k) and ``t`` (B, d_in, k) as seeds (k, *shape) of the parameters and the input."""
        seeds: list[Tensor | None] = []
        o = 0
        for q in self.stage.params:
            seeds.append(None if v is None else v[o : o + q.numel()].T.reshape(-1, *q.shape).to(q.dtype))
            o += q.numel()
        seeds.append(None if t is None else t.permute(2, 0, 1).reshape(-1, *self._z.shape).to(self._z.dtype))
        return seeds

    @staticmethod
    def _grad_k(
        outputs: list[Tensor], seeds: list[Tensor | None], inputs: list[Tensor], k: int
    ) -> list[Tensor]:
        """``d sum_o <seed_o[j], o> / d inputs`` for ``j < k``: (k, *input.shape) each, zeros where nothing
        reaches an input. One backward pass per column: a batched one (``is_grads_batched``) through the
        second-order graph was twice as slow as the loop on a CIFAR-shaped CNN (a review), and it took a
        parameter's unbatched zeros for a batch of ``k`` of them."""
        pairs = [(o, q) for o, q in zip(outputs, seeds, strict=True) if q is not None and o.requires_grad]
        if not pairs or k == 0:
            return [t.new_zeros(k, *t.shape) for t in inputs]
        outs, qs = [o for o, _ in pairs], [q for _, q in pairs]
        cols = []
        for j in range(k):
            gs = linalg.grad(
                outs, inputs, grad_outputs=[q[j] for q in qs], retain_graph=True, allow_unused=True,
                materialize_grads=True,
            )  # fmt: skip
            cols.append([g.to_dense() if g.is_sparse else g for g in gs])
        return [torch.stack(gs) for gs in zip(*cols, strict=True)]

    def _forward(self, v: Tensor | None, t: Tensor | None) -> Tensor:
        """``Jx v + Jz t`` (B, d_out, k), a None part zero: the derivative of ``<g(u), (v, t)>`` in ``u``."""
        k = (v if v is not None else t).shape[-1]  # type: ignore[union-attr]
        with self.stage._twice():  # (J v rests on the backward's derivative: a named refusal without it)
            u, g = self._graph()
            (out,) = self._grad_k(g, self._split(v, t), [u], k)
        return out.reshape(k, self.batch, self.d_out).permute(1, 2, 0)

    def _backward(
        self, s: Tensor | None, v: Tensor | None, t: Tensor | None, k: int
    ) -> tuple[Tensor, Tensor]:
        """``(Jx^T s + H(b)_x. (v, t), Jz^T s + H(b)_z. (v, t))`` ((p, k), (B, d_in, k)), a None part zero:
        the derivative of ``<s, f> + <g(b), (v, t)>`` in the parameters and the input."""
        outputs, seeds = (
            [self._out],
            [None if s is None else s.permute(2, 0, 1).reshape(-1, *self._out.shape)],
        )
        if self.second_order and (v is not None or t is not None):
            outputs += self._graph()[1]
            seeds += self._split(v, t)
        seeds = [None if q is None else q.to(o.dtype) for o, q in zip(outputs, seeds, strict=True)]
        with self.stage._twice():
            gs = self._grad_k(outputs, seeds, [*self.stage.params, self._z], k)
        x = torch.cat([g.reshape(k, -1) for g in gs[:-1]], 1).T if self.p else gs[-1].new_zeros(0, k)
        return x, gs[-1].reshape(k, self.batch, self.d_in).permute(1, 2, 0)

    def _ready(self, k: int = 1) -> bool:
        """Whether a product of ``k`` columns runs on the graph (else on the dense blocks): checked
        unchanged, and probed once (:meth:`probe`). Where ``k`` reaches ``(p + d_in) / 8`` -- the dense
        blocks cost ``p + d_in`` backward passes, batched, against two unbatched passes per column here
        (``to_dense``: an RNN's Hessian 6-9x slower on the graph, a review) -- and the blocks hold at most
        :data:`DENSE_SWITCH_ENTRIES` numbers, the dense blocks are formed and used from then on."""
        if self._dense_blocks is not None:
            return False
        if 8 * k >= self.p + self.d_in:
            size = self.stage.dense_fits(self.batch, self.d_in, self.d_out)[0]
            if size <= min(DENSE_SWITCH_ENTRIES, self.stage.MAX_BLOCK_ENTRIES):
                self.dense  # noqa: B018 - formed (checked unchanged there), kept for every later product
                return False
        self._unchanged()
        if not self._probed:
            self.probe()
        return True

    def probe(self) -> None:
        """Check, once, what the dense blocks' probe checks of a stage, on random vectors: its products
        finite (``F.normalize`` at 0: a :class:`NonFiniteError`); autograd's rounding in them, as their
        defect of linearity, within what the dense probe allows (cancellation: a LayerNorm over 2 features
        in float32); ``Jx^T s, Jz^T s`` differentiated out of the forward products (autograd's double
        backward) equal, entry by entry, to the first backward's -- a custom ``autograd.Function`` with
        ``@once_differentiable`` or prelu at exactly 0 fails it; and, with ``second_order``, ``W^T H(b) W``
        symmetric relative to its own entries (``weight_norm`` has no exact double backward) and no
        coupling of examples (the Riccati sweep's structure): each an :class:`UnsupportedStageError` as the
        dense probe gives. (Comparing inner products against the sum of their terms' sizes, as a first
        version did, let float32 errors of 60-100% through: random signs make a sum ~1/sqrt(N) of that.)
        Not for a stage of :data:`PROBE_FREE` layers alone (:func:`_probe_free`), which passes every check by
        construction (80% of building a CNN's Hessian). A refusal stands for every later product: the probe
        runs again (a failed probe once marked done let the next product run on the rows it had refused:
        25% off, a fuzzer's finding). Refusals that mean autograd cannot differentiate the stage's backward
        pass are :class:`NoDoubleBackward` (the Gauss-Newton products take its root instead; in float32 only
        where the double backward is missing: a disagreement there may be cancellation)."""
        self._probed = True
        try:
            self._probe_checks()
        except BaseException:
            self._probed = False
            raise

    def _probe_checks(self) -> None:
        """:meth:`probe`'s checks."""
        if _probe_free(self.stage.module):
            return
        B, p, d_in = self.batch, self.p, self.d_in
        gen = torch.Generator(device="cpu").manual_seed(4321 + self.stage.index)
        dt = self._out.dtype

        def rand(*shape: int) -> Tensor:
            return torch.randn(*shape, generator=gen, dtype=torch.float64).to(
                device=self._out.device, dtype=dt
            )

        v1, t1, s1 = rand(p, 1), rand(B, d_in, 1), rand(B, self.d_out, 1)
        v2, t2 = rand(p, 1), rand(B, d_in, 1)

        def fwd_(v: Tensor, t: Tensor | None) -> Tensor:
            return self._forward(v if p else None, t if d_in else None)

        def hess_(v: Tensor, t: Tensor | None) -> tuple[Tensor, Tensor]:
            return self._backward(None, v if p else None, t if d_in else None, 1)

        fwd, f2, f12 = fwd_(v1, t1), fwd_(v2, t2), fwd_(v1 + v2, t1 + t2)
        bx, bz = self._backward(s1, None, None, 1)
        checks = [fwd, f2, f12, bx, bz]
        if self.second_order:
            h1, h2, h12 = hess_(v1, t1), hess_(v2, t2), hess_(v1 + v2, t1 + t2)
            checks += [*h1, *h2, *h12]
        if not all(bool(torch.isfinite(c).all()) for c in checks):
            self.stage.not_finite("its products" + (" (second derivatives)" if self.second_order else ""))
        # autograd's own rounding in the products, as their defect of linearity: derivatives that are small
        # differences of large terms (a LayerNorm over 2 features in float32, inputs x10) are refused where
        # the dense probe refuses them -- rounding beyond 1e3 u sqrt(p + d_in) of the products, and (float64)
        # beyond sqrt(u64) -- and otherwise allowed for in the checks below (10x that rounding)
        eps = torch.finfo(dt).eps
        allowed = 1e3 * eps * (1 + p + d_in) ** 0.5
        if dt == torch.float64:
            allowed = max(allowed, _SQRT_U64)
        pairs = [(f12, fwd, f2)] + (
            [(h12[0], h1[0], h2[0]), (h12[1], h1[1], h2[1])] if self.second_order else []
        )
        noise = 0.0
        for c, a, b in pairs:
            if not c.numel():
                continue
            scale = max(float(a.abs().max()), float(b.abs().max()), float(c.abs().max()))
            defect = float((c - a - b).abs().max()) / max(scale, torch.finfo(dt).tiny)
            if defect > allowed:
                raise UnsupportedStageError(
                    f"{self.stage.name}: its derivatives are small differences of large terms (autograd's "
                    f"own products reproduce only to {defect:.1e} relative in {dt}, beyond the rounding "
                    f"they allow), so its products cannot be taken exactly; {_remedy(dt)}"
                )
            noise = max(noise, defect)
        # the forward products rest on autograd's double backward: J^T s differentiated out of them (one more
        # order), entry by entry against the first backward's -- a backward that is not differentiable
        # (@once_differentiable: zeros, or garbage in float32) or whose double backward differs from it
        # (prelu at exactly 0) fails it, as the dense blocks' first-order check fails them
        try:
            adj = self._adjoint_through_graph(s1)
        except RuntimeError as e:
            raise NoDoubleBackward(
                f"{self.stage.name}: autograd cannot differentiate its backward pass ({str(e).rstrip('.')}): "
                "its Jacobian and curvature cannot be taken; make the backward differentiable"
            ) from e
        ref = torch.cat([bx.reshape(-1), bz.reshape(-1)])
        tol = max(math.sqrt(eps) if dt == torch.float64 else 0.25, 10 * noise)
        scale = max(
            float(ref.abs().max()) if ref.numel() else 0.0, float(adj.abs().max()) if adj.numel() else 0.0
        )
        if adj.numel() and float((adj - ref).abs().max()) > tol * max(scale, torch.finfo(dt).tiny):
            # (as the dense blocks' check: float64, a backward autograd cannot differentiate; below it,
            # possibly cancellation, which the Gauss-Newton root would not escape)
            raise (NoDoubleBackward if dt == torch.float64 else UnsupportedStageError)(
                f"{self.stage.name}: autograd's derivatives of its backward pass disagree with the backward "
                f"pass itself beyond their rounding in {dt} (cancellation -- a saturated softmax, a "
                "LayerNorm over 2 features -- or an operation whose double backward differs from its "
                "backward, e.g. prelu at an input of exactly 0, or a backward not differentiable, e.g. "
                "@once_differentiable): its Jacobian and curvature cannot be taken exactly; move the inputs "
                f"off the kink (a nonzero initialization), make the backward differentiable, or {_remedy(dt)}"
            )
        if self.second_order:
            self.stage._check_by_differences(
                self._out, self._z_in, self._b_out.reshape(B, -1).to(dt),
                lambda v, t: fwd_(v, t).reshape(-1), hess_,  # (t is None where d_in = 0: both read None)
            )  # fmt: skip
            # W^T H W for two random directions, symmetric to its rounding relative to its own entries
            # (weight_norm's double backward is not exact: 10% asymmetric in float32)
            m12 = float((h1[0] * v2).sum() + (h1[1] * t2).sum())
            m21 = float((h2[0] * v1).sum() + (h2[1] * t1).sum())
            m11 = float((h1[0] * v1).sum() + (h1[1] * t1).sum())
            m22 = float((h2[0] * v2).sum() + (h2[1] * t2).sum())
            size = max(abs(m12), abs(m21), abs(m11), abs(m22), torch.finfo(dt).tiny)
            if abs(m12 - m21) > max(allowed, 10 * noise) * size:
                raise UnsupportedStageError(
                    f"{self.stage.name}: autograd's second derivatives of this stage are not symmetric "
                    f"beyond their rounding in {dt}: torch has no exact double backward for an operation in "
                    "it (e.g. weight_norm's _weight_norm), or they are small differences of large terms (a "
                    "saturated softmax); its Hessian cannot be taken exactly (the Gauss-Newton matrix can; "
                    f"or {_remedy(dt)})"
                )
            if self.couples_examples():
                raise mixing_error(self.stage.name, module=self.stage.module, z=self._z_in)

    def _adjoint_through_graph(self, s: Tensor) -> Tensor:
        """``(Jx^T s, Jz^T s)`` flattened, as the derivative in ``w`` of the forward product ``J w`` that
        :meth:`_forward` takes (autograd's double backward, differentiated once more)."""
        u, g = self._graph()
        ws = [torch.zeros_like(x, requires_grad=True) for x in g]
        pairs = [(gi, wi) for gi, wi in zip(g, ws, strict=True) if gi.requires_grad]
        if not pairs:
            return s.new_zeros(sum(w.numel() for w in ws))
        with torch.enable_grad():
            (f,) = linalg.grad(
                [gi for gi, _ in pairs], [u], grad_outputs=[wi for _, wi in pairs], retain_graph=True,
                create_graph=True, allow_unused=True, materialize_grads=True,
            )  # fmt: skip
            if not f.requires_grad:  # (J w does not depend on w: the double backward's rows are zeros)
                return s.new_zeros(sum(w.numel() for w in ws))
            out = linalg.grad(
                f, ws, grad_outputs=s[..., 0].reshape(f.shape).to(f.dtype), retain_graph=True,
                allow_unused=True, materialize_grads=True,
            )  # fmt: skip
        return torch.cat([o.reshape(-1) for o in out])

    def jx(self, v: Tensor) -> Tensor:
        if self._table_only():
            return self._table_jx(v)
        return self._forward(v, None) if self._ready(v.shape[-1]) else self.dense.jx(v)

    def _table_only(self) -> bool:
        """Whether ``Jx v`` comes from :meth:`_table_jx`: a stage on token ids whose table rows not read
        are left out (:meth:`_read_rows`), one lookup table in closed form or with ``J`` formed."""
        return self._read_rows() is not None and (self._shares is not None or self._J is not None)

    def _table_jx(self, v: Tensor) -> Tensor:
        """``Jx v`` (B, d_out, k) of a stage that is one lookup table (:meth:`_one_table`): ``(E^T (x) I_D)
        v`` on the rows read (:meth:`_table_shares`; the table is linear in its weight, ``padding_idx``'s
        row has no derivative) -- first derivatives only (an ``nn.EmbeddingBag`` has no double backward,
        on which the graph's ``J v`` rests)."""
        rows = self._read_rows()[0]  # type: ignore[index]
        k = v.shape[-1]
        if self._shares is None:  # (J = (Jx^T)[rows] formed: a bag's per_sample_weights)
            return (self._J.T.to(v.dtype) @ v[rows]).reshape(self.batch, self.d_out, k)  # type: ignore[union-attr]
        E, D = self._shares
        Vr = v[rows].reshape(E.shape[0], D * k)
        return (E.T.to(v.dtype) @ Vr).reshape(self.batch, self.d_out, k)

    def _table_jxT(self, s: Tensor) -> Tensor:
        """``Jx^T s`` (p, k) of a stage with :meth:`_table_jx`: its transpose, zero on the rows not read --
        closed form, without the graph (an optimizer applies a factorization after its step has moved
        the table: a pull-back through the graph is refused there, as stale)."""
        rows, k = self._read_rows()[0], s.shape[-1]  # type: ignore[index]
        out = s.new_zeros(self.p, k)
        if self._shares is None:
            out[rows] = self._J.to(s.dtype) @ s.reshape(-1, k)  # type: ignore[union-attr]
        else:
            E, D = self._shares
            out[rows] = (E.to(s.dtype) @ s.reshape(E.shape[1], D * k)).reshape(-1, k)
        return out

    def jz(self, t: Tensor) -> Tensor:
        return self._forward(None, t) if self._ready(t.shape[-1]) else self.dense.jz(t)

    def hvp_forward(self, t: Tensor | None, v: Tensor | None) -> Tensor | None:
        if t is None and v is None:
            return None
        if v is not None and self._table_only():  # (d_in = 0: t carries nothing)
            return self._table_jx(v)
        k = (v if v is not None else t).shape[-1]  # type: ignore[union-attr]
        return self._forward(v, t) if self._ready(k) else self.dense.hvp_forward(t, v)

    def hvp_backward(
        self, s: Tensor, v: Tensor | None, t: Tensor | None, need_s: bool = True
    ) -> tuple[Tensor | None, Tensor | None]:
        if not self._ready(s.shape[-1]):
            return self.dense.hvp_backward(s, v, t, need_s)
        x, z = self._backward(s, v, t, s.shape[-1])
        return (x if self.p else None), (z if need_s else None)

    def _second(self, v: Tensor | None, t: Tensor | None, k: int) -> tuple[Tensor, Tensor]:
        """``H(b) (v, t)``'s two parts; zero for Gauss-Newton."""
        if not self.second_order:
            ref = v if v is not None else t
            assert ref is not None
            return ref.new_zeros(self.p, k), ref.new_zeros(self.batch, self.d_in, k)
        if not self._ready(k):
            d = self.dense
            if v is not None:
                return d.hxx(v), d.hxzT(v)
            assert t is not None
            return d.hxz(t), d.hzz(t)
        return self._backward(None, v, t, k)

    def hxx(self, v: Tensor) -> Tensor:
        return self._second(v, None, v.shape[-1])[0]

    def hxz(self, t: Tensor) -> Tensor:
        return self._second(None, t, t.shape[-1])[0]

    def hxzT(self, v: Tensor) -> Tensor:
        return self._second(v, None, v.shape[-1])[1]

    def hzz(self, t: Tensor) -> Tensor:
        return self._second(None, t, t.shape[-1])[1]

    def riccati(self, Sigma: Tensor, coupled: bool = True) -> RiccatiBlocks:
        return self.dense.riccati(Sigma, coupled)

    # -- a lookup table's rows that no token reads (the pivot restricted to the rest) ------------------
    def _read_rows(self) -> tuple[Tensor, int, int] | None:
        """``(rows, fixed, read)`` for a stage on data (``d_in = 0``: token ids) that calls a lookup table
        (``nn.Embedding``, an ``nn.EmbeddingBag`` summing or averaging, once, on this batch's ids): the
        coordinates of its parameters outside which ``Jx`` and ``Hxx`` are zero -- all but the table rows
        no token reads (``padding_idx``'s too: autograd leaves it at zero) -- with their count outside the
        tables and in them; None where that leaves out fewer than half of the ``p`` (unless the stage is
        the table alone, whose pivot :meth:`_table_pivot` forms without the dense blocks), or where one
        random product ``Jx^T s + Hxx v`` is not zero outside them (the table read elsewhere too). On those
        coordinates the pivot ``Qxx = Jx^T Sigma Jx + Hxx + eps I`` is ``eps I`` (:meth:`riccati_native`)."""
        if "_rows" not in self.__dict__:  # (cached once found; not where finding it raised: a stale graph)
            self._rows: tuple[Tensor, int, int] | None = self._find_read_rows()
        return self._rows

    def _find_read_rows(self) -> tuple[Tensor, int, int] | None:
        """:meth:`_read_rows`, found (one pull-back through the graph)."""
        self._shares: tuple[Tensor, int] | None = None  # (E, D) where the closed form holds
        self._J: Tensor | None = None  # (Jx^T)[rows] where formed by pull-backs (read_jacobian)
        if self.d_in or not self.p or self._dense_blocks is not None:
            return None
        self._structured_linears()
        if not self._tables:
            return None
        dev = self._out.device
        keep = torch.ones(self.p, dtype=torch.bool, device=dev)
        offsets = [0]
        for q in self.stage.params:
            offsets.append(offsets[-1] + q.numel())
        in_tables, seen = 0, set()
        for wi, ids, _u, padding_idx, _bag in self._tables:
            V, D = self.stage.params[wi].shape
            if wi not in seen:  # (a table read more than once: the rows of every call)
                keep[offsets[wi] : offsets[wi + 1]] = False
                seen.add(wi)
                in_tables += V * D
            read = _read_mask(V, *_table_rows(ids.to(dev), padding_idx))
            keep[offsets[wi] : offsets[wi + 1]] |= read.repeat_interleave(D)
        rows = keep.nonzero().squeeze(1)
        if 2 * rows.numel() > self.p and not self._one_table():  # (pulled back: p columns at most)
            return None
        gen = torch.Generator(device="cpu").manual_seed(4321 + self.stage.index)
        dt = self._out.dtype
        s = torch.randn(self.batch, self.d_out, 1, generator=gen, dtype=torch.float64).to(dev, dt)
        v = (
            torch.randn(self.p, 1, generator=gen, dtype=torch.float64).to(dev, dt)
            if self.second_order
            else None
        )
        self._unchanged()
        g = self._backward(s, v, None, 1)[0]
        if bool((g[~keep] != 0).any()):
            return None
        if self._one_table():  # the closed form (E (x) I_D) s against autograd's pull-back of s
            E, D = self._table_shares()
            got, want = (E @ s.reshape(E.shape[1], D)).reshape(-1), g[rows, 0]
            tol = math.sqrt(torch.finfo(dt).eps) * max(
                float(want.abs().max()) if want.numel() else 0.0, 1e-300
            )
            if got.shape == want.shape and bool(((got - want).abs() <= tol).all()):
                self._shares = (E, D)
        return rows, self.p - in_tables, int(keep.sum()) - (self.p - in_tables)

    def pivot_order(self, batch: int) -> int:
        """``p``, or the coordinates a lookup table's tokens read (:meth:`_read_rows`; for fewer examples
        than the batch's, the table's share of them in proportion)."""
        found = self._read_rows()
        if found is None:
            return self.p
        rows, fixed, read = found
        return fixed + (read if batch >= self.batch else -(-read * batch // self.batch))

    def riccati_native(self, Sigma: Tensor, coupled: bool = True) -> RiccatiBlocks:
        """:meth:`riccati`, or -- a stage on token ids with table rows no token reads (:meth:`_read_rows`)
        -- the pivot in low-rank form (:attr:`RiccatiBlocks.lowrank` with ``U`` the unit columns of the
        ``r`` rows read): ``A = J Sigma J^T + Hxx[rows, rows]`` with ``J = (Jx^T)[rows]`` (r, B d_out), by
        ``B d_out`` pull-backs of unit signals (each one example's: :meth:`_vjp_per_example`) and, where
        ``Hxx`` is not zero, ``r`` second-order products; ``O(r a^2 + r^2 a)`` instead of the dense
        blocks' ``p`` columns (an ``Embedding(20000, 32)``: a 640000 x 640000 pivot refused)."""
        found = self._read_rows()
        if found is None:
            return self.riccati(Sigma, coupled)
        rows = found[0]
        A = self._table_pivot(Sigma)
        if A is None:
            A = self._pulled_pivot(Sigma, rows)
        A = 0.5 * (A + A.T)
        Qzz = A.new_zeros(self.batch, 0, self.batch, 0) if coupled else None
        return RiccatiBlocks(None, A.new_zeros(self.p, self.batch, 0), Qzz, lowrank=(rows, A, None, 0))

    def _table_shares(self) -> tuple[Tensor, int]:
        """``(E, D)`` of a stage that is one lookup table (:meth:`_one_table`): ``E`` (r_t, P) the share of
        each output position (a token, or an ``nn.EmbeddingBag``'s bag) that each row read takes -- ``Jx``
        is ``E^T (x) I_D`` in the rows read -- and the table's width ``D``."""
        _wi, ids, _u, padding_idx, bag = self._tables[0]
        (V, D), dev, dt = self.stage.params[0].shape, self._b_out.device, self._b_out.dtype
        flat, counted = _table_rows(ids.to(dev), padding_idx)
        read = _read_mask(V, flat, counted)
        rank = torch.cumsum(read.long(), 0) - 1  # (each row read: its place among them)
        P = flat.numel() if bag is None else self.batch
        pos = torch.arange(flat.numel(), device=dev) if bag is None else bag[0].to(dev)
        share = torch.ones_like(flat, dtype=dt) if bag is None else bag[1].to(dev, dt)
        E = torch.zeros(int(read.sum()), P, dtype=dt, device=dev)
        E.index_put_((rank[flat[counted]], pos[counted]), share[counted], accumulate=True)
        return E, D

    def _table_pivot(self, Sigma: Tensor) -> Tensor | None:
        """:meth:`riccati_native`'s ``A`` where the stage is one lookup table and returns its output
        (:meth:`_table_shares`: ``Jx = E^T (x) I_D``, ``Hxx = 0``): ``A = (E (x) I_D) Sigma (E (x) I_D)^T``,
        ``O(r a P)`` flops without a pull-back; None for any other stage."""
        if self._shares is None:
            return None
        E, D = self._shares
        r, P = E.shape
        T = (E @ Sigma.reshape(P, D * P * D)).view(r, D, P, D).permute(0, 1, 3, 2)  # [u, i, i', P']
        return (T.reshape(-1, P) @ E.T).view(r, D, D, r).permute(0, 1, 3, 2).reshape(r * D, r * D)

    def _one_table(self) -> bool:
        """Whether the stage is one lookup table whose output it returns (:meth:`_table_pivot`)."""
        one = len(self._tables) == 1 and len(self.stage.params) == 1
        return one and self._tables[0][2] is self._out

    def read_jacobian(self) -> Tensor:
        """``J = (Jx^T)[rows]`` (r, B d_out) on the rows of :meth:`_read_rows` (``Jx`` is zero outside them):
        ``E (x) I_D`` for a stage that is one table (:meth:`_table_shares`), else by ``B d_out`` pull-backs
        of unit signals (each one example's: :meth:`_vjp_per_example`)."""
        found = self._read_rows()
        assert found is not None, "read_jacobian: a stage without table rows left out"
        rows = found[0]
        if self._shares is not None:
            E, D = self._shares
            return torch.kron(E, torch.eye(D, dtype=E.dtype, device=E.device))
        if self._J is not None:
            return self._J
        like, r, a, p = self._b_out, rows.numel(), self.batch * self.d_out, self.p
        J = like.new_empty(r, a)
        step = max(1, min(a, 2**22 // max(p, 1)))  # (columns of p numbers each: 32 MiB in float64)
        for j0 in range(0, a, step):
            q = min(step, a - j0)
            S = like.new_zeros(a, q)
            S[j0 + torch.arange(q), torch.arange(q)] = 1
            own = torch.div(j0 + torch.arange(q, device=S.device), self.d_out, rounding_mode="floor")
            J[:, j0 : j0 + q] = self.jxT(S.view(self.batch, self.d_out, q), own)[rows]
        self._J = J
        return J

    def _pulled_pivot(self, Sigma: Tensor, rows: Tensor) -> Tensor:
        """:meth:`riccati_native`'s ``A`` for any stage: ``A = J Sigma J^T`` (:meth:`read_jacobian`), plus
        ``Hxx[rows, rows]`` by ``r`` second-order products where ``Hxx`` is not zero."""
        like, r, a, p = self._b_out, rows.numel(), self.batch * self.d_out, self.p
        J = self.read_jacobian()
        A = J @ (Sigma.reshape(a, a).to(J.dtype) @ J.T)
        if self._dense_blocks is not None:  # (formed for the pull-backs: the graph is gone)
            Hxx = self._dense_blocks.Hxx
            return A if Hxx is None else A + Hxx[rows][:, rows]
        if self._nonzero_second()[0]:
            for j0 in range(0, r, CHUNK):
                q = min(CHUNK, r - j0)
                V = like.new_zeros(p, q)
                V[rows[j0 : j0 + q], torch.arange(q)] = 1
                A[:, j0 : j0 + q] += self._backward(None, V, None, q)[0][rows]
        return A

    def curvature_diagonal(self, Sigma: Tensor, coupled: bool = True) -> tuple[Tensor, Tensor | None]:
        return self.dense.curvature_diagonal(Sigma, coupled)

    # -- the per-example diagonal sweep (hessinv.riccati.example_curvature_diagonal_sweep) --------------
    #: ``Hzz_n`` of every example is formed (``d_in`` double-backward passes) where it is not zero and
    #: the batch's blocks hold at most this many numbers; above, the stage does not take the per-example
    #: sweep
    EXAMPLE_HZZ_ENTRIES = 2**25

    @property
    def adds_example_curvature(self) -> bool:
        if self._dense_blocks is not None:
            return self._dense_blocks.adds_example_curvature
        return self._nonzero_second()[1]

    def keeps_examples_apart(self, first: bool = False) -> bool:
        """:meth:`Blocks.keeps_examples_apart`: where the dense blocks are formed, theirs; else where its
        ``Hzz_n``, if not zero and formed (not for the ``first`` stage), fit in :data:`EXAMPLE_HZZ_ENTRIES`
        numbers. Whether the stage really keeps its examples apart is checked on the pull-backs themselves
        (:class:`_ExamplePulls`)."""
        if self._dense_blocks is not None or first:
            return True
        return not (self._nonzero_second()[1] and self.batch * self.d_in**2 > self.EXAMPLE_HZZ_ENTRIES)

    def _nonzero_second(self) -> tuple[bool, bool]:
        """Whether ``Hxx`` and ``Hzz`` are nonzero: one product each with a random vector, which is exactly
        zero where they are (Gauss-Newton; a convolution, pooling, a normalization's affine weights)."""
        if "_nonzero" not in self.__dict__:
            self._nonzero = (False, False)
            if self.second_order:
                self._unchanged()
                gen = torch.Generator(device="cpu").manual_seed(1234 + self.stage.index)
                dt, dev = self._out.dtype, self._out.device
                v = torch.randn(self.p, 1, generator=gen, dtype=torch.float64).to(device=dev, dtype=dt)
                t = torch.randn(self.batch, self.d_in, 1, generator=gen, dtype=torch.float64).to(dev, dt)
                self._nonzero = (
                    bool(self.p) and bool((self._backward(None, v, None, 1)[0] != 0).any()),
                    bool(self.d_in) and bool((self._backward(None, None, t, 1)[1] != 0).any()),
                )
        return self._nonzero

    def _second_parts(self, need_zz: bool = True) -> tuple[Tensor | None, Tensor | None] | None:
        """``(diag(Hxx), Hzz)`` -- the batch's ``Hxx`` diagonal (p,) and the examples' ``Hzz_n`` (B, d_in,
        d_in), each None where zero (:meth:`_nonzero_second`) or, ``Hzz``, not asked for (``need_zz``
        False: the sweep's first stage, whose input is data) -- each formed once by second-derivative
        columns (:meth:`_hxx_diagonal`, :meth:`_second_columns`; ``Hzz_n`` all at once: the stage keeps
        examples apart, so a unit vector at every example gives each example's column). None where
        ``Hzz_n`` would hold over :data:`EXAMPLE_HZZ_ENTRIES` numbers."""
        xx, zz = self._nonzero_second()
        zz = zz and need_zz
        if zz and self.batch * self.d_in**2 > self.EXAMPLE_HZZ_ENTRIES:
            return None
        if "_hxx_diag" not in self.__dict__:
            self._hxx_diag = self._hxx_diagonal() if xx else None
        if zz and "_hzz" not in self.__dict__:
            B, d = self.batch, self.d_in
            hzz = self._b_out.new_empty(B, d, d)

            def seeds(j0: int, q: int) -> Tensor:  # (e_j at every example)
                T = hzz.new_zeros(q, B, d)
                T[torch.arange(q), :, j0 + torch.arange(q)] = 1
                return T

            def keep(j0: int, R: Tensor) -> None:
                hzz[:, :, j0 : j0 + R.shape[0]] = R.reshape(-1, B, d).permute(1, 2, 0)

            self._second_columns(self._graph()[1][-1], self._z, d, seeds, keep)
            self._hzz = 0.5 * (hzz + hzz.mT)
        return self._hxx_diag, (self.__dict__.get("_hzz") if zz else None)

    def _self_blocks(self) -> list[bool]:
        """For each parameter tensor ``W`` of the stage, whether its diagonal block ``H_WW = d g_W / dW`` of
        ``Hxx`` is nonzero: one product ``H_WW v`` with a random ``v`` each, which is exactly zero where
        ``f`` is linear in ``W`` with the rest held (a convolution's or linear layer's weight followed by
        piecewise-linear functions and affine ones only, a normalization's affine weights at the stage's
        end, BatchNorm in eval mode: every tensor of a ResNet block), and then ``diag(H_WW)`` is zero
        without a column of it formed."""
        if "_self_nonzero" not in self.__dict__:
            self._unchanged()  # (as a product: the point checked, the kept graph fresh)
            gen = torch.Generator(device="cpu").manual_seed(2345 + self.stage.index)
            g = self._graph()[1]
            nonzero = []
            with self.stage._twice():
                for W, gW in zip(self.stage.params, g[:-1], strict=True):
                    v = torch.randn(W.shape, generator=gen, dtype=torch.float64).to(gW)
                    nonzero.append(bool(W.numel()) and bool(_grads(gW, [W], seed=v)[0].ne(0).any()))
            self._self_nonzero = nonzero
        return self._self_nonzero

    def _hxx_diagonal(self) -> Tensor:
        """``diag(Hxx)`` (p,), tensor by tensor: for each parameter tensor ``W`` with a nonzero diagonal
        block (:meth:`_self_blocks`), ``diag(H_WW)`` from its ``n_W`` columns ``H_WW e_j = d <g_W, e_j> /
        dW`` (:meth:`_second_columns`) -- the double backward of ``g_W`` alone to ``W`` alone, not of all
        of ``g`` to every parameter and the input (a 2-layer transformer encoder's 17k parameters at batch
        8: 2.9 ms a column so, 0.9 ms cut to ``W``, 0.5 ms batched). ``sum_W n_W <= p`` double-backward
        columns in all: the exact diagonal of a stage's second-order term has no cheaper autograd form
        (each column costs a few forward passes of the stage)."""
        g = self._graph()[1]
        hxx = self._b_out.new_zeros(self.p)
        o = 0
        for W, gW, nonzero in zip(self.stage.params, g[:-1], self._self_blocks(), strict=True):
            n = W.numel()
            if nonzero:

                def seeds(j0: int, q: int, n: int = n, like: Tensor = gW) -> Tensor:
                    return _unit_rows(j0, q, n, like).reshape(q, *like.shape)

                def keep(j0: int, R: Tensor, n: int = n, o: int = o) -> None:
                    q = R.shape[0]
                    hxx[o + j0 : o + j0 + q] = R.reshape(q, n)[torch.arange(q), j0 + torch.arange(q)]

                self._second_columns(gW, W, n, seeds, keep)
            o += n
        return hxx

    #: whether :meth:`_second_columns` batches its columns (False once a batched pass failed outright)
    _batched_second = True

    def _second_columns(
        self, out: Tensor, wrt: Tensor, n: int, seeds: Callable[[int, int], Tensor], keep: Callable
    ) -> None:
        """The columns ``R_j = d <E_j, out> / d wrt`` for ``j < n`` -- ``out`` a part of ``g(b)``
        (:meth:`_graph`), ``wrt`` a parameter or the input, ``E = seeds(j0, q)`` (q, *out.shape) -- handed
        to ``keep(j0, R)`` (R: (q, *wrt.shape)) a chunk of ``q`` at a time: one vmapped double-backward
        pass per chunk (``is_grads_batched``: plain autograd's backward formulas, run under vmap), accepted
        where ``sum_j c_j R_j`` over all ``n`` columns (a random ``c``) reproduces, entry by entry to
        ``1e3 u`` of ``sum_j |c_j| |R_j|`` (plus a tenth of its largest entry), the unbatched pass of
        ``sum_j c_j E_j`` (one pass more per call); else every column again one
        pass each (``keep`` overwrites: columns that are rounding alone, as a key bias's under a softmax
        that ignores it, differ batched and not), and so from then on for this stage where a batched pass
        fails (an operation without a batching rule). ``q``: about :data:`SECOND_CHUNK_ENTRIES` over the
        batch's inputs and outputs, kept within ``8 .. CHUNK`` (a transformer encoder's columns 20-30%
        faster at ``q B ~ 128-256`` than at 128 columns a chunk: vmap's ``q`` copies of the stage's
        intermediates stay in cache), and at most :data:`EXAMPLE_PULL_ENTRIES` over them (memory)."""
        per = max(1, self.batch * (self.d_in + self.d_out) + wrt.numel())
        step = max(1, min(CHUNK, max(8, SECOND_CHUNK_ENTRIES // per), EXAMPLE_PULL_ENTRIES // per))
        gen = torch.Generator(device="cpu").manual_seed(3456 + self.stage.index)
        with self.stage._twice():
            if self._batched_second and n > 1:
                batched = True
                seed, comb = out.new_zeros(out.shape), wrt.new_zeros(wrt.shape, dtype=out.dtype)
                bound = torch.zeros_like(comb)  # (sum_j |c_j| |R_j|, entry by entry)
                for j0 in range(0, n, step):
                    q = min(step, n - j0)
                    E = seeds(j0, q).reshape(q, *out.shape).to(out.dtype)
                    try:
                        got = _backward_rows(out, [wrt], q, lambda j, k, E=E: E[j : j + k], True)
                    except TooLargeError:  # (vmap's q copies of the stage's intermediates: one at a time)
                        got = None
                    if got is None:
                        batched = self._batched_second = False
                        break
                    R = got[0].to(out.dtype)
                    c = torch.randn(q, generator=gen, dtype=torch.float64).to(out)  # (out's device too)
                    seed += torch.tensordot(c, E, 1)
                    comb += torch.tensordot(c, R, 1)
                    bound += torch.tensordot(c.abs(), R.abs(), 1)
                    keep(j0, R.to(self._b_out.dtype))
                if batched and comb.numel():
                    # entry by entry, against the sum's own size with a floor of a tenth of the largest (the
                    # passes' rounding, relative to the intermediates): one entry 10% off is caught in
                    # float32 too, where a bound relative to the block's largest entry let it through
                    ref = _grads(out, [wrt], seed=seed)[0]
                    tol = 1e3 * torch.finfo(out.dtype).eps * (bound + 0.1 * bound.max())
                    batched = bool(((comb - ref).abs() <= tol).all())
                if batched:
                    return
            for j0 in range(0, n, step):
                q = min(step, n - j0)
                E = seeds(j0, q).reshape(q, *out.shape).to(out.dtype)
                R = _backward_rows(out, [wrt], q, lambda j, k, E=E: E[j : j + k], False)
                assert R is not None
                keep(j0, R[0].to(self._b_out.dtype))

    def _dense_for_second(self) -> bool:
        """Whether the per-example sweep takes this stage's dense blocks -- ``p + d_in`` passes, batched --
        rather than ``diag(Hxx)`` and ``Hzz_n`` by their columns (:meth:`_second_parts`): where either is
        not zero and the blocks hold at most :data:`DENSE_SWITCH_ENTRIES` numbers (a transformer layer on 8
        examples: 3.6 s one product at a time, 1.5 s through the blocks; a smaller one, p = 2224, 0.83 s
        through the blocks and 0.37 s by the columns of :meth:`_hxx_diagonal`; the blocks, once formed,
        serve the stage's later products too)."""
        if not any(self._nonzero_second()):
            return False
        size = self.stage.dense_fits(self.batch, self.d_in, self.d_out)[0]
        return size <= min(DENSE_SWITCH_ENTRIES, self.stage.MAX_BLOCK_ENTRIES)

    def example_sweep_passes(self, dense: bool, first: bool) -> int:
        """What this stage's part of the per-example diagonal sweep costs, in backward passes of the batch
        (:func:`hessinv.riccati.example_sweep_pulls`): ``2 d_out + d_in`` pull-backs of each example where
        ``P`` is ``dense`` (``d_in`` not for the ``first`` stage), and the columns that form ``diag(Hxx)``
        (those of the parameter tensors with a nonzero diagonal block: :meth:`_hxx_diagonal`) and ``Hzz_n``
        where they are not zero."""
        if self._dense_blocks is not None or self._dense_for_second():
            return (self.p + self.d_in) // CHUNK if self._dense_blocks is None else 0
        xx, zz = self._nonzero_second()
        inputs = 0 if first else self.d_in
        if xx:
            cols = sum(W.numel() for W, nz in zip(self.stage.params, self._self_blocks(), strict=True) if nz)
        else:
            cols = 0
        return (2 * self.d_out + inputs if dense else 0) + cols + (inputs if zz else 0)

    def example_curvature_diagonal(
        self,
        P: ExampleCurvature,
        coupled: bool = True,
        only_diagonal: bool = False,
        rows: slice = slice(None),
    ) -> tuple[Tensor, ExampleCurvature | None] | None:
        """:meth:`Blocks.example_curvature_diagonal` by :func:`example_pass` on the examples' pull-backs
        (:class:`_ExamplePulls`); None where those reach other examples (the stage mixes them)."""
        if self._dense_blocks is None and self._dense_for_second():
            self.dense  # noqa: B018 - formed (p + d_in batched passes), Hxx and Hzz_n with them
        if self._dense_blocks is not None:
            return self._dense_blocks.example_curvature_diagonal(P, coupled, only_diagonal, rows)
        if rows.indices(self.batch)[0] == 0:  # (a sweep's first examples: the point checked, as products do;
            self._unchanged()  # the kept graph called again after a same-value write, a trust region's undo)
        if coupled or self._nonzero_second()[0]:
            parts = self._second_parts(need_zz=coupled)  # (the first stage: no Hzz_n, its input is data)
            assert parts is not None  # (keeps_examples_apart)
            hxx, hzz = parts
        else:
            hxx = hzz = None
        start, stop, _ = rows.indices(self.batch)
        hxx = hxx if start == 0 else None
        hzz = None if hzz is None else hzz[start:stop]
        if start == 0 or self._pulls is None:  # (a new sweep: its examples come in order)
            self._pulls = _ExamplePulls(self)
        pulls = self._pulls
        pulls.start, pulls.stop = start, stop
        try:
            got = example_pass(P, pulls, self.p, self.d_in, hxx, hzz, coupled, only_diagonal)
        except _MixesExamples:
            got = None
        if got is None or stop == self.batch:
            self._pulls = None
            if got is not None and not pulls.check():
                return None  # (the sweep again, through the batch's graph: _per_example_ok is False now)
        return got

    #: the pull-backs of the sweep under way (its check is of every example's, at the last)
    _pulls: _ExamplePulls | None = None


class _MixesExamples(Exception):
    """A pull-back of columns at one example reached another example's input."""


class _ExamplePulls:
    """``E -> (Jx_n^T E_n, Jz_n^T E_n)`` for the examples ``start .. stop - 1`` of a :class:`LazyBlocks`
    (the ``pull`` of :func:`example_pass`; a sweep sets them, a few examples at a time): each example's
    columns through a graph of that example alone (:meth:`LazyBlocks._example_graph`, kept for the call)
    where the stage allows it (:meth:`LazyBlocks._one_example_calls`) -- checked by :meth:`check` at the
    sweep's end: one random combination of every column pulled so, against autograd's pull-back through
    the batch's graph -- else through the batch's graph with seeds at that example, whose pull-back to
    the other examples' inputs must be exactly zero (else :class:`_MixesExamples`)."""

    def __init__(self, blk: LazyBlocks):
        self.blk, self.start, self.stop = blk, 0, blk.batch
        self.graphs: dict[int, tuple[Tensor, Tensor]] = {}
        self.gen = torch.Generator().manual_seed(0)
        self.alone: bool | None = None  # (decided at the first call, by its columns)
        self.vmap_ok = True  # (all examples at once: _vmapped)
        self.seed: Tensor | None = None  # (B, d_out): the check's combination of the columns pulled alone
        self.got_x: Tensor | None = None
        self.got_z: Tensor | None = None
        self.sq = 0.0

    def __call__(self, E: Tensor | tuple[int, int]) -> tuple[Tensor, Tensor]:
        blk, k = self.blk, self.stop - self.start
        dt = blk._b_out.dtype if isinstance(E, tuple) else E.dtype
        m = E[1] - E[0] if isinstance(E, tuple) else E.shape[-1]
        if self.alone is None:
            self.alone = blk._one_example_calls(m, blk.batch)
        self.graphs = {b: g for b, g in self.graphs.items() if self.start <= b < self.stop}
        A = blk._b_out.new_zeros(k, blk.p, m, dtype=dt)
        Z = blk._b_out.new_zeros(k, blk.d_in, m, dtype=dt)
        blk._unchanged()
        devices = [A.device] if A.device.type == "cuda" else []
        # (a random forward -- a module in training mode -- draws nothing from the caller's generator)
        with torch.random.fork_rng(devices=devices), blk._at_point(), torch.enable_grad():
            if self.alone and self._vmapped(E, A, Z):
                return A, Z
            if not self.alone:
                self._through_batch_all(E, A, Z)
                return A, Z
            for i in range(k):
                b = self.start + i
                if isinstance(E, tuple):
                    cols = A.new_zeros(blk.d_out, m)
                    cols[E[0] + torch.arange(m), torch.arange(m)] = 1
                else:
                    cols = E[i]
                if not self._alone(b, cols, A[i], Z[i]):  # (no one-example graph: the rest, the batch's)
                    self._through_batch_all(E, A, Z, i)
                    break
        return A, Z

    def _alone(self, b: int, cols: Tensor, A: Tensor, Z: Tensor) -> bool:
        """Example ``b``'s columns through its own graph, into ``A`` and ``Z``; False where that graph
        cannot be had (then no more of them)."""
        blk = self.blk
        graph = self.graphs.get(b)
        if graph is None:
            graph = blk._example_graph(b, cols.dtype)
            if graph is None:
                self.alone = False
                return False
            self.graphs[b] = graph
        z_b, out_b = graph
        m = cols.shape[-1]
        seeds = cols.T.reshape(m, *out_b.shape).to(out_b.dtype)
        got = _backward_rows(out_b, [*blk.stage.params, z_b], m, lambda j, n: seeds[j : j + n], True)
        if got is None:  # (no batching rule: the batch's graph has none either)
            self.alone = blk._per_example_ok = False
            return False
        if blk.p:
            A.copy_(torch.cat([g.reshape(m, -1) for g in got[:-1]], 1).T)
        Z.copy_(got[-1].reshape(m, blk.d_in).T)
        self._record(b, cols[None], A[None], Z[None])
        return True

    def _record(self, b0: int, C: Tensor, A: Tensor, Z: Tensor) -> None:
        """Add the examples ``b0 ..``'s columns ``C`` (k, d_out, m) and their pull-backs ``A``, ``Z`` to
        :meth:`check`'s random combination."""
        blk, k = self.blk, C.shape[0]
        c = torch.randn(k, C.shape[-1], generator=self.gen, dtype=torch.float64).to(C.device, C.dtype)
        if self.seed is None or self.got_x is None or self.got_z is None:
            self.seed = C.new_zeros(blk.batch, blk.d_out)
            self.got_x, self.got_z = C.new_zeros(blk.p), C.new_zeros(blk.batch, blk.d_in)
        self.seed[b0 : b0 + k] += torch.einsum("kom,km->ko", C, c)
        self.got_x += torch.einsum("kpm,km->p", A, c)
        self.got_z[b0 : b0 + k] += torch.einsum("kim,km->ki", Z, c)
        self.sq += float(((A.square().sum((1, 2)) + Z.square().sum((1, 2))) * c.square().sum(1)).sum())

    def _vmapped(self, E: Tensor | tuple[int, int], A: Tensor, Z: Tensor) -> bool:
        """Every example's columns at once, into ``A`` and ``Z``: ``torch.func.vmap`` over the examples of
        the vector-Jacobian products of the stage called on one example (first derivatives only, where
        ``torch.func`` is plain autograd's), examples a chunk at a time; recorded for :meth:`check` as the
        one-example pull-backs are. False -- and from then on one example at a time -- where the stage
        does not run so (its parameters not all its module's own, an operation without a batching rule,
        a data-dependent branch)."""
        blk = self.blk
        module = blk.stage.module
        if not self.vmap_ok or not isinstance(module, nn.Module):
            return False
        if "torch._dynamo" not in sys.modules and _LOOPED[0] + A.shape[0] < VMAP_AFTER_CALLS:
            _LOOPED[0] += A.shape[0]  # (the loop below takes them)
            return False
        names = {id(t): name for name, t in module.named_parameters(remove_duplicate=False)}
        if any(id(t) not in names for t in blk.stage.params):
            self.vmap_ok = False
            return False
        keys = [names[id(t)] for t in blk.stage.params]
        k, m = A.shape[0], A.shape[-1]
        dt = A.dtype
        z_all = blk._z_in[self.start : self.stop]
        floating = z_all.is_floating_point()
        if floating:
            z_all = z_all.to(dt)
        values = tuple(t.detach() for t in blk.stage.params)
        out_shape = tuple(blk._out.shape[1:])

        def f(ps: tuple[Tensor, ...], z: Tensor) -> Tensor:
            with exact_attention(), dense_lookup_grads(module):
                named = dict(zip(keys, ps, strict=True))
                return torch.func.functional_call(module, named, (z[None].clone(),))[0]

        def one(z: Tensor, cols: Tensor) -> tuple[tuple[Tensor, ...], Tensor | None]:
            if floating:
                _, vjp = torch.func.vjp(f, values, z)
                gp, gz = torch.func.vmap(vjp)(cols)
                return gp, gz
            _, vjp = torch.func.vjp(lambda ps: f(ps, z), values)
            (gp,) = torch.func.vmap(vjp)(cols)
            return gp, None

        step = max(1, EXAMPLE_PULL_ENTRIES // max(1, m * (blk.p + blk.d_in + blk.d_out)))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for i0 in range(0, k, step):
                    i1 = min(k, i0 + step)
                    if isinstance(E, tuple):
                        cols = A.new_zeros(i1 - i0, m, blk.d_out)
                        cols[:, torch.arange(m), E[0] + torch.arange(m)] = 1
                    else:
                        cols = E[i0:i1].mT
                    cols = cols.reshape(i1 - i0, m, *out_shape).to(blk._out.dtype)
                    gp, gz = torch.func.vmap(one)(z_all[i0:i1], cols)
                    if blk.p:
                        A[i0:i1] = torch.cat([g.reshape(i1 - i0, m, -1) for g in gp], -1).mT
                    if gz is not None:
                        Z[i0:i1] = gz.reshape(i1 - i0, m, blk.d_in).mT
        except Exception:  # noqa: BLE001 - no batching rule, a data-dependent branch: one at a time
            self.vmap_ok = False
            return False
        if isinstance(E, tuple):
            C = A.new_zeros(k, blk.d_out, m)
            C[:, E[0] + torch.arange(m), torch.arange(m)] = 1
        else:
            C = E
        self._record(self.start, C, A, Z)
        return True

    def _through_batch_all(self, E: Tensor | tuple[int, int], A: Tensor, Z: Tensor, i0: int = 0) -> None:
        """The columns of examples ``i0 ..`` (of this call's) through the batch's graph (seeds zero at the
        other examples), as many per batched backward pass as keep its seeds within
        :data:`EXAMPLE_PULL_ENTRIES` numbers (one example's columns a pass cost a small stage's sweep 10x
        BackPACK's time); a pull-back that reaches another example's input raises :class:`_MixesExamples`."""
        blk = self.blk
        k, m = A.shape[0], A.shape[-1]
        wrt = [*blk.stage.params, blk._z]
        if isinstance(E, tuple):
            C = A.new_zeros(k, m, blk.d_out)
            C[:, torch.arange(m), E[0] + torch.arange(m)] = 1
        else:
            C = E.mT
        C = C.reshape(k * m, blk.d_out)
        own = self.start + torch.arange(k, device=A.device).repeat_interleave(m)  # (each column's example)
        step = max(1, EXAMPLE_PULL_ENTRIES // max(1, blk.batch * (blk.d_out + blk.d_in)))
        for c0 in range(i0 * m, k * m, step):
            q = min(step, k * m - c0)
            rows = torch.arange(q, device=A.device)
            b = own[c0 : c0 + q]
            seeds = C.new_zeros(q, blk.batch, blk.d_out)
            seeds[rows, b] = C[c0 : c0 + q]
            seeds = seeds.reshape(q, *blk._out.shape).to(blk._out.dtype)
            got = _backward_rows(blk._out, wrt, q, lambda j, n, e=seeds: e[j : j + n], True)
            if got is None:  # (no batching rule: a pass per column)
                got = _backward_rows(blk._out, wrt, q, lambda j, n, e=seeds: e[j : j + n], False)
                assert got is not None
            gz = got[-1].reshape(q, blk.batch, blk.d_in).to(Z.dtype)
            mine = gz[rows, b]  # (q, d_in)
            gz[rows, b] = 0
            if bool(gz.ne(0).any()):
                raise _MixesExamples
            i, r = (
                (torch.arange(c0, c0 + q, device=A.device) // m),
                (torch.arange(c0, c0 + q, device=A.device) % m),
            )
            if blk.p:
                A[i, :, r] = torch.cat([g.reshape(q, -1) for g in got[:-1]], 1).to(A.dtype)
            Z[i, :, r] = mine

    def check(self) -> bool:
        """Whether the one-example pull-backs agree with the batch's graph to rounding (their random
        combination, as :meth:`LazyBlocks._vjp_per_example` checks its own); False -- and no more
        one-example calls on the stage -- where not."""
        if self.seed is None or self.got_x is None or self.got_z is None:
            return True
        blk = self.blk
        with torch.enable_grad():
            full = linalg.grad(
                blk._out, [*blk.stage.params, blk._z], grad_outputs=self.seed.reshape(blk._out.shape).to(
                    blk._out.dtype), retain_graph=True, allow_unused=True, materialize_grads=True,
            )  # fmt: skip
        want = torch.cat([g.reshape(-1) for g in full[:-1]] + [full[-1].reshape(-1)]).to(self.seed.dtype)
        err = float((want - torch.cat([self.got_x, self.got_z.reshape(-1)])).norm())
        if err <= 64 * torch.finfo(self.seed.dtype).eps * math.sqrt(self.sq):
            return True
        blk._per_example_ok = False
        return False


class ReshapeStage(Stage):
    """``Identity`` and ``Flatten``: a no-op on per-example flattened activations (``Jz = I``)."""

    def __init__(self, index: int, module: nn.Module):
        self.index, self.modules, self.module, self.params = index, (module,), module, []

    def forward(self, z: Tensor) -> Tensor:
        return self.module(z)

    def linearize(self, z_in: Tensor, b_out: Tensor, second_order: bool) -> Blocks:
        return IdentityBlocks(z_in.shape[0], b_out.shape[1])


class IdentityBlocks(ParameterFreeBlocks):
    """Blocks of ``z_out = z_in``: ``Jz = I``, no parameters, no curvature."""

    per_example = True
    reads_diagonal = True
    adds_example_curvature = False

    def __init__(self, batch: int, d: int):
        self.batch, self.d_in, self.d_out, self.p = batch, d, d, 0

    def jz(self, t: Tensor) -> Tensor:
        return t

    jzT = jz

    def hzz(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def riccati(self, Sigma: Tensor, coupled: bool = True) -> RiccatiBlocks:
        empty = Sigma.new_zeros(0, 0)
        return RiccatiBlocks(empty, Sigma.new_zeros(0, self.batch, self.d_in), Sigma if coupled else None)

    def example_curvature_diagonal(
        self,
        P: ExampleCurvature,
        coupled: bool = True,
        only_diagonal: bool = False,
        rows: slice = slice(None),
    ) -> tuple[Tensor, ExampleCurvature | None]:
        """:meth:`Blocks.example_curvature_diagonal`: ``P_{l-1} = P_l`` (its diagonal where asked)."""
        none = (P[0] if isinstance(P, tuple) else P).new_zeros(0)
        if not coupled:
            return none, None
        return none, example_diagonal(P) if only_diagonal else P


MISSING = object()


def mixing_error(
    name: str, what: str = "derivatives", module: Any = None, z: Tensor | None = None
) -> UnsupportedStageError:
    """The refusal of a stage whose ``what`` couple different examples of the batch (a batch-mixing op,
    or one that moves the batch axis for a later one to move back: a piece of a forward no chain as
    written); with the stage's ``module`` and input ``z``, the cause named where it is a convolution
    called without a batch axis (:func:`_unbatched_convolution`)."""
    unbatched = _unbatched_convolution(module, z)
    if unbatched is not None:
        conv, shape = type(unbatched[0]).__name__, unbatched[1]
        return UnsupportedStageError(
            f"{name} mixes examples: its {conv} is given inputs of shape {shape} (batch first), which "
            f"torch reads as ONE example without a batch axis whose {shape[0]} channels are the batch's "
            "examples, so the convolution adds examples together; give it (batch, channels, ...) inputs: "
            f"x.unsqueeze(1) for one channel, and {conv}(1, ...) or the channels the data has"
        )
    return UnsupportedStageError(
        f"{name} mixes examples: its {what} couple different examples of the batch{MOVED_AXIS}"
    )


#: :func:`mixing_error`'s other cause, a piece of a forward (and its fix); :func:`mixing_too` replaces it
MOVED_AXIS = (
    " (or it moves the batch axis, as x.t() does, for a later op to move back: pass nn.Sequential(model) to "
    "call the model whole)"
)


def mixing_too(error: UnsupportedStageError, module: nn.Module) -> UnsupportedStageError:
    """:func:`mixing_error` of a piece of ``module`` once ``module`` called whole mixed examples too: the
    advice to call it whole is spent -- its examples interact."""
    # (this stage's MOVED_AXIS, or the prefix refusal's own wording of that advice: spent either way)
    spent = re.sub(r" \((?:or|if) it moves the batch axis.*?call the model whole\)", "", str(error))
    return UnsupportedStageError(
        spent
        + f"; called whole, {type(module).__name__} mixes them too: the batch's examples interact in it (a "
        "statistic or an attention across the batch), so its curvature has no per-example chain to factor; "
        "compute it per example (BatchNorm in eval mode, a LayerNorm, statistics over the features)"
    )


def _unbatched_convolution(module: Any, z: Tensor | None) -> tuple[nn.Module, tuple[int, ...]] | None:
    """The convolution of ``module`` that ``module(z)`` (``z`` batch first) calls as an unbatched call --
    an input with one axis more than its kernel (``(B, L)`` for a ``Conv1d``) and ``in_channels`` equal to
    the batch size, which torch then requires -- seen by running ``module`` once with hooks on its
    convolutions (buffers put back after), and the shape it got; else None. (Comparing shapes alone
    blamed a convolution that the module fed a channel axis itself; looking only at a Sequential's first
    layer missed one inside a module's own forward: two reviews.)"""
    if not isinstance(module, nn.Module) or z is None or z.dim() < 2:
        return None
    B = z.shape[0]
    convs = [m for m in module.modules() if isinstance(m, nn.modules.conv._ConvNd) and m.in_channels == B]
    if not convs:
        return None
    found: list[tuple[nn.Module, tuple[int, ...]]] = []

    def seen(m: nn.Module, args: tuple) -> None:
        x = args[0] if args else None
        if not found and isinstance(x, Tensor) and x.dim() == len(m.kernel_size) + 1:
            found.append((m, tuple(x.shape)))

    handles = [c.register_forward_pre_hook(seen) for c in convs]
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        with torch.no_grad():
            module(z.detach())
    except Exception:  # noqa: BLE001 - a diagnosis only: whatever stops the call, no cause named
        pass
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)
    return found[0] if found else None


#: torch's layers that are linear or piecewise linear in their input and parameters (their second derivatives
#: exact zeros or exact, their backward's derivative autograd's own), keep examples apart, and read no
#: batch statistics: a stage of these alone needs no probe (:meth:`LazyBlocks.probe`)
PROBE_FREE = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Flatten, nn.Unflatten, nn.Identity, nn.ReLU, nn.Sequential,
)  # fmt: skip


def _probe_free(module: Any) -> bool:
    """Whether ``module`` and every module in it are :data:`PROBE_FREE` layers themselves (not subclasses,
    whose ``forward`` may differ) with no hooks (a parametrization changes the class)."""
    if not isinstance(module, nn.Module) or _global_hooks():
        return False
    return all(
        type(m) in PROBE_FREE
        and not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)
        for m in module.modules()
    )


def _plain_linear(m: nn.Module, params: list[Tensor]) -> bool:
    """``m`` is an ``nn.Linear`` whose 2-D weight is among ``params``: a candidate for
    :meth:`LazyBlocks.jxT_rows`' outer-product rows (which it checks against autograd's)."""
    if not isinstance(m, nn.Linear) or "weight" not in m._parameters:
        return False  # (a parametrized weight is a property computed from others)
    return m.weight.dim() == 2 and any(p is m.weight for p in params)


def _plain_embedding(m: nn.Module, params: list[Tensor]) -> bool:
    """``m`` is an ``nn.Embedding`` -- or an ``nn.EmbeddingBag`` summing or averaging its bags -- whose 2-D
    weight is among ``params`` and that reads its rows as they are (no ``max_norm``, which renormalizes
    them in place): a candidate for :meth:`LazyBlocks.jxT_rows`' scattered rows (which it checks against
    autograd's)."""
    bag = isinstance(m, nn.EmbeddingBag) and m.mode in ("sum", "mean")
    if not (isinstance(m, nn.Embedding) or bag) or "weight" not in m._parameters or m.max_norm is not None:
        return False
    return m.weight.dim() == 2 and any(p is m.weight for p in params)


def _own_output_shape(m: nn.Module, z: Tensor) -> tuple[int, ...] | None:
    """The shape of what the plain layer ``m`` returns for the input ``z`` (None: not one of those)."""
    if isinstance(m, nn.Linear):
        return (*z.shape[:-1], m.out_features)
    if isinstance(m, nn.EmbeddingBag):
        return (z.shape[0], m.embedding_dim) if z.dim() == 2 else None
    if isinstance(m, nn.Embedding):
        return (*z.shape, m.embedding_dim)
    return None


def _bag_spread(m: nn.Module, ids: Tensor) -> tuple[Tensor, Tensor] | None:
    """For an ``nn.EmbeddingBag`` called on (B, T) token ids (each row a bag): ``(bag, weight)`` of each of
    the B T tokens -- the bag it is in and its share of the bag's output (1 for ``mode="sum"``, one over
    the bag's tokens other than ``padding_idx`` for ``"mean"``), so that the signal ``t`` at the (B, D)
    output reaches the token's row as ``weight t[bag]``; None for a plain ``nn.Embedding`` (a token per
    output position) and for bags of any other form (1-D ids with offsets: not taken)."""
    if not isinstance(m, nn.EmbeddingBag):
        return None
    B, T = ids.shape
    bag = torch.arange(B, device=ids.device).repeat_interleave(T)
    if m.mode == "sum":
        return bag, torch.ones(B * T, dtype=m.weight.dtype, device=ids.device)
    counted = _table_rows(ids, m.padding_idx)[1].view(B, T)  # (the tokens the bag's mean counts)
    share = 1.0 / counted.sum(1).clamp(min=1).to(m.weight.dtype)
    return bag, share.repeat_interleave(T)


def _per_token(t: Tensor, spread: tuple[Tensor, Tensor] | None) -> Tensor:
    """The signal at a table's output as each token's (``(k, tokens, D)``): ``t`` itself for an
    ``nn.Embedding`` (a token per output position), each token's share of its bag's for an
    ``nn.EmbeddingBag`` (``spread``, :func:`_bag_spread`; ``t`` then ``(k, B, D)``)."""
    return t if spread is None else t[:, spread[0]] * spread[1].to(t.dtype)[:, None]


def _table_rows(ids: Tensor, padding_idx: int | None) -> tuple[Tensor, Tensor]:
    """``(flat, keep)``: an Embedding's token ids flattened, and which of them its gradient reaches (all
    but ``padding_idx``, whose row autograd leaves at zero)."""
    flat = ids.reshape(-1)
    return flat, (flat != padding_idx) if padding_idx is not None else torch.ones_like(flat, dtype=torch.bool)


def _read_mask(V: int, flat: Tensor, counted: Tensor) -> Tensor:
    """Which of a table's ``V`` rows the tokens ``flat`` read (those ``counted``: :func:`_table_rows`)."""
    read = torch.zeros(V, dtype=torch.bool, device=flat.device)
    read[flat[counted]] = True
    return read


def held_tensors(modules: Any, plain: bool = True) -> list[Tensor]:
    """Every tensor the modules hold, once each: parameters (frozen ones too), buffers and, with
    ``plain``, plain tensor attributes (``self.scale = torch.tensor(...)``) -- what a later call of them
    reads besides its input, to be copied where that call must happen at today's values."""
    seen: dict[int, Tensor] = {}
    for top in modules:
        for m in top.modules():
            for t in (*m._parameters.values(), *m._buffers.values(), *(vars(m).values() if plain else ())):
                if isinstance(t, Tensor):
                    seen.setdefault(id(t), t)
    return list(seen.values())


# nn.Module's own bookkeeping (parameters, buffers, submodules, hooks: kept or checked elsewhere)
_MODULE_INTERNALS = frozenset(vars(nn.Module())) - {"training"}
_PLAIN_SCALARS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)
#: numbers a module's plain setting may hold to be copied for a float32 operator's float64 twin
_PLAIN_MAX_LEAVES = 4096
_CONTAINERS = (tuple, list, set, frozenset, dict)


def _plain_leaves(v: Any, budget: int, depth: int = 0) -> int:
    """The numbers, strings and dtypes ``v`` is made of (through tuples, lists, sets and dicts nested at
    most 4 deep), or -1 where it holds anything else or more than ``budget`` of them."""
    if isinstance(v, _PLAIN_SCALARS):
        return 1
    if depth >= 4 or not isinstance(v, _CONTAINERS) or len(v) > budget:
        return -1
    total = 0
    for x in [y for kv in v.items() for y in kv] if isinstance(v, dict) else v:
        k = _plain_leaves(x, budget - total, depth + 1)
        if k < 0 or total + k > budget:
            return -1
        total += k
    return total


def plain_settings(mods: Sequence[nn.Module]) -> list[tuple[int, str, str, Any]]:
    """Every module's plain settings (values of its ``__dict__`` made of at most
    :data:`_PLAIN_MAX_LEAVES` numbers and strings: ``training``, a Softplus's ``beta``, a list of
    scales), copied: what a float32 operator's float64 copy of the model, made when first needed, is set
    back to (a forward may read them untraced, in a stage called whole)."""
    kept = []
    for i, top in enumerate(mods):
        for name, m in top.named_modules():
            for k, v in vars(m).items():
                if k in _MODULE_INTERNALS:
                    continue
                if isinstance(v, _PLAIN_SCALARS):  # (immutable: no copy)
                    kept.append((i, name, k, v))
                elif isinstance(v, _CONTAINERS) and _plain_leaves(v, _PLAIN_MAX_LEAVES) >= 0:
                    kept.append((i, name, k, copy.deepcopy(v)))
    return kept


def watchable(v: Any) -> bool:
    """A value a traced ``forward`` may have baked into its code: a number (numpy's too), a string,
    None, a tuple of these, or a plain tensor attribute (compared by identity)."""
    if isinstance(v, tuple):
        return all(isinstance(x, (numbers.Number, str, type(None))) for x in v)
    return isinstance(v, (numbers.Number, str, type(None), Tensor))


def same_value(x: Any, v: Any) -> bool:
    if x is v:
        return True
    if type(x) is not type(v) or isinstance(v, Tensor):
        return False
    return bool(x == v)


def hook_dicts(mods) -> list[dict]:
    """torch's global module hooks and the forward (pre-)hooks and backward hooks of ``mods``: what a
    call of those modules runs besides their ``forward`` (their keys: the hooks' handle ids)."""
    glob = nn.modules.module
    dicts: list[dict] = [
        getattr(glob, k)
        for k in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks")
        if isinstance(getattr(glob, k, None), dict)
    ]
    for m in mods:
        dicts += [m._forward_hooks, m._forward_pre_hooks, m._backward_hooks]
    return dicts


def _hook_keys(mods) -> list[tuple]:
    """:func:`hook_dicts` by handle id (the parameters' gradient hooks are off in hessinv's own
    derivatives: :func:`hessinv.linalg.tensor_hooks_suspended`)."""
    return [tuple(d) for d in hook_dicts(list(mods))]


def _custom_backward_message(name: str, custom: list[str], what: str, confirmed: bool = True) -> str:
    """Why a stage's Hessian is refused where it holds a custom ``autograd.Function`` (``what``: the evidence;
    ``confirmed``: by finite differences, else the Function is the likely cause, cancellation the other)."""
    cause = (
        "the Function's backward is computed from values autograd cannot differentiate"
        if confirmed
        else "the likely cause is the Function's backward computed from values autograd cannot differentiate"
    )
    other = (
        ""
        if confirmed
        else "; if its backward is exact, they are small differences of large terms (a saturated softmax, a "
        "normalization over 2 values): rescale the stage's inputs"
    )
    return (
        f"{name}: its second derivatives by autograd (double backward through the custom autograd.Function "
        f"{', '.join(sorted(set(custom)))}) {what}: {cause} (x.detach(), a value kept as ctx.x = x.detach() "
        "rather than by ctx.save_for_backward(x), arithmetic under torch.no_grad), so its Hessian would be "
        "wrong; write the backward with differentiable torch operations on ctx.saved_tensors (or use the "
        f"Gauss-Newton matrix, hessinv.gauss_newton, which needs first derivatives only){other}"
    )


def _custom_functions(out: Tensor) -> list[str]:
    """The names of the custom ``torch.autograd.Function`` nodes in ``out``'s graph (their backward is the
    user's code: autograd differentiates it as written)."""
    found, seen, todo = [], set(), [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        if isinstance(fn, torch.autograd.function.BackwardCFunction):
            found.append(type(fn).__name__.removesuffix("Backward"))
        todo.extend(f for f, _ in fn.next_functions)
    return found


#: torch operations without a double backward, and the same function written with ones that have it
_NO_DOUBLE_BACKWARD = {
    "hardsigmoid": "Write F.hardsigmoid(x) as torch.clamp(x / 6 + 0.5, 0, 1) (the same function)",
    "embedding_bag": "Write nn.EmbeddingBag as nn.Embedding followed by .sum(1), .mean(1) or .amax(1) "
    "(mode 'sum', 'mean' or 'max': the same function); bags of different lengths as 1-D ids with "
    "offsets: pad them to a (B, T) tensor of ids with a padding_idx (nn.EmbeddingBag(..., padding_idx=P) "
    "called on (B, T) ids, sum or mean, is taken without a double backward)",
}


def _remedy(dtype: torch.dtype) -> str:
    """What to do about cancellation in a stage's derivatives."""
    if dtype == torch.float64:
        return (
            "rescale the stage's inputs or change its shape (e.g. a LayerNorm or GroupNorm over more "
            "than 2 features per group: with one or two its output hardly depends on its input)"
        )
    return "use a float64 model, or rescale the stage's inputs (e.g. a LayerNorm over more than 2 features)"
