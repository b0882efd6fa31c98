"""Laplace: marginal likelihood, predictive variance, posterior covariance and samples against dense
references (plain autograd double backward + ``torch.linalg``), on random small float64 chains."""

from __future__ import annotations

import copy
import math
import re
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import autograd_gauss_newton, autograd_hessian, autograd_output_jacobian
from torch import nn

from hessinv.errors import (
    DtypeMismatchError,
    IndefiniteError,
    InvalidArgumentError,
    NonFiniteArgumentError,
    NonFiniteError,
    ShapeMismatchError,
    SingularError,
    UnsupportedStageError,
)
from hessinv.influence import InfluenceFunction
from hessinv.laplace import Laplace


def problem(
    seed: int, likelihood: str, depth: int = 2, width: int = 4, d_in: int = 3, C: int = 2, N: int = 9
):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = [torch.nn.Linear(d_in, width), torch.nn.Tanh()]
    for _ in range(depth - 2):
        layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    net = torch.nn.Sequential(*layers, torch.nn.Linear(width, C)).double()
    X = torch.randn(N, d_in, generator=g, dtype=torch.float64)
    y = (
        torch.randint(0, C, (N,), generator=g)
        if likelihood == "classification"
        else torch.randn(N, C, generator=g, dtype=torch.float64)
    )
    return net, X, y


def dense_laplace(net, X, y, likelihood, curvature, delta, sigma, mu0=0.0):
    """Everything from the dense precision: (lml, P, J)."""
    lf = (
        torch.nn.CrossEntropyLoss(reduction="sum")
        if likelihood == "classification"
        else torch.nn.MSELoss(reduction="sum")
    )
    D = (autograd_hessian if curvature == "hessian" else autograd_gauss_newton)(net, lf, X, y)
    c = 1.0 if likelihood == "classification" else 0.5 / sigma**2
    n = D.shape[0]
    P = c * D + delta * torch.eye(n, dtype=D.dtype)
    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    with torch.no_grad():
        loss = float(lf(net(X), y))
    if likelihood == "classification":
        ll = -loss
    else:
        ll = -loss / (2 * sigma**2) - y.numel() * math.log(sigma * math.sqrt(2 * math.pi))
    sign, logdet = torch.linalg.slogdet(P)
    lml = ll - 0.5 * (float(logdet) - n * math.log(delta) + delta * float(((theta - mu0) ** 2).sum()))
    return lml, P, sign


@settings(max_examples=6)
@given(
    seed=st.integers(0, 10_000),
    likelihood=st.sampled_from(["classification", "regression"]),
    curvature=st.sampled_from(["gauss_newton", "hessian"]),
    delta=st.sampled_from([1e-2, 0.5, 3.0]),
    sigma=st.sampled_from([0.3, 1.0, 2.0]),
    depth=st.integers(1, 3),
)
def test_marginal_likelihood_and_predictive_match_dense(seed, likelihood, curvature, delta, sigma, depth):
    if likelihood == "classification":
        sigma = 1.0
    net, X, y = problem(seed, likelihood, depth=depth)
    lml, P, sign = dense_laplace(net, X, y, likelihood, curvature, delta, sigma, mu0=0.1)
    la = Laplace(
        net, likelihood, curvature=curvature, prior_precision=delta, sigma_noise=sigma, prior_mean=0.1
    )
    la.fit(X, y)
    if float(torch.linalg.eigvalsh(P)[0]) <= 0:
        assert curvature == "hessian"
        with pytest.raises(IndefiniteError):
            la.log_marginal_likelihood()
        return
    assert la.log_marginal_likelihood() == pytest.approx(lml, rel=1e-10, abs=1e-9 * P.shape[0])
    Pi = torch.linalg.inv(P)
    assert torch.allclose(la.posterior_covariance(), Pi, rtol=1e-8, atol=1e-11 * float(Pi.abs().max()))
    assert torch.allclose(
        la.posterior_variance(), Pi.diagonal(), rtol=1e-8, atol=1e-11 * float(Pi.abs().max())
    )
    Xt = X[:4] + 0.5
    J = autograd_output_jacobian(net, Xt)
    f_var = torch.einsum("icn,nm,idm->icd", J, Pi, J)
    if likelihood == "regression":
        f_mu, got = la(Xt)
        assert torch.allclose(f_mu, net(Xt).detach())
    else:
        got = la.functional_variance(output_jacobians_of(net, Xt))
        probs = la(Xt, link_approx="probit")
        kappa = 1 / torch.sqrt(1 + math.pi / 8 * f_var.diagonal(dim1=1, dim2=2))
        assert torch.allclose(probs, torch.softmax(kappa * net(Xt).detach(), -1), rtol=1e-9, atol=1e-12)
    assert torch.allclose(got, f_var, rtol=1e-8, atol=1e-11 * float(f_var.abs().max())), (seed, depth)


def output_jacobians_of(net, X):
    from hessinv.influence import output_jacobians

    return output_jacobians(net, X)


@pytest.mark.parametrize(
    "likelihood, loss", [("classification", torch.nn.CrossEntropyLoss()), ("regression", torch.nn.MSELoss())]
)
def test_likelihood_from_the_training_loss(likelihood, loss):
    """The loss a model was trained with names its likelihood: the same evidence as the string."""
    net, X, y = problem(5, likelihood)
    by_name = Laplace(net, likelihood, prior_precision=0.7).fit(X, y).log_marginal_likelihood()
    by_loss = Laplace(net, loss, prior_precision=0.7).fit(X, y).log_marginal_likelihood()
    assert float(by_loss) == float(by_name)
    assert math.isclose(
        float(by_name), dense_laplace(net, X, y, likelihood, "gauss_newton", 0.7, 1.0)[0], rel_tol=1e-10
    )


@pytest.mark.parametrize(
    "bad",
    [
        torch.nn.CrossEntropyLoss(weight=torch.ones(2)),
        torch.nn.CrossEntropyLoss(label_smoothing=0.1),
        torch.nn.BCEWithLogitsLoss(),
        "poisson",
    ],
)
def test_likelihood_refused_with_a_named_error(bad):
    net, _, _ = problem(0, "classification")
    with pytest.raises(InvalidArgumentError, match="not the log-likelihood of a categorical or Gaussian"):
        Laplace(net, bad)


def test_optimize_prior_precision_finds_the_dense_maximum():
    net, X, y = problem(3, "classification", depth=3)
    la = Laplace(net, "classification").fit(X, y)
    delta = la.optimize_prior_precision(tol=1e-8)
    assert la.prior_precision == delta
    f = [
        dense_laplace(net, X, y, "classification", "gauss_newton", delta * math.exp(h), 1.0)[0]
        for h in (-1e-2, 0, 1e-2)
    ]
    assert f[1] >= max(f[0], f[2]) - 1e-9
    assert f[1] > max(f[0], f[2]) - 1e-3  # a strict interior maximum in log delta (not a bound)
    assert 1e-6 < delta < 1e6


def test_optimize_prior_precision_takes_a_laplace_torch_call():
    """laplace-torch's ``la.optimize_prior_precision(pred_type="glm", method="marglik", n_steps=...)`` (the
    module says the interface follows it) raised a raw TypeError (a probe): the marginal-likelihood
    search's settings are accepted (same maximum), a grid search or a per-parameter prior refused by
    name."""
    net, X, y = problem(3, "classification", depth=2)
    la = Laplace(net, "classification").fit(X, y)
    delta = la.optimize_prior_precision()
    assert la.optimize_prior_precision(method="marglik", pred_type="glm", n_steps=50, lr=0.1) == delta
    assert la.optimize_prior_precision("glm", prior_structure="scalar", verbose=False) == delta
    for bad, what in [
        ({"method": "gridsearch"}, "method='gridsearch'"),
        ({"prior_structure": "diag"}, "prior_structure='diag'"),
        ({"val_loader": [(X, y)]}, "got val_loader"),
        ({"bogus": 1}, "got bogus"),
    ]:
        with pytest.raises(InvalidArgumentError, match=what):
            la.optimize_prior_precision(**bad)


def test_a_laplace_torch_constructor_call_ports_as_written():
    """laplace-torch's ``Laplace(model, "classification", subset_of_weights="all", hessian_structure="full")``
    was a raw TypeError (a probe): what this class computes is accepted (the same evidence as the dense
    reference), an approximation, a temperature or a curvature backend is refused by name."""
    net, X, y = problem(4, "classification", depth=2)
    la = Laplace(
        net,
        "classification",
        subset_of_weights="all",
        hessian_structure="full",
        temperature=1.0,
        backend=None,
    ).fit(X, y)
    want = dense_laplace(net, X, y, "classification", "gauss_newton", 1.0, 1.0)[0]
    assert math.isclose(la.log_marginal_likelihood(), want, rel_tol=1e-12)
    for bad, what in [
        ({"subset_of_weights": "last_layer"}, "subset_of_weights='last_layer'"),
        ({"hessian_structure": "kron"}, "hessian_structure='kron'"),
        ({"temperature": 0.5}, "temperature=0.5"),
        ({"backend": type("AsdlHessian", (), {})}, "backend='AsdlHessian'"),
    ]:
        with pytest.raises(InvalidArgumentError, match=re.escape(what)):
            Laplace(net, "classification", **bad)


def test_optimize_prior_and_noise_for_regression():
    net, X, y = problem(4, "regression", depth=2, width=3, N=10)
    la = Laplace(net, "regression", sigma_noise=1.0).fit(X, y)
    delta = la.optimize_prior_precision(optimize_sigma_noise=True, tol=1e-6)
    sigma = la.sigma_noise
    best = dense_laplace(net, X, y, "regression", "gauss_newton", delta, sigma)[0]
    assert la.log_marginal_likelihood() == pytest.approx(best, rel=1e-10)
    for dd, ds in [(1.05, 1), (1 / 1.05, 1), (1, 1.05), (1, 1 / 1.05)]:
        assert dense_laplace(net, X, y, "regression", "gauss_newton", delta * dd, sigma * ds)[0] < best


@pytest.mark.parametrize("scale", [10.0, 50.0])
def test_joint_noise_search_finds_the_dense_maximum_on_unscaled_targets(scale):
    """Targets of scale 10-50 with the default starting sigma_noise = 1: the joint search returned the
    prior precision's lower bound and a sigma 43-75 nats below the evidence's maximum, warning that the
    evidence may have no maximum inside (found by a review). The evidence at the returned point is now at
    least a dense grid's maximum over both default bounds, and no bound is reported."""
    net, X, y = problem(6, "regression", depth=2, width=8, C=1, N=40)
    y = scale * y
    lf = torch.nn.MSELoss(reduction="sum")
    ev = torch.linalg.eigvalsh(autograd_gauss_newton(net, lf, X, y))
    theta2 = float(sum((p.detach() ** 2).sum() for p in net.parameters()))
    with torch.no_grad():
        sse = float(lf(net(X), y))
    n, N = ev.numel(), y.numel()
    d = torch.logspace(-6, 6, 241, dtype=torch.float64)[:, None]
    s = torch.logspace(-4, 4, 321, dtype=torch.float64)[None, :]
    c = 0.5 / s**2
    logdet = (c[..., None] * ev + d[..., None]).log().sum(-1)  # (241, 321)
    lml = -sse * c - N * (s * math.sqrt(2 * math.pi)).log() - 0.5 * (logdet - n * d.log() + d * theta2)
    la = Laplace(net, "regression", sigma_noise=1.0).fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no "at the search's bound" warning)
        delta = la.optimize_prior_precision(optimize_sigma_noise=True)
    assert la.log_marginal_likelihood() >= float(lml.max()) - 1e-6
    assert la.log_marginal_likelihood() == pytest.approx(
        dense_laplace(net, X, y, "regression", "gauss_newton", delta, la.sigma_noise)[0], rel=1e-10
    )


@pytest.mark.parametrize("N", [10, 30])
def test_joint_noise_search_on_an_over_parameterized_model(N):
    """More parameters (41) than outputs: G has a null space, and the joint search's smallest kappa (2e-14)
    is below its resolution, where the Gauss-Newton factorization is not positive definite to rounding:
    the search stopped with an IndefiniteError that named curvature='gauss_newton' (found by a review). It
    finds the dense maximum."""
    net, X, y = problem(7, "regression", depth=2, width=8, C=1, N=N)
    la = Laplace(net, "regression").fit(X, y)
    delta = la.optimize_prior_precision(optimize_sigma_noise=True)
    best = dense_laplace(net, X, y, "regression", "gauss_newton", delta, la.sigma_noise)[0]
    sigma = la.sigma_noise
    for dd, ds in [(1.05, 1), (1 / 1.05, 1), (1, 1.05), (1, 1 / 1.05)]:
        assert dense_laplace(net, X, y, "regression", "gauss_newton", delta * dd, sigma * ds)[0] < best


def test_joint_search_where_no_evidence_can_be_evaluated_is_refused():
    """Bounds where every G + kappa I is singular to working precision (an over-parameterized model, delta
    in (1e-14, 1e-12)): the search stored its lower bounds, whose evidence then raised (found by a
    review). Refused by name instead. (25 examples, 41 parameters: the Riccati route; with 10 the
    Woodbury form answers: test_woodbury_evidence_where_the_sweep_is_singular.)"""
    net, X, y = problem(7, "regression", depth=2, width=8, C=1, N=25)
    la = Laplace(net, "regression").fit(X, y)
    la._spectrum = lambda evaluations: None  # (the factorization route, as for a large model)
    with pytest.raises(SingularError, match="cannot be evaluated anywhere"):
        la.optimize_prior_precision((1e-14, 1e-12), optimize_sigma_noise=True, sigma_bounds=(1e-4, 1e-3))


def test_a_noise_at_its_bound_is_reported():
    net, X, y = problem(6, "regression", depth=2, width=8, C=1, N=40)
    la = Laplace(net, "regression").fit(X, 50.0 * y)
    with pytest.warns(UserWarning, match="noise's optimum 80 is at the search's bound"):
        la.optimize_prior_precision(optimize_sigma_noise=True, sigma_bounds=(80.0, 1e4))


def test_samples_have_the_posterior_covariance():
    net, X, y = problem(5, "regression", depth=2, width=3, d_in=2, C=1, N=6)
    la = Laplace(net, "regression", prior_precision=2.0, sigma_noise=0.5).fit(X, y)
    k = 40000
    S = la.sample(k, generator=torch.Generator().manual_seed(1))
    assert S.shape == (k, la.n_params)
    Sigma = la.posterior_covariance()
    C = torch.cov(S.T)
    se = ((Sigma.diagonal()[:, None] * Sigma.diagonal()[None, :] + Sigma**2) / k).sqrt()
    assert float(((C - Sigma).abs() / se).max()) < 6.0
    assert float(((S.mean(0) - la.mean).abs() / (Sigma.diagonal() / k).sqrt()).max()) < 6.0


def test_mc_link_and_nn_predictive_and_loader():
    net, X, y = problem(6, "classification", depth=2, C=3)
    loader = [(X[:5], y[:5]), (X[5:], y[5:])]
    la = Laplace(net, "classification", prior_precision=1e8).fit(loader)  # posterior ~ a point mass
    mc = la(X, link_approx="mc", n_samples=50, generator=torch.Generator().manual_seed(0))
    sm = torch.softmax(net(X).detach(), -1)
    assert torch.allclose(mc, sm, atol=1e-3)
    assert torch.allclose(
        la(X, pred_type="nn", n_samples=20, generator=torch.Generator().manual_seed(0)), sm, atol=1e-3
    )
    la2 = Laplace(net, "classification", prior_precision=0.1).fit(X, y)
    g = torch.Generator().manual_seed(0)
    mc2, pr2 = la2(X, link_approx="mc", n_samples=20000, generator=g), la2(X, link_approx="probit")
    assert torch.allclose(mc2.sum(1), torch.ones(len(X), dtype=mc2.dtype))
    assert float((mc2 - pr2).abs().max()) < 0.05  # the probit approximation of the same Gaussian integral
    with pytest.raises(ValueError, match="link_approx"):
        la2(X, link_approx="laplace")
    with pytest.raises(ValueError, match="likelihood"):
        Laplace(net, "poisson")
    with pytest.raises(RuntimeError, match="fit"):
        Laplace(net, "classification").log_marginal_likelihood()


# -- argument checks (probe of 2027-01, /tmp/probe_cli/FINDINGS.md D1, D17) -----------------------
def test_prior_mean_vector_matches_dense_and_a_tensor_scalar_equals_the_number():
    net, X, y = problem(7, "classification", depth=2)
    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    mu0 = 0.3 * torch.randn(theta.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lml = dense_laplace(net, X, y, "classification", "gauss_newton", 0.7, 1.0, mu0=mu0)[0]
    la = Laplace(net, "classification", prior_precision=0.7, prior_mean=mu0).fit(X, y)
    assert la.log_marginal_likelihood() == pytest.approx(lml, rel=1e-10)
    a = Laplace(net, "classification", prior_mean=0.25).fit(X, y).log_marginal_likelihood()
    b = Laplace(net, "classification", prior_mean=torch.tensor(0.25)).fit(X, y).log_marginal_likelihood()
    assert a == b


@pytest.mark.parametrize(
    "make, error, message",
    [
        (
            lambda n: torch.zeros(n, 1, dtype=torch.float64),
            ShapeMismatchError,
            "got shape",
        ),  # would broadcast
        (lambda n: torch.zeros(3, dtype=torch.float64), ShapeMismatchError, "(n,) tensor with n = "),
        (lambda n: float("nan"), NonFiniteArgumentError, "prior_mean must be finite"),
        (
            lambda n: torch.full((n,), math.inf, dtype=torch.float64),
            NonFiniteArgumentError,
            "NaN or infinite",
        ),
        (lambda n: "0", InvalidArgumentError, "prior_mean must be a real number"),
    ],
)
def test_bad_prior_mean_refused_at_construction(make, error, message):
    net, _, _ = problem(0, "classification")
    n = sum(p.numel() for p in net.parameters())
    with pytest.raises(error, match=re.escape(message)):
        Laplace(net, "classification", prior_mean=make(n))


def test_prior_mean_checked_again_at_fit_when_parameters_were_frozen():
    net, X, y = problem(1, "classification")
    n = sum(p.numel() for p in net.parameters())
    la = Laplace(net, "classification", prior_mean=torch.zeros(n, dtype=torch.float64))
    net[0].bias.requires_grad_(False)
    with pytest.raises(ShapeMismatchError, match=f"n = {n - net[0].bias.numel()}"):
        la.fit(X, y)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda la, X: Laplace(la.model, "classification", prior_precision=torch.ones(5)),
            InvalidArgumentError,
            "prior_precision must be one positive number",
        ),
        (
            lambda la, X: la.log_marginal_likelihood(prior_precision="1"),
            InvalidArgumentError,
            "prior_precision must be a real number",
        ),
        (
            lambda la, X: la.optimize_prior_precision(bounds=(0.0, 1.0)),
            InvalidArgumentError,
            "bounds[0] must be a positive number",
        ),
        (
            lambda la, X: la.optimize_prior_precision(bounds=(10.0, 1.0)),
            InvalidArgumentError,
            "bounds must be (low, high) with low < high",
        ),
        (
            lambda la, X: la.optimize_prior_precision(bounds=1.0),
            InvalidArgumentError,
            "bounds must be a pair (low, high)",
        ),
        (lambda la, X: la.optimize_prior_precision(tol=0), InvalidArgumentError, "tol must be a positive"),
        (lambda la, X: la.sample(0), InvalidArgumentError, "n_samples must be an int >= 1, got 0"),
        (lambda la, X: la.sample(-1), InvalidArgumentError, "n_samples must be an int >= 1, got -1"),
        (lambda la, X: la.sample(2.0), InvalidArgumentError, "n_samples must be an int >= 1, got 2.0"),
        (
            lambda la, X: la(X, link_approx="mc", n_samples=0),
            InvalidArgumentError,
            "n_samples must be an int",
        ),
        (lambda la, X: la(X, pred_type="nn", n_samples=0), InvalidArgumentError, "n_samples must be an int"),
        (lambda la, X: la(X.float()), DtypeMismatchError, "convert with X.to(torch.float64)"),
        (lambda la, X: la(X.numpy()), InvalidArgumentError, "X must be a torch.Tensor"),
    ],
)
def test_bad_arguments_get_named_errors(call, error, message):
    net, X, y = problem(2, "classification", C=3)
    la = Laplace(net, "classification").fit(X, y)
    with pytest.raises(error, match=re.escape(message)):
        call(la, X[:3])
    assert la.sample(1).shape == (1, la.n_params)


def test_predictive_inputs_the_model_cannot_take_are_named():
    """la(X) checks X through the chain: a wrong width, a NaN, no examples (were torch's errors)."""
    torch.manual_seed(0)
    nn = torch.nn
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    X, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    la = Laplace(net, "classification").fit(X, y)
    with pytest.raises(ShapeMismatchError, match="failed on input"):
        la(torch.randn(2, 5, dtype=torch.float64))
    with pytest.raises(ShapeMismatchError, match="N >= 1"):
        la(X[:0])
    bad = X[:2].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        la(bad, pred_type="nn")
    assert torch.allclose(la(X[:3]).sum(-1), torch.ones(3, dtype=torch.float64))


def test_stale_fit_bad_bounds_and_unsupported_outputs_are_named():
    """(1) After an in-place change of the weights the predictive (the new outputs and Jacobians with the
    old posterior) is refused; a new fit works. (2) A prior-precision search whose every value leaves the
    Hessian posterior indefinite raises instead of storing the bound. (3) sigma_noise is refused for
    classification. (4) Outputs (N, C, T): named refusal of the predictive. (5) A regression model with
    outputs (N,) gets an (N,) variance."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    X, y = torch.randn(20, 3, dtype=torch.float64), torch.randint(0, 3, (20,))
    la = Laplace(net, "classification").fit(X, y)
    la(X[:2])
    with torch.no_grad():
        net[0].weight.add_(1.0)
    with pytest.raises(InvalidArgumentError, match="parameters changed since"):
        la(X[:2])
    la.fit(X, y)(X[:2])
    lah = Laplace(net, "classification", curvature="hessian").fit(X, y)
    lam = float(
        torch.linalg.eigvalsh(autograd_hessian(net, torch.nn.CrossEntropyLoss(reduction="sum"), X, y))[0]
    )
    assert lam < -1e-3  # an untrained net: the Hessian is indefinite
    with pytest.raises(IndefiniteError, match="every prior precision"):
        lah.optimize_prior_precision(bounds=(1e-6, 0.5 * abs(lam)))
    with pytest.raises(InvalidArgumentError, match="regression only"):
        la.log_marginal_likelihood(sigma_noise=3.0)

    class PerPosition(torch.nn.Module):
        def forward(self, x):
            return x.reshape(len(x), 3, 2)

    pp = torch.nn.Sequential(torch.nn.Linear(3, 6), PerPosition()).double()
    la2 = Laplace(pp, "classification").fit(X, torch.randint(0, 3, (20, 2)))
    assert math.isfinite(la2.log_marginal_likelihood())
    with pytest.raises(ShapeMismatchError, match="per-position"):
        la2(X[:2])
    reg = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1), torch.nn.Flatten(0)
    )
    la3 = Laplace(reg.double(), "regression").fit(X, torch.randn(20, dtype=torch.float64))
    f_mu, f_var = la3(X[:5])
    assert f_mu.shape == f_var.shape == (5,) and bool((f_var > 0).all())


# -- probe of 2026-12-03 (/tmp/probe_apps) ---------------------------------------------------------------
def test_regression_evidence_counts_every_output_of_per_position_models():
    """(N, C, T) regression outputs: the Gaussian likelihood has N C T terms (it counted N T)."""
    torch.manual_seed(0)
    D = torch.float64
    X, Y = torch.randn(20, 4, dtype=D), torch.randn(20, 2, 3, dtype=D)
    m = torch.nn.Sequential(
        torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 6), torch.nn.Unflatten(1, (2, 3))
    ).double()
    sigma = 0.7
    la = Laplace(m, "regression", prior_precision=1.3, sigma_noise=sigma).fit(X, Y)
    with torch.no_grad():
        sse = float(((m(X) - Y) ** 2).sum())
    ll = -sse / (2 * sigma**2) - Y.numel() * math.log(sigma * math.sqrt(2 * math.pi))
    assert abs(la.log_likelihood() - ll) < 1e-10 * abs(ll)


def test_hessian_evidence_without_a_maximum_is_refused():
    """With an indefinite Hessian the evidence grows without bound as the prior precision approaches
    -lambda_min(H) from above; the search returned that edge as if it were the optimum."""
    torch.manual_seed(0)
    D = torch.float64
    m = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    X, y = torch.randn(25, 3, dtype=D), torch.randint(0, 3, (25,))
    la = Laplace(m, "classification", curvature="hessian", prior_precision=50.0).fit(X, y)
    with pytest.raises(IndefiniteError, match="no maximum"):
        la.optimize_prior_precision()


def test_fit_and_variance_arguments_are_checked():
    net, X, y = problem(7, "classification", depth=2)
    la = Laplace(net, "classification")
    with pytest.raises(InvalidArgumentError, match="no batch"):
        la.fit([])
    with pytest.raises(InvalidArgumentError, match="pair"):
        la.fit([{"x": X, "y": y}])
    la.fit(X, y)
    n = sum(p.numel() for p in net.parameters())
    with pytest.raises(ShapeMismatchError, match=f"{n}"):
        la.functional_variance(torch.zeros(3, n, dtype=X.dtype))
    next(net.parameters()).requires_grad_(False)  # the set of trainable parameters changed after fit
    with pytest.raises(InvalidArgumentError, match="fit it again"):
        la(X, pred_type="glm")


def test_predictive_under_inference_mode():
    """A prediction wrapped in torch.inference_mode() (common for serving) needs no autograd: the
    staleness check of the fitted point must not refuse it (it did, for a moment, this session)."""
    net, X, y = problem(3, "classification", depth=2)
    la = Laplace(net, "classification").fit(X, y)
    p0 = la(X[:4])
    with torch.inference_mode():
        p1 = la(X[:4])
    assert torch.equal(p0, p1)


def test_an_unbounded_evidence_is_named_wherever_the_search_lands():
    """With the Hessian of an indefinite MAP neighbourhood, the evidence grows without bound as ``delta``
    approaches ``-lambda_min(H)`` from above; Brent's search stopped at an interior local maximum
    (delta 1.83 against the edge 0.917, where the evidence is larger) and returned it, silently, unless
    it happened to land at the edge (found by a probe). Bounds above the edge have a maximum."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    X, y = torch.randn(30, 2, dtype=torch.float64), torch.randint(0, 3, (30,))
    lf = torch.nn.CrossEntropyLoss(reduction="sum")
    opt = torch.optim.LBFGS(
        net.parameters(),
        max_iter=500,
        tolerance_grad=1e-12,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = lf(net(X), y) + 0.5 * sum((p**2).sum() for p in net.parameters())
        loss.backward()
        return loss

    opt.step(closure)  # the MAP of prior precision 1
    la = Laplace(net, "classification", curvature="hessian").fit(X, y)
    lam = la.operator.min_eigenvalue()
    assert lam < 0
    with pytest.raises(IndefiniteError, match="no maximum"):
        la.optimize_prior_precision()
    lo = 2 * -lam
    delta = la.optimize_prior_precision(bounds=(lo, 1e6))
    assert delta >= lo
    assert la.log_marginal_likelihood(delta) >= la.log_marginal_likelihood(min(1e6, 1.5 * delta)) - 1e-9


def test_a_cross_entropy_that_ignores_a_class_is_not_taken_as_the_likelihood():
    """``Laplace(net, nn.CrossEntropyLoss(ignore_index=k))`` was read as the categorical likelihood
    of every example, the ignored ones included (log-likelihood -14.1 against the loss's -10.2;
    found by a probe). Named, with what to do."""
    net = torch.nn.Sequential(torch.nn.Linear(2, 3)).double()
    X, y = torch.randn(6, 2, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    with pytest.raises(InvalidArgumentError, match="ignores 2 of these targets"):
        Laplace(net, torch.nn.CrossEntropyLoss(ignore_index=1)).fit(X, y)
    Laplace(net, torch.nn.CrossEntropyLoss(ignore_index=-1)).fit(X, y)  # ignores none of them


def test_per_position_targets_padded_with_an_index_that_is_no_class_are_fitted():
    """A tagger's padding positions (targets (N, T), -100 or 255 where there is no token) were refused with
    "drop those examples" -- which cannot be done for positions inside a sequence (a probe). The evidence
    is that of the other tokens, as the summed loss's: against the dense textbook formula, and for both the
    string likelihood and a loss module; an ignored class (0 <= ignore_index < C) is still refused."""

    class PerPosition(torch.nn.Module):
        def forward(self, x):
            return x.reshape(len(x), 3, 2)

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 6), PerPosition())
    net = net.double()
    X, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 3, (8, 2))
    y[1, 1] = y[4, 0] = y[6, 1] = -100  # padding
    want = dense_laplace(net, X, y, "classification", "gauss_newton", 0.7, 1.0)[0]
    for likelihood in ("classification", torch.nn.CrossEntropyLoss(reduction="sum")):
        la = Laplace(net, likelihood, prior_precision=0.7).fit(X, y)
        assert math.isclose(la.log_marginal_likelihood(), want, rel_tol=1e-12)
    y255 = torch.where(y == -100, 255, y)
    la = Laplace(net, torch.nn.CrossEntropyLoss(ignore_index=255), prior_precision=0.7).fit(X, y255)
    assert math.isclose(la.log_marginal_likelihood(), want, rel_tol=1e-12)
    with pytest.raises(InvalidArgumentError, match="ignores"):
        Laplace(net, torch.nn.CrossEntropyLoss(ignore_index=1)).fit(X, y.clamp_min(0))


def test_predictives_of_outputs_n_and_of_token_ids():
    """Two shapes the predictive refused or crashed on (found by a probe): the ``pred_type="nn"``
    predictive of a regression model with outputs (N,) (a raw einsum error; it now gives variances
    (N,) like the GLM predictive), and the GLM predictive of an Embedding-first model on (N,) token
    ids (refused as "not a batch" although ``fit`` takes them), checked against the dense
    ``J P^{-1} J^T``."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(2, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1), torch.nn.Flatten(0)
    ).double()
    X, y = torch.randn(12, 2, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    la = Laplace(net, "regression", prior_precision=1e3).fit(X, y)  # a tight posterior: nearly linear
    mu, var = la(X[:3], pred_type="nn", n_samples=4000, generator=torch.Generator().manual_seed(0))
    glm_mu, glm_var = la(X[:3])
    assert mu.shape == var.shape == glm_var.shape == (3,)
    torch.testing.assert_close(var, glm_var, rtol=0.15, atol=0.0)  # a 4000-sample estimate
    with pytest.raises(InvalidArgumentError, match="at least 2"):  # one draw has no spread (it gave 0)
        la(X[:3], pred_type="nn", n_samples=1)

    emb = torch.nn.Sequential(torch.nn.Embedding(6, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()
    ids, labels = torch.arange(12) % 6, torch.arange(12) % 2
    la = Laplace(emb, "classification", prior_precision=2.0).fit(ids, labels)
    probs = la(ids[:4], link_approx="probit")
    params = [p for p in emb.parameters()]
    J = torch.stack(
        [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(emb(ids[i : i + 1])[0, c], params)])
            for i in range(4)
            for c in range(2)
        ]
    ).view(4, 2, -1)
    from reference import autograd_gauss_newton

    G = autograd_gauss_newton(emb, torch.nn.CrossEntropyLoss(reduction="sum"), ids, labels)
    P = G + 2.0 * torch.eye(G.shape[0], dtype=torch.float64)
    f_var = J @ torch.linalg.solve(P, J.transpose(1, 2))
    kappa = 1 / torch.sqrt(1 + math.pi / 8 * f_var.diagonal(dim1=1, dim2=2))
    with torch.no_grad():
        ref = torch.softmax(kappa * emb(ids[:4]), -1)
    torch.testing.assert_close(probs, ref, rtol=1e-10, atol=1e-12)


def test_loader_batches_that_differ_are_named():
    """``fit(loader)`` with batches of different feature widths raised torch.cat's raw RuntimeError,
    and a float32 batch among float64 ones was promoted silently (found by a probe)."""
    net = torch.nn.Sequential(torch.nn.Linear(2, 3)).double()
    X, y = torch.randn(12, 2, dtype=torch.float64), torch.randint(0, 3, (12,))
    for batches, error in (
        ([(X[:6], y[:6]), (torch.randn(6, 3, dtype=torch.float64), y[6:])], ShapeMismatchError),
        ([(X[:6], y[:6]), (X[6:].float(), y[6:])], DtypeMismatchError),
    ):
        with pytest.raises(error, match="batches' inputs differ"):
            Laplace(net, "classification").fit(batches)
    Laplace(net, "classification").fit([(X[:6], y[:6]), (X[6:], y[6:].int())])  # integer targets mix
    # a third element (sample weights) was dropped silently: the unweighted evidence (a probe)
    w = torch.rand(12, dtype=torch.float64)
    with pytest.raises(InvalidArgumentError, match="got 3 elements"):
        Laplace(net, "classification").fit([(X[:6], y[:6], w[:6]), (X[6:], y[6:], w[6:])])
    with pytest.raises(InvalidArgumentError, match="got 3 elements"):
        InfluenceFunction(net, nn.CrossEntropyLoss()).fit([(X, y, w)])

    class Batch:  # indexes like a pair, has no len() (a review: refused by the element count)
        def __init__(self, x, t):
            self.x, self.t = x, t

        def __getitem__(self, i):
            return (self.x, self.t)[i]

    Laplace(net, "classification").fit([Batch(X[:6], y[:6]), Batch(X[6:], y[6:])])


def test_classification_targets_of_minus_100_are_refused_not_dropped():
    """The string likelihood's cross-entropy ignored targets of -100 (torch's default ignore_index): the
    evidence was that of the other examples, with n_data counting all."""
    torch.manual_seed(0)
    X, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    y[[2, 7]] = -100
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with pytest.raises(InvalidArgumentError, match="ignores 2 of these targets"):
        Laplace(net, "classification").fit(X, y)


def test_a_refused_refit_keeps_the_previous_fit():
    """A fit refused at its prior-mean check (a layer frozen since: the (n,) prior mean no longer fits)
    had installed the new operator beside the old loss: stale log-likelihoods, raw RuntimeErrors."""
    torch.manual_seed(0)
    X, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    n = sum(p.numel() for p in net.parameters())
    la = Laplace(net, "classification", prior_mean=torch.zeros(n, dtype=torch.float64)).fit(X, y)
    lml = la.log_marginal_likelihood()
    net[0].weight.requires_grad_(False)
    with pytest.raises(ShapeMismatchError):
        la.fit(X, y)
    net[0].weight.requires_grad_(True)
    assert la.n_params == n and la.log_marginal_likelihood() == lml


def test_regression_targets_of_minus_100_are_values():
    """The classification likelihood's ignore_index check reached the regression likelihood too: an
    integer target of -100 was refused as an 'ignored' class index."""
    torch.manual_seed(0)
    X = torch.randn(10, 3, dtype=torch.float64)
    y = torch.randint(-100, 100, (10, 1))
    y[0] = -100
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    la = Laplace(net, "regression").fit(X, y.double())
    assert math.isfinite(la.log_marginal_likelihood())
    Laplace(net, "regression").fit(X, y)


def test_a_per_parameter_prior_precision_is_refused_briefly():
    """A tensor prior precision (laplace-torch takes per-parameter ones) is refused by name and shape --
    the message printed the whole tensor before (a review)."""
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with pytest.raises(InvalidArgumentError, match=r"shape \(38,\): per-parameter") as e:
        Laplace(net, "classification", prior_precision=torch.ones(38, dtype=torch.float64))
    assert len(str(e.value)) < 200


def test_extreme_noise_and_a_boundary_optimum_are_named():
    """sigma_noise = 1e-200 passed the constructor and failed later with a ZeroDivisionError (sigma^2
    underflowed); an optimum at the search's bound came back without a word."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    X = torch.randn(20, 3, dtype=torch.float64)
    y = X[:, :1].sin()
    for sigma in (1e-200, 1e200):
        with pytest.raises(InvalidArgumentError, match="leaves float64's range"):
            Laplace(net, "regression", sigma_noise=sigma)
    la = Laplace(net, "regression").fit(X, y)
    with pytest.raises(InvalidArgumentError, match="prior precision"):
        la.log_marginal_likelihood(prior_precision=1e200)
    with pytest.warns(UserWarning, match="at the search's bound"):
        la.optimize_prior_precision(bounds=(1e-6, 1e-5))


def test_posterior_covariance_before_fit_is_not_fitted():
    """It raised AttributeError ('Laplace' object has no attribute 'n_params'); the README promises
    NotFittedError for every use before fit (found by a README audit)."""
    la = Laplace(torch.nn.Sequential(torch.nn.Linear(2, 3)), "classification")
    from hessinv.errors import NotFittedError

    with pytest.raises(NotFittedError):
        la.posterior_covariance()


def test_an_unbounded_evidence_names_the_noise_search_that_made_it():
    """With the noise searched, the largest ``c`` comes from ``sigma_bounds[0]`` (1e-4 by default: c =
    5e7): the refusal said "indefinite at every prior precision in bounds" and named only ``bounds``, while
    the same model without the noise search has a finite edge (about 14)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    X, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 1, dtype=torch.float64)
    la = Laplace(m, "regression", curvature="hessian", sigma_noise=0.7).fit(X, y)
    with pytest.raises(IndefiniteError) as e:
        la.optimize_prior_precision()
    assert "sigma_bounds" not in str(e.value)
    with pytest.raises(IndefiniteError, match=r"sigma_bounds\[0\] = 0.0001"):
        la.optimize_prior_precision(optimize_sigma_noise=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_the_prior_precision_search_takes_one_eigendecomposition_where_cheaper(
    likelihood, dtype, monkeypatch
):
    """``G`` does not depend on ``delta``: every evaluation of the search refactored ``G + (delta / c) I``
    (16 factorizations, 16 s on digits at n = 610, against 0.14 s for one dense ``eigvalsh`` and the same
    search). Where one eigendecomposition is cheaper, the search runs on ``G``'s eigenvalues: no
    factorization, and the optimum and evidence of the factorization route (float32 models too: a review
    found the first version's float32 matrix 0.26 nats off at delta = 1e-6; G is now the float64 twin's)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3 if likelihood == "classification" else 2))
    m = m.to(dtype)
    X = torch.randn(30, 4, dtype=dtype)
    y = torch.randint(0, 3, (30,)) if likelihood == "classification" else torch.randn(30, 2, dtype=dtype)
    results = []
    for spectrum in (True, False):
        la = Laplace(m, likelihood, curvature="gauss_newton").fit(X, y)
        calls = []
        real = type(la.operator).factor
        monkeypatch.setattr(
            type(la.operator), "factor", lambda op, *a, c=calls, f=real, **k: (c.append(1), f(op, *a, **k))[1]
        )
        if not spectrum:
            monkeypatch.setattr(Laplace, "_spectrum", lambda self, evaluations: None)
        delta = la.optimize_prior_precision(optimize_sigma_noise=likelihood == "regression")
        assert (len(calls) == 0) == spectrum
        monkeypatch.undo()
        results.append((delta, la.sigma_noise, la.log_marginal_likelihood()))
    (d1, s1, e1), (d2, s2, e2) = results
    assert d1 == pytest.approx(d2, rel=1e-4) and s1 == pytest.approx(s2, rel=1e-4)
    assert e1 == pytest.approx(e2, rel=1e-9, abs=1e-9)
    # a null space (8 examples: rank <= 16 of 51) at the search's lowest prior precision: both routes agree
    la = Laplace(m, likelihood, curvature="gauss_newton").fit(X[:8], y[:8])
    ref = la.log_marginal_likelihood(prior_precision=1e-6)
    la._search_spectrum = la._spectrum(10**9)
    assert la._search_spectrum is not None
    assert la.log_marginal_likelihood(prior_precision=1e-6) == pytest.approx(ref, rel=1e-9, abs=1e-8)


def test_a_singular_posterior_precision_is_named_in_the_laplace_terms():
    """A prior precision of 1e-300 on a Gauss-Newton matrix with a null space: the SingularError spoke of
    a "damping", pivots and GMRES, never of the prior precision the user passed."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    # rank <= 40 of 51 (B C = 60 rows of G's root, more than n: no Woodbury rescue; with fewer rows it
    # answers, test_woodbury_evidence_where_the_sweep_is_singular)
    X, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    la = Laplace(m, "classification", curvature="gauss_newton").fit(X, y)
    with pytest.raises(SingularError, match=r"prior precision delta = 1e-300.*larger prior precision"):
        la.log_marginal_likelihood(prior_precision=1e-300)


@pytest.mark.parametrize("delta", [1e-300, 1e-12, 1e-3])
def test_woodbury_evidence_where_the_sweep_is_singular(delta):
    """10 examples of one output, 41 parameters: ``G + kappa I`` (``kappa = delta / c``, as small as
    5e-307), which the sweep (and a dense LU) call singular to working precision, goes through ``G``'s
    square root (:meth:`hessinv.GaussNewton.factor`'s rescue), whose log-determinant is exact: ``(n - r)
    log kappa + sum log(mu_i + kappa)``, ``mu`` the nonzero eigenvalues of ``G = 2 J^T J``, those of ``2 J
    J^T`` (plain autograd's Jacobian)."""
    net, X, y = problem(7, "regression", depth=2, width=8, C=1, N=10)
    la = Laplace(net, "regression", sigma_noise=1e-3).fit(X, y)
    J = autograd_output_jacobian(net, X).reshape(10, -1)
    mu, n = torch.linalg.eigvalsh(2 * J @ J.T), J.shape[1]
    c = 0.5 / la.sigma_noise**2
    logdet = (n - 10) * math.log(delta) + float(torch.log(c * mu + delta).sum())  # of P = c G + delta I
    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    with torch.no_grad():
        sse = float(((net(X) - y) ** 2).sum())
    ll = -sse * c - 10 * math.log(la.sigma_noise * math.sqrt(2 * math.pi))
    ref = ll - 0.5 * (logdet - n * math.log(delta) + delta * float((theta**2).sum()))
    assert la.log_marginal_likelihood(prior_precision=delta) == pytest.approx(ref, rel=1e-10)


def test_every_result_of_a_fit_refuses_a_model_trained_on_since():
    """After training went on past ``fit``, ``la(X)`` said "fit it again" but the evidence, the prior
    precision search, the posterior variances and the samples silently answered for the old fit (-48.2
    against -1248.4 at the current parameters; a review)."""
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    X, y = torch.randn(30, 4, dtype=torch.float64), torch.randint(0, 3, (30,))
    la = Laplace(net, "classification").fit(X, y)
    la.log_marginal_likelihood(), la.posterior_variance(), la.sample(2)  # fine at the fitted point
    with torch.no_grad():
        net[0].weight.add_(0.1)
    for call in (
        la.log_marginal_likelihood,
        la.optimize_prior_precision,
        la.posterior_variance,
        lambda: la.sample(2),
        lambda: la(X[:2]),
    ):
        with pytest.raises(InvalidArgumentError, match="fit it again"):
            call()


def test_settings_assigned_after_construction_are_checked():
    """laplace-torch users set prior_precision / sigma_noise / prior_mean on the object: a string, 0, a
    negative or a NaN reached the posterior's solves (TypeError, ZeroDivisionError, a sign dropped, NaN
    evidence; a probe). Each assignment is checked as the constructor's arguments are; class probabilities
    below 0 are refused at fit (they made G indefinite, and the message advised curvature='gauss_newton',
    the curvature in use); a lower bound of 1e-40 no longer breaks the prior-precision search."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    X, y = torch.randn(20, 3, dtype=torch.float64), torch.randint(0, 4, (20,))
    la = Laplace(net, "classification").fit(X, y)
    for bad in ("2.0", 0.0, -0.5, float("nan"), torch.ones(3)):
        with pytest.raises(InvalidArgumentError, match="prior_precision"):
            la.prior_precision = bad
        with pytest.raises(InvalidArgumentError, match="sigma_noise"):
            la.sigma_noise = bad
    with pytest.raises(ShapeMismatchError, match="prior_mean"):
        la.prior_mean = torch.zeros(5, dtype=torch.float64)
    with pytest.raises(NonFiniteArgumentError, match="prior_mean"):
        la.prior_mean = float("nan")
    assert la.prior_precision == 1.0 and la.prior_mean == 0.0  # (unchanged by the refusals)
    with pytest.raises(InvalidArgumentError, match=">= 0"):
        Laplace(net, "classification").fit(X, torch.randn(20, 4, dtype=torch.float64))
    assert math.isfinite(la.log_marginal_likelihood())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (an optimum at a bound says so)
        la.optimize_prior_precision(bounds=(1e-40, 1e6))
    assert 1e-40 < la.prior_precision < 1e6 and math.isfinite(la.log_marginal_likelihood())


def test_functional_variance_takes_the_covariance_where_it_has_fewer_columns():
    """N C right-hand sides above 2 n: P^{-1} from n solves, then J P^{-1} J^T (many classes at many test
    points on a last layer: 10000 columns against 3400); the same numbers as the N C solves."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 6)).double()
    X, y = torch.randn(30, 3, dtype=torch.float64), torch.randint(0, 6, (30,))
    la = Laplace(net, "classification", prior_precision=0.5).fit(X, y)
    n = la.n_params
    J = torch.randn(20, 6, n, dtype=torch.float64)  # 120 columns > 2 n = 92
    assert 20 * 6 > 2 * n
    got = la.functional_variance(J)
    P = autograd_gauss_newton(net, nn.CrossEntropyLoss(reduction="sum"), X, y) + 0.5 * torch.eye(
        n, dtype=torch.float64
    )
    want = J @ torch.linalg.solve(P, J.reshape(-1, n).T).T.reshape(20, 6, n).mT
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    few = la.functional_variance(J[:2])  # (12 columns: the solves' route)
    torch.testing.assert_close(few, want[:2], rtol=1e-10, atol=1e-12)


def _cnn_problem():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.Tanh(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 2), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(4, 4),
    ).double()  # fmt: skip
    X = torch.randn(24, 1, 8, 8, generator=g, dtype=torch.float64)
    return model, X, torch.randint(0, 4, (24,), generator=g)


def test_a_prior_precision_below_the_resolution_of_g_is_not_indefinite():
    """delta = 1e-13 on a CNN's Gauss-Newton posterior (positive semi-definite G): the sweep perturbed
    pivots, and the evidence raised IndefiniteError ('c G + delta I is indefinite ... check the targets')
    showing an inertia with no negative eigenvalue; the influence fit warned 'indefinite' likewise. The
    evidence against ``log det(G + delta I) = sum log(nu_i + delta) + (n - r) log delta``, ``nu`` the
    eigenvalues of ``A A^T`` for ``G = A^T A`` (``A``: each example's output Jacobian weighted by the
    square root of its softmax Hessian, whose null direction is dropped: 72 rows, 102 parameters): within
    what float64 allows (``cond = ||G|| / delta``), else a SingularError that says what to do."""
    model, X, y = _cnn_problem()
    params = list(model.parameters())
    out = model(X)
    rows = []
    for i in range(len(X)):
        p = torch.softmax(out[i].detach(), 0)
        w, V = torch.linalg.eigh(torch.diag(p) - torch.outer(p, p))
        Ji = torch.stack(
            [
                torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[i, c], params, retain_graph=True)])
                for c in range(4)
            ]
        )
        rows.append((V[:, 1:] * w[1:].sqrt()).T @ Ji)
    A = torch.cat(rows)
    nu = torch.linalg.eigvalsh(A @ A.T)
    n, r = A.shape[1], A.shape[0]
    theta = torch.cat([q.detach().reshape(-1) for q in params])
    loss = float(nn.CrossEntropyLoss(reduction="sum")(out.detach(), y))
    la = Laplace(model, "classification").fit(X, y)
    for delta in (1e-6, 1e-9, 1e-12, 1e-13, 1e-14, 1e-15):
        logdet = float(torch.log(nu + delta).sum()) + (n - r) * math.log(delta)
        want = -loss - 0.5 * (logdet - n * math.log(delta) + delta * float(theta @ theta))
        try:
            got = la.log_marginal_likelihood(prior_precision=delta)
        except SingularError as e:
            assert delta < 1e-12 and "choose a larger prior precision" in str(e)
            continue
        assert got == pytest.approx(want, abs=1e-9 if delta >= 1e-6 else 1e-2)
    for lam in (1e-13, 1e-14, 1e-15, 1e-16):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            f = InfluenceFunction(model, nn.CrossEntropyLoss(), "gauss_newton", lam).fit(X, y)
        assert not any("indefinite" in str(x.message) for x in w)
        assert f.factorization.inertia.negative == 0


def test_class_probability_targets_must_sum_to_one():
    """Multi-label 0/1 rows (sums 0..3) were taken as class probabilities and gave an evidence of a
    likelihood that is not categorical."""
    model, X, y = _cnn_problem()
    Y = (torch.rand(24, 4, generator=torch.Generator().manual_seed(1)) < 0.4).double()
    with pytest.raises(InvalidArgumentError, match="must sum to 1 over the classes"):
        Laplace(model, "classification").fit(X, Y)
    P = torch.softmax(torch.randn(24, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64), 1)
    assert math.isfinite(Laplace(model, "classification").fit(X, P).log_marginal_likelihood())
    # float32 soft targets over many classes sum to 1 only to their rounding (1.5e-6 at 32k classes: a
    # review's case, refused by a fixed tolerance of 1e-6)
    torch.manual_seed(0)
    Q = torch.softmax(torch.randn(64, 32000) * 3, 1)
    assert float((Q.double().sum(1) - 1).abs().max()) > 1e-6  # (the case)
    Laplace(nn.Sequential(nn.Linear(1, 32000, bias=False)), "classification").fit(torch.randn(64, 1), Q)


def test_a_singular_log_det_names_the_prior_precision():
    """Regression at delta = 1e-13: the factorization's own 'logdet at damping 2e-13 ... choose another
    damping' named delta / c, a damping the user never gave."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 20), nn.Tanh(), nn.Linear(20, 2)).double()  # (n = 122 > 29 x 2 rows)
    X, Y = (
        torch.randn(29, 3, generator=g, dtype=torch.float64),
        torch.randn(29, 2, generator=g, dtype=torch.float64),
    )
    la = Laplace(model, "regression").fit(X, Y)
    refused = []
    for delta in (1e-12, 1e-13, 1e-14, 1e-15, 1e-16):
        try:
            la.log_marginal_likelihood(prior_precision=delta)
        except SingularError as e:
            refused.append((delta, str(e)))
    assert refused
    for delta, m in refused:
        assert f"prior precision delta = {delta:g}" in m and "choose a larger prior precision" in m


def test_prior_precision_search_reads_the_root_spectrum(monkeypatch):
    """A 10-64-3 MLP on 8 examples (n = 899, G's root 16 rows): the search's log-determinants come from
    G's spectrum through its root (16 eigenvalues and 883 zeros), not a factorization per evaluation (a
    10-512-3 MLP on 32 examples: 12.6 s -> 0.19 s); the optimum is the one the factorizations find."""
    from hessinv.curvature import GaussNewton

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 3)).double()
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(8, 10, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
    calls = []
    factor = GaussNewton.factor

    def counted(self, *args, **kwargs):
        calls.append(1)
        return factor(self, *args, **kwargs)

    monkeypatch.setattr(GaussNewton, "factor", counted)
    # (as for a model too large for one dense eigvalsh, where each evaluation factored G + (delta / c) I)
    monkeypatch.setattr(GaussNewton, "_dense_eigenvalues_cheaper", lambda self, evaluations: False)
    la = Laplace(m, "classification").fit(X, y)
    d_root = la.optimize_prior_precision()
    root_calls = len(calls)
    monkeypatch.setattr(GaussNewton, "EIG_ROOT_MAX_FLOPS", 0.0)
    monkeypatch.setattr(Laplace, "_spectrum", lambda self, evaluations: None)
    calls.clear()
    la2 = Laplace(m, "classification").fit(X, y)
    d_fac = la2.optimize_prior_precision()
    assert root_calls <= 2 < len(calls)
    assert d_root == pytest.approx(d_fac, rel=1e-5)
    assert la.log_marginal_likelihood(prior_precision=d_root) == pytest.approx(
        la2.log_marginal_likelihood(prior_precision=d_root), rel=1e-12
    )


def test_evidence_in_the_band_where_the_sweep_perturbs_or_loses_the_small_eigenvalues():
    """Regression with sigma_noise = 1e-3 (c = 5e5) and 20 examples on 31 parameters (rank G = 20): the
    evidence was refused at prior precision 1e-8 (the sweep perturbed pivots) and 3e-3 nats off at 1e-7
    (pivots ill-conditioned beyond sqrt(u)), while 1e-9 and below were exact through G's root (a probe).
    G.factor now takes the root wherever the sweep's pivots are not exact and the root has fewer rows."""
    torch.manual_seed(0)
    X, y = torch.randn(20, 4, dtype=torch.float64), torch.randn(20, 1, dtype=torch.float64)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    sigma = 1e-3
    c = 0.5 / sigma**2
    params = list(net.parameters())
    out = net(X).reshape(-1)
    J = torch.stack(
        [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[i], params, retain_graph=True)])
            for i in range(20)
        ]
    )
    mu = torch.linalg.eigvalsh(2 * J @ J.T)  # G = 2 J^T J: its nonzero eigenvalues
    n, r = J.shape[1], 20
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    with torch.no_grad():
        sse = float(((net(X) - y) ** 2).sum())
    ll = -sse * c - 20 * math.log(sigma * math.sqrt(2 * math.pi))
    la = Laplace(net, "regression", sigma_noise=sigma).fit(X, y)
    for delta in (1e-6, 1e-7, 1e-8, 1e-10):
        k = delta / c
        logdet = n * math.log(c) + float(torch.log(mu + k).sum()) + (n - r) * math.log(k)
        want = ll - 0.5 * (logdet - n * math.log(delta) + delta * float(theta @ theta))
        assert la.log_marginal_likelihood(delta) == pytest.approx(want, rel=1e-13, abs=1e-6)


@pytest.mark.parametrize(
    "likelihood, curvature, delta",
    [
        ("classification", "gauss_newton", 0.7),
        ("regression", "gauss_newton", 0.7),
        ("regression", "hessian", 30.0),
    ],
)
def test_the_evidence_is_differentiable_in_the_prior_precision_and_noise(likelihood, curvature, delta):
    """laplace-torch's tuning loop, ``la.log_marginal_likelihood(log_prior.exp(), log_sigma.exp())`` then
    ``backward()``: the evidence came back as a float, the graph dropped, and backward failed with an
    AttributeError (a probe). Now a tensor whose gradients (tr P^{-1} from the exact inverse diagonal)
    match central differences of the evidence in log delta and log sigma."""
    net, X, y = problem(0, likelihood, depth=3)
    la = Laplace(net, likelihood, curvature=curvature, prior_mean=0.1).fit(X, y)
    reg = likelihood == "regression"
    a, b = math.log(delta), math.log(0.8)
    log_prior = torch.tensor(a, dtype=torch.float64, requires_grad=True)
    log_sigma = torch.tensor([b], dtype=torch.float64, requires_grad=True)  # (a one-entry vector too)
    ev = la.log_marginal_likelihood(log_prior.exp(), log_sigma.exp() if reg else None)
    assert isinstance(ev, torch.Tensor) and ev.dim() == 0
    (-ev).backward()

    def f(a: float, b: float) -> float:
        return la.log_marginal_likelihood(math.exp(a), math.exp(b) if reg else None)

    assert float(ev) == f(a, b)
    h = 1e-5
    assert -float(log_prior.grad) == pytest.approx((f(a + h, b) - f(a - h, b)) / (2 * h), rel=1e-6, abs=1e-8)
    if reg:
        assert log_sigma.grad.shape == (1,)
        assert -float(log_sigma.grad) == pytest.approx(
            (f(a, b + h) - f(a, b - h)) / (2 * h), rel=1e-6, abs=1e-8
        )
    else:
        assert log_sigma.grad is None
    with torch.no_grad():  # (no graph asked for: the float, as before)
        assert isinstance(la.log_marginal_likelihood(log_prior.exp()), float)
    # a second derivative: refused (its first version returned 0.017 where the truth is -2.18, a review)
    lp = torch.tensor(a, dtype=torch.float64, requires_grad=True)
    with pytest.raises(InvalidArgumentError, match="not differentiable again"):
        torch.autograd.grad(la.log_marginal_likelihood(lp.exp()), lp, create_graph=True)


def test_a_prior_precision_too_large_gets_advice_that_works():
    """The refusal of a prior precision beyond the damping the factorization takes (``delta / c = 2
    sigma^2 delta``) advised "a larger sigma_noise", which makes it larger, and advised sigma_noise for
    classification, which refuses it (a probe)."""
    torch.manual_seed(0)
    X, yr = torch.randn(30, 4, dtype=torch.float64), torch.randn(30, 2, dtype=torch.float64)
    yc = torch.randint(0, 2, (30,))
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    with pytest.raises(InvalidArgumentError, match="smaller prior precision or a smaller sigma_noise"):
        Laplace(m, "regression", prior_precision=1e150, sigma_noise=1.0).fit(X, yr).log_marginal_likelihood()
    Laplace(m, "regression", prior_precision=1e150, sigma_noise=1e-3).fit(X, yr).log_marginal_likelihood()
    with pytest.raises(InvalidArgumentError, match="choose a smaller prior precision$"):
        Laplace(m, "classification", prior_precision=1e200).fit(X, yc).log_marginal_likelihood()


class _Aliased(nn.Module):
    """A last-layer alias (``self.head = self.body[-1]``), applied once."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3))
        self.head = self.body[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class _Twice(nn.Module):
    """One registered layer applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)
        self.seq = nn.Sequential(self.a, nn.Tanh(), self.a, nn.Tanh(), self.b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


@pytest.mark.parametrize("cls", [_Aliased, _Twice])
def test_nn_predictive_of_a_layer_with_two_names_leaves_the_model_intact(cls):
    """``pred_type="nn"`` swapped the parameters of a layer reached by two paths in and out twice:
    a raw RuntimeError, and the model left holding a posterior sample as plain tensors (a probe)."""
    torch.manual_seed(0)
    X, y = torch.randn(20, 3, dtype=torch.float64), torch.randint(0, 3, (20,))
    net = cls().double()
    before = [(k, p, p.detach().clone()) for k, p in net.named_parameters()]
    la = Laplace(net, "classification").fit(X, y)
    probs = la(X[:4], pred_type="nn", n_samples=5, generator=torch.Generator().manual_seed(3))
    for (k, p, v), (k2, p2) in zip(before, net.named_parameters(), strict=True):
        assert k == k2 and p2 is p and isinstance(p2, nn.Parameter) and torch.equal(p2, v)
    # against the network at the same samples, set by hand on a copy
    samples = la.sample(5, torch.Generator().manual_seed(3))
    ref = []
    for th in samples:
        m = copy.deepcopy(net)
        torch.nn.utils.vector_to_parameters(th, m.parameters())
        with torch.no_grad():
            ref.append(torch.softmax(m(X[:4]), -1))
    assert torch.allclose(probs, torch.stack(ref).mean(0), rtol=1e-12, atol=1e-14)


class _BatchBranch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if float(x.detach().sum()) > 0 else -x


@pytest.mark.parametrize("pred_type", ["glm", "nn"])
def test_predictive_of_a_model_whose_output_depends_on_its_batch_is_refused(pred_type):
    """The GLM predictive took the batch's outputs with each example's Jacobian alone, two different
    functions: a test point's probabilities moved by 0.16 with the other points of its call (a probe)."""
    torch.manual_seed(0)
    X, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 3, (16,))
    net = nn.Sequential(nn.Linear(3, 4), _BatchBranch(), nn.Tanh(), nn.Linear(4, 3)).double()
    la = Laplace(net, "classification").fit(X, y)
    Xt = torch.randn(6, 3, dtype=torch.float64)
    Xt[0] = 50.0  # its sign decides the branch for the whole batch
    with pytest.raises(UnsupportedStageError, match="depends on the rest of its batch"):
        la(Xt, pred_type=pred_type, n_samples=3)
    assert la(Xt[1:2], pred_type=pred_type, n_samples=3).shape == (1, 3)  # one point: its own function


def test_optimize_prior_precision_finds_the_largest_evidence_not_a_local_maximum():
    """A Hessian Laplace's evidence rises toward the lower bound (``P`` nears singularity there) and has an
    interior local maximum: Brent's search over the whole interval stopped at that one, 2.5 nats below
    the bound's value, with no warning (a probe). A grid first, then Brent's search: the largest value
    found, and the warning that it lies on a bound. Values against the evidence at a grid of deltas."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    X, y = torch.randn(40, 4, dtype=torch.float64), torch.randint(0, 3, (40,))
    opt = torch.optim.LBFGS(net.parameters(), max_iter=500)

    def closure():
        opt.zero_grad()
        loss = nn.CrossEntropyLoss(reduction="sum")(net(X), y) + 0.5 * sum(
            (p**2).sum() for p in net.parameters()
        )
        loss.backward()
        return loss

    opt.step(closure)
    la = Laplace(net, "classification", curvature="hessian").fit(X, y)
    lo = 1.01 * -la._op().min_eigenvalue() + 1e-3  # (P positive definite on all of [lo, 1e4])
    with pytest.warns(UserWarning, match="at the search's bound"):
        delta = la.optimize_prior_precision(bounds=(lo, 1e4))
    best = la.log_marginal_likelihood(delta)
    grid = [lo * math.exp(math.log(1e4 / lo) * i / 200) for i in range(201)]
    assert best >= max(la.log_marginal_likelihood(d) for d in grid) - 1e-6


def test_the_applications_refuse_a_model_that_is_not_a_module_and_bad_arguments_by_name():
    """A function, None or a tensor as the model met ``model.parameters()`` (AttributeError) in
    ``Laplace``, ``per_example_gradients`` and ``output_jacobians``; a string generator of the MC
    predictive, a None loss of ``per_example_gradients`` and 10^12 samples raised torch's or Python's own
    errors (a probe). Each is a named error with advice now, as ``hessinv.hessian`` gives."""
    from hessinv.errors import InvalidArgumentError, NotAChainError, TooLargeError
    from hessinv.influence import output_jacobians, per_example_gradients

    X, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,))
    calls = (
        lambda m: Laplace(m, "classification"),
        lambda m: per_example_gradients(m, nn.CrossEntropyLoss(), X, y),
        lambda m: output_jacobians(m, X),
        lambda m: InfluenceFunction(m, nn.CrossEntropyLoss()),
    )
    for bad in (lambda x: 2 * x, None, torch.zeros(3)):
        for call in calls:
            with pytest.raises(NotAChainError, match="expected an nn.Module or a list of modules"):
                call(bad)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    with pytest.raises(InvalidArgumentError, match="loss_fn must be callable"):
        per_example_gradients(net, None, X, y)
    la = Laplace(net, "classification").fit(X, y)
    with pytest.raises(InvalidArgumentError, match="generator must be a torch.Generator"):
        la(X[:2], link_approx="mc", generator="x")
    with pytest.raises(TooLargeError, match="smaller batches"):
        la.sample(10**12)


def test_optimize_prior_precision_takes_laplace_torch_positional_arguments():
    """laplace-torch's ``optimize_prior_precision("glm", "marglik")`` put "marglik" into
    ``optimize_sigma_noise``: a regression's noise was optimized too (delta 2.3166 instead of 2.3815),
    a classification was told "optimize_sigma_noise is for regression only" (a review)."""
    for likelihood in ("regression", "classification"):
        net, X, y = problem(3, likelihood, depth=2)
        la = Laplace(net, likelihood).fit(X, y)
        sigma = la.sigma_noise
        delta = la.optimize_prior_precision()
        assert la.optimize_prior_precision("glm", "marglik") == delta and la.sigma_noise == sigma
        with pytest.raises(InvalidArgumentError, match="optimize_sigma_noise must be True or False"):
            la.optimize_prior_precision((1e-3, 1e3), "yes")


# -- the predictive's gradient in its inputs, and the evidence's scatter in float64 (an applications probe) --


def _central_differences(f, x: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    out = torch.zeros(x.numel(), dtype=torch.float64)
    for i in range(x.numel()):
        e = torch.zeros(x.numel(), dtype=x.dtype)
        e[i] = h
        e = e.view_as(x)
        out[i] = (f(x + e) - f(x - e)).detach() / (2 * h)
    return out


@pytest.mark.parametrize("link", ["probit", "mc", "regression"])
def test_the_glm_predictive_is_differentiable_in_its_inputs(link):
    """la(x) with x requiring grad: the gradient of the predictive (mean and variance together) is the
    true one, by central differences -- the mean was computed without a graph, so the variance's term
    alone came back (an acquisition function mu + k sigma got a silently partial gradient)."""
    torch.manual_seed(0)
    C = 2 if link == "regression" else 3
    m = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, C)).double()
    X = torch.randn(20, 4, dtype=torch.float64)
    if link == "regression":
        la = Laplace(m, "regression", prior_precision=0.1, sigma_noise=0.3).fit(
            X, torch.randn(20, C, dtype=torch.float64)
        )

        def f(z):
            mu, var = la(z)
            return mu[0, 0] + 2.0 * var[0, 0, 0].sqrt() + var[0, 0, 1]
    else:
        la = Laplace(m, "classification", prior_precision=0.1).fit(X, torch.randint(0, C, (20,)))

        def f(z):
            gen = torch.Generator().manual_seed(3)  # (the same draws at every point)
            return la(z, link_approx=link, n_samples=200, generator=gen)[0, 1]

    x = torch.randn(1, 4, dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(xr), xr)
    fd = _central_differences(f, x)
    assert torch.allclose(g.reshape(-1), fd, rtol=1e-5, atol=1e-9), (g.reshape(-1), fd)
    with torch.no_grad():  # (and no graph where none is asked for)
        out = la(xr) if link == "regression" else la(xr, link_approx="probit")
    assert not any(t.requires_grad for t in (out if isinstance(out, tuple) else (out,)))


def test_the_evidence_scatter_of_a_float32_model_is_summed_in_float64():
    """delta |theta* - mu_0|^2 of a float32 model, summed in float64 (its parameters are exact there):
    summed in float32 it was 4e-8 off, 44 nats of evidence at delta = 1e8 on 667 parameters."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 24), nn.GELU(), nn.Linear(24, 16), nn.SiLU(), nn.Linear(16, 3))
    X, y = torch.randn(8, 8), torch.randint(0, 3, (8,))
    mu0 = torch.randn(sum(p.numel() for p in m.parameters()))
    la = Laplace(m, "classification", prior_mean=mu0).fit(X, y)
    th = torch.cat([p.detach().reshape(-1) for p in m.parameters()]).double() - mu0.double()
    ref = float(th @ th)
    assert abs(la.scatter(1.0) - ref) <= 1e-13 * ref
    assert abs(la.scatter(1e8) - 1e8 * ref) <= 1e-13 * 1e8 * ref
