"""Cost of one Newton step's curvature on a residual chain (issues 10 and 12).

The chain: ``Linear(40, 32) + Tanh``, then ``depth`` residual blocks ``z + tanh(W z + b)`` (32 wide),
then ``Linear(32, 10)``, cross-entropy, batch ``B``, float64. Timed: ``hessinv.hessian`` (forward,
backward and every stage's blocks), ``factor(1e-3)`` and one ``solve`` of the gradient, for

* ``structured``: the blocks written as ``z + torch.tanh(self.lin(z))`` -- read as a residual
  ``DenseStage`` (closed-form Linear+activation blocks, ``Jz += I``);
* ``generic``: the same function written as ``torch.add(z, torch.tanh(self.lin(z)), alpha=1.0)``,
  which the chain reader does not pattern-match, so it goes through ``GenericStage`` (per-example
  blocks by plain autograd double backward).

Run it under the shared lock, one thread::

    flock /tmp/hessinv-bench.lock env OMP_NUM_THREADS=1 PYTHONPATH=$PWD/src \\
        .venv/bin/python bench/residual.py [--out bench/results/residual.json]

Point ``PYTHONPATH`` at another checkout to time that version (``--variants structured`` only runs
the structured variant; older versions read both as generic stages).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
from torch import nn

import hessinv


class Block(nn.Module):
    def __init__(self, width: int, generic: bool):
        super().__init__()
        self.lin, self.generic = nn.Linear(width, width), generic

    def forward(self, z):
        if self.generic:
            return torch.add(z, torch.tanh(self.lin(z)), alpha=1.0)
        return z + torch.tanh(self.lin(z))


def problem(depth: int, B: int, generic: bool, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(40, 32), nn.Tanh(), *[Block(32, generic) for _ in range(depth)], nn.Linear(32, 10)
    ).double()
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(B, 40, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (B,), generator=g)
    return model, X, y


def run(variant: str, depth: int, B: int, repeats: int) -> dict:
    model, X, y = problem(depth, B, variant == "generic")
    rec: dict = {"variant": variant, "depth": depth, "B": B}
    best: dict[str, tuple[float, float]] = {}

    def timed(name: str, fn):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        w, c = time.perf_counter() - w0, time.process_time() - c0
        if name not in best or w < best[name][0]:
            best[name] = (w, c)
        return out

    for _ in range(repeats):
        H = timed("hessian", lambda: hessinv.hessian(model, nn.CrossEntropyLoss(), X, y))
        F = timed("factor", lambda: H.factor(1e-3))  # noqa: B023
        timed("solve", lambda: F.solve(H.gradient))  # noqa: B023
    rec["stages"] = sorted({type(s).__name__ for s in H.chain.stages})
    rec["n"] = H.shape[0]
    rec["residual"] = F.last_info.residual
    for name, (w, c) in best.items():
        rec[f"{name}_wall_s"], rec[f"{name}_cpu_s"] = round(w, 4), round(c, 4)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=15)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--variants", default="structured,generic")
    ap.add_argument("--out", default=None, help="write the records as JSON here (default: print only)")
    args = ap.parse_args()
    records = []
    for v in args.variants.split(","):
        rec = run(v, args.depth, args.batch, args.repeats)
        rec.update(torch=torch.__version__, hessinv=os.path.dirname(hessinv.__file__))
        rec.update(threads=torch.get_num_threads(), load=os.getloadavg(), machine=platform.machine())
        print(json.dumps(rec), flush=True)
        records.append(rec)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
