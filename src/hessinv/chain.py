"""Split a model + loss into stages, run the forward pass, and linearize every stage.

``Chain(model, loss_fn)`` turns an ``nn.Sequential`` (nested ones are flattened) or a plain list of
modules into stages ``z_l = f_l(z_{l-1}; x_l)`` (math.md §1):

* ``Linear`` followed by an elementwise activation -> one structured :class:`DenseStage`;
* ``Identity`` / ``Flatten`` -> :class:`ReshapeStage` (a no-op on per-example flat activations);
* any other module -> :class:`GenericStage` (``torch.func``, vectorized over examples);
* the loss -> the last, parameter-free :class:`LossStage`; targets ride along.

``linearize`` does one forward pass keeping every ``z_l``, then one backward pass that computes
``b_{l-1} = Jz_l^T b_l`` (backprop, ``b_L = 1``), the gradient ``g_l = Jx_l^T b_l``, and each
stage's blocks at its own ``(z_{l-1}, b_l)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hessinv.errors import (
    DtypeMismatchError,
    NonFiniteError,
    NotAChainError,
    ShapeMismatchError,
    UnsupportedStageError,
)
from hessinv.stages import ELEMENTWISE, Blocks, DenseStage, GenericStage, LossStage, ReshapeStage, Stage

_MIXERS = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd, nn.AlphaDropout)


def _flatten_modules(model: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    if isinstance(model, (nn.Sequential, nn.ModuleList, list, tuple)):
        out: list[nn.Module] = []
        for m in model:
            out.extend(
                _flatten_modules(m) if isinstance(m, (nn.Sequential, nn.ModuleList, list, tuple)) else [m]
            )
        return out
    raise NotAChainError(
        f"expected an nn.Sequential or a list of modules, got {type(model).__name__}; "
        "wrap a single module as nn.Sequential(module)"
    )


def _is_reshape(m: nn.Module) -> bool:
    if isinstance(m, nn.Identity):
        return True
    if isinstance(m, nn.Flatten):
        return m.start_dim >= 1 or m.start_dim < -1
    return isinstance(m, nn.Unflatten) and (m.dim >= 1)


def split_stages(model: nn.Module | Sequence[nn.Module]) -> list[Stage]:
    """The stages of ``model``, fusing ``Linear`` with a following elementwise activation."""
    mods = _flatten_modules(model)
    if not mods:
        raise NotAChainError("the model has no stages")
    stages: list[Stage] = []
    i = 0
    while i < len(mods):
        m, k = mods[i], len(stages)
        for sub in m.modules():
            if isinstance(sub, _MIXERS) and sub.training and not (isinstance(sub, nn.Dropout) and sub.p == 0):
                raise UnsupportedStageError(
                    f"stage {k} ({type(m).__name__}): {type(sub).__name__} in training mode mixes examples "
                    "or is random; call model.eval() first"
                )
        trainable = all(t.requires_grad for t in m.parameters(recurse=False))
        if isinstance(m, nn.Linear) and type(m) is nn.Linear and trainable:
            nxt = mods[i + 1] if i + 1 < len(mods) else None
            if nxt is not None and isinstance(nxt, ELEMENTWISE) and not list(nxt.parameters()):
                stages.append(DenseStage(k, m, nxt))
                i += 2
                continue
            stages.append(DenseStage(k, m))
        elif _is_reshape(m):
            stages.append(ReshapeStage(k, m))
        else:
            stages.append(GenericStage(k, m))
        i += 1
    seen: dict[int, int] = {}
    for s in stages:
        for t in s.params:
            if id(t) in seen:
                raise NotAChainError(
                    f"a parameter is shared by stage {seen[id(t)]} and {s.name}: not a chain"
                )
            seen[id(t)] = s.index
    return stages


@dataclass
class Linearization:
    """Everything the curvature sweeps need at one point: blocks, gradient, loss.

    ``blocks[l]`` for ``l < L`` are the model stages' blocks; ``blocks[-1]`` is the loss stage's.
    """

    blocks: list[Blocks]
    gradient: Tensor
    loss: Tensor
    sizes: list[int]
    input_dim: int


class Chain:
    """A model + loss seen as a chain of stages.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> chain = Chain(net, torch.nn.CrossEntropyLoss())
    >>> [s.name for s in chain.stages]
    ['stage 0 (Linear+Tanh)', 'stage 1 (Linear)']
    >>> chain.num_params
    26
    """

    def __init__(self, model: nn.Module | Sequence[nn.Module], loss_fn: nn.Module):
        self.model, self.loss_fn = model, loss_fn
        self.stages = split_stages(model)
        self.params = [t for s in self.stages for t in s.params]
        if not self.params:
            raise NotAChainError("the model has no trainable parameters")
        dtypes = {t.dtype for t in self.params}
        devices = {t.device for t in self.params}
        if len(dtypes) > 1 or len(devices) > 1:
            raise DtypeMismatchError(f"parameters must share one dtype and device; got {dtypes}, {devices}")
        self.dtype, self.device = dtypes.pop(), devices.pop()
        if not self.dtype.is_floating_point:
            raise DtypeMismatchError(f"parameters must be floating point, got {self.dtype}")
        self.sizes = [s.p for s in self.stages]
        self.num_params = sum(self.sizes)

    def check_inputs(self, inputs: Tensor, targets: Tensor) -> None:
        """Raise a named error for a dtype/device/batch mismatch or non-finite values."""
        if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
            raise TypeError("inputs and targets must be tensors")
        if inputs.dtype != self.dtype or inputs.device != self.device:
            raise DtypeMismatchError(
                f"inputs are {inputs.dtype} on {inputs.device}, model is {self.dtype} on {self.device}"
            )
        if targets.device != self.device:
            raise DtypeMismatchError(f"targets are on {targets.device}, model on {self.device}")
        if targets.is_floating_point() and targets.dtype != self.dtype:
            raise DtypeMismatchError(f"targets are {targets.dtype}, model is {self.dtype}")
        if inputs.dim() < 2 or inputs.shape[0] < 1:
            raise ShapeMismatchError(f"inputs must be (batch, features...), got shape {tuple(inputs.shape)}")
        if targets.dim() < 1 or targets.shape[0] != inputs.shape[0]:
            raise ShapeMismatchError(
                f"batch sizes differ: inputs {tuple(inputs.shape)}, targets {tuple(targets.shape)}"
            )
        if not torch.isfinite(inputs).all():
            raise NonFiniteError("inputs contain NaN or infinity")
        if targets.is_floating_point() and not torch.isfinite(targets).all():
            raise NonFiniteError("targets contain NaN or infinity")
        for s in self.stages:
            for t in s.params:
                if not torch.isfinite(t).all():
                    raise NonFiniteError(f"{s.name}: parameters contain NaN or infinity")

    @torch.no_grad()
    def forward(self, inputs: Tensor) -> list[Tensor]:
        """``[z_0, z_1, ..., z_{L-1}]``: the input and every stage's output."""
        zs = [inputs]
        for s in self.stages:
            try:
                zs.append(s.forward(zs[-1]))
            except (RuntimeError, ValueError) as e:
                if isinstance(e, (UnsupportedStageError, NonFiniteError)):
                    raise
                raise ShapeMismatchError(
                    f"{s.name} failed on input of shape {tuple(zs[-1].shape)}: {e}"
                ) from e
        return zs

    @torch.no_grad()
    def loss(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """The scalar loss ``z_L`` (no derivatives)."""
        self.check_inputs(inputs, targets)
        return self.loss_fn(self.forward(inputs)[-1], targets)

    def linearize(self, inputs: Tensor, targets: Tensor, second_order: bool = True) -> Linearization:
        """Forward and backward pass: every stage's blocks, the gradient, the loss.

        ``second_order=False`` drops every stage's ``H..`` blocks except the loss's (Gauss-Newton).
        """
        self.check_inputs(inputs, targets)
        zs = self.forward(inputs)
        y = zs[-1]
        loss_stage = LossStage(len(self.stages), self.loss_fn, targets, y)
        with torch.no_grad():
            loss_blocks, loss = loss_stage.linearize(y)
            reference = self.loss_fn(y, targets)
        if not torch.isfinite(loss):
            raise NonFiniteError(f"the loss is {loss.item()}")
        if not torch.allclose(loss, reference.to(loss.dtype), rtol=1e-4, atol=1e-6):
            raise UnsupportedStageError(
                f"{loss_stage.name}: per-example decomposition {loss.item()} != loss {reference.item()}"
            )
        blocks: list[Blocks] = [loss_blocks]
        b = torch.ones(1, 1, 1, dtype=self.dtype, device=self.device)
        b = blocks[0].jzT(b)
        grads: list[Tensor] = []
        for s, z_in in zip(reversed(self.stages), reversed(zs[:-1]), strict=True):
            with torch.no_grad():
                blk = s.linearize(z_in, b[..., 0], second_order)
                grads.append(blk.jxT(b)[:, 0])
                b = blk.jzT(b)
            blocks.insert(0, blk)
        gradient = torch.cat(grads[::-1])
        if not torch.isfinite(gradient).all():
            raise NonFiniteError("the gradient contains NaN or infinity")
        return Linearization(blocks, gradient, reference.to(loss.dtype), self.sizes, zs[0][0].numel())
