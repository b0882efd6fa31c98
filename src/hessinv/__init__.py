"""hessinv: the exact curvature of deep chains -- products, solves, inertia in time linear in depth.

>>> import torch, hessinv
>>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
>>> H = hessinv.hessian(net, torch.nn.MSELoss(), torch.randn(8, 3, dtype=torch.float64),
...                     torch.randn(8, 1, dtype=torch.float64))
>>> H.shape
(21, 21)

The names below are imported on first use (PEP 562), so that ``import hessinv`` -- and the
``hessinv`` command line's ``--help`` -- does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "hessian": "hessinv.curvature",
    "gauss_newton": "hessinv.curvature",
    "Hessian": "hessinv.curvature",
    "GaussNewton": "hessinv.curvature",
    "CurvatureOperator": "hessinv.curvature",
    "Factorization": "hessinv.curvature",
    "SolveInfo": "hessinv.curvature",
    "Inertia": "hessinv.riccati",
    "Chain": "hessinv.chain",
    "HessinvError": "hessinv.errors",
    "UnsupportedStageError": "hessinv.errors",
    "NoExactHessian": "hessinv.errors",
    "NoDoubleBackward": "hessinv.errors",
    "NotAChainError": "hessinv.errors",
    "ShapeMismatchError": "hessinv.errors",
    "DtypeMismatchError": "hessinv.errors",
    "NonFiniteError": "hessinv.errors",
    "SingularError": "hessinv.errors",
    "AccuracyWarning": "hessinv.errors",
    "InvalidArgumentError": "hessinv.errors",
    "IndefiniteError": "hessinv.errors",
    "TooLargeError": "hessinv.errors",
    "ConvergenceError": "hessinv.errors",
    "DistributedError": "hessinv.errors",
    "NonFiniteArgumentError": "hessinv.errors",
    "NotFittedError": "hessinv.errors",
    "WoodburyFactorization": "hessinv.curvature",
    "MixedFactorization": "hessinv.curvature",
    "Eigenpairs": "hessinv.curvature",
}
_SUBMODULES = (
    "diagnostics", "optim", "errors", "curvature", "riccati", "chain", "stages", "cli", "lowrank",
    "influence", "laplace", "spectrum", "linalg",
)  # fmt: skip

__all__ = list(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from hessinv import (  # noqa: F401
        chain,
        cli,
        curvature,
        diagnostics,
        errors,
        influence,
        laplace,
        linalg,
        lowrank,
        optim,
        riccati,
        spectrum,
        stages,
    )
    from hessinv.chain import Chain  # noqa: F401
    from hessinv.curvature import (  # noqa: F401
        CurvatureOperator,
        Eigenpairs,
        Factorization,
        GaussNewton,
        Hessian,
        MixedFactorization,
        SolveInfo,
        WoodburyFactorization,
        gauss_newton,
        hessian,
    )
    from hessinv.errors import (  # noqa: F401
        AccuracyWarning,
        ConvergenceError,
        DistributedError,
        DtypeMismatchError,
        HessinvError,
        IndefiniteError,
        InvalidArgumentError,
        NoDoubleBackward,
        NoExactHessian,
        NonFiniteArgumentError,
        NonFiniteError,
        NotAChainError,
        NotFittedError,
        ShapeMismatchError,
        SingularError,
        TooLargeError,
        UnsupportedStageError,
    )
    from hessinv.riccati import Inertia  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"hessinv.{name}")
    else:
        raise AttributeError(f"module 'hessinv' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))
