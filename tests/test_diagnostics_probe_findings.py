"""Defects of ``hessinv.diagnostics`` found by a probe (repros /tmp/s39/diag/R1..R5): subnormal vectors,
the scale of a metric, integer and complex metrics and samples, ``stochastic_contraction`` at ``x = x*``,
and Adam parameters without a gradient. References are computed independently in float64."""

import math

import pytest
import torch
from torch import Tensor, nn

from hessinv import diagnostics as dg
from hessinv.errors import InvalidArgumentError

F64 = torch.float64


def _cos_ref(d: Tensor, e: Tensor, W: Tensor | None = None) -> float:
    """``<d, e>_W / (|d|_W |e|_W)`` of vectors and a matrix of moderate size (float64)."""
    W = torch.eye(len(d), dtype=F64) if W is None else W
    return float((d @ W @ e) / torch.sqrt((d @ W @ d) * (e @ W @ e)))


# -- 1. subnormal vectors: math.ldexp(1.0, 1074) overflowed (a raw OverflowError) -----------------------
def test_subnormal_vectors_give_the_ratios_of_their_directions():
    # exact subnormals: 2^-1060 [3, 4, 0] (|v| = 5 * 2^-1060) and its half
    v = torch.tensor([3.0, 4.0, 0.0], dtype=F64) * 2.0**-1060
    z = torch.zeros(3, dtype=F64)
    assert 0 < float(v.abs().max()) < torch.finfo(F64).tiny
    assert dg.alignment(v, torch.ones(3, dtype=F64), z) == pytest.approx(7 / (5 * math.sqrt(3)), rel=1e-15)
    assert dg.alignment(1e-310 * torch.ones(3, dtype=F64), torch.ones(3, dtype=F64), z) == 1.0
    assert dg.step_ratio(v, v, z) == 1.0
    assert dg.best_step(v, v, z) == 1.0
    assert dg.observed_contraction(v, v / 2, z) == 0.25
    rec = dg.analyze_step(v, v / 2, z)
    assert (rec.cos_theta, rec.rho, rec.observed, rec.predicted_step) == (1.0, 0.5, 0.25, 0.25)
    assert rec.error == math.ldexp(5.0, -1060) and rec.step_norm == math.ldexp(5.0, -1061)  # not 0
    s = dg.stochastic_contraction(torch.stack([v, v]), v, z, 1.0)
    assert (s.cos_bar, s.nu, s.rho_bar, s.observed_mean) == (1.0, 0.0, 1.0, 0.0)


def test_analyze_step_norms_do_not_under_or_overflow():
    """``error`` and ``step_norm`` were torch's norms: 0 at 1e-170, inf at 1e160."""
    e = torch.tensor([3.0, 4.0], dtype=F64)
    for scale in (1e-170, 1e160):
        rec = dg.analyze_step(scale * e, 0.5 * scale * e, 0 * e)
        assert rec.error == pytest.approx(5 * scale, rel=1e-15)
        assert rec.step_norm == pytest.approx(2.5 * scale, rel=1e-15)
    net = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        net.weight.copy_(1e-170 * e)
    assert dg.AlignmentTracker(net, 0 * e).error == pytest.approx(5e-170, rel=1e-15)


# -- 2. a metric's products over- or underflowed: nan, or a false "not positive definite" ------------
def test_metric_alignment_does_not_depend_on_the_scale_of_the_vectors_or_the_matrix():
    o, z, v = torch.ones(3, dtype=F64), torch.zeros(3, dtype=F64), torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    I = torch.eye(3, dtype=F64)  # noqa: E741
    ref = 6 / math.sqrt(3 * 14)  # 0.92582...
    assert dg.alignment(1e160 * o, v, z, metric=I) == pytest.approx(ref, rel=1e-15)  # nan before
    assert dg.alignment(o, v, z, metric=1e200 * I) == pytest.approx(ref, rel=1e-15)  # nan before
    assert dg.alignment(1e-170 * o, v, z, metric=I) == pytest.approx(ref, rel=1e-15)  # raised before
    torch.manual_seed(0)
    A = torch.randn(3, 3, dtype=F64)
    W = A @ A.T + torch.eye(3, dtype=F64)
    d, x = torch.randn(3, dtype=F64), torch.randn(3, dtype=F64)
    ref_W = _cos_ref(d, x, W)
    for sd, sW in ((1e160, 1.0), (1.0, 1e300), (1e-170, 1e-300), (1e-310, 1.0)):
        assert dg.alignment(sd * d, x, z, metric=sW * W) == pytest.approx(ref_W, rel=1e-12, abs=1e-14)
    # a callable is linear: scaling the vectors suffices
    assert dg.alignment(1e160 * d, x, z, metric=lambda u: W @ u) == pytest.approx(ref_W, rel=1e-12)


def test_metric_ratios_do_not_depend_on_the_scale_of_the_matrix():
    torch.manual_seed(1)
    A = torch.randn(4, 4, dtype=F64)
    W = A @ A.T + torch.eye(4, dtype=F64)
    d, x, x_next, z = (torch.randn(4, dtype=F64) for _ in range(4))
    e, en = x - z, x_next - z
    sr = math.sqrt(float(d @ W @ d) / float(e @ W @ e))
    bs = float(d @ W @ e) / float(d @ W @ d)
    oc = float(en @ W @ en) / float(e @ W @ e)
    Wbig = 2.0**1020 * W  # |u|_W^2 of unit-size u overflowed: inf / inf = nan
    assert dg.step_ratio(d, x, z, metric=Wbig) == pytest.approx(sr, rel=1e-13)
    assert dg.best_step(d, x, z, metric=Wbig) == pytest.approx(bs, rel=1e-13)
    assert dg.observed_contraction(x, x_next, z, metric=Wbig) == pytest.approx(oc, rel=1e-13)


# -- 3. integer and complex metrics and samples --------------------------------------------------------
def test_integer_metric_is_converted_and_complex_ones_are_refused():
    o, z, v = torch.ones(3, dtype=F64), torch.zeros(3, dtype=F64), torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    W = torch.tensor([[2, 1, 0], [1, 3, 0], [0, 0, 1]])  # int64, SPD (torch.finfo raised a TypeError)
    assert dg.alignment(v, o, z, metric=W) == pytest.approx(_cos_ref(v, o, W.double()), rel=1e-15)
    assert dg.step_ratio(v, o, z, metric=torch.eye(3, dtype=torch.long)) == pytest.approx(
        math.sqrt(14 / 3), rel=1e-15
    )
    with pytest.raises(InvalidArgumentError, match="metric is complex"):
        dg.alignment(v, o, z, metric=torch.eye(3, dtype=torch.complex128) * (1 + 3j))
    with pytest.raises(InvalidArgumentError, match="complex"):
        dg.alignment(v, o, z, metric=lambda u: u.to(torch.complex128) * 1j)


def test_complex_samples_are_refused():
    e = torch.tensor([1.0, 0.0], dtype=F64)
    with pytest.raises(InvalidArgumentError, match="samples is complex"):
        dg.stochastic_contraction(torch.tensor([[1 + 5j, 1j], [1 - 5j, -1j]]), e, 0 * e, 0.5)


# -- 4. stochastic_contraction at x = x* and with no entries ------------------------------------------
def test_stochastic_contraction_at_the_minimizer_is_nan_where_undefined():
    e = torch.tensor([1.0, 0.0], dtype=F64)
    draws = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=F64)
    s = dg.stochastic_contraction(draws, e, e, 0.5)
    assert math.isnan(s.predicted_best) and math.isnan(s.best_eta)  # 1.0 and 0.0 before
    assert math.isnan(s.cos_bar) and math.isnan(s.predicted) and math.isnan(s.observed_mean)
    assert s.nu == 1.0  # tr Cov / |m|^2 does not involve x*
    assert math.isnan(dg.analyze_step(e, 2 * e, e).predicted_best)  # the same convention


def test_stochastic_contraction_of_empty_vectors_is_a_named_error():
    empty = torch.zeros(0, dtype=F64)
    with pytest.raises(InvalidArgumentError, match="no entries"):
        dg.stochastic_contraction(torch.ones(2, 0, dtype=F64), empty, empty, 0.5)


# -- 5. Adam parameters without a gradient: torch's step skips them ------------------------------------
def _frozen_bias_problem():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    X, Y = torch.randn(8, 3, dtype=F64), torch.randn(8, 2, dtype=F64)
    for _ in range(3):  # some state
        opt.zero_grad()
        nn.functional.mse_loss(net(X), Y).backward()
        opt.step()
    net[0].bias.requires_grad_(False)  # frozen after the optimizer was built
    opt.zero_grad()
    nn.functional.mse_loss(net(X), Y).backward()
    return net, opt, X, Y


def test_adam_direction_is_zero_on_a_parameter_without_gradient():
    net, opt, X, Y = _frozen_bias_problem()
    assert net[0].bias.grad is None
    all_params = list(net.parameters())
    x0 = torch.cat([p.detach().reshape(-1).clone() for p in all_params])
    d = dg.adam_direction(opt)  # refused before ("call backward() first")
    opt.step()
    x1 = torch.cat([p.detach().reshape(-1) for p in all_params])
    step = (x0 - x1) / 1e-2  # torch's step, the reference
    assert torch.equal(d[12:16], torch.zeros(4, dtype=F64))
    assert torch.allclose(d, step, rtol=1e-9, atol=1e-12)
    opt.zero_grad()  # no gradient at all: still an error
    with pytest.raises(InvalidArgumentError, match="no gradient"):
        dg.adam_direction(opt)


def test_direction_alignments_adam_with_a_frozen_parameter_matches_the_step_taken():
    net, opt, X, Y = _frozen_bias_problem()
    x_star = torch.zeros(22, dtype=F64)  # 26 parameters, 4 of them frozen
    x0 = dg.flat_parameters(net)
    reported = dg.direction_alignments(net, nn.MSELoss(), X, Y, x_star, ("adam",), adam=opt)["adam"]
    opt.step()
    taken = dg.alignment(x0 - dg.flat_parameters(net), x0, x_star)
    assert abs(reported - taken) < 1e-10


def test_direction_alignments_with_an_unused_parameter():
    """A parameter the loss does not use: autograd raised a raw RuntimeError; its gradient is 0, and
    Adam's step skips it."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            return self.used(x)

    torch.manual_seed(0)
    net = Net().double()
    X, Y = torch.randn(8, 3, dtype=F64), torch.randn(8, 2, dtype=F64)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x_star = torch.randn(16, dtype=F64)
    x0 = dg.flat_parameters(net)
    al = dg.direction_alignments(net, nn.MSELoss(), X, Y, x_star, ("gradient", "adam"), adam=opt)
    opt.zero_grad()
    nn.functional.mse_loss(net(X), Y).backward()
    g = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in net.parameters()])
    assert al["gradient"] == pytest.approx(_cos_ref(g, x0 - x_star), rel=1e-12)
    opt.step()
    taken = dg.alignment(x0 - dg.flat_parameters(net), x0, x_star)
    assert torch.equal(dg.flat_parameters(net)[8:], x0[8:])  # torch did not move the unused layer
    assert abs(al["adam"] - taken) < 1e-10
