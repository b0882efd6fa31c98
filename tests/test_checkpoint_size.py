"""A checkpoint (and a pickle or deepcopy) of a preconditioner whose large Linear weights are solved through
their Kronecker factors: the factor's (r, n) ``U`` has columns of data only outside those weights, but was
saved whole -- 534 MB for a 784-1024-1024-10 MLP whose own state is 7 MB (a probe, 2026-12-07). Now the
read columns alone are kept, and the resumed run is still the uninterrupted one, bit for bit."""

from __future__ import annotations

import copy
import io
import pickle

import torch
from torch import nn

import hessinv.optim as ho


def _run(steps: int):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(96, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))
    X, y = torch.randn(256, 96), torch.randint(0, 4, (256,))
    opt = ho.Newton(net, nn.CrossEntropyLoss(), seed=0)
    for k in range(steps):
        opt.step(X[32 * k : 32 * k + 32], y[32 * k : 32 * k + 32])
    return net, opt, X, y


def _size(obj) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()


def test_a_checkpoint_keeps_the_read_columns_only_and_resumes_bit_exact(tmp_path):
    net, opt, X, y = _run(3)
    f = opt.preconditioner._factor
    assert f._unread  # (the two 64x96 / 64x64 weights: solved through their factors)
    sd = opt.state_dict()
    U = sd["newton"]["preconditioner"]["factor"]["U"]
    n = sum(p.numel() for p in net.parameters())
    assert U.shape[0] == f.U.shape[0] and U.shape[1] < n // 10
    assert _size(sd) < f.U.numel() * f.U.element_size()  # (the whole checkpoint below its U alone)
    torch.save(sd, tmp_path / "ckpt.pt")

    net2, opt2, _, _ = _run(0)
    net2.load_state_dict(net.state_dict())
    opt2.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    for k in range(3, 6):
        batch = X[32 * k : 32 * k + 32], y[32 * k : 32 * k + 32]
        opt.step(*batch)
        opt2.step(*batch)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), net2.parameters(), strict=True))


def test_a_pickled_or_copied_factor_keeps_the_read_columns_and_solves_alike():
    _, opt, _, _ = _run(3)
    f = opt.preconditioner._factor
    blob = pickle.dumps(f)
    assert len(blob) < f.U.numel() * f.U.element_size()  # (the whole factor below its U alone)
    v = torch.randn(f.U.shape[1])
    for g in (pickle.loads(blob), copy.deepcopy(f)):
        assert torch.equal(g.solve(v), f.solve(v))


def test_a_shallow_copy_shares_u():
    """The preconditioner's damping update copies its factor (copy.copy) every few steps: through the
    pickling state that packed and unpacked U each time (512 MB written for a 784-1024-1024-10 MLP)."""
    _, opt, _, _ = _run(3)
    f = opt.preconditioner._factor
    assert copy.copy(f).U is f.U
