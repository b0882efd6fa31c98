"""Data-parallel Newton (hessinv.optim.distributed): steps per second and time to a target loss with
1, 2 and 4 processes (gloo, CPU), and the curvature-sharing strategies side by side.

Every run trains the same digits chain from the same initialization with ``Newton(mode="precondition")``
on the same sequence of *global* batches; with ``N`` processes each rank takes ``batch / N`` of every
batch (DDP all-reduces the gradient). ``sharded`` and ``replicated`` are the single-process algorithm
(up to rounding); ``rotate`` and ``average`` are other algorithms (one rank's curvature batch per
refresh; every rank's own curvature, directions averaged), so their time to target also measures
their steps. Only the training steps are timed (evaluation every ``--eval-every`` steps is excluded).

Run under the shared timing lock, one thread per process::

    flock /tmp/hessinv-bench.lock env OMP_NUM_THREADS=1 PYTHONPATH=$PWD/src python bench/distributed.py

Writes ``bench/results/distributed.json`` and prints a markdown table. More processes than cores
oversubscribe the machine (4 processes on 2 cores): reported as such, not hidden.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, machine_info  # noqa: E402

import hessinv.optim as ho  # noqa: E402
from hessinv.cli.data import load_dataset  # noqa: E402
from hessinv.cli.models import build_model  # noqa: E402
from hessinv.cli.train import Batches, evaluate  # noqa: E402
from hessinv.optim import distributed as hd  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "distributed.json"
CONFIGS = [
    (1, "-"),
    (2, "sharded"),
    (2, "replicated"),
    (2, "rotate"),
    (2, "average"),
    (4, "sharded"),
    (4, "average"),
]


def _worker(rank: int, world: int, cfg: dict, out: str) -> None:
    ds = load_dataset("digits", seed=0, test_fraction=0.2)
    ds = ds.to(dtype=torch.float64, device=torch.device("cpu"))
    model = build_model(ds.input_dim, ds.output_dim, cfg["depth"], cfg["width"], "tanh", seed=0)
    loss_fn = torch.nn.CrossEntropyLoss()
    opt = ho.Newton(
        model, loss_fn, mode="precondition", seed=0, lr=cfg["lr"],
        curvature_batch_size=cfg["curvature_batch"], refresh=cfg["refresh"],
    )  # fmt: skip
    stepper = (
        opt.step if cfg["strategy"] == "-" else hd.DataParallel(opt, model, loss_fn, cfg["strategy"]).step
    )
    batches = Batches(ds.X_train, ds.y_train, cfg["batch"], seed=0)
    clock = cpu = 0.0
    k, reached, steps_to_target, curve = 0, None, None, []
    t_refresh: list[float] = []
    t_other: list[float] = []
    while True:
        if k % cfg["eval_every"] == 0:
            loss = evaluate(model, loss_fn, ds)["train_loss"]
            curve.append((k, clock, loss))
            if reached is None and loss <= cfg["target"]:
                reached, steps_to_target = clock, k
            stop = (
                reached is not None
                or clock >= cfg["budget"]
                or k >= cfg["max_steps"]
                or not math.isfinite(loss)
            )
            if world > 1:
                stop = hd.agree_stop(stop)
            if stop:
                break
        xb, yb = batches.next()
        t0, c0 = time.perf_counter(), time.process_time()
        stepper(xb, yb)
        dt = time.perf_counter() - t0
        clock += dt
        cpu += time.process_time() - c0
        (t_refresh if opt.last_stats.refreshed else t_other).append(dt)
        k += 1
    cpus = torch.tensor([cpu])
    if world > 1:
        dist.all_reduce(cpus)
    if rank == 0:
        rec = {
            "processes": world, "strategy": cfg["strategy"], "steps": k, "train_time_s": clock,
            "steps_per_s": k / clock if clock else None, "cpu_s_all_ranks": float(cpus),
            "time_to_target_s": reached, "steps_to_target": steps_to_target, "final_train_loss": curve[-1][2],
            "mean_refresh_step_s": sum(t_refresh) / len(t_refresh) if t_refresh else None,
            "mean_plain_step_s": sum(t_other) / len(t_other) if t_other else None,
            "curve": curve, "load_average_end": load_average(),
        }  # fmt: skip
        Path(out).write_text(json.dumps(rec))


def _table(records: list[dict], cores: int) -> str:
    head = (
        "| processes | strategy | steps/s | time to target (s) | steps to target | refresh step (ms) | "
        "plain step (ms) | CPU s (all ranks) | final train loss |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in records:
        over = " (oversubscribed)" if r["processes"] > cores else ""
        ttt = "—" if r["time_to_target_s"] is None else f"{r['time_to_target_s']:.2f}"
        sst = "—" if r["steps_to_target"] is None else str(r["steps_to_target"])
        ms = lambda v: "—" if v is None else f"{1e3 * v:.1f}"  # noqa: E731
        rows.append(
            f"| {r['processes']}{over} | {r['strategy']} | {r['steps_per_s']:.1f} | {ttt} | {sst} | "
            f"{ms(r['mean_refresh_step_s'])} | {ms(r['mean_plain_step_s'])} | {r['cpu_s_all_ranks']:.1f} | "
            f"{r['final_train_loss']:.4f} |"
        )
    return head + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch", type=int, default=128, help="global batch (split over the processes)")
    p.add_argument("--curvature-batch", type=int, default=16)
    p.add_argument("--refresh", type=int, default=20)
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument("--target", type=float, default=0.5, help="train loss")
    p.add_argument("--budget", type=float, default=30.0, help="seconds of training per run")
    p.add_argument("--max-steps", type=int, default=100000)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--configs", default=None, help="e.g. 1:-,2:sharded,2:average (default: all)")
    p.add_argument("--start-method", default="spawn", choices=["spawn", "fork"])
    p.add_argument(
        "--out", type=Path, default=Path("runs/bench/distributed.json"),
        help="JSON output (default: runs/bench/distributed.json; "
        f"the record is {RESULTS.name} in bench/results)",
    )  # fmt: skip
    args = p.parse_args(argv)
    configs = CONFIGS
    if args.configs:
        configs = [(int(a), b) for a, b in (c.split(":") for c in args.configs.split(","))]
    cores = os.cpu_count() or 1
    info = machine_info("cpu")
    info["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    base = {k: getattr(args, k) for k in ("depth", "width", "batch", "refresh", "lr", "target", "budget")}
    base.update(curvature_batch=args.curvature_batch, max_steps=args.max_steps, eval_every=args.eval_every)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (nproc, strategy) in enumerate(configs):
            cfg = {**base, "strategy": strategy}
            out = f"{tmp}/{i}.json"
            if nproc == 1 and strategy == "-":
                torch.set_num_threads(1)
                _worker(0, 1, cfg, out)  # the single-process baseline: no process group, no DDP
            else:
                hd.launch(_worker, nproc, (cfg, out), timeout=120, join_timeout=20 * args.budget + 120,
                          start_method=args.start_method)  # fmt: skip
            rec = json.loads(Path(out).read_text())
            print(
                f"{nproc} x {strategy:10s}: {rec['steps_per_s']:.1f} steps/s, target "
                f"{rec['time_to_target_s']} s / {rec['steps_to_target']} steps, "
                f"load {rec['load_average_end']}",
                flush=True,
            )
            records.append(rec)
    info["load_average_end"] = load_average()
    table = _table(records, cores)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"machine": info, "config": base, "runs": records, "table": table}, indent=1)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
