"""Any per-example stage as dense per-example blocks, by plain ``torch.autograd`` double backward.

For one example ``n`` the stage is ``f(x, z_n)``. We form the dense blocks

* ``Jx_n = df/dx`` (d_out, p), ``Jz_n = df/dz`` (d_out, d_in),
* the Hessian of ``phi = sum_n <b_n, f(x, z_n)>`` in ``(x, z_n)``,

and keep them per example: ``Hxx = sum_n Hxx_n`` (p, p), ``Hxz`` (B, p, d_in), ``Hzz`` (B, d_in, d_in).
Memory ``O(B (p + d)^2)``; use the structured stages of :mod:`hessinv.stages.dense` for Linear layers.

How (:meth:`GenericStage.linearize`): one forward pass of the module on the batch with the real
leaf parameters ``x`` (hooks, parametrizations and all), ``phi(u) = <u, f(x, z)>`` with a free
``u`` (B, d_out), and its first derivatives ``gx = Jx^T u``, ``gz = Jz^T u`` with ``create_graph``.
Then ``p + d_in`` backward passes of that graph (double backward):

* ``d gx[j] / d(u, z, x)`` = column ``j`` of ``Jx`` for every example, row ``j`` of ``Hxz`` for every
  example, row ``j`` of ``Hxx``;
* ``d (sum_n gz[n, i]) / d(u, z)`` = column ``i`` of ``Jz_n`` and row ``i`` of ``Hzz_n`` for every
  ``n`` (exact because the stage acts on each example separately).

Cost: ``p + d_in + 1`` double-backward passes of the stage per linearization, i.e. ``O((p + d_in)``
``x cost of one backward)``. We do not use ``torch.func`` (``vmap``/``hessian``): in torch 2.13 its
mixed weight x input second derivative of an affine ``layer_norm`` is wrong, while plain autograd
is exact. One more pass checks the blocks on a random probe ``(v, t)`` against the autograd product
of the whole batch (``Jx v + Jz t`` and the Hessian product); a mismatch means the stage mixes
examples and raises :class:`UnsupportedStageError`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

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


def _grads(out: Tensor, inputs: list[Tensor], create_graph: bool = False) -> list[Tensor]:
    """``d out / d inputs`` by plain autograd; zeros for inputs ``out`` does not depend on."""
    if not out.requires_grad:
        return [torch.zeros_like(t) for t in inputs]
    return list(
        torch.autograd.grad(
            out,
            inputs,
            retain_graph=True,
            create_graph=create_graph,
            allow_unused=True,
            materialize_grads=True,
        )
    )


def _buffers_equal(a: list[Tensor], b: list[Tensor]) -> bool:
    return all(
        x.shape == y.shape and torch.equal(torch.nan_to_num(x), torch.nan_to_num(y))
        for x, y in zip(a, b, strict=True)
    )


class GenericStage(Stage):
    """Any module applied to each example separately; blocks by plain autograd double backward.

    The module is called on the whole batch with its real parameters (so forward hooks,
    parametrizations and ``weight_norm``'s pre-hooks are part of the function); derivatives are taken
    with respect to ``params`` (by default its trainable parameters; frozen ones are constants). A
    module that mixes examples, is random, or changes its buffers on every call is rejected.

    Args:
        index: position in the chain.
        module: the stage ``z -> f(z)`` (a module, or a traced piece of one).
        params: the trainable parameters it uses, in ``model.parameters()`` order.
        label: what error messages call it (default: the module's type).
    """

    #: Refuse a stage whose dense blocks (Jx, Jz, Hxx, Hxz, Hzz) would hold more numbers than this.
    MAX_BLOCK_ENTRIES = 2**28

    def __init__(
        self,
        index: int,
        module: nn.Module,
        params: list[nn.Parameter] | None = None,
        label: str | None = None,
    ):
        self.index, self.modules, self.module = index, (module,), module
        if params is None:
            params = [t for t in module.parameters() if t.requires_grad]
        self.params = list(params)
        self.label = label
        self._checked = False

    @property
    def name(self) -> str:
        if self.label is None:
            return super().name
        return f"stage {self.index} ({self.label})"

    def _call(self, z: Tensor) -> Tensor:
        # a copy: in-place modules (ReLU(inplace=True), x.mul_()) must not overwrite the caller's z
        return self.module(z.clone())

    def forward(self, z: Tensor) -> Tensor:
        if self._checked:
            return self._call(z)
        buffers = [b.detach().clone() for b in self.module.buffers()]
        out = self._call(z)
        again = self._call(z)
        after = [b.detach() for b in self.module.buffers()]
        changed = not _buffers_equal(buffers, after)
        if changed:
            with torch.no_grad():
                for b, saved in zip(self.module.buffers(), buffers, strict=True):
                    b.copy_(saved)
        same = out.shape == again.shape and torch.equal(torch.nan_to_num(out), torch.nan_to_num(again))
        if changed or not same:
            what = "updates its buffers" if changed else "returns different outputs"
            raise UnsupportedStageError(
                f"{self.name} {what} on every call: it is random or stateful (Dropout, RReLU, BatchNorm "
                "with batch statistics, spectral_norm's power iteration in training mode); call model.eval()"
            )
        self._checked = True
        return out

    def linearize(self, z_in: Tensor, b_out: Tensor, second_order: bool) -> Blocks:
        try:
            return self._linearize(z_in, b_out, second_order)
        except RuntimeError as e:  # e.g. "derivative for aten::... is not implemented"
            raise UnsupportedStageError(f"{self.name}: autograd cannot differentiate it twice: {e}") from e

    def _linearize(self, z_in: Tensor, b_out: Tensor, second_order: bool) -> Blocks:
        B = z_in.shape[0]
        params = self.params
        z = z_in.detach().clone().requires_grad_(True)
        u = b_out.detach().reshape(B, -1).clone().requires_grad_(True)
        zf = z.reshape(B, -1)
        d_in, d_out, p = zf.shape[1], u.shape[1], self.p
        size = B * d_out * (p + d_in) + p * p + B * d_in * (p + d_in)
        if size > self.MAX_BLOCK_ENTRIES:
            raise UnsupportedStageError(
                f"{self.name}: its dense per-example blocks would hold {size:.3g} numbers (p={p}, "
                f"d_in={d_in}, d_out={d_out}, B={B}); split it into a chain of smaller stages"
            )
        with torch.enable_grad():
            out = self._call(z).reshape(B, -1)
            if out.shape != u.shape:
                raise UnsupportedStageError(f"{self.name}: output of shape {tuple(out.shape)} per batch")
            first = _grads((out * u).sum(), [*params, z], create_graph=True)
            gx = torch.cat([g.reshape(-1) for g in first[:-1]]) if params else z.new_zeros(0)
            gz = first[-1].reshape(B, d_in)
            wrt = [u, z, *params] if second_order else [u]
            Jx = z.new_zeros(B, d_out, p)
            Hxx = z.new_zeros(p, p) if second_order else None
            Hxz = z.new_zeros(B, p, d_in) if second_order else None
            for j in range(p):
                d = _grads(gx[j], wrt)
                Jx[:, :, j] = d[0]
                if second_order:
                    Hxz[:, j, :] = d[1].reshape(B, d_in)
                    Hxx[j] = torch.cat([g.reshape(-1) for g in d[2:]])
            Jz = z.new_zeros(B, d_out, d_in)
            Hzz = z.new_zeros(B, d_in, d_in) if second_order else None
            for i in range(d_in):
                d = _grads(gz[:, i].sum(), [u, z] if second_order else [u])
                Jz[:, :, i] = d[0]
                if second_order:
                    Hzz[:, i, :] = d[1].reshape(B, d_in)
            blocks = DenseBlocks(Jx, Jz, Hxx, Hxz, Hzz)
            self._probe(blocks, gx, gz, u, z, params, second_order)
        return blocks

    def _probe(self, blk: DenseBlocks, gx, gz, u, z, params, second_order: bool) -> None:
        """Check the per-example blocks against the whole-batch autograd products on a random probe,
        and the symmetry of the second derivatives."""
        B, d_in = gz.shape
        gen = torch.Generator(device="cpu").manual_seed(1234 + self.index)
        v = torch.randn(blk.p, 1, generator=gen, dtype=torch.float64).to(gz)
        t = torch.randn(B, d_in, 1, generator=gen, dtype=torch.float64).to(gz)
        s = (gx * v[:, 0]).sum() + (gz * t[..., 0]).sum()
        d = _grads(s, [u, z, *params])
        tol = 1e3 * torch.finfo(gz.dtype).eps * (1 + blk.p + d_in) ** 0.5

        def close(ours: Tensor, ref: Tensor) -> bool:
            if ours.numel() == 0:
                return True
            scale = max(float(ours.abs().max()), float(ref.abs().max()), 1.0)
            return float((ours - ref).abs().max()) <= tol * scale

        if not close(blk.jx(v) + blk.jz(t), d[0][..., None]):
            raise UnsupportedStageError(
                f"{self.name} mixes examples: its derivatives couple different examples of the batch"
            )
        if not second_order:
            return
        hv = torch.cat([g.reshape(-1) for g in d[2:]]) if params else gz.new_zeros(0)
        symmetric = close(blk.Hxx, blk.Hxx.T) and close(blk.Hzz, blk.Hzz.transpose(1, 2))
        consistent = close(blk.hxx(v) + blk.hxz(t), hv[:, None]) and close(
            blk.hxzT(v) + blk.hzz(t), d[1].reshape(B, d_in, 1)
        )
        if not symmetric or (B == 1 and not consistent):
            raise UnsupportedStageError(
                f"{self.name}: autograd's second derivatives of this stage are not symmetric: torch has no "
                "exact double backward for an operation in it (e.g. weight_norm's _weight_norm); its Hessian "
                "cannot be taken exactly (the Gauss-Newton matrix can)"
            )
        if not consistent:
            raise UnsupportedStageError(
                f"{self.name} mixes examples (its second derivatives couple different examples of the "
                "batch), or torch's double backward of an operation in it is inexact"
            )


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
