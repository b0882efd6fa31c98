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

Riccati products use ``Sigma' = diag(s') Sigma diag(s')`` (``Sigma`` seen at the pre-activation):
``Jx^T Sigma Jx = sum_{n,m} zt_n Sigma'[n,i,m,i'] zt_m^T`` and ``Jx^T Sigma Jz``, ``Jz^T Sigma Jz`` with
``W`` -- batched contractions costing ``O(a^2 w + a p)`` instead of ``O(a^2 p + a p^2)``.
Parameters are handled internally in the augmented order ``P[i, j] = [W | c]`` and permuted to
``model.parameters()`` order (weight row-major, then bias) at the boundary.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import grad

from hessinv.stages.protocol import Blocks, RiccatiBlocks, Stage, add_blockdiag

#: Modules treated as elementwise activations ``s`` (fused into a preceding Linear).
#: ReLU-type activations have ``s'' = 0`` almost everywhere, so their curvature terms vanish.
ELEMENTWISE = (
    nn.Tanh, nn.Sigmoid, nn.Softplus, nn.GELU, nn.SiLU, nn.ELU, nn.ReLU, nn.LeakyReLU, nn.CELU,
    nn.SELU, nn.Mish, nn.Softsign, nn.Tanhshrink, nn.Hardtanh, nn.ReLU6, nn.LogSigmoid,
)  # fmt: skip


def activation_derivatives(act: nn.Module | None, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(s(u), s'(u), s''(u))`` of an elementwise activation (identity when ``act`` is None)."""
    if act is None:
        return u, torch.ones_like(u), torch.zeros_like(u)

    def total(v: Tensor) -> Tensor:
        return act(v).sum()

    def d1(v: Tensor) -> Tensor:
        return grad(total)(v).sum()

    return act(u), grad(total)(u), grad(d1)(u)


class DenseStage(Stage):
    """``z_out = s(W z_in + c)`` with optional bias and optional elementwise activation ``s``."""

    def __init__(self, index: int, linear: nn.Linear, act: nn.Module | None = None):
        self.index, self.linear, self.act = index, linear, act
        self.modules = (linear,) if act is None else (linear, act)
        self.params = [t for t in (linear.weight, linear.bias) if t is not None]
        d, m = linear.out_features, linear.in_features
        self.bias = linear.bias is not None
        m1 = m + int(self.bias)
        # model index of augmented position (i, j): weight row-major, then bias.
        idx = torch.arange(d * m).view(d, m)
        if self.bias:
            idx = torch.cat([idx, d * m + torch.arange(d).view(d, 1)], dim=1)
        self.aug_to_model = idx.reshape(-1)
        self.model_to_aug = torch.argsort(self.aug_to_model)
        self.d, self.m, self.m1 = d, m, m1

    def forward(self, z: Tensor) -> Tensor:
        u = self.linear(z)
        return u if self.act is None else self.act(u)

    def linearize(self, z_in: Tensor, b_out: Tensor, second_order: bool) -> Blocks:
        z = z_in.detach()
        u = self.linear(z).detach()
        _, sp, spp = activation_derivatives(self.act, u)
        zt = torch.cat([z, torch.ones_like(z[:, :1])], dim=1) if self.bias else z
        return DenseLayerBlocks(self, zt, self.linear.weight.detach(), sp, b_out if second_order else None, spp)


class DenseLayerBlocks(Blocks):
    """Structured blocks of :class:`DenseStage` (see the module docstring for the formulas)."""

    def __init__(self, stage: DenseStage, zt: Tensor, W: Tensor, sp: Tensor, b: Tensor | None, spp: Tensor):
        self.stage, self.zt, self.W, self.sp = stage, zt, W, sp
        self.batch, self.d_in = zt.shape[0], stage.m
        self.d_out, self.p = stage.d, stage.d * stage.m1
        dev = zt.device
        self._a2m, self._m2a = stage.aug_to_model.to(dev), stage.model_to_aug.to(dev)
        # second-order weights: (b s'') and (b s'); None for Gauss-Newton or when s'' == 0
        self.bpp = None if b is None else b * spp
        self.bsp = None if b is None else b * sp

    # -- parameter order conversions -------------------------------------------------------
    def _aug(self, v: Tensor) -> Tensor:
        """(p, k) in model order -> (d, m1, k) augmented."""
        return v[self._a2m].view(self.d_out, self.stage.m1, -1)

    def _model(self, V: Tensor) -> Tensor:
        """(d, m1, k) augmented -> (p, k) in model order."""
        return V.reshape(self.p, -1)[self._m2a]

    def _pad_bias(self, V: Tensor) -> Tensor:
        """(d, m, k) weight-only part -> (d, m1, k) with zero bias column."""
        if not self.stage.bias:
            return V
        return torch.cat([V, V.new_zeros(V.shape[0], 1, V.shape[2])], dim=1)

    # -- first order --------------------------------------------------------------------------
    def jx(self, v: Tensor) -> Tensor:
        return self.sp[:, :, None] * torch.einsum("nj,ijk->nik", self.zt, self._aug(v))

    def jxT(self, s: Tensor) -> Tensor:
        return self._model(torch.einsum("nj,nik->ijk", self.zt, self.sp[:, :, None] * s))

    def jz(self, t: Tensor) -> Tensor:
        return self.sp[:, :, None] * torch.einsum("ic,nck->nik", self.W, t)

    def jzT(self, s: Tensor) -> Tensor:
        return torch.einsum("ic,nik->nck", self.W, self.sp[:, :, None] * s)

    # -- second order ------------------------------------------------------------------------
    def hxx(self, v: Tensor) -> Tensor:
        if self.bpp is None:
            return torch.zeros_like(v)
        U = torch.einsum("nj,ijk->nik", self.zt, self._aug(v))
        return self._model(torch.einsum("nj,nik->ijk", self.zt, self.bpp[:, :, None] * U))

    def hxz(self, t: Tensor) -> Tensor:
        if self.bpp is None:
            return t.new_zeros(self.p, t.shape[-1])
        A = torch.einsum("ic,nck->nik", self.W, t)
        out = torch.einsum("nj,nik->ijk", self.zt, self.bpp[:, :, None] * A)
        out = out + self._pad_bias(torch.einsum("ni,njk->ijk", self.bsp, t))
        return self._model(out)

    def hxzT(self, v: Tensor) -> Tensor:
        if self.bpp is None:
            return v.new_zeros(self.batch, self.d_in, v.shape[-1])
        V = self._aug(v)
        U = torch.einsum("nj,ijk->nik", self.zt, V)
        out = torch.einsum("ic,nik->nck", self.W, self.bpp[:, :, None] * U)
        return out + torch.einsum("ni,ick->nck", self.bsp, V[:, : self.d_in])

    def hzz(self, t: Tensor) -> Tensor:
        if self.bpp is None:
            return torch.zeros_like(t)
        A = torch.einsum("ic,nck->nik", self.W, t)
        return torch.einsum("ic,nik->nck", self.W, self.bpp[:, :, None] * A)

    # -- Riccati ---------------------------------------------------------------------------------
    def riccati(self, Sigma: Tensor, need_qzz: bool = True) -> RiccatiBlocks:
        B, d, m, m1, p = self.batch, self.d_out, self.d_in, self.stage.m1, self.p
        zt, W, sp = self.zt, self.W, self.sp
        Sp = sp[:, :, None, None] * Sigma * sp[None, None, :, :]  # Sigma at the pre-activation
        # Jx^T Sigma Jx [(i,j),(i',j')] = sum_{n,m} zt[n,j] Sp[n,i,m,i'] zt[m,j']
        X = torch.einsum("nimq,ml->niql", Sp, zt)  # (B, d, d, m1)
        Qxx = torch.einsum("nj,niql->ijql", zt, X)  # (d, m1, d, m1)
        R = torch.einsum("nimq,qc->nimc", Sp, W)  # Sigma' W: (B, d, B, m)
        Qxz = torch.einsum("nj,nimc->ijmc", zt, R)  # (d, m1, B, m)
        Qzz = torch.einsum("ia,nimc->namc", W, R) if need_qzz else None
        if self.bpp is not None:
            # Hxx: block-diagonal over output units i
            hxx = torch.einsum("ni,nj,nl->ijl", self.bpp, zt, zt)  # (d, m1, m1)
            ii = torch.arange(d, device=zt.device)
            Qxx[ii, :, ii, :] += hxx
            # Hxz[(i,j),(n,c)] = bpp[n,i] zt[n,j] W[i,c] + bsp[n,i] delta_{jc}
            Qxz = Qxz + torch.einsum("ni,nj,ic->ijnc", self.bpp, zt, W)
            eye = torch.eye(m, m1, dtype=zt.dtype, device=zt.device)  # delta_{jc}, zero bias row
            Qxz = Qxz + torch.einsum("ni,cj->ijnc", self.bsp, eye)
            if Qzz is not None:
                Qzz = add_blockdiag(Qzz, torch.einsum("ia,ni,ic->nac", W, self.bpp, W))
        # permute to model order
        to_model = self._m2a
        Qxx = Qxx.reshape(p, p)[to_model][:, to_model]
        Qxz = Qxz.reshape(p, B, m)[to_model]
        return RiccatiBlocks(Qxx, Qxz, Qzz)
