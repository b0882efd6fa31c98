"""Influence, Laplace and diagnostics behaviour a mutation probe found unpinned (2026-12-07): each test
fails on the named mutant of the code. References: plain-autograd float64 derivatives, torch.optim's own
steps, textbook formulas. (The distributed influence case is in test_distributed.py.)"""

from __future__ import annotations

import math
import warnings

import torch
from reference import (
    autograd_gauss_newton,
    autograd_gradient_hessian,
    autograd_hessian,
    autograd_output_jacobian,
    autograd_per_example_gradients,
)
from torch import nn
from torch.func import functional_call

F64 = torch.float64


def _flat(net):
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def _unflat(net, x):
    out, i = {}, 0
    for n, p in net.named_parameters():
        out[n] = x[i : i + p.numel()].view_as(p)
        i += p.numel()
    return out


# -- influence.py ---------------------------------------------------------------------------------
def test_indefinite_hessian_with_perturbed_pivots_warns_indefinite_not_singular():
    """Kills: fit's AccuracyWarning branch taken on ``inertia.negative != 0`` (instead of ``== 0``): an
    indefinite H + lambda I whose sweep also perturbed pivots was reported as 'singular to working precision,
    no eigenvalue found negative' although 15 eigenvalues are negative."""
    from hessinv.errors import AccuracyWarning
    from hessinv.influence import InfluenceFunction

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    X, y = torch.randn(3, 3, dtype=F64), torch.randint(0, 2, (3,))
    H = autograd_hessian(net, nn.CrossEntropyLoss(), X, y)
    neg = int((torch.linalg.eigvalsh(H + 1e-14 * torch.eye(len(H), dtype=F64)) < -1e-8).sum())
    assert neg > 0  # the reference: truly indefinite
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        inf = InfluenceFunction(net, nn.CrossEntropyLoss(), "hessian", damping=1e-14).fit(X, y)
    assert inf.inertia.negative > 0
    msgs = [(x.category, str(x.message)) for x in w]
    assert any("indefinite" in m for _, m in msgs), msgs
    assert not any(issubclass(c, AccuracyWarning) for c, _ in msgs), msgs


# -- laplace.py -----------------------------------------------------------------------------------
def test_nn_predictive_of_scalar_outputs_is_the_unbiased_sample_variance():
    """Kills: the (N,)-output branch of pred_type='nn' dividing by k instead of k - 1 (the (N, C) branch
    was pinned by an earlier probe). Reference: the network at the same posterior draws, torch.var
    (unbiased)."""
    from hessinv.laplace import Laplace

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1), nn.Flatten(0)).double()
    X, y = torch.randn(15, 2, dtype=F64), torch.randn(15, dtype=F64)
    la = Laplace(net, "regression", prior_precision=1.0).fit(X, y)
    k = 4
    mu, var = la(X[:3], pred_type="nn", n_samples=k, generator=torch.Generator().manual_seed(1))
    thetas = la.sample(k, torch.Generator().manual_seed(1))
    outs = torch.stack([functional_call(net, _unflat(net, th), (X[:3],)) for th in thetas])
    assert var.shape == (3,)
    torch.testing.assert_close(mu, outs.mean(0))
    torch.testing.assert_close(var, outs.var(0, unbiased=True))


# -- diagnostics.py -------------------------------------------------------------------------------
def test_adam_direction_is_the_step_torch_takes_in_every_setting():
    """Kills: amsgrad's max dropped, the groups' lr ratio dropped, AdamW's decoupled decay dropped, L2 decay
    of the wrong sign. Reference: torch.optim's own step, x - x+ = lr_max d, after two steps of history."""
    from hessinv.diagnostics import adam_direction, flat_parameters

    settings = [
        (torch.optim.Adam, dict(weight_decay=0.1, amsgrad=True)),
        (torch.optim.AdamW, dict(weight_decay=0.1)),
        (torch.optim.AdamW, dict(weight_decay=0.05, amsgrad=True)),
        (torch.optim.Adam, dict(weight_decay=0.3, decoupled_weight_decay=True)),
    ]
    for cls, kw in settings:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 1)).double()
        groups = [{"params": net[0].parameters(), "lr": 0.01}, {"params": net[2].parameters(), "lr": 0.003}]
        opt = cls(groups, betas=(0.8, 0.9), eps=1e-3, **kw)
        for t in range(4):  # a shrinking loss: v falls below its running max (amsgrad matters)
            X, y = torch.randn(8, 3, dtype=F64), torch.randn(8, 1, dtype=F64) / (1 + 3 * t)
            opt.zero_grad()
            nn.functional.mse_loss(net(X), y).backward()
            if t < 3:
                opt.step()
        d = adam_direction(opt)
        x0 = flat_parameters(net)
        opt.step()
        torch.testing.assert_close(
            x0 - flat_parameters(net), 0.01 * d, rtol=1e-10, atol=1e-15, msg=str((cls, kw))
        )


def test_direction_alignments_newton_is_the_hessians_and_gauss_newton_the_gauss_newton_matrixs():
    """Kills: direction_alignments building 'newton' from the Gauss-Newton matrix and 'gauss_newton' from the
    Hessian. Reference: dense H by double backward, G = (2 / N) J^T J of the mean squared error, both positive
    definite here (so no damping), cos = <C^-1 g, x - x*> / (|C^-1 g| |x - x*|)."""
    from hessinv.diagnostics import direction_alignments

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 1), nn.Tanh()).double()
    X = torch.randn(40, 3, dtype=F64)
    y = torch.tanh(X @ torch.tensor([[1.5], [-2.0], [0.5]], dtype=F64) + 0.3)
    x_star = torch.tensor([1.5, -2.0, 0.5, 0.3], dtype=F64)
    with torch.no_grad():  # near x*, where H is positive definite (and differs from G)
        net[0].weight.copy_(torch.tensor([[1.2, -1.6, 0.9]], dtype=F64))
        net[0].bias.fill_(-0.1)
    lf = nn.MSELoss()
    H = autograd_hessian(net, lf, X, y)
    J = autograd_output_jacobian(net, X)[:, 0]
    G = 2.0 / len(X) * J.T @ J
    assert float(torch.linalg.eigvalsh(H)[0]) > 0 and float(torch.linalg.eigvalsh(G)[0]) > 0
    g = autograd_gradient_hessian(net, lf, X, y)[0]
    e = _flat(net) - x_star

    def cos(d):
        return float(d @ e / (d.norm() * e.norm()))

    ref = {"newton": cos(torch.linalg.solve(H, g)), "gauss_newton": cos(torch.linalg.solve(G, g))}
    assert abs(ref["newton"] - ref["gauss_newton"]) > 1e-3  # the two directions differ here
    got = direction_alignments(net, lf, X, y, x_star, which=("newton", "gauss_newton"))
    for k in ref:
        assert math.isclose(got[k], ref[k], rel_tol=0, abs_tol=1e-9), (k, got[k], ref[k])


def test_stochastic_best_factor_is_one_when_the_mean_direction_points_away():
    """Kills: predicted_best = (sin^2 + nu) / (1 + nu) also for cos_bar <= 0. Textbook: with <m, e> <= 0 the
    best eta >= 0 is 0, factor 1 -- the minimum over eta >= 0 of the mean of |e - eta d_i|^2 / |e|^2."""
    from hessinv.diagnostics import stochastic_contraction

    e = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    D = torch.tensor([[-1.0, 0.5, 0.0], [-0.5, -0.5, 1.0], [-0.3, 0.0, -1.0]], dtype=F64)  # m . e < 0
    s = stochastic_contraction(D, e, torch.zeros(3, dtype=F64), eta=0.1)
    etas = torch.linspace(0, 5, 5001, dtype=F64)
    obs = torch.stack([((e - t * D) ** 2).sum(1).mean() / (e @ e) for t in etas])
    assert s.cos_bar < 0 and s.best_eta == 0.0
    assert math.isclose(s.predicted_best, float(obs.min()), abs_tol=1e-12) and float(obs.min()) == 1.0


# -- a second batch of the probe (2026-12-07) ------------------------------------------------------
# -- influence.py ---------------------------------------------------------------------------------
def test_training_examples_weights_a_sum_loss_fitted_on_its_own_inputs():
    """Kills: ``_batch_weight``'s early ``return 1.0`` taken whenever the curvature set is the training
    inputs (``yc is targets``), ignoring ``training_examples``. fit(X, y, training_examples=3 N) with a
    summed loss says X is a third of the training set: G is estimated as 3 G_X (fit's docstring), so the
    scores are -g_te^T (3 G_X + lambda I)^{-1} g_tr (Gauss-Newton G); the mutant used G_X."""
    from hessinv.influence import InfluenceFunction

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    loss_fn = nn.MSELoss(reduction="sum")
    X, y = torch.randn(5, 3, dtype=F64), torch.randn(5, 2, dtype=F64)
    Xt, yt = torch.randn(2, 3, dtype=F64), torch.randn(2, 2, dtype=F64)
    lam, N = 0.1, 15
    inf = InfluenceFunction(net, loss_fn, curvature="gauss_newton", damping=lam).fit(
        X, y, training_examples=N
    )
    got = inf.influences(Xt, yt)
    H = autograd_gauss_newton(net, loss_fn, X, y)
    A = (N / len(X)) * H + lam * torch.eye(len(H), dtype=F64)
    assert bool((torch.linalg.eigvalsh(A) > 0).all())
    Gtr = autograd_per_example_gradients(net, loss_fn, X, y)
    Gte = autograd_per_example_gradients(net, loss_fn, Xt, yt)
    ref = -(Gte @ torch.linalg.solve(A, Gtr.T))
    unweighted = -(Gte @ torch.linalg.solve(H + lam * torch.eye(len(H), dtype=F64), Gtr.T))
    assert (ref - unweighted).abs().max() > 1e-2 * ref.abs().max()  # the test can tell them apart
    torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-10)


# -- laplace.py -----------------------------------------------------------------------------------
def test_joint_noise_search_reaches_the_corner_where_the_prior_bound_is_active():
    """Kills: ``_joint_search``'s log-kappa range ``[log(d_lo v_lo), log(d_hi v_hi)]`` (without the
    factor 2 of
    ``kappa = delta / c = 2 delta sigma^2``): the kappas in ``(d_hi v_hi, 2 d_hi v_hi]`` were never tried, so
    an optimum at ``delta = d_hi`` with ``sigma^2 > v_hi / 2`` was missed (0.47 nats below: delta 0.0493,
    sigma 1.74 instead of 0.05, 2.037). Reference: the textbook evidence of ``P = J^T J / sigma^2 + delta I``
    from the plain-autograd output Jacobian; the search must do at least as well as the feasible point
    (d_hi, argmax_sigma evidence(d_hi, sigma))."""

    from scipy.optimize import minimize_scalar

    from hessinv.laplace import Laplace

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    X = torch.randn(20, 2, dtype=F64)
    y = X.sum(1, keepdim=True) + 0.3 * torch.randn(20, 1, dtype=F64)
    n = sum(p.numel() for p in net.parameters())
    J = autograd_output_jacobian(net, X).reshape(-1, n)
    with torch.no_grad():
        L = float(((net(X) - y) ** 2).sum())
    th = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    S, N = float(th @ th), y.numel()

    def evidence(d, s):  # log N(y | f, s^2) at theta* - 1/2 [log det P - n log d + d |theta*|^2]
        P = J.T @ J / s**2 + d * torch.eye(n, dtype=F64)
        loglik = -L / (2 * s * s) - N * math.log(s * math.sqrt(2 * math.pi))
        return loglik - 0.5 * (float(torch.logdet(P)) - n * math.log(d) + d * S)

    d_hi = 0.05  # the unconstrained optimum delta is ~1: the prior bound is active
    r = minimize_scalar(
        lambda ls: -evidence(d_hi, math.exp(ls)), bounds=(-5, 3), method="bounded", options={"xatol": 1e-10}
    )
    s_star, best = math.exp(r.x), -r.fun
    la = Laplace(net, "regression").fit(X, y)
    assert abs(la.log_marginal_likelihood(0.3, 0.5) - evidence(0.3, 0.5)) < 1e-9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the optimum at the bound is warned)
        la.optimize_prior_precision(
            bounds=(1e-3, d_hi), optimize_sigma_noise=True, sigma_bounds=(1e-2, 1.2 * s_star)
        )  # sigma*^2 > v_hi / 2
    assert evidence(la.prior_precision, la.sigma_noise) >= best - 1e-6
    assert abs(la.prior_precision - d_hi) < 1e-6 * d_hi and abs(la.sigma_noise - s_star) < 1e-4 * s_star


# -- diagnostics.py -------------------------------------------------------------------------------
def _tracked_steps():
    """Three steps of a 2-parameter model toward x* = 0, with cosines 1, 0.894 and -0.822 (textbook:
    cos = <d, e> / (|d| |e|), d = x_t - x_{t+1}, e = x_t - x*)."""
    from hessinv.diagnostics import AlignmentTracker

    net = nn.Sequential(nn.Linear(2, 1, bias=False)).double()
    xs = [torch.tensor(v, dtype=F64) for v in ([3.0, 4.0], [1.5, 2.0], [0.5, 1.5], [0.9, 1.8])]
    with torch.no_grad():
        net[0].weight.copy_(xs[0][None])
    tr = AlignmentTracker(net, torch.zeros(2, dtype=F64))
    for x in xs[1:]:
        with torch.no_grad():
            net[0].weight.copy_(x[None])
        tr.update()
    cos = [float((a - b) @ a / ((a - b).norm() * a.norm())) for a, b in zip(xs, xs[1:], strict=False)]
    return tr, xs, cos


def test_tracker_summary_median_cosine_is_the_median():
    """Kills: ``median_cos_theta`` as ``cos[0]`` (the smallest cosine, -0.822) instead of the median."""
    import statistics

    tr, _, cos = _tracked_steps()
    assert max(cos) - min(cos) > 0.5
    assert abs(tr.summary()["median_cos_theta"] - statistics.median(cos)) < 1e-12


def test_tracker_summary_final_error_is_after_the_last_step():
    """Kills: ``final_error`` as the last record's error (|x_{T-1} - x*|, before the last step: 1.58)
    instead of |x_T - x*| = 2.01."""
    tr, xs, _ = _tracked_steps()
    s = tr.summary()
    assert abs(s["final_error"] - float(xs[-1].norm())) < 1e-12
    assert abs(s["initial_error"] - float(xs[0].norm())) < 1e-12


def _indefinite_problem():

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    X, y = torch.randn(8, 3, dtype=F64), torch.randn(8, 2, dtype=F64)
    loss_fn = nn.MSELoss()
    g, H = autograd_gradient_hessian(net, loss_fn, X, y)
    ev = torch.linalg.eigvalsh(H)
    assert float(ev[0]) < -1.0  # truly indefinite (lambda_min -1.44, ||H||_2 1.92)
    return net, loss_fn, X, y, g, H, float(ev[0]), float(ev.abs().max())


def test_newton_direction_margin_is_delta_times_the_curvature_norm():
    """Kills: the margin's scale ``max(|lambda_min|, tiny)`` without ``||C||``: the documented shift is
    ``lambda = -lambda_min(C) + delta ||C||``; the mutant's margin was delta |lambda_min| (0.748 of it)."""
    from hessinv.diagnostics import newton_direction

    net, loss_fn, X, y, g, H, lmin, nrm = _indefinite_problem()
    delta = 1e-2
    nd = newton_direction(net, loss_fn, X, y, delta=delta)
    assert abs((nd.damping + lmin) / (delta * nrm) - 1) < 1e-3
    ref = torch.linalg.solve(H + nd.damping * torch.eye(len(H), dtype=F64), g)
    torch.testing.assert_close(nd.direction, ref, rtol=1e-8, atol=1e-10)


def test_newton_direction_grows_a_too_small_margin_until_positive_definite():
    """Kills: one try of the shift instead of up to 12 tenfold-growing margins: with delta = 1e-17 the first
    shift -lambda_min + 2e-17 ||C|| rounds to -lambda_min itself (C + lambda I singular), and the mutant
    raised 'C + lambda I stays indefinite' where the docstring promises the margin grows until the
    factorization certifies positive definiteness."""
    from hessinv.diagnostics import newton_direction

    net, loss_fn, X, y, g, H, lmin, nrm = _indefinite_problem()
    nd = newton_direction(net, loss_fn, X, y, delta=1e-17)
    assert nd.inertia.negative == 0
    assert -lmin <= nd.damping <= -lmin + 1e-9 * nrm


def test_newton_direction_shifts_a_hessian_with_one_negative_eigenvalue():
    """Kills: pure Newton accepted when the factorization at 0 has ``inertia.negative <= 1`` (instead of
    ``== 0``): on f = a b x with one negative Hessian eigenvalue (-7.74, 7.94) the mutant returned
    lambda = 0 and an ascent direction (g . d = -0.32); the documented lambda is -lambda_min + delta ||C||."""
    from hessinv.diagnostics import newton_direction

    net = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)).double()
    with torch.no_grad():
        net[0].weight.fill_(0.1)
        net[1].weight.fill_(0.2)
    X = torch.tensor([[1.0], [2.0], [-1.0]], dtype=F64)
    y = 2 * X
    g, H = autograd_gradient_hessian(net, nn.MSELoss(), X, y)
    ev = torch.linalg.eigvalsh(H)
    assert float(ev[0]) < -1 and float(ev[1]) > 1  # exactly one negative eigenvalue
    nd = newton_direction(net, nn.MSELoss(), X, y)
    assert nd.inertia.negative == 0
    assert abs(nd.damping - (-float(ev[0]) + 1e-8 * float(ev.abs().max()))) < 1e-6
    assert float(g @ nd.direction) > 0  # a descent direction for x+ = x - d


def test_predicted_best_of_a_step_away_from_the_minimizer_is_one():
    """Kills: analyze_step's ``if not cos > 0`` as ``if not cos > -1``: for a step with cos in (-1, 0] the
    best eta >= 0 is 0 (factor 1, Theorem 1 / predicted_contraction), but the mutant projected e on d with
    a negative eta (1 - cos^2 = 0.32). Reference: eta* = max(<d, e>, 0) / |d|^2, factor
    |e - eta* d|^2 / |e|^2."""
    tr, xs, cos = _tracked_steps()
    assert cos[2] < 0
    for rec, x, x1 in zip(tr.records, xs, xs[1:], strict=False):
        d, e = x - x1, x
        eta = max(float(d @ e), 0.0) / float(d @ d)
        ref = float((e - eta * d).square().sum() / e.square().sum())
        assert abs(rec.predicted_best - ref) < 1e-12
    assert tr.records[2].predicted_best == 1.0
