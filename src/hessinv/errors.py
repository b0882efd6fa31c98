"""Named errors and warnings of hessinv.

Every failure the library can detect comes back as a subclass of :class:`HessinvError`, and also
subclasses the closest builtin exception so that generic ``except ValueError`` code keeps working.
Errors about a stage name its index in the chain and its module type.

=========================  ===============================================================
error                      raised when
=========================  ===============================================================
UnsupportedStageError      a stage or loss mixes examples or is random (BatchNorm/Dropout in
                           training mode), has hooks that change gradients, or cannot be
                           differentiated exactly twice
NoExactHessian             (an UnsupportedStageError) a stage whose Hessian cannot be taken exactly
                           while its first derivatives -- the Gauss-Newton matrix -- can: no
                           double backward (NoDoubleBackward), asymmetric second derivatives,
                           a custom autograd.Function's backward autograd differentiates wrongly
NotAChainError             the model's ``forward`` is not a chain (several inputs or outputs,
                           untraceable), a parameter is used by two stages, or a trainable
                           parameter is unused or used out of ``model.parameters()`` order
ShapeMismatchError         inputs/targets have inconsistent batch sizes or feature shapes,
                           or a vector has the wrong length
DtypeMismatchError         inputs, targets or vectors have a dtype/device other than the model's
NonFiniteError             inputs, parameters, buffers, the loss or a curvature block is NaN/inf
InvalidArgumentError       an argument of the wrong kind or out of range: numpy arrays for
                           tensors, a string damping, an empty right-hand side, a damping
                           too large to represent ``H + eps I``, targets that leave nothing to
                           average, a tolerance <= 0 or NaN, a NaN shift
SingularError              ``H + eps I`` cannot be factored at the requested damping (a pivot
                           ``Qxx_l`` of the Riccati sweep is singular to working precision)
IndefiniteError            a quantity that needs ``H + eps I`` positive definite (a Gaussian
                           posterior, its samples) met an indefinite one
DistributedError           a data-parallel job cannot run or a rank failed / timed out
                           (:mod:`hessinv.optim.distributed`)
ConvergenceError           an iterative eigensolver did not converge within its budget and
                           the matrix is too large for the dense fallback
TooLargeError              the Riccati sweep's dense blocks would not fit in memory, or a
                           generic stage's dense per-example blocks exceed their limit (the
                           message names the batch size that fits)
NotFittedError             a fitted object (an influence function, a Laplace posterior, a
                           preconditioner) was used before its ``fit`` / ``update``
=========================  ===============================================================
"""

from __future__ import annotations

import functools
import os
import sys
import warnings

__all__ = [
    "HessinvError",
    "UnsupportedStageError",
    "NoExactHessian",
    "NoDoubleBackward",
    "NotAChainError",
    "ShapeMismatchError",
    "DtypeMismatchError",
    "NonFiniteError",
    "InvalidArgumentError",
    "SingularError",
    "IndefiniteError",
    "DistributedError",
    "TooLargeError",
    "ConvergenceError",
    "NonFiniteArgumentError",
    "NotFittedError",
    "AccuracyWarning",
]


class HessinvError(Exception):
    """Base class of every error raised by hessinv."""


class UnsupportedStageError(HessinvError, NotImplementedError):
    """A stage (or loss) that hessinv cannot treat as a per-example chain stage."""


class NoExactHessian(UnsupportedStageError):
    """A stage whose Hessian blocks cannot be taken exactly (:class:`NoDoubleBackward`, or autograd's second
    derivatives not symmetric: weight_norm's ``_weight_norm``), while its first derivatives -- and so the
    Gauss-Newton matrix -- can: what :class:`hessinv.optim.Newton`'s automatic mode falls back from."""


class NoDoubleBackward(NoExactHessian):
    """A stage autograd cannot differentiate twice (``GenericStage._twice``): its ``J v`` products and dense
    blocks rest on the double backward; :class:`hessinv.GaussNewton`'s products fall back to its root,
    which needs first derivatives only."""


class NotAChainError(HessinvError, TypeError):
    """The model is not a chain of stages ``z_l = f_l(z_{l-1}; x_l)``."""


class ShapeMismatchError(HessinvError, ValueError):
    """Inconsistent shapes: batch sizes, feature sizes, or vector lengths."""


class DtypeMismatchError(HessinvError, TypeError):
    """A tensor whose dtype or device differs from the model's."""


class NonFiniteError(HessinvError, FloatingPointError):
    """NaN or infinity in inputs, parameters, the loss, or a curvature block."""


class InvalidArgumentError(HessinvError, ValueError, TypeError):
    """An argument of the wrong kind (a numpy array, a string) or an out-of-range value.

    Subclasses both ``ValueError`` and ``TypeError``: code that caught the builtin error torch or
    Python raised before keeps working.
    """


class SingularError(HessinvError, RuntimeError):
    """``H + eps I`` could not be factored at the requested damping.

    Attributes:
        stage: index of the stage whose pivot ``Qxx_l`` is singular (or None).
        damping: the damping ``eps`` that was requested.
    """

    def __init__(self, message: str, *, stage: int | None = None, damping: float | None = None):
        super().__init__(message)
        self.stage = stage
        self.damping = damping


class IndefiniteError(HessinvError, ValueError):
    """``H + eps I`` is indefinite where a positive definite matrix is needed (a posterior covariance,
    a square root); use the Gauss-Newton matrix or a larger damping / prior precision."""


class DistributedError(HessinvError, RuntimeError):
    """A data-parallel job could not start, one of its ranks failed, or it ran past its timeout."""


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an allocation failure: Python's ``MemoryError``, torch's ``OutOfMemoryError``
    (a device's) or the CPU allocator's ``RuntimeError`` ("can't allocate memory")."""
    torch = sys.modules.get("torch")  # (loaded by whatever raised it)
    oom = getattr(torch, "OutOfMemoryError", ()) if torch is not None else ()
    text = str(e).lower()
    return isinstance(e, (MemoryError, *((oom,) if oom else ()))) or (
        isinstance(e, RuntimeError) and ("allocate" in text or "out of memory" in text)
    )


class TooLargeError(HessinvError, MemoryError):
    """The factorization would hold dense blocks larger than the memory still available (an ``a x a``
    matrix per stage, ``a = B d``: examples times the stage's input width, ``p x a`` blocks and the
    factors kept for every stage), or a generic stage's dense per-example blocks would exceed
    :attr:`~hessinv.stages.GenericStage.MAX_BLOCK_ENTRIES`. Use fewer examples for the curvature; the
    message says how many fit."""


class ConvergenceError(HessinvError, RuntimeError):
    """Shift-invert Lanczos (:meth:`~hessinv.CurvatureOperator.eigenpairs`) did not converge within its
    restart budget on a matrix too large for the dense fallback: ask for fewer eigenvalues, a larger
    ``tol``, or another ``sigma`` (a cluster of nearly equal eigenvalues converges slowly)."""


class NonFiniteArgumentError(NonFiniteError, InvalidArgumentError):
    """A NaN or infinite argument (a shift, a damping, a tolerance): both non-finite and invalid."""


class NotFittedError(HessinvError, RuntimeError):
    """A method that needs what ``fit`` (or ``update``) computes was called before it: call that first."""


class AccuracyWarning(UserWarning):
    """A solve whose relative residual stayed above the expected accuracy after refinement."""


@functools.lru_cache(maxsize=1)
def _library_files() -> tuple[str, ...]:
    """Path prefixes of the frames :func:`warn` passes over: hessinv's, and torch's and ``contextlib``'s
    (decorators such as ``torch.no_grad()`` wrap the library's calls)."""
    import contextlib

    import torch

    here = os.path.dirname(os.path.abspath(__file__)) + os.sep
    return here, os.path.dirname(os.path.abspath(torch.__file__)) + os.sep, contextlib.__file__


def warn(message: str | Warning, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside hessinv (the user's line, whatever depth
    of the library the warning comes from), so that Python shows the line to change and its
    once-per-location rule counts the user's call sites, not the library's."""
    skip = _library_files()
    level, frame = 2, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
