"""What a new user meets first: sparse embeddings, the meta device, autocast, a cast in forward, models
that are no chain as written, models of several inputs -- each exact, or refused with a remedy that
works (checked by following it)."""

from __future__ import annotations

import pytest
import torch
from reference import autograd_gradient_hessian
from torch import nn

import hessinv
import hessinv.optim as ho
from hessinv import diagnostics
from hessinv.influence import per_example_gradients
from hessinv.laplace import Laplace


class _Emb(nn.Module):
    def __init__(self, sparse: bool):
        super().__init__()
        self.e, self.l = nn.Embedding(10, 4, sparse=sparse), nn.Linear(4, 3)

    def forward(self, t):
        return self.l(torch.tanh(self.e(t).mean(1)))


def _emb_pair():
    torch.manual_seed(0)
    a = _Emb(sparse=True).double()
    b = _Emb(sparse=False).double()
    b.load_state_dict(a.state_dict())
    g = torch.Generator().manual_seed(1)
    return a, b, torch.randint(0, 10, (6, 5), generator=g), torch.randint(0, 3, (6,), generator=g)


def test_sparse_embedding_gradients_are_used_densely():
    """nn.Embedding(sparse=True): the same numbers as sparse=False everywhere a gradient is read (raw
    'reshape is not implemented for sparse tensors' before)."""
    ce = nn.CrossEntropyLoss()
    a, b, T, y = _emb_pair()
    for m in (a, b):
        opt = ho.Newton(m, ce, seed=0)
        for _ in range(3):
            opt.step(T, y)
    assert all(torch.allclose(p, q, atol=1e-14) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    a, b, T, y = _emb_pair()
    for m in (a, b):  # the closure form reads p.grad
        opt = ho.Newton(m, ce, seed=0)

        def closure(m=m, opt=opt):
            opt.zero_grad()
            loss = ce(m(T), y)
            loss.backward()
            return loss

        opt.step(closure=closure, inputs=T, targets=y)
    assert all(torch.allclose(p, q, atol=1e-14) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    a, b, T, y = _emb_pair()
    ds = []
    for m in (a, b):
        pc = ho.Preconditioner(m, ce, seed=0)
        ce(m(T), y).backward()
        ds.append(pc.precondition_(T, y))
    assert torch.allclose(ds[0], ds[1], atol=1e-14)
    a, b, T, y = _emb_pair()
    assert torch.allclose(
        diagnostics.gradient_direction(a, ce, T, y), diagnostics.gradient_direction(b, ce, T, y), atol=1e-15
    )
    Ga, Gb = per_example_gradients(a, ce, T, y), per_example_gradients(b, ce, T, y)
    assert torch.allclose(Ga, Gb, atol=1e-15) and a.e.sparse  # (the flag restored)


def test_meta_device_is_named_everywhere():
    with torch.device("meta"):
        m = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
        X, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    for call in (
        lambda: Laplace(m, "classification").fit(X, y),
        lambda: diagnostics.gradient_direction(m, nn.CrossEntropyLoss(), X, y),
    ):
        with pytest.raises(hessinv.InvalidArgumentError, match="meta device.*materialize"):
            call()


def test_autocast_is_named_as_the_cause():
    m = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    X, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(hessinv.DtypeMismatchError, match="autocast.*outside the autocast context"):
            hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)  # outside: fine


def test_cast_in_forward_refusal_names_the_working_remedy():
    """x.float() in a float32 model is a no-op there, and refused in the float64 copy that refinement,
    eigenvalues and log-determinants use; model.double() is refused too: remove the cast."""

    class Cast(nn.Module):
        def forward(self, x):
            return x.float()

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 3), Cast(), nn.Tanh(), nn.Linear(3, 2))
    X, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    H = hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    with pytest.raises(hessinv.DtypeMismatchError, match="remove the dtype cast") as err:
        H.min_eigenvalue()
    assert "use a float64 model" not in str(err.value)


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = self.a(x)
        return self.b(torch.tanh(h) if h.sum() > 0 else torch.sigmoid(h))


class _SequenceFirstGRU(nn.Module):
    def __init__(self):
        super().__init__()
        self.r, self.l = nn.GRU(6, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.l(self.r(x.transpose(0, 1))[0][-1])


@pytest.mark.parametrize("cls, shape", [(_DataDependent, (8, 6)), (_SequenceFirstGRU, (8, 5, 6))])
def test_a_model_that_is_no_chain_is_told_to_wrap_itself_and_wrapping_is_exact(cls, shape):
    torch.manual_seed(0)
    m = cls().double()
    X, y = torch.randn(*shape, dtype=torch.float64), torch.randint(0, 3, (8,))
    with pytest.raises(hessinv.NotAChainError, match=r"nn\.Sequential\(model\)"):
        hessinv.hessian(m, nn.CrossEntropyLoss(), X, y)
    H = hessinv.hessian(nn.Sequential(m), nn.CrossEntropyLoss(), X, y)
    _, H_ref = autograd_gradient_hessian(m, nn.CrossEntropyLoss(), X, y)
    V = torch.randn(H.shape[0], 2, dtype=torch.float64)
    assert torch.allclose(H @ V, H_ref @ V, atol=1e-12)


def test_several_inputs_are_told_to_pack_them():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(5, 2)

        def forward(self, x, z):
            return self.l(torch.cat([x, z], 1))

    X, Z, y = torch.randn(4, 3), torch.randn(4, 2), torch.randint(0, 2, (4,))
    with pytest.raises(hessinv.NotAChainError, match="pack them into one tensor"):
        hessinv.hessian(Two(), nn.CrossEntropyLoss(), X, y)
    with pytest.raises(hessinv.InvalidArgumentError, match="pack them into one tensor"):
        hessinv.hessian(nn.Linear(5, 2), nn.CrossEntropyLoss(), {"x": X, "z": Z}, y)
