"""Dense autograd references for every curvature quantity, and random chains.

The one place tests get "the truth" from: gradient and Hessian of the loss in the trainable parameters by
plain double backward, row by row (the ``autograd_*`` helpers; ``dense_*`` are their older names); the
Gauss-Newton matrix as ``J^T Lambda J`` with ``J`` the outputs' Jacobian and ``Lambda`` the loss Hessian
in the outputs, both by plain autograd. No ``torch.func`` (its affine ``layer_norm`` second derivative is
wrong in torch 2.13).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.func import functional_call

ACTIVATIONS = {
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "relu": nn.ReLU,
    "identity": nn.Identity,
    "none": None,
}
LOSSES = ["ce", "ce_probs", "ce_smooth", "mse", "bce", "ce_sum", "mse_sum", "bce_sum"]


class Residual(nn.Module):
    """``z + tanh(W z + c)``: a per-example stage that only the generic oracle handles."""

    def __init__(self, width: int):
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, z: Tensor) -> Tensor:
        return z + torch.tanh(self.lin(z))


def flat_loss_fn(model: nn.Module, loss_fn: nn.Module, inputs: Tensor, targets: Tensor):
    """``x -> loss`` with ``x`` the flat vector of trainable parameters in ``model.parameters()`` order."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def unflat(x: Tensor) -> dict[str, Tensor]:
        out, i = {}, 0
        for n, p in named:
            out[n] = x[i : i + p.numel()].view_as(p)
            i += p.numel()
        return out

    x0 = torch.cat([p.detach().reshape(-1) for _, p in named])

    def outputs(x: Tensor) -> Tensor:
        return functional_call(model, unflat(x), (inputs,))

    def loss(x: Tensor) -> Tensor:
        return loss_fn(outputs(x), targets)

    return x0, loss, outputs


def dense_gradient_hessian(model, loss_fn, inputs, targets) -> tuple[Tensor, Tensor]:
    """Gradient and Hessian of the loss in the flat parameters: :func:`autograd_gradient_hessian` (plain
    double backward, row by row; not ``torch.func.hessian``, whose mixed second derivative of an affine
    ``layer_norm`` is wrong in torch 2.13, nor a vmap-batched one)."""
    return autograd_gradient_hessian(model, loss_fn, inputs, targets)


def dense_gauss_newton(model, loss_fn, inputs, targets) -> Tensor:
    """``J^T Lambda J``: :func:`autograd_gauss_newton` (plain autograd, row by row)."""
    return autograd_gauss_newton(model, loss_fn, inputs, targets)


@dataclass
class Problem:
    model: nn.Sequential
    loss_fn: nn.Module
    inputs: Tensor
    targets: Tensor
    description: str


def make_loss(kind: str, batch: int, classes: int, gen: torch.Generator, dtype) -> tuple[nn.Module, Tensor]:
    red = "sum" if kind.endswith("_sum") else "mean"
    base = kind.removesuffix("_sum")
    if base in ("ce", "ce_smooth"):
        t = torch.randint(0, classes, (batch,), generator=gen)
        return nn.CrossEntropyLoss(reduction=red, label_smoothing=0.1 if base == "ce_smooth" else 0.0), t
    if base == "ce_probs":
        t = torch.softmax(torch.randn(batch, classes, generator=gen, dtype=dtype), -1)
        return nn.CrossEntropyLoss(reduction=red), t
    if base == "mse":
        return nn.MSELoss(reduction=red), torch.randn(batch, classes, generator=gen, dtype=dtype)
    if base == "bce":
        return nn.BCEWithLogitsLoss(reduction=red), torch.rand(batch, classes, generator=gen, dtype=dtype)
    raise ValueError(kind)


@st.composite
def chains(
    draw, max_depth: int = 12, max_width: int = 9, max_batch: int = 8, residual: bool = True
) -> Problem:
    """Random float64 chains: depth, widths, activations (fused and standalone), biases, losses."""
    depth = draw(st.integers(1, max_depth))
    widths = [draw(st.integers(1, max_width)) for _ in range(depth + 1)]
    batch = draw(st.integers(1, max_batch))
    loss_kind = draw(st.sampled_from(LOSSES))
    if loss_kind.startswith("ce"):
        widths[-1] = max(widths[-1], 2)
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    desc = []
    for i in range(depth):
        bias = draw(st.booleans())
        layers.append(nn.Linear(widths[i], widths[i + 1], bias=bias))
        desc.append(f"L{widths[i]}>{widths[i + 1]}{'b' if bias else ''}")
        if i < depth - 1:
            act = draw(st.sampled_from(sorted(ACTIVATIONS)))
            if ACTIVATIONS[act] is not None:
                layers.append(ACTIVATIONS[act]())
                desc.append(act)
            if draw(st.integers(0, 7)) == 0:  # standalone activation -> generic stage
                layers.append(nn.Tanh())
                desc.append("tanh*")
            if residual and draw(st.integers(0, 5)) == 0:
                layers.append(Residual(widths[i + 1]))
                desc.append("res")
    model = nn.Sequential(*layers).double()
    with torch.no_grad():  # larger weights than default init: more curvature, more indefiniteness
        for p in model.parameters():
            p.mul_(draw(st.sampled_from([1.0, 2.0])))
    inputs = torch.randn(batch, widths[0], generator=gen, dtype=torch.float64)
    loss_fn, targets = make_loss(loss_kind, batch, widths[-1], gen, torch.float64)
    return Problem(model, loss_fn, inputs, targets, f"B={batch} {' '.join(desc)} {loss_kind}")


# -- plain autograd (double backward) references: the zoo's truth ---------------------------------
# torch.func is not used here: in torch 2.13 its mixed weight x input second derivative of an affine
# layer_norm is wrong. These call the model itself (hooks, parametrizations and all) and
# differentiate with respect to its real leaf parameters.
def trainable(model) -> list[Tensor]:
    mods = list(model) if isinstance(model, (list, tuple)) else [model]
    out, seen = [], set()
    for m in mods:
        for p in m.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def _rows(vec: Tensor, wrt: list[Tensor]) -> Tensor:
    """The Jacobian of a vector ``vec`` (graph kept) in ``wrt``, one backward pass per entry."""
    if not vec.requires_grad:  # e.g. the loss gradient of a loss linear in the outputs
        return vec.new_zeros(vec.numel(), sum(t.numel() for t in wrt))
    rows = []
    for k in range(vec.numel()):
        gs = torch.autograd.grad(vec[k], wrt, retain_graph=True, allow_unused=True, materialize_grads=True)
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows)


def _call(model, inputs: Tensor) -> Tensor:
    """The model's output, attention on its math kernel (``scaled_dot_product_attention``'s fused CPU kernel
    has no double backward: the references of attention models raised where hessinv answers)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        if isinstance(model, (list, tuple)):
            for m in model:
                inputs = m(inputs)
            return inputs
        return model(inputs)


def autograd_gradient_hessian(model, loss_fn, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Gradient and Hessian of ``loss_fn(model(inputs), targets)`` by plain double backward."""
    params = trainable(model)
    loss = loss_fn(_call(model, inputs), targets)
    gs = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True, materialize_grads=True)
    g = torch.cat([x.reshape(-1) for x in gs])
    return g.detach(), _rows(g, params)


def autograd_gauss_newton(model, loss_fn, inputs: Tensor, targets: Tensor) -> Tensor:
    """``J^T Lambda J`` with ``J`` the Jacobian of the outputs and ``Lambda`` the loss Hessian in them."""
    params = trainable(model)
    y = _call(model, inputs)
    J = _rows(y.reshape(-1), params)
    yy = y.detach().requires_grad_(True)
    (gy,) = torch.autograd.grad(loss_fn(yy, targets), yy, create_graph=True)
    Lam = _rows(gy.reshape(-1), [yy])
    return J.T @ Lam @ J


# -- application tests (influence, Laplace, spectrum): built on the plain-autograd helpers above ---------
def autograd_hessian(model, loss_fn, inputs: Tensor, targets: Tensor) -> Tensor:
    """The dense Hessian of the loss by plain double backward."""
    return autograd_gradient_hessian(model, loss_fn, inputs, targets)[1]


def autograd_hessian_vector_product(model, loss_fn, inputs: Tensor, targets: Tensor, v: Tensor) -> Tensor:
    """``H v`` by one plain double backward (no dense Hessian: for models too large to form it)."""
    params = trainable(model)
    g = torch.autograd.grad(loss_fn(_call(model, inputs), targets), params, create_graph=True)
    parts = torch.split(v, [p.numel() for p in params])
    gv = sum((a * b.view_as(a)).sum() for a, b in zip(g, parts, strict=True))
    return torch.cat([t.reshape(-1) for t in torch.autograd.grad(gv, params)])


def autograd_per_example_gradients(model, loss_fn, inputs: Tensor, targets: Tensor) -> Tensor:
    """(N, n): the gradient of each example's own loss, one backward pass each."""
    params = trainable(model)
    rows = []
    for i in range(len(inputs)):
        loss = loss_fn(_call(model, inputs[i : i + 1]), targets[i : i + 1])
        gs = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows)


def autograd_output_jacobian(model, inputs: Tensor) -> Tensor:
    """(N, C, n): the Jacobian of each example's outputs in the parameters."""
    params = trainable(model)
    return torch.stack(
        [_rows(_call(model, inputs[i : i + 1]).reshape(-1), params) for i in range(len(inputs))]
    )


def attainable_residual(A: Tensor, x: Tensor, b: Tensor, tol: float = 1e-12) -> float:
    """``max(tol, 32 u ||A||_2 max_j ||x_j|| / ||b_j||)``: the relative residual ``|b - A x| / |b|`` a
    backward-stable solve can promise (its backward error is a few ``u``; the residual of the exact
    solution rounded to float64 is already ``u ||A|| ||x||``, which exceeds ``1e-12 |b|`` when ``b``
    leans on ``A``'s small eigenvalues and ``cond(A) >~ 1e4``)."""
    u = torch.finfo(torch.float64).eps
    X, Bm = (x[:, None], b[:, None]) if x.dim() == 1 else (x, b)
    ratio = float((X.double().norm(dim=0) / Bm.double().norm(dim=0)).max())
    return max(tol, 32 * u * float(torch.linalg.matrix_norm(A.double(), 2)) * ratio)


def zero_linear_problem() -> tuple[nn.Module, Tensor, Tensor]:
    """A zero-initialized two-layer linear net (3 -> 3 -> 3, no biases) with MSE targets on 16 examples:
    ``H = [[0, C], [C^T, 0]]`` at the origin, nonsingular (cond ~5), whose last Riccati pivot is exactly
    zero at eps = 0 (the sweep must perturb it)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False)).double()
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
    return m, torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)


def train_step(opt, pc, model: nn.Module, loss_fn, inputs: Tensor, targets: Tensor) -> None:
    """One training step: a hessinv ``Newton``'s ``opt.step(inputs, targets)`` where ``pc`` is None; else
    torch's loop with ``pc.precondition_`` (a ``Preconditioner``) between the backward pass and
    ``opt.step()``."""
    if pc is None:
        opt.step(inputs, targets)
        return
    opt.zero_grad()
    loss_fn(model(inputs), targets).backward()
    pc.precondition_(inputs, targets)
    opt.step()
