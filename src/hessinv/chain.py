"""Split a model + loss into stages, run the forward pass, and linearize every stage.

``Chain(model, loss_fn)`` reads the model as stages ``z_l = f_l(z_{l-1}; x_l)`` (math.md §1):

* an ``nn.Sequential`` (or a list of modules) is read child by child; any other ``nn.Module`` (a
  custom module, a ``Sequential`` subclass with its own ``forward``) is traced with ``torch.fx``
  and its graph is cut into stages at every node through which all later computation flows (a
  *cut*: the one value alive between two stages). ``z + f(z)`` residual blocks are single stages.
  A graph with more than one input or output is refused with :class:`NotAChainError`;
* ``Linear`` followed by an elementwise activation (module, ``torch.tanh(x)``, ``F.gelu(x)``,
  ``x.relu()``) -> one structured :class:`DenseStage`; ``z + act(Linear(z))`` -> a residual
  :class:`DenseStage`; a standalone activation -> :class:`ElementwiseStage`;
* ``Identity`` / ``Flatten`` / eval-mode ``Dropout`` -> :class:`ReshapeStage` (no-ops on per-example
  flat activations);
* anything else (a module with hooks or parametrizations, normalizations, convolutions, a traced
  piece of a custom ``forward``) -> :class:`GenericStage` (plain autograd on the real parameters);
* the loss -> the last, parameter-free :class:`LossStage`; targets ride along.

Modules that are random or use batch statistics in training mode, backward hooks and global module
hooks are refused with :class:`UnsupportedStageError`: hessinv never differentiates a function other
than the one the model computes.

``linearize`` does one forward pass keeping every ``z_l``, then one backward pass that computes
``b_{l-1} = Jz_l^T b_l`` (backprop, ``b_L = 1``), the gradient ``g_l = Jx_l^T b_l``, and each
stage's blocks at its own ``(z_{l-1}, b_l)``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import itertools
import math
import numbers
import operator
import random
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.utils import parametrize

from hessinv import linalg
from hessinv.errors import (
    DtypeMismatchError,
    HessinvError,
    InvalidArgumentError,
    NonFiniteError,
    NotAChainError,
    ShapeMismatchError,
    TooLargeError,
    UnsupportedStageError,
    warn,
)
from hessinv.stages import (
    Blocks,
    DenseStage,
    ElementwiseStage,
    FunctionActivation,
    GenericStage,
    LossStage,
    ReshapeStage,
    Stage,
    customized,
    is_elementwise,
)
from hessinv.stages.generic import (
    MISSING,
    IdentityBlocks,
    LazyBlocks,
    NoDoubleBackward,
    NoFastPath,
    _grads,
    held_tensors,
    hook_dicts,
    mixing_error,
    mixing_too,
    plain_settings,
    same_value,
    watchable,
)
from hessinv.stages.losses import closed_form, loss_name, plain_module, prepare_targets, uncompiled
from hessinv.stages.protocol import compiled_module, defined_in_torch, unshared

#: a loss: ``loss_fn(outputs, targets) -> scalar`` (a module such as ``nn.CrossEntropyLoss()``, a function
#: such as ``F.cross_entropy``, or a lambda)
LossFn = Callable[[Tensor, Tensor], Tensor]

_DROPOUT = (nn.modules.dropout._DropoutNd, nn.AlphaDropout, nn.FeatureAlphaDropout)
_MODE_DEPENDENT = (*_DROPOUT, nn.RReLU, nn.modules.batchnorm._BatchNorm)


def training_layers(
    model: nn.Module | Sequence[nn.Module], among: Sequence[nn.Module] | None = None
) -> list[nn.Module]:
    """The model's modules in training mode whose training mode makes it random, stateful or mix examples
    and whose eval mode is a deterministic per-example function: Dropout layers (``p > 0``),
    ``MultiheadAttention`` with attention dropout, a multi-layer RNN with dropout between its layers,
    ``RReLU``, BatchNorm that tracks running statistics (eval mode normalizes with them), spectral_norm
    (its power iteration), and a user's module whose ``forward`` reads its ``training`` flag
    (``F.dropout(x, p, self.training)``, ``if self.training: ...``). The optimizers take the gradient
    with these as they are and the curvature with them in eval mode (:func:`layers_in_mode`): the
    curvature of the deterministic network, as K-FAC and Laplace approximations take it. ``among``: the
    model's :func:`mode_modules`, if kept (a step's check costs a microsecond then, not a walk over every
    module)."""
    mods = mode_modules(model) if among is None else among
    return [m for m in mods if m.training and _random_in_training(m)]


def mode_modules(model: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    """The model's modules of the kinds :func:`training_layers` looks at, in any mode (an optimizer keeps
    the list: its model's submodules are watched, :meth:`Chain.check_model`)."""
    tops = [model] if isinstance(model, nn.Module) else list(model)
    kinds = (*_DROPOUT, nn.MultiheadAttention, nn.RReLU, nn.modules.batchnorm._BatchNorm, nn.RNNBase)
    return [m for top in tops for m in top.modules() if isinstance(m, kinds) or _reads_training(m)]


def _eval_for_now(m: Any) -> bool:
    """Whether ``m`` is a user's module that reads its ``training`` flag and is in eval mode now (the
    optimizers' chain is split with :func:`training_layers` in eval mode)."""
    return isinstance(m, nn.Module) and not m.training and _reads_training(m)


def _reads_training(m: nn.Module) -> bool:
    """Whether ``m``, of no kind :func:`mode_modules` names, behaves otherwise in training mode: a
    spectral_norm parametrization or hook (a power-iteration step per call), or a module defined outside
    torch whose class's ``forward`` reads an attribute ``training`` (its compiled code's names, and those
    of functions defined inside it: not a comment, a string or ``self.training_steps``)."""
    from torch.nn.utils.parametrizations import _SpectralNorm
    from torch.nn.utils.spectral_norm import SpectralNorm

    hooks = m._forward_pre_hooks.values()
    if isinstance(m, _SpectralNorm) or any(isinstance(h, SpectralNorm) for h in hooks):
        return True
    return not defined_in_torch(type(m)) and _forward_mentions_training(type(m))


@functools.lru_cache(maxsize=256)
def _forward_mentions_training(cls: type) -> bool:
    code = getattr(inspect.unwrap(cls.forward), "__code__", None)
    stack = [code] if code is not None else []
    while stack:
        c = stack.pop()
        if "training" in c.co_names or "training" in c.co_consts:  # (getattr(self, "training") too)
            return True
        stack.extend(k for k in c.co_consts if inspect.iscode(k))
    return False


def _random_in_training(m: nn.Module) -> bool:
    """Whether ``m`` (of :func:`mode_modules`) is random, stateful or mixes examples in training mode."""
    if isinstance(m, _DROPOUT):
        return m.p > 0
    if isinstance(m, nn.MultiheadAttention):
        return m.dropout > 0  # (its attention weights')
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return m.running_mean is not None
    if isinstance(m, nn.RNNBase):
        return m.dropout > 0 and m.num_layers > 1
    return True  # RReLU, spectral_norm, a user's module that reads its training flag


@contextlib.contextmanager
def layers_in_mode(layers: Sequence[nn.Module], training: bool) -> Iterator[None]:
    """``m.training = training`` for the modules ``layers`` inside the block (not their children: the
    layers of :func:`training_layers` have none that matter), their modes put back after."""
    before = [m.training for m in layers]
    for m in layers:
        m.training = training
    try:
        yield
    finally:
        for m, b in zip(layers, before, strict=True):
            m.training = b


def deterministic_chain(
    model: nn.Module | Sequence[nn.Module], loss_fn: LossFn
) -> tuple[Chain, list[nn.Module]]:
    """The optimizers' chain: the model split with its :func:`training_layers` in eval mode (the
    deterministic network, whose curvature they take), and its :func:`mode_modules`, which they keep."""
    mods = mode_modules(model)
    with layers_in_mode(training_layers(model, mods), False):
        try:  # (ordered like model.parameters() where it can be: the chain older checkpoints were saved in)
            return Chain(model, loss_fn), mods
        except ParameterOrderError:  # the optimizers' vectors are their own: the stages' order
            return Chain(model, loss_fn, ordered=False), mods


def operator_chain(model: nn.Module | Sequence[nn.Module], loss_fn: LossFn) -> Chain:
    """The chain the operators split ``model`` into: in the order ``forward`` uses the parameters
    (``Chain(..., ordered=False)``), whatever order the model registers them in -- the operators give
    their vectors in ``model.parameters()``'s order all the same (:meth:`Chain.to_public`). (An ordered
    split calls whole a submodule whose children are registered out of order: 3-4x slower factorizations
    for the same numbers.)"""
    return Chain(model, loss_fn, ordered=False)


def _numpy_state() -> tuple:
    """numpy's global ``RandomState``'s state, comparable with ``==``."""
    st = np.random.get_state()
    return st[0], st[1].tobytes(), *st[2:]


def _rng_states(torch_too: bool) -> tuple:
    """The global random number generators' states: Python's ``random``, numpy's and -- ``torch_too`` --
    torch's (CPU, and the CUDA devices' where CUDA is initialized); hessinv draws from its own generators
    only."""
    if not torch_too:
        return random.getstate(), _numpy_state()
    cuda = (
        tuple(bytes(t.numpy()) for t in torch.cuda.get_rng_state_all()) if torch.cuda.is_initialized() else ()
    )
    return random.getstate(), _numpy_state(), bytes(torch.random.get_rng_state().numpy()), cuda


#: torch functions that draw from torch's default generator (unless passed a ``generator=``)
_RANDOM_FUNCTIONS = frozenset({
    "rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "bernoulli",
    "multinomial", "normal", "poisson", "dropout", "alpha_dropout", "feature_alpha_dropout", "dropout1d",
    "dropout2d", "dropout3d", "rrelu", "uniform_", "normal_", "bernoulli_", "random_", "exponential_",
    "geometric_", "log_normal_", "cauchy_", "fractional_max_pool2d", "fractional_max_pool3d",
})  # fmt: skip


class _OwnDraws(torch.overrides.TorchFunctionMode):
    """Whether this thread draws from a global generator inside the block: torch's random functions
    without a ``generator=`` (a torch function mode, which is this thread's), and -- by this thread's
    profile hook -- calls into Python's global ``random`` instance. (numpy's global ``RandomState`` has
    Cython methods, which the hook does not see: its state is compared, as any thread's.)"""

    def __init__(self, torch_too: bool):
        super().__init__()
        self.torch_too, self.drew = torch_too, False

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if self.torch_too and kwargs.get("generator") is None:
            self.drew |= getattr(func, "__name__", "") in _RANDOM_FUNCTIONS
        return func(*args, **kwargs)

    def _profile(self, frame: Any, event: str, arg: Any) -> None:
        if event == "c_call" and getattr(arg, "__self__", None) is random._inst:  # (identity: not ==)
            self.drew = True

    def __enter__(self) -> _OwnDraws:
        self._previous = sys.getprofile()
        sys.setprofile(self._profile)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        sys.setprofile(self._previous)
        super().__exit__(*exc)


def without_draws(fn: Callable[[], Any], what: str, torch_too: bool = True) -> Any:
    """``fn()``, refused (:class:`UnsupportedStageError`, also in place of another refusal the draws
    caused, such as "a parameter the forward pass does not use") where it draws from a global random
    number generator: the model's function changes from call to call (``if self.training and
    random.random() < p: return x``, LayerDrop or stochastic depth, gave the curvature of whichever
    network the draws made, or a misleading refusal). Drawing always advances a generator's state, so the
    check is exact, whatever the draws were; the generators are shared by the process's threads, so where
    a state moved, a second call watches this thread's own calls (:class:`_OwnDraws`: a background thread
    that drew meanwhile -- a data loader's -- refused a deterministic model 19 times in 20).
    ``torch_too=False`` (around a whole pass, whose loss has its own check: a loss may seed torch's
    generator itself) watches Python's and numpy's."""
    before = _rng_states(torch_too)
    try:
        out = fn()
    except HessinvError:
        if _rng_states(torch_too) == before:
            raise
    else:
        if _rng_states(torch_too) == before:
            return out
    watch, numpy_before = _OwnDraws(torch_too), _numpy_state()
    try:
        with watch:
            out = fn()
    except HessinvError:
        if not (watch.drew or _numpy_state() != numpy_before):
            raise
    else:
        if not (watch.drew or _numpy_state() != numpy_before):  # (another thread moved the state)
            return out
    raise UnsupportedStageError(
        f"{what}: the model's forward pass draws from a global random number generator (Python's random, "
        "numpy's or torch's: LayerDrop or stochastic depth in training mode, injected noise), so each call "
        "computes another function and it has no curvature; call model.eval() first (the optimizers in "
        "hessinv.optim do so for the curvature), or draw from a torch.Generator seeded anew at every call "
        "(one that advances between calls is random too)"
    )


def _changed(now: list, held: list) -> bool:
    """Whether the items of ``now`` are not ``held``, one by one by identity."""
    return len(now) != len(held) or any(map(operator.is_not, now, held))


def _stages_code(stages: list[Stage]) -> tuple:
    """What each stage computes, up to its tensors' values: the model's own modules, a traced piece's
    code, the function and arguments of a traced activation call."""

    def key(m: nn.Module) -> Any:
        if isinstance(m, fx.GraphModule):  # tensor constants are buffers, not in the code
            return m.code, tuple((k, id(v)) for k, v in m.named_buffers())
        if isinstance(m, FunctionActivation):
            return repr((m.fn, m.args, m.kwargs))
        return id(m)

    return tuple((type(s).__name__, tuple(key(m) for m in s.modules)) for s in stages)


#: Elementwise functions recognised in traced code (first argument: the activation).
_ACT_FUNCTIONS = {
    torch.tanh, torch.sigmoid, torch.relu, F.relu, F.tanh, F.sigmoid, F.gelu, F.silu, F.elu, F.softplus,
    F.leaky_relu, F.mish, F.celu, F.selu, F.softsign, F.tanhshrink, F.hardtanh, F.relu6, F.logsigmoid,
    F.hardsigmoid, F.hardswish, F.hardshrink, F.softshrink, torch.special.expit,
}  # fmt: skip
_ACT_METHODS = {"tanh", "sigmoid", "relu", "tanh_", "sigmoid_", "relu_"}
_ADD = (operator.add, torch.add, operator.iadd)


# -- reading a model ------------------------------------------------------------------------------
def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _plain_linear(m: nn.Module) -> bool:
    """An ``nn.Linear`` whose ``weight``/``bias`` are trainable leaf parameters and nothing else runs."""
    return (
        type(m) is nn.Linear
        and not customized(m)
        and isinstance(m.weight, nn.Parameter)
        and all(t.requires_grad for t in m.parameters())
        and not _hooked(m)
        and not parametrize.is_parametrized(m)
    )


def _is_reshape(m: nn.Module) -> bool:
    if _hooked(m) or customized(m):
        return False
    if type(m) is nn.Identity:
        return True
    if type(m) is nn.Flatten:
        return m.start_dim >= 1 or m.start_dim < -1
    if type(m) is nn.Unflatten:
        return m.dim >= 1
    return isinstance(m, _DROPOUT) and (not m.training or m.p == 0)


def _leaf_spec(m: nn.Module, label: str | None = None) -> tuple:
    if _plain_linear(m):
        return ("linear", m)
    if is_elementwise(m):
        return ("act", m)
    if _is_reshape(m):
        return ("reshape", m)
    return ("generic", m, None, label)


class _Tracer(fx.Tracer):
    """torch.fx's default tracer, except that modules whose call runs more than their ``forward``
    (hooks, parametrizations) stay whole: they are called, hooks and all, never traced through; so do
    the modules of ``whole``. ``failed_in``: the innermost module whose ``forward`` raised while traced
    (an untraceable piece of a model: ``torch.ones(T, T)`` with ``T`` read from the input's shape).
    Each node records the module calls it was traced in, outermost first, as numbers (``meta[_CALLS]``;
    ``called`` maps each to its module): a leaf's ``call_module`` node ends with its own."""

    def __init__(self, whole: Sequence[nn.Module] = ()):
        super().__init__()
        self.whole = list(whole)
        self.failed_in: nn.Module | None = None
        self.called: dict[int, nn.Module] = {}
        self._calls: list[int] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _leaf_module(m, self.whole)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        k = len(self.called)
        self.called[k] = m
        self._calls.append(k)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # (the innermost sees it first)
                self.failed_in = m
            raise
        finally:
            self._calls.pop()

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        node.meta[_CALLS] = tuple(self._calls)
        return node


_FX_RULE: list[fx.Tracer] = []  # one plain tracer, built on first use, for torch.fx's leaf rule


def _leaf_module(m: nn.Module, whole: Sequence[nn.Module] = ()) -> bool:
    """Whether :class:`_Tracer` (with ``whole``) keeps ``m`` whole: hooks, a parametrization, a replaced
    ``forward``, one of ``whole``, or torch.fx's own rule (torch's modules but containers). Without building
    a tracer per module: each construction scans the ``math`` module (60 us; 1.6 of the 5.2 ms that a
    64-stage chain's split took)."""
    if _hooked(m) or parametrize.is_parametrized(m) or customized(m) or any(w is m for w in whole):
        return True
    if not _FX_RULE:
        _FX_RULE.append(fx.Tracer())
    return _FX_RULE[0].is_leaf_module(m, "")


#: a traced node's meta key: the module calls it was traced in (:class:`_Tracer`)
_CALLS = "hessinv_calls"


class exact_no_grad(torch.no_grad):  # noqa: N801 - used as torch.no_grad is, a decorator too
    """``torch.no_grad()`` with torch's fused transformer inference path off
    (:class:`~hessinv.stages.generic.NoFastPath`: it would zero a padding mask's positions, which a mean
    over positions then reads), so hessinv's forward passes compute the function its derivatives are of."""

    def __enter__(self) -> None:
        _NO_FAST_PATH.__enter__()
        super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        _NO_FAST_PATH.__exit__(*exc)


_NO_FAST_PATH = NoFastPath()  # (its state is the class's: one instance serves every call)


#: buffers and frozen tensors of at most this many entries are copied for :meth:`Chain.held_state`;
#: larger ones are known by their storage, version counter, shape and dtype
HELD_COPY = 2**16


def same_tensor(a: Tensor, b: Tensor) -> bool:
    """The same shape, dtype and values (NaN unequal, as ``torch.equal`` has it)."""
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))


def model_parts(model: Any) -> list[nn.Module]:
    """The modules a model runs in turn: its items for a list, tuple or ``nn.ModuleList`` (which has no
    ``forward`` of its own), else the model itself."""
    return list(model) if isinstance(model, (list, tuple, nn.ModuleList)) else [model]


_NOT_A_MODULE = (
    "expected an nn.Module or a list of modules, got {}: wrap the function's layers in an nn.Sequential "
    "(or a module whose forward calls them in order)"
)


def check_loss_fn(loss_fn: Any) -> None:
    """:class:`InvalidArgumentError` unless ``loss_fn`` is a callable loss instance (not a class)."""
    if not callable(loss_fn):
        raise InvalidArgumentError(f"loss_fn must be callable (loss_fn(outputs, targets)), got {loss_fn!r}")
    if isinstance(loss_fn, type):
        raise InvalidArgumentError(
            f"loss_fn is the class {loss_fn.__name__}, not a loss: pass an instance, {loss_fn.__name__}()"
        )


def as_module(model: Any) -> Any:
    """A list, tuple or ``nn.ModuleList`` of modules as the ``nn.Sequential`` of the same modules (their
    parameters shared), for code that needs one module (``torch.func.functional_call``); a module as it
    is. Anything else -- a function, None, a tensor, a list holding anything but modules -- is a
    :class:`NotAChainError` (the applications' entry points met it as an AttributeError)."""
    if not isinstance(model, (nn.Module, list, tuple)):
        raise NotAChainError(_NOT_A_MODULE.format(type(model).__name__))
    if isinstance(model, (list, tuple, nn.ModuleList)):
        bad = [type(m).__name__ for m in model if not isinstance(m, nn.Module)]
        if bad:
            raise NotAChainError(
                f"a model given as a list holds {', '.join(sorted(set(bad)))}, not only modules: wrap each "
                "function in a module (nn.Tanh() for torch.tanh, or an nn.Module whose forward calls it)"
            )
        return nn.Sequential(*model)
    return model


def _is_container(m) -> bool:
    return isinstance(m, (list, tuple, nn.ModuleList)) or (
        isinstance(m, nn.Sequential)
        and type(m).forward is nn.Sequential.forward
        and not _hooked(m)
        and not customized(m)
    )


def _defaults_after_first(forward) -> dict | None:
    """``forward``'s arguments after the first that have defaults (``forward(x, mask=None)``), to be
    traced at those defaults: a chain takes one input. None when there are none (or any without)."""
    try:
        params = list(inspect.signature(forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    plain = [q for q in params if q.kind not in (q.VAR_POSITIONAL, q.VAR_KEYWORD)]
    if not plain or any(q.default is q.empty for q in plain):
        return None
    return {q.name: q.default for q in plain}


def _differentiates(graph: fx.Graph) -> bool:
    """A traced forward calls autograd (``torch.autograd.grad`` or ``.backward()``: a physics-informed
    net's ``du/dx`` under ``torch.enable_grad()``), whose grad mode torch.fx does not record: its pieces
    would run without the graph it differentiates."""
    calls = (torch.autograd.grad, torch.autograd.backward, torch.Tensor.backward)
    return any(
        (n.op == "call_function" and n.target in calls) or (n.op == "call_method" and n.target == "backward")
        for n in graph.nodes
    )


def _variadic(forward) -> bool:
    """``forward`` takes ``*args`` or ``**kwargs``: torch.fx binds one placeholder to each (``args`` would be
    the batch itself, ``args[0]`` its first example), so it is traced through a call with one input."""
    try:
        params = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(q.kind in (q.VAR_POSITIONAL, q.VAR_KEYWORD) for q in params)


class _OneInput(nn.Module):
    """``module(x)``: the one-input call through which a variadic ``forward`` is traced."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> Any:
        return self.module(x)


class _CallWhole(Exception):
    """Internal: the stages traced out of ``module`` are not a chain where ``module`` called whole may be
    one (intermediate values not batch-first, one layer used twice, parameters used out of order, a
    piece that is not per-example on its own): split again with it as one stage. ``error``: what to
    raise if it fails called whole too."""

    def __init__(self, module: nn.Module, error: HessinvError | None = None):
        super().__init__(type(module).__name__)
        self.module, self.error = module, error


class _WholeFailed(Exception):
    """Internal: a module called whole on trial (:meth:`Chain._guarded`) failed too."""


def _specs(
    m, top: bool, traced: list[nn.Module], whole: list[nn.Module]
) -> list[tuple[tuple, nn.Module | None, Uses | None]]:
    """The stage specifications of ``m`` in chain order (see :func:`split_stages`), each with the module
    traced to find it (None for a module called as it is) and, for a traced piece, where in that module's
    calls it uses its parameters (:data:`Uses`); the modules traced through (whose plain attributes the
    traced code may have baked in) are appended to ``traced``. The modules in ``whole`` are called whole,
    not traced."""
    if compiled_module(m):  # torch.compile's wrapper: the same function and parameters, traceable
        m = m._orig_mod
    if any(w is m for w in whole):
        return [(_leaf_spec(m), None, None)]
    if _is_container(m):
        # a nested container's layers come from it as a traced module's pieces do (the origin): where
        # they are no chain on data, it is called whole -- nn.Sequential(model) calls a Sequential model
        # whole where its own layers pass values that are not batch-first
        return [
            (sp, origin if origin is not None or top else m, uses)
            for child in m
            for sp, origin, uses in _specs(child, False, traced, whole)
        ]
    if not isinstance(m, nn.Module):
        raise NotAChainError(f"expected an nn.Module or a list of modules, got {type(m).__name__}")
    if _leaf_module(m, whole):
        return [(_leaf_spec(m), None, None)]
    tracer = _Tracer(whole)
    before = _attributes(m)
    try:
        with _trace_guards(tracer) as inference, _buffers_kept(m.modules()):
            if _variadic(m.forward):  # forward(self, *args) / (self, x, **kwargs): traced as called, m(x)
                graph = tracer.trace(_OneInput(m))
            else:
                graph = tracer.trace(m, concrete_args=_defaults_after_first(m.forward))
        if _differentiates(graph):  # its real forward, called whole, differentiates as it means to
            _restore_attributes(before)
            return [(_leaf_spec(m), None, None)]
        if inference:
            raise UnsupportedStageError(
                f"{type(m).__name__}.forward enters torch.inference_mode(), which torch.fx cannot record: "
                "use .detach() on the tensors that must be constants instead"
            )
        _detach_no_grad(graph)
        _plain_constants(graph)
        _fold_parameter_metadata(graph, tracer.root)
        specs = _graph_specs(tracer.root, graph, type(m).__name__, tracer.called)
    except Exception as e:  # noqa: BLE001 - any tracing failure
        _restore_attributes(before)
        if not top:  # a piece of a Sequential: call it whole (its real forward, by autograd)
            return [(_leaf_spec(m), None, None)]
        if isinstance(e, HessinvError):
            raise
        culprit = tracer.failed_in
        if culprit is not None and culprit is not m and not any(w is culprit for w in whole):
            # a submodule fx cannot trace through: the model split again with it called whole, as a
            # piece of a Sequential is (one generic stage, exact)
            raise _CallWhole(culprit) from e
        # the model itself: called whole, as one generic stage, as nn.Sequential(model) would be (exact;
        # a forward with a loop over x.shape[1], or torch.zeros(x.shape[0], h), was refused here)
        _warn_called_whole(
            f"{type(m).__name__}.forward could not be traced with torch.fx ({type(e).__name__}: {e})",
            "write it as an nn.Sequential of stages, or make its forward traceable (e.g. x.new_zeros(...) "
            "for torch.zeros(x.shape[0], ...))",
        )
        return [(_leaf_spec(m), None, None)]
    state, stored = _restore_attributes(before)
    if stored and not top:
        # forward stores a value computed from its input (self.state = ..., a cached activation): the
        # trace stored fx's placeholder, now removed again; called whole, its real forward runs, and a
        # state that changes its outputs or buffers call after call is refused there (GenericStage)
        return [(_leaf_spec(m), None, None)]
    if state:  # the model itself: one stage for all of it would lose the chain
        raise UnsupportedStageError(
            f"{type(m).__name__}.forward stores a value computed from its input in a buffer or parameter: "
            "its state changes on every call, so it has no fixed curvature; update it outside forward "
            "(a cached activation in a plain attribute is fine)"
        )
    traced.extend(x for x in m.modules() if not tracer.is_leaf_module(x, "") or x is m)
    return [(sp, m, uses) for sp, uses in specs]


def _containers(values: Iterable[Any]) -> list[tuple[Any, Any]]:
    """Every list and dict reachable from ``values`` (nested ones too, each once: cycles are fine) with a
    shallow copy of its content, for :func:`_restore_attributes` (a cache a ``forward`` fills in place)."""
    out: list[tuple[Any, Any]] = []
    seen: set[int] = set()
    stack = list(values)
    while stack:
        x = stack.pop()
        if isinstance(x, (list, dict)) and not isinstance(x, nn.Module) and id(x) not in seen:
            seen.add(id(x))
            shallow = dict(x) if isinstance(x, dict) else list(x)
            out.append((x, shallow))
            stack.extend(shallow.values() if isinstance(shallow, dict) else shallow)
    return out


def _has_proxy(values: Iterable[Any]) -> bool:
    """Whether an fx Proxy is among ``values`` or inside the lists, tuples, sets and dicts they hold."""
    seen: set[int] = set()
    stack = list(values)
    while stack:
        x = stack.pop()
        if isinstance(x, fx.Proxy):
            return True
        if isinstance(x, (list, tuple, set, dict)) and id(x) not in seen:
            seen.add(id(x))
            stack.extend(x.values() if isinstance(x, dict) else x)
    return False


@contextlib.contextmanager
def _buffers_kept(mods: Iterable[nn.Module]) -> Iterator[None]:
    """The block with every buffer that ``mods`` hold themselves put back where it changed in place (a
    call counter in forward, ``self.n += 1``: each of hessinv's passes, and torch.fx's trace, advanced
    it). Buffers of up to 2^16 numbers are copied (counters, statistics; a large mask or table, which no
    forward updates in place in practice, is not). A change another thread makes to such a buffer while
    the block runs is undone too: the model is hessinv's during a pass."""
    held = [b for m in mods for b in m._buffers.values() if isinstance(b, Tensor) and b.numel() <= 2**16]
    saved = [(b, b._version, b.detach().clone()) for b in held]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, version, value in saved:
                if b._version != version:
                    b.copy_(value)


def _attributes(m: nn.Module) -> list[tuple[nn.Module, list[dict], list[tuple[Any, Any]]]]:
    """Copies of the attribute dictionaries of ``m`` and its submodules (plain attributes, parameters,
    buffers, submodules) and of the content of the lists and dicts they hold, nested or not, for
    :func:`_restore_attributes` after a trace or a call. None where every module of ``m`` is one of
    torch's that a call leaves as it was (:func:`_keeps_attributes`): no code of the user's runs that
    could set one (a deep ``nn.Sequential`` of layers: 3.5 ms of a 64-stage chain's 25 ms operator)."""
    mods = list(m.modules())
    if all(_keeps_attributes(x) for x in mods):
        return []
    return [
        (
            x,
            [dict(d) for d in (x.__dict__, x._parameters, x._buffers, x._modules)],
            _containers(vars(x).values()),
        )
        for x in mods
    ]


def _keeps_attributes(m: nn.Module) -> bool:
    """Whether calling ``m`` leaves its attributes as they were, by its class alone: torch.nn's own modules
    with torch's own ``forward`` and no hooks, except the recurrent ones (``forward`` refreshes
    ``_flat_weights``). (Buffers changed in place, BatchNorm's statistics, are :func:`_buffers_kept`'s.)"""
    return (
        type(m).__module__.startswith("torch.nn.modules.")
        and not isinstance(m, nn.RNNBase)
        and not customized(m)
        and not _hooked(m)
    )


def _restore_attributes(
    saved: list[tuple[nn.Module, list[dict], list[tuple[Any, Any]]]],
) -> tuple[bool, bool]:
    """Put back the attributes :func:`_attributes` saved: a traced ``forward`` that assigns ``self.x = ...``
    or fills a cache stored fx's placeholders (Proxy) in the user's model, or moved a counter, and fx
    itself adds its tensor constants (``_tensor_constant0``; the traced pieces hold their own copies).
    Each container gets its own content back, in place (identities kept). Returns whether ``forward``
    stored a value computed from its input (a Proxy) in a buffer or parameter (state), and anywhere."""
    state = stored = False
    for x, dicts, containers in saved:
        for now, was in zip((x.__dict__, x._parameters, x._buffers, x._modules), dicts, strict=True):
            changed = [now[k] for k in now if k not in was or now[k] is not was[k]]
            if _has_proxy(changed):
                stored = True
                state = state or now is x._buffers or now is x._parameters
            if changed or len(now) != len(was):
                now.clear()
                now.update(was)
        for obj, was in containers:
            if isinstance(obj, dict):
                same = obj.keys() == was.keys() and all(obj[k] is was[k] for k in was)
            else:
                same = len(obj) == len(was) and all(a is b for a, b in zip(obj, was, strict=True))
            if not same:
                stored = stored or _has_proxy(obj.values() if isinstance(obj, dict) else obj)
                if isinstance(obj, dict):
                    obj.clear()
                    obj.update(was)
                else:
                    obj[:] = was
    return state, stored


#: the modules on trial per chain and thread (:meth:`Chain._guarded`): {id(chain): {id(module): ...}}
_TRIALS = threading.local()

#: One trace at a time patches torch's grad-mode switches and ``Function.apply`` (:func:`_trace_guards`).
_TRACE_LOCK = threading.RLock()


@contextlib.contextmanager
def _trace_guards(tracer: fx.Tracer):
    """While ``tracer`` traces a forward (in this thread; one trace at a time): a custom
    ``torch.autograd.Function`` becomes one call node (its own ``backward`` defines its derivatives;
    traced through, its ``forward``'s would be taken); the nodes created while ``torch.no_grad()`` /
    ``set_grad_enabled(False)`` is in force -- invisible to the trace -- are marked (``meta["no_grad"]``,
    for :func:`_detach_no_grad`); an ``inference_mode`` is reported in the yielded list."""
    from torch.autograd.function import Function

    with _TRACE_LOCK:
        me = threading.get_ident()
        inference_seen: list[str] = []
        grad = [True]
        set_grad, inference, apply = (
            torch._C._set_grad_enabled,
            torch._C._InferenceMode,
            Function.__dict__["apply"],
        )
        create_node = tracer.create_node

        def recording_set_grad(mode: bool) -> None:
            if threading.get_ident() == me:
                grad[0] = bool(mode)
            set_grad(mode)

        def recording_inference(*args):
            if threading.get_ident() == me:
                inference_seen.append("inference_mode")
            return inference(*args)

        def traced_apply(cls, *args, **kwargs):
            proxies: list[fx.Proxy] = []
            fx.node.map_aggregate(
                (args, kwargs), lambda a: proxies.append(a) if isinstance(a, fx.Proxy) else None
            )
            if not proxies or threading.get_ident() != me:
                return apply.__get__(None, cls)(*args, **kwargs)
            return tracer.create_proxy("call_function", _function_call(cls), args, kwargs)

        def marking_create_node(*args, **kwargs):
            node = create_node(*args, **kwargs)
            if not grad[0]:
                node.meta["no_grad"] = True
            return node

        torch._C._set_grad_enabled, torch._C._InferenceMode = recording_set_grad, recording_inference
        Function.apply = classmethod(traced_apply)
        tracer.create_node = marking_create_node
        try:
            yield inference_seen
        finally:
            torch._C._set_grad_enabled, torch._C._InferenceMode = set_grad, inference
            Function.apply = apply
            del tracer.create_node


def _plain_constants(g: fx.Graph) -> None:
    """numpy scalars in the traced code (``x / np.sqrt(d)``) as Python numbers: fx writes them as
    ``np.float64(...)`` into code that has no ``np``."""

    def plain(a: Any) -> Any:
        return a.item() if isinstance(a, np.generic) else a

    for n in g.nodes:
        n.args, n.kwargs = fx.node.map_aggregate(n.args, plain), fx.node.map_aggregate(n.kwargs, plain)


#: a tensor's attributes that are metadata, not values (``x.to(self.l.weight.dtype)``)
_METADATA = frozenset({"dtype", "device", "shape", "ndim", "is_cuda", "layout"})


_NEW_LIKE = {  # tensor factories whose result depends on a parameter's metadata only
    "new_zeros": torch.zeros, "new_ones": torch.ones, "new_empty": torch.empty, "new_full": torch.full,
    "new_tensor": torch.tensor,
}  # fmt: skip
_LIKE = {torch.zeros_like: torch.zeros, torch.ones_like: torch.ones, torch.empty_like: torch.empty}


def _parameter(node: Any, root: nn.Module) -> Tensor | None:
    """The parameter a ``get_attr`` node reads, else None."""
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    try:
        return root.get_parameter(node.target)
    except AttributeError:
        return None


def _fold_parameter_metadata(g: fx.Graph, root: nn.Module) -> None:
    """A parameter's metadata read in the traced code (``x.to(self.l.weight.dtype)``,
    ``reshape(-1, self.o.weight.shape[1])``, ``w.size(0)``, ``x.type_as(w)``, ``w.new_zeros(n)``,
    ``torch.zeros_like(w)``) as the constant or the factory call it is: the read is no use of the
    parameter's value, and as a node it would put the parameter into a second stage (a false "shared
    parameter"). A later change of a parameter's dtype or device is refused (:meth:`Chain.check_model`)."""
    for n in list(g.nodes):
        t = _parameter(n.args[0] if n.args else None, root)
        if n.op == "call_method" and n.target == "type_as" and len(n.args) == 2 and not n.kwargs:
            other = _parameter(n.args[1], root)
            if other is None:
                continue
            with g.inserting_before(n):
                new = g.call_method("to", (n.args[0],), {"dtype": other.dtype, "device": other.device})
            n.replace_all_uses_with(new)
            g.erase_node(n)
            continue
        if t is None:
            continue
        factory = None
        if n.op == "call_function" and n.target is getattr and len(n.args) == 2 and n.args[1] in _METADATA:
            value = getattr(t, n.args[1])
        elif n.op == "call_method" and n.target in ("size", "dim", "numel") and set(n.kwargs) <= {"dim"}:
            value = getattr(t, n.target)(*n.args[1:], **n.kwargs)
        elif n.op == "call_method" and n.target in _NEW_LIKE:
            factory, args = _NEW_LIKE[n.target], n.args[1:]
        elif n.op == "call_function" and n.target in _LIKE and len(n.args) == 1:
            factory, args = _LIKE[n.target], (tuple(t.shape),)
        else:
            continue
        if factory is not None:
            kwargs = {"dtype": t.dtype, "device": t.device, **n.kwargs}
            if n.op == "call_function":
                kwargs.pop("memory_format", None)
            with g.inserting_before(n):
                new = g.call_function(factory, args, kwargs)
            n.replace_all_uses_with(new)
            g.erase_node(n)
            continue
        for u in list(n.users):
            u.args = fx.node.map_arg(u.args, lambda a, n=n, value=value: value if a is n else a)
            u.kwargs = fx.node.map_arg(u.kwargs, lambda a, n=n, value=value: value if a is n else a)
        g.erase_node(n)


def _detach_no_grad(g: fx.Graph) -> None:
    """Where a value computed under ``torch.no_grad()`` (:func:`_trace_guards`' mark) is used outside it,
    use it through ``.detach()``: autograd saw a constant there, and so will the chain. Parameters and
    buffers (``get_attr``) are exempt: their mark says only where they were first read."""
    for n in list(g.nodes):
        if not n.meta.get("no_grad") or n.op in ("placeholder", "get_attr", "output"):
            continue
        users = [u for u in n.users if not u.meta.get("no_grad")]
        if users:
            with g.inserting_after(n):
                d = g.call_method("detach", (n,))
            for u in users:
                u.replace_input_with(n, d)


def _function_call(cls: type) -> Callable:
    """``cls.apply`` as a plain function named after ``cls`` (a call node's target)."""

    def call(*args, **kwargs):
        return cls.apply(*args, **kwargs)

    call.__name__ = call.__qualname__ = f"{cls.__name__}_apply"
    return call


def batch_sizes_differ(inputs: Tensor, targets: Tensor) -> ShapeMismatchError:
    """The refusal of targets whose batch size is not the inputs'; where it is the inputs' first two axes
    together (``(B T,)`` targets of ``(B, T, ...)`` sequences), the advice to keep the batch axis: the
    curvature's structure is per example, and a model that flattens it away (``out.view(-1, C)``) mixes
    them for the chain."""
    hint, (B, T) = "", (inputs.shape[:2] if inputs.dim() >= 2 else (0, 0))
    if targets.dim() >= 1 and targets.shape[0] == B * T > 0:
        hint = (
            f"; targets of {B} x {T} positions flattened together? Keep the batch axis: targets "
            f"({B}, {T}), the model's outputs (batch, positions, "
            "classes) -- flatten inside loss_fn, e.g. lambda out, t: F.cross_entropy(out.flatten(0, 1), "
            "t.flatten()) -- or (batch, classes, positions) for nn.CrossEntropyLoss as it is"
        )
    return ShapeMismatchError(
        f"batch sizes differ: inputs {tuple(inputs.shape)}, targets {tuple(targets.shape)}{hint}"
    )


def _check_in_place(g: fx.Graph, gm: nn.Module, owner: str) -> None:
    """Refuse an in-place operation whose effect the traced graph would lose: one whose result is not
    used (dead-code elimination drops it, e.g. ``h.mul_(2)`` as a statement) or whose operand is read
    again after it (the graph would read the value before the write)."""
    order = {n: i for i, n in enumerate(g.nodes)}
    for n in g.nodes:
        if n.op == "call_module":
            in_place = getattr(gm.get_submodule(n.target), "inplace", False) is True
        elif n.op in ("call_method", "call_function"):
            name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
            in_place = (
                n.kwargs.get("inplace") is True
                or (name.endswith("_") and not name.startswith("_") and name != "requires_grad_")
                or n.target
                in (operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv)
            )
        else:
            continue
        if not in_place or not n.args or not isinstance(n.args[0], fx.Node):
            continue
        a = n.args[0]
        if not n.users or any(order[u] > order[n] for u in a.users if u is not n):
            how = (
                "as a statement (the traced graph keeps only the values it uses, so the change would be "
                "dropped)"
                if not n.users
                else "and reads it again afterwards (the traced graph would read the value before the change)"
            )
            fix = (
                "a parameter or buffer changed in forward has no fixed curvature: update it outside "
                "forward (in the training loop), or only where self.training is set and call model.eval()"
                if a.op == "get_attr"
                else "write it out of place (y = x + 1 rather than x.add_(1); no inplace=True), or pass "
                "nn.Sequential(model) to call the model whole (plain autograd, no stages)"
            )
            what = f"{_operand_label(gm, a)} in place ({_node_label(gm, n)})"
            raise UnsupportedStageError(f"{owner}.forward changes {what} {how}; {fix}")


def _operand_label(gm: nn.Module, a: fx.Node) -> str:
    """What the user calls the traced value ``a`` (torch.fx's node names are its own): ``self.<name>``'s
    output, a buffer, the input, an operation's result."""
    if a.op == "call_module":
        return f"the output of self.{a.target} ({type(gm.get_submodule(a.target)).__name__})"
    if a.op == "get_attr":
        return f"self.{a.target}"
    if a.op == "placeholder":
        return f"its input {a.target}"
    return f"the result of {_node_label(gm, a)}"


def _node_label(gm: nn.Module, n: fx.Node) -> str:
    if n.op == "call_module":
        return type(gm.get_submodule(n.target)).__name__
    if n.op == "call_function":
        return getattr(n.target, "__name__", str(n.target))
    return str(n.target)


def _no_nodes(args, kwargs) -> bool:
    found: list[fx.Node] = []
    fx.node.map_arg((args, kwargs), lambda n: found.append(n))
    return not found


def _activation(gm: nn.Module, n: fx.Node, z: fx.Node) -> nn.Module | None:
    """The elementwise activation node ``n`` applies to ``z``, as a module, or None."""
    if not n.args or n.args[0] is not z or not _no_nodes(n.args[1:], n.kwargs):
        return None
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        return m if len(n.args) == 1 and not n.kwargs and is_elementwise(m) else None
    if n.op == "call_function" and n.target in _ACT_FUNCTIONS:
        return FunctionActivation(n.target, tuple(n.args[1:]), n.kwargs)
    if n.op == "call_method" and n.target in _ACT_METHODS:
        return FunctionActivation(n.target, tuple(n.args[1:]), n.kwargs)
    return None


def _segment_spec(gm: nn.Module, z: fx.Node, nodes: list[fx.Node], owner: str):
    """One stage ``z -> nodes[-1]`` read from the traced graph."""
    if len(nodes) == 1:
        n = nodes[0]
        if n.op == "call_module" and n.args == (z,) and not n.kwargs:
            return [_leaf_spec(gm.get_submodule(n.target))]
        act = _activation(gm, n, z)
        if act is not None:
            return [("act", act)]
    # z + act(Linear(z)) and z + Linear(z)
    last = nodes[-1]
    if (
        len(nodes) in (2, 3)
        and last.op == "call_function"
        and last.target in _ADD
        and not last.kwargs
        and len(last.args) == 2
        and z in last.args
    ):
        y = last.args[1] if last.args[0] is z else last.args[0]
        lin = nodes[0]
        act = None if len(nodes) == 2 else _activation(gm, nodes[1], lin)
        if (
            y is nodes[-2]
            and lin.op == "call_module"
            and lin.args == (z,)
            and not lin.kwargs
            and _plain_linear(gm.get_submodule(lin.target))
            and (len(nodes) == 2 or act is not None)
            and len(lin.users) == 1
        ):
            linear = gm.get_submodule(lin.target)
            if linear.in_features == linear.out_features:
                return [("residual", linear, act)]
    # anything else: the traced piece, called as a module
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {z: graph.placeholder("z")}

    def copy(n: fx.Node) -> fx.Node:
        if n not in env:
            for a in n.all_input_nodes:
                copy(a)
            env[n] = graph.node_copy(n, lambda a: env[a])
        return env[n]

    for n in nodes:
        copy(n)
    graph.output(env[nodes[-1]])
    piece = _Piece(gm, graph)
    label = "+".join(_node_label(gm, n) for n in nodes)
    if len(label) > 60:
        label = label[:57] + "..."
    return [("generic", piece, _params_of(piece), f"{owner}: {label}")]


def _takes_more(stage: Stage, z: Tensor) -> bool:
    """Whether the module of a one-module stage cannot be called with the one input ``z`` by its
    signature (``nn.MultiheadAttention(q, k, v)``, ``nn.Bilinear(x1, x2)``): not a bug inside it."""
    mods = getattr(stage, "modules", ())
    if len(mods) != 1:
        return False
    try:
        inspect.signature(mods[0].forward).bind(z)
    except TypeError:
        return True
    except ValueError:  # (no signature to read)
        return False
    return False


class _QuietCall:
    """A traced piece's call without torch.fx's report of an error in its generated code, which fx prints
    to stderr before raising (a float32 model's float64 copy failing on a float32 constant: the trace
    came before hessinv's named error, which says what to do); the error is raised as it is."""

    def __init__(self, cls: type):
        self.cls = cls

    def __call__(self, obj: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return super(self.cls, obj).__call__(*args, **kwargs)


class _Piece(fx.GraphModule):
    """A traced piece of a model: a GraphModule whose call is :class:`_QuietCall` (each GraphModule has a
    class of its own, made again by a deep copy -- the float64 copy of a float32 model)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        _quiet(self)

    def _deepcopy_init(self) -> Callable[..., None]:
        def init(obj: fx.GraphModule, *args: Any, **kwargs: Any) -> None:
            fx.GraphModule.__init__(obj, *args, **kwargs)
            _quiet(obj)

        return init


def _quiet(piece: fx.GraphModule) -> None:
    cls = type(piece)
    if "_wrapped_call" in vars(cls) and cls is not fx.GraphModule:  # (as this torch names it)
        cls._wrapped_call = _QuietCall(cls)  # type: ignore[attr-defined]


def _params_of(m: nn.Module) -> list[nn.Parameter]:
    return [t for t in m.parameters() if t.requires_grad]


#: where a traced piece uses its trainable parameters: for each one's ``id``, one entry per use -- the
#: module calls (number, module; outermost first, the traced module's own not among them) that the node
#: reading it was traced in, None where that is not known (a node hessinv added)
Uses = dict[int, list[tuple[tuple[int, nn.Module], ...] | None]]


def _free_reads(gm: nn.Module, nodes: list[fx.Node], depset: set[fx.Node]) -> dict[fx.Node, dict]:
    """For each node that does not depend on the input (``get_attr``, ``w.t()``, a module called on a
    constant), the parameters it reads (by ``id``), in graph order."""
    reach: dict[fx.Node, dict[int, nn.Parameter]] = {}
    for n in nodes:
        if n in depset or n.op in ("placeholder", "output"):
            continue
        found: dict[int, nn.Parameter] = {}
        t = _parameter(n, gm)
        if t is not None:
            found[id(t)] = t
        if n.op == "call_module":
            found.update((id(t), t) for t in gm.get_submodule(n.target).parameters())
        for x in n.all_input_nodes:
            found.update(reach.get(x, {}))
        reach[n] = found
    return reach


def _segment_uses(gm: nn.Module, nodes: list[fx.Node], reach: dict, called: dict[int, nn.Module]) -> Uses:
    """The parameter uses (:data:`Uses`) of the stage made of ``nodes``: a node's own module (a leaf's
    ``call_module``: the calls around that call) and the parameters it reads through nodes that do not
    depend on the input (``reach``, :func:`_free_reads`)."""
    uses: Uses = {}

    def calls_of(n: fx.Node, own: nn.Module | None = None) -> tuple | None:
        c = n.meta.get(_CALLS)
        if c is None:
            return None
        if own is not None and c and called.get(c[-1]) is own:
            c = c[:-1]
        return tuple((k, called[k]) for k in c)

    for n in nodes:
        read = [(t, calls_of(n)) for a in n.all_input_nodes for t in reach.get(a, {}).values()]
        if n.op == "call_module":
            m = gm.get_submodule(n.target)
            read += [(t, calls_of(n, m)) for t in m.parameters()]
        for t, c in read:
            if t.requires_grad and c not in uses.setdefault(id(t), []):
                uses[id(t)].append(c)
    return uses


def _graph_specs(gm: nn.Module, g: fx.Graph, owner: str, called: dict[int, nn.Module]) -> list[tuple]:
    """Cut the graph ``g`` traced from ``gm`` into stages (module docstring): their specifications, each
    with its parameter uses (:data:`Uses`; ``called``: the tracer's module calls)."""
    g.owning_module = gm  # for the purity check of dead-code elimination (no GraphModule compiled)
    _check_in_place(g, gm, owner)
    g.eliminate_dead_code()
    nodes = list(g.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    (out_node,) = [n for n in nodes if n.op == "output"]
    for ph in inputs[1:]:  # an argument traced at its default (concrete_args) feeds only fx's checks of it
        below: set[fx.Node] = set()
        stack = [ph]
        while stack:
            for u in stack.pop().users:
                if u not in below:
                    below.add(u)
                    stack.append(u)
        if out_node not in below:
            for n in reversed(nodes):
                if n in below:
                    g.erase_node(n)
            g.erase_node(ph)
    nodes = list(g.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        names = ", ".join(n.name for n in inputs)
        raise NotAChainError(
            f"{owner}.forward takes {len(inputs)} inputs ({names}); a chain takes one: pack them into one "
            "tensor (torch.cat along dim 1) and split it at the top of a wrapper's forward"
        )
    result = out_node.args[0]
    if not isinstance(result, fx.Node):
        # (fx hands a dict or list back as its immutable_dict / immutable_list: named as the user wrote it)
        kind = next((f"a {t.__name__}" for t in (dict, list, tuple) if isinstance(result, t)), None)
        kind = kind or ("None" if result is None else f"an object of type {type(result).__name__}")
        raise NotAChainError(
            f"{owner}.forward returns {kind}, not one tensor; a chain has one output: "
            "wrap the model in a module whose forward returns the tensor the loss reads (e.g. "
            + ('model(x)["logits"], the entry the loss reads' if isinstance(result, dict) else "model(x)[0]")
            + ", or torch.cat of the outputs with a loss_fn that splits them)"
        )
    # nodes that depend on the input, in graph order; the rest (parameters, constants) are free
    dep: list[fx.Node] = [inputs[0]]
    depset = {inputs[0]}
    for n in nodes:
        if n.op not in ("placeholder", "output") and any(a in depset for a in n.all_input_nodes):
            dep.append(n)
            depset.add(n)
    if result not in depset:
        raise NotAChainError(f"{owner}.forward returns {result.name}, which does not depend on the input")
    if dep[-1] is not result:
        raise NotAChainError(f"{owner}: node {dep[-1].name} runs after the output {result.name} is computed")
    pos = {n: i for i, n in enumerate(dep)}
    reach = _free_reads(gm, nodes, depset)
    last_use = []
    for n in dep:
        uses = [pos[u] for u in n.users if u in pos]
        if out_node in n.users:
            uses.append(len(dep))
        last_use.append(max(uses, default=pos[n]))
    specs: list[tuple] = []
    start, alive = 0, last_use[0]
    for k in range(1, len(dep)):
        n = dep[k]
        if k == len(dep) - 1 or (
            alive <= k
            # (not between an op that returns several tensors and the getitem / .values that picks one)
            and not any(_picks_one(u) for u in n.users)
        ):
            nodes_k = dep[start + 1 : k + 1]
            reads = _segment_uses(gm, nodes_k, reach, called)
            specs.extend((sp, reads) for sp in _segment_spec(gm, dep[start], nodes_k, owner))
            start = k
        alive = max(alive, last_use[k])
    return specs


def _picks_one(u: fx.Node) -> bool:
    """Whether node ``u`` takes one tensor out of an op that returns several: ``r[0]``, ``r.values``,
    ``r.indices`` (not ``h.shape`` or ``h.T``, also attribute reads in fx, which must not glue a layer to
    the next op)."""
    if u.op != "call_function":
        return False
    return u.target is operator.getitem or (
        u.target is getattr and len(u.args) > 1 and u.args[1] in ("values", "indices")
    )


def _check_modules(stage: Stage, mods) -> None:
    """Refuse modules that are random or mix examples, and hooks that change gradients."""
    for m in mods:
        kind = type(m).__name__
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None:
            raise UnsupportedStageError(
                f"{stage.name}: {kind}(track_running_stats=False) normalizes with the batch's statistics in "
                "eval mode too, which mixes examples: build it with track_running_stats=True (hessinv.optim "
                "then takes the gradient with the batch's statistics and the curvature with the running "
                "ones; the operators need model.eval()), or normalize each example (LayerNorm, GroupNorm)"
            )
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise UnsupportedStageError(
                f"{stage.name}: {kind} in training mode uses batch statistics, which mixes examples; call "
                "model.eval() first (it then normalizes with its running statistics: a fresh layer's are "
                "mean 0, variance 1 -- run a few batches through the model in training mode under "
                "torch.no_grad() first to fill them)"
            )
        if isinstance(m, _DROPOUT) and m.training and m.p > 0:
            raise UnsupportedStageError(
                f"{stage.name}: {kind} in training mode is random; call model.eval() first"
            )
        if isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.training and m.track_running_stats:
            raise UnsupportedStageError(
                f"{stage.name}: {kind}(track_running_stats=True) in training mode normalizes each example "
                "by its own statistics and updates its running ones on every call (hessinv calls it many "
                "times); model.eval() would switch it to the running statistics, another function: build "
                "it with track_running_stats=False for the training-mode function"
            )
        if isinstance(m, nn.RReLU) and m.training:
            raise UnsupportedStageError(
                f"{stage.name}: RReLU in training mode draws random slopes; call model.eval() first"
            )
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.scale_grad_by_freq:
            raise UnsupportedStageError(
                f"{stage.name}: {kind}(scale_grad_by_freq=True) rescales its gradients by the tokens' "
                "frequencies in the batch, so autograd does not report the derivative; set it to False"
            )
        if m._backward_hooks or m._backward_pre_hooks:
            raise UnsupportedStageError(
                f"{stage.name}: {kind} has a backward hook, which changes the gradients autograd reports; "
                "remove it to take derivatives"
            )


def split_stages(
    model: nn.Module | Sequence[nn.Module],
    traced: list[nn.Module] | None = None,
    whole: list[nn.Module] | None = None,
    ordered: bool = True,
) -> list[Stage]:
    """The stages of ``model`` (module docstring), in chain order; the modules whose ``forward`` was
    traced through are appended to ``traced`` if given. Where traced pieces share a parameter or (with
    ``ordered``) use parameters out of ``model.parameters()``'s order, the innermost submodule whose one
    call holds all those uses (the model's own ``forward`` traced as well as a nested one), else the traced
    module (not the model itself), is split again as one stage (added to ``whole``); each stage's
    ``origin`` is the traced module it came from (None: a module called as it is), which :class:`Chain`
    calls whole where the pieces turn out not to be a chain on data."""
    whole = [] if whole is None else whole
    while True:
        mark = [] if traced is None else list(traced)
        try:
            return _split(model, mark, whole, ordered)
        except _CallWhole as e:
            whole.append(e.module)
        finally:
            if traced is not None:
                traced[:] = mark


def _split(
    model: nn.Module | Sequence[nn.Module], traced: list[nn.Module], whole: list[nn.Module], ordered: bool
) -> list[Stage]:
    """One attempt of :func:`split_stages`."""
    if not isinstance(model, (nn.Module, list, tuple)):
        raise NotAChainError(_NOT_A_MODULE.format(type(model).__name__))
    glob = nn.modules.module
    for what in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks"):
        if getattr(glob, what, None):
            raise UnsupportedStageError(
                "global module hooks are registered (torch.nn.modules.module.register_module_*_hook); "
                "they may change any module's output or gradients: remove them"
            )
    for m in [model] if isinstance(model, nn.Module) else model:
        if isinstance(m, nn.Module) and any(
            isinstance(t, nn.parameter.UninitializedParameter) for t in m.parameters()
        ):
            raise InvalidArgumentError(
                "the model has lazy modules (LazyLinear, ...) whose parameters are not initialized yet: "
                "call it once on a batch (model(inputs)) first"
            )
    pairs = _specs(model, True, traced, whole)
    if not pairs:
        raise NotAChainError("the model has no stages")
    specs = [sp for sp, _, _ in pairs]
    stages: list[Stage] = []
    i = 0
    while i < len(specs):
        spec, k, (_, origin, uses) = specs[i], len(stages), pairs[i]
        kind = spec[0]
        if kind == "linear":
            act = specs[i + 1][1] if i + 1 < len(specs) and specs[i + 1][0] == "act" else None
            stages.append(DenseStage(k, spec[1], act))
            if act is not None and uses is not None:
                uses = {**uses, **(pairs[i + 1][2] or {})}
            i += 1 if act is None else 2
        else:
            if kind == "act":
                stages.append(ElementwiseStage(k, spec[1]))
            elif kind == "reshape":
                stages.append(ReshapeStage(k, spec[1]))
            elif kind == "residual":
                stages.append(DenseStage(k, spec[1], spec[2], residual=True))
            else:
                stages.append(GenericStage(k, spec[1], spec[2], spec[3]))
            i += 1
        s = stages[-1]
        s.origin, s.uses = origin, uses
        _check_modules(s, [m for top in s.modules for m in top.modules()])
    _check_parameters(model, stages, ordered, whole)
    return stages


def _check_model_kinds(model) -> None:
    """Named errors for models no stage can read: a nested list of modules, a TorchScript module, and
    parameters created under ``torch.inference_mode()`` (autograd cannot differentiate them)."""
    if isinstance(model, (list, tuple)) and any(isinstance(m, (list, tuple)) for m in model):
        raise NotAChainError("the model is a nested list of modules: pass a flat list, or an nn.Sequential")
    if isinstance(model, nn.ModuleDict) and type(model).forward is nn.ModuleDict.forward:
        raise NotAChainError(
            "the model is an nn.ModuleDict, which has no forward: pass nn.Sequential(*modules.values()) "
            "with its modules in the order they apply"
        )
    if isinstance(model, nn.Module):
        mods = [model]
    elif isinstance(model, (list, tuple)):
        mods = [m for m in model if isinstance(m, nn.Module)]
    else:  # (named by split_stages)
        return
    for top in mods:
        for name, m in top.named_modules():
            if isinstance(m, torch.jit.ScriptModule):
                raise UnsupportedStageError(
                    f"{name or 'the model'} is a TorchScript module ({type(m).__name__}): hessinv "
                    "differentiates a model's Python code twice; pass the nn.Module it was scripted or "
                    "traced from"
                )
        for name, t in top.named_parameters():
            if not isinstance(t, nn.parameter.UninitializedParameter) and t.is_inference():
                raise InvalidArgumentError(
                    f"parameter {name} was created under torch.inference_mode() (an inference tensor, which "
                    "autograd cannot differentiate): build or load the model outside inference_mode"
                )


def _warn_called_whole(why: str, keep: str | None = None) -> None:
    """Say that the model itself is called whole, one generic stage (as ``nn.Sequential(model)`` calls it),
    because ``why``; ``keep``: how to keep the chain's structure."""
    warn(
        f"{why} -- so the model is called whole, as one generic stage (as nn.Sequential(model) calls it): "
        "exact, its products by autograd, but its factorizations form dense blocks (about one backward "
        "pass per parameter) without the chain's linear-in-depth structure"
        + (f"; to keep that, {keep}" if keep else "")
    )


class ParameterOrderError(NotAChainError):
    """Parameters used in another order than ``model.parameters()`` lists them (:func:`_check_parameters`),
    from an ordered :class:`Chain`: the operators and optimizers split such a model unordered instead
    (:func:`operator_chain`), the operators permuting their vectors to ``model.parameters()``'s order."""


def _innermost_call(stages: list[Stage], params: list[nn.Parameter]) -> nn.Module | None:
    """The module whose one call holds every use of ``params`` in ``stages`` (pieces of one traced
    module: their :data:`Uses`), the innermost such; None where the traced module's own ``forward``
    holds them (or where a use is not known)."""
    found = [
        u
        for s in stages
        for t in params
        if any(p is t for p in s.params)
        for u in (s.uses or {}).get(id(t), [None])
    ]
    if not found or any(u is None for u in found):
        return None
    common = found[0]
    for u in found[1:]:
        n = 0
        while n < min(len(common), len(u)) and common[n][0] == u[n][0]:  # (the same call)
            n += 1
        common = common[:n]
    return common[-1][1] if common else None


def trainable_named(model: nn.Module | Sequence[nn.Module]) -> list[tuple[str, nn.Parameter]]:
    """The trainable parameters with their names, in ``model.parameters()``'s order (each once; a list of
    modules: theirs in turn, named ``[i].name``) -- the order of the operators' vectors."""
    mods = list(model) if isinstance(model, (list, tuple)) else [model]
    named: list[tuple[str, nn.Parameter]] = []
    seen_ids: set[int] = set()
    for i, m in enumerate(mods):
        for n, t in m.named_parameters():
            if t.requires_grad and id(t) not in seen_ids:
                seen_ids.add(id(t))
                named.append((n if len(mods) == 1 else f"[{i}].{n}", t))
    return named


def _check_parameters(
    model, stages: list[Stage], ordered: bool = True, whole: Sequence[nn.Module] = ()
) -> None:
    """Each trainable parameter in exactly one stage, stages in ``model.parameters()`` order."""
    mods = list(model) if isinstance(model, (list, tuple)) else [model]
    named = trainable_named(model)
    order = {id(t): j for j, (_, t) in enumerate(named)}
    names = {id(t): n for n, t in named}
    owner: dict[int, int] = {}

    def same_origin(a: int, b: int, params: list[nn.Parameter]) -> None:
        """Two stages traced out of one module that use ``params`` (one shared, or two out of order): call
        whole the innermost submodule whose one call holds all their uses there, else the traced module.
        Not the model itself -- one stage for the whole model would lose the chain's structure, where the
        message below says how to keep it (the model is called whole only where nothing smaller holds
        every use)."""
        origin = stages[a].origin
        if origin is None or stages[b].origin is not origin:
            return
        inner = _innermost_call([st for st in stages if st.origin is origin], params)
        if inner is not None and inner is not model and not any(w is inner for w in whole):
            raise _CallWhole(inner)
        if origin is not model:
            raise _CallWhole(origin)

    for s in stages:
        s.params.sort(key=lambda t: order.get(id(t), -1))
        for t in s.params:
            if id(t) in owner:
                same_origin(owner[id(t)], s.index, [t])
                shared = f"parameter {names.get(id(t), '?')} is shared by stage {owner[id(t)]} and {s.name}"
                keep = (
                    "put the modules from the first use to the last inside one module (an nn.Module with "
                    "its own forward, or an nn.Sequential nested in the model), which is then called whole "
                    "as one generic stage, or untie the parameter"
                )
                if isinstance(model, nn.Module):
                    # (tied weights across the model's own forward: the model called whole, as
                    # nn.Sequential(model) calls it -- exact; it was refused with that advice)
                    _warn_called_whole(f"{shared}: not a chain", keep)
                    raise _CallWhole(model)
                raise NotAChainError(
                    f"{shared}: not a chain. To keep the chain's structure, {keep}; or pass the modules as "
                    "one nn.Sequential(*modules), which is then called whole (exact; dense blocks cost about "
                    "one backward pass per parameter)"
                )
            owner[id(t)] = s.index
    flat = [id(t) for s in stages for t in s.params]
    unused = [n for n, t in named if id(t) not in owner]
    for n, t in named:
        if id(t) not in owner:
            # (the optimizers split the model with its training-mode branches in eval mode: say so)
            evaluated = [type(m).__name__ for top in mods for m in top.modules() if _eval_for_now(m)]
            where = (
                f" in eval mode, where the curvature is taken ({', '.join(sorted(set(evaluated)))} branch "
                "on self.training: a parameter used only in training mode has no curvature in the "
                "deterministic network)"
                if evaluated
                else ""
            )
            them, it = (
                (f"parameter {n} is", "it")
                if len(unused) == 1
                else (f"parameters {', '.join(unused)} are", "them")
            )
            raise NotAChainError(
                f"{them} trainable but the forward pass{where} does not use {it}; freeze {it} "
                f"(requires_grad_(False)) or remove {it}"
            )
    if ordered and flat != [id(t) for _, t in named]:
        first = next(j for j, (a, (_, t)) in enumerate(zip(flat, named, strict=False)) if a != id(t))
        early = next(t for st in stages for t in st.params if id(t) == flat[first])
        same_origin(owner[flat[first]], owner[id(named[first][1])], [early, named[first][1]])
        late = named[first][0]
        own = "." not in late.split("].", 1)[-1]  # a parameter of the model itself, not of a submodule
        hint = (
            f"{late} belongs to the model itself, and torch lists a module's own parameters before its "
            "submodules': hold it in a submodule (an nn.Module with that parameter) defined where forward "
            "uses it"
            if own
            else "define the submodules in the order forward uses them"
        )
        raise ParameterOrderError(
            f"forward uses parameter {names[flat[first]]} before {late}, but model.parameters() "
            f"lists them the other way round; this Chain orders its vectors like model.parameters(): {hint} "
            "-- or take Chain(model, loss_fn, ordered=False), whose vectors follow its stages (chain.params; "
            "chain.to_public permutes them). The operators (hessinv.hessian, ...) and hessinv.optim take "
            "the model as it is"
        )


# -- the chain ------------------------------------------------------------------------------------
@dataclass
class Linearization:
    """Everything the curvature sweeps need at one point: blocks, gradient, loss.

    ``blocks[l]`` for ``l < L`` are the model stages' blocks; ``blocks[-1]`` is the loss stage's.
    """

    blocks: list[Blocks]
    #: None where the caller asked for none (:meth:`Chain.linearize` with ``gradient=False``)
    gradient: Tensor | None
    loss: Tensor
    sizes: list[int]
    input_dim: int
    #: ``blocks[0]`` is stage ``first``'s: the stages before the first one with parameters (a frozen
    #: backbone) only transform the inputs -- nothing upstream of them varies -- and get no blocks
    first: int = 0


def _autocast_on(device_type: str) -> bool:
    """Whether ``torch.autocast`` is active for ``device_type`` (it casts inside every stage)."""
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except (TypeError, RuntimeError):  # (a device type autocast does not know)
        return False


def dense_grad(g: Tensor) -> Tensor:
    """``g`` as a strided tensor: ``nn.Embedding(sparse=True)`` gives sparse gradients (the same numbers,
    its rows only), which flat gradient vectors cannot hold."""
    return g if g.layout == torch.strided else g.to_dense()


def _tensor(x, what: str) -> Tensor:
    if not isinstance(x, Tensor):
        hint = "; convert with torch.as_tensor(...)" if type(x).__module__.startswith("numpy") else ""
        if isinstance(x, (dict, tuple, list)):
            hint = (
                "; a model of several inputs: pack them into one tensor (torch.cat along dim 1) and split "
                "it at the top of a wrapper's forward"
                if what == "inputs"
                else "; several targets: pack them into one tensor (torch.stack or torch.cat along dim 1) "
                "and split it at the top of loss_fn"
            )
        if isinstance(x, torch.utils.data.DataLoader):
            hint = "; pass one batch of it: inputs, targets = next(iter(loader))"
        if x is None and what == "targets":
            hint = (
                "; a loss without targets: pass a placeholder of one entry per example, e.g. "
                "torch.zeros(len(inputs), dtype=torch.long), which loss_fn(outputs, targets) ignores"
            )
        raise InvalidArgumentError(
            f"{what} must be a torch.Tensor, got {type(x).__module__}.{type(x).__name__}{hint}"
        )
    if x.layout != torch.strided:  # (a sparse or nested tensor: most layers have no kernels for it)
        raise InvalidArgumentError(
            f"{what} must be a dense (strided) tensor, got layout {x.layout}: convert with x.to_dense()"
        )
    if x.is_inference() and not torch.is_inference_mode_enabled():
        # made under torch.inference_mode() (a teacher's labels, preprocessed inputs): autograd may not
        # save it for backward; a normal copy is the same data
        return x.clone()
    return x


def targets_as_data(targets: Tensor, params: Sequence[Tensor]) -> Tensor:
    """``targets``, refused with a named error where they depend on ``params`` (the model's trainable
    parameters) through autograd: hessinv takes the targets as data, while torch would differentiate the
    loss through them too (a self-distillation target computed by the model itself, not detached). A
    target with another graph (a teacher's soft labels) is data."""
    if not targets.requires_grad:
        return targets
    with torch.enable_grad():  # (a caller under no_grad)
        total = targets.sum()
    grads = linalg.grad(total, list(params), allow_unused=True, retain_graph=True)
    if any(g is not None for g in grads):
        raise InvalidArgumentError(
            "targets depend on the model's parameters (self-distillation?): hessinv takes the targets "
            "as data, while torch would differentiate the loss through them too; pass targets.detach() "
            "if they are data"
        )
    return targets


def check_real(x, what: str, setting: bool = False) -> float:
    """``float(x)`` for a real number (Python, numpy or 0-d tensor), else :class:`InvalidArgumentError`; a
    tensor that requires grad is refused (its derivative would be lost), or as a ``setting`` (a value
    stored, with no derivative to lose: a prior precision tuned by autograd) taken by its value."""
    if setting and isinstance(x, Tensor):
        x = x.detach()
    if isinstance(x, Tensor) and x.device.type == "meta":
        raise InvalidArgumentError(f"{what} must be a real number, got a meta tensor (it has no value)")
    if isinstance(x, Tensor) and x.requires_grad and torch.is_grad_enabled():
        derivative = (
            " (its derivative: d/d eps (A + eps I)^-1 b = -(A + eps I)^-1 x: one more solve of x)"
            if what == "damping"
            else ""
        )
        raise InvalidArgumentError(
            f"{what} requires grad: hessinv takes it as a number, and its derivative through this call would "
            f"be lost; pass {what}.detach(){derivative}"
        )
    if isinstance(x, Tensor) and x.numel() == 1 and not x.is_complex():
        x = x.item()
    if isinstance(x, np.ndarray) and x.ndim == 0 and x.dtype.kind in "iuf":  # (np.array(0.1))
        x = x.item()
    if isinstance(x, (Tensor, np.ndarray)) and math.prod(x.shape) != 1:  # (by its shape, not printed whole)
        shape = tuple(x.shape)
        hint = (
            ": a damping per parameter (a vector) is taken by the Gauss-Newton operator's factor and "
            "solve (hessinv.gauss_newton), whose damped matrix stays positive definite; the Hessian's "
            "takes one number"
            if what == "damping"
            else ""
        )
        if isinstance(x, np.ndarray):
            hint = f" (a vector is a torch tensor here: torch.as_tensor({what})){hint}"
        raise InvalidArgumentError(
            f"{what} must be a real number, got a {type(x).__name__} of shape {shape}{hint}"
        )
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise InvalidArgumentError(f"{what} must be a real number, got {type(x).__name__} {x!r}")
    try:
        return float(x)
    except OverflowError:  # an int beyond float64's range (10**400)
        digits = len(str(abs(int(x))))
        raise InvalidArgumentError(f"{what} ({digits} digits) is beyond float64's range") from None


def _loss_output_gradient(loss: Callable[[Tensor, Tensor], Tensor], o: Tensor, t: Tensor) -> Tensor:
    """``d loss(o, t) / d o`` by plain autograd (one example's, where ``vmap`` cannot batch the loss)."""
    with torch.enable_grad():
        o = o.detach().requires_grad_(True)
        value = loss(o, t)
        if not isinstance(value, Tensor):  # (a Python number for this example: a constant)
            return torch.zeros_like(o)
        return _grads(value, [o])[0]  # (zeros where it does not depend on o)


class Chain:
    """A model + loss seen as a chain of stages.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> chain = Chain(net, torch.nn.CrossEntropyLoss())
    >>> [s.name for s in chain.stages]
    ['stage 0 (Linear+Tanh)', 'stage 1 (Linear)']
    >>> chain.num_params
    26
    """

    def __init__(self, model: nn.Module | Sequence[nn.Module], loss_fn: LossFn, *, ordered: bool = True):
        check_loss_fn(loss_fn)
        # a torch.compile-d loss is differentiated through its original function (see `uncompiled`)
        self.model, self.loss_fn = model, uncompiled(loss_fn)
        self._traced: list[nn.Module] = []
        self._unread: set[tuple[nn.Module, str]] = (
            set()
        )  # attributes a re-split showed the trace does not read
        self._whole: list[nn.Module] = []  # traced modules whose pieces were not a chain: called whole
        self._eager_checked = False  # the traced stages compared with the model's own forward (once)
        self._gradient_checked = False  # the stages' gradient compared with autograd's (once)
        self._rows_checked = False  # per_example_gradients' first row compared with autograd's (once)
        self._rows_refused = False  # ... and found another function: the per-example route from then on
        # (example, max |difference|) where an example's output alone differed from its output in the batch
        self._batch_dependent: tuple[int, float] | None = None
        # the flat parameter vector ordered like model.parameters() (the operators' public vectors); the
        # optimizers take the stages' order, whatever order the model registered its parameters in
        self._ordered = ordered

        _check_model_kinds(model)

        # (tracing runs the forward's Python code; a second trial starts from empty lists)
        def split() -> list[Stage]:
            self._traced.clear()
            self._whole.clear()
            return split_stages(model, self._traced, self._whole, ordered)

        self.stages = without_draws(split, "reading the model")
        self.params = [t for s in self.stages for t in s.params]
        if not self.params:
            swapped = isinstance(model, nn.modules.loss._Loss) and isinstance(self.loss_fn, nn.Module)
            raise NotAChainError(
                "the model has no trainable parameters"
                + (f" -- it is a loss ({type(model).__name__}): the arguments are (model, loss_fn, ...)"
                   if swapped else "")
            )  # fmt: skip
        dtypes = {t.dtype for t in self.params}
        devices = {t.device for t in self.params}
        if len(dtypes) > 1 or len(devices) > 1:
            names = lambda xs: ", ".join(sorted(str(x) for x in xs))  # noqa: E731
            if any(d.is_complex for d in dtypes):
                fix = (
                    "; hessinv works with real float32 or float64 parameters: write the model with real ones"
                )
            elif len(dtypes) > 1:
                fix = "; convert the whole model with model.float() or model.double()"
            elif any(d.type == "meta" for d in devices):  # (model.to(device) cannot copy out of meta)
                fix = (
                    "; some are on the meta device (no values; model.to(device) cannot copy them): "
                    "materialize those layers, e.g. layer.to_empty(device='cpu') then "
                    "layer.reset_parameters(), or load their values with "
                    "model.load_state_dict(state, assign=True)"
                )
            else:
                fix = "; move the whole model to one device with model.to(device)"
            raise DtypeMismatchError(
                f"parameters must share one dtype and device; got {names(dtypes)} on {names(devices)}{fix}"
            )
        self.dtype, self.device = dtypes.pop(), devices.pop()
        if self.device.type == "meta":
            raise InvalidArgumentError(
                "the model is on the meta device (parameters without values): materialize it first, e.g. "
                "model.to_empty(device='cpu') and initialize its parameters"
            )
        if self.dtype.is_complex:
            raise DtypeMismatchError(
                f"parameters are {self.dtype}; hessinv works with real float32 or float64 parameters (the "
                "curvature of a complex model is that of its real and imaginary parts): write the model with "
                "real parameters"
            )
        if self.dtype not in (torch.float32, torch.float64):
            raise DtypeMismatchError(
                f"parameters are {self.dtype}; hessinv works in float32 or float64 (half precision cannot "
                "hold the curvature): convert with model.float() or model.double()"
            )
        self.sizes = [s.p for s in self.stages]
        self.num_params = sum(self.sizes)
        self._max_side = max(max(t.shape, default=1) for t in self.params)  # for small()
        # the stages' order of the flat vector against model.parameters()'s (to_public): None where equal
        public = [t for _, t in trainable_named(model)]
        self._public_index: Tensor | None = None
        if [id(t) for t in public] != [id(t) for t in self.params] and {id(t) for t in public} == {
            id(t) for t in self.params
        }:
            start, at = {}, 0
            for t in self.params:
                start[id(t)] = at
                at += t.numel()
            self._public_index = torch.cat(
                [torch.arange(start[id(t)], start[id(t)] + t.numel()) for t in public]
            )
            self._stage_index = torch.argsort(self._public_index)
        self._watch()

    @property
    def permuted(self) -> bool:
        """Whether the stages hold the parameters in another order than ``model.parameters()`` lists them
        (an unordered chain, ``ordered=False``, of a model whose forward uses them in another order)."""
        return self._public_index is not None

    def to_public(self, X: Tensor, dim: int = 0) -> Tensor:
        """``X`` with its parameter axis ``dim`` (of length :attr:`num_params`) taken from the stages'
        order -- the order of :attr:`params`, which every sweep works in -- to ``model.parameters()``'s
        (``X`` itself where they agree). The operators of a model whose forward uses its parameters in
        another order than it lists them give their vectors so (:func:`operator_chain`)."""
        if self._public_index is None:
            return X
        return X.index_select(dim, self._index_on("_public_index", X.device))

    def _index_on(self, name: str, device: torch.device) -> Tensor:
        """The permutation ``name`` on ``device`` (cached: a product on an accelerator copies no index)."""
        cache = self.__dict__.setdefault("_indices", {})
        key = (name, device)
        if key not in cache:
            cache[key] = getattr(self, name).to(device)
        return cache[key]

    def to_stages(self, X: Tensor, dim: int = 0) -> Tensor:
        """The inverse of :meth:`to_public`: ``X``'s parameter axis from ``model.parameters()``'s order
        to the stages'."""
        if self._public_index is None:
            return X
        return X.index_select(dim, self._index_on("_stage_index", X.device))

    def _watch(self) -> None:
        """Record what the split read from the model besides tensor values (:meth:`check_model`)."""
        model = self.model
        mods = (
            list(model.modules()) if isinstance(model, nn.Module) else [m for x in model for m in x.modules()]
        )
        # the user's own modules (torch's keep no memo; parametrizations are checked apart): _state_kept
        self._own = [m for m in mods if not defined_in_torch(type(m))]
        self._parametrized = any(torch.nn.utils.parametrize.is_parametrized(m) for m in mods)
        # deterministic and per-example only in eval mode (Dropout and RReLU became an identity / an
        # activation at the split): a later model.train() would change the function unseen
        self._mode_watch = [(m, m.training) for m in mods if isinstance(m, _MODE_DEPENDENT)]
        # a replaced submodule, list element or parameter; a frozen or unfrozen layer
        # (kept as parallel lists: check_model compares them with map, a few microseconds per module)
        self._held = [m._modules for m in mods] + [m._parameters for m in mods]
        self._held_lens = list(map(len, self._held))
        self._held_values = list(itertools.chain.from_iterable(map(dict.values, self._held)))
        self._top = None if isinstance(model, nn.Module) else (model, list(model))
        # buffers rebound by assignment (m.proj = new_tensor): the traced stages hold the old tensor
        self._buffer_dicts = [m._buffers for m in mods]
        self._buffer_lens = list(map(len, self._buffer_dicts))
        self._buffer_values = list(itertools.chain.from_iterable(map(dict.values, self._buffer_dicts)))
        self._flag_tensors = [t for m in mods for t in m._parameters.values() if t is not None]
        self._flags = [t.requires_grad for t in self._flag_tensors]
        # hooks (a module with hooks is called whole) and the attributes a traced forward may bake in (a
        # temperature, a flag, the training mode of F.dropout(training=self.training)): split again
        hooks = hook_dicts(mods)
        self._hooks, self._hook_keys = hooks, [tuple(d) for d in hooks]
        self._attrs = [
            (m, k, v)
            for m in self._traced
            for k, v in vars(m).items()
            if watchable(v) and (m, k) not in self._unread
        ]
        self._code = _stages_code(self.stages)

    def trainable_changed(self) -> bool:
        """Whether a parameter was frozen or unfrozen (``requires_grad_``) since the split while no
        submodule, list element or parameter was replaced: the model is the same, its trainable set is
        not (the optimizers follow it, :meth:`hessinv.optim.Preconditioner.follow_trainable`)."""
        return [t.requires_grad for t in self._flag_tensors] != self._flags and not self._replaced()

    def _replaced(self) -> bool:
        """Whether a submodule, list element or parameter of the model was replaced since the split."""
        values = itertools.chain.from_iterable(map(dict.values, self._held))
        return (
            list(map(len, self._held)) != self._held_lens
            or any(map(operator.is_not, values, self._held_values))
            or (self._top is not None and _changed(*self._top))
        )

    def check_model(self, autograd: bool = True, modes: bool = True) -> None:
        """Raise a named error if the model changed since the split in a way the stages cannot see: a
        submodule, list element or parameter replaced, a layer frozen, a parameter's dtype or device
        (``model.double()``), the mode of a Dropout, RReLU or BatchNorm module; or if autograd is off
        (``torch.inference_mode``; not checked with ``autograd=False``) or ``torch.autocast`` would lower
        a float32 model's precision. Module hooks added or removed, a buffer rebound by assignment
        (``m.proj = new_tensor``), or a plain attribute that a traced ``forward`` read (a temperature,
        ``self.training``) changed: the model is split again (an attribute whose change leaves the traced
        code as it was is not watched from then on: a call counter). A microsecond or so per module.
        Without ``modes``, modules switched to training mode are not refused (a copy made at the
        operator's point restores its modes)."""
        if autograd and torch.is_inference_mode_enabled():
            raise InvalidArgumentError(
                "hessinv needs autograd, which torch.inference_mode() turns off: call it outside that block"
            )
        # (every step: between curvature refreshes no forward sees it; autocast leaves float64 as it is)
        if self.dtype != torch.float64 and _autocast_on(self.device.type):
            raise DtypeMismatchError(
                f"torch.autocast is on for {self.device.type}: it would run the model and hessinv's products "
                f"in a lower precision than the model's {self.dtype}, and hessinv computes exactly in the "
                "model's dtype; call it outside the autocast context"
            )
        for t in self.params:
            if t.dtype != self.dtype or t.device != self.device:
                raise DtypeMismatchError(
                    f"a parameter is now {t.dtype} on {t.device}; the model was {self.dtype} on "
                    f"{self.device} when this operator/optimizer was built: build it again after model.to()"
                )
        replaced = self._replaced()
        if replaced or [t.requires_grad for t in self._flag_tensors] != self._flags:
            what = (
                "a submodule or parameter replaced" if replaced
                else "a layer frozen or unfrozen; the optimizers follow that at their next step"
            )  # fmt: skip
            raise InvalidArgumentError(
                f"the model changed since this operator/optimizer was built ({what}): build it again for the "
                "new model"
            )
        moved = [(m, k) for m, k, v in self._attrs if not same_value(vars(m).get(k, MISSING), v)]
        rebound = list(map(len, self._buffer_dicts)) != self._buffer_lens or any(
            map(
                operator.is_not,
                itertools.chain.from_iterable(map(dict.values, self._buffer_dicts)),
                self._buffer_values,
            )
        )
        if moved or rebound or list(map(tuple, self._hooks)) != self._hook_keys:
            self._split_again(moved)
        for m, mode in self._mode_watch if modes else ():
            if m.training and not mode and getattr(m, "p", 1) != 0:
                raise UnsupportedStageError(
                    f"{type(m).__name__} was switched to training mode after this operator/optimizer was "
                    "built; in training mode it is random (Dropout, RReLU) or mixes the examples of a batch "
                    "(BatchNorm's batch statistics) and has no exact Hessian: keep it in eval mode "
                    "(model.eval()) while using hessinv"
                )

    def _split_again(self, moved: Sequence[tuple[nn.Module, str]] = ()) -> None:
        """Split the model again (:meth:`check_model`, :meth:`follow_constants`): the same parameters in the
        same order, else a named error; ``moved``, the attributes that changed, are not watched from then on
        where the new trace's code is the old one's (the trace does not read them)."""
        stages = self._keep_order(split_stages(self.model, traced := [], self._whole, self._ordered))
        if [id(t) for s in stages for t in s.params] != [id(t) for t in self.params]:
            raise InvalidArgumentError(
                "the model's stages changed since this operator/optimizer was built: build it again"
            )
        if _stages_code(stages) == self._code:  # the trace does not read them
            self._unread.update(moved)
        self.stages, self._traced = stages, traced
        self._eager_checked = self._gradient_checked = self._rows_checked = self._rows_refused = False
        self._batch_dependent = None
        self.sizes = [s.p for s in stages]  # (a hook can merge stages: the same parameters, regrouped)
        self._watch()

    def follow_constants(self, inputs: Tensor) -> None:
        """At an optimizer's curvature refresh: where the traced stages no longer compute the model's own
        forward on ``inputs`` (the curvature batch) -- a value the trace took as a constant, read from a
        global or from a field of an object that is not one of the model's modules (which
        :meth:`check_model` does not watch), changed -- split the model again. One forward of each on
        ``inputs``; the next linearization compares the new split with the forward (and names what
        still differs). Nothing for a model that was not traced."""
        if not self._traced or not self._eager_checked:  # (else the next linearization compares anyway)
            return
        out = self.forward(inputs)[-1]
        try:
            without_draws(lambda: self._compare_eager(inputs, out), "the model's own forward")
        except NotAChainError:
            self._split_again()

    def model_key(self) -> tuple:
        """What the split read from the model besides tensor values, as last checked: each stage's code and
        the hooks (:meth:`check_model` splits again where these changed). Equal keys: the same function
        of the parameters and buffers."""
        return self._code, tuple(self._hook_keys)

    def flat_params(self) -> Tensor:
        """The trainable parameters' values as one (n,) vector, in the curvature's order (a copy)."""
        return torch.cat([t.detach().reshape(-1) for t in self.params])

    def held_state(self, modes: bool = True) -> list[Any]:
        """What the model's and the loss's function reads besides the trainable parameters, for
        :meth:`same_held`: their other tensors -- buffers (an eval-mode BatchNorm's running statistics, a
        loss's class weights, a ``functools.partial``'s tensor arguments) and frozen parameters, by a copy,
        or where large (a frozen backbone, a mask buffer) by their storage and version counter
        (microseconds: an edit through ``.data`` of such a tensor is not seen) -- and their plain settings
        (a temperature, a LeakyReLU's slope, ``label_smoothing``). Without ``modes``, neither the modules'
        ``training`` flags (:meth:`check_model` judges those: the curvature is the deterministic network's)
        nor plain integers (a forward that counts its calls moves its counter at every prediction)."""
        mods = [m for m in model_parts(self.model) if isinstance(m, nn.Module)]
        loss, tensors = self.loss_fn, []
        while isinstance(loss, functools.partial):
            tensors += [t for t in (*loss.args, *loss.keywords.values()) if isinstance(t, Tensor)]
            loss = uncompiled(loss.func)
        if isinstance(loss, nn.Module):
            mods.append(loss)
        trained = {id(p) for p in self.params}
        held: list[Any] = [
            t.detach().clone()
            if t.numel() <= HELD_COPY
            else (t.data_ptr(), t._version, tuple(t.shape), t.dtype)
            # (without modes, not the tensors a forward merely stashes on a module, self.last = h: each
            # call replaces them -- a vmapped one, from output_jacobians, cannot even be copied; a review)
            for t in [*held_tensors(mods, plain=modes), *tensors]
            if id(t) not in trained
        ]
        plain = plain_settings(mods)
        if not modes:
            plain = [s for s in plain if s[2] != "training" and (type(s[3]) is not int)]
        return [held, plain]

    def same_held(self, key: list[Any], modes: bool = True) -> bool:
        """Whether what :meth:`held_state` recorded in ``key`` (with ``modes`` as here) is as it is now."""
        (held, plain), (held_now, plain_now) = key, self.held_state(modes)
        same = len(held) == len(held_now) and all(
            type(a) is type(b) and (a == b if isinstance(a, tuple) else same_tensor(a, b))
            for a, b in zip(held, held_now, strict=True)
        )
        try:
            return same and bool(plain == plain_now)
        except Exception:  # noqa: BLE001 - settings that do not compare: changed
            return False

    def check_params(self, saved: Tensor, built: str, held: list[Any] | None = None) -> None:
        """Raise :class:`InvalidArgumentError` where the parameters' values are no longer ``saved`` (a
        :meth:`flat_params` copy taken when ``built`` was fitted, in ``model.parameters()``'s order:
        :meth:`to_public`), or the rest the model's function reads
        no longer ``held`` (a :meth:`held_state` without modes: buffers -- BatchNorm statistics moved by a
        forward pass in training mode --, frozen parameters -- a backbone reloaded --, settings -- a
        temperature): a
        result combining what was fitted there with the model's outputs or gradients at other values
        would be silently wrong. A model changed in its structure (:meth:`check_model`: a layer frozen or
        unfrozen since) is refused too."""
        try:
            self.check_model(autograd=False)  # (a prediction under inference_mode needs none)
        except InvalidArgumentError as e:
            raise InvalidArgumentError(f"{built}: {e} (fit it again)") from None
        now = self.to_public(self.flat_params())
        if now.shape != saved.shape or not torch.equal(now, saved):
            mods = [self.model] if isinstance(self.model, nn.Module) else list(self.model)
            renorm = [
                m
                for top in mods
                for m in top.modules()
                if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None
            ]
            why = (
                f" -- the model's {type(renorm[0]).__name__}(max_norm={renorm[0].max_norm:g}) renormalizes "
                "the rows it looks up, in place, at every call (torch's semantics), so a call on tokens the "
                "fit did not see changed them: renormalize every row once before fitting (under "
                "torch.no_grad(), call the embedding on torch.arange(num_embeddings)), or set max_norm=None"
                if renorm
                else ""
            )
            raise InvalidArgumentError(
                f"the model's parameters changed since {built} was fitted: fit it again at the new "
                "parameters (its posterior / factorization is at the old ones)" + why
            )
        if held is not None and not self.same_held(held, modes=False):
            raise InvalidArgumentError(
                f"the model's buffers, frozen parameters or settings (BatchNorm running statistics, a "
                f"reloaded backbone, a temperature) changed since {built} was fitted: fit it again (its "
                "curvature was taken with the old ones)"
            )

    def small(self, inputs: Tensor) -> bool:
        """Whether work on this model and batch is small enough for one CPU thread
        (:func:`hessinv.linalg.one_thread_if`): every weight's sides and the batch at most
        :data:`~hessinv.linalg.SMALL_BLOCKS`, the batch's inputs at most ``64 SMALL_BLOCKS`` numbers (a
        convolution over images is not small), on CPU."""
        n = linalg.SMALL_BLOCKS
        return (
            self.device.type == "cpu"
            and self._max_side <= n
            and inputs.shape[0] <= n
            and inputs.numel() <= 64 * n
        )

    def prepare_targets(self, targets: Tensor) -> Tensor:
        """``targets`` as the loss expects them (class indices of any integer dtype -> int64, ...)."""
        return prepare_targets(self.loss_fn, _tensor(targets, "targets"), self.dtype)

    def check_inputs(self, inputs: Tensor, targets: Tensor) -> None:
        """Raise a named error for a dtype/device/batch mismatch or non-finite values (and
        :meth:`check_model`'s)."""
        self.check_model()
        _tensor(inputs, "inputs")
        _tensor(targets, "targets")
        targets_as_data(targets, self.params)
        if inputs.device != self.device:
            raise DtypeMismatchError(
                f"inputs are on {inputs.device}, model on {self.device}: move them with "
                f"inputs.to({str(self.device)!r})"
            )
        if inputs.is_floating_point() or inputs.is_complex():
            if inputs.dtype != self.dtype:
                raise DtypeMismatchError(
                    f"inputs are {inputs.dtype}, model is {self.dtype}: convert with inputs.to({self.dtype})"
                )
        elif not isinstance(self.stages[0], GenericStage):  # token ids etc.: data, never differentiated
            raise DtypeMismatchError(
                f"inputs are {inputs.dtype}, but the first stage ({self.stages[0].name}) needs {self.dtype} "
                f"inputs; integer inputs (token ids) need a first module that takes them, e.g. nn.Embedding"
            )
        if targets.device != self.device:
            raise DtypeMismatchError(
                f"targets are on {targets.device}, model on {self.device}: move them with "
                f"targets.to({str(self.device)!r})"
            )
        if targets.is_floating_point() and targets.dtype != self.dtype:
            raise DtypeMismatchError(
                f"targets are {targets.dtype}, model is {self.dtype}: convert with targets.to({self.dtype})"
            )
        if inputs.dim() >= 1 and inputs.shape[0] == 0:
            raise ShapeMismatchError(
                f"the batch is empty (inputs of shape {tuple(inputs.shape)}: 0 examples); pass at least one"
            )
        if (inputs.dim() < 2 and inputs.is_floating_point()) or inputs.dim() < 1:
            raise ShapeMismatchError(
                "inputs must be (batch, features...) (or (batch,) integer ids), got shape "
                f"{tuple(inputs.shape)}"
            )
        if targets.dim() < 1 or targets.shape[0] != inputs.shape[0]:
            raise batch_sizes_differ(inputs, targets)
        if not torch.isfinite(inputs).all():
            raise NonFiniteError("inputs contain NaN or infinity")
        if targets.is_floating_point() and not torch.isfinite(targets).all():
            raise NonFiniteError("targets contain NaN or infinity")
        for s in self.stages:
            for t in s.params:
                if not torch.isfinite(t).all():
                    raise NonFiniteError(f"{s.name}: parameters contain NaN or infinity")
            for m in s.modules:
                stats = isinstance(m, nn.modules.batchnorm._NormBase)  # running statistics: finite
                for name, buf in m.named_buffers():
                    if not buf.is_floating_point():
                        continue
                    # NaN or +inf; -inf is a value elsewhere (an additive attention mask's)
                    bad = ~torch.isfinite(buf) if stats else buf.isnan() | (buf == float("inf"))
                    if bool(bad.any()):
                        raise NonFiniteError(f"{s.name}: buffer {name} contains NaN or infinity")

    def check_batch(self, inputs: Tensor, targets: Tensor) -> list[Tensor]:
        """:meth:`check_inputs`, then the targets against the outputs (one forward pass, no derivatives):
        the loss stage's shape, class-range and ignore-index checks, which a plain ``loss_fn`` call can
        pass by broadcasting (MSE targets ``(B,)`` against outputs ``(B, 1)``). Returns the forward
        pass (:meth:`forward`)."""
        self.check_inputs(inputs, targets)
        zs = self.forward(inputs)
        LossStage(len(self.stages), self.loss_fn, self.prepare_targets(targets), zs[-1])
        return zs

    def check_batch_if_new(self, inputs: Tensor, targets: Tensor, last: tuple | None) -> tuple:
        """:meth:`check_batch` where the batch's per-example shapes, dtypes or devices, or whether its
        batch sizes agree, differ from ``last`` (what this returned for the batch checked before; None:
        check); returns the batch's key. For the optimizers' steps: between refreshes of the curvature
        nothing else would see a target that broadcasts against the output."""
        key = (inputs.shape[1:], inputs.dtype, inputs.device, targets.shape[1:], targets.dtype)
        # (and the batch sizes' agreement: a target (1, k) broadcasts against outputs (B, k))
        key += (targets.device, inputs.shape[:1] == targets.shape[:1])
        if key != last:
            self.check_batch(inputs, targets)
        return key

    def _keep_order(self, stages: list[Stage]) -> list[Stage]:
        """``stages`` of a split again; unordered (the optimizers' chain of a model whose forward uses its
        parameters in another order than it lists them), each stage's parameters in this chain's order:
        a module called whole holds its pieces' parameters, which the split lists in
        ``model.parameters()``'s order."""
        if not self._ordered:
            pos = {id(t): i for i, t in enumerate(self.params)}
            for st in stages:
                st.params.sort(key=lambda t: pos.get(id(t), -1))
        return stages

    def _resplit(self) -> None:
        """Split again with the modules of ``_whole`` called whole (the same parameters, same order)."""
        stages = self._keep_order(split_stages(self.model, traced := [], self._whole, self._ordered))
        if [id(t) for s in stages for t in s.params] != [id(t) for t in self.params]:
            raise NotAChainError("a module called whole holds other parameters than its pieces: not a chain")
        self.stages, self._traced = stages, traced
        self.sizes = [s.p for s in stages]
        self._watch()

    @property
    def _trial(self) -> dict[int, tuple[nn.Module, HessinvError | None]] | None:
        """This thread's modules on trial in the current call (None outside :meth:`_guarded`)."""
        return getattr(_TRIALS, "by_chain", {}).get(id(self))

    @_trial.setter
    def _trial(self, value: dict | None) -> None:
        by_chain = _TRIALS.__dict__.setdefault("by_chain", {})
        if value is None:
            by_chain.pop(id(self), None)
        else:
            by_chain[id(self)] = value

    def _guarded(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` (a forward or linearization) with the fallback of a traced submodule whose pieces are
        not a chain on data (:class:`_CallWhole`): it is called whole, on trial for the rest of this call.
        If the call fails, every module put on trial in it is traced again; where the whole call failed
        the same way as its piece (it really mixes examples, or the batch does not fit the model), the
        piece's error is raised (it names the piece), else the whole call's (a size refusal with the
        batch that fits). A module that passed stays whole."""
        outer = self._trial is None
        if outer:
            self._trial = {}
        trial = self._trial
        assert trial is not None
        try:
            while True:
                try:
                    out = fn()
                except _CallWhole as e:
                    trial[id(e.module)] = (e.module, e.error)
                    self._whole.append(e.module)
                    self._resplit()
                    continue
                if outer and id(self.model) in trial:
                    _warn_called_whole(str(trial[id(self.model)][1]))
                return out
        except BaseException as e:
            if not outer or not trial:
                raise
            self._whole[:] = [m for m in self._whole if id(m) not in trial]
            self._resplit()
            if not isinstance(e, _WholeFailed):
                raise
            cause, piece = e.__cause__, trial[id(e.args[0])][1]
            mixes = isinstance(cause, HessinvError) and "mixes examples" in str(cause)
            structural = not isinstance(cause, HessinvError) or isinstance(cause, NotAChainError) or mixes
            if mixes and isinstance(piece, UnsupportedStageError) and "mixes examples" in str(piece):
                piece = mixing_too(piece, e.args[0])
            raise (piece if structural and piece is not None else cause) from cause
        finally:
            if outer:
                self._trial = None

    def _on_trial(self, s: Stage) -> nn.Module | None:
        """The module on trial (:meth:`_guarded`) that stage ``s`` calls whole, if any."""
        trial = self._trial
        if not trial:
            return None
        return next((m for m in s.modules if id(m) in trial), None)

    def _piece_failed(self, s: Stage, error: HessinvError) -> NoReturn:
        """Stage ``s`` is not a chain stage: call its module whole (a piece of a traced submodule, or of the
        model itself: then the model, one stage, with a warning where that passes; where it fails too, the
        piece's error, which names it), or, if it is a module called whole on trial, give the trial up;
        else raise ``error``."""
        trial = self._on_trial(s)
        if trial is not None:
            outer = self._enclosing_container(trial)
            if outer is not None:  # (its layers pass values no call of one of them whole can fix)
                raise _CallWhole(outer, error)
            raise _WholeFailed(trial) from error
        if s.origin is not None and s.origin is not self.model:
            raise _CallWhole(s.origin, error)
        if isinstance(self.model, nn.Module) and not any(w is self.model for w in self._whole):
            # the model's own pieces (or a top-level Sequential's layers): the model called whole on trial,
            # as nn.Sequential(model) calls it -- a warning where that passes (_guarded)
            raise _CallWhole(self.model, error)
        if any(m is self.model for m in s.modules) and isinstance(error, UnsupportedStageError):
            if "mixes examples" in str(error):  # (the model itself called whole: that advice is spent)
                raise mixing_too(error, self.model)
        raise error

    def _enclosing_container(self, module: nn.Module) -> nn.Module | None:
        """The innermost container (a plain ``nn.Sequential``; not the model itself) whose layers,
        through nested containers, include ``module``; None where there is none or it is called whole
        already. ``nn.Sequential(model)`` makes a Sequential ``model`` such a container."""
        found: nn.Module | None = None

        def walk(m: Any, inner: nn.Module | None) -> bool:
            nonlocal found
            for child in m:
                if child is module:
                    found = inner
                    return True
                if _is_container(child) and walk(child, child):
                    return True
            return False

        if _is_container(self.model):
            walk(self.model, None)
        return None if found is None or any(w is found for w in self._whole) else found

    def _stage_blocks(
        self, s: Stage, z_in: Tensor, b: Tensor, second_order: bool, dense: bool = False
    ) -> Blocks:
        """``s.linearize(z_in, b, second_order)`` (its dense blocks with ``dense``), where a refusal of a
        piece as mixing examples, or any failure of a module on trial, goes to :meth:`_piece_failed`."""
        try:
            blk = s.linearize(z_in, b, second_order)
            return blk.dense if dense and isinstance(blk, LazyBlocks) else blk
        except HessinvError as e:
            if self._on_trial(s) is None and "mixes examples" not in str(e):
                raise
            self._piece_failed(s, e)

    @exact_no_grad()
    def forward(self, inputs: Tensor) -> list[Tensor]:
        """``[z_0, z_1, ..., z_{L-1}]``: the input and every stage's output. A traced submodule whose
        pieces pass values that are not batch-first (``torch.stack`` of branches, a transpose to
        sequence-first and back) is called whole instead (:meth:`_guarded`)."""
        with self._state_kept():
            return self._guarded(lambda: self._forward(inputs))

    @contextlib.contextmanager
    def _state_kept(self):
        """Run the block (a forward or linearizing pass) with the user's own modules' plain attributes put
        back as they were after it: one a module creates (a stashed activation, ``self.feat = a``) is
        removed again, one it turns from None into a tensor (a memo, ``self._s = self.log_s.exp()`` on the
        first call and read back later, or a stash reset to None in ``__init__``) is None again, and a
        buffer of theirs that the pass changed in place (a call counter, ``self.n += 1``) has its value
        back. Each pass
        computes its own memo, with the derivatives that pass takes: kept, a pass without derivatives left
        a graph-less tensor that made the parameter's derivatives zero (27% off), in the user's later
        calls too. A memo kept inside a container (``self._cache[k] = ...``) is not seen. A call inside
        ``torch.nn.utils.parametrize.cached()`` is refused (its cache is torch's: the gradient was 12%
        off)."""
        if self.__dict__.get("_parametrized") and getattr(torch.nn.utils.parametrize, "_cache_enabled", 0):
            raise UnsupportedStageError(
                "hessinv was called inside torch.nn.utils.parametrize.cached(): the parametrized weights "
                "would be computed once, in a pass without derivatives, and kept (the gradient came out 12% "
                "off, H 45%); call it outside that context"
            )
        mods = self.__dict__.get("_own") or []
        before = [({k for k, v in vars(m).items() if v is None}, set(vars(m))) for m in mods]
        try:
            with _buffers_kept(mods):
                yield
        finally:
            for m, (nones, had) in zip(mods, before, strict=True):
                for k, v in list(vars(m).items()):
                    if k not in had:
                        delattr(m, k)
                    elif k in nones and isinstance(v, Tensor):
                        setattr(m, k, None)

    def _forward(self, inputs: Tensor) -> list[Tensor]:
        zs = [inputs]
        for s in self.stages:
            try:
                z = s.forward(zs[-1])
            except (RuntimeError, ValueError, TypeError, IndexError) as e:
                trial = self._on_trial(s)
                if trial is not None:
                    raise _WholeFailed(trial) from e
                if isinstance(e, HessinvError):
                    raise
                wrong_type = any(w in str(e) for w in ("type", "Long", "Int"))
                if len(zs) == 1 and wrong_type and "indices" in str(e):  # an Embedding's token ids
                    raise DtypeMismatchError(
                        f"inputs are {inputs.dtype}, which {s.name} does not take ({e}): token ids are "
                        "integer indices, convert them with inputs.long()"
                    ) from e
                if len(zs) == 1 and not inputs.is_floating_point() and wrong_type:
                    raise DtypeMismatchError(
                        f"inputs are {inputs.dtype}, which {s.name} does not take ({e}); convert them with "
                        f"inputs.to({self.dtype}) (integer inputs are for a first module that takes them, "
                        "e.g. nn.Embedding)"
                    ) from e
                if "dtype" in str(e) or "scalar type" in str(e):
                    held = sorted(
                        {
                            str(t.dtype)
                            for m in s.modules
                            for k, t in [*m.named_parameters(), *m.named_buffers()]
                            # (not a traced piece's copy of a constant forward creates: so named by torch.fx)
                            if t.is_floating_point() and t.dtype != self.dtype and "_tensor_constant" not in k
                        }
                    )
                    if held:  # (a frozen bfloat16 backbone)
                        raise DtypeMismatchError(
                            f"{s.name} holds {', '.join(held)} tensors (frozen parameters, buffers) in a "
                            f"{self.dtype} model and failed on its {zs[-1].dtype} input ({e}); hessinv "
                            f"computes in one dtype: convert them (model.to({self.dtype})), or run the part "
                            "that holds them first and pass its outputs as the inputs"
                        ) from e
                    # a constant of another dtype in forward
                    raise DtypeMismatchError(
                        f"{s.name} failed on its {zs[-1].dtype} input: {e} -- a tensor that forward creates "
                        "(torch.eye(5), torch.tensor(...)) has the default dtype, not the model's: create it "
                        "with dtype=x.dtype, or register it as a buffer (model.to() then converts it)"
                    ) from e
                if type(e) not in (RuntimeError, ValueError, TypeError, IndexError):
                    raise  # (the user's own exception, a subclass: theirs to catch, as from their forward)
                if isinstance(e, TypeError) and _takes_more(s, zs[-1]):
                    raise UnsupportedStageError(  # (nn.MultiheadAttention, nn.Bilinear in a Sequential)
                        f"{s.name} takes more than one input ({e}); a stage is called with one tensor, the "
                        "output of the stage before it: wrap it in a module whose forward(x) calls it "
                        "(for attention, att(x, x, x)[0]; for nn.Bilinear, bil(x, x))"
                    ) from e
                raise ShapeMismatchError(
                    f"{s.name} failed on input of shape {tuple(zs[-1].shape)}: {e}"
                ) from e
            if isinstance(z, Tensor) and z.is_floating_point() and z.dtype != self.dtype:
                if _autocast_on(z.device.type):
                    raise DtypeMismatchError(
                        f"{s.name} returns {z.dtype} in a {self.dtype} model under torch.autocast: hessinv "
                        "computes exactly in the model's dtype; call it outside the autocast context"
                    )
                raise DtypeMismatchError(
                    f"{s.name} returns {z.dtype} in a {self.dtype} model; hessinv computes in one dtype: "
                    "remove the cast"
                )
            if isinstance(z, Tensor) and z.is_complex():  # (differentiable, but no real block between stages)
                self._piece_failed(
                    s,
                    NotAChainError(
                        f"{s.name} returns complex values; the stages of a chain pass real tensors: keep the "
                        "complex part inside one module (with what makes it real, e.g. .abs()), or pass "
                        "nn.Sequential(model) to have the model called whole as one stage (exact; dense "
                        "blocks)"
                    ),
                )
            if not isinstance(z, Tensor) or z.dim() < 1 or z.shape[0] != inputs.shape[0]:
                what = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
                if isinstance(z, Tensor) and z.dim() == 0 and s is self.stages[-1]:
                    error = NotAChainError(
                        f"the model's output ({s.name}) is a scalar, not one output per example: a loss "
                        "computed inside the model? Return the per-example outputs and compute the loss in "
                        "loss_fn(outputs, targets)"
                    )
                elif isinstance(z, Tensor) and s is self.stages[-1]:  # the output: no call whole can help
                    error = NotAChainError(
                        f"the model's output ({s.name}) is {what}, not a tensor with the batch dimension "
                        f"first ({inputs.shape[0]} examples): return the outputs batch first -- a sequence "
                        "model's logits as (B, T, classes) -- and flatten them in loss_fn, e.g. "
                        "loss_fn = lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten())"
                    )
                else:
                    error = NotAChainError(
                        f"{s.name} returns {what}, not a tensor with the batch dimension first: keep the "
                        "batch first between the model's layers, or pass nn.Sequential(model) to have the "
                        "model called whole as one stage (exact; dense blocks)"
                    )
                self._piece_failed(s, error)
            zs.append(z)
        return zs

    @exact_no_grad()
    def loss(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """The scalar loss ``z_L`` (no derivatives)."""
        self.check_inputs(inputs, targets)
        return self.loss_fn(self.forward(inputs)[-1], unshared(self.prepare_targets(targets)))

    def linearize(
        self,
        inputs: Tensor,
        targets: Tensor,
        second_order: bool = True,
        *,
        checked: bool = False,
        gradient: bool = True,
    ) -> Linearization:
        """Forward and backward pass: every stage's blocks, the gradient, the loss.

        ``second_order=False`` drops every stage's ``H..`` blocks except the loss's (Gauss-Newton). A
        piece of a traced submodule that is not per-example on its own (it mixes examples, seen piece
        by piece) gets the submodule called whole (:meth:`_guarded`); where that mixes too, the piece's
        refusal stands.

        For a caller that takes the Gauss-Newton blocks only, of a batch it has checked itself (an
        optimizer's curvature batch, drawn from the step's checked batch: its refresh): ``checked`` skips
        :meth:`check_inputs`, and ``gradient=False`` the backward pass of the gradient (``gradient`` is
        then None) on a chain of Linear + activation stages (:class:`DenseStage`; other stages' blocks read
        the backward vectors) once this split's gradient has been checked against autograd's
        (:meth:`_check_gradient`); with ``second_order`` both are ignored (a stage's ``Hxx`` needs the
        backward vectors). A 17-stage tanh chain's refresh: 3.8 -> 2.1 ms with the operator's
        ``_transient``.
        """
        lean = not second_order and self.__dict__.get("_gradient_checked", False)
        checked, gradient = checked and lean, gradient or not lean
        with self._state_kept():
            return without_draws(
                lambda: self._guarded(
                    lambda: self._linearize(inputs, targets, second_order, checked, gradient)
                ),
                "the forward and backward pass",
                torch_too=False,
            )

    def _split_at_logits(
        self, zs: list[Tensor], targets: Tensor
    ) -> tuple[nn.CrossEntropyLoss, Tensor] | None:
        """The cross-entropy on the logits that equals ``loss_fn`` after the last stage (up to a constant),
        and its targets, where that stage is a parameter-free log-softmax over the classes (dim 1; checked
        on this batch's values) and the loss ``NLLLoss`` (module, ``F.nll_loss`` or a partial of it: the
        same function; outputs ``(B, C)`` or per position ``(B, C, ...)``) or ``KLDivLoss`` (module,
        ``F.kl_div`` or a partial of it; ``reduction`` 'batchmean', 'sum' or 'mean', the last a
        cross-entropy with class weights ``1 / C``) of ``(B, C)`` or per position ``(B, C, ...)``
        probability targets, or
        log-probabilities with ``log_target=True`` (knowledge distillation: the cross-entropy with those
        probabilities, minus their entropy); else None. A loss module with hooks is not split
        (:func:`~hessinv.stages.losses.plain_module`: the hooks may change its function)."""
        fn, kw = self.loss_fn, {}
        if isinstance(fn, functools.partial) and fn.func in (F.nll_loss, F.kl_div) and not fn.args:
            fn, kw = fn.func, dict(fn.keywords)
            allowed = (
                {"weight", "ignore_index", "reduction"} if fn is F.nll_loss else {"reduction", "log_target"}
            )
            if set(kw) - allowed:
                return None
        if not plain_module(fn):
            return None
        kl: tuple[str, bool] | None = None  # (reduction, log_target) of a KL divergence
        if type(fn) is nn.KLDivLoss:
            kl = (fn.reduction, fn.log_target)
        elif fn is F.kl_div:
            kl = (kw.get("reduction", "mean"), bool(kw.get("log_target", False)))
        if kl is not None and kl[0] not in ("batchmean", "sum", "mean"):
            return None
        if not (type(fn) is nn.NLLLoss or fn is F.nll_loss or kl) or len(zs) < 2 or self.stages[-1].p:
            return None
        logits, out = zs[-2], zs[-1]
        if out.dim() < 2 or logits.shape != out.shape or not out.is_floating_point():
            return None
        if kl and (targets.shape != out.shape or not targets.is_floating_point()):
            return None
        if not kl and (targets.is_floating_point() or targets.is_complex()):
            return None  # (NLLLoss takes class indices only; its own call names what it got)
        with torch.no_grad():
            ref = torch.log_softmax(logits, dim=1)
            tol = 10 * torch.finfo(out.dtype).eps * (1.0 + float(ref.abs().max()) if ref.numel() else 1.0)
            if not bool(((out - ref).abs() <= tol).all()):
                return None
        if kl:
            probs = targets.exp() if kl[1] else targets
            if kl[0] == "sum":
                return nn.CrossEntropyLoss(reduction="sum"), probs
            # the cross-entropy's mean is over the B T positions (T = 1, or per position: (B, C, ...)); the
            # KL's 'mean' over its B C T entries (class weights 1 / C), 'batchmean' over B (weights T)
            positions = math.prod(out.shape[2:])
            scale = 1.0 / out.shape[1] if kl[0] == "mean" else float(positions)
            if scale == 1.0:
                return nn.CrossEntropyLoss(), probs
            w = torch.full((out.shape[1],), scale, dtype=out.dtype, device=out.device)
            return nn.CrossEntropyLoss(weight=w), probs
        if fn is F.nll_loss:
            return nn.CrossEntropyLoss(**kw), targets
        ce = nn.CrossEntropyLoss(weight=fn.weight, ignore_index=fn.ignore_index, reduction=fn.reduction)
        return ce, targets

    def _check_traced(self, inputs: Tensor, out: Tensor) -> None:
        """Once per split of a model that was traced: raise :class:`NotAChainError` where the stages'
        output ``out`` is not the model's own forward on ``inputs``. torch.fx traces with placeholders, so
        Python that inspects a value's type (``isinstance(h, torch.Tensor)``, ``torch.is_tensor``) takes
        another branch in the trace than in a real call, and the curvature would be another function's.
        The model's plain attributes (a call counter) are put back after the call."""
        if self._eager_checked or not self._traced:
            return
        without_draws(lambda: self._compare_eager(inputs, out), "the model's own forward")
        self._eager_checked = True

    def _compare_eager(self, inputs: Tensor, out: Tensor) -> None:
        """:meth:`_check_traced`'s comparison."""
        mods = self._own_modules()
        saved = [a for m in mods for a in _attributes(m)]
        buffers = [
            (name, b, b._version) for m in mods if isinstance(m, nn.Module) for name, b in m.named_buffers()
        ]

        def eager() -> Any:
            with exact_no_grad():
                real = unshared(inputs)
                for m in mods:
                    real = m(real)
            return real

        try:
            real = eager()
            changed = [name for name, b, version in buffers if b._version != version]
            # a forward that changes its buffers in place (a call counter): a function of them too?
            again = eager() if changed and isinstance(real, Tensor) else real
        except Exception as e:  # noqa: BLE001 - any failure of the real forward
            raise NotAChainError(
                f"the model's own forward fails on these inputs ({type(e).__name__}: {e}) where its traced "
                "stages run: forward takes another path when traced (Python checks of a value's type or "
                "shape); write the model as an nn.Sequential of stages"
            ) from e
        finally:
            _restore_attributes(saved)
        if not isinstance(real, Tensor) or real.shape != out.shape:
            what = tuple(real.shape) if isinstance(real, Tensor) else type(real).__name__
            raise NotAChainError(
                f"the model returns {what} but its traced stages return {tuple(out.shape)}: forward takes "
                "another path when traced by torch.fx (isinstance(x, torch.Tensor) / torch.is_tensor(x) are "
                "False for its placeholders); remove such checks or write the model as an nn.Sequential"
            )
        with torch.no_grad():
            real = real.to(out.dtype)
            # an overflow both compute alike (inf where the other has inf, NaN where NaN) is the same
            # function; the loss's non-finite value is named later (NonFiniteError)
            fin = torch.isfinite(real) & torch.isfinite(out)
            alike = fin | (real == out) | (torch.isnan(real) & torch.isnan(out))
            diff = float((real - out)[fin].abs().max()) if bool(fin.any()) else 0.0
            diff = diff if bool(alike.all()) else math.inf
            scale = float(out[fin].abs().max()) if bool(fin.any()) else 0.0
            moved = again is not real and not torch.equal(
                torch.nan_to_num(again.to(out.dtype)), torch.nan_to_num(real)
            )
        if moved:
            raise NotAChainError(
                f"the model's forward changes its buffer(s) {changed} in place on every call (a counter, a "
                "running statistic) and its output depends on them (two calls differ): it is no fixed "
                "function of its parameters to differentiate -- update them outside forward (in the training "
                "loop), or only where self.training is set and call model.eval()"
            )
        if not diff <= math.sqrt(torch.finfo(out.dtype).eps) * max(scale, torch.finfo(out.dtype).tiny):
            raise NotAChainError(
                f"the model's traced stages compute another function than its forward (outputs differ by "
                f"{diff:.3g}, max|output| {scale:.3g}). Either forward reads a value that the trace took as "
                "a constant and that changed since (a global, or an attribute of an object that is not one "
                "of the model's modules: unlike the modules' own attributes, these are not watched) -- build "
                "the operator or optimizer again after changing it, or keep the value as an attribute of "
                "the model; or forward takes another path when traced by torch.fx (isinstance(x, "
                "torch.Tensor) / torch.is_tensor(x) are False for its placeholders) -- remove such checks "
                "or write the model as an nn.Sequential of stages"
            )

    def _linearize(
        self,
        inputs: Tensor,
        targets: Tensor,
        second_order: bool,
        checked: bool = False,
        gradient: bool = True,
    ) -> Linearization:
        if not checked:
            self.check_inputs(inputs, targets)
        targets = self.prepare_targets(targets)
        zs = self.forward(inputs)
        self._check_traced(inputs, zs[-1])
        for st, z in zip(self.stages, zs[1:], strict=True):
            if z.dim() >= 1 and z.shape[0] and not z[0].numel() and st is not self.stages[-1]:
                raise UnsupportedStageError(
                    f"{st.name}: its output has no entries per example (a layer of width 0, shape "
                    f"{tuple(z.shape)}): nothing before it reaches the loss; remove the zero-width layer"
                )
        y = zs[-1]
        # NLLLoss after a LogSoftmax: the loss is linear in the log-probabilities, so a Gauss-Newton split
        # there gives a zero matrix; split at the logits instead (cross-entropy on them, the same function:
        # the generalized Gauss-Newton practitioners mean), the LogSoftmax stage an identity. The Hessian
        # too: the LogSoftmax's own second derivatives are differences of large terms at confident
        # predictions (refused from a logit margin of 20, 5e-10 off at 17), the cross-entropy's closed form
        # is not
        split = self._split_at_logits(zs, targets)
        ce = None if split is None else split[0]
        loss_stage = LossStage(
            len(self.stages),
            ce or self.loss_fn,
            targets if split is None else split[1],
            zs[-2] if ce else y,
            named=self.loss_fn,
        )
        if ce is not None:
            y = zs[-2]
        with torch.no_grad():
            loss_blocks, loss = loss_stage.linearize(y)
        if not torch.isfinite(loss):
            raise NonFiniteError(f"the loss is {loss.item()}")
        if loss_stage.closed is not None:
            with torch.no_grad():
                reference = loss_stage.call(y)
            if not torch.allclose(loss, reference.to(loss.dtype), rtol=1e-4, atol=1e-6):
                raise UnsupportedStageError(
                    f"{loss_stage.name}: per-example decomposition {loss.item()} != loss {reference.item()}"
                )
            loss = reference.to(loss.dtype)
        if ce is not None:  # the loss itself (a KL divergence: the cross-entropy minus the targets' entropy)
            with torch.no_grad():
                loss = self.loss_fn(zs[-1], unshared(targets)).to(loss.dtype).reshape(())
        if (
            not second_order
            and loss_blocks.is_zero()
            and bool(loss_blocks.G.any())
            and not self.__dict__.get("_warned_zero_gauss_newton")
        ):
            # once per chain (an optimizer's refreshes share it): Python's once-per-location rule does not
            # hold here, since a generic stage's catch_warnings() resets the registry (20 copies in 200 steps)
            self._warned_zero_gauss_newton = True
            warn(
                f"{loss_stage.name}: the loss's second derivative in the model's outputs is zero on this "
                "batch (a loss linear in them: KLDivLoss or NLLLoss on log-probabilities computed inside a "
                "stage, L1Loss, HuberLoss beyond delta; or saturated outputs), so its Gauss-Newton matrix is "
                "zero on it (hessinv.optim's preconditioner then steps by its diagonal damping alone, "
                "Adam-like). For curvature from the outputs, use a loss with a second derivative there "
                "(MSELoss, cross-entropy on the logits, BCEWithLogitsLoss) or curvature='hessian'",
                UserWarning,
            )
        blocks: list[Blocks] = [loss_blocks]
        b = torch.ones(1, 1, 1, dtype=self.dtype, device=self.device)
        b = blocks[0].jzT(b)
        # (split at the logits: b sums to zero per example, so the LogSoftmax's backward passes it unchanged)
        out_grad = b
        grads: list[Tensor] = []
        # (no blocks before the first stage with parameters: a convolution's dense per-example Jacobians
        # in a frozen backbone took seconds)
        first = self._first_with_parameters()
        mixing = self._prefix_mixing_stage(zs, first)
        if mixing is not None:  # (a piece of a submodule: called whole, which may well be per-example)
            self._piece_failed(
                mixing,
                UnsupportedStageError(
                    f"{mixing.name} mixes examples: its output for an example depends on the others in the "
                    "batch; make it act on each example alone, or compute it outside the model and pass "
                    "the result as the inputs (if it moves the batch axis, as x.transpose(0, 1) does for a "
                    "sequence-first layer, for a later op to move back: pass nn.Sequential(model) to call "
                    "the model whole)"
                ),
            )
        # (blocks without the backward vectors b: a plain Linear + activation's Gauss-Newton blocks only)
        pairs = zip(self.stages[first:], zs[first:-1], strict=True)
        gradient = gradient or not all(isinstance(st, DenseStage) and z.dim() == 2 for st, z in pairs)
        for s, z_in in zip(reversed(self.stages[first:]), reversed(zs[first:-1]), strict=True):
            with exact_no_grad():
                if ce is not None and s is self.stages[-1]:  # the LogSoftmax, moved into the loss
                    blocks.insert(0, IdentityBlocks(z_in.shape[0], z_in[0].numel()))
                    continue
                blk = self._stage_blocks(s, z_in, b[..., 0], second_order)
                # a generic stage's Gauss-Newton blocks are formed, and probed, only when a product asks:
                # a piece of a traced submodule (or a submodule called whole on trial) is tested for
                # mixing now, once per stage (two vector-Jacobian products); a layer of a nested
                # Sequential is a module called as it is, as at the top (no test)
                traced_piece = s.origin is not None and not _is_container(s.origin)
                if (traced_piece or self._on_trial(s) is not None) and not getattr(s, "_per_example", False):
                    if getattr(blk, "couples_examples", None) and blk.couples_examples():
                        self._piece_failed(s, mixing_error(s.name, module=getattr(s, "module", None), z=z_in))
                    s._per_example = blk.batch > 1  # one example shows no coupling: test again
                if gradient:  # (else b stays the loss's: Gauss-Newton blocks do not read it)
                    grads.append(blk.jxT(b)[:, 0])
                    b = blk.jzT(b)
            blocks.insert(0, blk)
        if not gradient:
            return Linearization(blocks, None, loss, self.sizes[first:], blocks[0].d_in, first)
        g = torch.cat(grads[::-1])
        if not linalg.all_finite(g):
            raise NonFiniteError("the gradient contains NaN or infinity")
        self._check_gradient(inputs, targets, g, float(loss), out_grad)
        return Linearization(blocks, g, loss, self.sizes[first:], blocks[0].d_in, first)

    def _own_modules(self) -> list[nn.Module]:
        """The modules the model's own forward runs in turn (:func:`model_parts`; a ``torch.compile``-d one
        as its original module)."""
        return [m._orig_mod if compiled_module(m) else m for m in model_parts(self.model)]

    def _own_forward(self, inputs: Tensor) -> Tensor:
        """``model(inputs)`` through the model's own forward (its modules in turn, for a list), with the
        grad mode of the caller; the modules' plain attributes (a call counter, a stashed value) put back."""
        mods = self._own_modules()
        saved = [a for m in mods for a in _attributes(m)]
        try:
            out = unshared(inputs)
            with NoFastPath():  # (as the stages are called: a frozen transformer's fused path off)
                for m in mods:
                    out = m(out)
            return out
        finally:
            _restore_attributes(saved)

    def _own_gradient(self, inputs: Tensor, targets: Tensor, out_grad: Tensor | None = None) -> Tensor:
        """The flat gradient of ``loss_fn(model(inputs), targets)`` in :attr:`params` by autograd through
        :meth:`_own_forward` (zeros for a parameter the loss does not reach); with ``out_grad``, the loss's
        gradient in the model's outputs, back-propagated from there."""
        with torch.enable_grad():
            out = self._own_forward(inputs)
            if out_grad is None or out_grad.numel() != out.numel():
                out, out_grad = self.loss_fn(out, unshared(targets)), None
        if out_grad is not None:
            out_grad = out_grad.reshape(out.shape).to(out.dtype)
        got = linalg.grad(out, self.params, grad_outputs=out_grad, allow_unused=True)
        flat = [
            (torch.zeros_like(p) if g is None else dense_grad(g)).reshape(-1)
            for g, p in zip(got, self.params, strict=True)
        ]
        return torch.cat(flat)

    def _check_gradient(
        self, inputs: Tensor, targets: Tensor, gradient: Tensor, loss: float, out_grad: Tensor | None = None
    ) -> None:
        """Once per split: raise :class:`NotAChainError` where the stages' gradient is not autograd's on
        the model's own forward. A stage that reads what another stage set or holds -- an activation
        stashed on a module by an earlier one, a parameter reached through a reference no module
        registers -- computes the same loss, but the split takes that value as a constant: the gradient
        was 25-67% off and the Hessian 71-88% (a new user's models), with no error. ``out_grad``: the
        loss's gradient in the model's outputs as the chain has it, back-propagated through the model's
        own forward (what is compared is the split: autograd's own ``p - 1`` of a confident
        cross-entropy cancels, 3% off the closed form's at a logit margin of 36)."""
        if self.__dict__.get("_gradient_checked"):
            return
        try:
            own = self._own_gradient(inputs, targets, out_grad).detach().to(gradient.dtype)
        except Exception:  # noqa: BLE001 - the model's own forward is checked elsewhere (_check_traced)
            self._gradient_checked = True
            return
        if not bool(torch.isfinite(own).all()):
            self._gradient_checked = True
            return
        diff = float((own - gradient).double().norm())
        scale = max(float(own.double().norm()), float(gradient.double().norm()), torch.finfo(self.dtype).tiny)
        u = torch.finfo(self.dtype).eps
        # (plus the rounding of a gradient near a critical point, where both are ~u |loss|: no relative test)
        floor = 1e3 * u * abs(loss) * math.sqrt(max(gradient.numel(), 1))
        if not diff <= 10 * math.sqrt(u) * scale + floor:
            raise NotAChainError(
                f"the chain's gradient differs from autograd's on the model's own forward (by {diff:.3g}, "
                f"|gradient| {scale:.3g}): a stage reads a value another stage set or holds -- an activation "
                "stashed on a module by an earlier one, a parameter reached through a reference no module "
                "registers -- which the split takes as a constant. Put the modules from the one that sets it "
                "to the one that reads it into one nn.Module with its own forward (a stage; a nested "
                "nn.Sequential is split into its layers), or register the shared parameter on the module "
                "that uses it"
            )
        self._gradient_checked = True

    def per_example_gradients(self, inputs: Tensor, targets: Tensor) -> Tensor | None:
        """``(B, n)``: row ``i`` is the gradient of example ``i``'s own loss ``loss_fn(model(x_i[None]),
        y_i[None])`` in the chain's parameters, or None where a stage has no per-example form.

        One forward pass and one backward pass of the batch: the loss's per-example output gradients
        ``g_i`` (``torch.func.vmap`` over the loss alone) are back-propagated together -- a chain whose
        stages keep examples apart (:attr:`Blocks.per_example`) carries each example's own ``b_i`` --
        and each stage turns ``b_i`` into its rows (:meth:`Blocks.per_example_jxT`: outer products
        ``(s' o b_i) z_i^T`` for a Linear layer). Against ``vmap(grad)`` of the whole model: the same
        numbers up to rounding, in about a third of the time (400 examples of a depth-24 width-12
        tanh MLP: 12 against 36 ms)."""
        from torch.func import grad, vmap

        zs = self.check_batch(inputs, targets)
        out = zs[-1].detach()

        def own_loss(o: Tensor, t: Tensor) -> Tensor:
            return self.loss_fn(o[None], unshared(t[None]))

        if self.__dict__.get("_rows_refused"):  # (found another function once: the per-example route)
            return None
        t = self.prepare_targets(targets)
        try:
            b0 = vmap(grad(own_loss))(out, t)
        except RuntimeError:  # a loss vmap cannot batch (``.item()``, a Python branch on a value): one by one
            b0 = torch.stack([_loss_output_gradient(own_loss, out[i], t[i]) for i in range(out.shape[0])])
        b0 = b0.reshape(out.shape[0], -1)
        first = [zs]  # check_batch's forward serves the first try; a try after a re-split runs its own
        try:
            rows = self._guarded(
                lambda: self._per_example_rows(first.pop() if first else self.forward(inputs), b0)
            )
        except (NoDoubleBackward, TooLargeError):  # (a stage's rows from its dense blocks, a double backward
            # or too large -- an nn.EmbeddingBag; an Embedding(20000, 16)'s 1e11 numbers: the caller's
            # per-example route, first derivatives only)
            return None
        if rows is None or self.__dict__.get("_rows_checked") or rows.shape[0] < 2:
            return rows
        # once per split: up to 16 examples' outputs alone against the batch's, and the first example's
        # row against autograd on it alone -- a stage whose behaviour depends on the batch (a branch on a
        # batch sum) keeps examples apart in its derivatives but not in its value: its rows were 82% off
        # (a new user's model); None sends the caller to the per-example route
        try:
            found = self.alone_against_batch(inputs, out)
        except Exception:  # noqa: BLE001 - the rows stand where the model's own forward cannot be taken
            return rows
        if found is not None:
            self._rows_refused = True
            if found[2]:  # (what a caller that pairs these rows with the batch's curvature must refuse)
                self._batch_dependent = found[:2]
            return None
        try:
            alone = self._own_gradient(inputs[:1], self.prepare_targets(targets[:1]))
        except Exception:  # noqa: BLE001 - the rows stand where the model's own forward cannot be taken
            return rows
        diff = float((alone.to(rows.dtype) - rows[0]).double().norm())
        scale = max(
            float(alone.double().norm()), float(rows[0].double().norm()), torch.finfo(self.dtype).tiny
        )
        # (an example fit to rounding has a row of rounding noise: measured against the batch's rows)
        floor = 1e-2 * float(rows.double().norm(dim=1).max())
        if not diff <= 10 * math.sqrt(torch.finfo(self.dtype).eps) * (scale + floor):
            self._rows_refused = True  # (once: every later call takes the per-example route at once)
            return None
        self._rows_checked = True
        return rows

    def alone_against_batch(self, inputs: Tensor, out: Tensor) -> tuple[int, float, bool] | None:
        """Up to 16 examples' outputs alone against ``out``, their outputs in the batch ``inputs`` (to
        ``sqrt(u)`` of the largest output): the first that differs as ``(example, largest difference,
        whether a float64 copy of the model differs too)`` -- True: the output depends on the rest of the
        batch (a branch on a batch sum), not the rounding of batched against one-row products -- else None.
        Errors of the model's own forward are the caller's."""
        B = int(out.shape[0])
        eps = math.sqrt(torch.finfo(self.dtype).eps)
        with exact_no_grad():
            for i in torch.linspace(0, B - 1, min(B, 16)).long().unique().tolist():
                alone = self._own_forward(inputs[i : i + 1]).to(out.dtype)[0]
                if not torch.allclose(alone, out[i], rtol=eps, atol=eps * float(out.abs().max())):
                    real = self.dtype == torch.float64 or self._alone_differs_in_float64(inputs, i)
                    return i, float((alone - out[i]).abs().max()), real
        return None

    def _alone_differs_in_float64(self, inputs: Tensor, i: int) -> bool:
        """Whether example ``i``'s output alone differs from its output in the batch ``inputs`` on a float64
        copy of the model too (to ``sqrt(u64)`` of the largest output): a float32 model's batched and
        one-row products round differently, by far more than ``sqrt(u32)`` of the outputs where they cancel
        large intermediate values (features near 1e5: 5e-4 against 1e-11 in float64) -- no evidence of an
        output that depends on the batch. A copy that cannot run in float64 counts as differing."""
        try:
            mods = copy.deepcopy(self._own_modules())
            x = inputs.double() if inputs.is_floating_point() else inputs
            with exact_no_grad():
                out, alone = x, x[i : i + 1]
                for m in mods:
                    m.double()
                    out, alone = m(out), m(alone)
            tol = math.sqrt(torch.finfo(torch.float64).eps)
            return not torch.allclose(alone[0], out[i], rtol=tol, atol=tol * float(out.abs().max()))
        except Exception:  # noqa: BLE001 - no float64 copy to tell: the float32 difference stands
            return True

    def _first_with_parameters(self) -> int:
        """The first stage with parameters: the stages before it (a frozen backbone in front of a
        trainable head) only transform the inputs -- nothing upstream of them varies -- so no derivative
        of theirs enters H, G or any gradient, and their blocks are never formed."""
        return next((i for i, st in enumerate(self.stages) if st.p), 0)

    def _prefix_mixing_stage(self, zs: list[Tensor], first: int) -> Stage | None:
        """The first of the stages before ``first`` (no blocks, so no probe of theirs) whose output for an
        example depends on other examples (``x - x.mean(0)``), or None: the batch in two halves must
        give the same outputs as the whole. hessinv takes the loss as a sum over examples, each through
        the model alone (per-example gradients, influence, curvature sub-batches)."""
        B = int(zs[0].shape[0]) if zs[0].dim() else 0
        if not first or B < 2:
            return None
        halves = [zs[0][: B // 2], zs[0][B // 2 :]]

        def alone(s: Stage, h: Tensor) -> Tensor:  # a half of one example goes twice (squeeze() keeps B)
            return s.forward(torch.cat([h, h]))[:1] if h.shape[0] == 1 else s.forward(h)

        for s, ref in zip(self.stages[:first], zs[1 : first + 1], strict=True):
            try:
                with exact_no_grad():
                    halves = [alone(s, h) for h in halves]
                out = torch.cat(halves)
            except Exception:  # noqa: BLE001 - a stage that cannot take part of the batch
                return s
            if out.shape != ref.shape or out.dtype != ref.dtype:
                return s
            if not ref.is_floating_point():
                if not torch.equal(out, ref):
                    return s
                continue
            tol = math.sqrt(torch.finfo(ref.dtype).eps)  # (batch-size-dependent kernels round differently)
            if not torch.allclose(out, ref, rtol=tol, atol=tol * float(ref.abs().max())):
                return s
        return None

    def _per_example_rows(self, zs: list[Tensor], b: Tensor) -> Tensor | None:
        rows = b.new_empty(b.shape[0], self.num_params)
        end = self.num_params
        first = self._first_with_parameters()  # (a frozen backbone before it: no rows, no blocks)
        if self._prefix_mixing_stage(zs, first) is not None:
            return None  # (the caller's per-example route: each example through the model alone)
        with exact_no_grad():
            for s, z_in in zip(reversed(self.stages[first:]), reversed(zs[first:-1]), strict=True):
                # keeping examples apart is probed on a generic stage's dense form
                blk = self._stage_blocks(s, z_in, b, False, dense=True)
                if not blk.per_example:
                    return None
                if blk.p:
                    if blk.per_example_jxT(b, out=rows[:, end - blk.p : end]) is None:
                        return None
                    end -= blk.p
                b = blk.jzT(b[..., None])[..., 0]
        return rows


__all__ = ["Chain", "Linearization", "LossFn", "split_stages", "check_real", "closed_form", "loss_name"]
