"""Per-example models written in ways the chain split read wrongly (a probe, 2026-12-05): each is taken
exactly (against plain-autograd float64 references), or refused with advice that works when followed.
Each test failed before its fix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import autograd_gauss_newton, autograd_gradient_hessian
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import hessinv
import hessinv.optim as ho


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _exact(model: nn.Module, loss_fn, X: Tensor, y: Tensor) -> None:
    """``model``'s Hessian and Gauss-Newton matrix through hessinv equal autograd's (attention by its
    math kernel there: the fused CPU kernel's backward has no derivative)."""
    with sdpa_kernel(SDPBackend.MATH):
        _, H = autograd_gradient_hessian(model, loss_fn, X, y)
        G = autograd_gauss_newton(model, loss_fn, X, y)
    assert _rel(hessinv.hessian(model, loss_fn, X, y).to_dense(), H) < 1e-10
    assert _rel(hessinv.gauss_newton(model, loss_fn, X, y).to_dense(), G) < 1e-10


class _SeqFirstRNN(nn.Module):
    """A batch-first model around a sequence-first RNN: the batch axis moves, and moves back."""

    def __init__(self):
        super().__init__()
        self.rnn, self.out = nn.RNN(2, 3), nn.Linear(3, 3)

    def forward(self, x):  # (B, T, 2)
        h, _ = self.rnn(x.transpose(0, 1))
        return self.out(h[-1])


class _Transpose01(nn.Module):
    def forward(self, x):
        return x.transpose(0, 1)


@pytest.mark.parametrize("B", [2, 3])
def test_a_moved_batch_axis_at_the_batch_s_own_length_is_called_whole(B):
    """With as many examples as time steps (3), the transpose kept the batch's length and was taken for
    a mixing op -- refused with nn.Sequential(model) as well, the remedy the refusal of B = 2 names. Both
    now call the model whole themselves, with a warning (exact)."""
    torch.manual_seed(0)
    m = _SeqFirstRNN().double()
    X, y = torch.randn(B, 3, 2, dtype=torch.float64), torch.randint(0, 3, (B,))
    with pytest.warns(UserWarning, match="called whole"):
        _exact(m, nn.CrossEntropyLoss(), X, y)
    _exact(nn.Sequential(m), nn.CrossEntropyLoss(), X, y)


def test_the_optimizer_s_curvature_batch_at_the_sequence_length():
    """The optimizer's curvature batch of 8 examples with sequences of 8 steps: its first step refused."""
    torch.manual_seed(0)
    model = nn.Sequential(_SeqFirstRNN().double())
    opt = ho.Newton(model, nn.CrossEntropyLoss(), seed=0)
    X, y = torch.randn(64, 8, 2, dtype=torch.float64), torch.randint(0, 3, (64,))
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        opt.step(X, y)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_a_squeeze_after_a_frozen_backbone_at_small_batches():
    """A linear probe on a frozen CNN ending in ``.squeeze()``: the check that the parameter-free prefix
    does not mix examples ran it on halves of one example, which squeeze() turns into (4,)."""
    torch.manual_seed(0)

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
            self.backbone.requires_grad_(False)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.backbone(x).squeeze())

    m = Probe().double()
    for B in (2, 3, 4):
        X, y = torch.randn(B, 1, 5, 5, dtype=torch.float64), torch.randint(0, 3, (B,))
        _exact(m, nn.CrossEntropyLoss(), X, y)


def test_the_advised_wrapper_of_a_sequential_model_is_called_whole():
    """An nn.Sequential whose layers pass a sequence-first value: "pass nn.Sequential(model)" was the
    advice, and nn.Sequential flattened the wrapped Sequential into the same layers (any depth)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        _Transpose01(),
        nn.TransformerEncoderLayer(4, 2, dim_feedforward=8, dropout=0.0),  # sequence-first
        _Transpose01(),
        nn.Flatten(),
        nn.Linear(12, 3),
    ).double()
    X, y = torch.randn(2, 3, 4, dtype=torch.float64), torch.randint(0, 3, (2,))
    with pytest.raises(hessinv.NotAChainError, match=r"nn\.Sequential\(model\)"):
        hessinv.hessian(model, nn.CrossEntropyLoss(), X, y)
    _exact(nn.Sequential(model), nn.CrossEntropyLoss(), X, y)
    _exact(nn.Sequential(nn.Sequential(model)), nn.CrossEntropyLoss(), X, y)


def test_an_output_that_is_not_batch_first_gets_advice_that_works():
    """A language model returning (B T, V) logits: the advice to call it whole cannot help (its output
    is still not batch-first); returning (B, T, V) and flattening in the loss does."""
    torch.manual_seed(0)

    class LM(nn.Module):
        def __init__(self, flat: bool):
            super().__init__()
            self.flat, self.e, self.o = flat, nn.Embedding(5, 4), nn.Linear(4, 5)

        def forward(self, x):
            out = self.o(torch.tanh(self.e(x)))
            return out.reshape(-1, 5) if self.flat else out

    X, Y = torch.randint(0, 5, (3, 4)), torch.randint(0, 5, (3, 4))
    with pytest.raises(hessinv.NotAChainError, match="flatten them in loss_fn") as err:
        hessinv.hessian(LM(True).double(), lambda o, t: F.cross_entropy(o, t.reshape(-1)), X, Y)
    assert "nn.Sequential(model)" not in str(err.value)
    fixed = LM(False).double()

    def loss_fn(out, y):  # the advice, as written
        return F.cross_entropy(out.flatten(0, 1), y.flatten())

    _exact(fixed, loss_fn, X, Y)


class _VarArgs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, *args):
        return self.o(torch.tanh(self.a(args[0])))


class _KwArgs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x, **kwargs):
        return self.o(torch.tanh(self.a(x)) * kwargs.get("scale", 1.0))


@pytest.mark.parametrize("cls", [_VarArgs, _KwArgs])
def test_a_variadic_forward_is_traced_as_called(cls):
    """``forward(self, *args)`` bound the batch to ``args`` (``args[0]`` its first example: a refusal
    blaming a Linear); ``forward(self, x, **kwargs)`` was refused as taking two inputs."""
    torch.manual_seed(0)
    m = cls().double()
    X, y = torch.randn(4, 4, dtype=torch.float64), torch.randint(0, 3, (4,))
    _exact(m, nn.CrossEntropyLoss(), X, y)
    assert len(hessinv.hessian(m, nn.CrossEntropyLoss(), X, y).chain.stages) >= 2  # still a chain


def test_a_forward_that_differentiates_inside_is_called_whole():
    """A physics-informed net returning ``[u(x), du/dx]`` under ``torch.enable_grad()``: torch.fx does not
    record the grad mode, and the traced pieces ran without the graph they differentiate (a
    ShapeMismatchError about a shape that is not wrong)."""
    torch.manual_seed(0)

    class PINN(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(1, 5), nn.Tanh(), nn.Linear(5, 1))

        def forward(self, x):
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                u = self.net(x)
                (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
            return torch.cat([u, du], 1)

    m = PINN().double()
    X, T = torch.randn(6, 1, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    _exact(m, nn.MSELoss(), X, T)
    opt = ho.Newton(m, nn.MSELoss(), seed=0)
    first = float(nn.MSELoss()(m(X), T))
    for _ in range(20):
        opt.step(X, T)
    assert float(nn.MSELoss()(m(X), T)) < first


def test_a_float32_cancelling_stage_s_refusal_names_float64():
    """A float32 Gauss-Newton of LayerNorm(2) stages (cancellation: with two features its output hardly
    depends on its input) was refused as a broken backward (a custom Function, prelu's kink), without the
    remedy that works: a float64 model."""

    def build(dtype):
        torch.manual_seed(2035)
        layers: list[nn.Module] = [nn.Linear(1, 2)]
        for _ in range(3):
            layers += [nn.LayerNorm(2), nn.SiLU(), nn.Linear(2, 2)]
        m = nn.Sequential(*layers).to(dtype)
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(3.0)
        return m

    g = torch.Generator().manual_seed(2035)
    X, y = torch.randn(8, 1, generator=g), torch.randint(0, 2, (8,), generator=g)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    with pytest.raises(hessinv.UnsupportedStageError, match="use a float64 model"):
        hessinv.gauss_newton(build(torch.float32), loss_fn, X, y).factor(damping=0.3)
    m64 = build(torch.float64)
    G64 = hessinv.gauss_newton(m64, loss_fn, X.double(), y)
    assert _rel(G64.to_dense(), autograd_gauss_newton(m64, loss_fn, X.double(), y)) < 1e-10
    G64.factor(damping=0.3)


def test_a_loss_without_targets_is_told_to_pass_a_placeholder_that_works():
    """``targets=None`` for a loss that reads no targets: the refusal named no remedy; its advice (an
    integer placeholder, one entry per example) is exact."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    X = torch.randn(5, 3, dtype=torch.float64)

    def loss_fn(out, _):
        return out.pow(2).mean()

    with pytest.raises(hessinv.InvalidArgumentError, match="placeholder") as err:
        hessinv.hessian(m, loss_fn, X, None)
    assert "torch.zeros(len(inputs), dtype=torch.long)" in str(err.value)
    _exact(m, loss_fn, X, torch.zeros(len(X), dtype=torch.long))


def test_a_layer_used_twice_inside_a_nested_sequential_is_called_whole():
    """The refusal of a shared parameter advises a nested module; an nn.Sequential nested in the model
    was flattened into the same refused layers. Its layers are now called as one stage (exact); at the top
    level the model itself is called whole, with a warning that says how to keep the chain."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    model = nn.Sequential(
        nn.Linear(3, 4), nn.Sequential(lin, nn.Tanh(), lin), nn.Tanh(), nn.Linear(4, 2)
    ).double()
    X, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    _exact(model, nn.CrossEntropyLoss(), X, y)
    top = nn.Sequential(lin, nn.Tanh(), lin, nn.Linear(4, 2)).double()
    with pytest.warns(UserWarning, match="nested in the model"):
        H = hessinv.hessian(top, nn.CrossEntropyLoss(), torch.randn(6, 4, dtype=torch.float64), y)
    assert len(H.chain.stages) == 1


def test_a_scalar_output_is_named_as_such():
    """A model returning a scalar (a loss computed inside it) got the advice for sequence logits."""

    class LossInside(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x).pow(2).mean()

    X, y = torch.randn(5, 3, dtype=torch.float64), torch.zeros(5, dtype=torch.long)
    with pytest.raises(hessinv.NotAChainError, match="is a scalar"):
        hessinv.hessian(LossInside().double(), lambda out, t: out, X, y)
