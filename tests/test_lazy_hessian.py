"""Lazy Hessian blocks of generic stages (convolutions, pooling, norms on large inputs): products by
autograd at the linearization point instead of dense per-example blocks, against plain-autograd float64
references; the refusals the dense probe gives, given by the lazy probe too. ``LAZY_ENTRIES`` is set to
0 so that small models take the lazy route (the default takes it above 4M block entries)."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from reference import autograd_gauss_newton, autograd_gradient_hessian
from test_unusual_models import _Cube
from torch import nn

import hessinv
from hessinv.stages.generic import GenericStage, LazyBlocks

F64 = torch.float64


@pytest.fixture
def lazy(monkeypatch):
    monkeypatch.setattr(GenericStage, "LAZY_ENTRIES", 0)


def _models(seed: int) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(seed)
    return {
        "cnn": (
            nn.Sequential(
                nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2), nn.Conv2d(3, 2, 3), nn.Softplus(),
                nn.AvgPool2d(2), nn.Flatten(), nn.Linear(2, 3),
            ),
            torch.randn(4, 1, 8, 8),
        ),
        "layernorm": (
            nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.GELU(), nn.Linear(6, 3)),
            torch.randn(5, 4),
        ),
        "conv1d_groupnorm": (
            nn.Sequential(nn.Conv1d(2, 4, 3), nn.GroupNorm(2, 4), nn.SiLU(), nn.Flatten(), nn.Linear(16, 3)),
            torch.randn(3, 2, 6),
        ),
        "embedding": (
            nn.Sequential(nn.Embedding(7, 3), nn.Flatten(), nn.Tanh(), nn.Linear(6, 3)),
            torch.randint(0, 7, (5, 2)),
        ),
    }  # fmt: skip


@pytest.mark.parametrize("name", ["cnn", "layernorm", "conv1d_groupnorm", "embedding"])
def test_lazy_hessian_and_gauss_newton_equal_plain_autograd(lazy, name):
    model, x = _models(0)[name]
    model = model.double()
    x = x.double() if x.is_floating_point() else x
    y = torch.randint(0, 3, (x.shape[0],), generator=torch.Generator().manual_seed(1))
    loss_fn = nn.CrossEntropyLoss()
    g_ref, H_ref = autograd_gradient_hessian(model, loss_fn, x, y)
    G_ref = autograd_gauss_newton(model, loss_fn, x, y)
    H = hessinv.hessian(model, loss_fn, x, y)
    G = hessinv.gauss_newton(model, loss_fn, x, y)
    lazies = [b for b in H.blocks if isinstance(b, LazyBlocks)]
    assert lazies and all(b.second_order for b in lazies)
    assert float((H.gradient - g_ref).abs().max()) <= 1e-12 * float(g_ref.abs().max())
    v = torch.randn(H.shape[0], 1, dtype=F64, generator=torch.Generator().manual_seed(2))
    for op, ref in ((H, H_ref), (G, G_ref)):
        scale = float(ref.abs().max())
        assert float((op @ v - ref @ v).abs().max()) <= 1e-12 * scale * float(v.abs().sum())
    # products of one column needed no dense blocks (a stage of fewer than 8 rows p + d_in forms them)
    assert all(b._dense_blocks is None for b in lazies if b.p + b.d_in > 8)
    for op, ref in ((H, H_ref), (G, G_ref)):  # (many columns: small stages form their dense blocks)
        assert float((op.to_dense() - ref).abs().max()) <= 1e-12 * float(ref.abs().max())
    # the factorization (the Riccati sweep forms the dense blocks, or the dense route the matrix): exact
    b = torch.randn(H.shape[0], dtype=F64, generator=torch.Generator().manual_seed(3))
    A = H_ref + 0.1 * torch.eye(H.shape[0], dtype=F64)
    x_ = H.factor(0.1).solve(b)
    assert float((A @ x_ - b).norm()) <= 1e-10 * float(b.norm())
    lam = torch.linalg.eigvalsh(A)
    assert H.inertia(0.1).negative == int((lam < 0).sum())  # (of H + 0.1 I)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), batch=st.integers(1, 4), name=st.sampled_from(["cnn", "layernorm"]))
def test_lazy_hessian_vector_products_on_random_chains(seed, batch, name):
    """Random weights and batches: the lazy products equal plain autograd's double backward."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(GenericStage, "LAZY_ENTRIES", 0)
        model, x = _models(seed)[name]
        model, x = model.double(), x[:batch].double()
        y = torch.randint(0, 3, (batch,), generator=torch.Generator().manual_seed(seed))
        _, H_ref = autograd_gradient_hessian(model, nn.CrossEntropyLoss(), x, y)
        H = hessinv.hessian(model, nn.CrossEntropyLoss(), x, y)
        v = torch.randn(H.shape[0], dtype=F64, generator=torch.Generator().manual_seed(seed))
        assert float((H @ v - H_ref @ v).abs().max()) <= 1e-11 * float(H_ref.abs().max()) * float(
            v.abs().sum()
        )


class _Normalize(nn.Module):
    def forward(self, x):
        return x / x.norm(dim=1, keepdim=True)


class _BatchCenter(nn.Module):
    def forward(self, x):
        return x - x.mean(0, keepdim=True)


def test_lazy_probe_refuses_what_the_dense_probe_refuses(lazy):
    """A backward that is not differentiable (its double backward's rows: zeros), derivatives that are not
    finite (a norm at 0), a stage that mixes examples, and weight_norm's asymmetric second derivatives:
    each a named error when the operator is built, as with dense blocks."""
    torch.manual_seed(1)
    X, y = torch.randn(4, 5, dtype=F64), torch.randint(0, 3, (4,))
    ce = nn.CrossEntropyLoss()
    cube = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), _Cube(), nn.Linear(4, 3)).double()
    with pytest.raises(hessinv.UnsupportedStageError, match="not differentiable"):
        hessinv.hessian(cube, ce, X, y)
    dead = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), _Normalize(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        dead[0].bias.fill_(-100.0)  # every unit dead: the norm of an all-zero vector
    with pytest.raises(hessinv.HessinvError):
        hessinv.hessian(dead, ce, X, y)
    mixing = nn.Sequential(nn.Linear(5, 4), _BatchCenter(), nn.Tanh(), nn.Linear(4, 3)).double()
    with pytest.raises(hessinv.UnsupportedStageError, match="mixes examples"):
        hessinv.hessian(mixing, ce, X, y)
    wn = nn.Sequential(nn.utils.weight_norm(nn.Linear(5, 4)), nn.Tanh(), nn.Linear(4, 3)).double()
    with pytest.raises(hessinv.UnsupportedStageError, match="not symmetric"):
        hessinv.hessian(wn, ce, X, y)


def test_lazy_products_refuse_a_model_changed_since(lazy):
    """The products run on the graph kept at the linearization point: a parameter changed since (an
    optimizer step) is a named error, not the new point's curvature mixed with the old."""
    model, x = _models(0)["cnn"]
    model, x = model.double(), x.double()
    y = torch.randint(0, 3, (x.shape[0],))
    H = hessinv.hessian(model, nn.CrossEntropyLoss(), x, y)
    v = torch.randn(H.shape[0], dtype=F64)
    H @ v
    with torch.no_grad():
        model[0].weight.add_(0.1)
    with pytest.raises(hessinv.InvalidArgumentError, match="changed after this curvature was taken"):
        H @ v


def test_large_generic_stages_take_the_lazy_route_by_default():
    """Without the fixture: a convolution on 16 x 16 images with 32 examples (dense blocks of 10^7-10^8
    numbers) is lazy, its Hessian-vector product plain autograd's; a small stage stays dense."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(256, 3)
    ).double()
    X, y = torch.randn(32, 1, 16, 16, dtype=F64), torch.randint(0, 3, (32,))
    H = hessinv.hessian(model, nn.CrossEntropyLoss(), X, y)
    assert any(isinstance(b, LazyBlocks) for b in H.blocks)
    params = list(model.parameters())
    v = torch.randn(H.shape[0], dtype=F64)
    g = torch.autograd.grad(nn.CrossEntropyLoss()(model(X), y), params, create_graph=True)
    flat = torch.cat([t.reshape(-1) for t in g])
    ref = torch.cat([t.reshape(-1) for t in torch.autograd.grad(flat @ v, params)])
    assert float((H @ v - ref).abs().max()) <= 1e-12 * float(ref.abs().max())
    small = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3)).double()
    Hs = hessinv.hessian(
        small, nn.CrossEntropyLoss(), torch.randn(4, 4, dtype=F64), torch.tensor([0, 1, 2, 0])
    )
    assert not any(isinstance(b, LazyBlocks) for b in Hs.blocks)


# -- a review's finds (each failed before its fix) ----------------------------------------------------
def test_float32_stages_whose_double_backward_is_wrong_are_refused(lazy):
    """float32: the probe compared one random inner product against the sum of its terms' sizes, which
    random signs make ~1/sqrt(N) of it, so a 0.25 tolerance let through a once-differentiable backward
    (Gauss-Newton products 72-98% off, at default settings: its generic stages are always lazy) and
    prelu at exactly 0. The check is now entry by entry, J^T s differentiated out of the forward products
    against the first backward's."""
    ce = nn.CrossEntropyLoss()
    for seed in range(4):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Conv1d(2, 2, 3), _Cube(), nn.Flatten(), nn.Linear(8, 3))
        X, y = torch.randn(32, 2, 6), torch.randint(0, 3, (32,))
        for build in (hessinv.gauss_newton, hessinv.hessian):
            with pytest.raises(hessinv.UnsupportedStageError, match="not differentiable"):
                op = build(m, ce, X, y)
                op @ torch.randn(op.shape[0])
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 16), nn.PReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        m[0].weight[:4] = 0
        m[0].bias[:4] = 0  # 4 units at exactly 0, with a nonzero derivative through them
    X, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    for build in (hessinv.gauss_newton, hessinv.hessian):
        with pytest.raises(hessinv.UnsupportedStageError, match="prelu"):
            op = build(m, ce, X, y)
            op @ torch.randn(op.shape[0])


def test_float32_weight_norm_on_a_convolution_is_refused_by_default():
    """Default settings (the convolution's blocks are large: lazy): weight_norm's double backward is not
    symmetric; it was accepted in float32 with H @ v 2-7% off (the symmetry check normalized by the sum of
    the terms' sizes); now W^T H W's asymmetry is measured against its own entries."""
    import warnings

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch deprecates nn.utils.weight_norm)
        conv = nn.utils.weight_norm(nn.Conv2d(3, 8, 3, padding=1))
    m = nn.Sequential(conv, nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    X, y = torch.randn(16, 3, 16, 16), torch.randint(0, 3, (16,))
    with pytest.raises(hessinv.UnsupportedStageError, match="not symmetric"):
        hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)


def test_parameters_rewritten_with_the_same_values_keep_the_products(lazy):
    """A trust-region step writes the parameters and puts them back (the trust region on a CNN crashed
    in its first step), as does ``load_state_dict`` of the same state: autograd refused the kept graph
    ('modified by an inplace operation'); the stage is now called again at the point. A parameter frozen
    since is a named error; a parameter read through ``.detach()`` gave unbatched zeros that the batched
    product took for a batch of 3."""
    model, x = _models(0)["cnn"]
    model, x = model.double(), x.double()
    y = torch.randint(0, 3, (x.shape[0],))
    _, H_ref = autograd_gradient_hessian(model, nn.CrossEntropyLoss(), x, y)
    H = hessinv.hessian(model, nn.CrossEntropyLoss(), x, y)
    G = hessinv.gauss_newton(model, nn.CrossEntropyLoss(), x, y)
    V = torch.randn(H.shape[0], 3, dtype=F64)
    model.load_state_dict(model.state_dict())  # same values, new versions
    assert float((H @ V - H_ref @ V).abs().max()) <= 1e-12 * float((H_ref @ V).abs().max())
    G @ V
    model[0].bias.requires_grad_(False)
    with pytest.raises(hessinv.InvalidArgumentError, match="frozen or unfrozen"):
        H @ V
    model[0].bias.requires_grad_(True)
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3)
    )
    m = m.double()
    X, y = torch.randn(16, 1, 4, 4, dtype=F64), torch.randint(0, 3, (16,))
    opt = hessinv.optim.Newton(m, nn.CrossEntropyLoss(), mode="trust-region", seed=0)
    losses = [float(opt.step(X, y)) for _ in range(4)]
    assert losses[-1] < losses[0]


class _DetachedScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return torch.tanh(x @ self.w) * self.scale.detach().sum()


def test_a_parameter_read_through_detach_gets_zero_rows(lazy):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), _DetachedScale(), nn.Linear(4, 3)).double()
    X, y = torch.randn(5, 3, dtype=F64), torch.randint(0, 3, (5,))
    _, H_ref = autograd_gradient_hessian(m, nn.CrossEntropyLoss(), X, y)
    H = hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    for k in (2, 3):
        V = torch.randn(H.shape[0], k, dtype=F64)
        assert float((H @ V - H_ref @ V).abs().max()) <= 1e-12 * float((H_ref @ V).abs().max())


def test_a_stage_of_plain_convolutions_and_pooling_is_not_probed(lazy, monkeypatch):
    """A stage made of torch's convolutions, pooling, ReLU and Flatten alone passes every check of the probe
    by construction: the probe is skipped (80% of building a CNN's Hessian), the Hessian is autograd's.
    A subclass of one of them (its forward may differ) or a hooked one is probed as before."""

    class MyConv(nn.Conv2d):
        pass

    probed: list[str] = []
    original = LazyBlocks._adjoint_through_graph

    def spy(self, s):
        probed.append(self.stage.name)
        return original(self, s)

    monkeypatch.setattr(LazyBlocks, "_adjoint_through_graph", spy)
    X, y = torch.randn(3, 1, 5, 5, dtype=F64), torch.randint(0, 3, (3,))
    for conv, hooked, expect in ((nn.Conv2d, False, False), (MyConv, False, True), (nn.Conv2d, True, True)):
        torch.manual_seed(0)
        first = conv(1, 2, 3, padding=1)
        if hooked:
            first.register_forward_hook(lambda m, i, o: None)
        model = nn.Sequential(first, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3)).to(F64)
        probed.clear()
        H = hessinv.hessian(model, nn.CrossEntropyLoss(), X, y)
        assert any(isinstance(b, LazyBlocks) for b in H.blocks)
        assert any(name.startswith("stage 0") for name in probed) == expect, (conv, hooked, probed)
        _, ref = autograd_gradient_hessian(model, nn.CrossEntropyLoss(), X, y)
        assert float((H.to_dense() - ref).abs().max()) <= 1e-12 * float(ref.abs().max())
