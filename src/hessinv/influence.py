r"""Influence functions (Koh & Liang 2017) with the exact ``(H + lambda I)^{-1}``.

The influence of up-weighting training example ``z_i`` on the loss at a test point ``z``::

    I(z, z_i) = -grad L(z)^T (H + lambda I)^{-1} grad L(z_i)

with ``H`` the Hessian (or Gauss-Newton matrix) of the training loss on a chosen batch or the whole
(small) training set, and ``lambda`` a damping. pydvl, dattri, captum and kronfluence approximate
``(H + lambda I)^{-1}`` (LiSSA, conjugate gradients, Arnoldi, EK-FAC); here it is one Riccati
factorization of ``H + lambda I`` (exact, ``O(L)`` in depth), reused by one batched solve for all
test gradients. Per-example gradients come from one batched backward pass through the chain
(:meth:`hessinv.Chain.per_example_gradients`), or ``torch.func.vmap(grad)`` over ``functional_call``
where a stage has no per-example form.

An indefinite ``H + lambda I`` (a Hessian away from a minimum, small damping) still has an exact
solve -- the sweep is a block ``LDL^T`` congruence -- and the scores are exact for that matrix; the
inertia is reported (:attr:`InfluenceFunction.inertia`) and a warning says that the classical
interpretation assumes a positive definite curvature.

>>> import torch
>>> from hessinv.influence import InfluenceFunction
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
>>> X, y = torch.randn(20, 3, dtype=torch.float64), torch.randint(0, 2, (20,))
>>> inf = InfluenceFunction(net, torch.nn.CrossEntropyLoss(), curvature="gauss_newton", damping=1e-3)
>>> inf = inf.fit(X, y)
>>> inf.influences(X[:4], y[:4]).shape         # (test points, training examples)
torch.Size([4, 20])
>>> bool((inf.self_influence() > 0).all())     # g_i^T (G + lambda I)^{-1} g_i
True
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

from hessinv import linalg
from hessinv.chain import (
    Chain,
    LossFn,
    as_module,
    batch_sizes_differ,
    check_loss_fn,
    check_real,
    dense_grad,
    exact_no_grad,
    operator_chain,
    trainable_named,
    training_layers,
    unshared,
)
from hessinv.curvature import CurvatureOperator, Factorization, Hessian, check_precision, curvature_class
from hessinv.errors import (
    AccuracyWarning,
    DtypeMismatchError,
    HessinvError,
    InvalidArgumentError,
    NonFiniteArgumentError,
    NonFiniteError,
    NotFittedError,
    ShapeMismatchError,
    SingularError,
    UnsupportedStageError,
    warn,
)
from hessinv.riccati import Inertia, _memory_bytes
from hessinv.stages.generic import dense_lookup_grads
from hessinv.stages.losses import (
    count_examples,
    holds_batch_sized,
    loss_name,
    sums_examples,
    zero_class_weight,
)

__all__ = [
    "InfluenceFunction",
    "influence_scores",
    "distributed_influence_scores",
    "per_example_gradients",
    "output_jacobians",
]


def _trainable(model: nn.Module) -> tuple[list[str], dict[str, Tensor]]:
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    return [k for k, _ in named], {k: p.detach() for k, p in named}


def _slots(model: nn.Module) -> tuple[list[tuple[str, Tensor]], list[Tensor]]:
    """Where each trainable parameter sits: ``(name, parameter)`` once per (module, attribute) -- a
    module reached by two paths (a tied layer) once, a parameter held by two modules twice -- and the
    trainable parameters in ``parameters()`` order. ``functional_call`` given a module twice swaps it
    twice and restores the wrong value (a functorch wrapper left in the model), so each module once;
    a parameter in two places gets the sum of its slots' gradients (:func:`_flatten`)."""
    slots = [
        (f"{path}.{attr}" if path else attr, p)
        for path, mod in model.named_modules()
        for attr, p in mod.named_parameters(recurse=False, remove_duplicate=False)
        if p.requires_grad
    ]
    return slots, [p for p in model.parameters() if p.requires_grad]


def _flatten(
    tree: dict[str, Tensor], slots: list[tuple[str, Tensor]], params: list[Tensor], lead: int
) -> Tensor:
    """The derivatives ``tree`` (by slot name) as one flat dimension in ``params`` order, a shared
    parameter's slots summed."""
    parts = []
    for p in params:
        total = sum(tree[k] for k, q in slots if q is p)
        parts.append(total.reshape(*total.shape[:lead], -1))
    return torch.cat(parts, dim=-1)


@contextlib.contextmanager
def _left_intact(model: nn.Module) -> Iterator[None]:
    """Put back every parameter object of ``model`` after a ``torch.func`` call, whatever it left; and
    during it, embeddings with ``sparse=True`` give dense gradients (the same numbers: ``torch.func``
    has no sparse gradients)."""
    held = [(mod, attr, p) for mod in model.modules() for attr, p in mod.named_parameters(recurse=False)]
    try:
        with dense_lookup_grads(model), warnings.catch_warnings():
            # (torch's note that an operation without a batching rule runs one example at a time -- an
            # nn.EmbeddingBag's, 9 UserWarnings per call, a probe -- about torch.func's speed, not the result)
            warnings.filterwarnings("ignore", message=r"There is a performance drop", category=UserWarning)
            yield
    finally:
        for mod, attr, p in held:
            if mod._parameters.get(attr) is not p:
                mod._parameters[attr] = p


def _check_chunk(chunk: Any) -> int:
    """``chunk`` as a positive int, else :class:`InvalidArgumentError` (``range(0, N, -1)`` is empty:
    a negative chunk silently skipped the work)."""
    if isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or int(chunk) < 1:
        raise InvalidArgumentError(f"chunk must be a positive integer, got {chunk!r}")
    return int(chunk)


def _chunked(fn: Callable[[Tensor, Tensor], Tensor], X: Tensor, y: Tensor, chunk: int) -> Tensor:
    return torch.cat([fn(X[i : i + chunk], y[i : i + chunk]) for i in range(0, len(X), chunk)])


@linalg.protect_threads
def per_example_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    chunk: int = 1024,
    chain: Chain | None = None,
) -> Tensor:
    """``(N, n)``: row ``i`` is ``grad_x loss_fn(model(inputs[i:i+1]), targets[i:i+1])``, the
    gradient of example ``i``'s own loss in the trainable parameters (``parameters_to_vector`` order),
    ``chunk`` examples at a time: by one batched backward pass through the chain where every stage
    has a per-example form (:meth:`hessinv.Chain.per_example_gradients`; ``chain``: the model's, if
    already built), else vectorized with ``torch.func.vmap(grad)``. A loss with class weights and the mean
    reduction (``CrossEntropyLoss(weight=w)``, ``NLLLoss(weight=w)``) divides one example's weighted loss
    by its own weight: its rows are those of the unweighted loss, while a curvature of the batch keeps the
    weights -- for scores of the weighted objective, use ``reduction="sum"`` (rows ``w_i grad l_i``).

    >>> import torch
    >>> from torch import nn
    >>> from hessinv.influence import per_example_gradients
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    >>> X, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
    >>> R = per_example_gradients(net, nn.CrossEntropyLoss(), X, y)  # (5, 26), one backward pass
    >>> losses = [nn.CrossEntropyLoss()(net(X[i : i + 1]), y[i : i + 1]) for i in range(5)]
    >>> rows = [torch.autograd.grad(loss, list(net.parameters())) for loss in losses]
    >>> loop = torch.stack([torch.cat([t.reshape(-1) for t in row]) for row in rows])
    >>> bool(torch.allclose(R, loop))
    True
    """
    chunk = _check_chunk(chunk)
    model = as_module(model)
    check_loss_fn(loss_fn)
    for t, what in ((inputs, "inputs"), (targets, "targets")):
        if not isinstance(t, Tensor):  # (as the operators name it)
            raise InvalidArgumentError(
                f"{what} must be a torch.Tensor, got {type(t).__name__}: convert with torch.as_tensor"
            )
        if t.dim() < 1 or len(t) == 0:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ShapeMismatchError(f"{what} must be a batch of at least one example (N, ...); got {got}")
    if len(targets) != len(inputs):
        raise batch_sizes_differ(inputs, targets)
    if holds_batch_sized(loss_fn, len(inputs)) and not _as_many_classes(model, inputs):
        # (torch broadcasts the weights onto one example's loss: each row came out as mean(w) grad l_i
        # instead of w_i grad l_i, 47% off, with no error; a probe)
        raise UnsupportedStageError(
            f"{loss_name(loss_fn)} holds a tensor sized for the batch of {len(inputs)} (a weight per "
            "example): one example's loss, which a per-example gradient is, would be weighted by the whole "
            "batch's weights. Pass a loss of per-example terms alone (the unweighted loss; to weight the "
            "examples, scale their rows yourself, or carry each weight in its target and read it in the loss)"
        )
    rows = _per_example_rows(model, loss_fn, inputs, targets, chunk, chain)
    if not linalg.all_finite(rows):
        bad = int((~torch.isfinite(rows)).any(1).nonzero()[0, 0])
        weights = zero_class_weight(loss_fn, targets)
        zero = weights is not None and bool(weights[bad].any())
        raise NonFiniteError(
            f"the per-example gradient of example {bad} is not finite"
            + (
                ": its class weight is 0, and one example's weighted mean loss is then 0/0 -- use "
                "reduction='sum' (its row is then 0), or drop the examples of that class"
                if zero
                else " (its own loss, loss_fn on that example alone, or its gradient is NaN or infinite)"
            )
        )
    return rows


def _as_many_classes(model: nn.Module, inputs: Tensor) -> bool:
    """Whether the model has as many outputs per position (dimension 1) as the batch has examples: a tensor
    of the batch's size that the loss holds may then be one per class (``holds_batch_sized`` cannot tell)."""
    with torch.no_grad():
        out = model(unshared(inputs[:1]))
    return isinstance(out, Tensor) and out.dim() >= 2 and int(out.shape[1]) == len(inputs)


def _per_example_rows(
    model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor, chunk: int, chain: Chain | None
) -> Tensor:
    """:func:`per_example_gradients`' rows (its arguments checked)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    chain = _per_example_chain(model, loss_fn, trainable, chain)
    if chain is not None:
        G = chain.per_example_gradients(inputs[:chunk], targets[:chunk])
        if G is not None:
            if len(inputs) > chunk:
                rest = [
                    chain.per_example_gradients(inputs[i : i + chunk], targets[i : i + chunk])
                    for i in range(chunk, len(inputs), chunk)
                ]
                G = torch.cat([G, *rest])
            return chain.to_public(G, 1)
    slots, params = _slots(model)
    _check_model_inputs(inputs, params)
    values = {k: p.detach() for k, p in slots}

    def loss(p: dict[str, Tensor], x: Tensor, t: Tensor) -> Tensor:
        return loss_fn(functional_call(model, p, (unshared(x[None]),), tie_weights=False), t[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))
    try:
        with _left_intact(model):
            return _chunked(lambda X, y: _flatten(g(values, X, y), slots, params, 1), inputs, targets, chunk)
    except RuntimeError as e:  # vmap cannot run it (data-dependent control flow): one example at a time
        return _one_at_a_time(
            e, model, params, inputs, lambda o, i: loss_fn(o, unshared(targets[i : i + 1])).reshape(1)
        )[:, 0]


def _per_example_chain(
    model: nn.Module, loss_fn: LossFn, params: list[Tensor], chain: Chain | None = None
) -> Chain | None:
    """The model as a :class:`hessinv.Chain` (``chain`` if given) whose parameters are the trainable
    ones, in ``parameters()`` order through :meth:`~hessinv.Chain.to_public` (a model whose forward uses
    them in another order: :func:`~hessinv.chain.operator_chain`), or None (not a chain: ``vmap`` then)."""
    if chain is None:
        try:
            with warnings.catch_warnings():  # (a model called whole: no factorization here)
                warnings.filterwarnings("ignore", message=".*called whole")
                chain = operator_chain(model, loss_fn)
        except UnsupportedStageError:  # random or batch-mixing: no per-example gradient either
            raise
        except HessinvError:
            return None
    mine = chain.params if not chain.permuted else [t for _, t in trainable_named(chain.model)]
    same = len(mine) == len(params) and all(a is b for a, b in zip(mine, params, strict=True))
    return chain if same else None


@linalg.protect_threads
def output_jacobians(model: nn.Module, inputs: Tensor, chunk: int = 1024) -> Tensor:
    """``(N, C, n)``: the Jacobian of each example's ``C`` outputs in the trainable parameters
    (``torch.func.vmap(jacrev)``), for the linearized (GLM) predictive. A model with layers random in
    training mode (Dropout, ...) in that mode is an :class:`UnsupportedStageError` (its Jacobians would be
    of one random draw).

    >>> import torch
    >>> from torch import nn
    >>> from hessinv.influence import output_jacobians
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    >>> X = torch.randn(5, 3, dtype=torch.float64)
    >>> J = output_jacobians(net, X)  # (5 examples, 2 outputs, 26 parameters)
    >>> row = torch.autograd.grad(net(X[1:2])[0, 1], list(net.parameters()))
    >>> J.shape, bool(torch.allclose(J[1, 1], torch.cat([t.reshape(-1) for t in row])))
    (torch.Size([5, 2, 26]), True)
    """
    chunk = _check_chunk(chunk)
    model = as_module(model)
    random = training_layers(model)
    if random:
        kinds = ", ".join(sorted({type(m).__name__ for m in random}))
        raise UnsupportedStageError(
            f"the model's {kinds} in training mode make its outputs random: call model.eval() for its "
            "Jacobians (the linearized predictive is of the deterministic network)"
        )
    batch_stats = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None
    ]
    if batch_stats:  # (each example alone would be normalized by its own statistics: another function)
        raise UnsupportedStageError(
            f"the model's {type(batch_stats[0]).__name__}(track_running_stats=False) normalizes with the "
            "batch's statistics in eval mode too, which mixes examples: an example's output Jacobian is not "
            "defined on its own; build it with track_running_stats=True, or normalize each example "
            "(LayerNorm, GroupNorm)"
        )
    slots, params = _slots(model)
    _check_model_inputs(inputs, params)
    values = {k: p.detach() for k, p in slots}

    def out(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(model, p, (unshared(x[None]),), tie_weights=False)[0].reshape(-1)

    J = vmap(jacrev(out), in_dims=(None, 0))
    try:
        with _left_intact(model):
            return _chunked(lambda X, _: _flatten(J(values, X), slots, params, 2), inputs, inputs, chunk)
    except RuntimeError as e:  # vmap cannot run it (data-dependent control flow): one example at a time
        return _one_at_a_time(e, model, params, inputs, lambda o, i: o.reshape(-1))


def _one_at_a_time(
    err: RuntimeError,
    model: nn.Module,
    params: list[Tensor],
    inputs: Tensor,
    values: Callable[[Tensor, int], Tensor],
) -> Tensor:
    """``(N, k, n)``: the gradients of the ``k`` numbers ``values(model(x_i[None]), i)`` by plain
    autograd, one example and one value at a time -- where ``vmap`` cannot run the model (an ``if`` on
    a tensor's value, an RNN's fused kernel, whose batched rule broadcasts the state wrongly); where the
    model fails there too, that error is raised, from ``err`` (vmap's). Inputs that require grad (where
    grad mode is on) keep the gradients' graph to them, as ``vmap(jacrev)`` does (the Laplace predictive's
    variance, differentiable in its inputs: detached here, its gradient came back partial)."""
    rows = []
    graph = inputs.requires_grad and torch.is_grad_enabled()
    try:
        with torch.enable_grad():
            for i in range(len(inputs)):
                v = values(model(unshared(inputs[i : i + 1])), i)
                per_value = []
                for c in range(v.numel()):
                    gs = linalg.grad(v[c], params, retain_graph=True, allow_unused=True, create_graph=graph)
                    per_value.append(
                        torch.cat(
                            [
                                dense_grad(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                for g, p in zip(gs, params, strict=True)
                            ]
                        )
                    )
                rows.append(torch.stack(per_value))
    except RuntimeError as e:
        raise e from err
    return torch.stack(rows) if graph else torch.stack(rows).detach()


def _check_model_inputs(inputs: Any, params: list[Tensor], what: str = "inputs") -> None:
    """Named errors for ``inputs`` (called ``what``) that are no batch, of another floating dtype or device
    than the model's trainable parameters, or not finite (derivatives would be NaN, silently)."""
    if not isinstance(inputs, Tensor) or inputs.dim() < 1 or len(inputs) == 0:
        got = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
        raise ShapeMismatchError(f"{what} must be a batch of at least one example (N, ...); got {got}")
    if not params:
        raise InvalidArgumentError("the model has no trainable parameters")
    dtype, device = params[0].dtype, params[0].device
    if "meta" in (device.type, inputs.device.type):
        raise InvalidArgumentError(
            f"the {'model' if device.type == 'meta' else what} is on the meta device (no values): "
            "materialize it first, e.g. model.to_empty(device='cpu') and initialize its parameters"
        )
    if inputs.device != device:
        raise DtypeMismatchError(
            f"{what} are on {inputs.device}, model on {device}: move them with {what}.to({str(device)!r})"
        )
    if inputs.is_floating_point() and inputs.dtype != dtype:
        raise DtypeMismatchError(
            f"{what} are {inputs.dtype}, model is {dtype}: convert with {what}.to({dtype})"
        )
    if inputs.is_floating_point() and not bool(torch.isfinite(inputs).all()):
        raise NonFiniteError(
            f"{what} contain NaN or infinity: the derivatives would be NaN; drop or fix those examples"
        )


def _shuffles(loader: Any) -> bool:
    """Whether a ``torch.utils.data.DataLoader`` draws its examples in a random order (``shuffle=True``,
    a random, subset-random or weighted sampler, a shuffling ``DistributedSampler``)."""
    from torch.utils.data import (
        DataLoader,
        DistributedSampler,
        RandomSampler,
        SubsetRandomSampler,
        WeightedRandomSampler,
    )

    if not isinstance(loader, DataLoader):
        return False
    for sampler in (loader.sampler, getattr(loader.batch_sampler, "sampler", None)):
        if isinstance(sampler, (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)):
            return True
        if isinstance(sampler, DistributedSampler) and sampler.shuffle:
            return True
    return False


def _collect(data: Tensor | Iterable, targets: Tensor | None, ordered: bool = False) -> tuple[Tensor, Tensor]:
    """``fit(X, y)`` or ``fit(loader)``: the inputs and targets as two tensors (a loader's batches
    concatenated), with named errors for what cannot be. ``ordered``: the examples' order is the
    caller's result (influence columns): a loader that shuffles is refused."""
    if isinstance(data, Tensor):
        if targets is None:
            raise InvalidArgumentError("fit(X, y): the targets are missing")
        return data, targets
    if targets is None and isinstance(data, (list, tuple)) and len(data) == 2:
        if all(isinstance(t, Tensor) for t in data):  # fit((X, y)): one batch, as a loader gives it
            return data[0], data[1]
    if targets is not None:
        if isinstance(data, (list, tuple)) or hasattr(data, "__array__"):
            raise InvalidArgumentError(
                f"fit(X, y): X must be a torch.Tensor, got {type(data).__name__}: "
                "convert with torch.as_tensor"
            )
        raise InvalidArgumentError("pass either fit(X, y) with X and y tensors, or fit(loader)")
    if ordered and _shuffles(data):
        raise InvalidArgumentError(
            "fit(loader): the loader shuffles (a random sampler), so the scores' columns would follow an "
            "order nobody can recover; pass a DataLoader with shuffle=False (or fit(X, y))"
        )
    try:
        batches = [(b[0], b[1], len(b) if hasattr(b, "__len__") else 2) for b in data]
    except (TypeError, KeyError, IndexError) as e:
        raise InvalidArgumentError(
            f"fit(loader): each batch must be an (inputs, targets) pair of tensors ({type(e).__name__}: {e})"
        ) from None
    extra = max((k for _, _, k in batches), default=2)
    if extra != 2:  # (a per-example weight, an index: not read -- the loss would be another one)
        raise InvalidArgumentError(
            f"fit(loader): each batch must be an (inputs, targets) pair of tensors, got {extra} elements; "
            "hessinv would read the first two and drop the rest (sample weights, indices) silently: pass a "
            "loader of (inputs, targets) pairs"
        )
    batches = [(x, y) for x, y, _ in batches]
    if not batches:
        raise InvalidArgumentError("fit(loader): the loader gave no batch")
    xs, ys = zip(*batches, strict=True)
    if not all(isinstance(t, Tensor) for t in xs + ys):
        raise InvalidArgumentError("fit(loader): each batch must be an (inputs, targets) pair of tensors")
    for what, ts in (("inputs", xs), ("targets", ys)):
        shapes = {tuple(t.shape[1:]) for t in ts}
        if len(shapes) > 1:  # torch.cat would fail
            raise ShapeMismatchError(
                f"fit(loader): the batches' {what} differ in shape per example: {shapes}"
            )
    kinds = {(t.dtype, t.device) for t in xs}
    if len(kinds) > 1:  # torch.cat would promote a float32 batch silently (integer targets may differ)
        raise DtypeMismatchError(f"fit(loader): the batches' inputs differ in dtype or device: {kinds}")
    return torch.cat(xs), torch.cat(ys)


@linalg.protect_public_methods
class InfluenceFunction:
    """Exact influence scores ``-grad L(z_test)^T (H + lambda I)^{-1} grad L(z_i)``.

    Args:
        model: an ``nn.Sequential`` chain (see :class:`hessinv.Chain`).
        loss_fn: the training loss module (``CrossEntropyLoss``, ``MSELoss``, ``BCEWithLogitsLoss``);
            its reduction sets the scale of ``H`` (``mean``: Koh & Liang's averaged Hessian).
        curvature: ``"hessian"`` or ``"gauss_newton"`` (``"gauss-newton"``, ``"ggn"``).
        damping: ``lambda``.
        precision: ``"working"`` (default) or ``"mixed"``: for a float64 model, factor in float32 and refine
            every solve in float64 (:class:`hessinv.MixedFactorization`: the factorization in about half
            the time, the same float64 scores; each solve then costs 2-3 float32 sweeps and float64
            products, so it pays when the factorization dominates -- few test points, a large curvature
            batch).

    Attributes (after :meth:`fit`): ``factorization`` (of ``H + lambda I``; of ``H_B + (lambda B / N) I``
    for a summed loss on a curvature batch, see :meth:`fit`), ``inertia``, ``positive_definite``,
    ``train_gradients`` (N, n).

    An example whose target the loss ignores (``ignore_index``: padding) contributes nothing to the
    training loss -- its gradient row is zero and so are its scores, training or test (torch's loss of that
    example alone is 0/0). A model whose output for an example depends on the rest of its batch (a branch
    on a batch statistic) has no per-example losses: :meth:`fit` refuses it.

    >>> import torch, hessinv
    >>> from torch import nn
    >>> from hessinv.influence import InfluenceFunction, per_example_gradients
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    >>> X, y = torch.randn(20, 3, dtype=torch.float64), torch.randint(0, 3, (20,))
    >>> inf = InfluenceFunction(net, nn.CrossEntropyLoss(), curvature="gauss_newton", damping=0.1).fit(X, y)
    >>> scores = inf.influences(X[:2], y[:2])  # (2 test points, 20 training examples)
    >>> scores.shape
    torch.Size([2, 20])
    >>> # -g_test^T (G + 0.1 I)^-1 g_i against a dense solve
    >>> G = hessinv.gauss_newton(net, nn.CrossEntropyLoss(), X, y).to_dense()
    >>> G += 0.1 * torch.eye(59, dtype=torch.float64)
    >>> gtr = per_example_gradients(net, nn.CrossEntropyLoss(), X, y)  # (20, 59)
    >>> bool(torch.allclose(scores, -gtr[:2] @ torch.linalg.solve(G, gtr.T)))
    True
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        curvature: str = "hessian",
        damping: float = 0.0,
        precision: str = "working",
    ):
        self.model, self.loss_fn = as_module(model), loss_fn  # (a list of modules: their Sequential)
        self.curvature_cls = curvature_class(curvature)
        self.damping = check_real(damping, "damping", setting=True)
        if not math.isfinite(self.damping):  # (named here, not first at fit)
            raise NonFiniteArgumentError(f"damping must be a finite number, got {self.damping}")
        self.precision = check_precision(precision)
        self.operator: CurvatureOperator | None = None
        self.factorization: Factorization | None = None
        self._weight = 1.0  # N / B for a summed loss on a curvature batch (fit)
        self.train_gradients: Tensor | None = None
        self._at: Tensor | None = None  # the parameters' values at fit
        self._held: list | None = None  # what the model reads besides its parameters, at fit

    def fit(
        self,
        inputs: Tensor | Iterable,
        targets: Tensor | None = None,
        curvature_inputs: Tensor | None = None,
        curvature_targets: Tensor | None = None,
        *,
        training_examples: int | None = None,
    ) -> InfluenceFunction:
        """Factor ``H + lambda I`` on ``(curvature_inputs, curvature_targets)`` -- default the whole
        training set ``(inputs, targets)``, or ``fit(loader)`` (its batches concatenated) -- and compute
        the per-example training gradients. A refused fit leaves the previous one as it was.

        A loss that sums over the examples (``reduction="sum"``) on a curvature batch of ``B`` of the
        ``N`` training examples: ``H`` is estimated as ``(N / B) H_B`` (the training loss sums ``N``
        terms, the batch's ``B``; a mean needs no weight), as the optimizers do. ``training_examples``:
        ``N``, where ``inputs`` is not the whole training set; by default ``N`` is the examples of
        ``inputs`` the loss counts. A curvature batch at least ``N`` large is taken as the training set's
        own (no weight: a few examples scored against the whole set's curvature)."""
        if (curvature_inputs is None) != (curvature_targets is None):
            raise InvalidArgumentError("pass both curvature_inputs and curvature_targets, or neither")
        inputs, targets = _collect(inputs, targets, ordered=True)
        Xc, yc = (inputs, targets) if curvature_inputs is None else (curvature_inputs, curvature_targets)
        op = self.curvature_cls(self.model, self.loss_fn, Xc, yc)
        w = self._batch_weight(op, targets, yc, training_examples)
        try:
            # (w H + lambda I = w (H + lambda / w I))
            fac = op.factor(self.damping / w, precision=self.precision)
        except SingularError as e:
            # (the default damping 0 on a classifier with a last-layer bias: the logits' common shift is an
            # exact null direction of H and G; the sweep's message names a damping the user never set)
            raise SingularError(
                f"{e} -- here: the curvature plus damping * I at the damping={self.damping:g} given (the "
                f"sweep's {self.damping / w:g}); pass InfluenceFunction(..., damping=...) "
                + ("> 0" if not self.damping > 0 else "larger")
                + " (e.g. 1e-3 of the curvature's scale: a cross-entropy model with a last-layer bias has an "
                "exact null direction, the logits' common shift)",
                stage=e.stage,
                damping=e.damping,
            ) from None
        grads = per_example_gradients(self.model, self.loss_fn, inputs, targets, chain=op.chain)
        mixed = op.chain.__dict__.get("_batch_dependent")
        if mixed is not None:  # (the rows are of each example alone, the curvature of the batch's function)
            raise UnsupportedStageError(
                "the model's output for an example depends on the rest of its batch (example "
                f"{mixed[0]} alone gives outputs {mixed[1]:.3g} away from its outputs in the batch: a "
                "branch on a batch statistic, a batch-wide normalization): influence scores need a "
                "training loss that is a sum of per-example losses -- here the curvature is of the batch's "
                "function and each training gradient of its example alone, two different functions. Make "
                "the model act on each example separately (eval-mode BatchNorm, no branch on batch sums)"
            )
        if not fac.positive_definite and fac.perturbed and fac.inertia.negative == 0:
            warn(
                f"H + lambda I (lambda = {self.damping:g}) is singular to working precision (pivots "
                "perturbed, no eigenvalue found negative): the scores are those of the refined solves, "
                "accurate to their reported residuals only -- use a larger damping",
                AccuracyWarning,
            )
        elif not fac.positive_definite:
            hessian = self.curvature_cls is Hessian
            advice = (
                "use curvature='gauss_newton' or a larger damping"
                if hessian
                else "a damping > 0 (G is positive semi-definite for the targets its loss defines: check "
                "the targets too)"
            )
            warn(
                f"{'H' if hessian else 'G'} + lambda I (lambda = {self.damping:g}) is indefinite, inertia "
                f"{tuple(fac.inertia)}: the scores are exact for this matrix, but influence functions assume "
                f"a positive definite curvature -- {advice}"
            )
        self.operator, self.factorization, self._weight = op, fac, w
        self._at, self._held = op.chain.to_public(op.chain.flat_params()), op.chain.held_state(modes=False)
        self.train_gradients = grads
        return self

    def _batch_weight(self, op: CurvatureOperator, targets: Tensor, yc: Tensor, n: int | None) -> float:
        """``N / B`` for a loss that sums over the examples (see :meth:`fit`), else 1."""
        if n is not None and (isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1):
            raise InvalidArgumentError(f"training_examples must be an int >= 1, got {n!r}")
        if n is None and yc is targets:  # (the curvature of the training set itself)
            return 1.0
        Xc = op.inputs
        with exact_no_grad():
            out = op.chain.forward(Xc[: min(2, int(Xc.shape[0]))])[-1]
        if not sums_examples(self.loss_fn, out, op.chain.prepare_targets(yc[: int(out.shape[0])])):
            return 1.0
        # (a curvature batch of at least N examples is the training set's own, N given or not: N / B < 1
        # factored 0.5 H in distributed_influence_scores where influence_scores factors H; a probe)
        B = count_examples(self.loss_fn, yc)
        return max(1.0, (int(n) if n is not None else count_examples(self.loss_fn, targets)) / B)

    @property
    def inertia(self) -> Inertia:
        """``(negative, zero, positive)`` eigenvalue counts of ``H + lambda I``."""
        return self._fac().inertia

    @property
    def positive_definite(self) -> bool:
        """Whether ``H + lambda I`` is positive definite (every Riccati pivot is): the influence
        scores are then those of a strictly convex loss's minimizer."""
        return self._fac().positive_definite

    def _fac(self) -> Factorization:
        """The factorization of :meth:`fit` (a named error before it, or if the model moved since: its
        solves and counts are of the fit point's curvature -- ``inverse_hvp`` and ``inertia`` answered)."""
        if self.factorization is None:
            raise NotFittedError("call fit(inputs, targets) first")
        self._check_unmoved()
        return self.factorization

    def _check_unmoved(self) -> None:
        """A named error if the model's parameters or buffers changed since :meth:`fit`."""
        if self.operator is not None and self._at is not None:
            self.operator.chain.check_params(self._at, "the influence function", self._held)

    def _gradients(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """Per-example gradients at the point :meth:`fit` factored at (a named error if the model moved)."""
        self._check_unmoved()
        chain = None if self.operator is None else self.operator.chain
        return per_example_gradients(self.model, self.loss_fn, inputs, targets, chain=chain)

    def _train_grads(self, inputs: Tensor | None, targets: Tensor | None) -> Tensor:
        if inputs is None:
            if self.train_gradients is None:
                raise NotFittedError("call fit(inputs, targets) first")
            # the stored gradients are the fit point's, like the factorization: a moved model gets the same
            # named error as influences() (self_influence() returned the fit point's values silently)
            self._check_unmoved()
            return self.train_gradients
        return self._gradients(inputs, targets)

    @linalg.symmetric_in_rhs
    def inverse_hvp(self, vectors: Tensor, chunk: int = 2048) -> Tensor:
        """``(H + lambda I)^{-1} V`` for ``vectors`` V of shape (k, n), as (k, n) (one vector of shape (n,),
        as (n,)): batched solves of ``chunk`` right-hand sides, with iterative refinement -- fewer where
        a solve's working copies (:data:`SOLVE_COPIES` float64 columns of ``n`` each) of ``chunk`` columns
        would take more than a quarter of the memory still available (an ``Embedding(50000, 16)`` model's
        128 self-influences took 11 GB at 2048)."""
        fac = self._fac()
        if not isinstance(vectors, Tensor):
            raise InvalidArgumentError(
                f"vectors must be a torch.Tensor of shape (k, n) or (n,), got {type(vectors).__name__}: "
                "convert with torch.as_tensor"
            )
        chunk = _check_chunk(chunk)
        if vectors.is_complex():  # (.to(float) would drop the imaginary part, with torch's warning only)
            raise InvalidArgumentError(
                f"vectors must be real, got {vectors.dtype}: solve the real and imaginary parts separately"
            )
        if vectors.dim() not in (1, 2) or vectors.shape[-1] != fac.op.shape[0]:
            raise ShapeMismatchError(
                f"vectors must have shape (k, n) or (n,), n = {fac.op.shape[0]}; got {tuple(vectors.shape)}"
            )
        if vectors.dtype != fac.op.dtype:  # (as the factorization's solve: no silent rounding or casting)
            raise DtypeMismatchError(
                f"vectors are {vectors.dtype}, the curvature {fac.op.dtype}: convert with "
                f"vectors.to({fac.op.dtype})"
            )
        if vectors.dim() == 1:
            return self.inverse_hvp(vectors[None], chunk)[0]
        V = vectors
        free = _memory_bytes(V.device)
        if free is not None:
            chunk = max(1, min(chunk, free // (4 * SOLVE_COPIES * 8 * max(V.shape[1], 1))))
        w = self._weight  # (w H_B + lambda I)^-1 = (H_B + lambda / w I)^-1 / w (see fit)
        out = [fac.solve(V[i : i + chunk].T.contiguous()).T / w for i in range(0, len(V), chunk)]
        return torch.cat(out) if out else V.clone()

    def influences(
        self,
        test_inputs: Tensor,
        test_targets: Tensor,
        inputs: Tensor | None = None,
        targets: Tensor | None = None,
    ) -> Tensor:
        """``(n_test, N)`` scores ``-grad L(test_j)^T (H + lambda I)^{-1} grad L(train_i)``.

        Training examples default to those of :meth:`fit`. One solve with ``n_test`` right-hand sides.
        """
        fac = self._fac()
        Gtr = self._train_grads(inputs, targets)
        Gte = self._gradients(test_inputs, test_targets).to(fac.op.dtype)
        return -(self.inverse_hvp(Gte) @ Gtr.T)

    def self_influence(self, inputs: Tensor | None = None, targets: Tensor | None = None) -> Tensor:
        """``(N,)``: ``grad L(z_i)^T (H + lambda I)^{-1} grad L(z_i)`` (positive for a positive definite
        curvature; minus the diagonal of :meth:`influences` of the training set on itself)."""
        G = self._train_grads(inputs, targets)
        return (self.inverse_hvp(G) * G).sum(1)


#: float64 copies of its right-hand sides a refined solve holds at its peak (measured: about 9 on an
#: ``Embedding(50000, 16)`` model, 64 columns of n = 800k: +3.7 GB), with a margin
SOLVE_COPIES = 12


def _check_pairs(train: object, test: object, curvature_batch: object) -> None:
    """:class:`InvalidArgumentError` unless ``train``, ``test`` (and ``curvature_batch`` if given) are
    ``(inputs, targets)`` pairs."""
    for name, pair in (("train", train), ("test", test), ("curvature_batch", curvature_batch)):
        if pair is not None and not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise InvalidArgumentError(f"{name} must be an (inputs, targets) pair, got {type(pair).__name__}")


def influence_scores(
    model: nn.Module,
    loss_fn: LossFn,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    curvature: str = "hessian",
    damping: float = 0.0,
    curvature_batch: tuple[Tensor, Tensor] | None = None,
    precision: str = "working",
) -> Tensor:
    """``(n_test, N)`` influence scores in one call; see :class:`InfluenceFunction`."""
    _check_pairs(train, test, curvature_batch)
    cx, cy = curvature_batch if curvature_batch is not None else (None, None)
    inf = InfluenceFunction(model, loss_fn, curvature, damping, precision).fit(*train, cx, cy)
    return inf.influences(*test)


def distributed_influence_scores(
    model: nn.Module,
    loss_fn: LossFn,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    curvature: str = "hessian",
    damping: float = 0.0,
    curvature_batch: tuple[Tensor, Tensor] | None = None,
    group: Any = None,
    precision: str = "working",
) -> Tensor:
    """:func:`influence_scores` split over the ranks of a ``torch.distributed`` process ``group``.

    Every rank passes the same ``model``, data and settings. Each rank factors the same ``H + lambda I``
    (on ``curvature_batch``, default the whole training set: deterministic, so the same on every rank),
    solves ``(H + lambda I)^{-1} grad L(test_j)`` once, and scores only its contiguous shard of the
    training set (``torch.tensor_split`` of the ``N`` examples into ``world_size`` parts, rank order);
    the ``(n_test, N_r)`` blocks are all-gathered in rank order, so every rank returns the full
    ``(n_test, N)`` matrix of the single-process call (up to the rounding of the shorter products).
    Run it under :func:`hessinv.optim.distributed.launch` or ``torchrun``.
    """
    from hessinv.errors import DistributedError
    from hessinv.optim.distributed import _any_rank, _gather_rows, _group_info, _same_everywhere

    rank, world = _group_info(group)
    _check_pairs(train, test, curvature_batch)  # (the same on every rank: each raises it)
    X, y = train
    n = int(X.shape[0])
    _same_everywhere(n, "the number of training examples", group)
    if n < world:
        raise DistributedError(f"{n} training examples for {world} ranks: use at most {n} processes")
    Xr, yr = torch.tensor_split(X, world)[rank], torch.tensor_split(y, world)[rank]
    Xc, yc = curvature_batch if curvature_batch is not None else (X, y)
    error: Exception | None = None
    try:
        inf = InfluenceFunction(model, loss_fn, curvature, damping, precision)
        # (N: what a summed loss sums over, all ranks' examples)
        inf.fit(Xr, yr, Xc, yc, training_examples=count_examples(loss_fn, y))
        block = inf.influences(*test)  # (n_test, N_r)
    except Exception as e:  # every rank learns of one rank's failure before the all-gather, which the
        error = e  # others would wait in until the collective timeout (a class out of range in one shard)
    if _any_rank([error is not None], group)[0]:
        if error is not None:
            raise error
        raise DistributedError(
            "distributed_influence_scores failed on another rank (its error names the cause): no scores"
        )
    return torch.cat(_gather_rows(block.T.contiguous(), group)).T
