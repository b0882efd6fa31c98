"""Defects an API probe found (Laplace, influence), each reduced to its model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hessinv.errors import InvalidArgumentError, UnsupportedStageError
from hessinv.influence import output_jacobians
from hessinv.laplace import Laplace


def test_output_jacobians_refuse_batch_statistics():
    """A BatchNorm with ``track_running_stats=False`` normalizes with the batch's statistics in eval mode
    too: the operators and per-example gradients refuse it, and ``output_jacobians`` (one example at a
    time through vmap) returned Jacobians 3.5x off the batch model's without an error, or a raw torch
    ValueError for (B, C) activations."""
    torch.manual_seed(0)
    X = torch.randn(10, 4)
    shaped = nn.Sequential(
        nn.Linear(4, 6), nn.Unflatten(1, (2, 3)), nn.BatchNorm1d(2, track_running_stats=False),
        nn.Flatten(), nn.Tanh(), nn.Linear(6, 3),
    ).eval()  # fmt: skip
    flat = nn.Sequential(
        nn.Linear(4, 5), nn.BatchNorm1d(5, track_running_stats=False), nn.Linear(5, 3)
    ).eval()
    for model in (shaped, flat):
        with pytest.raises(UnsupportedStageError, match="track_running_stats"):
            output_jacobians(model, X)
    ok = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).eval()  # (running statistics)
    assert output_jacobians(ok, X).shape == (10, 3, sum(p.numel() for p in ok.parameters()))


def test_a_max_norm_embedding_changed_by_a_prediction_is_named_with_its_remedy():
    """``nn.Embedding(max_norm=...)`` renormalizes the rows it looks up in place at every call: a
    prediction on tokens the fit did not see changed the parameters, and the refusal said only that they
    had changed (the user had changed nothing). Now it names the embedding and the remedy -- which works:
    every row renormalized once before the fit, the same prediction runs."""
    torch.manual_seed(18)

    def model() -> nn.Module:
        m = nn.Sequential(
            nn.Embedding(10, 4, max_norm=1.0), nn.Flatten(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3)
        )
        with torch.no_grad():
            m[0].weight.mul_(3)
        return m

    X, y = torch.randint(0, 5, (20, 2)), torch.randint(0, 3, (20,))  # tokens 0..4 only
    Xt = torch.randint(5, 10, (4, 2))
    m = model()
    la = Laplace(m, "classification", prior_precision=0.5).fit(X, y)
    with pytest.raises(InvalidArgumentError, match=r"max_norm=1\) renormalizes .* torch.arange"):
        la(Xt)
    m = model()
    with torch.no_grad():
        m[0](torch.arange(10))  # the remedy: every row renormalized once
    la = Laplace(m, "classification", prior_precision=0.5).fit(X, y)
    p = la(Xt)
    assert p.shape == (4, 3) and torch.allclose(p.sum(1), torch.ones(4))
