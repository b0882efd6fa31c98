import copy

import pytest
import torch
from torch import nn

import hessinv.optim as ho
from hessinv.optim.precondition import EigenBasis


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(40, 6), nn.Flatten(), nn.Linear(18, 12), nn.Tanh(), nn.Linear(12, 4))


def test_embedding_weights_stay_unrotated_and_unseen_rows_do_not_move():
    """A lookup table's rows are independent parameters: the eigenbasis leaves the Embedding weight
    unrotated (its other weights rotated), and rows of tokens no batch has contained do not move."""
    net = _model()
    opt = ho.Newton(net, nn.CrossEntropyLoss(), seed=0, mode="precondition")
    basis = opt.preconditioner.basis
    offsets = [o for o, _, _ in basis.blocks]
    assert 0 not in offsets  # the Embedding weight (the first parameter) is not rotated
    assert len(basis.blocks) == 2  # the two Linear weights are
    g = torch.Generator().manual_seed(1)
    before = net[0].weight.detach().clone()
    seen = torch.zeros(40, dtype=torch.bool)
    for _ in range(30):
        X = torch.randint(0, 20, (16, 3), generator=g)  # tokens 20..39 never appear
        y = torch.randint(0, 4, (16,), generator=g)
        seen[X.flatten()] = True
        opt.step(X, y)
    moved = (net[0].weight.detach() - before).abs().amax(1) > 0
    assert bool(moved[seen].all())
    assert not bool(moved[~seen].any())


def test_eigenbasis_unrotated_argument():
    a, b = torch.zeros(5, 4), torch.zeros(3, 5)
    assert [o for o, _, _ in EigenBasis([a, b]).blocks] == [0, 20]
    assert [o for o, _, _ in EigenBasis([a, b], unrotated=[a]).blocks] == [20]


def test_checkpoint_that_rotated_the_table_resumes_bit_identically(monkeypatch):
    """A checkpoint written while Embedding weights were still rotated (before 2026-12-04) loads, and the
    resumed run keeps its rotation: the same steps as the run that wrote it."""
    import hessinv.optim.precondition as P

    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randint(0, 20, (16, 3), generator=g), torch.randint(0, 4, (16,), generator=g))
        for _ in range(9)
    ]
    with monkeypatch.context() as mp:
        mp.setattr(P, "_lookup_tables", lambda model: [])  # the old behaviour: every weight rotated
        net = _model()
        opt = ho.Newton(net, nn.CrossEntropyLoss(), seed=0, mode="precondition")
        assert 0 in [o for o, _, _ in opt.preconditioner.basis.blocks]
        for X, y in batches[:6]:
            opt.step(X, y)
        saved_model = {k: v.clone() for k, v in net.state_dict().items()}
        saved_opt = opt.state_dict()
        saved_opt["newton"]["preconditioner"]["basis"].pop("layout")  # (not recorded then)
        for X, y in batches[6:]:
            opt.step(X, y)
    net2 = _model(seed=5)
    net2.load_state_dict(saved_model)
    opt2 = ho.Newton(net2, nn.CrossEntropyLoss(), seed=3, mode="precondition")
    opt2.load_state_dict(saved_opt)
    assert 0 in [o for o, _, _ in opt2.preconditioner.basis.blocks]
    for X, y in batches[6:]:
        opt2.step(X, y)
    for a, b in zip(net.parameters(), net2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_parametrized_tables_are_found_without_running_the_parametrization():
    """Under ``weight_norm`` the table's trainable tensors are the parametrization's originals (left
    unrotated); under ``spectral_norm`` building the optimizer does not run its power iteration."""
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    net = nn.Sequential(
        parametrizations.weight_norm(nn.Embedding(40, 6), dim=0), nn.Flatten(), nn.Linear(18, 4)
    )
    opt = ho.Newton(net, nn.CrossEntropyLoss(), seed=0, mode="precondition")
    # params: g (40, 1), v (40, 6), the Linear's weight (4, 18) at offset 280, its bias
    assert [o for o, _, _ in opt.preconditioner.basis.blocks] == [280]
    torch.manual_seed(0)
    emb = parametrizations.spectral_norm(nn.Embedding(40, 6))
    net = nn.Sequential(emb, nn.Flatten(), nn.Linear(18, 4))
    u = emb.parametrizations.weight[0]._u.clone()
    ho.Newton(net, nn.CrossEntropyLoss(), seed=0, mode="precondition")
    assert torch.equal(emb.parametrizations.weight[0]._u, u)


def test_a_single_tensor_as_unrotated():
    a, b = torch.zeros(5, 4), torch.zeros(3, 5)
    assert [o for o, _, _ in EigenBasis([a, b], unrotated=a).blocks] == [20]


def test_tables_under_the_older_weight_norm_and_spectral_norm_hooks():
    """``torch.nn.utils.weight_norm`` / ``spectral_norm`` (the hook versions) keep the table as
    ``weight_g``/``weight_v`` or ``weight_orig``: left unrotated too."""
    import warnings

    from torch.nn.utils import spectral_norm, weight_norm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (weight_norm's deprecation)
        torch.manual_seed(0)
        net = nn.Sequential(weight_norm(nn.Embedding(40, 6), dim=0), nn.Flatten(), nn.Linear(18, 4))
        opt = ho.Newton(net, nn.CrossEntropyLoss(), seed=0, mode="precondition")
        assert [o for o, _, _ in opt.preconditioner.basis.blocks] == [280]
        net = nn.Sequential(spectral_norm(nn.Embedding(40, 6)), nn.Flatten(), nn.Linear(18, 4))
        opt = ho.Newton(net, nn.CrossEntropyLoss(), seed=0, mode="precondition")
        assert [o for o, _, _ in opt.preconditioner.basis.blocks] == [240]


class _Tokens(nn.Module):
    """Token and position tables summed, a padding token, a tanh MLP per position, mean-pooled."""

    def __init__(self, V=30, D=4, tie=False):
        super().__init__()
        self.tok, self.pos = nn.Embedding(V, D, padding_idx=3), nn.Embedding(5, D)
        self.mix = nn.Linear(D, D)
        self.tie = tie
        if tie:  # the token table also read as a Linear's weight: autograd's rows are not a scatter
            self.head = nn.Linear(D, V, bias=False)
            self.head.weight = self.tok.weight

    def forward(self, x):
        h = torch.tanh(self.mix(self.tok(x) + self.pos(torch.arange(x.shape[1]))))
        return self.head(h).mean(1) if self.tie else h.mean(1)


def _autograd_gauss_newton(net, loss_fn, X, y):
    """J^T H J by plain autograd: J the Jacobian of the outputs in the trainable parameters (a backward
    pass per output entry), H the loss's Hessian in the outputs."""
    params = [p for p in net.parameters() if p.requires_grad]
    out = net(X)
    rows = []
    for e in range(out.numel()):
        seed = torch.zeros(out.numel(), dtype=out.dtype)
        seed[e] = 1
        gs = torch.autograd.grad(out, params, seed.view_as(out), retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).reshape(-1)
                    for g, p in zip(gs, params, strict=True)
                ]
            )
        )
    J = torch.stack(rows)
    H = torch.autograd.functional.hessian(lambda o: loss_fn(o.view_as(out), y), out.detach().reshape(-1))
    return J.T @ H @ J


def _root_and_pulls(monkeypatch, net, loss_fn, X, y, table):
    """``(U, S, asked)``: the Gauss-Newton root and, per batched backward pass it ran, ``(columns, whether
    it reached table)`` -- a table whose rows are scattered is never pulled back with many columns."""
    import hessinv
    import hessinv.stages.generic as Gm

    asked = []
    real = Gm._backward_rows

    def spy(out, wrt, n, seeds, batched):
        asked.append((n, any(t is table for t in wrt)))
        return real(out, wrt, n, seeds, batched)

    monkeypatch.setattr(Gm, "_backward_rows", spy)
    U, S = hessinv.gauss_newton(net, loss_fn, X, y).root(factors=[])
    monkeypatch.undo()
    return U, S, asked


@pytest.mark.parametrize("tie", [False, True])
def test_lookup_table_rows_are_scattered_and_equal_autograd(monkeypatch, tie):
    """The Gauss-Newton root's rows of an Embedding's table are the signal at its output scattered into
    the batch's token rows (no batched backward pass into a dense table per row), padding_idx's row
    zero, repeated tokens summed; G = U^T S U equals the plain-autograd Gauss-Newton matrix. A table
    also read as a Linear's weight (tied) is not a scatter: autograd's rows, still exact."""

    torch.manual_seed(0)
    net = nn.Sequential(_Tokens(tie=tie), nn.Tanh(), nn.Linear(30 if tie else 4, 6)).double()
    X = torch.randint(0, 30, (6, 4))
    X[0, 1] = X[1, 2] = 3  # the padding token
    X[2, 0] = X[2, 3]  # a token twice in one example
    y = torch.randint(0, 6, (6,))
    loss_fn = nn.CrossEntropyLoss()
    U, S, asked = _root_and_pulls(monkeypatch, net, loss_fn, X, y, net[0].tok.weight)
    assert any(n > 1 and has for n, has in asked) == tie  # scattered unless tied
    G = U.T @ (S[:, None] * U)
    G_ref = _autograd_gauss_newton(net, loss_fn, X, y)
    assert torch.allclose(G, G_ref, atol=1e-12 * float(G_ref.abs().max()), rtol=0)
    if not tie:
        rows_pad = U[:, 3 * 4 : 4 * 4]  # padding_idx 3's row of the table (the first parameter)
        assert bool((rows_pad == 0).all())


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_preconditioner_leaves_table_columns_unwritten_and_solves_as_the_full_root(reduction):
    """The optimizer's root hands a lookup table over as the columns of the batch's tokens (``tables``):
    U's table columns are never written nor read. Its solves, its damping updates and its columns equal
    those of the factor of the fully written root (float64, to rounding); a checkpoint written then
    resumes bit-identically."""
    from hessinv.lowrank import WoodburyFactor

    torch.manual_seed(0)
    V = 500
    net = nn.Sequential(
        nn.Embedding(V, 8, padding_idx=0), nn.Flatten(), nn.Linear(24, 96), nn.Tanh(), nn.Linear(96, 5)
    ).double()
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randint(0, V, (16, 3), generator=g), torch.randint(0, 5, (16,), generator=g)) for _ in range(8)
    ]
    # (a summed loss: the root is scaled by the curvature weight 16 / 4, in place on its written columns)
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    opt = ho.Newton(net, loss_fn, seed=0, mode="precondition", curvature_batch_size=4)
    for X, y in batches[:3]:
        opt.step(X, y)
    pre = opt.preconditioner
    f = pre._factor
    assert f.tables and f.structured_only  # the table's and the wide Linear's columns unwritten
    ((off, size, cols, vals),) = f.tables
    assert (off, size) == (0, V * 8) and cols.numel() <= 4 * 3 * 8
    # the same root, fully written
    U_full = f.columns(torch.arange(f.U.shape[1]))
    full = WoodburyFactor(U_full, f.S, f.D)
    R = torch.randn(f.U.shape[1], 3, generator=g, dtype=torch.float64)
    x, x_ref = f.solve(R.clone()), full.solve(R.clone())
    assert torch.allclose(x, x_ref, rtol=0, atol=1e-10 * float(x_ref.abs().max()))
    assert f.inertia == full.inertia and abs(f.logdet() - full.logdet()) < 1e-8 * abs(full.logdet())
    idx = torch.cat([cols[:5], torch.tensor([size - 1, size + 3])])  # seen tokens, an unseen one, beyond
    values = f.D[idx] * 3
    f2 = copy.copy(f)
    f2.update_damping(idx, values)
    full.update_damping(idx, values)
    assert torch.allclose(
        f2.solve(R.clone()), full.solve(R.clone()), rtol=0, atol=1e-10 * float(x_ref.abs().max())
    )
    # resume from a checkpoint taken now: the same steps as the uninterrupted run
    saved_model = {k: v.clone() for k, v in net.state_dict().items()}
    saved_opt = opt.state_dict()
    for X, y in batches[3:]:
        opt.step(X, y)
    net2 = nn.Sequential(
        nn.Embedding(V, 8, padding_idx=0), nn.Flatten(), nn.Linear(24, 96), nn.Tanh(), nn.Linear(96, 5)
    ).double()
    net2.load_state_dict(saved_model)
    opt2 = ho.Newton(net2, loss_fn, seed=7, mode="precondition", curvature_batch_size=4)
    opt2.load_state_dict(saved_opt)
    for X, y in batches[3:]:
        opt2.step(X, y)
    for a, b in zip(net.parameters(), net2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_float32_rows_of_a_frequent_token_are_scattered():
    """A token in a third of a float32 batch's positions: its table row sums many positions' signals,
    whose rounding the check against autograd now bounds by the absolute values scattered alike (it
    refused correct rows, and the table went back to dense rows: 1.3 s and 3.4 GB per step against 0.25 s
    and 0.8 GB on an Embedding(50000, 64) model)."""
    import hessinv
    import hessinv.stages.generic as Gm

    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(50, 8), nn.Flatten(), nn.Linear(8 * 512, 10))
    X = torch.randint(0, 50, (32, 512))
    X[torch.rand(32, 512) < 0.35] = 7  # one frequent token (end-of-text, unmarked padding)
    y = torch.randint(0, 10, (32,))
    asked = []
    real = Gm._backward_rows

    def spy(out, wrt, n, seeds, batched):
        asked.append(n > 1 and any(t is net[0].weight for t in wrt))
        return real(out, wrt, n, seeds, batched)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Gm, "_backward_rows", spy)
        U, S = hessinv.gauss_newton(net, nn.CrossEntropyLoss(), X, y).root(factors=[])
    assert not any(asked)
    net64 = copy.deepcopy(net).double()
    U64, S64 = hessinv.gauss_newton(net64, nn.CrossEntropyLoss(), X, y).root(factors=[])
    T, T64 = U[:, :400].double(), U64[:, :400]  # the table's block of G = U^T S U
    G, G64 = T.T @ (S.double()[:, None] * T), T64.T @ (S64[:, None] * T64)
    assert float((G - G64).norm()) <= 1e-4 * float(G64.norm())


def test_columns_takes_negative_indices_and_masks_as_indexing_does():
    """``WoodburyFactor.columns`` with the table last: negative indices read never-written memory (a raw
    IndexError for a mask); now as ``U[:, idx]`` of the fully written root."""
    import hessinv
    from hessinv.lowrank import WoodburyFactor, gauss_newton_root

    torch.manual_seed(0)
    net = nn.Sequential(_TableLast()).double()
    X, y = torch.randint(0, 100, (6, 3)), torch.randint(0, 5, (6,))  # tokens 100.. unseen
    # (the ordered split, as the optimizers take it: _TableLast called whole, one generic stage, its table
    # registered last; hessinv.gauss_newton splits it in the order of use, the table first)
    loss = nn.CrossEntropyLoss()
    op = hessinv.GaussNewton(net, loss, X, y, chain=hessinv.Chain(net, loss))
    factors, tables = [], []
    U, S = gauss_newton_root(op.blocks, op.dtype, op.device, None, factors, None, True, tables)
    f = WoodburyFactor(U, S, 1.0, factors=factors, structured_only=True, tables=tables)
    assert tables and tables[0][0] + tables[0][1] == U.shape[1]  # (the table's columns end U)
    full, _ = op.root(factors=[])
    n = U.shape[1]
    idx = torch.tensor([-1, -8, n - 1, 0])
    assert torch.equal(f.columns(idx), full[:, idx % n])
    mask = torch.zeros(n, dtype=torch.bool)
    mask[-5:] = True
    assert torch.equal(f.columns(mask), full[:, mask])
    for bad in (
        torch.tensor([n]),
        torch.tensor([-n - 1]),
        torch.tensor([2.7]),
        torch.ones(3, dtype=torch.bool),
    ):
        with pytest.raises(IndexError):  # (as U[:, bad]: an index out of range was wrapped around)
            f.columns(bad)


class _TableLast(nn.Module):
    """A lookup table registered last: its columns end U."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(24, 5)
        self.tab = nn.Embedding(300, 8)

    def forward(self, x):
        return self.lin(torch.tanh(self.tab(x)).flatten(1))


class _Bags(nn.Module):
    """An ``nn.EmbeddingBag`` over (B, T) token ids (each row a bag), then a tanh layer."""

    def __init__(self, mode, padding_idx, V=30, D=4):
        super().__init__()
        self.bag = nn.EmbeddingBag(V, D, mode=mode, padding_idx=padding_idx)
        self.mix = nn.Linear(D, 6)

    def forward(self, x):
        return self.mix(torch.tanh(self.bag(x)))


@pytest.mark.parametrize(("mode", "padding_idx"), [("mean", 3), ("mean", None), ("sum", 3), ("max", None)])
def test_embedding_bag_rows_are_scattered_and_equal_autograd(monkeypatch, mode, padding_idx):
    """An ``nn.EmbeddingBag`` (sum or mean: each token's row gets its share of its bag's signal, the
    padding token none and not counted in the mean) is scattered like an ``nn.Embedding``: no batched
    backward pass into a dense table per row (a 20000-token bag model's step was 113 ms, Adam's 9 ms);
    G = U^T S U equals plain autograd's Gauss-Newton matrix, also for a bag of padding only and a token
    twice in a bag. ``mode="max"`` is not a scatter of shares: autograd's rows, exact too."""

    torch.manual_seed(0)
    net = _Bags(mode, padding_idx).double()
    X = torch.randint(0, 30, (6, 4))
    X[0, 1] = X[1, 2] = 3
    X[3] = 3  # a bag of the padding token only (where it is padding: the output is zero)
    X[2, 0] = X[2, 3]  # a token twice in one bag
    y = torch.randint(0, 6, (6,))
    loss_fn = nn.CrossEntropyLoss()
    U, S, asked = _root_and_pulls(monkeypatch, nn.Sequential(net), loss_fn, X, y, net.bag.weight)
    assert any(n > 1 and has for n, has in asked) == (mode == "max")
    G = U.T @ (S[:, None] * U)
    G_ref = _autograd_gauss_newton(net, loss_fn, X, y)
    assert torch.allclose(G, G_ref, atol=1e-12 * float(G_ref.abs().max()), rtol=0)
    if padding_idx is not None:
        assert bool((U[:, 3 * 4 : 4 * 4] == 0).all())


def test_embedding_bag_model_preconditioner_takes_the_table_route():
    """The optimizer's refresh on an ``nn.EmbeddingBag`` text model hands the table over as the batch's
    token columns (``tables``): its solves equal the fully written root's."""
    from hessinv.lowrank import WoodburyFactor

    torch.manual_seed(0)
    V = 2000
    net = nn.Sequential(nn.EmbeddingBag(V, 8, mode="mean"), nn.Tanh(), nn.Linear(8, 5)).double()
    g = torch.Generator().manual_seed(1)
    opt = ho.Newton(net, nn.CrossEntropyLoss(), seed=0, mode="precondition", curvature_batch_size=4)
    for _ in range(3):
        opt.step(torch.randint(0, V, (16, 6), generator=g), torch.randint(0, 5, (16,), generator=g))
    f = opt.preconditioner._factor
    ((off, size, cols, _),) = f.tables
    assert (off, size) == (0, V * 8) and cols.numel() <= 4 * 6 * 8
    full = WoodburyFactor(f.columns(torch.arange(f.U.shape[1])), f.S, f.D)
    R = torch.randn(f.U.shape[1], 2, generator=g, dtype=torch.float64)
    x, x_ref = f.solve(R.clone()), full.solve(R.clone())
    assert torch.allclose(x, x_ref, rtol=0, atol=1e-10 * float(x_ref.abs().max()))


def test_gauss_newton_products_solves_and_influence_through_an_embedding_bag():
    """``embedding_bag`` has no double backward, on which ``J v`` through a generic stage and its dense
    blocks rest: ``G @ v``, refined solves and Gauss-Newton influence scores of a bag model were refused
    (a fuzzer's finding) while its factorization ran. ``G``'s products now come from its root (``U^T S U``,
    first derivatives) and the per-example gradients from the per-example route: equal to plain autograd's
    Gauss-Newton matrix; the Hessian, which needs the double backward, is still refused by name."""
    import hessinv
    from hessinv.influence import InfluenceFunction

    torch.manual_seed(0)
    net = _Bags("mean", 3, V=50).double()
    X, y = torch.randint(0, 50, (8, 5)), torch.randint(0, 6, (8,))
    loss_fn = nn.CrossEntropyLoss()
    G_ref = _autograd_gauss_newton(net, loss_fn, X, y)
    G = hessinv.gauss_newton(net, loss_fn, X, y)
    V = torch.randn(G.shape[0], 3, dtype=torch.float64)
    assert torch.allclose(G @ V, G_ref @ V, rtol=0, atol=1e-12 * float((G_ref @ V).abs().max()))
    F = G.factor(1e-3)
    x, info = F.solve(G.gradient, return_info=True)
    A = G_ref + 1e-3 * torch.eye(G.shape[0], dtype=torch.float64)
    assert info.residual <= 1e-12 and float((A @ x - G.gradient).norm() / G.gradient.norm()) <= 1e-12
    inf = InfluenceFunction(net, loss_fn, curvature="gauss_newton", damping=0.1).fit(X, y)
    g = inf.train_gradients
    for i in range(len(X)):  # each example's own loss, by plain autograd
        gi = torch.autograd.grad(loss_fn(net(X[i : i + 1]), y[i : i + 1]), list(net.parameters()))
        assert torch.allclose(g[i], torch.cat([t.reshape(-1) for t in gi]), atol=1e-13)
    want = (g * torch.linalg.solve(G_ref + 0.1 * torch.eye(G.shape[0], dtype=torch.float64), g.T).T).sum(1)
    assert torch.allclose(inf.self_influence(), want, rtol=1e-10)
    with pytest.raises(hessinv.UnsupportedStageError, match="cannot differentiate it twice"):
        hessinv.hessian(net, loss_fn, X, y) @ V


def test_bag_model_factors_through_the_root_where_the_sweep_cannot_run():
    """A bag model whose root has more rows than it has parameters (64 examples x 6 classes against 230):
    the default factorization took the Riccati sweep, which needs the bag's dense blocks (a double
    backward), and refused where ``method="woodbury"`` solved it to 1e-15 (a fuzzer's finding). It now
    takes the Woodbury form there: exact against plain autograd's G."""
    import hessinv

    torch.manual_seed(0)
    net = _Bags("mean", 3, V=50).double()
    X, y = torch.randint(0, 50, (64, 5)), torch.randint(0, 6, (64,))
    loss_fn = nn.CrossEntropyLoss()
    G = hessinv.gauss_newton(net, loss_fn, X, y)
    assert 64 * 6 > G.shape[0]  # (the case under test: the cost model's sweep)
    x, info = G.factor(1e-3).solve(G.gradient, return_info=True)
    A = _autograd_gauss_newton(net, loss_fn, X, y) + 1e-3 * torch.eye(G.shape[0], dtype=torch.float64)
    assert float((A @ x - G.gradient).norm() / G.gradient.norm()) <= 1e-12 and info.residual <= 1e-12
