"""The Gauss-Newton root formed a few rows at a time, and refused by name where it cannot fit."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import autograd_gauss_newton, chains
from test_lowrank import generic_problem

import hessinv
from hessinv import lowrank


def _rows_of_width(prob_blocks, rows: int) -> int:
    """A ROOT_PASS_ENTRIES that makes each pass form ``rows`` rows."""
    B = prob_blocks[-1].batch
    return rows * B * max(max(b.d_in, b.d_out) for b in prob_blocks)


@settings(max_examples=30, deadline=None)
@given(chains(max_depth=4, max_width=6, max_batch=5), st.integers(1, 3))
def test_root_in_passes_of_a_few_rows_is_the_gauss_newton_matrix(prob, rows):
    """``U^T S U = G`` (plain autograd) where the rows are formed one to three at a time."""
    G = hessinv.gauss_newton(prob.model, prob.loss_fn, prob.inputs, prob.targets)
    with mock.patch.object(lowrank, "ROOT_PASS_ENTRIES", _rows_of_width(G.blocks, rows)):
        U, S = G.root()
    G_ref = autograd_gauss_newton(prob.model, prob.loss_fn, prob.inputs, prob.targets)
    scale = max(float(G_ref.abs().max()), 1.0)
    assert float((U.T @ (S[:, None] * U) - G_ref).abs().max()) <= 1e-11 * scale, prob.description


@pytest.mark.parametrize("name", ["conv1d", "layernorm", "embedding", "linear_on_positions"])
def test_root_in_passes_through_generic_stages(name):
    """Generic stages (their per-example pulls, a lookup table, a stage that mixes positions) in passes
    of two rows: the same ``G`` as plain autograd."""
    model, loss_fn, x, y = generic_problem(name)
    G = hessinv.gauss_newton(model, loss_fn, x, y)
    with mock.patch.object(lowrank, "ROOT_PASS_ENTRIES", _rows_of_width(G.blocks, 2)):
        U, S = G.root()
    assert U.shape[0] > 2  # (several passes)
    G_ref = autograd_gauss_newton(model, loss_fn, x, y)
    assert float((U.T @ (S[:, None] * U) - G_ref).abs().max()) <= 1e-12 * float(G_ref.abs().max())


def test_a_root_that_does_not_fit_is_refused_before_it_is_allocated():
    """Where ``U`` and a pass's signals exceed the memory available, ``root()`` raises TooLargeError, not
    the allocator's error (a Laplace evidence of a 64-128-64-10 classifier on 1000 examples, which falls
    back to the root where the sweep does not fit, was killed at 24 GB)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).double()
    X, y = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 4, (40,))
    G = hessinv.gauss_newton(net, torch.nn.CrossEntropyLoss(), X, y)
    r, n = 40 * 3, G.shape[0]  # (a softmax's curvature has rank C - 1 per example)
    with (
        mock.patch.object(lowrank, "_capacity_bytes", lambda device: 0),
        mock.patch.object(lowrank, "_memory_bytes", lambda device: 8 * r * n // 2),
        pytest.raises(hessinv.TooLargeError, match="Gauss-Newton root"),
    ):
        G.root()
    # enough for U and a pass of a few rows: the root forms, in passes
    with (
        mock.patch.object(lowrank, "_capacity_bytes", lambda device: 0),
        mock.patch.object(lowrank, "_memory_bytes", lambda device: 8 * (r * n + 4 * 40 * 16 * 8)),
        mock.patch.object(lowrank, "ROOT_PASS_ENTRIES", 40 * 16 * 8),
    ):
        U, S = G.root()
    assert U.shape == (r, n)  # (in 15 passes of 8 rows)
    G_ref = autograd_gauss_newton(net, torch.nn.CrossEntropyLoss(), X, y)
    assert float((U.T @ (S[:, None] * U) - G_ref).abs().max()) <= 1e-12 * float(G_ref.abs().max())


@settings(max_examples=20, deadline=None)
@given(chains(max_depth=4, max_width=6, max_batch=5))
def test_an_optimizers_transient_operator_has_the_same_root(prob):
    """The optimizer's refresh builds its operator ``_transient``: no copy of the point, the batch taken
    as checked, and on a chain of Linear + activation stages no gradient (after the split's first,
    checked one). Its root is the operator's, ``U^T S U = G`` (plain autograd); its float64 copy is
    refused by name (it would be at the parameters of the moment, not the operator's)."""
    chain = hessinv.Chain(prob.model, prob.loss_fn)
    first = hessinv.GaussNewton(prob.model, prob.loss_fn, prob.inputs, prob.targets, chain=chain)
    op = hessinv.GaussNewton(
        prob.model, prob.loss_fn, prob.inputs, prob.targets, chain=chain, _transient=True
    )
    dense = all(isinstance(s, hessinv.stages.DenseStage) for s in chain.stages)
    assert (op.gradient is None) == dense, prob.description
    U, S = op.root()
    G_ref = autograd_gauss_newton(prob.model, prob.loss_fn, prob.inputs, prob.targets)
    scale = max(float(G_ref.abs().max()), 1.0)
    assert float((U.T @ (S[:, None] * U) - G_ref).abs().max()) <= 1e-11 * scale, prob.description
    U1, S1 = first.root()
    assert torch.equal(U, U1) and torch.equal(S, S1)
    with pytest.raises(hessinv.errors.InvalidArgumentError, match="one use"):
        op._converted(torch.float32)


def test_a_transient_operator_through_generic_stages_keeps_its_gradient():
    """Generic stages' blocks read the backward vectors: there the transient operator's linearization
    keeps the gradient (the full pass), and its root is the full operator's."""
    model, loss_fn, x, y = generic_problem("conv1d")
    chain = hessinv.Chain(model, loss_fn)
    full = hessinv.GaussNewton(model, loss_fn, x, y, chain=chain)
    op = hessinv.GaussNewton(model, loss_fn, x, y, chain=chain, _transient=True)
    assert op.gradient is not None and torch.equal(op.gradient, full.gradient)
    U, S = op.root()
    U1, S1 = full.root()
    assert torch.allclose(U, U1, rtol=0, atol=1e-13 * float(U1.abs().max())) and torch.equal(S, S1)
