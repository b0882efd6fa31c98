"""Dense kernels of the sweep on CPU: Cholesky and triangular solves through scipy's LAPACK.

The Riccati sweep spends much of its time in ``potrf`` (the pivots' Cholesky factors) and ``trsm``
(``Qxx^{-1} Qxz`` and the solves). torch's CPU builds call MKL, whose ``potrf`` and ``trsm`` are 2-4x
slower than OpenBLAS's on AMD processors (256 x 256, float64, one thread: ``cholesky_ex`` 0.64 ms
against 0.16 ms; ``solve_triangular`` with 256 right-hand sides 0.95 ms against 0.50 ms) while its
matrix products are on par. On Intel processors MKL's ``potrf`` is still 2x slower (0.45 against 0.23
ms) but its ``trsm`` 2.2x faster (0.39 against 0.85 ms; a factorization 15-25% faster with it), so
there the triangular solves stay on torch's (:func:`_torch_trsm_preferred`, by the CPU's vendor: one
choice per machine, so a resumed run takes the kernels of the first). scipy ships OpenBLAS, so CPU
float32/float64 blocks go there; the
thread count of scipy's BLAS follows torch's (``torch.set_num_threads``, and the one-thread rule of
small sweeps, :data:`SMALL_BLOCKS`, and of a busy machine, :func:`machine_busy`), so the library never
runs more BLAS threads than torch is told to. Other devices and dtypes, and a scipy whose BLAS threads
cannot be controlled, use torch's kernels. The results agree with torch's to rounding (both backward stable).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
import time
import types
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from hessinv.errors import (
    DtypeMismatchError,
    HessinvError,
    InvalidArgumentError,
    ShapeMismatchError,
    TooLargeError,
    out_of_memory,
)


def _subnormals_flushed() -> bool:
    """Whether this thread's CPU flushes subnormal numbers to zero now (``torch.set_flush_denormal``)."""
    return float(torch.full((1,), 1e-39, dtype=torch.float32) * 1.5) == 0.0


@contextlib.contextmanager
def flush_subnormals():
    """Run the block with the calling thread's CPU flushing subnormal numbers to zero (x86's FTZ/DAZ,
    ``torch.set_flush_denormal``), then restore its setting.

    Far from the loss of a deep chain the blocks scale like the backprop vector (1e-40 at depth 64 of a
    default-initialized tanh MLP in float32), and products of such numbers are subnormal, which Intel
    processors compute about 100x slower: a float32 factorization of that chain took 700 ms instead of
    90 ms. Numbers below the smallest normal one (1e-38 in float32, 1e-308 in float64) are far below
    the rounding error of every normwise backward-stable step of the sweep, so flushing them changes no
    result beyond it (:func:`hessinv.riccati.flush_negligible` removes larger ones already). The
    setting is per thread: BLAS worker threads (large blocks on several threads) keep theirs.
    """
    if _subnormals_flushed() or not torch.set_flush_denormal(True):
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


#: Work whose blocks are all at most this size (a sweep's parameters and batch activations per stage; an
#: optimizer step's weight sides and batch) runs on one CPU thread: its small products gain at most ~10%
#: from a second thread on an idle machine, and lose up to 17x on a loaded one, where oversubscribed
#: threads wait for each other (an MNIST-1D tanh chain's optimizer step: 4.7 -> 4.0 ms idle, 4.8 -> 77 ms
#: beside one busy process; docs/benchmarks.md).
SMALL_BLOCKS = 512


def all_finite(t: Tensor) -> bool:
    """Whether every entry of ``t`` is finite: its smallest and largest are (a NaN propagates to both;
    one reduction, no tensor of flags, the two numbers tested in Python -- 0.8 ms against 13 ms for
    ``isfinite(t).all()`` on 3.3M float32 entries, a per-step check of an Embedding model's gradient;
    4.4 against 33 us on 15k entries, an optimizer step's several checks)."""
    if not t.is_floating_point() or not t.numel() or t.element_size() == 1:  # (float8: no aminmax)
        return bool(torch.isfinite(t).all())
    lo, hi = torch.aminmax(t)
    if t.device.type != "cpu":  # (one synchronization, not two)
        return bool(torch.isfinite(lo) & torch.isfinite(hi))
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def as_columns(
    v: object, n: int, dtype: torch.dtype, device: torch.device, what: str, owner: str = "operator"
) -> tuple[Tensor, bool]:
    """``v`` of shape ``(n,)`` or ``(n, k)`` as an ``(n, k)`` matrix (detached; a sparse one dense), and
    whether it came as a vector: the right-hand sides and vectors of an operator or a factorization of
    ``dtype`` on ``device``, named errors for anything else (a vector of length ``n`` taken for a matrix
    came back ``n x n``, a probe of :class:`~hessinv.lowrank.WoodburyFactor`)."""
    if not isinstance(v, Tensor):
        raise InvalidArgumentError(
            f"{what} must be a torch.Tensor, got {type(v).__module__}.{type(v).__name__}"
        )
    if v.layout != torch.strided:  # (a sparse vector: the same numbers, dense)
        v = v.to_dense()
    if v.dtype != dtype or v.device != device:
        raise DtypeMismatchError(
            f"{what} is {v.dtype} on {v.device}; the {owner} is {dtype} on {device}: convert it with "
            f".to(dtype={dtype}, device={str(device)!r})"
        )
    if v.dim() not in (1, 2) or v.shape[0] != n:
        raise ShapeMismatchError(f"{what} must have shape ({n},) or ({n}, k); got {tuple(v.shape)}")
    v = v.detach()  # numbers in, numbers out: no graph (and no torch warning on float())
    return (v[:, None] if v.dim() == 1 else v), v.dim() == 1


class _SymmetricMap(torch.autograd.Function):
    """``y = A v`` for a fixed symmetric ``A`` (``forward_fn``, ``backward_fn``: the same map, the latter
    called in the backward pass): the vector-Jacobian product is ``A g``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, v: Tensor, forward_fn: Callable[[Tensor], Tensor], backward_fn: Callable[[Tensor], Tensor]
    ) -> Tensor:
        ctx.backward_fn = backward_fn  # (not ctx.apply: the node's own method)
        return forward_fn(v.detach())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        return ctx.backward_fn(g.contiguous()), None, None


_M = TypeVar("_M", bound=Callable[..., Any])


def symmetric_in_rhs(method: _M) -> _M:
    """A method ``f(self, v, ...)`` that applies a symmetric matrix to ``v`` (``H v``, ``(H + eps I)^{-1} v``;
    with ``return_info``, ``(x, info)``), differentiable in ``v`` where ``v`` requires grad and grad mode is
    on: ``d/dv <g, A v> = A g``, one more application in the backward pass (first order only). The
    object's ``last_info`` is the forward call's afterwards. Elsewhere the plain call (no graph)."""

    @functools.wraps(method)
    def wrapper(self: Any, v: Any, *args: Any, **kwargs: Any) -> Any:
        if not (isinstance(v, Tensor) and v.requires_grad and torch.is_grad_enabled()):
            return method(self, v, *args, **kwargs)
        rest: list[Any] = []

        def apply(u: Tensor) -> Tensor:
            out = method(self, u, *args, **kwargs)
            if isinstance(out, tuple):
                rest[:] = out[1:]
                out = out[0]
            return out

        def again(g: Tensor) -> Tensor:  # (the backward's application: the forward's info kept)
            info = self.__dict__.get("last_info", None)
            try:
                return apply(g)
            finally:
                if info is not None:
                    self.last_info = info

        x = _SymmetricMap.apply(v, apply, again)
        return (x, *rest) if rest else x

    return wrapper  # type: ignore[return-value]


#: the complex dtype of each real floating dtype's precision
_COMPLEX_OF = {
    torch.float64: torch.complex128,
    torch.float32: torch.complex64,
    torch.float16: torch.complex32,
}


@contextlib.contextmanager
def tensor_hooks_suspended(tensors: Any) -> Iterator[None]:
    """Gradient hooks (``Tensor.register_hook``: ``wandb.watch``'s, a user's logging) of the leaves
    among ``tensors`` (parameters) switched off for the block, then put back in their order: hessinv's
    own derivative passes -- many per curvature, each a backward through the parameters -- are not the
    training gradient the hooks are written for (an optimizer calls them once on the step's gradient),
    and a hook that changes its argument would change the Hessian's blocks. (A hook on a value inside
    the forward is part of the function autograd differentiates, and stays.)"""
    items = [tensors] if isinstance(tensors, Tensor) else tensors
    held = [(d, dict(d)) for t in items if isinstance(t, Tensor) and t.is_leaf and (d := t._backward_hooks)]
    for d, _ in held:
        d.clear()  # (torch reads the tensor's dict at each backward: emptied, no hook runs)
    try:
        yield
    finally:
        for d, saved in held:
            d.update(saved)


def grad(outputs: Any, inputs: Any, **kwargs: Any) -> tuple[Tensor, ...]:
    """``torch.autograd.grad(outputs, inputs, **kwargs)`` with the gradient hooks of ``inputs`` off
    (:func:`tensor_hooks_suspended`): every derivative hessinv takes goes through here."""
    with tensor_hooks_suspended(inputs):
        return torch.autograd.grad(outputs, inputs, **kwargs)


def in_precision(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in the precision of the real floating ``dtype``: a floating tensor in ``dtype``, a complex one
    in the complex dtype of that precision (``Module.to(torch.float64)`` casts a complex64 buffer to float64,
    dropping its imaginary part: an FFT filter's float64 twin then computed another function), any other
    as it is."""
    if t.is_floating_point():
        return t if t.dtype == dtype else t.to(dtype)
    if t.is_complex() and dtype in _COMPLEX_OF:
        return t if t.dtype == _COMPLEX_OF[dtype] else t.to(_COMPLEX_OF[dtype])
    return t


def module_in_precision(module: Any, dtype: torch.dtype) -> Any:
    """``module`` (converted in place, and returned) in the precision of ``dtype``: its parameters and
    buffers :func:`in_precision` -- what ``module.to(dtype)`` does to the floating ones, without casting
    the complex ones to real -- and its modules' plain tensor attributes, also those held in lists, tuples
    and dicts (``Module.to`` leaves them: a model's constant projection kept in a list failed in its
    float64 twin). The one conversion of the float64 copies: an operator's twin, a loss's,
    ``estimate_minimizer``'s."""
    module._apply(lambda t: in_precision(t, dtype))
    for m in module.modules():
        for k, v in list(vars(m).items()):
            w = _held_in_precision(v, dtype)
            if w is not v:
                setattr(m, k, w)
    return module


def _held_in_precision(v: Any, dtype: torch.dtype) -> Any:
    """``v`` :func:`in_precision` -- a tensor, or those held in (nested) lists, tuples and dicts -- the same
    object where nothing changes."""
    if isinstance(v, Tensor):
        return in_precision(v, dtype)
    if isinstance(v, (list, tuple)) and type(v) in (list, tuple):
        items = [_held_in_precision(x, dtype) for x in v]
        return type(v)(items) if any(a is not b for a, b in zip(items, v, strict=True)) else v
    if type(v) is dict:
        new = {k: _held_in_precision(x, dtype) for k, x in v.items()}
        return new if any(new[k] is not v[k] for k in v) else v
    return v


def machine_busy() -> bool:
    """Whether other work keeps every other core this process may use busy now: ``/proc/loadavg``'s count
    of runnable tasks, less this process's own running threads (its BLAS threads spin after a parallel
    region), at least the cores of its CPU affinity less one (False where it cannot be read). A second
    BLAS thread then has no core to run on and the threads wait for each other: a 2048 x 2048 Cholesky
    took 1.09 s on two threads beside a busy process against 0.10 s on one (a factorization of a
    128-wide MLP 32-41 s against 1.9 s)."""
    try:
        with open("/proc/loadavg") as f:
            runnable = int(f.read().split()[3].split("/")[0])
        own = 0
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/stat") as f:
                stat = f.read()
            own += stat[stat.rfind(")") + 2 : stat.rfind(")") + 3] == "R"
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    except (OSError, ValueError, IndexError):
        return False
    return runnable - own >= cores - 1 and cores > 1


@contextlib.contextmanager
def one_thread_if(small: bool):
    """Run the block on one torch thread if ``small`` or the machine is busy (:func:`machine_busy`; and
    torch uses more threads), then restore the count -- and scipy's BLAS thread count, which the block's
    scipy kernels set to torch's (:func:`_scipy_ready`): a process-wide setting of the user's (scipy and
    sklearn after a factorization ran on torch's count, or on one). Under
    ``torch.use_deterministic_algorithms(True)`` the machine's load is not consulted: a kernel's rounding
    depends on its thread count, and a seeded run must not follow the other processes' load (a float32
    training run, idle against busy, ended 6% of its travel apart after 30 steps; a probe)."""
    threads = torch.get_num_threads()
    one = threads > 1 and (small or (not torch.are_deterministic_algorithms_enabled() and _busy()))
    ctl = _scipy_blas()
    scipy_threads = ctl[0].num_threads if ctl is not None else None
    if one:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if one:
            torch.set_num_threads(threads)
        if ctl is not None and ctl[0].num_threads != scipy_threads:
            ctl[0].set_num_threads(scipy_threads)
            ctl[1] = scipy_threads


#: how long a reading of :func:`machine_busy` (~0.1 ms: /proc) is taken as the machine's state
BUSY_MAX_AGE = 0.5
_busy_read: list[Any] = [-math.inf, False, None]  # (monotonic time, machine_busy(), the function read)


def _busy() -> bool:
    """:func:`machine_busy`, read at most every :data:`BUSY_MAX_AGE` seconds (a product on a small model
    takes less than the reading; a replaced ``machine_busy`` -- a test's -- is read at once)."""
    now = time.monotonic()
    if now - _busy_read[0] > BUSY_MAX_AGE or _busy_read[2] is not machine_busy:
        _busy_read[:] = [now, machine_busy(), machine_busy]
    return bool(_busy_read[1])


_entered = threading.local()  # (.depth: this thread's nesting of library_call)


@contextlib.contextmanager
def library_call() -> Iterator[None]:
    """The outermost call into the library on this thread runs on one torch thread where the machine is
    busy (:func:`one_thread_if`), then restores the count; calls nested in it pass through. The sweeps
    and the optimizers' steps decide for themselves too (one thread on small blocks, busy or not); this
    covers the rest -- products, refinement, operators' construction, the applications: on a busy
    2-core machine ``H @ V`` of a width-16 chain took 1.16 s on torch's 2 threads against 18 ms on one,
    ``hessian()`` 1.07 s against 26 ms, ``F.solve`` 2.1 s against 54 ms (a probe)."""
    depth = getattr(_entered, "depth", 0)
    _entered.depth = depth + 1
    try:
        if depth or torch.get_num_threads() == 1:
            yield
        else:
            with one_thread_if(False):
                yield
    except (RuntimeError, MemoryError) as e:
        # the outermost call: an allocation that failed (no size check foresaw it) as a named error, not
        # the allocator's raw RuntimeError (a probe: Laplace's predictive and a Woodbury factorization of
        # models of 0.3-2M parameters)
        if depth or isinstance(e, HessinvError) or not out_of_memory(e):
            raise
        said = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]  # (MemoryError() says nothing)
        raise TooLargeError(
            f"out of memory ({said}): this call needs more memory than is "
            "free -- take the curvature on fewer examples, pass fewer vectors or test points at once, or "
            "use a smaller model"
        ) from e
    finally:
        _entered.depth = depth


_F = TypeVar("_F", bound=Callable[..., Any])


def protect_threads(fn: _F) -> _F:
    """``fn`` run inside :func:`library_call`."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        with library_call():
            return fn(*args, **kwargs)

    return call  # type: ignore[return-value]


def protect_public_methods(cls: type) -> type:
    """Class decorator: :func:`protect_threads` on ``cls``'s public methods (and ``__call__``)."""
    for name, value in list(vars(cls).items()):
        if isinstance(value, types.FunctionType) and (not name.startswith("_") or name == "__call__"):
            setattr(cls, name, protect_threads(value))
    return cls


#: Blocks with fewer rows than this use torch's kernels (the call overheads are about equal there).
MIN_SCIPY = 16
#: Triangular solves with fewer right-hand sides than this use torch's: MKL's ``trsv``-like kernels
#: for a few vectors are 1.3-4x faster than OpenBLAS's ``trsm`` (256 x 256, 1-16 right-hand sides).
MIN_RHS = 32


@functools.lru_cache(maxsize=1)
def _lapack():
    """scipy's LAPACK module (imported once: an ``import`` statement costs microseconds per pivot)."""
    from scipy.linalg import lapack

    return lapack


@functools.lru_cache(maxsize=1)
def _scipy_blas():
    """scipy's BLAS thread control (a threadpoolctl library controller), or None: scipy's kernels
    are then not used (they would run an uncontrolled number of threads)."""
    # threadpoolctl's import sets KMP_DUPLICATE_LIB_OK=True in the process's environment (silencing Intel
    # OpenMP's duplicate-runtime abort for the user's later code too, a probe found): put it back after
    kmp = os.environ.get("KMP_DUPLICATE_LIB_OK")
    try:
        import scipy.linalg.lapack  # noqa: F401  (loads scipy's BLAS so threadpoolctl can see it)
        from threadpoolctl import ThreadpoolController

        libs = ThreadpoolController().lib_controllers
    except ImportError:
        return None
    finally:
        if kmp is None:
            os.environ.pop("KMP_DUPLICATE_LIB_OK", None)
        else:
            os.environ["KMP_DUPLICATE_LIB_OK"] = kmp
    for lib in libs:
        if lib.user_api == "blas" and "scipy" in str(lib.filepath) and "numpy" not in str(lib.filepath):
            return [lib, None]
    return None


def _scipy_ready(*tensors: Tensor) -> bool:
    """Whether scipy's kernels take these tensors (CPU, float32/float64, at least :data:`MIN_SCIPY`
    rows), its thread count set to torch's."""
    t = tensors[0]
    if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64) or t.shape[0] < MIN_SCIPY:
        return False
    if any(x.dtype != t.dtype or x.device.type != "cpu" for x in tensors[1:]):
        return False
    ctl = _scipy_blas()
    if ctl is None:
        return False
    threads = torch.get_num_threads()
    if ctl[1] != threads:
        ctl[0].set_num_threads(threads)
        ctl[1] = threads
    return True


@functools.lru_cache(maxsize=1)
def _torch_trsm_preferred() -> bool:
    """Whether torch's triangular solves beat scipy's here: torch's CPU wheels use MKL, fast for them on
    Intel processors only (module docstring). Read from ``/proc/cpuinfo`` (other systems: scipy's)."""
    try:
        with open("/proc/cpuinfo") as f:
            head = f.read(4096)
    except OSError:
        return False
    return "GenuineIntel" in head and torch.backends.mkl.is_available()


def _fortran(A: np.ndarray) -> tuple[np.ndarray, bool]:
    """``(F, transposed)``: a Fortran-ordered array equal to ``A`` (``transposed=False``) or to ``A^T``
    (``transposed=True``: ``A`` was C-ordered), without a copy where the layout allows."""
    if A.flags.f_contiguous:
        return A, False
    if A.flags.c_contiguous:
        return A.T, True
    return np.asfortranarray(A), False


def cholesky(Q: Tensor) -> Tensor | None:
    """The lower Cholesky factor ``L`` of a symmetric ``Q`` (``Q = L L^T``, only ``Q``'s lower triangle
    read), or None when ``Q`` is not positive definite or not finite. ``Q`` is not modified. Only ``L``'s
    lower triangle is meaningful: every consumer here (:func:`solve_triangular`, ``torch.linalg.
    solve_triangular``, ``torch.cholesky_solve``, ``L.diagonal()``) reads no more.

    Example:
        >>> Q = torch.tensor([[4.0, 2.0], [2.0, 5.0]], dtype=torch.float64)
        >>> cholesky(Q).tril()
        tensor([[2., 0.],
                [1., 2.]], dtype=torch.float64)
        >>> cholesky(-Q) is None
        True
    """
    if _scipy_ready(Q):
        potrf = _lapack().dpotrf if Q.dtype == torch.float64 else _lapack().spotrf
        A, transposed = _fortran(Q.detach().numpy())
        # the lower triangle of Q is the upper one of Q^T: factor Q^T = U^T U, then L = U^T
        C, info = potrf(A, lower=0 if transposed else 1, clean=0, overwrite_a=0)
        L = torch.from_numpy(C.T if transposed else C)
    else:
        L, info = torch.linalg.cholesky_ex(Q)
    # NaN or infinity in Q's lower triangle (all that Cholesky reads) reaches L's diagonal, so a finite
    # diagonal certifies a finite Q without a pass over it
    if int(info) != 0 or not bool(torch.isfinite(L.diagonal().sum())):
        return None
    return L


def solve_triangular(
    A: Tensor, B: Tensor, *, upper: bool, left: bool = True, unitriangular: bool = False
) -> Tensor:
    """``A^{-1} B`` (``left``) or ``B A^{-1}`` for a triangular ``A`` (only the triangle named by ``upper``
    read; its diagonal taken as ones with ``unitriangular``): ``torch.linalg.solve_triangular`` for 2-D
    tensors, on scipy's ``trsm`` where :func:`_scipy_ready` and there are at least :data:`MIN_RHS`
    right-hand sides (not on Intel processors: :func:`_torch_trsm_preferred`). A C-ordered operand is
    passed as its
    Fortran-ordered transpose (``A X = B  <=>  X^T A^T = B^T``), so no operand is copied but the result.

    Example:
        >>> A = torch.tensor([[2.0, 0.0], [1.0, 4.0]], dtype=torch.float64)
        >>> solve_triangular(A, torch.tensor([[2.0], [9.0]], dtype=torch.float64), upper=False)
        tensor([[1.],
                [2.]], dtype=torch.float64)
    """
    if (
        B.numel() == 0
        or B.shape[1 if left else 0] < MIN_RHS
        or _torch_trsm_preferred()
        or not _scipy_ready(A, B)
    ):
        return torch.linalg.solve_triangular(A, B, upper=upper, left=left, unitriangular=unitriangular)
    from scipy.linalg import blas

    trsm = blas.dtrsm if A.dtype == torch.float64 else blas.strsm
    a, ta = _fortran(A.detach().numpy())
    lower = upper if ta else not upper  # the triangle of a (A or A^T) that holds A's
    b, tb = _fortran(B.detach().numpy())
    # a transposed B turns the problem around: op(A) X = B  <=>  X^T op(A)^T = B^T
    side = int(left) ^ int(tb) ^ 1  # trsm's side: 0 = left
    trans = int(ta) ^ int(tb)
    X = trsm(1.0, a, b, side=side, lower=int(lower), trans_a=trans, diag=int(unitriangular))
    return torch.from_numpy(X.T if tb else X)


#: ``lwork / n`` of scipy's ``sytrf`` (its block size): 16-24 beat LAPACK's default 64 at n = 256 on
#: OpenBLAS (0.45-0.50 against 0.58-0.74 ms; MKL's ``sytrf`` through torch: 0.74 ms).
SYTRF_BLOCK = 24


def _interchanges(ipiv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(perm, first)`` from the lower form's 1-based ``ipiv`` (``sytrf``): ``perm`` applies ``sytrs2``'s
    row interchanges in their order (``P^T R = R[perm]``), ``first`` lists the first row of each 2x2
    block of ``D`` (a pair of equal negative entries, read from the first row down as ``sytrs2`` does).
    One Python pass over ``ipiv``: in the sweep, where each numpy call costs a few microseconds (more
    than in isolation: the sweep's other work evicts it from the caches), cheaper than a vectorized
    version (numpy, then ``laswp`` on ``0..p-1``) up to p ~ 128.

    Example:
        >>> perm, first = _interchanges(np.array([2, 2, -3, -3], dtype=np.int32))
        >>> perm.tolist(), first.tolist()
        ([1, 0, 3, 2], [2])
    """
    ip = ipiv.tolist()
    p = len(ip)
    perm = list(range(p))
    first: list[int] = []
    k = 0
    while k < p:
        v = ip[k]
        if v > 0:  # a 1x1 block: row k and row v - 1 interchanged
            t, k0, step = v - 1, k, 1
        else:  # a 2x2 block at rows k, k + 1: row k + 1 and row -v - 1 interchanged
            t, k0, step = -v - 1, k + 1, 2
            first.append(k)
        if t != k0:
            perm[k0], perm[t] = perm[t], perm[k0]
        k += step
    return np.array(perm, dtype=np.int64), np.array(first, dtype=np.int64)


def ldl(Q: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bunch–Kaufman factorization ``P^T Q P = T D T^T`` of a symmetric ``Q`` (LAPACK's lower form), as
    numpy arrays ``(T, perm, d, e, first)``: ``T`` is unit lower triangular (only its strict lower
    triangle is meaningful, as the triangular solves with ``unitriangular=True`` read), ``perm`` gives
    ``P^T R = R[perm]``, ``d`` is ``D``'s diagonal, ``e`` its off-diagonal (``e[k]`` couples rows ``k, k+1``;
    zero outside 2x2 blocks) and ``first`` holds the first row of each 2x2 block.

    Where :func:`_scipy_ready`, scipy's ``sytrf`` reads the lower triangle of the Fortran-ordered ``Q^T``
    -- a C-ordered ``Q`` taken as it lies in memory, without a transposing copy: ``Q``'s upper triangle
    (0.29 ms at n = 256 against 0.74 ms for torch's ``ldl_factor_ex``, which reads the lower triangle,
    elsewhere). LAPACK's ``sytrf`` stores the factor as a product of permutations and elementary factors;
    ``syconv`` applies the permutations to its columns, so that one permutation and one unit triangular
    matrix remain (``sytrs2``'s form), solvable with ``trsm``. The lower form: ``T`` comes out
    column-major, the layout in which a right-sided ``trsm`` with ``T^T`` (the Schur complement's) runs at
    Cholesky's speed -- OpenBLAS's kernel for the upper form's ``T`` in row-major order is 1.3x slower.
    Bunch–Kaufman does not bound ``T``'s entries: on graded,
    nearly rank-deficient matrices eliminated from the small end they reach 1e7 (from the large end,
    below 1e2), and a perturbed pivot (static pivoting) moves the factored matrix by about ``max|T|^2
    tau`` -- :class:`~hessinv.riccati.Pivot` factors such a pivot in the reversed order too.

    ``Q`` must be symmetric in both triangles: which one is read depends on the path and the layout.

    Example:
        >>> Q = torch.tensor([[0.0, 1.0, 2.0], [1.0, -1.0, 0.5], [2.0, 0.5, 3.0]], dtype=torch.float64)
        >>> T, perm, d, e, first = ldl(Q)
        >>> T = np.tril(T, -1) + np.eye(3)
        >>> D = np.diag(d) + np.diag(e[:-1], -1) + np.diag(e[:-1], 1)
        >>> bool(np.allclose(T @ D @ T.T, Q.numpy()[perm][:, perm]))
        True
    """
    lapack = _lapack()
    A = Q.detach().numpy()
    p = A.shape[0]
    fl = "d" if A.dtype == np.float64 else "s"
    syconv = getattr(lapack, fl + "syconv")
    if _scipy_ready(Q):
        X = A.T if A.flags.c_contiguous else np.asfortranarray(A)  # Fortran-ordered: Q^T, or Q
        F, ipiv, _ = getattr(lapack, fl + "sytrf")(X, lower=1, lwork=max(1, SYTRF_BLOCK * p))
    else:  # sytrf through torch: it follows torch's thread setting
        LD, piv, _ = torch.linalg.ldl_factor_ex(torch.from_numpy(np.ascontiguousarray(A)))
        F, ipiv = LD.numpy(), piv.numpy()
    T, e, _ = syconv(F, ipiv, lower=1, overwrite_a=1)  # e[k] couples rows k and k + 1
    perm, k = _interchanges(ipiv)
    ef = np.zeros(p)
    ef[k] = e[k]
    return T, perm, np.diagonal(T).astype(np.float64), ef, k
