"""The ``hessinv train`` job: every optimizer from the same initialization on the same data.

Each optimizer runs until its step budget or the wall-clock budget, whichever comes first (either
may be ``None``); the clock counts optimizer steps only -- evaluation and logging are paused out of
it. Train/test loss and accuracy are evaluated on the whole splits at geometrically spaced steps and
every ``steps / eval_points`` steps (with a step budget, so that the logs do not depend on the
machine's load), or every ``budget / eval_points`` seconds (time budget only). A run whose loss
becomes NaN/inf is stopped and marked ``diverged``; a run whose optimizer raises is marked
``failed``; the others continue.

Outputs in ``out``: ``<optimizer>.jsonl`` (one line per step), ``summary.json``, ``table.md``,
``loss.png``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import hessinv
from hessinv.cli.baselines import PEERS, FirstOrder, HessianFree, Peer, peer_available
from hessinv.cli.choices import (
    DEFAULT_LR,
    LR_GRID,
    OPTIMIZERS,
    Interrupted,
    UserError,
    install_hint,
    interrupt_reason,
    interrupt_signal,
    output_directory,
    signal_name,
)
from hessinv.cli.data import DataError, Dataset
from hessinv.cli.models import build_model

__all__ = [
    "OPTIMIZERS",
    "DEFAULT_LR",
    "LR_GRID",
    "TrainConfig",
    "RunResult",
    "UserError",
    "make_optimizer",
    "run_one",
    "train",
    "time_to_target_table",
    "target_heading",
]

FULL_BATCH = ("lbfgs",)  # optimizers that always see the whole training split


class RunFailed(Exception):
    """An optimizer could not be built or stepped (not a divergence)."""


@dataclass
class TrainConfig:
    optimizers: list[str] = field(default_factory=lambda: ["newton", "gauss-newton", "adam", "sgd"])
    depth: int = 16
    width: int = 8
    activation: str = "tanh"
    residual: bool = False
    init: str = "torch"
    batch_size: int | None = 64  # None: full batch
    budget: float | None = 35.0  # seconds per optimizer (training time only); None: no time limit
    steps: int | dict[str, int] | None = None  # steps per optimizer (one for all, or by name)
    target_loss: float | None = None
    lrs: dict[str, float] = field(default_factory=dict)
    tune: bool = True
    tune_budget: float | None = None  # seconds per grid point (None: budget / 10, or 2.5 s)
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float64"
    eval_points: int = 120  # evaluations at least every budget / eval_points seconds
    newton_damping: str | float = "trust-region"  # hessinv.optim.Newton(damping=...)
    curvature_batch_size: int | None = None  # hessinv.optim.Newton(curvature_batch_size=...)
    out: Path = Path("runs/default")
    command: tuple[str, ...] = ()  # the command line that made this job (recorded in summary.json)

    def steps_for(self, name: str) -> int | None:
        """The step budget of optimizer ``name`` (None: no step limit)."""
        return self.steps.get(name) if isinstance(self.steps, dict) else self.steps


@dataclass
class RunResult:
    name: str
    lr: float
    status: str = "ok"  # ok | diverged | failed | interrupted | not run (the job was interrupted before)
    message: str = ""
    stopped_by: str | None = None  # "steps" or "time": which budget ended an ok run
    steps: int = 0
    train_time: float = 0.0
    time_to_target: float | None = None
    steps_to_target: int | None = None
    # the steps between the check that met the target and the one before (1: every step was checked,
    # the crossing is exact; more where a check costs more than a few steps: the first evaluation after it)
    target_resolution: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # evaluation records
    tuning: dict[str, float] = field(default_factory=dict)  # lr -> final train loss
    interrupted_by: str | None = None  # the signal that stopped an interrupted run: SIGINT, SIGTERM

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}

    def best(self, key: str = "train_loss") -> float:
        vals = [h[key] for h in self.history if key in h and math.isfinite(h[key])]
        return min(vals) if vals else math.nan

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "history"}
        if d["interrupted_by"] is None:
            del d["interrupted_by"]
        d["final"] = self.final
        d["best_train_loss"] = _finite_or_none(self.best("train_loss"))
        d["evaluations"] = len(self.history)
        return d


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):  # not on every platform
        return None


def _finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _jsonable(x: Any) -> Any:
    if is_dataclass(x) and not isinstance(x, type):
        x = asdict(x)
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Tensor):
        return _jsonable(x.item()) if x.numel() == 1 else None
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, (int, str, bool)) or x is None:
        return x
    if hasattr(x, "item"):
        return _jsonable(x.item())
    return str(x)


# -- optimizers -----------------------------------------------------------------------------------
def make_optimizer(
    name: str, model: nn.Module, loss_fn: nn.Module, lr: float, cfg: TrainConfig | None = None
):
    """An object with ``step(inputs, targets) -> loss before the step`` for an optimizer name."""
    cfg = cfg or TrainConfig()
    if name in ("newton", "newton-tr", "gauss-newton"):
        try:
            from hessinv.optim import Newton
        except Exception as e:  # the optimizer package may be missing or broken
            raise RunFailed(f"hessinv.optim.Newton is not available ({type(e).__name__}: {e})") from None
        if name == "newton":  # the library default: amortized on mini-batches, trust region on a full batch
            return Newton(model, loss_fn, lr=lr, seed=cfg.seed, curvature_batch_size=cfg.curvature_batch_size)
        return Newton(  # a trust-region (or Levenberg-Marquardt) Newton step on every batch
            model,
            loss_fn,
            mode="trust-region",
            curvature="hessian" if name == "newton-tr" else "gauss_newton",
            lr=lr,
            damping=cfg.newton_damping,
            curvature_batch_size=cfg.curvature_batch_size,
            seed=cfg.seed,
        )
    if name == "hessian-free":
        return HessianFree(model, loss_fn, lr=lr)
    if name in FirstOrder.KINDS:
        return FirstOrder(model, loss_fn, name, lr)
    if name in Peer.KINDS:
        return Peer(model, loss_fn, name, lr)
    raise UserError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


def exact_factorizations(cfg: TrainConfig, ds: Dataset) -> tuple[list[str], float, int]:
    """The optimizers of ``cfg`` that factor the exact curvature of their batch at every step, the flops of
    one such factorization (:func:`hessinv.curvature.factorization_flops`) and the examples it covers:
    ``newton-tr`` and ``gauss-newton`` (``mode="trust-region"``: the batch, or ``curvature_batch_size`` of
    it), and on a full batch without ``curvature_batch_size`` ``newton`` where ``mode="auto"`` takes its
    trust region -- one factorization costing at most :data:`hessinv.optim.newton.TRUST_REGION_MAX_FLOPS`;
    else it preconditions (one factorization of a curvature batch of 8, refreshed every few steps)."""
    n = len(ds.X_train)
    mini = cfg.batch_size is not None and cfg.batch_size < n
    batch = min(cfg.curvature_batch_size or (cfg.batch_size if mini else n) or n, n)
    exact = [o for o in cfg.optimizers if o in ("newton-tr", "gauss-newton")]
    if "newton" in cfg.optimizers and not mini and cfg.curvature_batch_size is None:
        exact.insert(0, "newton")
    if not exact:
        return [], 0.0, batch
    from hessinv.chain import deterministic_chain
    from hessinv.curvature import factorization_flops
    from hessinv.optim.newton import TRUST_REGION_MAX_FLOPS

    model = build_model(
        ds.input_dim, ds.output_dim, cfg.depth, cfg.width, cfg.activation, cfg.residual, cfg.init, cfg.seed
    )
    chain, _ = deterministic_chain(model, loss_for(ds))
    with torch.no_grad():
        zs = chain.forward(ds.X_train[:1].to(torch.float64))
    widths = [int(z[0].numel()) for z in zs[:-1]]
    cpu = torch.device(cfg.device).type == "cpu"
    flops = factorization_flops(chain.sizes, widths, batch, cpu, int(zs[-1][0].numel()))
    if flops > TRUST_REGION_MAX_FLOPS:  # (newton preconditions: one factorization of 8 examples)
        exact = [o for o in exact if o != "newton"]
    return exact, flops, batch


# -- evaluation -----------------------------------------------------------------------------------
def _remove_stale_logs(out: Path, names: Sequence[str]) -> None:
    """Delete the per-optimizer logs that a previous hessinv job in ``out`` wrote (its ``summary.json``
    lists them) for optimizers this job does not run: they would sit beside a summary that does not know
    them. Only a hessinv summary's (``hessinv_version``) logs of hessinv's optimizers are touched."""
    try:
        summary = json.loads((out / "summary.json").read_text())
        previous = summary["runs"] if "hessinv_version" in summary else {}
    except (OSError, ValueError, KeyError, TypeError):
        return
    if isinstance(previous, dict) and previous:  # (said: a second job into one folder replaces the first)
        print(
            f"hessinv: note: {out} holds an earlier job's results ({', '.join(map(str, previous))}): "
            "this job's replace them (give --out another folder to keep both)",
            file=sys.stderr,
        )
    for name in previous if isinstance(previous, dict) else ():
        if name in OPTIMIZERS and name not in names:
            (out / f"{name}.jsonl").unlink(missing_ok=True)


#: the target is checked after every step where one check of the training loss costs at most this many
#: steps' time (else at the evaluations: ``RunResult.target_resolution`` says how finely)
CHECK_COST = 1.0


@torch.no_grad()
def _split_loss(
    model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor, chunk: int, classify: bool
) -> tuple[float, int]:
    """The mean loss on one split, and (``classify``) how many of its examples the model gets right."""
    tot, correct = 0.0, 0
    for i in range(0, len(X), chunk):
        yp = model(X[i : i + chunk])
        yb = y[i : i + chunk]
        tot += float(loss_fn(yp, yb)) * len(yb)
        if classify:
            correct += int((yp.argmax(1) == yb).sum())
    return tot / len(X), correct


def train_loss(model: nn.Module, loss_fn: nn.Module, ds: Dataset, chunk: int = 8192) -> float:
    """The loss on the whole training split (what the target is set on; as :func:`evaluate` says it)."""
    return _split_loss(model, loss_fn, ds.X_train, ds.y_train, chunk, False)[0]


def evaluate(model: nn.Module, loss_fn: nn.Module, ds: Dataset, chunk: int = 8192) -> dict[str, float]:
    out: dict[str, float] = {}
    classify = ds.task == "classification"
    for split, X, y in (("train", ds.X_train, ds.y_train), ("test", ds.X_test, ds.y_test)):
        loss, correct = _split_loss(model, loss_fn, X, y, chunk, classify)
        out[f"{split}_loss"] = loss
        if classify:  # (no accuracy of NaN outputs: argmax would pick a class)
            out[f"{split}_acc"] = correct / len(X) if math.isfinite(loss) else math.nan
    return out


class Batches:
    """Shuffled mini-batches, reshuffled every epoch, from a seeded generator (full batch if None)."""

    def __init__(self, X: Tensor, y: Tensor, batch_size: int | None, seed: int):
        self.X, self.y, self.n = X, y, len(X)
        self.bs = self.n if batch_size is None or batch_size >= self.n else int(batch_size)
        self.gen = torch.Generator().manual_seed(seed)
        self.perm: Tensor | None = None
        self.pos = self.n

    def next(self) -> tuple[Tensor, Tensor]:
        if self.bs == self.n:
            return self.X, self.y
        if self.pos + self.bs > self.n:
            self.perm = torch.randperm(self.n, generator=self.gen).to(self.X.device)
            self.pos = 0
        idx = self.perm[self.pos : self.pos + self.bs]  # type: ignore[index]
        self.pos += self.bs
        return self.X[idx], self.y[idx]


def _geometric_steps(ratio: float = 1.1, limit: int = 10**9) -> set[int]:
    s, k = set(range(0, 21)), 20.0
    while k < limit:
        k = max(k * ratio, k + 1)
        s.add(int(k))
        if len(s) > 400:
            break
    return s


_EVAL_STEPS = _geometric_steps()
ProgressFn = Callable[[str, dict[str, Any]], None]


def run_one(
    name: str,
    lr: float,
    ds: Dataset,
    init_model: nn.Module,
    loss_fn: nn.Module,
    cfg: TrainConfig,
    budget: float | None,
    steps: int | None,
    log_path: Path | None = None,
    progress: ProgressFn | None = None,
    final_only: bool = False,
) -> RunResult:
    """Train a copy of ``init_model`` with one optimizer until the budget or step limit.

    ``final_only``: evaluate at the start and the end only (learning-rate tuning).
    """
    res = RunResult(name, lr)
    model = copy.deepcopy(init_model)
    batch_size = None if name in FULL_BATCH else cfg.batch_size
    batches = Batches(ds.X_train, ds.y_train, batch_size, cfg.seed)
    log = open(log_path, "w") if log_path is not None else None  # noqa: SIM115
    k, clock, done = 0, 0.0, 0.0
    cuda = ds.X_train.device.type == "cuda"
    finish: Callable[[dict[str, Any]], bool] | None = None  # (record, once defined: an interrupt's last row)
    pending: list[dict[str, Any]] = []  # (the last step's row, not yet logged: log_row)
    interval = (budget / cfg.eval_points) if budget and steps is None else 0.0
    step_interval = max(1, (steps or 0) // cfg.eval_points)
    # torch's global generator from the seed: an optimizer that draws from it (pytorch-optimizer's
    # AdaHessian draws its Hutchinson probes there) repeats with the seed, as the others do
    torch.manual_seed(cfg.seed)
    try:
        try:
            opt = make_optimizer(name, model, loss_fn, lr, cfg)
        except RunFailed as e:
            res.status, res.message = "failed", str(e)
            return res
        except Exception as e:
            res.status, res.message = "failed", f"cannot build the optimizer: {type(e).__name__}: {e}"
            return res

        checked = 0  # the last step whose training loss was evaluated (below: the target not met there)

        def record(rec: dict[str, Any]) -> bool:
            """Evaluate, store and log; False if the model diverged."""
            nonlocal checked
            ev = evaluate(model, loss_fn, ds)
            rec.update(ev)
            res.history.append(rec)
            if (
                cfg.target_loss is not None
                and res.time_to_target is None
                and ev["train_loss"] <= cfg.target_loss
            ):
                res.time_to_target, res.steps_to_target = rec["time"], rec["step"]
                res.target_resolution = max(1, rec["step"] - checked)
            checked = rec["step"]
            if progress is not None:
                progress(name, rec)
            return math.isfinite(ev["train_loss"])

        def log_row(rec: dict[str, Any]) -> None:
            """Log a step's row once the next is known: the row held before it is written now, ``rec``
            held (an evaluation after the loop joins it: one row per step)."""
            if log:
                for row in pending:
                    log.write(json.dumps(_jsonable(row)) + "\n")
            pending[:] = [rec]

        def last_row(rec: dict[str, Any]) -> bool:
            """:func:`record` of a last row after the loop (the step where a run stopped between its
            evaluations), into that step's row of the log: the summary's final losses are a row of it."""
            held = pending[0] if pending and pending[0]["step"] == rec["step"] else None
            ok = record(held or rec)
            if held is None:
                log_row(rec)
            return ok

        finish = last_row
        # until the target is met, the training loss is checked after every step where that costs at most
        # CHECK_COST steps (not counted in the clock): the step that reaches it, not the next evaluation's
        # (every 125 steps of a 15,000-step run, against every 2 of a 250-step one)
        t_check = time.perf_counter()
        if cfg.target_loss is not None and not final_only:
            train_loss(model, loss_fn, ds)
        t_check = time.perf_counter() - t_check

        first = {"step": 0, "time": 0.0}
        if not record(first):
            res.status, res.message = "diverged", "the loss at the initial point is not finite"
            return res
        if log:
            log.write(json.dumps(_jsonable(first)) + "\n")
        clock, last_eval = 0.0, 0.0
        k = 0
        agree = getattr(opt, "agree_stop", None)  # data-parallel runs (--nproc): every rank stops together
        while True:
            stop_by = (
                "steps" if steps is not None and k >= steps
                else "time" if budget is not None and clock >= budget
                else None
            )  # fmt: skip
            if agree(stop_by is not None) if agree is not None else stop_by is not None:
                res.stopped_by = stop_by or "another rank"
                break
            xb, yb = batches.next()
            t0 = time.perf_counter()
            try:
                loss = opt.step(xb, yb)
                if cuda:
                    torch.cuda.synchronize(xb.device)  # count the step's queued kernels in its time
            except hessinv.NonFiniteError as e:
                res.status, res.message = "diverged", f"step {k + 1}: {e}"
                break
            except Exception as e:  # any other failure ends this run only, with a one-line reason
                res.status, res.message = "failed", f"step {k + 1}: {type(e).__name__}: {e}"
                break
            finally:
                clock += time.perf_counter() - t0
            k += 1
            done = clock  # (the clock at the last step done: an interrupt's time leaves the one it cut short)
            loss = float(loss)
            rec: dict[str, Any] = {"step": k, "time": clock, "batch_loss": loss}
            stats = getattr(opt, "last_stats", None)
            if stats is not None:
                rec["stats"] = _jsonable(stats)
            if not math.isfinite(loss):
                res.status, res.message = "diverged", f"step {k}: the loss is {loss}"
                log_row(rec)
                break
            check = (
                cfg.target_loss is not None
                and res.time_to_target is None
                and not final_only
                and t_check <= CHECK_COST * clock / k
            )
            due = not final_only and (
                (check and train_loss(model, loss_fn, ds) <= cfg.target_loss)
                or k in _EVAL_STEPS
                or (interval and clock - last_eval >= interval)
                or (steps is not None and (k % step_interval == 0 or k == steps))
                or (budget is not None and clock >= budget)
            )
            if check and not due:
                checked = k
            if due:
                last_eval = clock
                ok = record(rec)
                if not ok:
                    res.status, res.message = (
                        "diverged",
                        f"step {k}: the training loss is {rec['train_loss']}",
                    )
            log_row(rec)
            if res.status != "ok":
                break
        res.steps, res.train_time = k, done  # (a failed step's time is not the run's)
        if res.status == "ok" and res.history[-1]["step"] != k and not last_row({"step": k, "time": done}):
            res.status, res.message = (
                "diverged",
                f"step {k}: the training loss is {res.history[-1]['train_loss']}",
            )
        elif res.status == "failed" and res.history[-1]["step"] != k:
            last_row({"step": k, "time": done})  # where the failed run stopped
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (Interrupted): keep what was done; the caller stops
        sig = interrupt_signal(e)
        res.status, res.message = "interrupted", f"{interrupt_reason(sig)} after {k} steps"
        res.interrupted_by = signal_name(sig)
        res.steps, res.train_time = k, done
        last = res.history[-1] if res.history else None
        if last is not None and last["step"] == k and k and not any(r is last for r in pending):
            log_row(last)  # (evaluated, and interrupted before its row was logged: while printing it)
        if finish is not None and res.history and res.history[-1]["step"] != k:
            try:  # (the final row's losses at the step it stopped, not the last evaluation's)
                finish({"step": k, "time": done})
            except KeyboardInterrupt:  # (a second interrupt: the last evaluation's stay)
                pass
    finally:
        if log:
            for row in pending:
                log.write(json.dumps(_jsonable(row)) + "\n")
            log.close()
    return res


def tune_budget(cfg: TrainConfig) -> float:
    """The time cap of one grid point of the learning-rate tuning: ``--tune-budget``, else ``--budget / 10``,
    else (no time budget) 2.5 s."""
    if cfg.tune_budget is not None:
        return cfg.tune_budget
    return cfg.budget / 10 if cfg.budget is not None else 2.5


def tune_lr(
    name: str,
    ds: Dataset,
    init_model: nn.Module,
    loss_fn: nn.Module,
    cfg: TrainConfig,
    progress: ProgressFn | None = None,
) -> tuple[float, dict[str, float]]:
    """The grid lr with the lowest final train loss after a short run (diverged: inf)."""
    scores: dict[str, float] = {}
    steps = cfg.steps_for(name)
    short_steps = None if steps is None else max(1, steps // 10)
    short_budget = tune_budget(cfg)
    for lr in LR_GRID[name]:
        r = run_one(name, lr, ds, init_model, loss_fn, cfg, short_budget, short_steps, final_only=True)
        if r.status == "interrupted":
            raise Interrupted(getattr(signal, r.interrupted_by or "SIGINT", signal.SIGINT))
        loss = r.final.get("train_loss", math.inf) if r.status == "ok" else math.inf
        scores[f"{lr:g}"] = loss if math.isfinite(loss) else math.inf
        if progress is not None:
            progress(name, {"tuning": lr, "train_loss": loss})
    best = min(scores, key=lambda k: scores[k])
    return float(best), scores


# -- the job ----------------------------------------------------------------------------------------
def loss_for(ds: Dataset) -> nn.Module:
    return nn.CrossEntropyLoss() if ds.task == "classification" else nn.MSELoss()


def _fmt_time(t: float | None) -> str:
    """Seconds with two decimals, or two significant digits below 0.1 s (``0.0042``); ``—`` for None."""
    if t is None:
        return "—"
    return f"{t:.2f}" if t >= 0.1 else f"{t:.2g}"


def target_heading(target: float | None, timing: str) -> str:
    """What the time-to-target table measures, ``time to train loss <= 0.05 (timing)``, or that without
    a target loss nothing is measured (a data file has no default target)."""
    if target is None:
        return "time to target not measured: no --target-loss given"
    return f"time to train loss <= {target:g} ({timing})"


def target_cells(r: RunResult) -> tuple[str, str]:
    """The time and the steps to the target of a run as the table (and the plot's legend) says them:
    ``1.02`` and ``175`` where every step was checked; ``≤ 1.02`` and ``163-175`` where the target was
    checked at the evaluations only (``target_resolution`` > 1: crossed between two); ``—`` where not
    reached."""
    if r.time_to_target is None or r.steps_to_target is None:
        return _fmt_time(r.time_to_target), "—" if r.steps_to_target is None else str(r.steps_to_target)
    resolution = r.target_resolution or 1
    if resolution == 1:
        return _fmt_time(r.time_to_target), str(r.steps_to_target)
    return f"≤ {_fmt_time(r.time_to_target)}", f"{r.steps_to_target - resolution + 1}-{r.steps_to_target}"


def time_to_target_table(
    results: list[RunResult], target: float | None, task: str
) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the time-to-target table, one row per run in the order of ``results`` (the
    order of ``--optimizers``)."""
    head = [
        "optimizer",
        "lr",
        "status",
        "time to target (s)",
        "steps to target",
        "steps",
        "stopped by",
        "train time (s)",
        "final train loss",
        "final test loss",
    ]
    if task == "classification":
        head.append("final test acc")

    rows = []
    for r in results:
        f = r.final
        ran = r.status != "not run"
        row = [
            r.name,
            f"{r.lr:g}" if math.isfinite(r.lr) else "—",
            r.status,
            *target_cells(r),
            str(r.steps) if ran else "—",
            r.stopped_by or "—",
            _fmt_time(r.train_time if ran else None),
            f"{f['train_loss']:.4g}" if "train_loss" in f else "—",
            f"{f['test_loss']:.4g}" if "test_loss" in f else "—",
        ]
        if task == "classification":
            acc = f.get("test_acc", math.nan)
            row.append(f"{100 * acc:.1f}%" if math.isfinite(acc) else "—")
        rows.append(row)
    return head, rows


def budget_text(cfg: TrainConfig) -> str:
    """``each optimizer stops after N steps or 120 s, whichever comes first`` and the like."""
    steps = {cfg.steps_for(n) for n in cfg.optimizers}
    if steps == {None}:
        s = None
    elif len(steps) == 1:
        s = f"{steps.pop()} steps"
    else:
        s = "the steps listed (" + ", ".join(f"{n} {cfg.steps_for(n)}" for n in cfg.optimizers) + ")"
    t = None if cfg.budget is None else f"{cfg.budget:g} s of training"
    if s and t:
        return f"each optimizer stops after {s} or {t}, whichever comes first"
    return f"each optimizer stops after {s or t}"


def chance_level(ds: Dataset) -> float | None:
    """Chance-level test accuracy: that of always predicting the test split's most frequent class
    (``>= 1 / classes``; None for regression)."""
    if ds.task != "classification":
        return None
    return float(torch.bincount(ds.y_test.cpu()).max()) / len(ds.y_test)


#: fewer test examples than this and ``hessinv train`` warns: their loss and accuracy say little
MIN_TEST_EXAMPLES = 20


def small_test_split_warning(ds: Dataset) -> str | None:
    """A one-line warning where the test split has fewer than :data:`MIN_TEST_EXAMPLES` examples (one
    example scores 0% or 100%), else None."""
    n = len(ds.X_test)
    if n >= MIN_TEST_EXAMPLES:
        return None
    what = "its loss and accuracy say" if ds.task == "classification" else "its loss says"
    return (
        f"warning: the test split has {n} example{'' if n == 1 else 's'} (fewer than {MIN_TEST_EXAMPLES}): "
        f"{what} little; a larger --test-fraction or --samples gives more"
    )


def _target_stats(ds: Dataset) -> str:
    """``152.1 +- 77.09`` per standardized target column (``7, constant`` where only centered)."""
    pairs = zip(ds.target_mean or (), ds.target_std or (), strict=True)
    return ", ".join(f"{m:.4g} +- {s:.4g}" if s > 0 else f"{m:.4g}, constant" for m, s in pairs)


def loss_text(ds: Dataset) -> str:
    """What the losses of the table are, in a sentence: for standardized regression targets, the MSE in
    standardized units with the training split's mean and spread used (not the user's units)."""
    if ds.task == "classification":
        return "Losses: mean cross-entropy (natural log) over the split."
    if ds.target_std is None:
        return "Losses: mean squared error of the targets as given (not standardized)."
    one = len(ds.target_std) == 1
    text = (
        f"Losses: mean squared error of the standardized target{'' if one else 's'}, (y - mean) / std with "
        f"the training split's mean +- std ({_target_stats(ds)}), not in the target's own units"
    )
    if one and ds.target_std[0] > 0:
        sd = ds.target_std[0]
        text += f"; times std² = {sd * sd:.4g} for the MSE in the target's units"
    return text + "."


def loss_label(ds: Dataset) -> str:
    """The loss axis' label of the plot (what :func:`loss_text` says, short)."""
    if ds.task == "classification":
        return "cross-entropy loss"
    if ds.target_std is None:
        return "MSE loss"
    if len(ds.target_std) == 1:
        return f"MSE of standardized target ({_target_stats(ds)})"
    return "MSE of standardized targets"


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def train(
    ds: Dataset,
    cfg: TrainConfig,
    progress: ProgressFn | None = None,
    on_run_start: Callable[[str, float], None] | None = None,
) -> tuple[list[RunResult], dict[str, Any]]:
    """Run every optimizer of ``cfg``; write logs, ``summary.json``, ``table.md``, ``loss.png``."""
    from hessinv.cli.plots import plot_runs

    for name in cfg.optimizers:
        if name not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    missing: dict[str, list[str]] = {}  # pip package -> the optimizers that need it (every one named at once)
    for name in cfg.optimizers:
        if name in PEERS and not peer_available(name):
            missing.setdefault(PEERS[name].package, []).append(name)
    if missing:
        needs = "; ".join(
            f"{', '.join(map(repr, names))} {'need' if len(names) > 1 else 'needs'} the {package} package"
            for package, names in missing.items()
        )
        raise UserError(
            f"optimizer{'s' if sum(map(len, missing.values())) > 1 else ''} {needs}: "
            f"{install_hint('bench')}, or pip install {' '.join(missing)}"
        )
    dtype = {"float64": torch.float64, "float32": torch.float32}[cfg.dtype]
    device = torch.device(cfg.device)
    try:
        ds = ds.to(dtype=dtype, device=device)
    except DataError as e:  # (targets beyond the dtype's range)
        raise UserError(str(e)) from None
    loss_fn = loss_for(ds)
    init_model = build_model(
        ds.input_dim,
        ds.output_dim,
        cfg.depth,
        cfg.width,
        cfg.activation,
        cfg.residual,
        cfg.init,
        cfg.seed,
        dtype,
        device,
    )
    out = output_directory(cfg.out)
    _remove_stale_logs(out, cfg.optimizers)

    results: list[RunResult] = []
    interrupted = False
    for name in cfg.optimizers:
        lr = cfg.lrs.get(name, DEFAULT_LR[name])
        tuning: dict[str, float] = {}
        try:
            if cfg.tune and name in LR_GRID and name not in cfg.lrs:
                lr, tuning = tune_lr(name, ds, init_model, loss_fn, cfg, progress)
            if on_run_start is not None:
                on_run_start(name, lr)
            r = run_one(
                name,
                lr,
                ds,
                init_model,
                loss_fn,
                cfg,
                cfg.budget,
                cfg.steps_for(name),
                out / f"{name}.jsonl",
                progress,
            )
        except KeyboardInterrupt as e:  # during tuning
            sig = interrupt_signal(e)
            why = f"{interrupt_reason(sig)} while tuning"
            r = RunResult(name, lr, "interrupted", why, interrupted_by=signal_name(sig))
        interrupted = r.status == "interrupted"
        r.tuning = tuning
        results.append(r)
        if interrupted:
            break
    for name in cfg.optimizers[len(results) :]:  # (interrupted before them: a row each, not a silent gap)
        results.append(RunResult(name, math.nan, "not run", "the job was interrupted before it started"))
        (out / f"{name}.jsonl").unlink(missing_ok=True)  # (a previous job's log: this one has none)

    n_params = sum(p.numel() for p in init_model.parameters())
    summary = {
        "hessinv_version": hessinv.__version__,
        "torch_version": torch.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "load_average_at_end": _load_average(),  # other processes slow every timing down
        "dataset": {
            "name": ds.name,
            "task": ds.task,
            "train": len(ds.X_train),
            "test": len(ds.X_test),
            "features": ds.input_dim,
            "classes": ds.n_classes,
            "target_mean": ds.target_mean,  # (a standardized regression target: y = mean + std * output)
            "target_std": ds.target_std,
        },
        "model": {
            "depth": cfg.depth,
            "width": cfg.width,
            "activation": cfg.activation,
            "residual": cfg.residual,
            "init": cfg.init,
            "parameters": n_params,
            "dtype": cfg.dtype,
            "device": cfg.device,
        },
        "config": {
            "optimizers": cfg.optimizers,
            "batch_size": cfg.batch_size,
            "budget_s": cfg.budget,
            "steps": {name: cfg.steps_for(name) for name in cfg.optimizers},
            "target_loss": cfg.target_loss,
            "tune": cfg.tune,
            # (the cap used, derived or given; None where no learning rate was tuned)
            "tune_budget_s": tune_budget(cfg) if any(r.tuning for r in results) else cfg.tune_budget,
            "newton_damping": cfg.newton_damping,
            "curvature_batch_size": cfg.curvature_batch_size,
            "seed": cfg.seed,
            "lr_overrides": cfg.lrs,
        },
        "command": list(cfg.command) or None,  # (as given, to run it again)
        "data_notes": list(ds.notes),  # (what reading the data decided: a header skipped, a split)
        "chance_level": chance_level(ds),
        "runs": {r.name: r.to_json() for r in results if r.status != "not run"},
        "interrupted": interrupted,
    }
    if interrupted:  # (the signal: the exit status is 128 + its number; the table lists the runs not run)
        summary["interrupted_by"] = next(r.interrupted_by for r in results if r.status == "interrupted")
        summary["not_run"] = [r.name for r in results if r.status == "not run"]
    head, rows = time_to_target_table(results, cfg.target_loss, ds.task)
    summary["table"] = [dict(zip(head, r, strict=True)) for r in rows]
    (out / "summary.json").write_text(json.dumps(_jsonable(summary), indent=2) + "\n")
    title = (
        f"{ds.name}: a linear model ({n_params} parameters)"
        if cfg.depth == 1  # (one Linear layer: no width, no activation)
        else f"{ds.name}: depth {cfg.depth}, width {cfg.width} {cfg.activation}"
        f"{' residual' if cfg.residual else ''} MLP ({n_params} parameters)"
    )
    heading = target_heading(cfg.target_loss, "training time only, evaluation excluded")
    md = f"# {title}\n\n{heading[:1].upper()}{heading[1:]}; {budget_text(cfg)}.\n\n"
    # (how the data was read, as the terminal's header said it; what the losses are measured in)
    data_lines = [*ds.notes, *filter(None, [small_test_split_warning(ds)])]
    md += f"Data: {ds.describe()}.\n" + "".join(f"- {line}\n" for line in data_lines) + "\n"
    md += f"{loss_text(ds)}\n\n"
    (out / "table.md").write_text(md + markdown_table(head, rows))
    try:
        ran = [r for r in results if r.status != "not run"]
        plot_runs(
            ran,
            out / "loss.png",
            title=title,
            target=cfg.target_loss,
            chance=chance_level(ds),
            loss_label=loss_label(ds),
        )
    except Exception as e:  # a plotting problem must not lose the logs
        summary["plot_error"] = f"{type(e).__name__}: {e}"
        (out / "summary.json").write_text(json.dumps(_jsonable(summary), indent=2) + "\n")
    return results, summary
