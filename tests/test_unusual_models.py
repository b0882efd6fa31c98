"""Unusual models and factorization uses against plain-autograd float64 references: what a probe found
silently wrong or wrongly refused (2026-12-03). Each test failed before its fix."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from reference import autograd_gauss_newton, autograd_gradient_hessian
from torch import Tensor, nn

import hessinv
import hessinv.optim as ho


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


class _CubeOnce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * 3 * x**2


class _Cube(nn.Module):
    def forward(self, x):
        return _CubeOnce.apply(x)


def test_a_backward_that_is_not_differentiable_is_refused():
    """A custom autograd.Function with @once_differentiable: its Jacobian's rows came out as zeros
    (gradient off by 100%, the first layer's exactly 0) with no error. The Hessian (and any product
    through its double backward) is refused; the Gauss-Newton matrix's dense form and its products, from
    its root (first derivatives only), are exact."""
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), _Cube(), nn.Linear(4, 3)).double()
    X, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    with pytest.raises(hessinv.UnsupportedStageError, match="not differentiable"):
        hessinv.hessian(m, nn.CrossEntropyLoss(), X, y).to_dense()
    G = hessinv.gauss_newton(m, nn.CrossEntropyLoss(), X, y)
    assert _rel(G.to_dense(), autograd_gauss_newton(m, nn.CrossEntropyLoss(), X, y)) <= 1e-12
    v = torch.randn(G.shape[0], dtype=torch.float64)  # (its forward product was the double backward)
    assert _rel(G @ v, autograd_gauss_newton(m, nn.CrossEntropyLoss(), X, y) @ v) <= 1e-12


def test_prelu_at_its_kink_is_refused():
    """torch's prelu at an input of exactly 0: its backward uses the slope a, its double backward 1 (the
    gradient was 1.38 off, H 0.75); a zero-initialized Linear before it puts every input there."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 4), nn.PReLU(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        m[0].weight.zero_()
        m[0].bias.zero_()
    X, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    with pytest.raises(hessinv.UnsupportedStageError, match="prelu at an input of exactly 0"):
        hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    with torch.no_grad():  # off the kink: exact
        m[0].weight.normal_()
    g, H = autograd_gradient_hessian(m, nn.CrossEntropyLoss(), X, y)
    op = hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    assert _rel(op.gradient, g) < 1e-12 and _rel(op.to_dense(), H) < 1e-12


def test_an_infinite_mask_buffer_is_a_value():
    """An additive causal mask registered as a buffer (-inf above the diagonal, as
    nn.Transformer.generate_square_subsequent_mask makes it) was refused as non-finite."""

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.register_buffer(
                "mask", nn.Transformer.generate_square_subsequent_mask(4, dtype=torch.float64)
            )

        def forward(self, x):  # (B, 4, 3)
            a = torch.softmax(x @ x.transpose(1, 2) + self.mask, dim=-1)
            return torch.tanh(self.lin(a @ x))

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 3), Masked(), nn.Flatten(), nn.Linear(12, 2)).double()
    X, y = torch.randn(5, 4, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    g, H = autograd_gradient_hessian(m, nn.CrossEntropyLoss(), X, y)
    op = hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    assert _rel(op.gradient, g) < 1e-12 and _rel(op.to_dense(), H) < 1e-12
    m[1].mask[0, 0] = float("nan")
    with pytest.raises(hessinv.NonFiniteError, match="mask contains NaN"):
        hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)


def test_a_zero_width_layer_is_a_named_error():
    m = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 0), nn.Flatten(), nn.Linear(0, 3)).double()
    X, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    with pytest.raises(hessinv.UnsupportedStageError, match="width 0"):
        hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)


def test_a_sparse_embedding_is_the_dense_one():
    """nn.Embedding(sparse=True) computes the same function: it was refused ("reshape is not implemented
    for sparse tensors")."""
    torch.manual_seed(0)
    tok, y = torch.randint(0, 7, (4, 3)), torch.randint(0, 3, (4,))
    sparse = nn.Sequential(
        nn.Embedding(7, 4, sparse=True), nn.Flatten(), nn.Tanh(), nn.Linear(12, 3)
    ).double()
    dense = nn.Sequential(nn.Embedding(7, 4), nn.Flatten(), nn.Tanh(), nn.Linear(12, 3)).double()
    dense.load_state_dict(sparse.state_dict())
    g, H = autograd_gradient_hessian(dense, nn.CrossEntropyLoss(), tok, y)
    for build, ref in ((hessinv.hessian, H), (hessinv.gauss_newton, None)):
        op = build(sparse, nn.CrossEntropyLoss(), tok, y)
        assert _rel(op.gradient, g) < 1e-12
        if ref is not None:
            assert _rel(op.to_dense(), ref) < 1e-12
    assert sparse[0].sparse  # (restored after each call)


def test_a_large_sparse_embedding_trains_as_the_dense_one():
    """A 5000-row nn.Embedding(sparse=True): its stage went through dense p x p per-example blocks (a
    sparse gradient's to_dense() has no graph to differentiate twice), and Newton's first step raised
    TooLargeError (6.5e9 numbers); with a small table each refresh formed them (20x slower steps). The
    stage is now differentiated with dense gradients (the same numbers): the dense table's steps."""
    torch.manual_seed(0)
    V, T = 5000, 6
    X, y = torch.randint(0, V, (128, T)), torch.randint(0, 3, (128,))

    def net(sparse: bool) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Embedding(V, 8, sparse=sparse), nn.Flatten(), nn.Linear(8 * T, 8), nn.Tanh(), nn.Linear(8, 3)
        ).double()

    a, b = net(True), net(False)
    for m in (a, b):
        opt = ho.Newton(m, nn.CrossEntropyLoss(), seed=0, refresh=2)
        for i in range(0, 128, 32):
            opt.step(X[i : i + 32], y[i : i + 32])
    assert a[0].sparse
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=0, atol=1e-12)
    G = hessinv.gauss_newton(a, nn.CrossEntropyLoss(), X[:4], y[:4])
    v = torch.randn(G.shape[0], dtype=torch.float64)
    Gb = hessinv.gauss_newton(b, nn.CrossEntropyLoss(), X[:4], y[:4])
    assert _rel(G @ v, Gb @ v) < 1e-12


class _Counted(nn.Module):
    """A forward that counts its calls in a buffer; with ``scaled``, its output depends on the count."""

    def __init__(self, scaled: bool):
        super().__init__()
        self.a, self.b, self.scaled = nn.Linear(4, 5), nn.Linear(5, 3), scaled
        self.register_buffer("n", torch.zeros((), dtype=torch.float64))

    def forward(self, x):
        self.n += 1
        h = torch.tanh(self.a(x))
        return self.b(h * (1 + 0.1 * self.n) if self.scaled else h)


def test_a_call_counter_in_forward_is_left_as_it_was():
    """A buffer that forward increments: hessinv's passes (and torch.fx's trace) advanced it (to 3 after
    hessinv.hessian) although the model is to be left as it was; where the output depends on it, the
    refusal blamed torch.fx's isinstance checks and left the counter advanced."""
    torch.manual_seed(0)
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    m = _Counted(False).double()
    H = hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    _, Hd = autograd_gradient_hessian(m, nn.CrossEntropyLoss(), X, y)
    m.n.zero_()
    assert _rel(H.to_dense(), Hd) < 1e-12
    hessinv.gauss_newton(m, nn.CrossEntropyLoss(), X, y).solve(H.gradient, 1e-2)
    assert float(m.n) == 0.0
    m = _Counted(True).double()
    with pytest.raises(hessinv.NotAChainError, match=r"changes its buffer\(s\) \['n'\] in place"):
        hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    assert float(m.n) == 0.0


def test_a_constant_of_the_default_dtype_in_forward_is_a_dtype_error():
    """forward creates torch.eye(5) (float32): a float32 model's products work, but its float64 copy (for
    refinement and eigenvalues) fails -- refused as a ShapeMismatchError before, whose remedy ("use a
    float64 model") fails the same way."""

    class ConstEye(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)) @ (torch.eye(5) * 0.9))

    torch.manual_seed(0)
    H = hessinv.hessian(ConstEye(), nn.CrossEntropyLoss(), torch.randn(6, 4), torch.randint(0, 3, (6,)))
    with pytest.raises(hessinv.DtypeMismatchError, match=r"create such tensors with dtype=x\.dtype"):
        H.min_eigenvalue()
    with pytest.raises(hessinv.DtypeMismatchError, match=r"create it with dtype=x\.dtype"):
        hessinv.hessian(
            ConstEye().double(), nn.CrossEntropyLoss(), torch.randn(6, 4).double(), torch.zeros(6).long()
        )


def test_integer_outputs_inside_the_model_say_what_to_do():
    """Integer values after a trainable layer (argmax, one_hot) have no derivative: refused, with the
    remedy. As the first stage (before every parameter: preprocessing of the inputs) they are exact."""

    class OneHot(nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(x, 7).double()

    class ArgmaxOneHot(nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(x.argmax(1), 7).double()

    torch.manual_seed(0)
    tok, y = torch.randint(0, 7, (4,)), torch.randint(0, 3, (4,))
    m = nn.Sequential(nn.Linear(5, 7), ArgmaxOneHot(), nn.Linear(7, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    with pytest.raises(hessinv.UnsupportedStageError, match="pass them as the inputs"):
        hessinv.hessian(m, nn.CrossEntropyLoss(), torch.randn(4, 5, dtype=torch.float64), y)
    m = nn.Sequential(OneHot(), nn.Linear(7, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    H = hessinv.hessian(m, nn.CrossEntropyLoss(), tok, y)
    _, H_ref = autograd_gradient_hessian(m, nn.CrossEntropyLoss(), tok, y)
    V = torch.randn(H.shape[0], 2, dtype=torch.float64)
    assert torch.allclose(H @ V, H_ref @ V, atol=1e-13)


def test_instance_norm_with_running_stats_in_training_mode_gets_the_right_advice():
    """model.eval() (the generic advice) switches InstanceNorm to its running statistics: another
    function (H 0.94 off)."""
    m = nn.Sequential(
        nn.Conv1d(2, 3, 3), nn.InstanceNorm1d(3, track_running_stats=True), nn.Flatten(), nn.Linear(12, 2)
    )
    m = m.double().train()
    X, y = torch.randn(4, 2, 6, dtype=torch.float64), torch.randint(0, 2, (4,))
    with pytest.raises(hessinv.UnsupportedStageError, match="track_running_stats=False"):
        hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)


@pytest.mark.parametrize("variant", ["to, shape, size", "size(dim=), numel"])
def test_reading_a_parameters_metadata_is_no_use_of_it(variant):
    """x.to(self.l.weight.dtype), reshape(-1, self.o.weight.shape[1]), w.size(0), w.size(dim=1),
    w.numel() in a traced forward: the read put the parameter into a second stage ("shared by stage 0
    and stage 1")."""

    class Meta(nn.Module):
        def __init__(self):
            super().__init__()
            self.l, self.o = nn.Linear(5, 4), nn.Linear(4, 3)

        def forward(self, x):
            if variant == "to, shape, size":
                h = torch.tanh(self.l(x.to(self.l.weight.dtype)))
                return self.o(h.reshape(-1, self.o.weight.shape[1]) * (self.l.weight.size(0) / 4))
            h = torch.tanh(self.l(x)) * (self.o.weight.size(dim=1) / 4) * (self.l.weight.numel() / 20)
            return self.o(h)

    torch.manual_seed(1)
    m = Meta().double()
    X, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    g, H = autograd_gradient_hessian(m, nn.CrossEntropyLoss(), X, y)
    op = hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    assert _rel(op.gradient, g) < 1e-12 and _rel(op.to_dense(), H) < 1e-12
    assert len(hessinv.Chain(m, nn.CrossEntropyLoss()).stages) >= 2  # still split into stages


@pytest.mark.parametrize("eps", [1e-9, 1e-12])
def test_square_roots_and_quadratic_forms_at_small_damping(eps):
    """Factorization.inverse_quadratic, inverse_sqrt and sample of a positive definite G + eps I at small
    eps: from ill-conditioned pivots 46% off (inverse_quadratic) and |A S S^T A - A| / |A| = 1e3
    (inverse_sqrt), with no warning."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    X, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    Gd = autograd_gauss_newton(m, nn.CrossEntropyLoss(), X, y)
    A = 0.5 * (Gd + Gd.T) + eps * torch.eye(Gd.shape[0], dtype=torch.float64)
    G = hessinv.gauss_newton(m, nn.CrossEntropyLoss(), X, y)
    F = G.factor(eps)
    g = G.gradient
    ref = float(g @ torch.linalg.solve(A, g))
    assert abs(F.inverse_quadratic(g) - ref) <= 1e-6 * abs(ref)
    S = F.inverse_sqrt(torch.eye(A.shape[0], dtype=torch.float64))
    assert float(torch.linalg.matrix_norm(A @ S @ S.T @ A - A, 2) / torch.linalg.matrix_norm(A, 2)) < 1e-8
    Z = F.sample(3, generator=torch.Generator().manual_seed(0))
    assert Z.shape == (A.shape[0], 3) and bool(torch.isfinite(Z).all())


def test_float32_cancelling_stages_are_not_taken_for_a_broken_backward():
    """A GroupNorm of 2 per group in float32 with inputs x30: autograd's own backward is 5% off its
    blocks (cancellation), which a first version of the first-order check refused."""

    class Flat(nn.Module):
        def forward(self, x):
            return x.reshape(x.shape[0], -1)

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 4), nn.Unflatten(1, (4, 1)), nn.GroupNorm(2, 4), Flat(), nn.Linear(4, 3))
    X, y = torch.randn(8, 5) * 30, torch.randint(0, 3, (8,))
    import copy

    ref = hessinv.gauss_newton(copy.deepcopy(m).double(), nn.CrossEntropyLoss(), X.double(), y)
    v = torch.randn(ref.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w = (hessinv.gauss_newton(m, nn.CrossEntropyLoss(), X, y) @ v.float()).double()
    r = ref @ v
    assert float((w - r).norm() / r.norm()) < 1e-4


def test_non_finite_running_statistics_are_named():
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double().eval()
    X, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    for buf in ("running_mean", "running_var"):
        for value in (float("inf"), float("-inf")):
            m2 = __import__("copy").deepcopy(m)
            getattr(m2[1], buf)[0] = value
            with pytest.raises(hessinv.NonFiniteError, match=f"buffer {buf}"):
                hessinv.hessian(m2, nn.CrossEntropyLoss(), X, y)


# -- the solver and spectrum API at the edges (a probe's findings, 2026-12-03) ------------------------
def _tanh_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(3.0)
    return m


class _Scaled(nn.Module):
    def __init__(self, c: float):
        super().__init__()
        self.c, self.ce = c, nn.CrossEntropyLoss()

    def forward(self, out, y):
        return self.c * self.ce(out, y)


@pytest.mark.parametrize("c", [1e-40, 1e-200])
def test_tiny_hessians_keep_their_spectrum(c):
    """The loss times c: the spectrum is c times the c = 1 one. At c = 1e-40 every eigenvalue was counted
    as zero (an absolute floor of 1e-30 in the counts' resolution); at 1e-200 the norm estimate
    underflowed to 0 and min_eigenvalue returned 0."""
    import hessinv.spectrum as sp

    X, y = (
        torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)),
        torch.arange(8) % 3,
    )
    H1 = hessinv.hessian(_tanh_net(), nn.CrossEntropyLoss(), X, y)
    Hc = hessinv.hessian(_tanh_net(), _Scaled(c), X, y)
    ev = torch.linalg.eigvalsh(H1.to_dense())
    neg = int((ev < -1e-6 * float(ev.abs().max())).sum())
    assert neg > 0 and sp.num_negative_eigenvalues(Hc) == neg
    assert abs(Hc.min_eigenvalue() / c - float(ev[0])) < 1e-6 * float(ev.abs().max())


def test_norm_estimate_checks_iters_and_caches_honestly():
    X, y = torch.randn(8, 4, dtype=torch.float64), torch.arange(8) % 3
    H = hessinv.hessian(_tanh_net(), nn.CrossEntropyLoss(), X, y)
    for bad in (0, -1, 2.5, float("nan"), "3", True):
        with pytest.raises(hessinv.InvalidArgumentError, match="iters"):
            H.norm_estimate(bad)
    one = H.norm_estimate(1)
    full = H.norm_estimate(30)  # (not the cached 1-iteration value)
    ref = float(torch.linalg.matrix_norm(H.to_dense(), 2))
    assert abs(full - ref) < 1e-2 * ref and one <= full * (1 + 1e-12)
    assert abs(H.min_eigenvalue() - float(torch.linalg.eigvalsh(H.to_dense())[0])) < 1e-6 * ref


@pytest.mark.parametrize("sigma", [1e10, 1e20, -1e15, -1e20])
def test_eigenpairs_nearest_a_far_sigma_are_the_ends(sigma):
    """sigma far outside the spectrum: the interval sigma -+ r cancelled in rounding (wrong values at
    1e20, uncertified at 1e10)."""
    X, y = (
        torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)),
        torch.arange(8) % 3,
    )
    H = hessinv.hessian(_tanh_net(), nn.CrossEntropyLoss(), X, y)
    ev = torch.linalg.eigvalsh(H.to_dense())
    want = ev[-2:] if sigma > 0 else ev[:2]
    e = H.eigenpairs(2, "nearest", sigma=sigma)
    assert e.certified and torch.allclose(e.values, want, atol=1e-9 * float(ev.abs().max()))


def test_small_solver_contracts():
    """modify= on the Woodbury path was ignored (an indefinite G + D returned for modify='abs'); a complex
    vector lost its imaginary part in as_linear_operator; float32 counts at a shift beyond float32's range
    blamed a NaN pivot."""
    import numpy as np

    import hessinv.spectrum as sp

    X, y = torch.randn(8, 4, dtype=torch.float64), torch.arange(8) % 3
    G = hessinv.gauss_newton(_tanh_net(), nn.CrossEntropyLoss(), X, y)
    with pytest.raises(hessinv.InvalidArgumentError, match="modify"):
        G.factor(torch.full((G.shape[0],), -0.1, dtype=torch.float64), modify="abs")
    A = G.to_dense().numpy()
    v = np.random.default_rng(0).normal(size=G.shape[0]) + 1j * np.random.default_rng(1).normal(
        size=G.shape[0]
    )
    assert np.abs(G.as_linear_operator() @ v - A @ v).max() < 1e-12 * np.abs(A).max() * np.abs(v).max()
    H32 = hessinv.hessian(_tanh_net().float(), nn.CrossEntropyLoss(), X.float(), y)
    with pytest.raises(hessinv.InvalidArgumentError, match="too large"):
        sp.eigenvalue_counts(H32, [1e39])


class _Whole(nn.Module):
    def __init__(self, *modules: nn.Module):
        super().__init__()
        self.body = nn.Sequential(*modules)

    def forward(self, x):
        return self.body(x)


def test_a_shared_parameter_refusal_names_a_remedy_that_works():
    """One Linear used twice in a Sequential: called whole with a warning, and the warning's remedy (the
    span from the first use to the last inside one module with its own forward) gives the exact Hessian."""
    torch.manual_seed(3)
    lin = nn.Linear(4, 4)
    X, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    loss = nn.CrossEntropyLoss()
    flat = nn.Sequential(lin, nn.Tanh(), lin, nn.Tanh(), nn.Linear(4, 3)).double()
    with pytest.warns(UserWarning, match=r"one module \(an nn.Module with its own forward"):
        hessinv.hessian(flat, loss, X, y)
    wrapped = nn.Sequential(_Whole(lin, nn.Tanh(), lin, nn.Tanh()), flat[4]).double()
    H = hessinv.hessian(wrapped, loss, X, y)
    g_ref, H_ref = autograd_gradient_hessian(wrapped, loss, X, y)
    assert _rel(H.to_dense(), H_ref) < 1e-10
    assert _rel(H.gradient, g_ref) < 1e-10


class _MetadataReads(nn.Module):
    """A forward that reads its parameters' dtype and device through ``type_as``, ``new_*`` and
    ``*_like`` (no use of their values)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        x = x.type_as(self.a.weight)
        h = torch.tanh(self.a(x))
        h = (
            h
            + self.b.weight.new_zeros(1)
            + self.a.bias.new_full((5,), 0.5)
            - torch.ones_like(self.a.bias) / 2
        )
        return self.b(h) + torch.zeros_like(self.b.bias) + self.a.weight.new_tensor(1.0) - 1


def test_parameter_metadata_reads_are_not_uses():
    """``x.type_as(w)``, ``w.new_zeros(...)``, ``torch.zeros_like(w)`` put ``w`` into a second stage
    and were refused as a "shared parameter"."""
    torch.manual_seed(4)
    m = _MetadataReads().double()
    X, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    loss = nn.CrossEntropyLoss()
    H = hessinv.hessian(m, loss, X, y)
    g_ref, H_ref = autograd_gradient_hessian(m, loss, X, y)
    assert _rel(H.to_dense(), H_ref) < 1e-10
    assert _rel(H.gradient, g_ref) < 1e-10


class _Tempered(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b = nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)
        self.T = 1.0

    def forward(self, x):
        return self.b(torch.tanh(self.bn(self.a(x)))) / self.T


@pytest.mark.parametrize("change", ["buffers", "temperature", "hook"])
def test_a_float32_operator_keeps_its_point_in_its_float64_copy(change):
    """A float32 operator refines against a float64 copy of the model made when first needed: BatchNorm
    statistics moved since (a forward pass in training mode) gave solves 137% off, a temperature or a hook
    changed since 100%, with small reported residuals. Now the buffers are restored to the point, and
    what cannot be (hooks, traced attributes) is refused."""
    torch.manual_seed(0)
    m = _Tempered().eval()
    X, y = torch.randn(6, 3), torch.randint(0, 3, (6,))
    loss = nn.CrossEntropyLoss()
    H = hessinv.hessian(m, loss, X, y)
    m64 = __import__("copy").deepcopy(m).double()
    g_ref, H_ref = autograd_gradient_hessian(m64, loss, X.double(), y)
    if change == "buffers":
        m.train()
        m(5 * X + 2)
        m.eval()
    elif change == "temperature":
        m.T = 3.0
    else:
        m.a.register_forward_hook(lambda mod, i, o: 3 * o)
    if change != "buffers":
        with pytest.raises(hessinv.InvalidArgumentError, match="build the operator again"):
            H.factor(0.5).solve(H.gradient)
        return
    x = H.factor(0.5).solve(H.gradient)
    ref = torch.linalg.solve(H_ref + 0.5 * torch.eye(H_ref.shape[0], dtype=torch.float64), g_ref)
    assert _rel(x.double(), ref) < 1e-5


class _ReadsItsSettings(nn.Module):
    """Called whole (it keeps a value computed from its input): its forward reads plain settings untraced."""

    def __init__(self):
        super().__init__()
        self.lin, self.scales, self.opts, self.cache = nn.Linear(4, 4), [1.0, 2.0], {"T": 2.0}, None

    def forward(self, h):
        out = torch.tanh(self.lin(h)) * self.scales[1] / self.opts["T"] * (2.0 if self.training else 1.0)
        self.cache = out.detach()
        return out


@pytest.mark.parametrize("change", ["beta", "training", "list", "dict", "class_weight", "label_smoothing"])
def test_a_float32_operator_s_float64_copy_keeps_the_settings_and_loss_of_its_point(change):
    """The float64 copy of a float32 operator's model is made when first needed: a Softplus's beta, a
    training flag, a list or dict entry a stage called whole reads, the loss's class weights (edited in
    place) or label smoothing, changed after the operator was built and before its first solve, gave
    solves 0.9-6x off with residuals of 1e-16 (a review). They are now copied when the operator is built."""
    torch.manual_seed(0)
    mid = nn.Softplus(beta=1.0) if change == "beta" else _ReadsItsSettings()
    m = nn.Sequential(nn.Linear(3, 4), mid, nn.Linear(4, 3)).eval()
    X, y = torch.randn(6, 3), torch.randint(0, 3, (6,))
    loss = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5]))
    H = hessinv.hessian(m, loss, X, y)
    copy = __import__("copy")
    m64, loss64 = copy.deepcopy(m).double(), copy.deepcopy(loss).double()
    g_ref, H_ref = autograd_gradient_hessian(m64, loss64, X.double(), y)
    if change == "beta":
        mid.beta = 4.0
    elif change == "training":
        m.train()
    elif change == "list":
        mid.scales[1] = 0.5
    elif change == "dict":
        mid.opts["T"] = 0.5
    elif change == "class_weight":
        loss.weight.mul_(torch.tensor([3.0, 0.1, 1.0]))
    else:
        loss.label_smoothing = 0.4
    F = H.factor(0.5)
    x = F.solve(H.gradient)
    ref = torch.linalg.solve(H_ref + 0.5 * torch.eye(H_ref.shape[0], dtype=torch.float64), g_ref)
    assert _rel(x.double(), ref) < 1e-5
    assert abs(H.min_eigenvalue() - float(torch.linalg.eigvalsh(H_ref)[0])) < 1e-6 * float(H_ref.norm())


def test_a_hook_added_after_a_generic_stage_s_gauss_newton_is_refused():
    """The generic stage's dense blocks are formed on first use, by calling its module: with a hook
    added since, ``G @ v`` matched neither the matrix at construction (8.0 off) nor the hooked model's."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3)).double()
    X, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    G = hessinv.gauss_newton(m, nn.CrossEntropyLoss(), X, y)
    m[1].register_forward_hook(lambda mod, i, o: 3 * o)
    with pytest.raises(hessinv.InvalidArgumentError, match="hooks were added or removed"):
        G @ torch.randn(G.shape[0], dtype=torch.float64)


class _Normalize(nn.Module):
    def forward(self, x):
        return torch.nn.functional.normalize(x, dim=-1)


def test_non_finite_stage_derivatives_are_named():
    """F.normalize after a ReLU that zeroes an example: autograd's second derivative of the norm at 0 is
    NaN, and multiplied by the ReLU's exact zeros it made a Hessian with 72 NaN entries, unreported."""
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), _Normalize(), nn.Linear(2, 2)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
        model[0].bias.zero_()
    X = torch.tensor([[-1.0, -0.5], [0.7, 0.2], [0.3, 1.1]], dtype=torch.float64)
    with pytest.raises(hessinv.NonFiniteError, match="not finite"):
        hessinv.hessian(model, nn.CrossEntropyLoss(), X, torch.tensor([0, 1, 0]))


class _HardsigmoidBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, z):
        return z + 0.5 * torch.nn.functional.hardsigmoid(self.lin(z))


@pytest.mark.parametrize("case", ["embedding_bag", "hardsigmoid", "groupnorm"])
def test_refusals_name_a_remedy_that_applies(case):
    """Operations without a double backward, or a normalization over one element per group in float64:
    the refusals gave torch's reason only, or told a float64 model to "use a float64 model"."""
    torch.manual_seed(0)
    if case == "embedding_bag":
        m = nn.Sequential(nn.EmbeddingBag(10, 3, mode="mean"), nn.Linear(3, 2)).double()
        X, match = (
            torch.randint(0, 10, (4, 5)),
            r"nn.Embedding followed by .sum\(1\), .mean\(1\) or .amax\(1\)",
        )
    elif case == "hardsigmoid":
        m = nn.Sequential(_HardsigmoidBlock(), nn.Linear(3, 2)).double()
        X, match = torch.randn(4, 3, dtype=torch.float64), "torch.clamp"
    else:
        m = nn.Sequential(nn.Linear(3, 2), nn.GroupNorm(2, 2), nn.Linear(2, 2)).double()
        X, match = torch.randn(5, 3, dtype=torch.float64), "over more than 2 features"
    with pytest.raises(hessinv.UnsupportedStageError, match=match) as e:
        hessinv.hessian(m, nn.CrossEntropyLoss(), X, torch.randint(0, 2, (X.shape[0],)))
    assert "use a float64 model" not in str(e.value)


def test_a_zero_gauss_newton_matrix_through_a_generic_stage_has_an_empty_root():
    """Huber loss with every residual beyond delta: G = 0, and the root's backward through a generic stage
    with zero columns raised a raw RuntimeError (reshape of 0 elements)."""
    import warnings

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    X, y = torch.randn(5, 3, dtype=torch.float64), 30 * torch.randn(5, 2, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        G = hessinv.gauss_newton(m, nn.HuberLoss(delta=0.5), X, y)
        U, S = G.root()
    assert U.shape[0] == 0 or float(U.abs().max()) == 0.0


@pytest.mark.parametrize("op", ["sort", "topk", "max"])
def test_values_of_an_op_that_returns_several_tensors(op):
    """``torch.sort(h).values`` (fx: getattr on the op's result): the chain was cut between the op and the
    attribute, and the piece refused as returning a tuple; ``[0]`` was accepted. Now both, exact."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 5), nn.Linear(5 if op == "sort" else 3 if op == "topk" else 1, 3)

        def forward(self, x):
            h = self.a(x)
            r = (
                torch.sort(h, dim=1)
                if op == "sort"
                else torch.topk(h, 3, dim=1)
                if op == "topk"
                else h.max(1, keepdim=True)
            )
            return self.b(r.values**2)

    torch.manual_seed(0)
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    net = Net().double()
    H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    torch.testing.assert_close(H.to_dense(), autograd_gradient_hessian(net, nn.CrossEntropyLoss(), X, y)[1])


def test_a_complex_intermediate_is_named_and_the_whole_call_is_exact():
    """``torch.fft.rfft(h).abs()``: the chain was cut at the complex value and refused as having no
    derivative ("compute them outside the model"); plain autograd differentiates it twice."""

    class FFTNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(4, 3)

        def forward(self, x):
            return self.b(torch.fft.rfft(self.a(x), dim=-1).abs())

    torch.manual_seed(0)
    X, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    loss = nn.CrossEntropyLoss()
    with pytest.warns(UserWarning, match="complex values.*called whole"):  # (it was refused, naming that)
        H = hessinv.hessian(FFTNet().double(), loss, X, y)
    assert len(H.chain.stages) == 1
    net = nn.Sequential(FFTNet()).double()
    torch.testing.assert_close(
        hessinv.hessian(net, loss, X, y).to_dense(), autograd_gradient_hessian(net, loss, X, y)[1]
    )


def test_a_memo_of_the_parameters_is_recomputed_by_each_pass_and_put_back():
    """A module that memoizes ``log_s.exp()`` on its first call kept hessinv's graph-less tensor: the
    parameter's derivatives read as zero (gradient 27% off) there and in the user's later calls; the
    same inside ``torch.nn.utils.parametrize.cached()`` (gradient 12% off)."""
    import torch.nn.utils.parametrize as P

    class CachedScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.log_s, self._s = nn.Parameter(torch.zeros(4)), None

        def forward(self, h):
            if self._s is None:
                self._s = self.log_s.exp()
            return h * self._s

    torch.manual_seed(0)
    X, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    net = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), CachedScale(), nn.Linear(4, 3)).double()
    H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)  # each pass computes its own memo: exact
    assert net[2]._s is None  # put back: the user's next call computes it with its graph
    torch.testing.assert_close(H.to_dense(), autograd_gradient_hessian(net, nn.CrossEntropyLoss(), X, y)[1])
    net[2]._s = None

    class Sym(nn.Module):
        def forward(self, W):
            return W.triu() + W.triu(1).T

    net = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    P.register_parametrization(net[0], "weight", Sym())
    with P.cached(), pytest.raises(hessinv.UnsupportedStageError, match="parametrize.cached"):
        hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)  # outside it: exact
    torch.testing.assert_close(H.to_dense(), autograd_gradient_hessian(net, nn.CrossEntropyLoss(), X, y)[1])


def test_reading_a_shape_does_not_glue_a_layer_to_the_next_op():
    """``h.reshape(h.shape[0], -1)`` after a Linear: fx records ``h.shape`` as getattr, which the rule
    keeping ``.values`` with its op matched too, turning the Linear into a generic stage (4.3x slower at
    width 64, refused at 128)."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = self.a(x)
            return self.b(torch.tanh(h.reshape(h.shape[0], -1)))

    torch.manual_seed(0)
    X, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    net = M().double()
    H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    assert not any(type(s).__name__ == "GenericStage" and s.p for s in H.chain.stages)
    torch.testing.assert_close(H.to_dense(), autograd_gradient_hessian(net, nn.CrossEntropyLoss(), X, y)[1])


@pytest.mark.parametrize("declared", [False, True])
def test_a_buffer_registered_or_filled_on_first_use(declared):
    """A parameter-free mask registered as a buffer (or filled into one declared None) on the first call
    crashed with 'zip() argument 2 is longer than argument 1' in the statefulness check; the first call is
    taken as the module's initialization, and the Hessian is exact."""

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 6)
            if declared:
                self.register_buffer("mask", None, persistent=False)

        def forward(self, x):
            if getattr(self, "mask", None) is None:
                self.register_buffer("mask", (torch.arange(x.shape[-1]) % 2).to(x.dtype), persistent=False)
            return torch.tanh(self.lin(x)) * self.mask

    torch.manual_seed(0)
    X, y = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    net = nn.Sequential(Masked(), nn.Linear(6, 3)).double()
    H = hessinv.hessian(net, nn.MSELoss(), X, y)
    torch.testing.assert_close(H.to_dense(), autograd_gradient_hessian(net, nn.MSELoss(), X, y)[1])


def test_a_stage_linear_in_its_input_keeps_no_zero_second_derivative_block():
    """Convolutions and poolings are generic stages with ``Hzz = 0`` exactly: the block is dropped (it was
    stored as (B, d_in, d_in) and multiplied in every product); the Hessian is unchanged."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3)
    ).double()
    X, y = torch.randn(4, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    H = hessinv.hessian(model, nn.CrossEntropyLoss(), X, y)
    generic = [b for b in H.blocks if hasattr(b, "Hzz")]
    assert generic and all(b.Hzz is None for b in generic)
    _, ref = autograd_gradient_hessian(model, nn.CrossEntropyLoss(), X, y)
    V = torch.randn(H.shape[0], 3, dtype=torch.float64)
    assert torch.allclose(H @ V, ref @ V, rtol=1e-10, atol=1e-12)


def test_running_out_of_memory_in_a_generic_stage_s_batched_backward_is_named(monkeypatch):
    """The batched backward of a generic stage that ran out of memory was read as "no batching rule": the
    fallback formed dense blocks and raised a TooLargeError saying the optimizers need no such blocks,
    from inside Newton.step (a review, under a memory limit). Now the allocation failure is named."""
    from hessinv.stages import generic

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    X, y = torch.randn(6, 3), torch.randint(0, 3, (6,))
    real = torch.autograd.grad

    def grad(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB")
        return real(*args, **kwargs)

    monkeypatch.setattr(generic.torch.autograd, "grad", grad)
    with pytest.raises(hessinv.TooLargeError, match="ran out of memory.*curvature_batch_size"):
        hessinv.optim.Newton(m, nn.CrossEntropyLoss()).step(X, y)


@pytest.mark.parametrize("conv", [nn.Conv1d, nn.Conv2d])
def test_diagonal_through_an_elementwise_stage_into_one_feature(conv):
    """A standalone elementwise stage (Softplus after a convolution) whose next stage outputs one value per
    example: H.diagonal() raised torch's raw "view size is not compatible" from the elementwise stage's
    Riccati block (found by a review); the products and solves were fine."""
    torch.manual_seed(0)
    shape = (4, 1, 3) if conv is nn.Conv1d else (4, 1, 3, 3)
    X, y = torch.randn(*shape, dtype=torch.float64), torch.randint(0, 3, (4,))
    model = nn.Sequential(conv(1, 2, 2), nn.Softplus(), conv(2, 1, 2), nn.Flatten(), nn.Linear(1, 3)).double()
    H = hessinv.hessian(model, nn.CrossEntropyLoss(), X, y)
    want = autograd_gradient_hessian(model, nn.CrossEntropyLoss(), X, y)[1].diagonal()
    assert torch.allclose(H.diagonal(), want, rtol=1e-10, atol=1e-13)


class _LayerDrop(nn.Module):
    """fairseq-style LayerDrop: the block is skipped for the whole batch with probability ``p`` in
    training mode -- a Python-level draw, invisible to the tracer's tensor checks."""

    def __init__(self, p: float):
        super().__init__()
        self.l, self.p = nn.Linear(6, 6), p

    def forward(self, x):
        import random

        if self.training and random.random() < self.p:
            return x
        return x + torch.tanh(self.l(x))


def test_a_forward_that_draws_python_random_numbers_is_refused_by_name():
    """LayerDrop in training mode: 19 of 40 seeds returned the Hessian of whichever network the draws
    made, unflagged; the others a misleading NotAChainError ("a parameter the forward pass does not
    use"). Every seed is refused now, by the draw itself; in eval mode the model is exact."""
    import random

    from reference import autograd_hessian

    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), _LayerDrop(0.3), nn.Linear(6, 3)).double()
    X, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    for seed in range(12):
        random.seed(seed)
        with pytest.raises(hessinv.UnsupportedStageError, match="draws from a global random number"):
            hessinv.hessian(model, nn.CrossEntropyLoss(), X, y)
    model.eval()
    H = hessinv.hessian(model, nn.CrossEntropyLoss(), X, y).to_dense()
    ref = autograd_hessian(model, nn.CrossEntropyLoss(), X, y)
    assert (H - ref).abs().max() <= 1e-12 * ref.abs().max()


def test_newton_trains_a_model_whose_blocks_are_skipped_in_training_mode():
    """The optimizer's gradient in training mode with LayerDrop: a step whose draw skipped the block
    raised torch's raw "appears to not have been used in the graph"; that block's gradient is zero now."""
    import random

    random.seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), _LayerDrop(0.5), nn.Linear(6, 3))
    X, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    opt = hessinv.optim.Newton(model, nn.CrossEntropyLoss())
    first = float(nn.CrossEntropyLoss()(model.eval()(X), y))
    model.train()
    for _ in range(30):
        opt.step(X, y)
    assert float(nn.CrossEntropyLoss()(model.eval()(X), y)) < first


class _ListProjection(nn.Module):
    """A constant projection held in a Python list (not a buffer: ``Module.to`` leaves it)."""

    def __init__(self):
        super().__init__()
        self.Ps, self.l = [torch.randn(6, 6) / 3], nn.Linear(6, 6)

    def forward(self, x):
        return torch.tanh(self.l(x @ self.Ps[0]))


def test_a_float32_model_with_a_constant_in_a_list_has_a_float64_twin():
    """The float64 twin (refined solves, eigenvalues) failed on the float32 constant a list held ("double
    != float", reported as a ShapeMismatchError); it is converted with the model now. The twin's solve
    against the dense float64 Hessian of the same function (the constant exactly representable)."""
    torch.manual_seed(5)
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), _ListProjection(), nn.Linear(6, 3))
    X, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    H = hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    x = H.factor(0.1).solve(H.gradient)
    m64 = nn.Sequential(*[copy.deepcopy(layer) for layer in m]).double()
    m64[2].Ps = [m[2].Ps[0].double()]
    g, A = autograd_gradient_hessian(m64, nn.CrossEntropyLoss(), X.double(), y)
    ref = torch.linalg.solve(A + 0.1 * torch.eye(A.shape[0], dtype=torch.float64), g)
    assert float((x.double() - ref).norm() / ref.norm()) <= 1e-5
    assert H.min_eigenvalue() == pytest.approx(float(torch.linalg.eigvalsh(A)[0]), abs=1e-6)


def test_a_thread_that_draws_meanwhile_does_not_refuse_a_deterministic_model():
    """A background thread drawing from Python's and torch's global generators (an augmentation or
    prefetch thread) moved their states during the build: a plain eval-mode MLP was refused 19 times in
    20 as "random". The second call watches this thread's own draws."""
    import random
    import threading
    import time

    stop = threading.Event()

    def worker():
        while not stop.is_set():
            random.random()
            torch.rand(3)
            time.sleep(0.0005)

    t = threading.Thread(target=worker, daemon=True)
    t.start()
    try:
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double().eval()
        X, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
        for _ in range(5):
            hessinv.gauss_newton(m, nn.CrossEntropyLoss(), X, y).factor(0.1)
            hessinv.hessian(m, nn.CrossEntropyLoss(), X, y).factor(0.1)
    finally:
        stop.set()
        t.join()


class _ScaleInPlace(nn.Module):
    def forward(self, x):
        return x.mul_(2.0)


class _AddInPlaceWhole(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.o(torch.tanh(self.a(x.add_(1.0))))


class _SubParamInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(0.1 * torch.randn(4))

    def forward(self, x):
        return torch.tanh(x.sub_(self.p))


@pytest.mark.parametrize("kind", ["free-first", "whole", "traced", "first-with-parameter", "relu-inplace"])
def test_a_forward_that_modifies_its_input_in_place(kind):
    """A forward that modifies the batch in place (``x.mul_(2)``, ``x.add_(1)``, a first
    ``ReLU(inplace=True)``), which plain torch differentiates twice: hessinv called the model on the batch
    it holds more than once, so the op compounded -- H 2.2 and 0.87 off, the gradient 0.5-0.7, no error --
    or the model was refused as mixing examples / reading a stashed value (a probe). Now exact, the
    caller's batch untouched, and the optimizer's steps are those of the batch as given."""
    torch.manual_seed(1)
    models = {
        "free-first": lambda: nn.Sequential(_ScaleInPlace(), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)),
        "whole": lambda: nn.Sequential(_AddInPlaceWhole()),
        "traced": _AddInPlaceWhole,
        "first-with-parameter": lambda: nn.Sequential(
            _SubParamInPlace(), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)
        ),
        "relu-inplace": lambda: nn.Sequential(
            nn.ReLU(inplace=True), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)
        ),
    }
    model = models[kind]().double()
    loss_fn = nn.CrossEntropyLoss()
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    X0 = X.clone()
    g_ref, H_ref = autograd_gradient_hessian(model, loss_fn, X.clone(), y)
    G_ref = autograd_gauss_newton(model, loss_fn, X.clone(), y)
    H = hessinv.hessian(model, loss_fn, X, y)
    G = hessinv.gauss_newton(model, loss_fn, X, y)
    assert torch.equal(X, X0)
    torch.testing.assert_close(H.gradient, g_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(H.to_dense(), H_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(G.to_dense(), G_ref, rtol=1e-12, atol=1e-14)
    assert float(H.loss) == pytest.approx(float(loss_fn(model(X.clone()), y)), rel=1e-14)
    assert torch.equal(X, X0)
    # the trust region's steps evaluate the batch loss through the model's own forward
    twin = copy.deepcopy(model)
    opt = hessinv.optim.Newton(model, loss_fn, mode="trust-region")
    opt.step(X, y)
    assert torch.equal(X, X0)
    assert opt.last_stats.loss == pytest.approx(float(loss_fn(twin(X.clone()), y)), rel=1e-12)


@pytest.mark.parametrize("which", ["targets", "outputs"])
def test_a_loss_that_modifies_its_arguments_in_place(which):
    """A loss that modifies its targets (``t.mul_(0.5)``) or the outputs (``o.mul_(2)``) in place, as plain
    torch allows: the first was refused as random ("dropout or noise inside it?": hessinv's calls compounded
    the op), the second with torch's in-place-on-a-leaf error (a probe). Now exact, the targets untouched."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X, T = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    T0 = T.clone()
    if which == "targets":

        def loss_fn(o, t):
            return F.mse_loss(o, t.mul_(0.5))
    else:

        def loss_fn(o, t):
            return F.mse_loss(o.mul_(2.0), t)

    g_ref, H_ref = autograd_gradient_hessian(model, loss_fn, X, T.clone())
    H = hessinv.hessian(model, loss_fn, X, T)
    torch.testing.assert_close(H.gradient, g_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(H.to_dense(), H_ref, rtol=1e-12, atol=1e-14)
    assert torch.equal(T, T0)
    twin = copy.deepcopy(model)
    opt = hessinv.optim.Newton(model, loss_fn, mode="trust-region")
    opt.step(X, T)
    assert torch.equal(T, T0)
    assert opt.last_stats.loss == pytest.approx(float(loss_fn(twin(X), T.clone())), rel=1e-12)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_a_residual_block_before_a_frozen_one_wide_head_factors(loss):
    """Linear -> x + tanh(Linear x) -> frozen Linear(2, 1): every Riccati method (factor, solve, inertia,
    is_positive_definite) raised torch's 'view size is not compatible' -- the residual stage's P took a
    transposed Sigma's strides (a fuzzer's find)."""
    from reference import autograd_gradient_hessian

    class Residual(nn.Module):
        def __init__(self, f):
            super().__init__()
            self.f = f

        def forward(self, x):
            return x + self.f(x)

    torch.manual_seed(0)
    out = 1 if loss == "mse" else 3
    head = nn.Linear(2, out, bias=False)
    head.weight.requires_grad_(False)
    model = nn.Sequential(nn.Linear(2, 2), Residual(nn.Sequential(nn.Linear(2, 2), nn.Tanh())), head).double()
    X = torch.randn(3, 2, dtype=torch.float64)
    y = torch.randn(3, 1, dtype=torch.float64) if loss == "mse" else torch.randint(0, 3, (3,))
    loss_fn = nn.MSELoss() if loss == "mse" else nn.CrossEntropyLoss()
    _, Hd = autograd_gradient_hessian(model, loss_fn, X, y)
    A = Hd + 0.1 * torch.eye(Hd.shape[0], dtype=torch.float64)
    H = hessinv.hessian(model, loss_fn, X, y)
    F = H.factor(0.1)
    torch.testing.assert_close(F.solve(H.gradient), torch.linalg.solve(A, H.gradient), rtol=1e-10, atol=1e-12)
    w = torch.linalg.eigvalsh(0.5 * (A + A.T))
    assert F.inertia.negative == int((w < 0).sum()) and F.inertia.positive == int((w > 0).sum())


class _ActNorm(nn.Module):
    """Glow's ActNorm: its first call sets its parameters from the batch (a data-dependent init)."""

    def __init__(self, d: int):
        super().__init__()
        self.loc, self.logs = nn.Parameter(torch.zeros(d)), nn.Parameter(torch.zeros(d))
        self.register_buffer("inited", torch.tensor(0))

    def forward(self, x: Tensor) -> Tensor:
        if self.inited.item() == 0:
            with torch.no_grad():
                self.loc.copy_(-x.mean(0))
                self.logs.copy_(-torch.log(x.std(0) + 1e-6))
                self.inited.fill_(1)
        return (x + self.loc) * torch.exp(self.logs)


def test_a_module_that_initializes_itself_on_its_first_call_is_named_and_left_as_it_was():
    """ActNorm on a fresh model was refused as "updates its buffers on every call" with advice
    (model.eval()) that does not help, and the refused call left its parameters moved (its buffer put
    back): now named as a first-call initialization, everything put back, and one forward first makes the
    model work (a probe)."""
    torch.manual_seed(0)
    X, y = torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))
    m = nn.Sequential(nn.Linear(4, 6), _ActNorm(6), nn.Tanh(), nn.Linear(6, 3)).double()
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(hessinv.UnsupportedStageError, match="first call only.*run the model once"):
        hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    with torch.no_grad():
        m(X)
    H = hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    _, ref = autograd_gradient_hessian(m, nn.CrossEntropyLoss(), X, y)
    v = torch.randn(H.shape[0], dtype=torch.float64)
    assert torch.allclose(H @ v, ref @ v, rtol=1e-10, atol=1e-12)


class _SkipBatch(ValueError):
    pass


class _Guard(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        if bool((x.abs() > 0.99999).any()):
            raise _SkipBatch("saturated activations: skip this batch")
        return x


def test_the_users_own_exception_from_forward_comes_out_as_it_was_raised():
    """A user's exception (a ValueError subclass a training loop catches to skip a batch) raised in forward
    came out as ShapeMismatchError "failed on input of shape": ``except SkipBatch`` no longer caught it, and
    the message blamed shapes (a probe)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), _Guard(), nn.Linear(6, 3))
    X, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    opt = ho.Newton(m, nn.CrossEntropyLoss(), seed=0)
    opt.step(X, y)
    Xbad = X.clone()
    Xbad[3] = 100.0
    with pytest.raises(_SkipBatch):
        opt.step(Xbad, y)
    with pytest.raises(_SkipBatch):
        hessinv.hessian(m, nn.CrossEntropyLoss(), Xbad, y)


class _TokensToClasses(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.e, self.l = nn.Embedding(7, 4), nn.Linear(6, 3)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.l(torch.tanh(self.e(t)).reshape(t.shape[0], -1))


def test_a_forward_hook_that_changes_a_layers_width_keeps_the_root_exact():
    """A forward hook on an ``nn.Linear`` / ``nn.Embedding`` that returns fewer columns than the layer
    (``o[:, :4] * o[:, 4:5]``): the Gauss-Newton root took the hook's output for the layer's own and
    crashed on the shapes with a raw RuntimeError / IndexError (a probe). The layer's own output is
    recorded now (before the user's hooks), its rows stay structured, and ``U^T S U`` is the dense G."""
    from reference import autograd_gauss_newton

    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    lin[0].register_forward_hook(lambda mod, i, o: o[:, :4] * o[:, 4:5])
    emb = _TokensToClasses().double()
    emb.e.register_forward_hook(lambda mod, i, o: o[..., :2] * o[..., 2:3])
    y = torch.randint(0, 3, (6,))
    for model, X in ((lin, torch.randn(6, 4, dtype=torch.float64)), (emb, torch.randint(0, 7, (6, 3)))):
        G = hessinv.gauss_newton(model, nn.CrossEntropyLoss(), X, y)
        factors: list = []
        U, S = G.root(None, factors)
        want = autograd_gauss_newton(model, nn.CrossEntropyLoss(), X, y)
        assert torch.allclose(U.T @ (S[:, None] * U), want, atol=1e-12)
        if model is lin:  # (the hooked layer's rows from its own output: structured)
            assert (0, 6, 4) in [f[:3] for f in factors]
    opt = hessinv.optim.Newton(lin, nn.CrossEntropyLoss(), seed=0)
    opt.step(torch.randn(6, 4, dtype=torch.float64), y)


def test_a_stateful_forward_hook_in_eval_mode_is_named_with_advice_that_applies():
    """A forward hook whose output changes per call (a counter) on a model already in eval mode: refused
    (no curvature), and the message no longer leads with "call model.eval()" (a probe) -- it says the
    stage is random or stateful in eval mode too and names the hook."""
    calls = [0]

    def hook(mod: nn.Module, inp: tuple, out: Tensor) -> Tensor:
        calls[0] += 1
        return out * (1 + 0.1 * calls[0])

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    m[2].register_forward_hook(hook)
    m.eval()
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    with pytest.raises(hessinv.UnsupportedStageError, match="in eval mode.*forward hook") as e:
        hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    assert "call model.eval()" not in str(e.value)
    m.train()  # (in training mode: the layers' mode is the first suspect, and the hook is named too)
    with pytest.raises(hessinv.UnsupportedStageError, match="call model.eval().*forward hook"):
        hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)


def test_mixed_parameter_dtypes_get_advice_that_works():
    """One float16 layer among float64 ones: the refusal says how to convert (it said nothing), and the
    advice -- ``model.double()`` -- is then accepted; a complex parameter among real ones is told that
    parameters must be real (converting to complex throughout was refused next, a probe)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    m[2].half()
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    with pytest.raises(hessinv.DtypeMismatchError, match=r"model\.float\(\) or model\.double\(\)"):
        hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    hessinv.hessian(m.double(), nn.CrossEntropyLoss(), X, y)
    m[2].weight = nn.Parameter(m[2].weight.detach().to(torch.complex128))
    with pytest.raises(hessinv.DtypeMismatchError, match="real float32 or float64"):
        hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)


class _StatementInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.i, self.o = nn.Linear(4, 6), nn.Linear(6, 3)
        self.register_buffer("m", torch.zeros(6))

    def forward(self, x):
        h = self.i(x)
        if self.training:
            h.add_(1.0)  # a statement: valid autograd, lost by the traced graph
        else:
            with torch.no_grad():  # a running mean updated in forward
                self.m.mul_(0.5).add_(0.5 * h.mean(0))
        return self.o(torch.tanh(h - self.m))


def test_in_place_refusal_names_the_users_value_and_the_fixes():
    """An architecture probe: an in-place statement was refused naming torch.fx's node ("changes i in
    place ... and discards the result ... write it out of place (i = ...)"), not the user's value, nor
    nn.Sequential(model), which calls the model whole; a buffer updated in forward got the same advice,
    which would not make the model a function of its parameters."""
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.arange(5) % 3
    m = _StatementInPlace().double()
    with pytest.raises(hessinv.UnsupportedStageError, match=r"(?s)the output of self\.i \(Linear\).*nn\.Seq"):
        hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    with pytest.raises(hessinv.UnsupportedStageError, match=r"self\.m in place .*update it outside forward"):
        hessinv.hessian(m.eval(), nn.CrossEntropyLoss(), X, y)
    # the advised wrapping is exact
    m.train()
    _, H_ref = autograd_gradient_hessian(nn.Sequential(m), nn.CrossEntropyLoss(), X, y)
    H = hessinv.hessian(nn.Sequential(m), nn.CrossEntropyLoss(), X, y)
    assert (H.to_dense() - H_ref).abs().max() <= 1e-12 * H_ref.abs().max()


class _FFTFilter(nn.Module):
    def __init__(self, d: int, as_buffer: bool = True):
        super().__init__()
        k = torch.randn(d, dtype=torch.complex64)
        if as_buffer:
            self.register_buffer("k", k)
        else:
            self.k = k  # (a plain tensor attribute)

    def forward(self, x):
        f = torch.fft.fft(x)
        return torch.fft.ifft(f * self.k.to(f.dtype)).real


@pytest.mark.parametrize("as_buffer", [True, False])
def test_float32_model_with_a_complex_buffer_keeps_it_complex_in_its_float64_twin(as_buffer):
    """A dtype probe: the float64 twin of a float32 model (refined solves, logdet, eigenvalues) was made
    with Module.to(torch.float64), which casts a complex64 buffer to real -- the twin computed another
    function: a solve 91% off with a reported residual of 1e-15 (true 2.6), logdet and lambda_min off."""
    torch.manual_seed(1)
    X, y, loss = torch.randn(8, 6), torch.randint(0, 3, (8,)), nn.CrossEntropyLoss()
    net = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), _FFTFilter(6, as_buffer), nn.Tanh(), nn.Linear(6, 3))
    ref = copy.deepcopy(net).double()  # (Module.double() keeps complex tensors complex)
    if not as_buffer:
        ref[2].k = ref[2].k.to(torch.complex128)
    _, H_ref = autograd_gradient_hessian(ref, loss, X.double(), y)
    A = H_ref + 0.05 * torch.eye(H_ref.shape[0], dtype=torch.float64)
    H = hessinv.hessian(net, loss, X, y)
    F = H.factor(0.05)
    x, info = F.solve(H.gradient, return_info=True)
    g = H.gradient.double()
    assert float((A @ x.double() - g).norm() / g.norm()) <= 1e-6
    assert info.residual <= 1e-12
    assert abs(F.logdet() - float(torch.linalg.slogdet(A)[1])) <= 1e-6 * abs(
        float(torch.linalg.slogdet(A)[1])
    )
    assert abs(H.min_eigenvalue() - float(torch.linalg.eigvalsh(H_ref)[0])) <= 1e-5 * float(H_ref.abs().max())


class _QuantizedLinear(nn.Module):
    def __init__(self, i: int, o: int):
        super().__init__()
        self.wq = nn.Parameter(torch.randint(-8, 8, (o, i), dtype=torch.int8), requires_grad=False)
        self.scale = nn.Parameter(torch.full((o, 1), 0.2))

    def forward(self, x):
        return x @ (self.wq.to(x.dtype) * self.scale).T


def test_float32_model_with_a_frozen_integer_parameter():
    """A dtype probe: a float32 model holding a frozen int8 Parameter (a quantized weight) raised torch's
    RuntimeError from the frozen parameters' fingerprint (a float64 norm of an integer tensor) in every
    entry point; float64 worked. The float32 operator's refined solve matches the float64 reference."""
    torch.manual_seed(0)
    X, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), _QuantizedLinear(6, 3))
    H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    _, H_ref = autograd_gradient_hessian(copy.deepcopy(net).double(), nn.CrossEntropyLoss(), X.double(), y)
    x = H.factor(1.0).solve(H.gradient)
    ref = torch.linalg.solve(H_ref + torch.eye(H_ref.shape[0], dtype=torch.float64), H.gradient.double())
    assert float((x.double() - ref).norm() / ref.norm()) <= 1e-5
    opt = hessinv.optim.Newton(net, nn.CrossEntropyLoss())
    assert math.isfinite(float(opt.step(X, y)))


class _SpectralLoss(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.register_buffer("M", torch.randn(c, c, dtype=torch.complex64))

    def forward(self, out, y):
        z = torch.fft.fft(out) @ self.M
        return (z - y.to(z.dtype)).abs().pow(2).mean()


class _ComplexMix(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.register_buffer("M", torch.randn(d, d, dtype=torch.complex64))
        self.P = torch.randn(d, d)  # (a plain attribute: Module.double() leaves it float32)

    def forward(self, x):
        return (torch.fft.fft(x @ self.P) @ self.M).real


def test_float64_copies_of_complex_losses_and_attributes():
    """A second review: a loss whose only tensor is a complex64 buffer was returned unconverted for the
    float64 twin (the conversion looked at floating tensors only; refined solves then refused it with
    "use a float64 model", which fails the same way), and estimate_minimizer's float64 copy (Module.double())
    kept complex64 buffers and float32 plain attributes (NotAChainError, DtypeMismatchError)."""
    from hessinv.diagnostics import estimate_minimizer

    torch.manual_seed(1)
    X, y = torch.randn(8, 4), torch.randn(8, 3)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    loss = _SpectralLoss(3)
    ref_loss = copy.deepcopy(loss)
    ref_loss.M = ref_loss.M.to(torch.complex128)
    _, H_ref = autograd_gradient_hessian(copy.deepcopy(net).double(), ref_loss, X.double(), y.double())
    A = H_ref + 0.1 * torch.eye(H_ref.shape[0], dtype=torch.float64)
    H = hessinv.hessian(net, loss, X, y)
    x = H.factor(0.1).solve(H.gradient)
    g = H.gradient.double()
    assert float((A @ x.double() - g).norm() / g.norm()) <= 1e-6
    torch.manual_seed(0)
    X2, y2 = torch.randn(20, 3), torch.randn(20, 1)
    est = estimate_minimizer(nn.Sequential(_ComplexMix(3), nn.Linear(3, 1)), nn.MSELoss(), X2, y2, max_iter=5)
    assert math.isfinite(est.loss)


class _EmptyParameter(nn.Module):
    """A trainable parameter with no entries (a (0,) or (0, 3) tensor) used in the forward pass."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.z = nn.Parameter(torch.zeros(shape, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return x + (self.z.sum() if self.z.dim() < 2 else self.z.sum(0))


@pytest.mark.parametrize("shape", [(0,), (0, 4)])
def test_a_parameter_with_no_entries_adds_nothing_to_the_curvature(shape):
    # (a probe: a (0,) parameter inside a generic stage was refused as "cannot differentiate it twice" --
    # hessinv's own reshape(0, -1) -- and full-batch Newton quietly preconditioned instead of taking its
    # trust region; a (0, 3) one made the eigenbasis divide by its 0 rows: a raw ZeroDivisionError)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), _EmptyParameter(shape), nn.Linear(4, 3)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 3, (5,))
    loss_fn = nn.CrossEntropyLoss()
    H = hessinv.hessian(net, loss_fn, x, y)
    g_ref, H_ref = autograd_gradient_hessian(net, loss_fn, x, y)
    assert H.shape == (31, 31)
    assert _rel(H.to_dense(), H_ref) < 1e-12 and _rel(H.gradient, g_ref) < 1e-12
    plain = copy.deepcopy(net)
    del plain[2]
    losses = []
    for model in (net, plain):
        opt = ho.Newton(model, loss_fn)
        losses.append([float(opt.step(x, y)) for _ in range(4)])
        assert opt.mode == "trust-region"
    assert losses[0] == losses[1]
    pre = ho.Newton(net, loss_fn, mode="precondition")
    assert all(math.isfinite(float(pre.step(x[i::2], y[i::2]))) for i in (0, 1, 0))
