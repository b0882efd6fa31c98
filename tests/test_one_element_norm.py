"""A normalization over one element (a GroupNorm of one channel per group after a convolution down to 1x1):
its refusal changed class and message with the random values -- a ``NoDoubleBackward`` blaming
``@once_differentiable`` or prelu's kink, advising to "move the inputs off the kink" (a probe, 2026-12-07).
Now the documented ``UnsupportedStageError`` that names the one-element normalization, for H and G alike."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import hessinv


@pytest.mark.parametrize("seed", range(4))
def test_a_groupnorm_over_one_element_is_named(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 1, 2, dilation=2), nn.GroupNorm(1, 1), nn.Softsign(), nn.Flatten(), nn.Linear(1, 2)
    ).double()
    with torch.no_grad():
        for q in model.parameters():
            q.copy_(torch.randn(q.shape))
    X, y = torch.randn(4, 1, 3, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    named = "normalization over one element|GroupNorm over more than 2"  # (or the rounding check's words)
    with pytest.raises(hessinv.UnsupportedStageError, match=named):
        hessinv.hessian(model, nn.MSELoss(), X, y).to_dense()
    G = hessinv.gauss_newton(model, nn.MSELoss(), X, y)
    try:  # (where G's blocks pass the checks they are exact; where not, the same named refusal)
        G.factor(-1.25)
    except hessinv.HessinvError as e:
        assert isinstance(e, hessinv.UnsupportedStageError) and re.search(named, str(e))
