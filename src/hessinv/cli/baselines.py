"""Baseline optimizers for ``hessinv train``, all with ``loss = opt.step(inputs, targets)``.

* :class:`HessianFree` -- truncated conjugate gradient on the damped Gauss-Newton system
  ``(G + lambda I) d = -g`` with Levenberg-Marquardt damping (Martens, "Deep learning via
  Hessian-free optimization", ICML 2010). ``G v`` is hessinv's ``O(L)`` Gauss-Newton product.
* :class:`FirstOrder` -- ``torch.optim.SGD`` (momentum), ``Adam`` or ``LBFGS`` behind the same
  ``step(inputs, targets)`` interface.
* :class:`Peer` -- the practitioners' preconditioners from the optional ``bench`` extra
  (``pip install -e .[bench]``): heavyball ``SOAP`` and ``PSGDKron``, pytorch-optimizer
  ``AdaHessian`` and ``SophiaH`` (these two estimate a Hessian diagonal by Hutchinson probes, so
  their backward pass keeps the graph: ``create_graph=True``). Registry: :data:`PEERS`.

Every ``step`` returns the loss on the batch *before* the step and leaves its statistics in
``opt.last_stats``.

>>> import torch
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
>>> X, y = torch.randn(32, 3, dtype=torch.float64), torch.randint(0, 2, (32,))
>>> opt = HessianFree(net, torch.nn.CrossEntropyLoss(), damping=1.0)
>>> losses = [opt.step(X, y) for _ in range(10)]
>>> losses[-1] < losses[0]
True
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

import hessinv
from hessinv.cli.choices import PEER_LR, install_hint

__all__ = [
    "CGResult", "FirstOrder", "HFStats", "HessianFree", "FirstOrderStats", "conjugate_gradient",
    "MissingPackage", "PEERS", "PeerSpec", "Peer", "peer_available",
]  # fmt: skip


# -- conjugate gradient ---------------------------------------------------------------------------
@dataclass
class CGResult:
    """The CG solution, its iteration count, the iterates kept for backtracking, why CG stopped."""

    x: Tensor
    iterations: int
    iterates: list[tuple[int, Tensor]] = field(default_factory=list)
    reason: str = ""
    residual: float = float("nan")  # ||b - A x|| / ||b||


def conjugate_gradient(
    matvec,
    b: Tensor,
    x0: Tensor | None = None,
    max_iters: int = 250,
    rtol: float = 0.0,
    progress_eps: float | None = 5e-4,
    min_iters: int = 1,
    keep_gamma: float = 1.3,
) -> CGResult:
    """Minimize ``q(x) = x^T A x / 2 - b^T x`` (``A`` SPD via ``matvec``) by conjugate gradient.

    Stops at ``max_iters``, when ``||r|| <= rtol ||b||``, or by Martens' relative-progress test
    (``progress_eps``): with ``k = max(10, i/10)``, stop once ``q(x_i) < 0`` and
    ``(q(x_i) - q(x_{i-k})) / q(x_i) < k * progress_eps``. Keeps the iterates at
    ``i = ceil(keep_gamma^j)`` (and the last) for backtracking.
    """
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    bnorm = float(b.norm())
    if bnorm == 0.0:
        return CGResult(x.zero_(), 0, [(0, x.clone())], "zero right-hand side", 0.0)
    Ax = matvec(x) if x0 is not None else torch.zeros_like(b)
    r = b - Ax
    # q(x) = 1/2 x^T A x - b^T x = 1/2 x^T (Ax - b) - 1/2 b^T x = -1/2 x^T (r + b)
    q = float(-0.5 * x.dot(r + b))
    if x0 is not None and q > 0:  # a warm start worse than zero: restart from zero
        x.zero_()
        r, q = b.clone(), 0.0
    p = r.clone()
    rr = float(r.dot(r))
    qs = [q]
    iterates: list[tuple[int, Tensor]] = []
    next_keep = 1.0
    reason = "max iterations"
    i = 0
    while i < max_iters:
        if math.sqrt(rr) <= rtol * bnorm and i >= min_iters:
            reason = "residual tolerance"
            break
        Ap = matvec(p)
        pAp = float(p.dot(Ap))
        if not pAp > 0 or not math.isfinite(pAp):
            reason = "non-positive curvature" if math.isfinite(pAp) else "non-finite product"
            break
        alpha = rr / pAp
        x = x + alpha * p
        r = r - alpha * Ap
        rr_new = float(r.dot(r))
        p = r + (rr_new / rr) * p
        rr = rr_new
        i += 1
        q = float(-0.5 * x.dot(r + b))
        qs.append(q)
        if i >= next_keep:
            iterates.append((i, x.clone()))
            while next_keep <= i:
                next_keep = math.ceil(next_keep * keep_gamma) if next_keep > 1 else 2
        if progress_eps is not None and i >= min_iters:
            k = max(10, int(0.1 * i))
            if i > k and q < 0 and (q - qs[i - k]) / q < k * progress_eps:
                reason = "relative progress"
                break
    if not iterates or iterates[-1][0] != i:
        iterates.append((i, x.clone()))
    return CGResult(x, i, iterates, reason, math.sqrt(max(rr, 0.0)) / bnorm)


# -- Hessian-free ---------------------------------------------------------------------------------
@dataclass
class HFStats:
    """Statistics of one Hessian-free step."""

    loss: float  # before the step
    new_loss: float  # after the step (on the same batch)
    damping: float  # lambda used for this step's CG solve
    cg_iterations: int
    cg_reason: str
    cg_residual: float
    backtracked_to: int  # the CG iterate taken
    rho: float  # reduction ratio (actual / predicted decrease)
    step_size: float  # line-search step (0: step rejected)
    grad_norm: float


def _params(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


class HessianFree:
    """Truncated-CG Gauss-Newton with Levenberg-Marquardt damping (Martens 2010).

    One ``step(inputs, targets)``:

    1. the gradient ``g`` and the Gauss-Newton operator ``G`` at the batch (``hessinv.gauss_newton``);
    2. CG on ``(G + lambda I) d = -g`` warm-started at ``decay * d_prev``, truncated at
       ``cg_max_iters``, at relative residual ``cg_rtol``, or by Martens' relative-progress test
       (``cg_progress_eps``; ``None`` disables it);
    3. ``backtrack``: among the CG iterates kept at ``i = ceil(1.3^j)``, walk back from the last
       while the loss keeps decreasing;
    4. ``damping`` adapted by the reduction ratio ``rho = (f(x + d) - f(x)) / (q(d) - q(0))``
       with ``q`` the damped quadratic CG minimized: ``rho < 1/4 -> lambda *= 3/2``,
       ``rho > 3/4 -> lambda *= 2/3``;
    5. ``line_search``: Armijo backtracking ``t = lr, 0.8 lr, ...`` on ``f(x + t d)``; if no
       step decreases the loss, the step is rejected (parameters unchanged).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        lr: float = 1.0,
        damping: float = 1.0,
        adapt_damping: bool = True,
        cg_max_iters: int = 50,
        cg_rtol: float = 0.0,
        cg_progress_eps: float | None = 5e-4,
        warm_start_decay: float = 0.95,
        backtrack: bool = True,
        line_search: bool = True,
        min_damping: float = 1e-8,
        max_damping: float = 1e8,
    ):
        if not damping > 0:
            raise ValueError(f"damping must be positive, got {damping}")
        self.model, self.loss_fn = model, loss_fn
        self.params = _params(model)
        self.lr, self.damping, self.adapt_damping = float(lr), float(damping), adapt_damping
        self.cg_max_iters, self.cg_rtol, self.cg_progress_eps = cg_max_iters, cg_rtol, cg_progress_eps
        self.warm_start_decay, self.backtrack, self.line_search = warm_start_decay, backtrack, line_search
        self.min_damping, self.max_damping = min_damping, max_damping
        self.cg_solution: Tensor | None = None  # the last CG solution (the next warm start / decay)
        self.last_stats: HFStats | None = None

    @torch.no_grad()
    def _loss_at(self, x: Tensor, inputs: Tensor, targets: Tensor) -> float:
        vector_to_parameters(x, self.params)
        f = float(self.loss_fn(self.model(inputs), targets))
        return f if math.isfinite(f) else math.inf

    def direction(self, G: hessinv.GaussNewton, damping: float | None = None) -> CGResult:
        """CG on ``(G + damping I) d = -g`` from the warm start; updates ``self.cg_solution``."""
        lam = self.damping if damping is None else float(damping)
        g = G.gradient
        x0 = None
        if self.cg_solution is not None and self.warm_start_decay > 0 and self.cg_solution.shape == g.shape:
            x0 = self.warm_start_decay * self.cg_solution
        res = conjugate_gradient(
            lambda v: G @ v + lam * v,
            -g,
            x0,
            max_iters=self.cg_max_iters,
            rtol=self.cg_rtol,
            progress_eps=self.cg_progress_eps,
        )
        self.cg_solution = res.x.clone()
        return res

    def step(self, inputs: Tensor, targets: Tensor) -> float:
        """One HF step on the batch; returns the loss before the step."""
        G = hessinv.gauss_newton(self.model, self.loss_fn, inputs, targets)
        g, f0 = G.gradient, float(G.loss)
        lam = self.damping
        res = self.direction(G, lam)
        x = parameters_to_vector(self.params).detach().clone()

        # backtracking over CG iterates: walk back from the last while the loss decreases
        cands = res.iterates if self.backtrack else [(res.iterations, res.x)]
        j = len(cands) - 1
        it, d = cands[j]
        f_d = self._loss_at(x + d, inputs, targets)
        while self.backtrack and j > 0:
            f_prev = self._loss_at(x + cands[j - 1][1], inputs, targets)
            if not f_prev < f_d:
                break
            j -= 1
            it, d, f_d = cands[j][0], cands[j][1], f_prev

        # reduction ratio against the damped quadratic CG minimized
        Gd = G @ d
        q = float(g.dot(d) + 0.5 * d.dot(Gd) + 0.5 * lam * d.dot(d))
        rho = (f_d - f0) / q if q < 0 else -math.inf
        if not math.isfinite(f_d):
            rho = -math.inf
        if self.adapt_damping:
            if rho < 0.25:
                self.damping = min(self.damping * 1.5, self.max_damping)
            elif rho > 0.75:
                self.damping = max(self.damping * (2.0 / 3.0), self.min_damping)

        # step size
        t, f_new = self.lr, f_d
        if self.line_search:
            slope = float(g.dot(d))
            if t != 1.0:
                f_new = self._loss_at(x + t * d, inputs, targets)
            for _ in range(40):
                if math.isfinite(f_new) and f_new <= f0 + 1e-2 * t * slope:
                    break
                t *= 0.8
                f_new = self._loss_at(x + t * d, inputs, targets)
            else:
                t, f_new = 0.0, f0
        elif t != 1.0:
            f_new = self._loss_at(x + t * d, inputs, targets)
        vector_to_parameters(x + t * d, self.params)
        self.last_stats = HFStats(
            f0, f_new, lam, res.iterations, res.reason, res.residual, it, rho, t, float(g.norm())
        )
        return f0


# -- first-order baselines -----------------------------------------------------------------------
@dataclass
class FirstOrderStats:
    loss: float
    grad_norm: float
    function_evals: int = 1
    restarted: bool = False  # lbfgs: the history was cleared because the step did not move


class FirstOrder:
    """``sgd`` (with momentum), ``adam`` or ``lbfgs`` behind ``loss = opt.step(inputs, targets)``.

    ``lbfgs`` runs one L-BFGS iteration per step (history kept across steps) with a strong-Wolfe
    line search; feed it the same (full) batch every step. When an iteration does not move the
    parameters (no descent direction, or no step found), its history is cleared so that the next
    step restarts from steepest descent.
    """

    KINDS = ("sgd", "adam", "lbfgs")

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        kind: str,
        lr: float,
        momentum: float = 0.9,
        history_size: int = 20,
    ):
        if kind not in self.KINDS:
            raise ValueError(f"unknown first-order optimizer {kind!r}")
        self.model, self.loss_fn, self.kind, self.lr = model, loss_fn, kind, lr
        params = _params(model)
        if kind == "sgd":
            self.opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum)
        elif kind == "adam":
            self.opt = torch.optim.Adam(params, lr=lr)
        else:
            # max_eval: torch's default (max_iter * 5 // 4 = 1) leaves the line search no evaluation
            # beyond the first trial; tolerances 0: the defaults stop on small gradients for good
            self.opt = torch.optim.LBFGS(
                params,
                lr=lr,
                max_iter=1,
                max_eval=25,
                history_size=history_size,
                line_search_fn="strong_wolfe",
                tolerance_grad=0.0,
                tolerance_change=0.0,
            )
        self.last_stats: FirstOrderStats | None = None

    def step(self, inputs: Tensor, targets: Tensor) -> float:
        first: list[float] = []
        evals = [0]
        gnorm = [0.0]

        def closure() -> Tensor:
            self.opt.zero_grad(set_to_none=False)
            loss = self.loss_fn(self.model(inputs), targets)
            loss.backward()
            evals[0] += 1
            if not first:
                first.append(loss.item())
                gnorm[0] = float(
                    torch.sqrt(sum((p.grad**2).sum() for p in self.opt.param_groups[0]["params"]))
                )
            return loss

        restarted = False
        if self.kind == "lbfgs":
            params = self.opt.param_groups[0]["params"]
            before = parameters_to_vector(params).detach().clone()
            self.opt.step(closure)
            if torch.equal(before, parameters_to_vector(params)) and math.isfinite(first[0]):
                # torch's LBFGS stops without moving when its direction is not a descent direction
                # (or the line search finds no step) and would repeat that forever: restart it.
                self.opt.state.clear()
                restarted = True
        else:
            closure()
            self.opt.step()
        self.last_stats = FirstOrderStats(first[0], gnorm[0], evals[0], restarted)
        return first[0]


# -- peer preconditioners (optional packages) -------------------------------------------------------
class MissingPackage(ImportError):
    """An optimizer needs a package that is not installed; the message says what to install."""


@dataclass(frozen=True)
class PeerSpec:
    """Where a peer optimizer lives, its library default ``lr`` and whether it needs ``create_graph``."""

    module: str  # import name
    package: str  # pip name
    cls: str
    default_lr: float
    create_graph: bool  # Hutchinson Hessian-diagonal probes need the graph of the gradient

    @property
    def lr_grid(self) -> tuple[float, float, float]:
        """The library default and a factor 3 either side."""
        return (self.default_lr / 3, self.default_lr, self.default_lr * 3)


PEERS: dict[str, PeerSpec] = {
    "soap": PeerSpec("heavyball", "heavyball", "SOAP", PEER_LR["soap"], False),
    "psgd": PeerSpec("heavyball", "heavyball", "PSGDKron", PEER_LR["psgd"], False),
    "adahessian": PeerSpec(
        "pytorch_optimizer", "pytorch-optimizer", "AdaHessian", PEER_LR["adahessian"], True
    ),
    "sophiah": PeerSpec("pytorch_optimizer", "pytorch-optimizer", "SophiaH", PEER_LR["sophiah"], True),
}


def peer_available(kind: str) -> bool:
    """Whether the package behind a peer optimizer is importable (without importing it)."""
    return importlib.util.find_spec(PEERS[kind].module) is not None


def _peer_class(kind: str, on_cpu: bool) -> type:
    spec = PEERS[kind]
    try:
        mod = importlib.import_module(spec.module)
    except ImportError as e:
        raise MissingPackage(
            f"optimizer {kind!r} needs the {spec.package} package ({e}); "
            f"{install_hint('bench')}, or pip install {spec.package}"
        ) from None
    if spec.module == "heavyball" and on_cpu:
        mod.utils.compile_mode = None  # torch.compile on CPU: minutes of compilation, no gain
    return getattr(mod, spec.cls)


class Peer:
    """heavyball ``SOAP``/``PSGDKron`` or pytorch-optimizer ``AdaHessian``/``SophiaH`` (library defaults).

    ``lr=None`` takes the library's default; ``options`` go to the optimizer's constructor.
    Raises :class:`MissingPackage` when the package is not installed.
    """

    KINDS = tuple(PEERS)

    def __init__(self, model: nn.Module, loss_fn: nn.Module, kind: str, lr: float | None = None, **options):
        if kind not in PEERS:
            raise ValueError(f"unknown peer optimizer {kind!r}; choose from {', '.join(PEERS)}")
        self.model, self.loss_fn, self.kind = model, loss_fn, kind
        self.spec = PEERS[kind]
        params = _params(model)
        cls = _peer_class(kind, all(p.device.type == "cpu" for p in params))
        self.lr = self.spec.default_lr if lr is None else float(lr)
        if self.spec.module == "heavyball" and params and params[0].dtype == torch.float64:
            # heavyball keeps its state in float32 by default and then fails on float64 parameters
            options = {"storage_dtype": "float64", **options}
            if self.spec.cls == "PSGDKron":
                options = {"q_dtype": "float64", **options}
        self.opt = cls(params, lr=self.lr, **options)
        self.last_stats: FirstOrderStats | None = None

    def step(self, inputs: Tensor, targets: Tensor) -> float:
        self.opt.zero_grad(set_to_none=True)  # also frees the graph kept by create_graph
        loss = self.loss_fn(self.model(inputs), targets)
        with warnings.catch_warnings():
            # create_graph's parameter <-> gradient reference cycle: broken by zero_grad(set_to_none)
            warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
            loss.backward(create_graph=self.spec.create_graph)
        gnorm = float(
            torch.sqrt(sum((p.grad.detach() ** 2).sum() for p in self.opt.param_groups[0]["params"]))
        )
        self.opt.step()
        f = loss.item()
        self.last_stats = FirstOrderStats(f, gnorm)
        return f
