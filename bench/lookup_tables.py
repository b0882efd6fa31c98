"""Models with large lookup tables (``nn.Embedding``, ``nn.EmbeddingBag``): the default optimizer's step
against Adam's.

A table's Gauss-Newton rows are nonzero only on the curvature batch's tokens; hessinv scatters the
signal at the table's output into those rows and hands them to the preconditioner as a few columns
(``tables`` of :func:`hessinv.lowrank.gauss_newton_root`), never writing the table's other columns of the
root. For each model: ``--steps`` steps of ``hessinv.optim.Newton(model, loss_fn)`` on a seeded stream of
mini-batches (a refresh every 10 steps) and of Adam (lr 1e-3), as :mod:`output_curvature` runs them: the
median and mean step time, the slowest step, process CPU time, peak resident memory growth, the final
loss, the load average; a JSON record::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD/src .venv/bin/python bench/lookup_tables.py --batch 64 \
        --out bench/results
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from output_curvature import main  # noqa: E402


def _bag(
    V: int, D: int, T: int, frequent: float = 0.0
) -> tuple[Callable[[], nn.Module], nn.Module, torch.Tensor, torch.Tensor]:
    """A bag-of-tokens classifier: ``Embedding(V, D)`` over ``T`` tokens, a tanh layer, 10 classes (the
    label a function of the first token); ``frequent``: the share of positions holding one token (an
    end-of-text or unmarked padding token)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randint(0, V, (2048, T), generator=g)
    if frequent:
        X[torch.rand(2048, T, generator=g) < frequent] = 1
        X[:, 0] = torch.randint(2, V, (2048,), generator=g)
    return (
        lambda: nn.Sequential(
            nn.Embedding(V, D), nn.Flatten(), nn.Linear(T * D, 32), nn.Tanh(), nn.Linear(32, 10)
        ),
        nn.CrossEntropyLoss(),
        X,
        X[:, 0] % 10,
    )


def _embedding_bag(
    V: int, D: int, T: int
) -> tuple[Callable[[], nn.Module], nn.Module, torch.Tensor, torch.Tensor]:
    """A fastText-style classifier: ``EmbeddingBag(V, D, mode="mean")`` over ``T`` tokens per example (each
    row a bag), a tanh layer, 10 classes (the label a function of the first token)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randint(0, V, (2048, T), generator=g)
    return (
        lambda: nn.Sequential(nn.EmbeddingBag(V, D, mode="mean"), nn.Tanh(), nn.Linear(D, 10)),
        nn.CrossEntropyLoss(),
        X,
        X[:, 0] % 10,
    )


TASKS = {
    "Embedding(2000, 32), 8 tokens": lambda: _bag(2000, 32, 8),
    "Embedding(50000, 64), 8 tokens": lambda: _bag(50000, 64, 8),
    "Embedding(50000, 64), 32 tokens, a third of them one token": lambda: _bag(50000, 64, 32, 1 / 3),
    "EmbeddingBag(20000, 64, mean), 6 tokens": lambda: _embedding_bag(20000, 64, 6),
}


if __name__ == "__main__":
    main(TASKS, "lookup_tables", __file__, __doc__)
