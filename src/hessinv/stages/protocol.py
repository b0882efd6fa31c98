"""What a stage of a chain must provide.

A chain is ``z_l = f_l(z_{l-1}; x_l)``, ``l = 1..L`` (math.md §1). For a batch of ``B`` examples,
activations are stored per example, flattened: ``z_l`` has shape ``(B, d_l)`` and the activation
space has dimension ``a_l = B * d_l``. Stages act on each example separately, so ``Jz``, ``Hzz`` and
``Hxz`` are block-diagonal over examples and are never formed as ``a x a`` matrices.

Symbols (math.md) -> names used in code:

=============  =====================================  ==========================
symbol         meaning                                 method of :class:`Blocks`
=============  =====================================  ==========================
``Jx_l``       ``df_l/dx_l``  (a_l x p_l)             ``jx``, ``jxT``
``Jz_l``       ``df_l/dz_{l-1}`` (a_l x a_{l-1})      ``jz``, ``jzT``
``Hxx_l``      ``sum_k b_l[k] d2f_l[k]/dx dx``        ``hxx``
``Hxz_l``      ``sum_k b_l[k] d2f_l[k]/dx dz``        ``hxz``, ``hxzT``
``Hzz_l``      ``sum_k b_l[k] d2f_l[k]/dz dz``        ``hzz``
``Q..``        Riccati blocks given ``Sigma_l``       ``riccati``
=============  =====================================  ==========================

Vectors in parameter space have shape ``(p, k)``; vectors in activation space ``(B, d, k)``;
``Sigma`` has shape ``(B, d, B, d)``. ``k`` is the number of right-hand sides.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


def defined_in_torch(f: object) -> bool:
    """Whether the function (or class) ``f`` is torch's own: its module is inside torch, or it has none
    (code fx generates, as a GraphModule's ``forward``)."""
    return str(getattr(f, "__module__", None) or "torch.").startswith("torch.")


def compiled_module(m: object) -> bool:
    """A ``torch.compile``-d module (``OptimizedModule``), whose ``_orig_mod`` is the module itself."""
    return type(m).__name__ == "OptimizedModule" and isinstance(getattr(m, "_orig_mod", None), nn.Module)


def basis_product(left: Tensor | None, X: Tensor, right: Tensor | None) -> Tensor:
    """``left @ X @ right``, a side given as None the identity (a weight's side that
    :class:`hessinv.optim.EigenBasis` leaves unrotated)."""
    if left is not None:
        X = torch.matmul(left, X)
    return X if right is None else torch.matmul(X, right)


def in_basis(QL: Tensor | None, X: Tensor, QR: Tensor | None) -> Tensor:
    """``Q_L^T X Q_R`` (a weight's rows ``X`` in an eigenbasis), a side given as None the identity."""
    return basis_product(None if QL is None else QL.mT, X, QR)


def own_rows_only(s: Tensor, own: Tensor) -> bool:
    """Whether column ``q`` of ``s`` (B, d, k) is nonzero at example ``own[q]`` only (exact zeros
    elsewhere: what a backward pass seeded on one example gives through stages that keep examples
    apart)."""
    q = torch.arange(s.shape[-1], device=s.device)
    others = s.clone()
    others[own, :, q] = 0
    return not bool(others.any())


@dataclass
class RiccatiBlocks:
    """The stage's blocks of one backward Riccati step (math.md §2), damping not yet added.

    ``Qxx0 = Hxx + Jx^T Sigma Jx`` (p, p); ``Qxz = Hxz + Jx^T Sigma Jz`` (p, B, d_in);
    ``Qzz = Hzz + Jz^T Sigma Jz`` (B, d_in, B, d_in). For the first stage (``coupled=False``: its input
    is data, not a variable) neither is needed: ``Qzz`` is None and ``Qxz`` may have ``d_in = 0``.

    ``order``: when not None, the rows of ``Qxx0``/``Qxz`` (and columns of ``Qxx0``) follow the
    stage's own parameter order, in which the blocks are cheapest to form: row ``q`` is model
    parameter ``order[q]``; ``inverse`` is its inverse permutation (``order[inverse] = arange``).
    A symmetric permutation leaves the pivot's inertia unchanged; the solve permutes vectors.

    The sweep takes ownership: it may overwrite ``Qxx0``, ``Qzz`` and the ``A`` of ``lowrank`` in
    place, so return fresh tensors (``Qzz`` may be the ``Sigma`` passed in, which is never overwritten).

    ``lowrank``: when not None, ``(Qz, A, C, e)`` with ``Qxx0 = U A U^T``, ``U = Qz (x) I`` (``Qz`` with
    orthonormal columns, ``A`` of size ``r < p``) and ``2^e C = Qxz^T (I - U U^T) Qxz`` (None: zero;
    ``C`` kept scaled by a power of two, as the true one can underflow at tiny Hessian scales), and
    ``Qxx0`` is None (``Qz`` a 1-D integer tensor of ``r`` rows: ``U`` those unit columns of ``I_p``):
    the sweep factors the pivot through ``eps I_r + A``
    (:class:`hessinv.riccati.LowRankPivot`).
    """

    Qxx0: Tensor | None
    Qxz: Tensor
    Qzz: Tensor | None
    order: Tensor | None = None
    inverse: Tensor | None = None
    lowrank: tuple[Tensor, Tensor, Tensor | None, int] | None = None


#: A per-example curvature ``P_n`` (:meth:`Blocks.example_curvature_diagonal`): (B, d, d) blocks, a factored
#: ``(F, S)`` with ``P_n = F_n diag(S_n) F_n^T`` (F (B, d, R), S (B, R)), or only the diagonal (B, d)
ExampleCurvature = Tensor | tuple[Tensor, Tensor]


def example_diagonal(P: ExampleCurvature) -> Tensor:
    """The diagonal (B, d) of a per-example curvature in any of its :data:`ExampleCurvature` forms:
    ``sum_r S_r F_r^2`` factored, the blocks' diagonals, or itself."""
    if isinstance(P, tuple):
        return (P[0].square() * P[1][:, None, :]).sum(-1)
    return P.diagonal(dim1=1, dim2=2) if P.dim() == 3 else P


class Blocks(abc.ABC):
    """First- and second-order blocks of one stage at a linearization point.

    ``second_order=False`` (Gauss-Newton) means every ``H..`` block is zero.
    """

    p: int
    batch: int
    d_in: int
    d_out: int
    #: ``Jz^T`` maps each example's rows to the same example's rows only (no batch coupling): a
    #: right-hand side nonzero at one example per column stays so
    #: (see :func:`hessinv.lowrank.gauss_newton_root`)
    per_example: bool = False
    #: :meth:`example_curvature_diagonal` needs only the diagonal of ``P_l`` (its own diagonal, and that of
    #: ``P_{l-1}`` where it passes only that on): Linear + activation, elementwise, identity -- not a
    #: generic stage, whose Jacobian mixes its outputs
    reads_diagonal: bool = False

    @property
    def adds_example_curvature(self) -> bool:
        """Whether :meth:`example_curvature_diagonal` adds a curvature of the stage's own to ``P_{l-1}``
        (``Hzz_n``, a ``b s''`` term) -- which makes a factored ``P`` dense -- or may (the default)."""
        return True

    @abc.abstractmethod
    def jx(self, v: Tensor) -> Tensor:
        """``Jx v``: (p, k) -> (B, d_out, k)."""

    @abc.abstractmethod
    def jxT(self, s: Tensor) -> Tensor:
        """``Jx^T s``: (B, d_out, k) -> (p, k)."""

    def per_example_jxT(self, s: Tensor, out: Tensor | None = None) -> Tensor | None:
        """``(B, p)``: row ``n`` is ``Jx_n^T s_n``, example ``n``'s own contribution to ``Jx^T s`` for
        ``s`` (B, d_out) (per-example gradients, :meth:`hessinv.Chain.per_example_gradients`), written
        into ``out`` (B, p) if given; None where the stage has no such form (the caller falls back to
        ``torch.func.vmap``)."""
        return None

    def jxT_rows(
        self,
        s: Tensor,
        rotation: list,
        factors: list | None = None,
        own: Tensor | None = None,
        out: Tensor | None = None,
        skip_from: int | None = None,
        tables: list | None = None,
    ) -> Tensor | None:
        """``(Jx^T s)^T`` as (k, p) rows built from the stage's structure: a Linear weight's rows as outer
        products ``t z^T`` of the signal at its output and its input
        (:func:`hessinv.lowrank.gauss_newton_root`). ``rotation``: ``[(offset in the stage, a, b, Q_L,
        Q_R)]``, the weights whose rows come out as ``Q_L^T G Q_R`` (a side None: the identity); ``own``
        (k,), if given, the example each column of ``s`` is nonzero at; ``factors``, if a list, receives
        ``(offset, t, z, verified)`` per weight whose rows are ``vec(t_q z_{own[q]}^T)`` (``verified``:
        known to be one example's each); ``out`` (k, p) receives the rows; a verified weight of
        ``skip_from`` entries or more is left unwritten; ``tables``, if a list (with ``skip_from``),
        receives ``(offset, size, columns, values)`` per lookup table (``nn.Embedding``) whose rows are
        nonzero on the batch's tokens only and are left unwritten: ``values`` (k, c) holds their ``c``
        nonzero ``columns`` (ascending, offsets within the stage). None (the default): no such structure, the
        caller takes ``jxT``."""
        return None

    def pivot_order(self, batch: int) -> int:
        """The order of the dense matrix the Riccati sweep factors for this stage's pivot with ``batch``
        examples: ``p``, or less where the stage hands it over in low-rank form
        (:attr:`RiccatiBlocks.lowrank`)."""
        return self.p

    @abc.abstractmethod
    def jz(self, t: Tensor) -> Tensor:
        """``Jz t``: (B, d_in, k) -> (B, d_out, k)."""

    @abc.abstractmethod
    def jzT(self, s: Tensor) -> Tensor:
        """``Jz^T s``: (B, d_out, k) -> (B, d_in, k)."""

    @abc.abstractmethod
    def hxx(self, v: Tensor) -> Tensor:
        """``Hxx v``: (p, k) -> (p, k)."""

    @abc.abstractmethod
    def hxz(self, t: Tensor) -> Tensor:
        """``Hxz t``: (B, d_in, k) -> (p, k)."""

    @abc.abstractmethod
    def hxzT(self, v: Tensor) -> Tensor:
        """``Hxz^T v``: (p, k) -> (B, d_in, k)."""

    @abc.abstractmethod
    def hzz(self, t: Tensor) -> Tensor:
        """``Hzz t``: (B, d_in, k) -> (B, d_in, k)."""

    @abc.abstractmethod
    def riccati(self, Sigma: Tensor, coupled: bool = True) -> RiccatiBlocks:
        """The blocks ``Qxx0, Qxz, Qzz`` of math.md §2 for the downstream ``Sigma`` (B, d_out, B, d_out);
        with ``coupled=False`` only ``Qxx0`` (see :class:`RiccatiBlocks`)."""

    def hvp_forward(self, t: Tensor | None, v: Tensor | None) -> Tensor | None:
        """Forward step of ``H v`` (math.md §1): ``Jz t + Jx v`` (``None`` for a zero ``t`` or ``v``;
        ``v`` is None when ``p = 0``). Stages may override it with a fused version."""
        jt = None if t is None else self.jz(t)
        jv = None if v is None else self.jx(v)
        return jv if jt is None else (jt if jv is None else jt + jv)

    def hvp_backward(
        self, s: Tensor, v: Tensor | None, t: Tensor | None, need_s: bool = True
    ) -> tuple[Tensor | None, Tensor | None]:
        """Backward step of ``H v``: ``(Jx^T s + Hxx v + Hxz t, Jz^T s + Hxz^T v + Hzz t)`` (the first
        None when ``p = 0``, the second None without ``need_s``; ``t`` None for zero). Stages may
        override it with a fused version."""
        out = None
        if self.p:
            out = self.jxT(s) + self.hxx(v)
            if t is not None:
                out = out + self.hxz(t)
        s_new = None
        if need_s:
            s_new = self.jzT(s)
            if self.p:
                s_new = s_new + self.hxzT(v)
            if t is not None:
                s_new = s_new + self.hzz(t)
        return out, s_new

    def curvature_diagonal(self, Sigma: Tensor, coupled: bool = True) -> tuple[Tensor, Tensor | None]:
        """``(diag(Qxx0), Qzz)`` for the downstream ``Sigma`` without elimination: with ``Sigma = P_l``,
        the Hessian of the loss in this stage's output through every later stage
        (``P_{l-1} = Hzz_l + Jz_l^T P_l Jz_l``, ``P_L = 0``), ``Qxx0 = Hxx_l + Jx_l^T P_l Jx_l`` is the
        diagonal block of ``H`` for the stage's parameters and ``Qzz = P_{l-1}``. The diagonal (p,) is
        in model order; ``Qzz`` is None unless ``coupled``. Default: from :meth:`riccati`; a stage may
        give it without forming the ``p x p`` block."""
        rb = self.riccati(Sigma, coupled)
        assert rb.Qxx0 is not None, "riccati() returns the dense Qxx0"
        return rb.Qxx0.diagonal().clone(), rb.Qzz if coupled else None

    def example_curvature_diagonal(
        self,
        P: ExampleCurvature,
        coupled: bool = True,
        only_diagonal: bool = False,
        rows: slice = slice(None),
    ) -> tuple[Tensor, ExampleCurvature | None] | None:
        """:meth:`curvature_diagonal` for a downstream ``P_l`` that is block-diagonal over the examples -- as
        it is below a loss of per-example terms through stages that keep examples apart -- given per example
        (:data:`ExampleCurvature`: ``P_n`` (B, d_out, d_out), factored as ``(F, S)`` with ``P_n = F_n
        diag(S_n) F_n^T``, or only its diagonal (B, d_out) where no later stage needs more):
        ``(diag(Qxx0), P_{l-1})``, ``P_{l-1}`` in one of those forms (only its diagonal where
        ``only_diagonal``; None unless ``coupled``), ``O(B d^3)`` or ``O(B d^2 R)`` instead of the ``a x
        a`` blocks' ``O(B^2 d^3)``; ``rows``: for the batch's examples in that slice only (``P`` given
        for them; the diagonal is theirs, a sum over examples). None (the default): no such form."""
        return None

    def keeps_examples_apart(self, first: bool = False) -> bool:
        """Whether :meth:`example_curvature_diagonal` gives this stage's part of the per-example sweep
        (:func:`hessinv.riccati.examples_apart`); ``first``: the sweep's first stage with parameters, whose
        input is data (no curvature in it to form). Default: where the class gives that method."""
        return type(self).example_curvature_diagonal is not Blocks.example_curvature_diagonal

    def riccati_native(self, Sigma: Tensor, coupled: bool = True) -> RiccatiBlocks:
        """:meth:`riccati` with parameters in the order in which the stage forms them cheapest
        (given by :attr:`RiccatiBlocks.order`); the Riccati sweep calls this one. Defaults to
        :meth:`riccati` (model order)."""
        return self.riccati(Sigma, coupled)


class ParameterFreeBlocks(Blocks):
    """Blocks of a stage without parameters (``p = 0``): ``Jx``, ``Hxx`` and ``Hxz`` are empty; the
    subclass gives ``Jz``, ``Hzz`` and the Riccati blocks."""

    p = 0

    def jx(self, v: Tensor) -> Tensor:
        return v.new_zeros(self.batch, self.d_out, v.shape[-1])

    def jxT(self, s: Tensor) -> Tensor:
        return s.new_zeros(0, s.shape[-1])

    def hxx(self, v: Tensor) -> Tensor:
        return v

    def hxz(self, t: Tensor) -> Tensor:
        return t.new_zeros(0, t.shape[-1])

    def hxzT(self, v: Tensor) -> Tensor:
        return v.new_zeros(self.batch, self.d_in, v.shape[-1])


def sandwich_blockdiag(J: Tensor, Sigma: Tensor) -> Tensor:
    """``J^T Sigma J`` for a per-example block-diagonal ``J`` (B, d_out, d_in) and dense ``Sigma``.

    Returns (B, d_in, B, d_in). Two batched products, ``O(a_out^2 d_in)``; no ``a x a`` Jacobian.
    """
    right = torch.einsum("nomq,mqj->nomj", Sigma, J)
    return torch.einsum("noi,nomj->nimj", J, right)


def add_blockdiag(dense: Tensor, blocks: Tensor) -> Tensor:
    """``dense + blockdiag(blocks)`` with dense (B, d, B, d) and blocks (B, d, d); returns a new tensor."""
    out = dense.clone()
    idx = torch.arange(blocks.shape[0], device=blocks.device)
    out[idx, :, idx, :] += blocks
    return out


class Stage(abc.ABC):
    """One stage ``z_out = f(z_in; x)`` of a chain, acting on each example separately.

    Attributes:
        index: position in the chain (0-based), used in error messages.
        modules: the ``nn.Module`` objects this stage is made of (for messages).
        params: the trainable parameters ``x_l``, in ``model.parameters()`` order.
    """

    index: int
    modules: tuple[nn.Module, ...]
    params: list[nn.Parameter]
    #: the module traced to find this stage (a piece of its forward), None for a module called as it is
    #: (set by :func:`hessinv.chain.split_stages`)
    origin: nn.Module | None = None
    #: for a traced piece, the module calls in which it uses each of its parameters (by ``id``), None
    #: otherwise (``hessinv.chain.Uses``; set by :func:`hessinv.chain.split_stages`)
    uses: dict | None = None

    @property
    def p(self) -> int:
        """Number of trainable parameters of this stage."""
        return sum(t.numel() for t in self.params)

    @property
    def name(self) -> str:
        """``'stage 3 (Linear+Tanh)'``: how errors refer to this stage."""
        kinds = "+".join(getattr(m, "_hessinv_label", None) or type(m).__name__ for m in self.modules)
        return f"stage {self.index} ({kinds})"

    @abc.abstractmethod
    def forward(self, z: Tensor) -> Tensor:
        """``f(z; x)`` on a batch ``z`` of shape (B, ...); returns (B, ...)."""

    @abc.abstractmethod
    def linearize(self, z_in: Tensor, b_out: Tensor, second_order: bool) -> Blocks:
        """Blocks at input ``z_in`` (B, ...) with backprop vector ``b_out = dz_L/dz_out`` (B, d_out)."""


def unshared(inputs: Any) -> Any:
    """A copy of ``inputs`` for one call of the user's own forward or loss (a tensor; anything else as it
    is). A forward may modify its input in place (``x.mul_(2)``, ``x.sub_(mean)``, a first
    ``nn.ReLU(inplace=True)``), as plain torch allows, and hessinv calls the model on the batch it holds
    more than once: the curvature came out at ``4 X`` for ``x.mul_(2)``, with no error (a probe), and the
    caller's data changed under it. A generic stage copies its input by it too
    (:meth:`~hessinv.stages.generic.GenericStage.forward`)."""
    return inputs.clone() if isinstance(inputs, Tensor) else inputs
