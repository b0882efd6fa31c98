"""Factor once, solve many: how much cheaper a solve is than the factorization it reuses.

For a few chain shapes (the tanh/cross-entropy benchmark chain of ``bench/common.py``: width ``w``,
batch ``B``, ``L`` Linear layers) and ``eps = 1``, the best-of-N wall time and process CPU time of

* ``H.factor(eps)``                 the backward Riccati sweep,
* ``F.solve(g, refine=False)``      one bare solve (two sweeps over the stored factors),
* ``F.solve(g)``                    the default solve: the bare solve, a float64 residual check
                                    (one Hessian-vector product) and refinement if needed,

and the ratios factor / solve. One torch thread. Results go to ``--out`` (default ``runs/bench``) as
``factor_solve.json`` and a table on stdout. Run timings under the shared lock::

    flock /tmp/hessinv-bench.lock env OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python bench/factor_solve.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from common import best_of, load_average, machine_info, tanh_mlp  # noqa: E402

import hessinv  # noqa: E402

SHAPES = [(16, 16, 64), (8, 64, 16), (32, 8, 16), (64, 16, 8), (64, 4, 16)]  # (w, B, L)
EPS = 1.0


def timed(fn, repeat: int) -> tuple[float, float]:
    """Best wall time (best_of) and the mean process CPU time of one call."""
    wall, _ = best_of(fn, repeat, 1)
    c0 = time.process_time()
    for _ in range(repeat):
        fn()
    return wall, (time.process_time() - c0) / repeat


def measure(w: int, B: int, L: int, repeat: int) -> dict:
    P = tanh_mlp(w, B, L)
    H = hessinv.hessian(P.model, P.loss_fn, P.inputs, P.targets)
    g = H.gradient
    F = H.factor(EPS)
    blk = max(H.blocks, key=lambda b: b.p)
    row = {"w": w, "B": B, "L": L, "n": P.n, "p": blk.p, "a": blk.batch * blk.d_in}
    for key, fn in (
        ("factor", lambda: H.factor(EPS)),
        ("solve_bare", lambda: F.solve(g, refine=False)),
        ("solve", lambda: F.solve(g)),
    ):
        row[f"{key}_s"], row[f"{key}_cpu_s"] = timed(fn, repeat)
    row["factor_over_bare_solve"] = row["factor_s"] / row["solve_bare_s"]
    row["factor_over_solve"] = row["factor_s"] / row["solve_s"]
    row["refinement_steps"] = F.solve(g, return_info=True)[1].refinement_steps
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=7, help="timed runs per measurement (default: 7)")
    ap.add_argument(
        "--out", type=Path, default=Path("runs/bench"), help="output directory (default: runs/bench)"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    res = {"machine": machine_info("cpu"), "eps": EPS, "repeat": args.repeat, "rows": []}
    print(
        "| w, B, L | n | p | a | factor | bare solve | solve (checked) | factor / bare solve "
        "| factor / solve |",
        flush=True,
    )
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    for w, B, L in SHAPES:
        r = measure(w, B, L, args.repeat)
        res["rows"].append(r)
        print(
            f"| {w}, {B}, {L} | {r['n']} | {r['p']} | {r['a']} | {1e3 * r['factor_s']:.1f} ms "
            f"| {1e3 * r['solve_bare_s']:.2f} ms | {1e3 * r['solve_s']:.2f} ms "
            f"| {r['factor_over_bare_solve']:.1f}x | {r['factor_over_solve']:.1f}x |",
            flush=True,
        )
    res["machine"]["load_average_end"] = load_average()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "factor_solve.json"
    path.write_text(json.dumps(res, indent=1))
    print(
        f"load average at start {res['machine']['load_average_start']}, at end "
        f"{res['machine']['load_average_end']}; wrote {path}",
        flush=True,
    )


if __name__ == "__main__":
    main()
