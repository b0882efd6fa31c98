"""Every documented error path: bad input gets a named exception that names the stage."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from reference import autograd_gradient_hessian
from torch import nn

import hessinv
from hessinv import (
    DtypeMismatchError,
    InvalidArgumentError,
    NonFiniteError,
    NotAChainError,
    ShapeMismatchError,
    SingularError,
    UnsupportedStageError,
)


def small(dtype=torch.float64):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)
    return net, torch.randn(5, 3, dtype=dtype), torch.randint(0, 2, (5,))


def test_errors_are_hessinv_errors_and_builtins():
    assert issubclass(ShapeMismatchError, ValueError)
    assert issubclass(DtypeMismatchError, TypeError)
    assert issubclass(NonFiniteError, FloatingPointError)
    assert issubclass(SingularError, RuntimeError)
    for e in (ShapeMismatchError, DtypeMismatchError, NonFiniteError, SingularError, UnsupportedStageError):
        assert issubclass(e, hessinv.HessinvError)


def test_every_error_of_the_errors_module_is_exported_at_the_top():
    """``hessinv.X`` for every class ``hessinv.errors`` lists (two that are raised were missing)."""
    import hessinv.errors as errors

    for name in errors.__all__:
        assert getattr(hessinv, name) is getattr(errors, name) and name in hessinv.__all__
        if name != "AccuracyWarning":
            assert issubclass(getattr(errors, name), hessinv.HessinvError)


def test_use_before_fit_is_a_named_error():
    """Influence, Laplace and the preconditioner used before fit/update: NotFittedError (a RuntimeError,
    as before), not a plain RuntimeError."""
    net, X, y = small()
    loss_fn = nn.CrossEntropyLoss()
    with pytest.raises(hessinv.NotFittedError, match="fit"):
        hessinv.influence.InfluenceFunction(net, loss_fn).inverse_hvp(torch.zeros(1, 26, dtype=torch.float64))
    with pytest.raises(hessinv.NotFittedError, match="fit"):
        hessinv.laplace.Laplace(net, "classification").log_marginal_likelihood()
    with pytest.raises(hessinv.NotFittedError, match="update"):
        hessinv.optim.Preconditioner(net, loss_fn).solve(torch.zeros(26, dtype=torch.float64))
    assert issubclass(hessinv.NotFittedError, RuntimeError)


@pytest.mark.parametrize("reduction, ce_reduction", [("batchmean", "mean"), ("sum", "sum")])
def test_distillation_kl_after_log_softmax_has_the_cross_entropy_gauss_newton_matrix(reduction, ce_reduction):
    """Knowledge distillation, KLDivLoss(log_softmax(student), teacher probabilities): linear in the
    log-probabilities, so its Gauss-Newton split there was zero. Split at the logits: cross-entropy with
    the teacher's probabilities (the divergence plus their entropy, a constant): same G, gradient; the
    operator's loss is the divergence's."""
    net, X, _ = small()
    q = torch.softmax(torch.randn(5, 2, dtype=torch.float64), 1)
    kl = nn.KLDivLoss(reduction=reduction)
    with_log = nn.Sequential(*net, nn.LogSoftmax(dim=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        G = hessinv.gauss_newton(with_log, kl, X, q)
    G_ce = hessinv.gauss_newton(net, nn.CrossEntropyLoss(reduction=ce_reduction), X, q)
    assert bool(G.to_dense().any())
    assert torch.allclose(G.to_dense(), G_ce.to_dense(), rtol=1e-12, atol=1e-14)
    assert torch.allclose(G.gradient, G_ce.gradient, rtol=1e-12, atol=1e-14)
    with torch.no_grad():
        assert torch.allclose(G.loss, kl(with_log(X), q), rtol=1e-12)


def test_a_gauss_newton_matrix_that_is_zero_says_why():
    """L1Loss is linear in the outputs away from its kinks: its Gauss-Newton matrix is zero (the
    optimizer's curvature vanished silently: Adam-like steps). A warning names it; cross-entropy and the
    Hessian (exact either way) get none."""
    net, X, _ = small()
    t = torch.randn(5, 2, dtype=torch.float64)
    with pytest.warns(UserWarning, match="Gauss-Newton matrix is zero on it"):
        G = hessinv.gauss_newton(net, nn.L1Loss(), X, t)
    assert not bool(G.to_dense().any())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hessinv.gauss_newton(net, nn.CrossEntropyLoss(), X, torch.tensor([0, 1, 1, 0, 1]))
        hessinv.hessian(net, nn.L1Loss(), X, t)


@pytest.mark.parametrize(
    "nll,ce",
    [
        (nn.NLLLoss(), nn.CrossEntropyLoss()),
        (torch.nn.functional.nll_loss, nn.CrossEntropyLoss()),
        (
            nn.NLLLoss(weight=torch.tensor([0.3, 2.0], dtype=torch.float64), ignore_index=1, reduction="sum"),
            nn.CrossEntropyLoss(weight=torch.tensor([0.3, 2.0], dtype=torch.float64), ignore_index=1,
                                reduction="sum"),
        ),
    ],
)  # fmt: skip
def test_nll_after_log_softmax_has_the_cross_entropy_gauss_newton_matrix(nll, ce):
    """NLLLoss is linear in the log-probabilities, so the Gauss-Newton split there is zero (the canonical
    MNIST example's model: Adam-like steps for the optimizer). The split moves to the logits: the
    generalized Gauss-Newton of cross-entropy, exactly; the Hessian is unchanged (the same function)."""
    net, X, _ = small()
    y = torch.tensor([0, 1, 1, 0, 1])
    with_log = nn.Sequential(*net, nn.LogSoftmax(dim=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        G = hessinv.gauss_newton(with_log, nll, X, y)
    G_ce = hessinv.gauss_newton(net, ce, X, y)
    assert bool(G.to_dense().any())
    assert torch.allclose(G.to_dense(), G_ce.to_dense(), rtol=1e-12, atol=1e-14)
    assert torch.allclose(G.gradient, G_ce.gradient, rtol=1e-12, atol=1e-14)
    assert torch.allclose(G.loss, G_ce.loss, rtol=1e-12)
    H, H_ce = hessinv.hessian(with_log, nll, X, y), hessinv.hessian(net, ce, X, y)
    assert torch.allclose(H.to_dense(), H_ce.to_dense(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mixer", [nn.BatchNorm1d(4), nn.Dropout(0.5)])
def test_training_mode_mixers_rejected_with_stage_name(mixer):
    net = nn.Sequential(nn.Linear(3, 4), mixer, nn.Tanh(), nn.Linear(4, 2)).double()
    with pytest.raises(UnsupportedStageError, match=rf"stage 1 \({type(mixer).__name__}\).*training mode"):
        hessinv.hessian(
            net, nn.CrossEntropyLoss(), torch.randn(5, 3, dtype=torch.float64), torch.zeros(5).long()
        )


@pytest.mark.parametrize("conv", ["1d", "2d", "after a Linear"])
def test_convolution_without_a_batch_axis_is_named(conv):
    """A Conv1d given (B, L) inputs is torch's unbatched call: one example whose B channels are the batch,
    so the convolution adds examples together. The refusal names that and the fix (a channel axis), not
    only "mixes examples" with advice about nn.Sequential (an architecture probe)."""
    B, C = 4, 3
    g = torch.Generator().manual_seed(0)
    if conv == "2d":
        net, X = nn.Sequential(nn.Conv2d(B, B, 3), nn.Tanh(), nn.Flatten(), nn.Linear(9, C)), (B, 5, 5)
    else:
        first = [nn.Linear(7, 7), nn.Tanh()] if conv == "after a Linear" else []
        net, X = nn.Sequential(*first, nn.Conv1d(B, B, 3), nn.Tanh(), nn.Linear(5, C)), (B, 7)
    net = net.double()
    x, y = torch.randn(*X, generator=g, dtype=torch.float64), torch.arange(B) % C
    with pytest.raises(UnsupportedStageError, match=r"(?s)mixes examples.*ONE example.*x\.unsqueeze\(1\)"):
        hessinv.hessian(net, nn.CrossEntropyLoss(), x, y)

    # a module called whole that adds the channel axis itself and mixes examples otherwise: its first
    # convolution's in_channels equal to the batch size is no evidence (a review: it was blamed)
    class _Own(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.o = nn.Conv1d(1, B, 3), nn.Conv1d(B, 2, 3), nn.Linear(6, C)

        def forward(self, x):
            h = self.c2(torch.tanh(self.c1(x.unsqueeze(1))))
            return self.o((h - h.mean(0)).flatten(1))

    with pytest.raises(UnsupportedStageError, match="mixes examples") as err:
        hessinv.hessian(nn.Sequential(_Own().double()), nn.CrossEntropyLoss(), torch.randn(B, 7).double(), y)
    assert "ONE example" not in str(err.value)

    # a convolution inside a module's own forward, given the unbatched input: found by running the module
    class _Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.s = nn.Conv1d(B, B, 3), nn.Parameter(torch.ones(1))

        def forward(self, x):
            return torch.tanh(self.c(x)) * self.s  # (one stage: the conv and a parameter after it)

    if conv != "2d":
        with pytest.raises(UnsupportedStageError, match=r"its Conv1d is given inputs of shape \(4, 7\)"):
            hessinv.hessian(nn.Sequential(_Block(), nn.Linear(5, C)).double(), nn.CrossEntropyLoss(), x, y)
    # the same layer given a batch axis: accepted
    net2 = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(10, C)).double()
    assert hessinv.hessian(net2, nn.CrossEntropyLoss(), torch.randn(B, 1, 7, dtype=torch.float64), y).shape


class BatchMean(nn.Module):
    def forward(self, z):
        return z - z.mean(0, keepdim=True)


class _Center(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.o(h - h.mean(0, keepdim=True))


def test_mixing_model_called_whole_is_not_told_to_call_it_whole():
    """An architecture probe: a model that really mixes examples, already wrapped as nn.Sequential(model)
    (called whole on trial, mixing there too), was told to "pass nn.Sequential(model) to call the model
    whole"; the advice now says its examples interact. The model unwrapped is called whole on trial too
    (as nn.Sequential(model) would be), and told the same."""
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.arange(5) % 3
    net = _Center().double()
    with pytest.raises(UnsupportedStageError, match="called whole, _Center mixes them too") as bare:
        hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    assert "nn.Sequential(model)" not in str(bare.value)
    with pytest.raises(UnsupportedStageError, match="called whole, _Center mixes them too") as wrapped:
        hessinv.hessian(nn.Sequential(net), nn.CrossEntropyLoss(), X, y)
    assert "nn.Sequential(model)" not in str(wrapped.value)

    class _CenteredFirst(nn.Module):  # (mixing before the first parameter: the prefix refusal's wording)
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 3)

        def forward(self, x):
            return self.a(x - x.mean(0))

    with pytest.raises(UnsupportedStageError, match="mixes them too") as prefix:
        hessinv.hessian(nn.Sequential(_CenteredFirst().double()), nn.CrossEntropyLoss(), X, y)
    assert "nn.Sequential(model)" not in str(prefix.value)


def test_custom_stage_that_mixes_examples_is_detected():
    net = nn.Sequential(nn.Linear(3, 4), BatchMean(), nn.Linear(4, 2)).double()
    with pytest.raises(UnsupportedStageError, match=r"stage 1 \(BatchMean: mean\+sub\) mixes examples"):
        hessinv.hessian(
            net, nn.CrossEntropyLoss(), torch.randn(5, 3, dtype=torch.float64), torch.zeros(5).long()
        )


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x, mask):
        return self.lin(x) * mask


class TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        y = self.lin(x)
        return y, y.tanh()


def test_not_a_chain():
    X, Y = torch.randn(4, 3), torch.randn(4, 2)
    with pytest.raises(NotAChainError, match=r"TwoInputs.forward takes 2 inputs \(x, mask\)"):
        hessinv.hessian(TwoInputs(), nn.MSELoss(), X, Y)
    with pytest.raises(NotAChainError, match="TwoOutputs.forward returns a tuple"):
        hessinv.hessian(TwoOutputs(), nn.MSELoss(), X, Y)

    class Nothing(nn.Module):  # (named as written: "returns a NoneType" before)
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            self.lin(x)

    with pytest.raises(NotAChainError, match="Nothing.forward returns None, not one tensor"):
        hessinv.hessian(Nothing(), nn.MSELoss(), X, Y)
    lin = nn.Linear(3, 3)
    with pytest.raises(NotAChainError, match="shared"):  # (a list of modules has no forward to call whole)
        hessinv.Chain([lin, nn.Tanh(), lin], nn.MSELoss())
    with pytest.warns(UserWarning, match="shared.*called whole"):
        assert len(hessinv.Chain(nn.Sequential(lin, nn.Tanh(), lin), nn.MSELoss()).stages) == 1
    with pytest.raises(NotAChainError, match="no trainable"):
        hessinv.Chain(nn.Sequential(nn.Tanh()), nn.MSELoss())
    # a plain function: the named error (it was a raw TypeError from iterating over it)
    with pytest.raises(NotAChainError, match="got function: wrap"):
        hessinv.hessian(lambda x: torch.tanh(lin(x)), nn.MSELoss(), X, X)


def test_a_complex_model_is_refused_as_complex():
    """It was told that half precision cannot hold the curvature and to call model.double() (which drops
    the imaginary part)."""
    m = nn.Sequential(nn.Linear(4, 3)).to(torch.complex128)
    X = torch.randn(5, 4, dtype=torch.complex128)
    with pytest.raises(DtypeMismatchError, match="real float32 or float64 parameters"):
        hessinv.hessian(m, lambda o, t: (o.abs() ** 2).mean(), X, torch.zeros(5))


def test_batch_shape_and_dtype_mismatches():
    net, X, y = small()
    loss = nn.CrossEntropyLoss()
    with pytest.raises(ShapeMismatchError, match="batch sizes differ"):
        hessinv.hessian(net, loss, X, y[:4])
    with pytest.raises(DtypeMismatchError, match="float32"):
        hessinv.hessian(net, loss, X.float(), y)
    with pytest.raises(ShapeMismatchError, match=r"stage 0 \(Linear\+Tanh\)"):
        hessinv.hessian(net, loss, torch.randn(5, 7, dtype=torch.float64), y)
    with pytest.raises(ShapeMismatchError, match="out of range"):
        hessinv.hessian(net, loss, X, y + 5)
    with pytest.raises(ShapeMismatchError, match=r"class indices must be integers \(targets.long\(\)\)"):
        hessinv.hessian(net, loss, X, y.double())
    with pytest.raises(ShapeMismatchError, match=r"targets.squeeze\(1\)"):
        hessinv.hessian(net, loss, X, y[:, None])
    n_classes = net(X).shape[1]
    with pytest.raises(ShapeMismatchError, match=r"one-hot targets: pass targets.argmax\(1\)"):
        hessinv.hessian(net, loss, X, nn.functional.one_hot(y, n_classes))
    with pytest.raises(ShapeMismatchError, match="targets"):
        hessinv.hessian(net, nn.MSELoss(), X, torch.randn(5, 3, dtype=torch.float64))
    H = hessinv.hessian(net, loss, X, y)
    with pytest.raises(ShapeMismatchError, match=r"shape \(26,\)"):
        H @ torch.ones(25, dtype=torch.float64)
    with pytest.raises(DtypeMismatchError):
        H @ torch.ones(26, dtype=torch.float32)
    with pytest.raises(ShapeMismatchError):
        H.solve(torch.ones(3, 26, dtype=torch.float64), damping=1.0)


def test_non_finite_values():
    net, X, y = small()
    loss = nn.CrossEntropyLoss()
    Xn = X.clone()
    Xn[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="inputs"):
        hessinv.hessian(net, loss, Xn, y)
    with pytest.raises(NonFiniteError, match="targets"):
        hessinv.hessian(net, nn.MSELoss(), X, torch.full((5, 2), float("inf"), dtype=torch.float64))
    H = hessinv.hessian(net, loss, X, y)
    with pytest.raises(NonFiniteError):
        H @ torch.full((26,), float("nan"), dtype=torch.float64)
    with pytest.raises(NonFiniteError, match="damping"):
        H.factor(float("nan"))
    with torch.no_grad():
        net[2].weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"stage 1 \(Linear\)"):
        hessinv.hessian(net, loss, X, y)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [(0, 0), (3, 1), (5, 5)])
def test_non_finite_pivot_is_an_error(bad, where):
    """A non-finite entry of a Riccati pivot (diagonal or off it, placed symmetrically) is named."""
    from hessinv.riccati import Pivot

    A = torch.randn(6, 6, dtype=torch.float64)
    Q = A @ A.T + 6 * torch.eye(6, dtype=torch.float64)
    i, j = where
    Q[i, j] = Q[j, i] = bad
    with pytest.raises(NonFiniteError, match="stage 2"):
        Pivot(Q, 2, "stage 2", 0.0)


def test_non_finite_loss():
    net = nn.Sequential(nn.Linear(2, 2)).double()
    with torch.no_grad():
        net[0].weight.fill_(1e308)
    with pytest.raises(NonFiniteError):
        hessinv.hessian(
            net, nn.MSELoss(), torch.full((2, 2), 1e10, dtype=torch.float64), torch.zeros(2, 2).double()
        )


def test_unsupported_losses():
    net, X, y = small()
    with pytest.raises(UnsupportedStageError, match="reduction='mean' or 'sum'"):
        hessinv.hessian(net, nn.CrossEntropyLoss(reduction="none"), X, y)
    with pytest.raises(UnsupportedStageError, match=r"stage 2 \(<lambda>\) mixes examples"):
        hessinv.hessian(net, lambda out, t: out.sum(0).square().sum(), X, y)
    with pytest.raises(
        UnsupportedStageError, match=r"CosineEmbeddingLoss.*loss_fn\(outputs, targets\) failed"
    ):
        hessinv.hessian(net, nn.CosineEmbeddingLoss(), X, y)
    with pytest.raises(UnsupportedStageError, match="GaussianNLLLoss needs a variance"):
        hessinv.hessian(net, nn.GaussianNLLLoss(), X, torch.randn(5, 2, dtype=torch.float64))


@pytest.mark.parametrize("make", [hessinv.hessian, hessinv.gauss_newton])
def test_nll_loss_targets_and_empty_batches_are_named(make):
    """A losses probe: NLLLoss after a LogSoftmax with probability targets (torch's NLLLoss takes class
    indices only) raised torch's RuntimeError from the split at the logits; an all-ignored per-position
    batch and a batch whose every target has class weight 0 (mean losses of 0/0) got a bare "the loss is
    nan"; NLLLoss's refusals named the CrossEntropyLoss the split stands in for."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(5, 3, generator=g, dtype=torch.float64)
    logsoftmax = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3), nn.LogSoftmax(1)).double()
    probs = torch.softmax(torch.randn(5, 3, generator=g, dtype=torch.float64), 1)
    with pytest.raises(UnsupportedStageError, match=r"stage 3 \(NLLLoss\).*failed"):
        make(logsoftmax, nn.NLLLoss(), X, probs)
    with pytest.raises(InvalidArgumentError, match=r"stage 3 \(NLLLoss\): every target equals ignore_index"):
        make(logsoftmax, nn.NLLLoss(), X, torch.full((5,), -100))
    per_position = nn.Sequential(nn.Linear(3, 12), nn.Unflatten(1, (3, 4))).double()
    with pytest.raises(InvalidArgumentError, match="ignore_index=-100.*at least one target"):
        make(per_position, nn.CrossEntropyLoss(), X, torch.full((5, 4), -100))
    w = torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)
    with pytest.raises(InvalidArgumentError, match="class weight 0.*at least one target"):
        make(nn.Linear(3, 3).double(), nn.CrossEntropyLoss(weight=w), X, torch.zeros(5, dtype=torch.long))


def test_singular_damping_raises_with_stage():
    # a purely linear chain with MSE: H = X^T X (x) I is PSD and rank-deficient when features > batch
    net = nn.Sequential(nn.Linear(6, 2, bias=False)).double()
    X, y = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    H = hessinv.hessian(net, nn.MSELoss(), X, y)
    with pytest.raises(SingularError, match=r"stage 0 \(Linear\).*damping 0") as err:
        H.factor(0.0)
    assert err.value.stage == 0 and err.value.damping == 0.0
    assert H.inertia(0.0).zero == 12 - 6  # rank 3 per output x 2 outputs
    assert not H.is_positive_definite(0.0)


def test_accuracy_warning_when_refinement_cannot_reach_accuracy(monkeypatch):
    """An inaccurate sweep (simulated: it returns half the solution) is caught by the independent
    float64 residual; refinement halves the error per step, and after ``max_refine`` steps GMRES
    preconditioned by the sweep takes over (it used to run only after a stall or with perturbed
    pivots: the probe's LayerNorm chain was left at 7e-5 where GMRES reaches 2e-8). Where neither GMRES nor
    the small systems' dense fallback can help (simulated), the remaining residual is reported and warned
    about."""
    import hessinv.curvature as hc

    net, X, y = small()
    H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    F = H.factor(1.0)
    exact = F._raw
    monkeypatch.setattr(F, "_raw", lambda R: 0.5 * exact(R))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, info = F.solve(H.gradient, max_refine=5, return_info=True)
    assert info.refinement_steps == 5 and info.krylov_iterations > 0 and info.residual < 1e-13
    monkeypatch.setattr(hc, "fgmres", lambda apply, prec, b, x0, *a, **k: (x0, 1))  # GMRES gets nowhere
    monkeypatch.setattr(hc, "DENSE_FALLBACK_N", 0)  # and no dense LU to fall back on
    with pytest.warns(hessinv.AccuracyWarning, match="relative residual"):
        x, info = F.solve(H.gradient, max_refine=5, return_info=True)
    assert info.refinement_steps == 5
    assert info.residual == pytest.approx(0.5**6, rel=1e-6)
    assert (H @ x + x - H.gradient).norm() / H.gradient.norm() == pytest.approx(0.5**6, rel=1e-6)


def test_bad_arguments_are_named():
    """The bad-input list of issue 12: each a named error that says what is wrong."""
    import numpy as np

    from hessinv import InvalidArgumentError

    net, X, y = small()
    loss = nn.CrossEntropyLoss()
    with pytest.raises(InvalidArgumentError, match=r"inputs must be a torch.Tensor, got numpy.ndarray"):
        hessinv.hessian(net, loss, X.numpy(), y)
    with pytest.raises(InvalidArgumentError, match=r"targets must be a torch.Tensor"):
        hessinv.hessian(net, loss, X, y.numpy())
    H = hessinv.hessian(net, loss, X, y)
    with pytest.raises(InvalidArgumentError, match="damping must be a real number, got str"):
        H.factor("1e-3")
    with pytest.raises(InvalidArgumentError, match="damping must be a real number"):
        H.solve(H.gradient, damping=None)
    # (a vector: named by its shape, with where a per-parameter damping is taken -- it was printed whole)
    vector = r"got a Tensor of shape \(26,\): a damping per parameter .*hessinv.gauss_newton"
    with pytest.raises(InvalidArgumentError, match=vector):
        H.factor(torch.ones(26, dtype=H.dtype))
    with pytest.raises(InvalidArgumentError, match=r"damping 1.7e\+308 is too large for torch.float64"):
        H.solve(H.gradient, damping=1.7e308)
    with pytest.raises(InvalidArgumentError, match=r"rhs has shape \(26, 0\): no columns"):
        H.solve(torch.empty(26, 0, dtype=torch.float64), damping=1.0)
    with pytest.raises(InvalidArgumentError, match=r"vector must be a torch.Tensor, got numpy.ndarray"):
        H @ np.ones(26)
    with pytest.raises(NonFiniteError, match="shift must be finite, got nan"):
        H.inertia(float("nan"))
    with pytest.raises(NonFiniteError, match="shift must be finite"):
        H.is_positive_definite(float("inf"))
    with pytest.raises(InvalidArgumentError, match="loss_fn must be callable"):
        hessinv.hessian(net, "cross_entropy", X, y)
    # a probe's list (each was a raw TypeError/RuntimeError/IndexError, or accepted: max_refine=-1, nan)
    F = H.factor(1.0)
    for v in (torch.ones(28, dtype=torch.float64), torch.ones(26, 3, dtype=torch.float64)):
        with pytest.raises(ShapeMismatchError, match=r"v must have shape \(26,\), one vector; got"):
            F.inverse_quadratic(v)  # (it offered (26, k), then refused it)
    for k in (-1, 0, 2.5, "3", None):
        with pytest.raises(InvalidArgumentError, match="k .the number of samples. must be an integer >= 1"):
            F.sample(k)
    for mr in (None, -1, 2.5, float("nan")):
        with pytest.raises(InvalidArgumentError, match="max_refine must be an integer >= 0"):
            F.solve(H.gradient, max_refine=mr)
    with pytest.raises(InvalidArgumentError, match=r"bins must be in \[1, 10000\]"):
        hessinv.spectrum.spectral_histogram(H, bins=100_000_000)  # (it ran a factorization per edge)
    for rng in ("ab", (1,)):
        with pytest.raises(InvalidArgumentError, match="range must be a pair"):
            hessinv.spectrum.spectral_histogram(H, bins=4, range=rng)
    G = hessinv.gauss_newton(net, loss, X, y)
    for d in ("x", None):
        with pytest.raises(InvalidArgumentError, match="damping must be a real number"):
            G.factor(d, method="woodbury")
    g = H.gradient.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's warning on float() of a tensor that requires grad
        # (no warning; differentiable in the right-hand side since 2026-12-07 -- it was detached silently)
        assert F.solve(g).requires_grad
    # accepted spellings of a real damping: Python, numpy and 0-d tensor scalars
    x = H.solve(H.gradient, damping=1.0)
    for eps in (np.float64(1.0), torch.tensor(1.0), 1):
        assert torch.allclose(H.solve(H.gradient, damping=eps), x)
    # the errors keep their old builtin bases
    assert issubclass(InvalidArgumentError, ValueError) and issubclass(InvalidArgumentError, TypeError)


def test_too_large_generic_stage_says_which_curvature_batch_fits(monkeypatch):
    """A convolution on 28 x 28 images: its dense per-example blocks (and the Riccati sweep's Schur
    complements) would not fit. Products, the root and -- at 4.8k parameters -- the factorization (the
    dense route: G from its root) need none of them; with a wider head (9.5k parameters) the dense
    route still answers method="riccati" (up to DENSE_ROUTE_MAX_N, where it fits), and beyond it the
    sweep is refused, naming the curvature batch that fits; method="auto" answers through G's root."""

    def model(classes: int) -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Flatten(),
            torch.nn.Linear(8 * 14 * 14, classes),
        )

    m = model(3)
    X, y = torch.randn(64, 1, 28, 28), torch.randint(0, 3, (64,))
    G = hessinv.gauss_newton(m, torch.nn.CrossEntropyLoss(), X, y)  # gradient and root need no dense blocks
    U, S = G.root()
    assert U.shape == (64 * 2, G.shape[0])  # softmax cross-entropy: rank C - 1 per example
    v = torch.randn(G.shape[0])  # products by autograd at the linearization point: no dense blocks
    Gv = U.T @ (S * (U @ v))
    assert float((G @ v - Gv).abs().max()) <= 1e-4 * float(Gv.abs().max())
    A = U.double().T @ (S.double()[:, None] * U.double()) + torch.eye(G.shape[0], dtype=torch.float64)
    b = torch.randn(G.shape[0])
    x = G.factor(damping=1.0).solve(b)
    assert float((A @ x.double() - b.double()).norm()) <= 1e-5 * float(b.norm())
    wide = model(6)
    y5 = torch.randint(0, 6, (64,))
    G5 = hessinv.gauss_newton(wide, torch.nn.CrossEntropyLoss(), X, y5)
    b5 = torch.randn(G5.shape[0])
    U5, S5 = G5.root()
    x5 = G5.factor(damping=1.0, method="riccati").solve(b5)  # the dense route: G5 from its root
    assert len(G5._swept().blocks) == 1
    assert float((U5.T @ (S5 * (U5 @ x5)) + x5 - b5).norm()) <= 1e-5 * float(b5.norm())
    monkeypatch.setattr(hessinv.curvature, "DENSE_ROUTE_MAX_N", 8192)
    G5 = hessinv.gauss_newton(wide, torch.nn.CrossEntropyLoss(), X, y5)
    with pytest.raises(
        (hessinv.UnsupportedStageError, hessinv.TooLargeError), match=r"curvature_batch_size=\d+"
    ):
        G5.factor(damping=1.0, method="riccati")
    # method="auto" answers through G's square root (64 x 5 rows, fewer than the 9.5k parameters)
    F5 = G5.factor(damping=1.0)
    assert isinstance(F5, hessinv.curvature.WoodburyFactorization)
    x5 = F5.solve(b5)
    assert float((U5.T @ (S5 * (U5 @ x5)) + x5 - b5).norm()) <= 1e-5 * float(b5.norm())
    # the default optimizer only needs the root of its curvature batch, so it steps on this model as it is
    # (three different mini-batches; the same batch at the first two steps would switch to the full-batch
    # trust region, which needs the dense blocks)
    opt = hessinv.optim.Newton(m, torch.nn.CrossEntropyLoss(), seed=0)
    before = [p.detach().clone() for p in m.parameters()]
    losses = [float(opt.step(X[i::3], y[i::3])) for i in range(3)]
    assert all(math.isfinite(v) for v in losses)
    assert all(not torch.equal(a, p) for a, p in zip(before, m.parameters(), strict=True))


def test_a_sweep_too_large_for_memory_is_named_before_it_allocates(monkeypatch):
    """A 192000 x 192000 Schur complement (64 examples x 3000 activations) is refused before the sweep
    allocates it, naming the batch that fits (on a device of 16 GiB, whatever this machine has), where
    the sweep is asked for (method="riccati"); method="auto" answers through G's square root instead (its
    64 x 2 rows are fewer than the parameters)."""
    import hessinv.riccati

    monkeypatch.setattr(hessinv.riccati, "_memory_bytes", lambda device: 16 * 2**30)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(30, 3000), nn.Tanh(), nn.Linear(3000, 3))
    X, y = torch.randn(64, 30), torch.randint(0, 3, (64,))
    G = hessinv.gauss_newton(m, nn.CrossEntropyLoss(), X, y)
    with pytest.raises(hessinv.TooLargeError, match=r"a = 64 examples x 3000 activations = 192000.*") as err:
        G.factor(damping=1.0, method="riccati")
    assert isinstance(G.factor(damping=1.0), hessinv.curvature.WoodburyFactorization)
    fits = int(re.search(r"curvature_batch_size=(\d+)", str(err.value)).group(1))
    assert 1 <= fits < 64
    assert isinstance(err.value, MemoryError)
    small = hessinv.gauss_newton(m, nn.CrossEntropyLoss(), X[:fits], y[:fits])  # what it names fits
    assert hessinv.riccati.check_memory(small.blocks, small._names, torch.float32, X.device) is None


def test_a_leading_parameter_free_stage_costs_nothing_in_the_sweep(monkeypatch):
    """nn.Flatten() before the first Linear: the sweep treated the Linear as coupled to its input (a p x
    (B 784) block and a (B 784)^2 one, for nothing: no parameter before it), 6x the time and memory and
    false refusals. The sweep now ends at the first stage with parameters: same memory need, same
    solution as without the Flatten. The need also counts the factors kept across the depth (a suggested
    batch ran out of memory)."""
    import hessinv.riccati as ric

    torch.manual_seed(0)
    body = [nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)]
    flat_first = nn.Sequential(nn.Flatten(), *body).double()
    plain = nn.Sequential(*body).double()
    X, y = torch.randn(16, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (16,))
    G1 = hessinv.gauss_newton(flat_first, nn.CrossEntropyLoss(), X, y)
    G2 = hessinv.gauss_newton(plain, nn.CrossEntropyLoss(), X.reshape(16, 64), y)
    x1, x2 = G1.factor(1e-3).solve(G1.gradient), G2.factor(1e-3).solve(G2.gradient)
    assert torch.allclose(x1, x2, rtol=1e-12, atol=1e-15)
    monkeypatch.setattr(ric, "_capacity_bytes", lambda device: 2**20)
    monkeypatch.setattr(ric, "_memory_bytes", lambda device: 2**20)
    fits = []
    for G in (G1, G2):
        with pytest.raises(hessinv.TooLargeError) as err:
            ric.check_memory(G.blocks, G._names, torch.float64, X.device)
        fits.append(re.search(r"at most (\d+) examples", str(err.value)).group(1))
    assert fits[0] == fits[1]


def test_an_output_curvature_too_large_is_named():
    """Per-example loss curvature C x C with C = 6000 outputs on 64 examples: refused before it is formed,
    naming the curvature batch that fits -- where it must be formed (the exact root, the Riccati sweep, a
    loss by autograd). The cross-entropy keeps it as products: the gradient, products with it and a
    budgeted root need no C x C matrix, and the default optimizer steps."""
    torch.manual_seed(0)
    m = nn.Linear(3, 6000)
    X, y = torch.randn(64, 3), torch.randint(0, 6000, (64,))
    G = hessinv.gauss_newton(m, nn.CrossEntropyLoss(), X, y)
    U, S = G.root(max_rows=128)
    assert U.shape[0] <= 128
    too_large = r"one 6000 x 6000 matrix per example.*curvature_batch_size=7"
    with pytest.raises(hessinv.TooLargeError, match=too_large):
        G.root()
    with pytest.raises(hessinv.TooLargeError, match=too_large):
        hessinv.gauss_newton(m, lambda o, t: nn.functional.cross_entropy(o, t), X, y)  # autograd: formed
    opt = hessinv.optim.Newton(m, nn.CrossEntropyLoss(), seed=0)
    w0 = m.weight.detach().clone()
    for i in range(3):
        assert math.isfinite(float(opt.step(X[i::3], y[i::3])))
    assert not torch.equal(w0, m.weight)


def test_the_memory_check_counts_the_sweeps_peak_against_the_memory_still_available(monkeypatch):
    """The check compares PEAK_FACTOR x the largest stage's numbers with what the process can still
    allocate (MemAvailable, cgroup and ulimit headroom), not with the machine's total: a 256-example
    tanh MLP in float64 peaks at about 1.5 GB (measured: 2.1x the largest stage's 0.7 GB)."""
    import hessinv.riccati as ric

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    X, y = torch.randn(256, 64, dtype=torch.float64), torch.randint(0, 10, (256,))
    H = hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    entries = max(ric._sweep_entries(b, 256, i == 0) for i, b in enumerate(H.blocks[:-1]))
    peak = ric.PEAK_FACTOR * entries * 8
    assert 0 < ric._memory_bytes(X.device) <= ric._capacity_bytes(X.device)
    monkeypatch.setattr(ric, "_capacity_bytes", lambda device: 16 * 2**30)  # the sweep not small beside it
    monkeypatch.setattr(ric, "_cpu_available", lambda: int(0.9 * peak))
    import hessinv.curvature as hc

    # n = 2410: the dense route (H as one 2410 x 2410 block) takes over where the sweep would not fit
    assert len(H._swept().blocks) == 1
    H.factor(1e-3)
    H = hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    monkeypatch.setattr(hc, "DENSE_ROUTE_MAX_N", 1000)  # no dense route: the refusal
    with pytest.raises(hessinv.TooLargeError, match=r"GiB of the device's memory is available.*"
                       r"curvature_batch_size=2\d\d\b"):  # fmt: skip
        H.factor(1e-3)
    H = hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    monkeypatch.setattr(ric, "_cpu_available", lambda: int(1.1 * peak))
    H.factor(1e-3)
    assert H._swept() is H


def test_a_loss_weight_in_another_dtype_is_named_with_the_conversion():
    m = nn.Sequential(nn.Linear(4, 3)).double()
    X, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    with pytest.raises(
        hessinv.DtypeMismatchError, match=r"weight is torch.float32.*loss_fn.to\(torch.float64\)"
    ):
        hessinv.hessian(m, nn.CrossEntropyLoss(weight=torch.ones(3)), X, y)


def test_the_memory_check_with_no_headroom_left_refuses(monkeypatch):
    """No memory left (a full cgroup, ulimit -v reached) is 0 bytes available, not 'unknown': the sweep is
    refused; a cgroup limit below the machine's memory lowers the size below which the check is skipped."""
    import hessinv.riccati as ric

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    X, y = torch.randn(64, 64, dtype=torch.float64), torch.randint(0, 10, (64,))
    H = hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    monkeypatch.setattr(ric, "_cpu_available", lambda: 0)
    H.factor(1e-3)  # 2.5 x 5.6 M numbers = 0.1 GiB: below 1/64 of the machine, not checked
    ric._capacity_bytes.cache_clear()
    monkeypatch.setattr(ric, "_cgroup_limit", lambda: (2**30, 0))  # a 1 GiB cgroup, full
    try:
        with pytest.raises(hessinv.TooLargeError, match="0 GiB of the device's memory is available"):
            H.factor(1e-3)
    finally:
        ric._capacity_bytes.cache_clear()


def test_a_list_holding_a_function_names_the_element():
    with pytest.raises(NotAChainError, match="got builtin_function_or_method"):
        hessinv.hessian([nn.Linear(3, 3), torch.tanh], nn.MSELoss(), torch.randn(4, 3), torch.randn(4, 3))


class _SquareNoGraph(torch.autograd.Function):
    """A mean squared error whose backward has no graph (a numpy-style backward)."""

    @staticmethod
    def forward(ctx, o, t):
        ctx.save_for_backward(o, t)
        return ((o - t) ** 2).mean()

    @staticmethod
    def backward(ctx, g):
        o, t = ctx.saved_tensors
        return (g * 2 * (o - t) / o.numel()).detach(), None


class _SquareConstGraph(_SquareNoGraph):
    """... whose backward's graph reaches a constant that requires grad, not the outputs."""

    @staticmethod
    def backward(ctx, g):
        o, t = ctx.saved_tensors
        one = torch.ones((), dtype=o.dtype, requires_grad=True)
        return g * one * 2 * (o - t).detach() / o.numel(), None


def test_losses_autograd_cannot_differentiate_twice_are_refused_not_zero():
    """A loss whose backward autograd cannot differentiate (a custom ``autograd.Function`` with a
    numpy-style backward) had its second derivative read as zero -- a silently wrong Hessian and a zero
    Gauss-Newton matrix (found by a probe); a loss linear in the outputs (constant gradient, no graph
    either) is still accepted, its curvature exactly zero."""

    SquareNoGraph = _SquareNoGraph
    net, X, _ = small()
    t = torch.randn(5, 2, dtype=torch.float64)
    with pytest.raises(UnsupportedStageError, match="cannot differentiate the loss's gradient"):
        hessinv.hessian(net, SquareNoGraph.apply, X, t)
    # on a few of the outputs only, or with one large residual among small ones (review of the check)
    with pytest.raises(UnsupportedStageError, match="cannot differentiate the loss's gradient"):
        hessinv.hessian(net, lambda o, t: SquareNoGraph.apply(o[:, :1], t[:, :1]), X, t)
    big = t.clone()
    big[0, 0] = 1e6
    with pytest.raises(UnsupportedStageError, match="cannot differentiate the loss's gradient"):
        hessinv.hessian(net, SquareNoGraph.apply, X, big)
    H = hessinv.hessian(net, lambda o, t: (o * t).sum(), X, t)  # linear in the outputs
    assert float(hessinv.gauss_newton(net, lambda o, t: (o * t).sum(), X, t).to_dense().abs().max()) == 0
    assert torch.isfinite(H.to_dense()).all()


def test_a_loss_whose_backward_graph_misses_the_outputs_in_part_is_refused():
    """A custom ``autograd.Function`` whose backward has a graph that does not reach the outputs (through a
    constant that requires grad), or a loss that adds such a term to a differentiable one (the graph
    reaches the outputs through the other term only): its second derivative was read as zero there, 53%
    off the Hessian and no error (as a ``torch.compile``-d function under a lambda: 47%; a probe)."""

    SquareConstGraph = _SquareConstGraph
    net, X, _ = small()
    t = torch.randn(5, 2, dtype=torch.float64)
    with pytest.raises(UnsupportedStageError, match="cannot differentiate the loss's gradient"):
        hessinv.hessian(net, SquareConstGraph.apply, X, t)
    with pytest.raises(UnsupportedStageError, match="cannot differentiate the loss's gradient"):
        hessinv.hessian(net, lambda o, t: SquareConstGraph.apply(o, t) + 1e-3 * o.pow(2).mean(), X, t)
    # (a loss autograd differentiates, with a kink crossed nowhere near: accepted, and right)
    f = lambda o, t: torch.nn.functional.huber_loss(o, t) + 0.1 * torch.cosh(o).mean()  # noqa: E731
    _, ref = autograd_gradient_hessian(net, f, X, t)
    assert torch.allclose(hessinv.hessian(net, f, X, t).to_dense(), ref, rtol=1e-10, atol=1e-12)


def test_losses_without_a_path_to_the_outputs_or_random_are_refused():
    """A loss of detached or thresholded outputs (torch's backward refuses it) came back with a zero
    gradient and Hessian; a loss with noise inside gave a different gradient at every build (found by
    a probe). Both are named."""
    net, X, y = small()
    t = torch.randn(5, 2, dtype=torch.float64)
    for fn in (lambda o, t: ((o.detach() - t) ** 2).mean(), lambda o, t: (o > t).double().mean()):
        with pytest.raises(UnsupportedStageError, match="does not depend on the outputs through autograd"):
            hessinv.hessian(net, fn, X, t)
    with pytest.raises(UnsupportedStageError, match="dropout or noise inside it"):
        hessinv.hessian(net, lambda o, t: ((torch.nn.functional.dropout(o, 0.5) - t) ** 2).mean(), X, t)


def test_a_compiled_loss_is_differentiated_through_its_original_function():
    """``torch.compile(loss)``: its compiled backward is not differentiable, so the Hessian came back
    without the loss's second derivative (relative error 1.0, no warning; found by a probe). The loss
    inside the wrapper is used, as for a compiled model."""
    from reference import autograd_gradient_hessian

    net, X, _ = small()
    t = torch.randn(5, 2, dtype=torch.float64)
    _, H_ref = autograd_gradient_hessian(net, nn.HuberLoss(), X, t)
    for compiled in (
        torch.compile(nn.HuberLoss(), backend="aot_eager"),
        torch.compile(lambda o, t: nn.functional.huber_loss(o, t), backend="aot_eager"),
    ):
        H = hessinv.hessian(net, compiled, X, t)
        torch.testing.assert_close(H.to_dense(), H_ref, rtol=1e-10, atol=1e-12)


def test_models_no_stage_can_read_are_named():
    """A TorchScript model, parameters created under inference_mode, a nested list of modules, an
    nn.ModuleDict and a loss class instead of an instance raised raw TypeError / RuntimeError /
    AttributeError or a misleading ShapeMismatchError (found by a model probe)."""
    net, X, y = small()
    with pytest.raises(UnsupportedStageError, match="TorchScript"):
        hessinv.hessian(torch.jit.script(net), nn.CrossEntropyLoss(), X, y)
    with pytest.raises(UnsupportedStageError, match="TorchScript"):
        hessinv.hessian(nn.Sequential(torch.jit.script(net[0]), net[1], net[2]), nn.CrossEntropyLoss(), X, y)
    with torch.inference_mode():
        frozen = nn.Sequential(nn.Linear(3, 2)).double()
    with pytest.raises(hessinv.InvalidArgumentError, match="inference_mode"):
        hessinv.hessian(frozen, nn.CrossEntropyLoss(), X, y)
    with pytest.raises(NotAChainError, match="nested list"):
        hessinv.hessian([[net[0], net[1]], net[2]], nn.CrossEntropyLoss(), X, y)
    with pytest.raises(NotAChainError, match="ModuleDict"):
        hessinv.hessian(nn.ModuleDict({"a": net[0], "b": net[2]}), nn.CrossEntropyLoss(), X, y)
    with pytest.raises(hessinv.InvalidArgumentError, match=r"pass an instance, CrossEntropyLoss\(\)"):
        hessinv.hessian(net, nn.CrossEntropyLoss, X, y)


def test_targets_that_require_grad_are_refused_and_loss_subclasses_handle_their_targets():
    """Targets computed by the model (self-distillation, not detached) were detached silently: the
    gradient differed from torch's of the same call by 67%. A loss subclass with its own target
    handling (one-hot inside forward) was refused as broadcasting, and a (B, 1) target against (B,)
    outputs got the hint ``targets.view(-1, )`` (found by a probe)."""
    net, X, y = small()
    with pytest.raises(hessinv.InvalidArgumentError, match="targets depend on the model's parameters"):
        hessinv.hessian(net, nn.MSELoss(), X, net(X + 1))
    with pytest.raises(hessinv.InvalidArgumentError, match="targets depend on the model's parameters"):
        hessinv.optim.Newton(net, nn.MSELoss()).step(X, net(X + 1))

    teacher = nn.Linear(3, 2).double()  # another model's graph: data
    hessinv.hessian(net, nn.MSELoss(), X, teacher(X))

    class OneHotMSE(nn.MSELoss):
        def forward(self, o, t):
            return super().forward(o, nn.functional.one_hot(t, o.shape[1]).to(o.dtype))

    H = hessinv.hessian(net, OneHotMSE(), X, y)
    assert float(H.loss) == pytest.approx(float(OneHotMSE()(net(X), y)), rel=1e-14)
    flat = nn.Sequential(nn.Linear(3, 1), nn.Flatten(0)).double()
    with pytest.raises(ShapeMismatchError, match=r"targets\.view\(-1\)$"):
        hessinv.hessian(flat, nn.MSELoss(), X, torch.randn(5, 1, dtype=torch.float64))


def test_losses_with_kinks_or_an_empty_batch_are_accepted():
    """Review of the checks above: a hinge (``clamp``), a quantile (pinball) loss and a loss of sorted
    outputs have gradients without a graph that are piecewise constant (second derivative 0 almost
    everywhere): accepted, their curvature from the loss exactly that of autograd; a loss that returns
    ``torch.tensor(0.)`` for a batch with nothing to learn is accepted with zero derivatives. A class-
    index subclass of CrossEntropyLoss still gets int64 targets; a subclass with torch's forward still
    has broadcasting refused; a ModuleDict subclass with its own forward is a model."""
    from reference import autograd_gradient_hessian

    net, X, y = small()
    t = torch.randn(5, 2, dtype=torch.float64)
    kinks = [
        lambda o, t: torch.clamp(1 - o * t, min=0).mean(),
        lambda o, t: torch.maximum(0.3 * (t - o), -0.7 * (t - o)).mean(),
        lambda o, t: (o.sort(1).values * t).sum(),
    ]
    for fn in kinks:
        _, H_ref = autograd_gradient_hessian(net, fn, X, t)
        torch.testing.assert_close(hessinv.hessian(net, fn, X, t).to_dense(), H_ref, rtol=1e-10, atol=1e-12)
        assert float(hessinv.gauss_newton(net, fn, X, t).to_dense().abs().max()) == 0.0

    def masked(o, t):
        keep = t > 10  # none: nothing to learn from this batch
        return ((o[keep] - t[keep]) ** 2).mean() if bool(keep.any()) else torch.tensor(0.0, dtype=o.dtype)

    assert float(hessinv.hessian(net, masked, X, t).to_dense().abs().max()) == 0.0

    class MyCE(nn.CrossEntropyLoss):
        pass

    H = hessinv.hessian(net, MyCE(), X, y.int())
    assert float(H.loss) == pytest.approx(float(nn.CrossEntropyLoss()(net(X), y)), rel=1e-14)

    class MyMSE(nn.MSELoss):
        pass

    flat = nn.Sequential(nn.Linear(3, 1)).double()
    with pytest.raises(ShapeMismatchError, match="broadcast"):
        hessinv.hessian(flat, MyMSE(), X, torch.randn(5, dtype=torch.float64))

    class Blocks(nn.ModuleDict):
        def forward(self, x):
            return self["b"](torch.tanh(self["a"](x)))

    model = Blocks({"a": nn.Linear(3, 4), "b": nn.Linear(4, 2)}).double()
    _, H_ref = autograd_gradient_hessian(model, nn.CrossEntropyLoss(), X, y)
    H = hessinv.hessian(model, nn.CrossEntropyLoss(), X, y)
    torch.testing.assert_close(H.to_dense(), H_ref, rtol=1e-10, atol=1e-12)


def test_non_finite_tolerances_and_shifts_are_non_finite_arguments():
    """The README: a NaN or infinite damping, shift or tolerance is a NonFiniteArgumentError; tolerances
    and spectrum shifts raised a plain InvalidArgumentError."""
    import hessinv.spectrum

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    X, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    H = hessinv.hessian(m, torch.nn.CrossEntropyLoss(), X, y)
    G = hessinv.gauss_newton(m, torch.nn.CrossEntropyLoss(), X, y)
    calls = [
        lambda: H.inertia(0.0, float("nan")),
        lambda: H.inertia(0.0, float("inf")),
        lambda: H.min_eigenvalue(float("inf")),
        lambda: H.eigenpairs(1, tol=float("nan")),
        lambda: hessinv.spectrum.eigenvalue_counts(H, [0.0, float("nan")]),
        lambda: G.factor(float("inf")),
    ]
    for call in calls:
        with pytest.raises(hessinv.NonFiniteArgumentError):
            call()


@pytest.mark.parametrize("loss", [nn.MSELoss(), nn.BCEWithLogitsLoss()])
def test_targets_of_the_wrong_shape_are_told_the_remedy(loss):
    m = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))
    X, y = torch.randn(16, 4), torch.rand(16)
    with pytest.raises(hessinv.ShapeMismatchError, match=re.escape("targets.unsqueeze(1)")):
        hessinv.hessian(m, loss, X, y)
    hessinv.hessian(m, loss, X, y.unsqueeze(1))


def test_dense_matrices_beyond_memory_are_named(monkeypatch):
    """``to_dense()`` and ``Laplace.posterior_covariance()`` allocated ``n x n`` with no check: a raw
    allocator RuntimeError at n = 35k under a 6 GiB limit (or 20 GB taken without one)."""
    import hessinv.laplace
    import hessinv.riccati

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    X, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    H = hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    dense = H.to_dense()
    la = hessinv.laplace.Laplace(m, nn.CrossEntropyLoss())
    la.fit(X, y)
    monkeypatch.setattr(hessinv.riccati, "_capacity_bytes", lambda device: 1000)
    monkeypatch.setattr(hessinv.riccati, "_memory_bytes", lambda device: 1000)
    with pytest.raises(hessinv.TooLargeError, match="to_dense"):
        H.to_dense()
    with pytest.raises(hessinv.TooLargeError, match="posterior_covariance"):
        la.posterior_covariance()
    monkeypatch.undo()
    assert torch.equal(H.to_dense(), dense)


def test_a_zero_gauss_newton_matrix_warns_once_per_optimizer():
    """The warning above, from an optimizer's curvature refreshes: once, not once per refresh (L1Loss
    is a generic loss stage, whose catch_warnings() reset Python's once-per-location registry: 20 copies
    in 200 steps, found by a review)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    X, T = torch.randn(200, 6), torch.randn(200, 3)
    opt = hessinv.optim.Newton(net, nn.L1Loss(), seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for k in range(0, 200, 8):  # 25 steps on new batches: 3 curvature refreshes
            opt.step(X[k : k + 8], T[k : k + 8])
    zero = [w for w in caught if "Gauss-Newton matrix is zero on it" in str(w.message)]
    assert opt.preconditioner is not None and opt.preconditioner.state["refreshes"] >= 3
    assert len(zero) == 1


def test_min_eigenvalue_and_inertia_refuse_before_their_products(monkeypatch):
    """A sweep that does not fit was refused only after min_eigenvalue's Lanczos (17-125 s on wide
    MLPs) or inertia's norm estimate (7 s) had run: now before any product."""
    import hessinv.riccati as ric

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    X, y = torch.randn(16, 8, dtype=torch.float64), torch.randint(0, 3, (16,))
    H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    H._swept()  # (the route, decided with the machine's memory)
    monkeypatch.setattr(ric, "_capacity_bytes", lambda device: 2**16)
    monkeypatch.setattr(ric, "_memory_bytes", lambda device: 2**16)
    calls = []
    apply = H._apply
    monkeypatch.setattr(H, "_apply", lambda V: calls.append(1) or apply(V))
    for call in (H.min_eigenvalue, H.inertia):
        with pytest.raises(hessinv.TooLargeError):
            call()
    assert not calls


def test_solve_on_a_sweep_too_large_gets_a_bounded_minres_then_the_refusal(monkeypatch):
    """Where no factorization fits, ``H.solve`` has MINRES only: it ran up to 3 x 3000 products (about 50
    min on a wide model, a size probe) before the refusal, or none at all where the cost model preferred the
    factorization -- refusing a well-conditioned system MINRES solves in 11 products. Now MINRES runs
    whatever the cost model says, for the products an ``rtol`` gets, and the refusal follows."""
    import hessinv.curvature as cv
    import hessinv.riccati as ric

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    X, y = torch.randn(16, 8, dtype=torch.float64), torch.randint(0, 3, (16,))
    H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    g = H.gradient
    want = torch.linalg.solve(H.to_dense() + 10.0 * torch.eye(H.shape[0], dtype=torch.float64), g)
    monkeypatch.setattr(ric, "_capacity_bytes", lambda device: 2**16)
    monkeypatch.setattr(ric, "_memory_bytes", lambda device: 2**16)
    calls = []
    apply = H._apply
    monkeypatch.setattr(H, "_apply", lambda V: calls.append(V.shape[1]) or apply(V))
    x, info = H.solve(g, 10.0, return_info=True)
    assert info.residual <= 1e-12 and info.krylov_iterations == len(calls)
    torch.testing.assert_close(x, want, rtol=1e-10, atol=0)
    with pytest.raises(hessinv.TooLargeError, match="MINRES on the operator's products ran first"):
        H.solve(g, 1e-6)  # (nearly singular: MINRES does not get to 1e-12)
    calls.clear()
    with pytest.raises(hessinv.TooLargeError):
        H.solve(g, 1e-6)
    assert 0 < sum(calls) <= cv.KRYLOV_RTOL_MAX_ITERATIONS + cv.KRYLOV_RESTARTS
    # a narrow chain on a large batch, where the cost model prefers the factorization (it refused untried)
    narrow = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    X2, y2 = torch.randn(64, 4, dtype=torch.float64), torch.randint(0, 3, (64,))
    H2 = hessinv.hessian(narrow, nn.CrossEntropyLoss(), X2, y2)
    x2, info2 = H2.solve(H2.gradient, 10.0, return_info=True)
    assert info2.residual <= 1e-12 and info2.krylov_iterations > 0
    # a Gauss-Newton matrix whose sweep does not fit factors through its root: G.solve answers as
    # G.factor does (its first version refused after MINRES; a review)
    import hessinv.curvature as hc

    def too_big(*args, **kwargs):
        raise hessinv.TooLargeError("the sweep's blocks need 500 GiB (simulated)")

    net3 = nn.Sequential(
        nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3)
    ).double()
    X3, y3 = torch.randn(40, 10, dtype=torch.float64), torch.randint(0, 3, (40,))
    G = hessinv.gauss_newton(net3, nn.CrossEntropyLoss(), X3, y3)
    b = torch.randn(G.shape[0], dtype=torch.float64)
    monkeypatch.setattr(hc, "check_memory", too_big)
    monkeypatch.setattr(hc.GaussNewton, "_dense_cheaper", lambda self, *a, **k: False)
    F = G.factor(1e-8)
    assert isinstance(F, hc.WoodburyFactorization)
    torch.testing.assert_close(G.solve(b, 1e-8), F.solve(b), rtol=1e-10, atol=0)


def test_generic_stages_too_large_for_dense_blocks_are_taken_lazily(monkeypatch):
    """A small CNN on 28 x 28 inputs, batch 8: hessian() built a convolution's dense blocks (4.6 s, 2 GiB)
    before refusing with 'at most 7 examples' (later: every generic stage checked up front, the advice the
    smallest batch over all). Stages whose dense blocks exceed the limit (here a lower one) are now lazy:
    the operator builds, its products and its factorization (the dense route: H from products) are exact."""
    from reference import autograd_hessian

    from hessinv.stages.generic import GenericStage, LazyBlocks

    monkeypatch.setattr(GenericStage, "MAX_BLOCK_ENTRIES", 2**19)
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
    ).double()  # fmt: skip
    X, y = torch.randn(24, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (24,))
    H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    assert any(isinstance(b, LazyBlocks) for b in H.blocks)
    R = autograd_hessian(net, nn.CrossEntropyLoss(), X, y)
    assert float((H.to_dense() - R).abs().max()) <= 1e-12 * float(R.abs().max())
    b = torch.randn(H.shape[0], dtype=torch.float64)
    x = H.factor(0.5).solve(b)
    A = R + 0.5 * torch.eye(H.shape[0], dtype=torch.float64)
    assert float((A @ x - b).norm()) <= 1e-10 * float(b.norm())


def test_a_frozen_backbone_is_not_checked_for_dense_blocks(monkeypatch):
    """The up-front check of generic stages sized a frozen backbone too (its blocks are never built: a
    forward pass) and refused a Conv/Pool backbone with a Linear head that ran in 0.25 s before."""
    from hessinv.stages.generic import GenericStage

    monkeypatch.setattr(GenericStage, "MAX_BLOCK_ENTRIES", 2**12)
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
    ).double()
    for p in net[0].parameters():
        p.requires_grad_(False)
    X, y = torch.randn(16, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (16,))
    H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    assert H.shape[0] == 4 * 4 * 4 * 3 + 3


def test_an_overflowing_forward_is_named_as_such_not_as_a_tracing_problem():
    """A float64 forward that overflows (exp(1000)) gave NotAChainError ("the traced stages compute
    another function": inf - inf is NaN); the model's own forward and its stages overflow alike."""

    class Exp(nn.Module):
        def forward(self, x):
            return torch.exp(x)

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 3), Exp(), nn.Linear(3, 2)).double()
    X, Y = torch.randn(4, 3, dtype=torch.float64) * 1000, torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(hessinv.NonFiniteError, match="inf"):
        hessinv.hessian(m, nn.MSELoss(), X, Y)


@pytest.mark.parametrize("dtype", [torch.int16, torch.uint8, torch.float64])
def test_token_ids_of_another_dtype_are_told_to_be_long(dtype):
    """int16 / uint8 / float token ids into an Embedding: the advice was inputs.to(torch.float64) (which
    fails too) or a ShapeMismatchError; the fix is .long()."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(7, 4), nn.Flatten(), nn.Linear(12, 3)).double()
    ids, y = torch.randint(0, 7, (6, 3)), torch.randint(0, 3, (6,))
    with pytest.raises(hessinv.DtypeMismatchError, match=r"inputs\.long\(\)"):
        hessinv.hessian(m, nn.CrossEntropyLoss(), ids.to(dtype), y)
    hessinv.hessian(m, nn.CrossEntropyLoss(), ids.to(dtype).long(), y)


def test_a_loss_that_draws_random_numbers_is_refused_even_when_its_values_agree():
    """Dropout of 2% inside loss_fn left both probe values alike on 17 of 40 seeds, and 3 of those
    were differentiated at another draw (found by a review of losses): a call that draws from torch's
    generator is refused as random."""
    net, X, _ = small()
    t = torch.randn(5, 2, dtype=torch.float64)
    for seed in range(10):
        torch.manual_seed(seed)
        with pytest.raises(UnsupportedStageError, match="drew random numbers|dropout or noise"):
            hessinv.hessian(net, lambda o, t: ((torch.nn.functional.dropout(o, 0.02) - t) ** 2).sum(), X, t)


def test_tuple_targets_get_advice_about_targets():
    """Tuple targets got the advice for a model of several inputs."""
    net, X, y = small()
    with pytest.raises(hessinv.InvalidArgumentError, match="several targets: pack them"):
        hessinv.hessian(net, lambda o, t: ((o - t[0]) ** 2).mean(), X, (y, y))


def test_a_functions_dtype_failures_are_named_with_their_fix():
    """A lambda given int32 class indices, and a partial whose weight is float32 on a float64 model,
    got UnsupportedStageError wrapping torch's message; both are dtype mismatches with a fix."""
    import functools

    net, X, _ = small()
    y = torch.tensor([0, 1, 1, 0, 1])
    F_ = torch.nn.functional
    with pytest.raises(hessinv.DtypeMismatchError, match=r"targets\.long\(\)"):
        hessinv.hessian(net, lambda o, t: F_.cross_entropy(o, t), X, y.int())
    w = torch.ones(2, dtype=torch.float32)
    with pytest.raises(hessinv.DtypeMismatchError, match="weight is torch.float32"):
        hessinv.hessian(net, functools.partial(F_.cross_entropy, weight=w), X, y)


def test_a_loss_that_seeds_the_generator_itself_is_deterministic():
    """A loss that calls torch.manual_seed inside (the same draws every call) was refused as random by
    the generator check; the second call leaves the generator where the first did."""
    net, X, _ = small()
    t = torch.randn(5, 2, dtype=torch.float64)

    def seeded(o, t):
        torch.manual_seed(1)
        return ((torch.nn.functional.dropout(o, 0.3) - t) ** 2).sum()

    H = hessinv.hessian(net, seeded, X, t)
    assert torch.isfinite(H.gradient).all()


def test_a_row_budget_passed_positionally_to_root_is_named():
    """``G.root(3)``: 3 landed in ``rotation`` and failed as "'int' object is not callable" deep inside
    (a new user's find); now a named error saying to pass max_rows by keyword."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 5))
    G = hessinv.gauss_newton(m, torch.nn.CrossEntropyLoss(), torch.randn(6, 3), torch.randint(0, 5, (6,)))
    with pytest.raises(hessinv.InvalidArgumentError, match="max_rows by keyword"):
        G.root(3)
    U, _ = G.root(max_rows=6)
    assert U.shape[0] == 6


def test_sparse_inputs_are_named():
    """A sparse input tensor gave torch's bare NotImplementedError with its dispatcher dump (a new
    user's find): a named error with the conversion to make."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3))
    X, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    with pytest.raises(hessinv.InvalidArgumentError, match="to_dense"):
        hessinv.hessian(m, torch.nn.CrossEntropyLoss(), X.to_sparse(), y)
    with pytest.raises(hessinv.InvalidArgumentError, match="to_dense"):
        hessinv.optim.Newton(m, torch.nn.CrossEntropyLoss()).step(X.to_sparse(), y)


def test_a_loss_with_no_finite_second_derivative_at_the_point_is_named():
    """``|r|^1.5`` or a norm of the residual at a residual of exactly 0 has no second derivative there: the
    operator was built silently, ``to_dense()`` came back NaN and every product said "overflows ... scale it
    down", which cannot help (a probe)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X = torch.randn(4, 3, dtype=torch.float64)
    with torch.no_grad():
        T = m(X) + 0.3
        T[0] = m(X)[0]  # (example 0 fitted exactly)
    for lf in (lambda o, t: (o - t).abs().pow(1.5).mean(), lambda o, t: (o - t).norm(dim=1).mean()):
        with pytest.raises(hessinv.NonFiniteError, match="second derivative in the outputs is not finite"):
            hessinv.hessian(m, lf, X, T)


def test_a_cancelling_gradient_at_confident_logits_is_not_taken_for_a_missing_second_derivative():
    """The check of autograd's loss curvature against its gradient's change refused a lambda BCE (and
    ``BCEWithLogitsLoss(pos_weight=...)``) at 2-6% of confident margins: ``sigmoid(y) - 1`` moves in steps
    of its rounding near 1, 10-25% off its derivative (a review). Only a second derivative missing (below
    0.4x the change) is refused."""
    loss = lambda o, t: torch.nn.functional.binary_cross_entropy_with_logits(o, t)  # noqa: E731
    net = nn.Linear(1, 1)
    with torch.no_grad():
        net.weight.fill_(2.0)
        net.bias.fill_(12.0)
    for seed in range(60):
        X = torch.randn(32, 1, generator=torch.Generator().manual_seed(seed))
        H = hessinv.hessian(net, loss, X, torch.ones(32, 1))
        ref = hessinv.hessian(net, nn.BCEWithLogitsLoss(), X, torch.ones(32, 1))
        # (autograd's own sigmoid(y) - 1 cancels in float32: a few 1e-3 off the closed form)
        assert torch.allclose(H.to_dense(), ref.to_dense(), rtol=2e-2, atol=0)


def test_min_eigenvalue_too_large_for_its_certificate_names_the_uncertified_route(monkeypatch):
    """``min_eigenvalue`` refused by the memory check of its certificate's sweep named only the optimizers'
    ``curvature_batch_size``, which an operator has none of (a probe): it names ``eigenpairs(1, "smallest",
    certify=False)``, which takes products only."""
    import hessinv.riccati

    monkeypatch.setattr(hessinv.riccati, "_memory_bytes", lambda device: 16 * 2**30)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(30, 3000), nn.Tanh(), nn.Linear(3000, 3))
    X, y = torch.randn(64, 30), torch.randint(0, 3, (64,))
    H = hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    with pytest.raises(hessinv.TooLargeError, match=r"eigenpairs\(1, 'smallest', certify=False\)"):
        H.min_eigenvalue()


def test_a_loss_that_returns_a_python_number_is_named_as_such():
    """A loss returning ``float(...)`` was told it was "not a scalar; use reduction='mean'" (a probe)."""
    net, X, _ = small()
    t = torch.randn(5, 2, dtype=torch.float64)
    with pytest.raises(UnsupportedStageError, match="returned a float, not a tensor"):
        hessinv.hessian(net, lambda o, t: float(((o - t) ** 2).mean()), X, t)


def test_flattened_positions_get_advice_to_keep_the_batch_axis():
    """An architecture probe: a sequence model ending in Flatten(0, 1) (logits.view(-1, C)) with (B T,)
    targets got only "batch sizes differ"; the message now says how to keep the batch axis, and that
    advice works (a per-position loss on (B, T) targets)."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    B, T, E, C = 4, 3, 4, 3
    X = torch.randn(B, T, E, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B, T), generator=g)
    m = nn.Sequential(nn.Linear(E, E), nn.Tanh(), nn.Linear(E, C)).double()
    with pytest.raises(ShapeMismatchError, match=r"4 x 3 positions flattened together\? Keep the batch axis"):
        hessinv.hessian(nn.Sequential(*m, nn.Flatten(0, 1)), nn.CrossEntropyLoss(), X, y.reshape(-1))
    with pytest.raises(
        ShapeMismatchError, match="batch sizes differ: inputs \\(4, 3, 4\\), targets \\(5,\\)$"
    ):
        hessinv.hessian(m, nn.CrossEntropyLoss(), X, y.reshape(-1)[:5])

    def loss(out, t):
        return F.cross_entropy(out.flatten(0, 1), t.flatten())

    _, H_ref = autograd_gradient_hessian(m, loss, X, y)
    H = hessinv.hessian(m, loss, X, y)
    assert (H.to_dense() - H_ref).abs().max() <= 1e-12 * H_ref.abs().max()


def test_memory_refusal_says_what_is_the_stages_own_and_what_later_stages_keep(monkeypatch):
    """A performance probe: a deep wide MLP's refusal named stage 0's 8448 parameters against ~48 GiB,
    nearly all of it factors the later stages keep; the message now splits the two."""
    import hessinv.riccati as ric

    torch.manual_seed(0)
    layers = [nn.Linear(8, 32), nn.Tanh()] + [m for _ in range(6) for m in (nn.Linear(32, 32), nn.Tanh())]
    net = nn.Sequential(*layers, nn.Linear(32, 3)).double()
    X, y = torch.randn(16, 8, dtype=torch.float64), torch.randint(0, 3, (16,))
    H = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    need = []
    monkeypatch.setattr(ric, "_capacity_bytes", lambda device: 2**20)
    monkeypatch.setattr(ric, "_memory_bytes", lambda device: 2**20)
    with pytest.raises(hessinv.TooLargeError) as err:
        ric.check_memory(H.blocks, H._names, torch.float64, X.device)
    msg = str(err.value)
    m = re.search(
        r"need about ([\d.e+-]+) GiB there \(its own blocks ([\d.e+-]+) GiB: .*; the factors the (\d+) "
        r"stages after it keep ([\d.e+-]+) GiB\)",
        msg,
    )
    assert m is not None, msg
    total, own, after, kept = float(m.group(1)), float(m.group(2)), int(m.group(3)), float(m.group(4))
    assert after == 7 and kept > own and abs(own + kept - total) <= 0.01 * total
    need.append(total)


@pytest.mark.parametrize(
    "layer", [lambda: nn.MultiheadAttention(3, 1, batch_first=True), lambda: nn.Bilinear(3, 3, 3)]
)
def test_a_stage_of_two_inputs_is_named_with_the_wrap_that_helps(layer):
    """``nn.MultiheadAttention`` or ``nn.Bilinear`` placed in an ``nn.Sequential``: was a
    ShapeMismatchError about the input's shape (a probe); the shape was fine, the stage takes more than
    one input -- now an UnsupportedStageError that says how to wrap it."""
    import hessinv

    net = nn.Sequential(layer()).double()
    X = torch.randn(2, 2, 3, dtype=torch.float64)
    with pytest.raises(hessinv.UnsupportedStageError, match="more than one input.*wrap it"):
        hessinv.hessian(net, nn.MSELoss(), X, torch.randn(2, 2, 3, dtype=torch.float64))


def test_a_traced_piece_that_fails_prints_nothing_before_the_named_error(capfd):
    """A float32 model whose forward multiplies by a float32 constant: its float64 copy (the solves'
    refinement) fails, and torch.fx printed its report of the generated code to stderr before hessinv's
    DtypeMismatchError said what to do (a probe). The named error alone now, and the traced piece still
    raises where it fails (deep-copied too)."""
    import copy

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)) @ torch.eye(4))

    torch.manual_seed(0)
    X, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    H = hessinv.hessian(M(), nn.CrossEntropyLoss(), X, y)
    with pytest.raises(hessinv.DtypeMismatchError, match="float64 copy"):
        H.factor(1e-2).solve(H.gradient)
    assert "FX-traced" not in capfd.readouterr().err
    piece = next(s.module for s in H.chain.stages if "matmul" in s.name)
    with pytest.raises(RuntimeError, match="dtype"):
        copy.deepcopy(piece)(torch.randn(2, 4, dtype=torch.float64))
    assert "FX-traced" not in capfd.readouterr().err


def test_a_bug_inside_a_stage_is_not_called_a_second_input():
    """A stage whose own forward calls a helper without an argument raises the same TypeError ('missing
    1 required positional argument') as a stage of two inputs; it was told to wrap the stage for one
    input (a review), advice that does not apply: the stage's signature takes one input."""

    def helper(x, scale):
        return x * scale

    class Buggy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return helper(self.lin(x))

    net = nn.Sequential(Buggy(), nn.Linear(3, 2)).double()
    X, y = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,))
    with pytest.raises(hessinv.HessinvError) as e:
        hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    assert "more than one input" not in str(e.value) and "'scale'" in str(e.value)


class _NextToken(torch.nn.Module):
    """Embedding then a per-position head; ``(B, T, V)`` logits, or ``(B, V, T)`` with ``channels_first``."""

    def __init__(self, V: int, channels_first: bool):
        super().__init__()
        self.e, self.head, self.cf = torch.nn.Embedding(V, 4), torch.nn.Linear(4, V), channels_first

    def forward(self, x):
        out = self.head(torch.tanh(self.e(x)))
        return out.transpose(1, 2) if self.cf else out


def test_a_flattened_sequence_cross_entropy_is_told_the_per_position_form(monkeypatch):
    """Next-token logits ``(B, T, V)`` with a loss that flattens them (the README's advice then) get a dense
    ``(T V)^2`` output curvature per example, refused at a large vocabulary with advice to take fewer
    examples -- 17x the time of the per-position form (a probe). The refusal names that form, and it is
    the same Hessian."""
    import hessinv.stages.losses as hl

    torch.manual_seed(0)
    V, T = 12, 5
    X, Y = torch.randint(0, V, (3, T)), torch.randint(0, V, (3, T))
    flat = _NextToken(V, False).double()
    loss = lambda o, y: torch.nn.functional.cross_entropy(o.reshape(-1, V), y.reshape(-1))  # noqa: E731
    monkeypatch.setattr(hl, "MAX_LAMBDA_ENTRIES", 2 * (T * V) ** 2)
    with pytest.raises(hessinv.errors.TooLargeError, match=r"return \(B, classes, T\) logits and use nn"):
        hessinv.hessian(flat, loss, X, Y).factor(1.0)
    per_position = _NextToken(V, True).double()
    per_position.load_state_dict(flat.state_dict())
    H = hessinv.hessian(per_position, torch.nn.CrossEntropyLoss(), X, Y)
    monkeypatch.undo()
    assert torch.allclose(H.to_dense(), hessinv.hessian(flat, loss, X, Y).to_dense(), rtol=1e-10, atol=1e-12)


def test_the_sweeps_memory_check_is_linear_in_depth(monkeypatch):
    # (a probe: it summed the factors kept after each stage for every stage -- quadratic in depth, 4.2 s of
    # a 6.2 s factorization at depth 4000; counted here by the per-stage size calls it makes)
    import hessinv.riccati as ric

    calls = {"n": 0}
    real = ric._kept_entries

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(ric, "_kept_entries", counted)
    torch.manual_seed(0)
    for depth in (50, 200):
        layers = [nn.Linear(2, 2) if i % 2 == 0 else nn.Tanh() for i in range(2 * depth)]
        net = nn.Sequential(*layers, nn.Linear(2, 2)).double()
        X, y = torch.randn(4, 2, dtype=torch.float64), torch.randint(0, 2, (4,))
        G = hessinv.gauss_newton(net, nn.CrossEntropyLoss(), X, y)
        calls["n"] = 0
        assert ric.check_memory(G.blocks, G._names, torch.float64, X.device) is None
        assert 0 < calls["n"] <= 3 * len(G.blocks), (depth, calls["n"])
