"""What the model and the loss really compute, against what the chain differentiates: loss modules with
hooks, forwards that branch on a value's type when traced, lazily formed blocks of a generic stage
after a module attribute changed, Gauss-Newton of KL divergences split at the logits, per-position
integer targets, an empty batch. References: plain autograd double backward (tests/reference.py)."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from reference import autograd_gauss_newton, autograd_gradient_hessian
from torch import nn

import hessinv
from hessinv.errors import NotAChainError, ShapeMismatchError, UnsupportedStageError

D = torch.float64


def _mlp(seed: int = 0, out: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, out)).to(D)


def _batch(seed: int = 1, n: int = 5, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=D), torch.randint(0, classes, (n,), generator=g)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _temperature_prehook(loss: nn.Module) -> nn.Module:
    loss.register_forward_pre_hook(lambda m, a: (a[0] / 1.00005, a[1]))
    return loss


def _instance_forward(loss: nn.Module) -> nn.Module:
    loss.forward = lambda o, t: F.cross_entropy(o / 1.00005, t)  # type: ignore[method-assign]
    return loss


def _mse_hook(loss: nn.Module) -> nn.Module:
    loss.register_forward_hook(lambda m, a, out: out * 1.00001)
    return loss


@pytest.mark.parametrize(
    "make",
    [
        lambda: _temperature_prehook(nn.CrossEntropyLoss()),
        lambda: _instance_forward(nn.CrossEntropyLoss()),
        lambda: _mse_hook(nn.MSELoss()),
    ],
    ids=["ce-prehook", "ce-instance-forward", "mse-hook"],
)
def test_loss_module_hooks_are_differentiated(make):
    """A loss module whose call runs more than its class's forward (a temperature hook, a forward set on
    the instance) is differentiated as called: the closed-form formula of its class would be off by
    ~1e-5, under the loss-value guard's tolerance."""
    loss_fn = make()
    model = _mlp()
    X, y = _batch()
    if isinstance(loss_fn, nn.MSELoss):
        y = torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=D)
    H = hessinv.hessian(model, loss_fn, X, y)
    g, Hd = autograd_gradient_hessian(model, loss_fn, X, y)
    assert _rel(H.gradient, g) < 1e-12
    assert _rel(H.to_dense(), Hd) < 1e-12
    v = torch.randn(len(g), generator=torch.Generator().manual_seed(3), dtype=D)
    ref = torch.linalg.solve(Hd + 0.3 * torch.eye(len(g), dtype=D), v)
    assert _rel(H.factor(0.3).solve(v), ref) < 1e-10


def test_loss_prehook_that_detaches_is_refused():
    ce = nn.CrossEntropyLoss()
    ce.register_forward_pre_hook(lambda m, a: (a[0].detach(), a[1]))
    X, y = _batch()
    with pytest.raises(UnsupportedStageError, match="does not depend on the outputs"):
        hessinv.hessian(_mlp(), ce, X, y)


class _TypeBranch(nn.Module):
    """A forward whose branch depends on ``isinstance`` of a value (False for torch.fx's placeholders)."""

    def __init__(self, check) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)
        self.check = check

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.check(h):
            h = h * 2.0
        return self.b(h)


@pytest.mark.parametrize(
    "check", [lambda h: isinstance(h, torch.Tensor), torch.is_tensor], ids=["isinstance", "is_tensor"]
)
@pytest.mark.parametrize("wrap", ["top", "sequential-child", "compiled"])
def test_forward_that_branches_on_type_when_traced_is_refused(check, wrap):
    torch.manual_seed(0)
    inner = _TypeBranch(check).to(D)
    model = {"top": inner, "sequential-child": nn.Sequential(inner), "compiled": torch.compile(inner)}[wrap]
    X, y = _batch()
    for build in (hessinv.hessian, hessinv.gauss_newton):
        with pytest.raises(NotAChainError, match="another function|another path"):
            build(model, nn.CrossEntropyLoss(), X, y)


class _Counted(nn.Module):
    """A custom forward (traced) that counts its calls in a plain attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.b(torch.tanh(self.a(x))) + x[:, :3]


def test_traced_model_checked_against_its_forward_without_side_effects():
    """The traced stages are compared with the real forward once; the real call's side effects on
    plain attributes are put back, and a faithful trace is exact."""
    torch.manual_seed(0)
    model = _Counted().to(D)
    X, y = _batch()
    before = model.calls
    H = hessinv.hessian(model, nn.CrossEntropyLoss(), X, y)
    assert model.calls == before
    _, Hd = autograd_gradient_hessian(model, nn.CrossEntropyLoss(), X, y)
    assert _rel(H.to_dense(), Hd) < 1e-12


@pytest.mark.parametrize(
    "layer, attr, value",
    [
        (lambda: nn.GroupNorm(2, 4), "eps", 0.5),
        (lambda: nn.LayerNorm(4), "eps", 0.5),
        (lambda: nn.Conv1d(4, 4, 3, padding=1), "padding_mode", "circular"),
    ],
    ids=["groupnorm-eps", "layernorm-eps", "conv-padding-mode"],
)
def test_lazy_gauss_newton_blocks_are_formed_at_the_linearization_point(layer, attr, value):
    """A generic stage's Gauss-Newton blocks are formed on first use by calling the module: a plain
    attribute changed in between (GroupNorm.eps) must not enter them -- G is the old point's."""
    torch.manual_seed(0)
    lay = layer()
    conv = isinstance(lay, nn.Conv1d)
    model = (
        nn.Sequential(
            nn.Conv1d(2, 4, 3, padding=1), nn.Tanh(), lay, nn.Tanh(), nn.Flatten(), nn.Linear(24, 3)
        )
        if conv or isinstance(lay, nn.GroupNorm)
        else nn.Sequential(nn.Linear(4, 4), nn.Tanh(), lay, nn.Linear(4, 3))
    ).to(D)
    g = torch.Generator().manual_seed(1)
    X = (
        torch.randn(4, 2, 6, generator=g, dtype=D)
        if conv or isinstance(lay, nn.GroupNorm)
        else torch.randn(4, 4, generator=g, dtype=D)
    )
    y = torch.randint(0, 3, (4,), generator=g)
    ref = autograd_gauss_newton(model, nn.CrossEntropyLoss(), X, y)
    G = hessinv.gauss_newton(model, nn.CrossEntropyLoss(), X, y)
    setattr(lay, attr, value)
    V = torch.randn(ref.shape[0], 3, generator=g, dtype=D)
    assert _rel(G @ V, ref @ V) < 1e-10
    assert getattr(lay, attr) == value  # the module is left as the caller set it


def _kl_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.LogSoftmax(dim=1)).to(D)


@pytest.mark.parametrize(
    "loss_fn, factor",
    [
        (nn.KLDivLoss(reduction="mean"), 1 / 3),
        (functools.partial(F.kl_div, reduction="batchmean"), 1.0),
        (functools.partial(F.kl_div, reduction="sum", log_target=True), 5.0),
    ],
    ids=["module-mean", "partial-batchmean", "partial-sum-logtarget"],
)
def test_kl_divergence_gauss_newton_split_at_logits(loss_fn, factor):
    """Gauss-Newton of a KL divergence after a LogSoftmax stage is split at the logits (the loss is
    linear in the log-probabilities): ``factor`` times the batchmean module's, not zero."""
    model = _kl_model()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(5, 4, generator=g, dtype=D)
    P = torch.softmax(torch.randn(5, 3, generator=g, dtype=D), 1)
    logtarget = isinstance(loss_fn, functools.partial) and loss_fn.keywords.get("log_target")
    T = P.log() if logtarget else P
    base = hessinv.gauss_newton(model, nn.KLDivLoss(reduction="batchmean"), X, P).to_dense()
    logits = nn.Sequential(*list(model)[:-1])
    ref = autograd_gauss_newton(logits, lambda z, t: F.cross_entropy(z, t), X, P)
    assert _rel(base, ref) < 1e-12
    with warnings.catch_warnings():  # (torch warns that KLDivLoss's 'mean' is not 'batchmean')
        warnings.simplefilter("ignore", UserWarning)
        G = hessinv.gauss_newton(model, loss_fn, X, T)
        value = float(loss_fn(model(X), T))
    assert _rel(G.to_dense(), factor * ref) < 1e-12
    assert abs(float(G.loss) - value) < 1e-12


@pytest.mark.parametrize("loss_fn", [nn.CrossEntropyLoss(), nn.NLLLoss()], ids=["ce", "nll"])
def test_per_position_int32_class_indices(loss_fn):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv1d(3, 4, 1)).to(D)
    if isinstance(loss_fn, nn.NLLLoss):
        model.append(nn.LogSoftmax(dim=1))
    g = torch.Generator().manual_seed(1)
    X = torch.randn(3, 2, 5, generator=g, dtype=D)
    y = torch.randint(0, 4, (3, 5), generator=g)
    H = hessinv.hessian(model, loss_fn, X, y.to(torch.int32))
    _, Hd = autograd_gradient_hessian(model, loss_fn, X, y)
    assert _rel(H.to_dense(), Hd) < 1e-12


def test_empty_batch_says_so():
    X, y = _batch()
    with pytest.raises(ShapeMismatchError, match="batch is empty"):
        hessinv.hessian(_mlp(), nn.CrossEntropyLoss(), X[:0], y[:0])


class _Stash(nn.Module):
    def forward(self, x):
        self.saved = x
        return x


class _AddStash(nn.Module):
    def __init__(self, st):
        super().__init__()
        object.__setattr__(self, "st", st)  # (a reference, not a submodule: as a user might write it)

    def forward(self, x):
        return x + self.st.saved


_SHARED: dict = {}


class _TiedDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.b = nn.Parameter(torch.zeros(4, dtype=torch.float64))

    def forward(self, x):
        return torch.nn.functional.linear(x, _SHARED["enc"].weight.T, self.b)  # reached through a global


def test_a_stage_reading_what_another_stage_set_is_refused_not_wrong():
    """A hidden skip connection (an activation stashed on a module, read two stages later) and a weight
    shared through a reference no module registers: the split computed the right loss, but took those
    values as constants -- gradient 25-67% off, Hessian 71-88% off, no error (a new user's models). The
    stages' gradient is compared with autograd's on the model's own forward once: a NotAChainError."""
    torch.manual_seed(0)
    f64 = {"dtype": torch.float64}
    st = _Stash()
    layers = [nn.Linear(4, 8, **f64), st, nn.Tanh(), nn.Linear(8, 8, **f64), nn.Tanh(), _AddStash(st)]
    stash = nn.Sequential(*layers, nn.Linear(8, 3, **f64))
    X, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    stash(X)  # (the stash holds this batch's activation: the loss alone cannot tell)
    enc = nn.Linear(4, 6, bias=False, **f64)
    _SHARED["enc"] = enc
    tied = nn.Sequential(enc, nn.Tanh(), _TiedDecoder(), nn.Tanh(), nn.Linear(4, 3, **f64))
    for model in (stash, tied):
        with pytest.raises(hessinv.NotAChainError, match="differs from autograd's"):
            hessinv.hessian(model, nn.CrossEntropyLoss(), X, y)


def test_a_stash_read_before_the_model_was_ever_called_is_refused_by_name():
    """The same stash on a model never called before: hessinv's passes put the module's attributes back
    after each one, so the stage that reads the stash, called alone, raised a raw ``AttributeError``
    (found by a probe); a ``NotAChainError`` with the remedy now."""
    torch.manual_seed(0)
    st = _Stash()
    model = nn.Sequential(nn.Linear(4, 8), st, nn.Tanh(), _AddStash(st), nn.Linear(8, 3)).double()
    X, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    with pytest.raises(NotAChainError, match="put the modules from the one that sets it"):
        hessinv.hessian(model, nn.CrossEntropyLoss(), X, y)


def test_a_float32_loss_function_with_a_captured_tensor_is_told_how_to_pass_it():
    """A lambda loss holding a float32 class weight: the float64 copy (refined solves) failed on it and
    the refusal said 'use a float64 model', which fails the same way; it now names the captured tensor and
    the forms the copy converts -- and the partial it suggests refines to 1e-10."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    X, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    w = torch.tensor([0.2, 1.0, 3.0])
    H = hessinv.hessian(net, lambda o, t: F.cross_entropy(o, t, weight=w), X, y)
    with pytest.raises(UnsupportedStageError, match=r"\(w.to\(outputs.dtype\)"):
        H.factor(0.1).solve(H.gradient)
    H = hessinv.hessian(net, functools.partial(F.cross_entropy, weight=w), X, y)
    assert H.factor(0.1).solve(H.gradient, return_info=True)[1].residual < 1e-10


def test_a_float32_embedding_bag_with_max_norm_is_told_why_its_output_changes():
    """``EmbeddingBag(max_norm=...)`` renormalizes rows in place at every call: in float32 the stage's
    two calls differ, and the refusal blamed randomness (Dropout, BatchNorm) and advised model.eval(),
    which changes nothing; it now names max_norm."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.EmbeddingBag(8, 3, mode="mean", max_norm=0.7), nn.Tanh(), nn.Linear(3, 3))
    with torch.no_grad():
        net[0].weight.add_(0.5 * torch.randn_like(net[0].weight))
    ids, y = torch.randint(1, 8, (5, 4), generator=torch.Generator().manual_seed(31)), torch.arange(5) % 3
    with pytest.raises(UnsupportedStageError, match=r"EmbeddingBag\(max_norm=0.7\) renormalizes"):
        hessinv.hessian(net, nn.CrossEntropyLoss(), ids, y)


class _BatchBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 4, dtype=torch.float64)

    def forward(self, x):
        h = self.l(x)
        return torch.tanh(h) if h.sum() > 0 else torch.sigmoid(h)


def test_per_example_rows_of_a_stage_that_reads_the_batch_are_not_returned():
    """A branch on a batch sum keeps examples apart in its derivatives but not in its value: the rows
    were 82% off ``grad loss_fn(model(x_i[None]), y_i[None])``. Up to 16 examples alone are compared
    with the batch once: no rows (the caller's one-example-at-a-time route), and influence scores exact."""
    from hessinv.influence import per_example_gradients

    torch.manual_seed(0)
    model = nn.Sequential(_BatchBranch(), nn.Linear(4, 3, dtype=torch.float64))
    X, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    lf = nn.CrossEntropyLoss()
    assert hessinv.Chain(model, lf).per_example_gradients(X, y) is None
    params = list(model.parameters())
    grads = [torch.autograd.grad(lf(model(X[i : i + 1]), y[i : i + 1]), params) for i in range(5)]
    ref = torch.stack([torch.cat([t.reshape(-1) for t in g]) for g in grads])
    torch.testing.assert_close(per_example_gradients(model, lf, X, y), ref)
    # an example fit to rounding has a row of rounding noise: the rows of a correct model stay (a review
    # found the first version dropping them where example 0's own gradient was ~0)
    for dtype in (torch.float32, torch.float64):
        net = nn.Sequential(nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 1)).to(dtype)
        Xr = torch.randn(64, 10, dtype=dtype)
        with torch.no_grad():
            yr = net(Xr) + torch.randn(64, 1, dtype=dtype)
            yr[0] = net(Xr[:1])[0]  # example 0 fit exactly
        assert hessinv.Chain(net, nn.MSELoss()).per_example_gradients(Xr, yr) is not None


@pytest.mark.parametrize("margin", [17.0, 30.0])
def test_a_log_softmax_before_nll_at_confident_predictions_gives_the_cross_entropys_hessian(margin):
    """The Hessian kept a LogSoftmax before NLLLoss (or KLDivLoss) as a stage of its own, whose second
    derivatives are differences of large terms at confident predictions: 5e-10 off the cross-entropy's
    at a logit margin of 17, refused from 20 on, and ``Newton`` on PyTorch's MNIST-example head
    (LogSoftmax + NLLLoss) died mid-training (a probe). Split at the logits, as Gauss-Newton was."""
    torch.manual_seed(0)
    X, y = torch.randn(4, 3, dtype=D), torch.tensor([0, 1, 2, 0])
    m = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(D)
    with torch.no_grad():  # (logits with the margin at the targets)
        h = torch.tanh(m[0](X))
        target = torch.zeros(4, 3, dtype=D)
        target[torch.arange(4), y] = margin
        sol = torch.linalg.lstsq(torch.cat([h, torch.ones(4, 1, dtype=D)], 1), target).solution
        m[2].weight.copy_(sol[:5].T)
        m[2].bias.copy_(sol[5])
    ref = hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    H = hessinv.hessian(nn.Sequential(m, nn.LogSoftmax(dim=1)), nn.NLLLoss(), X, y)
    assert _rel(H.to_dense(), ref.to_dense()) < 1e-14
    assert _rel(H.gradient, ref.gradient) < 1e-14
    P = torch.softmax(torch.randn(4, 3, dtype=D), 1)
    K = hessinv.hessian(nn.Sequential(m, nn.LogSoftmax(dim=1)), nn.KLDivLoss(reduction="batchmean"), X, P)
    assert _rel(K.to_dense(), hessinv.hessian(m, nn.CrossEntropyLoss(), X, P).to_dense()) < 1e-14
