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
