"""Operators keep their point for every tensor the model reads, not only its trainable parameters: a
frozen layer's weight or a plain tensor attribute edited in place after the operator was built (an EMA
of a frozen backbone, an annealed scale). Found by a review of precision handling: a Gauss-Newton
matrix formed a frozen layer's blocks from the edited weight (``G @ v`` 1.05 off, reported residual
4e-16), and a float32 operator's float64 copy took the edited values (refined residual reported 1e-15,
true 0.19; ``min_eigenvalue`` -0.352 against -0.307): a frozen weight changed since is now refused
there (fingerprinted, not copied: a backbone may be large), a plain tensor attribute restored.
References: plain autograd at the original point."""

from __future__ import annotations

import copy
import functools
import threading
import weakref

import pytest
import torch
import torch.nn.utils.prune
from reference import autograd_gauss_newton, autograd_gradient_hessian
from torch import nn

import hessinv
from hessinv.errors import UnsupportedStageError

F64 = torch.float64


class _Scale(nn.Module):
    """A plain tensor attribute (not a parameter or buffer) read by forward."""

    def __init__(self, width: int):
        super().__init__()
        self.s = torch.linspace(0.5, 2.0, width)

    def forward(self, x):
        return x * self.s


def _net(frozen: str) -> nn.Sequential:
    torch.manual_seed(0)
    mid = _Scale(6) if frozen == "attribute" else nn.Linear(6, 6)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), mid, nn.Tanh(), nn.Linear(6, 3))
    if frozen == "linear":
        net[2].requires_grad_(False)
    return net


def _edit(net: nn.Sequential, frozen: str) -> None:
    with torch.no_grad():
        (net[2].s if frozen == "attribute" else net[2].weight).mul_(1.7)


@pytest.mark.parametrize("frozen", ["linear", "attribute"])
def test_gauss_newton_refuses_a_frozen_tensor_edited_since(frozen):
    net = _net(frozen).double()
    X, y = torch.randn(10, 4, dtype=F64), torch.randint(0, 3, (10,))
    ref = autograd_gauss_newton(copy.deepcopy(net), nn.CrossEntropyLoss(), X, y)
    G = hessinv.gauss_newton(net, nn.CrossEntropyLoss(), X, y)
    v = torch.randn(G.shape[0], dtype=F64)
    torch.testing.assert_close(G @ v, ref @ v)  # at its point: exact
    G2 = hessinv.gauss_newton(net, nn.CrossEntropyLoss(), X, y)
    _edit(net, frozen)
    # a parameter-free generic stage's blocks are formed when first needed: refused there
    with pytest.raises(hessinv.InvalidArgumentError, match="changed after this curvature was taken"):
        G2 @ v


@pytest.mark.parametrize("frozen", ["linear", "attribute"])
def test_a_float32_operators_float64_copy_is_made_at_its_point(frozen):
    net = _net(frozen)
    X, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    at_point = copy.deepcopy(net).double()
    at_point[2].s = at_point[2].s.double() if frozen == "attribute" else None
    g_ref, H_ref = autograd_gradient_hessian(at_point, nn.CrossEntropyLoss(), X.double(), y)
    H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    _edit(net, frozen)  # before the first refined solve builds the float64 copy
    if frozen == "linear":  # a frozen parameter (possibly a large backbone) is fingerprinted: refused
        with pytest.raises(hessinv.InvalidArgumentError, match="replaced or changed since"):
            H.factor(0.05).solve(H.gradient)
        return
    A = H_ref + 0.05 * torch.eye(H_ref.shape[0], dtype=F64)
    x, info = H.factor(0.05).solve(H.gradient, return_info=True)
    b = g_ref
    true = float((b - A @ x.double()).norm() / b.norm())
    assert true < 1e-5, true  # (float32 rounding of x; it was 0.19)
    assert info.residual < 1e-10
    lam = H.min_eigenvalue()
    assert abs(lam - float(torch.linalg.eigvalsh(H_ref)[0])) < 1e-5 * float(H_ref.abs().max())


def test_a_memo_does_not_read_as_a_changed_frozen_stage():
    """A module that memoizes a tensor on its first call (put back to None after each pass) is not
    taken for a changed one when its Gauss-Newton blocks form later."""

    class Cached(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self._w = nn.Linear(6, 6), None

        def forward(self, h):
            if self._w is None:
                self._w = self.lin.weight.exp()
            return h @ self._w.T

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), Cached(), nn.Tanh(), nn.Linear(6, 3)).double()
    net[2].requires_grad_(False)
    X, y = torch.randn(10, 4, dtype=F64), torch.randint(0, 3, (10,))
    G = hessinv.gauss_newton(net, nn.CrossEntropyLoss(), X, y)
    net(X)  # the user's own call sets the memo again
    ref = autograd_gauss_newton(net, nn.CrossEntropyLoss(), X, y)
    v = torch.randn(G.shape[0], dtype=F64)
    torch.testing.assert_close(G @ v, ref @ v)


def test_a_float32_operators_float64_copy_converts_plain_tensor_attributes():
    """``Module.to`` leaves plain tensor attributes as they are: the float64 copy multiplied float64
    activations by a float32 matrix and was refused (ShapeMismatchError, 'use a float64 model')."""

    class Proj(nn.Module):
        def __init__(self):
            super().__init__()
            self.P = torch.randn(6, 6)

        def forward(self, x):
            return x @ self.P

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), Proj(), nn.Linear(6, 3))
    X, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    ref = copy.deepcopy(net).double()
    ref[2].P = ref[2].P.double()
    g, Hd = autograd_gradient_hessian(ref, nn.CrossEntropyLoss(), X.double(), y)
    H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    x, info = H.factor(0.05).solve(H.gradient, return_info=True)
    A = Hd + 0.05 * torch.eye(Hd.shape[0], dtype=F64)
    assert float((g - A @ x.double()).norm() / g.norm()) < 1e-5 and info.residual < 1e-10
    assert H.min_eigenvalue() == pytest.approx(float(torch.linalg.eigvalsh(Hd)[0]), rel=1e-6)
    assert net[2].P.dtype == torch.float32  # the user's model untouched


def test_a_float32_operator_survives_a_forward_that_rebinds_a_tensor_attribute():
    """A forward that keeps its last activation (self.last = x.detach(), for logging) rebinds that
    attribute at every call: one more forward after hessian() made the float64 copy refuse ("a tensor
    ... was replaced since"). Plain attributes are restored by their place, not their identity."""

    class Keep(nn.Module):
        def forward(self, x):
            self.last = x.detach()
            return torch.tanh(x)

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), Keep(), nn.Linear(4, 2))
    X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    net(X)
    H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    net(torch.randn(2, 3))
    _, Hd = autograd_gradient_hessian(copy.deepcopy(net).double(), nn.CrossEntropyLoss(), X.double(), y)
    assert H.min_eigenvalue() == pytest.approx(float(torch.linalg.eigvalsh(Hd)[0]), rel=1e-6)


class _LayerScale(nn.Module):
    """A residual block whose scale is a function kept on the module, over ``self`` (LayerScale-style):
    ``copy.deepcopy`` shares the function, so a copy's forward reads the original's ``g``."""

    def __init__(self, d: int):
        super().__init__()
        self.lin, self.g = nn.Linear(d, d), nn.Parameter(torch.full((d,), 0.5))
        self.scale = lambda h: h * self.g

    def forward(self, x):
        return x + self.scale(torch.tanh(self.lin(x)))


class _Gain(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * self.s


def _wrapped(m: nn.Module) -> nn.Module:
    """``m.forward`` wrapped on the instance by a plain decorator (its closure holds the bound method)."""
    inner = m.forward

    def forward(x):
        return inner(x)

    m.forward = forward
    return m


class _Parent(nn.Module):
    """A child reads its parent's buffer through a weak reference (deepcopy keeps a weakref as it is)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mask", torch.linspace(0.5, 1.5, 5))
        self.child, self.out = nn.Linear(5, 5), nn.Linear(5, 3)
        parent = weakref.ref(self)
        self.child.register_forward_hook(lambda m, i, o: torch.tanh(o) * parent().mask)

    def forward(self, x):
        return self.out(self.child(x))


def _hook_reads_buffer(net):
    net.register_buffer("mask", torch.linspace(0.5, 1.5, 5))
    net[1].register_forward_hook(lambda m, i, o: o * net.mask)
    return lambda n: n.mask.mul_(0.25)  # (a mask training updates, after the operator was built)


def _hook_reads_setting(net):
    net.temp = 2.0
    net[2].register_forward_pre_hook(lambda m, a: (a[0] / net.temp,))
    return lambda n: setattr(n, "temp", 7.0)


def _hook_reads_a_detached_weight(net):
    w = net[2]
    net[0].register_forward_hook(lambda m, i, o: o / w.weight.detach().norm())

    def step(n):
        with torch.no_grad():
            for p in n.parameters():
                p.add_(0.3)

    return step


def _parent_buffer(net):
    return lambda n: n.mask.mul_(0.25)


_CLOSURES = {  # (a block or an installer on the base chain, and what changes after the operator is built)
    "lambda over self": (lambda: _LayerScale(5), None),
    "wrapped forward": (lambda: _wrapped(_Gain(5)), None),
    "wrapped PReLU": (lambda: _wrapped(nn.PReLU(5)), None),
    "hook reads a buffer": (nn.Tanh, _hook_reads_buffer),
    "hook reads a setting": (nn.Tanh, _hook_reads_setting),
    "hook reads a detached weight": (nn.Tanh, _hook_reads_a_detached_weight),
    "weak reference": (None, _parent_buffer),
}


def _closure_model(kind: str) -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    block, install = _CLOSURES[kind]
    net = _Parent() if block is None else nn.Sequential(nn.Linear(5, 5), block(), nn.Linear(5, 3))
    return net, (install(net) if install is not None else None)


@pytest.mark.parametrize("kind", list(_CLOSURES))
@pytest.mark.parametrize("make", [hessinv.hessian, hessinv.gauss_newton])
def test_a_float32_copy_computes_with_its_own_modules_through_kept_functions(kind, make):
    """``copy.deepcopy`` copies a function as itself: a function kept on a module that refers to the model
    (a lambda over ``self``, a forward wrapped on the instance, a hook over the model, a weak reference to
    a parent) made the float64 copy a float32 operator refines against read the *original* -- its float32
    parameter (a refined solve reported a residual of 4e-16 where the true one was 0.21; ``logdet``
    -171.12 against -168.66), or a buffer, setting or weight changed after the operator was built (true
    residuals 0.9-32, reported 1e-15); a wrapped PReLU was refused as a shape mismatch. The copy's
    functions are redirected to its own modules: refined solves, ``logdet`` and ``min_eigenvalue`` at the
    operator's point, against plain autograd on a float64 model built alike."""
    X, y = torch.randn(6, 5, generator=torch.Generator().manual_seed(43)), torch.tensor([0, 1, 2, 0, 1, 2])
    net, change = _closure_model(kind)
    ref, _ = _closure_model(kind)
    ref.load_state_dict(net.state_dict())
    ref.double()
    if kind == "hook reads a setting":
        ref.temp = 2.0
    if make is hessinv.hessian:
        A = autograd_gradient_hessian(ref, nn.CrossEntropyLoss(), X.double(), y)[1]
    else:
        A = autograd_gauss_newton(ref, nn.CrossEntropyLoss(), X.double(), y)
    A = A + 0.1 * torch.eye(A.shape[0], dtype=F64)
    op = make(net, nn.CrossEntropyLoss(), X, y)
    if change is not None:
        change(net)
    g = op.gradient.double()
    if make is hessinv.gauss_newton and kind == "hook reads a detached weight":
        # (a hooked Linear is a generic stage, whose Gauss-Newton products run at its point: refused)
        with pytest.raises(hessinv.errors.InvalidArgumentError, match="changed after this curvature"):
            op.factor(0.1).solve(op.gradient)
        return
    F = op.factor(0.1)
    x, info = F.solve(op.gradient, return_info=True)
    assert info.residual < 1e-10 and float((g - A @ x.double()).norm() / g.norm()) < 1e-6
    assert F.logdet() == pytest.approx(float(torch.linalg.slogdet(A)[1]), rel=1e-8)


_GLOBAL: dict = {}


class _GlobalGain(nn.Module):
    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, 5))
        _GLOBAL["gain"] = self

    def forward(self, x):
        return x * _GLOBAL["gain"].s  # (the module reached through a global: the copy reads the original)


def test_a_float32_copy_still_reaching_the_originals_parameters_is_refused():
    """What the copy cannot redirect -- a module reached through a global -- leaves it computing with the
    original's float32 parameter: refused by name (the graph of the copy's forward is checked)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 5), _GlobalGain(), nn.Linear(5, 3))
    X, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    with pytest.raises(UnsupportedStageError, match="original model's parameter '1.s'"):
        H.factor(0.1).solve(H.gradient)


class _Doubled(functools.partial):
    """A partial whose call doubles the result (a subclass adds to its call)."""

    def __call__(self, *a, **k):
        return 2 * super().__call__(*a, **k)


class _Shared(list):
    """A registry meant to be shared between copies (its deepcopy is itself)."""

    def __deepcopy__(self, memo):
        return self


def _nonlocal_module(net):
    net[0].register_buffer("gain", torch.linspace(0.5, 1.5, 5))
    net[2].register_buffer("gain", torch.linspace(2.0, -1.0, 3))
    cur = None

    def pre(m, args):  # (two hooks share the cell: the running layer)
        nonlocal cur
        cur = m

    net[0].register_forward_pre_hook(pre)
    net[2].register_forward_pre_hook(pre)
    net[0].register_forward_hook(lambda m, i, o: o * cur.gain)


def _partial_subclass(net):
    net.register_buffer("mask", torch.linspace(0.5, 1.5, 5))
    net[1].register_forward_hook(_Doubled(lambda s, m, i, o: o * net.mask * s, 0.5))


def _captured_attribute(net):
    net.scale = torch.linspace(0.5, 1.5, 5)
    s = net.scale  # (the closure holds the attribute itself, changed in place later)
    net[1].register_forward_hook(lambda m, i, o: o * s)
    return lambda n: n.scale.mul_(0.25)


@pytest.mark.parametrize("install", [_nonlocal_module, _partial_subclass, _captured_attribute])
def test_redirected_functions_keep_what_they_shared_and_did(install):
    """A fuzzer's findings on the redirection: two hooks sharing a ``nonlocal`` got a cell each (true
    residual 83, reported 1e-14); a ``functools.partial`` subclass was rebuilt as a plain partial (its
    doubling lost: 1.66); a closure over an attribute object pointed at the deep copy's, which the point's
    restore then replaced (6.1). Exact at the operator's point now, against plain autograd on a float64
    model built alike."""
    X, y = torch.randn(6, 5, generator=torch.Generator().manual_seed(43)), torch.tensor([0, 1, 2, 0, 1, 2])

    def build(dtype):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3))
        return net, install(net)

    net, change = build(torch.float32)
    ref, _ = build(torch.float64)
    ref.double()
    if install is _captured_attribute:  # (its closure holds the float32 tensor: a float64 one for ref)
        s = torch.linspace(0.5, 1.5, 5, dtype=F64)
        ref[1]._forward_hooks.clear()
        ref[1].register_forward_hook(lambda m, i, o: o * s)
    A = autograd_gradient_hessian(ref, nn.CrossEntropyLoss(), X.double(), y)[1]
    A = A + 0.1 * torch.eye(A.shape[0], dtype=F64)
    H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    if change is not None:
        change(net)
    g = H.gradient.double()
    F = H.factor(0.1)
    x, info = F.solve(H.gradient, return_info=True)
    assert info.residual < 1e-10 and float((g - A @ x.double()).norm() / g.norm()) < 1e-6
    assert F.logdet() == pytest.approx(float(torch.linalg.slogdet(A)[1]), rel=1e-8)


def test_the_redirection_leaves_the_users_model_alone():
    """An object the copy shares with the original (its deepcopy returns it) was rewritten in place: the
    original model's function then closed over the float64 copy, and its forward failed on float32 input.
    Left alone now -- and the copy, which reads the original's mask through it, is refused by name."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3))
    net.register_buffer("mask", torch.linspace(0.5, 1.5, 5))
    net.fns = _Shared([lambda h: h * net.mask])
    net[1].register_forward_hook(lambda m, i, o: net.fns[0](o))
    f0 = net.fns[0]
    X, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    with pytest.raises(UnsupportedStageError, match="original model's buffer 'mask'"):  # (the copy reads it)
        H.factor(0.1).solve(H.gradient)
    assert net.fns[0] is f0 and f0.__closure__[0].cell_contents is net
    assert net(X).dtype == torch.float32


_MASKED = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3))  # (reached as a global below)


def test_a_float32_copy_reading_what_changed_through_a_global_is_refused():
    """At a script's top level a hook over the model reads it as a global, which no copy redirects: the
    copy read the original's mask, changed after the operator was built (true residual 6.1, reported
    3e-15). Its gradient at the point is checked against the operator's: refused by name."""
    torch.manual_seed(0)
    _MASKED.register_buffer("mask", torch.linspace(0.5, 1.5, 5))
    handle = _MASKED[1].register_forward_hook(lambda m, i, o: o * _MASKED.mask)
    try:
        X, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
        H = hessinv.hessian(_MASKED, nn.CrossEntropyLoss(), X, y)
        with torch.no_grad():
            _MASKED.mask.mul_(0.25)
        with pytest.raises(UnsupportedStageError, match="original model's buffer 'mask'"):
            H.factor(0.1).solve(H.gradient)
    finally:
        handle.remove()


def test_a_float32_copy_whose_hook_fails_on_it_is_refused_by_name():
    """A hook that looks up the original modules (``names[m]``) fails on the copy: a raw ``KeyError`` at
    every refined solve, logdet or eigenvalue; a named refusal now (and a hook holding a lock, which
    deepcopy cannot copy, likewise)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    names = {m: n for n, m in net.named_modules()}
    seen: list[str] = []
    net[0].register_forward_hook(lambda m, i, o: seen.append(names[m]))
    X, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    with pytest.raises(UnsupportedStageError, match="KeyError"):
        H.factor(0.1).solve(H.gradient)
    lock = threading.Lock()
    net2 = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    net2.lock = lock
    H = hessinv.hessian(net2, nn.CrossEntropyLoss(), X, y)
    with pytest.raises(UnsupportedStageError, match="cannot pickle"):
        H.factor(0.1).solve(H.gradient)


def _pruned():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    torch.nn.utils.prune.l1_unstructured(net[0], "weight", amount=0.4)
    return net


class _KeepsAttention(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        a = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2), -1)
        self.attn = a  # kept for a plot: a tensor with a graph after a forward with autograd on
        return a @ x


def _keeps_attention():
    torch.manual_seed(0)
    return nn.Sequential(_KeepsAttention(4), nn.Flatten(), nn.Linear(12, 3))


@pytest.mark.parametrize(
    "make_net, shape", [(_pruned, (8, 5)), (_keeps_attention, (8, 3, 4))], ids=["pruned", "kept activation"]
)
def test_a_float32_models_tensor_attribute_with_a_graph_is_copied_as_numbers(make_net, shape):
    """``torch.nn.utils.prune`` (and the old ``weight_norm`` / ``spectral_norm``) leaves a computed
    ``weight`` attribute, a module may keep an activation: after a forward with autograd on they carry a
    graph, and the float64 copy's ``copy.deepcopy`` raised torch's raw RuntimeError ("Only Tensors created
    explicitly by the user ...") at the first refined solve, ``logdet`` or eigenvalue. They are copied as
    numbers now (a pre-hook recomputes the weight; the attribute is put back at its point)."""
    net = make_net()
    X, y = torch.randn(*shape, generator=torch.Generator().manual_seed(1)), torch.arange(8) % 3
    nn.CrossEntropyLoss()(net(X), y).backward()  # an ordinary training step's forward before
    net.zero_grad()
    H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    x, info = H.factor(0.1).solve(H.gradient, return_info=True)
    with torch.no_grad():
        net(X)  # (the attributes without a graph, for the reference's own deepcopy)
    ref = copy.deepcopy(net).double()
    g, Hd = autograd_gradient_hessian(ref, nn.CrossEntropyLoss(), X.double(), y)
    A = Hd + 0.1 * torch.eye(Hd.shape[0], dtype=F64)
    assert float((g - A @ x.double()).norm() / g.norm()) < 1e-5 and info.residual < 1e-10
    assert H.min_eigenvalue() == pytest.approx(float(torch.linalg.eigvalsh(Hd)[0]), rel=1e-6)


def test_no_room_for_the_float64_copy_is_not_a_refusal_of_the_model(monkeypatch):
    """The copy's failures are named refusals of the model -- except running out of memory, which says
    nothing about the model and stays a ``MemoryError``."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    X, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)

    def full(*a, **k):
        raise MemoryError

    monkeypatch.setattr(copy, "deepcopy", full)
    with pytest.raises(MemoryError):
        H.factor(0.1).solve(H.gradient)


_TEMPERATURE = {"t": 2.0}  # (a setting read through a global: no copy redirects it)


def test_a_float32_copy_whose_loss_is_not_the_operators_says_so():
    """A plain setting read through a global and changed after the operator was built: the copy computed
    with the new one (true residual 1.8, reported 1e-15). No tensor of the original is read, so its loss
    at the point against the operator's tells: an ``AccuracyWarning`` (not a refusal: a float32 forward
    that rounds much -- a chaotic chain, a loss that cancels to ~0 -- differs as much, a second probe's
    finding, where the float64 copy's answers are the right ones)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3))
    net[2].register_forward_pre_hook(lambda m, a: (a[0] / _TEMPERATURE["t"],))
    X, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    _TEMPERATURE["t"] = 0.25
    try:
        with pytest.warns(hessinv.AccuracyWarning, match="has the loss .* at its point, not"):
            H.factor(0.1).solve(H.gradient)
    finally:
        _TEMPERATURE["t"] = 2.0


def test_a_float32_operators_float64_copy_is_made_after_the_model_went_to_training_mode():
    # (a probe: model.train() after a float32 operator was built in eval mode made its refined solve and
    # min_eigenvalue raise "Dropout was switched to training mode", while H @ v and the float64 operator
    # answered -- the copy takes the modes of the operator's point, as its parameters)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 3)).eval()
    X, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    loss_fn = nn.CrossEntropyLoss()
    want = hessinv.hessian(copy.deepcopy(net).double(), loss_fn, X.double(), y).factor(0.1)
    H = hessinv.hessian(net, loss_fn, X, y)
    F = H.factor(0.1)
    net.train()
    r = torch.ones(H.shape[0])
    x = F.solve(r)
    ref = want.solve(r.double())
    assert float((x.double() - ref).norm() / ref.norm()) < 1e-6
    assert net.training and not H._converted(torch.float64).model[2].training
