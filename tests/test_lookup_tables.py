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
