"""Dropout and BatchNorm in training mode under the optimizer: the gradient as the model computes it (batch
statistics, dropout masks), the curvature of the deterministic network (eval mode), modes put back after
every step; the trust region, which models the batch loss of a deterministic network, refuses them."""

from __future__ import annotations

import pytest
import torch
from reference import autograd_gauss_newton
from torch import nn

import hessinv
import hessinv.optim as ho


def _bn_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 3)
    ).double()


def _data(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 6, generator=g, dtype=torch.float64)
    return X, X[:, :3].argmax(1)  # (a rule the network can learn)


def test_newton_trains_with_batchnorm_and_dropout_in_training_mode():
    model, loss_fn = _bn_model(), nn.CrossEntropyLoss()
    X, y = _data(256)
    opt = ho.Newton(model, loss_fn, seed=0)
    with torch.no_grad():
        model.eval()
        first = float(loss_fn(model(X), y))
        model.train()
    mean0 = model[1].running_mean.clone()
    for i in list(range(0, 256, 16)) * 3:
        opt.step(X[i : i + 16], y[i : i + 16])
        assert all(m.training for m in model.modules())  # the modes as they were
    assert opt.mode == "precondition"
    assert not torch.equal(model[1].running_mean, mean0)  # the steps' forwards ran in training mode
    with torch.no_grad():
        model.eval()
        assert float(loss_fn(model(X), y)) < 0.75 * first


def test_the_step_takes_the_training_mode_loss_and_the_eval_mode_curvature():
    model, loss_fn = _bn_model(), nn.CrossEntropyLoss()
    model[3].p = 0.0  # (Dropout off: the training-mode function is deterministic, comparable)
    X, y = _data(8)
    pre = ho.Preconditioner(model, loss_fn, curvature_batch_size=8, basis="identity", seed=0)
    U, S = pre.curvature_root(X, y)
    assert model.training and model[1].training
    model.eval()
    ref = autograd_gauss_newton(model, loss_fn, X, y)
    model.train()
    assert torch.allclose(U.T @ (S[:, None] * U), ref, rtol=1e-10, atol=1e-12 * float(ref.abs().max()))
    opt = ho.Newton(model, loss_fn, seed=0)
    with torch.no_grad():
        train_loss = float(loss_fn(model(X), y))  # batch statistics (and running stats moved once)
    model[1].reset_running_stats()
    opt.step(X, y)
    assert opt.last_stats.loss == pytest.approx(train_loss, rel=1e-12)


def test_precondition_with_training_layers_restores_the_modes():
    model, loss_fn = _bn_model(), nn.CrossEntropyLoss()
    X, y = _data(16)
    pre = ho.Preconditioner(model, loss_fn, seed=0)
    loss_fn(model(X), y).backward()
    d = pre.precondition_(X, y)
    assert bool(torch.isfinite(d).all()) and all(m.training for m in model.modules())


def test_the_trust_region_refuses_training_layers_and_auto_preconditions():
    model, loss_fn = _bn_model(), nn.CrossEntropyLoss()
    X, y = _data(16)
    opt = ho.Newton(model, loss_fn, mode="trust-region")
    with pytest.raises(hessinv.InvalidArgumentError, match="BatchNorm1d, Dropout in training mode"):
        opt.step(X, y)
    auto = ho.Newton(model, loss_fn, seed=0)  # mode="auto" on a full batch: the trust region if it could
    for _ in range(3):
        auto.step(X, y)
    assert auto.mode == "precondition"
    model.eval()  # the deterministic network: the trust region takes it
    opt.step(X, y)
    assert opt.last_stats.mode == "trust-region"


def test_a_refused_step_leaves_the_running_statistics_as_they_were():
    """A batch with a NaN went through the training-mode forward (which updates BatchNorm's running
    statistics) before the gradient's check refused it: running_mean became NaN and the next refresh
    failed for good. A refused step now puts the statistics back; a closure that returns None runs the
    model once per step (its own forward), not twice."""
    model, loss_fn = _bn_model(), nn.CrossEntropyLoss()
    X, y = _data(64)
    opt = ho.Newton(model, loss_fn, seed=0)
    opt.step(X[:16], y[:16])
    held = [b.clone() for b in model[1].buffers()]
    bad = X[16:32].clone()
    bad[3, 2] = float("nan")
    with pytest.raises(hessinv.NonFiniteError):
        opt.step(bad, y[16:32])
    assert all(torch.equal(a, b) for a, b in zip(model[1].buffers(), held, strict=True))
    for i in range(16, 64, 16):
        opt.step(X[i : i + 16], y[i : i + 16])
    assert all(bool(torch.isfinite(b).all()) for b in model[1].buffers())

    def closure():
        opt.zero_grad()
        loss_fn(model(X[:16]), y[:16]).backward()  # returns None

    count = int(model[1].num_batches_tracked)
    for _ in range(3):
        opt.step(closure=closure, inputs=X[:16], targets=y[:16])
    assert int(model[1].num_batches_tracked) == count + 3


def test_attention_dropout_in_training_mode_trains():
    """nn.TransformerEncoderLayer's dropout includes MultiheadAttention's attention dropout (a float
    attribute, not a Dropout module): it is switched off for the curvature too."""
    torch.manual_seed(0)

    class Pool(nn.Module):
        def forward(self, x):
            return x.mean(1)

    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True)
    model = nn.Sequential(nn.Unflatten(1, (3, 2)), nn.Linear(2, 8), layer, Pool(), nn.Linear(8, 3)).double()
    X, y = _data(32)
    opt = ho.Newton(model, nn.CrossEntropyLoss(), seed=0)
    for i in range(0, 32, 8):
        opt.step(X[i : i + 8], y[i : i + 8])
    assert layer.self_attn.training and layer.training and opt.mode == "precondition"


def test_probability_targets_of_negative_mass_keep_their_negative_rows():
    """Cross-entropy's Lambda_n = mass_n (diag p - p p^T) is negative semidefinite for probability targets
    that sum to a negative number (torch accepts them): its rows keep sign -1 (the closed-form PSD flag
    had dropped them, G off by 0.33 relative)."""
    from hessinv.lowrank import gauss_newton_root

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X = torch.randn(4, 6, dtype=torch.float64)
    T = torch.softmax(torch.randn(4, 3, dtype=torch.float64), -1)
    T[1] *= -1.0
    loss_fn = nn.CrossEntropyLoss()
    G = hessinv.gauss_newton(model, loss_fn, X, T)
    U, S = gauss_newton_root(G.blocks, torch.float64, X.device)
    ref = autograd_gauss_newton(model, loss_fn, X, T)
    assert bool((S < 0).any())
    assert float((U.T @ (S[:, None] * U) - ref).abs().max()) <= 1e-12 * float(ref.abs().max())


def test_a_refused_closure_step_leaves_the_statistics_and_a_raising_callback_keeps_the_step():
    """A closure's forward moves the running statistics too: a NaN batch refused by step(closure) had
    left running_mean NaN (every refresh after it failed). A callback that raises after the step was
    taken leaves the step's statistics with its parameters (they had been rolled back alone)."""
    model, loss_fn = _bn_model(), nn.CrossEntropyLoss()
    X, y = _data(48)
    opt = ho.Newton(model, loss_fn, seed=0)

    def closure_on(xb, yb):
        def closure():
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            return loss

        return closure

    opt.step(closure_on(X[:16], y[:16]))
    held = [b.clone() for b in model[1].buffers()]
    bad = X[16:32].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(hessinv.NonFiniteError):
        opt.step(closure_on(bad, y[16:32]))
    assert all(torch.equal(a, b) for a, b in zip(model[1].buffers(), held, strict=True))

    def callback(stats):
        raise RuntimeError("a callback that fails")

    opt.callback = callback
    with pytest.raises(RuntimeError, match="a callback that fails"):
        opt.step(X[32:], y[32:])
    assert opt.last_stats is not None and int(model[1].num_batches_tracked) == int(held[2]) + 1


def test_the_named_error_for_a_bad_batch_is_the_deterministic_networks():
    """With BatchNorm in training mode, explaining a failed batch (a class index out of range) ran the
    chain's checks in training mode and named BatchNorm ("call model.eval()") instead of the batch."""
    model, loss_fn = _bn_model(), nn.CrossEntropyLoss()
    X, y = _data(16)
    opt = ho.Newton(model, loss_fn, seed=0)
    bad = y.clone()
    bad[3] = 7
    with pytest.raises(hessinv.HessinvError, match="out of bounds|class") as e:
        opt._explain_failure(X, bad)  # (what DataParallel's closure calls after its forward failed)
    assert "eval" not in str(e.value)
    assert all(m.training for m in model.modules())


def test_a_preconditioner_state_of_another_model_is_refused():
    """Two models with as many parameters and factor shapes that fit an older rotation rule: the
    Preconditioner loaded one's state into the other through that rule. Its state records the parameter
    shapes now, as Newton's does."""

    class Gain(nn.Module):
        def __init__(self, k: int):
            super().__init__()
            self.w = nn.Parameter(torch.ones(k, dtype=torch.float64))

        def forward(self, x):
            return x * self.w[: x.shape[1]]

    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), Gain(32)).double()
    b = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 8)).double()
    assert sum(p.numel() for p in a.parameters()) == sum(p.numel() for p in b.parameters())
    X, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    pa = ho.Preconditioner(a, nn.CrossEntropyLoss(), basis_max_dim=5, seed=0)
    a.zero_grad()
    nn.CrossEntropyLoss()(a(X), y).backward()
    pa.precondition_(X, y)
    pb = ho.Preconditioner(b, nn.CrossEntropyLoss(), basis_max_dim=5, seed=0)
    with pytest.raises(hessinv.InvalidArgumentError, match="another model"):
        pb.load_state_dict(pa.state_dict())


class _FunctionalDropout(nn.Module):
    """Dropout written as ``F.dropout(x, p, training=self.training)`` in the model's own forward."""

    def __init__(self, p: float = 0.3):
        super().__init__()
        self.p, self.a, self.b = p, nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.nn.functional.dropout(torch.tanh(self.a(x)), self.p, training=self.training))


def test_functional_dropout_reading_the_training_flag_takes_the_training_gradient_and_eval_curvature():
    torch.manual_seed(0)
    model, loss_fn = _FunctionalDropout().double(), nn.CrossEntropyLoss()
    X, y = _data(16)
    opt = ho.Newton(model, loss_fn, seed=0)
    torch.manual_seed(5)
    ref = torch.autograd.grad(loss_fn(model(X), y), list(model.parameters()))  # with its dropout mask
    torch.manual_seed(5)
    opt.step(X, y)
    assert opt.mode == "precondition" and model.training
    got = [p.grad for p in model.parameters()]  # the step's gradient (the optimizer writes p.grad)
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
    # the curvature: the eval-mode (deterministic) network's
    pre = ho.Preconditioner(model, loss_fn, curvature_batch_size=16, basis="identity", seed=0)
    U, S = pre.curvature_root(X, y)
    assert model.training
    model.eval()
    G = autograd_gauss_newton(model, loss_fn, X, y)
    model.train()
    assert torch.allclose(U.T @ (S[:, None] * U), G, rtol=1e-10, atol=1e-12 * float(G.abs().max()))
    with pytest.raises(hessinv.InvalidArgumentError, match="training mode"):
        ho.Newton(model, loss_fn, mode="trust-region").step(X, y)


@pytest.mark.parametrize("kind", ["parametrization", "hook"])
def test_spectral_norm_in_training_mode_runs_its_power_iteration_in_the_gradients_forward(kind):
    torch.manual_seed(0)
    lin = nn.Linear(6, 8).double()
    if kind == "parametrization":
        lin = torch.nn.utils.parametrizations.spectral_norm(lin)
    else:
        lin = torch.nn.utils.spectral_norm(lin)
    model, loss_fn = nn.Sequential(lin, nn.Tanh(), nn.Linear(8, 3).double()), nn.CrossEntropyLoss()
    X, y = _data(64)
    opt = ho.Newton(model, loss_fn, seed=0)
    u0 = [b.clone() for b in lin.buffers()]
    first = float(loss_fn(model(X), y))
    u1 = [b.clone() for b in lin.buffers()]  # (that forward took one power step)
    for i in list(range(0, 64, 16)) * 4:
        opt.step(X[i : i + 16], y[i : i + 16])
    moved = [b for b, a in zip(lin.buffers(), u1, strict=True) if not torch.equal(a, b)]
    assert moved and len(u0) == len(u1)  # the training-mode forwards ran the power iteration
    assert float(loss_fn(model(X), y)) < first


def test_a_multilayer_lstm_with_dropout_trains_in_training_mode():
    torch.manual_seed(0)

    class Last(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(2, 8, num_layers=2, dropout=0.3, batch_first=True)

        def forward(self, x):
            return self.rnn(x)[0][:, -1]

    model = nn.Sequential(nn.Unflatten(1, (3, 2)), Last(), nn.Linear(8, 3)).double()
    X, y = _data(64)
    opt = ho.Newton(model, nn.CrossEntropyLoss(), seed=0)
    model.eval()
    with torch.no_grad():
        first = float(nn.CrossEntropyLoss()(model(X), y))
    model.train()
    for i in list(range(0, 64, 16)) * 4:
        opt.step(X[i : i + 16], y[i : i + 16])
    assert opt.mode == "precondition" and model[1].rnn.training
    model.eval()
    with torch.no_grad():
        assert float(nn.CrossEntropyLoss()(model(X), y)) < first


class _HeadFirst(nn.Module):
    """Submodules registered head first, and a parameter of the model itself used last (a temperature):
    ``model.parameters()`` lists them in another order than ``forward`` uses them."""

    def __init__(self):
        super().__init__()
        self.t = nn.Parameter(torch.tensor(1.5))
        self.head = nn.Linear(8, 3)
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh())

    def forward(self, x):
        return self.head(self.body(x)) * self.t


class _Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.t = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return x * self.t


@pytest.mark.parametrize("mode", ["precondition", "trust-region"])
def test_the_optimizers_take_parameters_registered_in_another_order_than_forward_uses_them(mode):
    """The operators order their vectors like ``model.parameters()`` (the stages' order permuted: the same
    matrix as the network registered in order, rows and columns permuted); the optimizers' vectors are
    internal: they split it as it is, and step as on the same network registered in order."""
    X, y = _data(32)
    torch.manual_seed(0)
    model = _HeadFirst().double()
    ordered = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3), _Scale()).double()
    with torch.no_grad():
        for a, b in [(ordered[0], model.body[0]), (ordered[2], model.head)]:
            a.weight.copy_(b.weight), a.bias.copy_(b.bias)
    pairs = [
        (model.body[0].weight, ordered[0].weight),
        (model.body[0].bias, ordered[0].bias),
        (model.head.weight, ordered[2].weight),
        (model.head.bias, ordered[2].bias),
        (model.t, ordered[3].t),
    ]
    # model.parameters(): t, head.weight, head.bias, body[0].weight, body[0].bias; the twin's: body's
    # weight and bias (48, 8), head's (24, 3), t -- the twin's index of each of the model's entries
    body_w, body_b, head_w, head_b, t = torch.arange(84).split([48, 8, 24, 3, 1])
    perm = torch.cat([t, head_w, head_b, body_w, body_b])
    G, G_twin = (hessinv.gauss_newton(m, nn.CrossEntropyLoss(), X, y).to_dense() for m in (model, ordered))
    assert torch.allclose(G, G_twin[perm][:, perm], rtol=1e-12, atol=1e-14)
    opts = [ho.Newton(m, nn.CrossEntropyLoss(), seed=0, mode=mode) for m in (model, ordered)]
    for i in range(0, 32, 8) if mode == "precondition" else [0, 0, 0]:
        for opt in opts:
            opt.step(X[i : i + 8], y[i : i + 8]) if mode == "precondition" else opt.step(X, y)
    for a, b in pairs:
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-11)
    assert not torch.equal(model.t, torch.tensor(1.5, dtype=torch.float64))  # (it moved)
    if mode == "precondition":  # Preconditioner.precondition_ writes each parameter's own direction
        grads = []
        for m in (model, ordered):
            pc = ho.Preconditioner(m, nn.CrossEntropyLoss(), seed=0, curvature_batch_size=8)
            m.zero_grad()
            nn.CrossEntropyLoss()(m(X[:8]), y[:8]).backward()
            pc.precondition_(X[:8], y[:8])
            grads.append({id(p): p.grad for p in m.parameters()})
        for a, b in pairs:
            assert torch.allclose(grads[0][id(a)], grads[1][id(b)], rtol=1e-9, atol=1e-12)


def test_the_training_flag_is_read_from_the_forwards_code_not_its_text():
    """A comment or another attribute that merely mentions training leaves the model deterministic (the
    trust region takes it); a forward without a source file (exec, a REPL) that reads the flag counts."""
    from hessinv.chain import training_layers

    class Commented(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.training_steps = nn.Linear(6, 3), 0

        def forward(self, x):
            """Not random in training mode."""
            self.training_steps += 0  # (training: nothing changes)
            return self.a(x)

    ns: dict = {"nn": nn, "F": torch.nn.functional, "torch": torch}
    exec(  # noqa: S102  (a class with no source file)
        "class Sourceless(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.a = nn.Linear(6, 3)\n"
        "    def forward(self, x):\n"
        "        return (lambda h: F.dropout(h, 0.5, training=self.training))(self.a(x))\n",
        ns,
    )
    torch.manual_seed(0)
    commented, sourceless = Commented().double(), ns["Sourceless"]().double()
    assert training_layers(commented) == [] and training_layers(sourceless) == [sourceless]
    X, y = _data(16)
    opt = ho.Newton(commented, nn.CrossEntropyLoss(), mode="trust-region")
    opt.step(X, y)
    assert opt.last_stats.mode == "trust-region"
    opt = ho.Newton(sourceless, nn.CrossEntropyLoss(), seed=0)
    opt.step(X, y)
    assert opt.mode == "precondition" and sourceless.training


class _Stacked(nn.Module):
    """A Linear applied to a value that is not batch-first ((2, B, 8)): traced into pieces, it is called
    whole on data; ``second`` registered before ``first``."""

    def __init__(self):
        super().__init__()
        self.second, self.first = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        h = torch.tanh(self.first(torch.stack([x, 2 * x])))
        return self.second(h[0] + h[1])


def test_a_module_called_whole_keeps_the_optimizers_parameter_order():
    """A model the ordered split takes (its out-of-order submodule called whole on data) keeps that chain,
    ordered like model.parameters() -- as before the optimizers split unordered models: the unordered split
    is only the fallback for a model the ordered one refuses (it raised "holds other parameters than its
    pieces" at the first step, and older checkpoints of it would load permuted)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), _Stacked(), nn.Tanh(), nn.Linear(8, 3)).double()
    X, y = _data(16)
    opt = ho.Newton(model, nn.CrossEntropyLoss(), seed=0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [id(p) for p in opt.chain.params] == [id(p) for p in trainable]
    for i in range(0, 16, 8):
        opt.step(X[i : i + 8], y[i : i + 8])
    assert [id(p) for p in opt.chain.params] == [id(p) for p in trainable]
    pc = ho.Preconditioner(model, nn.CrossEntropyLoss(), seed=0)
    model.zero_grad()
    nn.CrossEntropyLoss()(model(X), y).backward()
    pc.precondition_(X, y)
    assert all(p.grad is not None for p in trainable)


def test_a_training_flag_read_by_name_counts():
    from hessinv.chain import training_layers

    class ByName(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 3)

        def forward(self, x):
            return torch.nn.functional.dropout(self.a(x), 0.5, getattr(self, "training"))  # noqa: B009

    m = ByName()
    assert training_layers(m) == [m]
