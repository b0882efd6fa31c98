"""Parameters with gradient hooks (``Tensor.register_hook``: ``wandb.watch(model)``'s default, a user's
logging or clipping). They were refused at the split; now hessinv's own derivative passes run with the
hooks off (the curvature is the loss's, whatever a hook does), and the optimizers run them once a step on
the batch gradient, as a backward pass would."""

from __future__ import annotations

import pytest
import torch
from reference import autograd_gauss_newton, autograd_gradient_hessian
from torch import nn

import hessinv
import hessinv.optim as ho

F64 = torch.float64


def _models():
    torch.manual_seed(0)
    yield nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double(), torch.randn(8, 5, dtype=F64)
    yield (
        nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.GELU(), nn.Linear(6, 3)).double(),
        torch.randn(8, 5, dtype=F64),
    )
    yield (
        nn.Sequential(nn.Conv1d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 3)).double(),
        torch.randn(8, 2, 6, dtype=F64),
    )


@pytest.mark.parametrize("index", range(3))
def test_the_curvature_is_the_losss_whatever_a_parameter_hook_does(index):
    """A hook that triples its gradient and counts its calls, on every parameter: the Hessian, its
    gradient, diagonal and a damped solve, and the Gauss-Newton matrix are autograd's without hooks, and
    no hook runs (before: refused; with the refusal lifted, the chain's gradient check saw 3x the
    gradient)."""
    model, X = list(_models())[index]
    y = torch.randint(0, 3, (X.shape[0],))
    loss_fn = nn.CrossEntropyLoss()
    g_ref, H_ref = autograd_gradient_hessian(model, loss_fn, X, y)
    G_ref = autograd_gauss_newton(model, loss_fn, X, y)
    calls = []
    handles = [p.register_hook(lambda g: calls.append(1) or 3 * g) for p in model.parameters()]
    H = hessinv.hessian(model, loss_fn, X, y)
    v = torch.randn(H.shape[0], dtype=F64)
    scale = float(H_ref.abs().max())
    torch.testing.assert_close(H.to_dense(), H_ref, atol=1e-12 * scale, rtol=0)
    torch.testing.assert_close(H.gradient, g_ref, atol=1e-12 * float(g_ref.abs().max()), rtol=0)
    torch.testing.assert_close(H.diagonal(), H_ref.diagonal(), atol=1e-12 * scale, rtol=0)
    A = H_ref + 5.0 * torch.eye(H.shape[0], dtype=F64)
    torch.testing.assert_close(H.solve(v, damping=5.0), torch.linalg.solve(A, v), atol=1e-10, rtol=1e-10)
    G = hessinv.gauss_newton(model, loss_fn, X, y)
    torch.testing.assert_close(G.to_dense(), G_ref, atol=1e-12 * float(G_ref.abs().max()), rtol=0)
    assert not calls
    # and the hooks are still there, in force for the user's own backward
    loss_fn(model(X), y).backward()
    assert len(calls) == len(handles)
    for h in handles:
        h.remove()


def test_a_hook_added_after_a_gauss_newton_matrix_changes_nothing():
    """A hook added on a generic stage's parameter after gauss_newton(), whose dense blocks are formed at
    first use: they are the loss's (refused before, as the blocks would have come out of the hooked
    backward)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 3)).double()
    X, y = torch.randn(16, 8, dtype=F64), torch.randint(0, 3, (16,))
    ref = autograd_gauss_newton(m, nn.CrossEntropyLoss(), X, y)
    G = hessinv.gauss_newton(m, nn.CrossEntropyLoss(), X, y)
    m[1].weight.register_hook(lambda g: 2 * g)
    torch.testing.assert_close(G.to_dense(), ref)


def _task(seed: int = 0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    X, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    return net, nn.CrossEntropyLoss(), X, y


def _twins(**kw):
    net, loss, X, y = _task()
    twin = _task()[0]
    return (net, ho.Newton(net, loss, seed=0, **kw)), (twin, ho.Newton(twin, loss, seed=0, **kw)), loss, X, y


@pytest.mark.parametrize("mode", ["precondition", "trust-region"])
def test_a_reading_hook_runs_once_a_step_on_the_batch_gradient_and_changes_nothing(mode):
    """wandb.watch's kind of hook (reads, returns None), added after construction too: called once per
    step and parameter with the batch gradient (autograd's, and what ``.grad`` holds after the step), and
    the run is the unhooked twin's to the last bit."""
    (net, opt), (twin, opt_twin), loss, X, y = _twins(mode=mode)
    seen: list[tuple[int, torch.Tensor]] = []
    for i, p in enumerate(net.parameters()):
        p.register_hook(lambda g, i=i: seen.append((i, g.detach().clone())))
    for step in range(4):
        xb, yb = X[16 * step : 16 * step + 16], y[16 * step : 16 * step + 16]
        ref = torch.autograd.grad(loss(net(xb), yb), list(net.parameters()))
        seen.clear()
        opt.step(xb, yb)
        opt_twin.step(xb, yb)
        assert sorted(i for i, _ in seen) == list(range(4))
        for i, g in seen:
            torch.testing.assert_close(g, ref[i], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(list(net.parameters())[i].grad, g, atol=0, rtol=0)
        for a, b in zip(net.parameters(), twin.parameters(), strict=True):
            assert torch.equal(a, b)


def test_a_changing_hook_is_followed_by_preconditioning_and_refused_by_the_trust_region():
    """A hook that returns a new gradient: the preconditioned step uses it (zeros: no step; the .grad
    written is the hook's), as torch's optimizers see what the hooks leave; the trust region, whose step
    and ratio test are the loss's own derivatives, refuses it by name before moving anything."""
    (net, opt), _, loss, X, y = _twins(mode="precondition", weight_decay=0.0)
    for p in net.parameters():
        p.register_hook(torch.zeros_like)
    before = [p.detach().clone() for p in net.parameters()]
    opt.step(X[:16], y[:16])
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters(), strict=True))
    assert all(not bool(p.grad.any()) for p in net.parameters())

    (net, opt), _, loss, X, y = _twins(mode="trust-region")
    net[0].weight.register_hook(lambda g: 2 * g)
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(hessinv.UnsupportedStageError, match="gradient hook"):
        opt.step(X[:16], y[:16])
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters(), strict=True))


def test_a_hook_returning_another_shape_is_named():
    (net, opt), _, loss, X, y = _twins(mode="precondition")
    net[0].bias.register_hook(lambda g: g.reshape(1, -1))
    with pytest.raises(hessinv.InvalidArgumentError, match="gradient hook"):
        opt.step(X[:16], y[:16])


def test_auto_mode_hands_a_changing_hook_to_preconditioning():
    """The default mode on a full batch picks the trust region at its second step; with a clipping hook it
    raised there (a review). Now it preconditions, as with a closure whose gradient is not the batch's."""
    net, loss, X, y = _task()
    for p in net.parameters():
        p.register_hook(lambda g: g.clamp(-0.05, 0.05))
    opt = ho.Newton(net, loss, seed=0)
    losses = [float(opt.step(X, y)) for _ in range(5)]
    assert opt._newton["mode"] == "precondition" and losses[-1] < losses[0]


@pytest.mark.parametrize("mode", ["precondition", "trust-region", "auto"])
def test_a_closures_backward_runs_the_hooks_once_a_step(mode):
    """With a closure, its backward runs the hooks; the trust region ran them again on its own gradient
    (8 calls a step for 4 parameters; a review)."""
    net, loss, X, y = _task()
    calls = []
    for p in net.parameters():
        p.register_hook(lambda g: calls.append(1))
    opt = ho.Newton(net, loss, seed=0, mode=mode)

    def closure():
        opt.zero_grad()
        out = loss(net(X), y)
        out.backward()
        return out

    for _ in range(3):
        calls.clear()
        opt.step(X, y, closure=closure)
        assert len(calls) == 4
