"""``DistributedPreconditioner.wrap(pc)`` with ``precondition_`` and a torch.optim optimizer under DDP (the
docs' loop for torch's optimizers): the optimizer's settings compared between the ranks, and a shard refused
on one rank refused on every rank before the step's collectives (a probe of the distributed module found a
raw AttributeError for the first and a wait until the collective timeout for the second)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import hessinv.optim as ho
from hessinv.errors import HessinvError
from hessinv.optim import distributed as hd

START = "fork" if sys.platform.startswith("linux") else "spawn"
COLLECTIVE_TIMEOUT = 8.0


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)


def _record(out: str, rank: int, what: dict) -> None:
    Path(out, f"rank{rank}.json").write_text(json.dumps(what))


def _run_job(worker, tmp_path, case: str) -> list[dict]:
    try:
        hd.launch(
            worker, 2, (str(tmp_path), case), timeout=COLLECTIVE_TIMEOUT, join_timeout=120, start_method=START
        )
    except HessinvError:
        pass  # (the job's teardown after a timed-out collective; each rank recorded its own outcome first)
    return [json.loads(Path(tmp_path, f"rank{r}.json").read_text()) for r in range(2)]


# -- F1: DistributedPreconditioner.wrap(pc, optimizer=<torch.optim optimizer>) -----------------------------
def _wrap_with_torch_optimizer_worker(rank: int, world: int, out: str, case: str) -> None:
    torch.set_num_threads(1)
    model = _model()
    loss_fn = nn.CrossEntropyLoss()
    sgd = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    pc = hd.DistributedPreconditioner.wrap(ho.Preconditioner(model, loss_fn, seed=0), optimizer=sgd)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    X, y = _data()
    Xl, yl = hd.shard(X, rank, world), hd.shard(y, rank, world)
    outcome: dict = {}
    t0 = time.monotonic()
    for step in range(3 if case == "interrupt" else 2):
        if case == "lr_on_one_rank" and step == 1 and rank == 0:
            sgd.param_groups[0]["lr"] = 0.25  # a scheduler stepped on rank 0 only
        if case == "interrupt" and step == 2 and rank == 1:  # Ctrl-C inside precondition_'s checks

            def interrupt(self, inputs, targets):
                raise KeyboardInterrupt

            ho.Preconditioner._precondition_checks = interrupt  # (this process's class only)
        try:
            sgd.zero_grad()
            loss_fn(ddp(Xl), yl).backward()
            pc.precondition_(Xl, yl)
            sgd.step()
            outcome[str(step)] = "ok"
            outcome["params"] = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist()
        except BaseException as e:  # noqa: BLE001 - recorded, an interrupt too
            outcome[str(step)] = f"{type(e).__module__}.{type(e).__name__}: {e}"[:300]
            break
    outcome["seconds"] = time.monotonic() - t0
    _record(out, rank, outcome)


def test_wrap_accepts_the_torch_optimizer_it_steps_with(tmp_path):
    """``wrap(pc, optimizer=...)``: "the optimizer that steps with pc, whose parameter groups' lr, momentum
    and weight_decay every step compares between the ranks" -- with a torch.optim optimizer (the
    precondition_ use the docs recommend wrap for) every precondition_ raised a raw AttributeError
    ('SGD' object has no attribute '_newton', from _state_fingerprint)."""
    outcomes = _run_job(_wrap_with_torch_optimizer_worker, tmp_path, "plain")
    assert [(o["0"], o["1"]) for o in outcomes] == [("ok", "ok")] * 2
    assert outcomes[0]["params"] == outcomes[1]["params"]  # the replicas alike, bit for bit


def test_wrap_with_a_torch_optimizer_refuses_an_lr_changed_on_one_rank(tmp_path):
    """A scheduler stepped on one rank only: the same DistributedError on every rank (the replicas drifted
    0.088 apart in 25 steps where nothing compared the optimizer's settings)."""
    outcomes = _run_job(_wrap_with_torch_optimizer_worker, tmp_path, "lr_on_one_rank")
    for o in outcomes:
        assert o["0"] == "ok"
        assert o["1"].startswith("hessinv.errors.DistributedError"), o


# -- F2: a shard refused on one rank in the precondition_ loop: a hang until the collective timeout --------
def _refused_shard_worker(rank: int, world: int, out: str, case: str) -> None:
    torch.set_num_threads(1)
    model = _model()
    loss_fn = nn.CrossEntropyLoss(ignore_index=-1)
    sgd = torch.optim.SGD(model.parameters(), lr=0.5)
    pc = hd.DistributedPreconditioner.wrap(ho.Preconditioner(model, loss_fn, seed=0))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    X, y = _data()
    Xl, yl = hd.shard(X, rank, world), hd.shard(y, rank, world)
    if rank == 1 and case == "empty":
        Xl, yl = Xl[:0], yl[:0]
    if rank == 1 and case == "all_ignored":
        yl = torch.full_like(yl, -1)
    t0 = time.monotonic()
    outcome = {}
    try:
        sgd.zero_grad()
        loss_fn(ddp(Xl), yl).backward()
        pc.precondition_(Xl, yl)
        sgd.step()
        outcome["result"] = "ok"
    except Exception as e:  # noqa: BLE001
        outcome["result"] = f"{type(e).__module__}.{type(e).__name__}: {e}"[:300]
        outcome["hessinv"] = isinstance(e, HessinvError)
    outcome["seconds"] = time.monotonic() - t0
    # the next step starts on every rank alike (a rank that went on alone would wait in its collectives)
    _record(out, rank, outcome)


@pytest.mark.parametrize("case", ["empty", "all_ignored"])
def test_a_shard_refused_on_one_rank_in_the_precondition_loop_is_refused_on_every_rank(tmp_path, case):
    """docs/distributed.md: a rank whose shard is refused (empty, every target ignored) "is refused on every
    rank ... before the step's collectives; the others waited in them until the collective timeout before"
    -- so for Newton's closure loop. With ``DistributedPreconditioner.wrap(pc)`` + ``precondition_`` (the
    docs' recommendation for torch.optim under DDP) rank 1 refuses (ShapeMismatchError) or skips (warning)
    on its own, while rank 0 waits in check_step's all_gather until the collective timeout and gets gloo's
    raw RuntimeError ('Timed out waiting ... for send operation')."""
    outcomes = _run_job(_refused_shard_worker, tmp_path, case)
    for rank, o in enumerate(outcomes):
        assert o["seconds"] < COLLECTIVE_TIMEOUT / 2, (rank, o)  # no wait for the collective timeout
        assert o["result"] != "ok" and o.get("hessinv"), (rank, o)  # a named error on every rank


def test_an_interrupt_on_one_rank_in_the_precondition_loop_stops_every_rank(tmp_path):
    """Ctrl-C on one rank inside ``precondition_``'s checks: that rank's KeyboardInterrupt, the others'
    DistributedError at once (they waited in the collectives until the timeout)."""
    outcomes = _run_job(_wrap_with_torch_optimizer_worker, tmp_path, "interrupt")
    assert [(o["0"], o["1"]) for o in outcomes] == [("ok", "ok")] * 2
    assert outcomes[0]["2"].startswith("hessinv.errors.DistributedError")
    assert outcomes[1]["2"].startswith("builtins.KeyboardInterrupt")
    assert all(o["seconds"] < COLLECTIVE_TIMEOUT / 2 for o in outcomes), outcomes
