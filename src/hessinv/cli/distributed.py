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

Ctrl-C (SIGINT, to the whole process group) and SIGTERM (``kill``, ``timeout``, a scheduler) stop the job
as they stop one process: the ranks note the signal (the launcher passes it on to them, as SIGUSR1 or
SIGUSR2: :data:`FORWARD`), agree on it at the next step's stop test and end the run there together; rank 0
writes the interrupted summary, the table and the plot of what it measured, and the exit status is 128 +
the signal (130, 143). A second signal stops at once, without a summary (a rank also dies at a second
SIGTERM).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import signal
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from hessinv.cli.choices import Interrupted, interrupt_reason
from hessinv.errors import DistributedError, NonFiniteError

__all__ = ["train_data_parallel"]

START_METHOD = "spawn"  # fresh interpreters (safe with any parent state); tests use "fork" for speed
#: the signals by which the launcher passes a SIGINT or SIGTERM it received on to the ranks (not SIGTERM
#: itself: a rank dies at its second SIGTERM, and ``launch`` stops the ranks with SIGTERM when one fails)
FORWARD = {signal.SIGINT: signal.SIGUSR1, signal.SIGTERM: signal.SIGUSR2}

_stop_signal = 0  # in a rank: the first SIGINT/SIGTERM it got (directly or by FORWARD); 0: none


def _note_signal(signum: int, frame: Any = None) -> None:
    """A rank's handler: remember the signal; the ranks agree on it at the next stop test (:func:`_agree`)
    and end the run there. A second SIGTERM kills the rank (the default action, restored here): ``launch``
    stops a failed job's ranks with SIGTERM."""
    global _stop_signal
    if signum == signal.SIGTERM:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signum = next((s for s, f in FORWARD.items() if f == signum), signum)
    _stop_signal = _stop_signal or int(signum)


def _agree(stop: bool, group: Any = None) -> bool:
    """Any rank's ``stop`` (every rank leaves the loop at the same step), and where any rank got a signal,
    :class:`~hessinv.cli.choices.Interrupted` on every rank at this same step (one all-reduce MAX)."""
    t = torch.tensor([1.0 if stop else 0.0, float(_stop_signal)], dtype=torch.float64)
    if dist.get_backend(group) == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    stop_all, signum = (float(v) for v in t.tolist())
    if signum:
        raise Interrupted(int(signum))
    return stop_all > 0


def _catch_signals_in_rank() -> None:
    """SIGINT, SIGTERM and the launcher's FORWARD noted, not raised: a KeyboardInterrupt in one rank only
    would leave the others waiting in a collective, and no summary would be written."""
    for s in (signal.SIGINT, signal.SIGTERM, *FORWARD.values()):
        signal.signal(s, _note_signal)


class _Launcher:
    """The launcher's SIGINT and SIGTERM while the ranks run: the first is passed on to them (FORWARD), which
    stop at their next step's stop test, rank 0 writing the summary; a second kills them (no summary)."""

    def __init__(self) -> None:
        self.pid, self.signum = os.getpid(), 0
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _Launcher:
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[s] = signal.signal(s, self)
            except ValueError:  # (not the main thread: the signals stay as they are)
                break
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)

    def __call__(self, signum: int, frame: Any) -> None:
        if os.getpid() != self.pid:  # a forked rank before its own handlers (_catch_signals_in_rank)
            _note_signal(signum)
            return
        ranks = multiprocessing.active_children()
        if self.signum:  # the second: at once
            for p in ranks:
                p.kill()
            raise Interrupted(self.signum)
        self.signum = signum
        print(
            f"hessinv: {interrupt_reason(signum)}: the ranks stop after their current step and rank 0 writes "
            "the summary (a second signal stops at once, without it)",
            file=sys.stderr,
            flush=True,
        )
        for p in ranks:
            try:
                os.kill(p.pid, FORWARD[signal.Signals(signum)])
            except OSError:  # (it has exited)
                pass


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
        with warnings.catch_warnings():
            # (the library's warning that each rank's curvature comes from its own batch: here every rank
            # steps on the same global batch with the same seed, and the replicas stay identical)
            warnings.filterwarnings("ignore", message="Preconditioner in a process group")
            return _guard(self.opt.step, inputs, targets)

    def agree_stop(self, stop: bool) -> bool:
        return _agree(stop)


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
        return _agree(stop, self.opt.group)


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

    _catch_signals_in_rank()
    if str(cfg.device).startswith("cuda"):  # one GPU per rank where there are enough
        cfg = dataclasses.replace(cfg, device=f"cuda:{rank % torch.cuda.device_count()}")
    T.make_optimizer = _make_optimizer_factory(T.make_optimizer, strategy, len(ds.X_train))
    if rank != 0:  # (its outputs go to a temporary directory; it draws no plot: matplotlib takes seconds)
        import hessinv.cli.plots as plots

        plots.plot_runs = lambda *args, **kwargs: None  # (this process's own module: rank 0's is untouched)
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
    path = Path(cfg.out) / "summary.json"
    before = _stamp(path)  # (a summary of an earlier job in --out is no answer of this one)
    with _Launcher() as launcher:
        try:
            launch(
                _worker, nproc, (ds, cfg, quiet, strategy, backend), backend=backend,
                device="cuda" if cuda else None, timeout=300.0, threads=torch.get_num_threads(),
                start_method=START_METHOD,
            )  # fmt: skip
        except DistributedError as e:
            if not launcher.signum:
                print(f"hessinv: error: {e}", file=sys.stderr)
                return 1
        except KeyboardInterrupt as e:  # a second signal: the ranks were killed
            signum = launcher.signum or int(getattr(e, "signum", signal.SIGINT))
            print(f"hessinv: {interrupt_reason(signum)}: stopped at once, no summary", file=sys.stderr)
            return 128 + signum
    written = _stamp(path) not in (None, before)
    if launcher.signum and not written:  # (before the ranks could train: starting, or a rank died)
        print(
            f"hessinv: {interrupt_reason(launcher.signum)} before rank 0 wrote a summary: none written",
            file=sys.stderr,
        )
        return 128 + launcher.signum
    summary = json.loads(path.read_text())
    from hessinv.cli import finished_status, interrupted_status

    if summary.get("interrupted"):
        return interrupted_status(summary)
    return finished_status({name: str(r.get("status")) for name, r in summary.get("runs", {}).items()})


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """Which file ``path`` is (inode, size, modification time in ns); None where there is none."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns
