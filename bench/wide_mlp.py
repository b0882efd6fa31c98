"""A wide-input MLP: the default ``hessinv.optim.Newton`` with and without the eigenbasis on its wide
layer, against Adam, in one process.

Digits upsampled to 28 x 28 (784 inputs, bilinear; standardized), 1437 train / 360 test, a 784-256-10
ReLU MLP, batch 64, float32, one thread. Per run: ``--budget`` seconds of training (process CPU time,
evaluation excluded), test accuracy every 25 steps; the time to 80 / 90 / 95% and the best accuracy.
``Newton(basis_max_dim=...)`` decides whether the 256 x 784 input layer is rotated (its side 784 is
above the default 512: unrotated; ``--max-dims 512,1024`` runs both). Prints a line per run and a JSON
record::

    flock /tmp/hessinv-bench.lock env OMP_NUM_THREADS=1 PYTHONPATH=$PWD/src \\
        .venv/bin/python bench/wide_mlp.py --out bench/results/wide_mlp.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, machine_info  # noqa: E402

from hessinv.optim import Newton  # noqa: E402


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.images, dtype=torch.float32)[:, None]
    X = F.interpolate(X, size=(28, 28), mode="bilinear", align_corners=False).reshape(len(X), -1)
    X = (X - X.mean(0)) / (X.std(0) + 1e-3)
    y = torch.tensor(d.target)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1437], perm[1437:]
    return X[tr], y[tr], X[te], y[te]


def run(which: str, max_dim: int | None, seed: int, budget: float, Xtr, ytr, Xte, yte) -> dict:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    loss_fn = nn.CrossEntropyLoss()
    if which == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step(xb, yb):
            opt.zero_grad()
            loss_fn(model(xb), yb).backward()
            opt.step()
    else:
        newton = Newton(model, loss_fn, seed=seed, basis_max_dim=max_dim)

        def step(xb, yb):
            newton.step(xb, yb)

    g = torch.Generator().manual_seed(seed + 1)
    t, wall, steps, best, reached = 0.0, 0.0, 0, 0.0, {}
    while t < budget:
        idx = torch.randint(0, len(Xtr), (64,), generator=g)
        c0, w0 = time.process_time(), time.perf_counter()
        step(Xtr[idx], ytr[idx])
        t += time.process_time() - c0
        wall += time.perf_counter() - w0
        steps += 1
        if steps % 25 == 0:
            with torch.no_grad():
                acc = float((model(Xte).argmax(1) == yte).float().mean())
            best = max(best, acc)
            for target in (0.8, 0.9, 0.95):
                reached.setdefault(str(target), None)
                if acc >= target and reached[str(target)] is None:
                    reached[str(target)] = {"cpu_s": round(t, 3), "steps": steps}
    name = which if which == "adam" else f"newton max_dim={max_dim}"
    return {
        "run": name, "seed": seed, "steps": steps, "cpu_ms_per_step": 1e3 * t / steps,
        "wall_ms_per_step": 1e3 * wall / steps, "best_test_acc": best, "reached": reached,
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", type=float, default=15.0)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--max-dims", default="512,1024")
    p.add_argument("--out", type=Path, default=Path("runs/bench/wide_mlp.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    rec: dict = {"machine": machine_info("cpu"), "budget_s": args.budget, "runs": []}
    Xtr, ytr, Xte, yte = data()
    for seed in (int(s) for s in args.seeds.split(",")):
        plan = [("adam", None)] + [("newton", int(m)) for m in args.max_dims.split(",")]
        for which, max_dim in plan:
            r = run(which, max_dim, seed, args.budget, Xtr, ytr, Xte, yte)
            rec["runs"].append(r)
            print(json.dumps(r), flush=True)
    rec["load_average_end"] = load_average()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rec, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
