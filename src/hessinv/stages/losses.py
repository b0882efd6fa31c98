"""The last stage: the loss, a sum of per-example terms.

``z_L = s * sum_n ell(y_n, t_n)`` where ``y_n`` is the model output of example ``n``, ``t_n`` its
target, and ``s`` the reduction's scale (``1/B`` for CE/`mean`, ``1/(B*C)`` for MSE and BCE with
`mean`, ``1`` for `sum`). The stage has no parameters; its blocks are the per-example gradient
``Jz = s * d ell/dy`` (1 x a) and Hessian ``Hzz = s * d2 ell/dy2`` (block-diagonal, ``Lambda`` of the
Gauss-Newton matrix). Keeping the loss as its own parameter-free stage is the same Hessian as
fusing it into the last layer (math.md §1), and keeps ``Lambda`` in one place.

Closed forms (the fast path): ``CrossEntropyLoss`` (class indices with ``ignore_index`` and
``label_smoothing``, or class probabilities), ``MSELoss``, ``BCEWithLogitsLoss``, each with
``reduction='mean'`` or ``'sum'``, also as ``F.cross_entropy`` / ``F.mse_loss`` /
``F.binary_cross_entropy_with_logits``. Any other loss ``loss_fn(outputs, targets)`` that returns a
scalar sum of per-example terms (``NLLLoss``, ``HuberLoss``, ``SmoothL1Loss``, ``L1Loss``,
``KLDivLoss``, class-weighted cross-entropy, a ``lambda``, ...) goes through plain autograd: one
backward pass for ``Jz`` and ``C`` double-backward passes for the per-example ``Lambda`` (``C`` the
outputs per example), then one probe pass that checks ``Lambda`` is block-diagonal over examples
(else :class:`UnsupportedStageError`: the loss mixes examples).
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from hessinv import linalg
from hessinv.errors import (
    DtypeMismatchError,
    HessinvError,
    InvalidArgumentError,
    NonFiniteError,
    ShapeMismatchError,
    TooLargeError,
    UnsupportedStageError,
    warn,
)
from hessinv.stages.protocol import (
    ParameterFreeBlocks,
    RiccatiBlocks,
    add_blockdiag,
    compiled_module,
    defined_in_torch,
    unshared,
)

#: Functional forms of the closed-form losses (default arguments only) -> their modules.
_FUNCTIONAL = {
    F.cross_entropy: nn.CrossEntropyLoss,
    F.mse_loss: nn.MSELoss,
    F.binary_cross_entropy_with_logits: nn.BCEWithLogitsLoss,
}
#: Losses whose targets are class indices (any integer dtype is converted to int64) ...
_INDEX_LOSSES = (nn.CrossEntropyLoss, nn.NLLLoss, nn.MultiMarginLoss)
_INDEX_FUNCTIONS = (F.cross_entropy, F.nll_loss, F.multi_margin_loss)
#: ... and losses whose targets are real numbers (integer targets become the model's dtype).
_REAL_LOSSES = (
    nn.MSELoss, nn.BCEWithLogitsLoss, nn.BCELoss, nn.HuberLoss, nn.SmoothL1Loss, nn.L1Loss, nn.KLDivLoss,
    nn.PoissonNLLLoss, nn.GaussianNLLLoss, nn.SoftMarginLoss, nn.MultiLabelSoftMarginLoss,
)  # fmt: skip
_REAL_FUNCTIONS = (
    F.mse_loss, F.binary_cross_entropy_with_logits, F.binary_cross_entropy, F.huber_loss, F.smooth_l1_loss,
    F.l1_loss, F.kl_div, F.poisson_nll_loss, F.soft_margin_loss, F.multilabel_soft_margin_loss,
)  # fmt: skip


#: Losses of two tensors of one shape, element by element (torch broadcasts others, with a warning).
_ELEMENTWISE = (
    nn.MSELoss, nn.BCEWithLogitsLoss, nn.BCELoss, nn.HuberLoss, nn.SmoothL1Loss, nn.L1Loss, nn.KLDivLoss,
    nn.PoissonNLLLoss, nn.SoftMarginLoss,
)  # fmt: skip
_ELEMENTWISE_FUNCTIONS = (
    F.mse_loss, F.binary_cross_entropy_with_logits, F.binary_cross_entropy, F.huber_loss, F.smooth_l1_loss,
    F.l1_loss, F.kl_div, F.poisson_nll_loss, F.soft_margin_loss,
)  # fmt: skip


def _torch_forward(fn: object, classes: tuple) -> bool:
    """``fn`` is one of ``classes`` (or a subclass) whose ``forward`` is torch's: torch's semantics for its
    targets hold (a subclass with a ``forward`` of its own may take other targets, e.g. class indices
    it one-hot encodes)."""
    return isinstance(fn, classes) and defined_in_torch(type(fn).forward)


def uncompiled(loss_fn: Callable) -> Callable:
    """The loss inside a ``torch.compile`` wrapper (``OptimizedModule._orig_mod``, or the original function
    of a compiled function), else ``loss_fn``: the same function, whose backward autograd can
    differentiate again (a compiled backward cannot: its second derivative reads as zero)."""
    if compiled_module(loss_fn):
        return loss_fn._orig_mod  # type: ignore[union-attr]
    orig = getattr(loss_fn, "_torchdynamo_orig_callable", None)
    return orig if callable(orig) else loss_fn


def loss_name(loss_fn: Callable) -> str:
    """``'CrossEntropyLoss'``, ``'cross_entropy'``, ``'<lambda>'``: how messages call a loss."""
    if isinstance(loss_fn, nn.Module):
        return type(loss_fn).__name__
    return getattr(loss_fn, "__name__", type(loss_fn).__name__)


def loss_in_dtype(loss_fn: Callable, dtype: torch.dtype) -> Callable:
    """``loss_fn`` for a model converted to ``dtype``: a loss module with floating (or complex) tensors
    (``CrossEntropyLoss(weight=...)``, ``BCEWithLogitsLoss(pos_weight=...)``) is copied and converted
    (:func:`~hessinv.linalg.in_precision`), a partial's tensors too, anything else returned as is."""
    if isinstance(loss_fn, nn.Module):
        attrs = [(m, k) for m in loss_fn.modules() for k, v in vars(m).items() if isinstance(v, Tensor)]
        held = [*loss_fn.buffers(), *loss_fn.parameters(), *(getattr(m, k) for m, k in attrs)]
        if all(linalg.in_precision(t, dtype) is t for t in held):  # (floating or complex: to convert)
            return loss_fn
        try:
            new = copy.deepcopy(loss_fn)
        except Exception:  # noqa: BLE001 - not copyable (a lock): as it is (a dtype error names the fix)
            return loss_fn
        return linalg.module_in_precision(new, dtype)  # (plain tensor attributes too; complex stays complex)
    if isinstance(loss_fn, functools.partial):  # (its floating tensors: partial(F.cross_entropy, weight=w))

        def cast(t: Any) -> Any:
            return linalg.in_precision(t, dtype) if isinstance(t, Tensor) else t

        func = loss_in_dtype(loss_fn.func, dtype)
        args, kw = [cast(a) for a in loss_fn.args], {k: cast(v) for k, v in loss_fn.keywords.items()}
        return functools.partial(func, *args, **kw)
    return loss_fn


def prepare_targets(loss_fn: Callable, targets: Tensor, dtype: torch.dtype) -> Tensor:
    """Targets as the loss expects them: class indices of any integer (or bool) dtype become int64
    for the index losses (cross-entropy and NLL, a target per example or per position); integer or bool
    targets of the regression/binary losses become the model's floating dtype; other losses get them as
    given."""
    if targets.is_floating_point() or targets.is_complex():
        return targets
    fn = loss_fn.func if isinstance(loss_fn, functools.partial) else loss_fn
    if isinstance(fn, _INDEX_LOSSES) or fn in _INDEX_FUNCTIONS:
        return targets.long()
    if _torch_forward(fn, _REAL_LOSSES) or fn in _REAL_FUNCTIONS:  # (a forward of its own: its targets)
        return targets.to(dtype)
    return targets


def _rng_state(device: torch.device) -> list[Tensor]:
    """The states of torch's default generators a call on ``device`` may draw from (CPU, and CUDA's)."""
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def ignored_index(loss_fn: Callable) -> int | None:
    """The class index a loss ignores (averaging over the other targets): ``ignore_index`` of a
    ``CrossEntropyLoss`` / ``NLLLoss`` module, torch's default -100 for ``F.cross_entropy`` /
    ``F.nll_loss``, or a ``functools.partial`` of them's keyword; None where unknown (a lambda)."""
    ignore = getattr(loss_fn, "ignore_index", None)
    fn, kw = loss_fn, {}
    if isinstance(loss_fn, functools.partial):
        fn, kw = loss_fn.func, loss_fn.keywords
    if ignore is None and fn in (F.cross_entropy, F.nll_loss):
        ignore = kw.get("ignore_index", -100)
    return ignore if isinstance(ignore, int) and not isinstance(ignore, bool) else None


def nothing_to_learn(loss_fn: Callable, targets: Tensor) -> str | None:
    """Where every target of the batch is the loss's ignored class index (an all-padding batch) under
    the mean reduction -- torch's loss is 0/0 (NaN) and its gradient zero: nothing to learn from --
    a sentence that says so, for an optimizer to skip the batch with; else None. Likewise where every
    target's class weight is zero (``CrossEntropyLoss(weight=w)`` or ``NLLLoss``, a dropped class).
    Targets without data (the ``meta`` device) have nothing to read: None, for the batch's device check
    to name."""
    if targets.is_meta:
        return None
    zero = zero_class_weight(loss_fn, targets)
    if zero is not None:
        t = targets.long()
        kept = t != loss_fn.ignore_index
        inside = bool(((t >= 0) & (t < loss_fn.weight.numel())).all())
        if inside and bool(kept.any()) and bool(zero[kept].all()):
            return (
                "every target of the batch has class weight 0 (the weighted mean loss is 0/0: NaN, its "
                "gradient zero), so there is nothing to learn from it"
            )
    ignore = ignored_index(loss_fn)
    if (
        ignore is None
        or loss_reduction(loss_fn) not in ("mean", None)
        or targets.is_floating_point()
        or not targets.numel()
        or not bool((targets.long() == ignore).all())
    ):
        return None
    return (
        f"every target of the batch equals ignore_index={ignore} (the mean loss is 0/0: NaN, its gradient "
        "zero), so there is nothing to learn from it"
    )


def zero_class_weight(loss_fn: Callable, targets: Tensor) -> Tensor | None:
    """Where ``loss_fn`` is ``CrossEntropyLoss(weight=w)`` or ``NLLLoss(weight=w)`` with the mean reduction
    and ``targets`` are class indices: whether each target is a class of weight 0 (its example's own
    weighted mean loss is 0/0; False for a target out of range, an ignored one); else None."""
    w = loss_fn.weight if type(loss_fn) in (nn.CrossEntropyLoss, nn.NLLLoss) else None
    if w is None or loss_fn.reduction != "mean" or targets.is_floating_point() or not targets.numel():
        return None
    t = targets.long()
    inside = (t >= 0) & (t < w.numel())
    return inside & (w.to(t.device)[t.clamp(0, w.numel() - 1)] == 0)


def loss_reduction(loss_fn: Callable) -> str | None:
    """A loss's ``reduction`` (a module's attribute or a ``functools.partial``'s keyword), else None -- and
    None where the function is not torch's own (a subclass of torch's ``_Loss`` with its own ``forward``
    inherits ``reduction='mean'`` whatever it computes: a sum was taken for a mean, influence scores 8.5x
    off; a probe): what it does is then measured (:func:`sums_examples`)."""
    if isinstance(loss_fn, functools.partial):
        return loss_fn.keywords.get("reduction") if defined_in_torch(loss_fn.func) else None
    if isinstance(loss_fn, nn.Module) and not defined_in_torch(type(loss_fn).forward):
        return None
    return getattr(loss_fn, "reduction", None)


def counted_examples(loss_fn: Callable, targets: Tensor) -> Tensor | None:
    """The indices of the examples a loss that ignores a class index (``CrossEntropyLoss(ignore_index=
    ...)``, :func:`ignored_index`) counts -- those with a target, or with one
    position of per-position targets ``(B, d...)`` (padding), it does not ignore -- where it ignores some
    but not all; else None (all count, or the targets have no data to read: the ``meta`` device)."""
    ignore = ignored_index(loss_fn)
    if ignore is not None and targets.dim() >= 1 and not targets.is_floating_point() and not targets.is_meta:
        # (in int64: -100 against uint8 targets would read as class 156)
        valid = (targets.long() != ignore).reshape(int(targets.shape[0]), -1).any(1).nonzero().flatten()
        if 0 < valid.numel() < int(targets.shape[0]):
            return valid.cpu()
    return None


def count_examples(loss_fn: Callable, targets: Tensor) -> int:
    """How many examples of the batch ``targets`` the loss counts (:func:`counted_examples`: all but
    those whose every target it ignores)."""
    idx = counted_examples(loss_fn, targets)
    return int(targets.shape[0]) if idx is None else int(idx.numel())


def sums_examples(loss_fn: Callable, outputs: Tensor, targets: Tensor) -> bool | None:
    """Whether ``loss_fn`` sums its per-example terms (``reduction='sum'``: the loss of ``B`` examples
    grows like ``B``) rather than averaging them; None where it cannot tell.

    Read from ``reduction`` where the loss has one (a module, or a ``reduction=`` keyword of a
    ``functools.partial``); otherwise measured on ``(outputs, targets)`` (a few examples): the loss of the
    examples taken twice over is twice the loss (a sum) or the same (a mean). A curvature built on
    ``k`` of ``B`` examples estimates the batch's curvature as it stands for a mean, and ``k / B`` of it
    for a sum (the optimizers rescale it). A loss that is neither (a sum plus a constant) is taken as a
    mean, with a warning.

    Example:
        >>> y, t = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
        >>> sums_examples(nn.CrossEntropyLoss(reduction="sum"), y, t), sums_examples(F.cross_entropy, y, t)
        (True, False)
        >>> sums_examples(lambda y, t: F.cross_entropy(y, t, reduction="sum"), y, t)
        True
    """
    red = loss_reduction(loss_fn)
    if red in ("mean", "batchmean", "elementwise_mean"):
        return False
    if red == "sum":
        return True
    if red is not None:  # 'none': refused where the loss is evaluated
        return None
    try:  # (a loss that cannot take a few examples, or twice them, or outputs moved off its domain:
        # probabilities beyond [0, 1], weights sized for the whole batch -- cannot tell)
        with torch.no_grad():
            one = float(loss_fn(unshared(outputs), unshared(targets)))
            if not abs(one) > 1e-30 and outputs.is_floating_point():
                # examples the model fits exactly have a zero loss either way: away from them it tells
                gen = torch.Generator(device=outputs.device).manual_seed(0)
                noise = torch.randn(outputs.shape, generator=gen, dtype=outputs.dtype, device=outputs.device)
                outputs = outputs + (1.0 + float(outputs.abs().max())) * noise
                one = float(loss_fn(unshared(outputs), unshared(targets)))
            two = float(loss_fn(torch.cat([outputs, outputs]), torch.cat([targets, targets])))
    except Exception:  # noqa: BLE001
        return None
    if not (math.isfinite(one) and math.isfinite(two)) or abs(one) <= 1e-30:
        return None
    r = two / one
    if abs(r - 1.0) < 1e-3:
        return False
    if abs(r - 2.0) < 1e-3:
        return True
    warn(
        f"{loss_name(loss_fn)}: the loss of a batch taken twice over is {r:.4g}x its loss, neither a mean "
        "over the examples (1x) nor a sum (2x): a curvature batch smaller than the batch is used as for a "
        "mean (pass curvature_batch_size=None for the whole batch's)",
        UserWarning,
    )
    return False


def holds_batch_sized(loss_fn: Any, batch: int) -> bool:
    """Whether ``loss_fn`` holds a tensor whose first dimension is ``batch`` (more than one): a weight
    per example, which torch broadcasts onto the examples of another batch (a curvature batch drawn from
    it, one example alone). A module: its tensor attributes and buffers; a ``functools.partial``: its
    arguments; a function: the tensors it closes over, reads as globals or has as defaults."""
    if batch < 2:
        return False
    if isinstance(loss_fn, functools.partial):
        # (cross-entropy's and NLL's weight, BCE's pos_weight: one per class)
        per_class = (
            ("weight", "pos_weight") if loss_fn.func in (F.cross_entropy, F.nll_loss) else ("pos_weight",)
        )
        values = [*loss_fn.args, *(v for k, v in loss_fn.keywords.items() if k not in per_class)]
    elif isinstance(loss_fn, nn.Module):
        values = [v for m in loss_fn.modules() for v in (*vars(m).values(), *m.buffers(recurse=False))]
        if type(loss_fn) in (nn.CrossEntropyLoss, nn.NLLLoss):  # (its weight is one per class)
            values = [v for v in values if v is not loss_fn.weight]
        if type(loss_fn) is nn.BCEWithLogitsLoss:  # (its pos_weight too)
            values = [v for v in values if v is not loss_fn.pos_weight]
    else:
        cells = getattr(loss_fn, "__closure__", None) or ()
        values = list(getattr(loss_fn, "__defaults__", None) or ())
        for c in cells:
            try:
                values.append(c.cell_contents)
            except ValueError:  # (an empty cell)
                pass
        code, scope = getattr(loss_fn, "__code__", None), getattr(loss_fn, "__globals__", None) or {}
        values += [scope[k] for k in (code.co_names if code is not None else ()) if k in scope]
    return any(isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == batch for v in values)


def plain_module(fn: Callable) -> bool:
    """Whether calling ``fn`` runs no more than its class's ``forward``: not a module, or a module (and
    submodules) without forward (pre-)hooks, backward hooks or a ``forward`` set on the instance. Only
    then may a loss module be replaced by a formula chosen from its class (a temperature hook on a
    ``CrossEntropyLoss`` changes its function)."""
    if not isinstance(fn, nn.Module):
        return True
    return "forward" not in vars(fn) and not any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in fn.modules()
    )


def closed_form(loss_fn: Callable) -> nn.Module | None:
    """The closed-form loss module equivalent to ``loss_fn``, or None (autograd path, which calls
    ``loss_fn`` itself: a module with hooks, see :func:`plain_module`)."""
    if not plain_module(loss_fn):
        return None
    if not isinstance(loss_fn, nn.Module):
        try:
            cls = _FUNCTIONAL.get(loss_fn)  # type: ignore[call-overload]
        except TypeError:  # unhashable callable
            cls = None
        return None if cls is None else cls()
    red = getattr(loss_fn, "reduction", None)
    if red not in ("mean", "sum"):
        return None
    if type(loss_fn) is nn.CrossEntropyLoss:
        return loss_fn
    if type(loss_fn) is nn.MSELoss:
        return loss_fn
    if type(loss_fn) is nn.BCEWithLogitsLoss and loss_fn.weight is None and loss_fn.pos_weight is None:
        return loss_fn
    return None


#: Refuse a per-example output curvature ``Lambda`` (B, C, C) of more numbers than this.
MAX_LAMBDA_ENTRIES = 2**28


def check_output_curvature_size(B: int, C: int, name: str) -> None:
    """Raise :class:`TooLargeError` where ``B`` matrices ``C x C`` (the loss's curvature in the outputs)
    would hold more than :data:`MAX_LAMBDA_ENTRIES` numbers, naming the number of examples that fits."""
    if B * C * C <= MAX_LAMBDA_ENTRIES:
        return
    fits = MAX_LAMBDA_ENTRIES // max(C * C, 1)
    raise TooLargeError(
        f"{name}: the loss's curvature in the outputs, one {C} x {C} matrix per example, would hold "
        f"{B * C * C:.3g} numbers for {B} examples (the limit is {MAX_LAMBDA_ENTRIES:.3g}): "
        + (
            f"take the curvature on at most {fits} examples (Newton/Preconditioner: curvature_batch_size="
            f"{fits}; their Gauss-Newton root with max_rows needs only products)"
            if fits
            else f"{C} outputs per example are too many for an exact output curvature"
        )
        + "; a cross-entropy over positions written on flattened (B T, classes) logits: return (B, classes, "
        "T) logits and use nn.CrossEntropyLoss, whose curvature is taken per position in closed form"
    )


def softmax_curvature(p: Tensor, t: Tensor, dim: int) -> Tensor:
    r"""``(diag p - p p^T) t = p o (t - p . t)`` along ``dim``, the Hessian of ``-log softmax`` in the
    logits times ``t``, for softmax probabilities ``p`` (broadcast against ``t``).

    Formed without the cancellation of ``1 - p_i`` at a confident class ``i`` (``p_i > 1/2``: at most
    one per position): there ``t_i - p . t = (sum_{j != i} p_j) t_i - sum_{j != i} p_j t_j``, sums over
    the small probabilities only, each accurate relative to them. As ``t_i - p . t`` that entry carried
    an absolute error of about ``u |t|`` while the whole matrix is of the size of those small
    probabilities: a confidently classified batch's curvature came out wrong by 5e-11 relative at a
    logit margin of 15 and by 4% at 36, in float64 (plain autograd's double backward cancels too: 1e-5
    off at a margin of 27, this form 2e-16, against 60-digit arithmetic).

    >>> import torch
    >>> p = torch.softmax(torch.tensor([[40.0, 0.0, 0.0]], dtype=torch.float64), 1)
    >>> lam = softmax_curvature(p[:, :, None], torch.eye(3, dtype=torch.float64)[None], 1)[0]
    >>> bool(torch.allclose(lam[0], torch.tensor([2.0, -1.0, -1.0], dtype=torch.float64) * p[0, 1],
    ...                     rtol=1e-14, atol=0))
    True
    """
    top = p > 0.5
    rest = p.masked_fill(top, 0.0)  # the probabilities other than a confident one, exactly
    rest_t = (rest * t).sum(dim, keepdim=True)
    top_t = (p.masked_fill(~top, 0.0) * t).sum(dim, keepdim=True)
    inner = torch.where(top, rest.sum(dim, keepdim=True) * t - rest_t, t - (top_t + rest_t))
    return p * inner


class LossBlocks(ParameterFreeBlocks):
    """``Jz = G`` (per-example gradients, (B, C)) and ``Hzz = Lambda`` ((B, C, C), or None).

    With ``softmax = (p, w)`` ((B, C), (B, 1)) instead of ``Lam``, ``Lambda_n = w_n (diag(p_n) - p_n p_n^T)``
    (cross-entropy); with ``diag`` ((B, C)), ``Lambda_n = diag(diag_n)`` (a loss that sums a term per
    output entry: MSE, BCE, Huber, ... on outputs of any shape, e.g. an image's pixels):
    products with it cost ``O(B C)`` per column, and the ``(B, C, C)`` matrix is formed only when asked
    for (:attr:`Lam`: the Riccati sweep, the exact Gauss-Newton root), so that many classes or outputs do
    not cost ``B C^2`` memory where products suffice (the optimizer's budgeted root)."""

    def __init__(
        self,
        G: Tensor,
        Lam: Tensor | None,
        softmax: tuple[Tensor, Tensor] | None = None,
        psd: bool = False,
        diag: Tensor | None = None,
        classes: int | None = None,
    ):
        self.G, self._Lam, self.diag = G, Lam, diag
        self._Lam_given = Lam is not None  # (not formed from the closed forms below)
        self.softmax_p, self.softmax_w = softmax if softmax is not None else (None, None)
        # per position: p (B, C T) and w (B, T) of outputs (B, C, T) flattened per example, a softmax over
        # the C classes at each of the T positions (a per-position cross-entropy); None: over all outputs
        self.classes = classes
        # Lambda positive semidefinite by its closed form (cross-entropy, MSE, BCE): a negative eigenvalue
        # of the computed one is rounding (diag(p) - p p^T of a confident softmax cancels in float32)
        self.psd = psd
        self.batch, self.d_in = G.shape
        self.d_out, self.p = 1, 0

    @property
    def Lam(self) -> Tensor | None:
        """``Lambda`` (B, C, C), formed on first use from ``softmax``; a :class:`TooLargeError` beyond
        :data:`MAX_LAMBDA_ENTRIES`."""
        if self._Lam is None and self.softmax_p is not None:  # (its products with the identity)
            check_output_curvature_size(self.batch, self.d_in, "the loss")
            eye = torch.eye(self.d_in, dtype=self.G.dtype, device=self.G.device)
            self._Lam = self.hzz(eye.expand(self.batch, -1, -1))
        elif self._Lam is None and self.diag is not None:
            check_output_curvature_size(self.batch, self.d_in, "the loss")
            self._Lam = torch.diag_embed(self.diag)
        return self._Lam

    def example_factor(self, rows: slice = slice(None)) -> tuple[Tensor, Tensor] | None:
        """``(F, S)`` with ``Lambda_n = F_n diag(S_n) F_n^T`` exactly, for the examples in ``rows``, from the
        closed form -- no eigendecomposition, whose eigenvalues carry ``u ||Lambda_n||`` absolute error (a
        confident pixel's ``p (1 - p) = 2e-16`` came out 10% off, and the Jacobian scaled it up to 1e-6 of
        the diagonal): a loss of a term per output, ``F = I`` and ``S`` its diagonal; a softmax at each of
        ``T`` positions, ``diag(p) - p p^T = F F^T`` with ``F = (I - p 1^T) diag(sqrt p)``, its column ``j``
        ``sqrt(p_j) (e_j - p)``, whose entry ``1 - p_j`` at a confident class is the sum of the others
        (:func:`softmax_curvature`'s rule), and ``S`` the positions' weights. None for another ``Lambda``."""
        if self.diag is not None:
            d = self.diag[rows]
            eye = torch.eye(self.d_in, dtype=d.dtype, device=d.device)
            return eye.expand(d.shape[0], -1, -1), d
        if self.softmax_p is None or self._Lam_given:
            return None
        p = self.softmax_p[rows]
        k = p.shape[0]
        C = self.classes or self.d_in
        P = p.reshape(k, C, -1)  # (k, C, T): classes at each position
        T = P.shape[-1]
        top = P > 0.5
        rest = P.masked_fill(top, 0.0).sum(1)  # (k, T): 1 - p_j where class j is confident there
        M = torch.eye(C, dtype=p.dtype, device=p.device)[None, :, :, None] - P[:, :, None, :]  # (k, i, j, T)
        diag = M.diagonal(dim1=1, dim2=2)  # (k, T, C): the entries 1 - p_j
        diag.copy_(torch.where(top.transpose(1, 2), rest[:, :, None], diag))
        cols = M * P.sqrt()[:, None, :, :]  # column j at position t: sqrt(p_j) (e_j - p)
        F = p.new_zeros(k, C, T, C, T)
        t = torch.arange(T, device=p.device)
        F[:, :, t, :, t] = cols.permute(3, 0, 1, 2)
        w = self.softmax_w[rows].reshape(k, 1, -1).expand(k, C, T)
        return F.reshape(k, C * T, C * T), w.reshape(k, C * T)

    def is_zero(self) -> bool:
        """Whether ``Lambda`` is zero (an L1 loss; the Gauss-Newton matrix is then zero)."""
        if self.diag is not None:
            return not bool(self.diag.any())
        return self.softmax_p is None and self._Lam is not None and not bool(self._Lam.any())

    def jx(self, v: Tensor) -> Tensor:
        return v.new_zeros(1, 1, v.shape[-1])

    def jz(self, t: Tensor) -> Tensor:
        return torch.einsum("nc,nck->k", self.G, t).view(1, 1, -1)

    def jzT(self, s: Tensor) -> Tensor:
        return self.G[:, :, None] * s[0, 0][None, None, :]

    def _softmax_hzz(self, t: Tensor) -> Tensor:
        """``Lambda t`` for t (B, C T, k) of the per-position softmax form: at each position
        ``w (p o t - p (p . t))`` over the classes (:func:`softmax_curvature`)."""
        B, C, k = self.batch, self.classes, t.shape[-1]
        p = self.softmax_p.view(B, C, -1, 1)
        w = self.softmax_w.view(B, 1, -1, 1)
        return (w * softmax_curvature(p, t.reshape(B, C, -1, k), 1)).reshape(B, -1, k)

    def hzz(self, t: Tensor) -> Tensor:
        if self._Lam is None and self.softmax_p is not None and self.classes is not None:
            return self._softmax_hzz(t)
        if self._Lam is None and self.softmax_p is not None:
            return self.softmax_w[:, :, None] * softmax_curvature(self.softmax_p[:, :, None], t, 1)
        if self._Lam is None and self.diag is not None:
            return self.diag[:, :, None] * t
        Lam = self.Lam
        return torch.zeros_like(t) if Lam is None else torch.bmm(Lam, t)

    def riccati(self, Sigma: Tensor, coupled: bool = True) -> RiccatiBlocks:
        B, C = self.G.shape
        Qzz = None
        if coupled:
            Qzz = Sigma.reshape(()) * torch.einsum("ni,mj->nimj", self.G, self.G)
            Lam = self.Lam
            if Lam is not None:
                Qzz = add_blockdiag(Qzz, Lam)
        return RiccatiBlocks(Sigma.new_zeros(0, 0), Sigma.new_zeros(0, B, C), Qzz)


def _keeps_examples_apart(G: Tensor, y: Tensor) -> bool:
    """Whether the loss's second derivatives couple no two examples here, exactly: for each bit of the
    examples' index, ``d (G . v) / dy`` with seeded ``v`` on the examples whose bit is set is zero on the
    others (any two examples differ in a bit; ``ceil(log2 B)`` backward passes). The check of a loss's
    per-example rows against a product with the whole batch compares values relative to their own size,
    and at confident softmax outputs (``p (1 - p) = 1e-17``, below the rounding of the terms that cancel
    in it) rounding alone failed it: a lambda around ``F.cross_entropy`` refused as mixing examples,
    hundreds of steps into training. A loss that mixes examples (batch statistics, a contrastive term)
    has nonzero cross terms."""
    from hessinv.stages.generic import _grads

    B = y.shape[0]
    gen = torch.Generator(device="cpu").manual_seed(2468)
    n = torch.arange(B, device=y.device)
    for bit in range(max(1, (B - 1).bit_length())):
        side = ((n >> bit) & 1).bool()
        V = torch.randn(G.shape, generator=gen, dtype=torch.float64).to(G) * side[:, None]
        h = _grads((G * V).sum(), [y])[0].reshape(B, -1)
        if bool(h[~side].ne(0).any()):
            return False
    return True


class _Precisions(TorchFunctionMode):
    """Records the floating dtypes of the tensors that the torch functions called inside it return and
    that require grad: those on the derivative path (a float32 mask in a float64 loss is data)."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_function__(self, func, _types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, Tensor) and t.is_floating_point() and t.requires_grad:
                self.dtypes.add(t.dtype)
        return out


class LossStage:
    """The fused loss: per-example terms, their scale, and their derivatives.

    Closed forms, with ``p = softmax(y_n)``, the target distribution ``q_n`` (one-hot or given
    probabilities, label smoothing applied: ``q <- (1 - eps) q + eps / C``) and ``|q| = sum_c q_c``:

    ===============  ===========================  ==================  ==========================
    loss             ``ell(y_n)``                 gradient            Hessian
    ===============  ===========================  ==================  ==========================
    cross-entropy    ``-q . log p``               ``|q| p - q``       ``|q| (diag p - p p^T)``
    MSE              ``||y_n - t_n||^2``          ``2 (y_n - t_n)``   ``2 I``
    BCE with logits  ``sum softplus(y) - t y``    ``sigma(y) - t``    ``diag(sigma (1 - sigma))``
    ===============  ===========================  ==================  ==========================

    (examples with ``ignore_index`` contribute nothing). ``linearize`` checks that ``scale * sum_n ell``
    matches the module's own loss. Any other loss: plain autograd (module docstring).

    Args:
        loss_fn: the loss, ``loss_fn(outputs, targets) -> scalar``.
        targets: the batch's targets (they "ride along" the chain, seed §Notation), already passed
            through :func:`prepare_targets`.
        output: the last stage's output (its shape picks the closed form).
        named: the loss the messages name, where ``loss_fn`` stands in for the user's (default:
            ``loss_fn``).
    """

    def __init__(
        self, index: int, loss_fn: Callable, targets: Tensor, output: Tensor, named: Callable | None = None
    ):
        self.index, self.loss_fn, self.targets = (
            index,
            loss_fn,
            targets.detach(),
        )  # data: never differentiated
        self.name = f"stage {index} ({loss_name(loss_fn if named is None else named)})"
        # closed forms for (batch, classes) outputs; others (a (B,) regression output, (B, C, T) logits of
        # a per-position cross-entropy) by autograd on the per-example flattened outputs
        self.closed = closed_form(loss_fn) if output.dim() == 2 else None
        self.elementwise = self.softmax_classes = False
        per = None if self.closed is None else self._per_example(self.closed, targets, output)
        if per is not None:
            self.kind, self.q, self.scale = per
        else:  # (no closed form, or declined: class weights whose mean has a zero denominator here)
            self.closed = None
            self.kind, self.q, self.scale = "autograd", None, 1.0
            fn = loss_fn.func if isinstance(loss_fn, functools.partial) else loss_fn
            elementwise = _torch_forward(fn, _ELEMENTWISE) or fn in _ELEMENTWISE_FUNCTIONS
            # a sum (or mean) of one term per output entry: its Lambda is diagonal
            self.elementwise = plain_module(loss_fn) and elementwise
            # a cross-entropy over axis 1 (per position, or class-weighted): a softmax form per position,
            # its weight read by a probe (the form holds by torch's definition). Not probed for other
            # losses: the probe's tests are relative to w |p o v|, vacuous where w is large -- a loss
            # nonlinear in each example's cross-entropy (sum CE_n^2) at a confidently misclassified
            # example passed them, its matrix 28% off (a fuzzer's find); a lambda around F.cross_entropy
            # takes autograd's Lambda, whose per-example check the examples' exact separation backs
            self.softmax_classes = (
                plain_module(loss_fn)
                and (_torch_forward(fn, (nn.CrossEntropyLoss,)) or fn is F.cross_entropy)
                and output.dim() >= 2
            )
            if elementwise and targets.shape != output.shape:
                hint = (
                    f"; reshape them: targets.view({', '.join(['-1', *map(str, output.shape[1:])])})"
                    if targets.numel() == output.numel()
                    else ""
                )
                raise ShapeMismatchError(
                    f"{self.name}: targets {tuple(targets.shape)} != outputs {tuple(output.shape)}: the loss "
                    f"would broadcast them, every output against every target{hint}"
                )
            with torch.enable_grad():
                first = self.call(output.detach())
                rng = _rng_state(output.device)
                depends = first.requires_grad
                y = output.detach().clone().requires_grad_(True)
                with _Precisions() as seen_dtypes:
                    again = self.call(y)
            low = [d for d in seen_dtypes.dtypes if torch.finfo(d).eps > torch.finfo(y.dtype).eps]
            if low:
                # (a cast down inside the loss -- o.bfloat16(), what autocast does to a loss --: its value and
                # derivatives rounded to that dtype's precision, 3.6e-3 off in float32: a dtype probe's find)
                raise DtypeMismatchError(
                    f"{self.name}: loss_fn computes in {low[0]} inside (a cast such as .bfloat16() or "
                    f".half()) for {y.dtype} outputs: its derivatives would have {low[0]}'s precision; "
                    "hessinv computes in the model's dtype: compute the loss in it (no casts inside loss_fn)"
                )
            # random: two values differ, or the second call moved torch's generator on (a rare dropout
            # draw can leave both values alike while later calls differ; a loss that seeds the generator
            # itself leaves it where the first call did)
            drew = any(not torch.equal(a, b) for a, b in zip(rng, _rng_state(output.device), strict=True))
            if drew or (
                not torch.equal(first.detach(), again.detach())
                and bool(torch.isfinite(first) | torch.isfinite(again))
            ):
                seen = (
                    "drew random numbers"
                    if drew
                    else f"returned {first.item():.17g} and then {again.item():.17g} for the same outputs "
                    "and targets"
                )
                raise UnsupportedStageError(
                    f"{self.name}: loss_fn {seen} (dropout or noise inside it?); hessinv differentiates a "
                    "deterministic loss: move the randomness out of loss_fn (into the model, in eval mode, "
                    "or into the data)"
                )
            if not depends and not again.requires_grad and bool(again.detach() != 0):
                # (a loss of exactly 0 without a path -- `return torch.tensor(0.)` for a batch with nothing
                # to learn from -- has zero derivatives indeed)
                raise UnsupportedStageError(
                    f"{self.name}: the loss does not depend on the outputs through autograd (outputs "
                    "detached, rounded, thresholded or compared inside loss_fn?), so its derivatives "
                    "would read as zero; pass a loss that autograd can differentiate in the outputs"
                )
            if depends:  # e.g. a weight penalty inside loss_fn: its derivatives would be left out
                raise UnsupportedStageError(
                    f"{self.name}: loss_fn depends on tensors that require grad besides the model's output "
                    "(a weight penalty or learnable loss parameters?); hessinv differentiates the loss "
                    "through the output only: pass a loss of (outputs, targets) alone -- a loss module's "
                    "own parameters frozen (requires_grad_(False)) are constants of it, which is exact; an "
                    "L2 penalty is hessinv.optim.Newton(weight_decay=...) (exact), or a damping of the "
                    "operator's solves"
                )

    def _per_example(
        self, loss_fn: nn.Module, t: Tensor, y: Tensor
    ) -> tuple[str, Tensor | None, float] | None:
        """``(kind, q, scale)``: ``q`` the smoothed target distribution (cross-entropy; zero rows for
        ignored examples), times the class weights where given (torch's ``-sum_c w_c q_c log p_c`` per
        example, the mean over ``sum_n w_{y_n}`` for class indices and over ``B`` for probabilities), else
        None; None where the closed form does not apply (class weights with a mean over a zero total: the
        autograd path says what it says)."""
        red = loss_fn.reduction
        B, C = y.shape
        if isinstance(loss_fn, nn.CrossEntropyLoss):
            eps = float(loss_fn.label_smoothing)
            w = None if loss_fn.weight is None else loss_fn.weight.detach().to(device=y.device, dtype=y.dtype)
            if w is not None and tuple(w.shape) != (C,):
                return None  # (torch's own error, from the autograd path)
            if t.is_floating_point():  # class probabilities
                if t.shape != y.shape:
                    hint = (
                        "; floating targets of shape (batch,) are read as probabilities: class indices "
                        "must be integers (targets.long())"
                        if t.shape == (B,)
                        else ""
                    )
                    raise ShapeMismatchError(
                        f"{self.name}: probability targets {tuple(t.shape)} != outputs {tuple(y.shape)}{hint}"
                    )
                q = ((1 - eps) * t + eps / C).to(y.dtype)
                return "ce", (q if w is None else q * w), (1.0 / B if red == "mean" else 1.0)
            if t.shape != (B,):
                if t.shape == (B, 1):
                    hint = "; squeeze the last axis (targets.squeeze(1))"
                elif t.shape == y.shape:
                    hint = (
                        "; one-hot targets: pass targets.argmax(1) as class indices, or "
                        "targets.to(outputs.dtype) as class probabilities"
                    )
                else:
                    hint = ""
                raise ShapeMismatchError(
                    f"{self.name}: class-index targets must be ({B},); got {tuple(t.shape)}{hint}"
                )
            keep = t != loss_fn.ignore_index
            kept = int(keep.sum())
            if kept == 0 and red == "mean":
                raise InvalidArgumentError(
                    f"{self.name}: every target equals ignore_index={loss_fn.ignore_index}, so the mean "
                    "loss is 0/0; give the batch at least one target to learn from"
                )
            valid = t[keep]
            if valid.numel() and (valid.min() < 0 or valid.max() >= C):
                raise ShapeMismatchError(f"{self.name}: class index out of range [0, {C})")
            q = F.one_hot(t.clamp(0, C - 1), C).to(y.dtype).mul_(1 - eps).add_(eps / C)
            q.mul_(keep[:, None].to(y.dtype))
            if w is None:
                return "ce", q, (1.0 / max(kept, 1) if red == "mean" else 1.0)
            # (w_{y_n} on the target's entry, w_c / C on the smoothing's: q o w)
            total = float(w[t.clamp(0, C - 1)][keep].sum())
            if red == "mean" and not total > 0:
                return None
            return "ce", q.mul_(w), (1.0 / total if red == "mean" else 1.0)
        if t.shape != y.shape:
            hint = (
                "; give the targets the outputs' shape (targets.unsqueeze(1))"
                if t.shape == (B,) and C == 1
                else "; give the targets the outputs' shape (targets.reshape(outputs.shape))"
                if t.numel() == y.numel()
                else ""
            )
            raise ShapeMismatchError(
                f"{self.name}: targets {tuple(t.shape)} != outputs {tuple(y.shape)}{hint}"
            )
        scale = 1.0 / (B * C) if red == "mean" else 1.0
        return ("bce" if isinstance(loss_fn, nn.BCEWithLogitsLoss) else "mse"), None, scale

    def derivatives(self, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-example ``(ell (B,), gradient (B, C), Hessian diagonal (B, C))``, unscaled (see the class
        table), of the MSE and BCE closed forms (the cross-entropy's: :meth:`_softmax_derivatives`)."""
        t = self.targets
        if self.kind == "bce":
            sig, sig_neg = torch.sigmoid(y), torch.sigmoid(-y)  # sigma (1 - sigma) as sigma(y) sigma(-y)
            # sigma(y) - t as (1 - t) - sigma(-y) where y > 0: sigma(y) - t cancels where both are near 1
            # (7e-4 off the Hessian at y = 30, a probe)
            grad = torch.where(y > 0, (1 - t) - sig_neg, sig - t)
            return (F.softplus(y) - t * y).sum(-1), grad, sig * sig_neg
        r = y - t
        return r.square().sum(-1), 2 * r, torch.full_like(y, 2.0)

    def call(self, y: Tensor) -> Tensor:
        """``loss_fn(y, targets)``, its failures and non-scalar results as named errors."""
        try:
            # (copies: a loss may modify its arguments in place, t.mul_(0.5), as plain torch allows once)
            out = self.loss_fn(unshared(y), unshared(self.targets))
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            hint = ""
            other = [
                f"{k} is {b.dtype}"
                for k, b in (self.loss_fn.named_buffers() if isinstance(self.loss_fn, nn.Module) else ())
                if b.is_floating_point() and b.dtype != y.dtype
            ]
            if isinstance(self.loss_fn, functools.partial):  # a partial's tensors (weight=...)
                other += [
                    f"{k} is {b.dtype}"
                    for k, b in self.loss_fn.keywords.items()
                    if isinstance(b, Tensor) and b.is_floating_point() and b.dtype != y.dtype
                ]
            if other:
                fix = (
                    f"convert the loss module with loss_fn.to({y.dtype})"
                    if isinstance(self.loss_fn, nn.Module)
                    else f"pass them in {y.dtype}"
                )
                raise DtypeMismatchError(
                    f"{self.name}: loss_fn's {', '.join(other)}, the outputs {y.dtype}: {fix}"
                ) from e
            t = self.targets
            if not t.is_floating_point() and t.dtype != torch.int64 and "Long" in str(e):
                raise DtypeMismatchError(
                    f"{self.name}: loss_fn(outputs, targets) failed on {self.targets.dtype} targets ({e}): "
                    "class indices are int64, convert them with targets.long()"
                ) from e
            if isinstance(self.loss_fn, nn.GaussianNLLLoss):
                hint = (
                    "; GaussianNLLLoss needs a variance: pass e.g. "
                    "lambda y, t: nn.GaussianNLLLoss()(y[:, :k], t, F.softplus(y[:, k:])) "
                    "with the model predicting mean and variance"
                )
            raise UnsupportedStageError(f"{self.name}: loss_fn(outputs, targets) failed: {e}{hint}") from e
        if isinstance(out, (tuple, list, dict)):  # (a loss with auxiliary outputs)
            raise UnsupportedStageError(
                f"{self.name}: the loss returned a {type(out).__name__}, not a tensor: pass a loss_fn that "
                "returns the scalar loss alone, e.g. lambda outputs, targets: my_loss(outputs, targets)"
                + ('["loss"]' if isinstance(out, dict) else "[0]")
            )
        if not isinstance(out, Tensor):  # (a Python number: .item() or float() inside the loss)
            raise UnsupportedStageError(
                f"{self.name}: the loss returned a {type(out).__name__}, not a tensor: it has no derivatives "
                "(a .item() or float() inside loss_fn); return the torch scalar itself"
            )
        if out.numel() != 1:
            shape = tuple(out.shape)
            raise UnsupportedStageError(
                f"{self.name}: the loss returned {shape}, not a scalar; use reduction='mean' or 'sum'"
            )
        if out.is_floating_point() and out.dtype != y.dtype:
            raise DtypeMismatchError(
                f"{self.name}: the loss of {y.dtype} outputs is {out.dtype}; hessinv computes in the model's "
                "dtype: compute the loss in it (no casts inside loss_fn)"
            )
        return out.reshape(())

    def linearize(self, y: Tensor) -> tuple[LossBlocks, Tensor]:
        """Per-example gradient and Hessian of the loss (Lambda is kept for Gauss-Newton too), and the
        loss ``scale * sum_n ell``."""
        if self.kind == "autograd":
            try:
                return self._autograd(y)
            except UnsupportedStageError:  # (a RuntimeError too)
                raise
            except RuntimeError as e:  # "derivative for aten::multi_margin_loss_backward is not implemented"
                lf = self.loss_fn
                hinge = type(lf) is nn.MultiMarginLoss and lf.p == 1 and lf.weight is None
                raise UnsupportedStageError(
                    f"{self.name}: autograd cannot differentiate the loss twice ({e}); use a loss with a "
                    "second derivative (cross-entropy, MSE, Huber, ...)"
                    + (
                        f"; this one written with clamp, ({lf.margin:g} - o.gather(1, t[:, None]) + "
                        "o).clamp(min=0).scatter(1, t[:, None], 0).sum(1).mean() / o.shape[1] (reduction "
                        "'mean'), is taken: piecewise linear, its second derivative in the outputs is 0"
                        if hinge
                        else ""
                    )
                ) from e
        if self.kind == "ce":
            ell, G, (p, w) = self._softmax_derivatives(y.detach())
            # (PSD where every row's target mass is >= 0: probability targets may sum to anything)
            psd = self.scale >= 0 and bool((w >= 0).all())
            return LossBlocks(self.scale * G, None, (p, w.mul_(self.scale)), psd=psd), self.scale * ell.sum()
        ell, G, lam = self.derivatives(y.detach())
        blocks = LossBlocks(self.scale * G, None, psd=self.scale >= 0, diag=lam.mul_(self.scale))
        return blocks, self.scale * ell.sum()

    def _softmax_derivatives(self, y: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
        """Cross-entropy: ``(ell, gradient, (p, |q|))`` with ``Lambda_n = |q_n| (diag p_n - p_n p_n^T)``."""
        q = self.q
        assert q is not None
        logp = F.log_softmax(y, -1)
        p = logp.exp()
        mass = q.sum(-1)
        g = mass[:, None] * p - q
        if g.shape[-1] > 1:  # the likeliest class's entry as minus the others' sum (the entries sum to 0):
            # mass p_k - q_k cancels at a confident prediction (p_k = 1 - 1e-13: the gradient 3% off at a
            # logit margin of 36, the Hessian 4e-6; a probe), the others' entries are accurate
            k = p.argmax(-1, keepdim=True)
            g.scatter_(-1, k, 0.0)
            g.scatter_(-1, k, -g.sum(-1, keepdim=True))
        return -(q * logp).sum(-1), g, (p, mass[:, None])

    def _check_finite_curvature(self, lam: Tensor) -> None:
        """A :class:`NonFiniteError` that names the loss where its second derivative in the outputs is not
        finite (``|r|^1.5`` or a Euclidean norm at a residual of exactly 0): the operator was built, its
        ``to_dense()`` all NaN, and every product said "overflows ... scale it down" (a probe)."""
        if not linalg.all_finite(lam):
            raise NonFiniteError(
                f"{self.name}: the loss's second derivative in the outputs is not finite at these outputs "
                "(a loss like |r|^1.5 or a norm of the residual, at a residual of exactly 0, has none): it "
                "has no Hessian there; use a loss twice differentiable at the point (a squared norm, or add "
                "a small epsilon inside the root)"
            )

    def _check_second_derivative(self, y: Tensor, G: Tensor, change: Callable[[Tensor], Tensor]) -> None:
        """Raise :class:`UnsupportedStageError` where autograd's second derivative of the loss is not the
        change of its gradient ``G = dL/dy``: ``change(h)`` (``Lambda h`` per example, zero where ``G`` has
        no graph) against ``G(y + h) - G(y)`` for ``h ~ sqrt(u) (1 + |y|)`` in every entry. A gradient that
        autograd cannot differentiate -- a ``torch.compile``-d function inside ``loss_fn``, a custom
        ``autograd.Function`` whose backward is not itself differentiable, or has a graph that does not
        reach the outputs -- reads as zero there (47% off the Hessian, the Gauss-Newton matrix zero, with no
        error: a probe). A piecewise constant gradient (a loss linear in the outputs, or made of kinks: a
        hinge, ``clamp``, ``maximum``, a quantile loss) is told apart by the step ``2 h``: a smooth gradient
        changes twice as much, one crossing a kink by the same jump at both (its second derivative, zero
        almost everywhere, is right); both ways, ``h`` and ``-h``: an output exactly at a kink changes
        smoothly on one side only, where autograd takes the other's one-sided value. (A loss of many outputs
        spaced below ``sqrt(u)`` apart that it sorts can look smooth and be refused.)"""
        from hessinv.stages.generic import _grads

        if not G.numel():
            return
        gen = torch.Generator(device="cpu").manual_seed(1234)
        dy = torch.rand(y.shape, generator=gen, dtype=torch.float64).to(y) + 0.5  # (0.5, 1.5): every entry
        eps = torch.finfo(y.dtype).eps
        step = math.sqrt(eps) * (1 + y.detach().abs()) * dy
        G0 = G.detach()

        def moved(k: float) -> Tensor:  # G at y + k step, minus G
            yk = (y.detach() + k * step).requires_grad_(True)
            with torch.enable_grad():
                return _grads(self.call(yk), [yk])[0].reshape(G0.shape) - G0

        def side(sign: float) -> tuple[Tensor, Tensor]:
            """(changed, missed) per entry, stepping by ``sign * step``."""
            d1, d2 = moved(sign), moved(2 * sign)
            # per entry, beyond its own rounding (one large residual elsewhere must not hide a change)
            noise = 10 * eps * torch.maximum(G0.abs(), (G0 + d1).abs())
            changed = d1.abs() > noise
            # smooth: the change doubles with the step; a kink crossed: the same jump at both steps
            smooth = changed & ((d2 - 2 * d1).abs() <= 0.2 * d1.abs())
            # (missing: autograd's change below 0.4x the gradient's -- a cancelling gradient, sigmoid(y) - 1
            # at a confident logit, moves in steps of its rounding near 1, 10-25% off its derivative: a
            # tighter test refused lambda BCEs and BCEWithLogitsLoss(pos_weight=) at 2-6% of confident
            # margins; a review)
            wrong = (d1 - change(sign * step.reshape(G0.shape)).to(d1)).abs() > 0.6 * d1.abs() + 2 * noise
            return changed, smooth & wrong

        try:
            (changed, missed), (changed_back, missed_back) = side(1.0), side(-1.0)
        except (HessinvError, RuntimeError, ValueError):  # (outputs moved off the loss's domain: BCELoss's
            return  # probabilities of 1 - 1e-10 beyond 1 -- nothing to tell by)
        # missed on both sides: an output exactly at a kink (a Huber residual of exactly delta: autograd takes
        # the linear side's zero, one-sided as ReLU's at 0) changes smoothly on one side only (refused, a
        # probe: a zero-initialized head with targets of +-1)
        missed, changed = missed & missed_back, changed & changed_back
        if int(missed.sum()) and int(missed.sum()) >= 0.5 * int(changed.sum()):
            raise UnsupportedStageError(
                f"{self.name}: autograd cannot differentiate the loss's gradient (a torch.compile-d function "
                "inside loss_fn, or a custom autograd.Function whose backward is not differentiable in the "
                "outputs), while the gradient changes smoothly with them: the second derivative would read "
                "as zero. Pass a loss autograd can differentiate twice (the uncompiled function)"
            )

    def _per_position_softmax(self, y: Tensor, G: Tensor) -> LossBlocks | None:
        """A cross-entropy over the classes (axis 1) of outputs (B, C, ...): at each position its Hessian is
        ``w (diag p - p p^T)``, ``p`` the softmax there, whatever the class weights, label smoothing,
        ignored targets or reduction, which set the scalar ``w`` (0 where ignored). ``w`` is read from
        one product with a seeded vector and the form checked with another (None where it does not hold:
        the dense path then); a (B, C, C T, ...) matrix is not formed (a next-token model's C T = 8000
        outputs per example: 64M numbers each)."""
        from hessinv.stages.generic import _grads

        B, C = y.shape[0], y.shape[1]
        gen = torch.Generator(device="cpu").manual_seed(1234)
        p = torch.softmax(y.detach(), dim=1).reshape(B, C, -1)

        def probe() -> tuple[Tensor, Tensor, Tensor]:  # (Lambda v, p o (v - p . v), |p o v|) per position
            v = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(G).reshape(B, C, -1)
            hv = _grads((G * v.reshape(B, -1)).sum(), [y])[0].reshape(B, C, -1)
            return hv, softmax_curvature(p, v, 1), (p * v).abs()

        hv, u, _ = probe()
        # w from the classes other than a confident one (p > 1/2): autograd's entry there cancels (1 - p),
        # off by u / (1 - p) relative -- 1e-10 at p = 1 - 1e-6 -- and so would w be
        u = u.masked_fill(p > 0.5, 0.0)
        uu = (u * u).sum(1)
        w = torch.where(uu > 0, (hv * u).sum(1) / uu.clamp_min(torch.finfo(uu.dtype).tiny), 0.0)  # (B, T)
        hv2, u2, pv = probe()
        tol = 1e3 * torch.finfo(G.dtype).eps * (1 + C) ** 0.5
        # (relative to the terms before they cancel, w |p o v|: at a confident position p o v - p (p . v)
        # is far below them, and so is Lambda v, while its rounding is not)
        scale = max(float(hv2.abs().max()), float((w.abs()[:, None, :] * pv).max()), 1e-300)
        if float((w[:, None, :] * u2 - hv2).abs().max()) > tol * scale:
            return None
        psd = bool((w >= 0).all())
        return LossBlocks(G.detach(), None, (p.reshape(B, -1), w.detach()), psd=psd, classes=C)

    def _autograd(self, y: Tensor) -> tuple[LossBlocks, Tensor]:
        """``G = dL/dy`` and the per-example ``Lambda_n = d2 L / dy_n dy_n`` by plain autograd."""
        from hessinv.stages.generic import _backward_rows, _grads

        B = y.shape[0]
        y = y.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            loss = self.call(y)
            if not torch.isfinite(loss):
                why = nothing_to_learn(self.loss_fn, self.targets)
                if why is not None:  # (per-position targets, class weights: the closed form's check)
                    raise InvalidArgumentError(
                        f"{self.name}: {why}; give the batch at least one target to learn from"
                    )
                raise NonFiniteError(f"{self.name}: the loss is {loss.item()}")
            G = _grads(loss, [y], create_graph=True)[0].reshape(B, -1)
            if (
                G.requires_grad
                and torch.autograd.grad(G.sum(), y, retain_graph=True, allow_unused=True)[0] is None
            ):
                G = G.detach()  # (a graph that does not reach the outputs: none)
            if not G.requires_grad:
                self._check_second_derivative(y, G, torch.zeros_like)
            C = G.shape[1]
            if self.softmax_classes and G.requires_grad:
                blocks = self._per_position_softmax(y, G)
                if blocks is not None:
                    return blocks, loss.detach()
            if self.elementwise:  # torch's elementwise losses: Lambda is diagonal, the product with ones
                lam = _grads(G.sum(), [y])[0].reshape(B, C)
                gen = torch.Generator(device="cpu").manual_seed(4321)
                V = torch.randn(B, C, generator=gen, dtype=torch.float64).to(G)
                ref = _grads((G * V).sum(), [y])[0].reshape(B, C)
                tol = 1e3 * torch.finfo(G.dtype).eps
                if float((lam * V - ref).abs().max()) <= tol * max(float(ref.abs().max()), 1e-300):
                    self._check_finite_curvature(lam)
                    self._check_second_derivative(y, G, lambda h: lam.detach() * h)
                    return LossBlocks(G.detach(), None, diag=lam.detach()), loss.detach()
            check_output_curvature_size(B, C, self.name)

            def seeds(j: int, k: int) -> Tensor:  # rows j..j+k of every example's Lambda
                E = G.new_zeros(k, B, C)
                E[torch.arange(k), :, torch.arange(j, j + k)] = 1
                return E

            # all rows in a few batched backward passes (C of them one by one: a per-position
            # cross-entropy's C T outputs took 600 passes per curvature refresh); else one by one
            rows = _backward_rows(G, [y], C, seeds, True) if G.requires_grad else None
            if rows is not None:
                Lam = rows[0].reshape(C, B, C).permute(1, 0, 2).contiguous()
            else:
                Lam = y.new_zeros(B, C, C)
                for c in range(C):
                    Lam[:, c, :] = _grads(G[:, c].sum(), [y])[0].reshape(B, C)
            self._check_finite_curvature(Lam)
            if B > 1:
                gen = torch.Generator(device="cpu").manual_seed(4321)
                V = torch.randn(B, C, generator=gen, dtype=torch.float64).to(G)
                ref = _grads((G * V).sum(), [y])[0].reshape(B, C)
                ours = torch.bmm(Lam, V[:, :, None])[..., 0]
                tol = 1e3 * torch.finfo(G.dtype).eps * (1 + C) ** 0.5
                if float((ours - ref).abs().max()) > tol * max(
                    float(ref.abs().max()), float(ours.abs().max()), 1e-300
                ) and not _keeps_examples_apart(G, y):
                    raise UnsupportedStageError(
                        f"{self.name} mixes examples: it is not a sum of per-example terms of the outputs"
                    )
            if G.requires_grad:  # (else checked above)
                self._check_second_derivative(y, G, lambda h: torch.bmm(Lam.detach(), h[:, :, None])[..., 0])
        return LossBlocks(G.detach(), Lam), loss.detach()
