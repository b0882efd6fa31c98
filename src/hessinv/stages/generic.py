"""Any per-example ``nn.Module`` as a stage, through ``torch.func`` (vmap over examples).

For one example ``n`` the stage is ``f(x, z_n)``. We form, per example and vectorized with
``torch.func.vmap``, the dense blocks

* ``Jx_n = df/dx`` (d_out, p), ``Jz_n = df/dz`` (d_out, d_in)       -- ``jacrev``
* the Hessian of ``phi_n(x, z_n) = <b_n, f(x, z_n)>`` in ``(x, z_n)``  -- ``hessian``

and keep them per example: ``Hxx = sum_n Hxx_n`` (p, p), ``Hxz`` (B, p, d_in), ``Hzz`` (B, d_in, d_in).
Memory ``O(B (p + d)^2)``; use the structured stages of :mod:`hessinv.stages.dense` for Linear layers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev, vmap

from hessinv.errors import UnsupportedStageError
from hessinv.stages.protocol import Blocks, RiccatiBlocks, Stage, add_blockdiag, sandwich_blockdiag


class DenseBlocks(Blocks):
    """Blocks stored densely per example (math.md §1 table). ``H..`` may be None (= zero)."""

    def __init__(self, Jx: Tensor, Jz: Tensor, Hxx: Tensor | None, Hxz: Tensor | None, Hzz: Tensor | None):
        self.Jx, self.Jz, self.Hxx, self.Hxz, self.Hzz = Jx, Jz, Hxx, Hxz, Hzz
        self.batch, self.d_out, self.d_in = Jz.shape
        self.p = Jx.shape[2]

    def jx(self, v: Tensor) -> Tensor:
        return torch.einsum("nop,pk->nok", self.Jx, v)

    def jxT(self, s: Tensor) -> Tensor:
        return torch.einsum("nop,nok->pk", self.Jx, s)

    def jz(self, t: Tensor) -> Tensor:
        return torch.bmm(self.Jz, t)

    def jzT(self, s: Tensor) -> Tensor:
        return torch.bmm(self.Jz.transpose(1, 2), s)

    def hxx(self, v: Tensor) -> Tensor:
        return torch.zeros_like(v) if self.Hxx is None else self.Hxx @ v

    def hxz(self, t: Tensor) -> Tensor:
        if self.Hxz is None:
            return t.new_zeros(self.p, t.shape[-1])
        return torch.einsum("npi,nik->pk", self.Hxz, t)

    def hxzT(self, v: Tensor) -> Tensor:
        if self.Hxz is None:
            return v.new_zeros(self.batch, self.d_in, v.shape[-1])
        return torch.einsum("npi,pk->nik", self.Hxz, v)

    def hzz(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t) if self.Hzz is None else torch.bmm(self.Hzz, t)

    def riccati(self, Sigma: Tensor, coupled: bool = True) -> RiccatiBlocks:
        B, o = self.batch, self.d_out
        JxF = self.Jx.reshape(B * o, self.p)
        SJx = Sigma.reshape(B * o, B * o) @ JxF  # (a_out, p)
        Qxx0 = JxF.T @ SJx
        if self.Hxx is not None:
            Qxx0 = Qxx0 + self.Hxx
        if not coupled:
            return RiccatiBlocks(Qxx0, Qxx0.new_empty(self.p, B, 0), None)
        Qxz = torch.einsum("nop,noi->pni", SJx.reshape(B, o, self.p), self.Jz)
        if self.Hxz is not None:
            Qxz = Qxz + self.Hxz.transpose(0, 1)
        Qzz = None
        if coupled:
            Qzz = sandwich_blockdiag(self.Jz, Sigma)
            if self.Hzz is not None:
                Qzz = add_blockdiag(Qzz, self.Hzz)
        return RiccatiBlocks(Qxx0, Qxz, Qzz)


class GenericStage(Stage):
    """Any module applied to each example separately; derivatives by ``torch.func``.

    The module sees a batch of one example (``z_n.unsqueeze(0)``), so ordinary batched modules
    (residual blocks, normalizations in eval mode, custom layers) work unchanged. A module whose
    batched output differs from its per-example output mixes examples and is rejected.
    """

    def __init__(self, index: int, module: nn.Module):
        self.index, self.modules, self.module = index, (module,), module
        named = list(module.named_parameters())
        self.names = [n for n, t in named if t.requires_grad]
        self.params = [t for _, t in named if t.requires_grad]
        self.frozen = {n: t.detach() for n, t in named if not t.requires_grad}
        self.buffers = dict(module.named_buffers())
        self._checked = False

    def _unflatten(self, x: Tensor) -> dict[str, Tensor]:
        out, i = dict(self.frozen), 0
        for name, t in zip(self.names, self.params, strict=True):
            out[name] = x[i : i + t.numel()].view_as(t)
            i += t.numel()
        out.update(self.buffers)
        return out

    def flat_params(self) -> Tensor:
        if not self.params:
            return torch.empty(0)
        return torch.cat([t.detach().reshape(-1) for t in self.params])

    def example_fn(self, x: Tensor, z: Tensor) -> Tensor:
        """``f(x, z_n)`` for one example ``z_n``, flattened to (d_out,)."""
        return functional_call(self.module, self._unflatten(x), (z.unsqueeze(0),)).reshape(-1)

    def forward(self, z: Tensor) -> Tensor:
        out = self.module(z)
        if not self._checked:
            per_example = vmap(self.example_fn, in_dims=(None, 0))(self._x(z), z.detach())
            if per_example.shape != out.reshape(out.shape[0], -1).shape or not torch.allclose(
                per_example, out.detach().reshape(out.shape[0], -1), rtol=1e-4, atol=1e-5
            ):
                raise UnsupportedStageError(
                    f"{self.name} mixes examples: its batched output differs from its per-example output"
                )
            self._checked = True
        return out

    def _x(self, like: Tensor) -> Tensor:
        x = self.flat_params()
        return x.to(dtype=like.dtype, device=like.device) if x.numel() == 0 else x

    def linearize(self, z_in: Tensor, b_out: Tensor, second_order: bool) -> Blocks:
        B = z_in.shape[0]
        z = z_in.detach()
        x = self._x(z)
        Jx, Jz = vmap(jacrev(self.example_fn, argnums=(0, 1)), in_dims=(None, 0))(x, z)
        Jz = Jz.reshape(B, Jz.shape[1], -1)
        Hxx = Hxz = Hzz = None
        if second_order:

            def phi(x_: Tensor, z_: Tensor, b_: Tensor) -> Tensor:
                return (self.example_fn(x_, z_) * b_).sum()

            (hxx, hxz), (_, hzz) = vmap(hessian(phi, argnums=(0, 1)), in_dims=(None, 0, 0))(x, z, b_out)
            d_in = Jz.shape[2]
            Hxx, Hxz, Hzz = hxx.sum(0), hxz.reshape(B, self.p, d_in), hzz.reshape(B, d_in, d_in)
        return DenseBlocks(Jx, Jz, Hxx, Hxz, Hzz)


class ReshapeStage(Stage):
    """``Identity`` and ``Flatten``: a no-op on per-example flattened activations (``Jz = I``)."""

    def __init__(self, index: int, module: nn.Module):
        self.index, self.modules, self.module, self.params = index, (module,), module, []

    def forward(self, z: Tensor) -> Tensor:
        return self.module(z)

    def linearize(self, z_in: Tensor, b_out: Tensor, second_order: bool) -> Blocks:
        return IdentityBlocks(z_in.shape[0], b_out.shape[1])


class IdentityBlocks(Blocks):
    """Blocks of ``z_out = z_in``: ``Jz = I``, no parameters, no curvature."""

    def __init__(self, batch: int, d: int):
        self.batch, self.d_in, self.d_out, self.p = batch, d, d, 0

    def jx(self, v: Tensor) -> Tensor:
        return v.new_zeros(self.batch, self.d_out, v.shape[-1])

    def jxT(self, s: Tensor) -> Tensor:
        return s.new_zeros(0, s.shape[-1])

    def jz(self, t: Tensor) -> Tensor:
        return t

    jzT = jz

    def hxx(self, v: Tensor) -> Tensor:
        return v

    def hxz(self, t: Tensor) -> Tensor:
        return t.new_zeros(0, t.shape[-1])

    def hxzT(self, v: Tensor) -> Tensor:
        return v.new_zeros(self.batch, self.d_in, v.shape[-1])

    def hzz(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def riccati(self, Sigma: Tensor, coupled: bool = True) -> RiccatiBlocks:
        empty = Sigma.new_zeros(0, 0)
        return RiccatiBlocks(empty, Sigma.new_zeros(0, self.batch, self.d_in), Sigma if coupled else None)
