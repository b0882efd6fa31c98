"""Shared pieces of the benchmarks: the benchmark chain, timers, machine info.

The chain (issue 3): a tanh MLP with input width ``w``, ``L`` Linear layers -- ``L - 1`` hidden
``Linear(w, w) + Tanh`` and a last ``Linear(w, C)`` -- cross-entropy over ``C = 10`` classes, batch
``B``, random seeded inputs and targets.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class Problem:
    model: nn.Sequential
    loss_fn: nn.Module
    inputs: Tensor
    targets: Tensor
    w: int
    B: int
    L: int
    C: int

    @property
    def label(self) -> str:
        return f"w={self.w}, B={self.B}, L={self.L}"

    @property
    def n(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def tanh_mlp(
    w: int,
    B: int,
    L: int,
    C: int = 10,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: str = "cpu",
) -> Problem:
    """The benchmark chain: ``L`` Linear layers (``L - 1`` of them followed by Tanh), CE loss."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for _ in range(L - 1):
        mods += [nn.Linear(w, w), nn.Tanh()]
    mods.append(nn.Linear(w, C))
    model = nn.Sequential(*mods).to(dtype=dtype, device=device)
    X = torch.randn(B, w, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    y = torch.randint(0, C, (B,), generator=g).to(device)
    return Problem(model, nn.CrossEntropyLoss(), X, y, w, B, L, C)


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def best_of(
    fn: Callable[[], object],
    repeat: int = 5,
    warmup: int = 1,
    device: str = "cpu",
    budget_s: float | None = None,
) -> tuple[float, object]:
    """Best wall time of ``fn`` over ``repeat`` runs after ``warmup`` runs; returns (seconds, last result).

    The previous result is released before each run (as in a loop that replaces its factorization),
    so a run can reuse the memory of the one before. With ``budget_s``, stops repeating once that
    much time has been spent (at least one timed run).
    """
    out = None
    for _ in range(warmup):
        out = None
        out = fn()
    times: list[float] = []
    start = time.perf_counter()
    for _ in range(max(repeat, 1)):
        out = None
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t)
        if budget_s is not None and time.perf_counter() - start > budget_s:
            break
    return min(times), out


def timed(fn: Callable[[], object], repeats: int = 1) -> tuple[float, float, object]:
    """Median (CPU seconds, wall seconds) over ``repeats`` calls, and the last result."""
    cpu, wall, out = [], [], None
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        out = fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return statistics.median(cpu), statistics.median(wall), out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_info(device: str) -> dict:
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "load_average_start": load_average(),
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
