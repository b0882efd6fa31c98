"""Optimizers built on the exact curvature: :class:`Newton` and its damping rules.

==========================  ====================================================================
name                        what
==========================  ====================================================================
:class:`Newton`             ``torch.optim.Optimizer``: ``step(inputs, targets)`` takes one
                            curvature-preconditioned step (mini-batch: amortized; full batch:
                            trust region)
:class:`Preconditioner`     ``p.grad <- (C + D)^{-1} p.grad`` for any ``torch.optim`` optimizer
:class:`StepStats`          what one step did: losses, predicted/actual decrease, ``lambda``,
                            radius, inertia, sweep counts and times
:class:`TrustRegion`        default damping: exact Moré–Sorensen subproblem + ratio test
:class:`LevenbergMarquardt` damping adapted by Nielsen's rule (for Gauss-Newton)
:class:`FixedDamping`       ``H + eps I`` with a fixed ``eps``, every step taken (experiments)
==========================  ====================================================================

>>> import torch, hessinv.optim
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
>>> opt = hessinv.optim.Newton(net, torch.nn.CrossEntropyLoss(), seed=0)
>>> loss = opt.step(torch.randn(8, 4), torch.randint(0, 2, (8,)))
>>> opt.last_stats.step, opt.last_stats.predicted_decrease > 0, opt.last_stats.mode
(1, True, 'precondition')
"""

from hessinv.optim.damping import DampingRule, FixedDamping, LevenbergMarquardt, Proposal
from hessinv.optim.newton import Newton, StepStats
from hessinv.optim.precondition import EigenBasis, Preconditioner
from hessinv.optim.trust_region import SubproblemSolution, TrustRegion, solve_subproblem

__all__ = [
    "Newton", "StepStats", "Preconditioner", "EigenBasis", "TrustRegion", "LevenbergMarquardt",
    "FixedDamping", "DampingRule",
    "Proposal", "solve_subproblem", "SubproblemSolution",
]  # fmt: skip
