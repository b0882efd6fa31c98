"""What a new user meets first: sparse embeddings, the meta device, autocast, a cast in forward, models
that are no chain as written, models of several inputs -- each exact, or refused with a remedy that
works (checked by following it)."""

from __future__ import annotations

import copy

import pytest
import torch
from reference import autograd_gradient_hessian
from torch import nn

import hessinv
import hessinv.optim as ho
from hessinv import diagnostics
from hessinv.influence import per_example_gradients
from hessinv.laplace import Laplace


class _Emb(nn.Module):
    def __init__(self, sparse: bool):
        super().__init__()
        self.e, self.l = nn.Embedding(10, 4, sparse=sparse), nn.Linear(4, 3)

    def forward(self, t):
        return self.l(torch.tanh(self.e(t).mean(1)))


def _emb_pair():
    torch.manual_seed(0)
    a = _Emb(sparse=True).double()
    b = _Emb(sparse=False).double()
    b.load_state_dict(a.state_dict())
    g = torch.Generator().manual_seed(1)
    return a, b, torch.randint(0, 10, (6, 5), generator=g), torch.randint(0, 3, (6,), generator=g)


def test_sparse_embedding_gradients_are_used_densely():
    """nn.Embedding(sparse=True): the same numbers as sparse=False everywhere a gradient is read (raw
    'reshape is not implemented for sparse tensors' before)."""
    ce = nn.CrossEntropyLoss()
    a, b, T, y = _emb_pair()
    for m in (a, b):
        opt = ho.Newton(m, ce, seed=0)
        for _ in range(3):
            opt.step(T, y)
    assert all(torch.allclose(p, q, atol=1e-14) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    a, b, T, y = _emb_pair()
    for m in (a, b):  # the closure form reads p.grad
        opt = ho.Newton(m, ce, seed=0)

        def closure(m=m, opt=opt):
            opt.zero_grad()
            loss = ce(m(T), y)
            loss.backward()
            return loss

        opt.step(closure=closure, inputs=T, targets=y)
    assert all(torch.allclose(p, q, atol=1e-14) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    a, b, T, y = _emb_pair()
    ds = []
    for m in (a, b):
        pc = ho.Preconditioner(m, ce, seed=0)
        ce(m(T), y).backward()
        ds.append(pc.precondition_(T, y))
    assert torch.allclose(ds[0], ds[1], atol=1e-14)
    a, b, T, y = _emb_pair()
    assert torch.allclose(
        diagnostics.gradient_direction(a, ce, T, y), diagnostics.gradient_direction(b, ce, T, y), atol=1e-15
    )
    Ga, Gb = per_example_gradients(a, ce, T, y), per_example_gradients(b, ce, T, y)
    assert torch.allclose(Ga, Gb, atol=1e-15) and a.e.sparse  # (the flag restored)


def test_meta_device_is_named_everywhere():
    with torch.device("meta"):
        m = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
        X, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    for call in (
        lambda: Laplace(m, "classification").fit(X, y),
        lambda: diagnostics.gradient_direction(m, nn.CrossEntropyLoss(), X, y),
    ):
        with pytest.raises(hessinv.InvalidArgumentError, match="meta device.*materialize"):
            call()


def test_autocast_is_named_as_the_cause():
    m = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    X, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(hessinv.DtypeMismatchError, match="autocast.*outside the autocast context"):
            hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)  # outside: fine


def test_an_operator_made_outside_autocast_answers_the_same_inside():
    """A probe of dtypes: an operator made outside ``torch.autocast`` and used inside it computed its
    products in bfloat16 (``H @ v`` 3.5e-3 off, silently; ``diagonal``, ``trace`` too) and ``factor``,
    ``inertia`` raised torch's dtype errors. Its methods run with autocast off: the same answers."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    X, y, ce = torch.randn(16, 4), torch.randint(0, 3, (16,)), nn.CrossEntropyLoss()
    H, G = hessinv.hessian(m, ce, X, y), hessinv.gauss_newton(m, ce, X, y)
    v = torch.randn(H.shape[0])

    def answers():
        F = H.factor(0.1)
        direct = hessinv.Factorization(H, 0.1)  # (its constructor runs the sweep: a fuzzer's find)
        return [direct.solve(v), hessinv.WoodburyFactorization(G, 0.1).solve(v),
            H @ v, G @ v, H.to_dense(), H.diagonal(), torch.tensor(H.trace()), F.solve(v),
            torch.tensor(float(H.inertia(0.0).negative)), torch.tensor(F.logdet()), G.factor(0.1).solve(v),
        ]  # fmt: skip

    answers()  # (the first G @ v takes another route than the later ones: rounding apart)
    outside = answers()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = answers()
    for a, b in zip(inside, outside, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cast_in_forward_refusal_names_the_working_remedy():
    """x.float() in a float32 model is a no-op there, and refused in the float64 copy that refinement,
    eigenvalues and log-determinants use; model.double() is refused too: remove the cast."""

    class Cast(nn.Module):
        def forward(self, x):
            return x.float()

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 3), Cast(), nn.Tanh(), nn.Linear(3, 2))
    X, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    H = hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    with pytest.raises(hessinv.DtypeMismatchError, match="remove the dtype cast") as err:
        H.min_eigenvalue()
    assert "use a float64 model" not in str(err.value)


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = self.a(x)
        return self.b(torch.tanh(h) if h.sum() > 0 else torch.sigmoid(h))


class _SequenceFirstGRU(nn.Module):
    def __init__(self):
        super().__init__()
        self.r, self.l = nn.GRU(6, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.l(self.r(x.transpose(0, 1))[0][-1])


@pytest.mark.parametrize("cls, shape", [(_DataDependent, (8, 6)), (_SequenceFirstGRU, (8, 5, 6))])
def test_a_model_that_is_no_chain_is_told_to_wrap_itself_and_wrapping_is_exact(cls, shape):
    """A data-dependent ``if`` (fx cannot trace it) or a sequence-first model (its pieces are no chain on
    data) is called whole with a warning, as nn.Sequential(model) calls it (they were refused with that
    advice): exact either way."""
    torch.manual_seed(0)
    m = cls().double()
    X, y = torch.randn(*shape, dtype=torch.float64), torch.randint(0, 3, (8,))
    _, H_ref = autograd_gradient_hessian(m, nn.CrossEntropyLoss(), X, y)
    V = torch.randn(H_ref.shape[0], 2, dtype=torch.float64)
    with pytest.warns(UserWarning, match="called whole"):
        H = hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    assert len(H.chain.stages) == 1
    assert torch.allclose(H @ V, H_ref @ V, atol=1e-12)
    H = hessinv.hessian(nn.Sequential(m), nn.CrossEntropyLoss(), X, y)
    assert torch.allclose(H @ V, H_ref @ V, atol=1e-12)


def test_several_inputs_are_told_to_pack_them():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(5, 2)

        def forward(self, x, z):
            return self.l(torch.cat([x, z], 1))

    X, Z, y = torch.randn(4, 3), torch.randn(4, 2), torch.randint(0, 2, (4,))
    with pytest.raises(hessinv.NotAChainError, match="pack them into one tensor"):
        hessinv.hessian(Two(), nn.CrossEntropyLoss(), X, y)
    with pytest.raises(hessinv.InvalidArgumentError, match="pack them into one tensor"):
        hessinv.hessian(nn.Linear(5, 2), nn.CrossEntropyLoss(), {"x": X, "z": Z}, y)


def _digits_mlp(seed: int = 0):
    from sklearn.datasets import load_digits

    d = load_digits()
    X, y = torch.tensor(d.data[:640] / 16, dtype=torch.float32), torch.tensor(d.target[:640])
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    return m, X, y


def test_the_documented_hessian_damping_keeps_preconditioning():
    """``curvature="hessian", damping=1.0`` -- the Hessian preconditioner's documented default, passed
    explicitly -- switched mode "auto" to the fixed-damping trust region on mini-batches (digits: loss 2.5e5
    after 25 steps against 1.7). It is the preconditioner's damping now: the same steps as the default."""
    runs = []
    for kw in ({}, {"damping": 1.0}):
        m, X, y = _digits_mlp()
        opt = ho.Newton(m, nn.CrossEntropyLoss(), curvature="hessian", seed=0, **kw)
        for i in range(0, 640, 64):
            opt.step(X[i : i + 64], y[i : i + 64])
        assert opt.last_stats.mode == "precondition"
        runs.append(torch.cat([p.detach().reshape(-1) for p in m.parameters()]))
    assert torch.equal(runs[0], runs[1])


def test_optimizer_settings_and_step_arguments_are_checked():
    """``track_inertia=-1`` / NaN / "no" / [0] were taken as True (pinning mini-batches to the trust region);
    ``step(X, y, 3)`` failed as "'int' object is not callable"; numpy integers were refused for
    ``curvature_batch_size`` and ``backtracking`` while other settings took them."""
    import numpy as np

    m, X, y = _digits_mlp()
    for bad in (-1, float("nan"), "no", [0]):
        with pytest.raises(hessinv.InvalidArgumentError, match="track_inertia"):
            ho.Newton(m, nn.CrossEntropyLoss(), track_inertia=bad)
    ho.Newton(m, nn.CrossEntropyLoss(), curvature_batch_size=np.int64(8))
    ho.Newton(
        m, nn.CrossEntropyLoss(), mode="trust-region", backtracking=np.int64(2), track_inertia=np.bool_(True)
    )
    opt = ho.Newton(m, nn.CrossEntropyLoss())
    for closure in (3, "loss"):
        with pytest.raises(hessinv.InvalidArgumentError, match="closure must be callable"):
            opt.step(X[:64], y[:64], closure)


def test_a_step_leaves_the_thread_counts_and_the_callback_runs_with_the_callers():
    """A step on small blocks runs on one thread and put torch's count back, but left scipy's BLAS on one
    (scipy and sklearn after it ran single-threaded), and the callback ran inside, on one thread."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from hessinv import linalg

    if linalg._scipy_blas() is None:
        pytest.skip("scipy's BLAS threads cannot be controlled here")
    before_torch = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        scipy_before = linalg._scipy_blas()[0].num_threads
        seen = []
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        X, y = torch.randn(32, 8, dtype=torch.float64), torch.randint(0, 3, (32,))
        opt = ho.Newton(m, nn.CrossEntropyLoss(), callback=lambda s: seen.append(torch.get_num_threads()))
        for _ in range(4):  # (full batch: the trust region, small blocks)
            opt.step(X, y)
        assert opt.last_stats.mode == "trust-region"
        assert seen == [2] * 4 and torch.get_num_threads() == 2
        assert linalg._scipy_blas()[0].num_threads == scipy_before
        assert threadpoolctl is not None
    finally:
        torch.set_num_threads(before_torch)


def test_tiny_regression_targets_are_warned_about():
    """Targets of root mean square 1e-4 (standardized diabetes times 1e-4): the fit relative to their
    spread stalled at MSE / var 82 (0.25 at unit scale) without a word; the large-scale case warned."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    X, Y = torch.randn(32, 4), 1e-4 * torch.randn(32, 1)
    opt = ho.Newton(m, nn.MSELoss(), mode="precondition")
    with pytest.warns(UserWarning, match="far below unit scale"):
        opt.step(X, Y)


def test_a_frozen_complex_parameter_in_a_float32_model_is_answered_exactly():
    """A probe of dtypes: a frozen complex64 parameter (used through ``.real``) made ``hessinv.hessian`` on
    the float32 model raise torch's ``vector_norm`` dtype error (the frozen parameters' fingerprint)."""

    class ComplexScale(nn.Module):
        def __init__(self, dtype):
            super().__init__()
            self.lin = nn.Linear(8, 8).to(dtype)
            c = torch.randn(8, dtype=torch.complex128).to(dtype.to_complex())
            self.c = nn.Parameter(c, requires_grad=False)

        def forward(self, x):
            return (self.lin(x) * self.c).real

    torch.manual_seed(0)
    m = nn.Sequential(ComplexScale(torch.float32), nn.Tanh(), nn.Linear(8, 3))
    X, y, ce = torch.randn(10, 8), torch.randint(0, 3, (10,)), nn.CrossEntropyLoss()
    ref = copy.deepcopy(m).double()
    ref[0].c.data = m[0].c.data.to(torch.complex128)
    _, H_ref = autograd_gradient_hessian(ref, ce, X.double(), y)
    H = hessinv.hessian(m, ce, X, y)
    b = torch.randn(H.shape[0], dtype=torch.float64)
    x, info = H.factor(0.5).solve(b.float(), return_info=True)
    x_ref = torch.linalg.solve(H_ref + 0.5 * torch.eye(len(b), dtype=torch.float64), b.float().double())
    assert float((x.double() - x_ref).norm() / x_ref.norm()) < 1e-5
    assert info.residual < 1e-10


def test_a_loss_that_computes_in_bfloat16_inside_is_refused_by_name():
    """A probe of dtypes: ``F.cross_entropy(o.bfloat16(), t).float()`` was accepted -- its Hessian 3.6e-3
    off the float64 one, no warning, Newton trained on it -- as autocast around the call is refused. A loss
    that computes in float64 inside and returns float32 stays accepted on the float32 model (exact)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    X, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    down = lambda o, t: nn.functional.cross_entropy(o.bfloat16(), t).float()  # noqa: E731
    for call in (
        lambda: hessinv.hessian(m, down, X, y),
        lambda: hessinv.gauss_newton(m, down, X, y),
        lambda: ho.Newton(m, down).step(X, y),
    ):
        with pytest.raises(hessinv.DtypeMismatchError, match=r"computes in torch.bfloat16 inside"):
            call()
    # data on the side in a lower precision (a float32 mask in a float64 loss, a float16 table of class
    # weights) is not refused: a fuzzer of the check found them refused at first
    m64, X64 = copy.deepcopy(m).double(), X.double()
    table = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float16)

    def masked(o, t):
        w = (t != 0).float() * table[t].to(o.dtype)
        return (w * nn.functional.cross_entropy(o, t, reduction="none")).sum() / w.sum()

    H, H_ref = hessinv.hessian(m64, masked, X64, y), autograd_gradient_hessian(m64, masked, X64, y)[1]
    torch.testing.assert_close(H.to_dense(), H_ref, rtol=0, atol=1e-12)
    up = lambda o, t: nn.functional.cross_entropy(o.double(), t).float()  # noqa: E731
    H, H_ce = hessinv.hessian(m, up, X, y), hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    torch.testing.assert_close(H.to_dense(), H_ce.to_dense(), rtol=0, atol=1e-6)


def test_a_frozen_bfloat16_part_is_named_as_the_cause():
    """The same probe: a frozen bfloat16 backbone before a float32 head was blamed on "a tensor that forward
    creates has the default dtype"; the message names the frozen tensors and both remedies, which work."""
    torch.manual_seed(0)
    backbone = nn.Linear(5, 8).bfloat16().requires_grad_(False)
    head = nn.Sequential(nn.Tanh(), nn.Linear(8, 3))
    X, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    with pytest.raises(hessinv.DtypeMismatchError, match=r"holds torch.bfloat16 tensors.*pass its outputs"):
        hessinv.hessian(nn.Sequential(backbone, *head), nn.CrossEntropyLoss(), X, y)
    with torch.no_grad():
        features = backbone(X.bfloat16()).float()
    hessinv.hessian(head, nn.CrossEntropyLoss(), features, y).factor(0.1)


def test_a_factorization_leaves_scipys_thread_count_as_the_user_set_it(monkeypatch):
    """Work on large blocks on an idle machine (two threads) set scipy's BLAS thread count to torch's and
    left it there: a user's ``OPENBLAS_NUM_THREADS=1`` (or ``threadpool_limits``) undone for the rest of the
    process (a probe)."""
    from hessinv import linalg

    if linalg._scipy_blas() is None:
        pytest.skip("scipy's BLAS threads cannot be controlled here")
    monkeypatch.setattr(linalg, "machine_busy", lambda: False)
    ctl = linalg._scipy_blas()
    before_torch, before_scipy = torch.get_num_threads(), ctl[0].num_threads
    torch.set_num_threads(2)
    ctl[0].set_num_threads(1)
    try:
        torch.manual_seed(0)
        m = nn.Sequential(
            nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3)
        ).double()
        X, y = torch.randn(64, 32, dtype=torch.float64), torch.randint(0, 3, (64,))
        H = hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
        H.factor(1e-3).solve(H.gradient)
        assert ctl[0].num_threads == 1 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before_torch)
        ctl[0].set_num_threads(before_scipy)
        ctl[1] = None
