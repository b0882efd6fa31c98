"""The exact diagonal's second-order part of a generic stage -- ``diag(Hxx)`` and ``Hzz_n``
(:meth:`LazyBlocks._second_parts`) -- formed parameter tensor by parameter tensor (a tensor whose diagonal
block is exactly zero skipped), by vmapped double-backward columns checked against an unbatched pass:
against plain float64 autograd (``reference.py``, no ``torch.func``) on a LayerNorm block, conv +
BatchNorm blocks and attention (a hand-written one and ``nn.TransformerEncoderLayer``)."""

from __future__ import annotations

import pytest
import torch
from reference import autograd_hessian
from test_generic_diagonal import Attention  # (self-attention: query and key weights meet in Hxx)
from torch import Tensor, nn

import hessinv
import hessinv.stages.generic as generic
from hessinv.stages.generic import GenericStage, LazyBlocks

F64 = torch.float64


class LNBlock(nn.Module):
    """``z + LayerNorm(Linear(GELU(LayerNorm(Linear(z)))))``, one generic stage (the residual keeps it whole;
    affine LayerNorms: the mixed second derivative that torch.func gets wrong in torch 2.13)."""

    def __init__(self, d: int, h: int):
        super().__init__()
        self.l1, self.n1 = nn.Linear(d, h), nn.LayerNorm(h)
        self.l2, self.n2 = nn.Linear(h, d), nn.LayerNorm(d)

    def forward(self, z: Tensor) -> Tensor:
        return z + self.n2(self.l2(nn.functional.gelu(self.n1(self.l1(z)))))


class ConvBN(nn.Module):
    """``act(z + BN(conv(act(BN(conv(z))))))``: with ReLU every parameter tensor enters linearly with the
    rest held (all diagonal blocks of ``Hxx`` zero, ``Hxx`` itself not); with Tanh the first conv and BN
    have nonzero diagonal blocks, the second conv and BN zero ones (both kinds in one stage)."""

    def __init__(self, c: int, act: type[nn.Module]):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.act = act()

    def forward(self, z: Tensor) -> Tensor:
        return self.act(z + self.b2(self.c2(self.act(self.b1(self.c1(z))))))


def _bn_stats(model: nn.Module) -> nn.Module:
    """BatchNorms with nontrivial running statistics and affine weights (eval mode reads them)."""
    g = torch.Generator().manual_seed(5)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(0.3 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.weight.copy_(1 + 0.3 * torch.randn(m.num_features, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.num_features, generator=g))
    return model


def _model(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    """name -> (float64 model in eval mode, one example's input shape)."""
    torch.manual_seed(0)
    if name == "layernorm":
        return nn.Sequential(nn.Linear(4, 6), LNBlock(6, 7), nn.Linear(6, 3)).to(F64).eval(), (4,)
    if name in ("conv-bn-relu", "conv-bn-tanh"):
        act = nn.ReLU if name == "conv-bn-relu" else nn.Tanh
        net = nn.Sequential(
            nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), ConvBN(2, act), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)
        )
        return _bn_stats(net).to(F64).eval(), (1, 4, 4)
    if name == "attention":
        net = nn.Sequential(nn.Linear(3, 4), Attention(4), nn.Flatten(), nn.Linear(12, 3))
        return net.to(F64).eval(), (3, 3)
    if name == "transformer-layer":
        layer = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True)
        return nn.Sequential(nn.Linear(3, 8), layer, nn.Flatten(), nn.Linear(24, 3)).to(F64).eval(), (3, 3)
    raise KeyError(name)


NAMES = ["layernorm", "conv-bn-relu", "conv-bn-tanh", "attention", "transformer-layer"]


def _problem(name: str, batch: int = 4, dtype: torch.dtype = F64):
    model, shape = _model(name)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(batch, *shape, generator=g, dtype=F64)
    y = torch.randint(0, 3, (batch,), generator=g)
    return model.to(dtype), nn.CrossEntropyLoss(), X.to(dtype), y


@pytest.fixture
def by_columns(monkeypatch):
    """Lazy Hessian blocks whose ``diag(Hxx)`` and ``Hzz_n`` are formed by columns (not the dense blocks);
    returns the list of :meth:`LazyBlocks._second_columns` calls ``(stage, wrt, n)``."""
    monkeypatch.setattr(GenericStage, "LAZY_ENTRIES", 0)
    monkeypatch.setattr(LazyBlocks, "_dense_for_second", lambda self: False)
    calls: list[tuple[LazyBlocks, Tensor, int]] = []
    original = LazyBlocks._second_columns

    def spy(self, out, wrt, n, seeds, keep):
        calls.append((self, wrt, n))
        return original(self, out, wrt, n, seeds, keep)

    monkeypatch.setattr(LazyBlocks, "_second_columns", spy)
    return calls


def _stage_of(H, W: Tensor) -> LazyBlocks:
    """The lazy blocks of the stage that holds the parameter ``W``."""
    blk = next(b for b in H.blocks if isinstance(b, LazyBlocks) and any(t is W for t in b.stage.params))
    assert isinstance(blk, LazyBlocks)
    return blk


def _rel(d: Tensor, ref: Tensor) -> float:
    return float((d.to(F64) - ref.diagonal()).abs().max()) / float(ref.diagonal().abs().max())


@pytest.mark.parametrize("name", NAMES)
def test_diagonal_by_columns_equals_autograd(name, by_columns):
    """``H.diagonal()`` through the column route equals the float64 autograd Hessian's diagonal to 1e-12,
    and the route ran: columns of a parameter tensor for every model whose generic stage has a nonzero
    diagonal block, none for the ReLU conv + BN block (every block zero there)."""
    model, loss_fn, X, y = _problem(name)
    ref = autograd_hessian(model, loss_fn, X, y)
    H = hessinv.hessian(model, loss_fn, X, y)
    d = H.diagonal()
    assert _rel(d, ref) <= 1e-12, name
    lazy = [b for b in H.blocks if isinstance(b, LazyBlocks) and b.p]
    assert lazy
    param_columns = [c for c in by_columns if any(c[1] is W for W in c[0].stage.params)]
    if name == "conv-bn-relu":
        block = _stage_of(H, model[2].c1.weight)
        assert block._self_blocks() == [False] * len(block.stage.params)
        assert block._second_parts()[0] is None or not bool(block._second_parts()[0].any())
        assert not [c for c in param_columns if c[0] is block]
    else:
        assert param_columns
        assert all(c[0]._batched_second for c in by_columns)


def test_zero_and_nonzero_blocks_in_one_stage(by_columns):
    """The Tanh conv + BN block: its first conv and BN have nonzero diagonal blocks of ``Hxx``, its second
    ones zero (linear in them with the rest held); ``diag(Hxx)`` from the columns of the first ones alone,
    at the right offsets, equals the dense blocks' (formed by the general route) entry by entry."""
    model, loss_fn, X, y = _problem("conv-bn-tanh")
    H = hessinv.hessian(model, loss_fn, X, y)
    mod = model[2]
    blk = _stage_of(H, mod.c1.weight)
    nonzero = dict(zip([id(W) for W in blk.stage.params], blk._self_blocks(), strict=True))
    assert [nonzero[id(W)] for W in (mod.c1.weight, mod.b1.weight, mod.b1.bias)] == [True] * 3
    assert [nonzero[id(W)] for W in (mod.c2.weight, mod.b2.weight, mod.b2.bias)] == [False] * 3
    hxx, _ = blk._second_parts()
    first = {id(mod.c1.weight), id(mod.b1.weight), id(mod.b1.bias)}
    assert {id(c[1]) for c in by_columns if c[0] is blk and c[1] is not blk._z} == first
    dense = blk.dense.Hxx
    assert dense is not None and bool(dense.diagonal().ne(0).any())
    assert float((hxx - dense.diagonal()).abs().max()) <= 1e-12 * float(dense.diagonal().abs().max())
    cols = sum(W.numel() for W in (mod.c1.weight, mod.b1.weight, mod.b1.bias))
    assert blk.example_sweep_passes(dense=False, first=False) <= cols + blk.d_in


@pytest.mark.parametrize("name", ["layernorm", "transformer-layer"])
def test_many_small_chunks(name, by_columns, monkeypatch):
    """Three columns a vmapped pass (a ragged last chunk for every tensor and for ``Hzz_n``): the same
    diagonal."""
    monkeypatch.setattr(generic, "CHUNK", 3)
    model, loss_fn, X, y = _problem(name, batch=3)
    ref = autograd_hessian(model, loss_fn, X, y)
    assert _rel(hessinv.hessian(model, loss_fn, X, y).diagonal(), ref) <= 1e-12
    assert any(n > 3 and n % 3 for _, _, n in by_columns)


def _corrupt_batched(monkeypatch, how: str) -> list[bool]:
    """``_backward_rows`` with one ``wrt`` (the column route's): batched results 0.1% off (``how="off"``) or
    a failed batched pass (``"fail"``); returns the ``batched`` flag of each such call."""
    original = generic._backward_rows
    seen: list[bool] = []

    def rows(out, wrt, n, seeds, batched):
        got = original(out, wrt, n, seeds, batched)
        if len(wrt) != 1:
            return got
        seen.append(batched)
        if batched and how == "fail":
            return None
        if batched and got is not None:
            return [
                g * (1 + 1e-3 * torch.arange(g.shape[0], dtype=g.dtype)).view(-1, *[1] * (g.dim() - 1))
                for g in got
            ]
        return got

    monkeypatch.setattr(generic, "_backward_rows", rows)
    return seen


@pytest.mark.parametrize("how", ["off", "fail"])
def test_batched_columns_that_disagree_or_fail_are_redone_one_at_a_time(how, by_columns, monkeypatch):
    """Batched columns off by 0.1% fail the check against the unbatched pass of their random combination and
    are redone one pass each; a batched pass that fails (no batching rule) turns the stage to one pass per
    column. The diagonal is autograd's either way."""
    model, loss_fn, X, y = _problem("transformer-layer")
    ref = autograd_hessian(model, loss_fn, X, y)
    seen = _corrupt_batched(monkeypatch, how)
    H = hessinv.hessian(model, loss_fn, X, y)
    assert _rel(H.diagonal(), ref) <= 1e-12
    assert True in seen and False in seen  # (tried batched, then one at a time)
    stage = _stage_of(H, model[1].linear1.weight)
    assert stage._batched_second == (how == "off")


def test_first_stage_forms_no_input_curvature(by_columns):
    """The sweep's first stage with parameters has data as its input: its ``Hzz_n`` is not formed."""
    torch.manual_seed(0)
    model = nn.Sequential(LNBlock(4, 5), nn.Linear(4, 3)).to(F64).eval()
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(4, 4, generator=g, dtype=F64), torch.randint(0, 3, (4,), generator=g)
    ref = autograd_hessian(model, nn.CrossEntropyLoss(), X, y)
    H = hessinv.hessian(model, nn.CrossEntropyLoss(), X, y)
    assert _rel(H.diagonal(), ref) <= 1e-12
    first = H.blocks[0]
    assert isinstance(first, LazyBlocks) and first._nonzero_second()[1]  # (Hzz_n is not zero there)
    assert "_hzz" not in first.__dict__
    assert not [c for c in by_columns if c[0] is first and c[1] is first._z]


def test_float32_transformer_layer_near_float64(by_columns):
    """A float32 model's diagonal by columns against the float64 autograd reference: float32 rounding."""
    model, loss_fn, X, y = _problem("transformer-layer", batch=6)
    ref = autograd_hessian(model, loss_fn, X, y)
    model32 = _model("transformer-layer")[0].float()
    d = hessinv.hessian(model32, loss_fn, X.float(), y).diagonal()
    assert d.dtype == torch.float32
    assert _rel(d, ref) <= 1e-5
    assert by_columns and all(c[0]._batched_second for c in by_columns)


def test_one_column_off_in_float32_is_caught(by_columns, monkeypatch):
    """The batched columns' check compares entry by entry: one column of a parameter's block 10% off in a
    float32 transformer layer was accepted by a bound relative to the block's largest entry (a review's
    finding, there with one entry off)."""
    model, loss_fn, X, y = _problem("transformer-layer", batch=6)
    ref = autograd_hessian(model, loss_fn, X, y)
    model32 = _model("transformer-layer")[0].float()
    original = generic._backward_rows

    def rows(out, wrt, n, seeds, batched):
        got = original(out, wrt, n, seeds, batched)
        parameter = len(wrt) == 1 and out.shape == wrt[0].shape  # (a diag(Hxx) block's columns)
        if batched and got is not None and parameter and got[0].shape[0] > 1:
            g = got[0].clone()  # (a parameter's columns: the first one 10% off)
            g[0] *= 1.1
            return [g]
        return got

    monkeypatch.setattr(generic, "_backward_rows", rows)
    d = hessinv.hessian(model32, loss_fn, X.float(), y).diagonal()
    assert _rel(d, ref) <= 1e-5


def test_the_diagonal_after_a_same_value_write_and_a_refusal_after_a_change(by_columns):
    """Parameters written in place with the same values after a product (a trust region's trial step and its
    undo): the diagonal's columns ran on the kept graph, which autograd refused (a misleading
    NoDoubleBackward; a review). The point is checked as products check it: the same values call the stage
    again, other values are named."""
    model, loss_fn, X, y = _problem("layernorm")
    ref = autograd_hessian(model, loss_fn, X, y)
    H = hessinv.hessian(model, loss_fn, X, y)
    H @ torch.ones(H.shape[0], dtype=F64)
    assert all(b._nonzero_second() for b in H.blocks if isinstance(b, LazyBlocks))  # (the kept graph used)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.0)
    assert _rel(H.diagonal(), ref) <= 1e-12
    H = hessinv.hessian(model, loss_fn, X, y)
    H @ torch.ones(H.shape[0], dtype=F64)
    with torch.no_grad():
        model[1].l1.weight.add_(0.1)
    with pytest.raises(hessinv.InvalidArgumentError, match="changed after this curvature was taken"):
        H.diagonal()


def test_a_first_stage_with_a_large_input_curvature_keeps_the_per_example_sweep(by_columns, monkeypatch):
    """The first stage's ``Hzz_n`` is not formed (its input is data), so its size no longer sends the
    diagonal off the per-example sweep (a review)."""
    from hessinv.riccati import examples_apart

    torch.manual_seed(0)
    model = nn.Sequential(LNBlock(4, 5), nn.Linear(4, 3)).to(F64).eval()
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(4, 4, generator=g, dtype=F64), torch.randint(0, 3, (4,), generator=g)
    monkeypatch.setattr(LazyBlocks, "EXAMPLE_HZZ_ENTRIES", 1)  # (any Hzz_n "too large")
    H = hessinv.hessian(model, nn.CrossEntropyLoss(), X, y)
    assert examples_apart(H.blocks)
    ref = autograd_hessian(model, nn.CrossEntropyLoss(), X, y)
    assert _rel(H.diagonal(), ref) <= 1e-12


def test_batched_columns_out_of_memory_are_formed_one_at_a_time(by_columns, monkeypatch):
    """vmap keeps ``q`` copies of a stage's intermediates, which the chunk size bounds by the stage's inputs
    and outputs only (attention's ``B h T^2`` are not counted): a batched pass out of memory falls back to
    one column at a time rather than refuse a diagonal that used to fit (a review)."""
    model, loss_fn, X, y = _problem("transformer-layer")
    ref = autograd_hessian(model, loss_fn, X, y)
    original = generic._backward_rows

    def rows(out, wrt, n, seeds, batched):
        if batched and len(wrt) == 1:  # (the columns' passes)
            raise hessinv.TooLargeError("a generic stage's backward passes ran out of memory (a stand-in)")
        return original(out, wrt, n, seeds, batched)

    monkeypatch.setattr(generic, "_backward_rows", rows)
    H = hessinv.hessian(model, loss_fn, X, y)
    assert _rel(H.diagonal(), ref) <= 1e-12
    assert by_columns and not any(c[0]._batched_second for c in by_columns)
