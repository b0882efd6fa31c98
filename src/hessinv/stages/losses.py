"""The last stage: the loss, a sum of per-example terms.

``z_L = s * sum_n ell(y_n, t_n)`` where ``y_n`` is the model output of example ``n``, ``t_n`` its
target, and ``s`` the reduction's scale (``1/B`` for CE/`mean`, ``1/(B*C)`` for MSE and BCE with
`mean`, ``1`` for `sum`). The stage has no parameters; its blocks are the per-example gradient
``Jz = s * d ell/dy`` (1 x a) and Hessian ``Hzz = s * d2 ell/dy2`` (block-diagonal, ``Lambda`` of the
Gauss-Newton matrix). Keeping the loss as its own parameter-free stage is the same Hessian as
fusing it into the last layer (math.md §1), and keeps ``Lambda`` in one place.

Supported: ``CrossEntropyLoss`` (class indices with ``ignore_index`` and ``label_smoothing``, or class
probabilities), ``MSELoss``, ``BCEWithLogitsLoss``, each with ``reduction='mean'`` or ``'sum'``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, hessian, vmap

from hessinv.errors import ShapeMismatchError, UnsupportedStageError
from hessinv.stages.protocol import Blocks, RiccatiBlocks, add_blockdiag


class LossBlocks(Blocks):
    """``Jz = G`` (per-example gradients, (B, C)) and ``Hzz = Lambda`` ((B, C, C), or None)."""

    def __init__(self, G: Tensor, Lam: Tensor | None):
        self.G, self.Lam = G, Lam
        self.batch, self.d_in = G.shape
        self.d_out, self.p = 1, 0

    def jx(self, v: Tensor) -> Tensor:
        return v.new_zeros(1, 1, v.shape[-1])

    def jxT(self, s: Tensor) -> Tensor:
        return s.new_zeros(0, s.shape[-1])

    def jz(self, t: Tensor) -> Tensor:
        return torch.einsum("nc,nck->k", self.G, t).view(1, 1, -1)

    def jzT(self, s: Tensor) -> Tensor:
        return self.G[:, :, None] * s[0, 0][None, None, :]

    def hxx(self, v: Tensor) -> Tensor:
        return v

    def hxz(self, t: Tensor) -> Tensor:
        return t.new_zeros(0, t.shape[-1])

    def hxzT(self, v: Tensor) -> Tensor:
        return v.new_zeros(self.batch, self.d_in, v.shape[-1])

    def hzz(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t) if self.Lam is None else torch.bmm(self.Lam, t)

    def riccati(self, Sigma: Tensor, need_qzz: bool = True) -> RiccatiBlocks:
        B, C = self.G.shape
        Qzz = None
        if need_qzz:
            Qzz = Sigma.reshape(()) * torch.einsum("ni,mj->nimj", self.G, self.G)
            if self.Lam is not None:
                Qzz = add_blockdiag(Qzz, self.Lam)
        return RiccatiBlocks(Sigma.new_zeros(0, 0), Sigma.new_zeros(0, B, C), Qzz)


class LossStage:
    """The fused loss: per-example terms, their scale, and their derivatives.

    Args:
        loss_fn: a supported ``nn.Module`` loss.
        targets: the batch's targets (they "ride along" the chain, seed §Notation).
    """

    def __init__(self, index: int, loss_fn: nn.Module, targets: Tensor, output: Tensor):
        self.index, self.loss_fn, self.targets = index, loss_fn, targets
        self.name = f"stage {index} ({type(loss_fn).__name__})"
        self.ell, self.scale = self._per_example(loss_fn, targets, output)

    def _per_example(
        self, loss_fn: nn.Module, t: Tensor, y: Tensor
    ) -> tuple[Callable[[Tensor, Tensor], Tensor], float]:
        red = getattr(loss_fn, "reduction", None)
        if red not in ("mean", "sum"):
            raise UnsupportedStageError(f"{self.name}: reduction={red!r}; use 'mean' or 'sum'")
        if y.dim() != 2:
            raise UnsupportedStageError(
                f"{self.name}: model output must be (batch, features); got shape {tuple(y.shape)}"
            )
        B, C = y.shape
        if isinstance(loss_fn, nn.CrossEntropyLoss):
            if loss_fn.weight is not None:
                raise UnsupportedStageError(f"{self.name}: class weights are not supported")
            eps = float(loss_fn.label_smoothing)
            if t.is_floating_point():  # class probabilities
                if t.shape != y.shape:
                    raise ShapeMismatchError(
                        f"{self.name}: probability targets {tuple(t.shape)} != outputs {tuple(y.shape)}"
                    )

                def ell(yn: Tensor, tn: Tensor) -> Tensor:
                    return -((1 - eps) * tn + eps / C).mul(F.log_softmax(yn, -1)).sum()

                return ell, (1.0 / B if red == "mean" else 1.0)
            if t.shape != (B,):
                raise ShapeMismatchError(
                    f"{self.name}: class-index targets must be ({B},); got {tuple(t.shape)}"
                )
            ign = loss_fn.ignore_index
            kept = int((t != ign).sum())
            valid = t[t != ign]
            if valid.numel() and (valid.min() < 0 or valid.max() >= C):
                raise ShapeMismatchError(f"{self.name}: class index out of range [0, {C})")

            def ell(yn: Tensor, tn: Tensor) -> Tensor:
                logp = F.log_softmax(yn, -1)
                nll = -logp.gather(0, tn.clamp(0, C - 1).view(1)).squeeze(0)
                val = (1 - eps) * nll - eps * logp.mean()
                return torch.where(tn == ign, torch.zeros_like(val), val)

            return ell, (1.0 / max(kept, 1) if red == "mean" else 1.0)
        if isinstance(loss_fn, (nn.MSELoss, nn.BCEWithLogitsLoss)):
            if t.shape != y.shape:
                raise ShapeMismatchError(f"{self.name}: targets {tuple(t.shape)} != outputs {tuple(y.shape)}")
            if isinstance(loss_fn, nn.BCEWithLogitsLoss):
                if loss_fn.weight is not None or loss_fn.pos_weight is not None:
                    raise UnsupportedStageError(f"{self.name}: weight/pos_weight are not supported")

                def ell(yn: Tensor, tn: Tensor) -> Tensor:
                    return (F.softplus(yn) - tn * yn).sum()

            else:

                def ell(yn: Tensor, tn: Tensor) -> Tensor:
                    return (yn - tn).pow(2).sum()

            return ell, (1.0 / (B * C) if red == "mean" else 1.0)
        raise UnsupportedStageError(
            f"{self.name}: unsupported loss; use CrossEntropyLoss, MSELoss or BCEWithLogitsLoss"
        )

    def forward(self, y: Tensor) -> Tensor:
        """The scalar loss ``z_L``."""
        return self.scale * vmap(self.ell)(y, self.targets).sum()

    def linearize(self, y: Tensor) -> LossBlocks:
        """Per-example gradient and Hessian of the loss (Lambda is kept for Gauss-Newton too)."""
        y = y.detach()
        G = self.scale * vmap(grad(self.ell))(y, self.targets)
        Lam = self.scale * vmap(hessian(self.ell))(y, self.targets)
        return LossBlocks(G, Lam)
