"""Deep MLP chains for ``hessinv train``: plain or residual, any elementwise activation.

``depth`` counts the ``Linear`` layers. A plain chain is ``Linear(d_in, w) act (Linear(w, w) act)*
Linear(w, d_out)``; a residual chain replaces each hidden ``Linear(w, w) act`` by a block
``z + act(Linear(w, w) z)``.

>>> net = build_model(64, 10, depth=4, width=8, activation="tanh", seed=0)
>>> [type(m).__name__ for m in net]
['Linear', 'Tanh', 'Linear', 'Tanh', 'Linear', 'Tanh', 'Linear']
>>> sum(p.numel() for p in net.parameters())
754
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hessinv.cli import choices
from hessinv.cli.choices import INITS

__all__ = ["ACTIVATIONS", "INITS", "ResidualBlock", "build_model"]

ACTIVATIONS: dict[str, type[nn.Module]] = {k: getattr(nn, v) for k, v in choices.ACTIVATIONS.items()}


class ResidualBlock(nn.Module):
    """``z + act(Linear(z))``: one stage of a residual chain."""

    def __init__(self, width: int, activation: str):
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.act = ACTIVATIONS[activation]()

    def forward(self, z: Tensor) -> Tensor:
        return z + self.act(self.linear(z))


def _init(m: nn.Linear, how: str, gain: float) -> None:
    if how == "xavier":
        nn.init.xavier_normal_(m.weight, gain=gain)
        nn.init.zeros_(m.bias)
    elif how == "orthogonal":
        nn.init.orthogonal_(m.weight, gain=gain)
        nn.init.zeros_(m.bias)


def build_model(
    input_dim: int,
    output_dim: int,
    depth: int = 16,
    width: int = 8,
    activation: str = "tanh",
    residual: bool = False,
    init: str = "torch",
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> nn.Sequential:
    """A deep MLP chain, initialized deterministically from ``seed``.

    ``init``: ``torch`` (PyTorch's default uniform init), ``xavier`` or ``orthogonal`` (with the
    activation's gain, zero biases).
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        layers: list[nn.Module] = []
        if depth == 1:
            layers.append(nn.Linear(input_dim, output_dim))
        else:
            layers += [nn.Linear(input_dim, width), ACTIVATIONS[activation]()]
            for _ in range(depth - 2):
                if residual:
                    layers.append(ResidualBlock(width, activation))
                else:
                    layers += [nn.Linear(width, width), ACTIVATIONS[activation]()]
            layers.append(nn.Linear(width, output_dim))
        if init != "torch":
            gain = nn.init.calculate_gain(activation) if activation in ("tanh", "relu", "sigmoid") else 1.0
            for m in layers:
                for sub in m.modules():
                    if isinstance(sub, nn.Linear):
                        _init(sub, init, gain)
    finally:
        torch.random.set_rng_state(gen_state)
    return nn.Sequential(*layers).to(dtype=dtype, device=device)
