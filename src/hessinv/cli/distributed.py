"""``hessinv train --nproc N``: the training job data-parallel over ``N`` local processes.

:func:`train_data_parallel` spawns ``N`` processes (:func:`hessinv.optim.distributed.launch`: gloo on
CPU, NCCL on CUDA, timeouts on every collective). Every rank loads the same data and draws the same
sequence of *global* batches (``--batch-size`` is the global batch; it must divide by ``N`` unless it is at
least the training split, which makes every batch the full split); each optimizer becomes:

* ``newton`` / ``gauss-newton`` in Newton's precondition mode:
  :class:`~hessinv.optim.distributed.DataParallel` (each rank its shard, DDP's gradient all-reduce,
  the curvature shared by ``--dist-strategy``);
* ``sgd`` / ``adam`` on mini-batches: the same ``torch.optim`` step on DDP's averaged gradient;
* anything else (Newton's trust-region mode, ``lbfgs``, ``hessian-free``, full batches -- no
  ``--batch-size``, or one at least the training split: ``newton`` then switches to its trust region as
  with one process): *replicated* -- every rank takes the same full step on the global batch (correct,
  identical parameters, no speed-up).

Every rank stops a run at the same step (the wall-clock budget is agreed by an all-reduce). Rank 0 alone
writes the logs, ``summary.json`` (with a ``"distributed"`` entry), ``table.md`` and ``loss.png`` and
prints the progress; a rank that fails stops the whole job (exit status 1, its traceback on stderr).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from hessinv.errors import DistributedError, NonFiniteError

__all__ = ["train_data_parallel"]

START_METHOD = "spawn"  # fresh interpreters (safe with any parent state); tests use "fork" for speed


class _RankFailed(BaseException):
    """A step failed on this rank: not caught by run_one (a failed run on one rank would desynchronize
    the collectives), so the process exits and the launcher stops the job."""


def _guard(fn, *args):
    try:
        return fn(*args)
    except NonFiniteError:
        raise  # every rank sees the same all-reduced gradient and loss: the run diverges everywhere
    except Exception as e:
        raise _RankFailed(f"rank {dist.get_rank()}: {type(e).__name__}: {e}") from e


class _Replicated:
    """The same full step on the global batch on every rank (deterministic: parameters stay identical)."""

    def __init__(self, opt: Any):
        self.opt = opt

    @property
    def last_stats(self) -> Any:
        return getattr(self.opt, "last_stats", None)

    def step(self, inputs: Tensor, targets: Tensor):
        return _guard(self.opt.step, inputs, targets)

    def agree_stop(self, stop: bool) -> bool:
        from hessinv.optim.distributed import agree_stop

        return agree_stop(stop)


class _FirstOrderDP(_Replicated):
    """``sgd`` / ``adam`` on this rank's shard through DDP (the gradient averaged); the loss averaged."""

    def __init__(self, opt: Any, model: nn.Module):
        from torch.nn.parallel import DistributedDataParallel

        super().__init__(opt)
        dev = next(model.parameters()).device
        opt.model = DistributedDataParallel(model, device_ids=[dev] if dev.type == "cuda" else None)

    def step(self, inputs: Tensor, targets: Tensor):
        from hessinv.optim.distributed import shard

        r, w = dist.get_rank(), dist.get_world_size()
        loss = _guard(self.opt.step, shard(inputs, r, w), shard(targets, r, w))
        t = torch.tensor([float(loss)], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        return float(t) / w


class _NewtonDP(_Replicated):
    def __init__(self, dp: Any):
        super().__init__(dp)

    def agree_stop(self, stop: bool) -> bool:
        return self.opt.agree_stop(stop)


def _mini_batches(cfg: Any, n_train: int) -> bool:
    """Whether ``hessinv train`` draws mini-batches (``train.Batches``: a batch size at least the training
    split is the full split, every step)."""
    return cfg is not None and cfg.batch_size is not None and cfg.batch_size < n_train


def _make_optimizer_factory(original, strategy: str, n_train: int):
    def make_optimizer(name: str, model: nn.Module, loss_fn: nn.Module, lr: float, cfg=None):
        from hessinv.cli.baselines import FirstOrder
        from hessinv.optim import Newton
        from hessinv.optim.distributed import DataParallel

        opt = original(name, model, loss_fn, lr, cfg)
        mini = _mini_batches(cfg, n_train)
        if isinstance(opt, Newton) and opt.preconditioner is not None and mini:
            return _NewtonDP(DataParallel(opt, model, loss_fn, strategy))
        if isinstance(opt, FirstOrder) and opt.kind in ("sgd", "adam") and mini:
            return _FirstOrderDP(opt, model)
        return _Replicated(opt)

    return make_optimizer


def _worker(rank: int, world: int, ds: Any, cfg: Any, quiet: bool, strategy: str, backend: str) -> None:
    import hessinv.cli.train as T

    if str(cfg.device).startswith("cuda"):  # one GPU per rank where there are enough
        cfg = dataclasses.replace(cfg, device=f"cuda:{rank % torch.cuda.device_count()}")
    T.make_optimizer = _make_optimizer_factory(T.make_optimizer, strategy, len(ds.X_train))
    if rank != 0:
        with tempfile.TemporaryDirectory() as tmp:
            T.train(ds, dataclasses.replace(cfg, out=Path(tmp)))
        return
    from hessinv.cli.report import Reporter

    rep = Reporter(cfg, ds, quiet=quiet)
    with rep:
        results, summary = T.train(ds, cfg, progress=rep.progress, on_run_start=rep.run_started)
    summary["distributed"] = {"processes": world, "strategy": strategy, "backend": backend}
    path = Path(cfg.out) / "summary.json"
    data = json.loads(path.read_text())
    data["distributed"] = summary["distributed"]
    path.write_text(json.dumps(data, indent=2) + "\n")
    rep.finish(results, summary)


def train_data_parallel(ds: Any, cfg: Any, nproc: int, *, strategy: str, quiet: bool = False) -> int:
    """Run ``hessinv train`` on ``nproc`` processes; returns the exit status (module docstring)."""
    from hessinv.cli.train import UserError
    from hessinv.optim.distributed import DEFAULT_STRATEGY, launch

    strategy = strategy or DEFAULT_STRATEGY  # checked by the command line (hessinv.cli._dist_strategy)
    if _mini_batches(cfg, len(ds.X_train)) and cfg.batch_size % nproc:  # a full batch runs replicated
        raise UserError(
            f"--batch-size {cfg.batch_size} does not split over --nproc {nproc}: use a multiple of {nproc}"
        )
    if not (dist.is_available() and (dist.is_gloo_available() or dist.is_nccl_available())):
        raise UserError("--nproc needs torch.distributed with gloo or NCCL, which this torch build lacks")
    cuda = str(cfg.device).startswith("cuda")
    backend = "nccl" if cuda and dist.is_nccl_available() else "gloo"
    if cuda and torch.cuda.device_count() < nproc:
        print(f"hessinv: note: {nproc} processes share {torch.cuda.device_count()} GPU(s)", file=sys.stderr)
    try:
        launch(
            _worker, nproc, (ds, cfg, quiet, strategy, backend), backend=backend,
            device="cuda" if cuda else None, timeout=300.0, threads=torch.get_num_threads(),
            start_method=START_METHOD,
        )  # fmt: skip
    except DistributedError as e:
        print(f"hessinv: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    summary = json.loads((Path(cfg.out) / "summary.json").read_text())
    if summary.get("interrupted"):
        return 130
    return 0 if any(r.get("status") == "ok" for r in summary.get("runs", {}).values()) else 1
