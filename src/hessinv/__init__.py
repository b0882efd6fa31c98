"""hessinv: the exact curvature of deep chains -- products, solves, inertia in time linear in depth.

>>> import torch, hessinv
>>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
>>> H = hessinv.hessian(net, torch.nn.MSELoss(), torch.randn(8, 3, dtype=torch.float64),
...                     torch.randn(8, 1, dtype=torch.float64))
>>> H.shape
(21, 21)
"""

from hessinv.chain import Chain
from hessinv.curvature import (
    CurvatureOperator,
    Eigenpairs,
    Factorization,
    GaussNewton,
    Hessian,
    SolveInfo,
    gauss_newton,
    hessian,
)
from hessinv.errors import (
    AccuracyWarning,
    DtypeMismatchError,
    HessinvError,
    InvalidArgumentError,
    NonFiniteError,
    NotAChainError,
    ShapeMismatchError,
    SingularError,
    UnsupportedStageError,
)
from hessinv.riccati import Inertia

__all__ = [
    "hessian", "gauss_newton", "Hessian", "GaussNewton", "CurvatureOperator", "Factorization",
    "SolveInfo", "Inertia", "Chain", "HessinvError", "UnsupportedStageError", "NotAChainError",
    "ShapeMismatchError", "DtypeMismatchError", "NonFiniteError", "SingularError", "AccuracyWarning",
    "InvalidArgumentError", "Eigenpairs",
]  # fmt: skip
__version__ = "0.1.0"

from hessinv import diagnostics, optim  # noqa: E402, F401  (submodules built on the names above)
