"""Models with many outputs per example: the default optimizer's step and refresh against Adam's step.

A loss of one term per output entry (MSE on an image's pixels) has a diagonal curvature in the outputs,
and a per-position cross-entropy (a next-token model's ``(B, C, T)`` logits) a softmax form per position;
hessinv keeps them so (``LossBlocks.diag``, ``LossBlocks.classes``) instead of a dense ``C T x C T``
matrix per example. For each model: ``--steps`` steps of ``hessinv.optim.Newton(model, loss_fn)`` on a
seeded stream of mini-batches (a refresh every 10 steps) and of Adam (lr 1e-3) from the same
initialization, interleaved; per optimizer the median and mean step time, the slowest step (a refresh),
process CPU time beside wall time, the peak resident memory growth of the process during hessinv's steps
(measured first), the final training loss; the load average; a JSON record::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD/src .venv/bin/python bench/output_curvature.py --out bench/results
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, machine_info  # noqa: E402

import hessinv.optim  # noqa: E402


def _denoising(S: int) -> tuple[Callable[[], nn.Module], nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    clean = F.avg_pool2d(torch.randn(512, 3, S, S, generator=g), 5, 1, 2)
    noisy = clean + 0.3 * torch.randn(512, 3, S, S, generator=g)
    return (
        lambda: nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 3, 3, padding=1),
        ),
        nn.MSELoss(), noisy, clean,
    )  # fmt: skip


def _next_token(
    V: int = 500, T: int = 16
) -> tuple[Callable[[], nn.Module], nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    X = torch.randint(0, V, (512, T), generator=g)

    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.mix, self.head = (
                nn.Embedding(V, 64),
                nn.Conv1d(64, 64, 3, padding=1),
                nn.Conv1d(64, V, 1),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.mix(self.emb(x).transpose(1, 2))))  # (B, V, T)

    return LM, nn.CrossEntropyLoss(), X, X.roll(1, 1)


TASKS = {
    "denoising autoencoder, 3x32x32, MSE": lambda: _denoising(32),
    "next-token model, 500 classes x 16 positions, CE": _next_token,
}


def run(tasks: dict, task: str, steps: int, batch: int) -> dict:
    """``steps`` steps of hessinv's default optimizer and of Adam on ``tasks[task]()`` (a model builder,
    the loss, inputs and targets): step times, peak memory growth, final loss."""
    build, loss_fn, X, Y = tasks[task]()
    with torch.no_grad():
        outputs = int(build()(X[:1]).numel())
    out: dict = {"task": task, "outputs_per_example": outputs}
    for name in ("hessinv", "adam"):
        torch.manual_seed(0)
        model = build()
        opt = hessinv.optim.Newton(model, loss_fn, seed=0) if name == "hessinv" else None
        adam = torch.optim.Adam(model.parameters(), lr=1e-3) if name == "adam" else None
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        wall, cpu = [], []
        try:
            for k in range(steps):
                i = (batch * k) % (len(X) - batch)
                xb, yb = X[i : i + batch], Y[i : i + batch]
                t, c = time.perf_counter(), time.process_time()
                if opt is not None:
                    opt.step(xb, yb)
                else:
                    adam.zero_grad()
                    loss_fn(model(xb), yb).backward()
                    adam.step()
                wall.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
        except Exception as e:  # noqa: BLE001 - recorded (an earlier version refused these models)
            out[name] = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
            continue
        with torch.no_grad():
            final = float(loss_fn(model(X[:256]), Y[:256]))
        out[name] = {
            "median_ms": 1e3 * statistics.median(wall),
            "mean_ms": 1e3 * statistics.fmean(wall),
            "max_ms": 1e3 * max(wall),
            "cpu_mean_ms": 1e3 * statistics.fmean(cpu),
            "peak_rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024,
            "final_loss": final,
        }
    ok = "error" not in out["hessinv"]
    out["mean_step_ratio"] = out["hessinv"]["mean_ms"] / out["adam"]["mean_ms"] if ok else None
    return out


def main(
    tasks: dict = TASKS, name: str = "output_curvature", script: str = __file__, doc: str = __doc__
) -> None:
    """Each task in its own process (its peak memory its own); a line per task and ``<out>/<name>.json``."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--task", type=int, default=None, help="run only this task (index), print its JSON")
    ap.add_argument("--out", default=None, help=f"folder for {name}.json")
    ap.add_argument("--name", default=name, help="the record's file name stem")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.task is not None:
        print(json.dumps(run(tasks, list(tasks)[args.task], args.steps, args.batch)))
        return
    record = {"benchmark": name, "machine": machine_info("cpu"), "load_start": load_average()}
    record["tasks"] = []
    for i, task in enumerate(tasks):  # one process per task: its peak memory its own
        cmd = [
            sys.executable,
            script,
            "--task",
            str(i),
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
        ]
        r = json.loads(
            subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
        )
        record["tasks"].append(r)
        h, a = r["hessinv"], r["adam"]
        if "error" in h:
            print(f"{task}: hessinv {h['error']} | Adam mean {a['mean_ms']:.1f} ms", flush=True)
            continue
        print(
            f"{task}: hessinv mean {h['mean_ms']:.1f} ms (median {h['median_ms']:.1f}, "
            f"refresh {h['max_ms']:.0f}; CPU {h['cpu_mean_ms']:.1f}), +{h['peak_rss_growth_mb']:.0f} MB, "
            f"loss {h['final_loss']:.4g} | Adam mean {a['mean_ms']:.1f} ms (CPU {a['cpu_mean_ms']:.1f}), "
            f"loss {a['final_loss']:.4g} | ratio {r['mean_step_ratio']:.1f}x",
            flush=True,
        )
    record["load_end"] = load_average()
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"{args.name}.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
