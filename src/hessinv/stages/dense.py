"""``Linear`` (+ an elementwise activation) with the structure of math.md §3, never forming ``Jx``.

Per example ``n``: ``u_n = W z_n + c``, ``z_out,n = s(u_n)``. With ``zt_n = [z_n, 1]`` (the bias
column when there is a bias), ``s' = s'(u)``, ``s'' = s''(u)``, ``b = dz_L/dz_out``:

=========  ===================================================================================
block      closed form (indices: example n, output unit i, input j,k; params ordered (i, j))
=========  ===================================================================================
``Jx``     ``[(n,i),(i',j)] = s'_{n,i} delta_{ii'} zt_n[j]``   (Kronecker: never built)
``Jz``     ``diag(s'_n) W`` per example
``Hxx``    ``delta_{ii'} sum_n (b s'')_{n,i} zt_n[j] zt_n[j']`` (block-diagonal over units)
``Hxz``    ``[(i,j),(n,k)] = (b s'')_{n,i} zt_n[j] W[i,k] + (b s')_{n,i} delta_{jk}``
``Hzz``    ``W^T diag((b s'')_n) W`` per example
=========  ===================================================================================

Riccati products: write ``Jx = diag(s') Jt`` with ``Jt[(n,i),(i',j)] = delta_{ii'} zt_n[j]`` and
``Jz = diag(s') Wb`` (``Wb = blockdiag_n W``). Then ``Hxx = Jt^T diag(b s'') Jt``, the first term of
``Hxz`` is ``Jt^T diag(b s'') Wb`` and ``Hzz = Wb^T diag(b s'') Wb``, so with one ``a x a`` matrix
``M = diag(s') Sigma diag(s') + diag(b s'')``::

    Qxx0 = Jt^T M Jt,    Qxz = Jt^T M Wb + [(i,j),(n,c)] (b s')_{n,i} delta_{jc},    Qzz = Wb^T M Wb

-- five plain or batched matrix products costing ``O(a^2 w + a p w)``, no ``a x p`` Jacobian.
Parameters are handled internally in the input-major order of the augmented ``P[i, j] = [W | c]``
(row ``j * d + i``), in which every product above lands contiguous, and permuted to
``model.parameters()`` order (weight row-major, then bias) at the boundary; the Riccati blocks stay
in it (:meth:`DenseLayerBlocks.riccati_native`, :attr:`RiccatiBlocks.order`).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from hessinv.errors import UnsupportedStageError
from hessinv.stages.generic import GenericStage
from hessinv.stages.protocol import (
    Blocks,
    ExampleCurvature,
    ParameterFreeBlocks,
    RiccatiBlocks,
    Stage,
    defined_in_torch,
    example_diagonal,
    in_basis,
)

#: Modules treated as elementwise activations ``s`` (fused into a preceding Linear); exact types only
#: (a subclass may override ``forward``). ReLU-type activations have ``s'' = 0`` almost everywhere,
#: so their curvature terms vanish. ``RReLU`` only in eval mode (fixed slope).
ELEMENTWISE = (
    nn.Tanh, nn.Sigmoid, nn.Softplus, nn.GELU, nn.SiLU, nn.ELU, nn.ReLU, nn.LeakyReLU, nn.CELU,
    nn.SELU, nn.Mish, nn.Softsign, nn.Tanhshrink, nn.Hardtanh, nn.ReLU6, nn.LogSigmoid,
    nn.Hardsigmoid, nn.Hardswish, nn.Hardshrink, nn.Softshrink, nn.Threshold, nn.RReLU,
)  # fmt: skip


class FunctionActivation(nn.Module):
    """An elementwise function (``torch.tanh``, ``F.gelu(x, approximate='tanh')``, ``x.relu()``) as a
    module: ``fn(z, *args, **kwargs)``. Made by the chain reader from traced ``forward`` code."""

    def __init__(self, fn, args: tuple = (), kwargs: dict | None = None, name: str | None = None):
        super().__init__()
        self.fn, self.args, self.kwargs = fn, args, dict(kwargs or {})
        self._hessinv_label = name or (fn if isinstance(fn, str) else getattr(fn, "__name__", str(fn)))

    def forward(self, z: Tensor) -> Tensor:
        if isinstance(self.fn, str):  # a tensor method
            return getattr(z, self.fn)(*self.args, **self.kwargs)
        return self.fn(z, *self.args, **self.kwargs)

    def extra_repr(self) -> str:
        return self._hessinv_label


def customized(m: nn.Module) -> bool:
    """Whether calling ``m`` runs something else than its class's own ``forward``: a ``forward`` set on the
    instance (a wrapper patching it), a class that overrides ``__call__``, or a torch class whose
    ``forward`` was replaced outside torch. Such a module is called as it is (a generic stage), never
    read as the layer its type names nor traced through."""
    cls = type(m)  # (fx's GraphModule has torch's own __call__ and a generated forward)
    if "forward" in vars(m) or (
        cls.__call__ is not nn.Module.__call__ and not defined_in_torch(cls.__call__)
    ):
        return True
    return defined_in_torch(cls) and not defined_in_torch(getattr(cls, "forward", None))


def is_elementwise(m: nn.Module) -> bool:
    """Whether ``m`` is a parameter-free elementwise activation the structured stages handle."""
    if isinstance(m, FunctionActivation):
        return True
    if customized(m):
        return False
    if type(m) not in ELEMENTWISE or list(m.parameters()) or m._forward_hooks or m._forward_pre_hooks:
        return False
    return not (isinstance(m, nn.RReLU) and m.training)


def out_of_place(act: nn.Module | None) -> nn.Module | None:
    """``act`` itself, or a copy of it that does not work in place (``inplace=True`` modules, calls)."""
    if act is None:
        return None
    if isinstance(act, FunctionActivation) and (
        act.kwargs.get("inplace") or (isinstance(act.fn, str) and act.fn.endswith("_"))
    ):
        fn = act.fn.rstrip("_") if isinstance(act.fn, str) else act.fn
        kwargs = {k: v for k, v in act.kwargs.items() if k != "inplace"}
        return FunctionActivation(fn, act.args, kwargs, act._hessinv_label)
    if getattr(act, "inplace", False):
        act = copy.copy(act)
        act.inplace = False
    return act


def _tanh(u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    s = torch.tanh(u)
    d1 = 1 - s * s
    return s, d1, -2 * s * d1


def _sigmoid(u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    s = torch.sigmoid(u)
    d1 = s * (1 - s)
    return s, d1, d1 * (1 - 2 * s)


def _relu(u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return torch.relu(u), (u > 0).to(u.dtype), torch.zeros_like(u)


def _hardsigmoid(u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    # torch's hardsigmoid backward uses a single-precision 1/6 (off by 3e-8 in float64)
    inside = ((u > -3) & (u < 3)).to(u.dtype)
    return torch.nn.functional.hardsigmoid(u), inside / 6, torch.zeros_like(u)


#: Closed forms, exact module types only.
_CLOSED_FORM = {nn.Tanh: _tanh, nn.Sigmoid: _sigmoid, nn.ReLU: _relu, nn.Hardsigmoid: _hardsigmoid}
#: Piecewise-linear activations: ``s'' = 0`` almost everywhere (autograd has no double backward
#: for some of them, e.g. ``hardsigmoid_backward``).
_PIECEWISE_LINEAR = (
    nn.Hardsigmoid, nn.Hardtanh, nn.ReLU6, nn.Hardshrink, nn.Softshrink, nn.Threshold, nn.LeakyReLU, nn.RReLU,
)  # fmt: skip


def activation_derivatives(act: nn.Module | None, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(s(u), s'(u), s''(u))`` of an elementwise activation (identity when ``act`` is None).

    Closed forms for ``Tanh``, ``Sigmoid`` and ``ReLU``; plain autograd double backward for the
    others (``act`` must not work in place: see :func:`out_of_place`).
    """
    if act is None:
        return u, torch.ones_like(u), torch.zeros_like(u)
    closed = _CLOSED_FORM.get(type(act))
    if isinstance(act, FunctionActivation) and act.fn is torch.nn.functional.hardsigmoid:
        closed = _hardsigmoid
    if closed is not None:
        return closed(u)
    v = u.detach().clone().requires_grad_(True)
    linear = isinstance(act, _PIECEWISE_LINEAR)
    try:
        with torch.enable_grad():
            s = act(v)
            (d1,) = torch.autograd.grad(s.sum(), v, create_graph=not linear)
            if d1.requires_grad and not linear:
                (d2,) = torch.autograd.grad(d1.sum(), v, allow_unused=True, materialize_grads=True)
            else:
                d2 = torch.zeros_like(v)
    except RuntimeError as e:
        raise UnsupportedStageError(f"activation {act}: autograd cannot differentiate it twice: {e}") from e
    return s.detach(), d1.detach(), d2.detach()


class DenseStage(Stage):
    """``z_out = s(W z_in + c)`` with optional bias and optional elementwise activation ``s``; with
    ``residual=True`` (a square ``W``) the residual block ``z_out = z_in + s(W z_in + c)``.

    The residual block has the blocks of the plain one except ``Jz = I + diag(s') W``: the identity
    path is linear, so it adds no second-order term. Its Riccati blocks (module docstring) become,
    with ``P = diag(s') Sigma``: ``Qxz = Jt^T (M Wb + P) + E`` and
    ``Qzz = Wb^T (M Wb + P) + (Wb^T P)^T + Sigma``.
    """

    def __init__(self, index: int, linear: nn.Linear, act: nn.Module | None = None, residual: bool = False):
        self.index, self.linear, self.act, self.residual = index, linear, out_of_place(act), residual
        if residual and linear.in_features != linear.out_features:
            raise ValueError("a residual Linear stage needs in_features == out_features")
        self.modules = (linear,) if act is None else (linear, act)
        self.params = [t for t in (linear.weight, linear.bias) if t is not None]
        d, m = linear.out_features, linear.in_features
        self.bias = linear.bias is not None
        self.d, self.m, self.m1 = d, m, m + int(self.bias)
        self._generic: GenericStage | None = None
        self._maps: tuple[bool, Tensor, Tensor] | None = None

    @property
    def bias_first(self) -> bool:
        """Whether the model lists the bias before the weight (a Linear whose weight was re-registered,
        e.g. by ``torch.nn.utils.prune.remove``)."""
        return bool(self.bias and self.params[0] is self.linear.bias)

    def _orders(self) -> tuple[Tensor, Tensor]:
        """``(riccati_to_model, model_to_riccati)``: the model index of the Riccati (input-major) position
        ``j * d + i`` of the augmented weight ``[W b]``, and its inverse. The model's layout is that of
        ``params``, which the chain sorts as ``model.parameters()`` lists them: weight row-major then
        bias, or the bias first (a Linear whose weight was re-registered, e.g. by
        ``torch.nn.utils.prune.remove``)."""
        bias_first = self.bias_first
        if self._maps is None or self._maps[0] != bias_first:
            d, m = self.d, self.m
            idx = torch.arange(d * m).view(d, m) + (d if bias_first else 0)
            if self.bias:
                idx = torch.cat([idx, (0 if bias_first else d * m) + torch.arange(d).view(d, 1)], dim=1)
            r2m = idx.T.reshape(-1)
            m2r = torch.empty_like(r2m)
            m2r[r2m] = torch.arange(d * self.m1)
            self._maps = (bias_first, r2m, m2r)
        return self._maps[1], self._maps[2]

    @property
    def name(self) -> str:
        """The stage's name (:attr:`Stage.name`), ``+residual`` for a residual block."""
        base = super().name
        return base[:-1] + "+residual)" if self.residual else base

    def _as_generic(self) -> GenericStage:
        """This stage as a :class:`GenericStage` (same function and parameters, blocks by autograd)."""
        if self._generic is None:
            module = _StageModule(self)
            module._hessinv_label = self.name[self.name.index("(") + 1 : -1]
            self._generic = GenericStage(self.index, module, self.params)
        return self._generic

    def forward(self, z: Tensor) -> Tensor:
        u = self.linear(z)
        out = u if self.act is None else self.act(u)
        return z + out if self.residual else out

    def linearize(self, z_in: Tensor, b_out: Tensor, second_order: bool) -> Blocks:
        if z_in.dim() != 2:
            # a Linear over the last axis of (B, T, ..., m) inputs (tokens, channels): the weight is shared
            # across positions, which the structured blocks (one input row per example) do not express;
            # the generic stage's dense per-example blocks are exact for it
            return self._as_generic().linearize(z_in, b_out, second_order)
        z = z_in.detach()
        u = self.linear(z).detach()
        _, sp, spp = activation_derivatives(self.act, u)
        zt = torch.cat([z, torch.ones_like(z[:, :1])], dim=1) if self.bias else z
        W = self.linear.weight.detach().clone()
        return DenseLayerBlocks(self, zt, W, sp, b_out if second_order else None, spp)


class _StageModule(nn.Module):
    """A :class:`DenseStage` as a module (for :meth:`DenseStage._as_generic`)."""

    def __init__(self, stage: DenseStage):
        super().__init__()
        self.linear = stage.linear
        self.act = stage.act if isinstance(stage.act, nn.Module) else None
        object.__setattr__(self, "stage", stage)  # not a submodule

    def forward(self, z: Tensor) -> Tensor:
        return self.stage.forward(z)


def _lmul(A: Tensor, X: Tensor) -> Tensor:
    """``A @ X`` for ``X`` (B, a, k): for few columns (``k < 16``) as one GEMM ``(X^T A^T)^T`` --
    ``torch.matmul`` broadcasts a 2-D ``A`` over the batch as ``B`` matrix-vector products there, 4-18x
    slower (a 64 x 2048 weight on 64 examples, ``k = 1``: 6.2 against 0.35 ms; 100 x 100, ``k = 4``: 0.44
    against 0.10 ms); from 16 columns its batched products are as fast, and their result contiguous."""
    return (X.mT @ A.mT).mT if X.shape[-1] < 16 else torch.matmul(A, X)


def _second_order_weight(b: Tensor | None, spp: Tensor) -> Tensor | None:
    """``b s''``, the activation's second-order weight, or None for Gauss-Newton (``b`` None) and where
    ``s'' = 0`` everywhere (ReLU, LeakyReLU, identity): every product then skips it, and the Hessian's
    per-example diagonal sweep keeps its factored ``P_n`` at the loss's rank (a 64-256-256-10 ReLU MLP's
    ``H.diagonal()`` at batch 256: 0.26 s with a zero weight, which grew ``P_n`` by ``m`` columns a stage)."""
    if b is None or not bool(spp.any()):
        return None
    return b * spp


class DenseLayerBlocks(Blocks):
    """Structured blocks of :class:`DenseStage` (see the module docstring for the formulas)."""

    per_example = True
    reads_diagonal = True

    @property
    def adds_example_curvature(self) -> bool:
        return self.bpp is not None

    def __init__(self, stage: DenseStage, zt: Tensor, W: Tensor, sp: Tensor, b: Tensor | None, spp: Tensor):
        self.stage, self.zt, self.W, self.sp = stage, zt, W, sp
        self.residual = stage.residual
        self.batch, self.d_in = zt.shape[0], stage.m
        self.d_out, self.p = stage.d, stage.d * stage.m1
        dev = zt.device
        r2m, m2r = stage._orders()
        self._r2m, self._m2r = r2m.to(dev), m2r.to(dev)
        # the layout _nat / _model form by transposing copies (the one _orders' index maps describe): the
        # weight row-major, the bias after it or, re-registered (prune.remove), before it
        self._bias_first = stage.bias_first
        # second-order weights: (b s'') and (b s'); None for Gauss-Newton or when s'' == 0
        self.bpp = _second_order_weight(b, spp)
        self.bsp = None if b is None else b * sp
        self._qr: tuple[Tensor, Tensor] | None = None  # thin QR of zt^T, for the low-rank pivot

    # -- parameter order conversions -------------------------------------------------------
    # Products work in the input-major order (j, i) (row j * d + i) of the Riccati blocks: a vector
    # there is a (m1, d * k) matrix, so every product is one plain or batched matmul.
    def _nat(self, v: Tensor) -> Tensor:
        """(p, k) in model order -> (m1, d * k) in the input-major order: the weight's (d, m) block
        transposed, the bias as the last row (a transposing copy: an index gather was 30% of ``H v`` on a
        256-wide MLP)."""
        d, m, first = self.d_out, self.d_in, self._bias_first
        k = v.shape[-1]
        w0 = d if first else 0
        Wt = v[w0 : w0 + d * m].view(d, m, k).transpose(0, 1)  # (m, d, k)
        if self.stage.m1 == m:
            return Wt.reshape(m, d * k)
        b = v[:d] if first else v[d * m :]
        return torch.cat([Wt, b.view(1, d, k)]).view(m + 1, d * k)

    def _model(self, V: Tensor) -> Tensor:
        """(m1, d, k) or (m1, d * k) in the input-major order -> (p, k) in model order."""
        d, m, first = self.d_out, self.d_in, self._bias_first
        V = V.reshape(self.stage.m1, d, -1)
        W = V[:m].transpose(0, 1).reshape(d * m, -1)
        if self.stage.m1 == m:
            return W
        return torch.cat([V[m], W] if first else [W, V[m]])

    def _Z(self, v: Tensor) -> Tensor:
        """``Jt v``: (p, k) model order -> (B, d, k) (``Jx v`` without the ``s'`` factor)."""
        return (self.zt @ self._nat(v)).view(self.batch, self.d_out, -1)

    def _ZT(self, s: Tensor) -> Tensor:
        """``Jt^T s``: (B, d, k) -> (m1, d * k) input-major."""
        return self.zt.T @ s.reshape(self.batch, -1)

    def _bsp_t(self, t: Tensor) -> Tensor:
        """``sum_n bsp[n, i] t[n, j, k]`` as (m, d, k) (a view): one GEMM, where ``bsp.T @ t.transpose(0,
        1)`` broadcasts to a batched product (1.5x the time at width 16)."""
        assert self.bsp is not None
        return (self.bsp.T @ t.reshape(self.batch, -1)).view(self.d_out, self.d_in, -1).transpose(0, 1)

    def _bsp_V(self, Vw: Tensor) -> Tensor:
        """``sum_i bsp[n, i] Vw[j, i, k]`` as (B, m, k): one GEMM (see :meth:`_bsp_t`)."""
        assert self.bsp is not None
        return (self.bsp @ Vw.transpose(0, 1).reshape(self.d_out, -1)).view(self.batch, self.d_in, -1)

    # -- first order --------------------------------------------------------------------------
    def jx(self, v: Tensor) -> Tensor:
        return self.sp[:, :, None] * self._Z(v)

    def jxT(self, s: Tensor) -> Tensor:
        return self._model(self._ZT(self.sp[:, :, None] * s))

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
        """``(Jx^T s)^T`` as (k, p) rows in model order, built as outer products: row ``q`` of the
        weight block is ``sum_n t_{n,q} z_n^T`` (``t = s' s``), of the bias ``sum_n t_{n,q}``. With
        ``rotation`` = ``[(offset, d, m, Q_L, Q_R)]`` naming this stage's weight, the weight rows come out
        as ``Q_L^T G Q_R`` by rotating ``t`` and ``z`` first (see :func:`hessinv.lowrank.gauss_newton_root`);
        None for any other rotation (the caller then rotates the rows). ``own`` (k,), if given, says that
        column ``q`` of ``s`` is nonzero at example ``own[q]`` only: row ``q`` is then the single outer
        product ``t_{own[q],q} z_{own[q]}^T`` (``k d m`` flops instead of ``B k d m``). ``factors``, if a
        list, receives ``(0, t, z, own is not None)`` for the weight: its offset in the stage's columns,
        ``t`` and ``z`` as formed ((B, d, k) and (B, m), rotated if asked), and whether its rows are known to
        be one example's each. ``out`` (k, p), if given, receives the rows (e.g. a column slice of the
        caller's ``U``); with ``skip_from``, a weight of at least that many entries whose rows are known to
        be one example's each is not written (its rows are left to ``factors``)."""
        st = self.stage
        if st.bias_first:  # (the caller's generic rows)
            return None
        d, m = st.d, st.m
        t = self.sp[:, :, None] * s  # (B, d, k)
        z = self.zt[:, :m]
        tw, zw = t, z
        if rotation:
            if len(rotation) != 1 or rotation[0][1:3] != (d, m):
                return None
            QL, QR = rotation[0][3], rotation[0][4]
            tw, zw = in_basis(QL, t, None), in_basis(None, z, QR)
        k = t.shape[-1]
        if factors is not None:
            factors.append((0, tw, zw, own is not None))
        out = t.new_empty(k, self.p) if out is None else out
        W = out[:, : d * m].unflatten(1, (d, m))
        weight = skip_from is None or own is None or d * m < skip_from
        if weight and own is not None:
            q = torch.arange(k, device=t.device)
            W.copy_(tw[own, :, q][:, :, None] * zw[own][:, None, :])
        elif weight:
            W.copy_(torch.einsum("nik,nj->kij", tw, zw))
        if st.bias:
            out[:, d * m :] = t.sum(0).T
        return out

    def per_example_jxT(self, s: Tensor, out: Tensor | None = None) -> Tensor:
        """Row ``n``: the outer product ``t_n z_n^T`` (``t = s' s_n``) on the weight, ``t_n`` on the bias
        (model order: ``weight.flatten()``, then ``bias``; None where the model lists the bias first: the
        caller's generic rows)."""
        st = self.stage
        if st.bias_first:
            return None
        t = self.sp * s  # (B, d)
        out = t.new_empty(self.batch, self.p) if out is None else out
        torch.mul(t[:, :, None], self.zt[:, None, : st.m], out=out[:, : st.d * st.m].view(-1, st.d, st.m))
        if st.bias:
            out[:, st.d * st.m :] = t
        return out

    def jz(self, t: Tensor) -> Tensor:
        out = self.sp[:, :, None] * _lmul(self.W, t)
        return out + t if self.residual else out

    def jzT(self, s: Tensor) -> Tensor:
        out = _lmul(self.W.T, self.sp[:, :, None] * s)
        return out + s if self.residual else out

    # -- second order ------------------------------------------------------------------------
    def hxx(self, v: Tensor) -> Tensor:
        if self.bpp is None:
            return torch.zeros_like(v)
        return self._model(self._ZT(self.bpp[:, :, None] * self._Z(v)))

    def hxz(self, t: Tensor) -> Tensor:
        if self.bsp is None:  # (Gauss-Newton; bpp is None then too)
            return t.new_zeros(self.p, t.shape[-1])
        if self.bpp is None:  # (s'' = 0: the bsp term alone)
            out = t.new_zeros(self.stage.m1, self.d_out, t.shape[-1])
        else:
            out = self._ZT(self.bpp[:, :, None] * _lmul(self.W, t)).view(self.stage.m1, self.d_out, -1)
        # + sum_n bsp[n, i] t[n, j, k] on the weight rows j < m
        out[: self.d_in] += self._bsp_t(t)
        return self._model(out)

    def hxzT(self, v: Tensor) -> Tensor:
        if self.bsp is None:
            return v.new_zeros(self.batch, self.d_in, v.shape[-1])
        V = self._nat(v)
        # sum_i bsp[n, i] V[c, i, k] for c < m
        out = self._bsp_V(V.view(self.stage.m1, self.d_out, -1)[: self.d_in])
        if self.bpp is None:
            return out
        U = (self.zt @ V).view(self.batch, self.d_out, -1)
        return out + _lmul(self.W.T, self.bpp[:, :, None] * U)

    def hzz(self, t: Tensor) -> Tensor:
        if self.bpp is None:
            return torch.zeros_like(t)
        return _lmul(self.W.T, self.bpp[:, :, None] * _lmul(self.W, t))

    # -- fused steps of H v (the protocol's defaults, sharing the products) ------------------
    def hvp_forward(self, t: Tensor | None, v: Tensor | None) -> Tensor | None:
        u = None if v is None else self._Z(v)
        if t is not None:
            wt = _lmul(self.W, t)
            u = wt if u is None else u + wt
        if u is None:
            return None
        out = self.sp[:, :, None] * u
        return out + t if self.residual and t is not None else out

    def hvp_backward(
        self, s: Tensor, v: Tensor | None, t: Tensor | None, need_s: bool = True
    ) -> tuple[Tensor | None, Tensor | None]:
        # G = s' s + (b s'') (Jt v + Wb t):  Jx^T s + Hxx v + Hxz t = Jt^T G (+ bsp term in t),
        #                                    Jz^T s + Hxz^T v + Hzz t = Wb^T G (+ bsp term in v)
        G = self.sp[:, :, None] * s
        vn = None if v is None else self._nat(v)
        if self.bpp is not None:
            U = None if vn is None else (self.zt @ vn).view(self.batch, self.d_out, -1)
            if t is not None:
                wt = _lmul(self.W, t)
                U = wt if U is None else U + wt
            if U is not None:
                G = G + self.bpp[:, :, None] * U
        out = self._ZT(G).view(self.stage.m1, self.d_out, -1)
        if self.bsp is not None and t is not None:
            out[: self.d_in] += self._bsp_t(t)
        s_new = None
        if need_s:
            s_new = _lmul(self.W.T, G)
            if self.bsp is not None and vn is not None:
                s_new = s_new + self._bsp_V(vn.view(self.stage.m1, self.d_out, -1)[: self.d_in])
            if self.residual:
                s_new = s_new + s
        return self._model(out), s_new

    # -- Riccati ---------------------------------------------------------------------------------
    #: The Riccati sweep factors ``Qxx`` through its rank-``B d`` part (Woodbury,
    #: :class:`hessinv.riccati.LowRankPivot`) when ``m1 >= LOWRANK_RATIO * B`` (inputs wider than the batch).
    LOWRANK_RATIO = 1.5

    def riccati(self, Sigma: Tensor, coupled: bool = True) -> RiccatiBlocks:
        rb, inv = self.riccati_native(Sigma, coupled, lowrank=False), self._m2r
        assert rb.Qxx0 is not None
        return RiccatiBlocks(rb.Qxx0[inv][:, inv], rb.Qxz[inv], rb.Qzz)

    def _lowrank(self, batch: int) -> bool:
        m1 = self.stage.m1
        return m1 >= self.LOWRANK_RATIO * batch and m1 >= batch  # the rank-B d form needs B <= m1

    def pivot_order(self, batch: int) -> int:
        return batch * self.d_out if self._lowrank(batch) else self.p

    def riccati_native(
        self, Sigma: Tensor, coupled: bool = True, lowrank: bool | None = None
    ) -> RiccatiBlocks:
        """The Riccati blocks in the input-major order ``(j, i)`` (see the module docstring).

        With ``lowrank`` (default: when ``m1 >= LOWRANK_RATIO * B``), ``Qxx0`` is returned factored:
        ``Z^T = Qz Rz`` (thin QR), ``Qxx0 = (Qz (x) I) A (Qz (x) I)^T`` with
        ``A = (Rz (x) I) M (Rz (x) I)^T`` of size ``B d`` (:attr:`RiccatiBlocks.lowrank`).
        """
        B, d, m, m1, p = self.batch, self.d_out, self.d_in, self.stage.m1, self.p
        lowrank = self._lowrank(B) if lowrank is None else lowrank and m1 >= B
        zt, W, a = self.zt, self.W, self.batch * self.d_out
        M = self._pre_activation(Sigma)
        ztT = zt.T
        low = None
        if lowrank:
            if self._qr is None:
                self._qr = torch.linalg.qr(ztT)  # Qz (m1, B), Rz (B, B)
            Qz, Rz = self._qr
            T = (Rz @ M.view(B, d * a)).view(a, B, d)  # [(b,i), n', i'] = sum_n Rz[b,n] M[n,i,n',i']
            # Qxz = Jt^T M Wb + E, (I - U U^T) Jt^T = 0, so (I - U U^T) Qxz = (Pi (x) I) E with
            # Pi = I - Qz Qz^T, and C = Qxz^T (I - U U^T) Qxz = [(n,c),(n',c')] (bsp bsp^T)[n,n'] Pi[c,c']
            C, e = None, 0
            if coupled and self.bsp is not None:
                Pi = (torch.eye(m1, dtype=zt.dtype, device=zt.device) - Qz @ Qz.T)[:m, :m]
                # bsp scaled by 2^-e to entries below 1 first (exact): bsp bsp^T is a product of two
                # Hessian-scale numbers, subnormal or 0 at a loss scaled by 1e-155 (the inertia was off)
                top = float(self.bsp.abs().max())
                e = math.frexp(top)[1] if 0.0 < top < math.inf else 0
                bs = torch.ldexp(self.bsp, torch.tensor(-e, device=zt.device)) if e else self.bsp
                C = ((bs @ bs.T)[:, None, :, None] * Pi[None, :, None, :]).reshape(B * m, B * m)
            low = (Qz, torch.matmul(Rz, T).view(a, a), C, 2 * e)
            Qxx = None
        else:
            # Qxx0[(l,q),(j,i)] = sum_{n',n} zt[n',l] M[n',q,n,i] zt[n,j]
            # as one product on Y's transpose [n, (l,q), i] (a broadcast batched product would copy
            # zt^T p times and run p tiny products), then [j, (l,q), i] -> [(l,q), (j,i)]
            Y = (ztT @ M.view(B, d * a)).view(p, B, d)
            Qxx = (ztT @ Y.transpose(0, 1).reshape(B, p * d)).view(m1, p, d).transpose(0, 1).reshape(p, p)
        if not coupled:  # the first stage: its input is data, no Qxz or Qzz
            return RiccatiBlocks(Qxx, zt.new_empty(p, B, 0), None, self._r2m, self._m2r, low)
        # Qxz[(j,i),(n',c)] = sum_n zt[n,j] R[n,i,n',c]
        R, P = self._through_weight(M, Sigma)
        if Qxx is not None and not self.residual:
            # Qxz = (Z^T M) Wb from Y = Z^T M above: 2 m1 d B d m flops instead of 2 m1 B a m
            Qxz = (Y.view(p * B, d) @ W).view(m1, d, B, m)
        else:
            Qxz = (ztT @ R.view(B, -1)).view(m1, d, B, m)
        if self.bsp is not None:  # + (b s')_{n,i} delta_{jc}, j < m
            Qxz[:m].diagonal(dim1=0, dim2=3).add_(self.bsp.T[:, :, None])
        return RiccatiBlocks(Qxx, Qxz.view(p, B, m), self._qzz(R, P, Sigma), self._r2m, self._m2r, low)

    def _pre_activation(self, Sigma: Tensor) -> Tensor:
        """``M = diag(s') Sigma diag(s') + diag(b s'')`` (B, d, B, d): ``Sigma`` at the pre-activation."""
        B, d, sp = self.batch, self.d_out, self.sp
        M = (Sigma.reshape(B, d, B, d) * sp[:, :, None, None]).contiguous()
        M.mul_(sp)
        if self.bpp is not None:
            M.view(B * d, B * d).diagonal().add_(self.bpp.reshape(-1))
        return M

    def _through_weight(self, M: Tensor, Sigma: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(R, P)``: ``R = M Wb`` (B, d, B m), plus ``P = diag(s') Sigma`` (B, d, B, d) for a residual
        block (``R = M Wb + P``; ``P`` None otherwise)."""
        B, d, m = self.batch, self.d_out, self.d_in
        R = (M.view(B * d * B, d) @ self.W).view(B, d, B * m)
        P = None
        if self.residual:  # (m == d)
            # (P takes Sigma's strides: a transposed Sigma -- a frozen 1-wide head after the block passes
            # one -- made P a permuted tensor, and a view of it a RuntimeError; a fuzzer's find)
            P = (self.sp[:, :, None, None] * Sigma.reshape(B, d, B, d)).contiguous()
            R = R + P.view(B, d, B * m)
        return R, P

    def _qzz(self, R: Tensor, P: Tensor | None, Sigma: Tensor) -> Tensor:
        """``Qzz = Wb^T R`` (B, m, B, m), plus ``(Wb^T P)^T + Sigma`` for a residual block."""
        B, d, m = self.batch, self.d_out, self.d_in
        Qzz = torch.matmul(self.W.T, R).view(B, m, B, m)
        if P is not None:
            K = torch.matmul(self.W.T, P.view(B, d, B * d)).view(B, m, B, m)
            Qzz = Qzz + K.permute(2, 3, 0, 1) + Sigma.reshape(B, m, B, m)
        return Qzz

    def curvature_diagonal(self, Sigma: Tensor, coupled: bool = True) -> tuple[Tensor, Tensor | None]:
        """:meth:`Blocks.curvature_diagonal` without the ``p x p`` block:
        ``diag(Qxx0)[(j, i)] = sum_{n, n'} zt[n, j] zt[n', j] M[n, i, n', i]`` in ``O(B^2 m d)``."""
        B, d = self.batch, self.d_out
        M = self._pre_activation(Sigma)
        Md = M.diagonal(dim1=1, dim2=3)  # (B, B, d): [n, n', i]
        X = (self.zt.T @ Md.reshape(B, B * d)).view(-1, B, d)  # [j, n', i]
        diag = self._model((X * self.zt.T[:, :, None]).sum(1))[:, 0]
        if not coupled:
            return diag, None
        R, P = self._through_weight(M, Sigma)
        return diag, self._qzz(R, P, Sigma)

    def example_curvature_diagonal(
        self,
        P: ExampleCurvature,
        coupled: bool = True,
        only_diagonal: bool = False,
        rows: slice = slice(None),
    ) -> tuple[Tensor, ExampleCurvature | None]:
        """:meth:`Blocks.example_curvature_diagonal`: with ``M_n = diag(s'_n) P_n diag(s'_n) +
        diag((b s'')_n)``, ``diag(Qxx0)[(i, j)] = sum_n M_n[i, i] zt_n[j]^2`` and ``P_{l-1,n} = W^T M_n W``
        (a residual block: ``+ P_n diag(s'_n) W + (P_n diag(s'_n) W)^T + P_n``, from ``Jz = I + diag(s')
        W``). ``P = F diag(S) F^T`` in factored form gives ``F_in = W^T diag(s') F`` (``+ F``: residual)
        and, for ``b s'' != 0``, the columns of ``W^T`` with weights ``b s''``: ``O(B m d R)`` for ``R``
        columns (BackPACK's form; Gauss-Newton: ``R`` = the loss's rank), full once ``R`` exceeds ``m``."""
        sp, bpp, zt = self.sp[rows], None if self.bpp is None else self.bpp[rows], self.zt[rows]
        Md = sp.square() * example_diagonal(P)  # diag(M_n) (P given only by its diagonal: the last stage)
        Md = Md + bpp if bpp is not None else Md
        W = zt.square().T @ Md
        if zt.dtype != torch.float64 and not bool(torch.isfinite(W).all()):  # (inputs ~1e20: x^2 overflows
            W = (zt.double().square().T @ Md.double()).to(Md.dtype)  # float32 where the diagonal does not)
        diag = self._model(W)[:, 0]
        if not coupled:
            return diag, None
        if isinstance(P, tuple):
            F, S = P
            Fin = _lmul(self.W.T, sp[:, :, None] * F)
            if self.residual:
                Fin = Fin + F
            if bpp is not None:
                Fin = torch.cat([Fin, self.W.T.expand(sp.shape[0], -1, -1)], dim=-1)
                S = torch.cat([S, bpp], dim=-1)
            if only_diagonal:
                return diag, example_diagonal((Fin, S))
            if Fin.shape[-1] <= Fin.shape[1]:
                return diag, (Fin, S)
            return diag, (Fin * S[:, None, :]) @ Fin.mT
        M = sp[:, :, None] * P * sp[:, None, :]  # (B, d, d)
        if bpp is not None:
            M.diagonal(dim1=1, dim2=2).add_(bpp)
        MW = torch.matmul(M, self.W)  # (B, d, m)
        X = P @ (sp[:, :, None] * self.W) if self.residual else None
        if only_diagonal:
            Pd = (MW * self.W).sum(1)
            if X is not None:
                Pd = Pd + 2 * X.diagonal(dim1=1, dim2=2) + P.diagonal(dim1=1, dim2=2)
            return diag, Pd
        Pin = torch.matmul(self.W.T, MW)
        if X is not None:
            Pin = Pin + X + X.mT + P
        return diag, Pin


class ElementwiseStage(Stage):
    """A standalone elementwise activation ``z_out = s(z_in)`` (no parameters): ``Jz = diag(s')``,
    ``Hzz = diag(b s'')``, so ``Qzz = diag(s') Sigma diag(s') + diag(b s'')``."""

    def __init__(self, index: int, act: nn.Module):
        self.index, self.modules, self.act, self.params = index, (act,), out_of_place(act), []

    def forward(self, z: Tensor) -> Tensor:
        return self.act(z)

    def linearize(self, z_in: Tensor, b_out: Tensor, second_order: bool) -> Blocks:
        u = z_in.detach().reshape(z_in.shape[0], -1)
        _, sp, spp = activation_derivatives(self.act, u)
        return ElementwiseBlocks(
            sp, _second_order_weight(b_out.reshape(sp.shape) if second_order else None, spp)
        )


class ElementwiseBlocks(ParameterFreeBlocks):
    """Blocks of :class:`ElementwiseStage`: diagonal per example."""

    per_example = True
    reads_diagonal = True

    @property
    def adds_example_curvature(self) -> bool:
        return self.bpp is not None

    def __init__(self, sp: Tensor, bpp: Tensor | None):
        self.sp, self.bpp = sp, bpp
        self.batch, self.d_in = sp.shape
        self.d_out, self.p = self.d_in, 0

    def jz(self, t: Tensor) -> Tensor:
        return self.sp[:, :, None] * t

    jzT = jz

    def hzz(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t) if self.bpp is None else self.bpp[:, :, None] * t

    def example_curvature_diagonal(
        self,
        P: ExampleCurvature,
        coupled: bool = True,
        only_diagonal: bool = False,
        rows: slice = slice(None),
    ) -> tuple[Tensor, ExampleCurvature | None]:
        """:meth:`Blocks.example_curvature_diagonal`: ``P_{l-1,n} = diag(s'_n) P_n diag(s'_n) +
        diag((b s'')_n)`` (factored: ``F_in = diag(s') F`` while ``b s'' = 0``)."""
        none = self.sp.new_zeros(0)
        if not coupled:
            return none, None
        sp, bpp = self.sp[rows], None if self.bpp is None else self.bpp[rows]
        if only_diagonal or (not isinstance(P, tuple) and P.dim() == 2):
            Pd = sp.square() * example_diagonal(P)
            return none, Pd + bpp if bpp is not None else Pd
        if isinstance(P, tuple):
            F = sp[:, :, None] * P[0]
            if bpp is None:
                return none, (F, P[1])
            P = (F * P[1][:, None, :]) @ F.mT
        else:
            P = sp[:, :, None] * P * sp[:, None, :]
        return none, P + torch.diag_embed(bpp) if bpp is not None else P

    def riccati(self, Sigma: Tensor, coupled: bool = True) -> RiccatiBlocks:
        B, d = self.batch, self.d_in
        Qzz = None
        if coupled:
            # (contiguous: with one feature per example the product's strides need not allow the view)
            Qzz = (Sigma.reshape(B, d, B, d) * self.sp[:, :, None, None] * self.sp).contiguous()
            if self.bpp is not None:
                Qzz.view(B * d, B * d).diagonal().add_(self.bpp.reshape(-1))
        return RiccatiBlocks(Sigma.new_zeros(0, 0), Sigma.new_zeros(0, B, d), Qzz)
