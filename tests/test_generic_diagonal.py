"""The exact diagonal through generic stages (convolutions, pooling, normalizations, attention, a user's
module) on the per-example route, against plain autograd: no ``a x a`` blocks, no dense matrix."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from reference import autograd_gauss_newton, autograd_gradient_hessian, autograd_hessian
from torch import Tensor, nn

import hessinv
from hessinv import riccati
from hessinv.stages.generic import GenericStage, LazyBlocks

F64 = torch.float64


class Attention(nn.Module):
    """Self-attention over each example's tokens: ``Hxx != 0`` (query and key weights meet)."""

    def __init__(self, d: int):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, z: Tensor) -> Tensor:
        a = torch.softmax(self.q(z) @ self.k(z).transpose(1, 2) / z.shape[-1] ** 0.5, dim=-1)
        return z + a @ self.v(z)


class Bilinear(nn.Module):
    """``z * a * b`` elementwise (p = 2 d, ``Hxx`` nonzero off its diagonal and on it zero)."""

    def __init__(self, d: int):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.randn(d)), nn.Parameter(torch.randn(d))

    def forward(self, z: Tensor) -> Tensor:
        return torch.tanh(z * self.a * self.b) * self.a


def _models() -> dict[str, tuple[nn.Module, tuple[int, ...], str]]:
    """name -> (model, one example's input shape, loss)."""
    torch.manual_seed(0)
    conv = lambda act: nn.Sequential(  # noqa: E731
        nn.Conv2d(1, 3, 3, padding=1), act(), nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3, padding=1), act(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4, 5),
    )  # fmt: skip
    return {
        "relu-cnn": (conv(nn.ReLU), (1, 4, 4), "ce"),
        "tanh-cnn": (conv(nn.Tanh), (1, 4, 4), "ce"),
        "batchnorm-groupnorm": (
            nn.Sequential(
                nn.Conv2d(2, 4, 3),
                nn.BatchNorm2d(4),
                nn.ReLU(),
                nn.GroupNorm(2, 4),
                nn.Flatten(),
                nn.Linear(16, 3),
            ),  # fmt: skip
            (2, 4, 4),
            "ce",
        ),
        "layernorm-mlp": (
            nn.Sequential(
                nn.Linear(5, 6), nn.LayerNorm(6), nn.GELU(), nn.Linear(6, 6), nn.LayerNorm(6), nn.Linear(6, 3)
            ),
            (5,),
            "ce",
        ),
        "attention": (nn.Sequential(Attention(4), nn.Flatten(), nn.Linear(12, 3)), (3, 4), "ce"),
        "bilinear-mse": (nn.Sequential(nn.Linear(3, 5), Bilinear(5), nn.Linear(5, 70)), (3,), "mse"),
        "conv-decoder-mse": (
            nn.Sequential(
                nn.Conv1d(1, 2, 3, padding=1), nn.Tanh(), nn.Conv1d(2, 1, 3, padding=1), nn.Flatten()
            ),
            (1, 9),
            "mse",
        ),
    }


MODELS = _models()


def _problem(name: str, batch: int = 4):
    model, shape, loss = MODELS[name]
    model = model.to(F64).eval()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(batch, *shape, generator=g, dtype=F64)
    if loss == "ce":
        return model, nn.CrossEntropyLoss(), X, torch.randint(0, 3, (batch,), generator=g)
    with torch.no_grad():
        out = model(X)
    return model, nn.MSELoss(), X, torch.randn(out.shape, generator=g, dtype=F64)


def _no_batch_blocks():
    """The ``a x a`` sweep and the dense matrix refused: the per-example route or a failure."""
    refuse = AssertionError("took the a x a sweep")
    return (
        mock.patch.object(riccati, "curvature_diagonal", side_effect=refuse),
        mock.patch("hessinv.curvature.curvature_diagonal", side_effect=refuse),
    )


@pytest.mark.parametrize("route", ["dense-blocks", "lazy-blocks", "lazy-products"])
@pytest.mark.parametrize("name", list(MODELS))
def test_generic_stages_take_the_per_example_route(name, route, monkeypatch):
    """Hessian and Gauss-Newton diagonals through generic stages equal autograd's to 1e-12, without the
    sweep's ``a x a`` blocks; the Hessian's generic stages with dense blocks and, where those are not
    formed (``LAZY_ENTRIES = 0``), through the examples' pull-backs (``Hxx`` of the attention and of the
    bilinear stage, ``Hzz_n`` of the normalizations, from the dense blocks formed then, or by products)."""
    lazy = route != "dense-blocks"
    if lazy:
        monkeypatch.setattr(GenericStage, "LAZY_ENTRIES", 0)
    if route == "lazy-products":
        monkeypatch.setattr(LazyBlocks, "_dense_for_second", lambda self: False)
    model, loss_fn, X, y = _problem(name)
    _, H_ref = autograd_gradient_hessian(model, loss_fn, X, y)
    G_ref = autograd_gauss_newton(model, loss_fn, X, y)
    a, b = _no_batch_blocks()
    for make, ref in ((hessinv.hessian, H_ref), (hessinv.gauss_newton, G_ref)):
        op = make(model, loss_fn, X, y)
        if make is hessinv.gauss_newton:
            op._root = None  # (the root's own diagonal is not this route)
            monkeypatch.setattr(type(op), "ROOT_DIAGONAL_SHARE", 0.0)
        assert any(isinstance(blk, LazyBlocks) for blk in op.blocks) == (lazy or make is hessinv.gauss_newton)
        with a, b:
            d = op.diagonal()
        scale = float(ref.abs().max())
        assert float((d - ref.diagonal()).abs().max()) <= 1e-12 * scale, (name, make.__name__)


@pytest.mark.parametrize("name", ["relu-cnn", "layernorm-mlp", "attention"])
def test_one_example_at_a_time_and_through_the_batch_graph(name, monkeypatch):
    """The same diagonal with the examples taken one at a time (the caller's chunks), and with every
    pull-back through the batch's graph instead of one-example graphs."""
    monkeypatch.setattr(GenericStage, "LAZY_ENTRIES", 0)
    monkeypatch.setattr(LazyBlocks, "_dense_for_second", lambda self: False)
    model, loss_fn, X, y = _problem(name, batch=5)
    _, H_ref = autograd_gradient_hessian(model, loss_fn, X, y)
    scale = float(H_ref.abs().max())
    for alone in (True, False):
        H = hessinv.hessian(model, loss_fn, X, y)
        calls: list[int] = []
        original = LazyBlocks._one_example_calls

        def spy(self, k, examples=None, alone=alone, calls=calls):
            calls.append(k)
            return alone and (self._per_example_ok and self.batch > 1)

        with (
            mock.patch.object(LazyBlocks, "_one_example_calls", spy),
            mock.patch.object(riccati, "_example_rows", lambda blocks: 1),
        ):
            d = H.diagonal()
        assert calls and original is LazyBlocks._one_example_calls
        assert float((d - H_ref.diagonal()).abs().max()) <= 1e-12 * scale, alone


def test_a_one_example_graph_that_disagrees_falls_back_to_the_batch_graph(monkeypatch):
    """A module whose one-example call differs from its rows of the batch's call (it reads the batch's
    size) fails the check of the one-example pull-backs: those are redone through the batch's graph."""

    class BatchScaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(1, 2, 3)

        def forward(self, z: Tensor) -> Tensor:
            return self.conv(z) * (1.0 + 0.0 * z.shape[0] + (z.shape[0] == 1))

    torch.manual_seed(0)
    model = nn.Sequential(BatchScaled(), nn.Tanh(), nn.Flatten(), nn.Linear(10, 3)).to(F64)
    X, y = torch.randn(6, 1, 7, dtype=F64), torch.randint(0, 3, (6,))
    monkeypatch.setattr("hessinv.stages.generic.PER_EXAMPLE_MIN_WORK", 1)
    G = hessinv.gauss_newton(model, nn.CrossEntropyLoss(), X, y)
    G._root = None
    monkeypatch.setattr(type(G), "ROOT_DIAGONAL_SHARE", 0.0)
    stage = next(b for b in G.blocks if isinstance(b, LazyBlocks))
    d = G.diagonal()
    assert not stage._per_example_ok  # (its one-example graphs were tried and refused)
    ref = autograd_gauss_newton(model, nn.CrossEntropyLoss(), X, y)
    assert float((d - ref.diagonal()).abs().max()) <= 1e-12 * float(ref.abs().max())


def test_a_stage_that_mixes_examples_hands_back_to_the_sweep():
    """Pull-backs of one example's columns that reach another example's input: the stage's part of the
    per-example sweep is None (the caller then takes the ``a x a`` sweep)."""
    torch.manual_seed(0)
    mix = nn.Linear(3, 3).to(F64)

    class Mix(nn.Module):
        def forward(self, z: Tensor) -> Tensor:
            return mix(z) + z.mean(0, keepdim=True)

    z, b = torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    blk = LazyBlocks(GenericStage(1, Mix(), list(mix.parameters())), z, b)
    F, S = torch.randn(4, 3, 2, dtype=F64), torch.rand(4, 2, dtype=F64)
    assert blk.example_curvature_diagonal((F, S), coupled=True) is None


@pytest.mark.parametrize("name", ["relu-cnn", "layernorm-mlp", "attention", "conv-decoder-mse"])
def test_every_example_at_once_under_vmap(name, monkeypatch):
    """The one-example pull-backs of every example in one ``torch.func.vmap`` (taken where torch._dynamo
    is imported already or after a thousand one-example pull-backs: at once here), for the diagonal and
    the Gauss-Newton root: autograd's numbers."""
    import hessinv.stages.generic as generic

    monkeypatch.setattr(GenericStage, "LAZY_ENTRIES", 0)
    monkeypatch.setattr(generic, "VMAP_AFTER_CALLS", 0)
    monkeypatch.setattr(generic, "PER_EXAMPLE_MIN_WORK", 1)
    monkeypatch.setattr(LazyBlocks, "_dense_for_second", lambda self: False)
    used: list[bool] = []
    original = generic._ExamplePulls._vmapped

    def spy(self, E, A, Z):
        used.append(original(self, E, A, Z))
        return used[-1]

    monkeypatch.setattr(generic._ExamplePulls, "_vmapped", spy)
    model, loss_fn, X, y = _problem(name, batch=5)
    _, H_ref = autograd_gradient_hessian(model, loss_fn, X, y)
    G_ref = autograd_gauss_newton(model, loss_fn, X, y)
    H = hessinv.hessian(model, loss_fn, X, y)
    assert float((H.diagonal() - H_ref.diagonal()).abs().max()) <= 1e-12 * float(H_ref.abs().max())
    G = hessinv.gauss_newton(model, loss_fn, X, y)
    U, S = G.root()
    assert float((U.T @ (S[:, None] * U) - G_ref).abs().max()) <= 1e-12 * float(G_ref.abs().max())
    assert used and all(used), used


def test_the_dense_route_where_per_example_pulls_would_cost_more(monkeypatch):
    """A normalization's ``Hzz_n`` makes every ``P_n`` below it dense, and each generic stage there pulls
    ``2 d_out + d_in`` columns per example: where those outnumber the dense route's ``n`` products (a
    32 x 32 CNN with a GroupNorm: 40k against 1.5k, 122 s against 16 s), the diagonal takes the dense
    route; autograd's numbers either way."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.GroupNorm(1, 2), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8, 3),
    ).to(F64)  # fmt: skip
    X, y = torch.randn(3, 1, 10, 10, dtype=F64), torch.randint(0, 3, (3,))
    monkeypatch.setattr(GenericStage, "LAZY_ENTRIES", 0)
    _, ref = autograd_gradient_hessian(model, nn.CrossEntropyLoss(), X, y)
    H = hessinv.hessian(model, nn.CrossEntropyLoss(), X, y)
    assert riccati.examples_apart(H.blocks) and riccati.example_sweep_pulls(H.blocks) > H.shape[0]
    with mock.patch.object(
        riccati, "_example_sweep", side_effect=AssertionError("took the per-example sweep")
    ):
        d = H.diagonal()
    assert float((d - ref.diagonal()).abs().max()) <= 1e-12 * float(ref.abs().max())
    H = hessinv.hessian(model, nn.CrossEntropyLoss(), X, y)
    monkeypatch.setattr(type(H), "_dense_cheaper", lambda self: False)  # (no dense route: per example)
    assert float((H.diagonal() - ref.diagonal()).abs().max()) <= 1e-12 * float(ref.abs().max())


def test_a_large_table_takes_its_diagonal_a_few_examples_at_a_time():
    """A size probe: the exact diagonal of an Embedding(20000, 64) model took 4.8 GB at once for a batch of
    32 (each example's columns pulled back to the table's 1.3M parameters, all examples together), and a
    100000-row table's was killed by the kernel. The examples per pass now count the pulled-back columns
    (135 MB there); the diagonal is the same as taken in one pass."""

    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.e, self.l = nn.Embedding(2000, 16), nn.Linear(16, 10)

        def forward(self, x):
            return self.l(self.e(x).mean(1))

    torch.manual_seed(0)
    model = Bag().double()
    X, y = torch.randint(0, 2000, (32, 6)), torch.randint(0, 10, (32,))
    H = hessinv.hessian(model, nn.CrossEntropyLoss(), X, y)
    with mock.patch.object(riccati, "EXAMPLE_PASS_ENTRIES", 2**22):
        assert riccati._example_rows(H.blocks) < 32  # (the table's 32000 parameters x 10 columns per example)
        chunked = H.diagonal()
    H1 = hessinv.hessian(model, nn.CrossEntropyLoss(), X, y)
    with mock.patch.object(riccati, "_example_rows", lambda blocks: 32):
        whole = H1.diagonal()
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("curvature", ["hessian", "gauss_newton"])
def test_diagonal_below_a_head_with_more_classes_than_pooled_features(curvature):
    """A dense per-example ``P`` (20 classes on 4 pooled channels: rank 20 > 4) above a pooling whose input
    is wider is taken apart by ``eigh`` and pulled back factored (2336 pull-backs an example before, 67 s
    for a 16-channel CNN's diagonal): the diagonal against autograd's dense matrix."""
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 20)
    ).double()
    x, y = torch.randn(5, 2, 6, 6, dtype=torch.float64), torch.randint(0, 20, (5,))
    op = (hessinv.hessian if curvature == "hessian" else hessinv.gauss_newton)(m, nn.CrossEntropyLoss(), x, y)
    ref = (autograd_hessian if curvature == "hessian" else autograd_gauss_newton)(
        m, nn.CrossEntropyLoss(), x, y
    )
    assert torch.allclose(op.diagonal(), ref.diagonal(), rtol=1e-10, atol=1e-13)
