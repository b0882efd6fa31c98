"""Defects an optimizer probe found (a new user's models and losses), each reduced to its model."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from reference import autograd_gauss_newton
from torch import nn

import hessinv
from hessinv.errors import UnsupportedStageError

F64 = torch.float64


def _confident_classifier(scale: float = 40.0, out_shape: tuple[int, ...] = ()):
    """A linear classifier whose logits on its own batch are scaled until every prediction is confident
    (max probability 1 to float32's precision at scale 40)."""
    torch.manual_seed(0)
    C = 3
    model = nn.Sequential(nn.Linear(4, C * max(1, len(out_shape) and out_shape[0])))
    if out_shape:
        model.append(nn.Unflatten(1, (out_shape[0], C)))
    X = torch.randn(8, 4)
    with torch.no_grad():
        y = model(X).argmax(-1)
        model[0].weight.mul_(scale)
        model[0].bias.mul_(scale)
    return model, X, y


@pytest.mark.parametrize(
    "loss_fn",
    [
        lambda o, t: F.cross_entropy(o, t),
        lambda o, t: F.nll_loss(F.log_softmax(o, -1), t),
        lambda o, t: F.cross_entropy(o, t, label_smoothing=0.1),
    ],
)
def test_a_cross_entropy_given_as_a_function_keeps_training_at_confident_outputs(loss_fn):
    """A cross-entropy written as a function goes to autograd's dense ``Lambda``, whose per-example check
    compared values relative to their own size: at confident outputs (``p (1 - p) = 1e-17``) rounding
    failed it, and the optimizer stopped hundreds of steps into training with "mixes examples". Now the
    examples' exact separation decides there; the Gauss-Newton matrix is the loss module's (to autograd's
    rounding at these outputs)."""
    model, X, y = _confident_classifier()
    G = hessinv.gauss_newton(model, loss_fn, X, y)
    smoothing = 0.1 if "label_smoothing" in loss_fn.__code__.co_names else 0.0
    ref = hessinv.gauss_newton(model, nn.CrossEntropyLoss(label_smoothing=smoothing), X, y).to_dense()
    assert torch.allclose(G.to_dense(), ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
    opt = hessinv.optim.Newton(model, loss_fn, seed=0)
    for _ in range(12):  # (two refreshes)
        opt.step(X, y)


def test_a_per_token_loss_over_the_last_axis_is_not_refused_at_confident_outputs():
    """Classes on the last axis, flattened inside the loss (a tagger's ``F.cross_entropy(o.reshape(-1, C),
    t.reshape(-1))``): no softmax form over axis 1, so autograd's ``Lambda`` -- whose per-example check
    rounding failed at confident outputs; the examples' exact separation (no cross-example second
    derivative) now decides. Float64: the matrix is plain autograd's."""
    model, X, y = _confident_classifier(scale=400.0, out_shape=(2,))
    model = model.double()
    X = X.double()

    def loss_fn(o, t):
        return F.cross_entropy(o.reshape(-1, o.shape[-1]), t.reshape(-1))

    G = hessinv.gauss_newton(model, loss_fn, X, y)
    ref = autograd_gauss_newton(model, loss_fn, X, y)
    assert torch.allclose(G.to_dense(), ref, rtol=1e-9, atol=1e-12 * float(ref.abs().max()))


def test_a_loss_that_mixes_examples_is_still_refused_at_confident_outputs():
    """The exact separation test refuses what mixes examples: logits centred over the batch."""
    model, X, y = _confident_classifier()
    for loss_fn in (
        lambda o, t: F.cross_entropy(o - o.mean(0), t),
        lambda o, t: F.cross_entropy(o, t) + 1e-3 * o.sum() ** 2,
    ):
        with pytest.raises(UnsupportedStageError, match="mixes examples"):
            hessinv.gauss_newton(model, loss_fn, X, y).to_dense()


def test_an_all_padding_batch_is_skipped_with_a_warning():
    """Every target ``ignore_index`` (an all-padding batch in a token pipeline): torch's mean loss is 0/0
    and its gradient zero, Adam carries on, and ``Newton.step`` raised, stopping the run. Now the step is
    skipped with a warning and NaN returned (torch's loss); the optimizer's state is unchanged: the next
    steps are those of an optimizer that never saw the batch. The preconditioner mode leaves the grads."""
    torch.manual_seed(0)

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))

    X, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    pad = torch.full((32,), -100)
    runs = []
    for padded in (False, True):
        model = make()
        opt = hessinv.optim.Newton(model, nn.CrossEntropyLoss(), seed=0)
        opt.step(X, y)
        if padded:
            before = [p.detach().clone() for p in model.parameters()]
            with pytest.warns(UserWarning, match="ignore_index=-100 .* step was skipped"):
                out = opt.step(X, pad)
            assert torch.isnan(out) and opt.steps == 1
            assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
        for _ in range(3):
            opt.step(X, y)
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
    model = make()
    pre = hessinv.optim.Preconditioner(model, nn.CrossEntropyLoss(), seed=0)
    nn.CrossEntropyLoss()(model(X), pad).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.warns(UserWarning, match="grads were left as they are"):
        pre.precondition_(X, pad)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))


@pytest.mark.parametrize("lr", [1e-3, 3e-3, 1e-2])
def test_an_adam_sized_learning_rate_is_warned_about(lr):
    """``Newton(model, loss_fn, lr=1e-3)`` (a new user's Adam habit) left the loss at chance, silently:
    the direction is already scaled. Warned at construction; the default and larger values are not."""
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.warns(UserWarning, match="already scaled"):
        hessinv.optim.Newton(model, nn.CrossEntropyLoss(), lr=lr)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for ok in (1.0, 0.5, 0.0):  # (0: a warm-up schedule's start)
            hessinv.optim.Newton(model, nn.CrossEntropyLoss(), lr=ok)


def test_a_loss_nonlinear_in_each_cross_entropy_keeps_its_exact_curvature():
    """A fuzzer's find in this session's first version, which probed every loss for the softmax form:
    ``sum_n CE_n^2`` at a confidently misclassified example (target the runner-up class, ``p_t = 1e-13``)
    made the probe's tests, relative to ``w |p o v|``, vacuous -- the form was accepted and the matrices
    were 28% off. Such a loss takes autograd's ``Lambda`` (float64: exact to rounding here)."""
    model = nn.Linear(2, 3, bias=False).double()
    with torch.no_grad():  # logits [40, 10, -20] (target 1: the runner-up) and [0.5, -0.3, -0.7]
        model.weight.copy_(torch.tensor([[40.0, 0.5], [10.0, -0.3], [-20.0, -0.7]]))
    model = nn.Sequential(model)
    X = torch.eye(2, dtype=F64)
    y = torch.tensor([1, 2])

    def loss_fn(o, t):
        return F.cross_entropy(o, t, reduction="none").pow(2).sum()

    ref = autograd_gauss_newton(model, loss_fn, X, y)
    G = hessinv.gauss_newton(model, loss_fn, X, y).to_dense()
    assert torch.allclose(G, ref, rtol=1e-10, atol=1e-12 * float(ref.abs().max()))


def test_a_batch_sized_loss_weight_with_class_targets_is_named_at_the_curvature_batch():
    """With class-index targets the curvature batch's draw calls the loss on the drawn examples first (to
    skip draws of ignored targets only): a loss holding a weight per example of the batch raised torch's
    raw "size of tensor a (8) must match" there, where float targets got the named error and its advice
    (a probe). Both now name it, and the advice works."""
    torch.manual_seed(0)
    X, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    w = torch.rand(64)
    m = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    loss_fn = lambda o, t: (F.cross_entropy(o, t, reduction="none") * w).mean()  # noqa: E731
    with pytest.raises(hessinv.UnsupportedStageError, match="curvature_batch_size at least the batch size"):
        hessinv.optim.Newton(m, loss_fn).step(X, y)
    hessinv.optim.Newton(m, loss_fn, curvature_batch_size=64).step(X, y)


def test_auto_mode_hands_back_to_preconditioning_with_its_momentum_started_afresh():
    """After full-batch trust-region steps, the first mini-batch hands back to preconditioning: the momentum
    of the very first (preconditioned) step was kept through the trust region and the bias correction
    counted the trust-region steps, so the first steps after were 4.6x shorter than a fresh optimizer's
    from the same weights, and carried the initial point's gradient (a probe)."""
    import copy

    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(1024, 10, generator=g), torch.randint(0, 4, (1024,), generator=g)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 4))
    lf = nn.CrossEntropyLoss()
    opt = hessinv.optim.Newton(m, lf, seed=0)
    for _ in range(15):
        opt.step(X[:32], y[:32])
    assert opt.mode == "trust-region"
    fresh_model = copy.deepcopy(m)
    fresh = hessinv.optim.Newton(fresh_model, lf, seed=0, mode="precondition")
    opt.step(X[64:128], y[64:128])
    fresh.step(X[64:128], y[64:128])
    assert opt.mode == "precondition" and opt._newton["momentum_since"] == 15
    assert opt.last_stats.step_norm >= 0.5 * fresh.last_stats.step_norm


def test_closures_in_two_threads_sharing_one_loss_module_see_their_own_batch():
    """Two threads, each with its own model and Newton, one shared ``criterion``: the closure's watch on the
    loss module saw the other thread's calls too, and refused ("called loss_fn on 2 different batches") in
    most runs (a probe)."""
    import threading

    crit = nn.CrossEntropyLoss()
    errors: list[BaseException] = []

    def train(seed: int) -> None:
        try:
            g = torch.Generator().manual_seed(seed)
            X, y = torch.randn(256, 10, generator=g), torch.randint(0, 4, (256,), generator=g)
            torch.manual_seed(seed)
            m = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 4))
            opt = hessinv.optim.Newton(m, crit, seed=seed)
            for i in range(30):
                xb, yb = X[32 * (i % 8) : 32 * (i % 8) + 32], y[32 * (i % 8) : 32 * (i % 8) + 32]

                def closure(xb=xb, yb=yb, m=m, opt=opt):
                    opt.zero_grad()
                    loss = crit(m(xb), yb)
                    loss.backward()
                    return loss

                opt.step(closure)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=train, args=(s,)) for s in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_a_closure_that_calls_the_model_with_more_than_its_input_is_warned_of():
    """``model(x, mask)`` in the closure: the curvature is that of ``model(x)`` alone, silently (a probe)."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

        def forward(self, x, scale=None):
            out = self.net(x)
            return out if scale is None else out * scale

    torch.manual_seed(0)
    m, crit = Scaled(), nn.CrossEntropyLoss()
    X, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    opt = hessinv.optim.Newton(m, crit)

    def closure():
        opt.zero_grad()
        loss = crit(m(X, 2.0), y)
        loss.backward()
        return loss

    with pytest.warns(UserWarning, match="more than its input"):
        opt.step(closure)


def test_a_batch_whose_targets_all_have_class_weight_zero_is_skipped_like_an_all_ignored_one():
    """``CrossEntropyLoss(weight=w)`` on a batch of a class of weight 0 only: the mean loss is 0/0, which
    Newton raised as "the loss is nan", where an all-ignored batch is skipped with a warning (a probe)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = hessinv.optim.Newton(m, nn.CrossEntropyLoss(weight=torch.tensor([0.0, 1.0, 1.0])), seed=0)
    X, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    opt.step(X, y)
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.warns(UserWarning, match="class weight 0"):
        opt.step(X[:4], torch.zeros(4, dtype=torch.long))
    assert all(torch.equal(a, p) for a, p in zip(before, m.parameters(), strict=True))


def _tiny(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def test_a_state_dict_loads_into_the_same_parameters_grouped_otherwise():
    """Regrouping after unfreezing (the refusal of add_param_group advises a new Newton): the new one
    refused the old state dict for its other number of groups, though Newton's state is per parameter."""
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(192, 6, generator=g), torch.randint(0, 3, (192,), generator=g)
    net, CE = _tiny(), nn.CrossEntropyLoss()
    opt = hessinv.optim.Newton(net, CE, seed=0)
    for i in range(4):
        opt.step(X[32 * i : 32 * i + 32], y[32 * i : 32 * i + 32])
    twin = _tiny(5)
    twin.load_state_dict(net.state_dict())
    groups = [{"params": list(twin[0].parameters()), "lr": 0.5}, {"params": list(twin[2].parameters())}]
    new = hessinv.optim.Newton(twin, CE, seed=1, params=groups)
    with pytest.warns(UserWarning, match="grouped otherwise"):
        new.load_state_dict(opt.state_dict())
    assert new.steps == opt.steps and [gr["lr"] for gr in new.param_groups] == [0.5, 1.0]
    for gr in opt.param_groups:  # the same lr everywhere: the two continue alike
        gr["lr"] = 0.5
    new.param_groups[1]["lr"] = 0.5
    opt.step(X[128:160], y[128:160])
    new.step(X[128:160], y[128:160])
    for p, q in zip(net.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
    other = hessinv.optim.Newton(nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)), CE)
    with pytest.raises(hessinv.HessinvError):  # (another model's parameters: refused as before)
        other.load_state_dict(opt.state_dict())


def test_step_stats_report_the_curvature_batch_drawn_and_the_groups_lr():
    """StepStats said 8 curvature examples where the curvature was built on the 3 the loss counts, and
    group 0's lr with several groups."""
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
    y[3:] = -100  # 3 labelled examples, 29 padding
    opt = hessinv.optim.Newton(_tiny(), nn.CrossEntropyLoss(), seed=0, mode="precondition")
    opt.step(X, y)
    assert opt.last_stats.refreshed and opt.last_stats.curvature_batch_size == 3
    tr = hessinv.optim.Newton(
        _tiny(), nn.CrossEntropyLoss(), seed=0, mode="trust-region", curvature_batch_size=8
    )
    tr.step(X, y)
    assert tr.last_stats.curvature_batch_size == 3
    net = _tiny()
    ps = list(net.parameters())
    opt = hessinv.optim.Newton(
        net, nn.CrossEntropyLoss(), seed=0, params=[{"params": ps[:2], "lr": 0.1}, {"params": ps[2:]}]
    )
    opt.step(X, torch.randint(0, 3, (32,), generator=g))
    assert opt.last_stats.lr == 1.0


def test_an_in_place_op_that_leaves_the_gradient_as_written_does_not_warn():
    """Logging the gradient norm with clip_grad_norm_(..., inf) bumps .grad's version, not its values:
    the next step warned that a changed .grad was ignored."""
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(96, 6, generator=g), torch.randint(0, 3, (96,), generator=g)
    net = _tiny()
    opt = hessinv.optim.Newton(net, nn.CrossEntropyLoss(), seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(3):
            opt.step(X[32 * i : 32 * i + 32], y[32 * i : 32 * i + 32])
            torch.nn.utils.clip_grad_norm_(net.parameters(), float("inf"))
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1e-6)  # (changed values: still said)
    with pytest.warns(UserWarning, match="not used"):
        opt.step(X[:32], y[:32])


def test_a_regrouped_load_keeps_this_optimizer_s_groups_for_frozen_layers():
    """The checkpoint's record of which group a frozen layer returns to is of its own grouping: after a
    regrouped load, unfreezing must use this optimizer's (the checkpoint's group 2 does not exist here)."""
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    net[0].requires_grad_(False)
    first, mid, head = (list(m.parameters()) for m in (net[0], net[2], net[4]))
    a = hessinv.optim.Newton(
        net, nn.CrossEntropyLoss(), seed=0, params=[{"params": mid}, {"params": head}, {"params": first}]
    )
    a.step(X[:32], y[:32])
    b = hessinv.optim.Newton(
        net, nn.CrossEntropyLoss(), seed=0, params=[{"params": first + mid, "lr": 0.5}, {"params": head}]
    )
    with pytest.warns(UserWarning, match="grouped otherwise"):
        b.load_state_dict(a.state_dict())
    net[0].requires_grad_(True)
    b.step(X[32:], y[32:])
    assert {id(p) for p in net[0].parameters()} <= {id(p) for p in b.param_groups[0]["params"]}


def test_full_batch_regression_preconditioned_takes_the_whole_batchs_curvature():
    """Full-batch training where the trust region is too dear (a 10-32-32-1 tanh regression on 100
    examples): the preconditioner took an 8-example curvature, and the step outside its subspace -- Adam's
    at a fixed lr -- left the loss wandering at 1e-5 to 1e-4 where Adam(1e-3) reached 1e-12 (a probe). It
    takes the whole batch's curvature now, and the loss goes to float32's floor."""
    torch.manual_seed(0)
    X = torch.randn(100, 10)
    with torch.no_grad():
        y = torch.tanh(X @ torch.randn(10, 1) / 3) + 0.1 * torch.randn(100, 1)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = hessinv.optim.Newton(model, nn.MSELoss(), seed=0)
    losses = [float(opt.step(X, y)) for _ in range(1500)]
    assert opt.last_stats.mode == "precondition"
    assert opt.preconditioner.curvature_batch_size == 100 and opt.last_stats.curvature_batch_size == 100
    assert min(losses[-100:]) < 1e-9, min(losses[-100:])


def test_full_batch_preconditioning_takes_the_whole_batchs_curvature_at_once(monkeypatch):
    """The switch to the whole batch's curvature (the second step of the same batch) waited for the next
    scheduled refresh: steps 2-10 still preconditioned with the first step's 8 examples (a docs probe);
    it refreshes at the switch now, and on schedule after it (steps 11, 21, ...). (Auto's trust region, which
    a timed factorization of this batch now affords, held off: preconditioning is what is tested.)"""
    import hessinv.optim.newton as hn

    monkeypatch.setattr(hn, "TRUST_REGION_MAX_SECONDS", 0.0)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(30, 16), nn.Tanh(), nn.Linear(16, 2)).double()
    X, y = torch.randn(455, 30, dtype=torch.float64), torch.randint(0, 2, (455,))
    opt = hessinv.optim.Newton(net, nn.CrossEntropyLoss())
    seen = []
    for _ in range(12):
        opt.step(X, y)
        seen.append((opt.last_stats.mode, opt.last_stats.refreshed, opt.last_stats.curvature_batch_size))
    assert seen[0] == ("precondition", True, 8) and seen[1] == ("precondition", True, 455)
    assert [s[1] for s in seen[2:]] == [False] * 8 + [True, False]
    assert {s[2] for s in seen[1:]} == {455}


def test_auto_hands_back_to_preconditioning_when_the_groups_weight_decays_are_made_to_differ():
    """``mode="auto"`` chose the trust region on a full batch with one weight decay; a scheduler-like
    change of one group's ``weight_decay`` mid-run then raised InvalidArgumentError at every step (the
    trust region takes one: it shifts ``H``) -- auto's choice is redone instead: it preconditions, and
    the loss keeps falling (a probe)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 4))
    X, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
    groups = [{"params": m[0].parameters()}, {"params": m[2].parameters()}]
    opt = hessinv.optim.Newton(m, nn.CrossEntropyLoss(), params=groups, seed=0)
    for _ in range(3):
        opt.step(X, y)
    assert opt.last_stats.mode == "trust-region"
    opt.param_groups[0]["weight_decay"] = 0.01
    losses = [float(opt.step(X, y)) for _ in range(4)]
    assert opt.last_stats.mode == "precondition" and opt.mode == "precondition"
    assert losses[-1] < losses[0]


def _tiny_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


@pytest.mark.parametrize(
    "groups, match",
    [
        (lambda m: [{"params": m.parameters(), "beta2": 0.99}], "'beta2' is not a per-group setting"),
        (lambda m: [{"params": m.parameters(), "diagonal_damping": 50.0}], "'diagonal_damping' is not a"),
        (lambda m: [{"params": m.parameters(), "maximize": True}], "'maximize' is another optimizer's"),
        (lambda m: [{"params": m.parameters(), "betas": (0.9, 0.99)}], "'betas' is another optimizer's"),
        (lambda m: {"params": m.parameters()}, "wrap one group in a list"),
        (lambda m: [{"lr": 0.5}], "needs a 'params' entry"),
        (lambda m: [{"params": m}], "got a module: pass its .parameters()"),
        (lambda m: list(m), "got a module: pass its .parameters()"),
        (lambda m: [1, 2], "must hold tensors .*got int"),
        (lambda m: m, "got Sequential"),
    ],
)
def test_parameter_groups_refuse_what_they_would_ignore(groups, match):
    """A lifecycle probe: a group's beta2, diagonal_damping, maximize, betas ... were accepted and had no
    effect (bitwise the run without them); malformed params raised AttributeError/KeyError."""
    m = _tiny_mlp()
    with pytest.raises(hessinv.InvalidArgumentError, match=match):
        hessinv.optim.Newton(m, nn.CrossEntropyLoss(), params=groups(m))


def test_group_keys_that_newton_uses_or_ignores_by_design_pass():
    """A group's own name (logging) passes, as torch's optimizers let it; lr and weight decay per group
    act (the step scales with the group's lr); a group momentum in the trust region is refused like the
    constructor's, and a two-entry tensor lr is a named error (a RuntimeError before)."""
    m = _tiny_mlp()
    X, y = torch.randn(8, 3), torch.arange(8) % 2
    first, rest = list(m[0].parameters()), list(m[2].parameters())
    opt = hessinv.optim.Newton(
        m, nn.CrossEntropyLoss(), params=[{"params": first, "name": "a", "lr": 0.0}, {"params": rest}]
    )
    before = [p.detach().clone() for p in m.parameters()]
    opt.step(X, y)
    assert all(torch.equal(p, b) for p, b in zip(first, before[:2], strict=True))  # lr 0: not moved
    assert not all(torch.equal(p, b) for p, b in zip(rest, before[2:], strict=True))
    with pytest.raises(hessinv.InvalidArgumentError, match="'momentum' has no use in the trust region"):
        m2 = _tiny_mlp()
        params = [{"params": m2.parameters(), "momentum": 0.5}]
        hessinv.optim.Newton(m2, nn.CrossEntropyLoss(), mode="trust-region", params=params)
    opt.param_groups[1]["lr"] = torch.tensor([0.5, 0.5])
    with pytest.raises(hessinv.InvalidArgumentError, match="lr must be a number or a one-entry tensor"):
        opt.step(X, y)


def test_bare_step_after_backward_says_newton_takes_the_gradient_itself():
    """torch's loop ``loss.backward(); opt.step()`` got advice about torch.distributed.checkpoint's
    set_optimizer_state_dict; it is told that Newton computes the gradient from the batch. Zero gradients
    (what that checkpoint helper leaves before calling step()) keep the checkpoint advice."""
    m = _tiny_mlp()
    X, y = torch.randn(8, 3), torch.arange(8) % 2
    opt = hessinv.optim.Newton(m, nn.CrossEntropyLoss())
    nn.CrossEntropyLoss()(m(X), y).backward()
    with pytest.raises(
        hessinv.InvalidArgumentError, match=r"call opt.step\(inputs, targets\), no loss.backward\(\)"
    ):
        opt.step()
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(hessinv.InvalidArgumentError, match="set_optimizer_state_dict"):
        opt.step()


class _TrainOnlyBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.aux = nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(4, 4)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.training:
            h = h + 0.1 * self.aux(h)
        return self.b(h)


def test_parameter_used_only_in_training_mode_is_named_as_such():
    """A lifecycle probe: a parameter used only under ``if self.training`` (the model in training mode)
    was refused as one "the forward pass does not use" -- the optimizer's chain is the network in eval
    mode, which the message now says."""
    torch.manual_seed(0)
    with pytest.raises(hessinv.NotAChainError, match=r"aux\.weight.* in eval mode, where the curvature"):
        hessinv.optim.Newton(_TrainOnlyBranch(), nn.CrossEntropyLoss()).step(
            torch.randn(8, 3), torch.arange(8) % 2
        )


def test_a_parameter_list_is_params_as_torch_takes_it():
    """A review: the malformed-params check refused every nn.Module, nn.ParameterList too (it iterates
    tensors; torch's optimizers take it, and Newton did before), at the top and as a group's params."""
    m = _tiny_mlp()
    X, y = torch.randn(8, 3), torch.arange(8) % 2
    for params in (nn.ParameterList(m.parameters()), [{"params": nn.ParameterList(m.parameters())}]):
        opt = hessinv.optim.Newton(m, nn.CrossEntropyLoss(), params=params)
        assert math.isfinite(float(opt.step(X, y)))


def test_auto_falls_back_to_gauss_newton_where_the_hessian_is_not_symmetric():
    """Full-batch ``Newton(model, loss_fn)`` on a model with weight_norm: auto switched to the exact-
    Hessian trust region at the second step on the same batch, whose stage autograd gives asymmetric
    second derivatives (refused, rightly), and the step raised -- its fallback caught only a missing
    double backward (a probe). It keeps the Gauss-Newton preconditioning and trains on."""
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    X, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    parametrizations.weight_norm(m[2])
    with pytest.raises(UnsupportedStageError, match="not symmetric"):
        hessinv.hessian(m, nn.CrossEntropyLoss(), X, y).factor(1.0)
    opt = hessinv.optim.Newton(m, nn.CrossEntropyLoss())
    losses = [float(opt.step(X, y)) for _ in range(4)]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert opt.mode == "precondition"


def test_a_model_partly_on_the_meta_device_is_told_how_to_materialize_it():
    """One layer left on the meta device: the advice was ``model.to(device)``, which torch refuses for meta
    tensors (NotImplementedError, a probe). Following the new advice works."""
    from hessinv.errors import DtypeMismatchError

    torch.manual_seed(0)
    X, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    m = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3, device="meta"))
    with pytest.raises(
        DtypeMismatchError, match=r"layer.to_empty\(device='cpu'\) then layer.reset_parameters"
    ):
        hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    m[2].to_empty(device="cpu")
    m[2].reset_parameters()
    assert hessinv.hessian(m, nn.CrossEntropyLoss(), X, y).shape == (57, 57)


class _RunningMean(nn.Module):
    """Keeps a running mean of its input (a statistic), the output its input; ``gated``: in training only."""

    def __init__(self, gated: bool):
        super().__init__()
        self.gated = gated
        self.register_buffer("mu", torch.zeros(6))

    def forward(self, x):
        if self.training or not self.gated:
            self.mu.mul_(0.9).add_(0.1 * x.detach().mean(0))
        return x


def test_a_running_statistic_in_forward_is_told_to_update_in_training_only():
    """A stage that writes a buffer on every call while its output stays the same was told to call
    model.eval(), which does not stop a forward that ignores the mode (a probe). The message says to gate
    the update on ``self.training``, and that works (the operator, and Newton, which switches to eval)."""
    torch.manual_seed(0)
    X, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    for gated in (False, True):
        m = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), _RunningMean(gated), nn.Linear(6, 3))
        if not gated:
            with pytest.raises(UnsupportedStageError, match=r"only under `if self.training:` and call model"):
                hessinv.hessian(m.eval(), nn.CrossEntropyLoss(), X, y)
            continue
        H = hessinv.hessian(m.eval(), nn.CrossEntropyLoss(), X, y)
        assert torch.allclose(H.to_dense(), autograd_hessian_of(m, X, y), atol=1e-5)
        m.train()
        opt = hessinv.optim.Newton(m, nn.CrossEntropyLoss())
        assert all(math.isfinite(float(opt.step(X, y))) for _ in range(3))


def autograd_hessian_of(m, X, y):
    from reference import autograd_gradient_hessian

    return autograd_gradient_hessian(m, nn.CrossEntropyLoss(), X, y)[1].to(torch.float32)
