"""Messages a census of models people bring found unhelpful (2026-12-07): a forward returning a dict is told
to pick its entry by key, every unused trainable parameter is named at once, and weight_norm's refusal says
how to write it exactly."""

from __future__ import annotations

import pytest
import torch
from reference import autograd_gradient_hessian
from torch import nn

import hessinv


class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return {"logits": self.lin(x)}


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head_a, self.head_b = nn.Linear(4, 5), nn.Linear(5, 3), nn.Linear(5, 2)

    def forward(self, x):
        return self.head_a(torch.tanh(self.body(x)))


def _batch():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(6, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (6,), generator=gen)


def test_a_dict_output_is_told_to_pick_its_entry_by_key():
    X, y = _batch()
    with pytest.raises(hessinv.NotAChainError, match=r'returns a dict.*model\(x\)\["logits"\]'):
        hessinv.hessian(DictOut().double(), nn.CrossEntropyLoss(), X, y)


def test_every_unused_parameter_is_named():
    X, y = _batch()
    with pytest.raises(
        hessinv.NotAChainError, match=r"parameters head_b\.weight, head_b\.bias are trainable"
    ):
        hessinv.hessian(TwoHeads().double(), nn.CrossEntropyLoss(), X, y)


def test_weight_norms_refusal_names_the_exact_form_and_that_form_is_exact():
    torch.manual_seed(0)
    X, y = _batch()
    model = nn.Sequential(
        torch.nn.utils.parametrizations.weight_norm(nn.Linear(4, 5)), nn.Tanh(), nn.Linear(5, 3)
    ).double()
    with pytest.raises(hessinv.NoExactHessian, match=r"v\.norm\(dim=1, keepdim=True\)"):
        hessinv.hessian(model, nn.CrossEntropyLoss(), X, y).to_dense()

    class WrittenOut(nn.Module):
        def __init__(self, lin: nn.Linear):
            super().__init__()
            self.g = nn.Parameter(lin.weight.detach().norm(dim=1, keepdim=True).clone())
            self.v, self.b = (
                nn.Parameter(lin.weight.detach().clone()),
                nn.Parameter(lin.bias.detach().clone()),
            )

        def forward(self, x):
            w = self.g * self.v / self.v.norm(dim=1, keepdim=True)
            return nn.functional.linear(x, w, self.b)

    exact = nn.Sequential(WrittenOut(nn.Linear(4, 5).double()), nn.Tanh(), nn.Linear(5, 3)).double()
    H = hessinv.hessian(exact, nn.CrossEntropyLoss(), X, y)
    ref = autograd_gradient_hessian(exact, nn.CrossEntropyLoss(), X, y)[1]
    assert torch.allclose(H.to_dense(), ref, rtol=1e-10, atol=1e-13 * float(ref.abs().max()))


def test_a_loss_with_its_own_parameter_is_told_to_freeze_it_and_frozen_it_is_exact():
    class LearnedTemperatureCE(nn.Module):
        def __init__(self):
            super().__init__()
            self.log_t = nn.Parameter(torch.tensor(0.3, dtype=torch.float64))

        def forward(self, out, y):
            return nn.functional.cross_entropy(out / self.log_t.exp(), y)

    torch.manual_seed(0)
    X, y = _batch()
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    loss = LearnedTemperatureCE()
    with pytest.raises(hessinv.UnsupportedStageError, match=r"requires_grad_\(False\)"):
        hessinv.hessian(model, loss, X, y)
    loss.log_t.requires_grad_(False)
    H = hessinv.hessian(model, loss, X, y)
    ref = autograd_gradient_hessian(model, loss, X, y)[1]
    assert torch.allclose(H.to_dense(), ref, rtol=1e-10, atol=1e-13 * float(ref.abs().max()))
