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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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

    def riccati(self, Sigma: Tensor, coupled: bool = True) -> RiccatiBlocks:
        B, C = self.G.shape
        Qzz = None
        if coupled:
            Qzz = Sigma.reshape(()) * torch.einsum("ni,mj->nimj", self.G, self.G)
            if self.Lam is not None:
                Qzz = add_blockdiag(Qzz, self.Lam)
        return RiccatiBlocks(Sigma.new_zeros(0, 0), Sigma.new_zeros(0, B, C), Qzz)


class LossStage:
    """The fused loss: per-example terms, their scale, and their derivatives in closed form.

    With ``p = softmax(y_n)``, the target distribution ``q_n`` (one-hot or given probabilities, label
    smoothing applied: ``q <- (1 - eps) q + eps / C``) and ``|q| = sum_c q_c``:

    ===============  ===========================  ==================  ==========================
    loss             ``ell(y_n)``                 gradient            Hessian
    ===============  ===========================  ==================  ==========================
    cross-entropy    ``-q . log p``               ``|q| p - q``       ``|q| (diag p - p p^T)``
    MSE              ``||y_n - t_n||^2``          ``2 (y_n - t_n)``   ``2 I``
    BCE with logits  ``sum softplus(y) - t y``    ``sigma(y) - t``    ``diag(sigma (1 - sigma))``
    ===============  ===========================  ==================  ==========================

    (examples with ``ignore_index`` contribute nothing). ``linearize`` checks that ``scale * sum_n ell``
    matches the module's own loss.

    Args:
        loss_fn: a supported ``nn.Module`` loss.
        targets: the batch's targets (they "ride along" the chain, seed §Notation).
    """

    def __init__(self, index: int, loss_fn: nn.Module, targets: Tensor, output: Tensor):
        self.index, self.loss_fn, self.targets = index, loss_fn, targets
        self.name = f"stage {index} ({type(loss_fn).__name__})"
        self.kind, self.q, self.scale = self._per_example(loss_fn, targets, output)

    def _per_example(self, loss_fn: nn.Module, t: Tensor, y: Tensor) -> tuple[str, Tensor | None, float]:
        """``(kind, q, scale)``: ``q`` the smoothed target distribution (cross-entropy; zero rows for
        ignored examples), else None."""
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
                return "ce", ((1 - eps) * t + eps / C).to(y.dtype), (1.0 / B if red == "mean" else 1.0)
            if t.shape != (B,):
                raise ShapeMismatchError(
                    f"{self.name}: class-index targets must be ({B},); got {tuple(t.shape)}"
                )
            keep = t != loss_fn.ignore_index
            kept = int(keep.sum())
            valid = t[keep]
            if valid.numel() and (valid.min() < 0 or valid.max() >= C):
                raise ShapeMismatchError(f"{self.name}: class index out of range [0, {C})")
            q = F.one_hot(t.clamp(0, C - 1), C).to(y.dtype).mul_(1 - eps).add_(eps / C)
            q.mul_(keep[:, None].to(y.dtype))
            return "ce", q, (1.0 / max(kept, 1) if red == "mean" else 1.0)
        if isinstance(loss_fn, (nn.MSELoss, nn.BCEWithLogitsLoss)):
            if t.shape != y.shape:
                raise ShapeMismatchError(f"{self.name}: targets {tuple(t.shape)} != outputs {tuple(y.shape)}")
            scale = 1.0 / (B * C) if red == "mean" else 1.0
            if isinstance(loss_fn, nn.BCEWithLogitsLoss):
                if loss_fn.weight is not None or loss_fn.pos_weight is not None:
                    raise UnsupportedStageError(f"{self.name}: weight/pos_weight are not supported")
                return "bce", None, scale
            return "mse", None, scale
        raise UnsupportedStageError(
            f"{self.name}: unsupported loss; use CrossEntropyLoss, MSELoss or BCEWithLogitsLoss"
        )

    def derivatives(self, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-example ``(ell (B,), gradient (B, C), Hessian (B, C, C))``, unscaled (see the class table)."""
        t, q = self.targets, self.q
        if self.kind == "ce":
            assert q is not None
            logp = F.log_softmax(y, -1)
            p = logp.exp()
            mass = q.sum(-1, keepdim=True)
            lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
            return -(q * logp).sum(-1), mass * p - q, lam.mul_(mass[:, :, None])
        if self.kind == "bce":
            sig = torch.sigmoid(y)
            return (F.softplus(y) - t * y).sum(-1), sig - t, torch.diag_embed(sig * (1 - sig))
        r = y - t
        eye = torch.eye(y.shape[1], dtype=y.dtype, device=y.device)
        return r.square().sum(-1), 2 * r, (2 * eye).expand(y.shape[0], -1, -1).contiguous()

    def linearize(self, y: Tensor) -> tuple[LossBlocks, Tensor]:
        """Per-example gradient and Hessian of the loss (Lambda is kept for Gauss-Newton too), and the
        loss ``scale * sum_n ell``."""
        ell, G, Lam = self.derivatives(y.detach())
        return LossBlocks(self.scale * G, Lam.mul_(self.scale)), self.scale * ell.sum()
