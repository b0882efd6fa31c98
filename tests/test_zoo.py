"""The model zoo: every entry is exact or refused with a named error -- nothing in between.

Exact entries are checked in float64 against plain ``torch.autograd`` double backward of the model
itself (hooks, parametrizations and all; ``reference.autograd_*``, not torch.func): the gradient,
Hessian and Gauss-Newton products, a positive-definite solve and the inertia at a shift inside a
spectral gap, each to 1e-10. Refused entries must raise the named error with the expected message.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import autograd_gauss_newton, autograd_gradient_hessian, autograd_hessian
from torch import nn

import hessinv
from hessinv import (
    DtypeMismatchError,
    InvalidArgumentError,
    NonFiniteError,
    NotAChainError,
    UnsupportedStageError,
)

B, D_IN, W, C = 5, 3, 4, 3
DT = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one torch thread (several threads on a loaded machine cost 20x here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@dataclass
class Case:
    model: nn.Module | list
    loss_fn: Callable
    inputs: torch.Tensor
    targets: torch.Tensor
    ref_targets: torch.Tensor | None = None  # what the reference loss is given (default: targets)
    error: tuple[type, str] | None = None  # (named error, regex of its message)
    ref_model: nn.Module | None = None  # the same function for the reference (default: model)
    # the Gauss-Newton reference's (model, loss) where hessinv splits elsewhere than at the output:
    # NLLLoss after a LogSoftmax is split at the logits (cross-entropy on them)
    gn_ref: tuple[nn.Module, Callable] | None = None


ZOO: dict[str, Callable[[], Case]] = {}


def entry(name: str):
    def deco(fn):
        ZOO[name] = fn
        return fn

    return deco


def gen(seed: int = 0) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def X(*shape) -> torch.Tensor:
    return torch.randn(B, *(shape or (D_IN,)), dtype=DT)


def classes(c: int = C) -> torch.Tensor:
    return torch.randint(0, c, (B,))


def randomize(module: nn.Module) -> nn.Module:
    """Non-trivial affine parameters (norm layers start at weight 1, bias 0)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return module


def ce_case(*mods, x=None, seed=0) -> Case:
    gen(seed)
    model = nn.Sequential(*mods).double()
    return Case(model, nn.CrossEntropyLoss(), X() if x is None else x, classes())


# -- every activation torch ships, fused after a Linear, in place or not --------------------------
ACTS = {
    "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "softplus": lambda: nn.Softplus(beta=2.0), "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "silu": nn.SiLU, "elu": nn.ELU, "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.2), "celu": nn.CELU, "selu": nn.SELU, "mish": nn.Mish,
    "softsign": nn.Softsign, "tanhshrink": nn.Tanhshrink, "hardtanh": nn.Hardtanh, "relu6": nn.ReLU6,
    "logsigmoid": nn.LogSigmoid, "hardsigmoid": nn.Hardsigmoid, "hardswish": nn.Hardswish,
    "hardshrink": lambda: nn.Hardshrink(0.1), "softshrink": lambda: nn.Softshrink(0.1),
    "threshold": lambda: nn.Threshold(0.1, -0.5), "rrelu_eval": lambda: nn.RReLU().eval(),
    "prelu": nn.PReLU, "prelu_channels": lambda: nn.PReLU(W), "softmax": lambda: nn.Softmax(dim=1),
    "log_softmax": lambda: nn.LogSoftmax(dim=1), "softmin": lambda: nn.Softmin(dim=1),
}  # fmt: skip
for _name, _act in ACTS.items():
    entry(f"act_{_name}")(lambda a=_act: ce_case(nn.Linear(D_IN, W), a(), nn.Linear(W, C)))
for _name in ("elu", "silu", "leaky_relu", "hardtanh", "selu", "celu", "mish", "relu", "relu6"):
    _cls = {"leaky_relu": nn.LeakyReLU, "relu6": nn.ReLU6}.get(_name) or getattr(nn, _name.upper(), None)
    _cls = _cls or {"silu": nn.SiLU, "hardtanh": nn.Hardtanh, "mish": nn.Mish, "relu": nn.ReLU}[_name]
    entry(f"inplace_{_name}")(
        lambda c=_cls: ce_case(
            nn.Linear(D_IN, W),
            c(inplace=True),
            nn.Linear(W, W),
            nn.Identity(),
            c(inplace=True),
            nn.Linear(W, C),
        )
    )


class HardsigmoidRef(nn.Module):
    """``relu6(x + 3) / 6``: Hardsigmoid with a double backward (torch has none for hardsigmoid)."""

    def forward(self, x):
        return F.relu6(x + 3) / 6


def _hardsigmoid() -> Case:
    case = ce_case(nn.Linear(D_IN, W), nn.Hardsigmoid(), nn.Linear(W, C))
    case.ref_model = nn.Sequential(case.model[0], HardsigmoidRef(), case.model[2])
    return case


ZOO["act_hardsigmoid"] = _hardsigmoid
entry("glu")(lambda: ce_case(nn.Linear(D_IN, 2 * W), nn.GLU(), nn.Linear(W, C)))
entry("no_bias")(lambda: ce_case(nn.Linear(D_IN, W, bias=False), nn.Tanh(), nn.Linear(W, C, bias=False)))
entry("standalone_acts")(
    lambda: ce_case(nn.Linear(D_IN, W), nn.Tanh(), nn.Sigmoid(), nn.GELU(), nn.Linear(W, C))
)
entry("nested_sequential")(
    lambda: ce_case(
        nn.Sequential(nn.Linear(D_IN, W), nn.Tanh()), nn.Sequential(nn.Sequential(nn.Linear(W, W)), nn.ELU())
    )
)
entry("identity_eval_dropout")(
    lambda: ce_case(nn.Linear(D_IN, W), nn.Identity(), nn.Softplus(), nn.Dropout(0.5).eval(), nn.Linear(W, C))
)


# -- losses and reductions ---------------------------------------------------------------------------
def loss_case(loss_fn, targets_fn, out=C, head=(), ref=None) -> Case:
    gen(1)
    model = nn.Sequential(nn.Linear(D_IN, W), nn.Tanh(), nn.Linear(W, out), *head).double()
    t = targets_fn()
    return Case(model, loss_fn, X(), t, ref(t) if ref else None)


def _probs():
    return torch.softmax(torch.randn(B, C, dtype=DT), 1)


for _red in ("mean", "sum"):
    entry(f"ce_{_red}")(lambda r=_red: loss_case(nn.CrossEntropyLoss(reduction=r), classes))
    entry(f"mse_{_red}")(
        lambda r=_red: loss_case(nn.MSELoss(reduction=r), lambda: torch.randn(B, C, dtype=DT))
    )
    entry(f"bce_{_red}")(
        lambda r=_red: loss_case(nn.BCEWithLogitsLoss(reduction=r), lambda: torch.rand(B, C, dtype=DT))
    )
    entry(f"huber_{_red}")(
        lambda r=_red: loss_case(nn.HuberLoss(reduction=r, delta=0.5), lambda: torch.randn(B, C, dtype=DT))
    )
entry("ce_ignore_index")(lambda: loss_case(nn.CrossEntropyLoss(ignore_index=1), classes))
entry("ce_label_smoothing")(lambda: loss_case(nn.CrossEntropyLoss(label_smoothing=0.2), classes))
entry("ce_probabilities")(lambda: loss_case(nn.CrossEntropyLoss(), _probs))
entry("ce_class_weights")(
    lambda: loss_case(nn.CrossEntropyLoss(weight=torch.rand(C, dtype=DT) + 0.5), classes)
)
entry("ce_functional")(lambda: loss_case(F.cross_entropy, classes))
entry("ce_functional_partial")(
    lambda: loss_case(functools.partial(F.cross_entropy, label_smoothing=0.1), classes)
)
entry("mse_functional")(lambda: loss_case(F.mse_loss, lambda: torch.randn(B, C, dtype=DT)))
for _dt in (torch.int32, torch.uint8, torch.int16):
    entry(f"ce_targets_{str(_dt)[6:]}")(
        lambda d=_dt: loss_case(nn.CrossEntropyLoss(), lambda: classes().to(d), ref=lambda t: t.long())
    )
entry("ce_targets_bool")(
    lambda: loss_case(nn.CrossEntropyLoss(), lambda: classes(2).bool(), out=2, ref=lambda t: t.long())
)
entry("bce_targets_int64")(
    lambda: loss_case(nn.BCEWithLogitsLoss(), lambda: torch.randint(0, 2, (B, C)), ref=lambda t: t.to(DT))
)
entry("bce_pos_weight")(
    lambda: loss_case(
        nn.BCEWithLogitsLoss(pos_weight=torch.rand(C, dtype=DT) + 0.5), lambda: torch.rand(B, C, dtype=DT)
    )
)


def _nll_case(loss_fn, ce) -> Case:
    case = loss_case(loss_fn, classes, head=(nn.LogSoftmax(dim=1),))
    case.gn_ref = (case.model[:-1], ce)
    return case


entry("nll_after_log_softmax")(lambda: _nll_case(nn.NLLLoss(), nn.CrossEntropyLoss()))
entry("nll_functional_sum")(
    lambda: _nll_case(functools.partial(F.nll_loss, reduction="sum"), nn.CrossEntropyLoss(reduction="sum"))
)
# outputs that are not (batch, classes): a scalar regression output, per-position logits
entry("mse_scalar_output")(
    lambda: loss_case(nn.MSELoss(), lambda: torch.randn(B, dtype=DT), out=1, head=(nn.Flatten(0),))
)
entry("ce_per_position_logits")(  # (B, C, T) logits against (B, T) classes, as CrossEntropyLoss takes them
    lambda: loss_case(
        nn.CrossEntropyLoss(), lambda: torch.randint(0, C, (B, 2)), out=2 * C, head=(nn.Unflatten(1, (C, 2)),)
    )
)
entry("ce_flattened_positions")(  # (B, T, C) logits, a lambda flattening the positions
    lambda: loss_case(
        lambda y, t: F.cross_entropy(y.reshape(-1, C), t.reshape(-1)),
        lambda: torch.randint(0, C, (B, 2)),
        out=2 * C,
        head=(nn.Unflatten(1, (2, C)),),
    )
)
entry("refused_loss_without_second_derivative")(
    lambda: refused(
        loss_case(nn.MultiMarginLoss(), classes),
        UnsupportedStageError, r"MultiMarginLoss\): autograd cannot differentiate the loss twice",
    )
)  # fmt: skip
entry("smooth_l1")(lambda: loss_case(nn.SmoothL1Loss(beta=0.5), lambda: torch.randn(B, C, dtype=DT)))
entry("l1")(lambda: loss_case(nn.L1Loss(), lambda: torch.randn(B, C, dtype=DT)))


def _kl_case() -> Case:  # split at the logits like NLL (cross-entropy with the probability targets)
    case = loss_case(nn.KLDivLoss(reduction="batchmean"), _probs, head=(nn.LogSoftmax(dim=1),))
    case.gn_ref = (case.model[:-1], nn.CrossEntropyLoss())
    return case


entry("kl_div_batchmean")(_kl_case)
entry("poisson_nll")(lambda: loss_case(nn.PoissonNLLLoss(), lambda: torch.rand(B, C, dtype=DT) * 3))
entry("gaussian_nll_heteroscedastic")(
    lambda: loss_case(
        lambda y, t: nn.GaussianNLLLoss()(y[:, :2], t, F.softplus(y[:, 2:])),
        lambda: torch.randn(B, 2, dtype=DT),
        out=4,
    )
)


# -- residual blocks and custom modules -----------------------------------------------------------
class Residual(nn.Module):
    def __init__(self, width: int, act=torch.tanh, norm: bool = False):
        super().__init__()
        self.norm = randomize(nn.LayerNorm(width)) if norm else None
        self.lin = nn.Linear(width, width)
        self.act = act

    def forward(self, z):
        h = self.lin(self.norm(z) if self.norm is not None else z)
        return z + self.act(h)


class ResNet(nn.Module):
    """A traced custom module: input layer, a loop of residual blocks, a head."""

    def __init__(self, depth: int = 3, pre_ln: bool = False):
        super().__init__()
        self.inp = nn.Linear(D_IN, W)
        self.blocks = nn.ModuleList(Residual(W, norm=pre_ln) for _ in range(depth))
        self.head = nn.Linear(W, C)

    def forward(self, x):
        x = torch.tanh(self.inp(x))
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)


class FunctionalNet(nn.Module):
    """Parameters used directly (F.linear, x @ w) and functional activations."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(W, D_IN, dtype=DT))
        self.b1 = nn.Parameter(torch.randn(W, dtype=DT))
        self.w2 = nn.Parameter(torch.randn(W, C, dtype=DT))

    def forward(self, x):
        h = F.gelu(F.linear(x, self.w1, self.b1))
        return h.sigmoid() @ self.w2


class FunctionalActivations(nn.Module):
    """Linear layers with activations written as calls: each pair is read as one structured stage."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(D_IN, W), nn.Linear(W, W), nn.Linear(W, W)
        self.l4 = nn.Linear(W, C)

    def forward(self, x):
        x = F.leaky_relu(self.l1(x), 0.1)
        x = F.softplus(self.l2(x), beta=2.0)
        x = self.l3(x).tanh()
        return F.gelu(self.l4(x), approximate="tanh")


class SequentialWithForward(nn.Sequential):
    """A Sequential subclass whose forward is not its children in order (issue 12, item 2)."""

    def forward(self, x):
        return self[1](torch.tanh(self[0](x)) * 2.0)


entry("residual_in_sequential")(
    lambda: ce_case(nn.Linear(D_IN, W), nn.Tanh(), Residual(W), Residual(W, F.elu))
)
entry("residual_no_activation")(
    lambda: ce_case(nn.Linear(D_IN, W), Residual(W, lambda h: h), nn.Linear(W, C))
)
entry("residual_traced_resnet")(lambda: Case(ResNet().double(), nn.CrossEntropyLoss(), X(), classes()))
entry("residual_pre_layernorm")(
    lambda: Case(ResNet(2, pre_ln=True).double(), nn.CrossEntropyLoss(), X(), classes())
)
entry("functional_custom_module")(lambda: Case(FunctionalNet(), nn.CrossEntropyLoss(), X(), classes()))
entry("functional_activations_traced")(
    lambda: Case(FunctionalActivations().double(), nn.CrossEntropyLoss(), X(), classes())
)
entry("sequential_subclass_forward")(
    lambda: Case(
        SequentialWithForward(nn.Linear(D_IN, W), nn.Linear(W, C)).double(),
        nn.CrossEntropyLoss(),
        X(),
        classes(),
    )
)
entry("single_linear_module")(
    lambda: Case(nn.Linear(D_IN, C).double(), nn.MSELoss(), X(), torch.randn(B, C, dtype=DT))
)
entry("list_of_modules")(
    lambda: Case(
        [nn.Linear(D_IN, W).double(), nn.Tanh(), nn.Linear(W, C).double()],
        nn.CrossEntropyLoss(),
        X(),
        classes(),
    )
)

# -- normalizations, convolutions, pooling --------------------------------------------------------
entry("layernorm_affine_mid")(
    lambda: ce_case(nn.Linear(D_IN, W), nn.Tanh(), randomize(nn.LayerNorm(W)), nn.Linear(W, C))
)
entry("layernorm_default_init")(
    lambda: ce_case(nn.Linear(D_IN, W), nn.Tanh(), nn.LayerNorm(W), nn.Linear(W, C))
)
entry("layernorm_no_affine")(
    lambda: ce_case(nn.Linear(D_IN, W), nn.LayerNorm(W, elementwise_affine=False), nn.Tanh(), nn.Linear(W, C))
)
entry("rmsnorm")(lambda: ce_case(nn.Linear(D_IN, W), randomize(nn.RMSNorm(W)), nn.Tanh(), nn.Linear(W, C)))
entry("groupnorm")(
    lambda: ce_case(nn.Linear(D_IN, W), randomize(nn.GroupNorm(2, W)), nn.Tanh(), nn.Linear(W, C))
)
entry("instancenorm_after_conv1d")(
    lambda: ce_case(
        nn.Conv1d(2, 3, 3), randomize(nn.InstanceNorm1d(3, affine=True)), nn.Tanh(), nn.Flatten(),
        nn.Linear(12, C), x=X(2, 6),
    )
)  # fmt: skip
entry("instancenorm_no_affine")(
    lambda: ce_case(nn.Conv1d(2, 3, 3), nn.InstanceNorm1d(3), nn.Flatten(), nn.Linear(12, C), x=X(2, 6))
)
entry("conv1d_maxpool")(
    lambda: ce_case(
        nn.Conv1d(2, 2, 3, padding=1), nn.Tanh(), nn.MaxPool1d(2), nn.Flatten(), nn.Linear(6, C), x=X(2, 6)
    )
)
entry("conv2d_avgpool")(
    lambda: ce_case(
        nn.Conv2d(1, 2, 3), nn.Softplus(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8, C), x=X(1, 6, 6)
    )
)
entry("conv2d_adaptive_pool_batchnorm_eval")(
    lambda: ce_case(
        nn.Conv2d(1, 2, 3), randomize(nn.BatchNorm2d(2)).eval(), nn.SiLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(8, C), x=X(1, 5, 5),
    )
)  # fmt: skip
# Linear layers applied to every position of (B, T, features) inputs (token / sequence models): the
# weight is shared across positions, so these go through the generic stage
entry("linear_on_positions")(
    lambda: ce_case(
        nn.Linear(D_IN, W), nn.Tanh(), nn.Linear(W, W), nn.Flatten(), nn.Linear(2 * W, C), x=X(2, D_IN)
    )
)
entry("linear_on_positions_residual")(
    lambda: ce_case(nn.Linear(D_IN, W), Residual(W), nn.Flatten(), nn.Linear(2 * W, C), x=X(2, D_IN))
)


def _token_ids(**embedding) -> Case:
    """An nn.Embedding first: integer inputs (token ids) are data, never differentiated."""
    case = ce_case(
        nn.Embedding(7, W, **embedding),
        nn.Flatten(),
        nn.Tanh(),
        nn.Linear(2 * W, W),
        nn.GELU(),
        nn.Linear(W, C),
    )
    case.inputs = torch.randint(0, 7, (B, 2))
    return case


def _token_id_per_example() -> Case:
    """One token id per example, inputs of shape (B,) (nn.Embedding's usual layout; it was refused as
    not (batch, features...))."""
    case = ce_case(nn.Embedding(7, W), nn.Tanh(), nn.Linear(W, W), nn.GELU(), nn.Linear(W, C))
    case.inputs = torch.randint(0, 7, (B,))
    return case


def _integer_images() -> Case:
    case = ce_case(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, C))
    case.inputs = torch.randint(0, 255, (B, 2, 6), dtype=torch.uint8)
    return case


def _token_ids_into_linear() -> Case:
    case = ce_case(nn.Linear(D_IN, W), nn.Tanh(), nn.Linear(W, C))
    case.inputs = torch.randint(0, 3, (B, D_IN))
    return case


class MathAttention(nn.Module):
    """The same model, with scaled_dot_product_attention on its math kernel (the fused CPU kernel has no
    double backward): the reference for attention entries."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.MATH]):
            return self.model(x)


def _transformer(norm_first: bool) -> Case:
    """Token ids -> embedding -> a transformer encoder layer (attention mixes the tokens of one
    example, never examples) -> a head."""
    layer = nn.TransformerEncoderLayer(W, 2, 8, dropout=0.0, batch_first=True, norm_first=norm_first)
    case = ce_case(nn.Embedding(7, W), randomize(layer), nn.Flatten(), nn.Linear(3 * W, C))
    case.inputs = torch.randint(0, 7, (B, 3))
    case.ref_model = MathAttention(case.model)
    return case


class GRUTuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(D_IN, W, batch_first=True)
        self.head = nn.Linear(W, C)

    def forward(self, x):
        return self.head(self.gru(x)[0][:, -1])


class OptionalArguments(nn.Module):
    """``forward(x, mask=None, scale=2.0)``: a chain at its defaults (traced there)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(D_IN, W), nn.Linear(W, C)

    def forward(self, x, mask=None, scale=2.0):
        h = torch.tanh(self.a(x)) * scale
        if mask is not None:
            h = h * mask
        return self.b(h)


def _compiled() -> Case:
    """A torch.compile-d model: traced through its original module (nothing is compiled here)."""
    case = ce_case(nn.Linear(D_IN, W), nn.Tanh(), nn.Linear(W, C))
    case.ref_model = case.model
    case.model = torch.compile(case.model)
    return case


entry("embedding_token_ids")(_token_ids)
entry("embedding_token_id_per_example")(_token_id_per_example)
entry("transformer_encoder_post_norm")(lambda: _transformer(False))
entry("transformer_encoder_pre_norm")(lambda: _transformer(True))
entry("gru_last_output")(lambda: ce_case(GRUTuple(), x=X(4, D_IN)))
entry("refused_rnn_returning_a_tuple")(
    lambda: refused(
        ce_case(nn.GRU(D_IN, W, batch_first=True), nn.Flatten(), nn.Linear(4 * W, C), x=X(4, D_IN)),
        NotAChainError, r"stage 0 \(GRU\) returns tuple, not one tensor .nn.RNN/LSTM/GRU return",
    )
)  # fmt: skip
entry("embedding_max_norm")(lambda: _token_ids(max_norm=0.5))
entry("refused_embedding_scale_grad_by_freq")(
    lambda: refused(
        _token_ids(scale_grad_by_freq=True), UnsupportedStageError, r"scale_grad_by_freq=True\) rescales"
    )
)
entry("refused_integer_images_into_conv")(
    lambda: refused(
        _integer_images(),
        DtypeMismatchError,
        r"inputs are torch.uint8, which stage 0 \(Conv1d\) does not take",
    )
)
entry("optional_arguments_at_defaults")(
    lambda: (gen(0), Case(OptionalArguments().double(), nn.CrossEntropyLoss(), X(), classes()))[1]
)
entry("torch_compiled")(_compiled)
entry("refused_token_ids_into_linear")(
    lambda: refused(
        _token_ids_into_linear(), DtypeMismatchError, "integer inputs .token ids. need a first module"
    )
)
entry("unflatten_conv1d")(
    lambda: ce_case(
        nn.Linear(D_IN, 8), nn.Unflatten(1, (2, 4)), nn.Conv1d(2, 1, 2), nn.Flatten(), nn.Linear(3, C)
    )
)
entry("batchnorm1d_eval")(
    lambda: ce_case(nn.Linear(D_IN, W), randomize(nn.BatchNorm1d(W)).eval(), nn.Tanh(), nn.Linear(W, C))
)


def _frozen(what: str) -> Case:
    case = ce_case(nn.Linear(D_IN, W), nn.Tanh(), nn.Linear(W, W), nn.ELU(), nn.Linear(W, C))
    if what == "layer":
        case.model[0].requires_grad_(False)
    else:
        case.model[2].bias.requires_grad_(False)
    return case


entry("frozen_first_layer")(lambda: _frozen("layer"))
entry("frozen_bias")(lambda: _frozen("bias"))


# -- parametrizations, old-style reparametrizations, hooks ----------------------------------------
def _param(kind: str) -> Case:
    case = ce_case(nn.Linear(D_IN, W), nn.Tanh(), nn.Linear(W, W), nn.Tanh(), nn.Linear(W, C))
    P = torch.nn.utils.parametrizations
    lin = case.model[2]
    if kind == "weight_norm":
        P.weight_norm(lin)
    elif kind == "orthogonal":
        P.orthogonal(lin)
    elif kind == "spectral_norm":
        P.spectral_norm(lin)
        case.model.eval()
    elif kind == "old_weight_norm":
        torch.nn.utils.weight_norm(lin)
    elif kind == "old_spectral_norm":
        torch.nn.utils.spectral_norm(lin)
        case.model(case.inputs)  # a few power iterations, then fixed
        case.model.eval()
    return case


for _kind in ("orthogonal", "spectral_norm", "old_spectral_norm"):
    entry(f"parametrization_{_kind}")(lambda k=_kind: _param(k))
# torch 2.13's double backward of _weight_norm is not symmetric (d grad_g / dv = 0): no exact Hessian.
# Its Gauss-Newton matrix (first derivatives only) is exact: test_weight_norm_gauss_newton.
for _kind in ("weight_norm", "old_weight_norm"):
    entry(f"refused_hessian_{_kind}")(
        lambda k=_kind: refused(
            _param(k), UnsupportedStageError, r"^stage 1 \(\w+\): autograd's second derivatives"
        )
    )


def _hooked(kind: str) -> Case:
    case = ce_case(nn.Linear(D_IN, W), nn.Tanh(), nn.Linear(W, C))
    lin = case.model[0]
    if kind == "forward":
        lin.register_forward_hook(lambda m, i, o: torch.sin(o) + o)
    else:
        lin.register_forward_pre_hook(lambda m, i: (i[0] * 0.5 + 1.0,))
    return case


entry("forward_hook_on_fused_linear")(lambda: _hooked("forward"))
entry("forward_pre_hook")(lambda: _hooked("pre"))


# -- refused, with a named error ------------------------------------------------------------------
def refused(case: Case, error: type, match: str) -> Case:
    case.error = (error, match)
    return case


class BatchMean(nn.Module):
    def forward(self, z):
        return z - z.mean(0, keepdim=True)


class FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D_IN, C)

    def forward(self, x):
        return F.dropout(self.lin(x), 0.5)


class Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D_IN, C)
        self.spare = nn.Linear(C, C)

    def forward(self, x):
        return self.lin(x)


class Backwards(nn.Module):
    def __init__(self):
        super().__init__()
        self.second = nn.Linear(W, C)
        self.first = nn.Linear(D_IN, W)

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


def _bn_nan() -> Case:
    case = ce_case(nn.Linear(D_IN, W), nn.BatchNorm1d(W).eval(), nn.Linear(W, C))
    case.model[1].running_var[0] = float("nan")
    return case


def _half(dtype) -> Case:
    case = ce_case(nn.Linear(D_IN, W), nn.Tanh(), nn.Linear(W, C))
    case.model.to(dtype)
    case.inputs = case.inputs.to(dtype)
    return case


def _backward_hook() -> Case:
    case = ce_case(nn.Linear(D_IN, W), nn.Tanh(), nn.Linear(W, C))
    case.model[2].register_full_backward_hook(lambda m, gi, go: None)
    return case


def _shared() -> Case:
    gen(0)
    lin = nn.Linear(W, W)
    return Case(
        nn.Sequential(nn.Linear(D_IN, W), lin, nn.Tanh(), lin).double(),
        nn.MSELoss(),
        X(),
        torch.randn(B, W, dtype=DT),
    )


entry("refused_batchnorm_training")(
    lambda: refused(
        ce_case(nn.Linear(D_IN, W), nn.BatchNorm1d(W), nn.Linear(W, C)),
        UnsupportedStageError, r"stage 1 \(BatchNorm1d\): BatchNorm1d in training mode .*model.eval",
    )
)  # fmt: skip
entry("refused_batchnorm_no_running_stats")(
    lambda: refused(
        ce_case(nn.Linear(D_IN, W), nn.BatchNorm1d(W, track_running_stats=False).eval(), nn.Linear(W, C)),
        UnsupportedStageError, "track_running_stats=False.*in eval mode too.*track_running_stats=True",
    )
)  # fmt: skip
entry("refused_dropout_training")(
    lambda: refused(
        ce_case(nn.Linear(D_IN, W), nn.Dropout(0.3), nn.Linear(W, C)),
        UnsupportedStageError, r"stage 1 \(Dropout\): Dropout in training mode is random",
    )
)  # fmt: skip
entry("refused_rrelu_training")(
    lambda: refused(
        ce_case(nn.Linear(D_IN, W), nn.RReLU(), nn.Linear(W, C)),
        UnsupportedStageError,
        "RReLU in training mode",
    )
)
entry("refused_functional_dropout")(
    lambda: refused(
        Case(FunctionalDropout().double(), nn.CrossEntropyLoss(), X(), classes()),
        UnsupportedStageError, r"stage 1 \(FunctionalDropout: dropout\) returns different outputs",
    )
)  # fmt: skip
entry("refused_old_spectral_norm_training")(
    lambda: refused(
        ce_case(nn.Linear(D_IN, W), torch.nn.utils.spectral_norm(nn.Linear(W, C))),
        UnsupportedStageError, r"stage 1 \(Linear\) updates its parameters or buffers",
    )
)  # fmt: skip
entry("refused_spectral_norm_training")(
    lambda: refused(
        ce_case(nn.Linear(D_IN, W), torch.nn.utils.parametrizations.spectral_norm(nn.Linear(W, C))),
        UnsupportedStageError, r"stage 1 \(ParametrizedLinear\) updates its parameters or buffers",
    )
)  # fmt: skip
entry("refused_batch_mixing_module")(
    lambda: refused(
        ce_case(nn.Linear(D_IN, W), BatchMean(), nn.Linear(W, C)),
        UnsupportedStageError, r"stage 1 \(BatchMean: mean\+sub\) mixes examples",
    )
)  # fmt: skip
entry("refused_nan_batchnorm_buffer")(
    lambda: refused(_bn_nan(), NonFiniteError, r"stage 1 \(BatchNorm1d\): buffer running_var contains NaN")
)
entry("refused_bfloat16")(
    lambda: refused(_half(torch.bfloat16), DtypeMismatchError, "bfloat16; hessinv works in")
)
entry("refused_float16")(
    lambda: refused(_half(torch.float16), DtypeMismatchError, "float16; hessinv works in")
)
entry("refused_unused_parameter")(
    lambda: refused(
        Case(Unused().double(), nn.CrossEntropyLoss(), X(), classes()),
        NotAChainError,
        "parameters spare.weight, spare.bias are trainable but the forward pass does not use them",
    )
)  # fmt: skip
# submodules registered in another order than forward uses them: vectors in model.parameters()'s order
entry("parameter_order")(lambda: Case(Backwards().double(), nn.CrossEntropyLoss(), X(), classes()))
entry("refused_backward_hook")(
    lambda: refused(_backward_hook(), UnsupportedStageError, "has a backward hook")
)
# a layer used twice by the model's own Sequential: the model called whole, one generic stage (a warning)
entry("shared_parameter")(_shared)
entry("refused_all_targets_ignored")(
    lambda: refused(
        loss_case(nn.CrossEntropyLoss(), lambda: torch.full((B,), -100)),
        InvalidArgumentError, "every target equals ignore_index=-100",
    )
)  # fmt: skip
entry("refused_loss_mixing_examples")(
    lambda: refused(
        loss_case(lambda y, t: (y - y.mean(0)).square().sum(), lambda: torch.randn(B, C, dtype=DT)),
        UnsupportedStageError, "mixes examples: it is not a sum of per-example terms",
    )
)  # fmt: skip


# -- what a traced forward hides (probe of 2026-12-02) ---------------------------------------------
class _GradReverse(torch.autograd.Function):
    """Identity forward, a scaled negative gradient: only its own backward says what it differentiates to."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -0.5 * g


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _WithFunction(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.a, self.b, self.fn = nn.Linear(D_IN, W), nn.Linear(W, C), fn

    def forward(self, x):
        return self.b(torch.tanh(self.fn.apply(self.a(x) * 3)))


for _fn in (_GradReverse, _StraightThrough):
    entry(f"custom_autograd_function_{_fn.__name__.strip('_')}")(
        lambda fn=_fn: Case(_WithFunction(fn).double(), nn.CrossEntropyLoss(), X(), classes())
    )


class _ScaledMSE(nn.Module):
    """A loss with a learnable scale: its curvature is not the output's alone."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones((), dtype=DT))

    def forward(self, y, t):
        return self.w * F.mse_loss(y, t)


class _Call(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, z):
        return self.fn(z)


class _Forward(nn.Module):
    """A two-layer net whose forward is given as a function of (self, h) for the middle."""

    def __init__(self, middle):
        super().__init__()
        self.a, self.b, self.middle = nn.Linear(D_IN, W), nn.Linear(W, C), middle

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(self.middle(self, h))


def _no_grad_middle(self, h):
    with torch.no_grad():
        s = h.square().sum(1, keepdim=True).sqrt()
    return h / s


def _discarded_in_place(self, h):
    h2 = h * 1.0
    h2.mul_(2)
    return h2


def _read_after_in_place(self, h):
    y = F.relu(h, inplace=True)
    return y + h


def _detach_middle(self, h):
    return h / h.square().sum(1, keepdim=True).sqrt().detach()


def _assigned_in_place(self, h):
    h = F.relu(h * 1.0, inplace=True)
    return h


def _top(middle) -> Case:
    """``_Forward(middle)`` as the model itself (traced at the top: what it cannot split is refused)."""
    gen(0)
    return Case(_Forward(middle).double(), nn.CrossEntropyLoss(), X(), classes())


def _numpy_scale_middle(self, h):
    return h / np.sqrt(W)  # a numpy scalar in the traced code


entry("numpy_scalar_in_forward")(lambda: _top(_numpy_scale_middle))
entry("detach_inside_forward")(lambda: ce_case(_Forward(_detach_middle)))
entry("in_place_result_assigned")(lambda: ce_case(_Forward(_assigned_in_place)))
# torch.no_grad inside a forward: what it computes is used through .detach(), as autograd sees it
entry("no_grad_inside_forward")(lambda: _top(_no_grad_middle))
entry("no_grad_inside_forward_in_a_sequential")(lambda: ce_case(_Forward(_no_grad_middle)))
# an in-place statement the traced graph would lose: inside a Sequential the module is called whole
entry("in_place_result_discarded_in_a_sequential")(lambda: ce_case(_Forward(_discarded_in_place)))
entry("refused_in_place_result_discarded")(
    lambda: refused(_top(_discarded_in_place), UnsupportedStageError, "in place .* as a statement")
)
entry("refused_in_place_operand_read_again")(
    lambda: refused(_top(_read_after_in_place), UnsupportedStageError, "in place .* reads it again")
)
entry("refused_cast_inside_model")(
    lambda: refused(
        ce_case(nn.Linear(D_IN, W), nn.Tanh(), nn.Linear(W, C), _Call(lambda z: z.float())),
        DtypeMismatchError, "returns torch.float32 in a torch.float64 model",
    )
)  # fmt: skip
entry("refused_loss_in_another_dtype")(
    lambda: refused(
        loss_case(lambda y, t: F.mse_loss(y.float(), t.float()), lambda: torch.randn(B, C, dtype=DT)),
        DtypeMismatchError, "the loss of torch.float64 outputs is torch.float32",
    )
)  # fmt: skip
entry("refused_loss_reading_parameters")(
    lambda: refused(
        loss_case(_ScaledMSE(), lambda: torch.randn(B, C, dtype=DT)),
        UnsupportedStageError, "besides the model's output",
    )
)  # fmt: skip
entry("refused_uninitialized_lazy_module")(
    lambda: refused(
        Case(nn.Sequential(nn.LazyLinear(W), nn.Tanh(), nn.Linear(W, C)), nn.CrossEntropyLoss(), X(),
             classes()),
        InvalidArgumentError, "lazy modules",
    )
)  # fmt: skip


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo(name):
    case = ZOO[name]()
    args = (case.model, case.loss_fn, case.inputs, case.targets)
    if case.error is not None:
        error, match = case.error
        with pytest.raises(error, match=match):
            hessinv.hessian(*args)
        return
    ref_t = case.targets if case.ref_targets is None else case.ref_targets
    ref_model = case.model if case.ref_model is None else case.ref_model
    g_ref, H_ref = autograd_gradient_hessian(ref_model, case.loss_fn, case.inputs, ref_t)
    H = hessinv.hessian(*args)
    n = H_ref.shape[0]
    assert H.shape == (n, n)
    assert rel(H.gradient, g_ref) <= 1e-10
    V = torch.randn(n, 2, dtype=DT)
    assert rel(H @ V, H_ref @ V) <= 1e-10
    # the exact diagonal by the sweep without elimination (relative to the matrix: entries may be 0)
    diag_ref = H_ref.diagonal()
    assert float((H.diagonal() - diag_ref).abs().max()) <= 1e-10 * float(H_ref.abs().max())
    # a positive-definite solve at a moderate condition number
    ev = torch.linalg.eigvalsh(H_ref)
    scale = float(ev.abs().max())
    eps = max(0.0, -float(ev[0])) + 0.5 * scale
    I = torch.eye(n, dtype=DT)
    x = H.solve(g_ref, damping=eps)
    assert rel(x, torch.linalg.solve(H_ref + eps * I, g_ref)) <= 1e-10
    assert rel(H.factor(eps).inverse_diagonal(), torch.linalg.inv(H_ref + eps * I).diagonal()) <= 1e-10
    # inertia at a shift in the middle of the widest spectral gap
    gaps = ev[1:] - ev[:-1]
    i = int(gaps.argmax())
    if float(gaps[i]) > 1e-6 * scale:
        shift = -float(ev[i] + ev[i + 1]) / 2
        inertia = H.inertia(shift, tol=0.0)
        assert (inertia.negative, inertia.positive) == (i + 1, n - i - 1)
    # Gauss-Newton products
    gn_model, gn_loss = case.gn_ref or (ref_model, case.loss_fn)
    G_ref = autograd_gauss_newton(gn_model, gn_loss, case.inputs, ref_t)
    G = hessinv.gauss_newton(*args)
    assert float((G @ V - G_ref @ V).norm()) <= 1e-10 * float((G_ref @ V).norm()) + 1e-13 * float(V.norm())
    assert float((G.diagonal() - G_ref.diagonal()).abs().max()) <= 1e-10 * float(G_ref.abs().max()) + 1e-300


@pytest.mark.parametrize("kind", ["weight_norm", "old_weight_norm"])
def test_weight_norm_gauss_newton(kind):
    """weight_norm: the Gauss-Newton matrix in the real parameters (g, v) is exact; n counts g and v."""
    case = _param(kind)
    G = hessinv.gauss_newton(case.model, case.loss_fn, case.inputs, case.targets)
    G_ref = autograd_gauss_newton(case.model, case.loss_fn, case.inputs, case.targets)
    n = sum(p.numel() for p in case.model.parameters())
    assert G.shape == (n, n) == tuple(G_ref.shape)
    V = torch.randn(n, 2, dtype=DT)
    assert rel(G @ V, G_ref @ V) <= 1e-10
    x = G.solve(G.gradient, damping=0.1)
    assert rel(x, torch.linalg.solve(G_ref + 0.1 * torch.eye(n, dtype=DT), G.gradient)) <= 1e-10


def test_traced_activations_are_structured_stages():
    chain = hessinv.Chain(FunctionalActivations(), nn.CrossEntropyLoss())
    assert [s.name for s in chain.stages] == [
        "stage 0 (Linear+leaky_relu)",
        "stage 1 (Linear+softplus)",
        "stage 2 (Linear+tanh)",
        "stage 3 (Linear+gelu)",
    ]


def test_zoo_size():
    """The issue's bar: at least 60 entries."""
    assert len(ZOO) >= 60


def test_float32_model_with_loss_buffers():
    """A loss module with floating buffers (class weights) follows the model into the float64 twin
    that refines float32 solves: the refined solve matches a dense float64 solve of the same Hessian."""
    gen(3)
    model = nn.Sequential(nn.Linear(D_IN, W), nn.Tanh(), nn.Linear(W, C))
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5]))
    x, t = X().float(), classes()
    H = hessinv.hessian(model, loss_fn, x, t)
    ref = copy.deepcopy(model).double()
    g_ref, H_ref = autograd_gradient_hessian(ref, copy.deepcopy(loss_fn).double(), x.double(), t)
    n = H_ref.shape[0]
    sol = H.factor(damping=1.0).solve(g_ref.float())
    assert sol.dtype == torch.float32
    exact = torch.linalg.solve(H_ref + torch.eye(n, dtype=DT), g_ref)
    assert rel(sol.double(), exact) <= 1e-6


@pytest.mark.parametrize(
    "name",
    ["embedding_token_ids", "embedding_token_id_per_example", "embedding_max_norm", "linear_on_positions"],
)
def test_float32_newton_and_refined_solve(name):
    """Entries outside the structured stages in float32: the refined solve (its float64 twin keeps
    token ids as integers) matches float64, and the default optimizer lowers the loss on a fixed batch."""
    case = ZOO[name]()
    model = case.model.float()
    x = case.inputs.float() if case.inputs.is_floating_point() else case.inputs
    H = hessinv.hessian(model, case.loss_fn, x, case.targets)
    g64, H64 = autograd_gradient_hessian(
        copy.deepcopy(model).double(), case.loss_fn, case.inputs, case.targets
    )
    sol = H.factor(damping=1.0).solve(g64.float())
    exact = torch.linalg.solve(H64 + torch.eye(H64.shape[0], dtype=DT), g64)
    assert rel(sol.double(), exact) <= 1e-6
    opt = hessinv.optim.Newton(model, case.loss_fn)
    first = float(opt.step(x, case.targets))
    for _ in range(20):
        last = float(opt.step(x, case.targets))
    assert last < 0.9 * first


def test_a_forward_that_assigns_attributes_leaves_the_model_as_it_was():
    """Tracing runs ``forward`` with fx's placeholders: ``self.x = ...`` used to leave a Proxy in the
    user's model (its next call raised NameError). The attributes are restored; such a module is called
    whole -- exact where the assignment is a cache (``self.feat = a``), refused by the stage's own check
    where it is state that changes call after call (an EMA buffer)."""
    from torch import nn

    import hessinv

    class Ema(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = nn.Linear(4, 4)
            self.register_buffer("run", torch.ones(4))

        def forward(self, h):
            self.run = 0.9 * self.run + 0.1 * h.detach().abs().mean(0)
            return torch.tanh(self.m(h / self.run))

    class Cache(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = nn.Linear(4, 4)

        def forward(self, h):
            a = torch.tanh(self.m(h))
            self.feat = a
            return a

    torch.manual_seed(0)
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    loss_fn = nn.CrossEntropyLoss()
    model = nn.Sequential(nn.Linear(5, 4), Ema(), nn.Linear(4, 3)).double()
    with pytest.raises(
        hessinv.UnsupportedStageError, match="updates its parameters or buffers on every call"
    ):
        hessinv.hessian(model, loss_fn, x, y)
    assert type(model[1].run) is torch.Tensor and torch.equal(
        model[1].run, torch.ones(4, dtype=torch.float64)
    )
    model(x)  # still callable
    for top in (False, True):  # Cache as a piece of a Sequential, and as the whole model
        model = nn.Sequential(nn.Linear(5, 4), Cache(), nn.Linear(4, 3)).double()
        if top:
            m, lf, xin, t = (
                model[1],
                nn.MSELoss(),
                model[0](x).detach(),
                torch.zeros(6, 4, dtype=torch.float64),
            )
        else:
            m, lf, xin, t = model, loss_fn, x, y
        H = hessinv.hessian(m, lf, xin, t)
        assert torch.allclose(
            H.to_dense(), autograd_gradient_hessian(m, lf, xin, t)[1], rtol=1e-10, atol=1e-12
        )
        assert all(not isinstance(v, torch.fx.Proxy) for v in vars(model[1]).values())
        assert not any(k.startswith("_tensor_constant") for k in vars(m))

    class Counted(nn.Module):  # a plain counter: traced through, and the trace does not move it
        def __init__(self):
            super().__init__()
            self.m, self.calls = nn.Linear(4, 4), 0

        def forward(self, h):
            self.calls += 1
            return torch.tanh(self.m(h))

    model = nn.Sequential(nn.Linear(5, 4), Counted(), nn.Linear(4, 3)).double()
    H = hessinv.hessian(model, loss_fn, x, y)
    assert model[1].calls == 0 and "Linear+tanh" in H.chain.stages[1].name  # traced, not called whole

    class Filled(nn.Module):  # the model itself fills a cache in place: traced, the cache left alone
        def __init__(self):
            super().__init__()
            self.a, self.b, self.cache, self.seen = nn.Linear(5, 4), nn.Linear(4, 3), {}, []

        def forward(self, h):
            a = torch.tanh(self.a(h))
            self.cache["a"] = a
            self.seen.append(h.shape[0])
            if hasattr(self, "nested"):
                self.nested["acts"].append(a)
            return self.b(a)

    top = Filled().double()
    import collections

    top.cache, top.nested = collections.OrderedDict(), {"acts": []}  # subclasses and nesting too
    H = hessinv.hessian(top, loss_fn, x, y)
    assert top.cache == {} and top.seen == [] and top.nested == {"acts": []} and len(H.chain.stages) == 2
    assert torch.allclose(
        H.to_dense(), autograd_gradient_hessian(top, loss_fn, x, y)[1], rtol=1e-10, atol=1e-12
    )
    with pytest.raises(
        hessinv.UnsupportedStageError, match="stores a value computed from its input in a buffer"
    ):
        hessinv.hessian(Ema().double(), nn.MSELoss(), x[:, :4], torch.zeros(6, 4, dtype=torch.float64))


class _Ensemble(torch.nn.Module):  # branches stacked on a new first dimension, then averaged
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, z):
        return torch.stack([torch.tanh(self.a(z)), torch.tanh(self.b(z))]).mean(0)


class _Twice(torch.nn.Module):  # one layer applied twice
    def __init__(self):
        super().__init__()
        self.l = torch.nn.Linear(4, 4)

    def forward(self, z):
        return self.l(torch.tanh(self.l(z)))


class _Transposed(torch.nn.Module):  # (W z^T)^T: the intermediate value is feature-first
    def __init__(self):
        super().__init__()
        self.W = torch.nn.Parameter(torch.randn(4, 4) / 2)

    def forward(self, z):
        return torch.tanh((self.W @ z.T).T)


class _OutOfOrder(torch.nn.Module):  # parameters registered in the other order than forward uses them
    def __init__(self):
        super().__init__()
        self.w2 = torch.nn.Parameter(torch.randn(4, 4) / 2)
        self.w1 = torch.nn.Parameter(torch.randn(4, 4) / 2)

    def forward(self, z):
        return torch.tanh(z @ self.w1) @ self.w2


class _Centered(torch.nn.Module):  # really mixes examples
    def __init__(self):
        super().__init__()
        self.l = torch.nn.Linear(4, 4)

    def forward(self, z):
        h = torch.tanh(self.l(z))
        return h - h.mean(0)


@pytest.mark.parametrize("block", [_Ensemble, _Twice, _Transposed, _OutOfOrder])
@pytest.mark.parametrize("batch", [5, 2])  # 2: the stacked dimension's size equals the batch's
def test_a_module_whose_pieces_are_not_a_chain_is_called_whole(block, batch):
    """Traced into pieces, these per-example modules were refused: intermediate values not batch-first
    ('not a tensor with the batch dimension first', or 'mixes examples' when the stacked size equals the
    batch), one layer shared by two pieces, parameters used out of registration order. Called whole
    (one generic stage) they are exact -- the last now split into its pieces, the operators' vectors
    permuted; a module that really mixes examples is still refused."""
    import hessinv

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), block(), torch.nn.Linear(4, 3)).double()
    x, y = torch.randn(batch, 5, dtype=torch.float64), torch.randint(0, 3, (batch,))
    loss_fn = torch.nn.CrossEntropyLoss()
    H = hessinv.hessian(model, loss_fn, x, y)
    if block is _OutOfOrder:  # (the operators split in the order of use: its pieces, vectors permuted)
        assert H.chain.permuted and f"({block.__name__})" not in [s.name for s in H.chain.stages][1]
    else:
        assert [s.name for s in H.chain.stages][1] == f"stage 1 ({block.__name__})"
    ref = autograd_gradient_hessian(model, loss_fn, x, y)[1]
    assert torch.allclose(H.to_dense(), ref, rtol=1e-10, atol=1e-12 * float(ref.abs().max()))
    G = hessinv.gauss_newton(model, loss_fn, x, y)
    assert torch.allclose(G.to_dense(), autograd_gauss_newton(model, loss_fn, x, y), rtol=1e-10, atol=1e-13)
    centered = torch.nn.Sequential(torch.nn.Linear(5, 4), _Centered(), torch.nn.Linear(4, 3)).double()
    with pytest.raises(
        hessinv.UnsupportedStageError, match=r"stage \d \(_Centered: mean\+sub\) mixes examples"
    ):
        hessinv.hessian(centered, loss_fn, x, y)


def test_a_failed_trial_of_calling_whole_changes_nothing():
    """A wrongly shaped batch makes a piece of a Sequential's submodule return a non-batch-first value;
    called whole, the submodule fails too: its pieces come back and the piece's error is raised (the
    module is not left whole for every later batch). ``Chain.forward`` computes without a graph."""
    import hessinv

    class Viewed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 3)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x.view(-1, 8))))

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Identity(), Viewed()).double()
    chain = hessinv.Chain(model, torch.nn.CrossEntropyLoss())
    names = [s.name for s in chain.stages]
    with pytest.raises(hessinv.NotAChainError, match=r"\(Viewed: view\) returns \(64, 8\)"):
        chain.forward(torch.randn(32, 16, dtype=torch.float64))
    assert [s.name for s in chain.stages] == names and len(names) > 2
    zs = chain.forward(torch.randn(32, 8, dtype=torch.float64))
    assert not zs[-1].requires_grad and [s.name for s in chain.stages] == names


class _Flipped(torch.nn.Module):  # per-example as a whole; its traced pieces reverse the batch
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, z):
        return self.b(torch.tanh(self.a(z.flip(0)))).flip(0)


def test_the_whole_call_fallback_edges(monkeypatch):
    """(1) A first Gauss-Newton linearization on one example shows no mixing: the test is not cached then,
    and a later batch still calls the module whole (its dense blocks were refused as 'mixes examples').
    (2) A call that fails after a trial passed (the loss refuses the targets) undoes the trial. (3) Where
    the whole call's dense blocks would be too large, its blocks are lazy (products by autograd), its
    Hessian exact. (4) per_example_gradients falls back as well."""
    import hessinv
    import hessinv.stages.generic as gen
    from hessinv.influence import per_example_gradients

    torch.manual_seed(0)
    loss_fn = torch.nn.CrossEntropyLoss()
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), _Flipped(), torch.nn.Linear(4, 3)).double()
    x, y = torch.randn(5, 5, dtype=torch.float64), torch.randint(0, 3, (5,))
    chain = hessinv.Chain(model, loss_fn)
    chain.linearize(x[:1], y[:1], second_order=False)
    G = hessinv.GaussNewton(model, loss_fn, x, y, chain=chain)
    assert torch.allclose(G.to_dense(), autograd_gauss_newton(model, loss_fn, x, y), rtol=1e-10, atol=1e-13)
    assert [s.name for s in chain.stages][1] == "stage 1 (_Flipped)"
    rows = per_example_gradients(model, loss_fn, x, y)
    assert rows.shape == (5, G.shape[0])
    chain = hessinv.Chain(model, loss_fn)
    names = [s.name for s in chain.stages]
    with pytest.raises(hessinv.ShapeMismatchError, match="class index"):
        chain.linearize(x, torch.full((5,), 7))  # the loss stage refuses after _Flipped passed whole
    assert [s.name for s in chain.stages] == names and not chain._whole
    monkeypatch.setattr(gen.GenericStage, "MAX_BLOCK_ENTRIES", 1000)  # beyond it: lazy blocks, exact
    H = hessinv.hessian(model, loss_fn, x, y)
    assert any(isinstance(b, gen.LazyBlocks) for b in H.blocks)
    assert torch.allclose(H.to_dense(), autograd_hessian(model, loss_fn, x, y), rtol=1e-10, atol=1e-13)


def test_tracing_puts_every_container_back_as_it_was():
    """A cache entry replaced by a list, nested lists shared between attributes, a list holding itself:
    after the split each container has its own content back, identities kept (a top-level model, traced)."""
    import hessinv

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)
            self.cache, self.inner = {"h": None}, [0]
            self.outer, self.by_key, self.loop = [self.inner], {"k": self.inner}, []
            self.loop.append(self.loop)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            self.cache["h"] = [h]
            self.outer.append(h)
            self.by_key["k"] = [h]
            return self.b(h)

    m = Model().double()
    hessinv.Chain(m, torch.nn.MSELoss())
    assert m.cache == {"h": None} and m.outer == [[0]] and m.outer[0] is m.inner and m.by_key["k"] is m.inner
    assert m.loop[0] is m.loop and len(m.loop) == 1


@pytest.mark.parametrize("act", [None, nn.Tanh()])
def test_a_linear_that_lists_its_bias_first_is_exact(act):
    """``torch.nn.utils.prune.remove`` (or re-registering a weight) leaves ``Linear.parameters()`` as
    (bias, weight); the structured Linear stage laid its blocks out as (weight, bias) regardless, so the
    gradient, the Hessian, the Gauss-Newton matrix and the optimizers' steps were of permuted
    parameters (gradient 0.7 off; found by a probe). Checked against autograd, and the preconditioned
    step against the same model with the usual order."""
    import torch.nn.utils.prune as prune

    torch.manual_seed(0)
    layers = [nn.Linear(4, 5)] + ([act] if act is not None else []) + [nn.Tanh(), nn.Linear(5, 3)]
    m = nn.Sequential(*layers).double()
    usual = copy.deepcopy(m)
    prune.l1_unstructured(m[0], "weight", amount=0.4)
    prune.remove(m[0], "weight")
    with torch.no_grad():
        usual[0].weight.copy_(m[0].weight)
    assert [n for n, _ in m.named_parameters()][:2] == ["0.bias", "0.weight"]
    X, y, lf = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,)), nn.CrossEntropyLoss()
    g_ref, H_ref = autograd_gradient_hessian(m, lf, X, y)
    H = hessinv.hessian(m, lf, X, y)
    torch.testing.assert_close(H.gradient, g_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(H.to_dense(), H_ref, rtol=1e-10, atol=1e-12)
    G = hessinv.gauss_newton(m, lf, X, y)
    torch.testing.assert_close(G.to_dense(), autograd_gauss_newton(m, lf, X, y), rtol=1e-10, atol=1e-12)
    U, S = G.root()
    torch.testing.assert_close(U.T @ (S[:, None] * U), G.to_dense(), rtol=1e-10, atol=1e-12)
    from hessinv.influence import per_example_gradients

    rows = per_example_gradients(m, lf, X, y)
    torch.testing.assert_close(rows.mean(0), g_ref, rtol=1e-10, atol=1e-14)
    # the optimizer: the same steps as the usual order, permuted
    perm = torch.cat([torch.arange(20, 25), torch.arange(20)])  # (bias, weight) <- (weight, bias)
    steps = []
    for net in (m, usual):
        opt = hessinv.optim.Newton(net, lf, seed=0, mode="precondition")
        x0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
        for _ in range(3):
            opt.step(X, y)
        steps.append(torch.cat([p.detach().reshape(-1) for p in net.parameters()]) - x0)
    rest = torch.arange(25, steps[0].numel())
    torch.testing.assert_close(steps[0][:25], steps[1][:25][perm], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(steps[0][rest], steps[1][rest], rtol=1e-9, atol=1e-12)


def _patched_models() -> list[tuple[str, nn.Module]]:
    torch.manual_seed(0)
    out = []
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    f0 = m[0].forward
    m[0].forward = lambda x: 2 * f0(x)  # an accelerate/peft-style wrapper on the instance
    out.append(("instance Linear", m))
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    f1 = m[1].forward
    m[1].forward = lambda x: f1(x) + 0.5 * x**2
    out.append(("instance Tanh", m))
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    f2 = m.forward
    m.forward = lambda x: 2 * f2(x)
    out.append(("instance Sequential", m))

    class Scaled(nn.Linear):
        def __call__(self, x):
            return 2 * super().__call__(x)

    out.append(("__call__ override", nn.Sequential(Scaled(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()))
    return out


@pytest.mark.parametrize("name", [n for n, _ in _patched_models()])
def test_a_module_whose_call_is_not_its_class_forward_is_called_as_it_is(name):
    """A ``forward`` replaced on the instance, or a ``__call__`` overridden by a subclass, was read as the
    layer its type names (a structured Linear, Tanh) or traced through the class's ``forward``: loss
    and/or curvature of another function, silently (found by a probe). Such modules are called as
    they are."""
    m = dict(_patched_models())[name]
    X, y, lf = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,)), nn.CrossEntropyLoss()
    g_ref, H_ref = autograd_gradient_hessian(m, lf, X, y)
    H = hessinv.hessian(m, lf, X, y)
    assert float(H.loss) == pytest.approx(float(lf(m(X), y)), rel=1e-14)
    torch.testing.assert_close(H.gradient, g_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(H.to_dense(), H_ref, rtol=1e-10, atol=1e-12)


def test_a_torch_class_whose_forward_was_replaced_is_called_as_it_is(monkeypatch):
    """``nn.Tanh.forward`` replaced outside torch (a monkeypatch): the structured stage used tanh's own
    derivatives (found by a probe)."""
    orig = nn.Tanh.forward
    monkeypatch.setattr(nn.Tanh, "forward", lambda self, x: orig(self, x) + 0.1 * x**2)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X, y, lf = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,)), nn.CrossEntropyLoss()
    g_ref, H_ref = autograd_gradient_hessian(m, lf, X, y)
    H = hessinv.hessian(m, lf, X, y)
    torch.testing.assert_close(H.to_dense(), H_ref, rtol=1e-10, atol=1e-12)


def test_an_fx_graph_module_is_still_read_stage_by_stage():
    """fx's ``GraphModule`` has its own ``__call__`` and a generated ``forward``: torch's own, not a
    customization (the check above must not make it one generic stage)."""
    import torch.fx as fx

    torch.manual_seed(0)
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double())
    H = hessinv.hessian(
        gm, nn.CrossEntropyLoss(), torch.randn(6, 4, dtype=torch.float64), torch.arange(6) % 3
    )
    assert [s.name for s in H.chain.stages] == ["stage 0 (Linear+Tanh)", "stage 1 (Linear)"]


def test_gauss_newton_splits_at_the_logits_per_position_and_for_log_targets():
    """``LogSoftmax(1)`` then ``NLLLoss`` on per-position outputs (B, C, T), and ``KLDivLoss(log_target=
    True)``, gave a zero Gauss-Newton matrix (the loss is linear in the log-probabilities; only a
    warning), while the same functions on (B, C) outputs, or with probability targets, are split at the
    logits (found by a probe). Both are now that cross-entropy's Gauss-Newton matrix; the loss and the
    gradient stay the loss's own."""
    torch.manual_seed(0)
    X, y = torch.randn(7, 2, 4, dtype=torch.float64), torch.randint(0, 3, (7, 3))
    conv = nn.Conv1d(2, 3, 2).double()
    model = nn.Sequential(conv, nn.LogSoftmax(1))
    G = hessinv.gauss_newton(model, nn.NLLLoss(), X, y)
    G_ce = hessinv.gauss_newton(nn.Sequential(conv), nn.CrossEntropyLoss(), X, y)
    torch.testing.assert_close(G.to_dense(), G_ce.to_dense(), rtol=1e-12, atol=1e-14)
    g_ref, _ = autograd_gradient_hessian(model, nn.NLLLoss(), X, y)
    torch.testing.assert_close(G.gradient, g_ref, rtol=1e-12, atol=1e-14)

    X2, lin = torch.randn(7, 4, dtype=torch.float64), nn.Linear(4, 3).double()
    t = torch.log_softmax(torch.randn(7, 3, dtype=torch.float64), 1)
    m2 = nn.Sequential(lin, nn.LogSoftmax(1))
    kl_log = nn.KLDivLoss(reduction="batchmean", log_target=True)
    G1 = hessinv.gauss_newton(m2, nn.KLDivLoss(reduction="batchmean"), X2, t.exp())
    G2 = hessinv.gauss_newton(m2, kl_log, X2, t)
    torch.testing.assert_close(G2.to_dense(), G1.to_dense(), rtol=1e-12, atol=1e-14)
    assert float(G2.to_dense().norm()) > 0.1
    g_ref, _ = autograd_gradient_hessian(m2, kl_log, X2, t)
    torch.testing.assert_close(G2.gradient, g_ref, rtol=1e-12, atol=1e-14)
    assert float(G2.loss) == pytest.approx(float(kl_log(m2(X2), t)), rel=1e-12)


def test_attributes_a_call_sets_on_torch_modules_are_put_back():
    """hessinv's own calls of the model leave plain attributes as they were; the save is skipped only
    where every module is one of torch's that keeps no state in its call -- not where a user's module
    runs, also when what it sets is an attribute of a torch module (``self.lin.calls += 1``)."""
    from torch import nn

    import hessinv

    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.lin.calls = 0

        def forward(self, h):
            self.lin.calls += 1
            return torch.tanh(self.lin(h))

    torch.manual_seed(0)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    loss_fn = nn.CrossEntropyLoss()
    for model in (nn.Sequential(Parent(), nn.Linear(4, 3)).double(), Parent().double()):
        lf = loss_fn if isinstance(model, nn.Sequential) else nn.MSELoss()
        t = y if isinstance(model, nn.Sequential) else torch.zeros(6, 4, dtype=torch.float64)
        H = hessinv.hessian(model, lf, x, t)
        lin = model.lin if isinstance(model, Parent) else model[0].lin
        assert lin.calls == 0  # (traced, then called by the gradient check: both put back)
        assert torch.allclose(H.to_dense(), autograd_gradient_hessian(model, lf, x, t)[1], atol=1e-12)
    plain = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    from hessinv.chain import _attributes

    assert _attributes(plain) == [] and _attributes(Parent()) != []  # (torch's own modules alone: no save)
    lstm = nn.LSTM(4, 4)  # (its forward refreshes _flat_weights)
    assert _attributes(nn.Sequential(lstm)) != []
