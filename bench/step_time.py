"""Time per step of the default ``hessinv.optim.Newton`` against Adam, side by side in one process.

For each task of ``bench/train_suite.py``: the same model and seeded mini-batch stream (batch 64,
float32, one thread), ``--warmup`` steps untimed, then ``--steps`` steps timed (process CPU time and
wall time), Adam and hessinv interleaved in chunks of 20 steps. Prints a line per task and a JSON
record (issue 10: "amortized wall time per step within 5x of an Adam step on the benchmark
shapes"). Run under the shared timing lock::

    flock /tmp/hessinv-bench.lock env OMP_NUM_THREADS=1 PYTHONPATH=$PWD/src \\
        .venv/bin/python bench/step_time.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, machine_info  # noqa: E402
from train_suite import TASKS  # noqa: E402

import hessinv.optim as ho  # noqa: E402


def _stepper(task_name: str, which: str) -> Callable[[], None]:
    """One training step of ``which`` ("adam" or "hessinv") on the task's model and seeded batches."""
    task = TASKS[task_name]
    ds = task.data().to(dtype=torch.float32)
    X, y = ds.X_train, ds.y_train
    loss_fn = nn.CrossEntropyLoss() if ds.task == "classification" else nn.MSELoss()
    model = task.model(ds, 0)
    opt = (
        torch.optim.Adam(model.parameters(), lr=1e-3)
        if which == "adam"
        else ho.Newton(model, loss_fn, seed=0)
    )
    g = torch.Generator().manual_seed(0)

    def step() -> None:
        idx = torch.randint(0, len(X), (64,), generator=g)
        if which == "adam":
            opt.zero_grad()
            loss_fn(model(X[idx]), y[idx]).backward()
            opt.step()
        else:
            opt.step(X[idx], y[idx])

    return step


def time_steps(task_name: str, warmup: int, steps: int, chunk: int = 20) -> dict[str, tuple[float, float]]:
    """``{"adam": (CPU ms, wall ms), "hessinv": (...)}`` per step. The two run interleaved in chunks of
    ``chunk`` steps (a multiple of the refresh interval, 20), so that the machine's drift (+-30% over
    minutes here) falls on both alike."""
    steppers = {w: _stepper(task_name, w) for w in ("adam", "hessinv")}
    for st in steppers.values():
        for _ in range(warmup):
            st()
    acc = {w: [0.0, 0.0] for w in steppers}
    for _ in range(steps // chunk):
        for w, st in steppers.items():
            c, t = time.process_time(), time.perf_counter()
            for _ in range(chunk):
                st()
            acc[w][0] += time.process_time() - c
            acc[w][1] += time.perf_counter() - t
    n = chunk * (steps // chunk)
    return {w: (1e3 * a[0] / n, 1e3 * a[1] / n) for w, a in acc.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--steps", type=int, default=400)
    a = ap.parse_args()
    torch.set_num_threads(1)
    rec = {"benchmark": "step_time", "machine": machine_info("cpu"), "warmup": a.warmup, "steps": a.steps}
    rows = {}
    for t in a.tasks.split(","):
        res = time_steps(t, a.warmup, a.steps)
        adam, ours = res["adam"], res["hessinv"]
        rows[t] = {"adam_cpu_ms": adam[0], "adam_wall_ms": adam[1], "hessinv_cpu_ms": ours[0],
                   "hessinv_wall_ms": ours[1], "ratio_cpu": ours[0] / adam[0]}  # fmt: skip
        print(f"{t}: adam {adam[0]:.2f} ms CPU ({adam[1]:.2f} wall), hessinv {ours[0]:.2f} ms CPU "
              f"({ours[1]:.2f} wall): {ours[0] / adam[0]:.1f}x", flush=True)  # fmt: skip
    rec["tasks"], rec["machine"]["load_average_end"] = rows, load_average()
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
