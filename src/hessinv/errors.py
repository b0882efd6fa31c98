"""Named errors and warnings of hessinv.

Every failure the library can detect comes back as a subclass of :class:`HessinvError`, and also
subclasses the closest builtin exception so that generic ``except ValueError`` code keeps working.
Errors about a stage name its index in the chain and its module type.

=========================  ===============================================================
error                      raised when
=========================  ===============================================================
UnsupportedStageError      a stage mixes examples (BatchNorm/Dropout in training mode), or a
                           loss/stage configuration hessinv cannot differentiate exactly
NotAChainError             the model is not an ``nn.Sequential`` / list of modules, or one
                           parameter is used by two stages
ShapeMismatchError         inputs/targets have inconsistent batch sizes or feature shapes,
                           or a vector has the wrong length
DtypeMismatchError         inputs, targets or vectors have a dtype/device other than the model's
NonFiniteError             inputs, parameters, the loss or a curvature block is NaN/inf
SingularError              ``H + eps I`` is singular to working precision at the requested damping
InvalidArgumentError       an argument out of its domain (a tolerance <= 0 or NaN, a NaN shift)
=========================  ===============================================================
"""

from __future__ import annotations

__all__ = [
    "HessinvError",
    "UnsupportedStageError",
    "NotAChainError",
    "ShapeMismatchError",
    "DtypeMismatchError",
    "NonFiniteError",
    "SingularError",
    "InvalidArgumentError",
    "AccuracyWarning",
]


class HessinvError(Exception):
    """Base class of every error raised by hessinv."""


class UnsupportedStageError(HessinvError, NotImplementedError):
    """A stage (or loss) that hessinv cannot treat as a per-example chain stage."""


class NotAChainError(HessinvError, TypeError):
    """The model is not a chain of stages ``z_l = f_l(z_{l-1}; x_l)``."""


class ShapeMismatchError(HessinvError, ValueError):
    """Inconsistent shapes: batch sizes, feature sizes, or vector lengths."""


class DtypeMismatchError(HessinvError, TypeError):
    """A tensor whose dtype or device differs from the model's."""


class NonFiniteError(HessinvError, FloatingPointError):
    """NaN or infinity in inputs, parameters, the loss, or a curvature block."""


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


class InvalidArgumentError(HessinvError, ValueError):
    """An argument outside its domain: a tolerance that is not a positive finite number, a NaN shift."""


class AccuracyWarning(UserWarning):
    """A solve whose relative residual stayed above the expected accuracy after refinement."""
