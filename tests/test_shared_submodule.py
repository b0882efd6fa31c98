"""A submodule that applies one layer twice (``lin(tanh(lin(z)))``), or uses its layers in another order
than it registers them, inside a model with its own ``forward`` (traced by torch.fx): it was called whole
as one generic stage only under an ``nn.Sequential``; the traced pieces of a model's own ``forward`` all
came from the model, so the same submodule was refused as a "shared parameter" (fuzzer, repro_6). Now
the innermost submodule whose one call holds every use is called whole there too (exact, against plain
autograd), and the rest of the model stays a chain; a layer whose uses only the model's own ``forward``
holds (two children, or two calls of one submodule) stays refused."""

from __future__ import annotations

import pytest
import torch
from reference import autograd_gauss_newton, autograd_gradient_hessian
from torch import Tensor, nn

import hessinv
import hessinv.optim as ho
from hessinv.chain import Chain


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


class Shared(nn.Module):
    """One layer applied twice."""

    def __init__(self, d: int = 4):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, z):
        return self.lin(torch.tanh(self.lin(z)))


class Loop(nn.Module):
    """Its layers in turn, by a loop over an nn.ModuleList."""

    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for m in self.layers:
            x = m(x)
        return x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared, self.head = Shared(), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.shared(x))


class Net2(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre, self.shared, self.head = nn.Linear(4, 4), Shared(), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.shared(torch.tanh(self.pre(x))))


class Reversed(nn.Module):
    """Uses ``b`` before ``a``; ``model.parameters()`` lists ``a`` first."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.a(torch.tanh(self.b(x)))


class ReversedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre, self.rev, self.head = nn.Linear(4, 4), Reversed(), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.rev(torch.tanh(self.pre(x))))


class Deep(nn.Module):
    """The layer used twice two submodules down: only the innermost (Shared) is called whole."""

    def __init__(self):
        super().__init__()
        self.block = Loop([nn.Linear(4, 4), nn.Tanh(), Shared()])
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.relu(self.block(x)))


class _Apply(nn.Module):
    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return torch.tanh(self.lin(x))


class AcrossChildren(nn.Module):
    """One Linear held by two top-level children: only the model's own forward holds both uses."""

    def __init__(self):
        super().__init__()
        lin = nn.Linear(4, 4)
        self.a, self.b, self.head = _Apply(lin), _Apply(lin), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.b(self.a(x)))


class CalledTwice(nn.Module):
    """One Shared called twice by the model's forward: no one call of it holds all the uses."""

    def __init__(self):
        super().__init__()
        self.shared, self.head = Shared(), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.shared(torch.tanh(self.shared(x))))


class DirectUses(nn.Module):
    """The model's own forward applies a submodule's layer twice (Shared's forward is never called)."""

    def __init__(self):
        super().__init__()
        self.shared, self.head = Shared(), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.shared.lin(torch.tanh(self.shared.lin(x))))


def _data(seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(5, 4, dtype=torch.float64, generator=g), torch.randint(0, 2, (5,), generator=g)


def _exact(model, X: Tensor, y: Tensor) -> None:
    """Gradient, Hessian and Gauss-Newton matrix equal plain autograd's to 1e-12."""
    loss = nn.CrossEntropyLoss()
    g_ref, H_ref = autograd_gradient_hessian(model, loss, X, y)
    G_ref = autograd_gauss_newton(model, loss, X, y)
    H = hessinv.hessian(model, loss, X, y)
    assert _rel(H.to_dense(), H_ref) < 1e-12
    assert _rel(H.gradient, g_ref) < 1e-12
    assert _rel(hessinv.gauss_newton(model, loss, X, y).to_dense(), G_ref) < 1e-12


@pytest.mark.parametrize(
    ("build", "names"),
    [
        (lambda: Loop([Shared(), nn.Linear(4, 2)]), ["Shared", "Linear"]),
        (Net, ["Shared", "Linear"]),
        (Net2, ["Linear+tanh", "Shared", "Linear"]),
        (lambda: nn.Sequential(Net()), ["Shared", "Linear"]),  # (was: Net called whole, one stage)
        (Deep, ["Linear+Tanh", "Shared", "relu", "Linear"]),
        (ReversedNet, ["Linear+tanh", "Reversed", "Linear"]),
        (lambda: [Net2()], ["Linear+tanh", "Shared", "Linear"]),
    ],
    ids=[
        "modulelist-loop",
        "attributes",
        "between-layers",
        "nested-in-sequential",
        "two-down",
        "order",
        "list",
    ],
)
def test_the_submodule_is_called_whole_and_the_rest_stays_a_chain(build, names):
    torch.manual_seed(0)
    model = build()
    model = model.double() if isinstance(model, nn.Module) else [m.double() for m in model]
    chain = Chain(model, nn.CrossEntropyLoss())
    assert [s.name.split("(", 1)[1][:-1] for s in chain.stages] == names
    _exact(model, *_data())


def test_the_submodule_called_whole_is_the_instance_the_model_holds():
    torch.manual_seed(1)
    model = Net2().double()
    (stage,) = [s for s in Chain(model, nn.CrossEntropyLoss()).stages if model.shared in s.modules]
    assert [id(t) for t in stage.params] == [id(t) for t in model.shared.parameters()]


@pytest.mark.parametrize("build", [AcrossChildren, CalledTwice, DirectUses])
def test_a_layer_whose_uses_only_the_model_holds_calls_the_model_whole(build):
    """No submodule holds every use: the model is called whole, one generic stage (exact), as
    nn.Sequential(model) calls it, with a warning naming the parameter and how to keep the chain's
    structure (it was refused with that advice)."""
    torch.manual_seed(2)
    model = build().double()
    X, y = _data(2)
    with pytest.warns(
        UserWarning, match=r"parameter (a|shared)\.lin\.weight is shared by stage.*called whole"
    ):
        chain = Chain(model, nn.CrossEntropyLoss())
    assert len(chain.stages) == 1
    with pytest.warns(UserWarning, match="shared by stage"):
        _exact(model, X, y)
    _exact(nn.Sequential(model), X, y)


def test_modules_sharing_a_layer_in_a_list_are_refused_by_name():
    """A list of modules has no forward to call whole: refused, naming the parameter and the remedy."""
    torch.manual_seed(2)
    lin = nn.Linear(4, 4)
    mods = [nn.Linear(6, 4), lin, nn.Tanh(), lin, nn.Linear(4, 2)]
    with pytest.raises(hessinv.NotAChainError, match=r"shared by stage .*nn\.Sequential\(\*modules\)"):
        Chain([m.double() for m in mods], nn.CrossEntropyLoss())


def test_the_optimizer_steps_a_model_with_a_layer_applied_twice():
    torch.manual_seed(3)
    model = Net2().double()
    X, y = _data(3)
    loss = nn.CrossEntropyLoss()
    opt = ho.Newton(model, loss, seed=0)
    first = float(loss(model(X), y))
    for _ in range(5):
        opt.step(X, y)
    assert float(loss(model(X), y)) < first
