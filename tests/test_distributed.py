"""Data-parallel Newton over torch.distributed: 2 processes, gloo, CPU (hessinv.optim.distributed).

One spawned 2-process job runs every strategy and the checkpoint round trip (a spawn costs seconds);
the rank-0 results come back through files and are compared here with a single-process run.
"""

from __future__ import annotations

import functools
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from reference import autograd_hessian, autograd_per_example_gradients
from torch import nn

import hessinv.optim as ho
from hessinv.errors import DistributedError, HessinvError, InvalidArgumentError
from hessinv.optim import distributed as hd

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="no gloo"
)

F64 = torch.float64
START = "fork" if sys.platform.startswith("linux") else "spawn"  # fork: no re-import of torch (seconds)
STEPS, REFRESH, LOCAL_BATCH, CURV = 8, 4, 6, 5


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)


def _data(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    n = STEPS * LOCAL_BATCH * 2  # the global batch of a 2-process run, every step
    return torch.randn(n, 4, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)


def _newton(model: nn.Module, loss_fn: nn.Module | None = None, **kw) -> ho.Newton:
    # max_rank = CURV: one output direction per example of the 3 (a budgeted root, whose examples the
    # sharded strategy forms on different ranks)
    settings = dict(
        mode="precondition", seed=0, lr=0.5, curvature_batch_size=CURV, refresh=REFRESH,
        diagonal_damping=50.0, max_rank=CURV,
    )  # fmt: skip
    settings = {**settings, **kw}
    if settings["mode"] == "trust-region":  # (precondition-mode settings: refused there)
        for k in ("diagonal_damping", "refresh", "max_rank"):
            settings.pop(k)
    return ho.Newton(model, loss_fn or nn.CrossEntropyLoss(), **settings)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _run(dp: hd.DataParallel, model: nn.Module, X, y, start: int, stop: int, world: int) -> float:
    """Steps [start, stop) on global batches; the largest parameter difference between ranks."""
    worst = 0.0
    Bg = 2 * LOCAL_BATCH
    for t in range(start, stop):
        dp.step(X[t * Bg : (t + 1) * Bg], y[t * Bg : (t + 1) * Bg])
        p = _flat(model)
        ps = [torch.empty_like(p) for _ in range(world)]
        torch.distributed.all_gather(ps, p)
        worst = max(worst, max(float((q - p).abs().max()) for q in ps))
    return worst


def _worker(rank: int, world: int, out: str) -> None:
    X, y = _data(world)
    loss_fn = nn.CrossEntropyLoss()
    results = {}
    for strategy in hd.STRATEGIES:
        model = _model()
        dp = hd.DataParallel(_newton(model), model, loss_fn, strategy)
        half = STEPS // 2  # a refresh boundary: the resumed run rebuilds the curvature on schedule
        diff = _run(dp, model, X, y, 0, half, world)
        hd.save_on_rank0({"model": model.state_dict(), "opt": dp.state_dict()}, f"{out}/{strategy}.pt")
        diff = max(diff, _run(dp, model, X, y, half, STEPS, world))
        final = _flat(model).clone()
        # resume from rank 0's checkpoint in fresh objects: the same parameters, bit for bit
        model2 = _model()
        dp2 = hd.DataParallel(_newton(model2), model2, loss_fn, strategy)
        ckpt = torch.load(f"{out}/{strategy}.pt", weights_only=False)
        model2.load_state_dict(ckpt["model"])
        dp2.load_state_dict(ckpt["opt"])
        diff = max(diff, _run(dp2, model2, X, y, half, STEPS, world))
        results[strategy] = {"final": final, "resumed": _flat(model2).clone(), "rank_diff": diff}
    if rank == 0:
        torch.save(results, f"{out}/results.pt")


def _raising_worker(rank: int, world: int) -> None:
    model = _model()
    dp = hd.DataParallel(_newton(model), model, nn.CrossEntropyLoss(), "sharded")
    X, y = _data(world)
    for t in range(STEPS):
        if rank == 1 and t == 2:
            raise ValueError("rank one fails on purpose")
        dp.step(X[t * 12 : (t + 1) * 12], y[t * 12 : (t + 1) * 12])


def _two_process_job(worker, tmp_path_factory, name: str, timeout: float = 30) -> dict:
    """``worker`` run by 2 processes; what rank 0 saved to ``<dir>/<name>.pt``."""
    out = tmp_path_factory.mktemp(name)
    hd.launch(worker, 2, (str(out),), timeout=timeout, join_timeout=240, start_method=START)
    return torch.load(Path(out) / f"{name}.pt", weights_only=False)


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory) -> dict:
    return _two_process_job(_worker, tmp_path_factory, "results", timeout=60)


def _single_process(strategy: str, data=None, loss_fn=None, **kw) -> torch.Tensor:
    """One process, global batch 2B, the same curvature schedule."""
    X, y = _data(1) if data is None else data
    model = _model()
    opt = _newton(model, loss_fn, **kw)
    Bg = 2 * LOCAL_BATCH
    for t in range(STEPS):
        opt.step(X[t * Bg : (t + 1) * Bg], y[t * Bg : (t + 1) * Bg])
    return _flat(model)


@pytest.mark.parametrize("strategy", hd.STRATEGIES)
def test_parameters_identical_on_every_rank(two_process_results, strategy):
    assert two_process_results[strategy]["rank_diff"] == 0.0


@pytest.mark.parametrize("strategy", hd.STRATEGIES)
def test_resume_from_rank0_checkpoint_is_bit_exact(two_process_results, strategy):
    r = two_process_results[strategy]
    assert torch.equal(r["final"], r["resumed"])


@pytest.mark.parametrize("strategy", ["sharded", "replicated"])
def test_two_processes_match_one_process_with_the_global_batch(two_process_results, strategy):
    ref = _single_process(strategy)
    got = two_process_results[strategy]["final"]
    assert not torch.equal(ref, _model_flat := _flat(_model()))  # it trained
    # the all-reduced and the direct gradient differ in the last bits; the default eigenbasis amplifies
    # that by 1/gap of the Kronecker factors' eigenvalues (ties are broken 1e-8 apart): ~1e-7 relative
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-9)
    del _model_flat


def test_rotate_and_average_differ_from_one_process(two_process_results):
    """They are other algorithms (one rank's / every rank's own curvature batch): not the reference."""
    ref = _single_process("sharded")
    for s in ("rotate", "average"):
        assert float((two_process_results[s]["final"] - ref).abs().max()) > 1e-8


def test_a_rank_that_raises_stops_the_job_with_a_clear_error():
    t0 = time.monotonic()
    with pytest.raises(DistributedError, match=r"rank 1 of 2 failed(.|\n)*rank one fails on purpose"):
        hd.launch(_raising_worker, 2, timeout=30, join_timeout=120, start_method=START)
    assert time.monotonic() - t0 < 60  # stopped, not waited out


def test_needs_an_initialized_process_group():
    opt = _newton(_model())
    with pytest.raises(DistributedError, match="init_process_group"):
        hd.distribute(opt)


def test_shard_needs_an_even_split():
    with pytest.raises(DistributedError, match="divisible by 2"):
        hd.shard(torch.zeros(5, 2), 0, 2)
    assert torch.equal(hd.shard(torch.arange(6), 1, 2), torch.arange(3, 6))


def test_cli_nproc_2_writes_the_single_process_outputs(tmp_path, monkeypatch):
    import json

    from hessinv.cli import distributed as hcd
    from hessinv.cli import main

    monkeypatch.setattr(hcd, "START_METHOD", START)
    args = ["train", "--steps", "5", "--optimizers", "gauss-newton,adam", "--depth", "3", "--width", "6",
            "--samples", "300", "--batch-size", "32", "--no-tune", "--quiet"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    assert main([*args, "--nproc", "2", "--out", str(tmp_path / "two")]) == 0
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["distributed"]["processes"] == 2 and "distributed" not in one
    for f in ("gauss-newton.jsonl", "adam.jsonl", "table.md", "loss.png"):
        assert (tmp_path / "two" / f).is_file()
    for name in ("gauss-newton", "adam"):
        a, b = one["runs"][name], two["runs"][name]
        assert a["steps"] == b["steps"] == 5 and b["status"] == "ok"
        for key in ("train_loss", "test_loss"):
            assert abs(a["final"][key] - b["final"][key]) <= 1e-9 * abs(a["final"][key])


def test_cli_nproc_needs_a_divisible_batch(tmp_path, capsys):
    from hessinv.cli import main

    rc = main(["train", "--nproc", "2", "--batch-size", "33", "--steps", "1", "--out", str(tmp_path)])
    assert rc == 2 and "multiple of 2" in capsys.readouterr().err


# -- what a data-parallel run must compute as one process does, or refuse by name ------------------------
IDENTITY = {"basis": "identity"}  # no eigenbasis: 2 processes agree with 1 to rounding (1e-15)


def _ignored_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Every fifth label ignored (-1): rank 0's rows of a 12-row global batch hold 2 of them, rank 1's 1."""
    X, y = _data(2)
    y = y.clone()
    y[::5] = -1
    return X, y


def _regression_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    n = STEPS * LOCAL_BATCH * 2
    return torch.randn(n, 4, generator=g, dtype=F64), torch.randn(n, 3, generator=g, dtype=F64)


def _global_steps(dp: hd.DataParallel, X, y) -> list[float]:
    Bg = 2 * LOCAL_BATCH
    return [float(dp.step(X[t * Bg : (t + 1) * Bg], y[t * Bg : (t + 1) * Bg])) for t in range(STEPS)]


def _closure_steps(opt: ho.Newton, ddp, loss_fn, X, y, rows, steps: int) -> None:
    """The documented closure/DDP loop; ``rows(t, rank)``: this rank's rows of global batch ``t``."""
    rank, Bg = torch.distributed.get_rank(), 2 * LOCAL_BATCH
    for t in range(steps):
        lo, hi = rows(t, rank)
        xl, yl = X[t * Bg + lo : t * Bg + hi], y[t * Bg + lo : t * Bg + hi]

        def closure(xl=xl, yl=yl):
            opt.zero_grad()
            loss = loss_fn(ddp(xl), yl)
            loss.backward()
            return loss.detach()

        opt.step(closure)


def _halves(t: int, rank: int) -> tuple[int, int]:
    return 6 * rank, 6 * rank + 6


def _five_and_seven(t: int, rank: int) -> tuple[int, int]:
    """Even halves at the first step (a refresh), then 5 and 7 rows (REFRESH = 4: not refreshes)."""
    return _halves(t, rank) if t == 0 else ((0, 5) if rank == 0 else (5, 12))


def _error(fn) -> str | None:
    """``fn()``'s DistributedError message (raised alike on every rank), or None."""
    try:
        fn()
    except DistributedError as e:
        return str(e)
    return None


def _probe_worker(rank: int, world: int, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    res: dict = {}
    # ignore_index, a different number of ignored labels on each rank: the curvature batch drawn among
    # the labelled rows of the global batch, each rank's loss weighted by its share of them
    X, y = _ignored_data()
    lf = nn.CrossEntropyLoss(ignore_index=-1)
    for strategy in ("sharded", "replicated"):
        model = _model()
        dp = hd.DataParallel(_newton(model, lf, **IDENTITY), model, lf, strategy)
        losses = _global_steps(dp, X, y)
        res[f"ignore/{strategy}"] = (_flat(model).clone(), losses)
    # ... which the plain closure loop (the ranks' means averaged) would get wrong: refused
    model = _model()
    opt = hd.distribute(_newton(model, lf, **IDENTITY))
    res["ignore/closure"] = _error(partial(_closure_steps, opt, DDP(model), lf, X, y, _halves, 2))
    # a shard whose every label is ignored (the global batch's are not): refused alike on every rank
    y_none = y.clone()
    y_none[6:12] = -1
    model = _model()
    dp = hd.DataParallel(_newton(model, lf, **IDENTITY), model, lf, "sharded")
    res["ignore/empty-shard"] = _error(partial(_global_steps, dp, X, y_none))
    # local batches of 5 and 7 rows from the second step on
    X, y = _data(2)
    lf = nn.CrossEntropyLoss()
    for strategy in ("sharded", "average"):
        model = _model()
        opt = hd.distribute(_newton(model, lf, **IDENTITY), strategy)
        res[f"uneven/{strategy}"] = _error(
            partial(_closure_steps, opt, DDP(model), lf, X, y, _five_and_seven, 3)
        )
    # the closure loop without DDP: each rank's gradient is its own shard's (the replicas drifted apart)
    model = _model()
    opt = hd.distribute(_newton(model, lf, **IDENTITY))
    res["no-ddp"] = _error(partial(_closure_steps, opt, model, lf, X, y, _halves, 2))
    # another activation on rank 1 (the same parameter shapes)
    model = _model()
    if rank == 1:
        model[1] = nn.ReLU()
    res["stages"] = _error(partial(hd.distribute, _newton(model, lf, **IDENTITY)))
    # settings that differ on rank 1
    for key, kw in (
        ("lr", {"lr": 0.1}),
        ("curvature_batch_size", {"curvature_batch_size": 3}),
        ("weight_decay", {"weight_decay": 0.5}),
    ):
        model = _model()
        newton = _newton(model, **(kw if rank == 1 else {}))
        res[f"settings/{key}"] = _error(partial(hd.DataParallel, newton, model, lf, "sharded"))
        res[f"settings/{key}/untouched"] = not isinstance(newton.preconditioner, hd.DistributedPreconditioner)
    # MSE with a budgeted root (max_rank 10 < 5 examples x 3 outputs): every output direction ties
    X, y = _regression_data()
    model, lf = _model(), nn.MSELoss()
    dp = hd.DataParallel(_newton(model, lf, max_rank=10, **IDENTITY), model, lf, "sharded")
    _global_steps(dp, X, y)
    res["mse-budget/sharded"] = _flat(model).clone()
    # the defaults (max_rank 80, 8 curvature examples) on a model whose root has 72 rows: the choice
    # between a rebuild of K and a rank update of D follows their costs, which the Linear rows' factors set
    X, y = _wide_data()
    model = _wide_model()
    dp = hd.DataParallel(_wide_newton(model), model, nn.CrossEntropyLoss(), "sharded")
    for t in range(WIDE_STEPS):
        dp.step(X[t * 32 : (t + 1) * 32], y[t * 32 : (t + 1) * 32])
    res["defaults/sharded"] = _flat(model).clone()
    # a class out of range in rank 1's shard of one batch, in a loop that skips a refused batch
    X, y = _data(2)
    y = y.clone()
    y[12 + 7] = 5  # (3 classes) rank 1's rows of the second global batch
    model = _model()
    dp = hd.DataParallel(_newton(model, **IDENTITY), model, nn.CrossEntropyLoss(), "sharded")
    refused = []
    for t in range(3):
        try:
            dp.step(X[t * 12 : (t + 1) * 12], y[t * 12 : (t + 1) * 12])
        except HessinvError as e:
            refused.append((t, type(e).__name__))
    res["bad-label"] = refused
    # a loss that raises a plain error on one rank's shard once (not one hessinv names): the others refuse
    # by name, that rank re-raises its own, and the next step goes on -- a second agreement in the step
    # (this session's, for the closure loop) waited for the failing rank there until the timeout (a review)
    flaky = {"fail": False}

    class Flaky(nn.CrossEntropyLoss):
        def forward(self, o, t):
            if flaky["fail"]:
                flaky["fail"] = False
                raise RuntimeError("a flaky loss on this rank")
            return super().forward(o, t)

    X, y = _data(2)
    model, lf = _model(), Flaky()
    dp = hd.DataParallel(_newton(model, lf, **IDENTITY), model, lf, "sharded")
    outcomes = []
    for t in range(3):
        flaky["fail"] = t == 1 and rank == 1
        try:
            dp.step(X[t * 12 : (t + 1) * 12], y[t * 12 : (t + 1) * 12])
            outcomes.append("ok")
        except (HessinvError, RuntimeError) as e:
            outcomes.append(type(e).__name__)
    res["raw-error"] = outcomes
    # the closure loop where rank 1's shard of the second batch has nothing to learn (every label ignored)
    # or no row: refused on every rank before the step's collectives, and the loop goes on (the other rank
    # waited in the step's all-gather until the collective timeout, then got gloo's bare error: a probe)
    X, y = _data(2)
    for case in ("ignored", "empty", "raises"):
        model = _model()
        lf = nn.CrossEntropyLoss(ignore_index=-1)
        opt, ddp = hd.distribute(_newton(model, lf, **IDENTITY)), DDP(model)
        outcomes = []
        for t in range(3):
            xl, yl = (
                X[t * 12 + 6 * rank : t * 12 + 6 * rank + 6],
                y[t * 12 + 6 * rank : t * 12 + 6 * rank + 6],
            )
            if t == 1 and rank == 1 and case in ("ignored", "empty"):
                xl, yl = (xl, torch.full_like(yl, -1)) if case == "ignored" else (xl[:0], yl[:0])
            fails = t == 1 and rank == 1 and case == "raises"

            def closure(xl=xl, yl=yl, lf=lf, ddp=ddp, opt=opt, fails=fails, model=model):
                opt.zero_grad()
                loss = lf(ddp(xl), yl)
                loss.backward()
                if fails:  # a second forward with autograd on, on one rank: refused ("2 different batches")
                    model(xl[:2])
                return loss.detach()

            try:
                opt.step(closure)
                outcomes.append("ok")
            except HessinvError as e:
                outcomes.append(type(e).__name__)
        res[f"local-refusal/{case}"] = outcomes
    # a plain Preconditioner (and a Newton not distribute()d) in a process group: each rank's curvature its
    # own shard's, the replicas drift apart (1.2% in 10 steps, a probe's DDP loop): warned, once each
    model, lf = _model(), nn.CrossEntropyLoss()
    pc, opt = ho.Preconditioner(model, lf, seed=0), _newton(_model(), lf)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(3):
            xb, yb = X[t * 12 : t * 12 + 6], y[t * 12 : t * 12 + 6]
            model[0].weight.requires_grad_(t != 1)  # (following a layer forgot that it had warned)
            model.zero_grad()
            lf(model(xb), yb).backward()
            pc.precondition_(xb, yb)
            opt.step(xb, yb)
    res["plain-warned"] = sum("DistributedPreconditioner.wrap" in str(w.message) for w in caught)
    if rank == 0:
        torch.save(res, f"{out}/probe.pt")


WIDE_STEPS = 6


def _wide_model() -> nn.Sequential:
    torch.manual_seed(0)
    layers = [
        nn.Linear(64, 8),
        nn.Tanh(),
        nn.Linear(8, 8),
        nn.Tanh(),
        nn.Linear(8, 8),
        nn.Tanh(),
        nn.Linear(8, 10),
    ]
    return nn.Sequential(*layers).to(F64)


def _wide_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(32 * WIDE_STEPS, 64, generator=g, dtype=F64), torch.randint(
        0, 10, (32 * WIDE_STEPS,), generator=g
    )


def _wide_newton(model: nn.Module) -> ho.Newton:
    return ho.Newton(model, nn.CrossEntropyLoss(), mode="precondition", seed=0, **IDENTITY)


def test_sharded_matches_one_process_at_the_default_settings(probe_results):
    """The sharded factor kept no Linear row factors (each rank has its own rows), so its costs -- which
    choose between a rebuild of K with all of D and a rank update of the stale entries during warm-up --
    were not one process's: another algorithm from the second step on (11% of the movement after two
    steps, silently; the default CLI run's loss 2.069 against 2.094). The ranks' factors are joined now."""
    X, y = _wide_data()
    model = _wide_model()
    opt = _wide_newton(model)
    for t in range(WIDE_STEPS):
        opt.step(X[t * 32 : (t + 1) * 32], y[t * 32 : (t + 1) * 32])
    start = _flat(_wide_model())
    got, ref = probe_results["defaults/sharded"], _flat(model)
    assert float((got - ref).norm()) <= 1e-10 * float((ref - start).norm())


@pytest.fixture(scope="module")
def probe_results(tmp_path_factory) -> dict:
    return _two_process_job(_probe_worker, tmp_path_factory, "probe")


@pytest.mark.parametrize("strategy", ["sharded", "replicated"])
def test_ignore_index_with_unequal_labelled_counts_matches_one_process(probe_results, strategy):
    data, lf = _ignored_data(), nn.CrossEntropyLoss(ignore_index=-1)
    got, losses = probe_results[f"ignore/{strategy}"]
    ref = _single_process(strategy, data, lf, **IDENTITY)
    assert float((ref - _flat(_model())).abs().max()) > 1e-2  # it trained
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    # the reported loss is the global batch's (not the ranks' mean of means)
    X, y = data
    model = _model()
    opt = _newton(model, lf, **IDENTITY)
    want = [float(opt.step(X[t * 12 : (t + 1) * 12], y[t * 12 : (t + 1) * 12])) for t in range(STEPS)]
    assert losses == pytest.approx(want, rel=1e-12)


def test_closure_loop_with_unequal_labelled_counts_is_refused(probe_results):
    assert "different numbers of targets" in probe_results["ignore/closure"]
    assert "DataParallel" in probe_results["ignore/closure"]


def test_a_plain_error_on_one_rank_under_data_parallel_is_refused_without_a_hang(probe_results):
    assert probe_results["raw-error"] == ["ok", "DistributedError", "ok"]  # (rank 0's)


def test_a_plain_preconditioner_in_a_process_group_is_warned_about_once(probe_results):
    assert probe_results["plain-warned"] == 2  # (the Preconditioner's, the plain Newton's)


@pytest.mark.parametrize("case", ["ignored", "empty", "raises"])
def test_a_shard_refused_in_the_closure_loop_is_refused_on_every_rank_without_a_hang(probe_results, case):
    assert probe_results[f"local-refusal/{case}"] == ["ok", "DistributedError", "ok"]  # (rank 0's)


def test_a_shard_without_a_labelled_target_is_refused_on_every_rank(probe_results):
    msg = probe_results["ignore/empty-shard"]
    assert msg is not None and "rank 1's shard of the global batch has no target" in msg


@pytest.mark.parametrize("strategy", ["sharded", "average"])
def test_unequal_local_batches_are_refused_on_any_step(probe_results, strategy):
    msg = probe_results[f"uneven/{strategy}"]
    assert msg is not None and "local batch size differs between ranks: [5, 7]" in msg


@pytest.mark.parametrize("key", ["lr", "curvature_batch_size", "weight_decay"])
def test_settings_that_differ_between_ranks_are_refused_by_name(probe_results, key):
    msg = probe_results[f"settings/{key}"]
    assert msg is not None and "settings differ between ranks" in msg and f"{key}:" in msg
    assert probe_results[f"settings/{key}/untouched"]  # refused before anything changed


def test_gradients_that_differ_between_ranks_are_refused(probe_results):
    """A closure loop without DistributedDataParallel: each rank stepped on its own shard's gradient and the
    replicas drifted apart (0.045 after 10 steps), silently."""
    msg = probe_results["no-ddp"]
    assert msg is not None and "gradient differs between ranks" in msg and "DistributedDataParallel" in msg


def test_a_different_function_with_the_same_shapes_is_refused(probe_results):
    """ReLU on rank 1 where rank 0 has Tanh: DDP's averaged gradient trained the average of two networks."""
    msg = probe_results["stages"]
    assert msg is not None and "settings differ between ranks" in msg and "ReLU()" in msg


def test_sharded_mse_with_a_budgeted_root_matches_one_process(probe_results):
    ref = _single_process("sharded", _regression_data(), nn.MSELoss(), max_rank=10, **IDENTITY)
    assert float((ref - _flat(_model())).abs().max()) > 1e-2  # it trained
    torch.testing.assert_close(probe_results["mse-budget/sharded"], ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("loss_fn", [nn.MSELoss(), nn.CrossEntropyLoss(label_smoothing=0.1)])
def test_a_budgeted_root_does_not_depend_on_the_examples_around_it(loss_fn):
    """``G`` of 5 examples at once, and as 2 + 3 examples scaled by their share (what ``sharded`` forms on
    two ranks): the same, also where every output direction ties (MSE: ``Lambda_n = 2 / (B C) I``)."""
    import math

    model = _model()
    g = torch.Generator().manual_seed(5)
    X = torch.randn(5, 4, generator=g, dtype=F64)
    y = torch.randn(5, 3, generator=g, dtype=F64) if isinstance(loss_fn, nn.MSELoss) else torch.arange(5) % 3
    pc = ho.Preconditioner(model, loss_fn, curvature_batch_size=5, basis="identity", max_rank=10, seed=0)
    U, S = pc._root(X, y, full=True)
    parts = [pc._root(X[sl], y[sl], of=5, full=True) for sl in (slice(0, 2), slice(2, 5))]
    Us = torch.cat([u * math.sqrt(n / 5) for (u, _), n in zip(parts, (2, 3), strict=True)])
    Ss = torch.cat([s for _, s in parts])
    G, Gs = U.T @ (S[:, None] * U), Us.T @ (Ss[:, None] * Us)
    assert U.shape[0] == Us.shape[0] == 10
    torch.testing.assert_close(Gs, G, rtol=0, atol=1e-12 * float(G.abs().max()))


@pytest.fixture
def one_process_group():
    """A 1-process gloo group in this process (destroyed after: forked launches start their own)."""
    hd.init_process_group(0, 1, hd.free_port(), timeout=30)
    yield
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize(
    "loss_fn, message",
    [
        (nn.MSELoss(reduction="sum"), "reduction='sum'"),
        (nn.CrossEntropyLoss(reduction="sum"), "reduction='sum'"),
        (nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0], dtype=F64)), "class weights"),
        (functools.partial(F.cross_entropy, reduction="sum"), "reduction='sum'"),
        (
            functools.partial(F.cross_entropy, weight=torch.tensor([1.0, 2.0, 3.0], dtype=F64)),
            "class weights",
        ),
    ],
)
def test_losses_that_are_not_a_per_example_mean_are_refused(one_process_group, loss_fn, message):
    model = _model()
    opt = _newton(model, loss_fn, mode="auto")
    with pytest.raises(DistributedError, match=message):
        hd.distribute(opt)
    assert opt.mode == "auto" and not isinstance(opt.preconditioner, hd.DistributedPreconditioner)
    with pytest.raises(DistributedError, match=message):
        hd.DataParallel(_newton(model), model, loss_fn)


def test_a_function_that_sums_is_refused_at_its_first_step(one_process_group):
    """A lambda (or a module without reduction=) that sums over the examples: found by evaluating it at
    the first step (the ranks' averaged gradients would be half the global sum's, silently); a mean
    function and KLDivLoss(reduction='batchmean') (a per-example mean) train."""
    model = _model()
    X, y = _data(1)
    summed = lambda o, t: F.cross_entropy(o, t, reduction="sum")  # noqa: E731
    dp = hd.DataParallel(_newton(model, summed), model, summed)
    with pytest.raises(DistributedError, match="sums over the examples"):
        dp.step(X[:8], y[:8])
    y_hidden = y[:8].clone()
    y_hidden[:4] = -100  # the function ignores these (F.cross_entropy's default): the probe must look further
    dp = hd.DataParallel(_newton(model, summed), model, summed)
    with pytest.raises(DistributedError, match="sums over the examples"):
        dp.step(X[:8], y_hidden)
    mean = lambda o, t: F.cross_entropy(o, t)  # noqa: E731
    hd.DataParallel(_newton(model, mean), model, mean).step(X[:8], y[:8])
    kl = nn.KLDivLoss(reduction="batchmean")
    hd.DataParallel(_newton(model, kl), model, kl)


def test_process_group_arguments_are_checked():
    """init_process_group with a bad rank, world size, port or timeout waited out its timeout or raised a
    raw ValueError; the module's functions outside a process group raised raw errors."""
    for args, kw in (
        ((2, 2, 1234), {}),
        ((0, 0, 1234), {}),
        ((0, 1, -5), {}),
        ((0, 1, 1234), {"timeout": -1}),
    ):
        with pytest.raises(InvalidArgumentError):
            hd.init_process_group(*args, **kw)
    assert not torch.distributed.is_initialized()
    with pytest.raises(DistributedError, match="not initialized"):
        hd.agree_stop(True)
    with pytest.raises(DistributedError, match="not initialized"):
        hd.save_on_rank0({}, "unused.pt")
    with pytest.raises(InvalidArgumentError, match="start_method"):
        hd.launch(print, 1, start_method="bogus")


@pytest.mark.parametrize("strategy", ["bogus", "Sharded", "", None])
def test_a_bad_strategy_is_a_named_error_that_changes_nothing(one_process_group, strategy):
    model = _model()
    opt = _newton(model, mode="auto")
    before = _flat(model).clone()
    for make in (
        lambda: hd.distribute(opt, strategy),
        lambda: hd.DataParallel(opt, model, nn.CrossEntropyLoss(), strategy),
        lambda: hd.DistributedPreconditioner.wrap(opt.preconditioner, strategy),
    ):
        with pytest.raises(InvalidArgumentError, match="strategy must be one of"):
            make()
    assert opt.mode == "auto" and type(opt.preconditioner) is ho.Preconditioner
    assert torch.equal(_flat(model), before)


def test_distribute_needs_a_newton_and_says_so(one_process_group):
    sgd = torch.optim.SGD(_model().parameters(), lr=0.1)
    with pytest.raises(InvalidArgumentError, match="needs no distribute") as e:
        hd.distribute(sgd)
    assert "trust-region" not in str(e.value)
    with pytest.raises(DistributedError, match="trust-region mode"):
        hd.distribute(_newton(_model(), mode="trust-region"))


@pytest.mark.parametrize("nprocs", [0, -1, "2", 2.0, True])
def test_launch_needs_a_positive_int(nprocs):
    with pytest.raises(InvalidArgumentError, match="nprocs must be an int"):
        hd.launch(print, nprocs)


@pytest.mark.parametrize("rank, world", [(5, 2), (2, 2), (-1, 2), (0, 0), (0, "2")])
def test_shard_checks_the_rank(rank, world):
    with pytest.raises(InvalidArgumentError):
        hd.shard(torch.arange(4), rank, world)


def test_cli_nproc_with_a_batch_of_the_whole_training_split_is_one_process(tmp_path, monkeypatch, capsys):
    """``--batch-size`` >= the training split is a full batch: replicated, so ``newton`` switches to its
    trust region as with one process (40 samples: 32 training examples; 41: 33, which 2 does not divide)."""
    import json

    from hessinv.cli import distributed as hcd
    from hessinv.cli import main

    monkeypatch.setattr(hcd, "START_METHOD", START)
    args = ["train", "--steps", "4", "--optimizers", "newton", "--depth", "3", "--width", "6",
            "--batch-size", "64", "--no-tune", "--quiet"]  # fmt: skip
    for samples in ("40", "41"):
        runs = {}
        for nproc in ("1", "2"):
            out = tmp_path / f"{samples}-{nproc}"
            assert main([*args, "--samples", samples, "--nproc", nproc, "--out", str(out)]) == 0
            summary = json.loads((out / "summary.json").read_text())
            modes = {json.loads(line).get("stats", {}).get("mode") for line in open(out / "newton.jsonl")}
            runs[nproc] = (summary["runs"]["newton"]["final"]["train_loss"], modes - {None})
        assert "trust-region" in runs["1"][1] and runs["2"][1] == runs["1"][1]
        assert runs["2"][0] == pytest.approx(runs["1"][0], rel=1e-9)
    capsys.readouterr()


# -- data-parallel influence scores (hessinv.influence.distributed_influence_scores) ---------------------
def _influence_problem():
    """A tiny float64 chain, 11 training examples (an uneven split: 6 + 5), 3 test points, a curvature
    batch for the Hessian case."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(F64)
    g = torch.Generator().manual_seed(3)
    X, y = torch.randn(14, 3, generator=g, dtype=F64), torch.randint(0, 3, (14,), generator=g)
    train, test = (X[:11], y[:11]), (X[11:], y[11:])
    cases = {
        "gauss_newton": {"curvature": "gauss_newton", "damping": 1e-2},
        "hessian_batch": {"curvature": "hessian", "damping": 1.0, "curvature_batch": (X[:7], y[:7])},
    }
    return model, nn.CrossEntropyLoss(), train, test, cases


def _influence_worker(rank: int, world: int, out: str) -> None:
    from hessinv.errors import HessinvError
    from hessinv.influence import distributed_influence_scores

    model, lf, train, test, cases = _influence_problem()
    got = {k: distributed_influence_scores(model, lf, train, test, **kw) for k, kw in cases.items()}
    # a summed loss on a curvature batch larger than the training set (no N / B weight: one process's)
    big = (torch.cat([train[0], test[0]] * 2), torch.cat([train[1], test[1]] * 2))
    sums = nn.CrossEntropyLoss(reduction="sum")
    got["sum_big_batch"] = distributed_influence_scores(model, sums, train, test, "gauss_newton", 1e-2, big)
    # and on one smaller than it: H_B weighted by the whole training set's N / B on every rank
    small = (train[0][:4], train[1][:4])
    got["sum_small_batch"] = distributed_influence_scores(model, sums, train, test, "hessian", 0.5, small)
    # a class out of range in rank 1's shard only: every rank raises a named error, none waits
    bad = train[1].clone()
    bad[-1] = 7
    try:
        distributed_influence_scores(model, lf, (train[0], bad), test, "gauss_newton", 1e-2, train)
    except HessinvError as e:
        got["failure"] = type(e).__name__
    torch.save(got, f"{out}/influence{rank}.pt")


def test_distributed_influence_scores_match_one_process(tmp_path):
    from hessinv.influence import influence_scores

    hd.launch(_influence_worker, 2, (str(tmp_path),), timeout=30, join_timeout=120, start_method=START)
    model, lf, train, test, cases = _influence_problem()
    ranks = [torch.load(tmp_path / f"influence{r}.pt", weights_only=False) for r in range(2)]
    big = (torch.cat([train[0], test[0]] * 2), torch.cat([train[1], test[1]] * 2))
    sums = (
        nn.CrossEntropyLoss(reduction="sum"),
        {"curvature": "gauss_newton", "damping": 1e-2, "curvature_batch": big},
    )
    for name, (loss, kw) in {**{k: (lf, kw) for k, kw in cases.items()}, "sum_big_batch": sums}.items():
        want = influence_scores(model, loss, train, test, **kw)
        assert want.shape == (3, 11) and want.dtype == F64
        for r in range(2):
            torch.testing.assert_close(ranks[r][name], want, rtol=0, atol=1e-10)
        assert torch.equal(ranks[0][name], ranks[1][name])  # every rank returns the same gathered matrix
    # the summed loss's Hessian estimated from 4 of the 11 examples as (11 / 4) H_4, dense autograd (a
    # mutation probe: a rank that weighted by its own shard's count or by 1 went unseen)
    sums = nn.CrossEntropyLoss(reduction="sum")
    H = (11 / 4) * autograd_hessian(model, sums, train[0][:4], train[1][:4])
    H += 0.5 * torch.eye(len(H), dtype=F64)
    G_train, G_test = (autograd_per_example_gradients(model, sums, *xy) for xy in (train, test))
    want = -G_test @ torch.linalg.solve(H, G_train.T)
    for r in range(2):
        torch.testing.assert_close(ranks[r]["sum_small_batch"], want, rtol=1e-9, atol=1e-12)
    # (a probe: the ranks factored 0.5 G where one process factors G, scores 0.5-9x off; the rank whose
    # shard failed raised, the other waited in the all-gather for the collective timeout)
    assert [ranks[r]["failure"] for r in range(2)] == ["DistributedError", "ShapeMismatchError"]


def test_a_step_after_the_process_group_is_gone_is_a_named_error():
    """distribute(), then destroy_process_group(): the next step says what is missing (it was torch's raw
    ValueError from the all-gather of the batch sizes)."""
    torch.manual_seed(0)
    model, loss_fn = (
        nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double(),
        nn.CrossEntropyLoss(),
    )
    X, y = torch.randn(32, 6, dtype=F64), torch.randint(0, 3, (32,))
    hd.init_process_group(0, 1, hd.free_port(), timeout=30)
    try:
        opt = ho.Newton(model, loss_fn, seed=0, mode="precondition")
        hd.distribute(opt)
        opt.step(X, y)
    finally:
        torch.distributed.destroy_process_group()
    with pytest.raises(DistributedError, match="not initialized"):
        opt.step(X, y)


def _batchnorm_worker(rank: int, world: int, out: str) -> None:
    """A BatchNorm model in training mode under DataParallel: each rank's forward updates its running
    statistics from its own shard; the eval-mode curvature reads them."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(8 * 12, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (8 * 12,), generator=g)
    res = {}
    for strategy in ("replicated", "sharded"):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
        opt = ho.Newton(
            m, nn.CrossEntropyLoss(), mode="precondition", seed=0, curvature_batch_size=5, refresh=2
        )
        dp = hd.DataParallel(opt, m, nn.CrossEntropyLoss(), strategy)
        for t in range(8):
            dp.step(X[t * 12 : (t + 1) * 12], y[t * 12 : (t + 1) * 12])
        p = torch.cat([t.detach().reshape(-1) for t in m.parameters()])
        ps = [torch.empty_like(p) for _ in range(world)]
        torch.distributed.all_gather(ps, p)
        res[strategy] = max(float((q - p).abs().max()) for q in ps)
    if rank == 0:
        torch.save(res, f"{out}/batchnorm.pt")


def test_batchnorm_in_training_mode_keeps_the_ranks_identical(tmp_path):
    """The ranks' running statistics differ (each from its shard, until DDP's next forward broadcasts rank
    0's): the curvature refresh reads rank 0's, and the parameters stay identical across ranks (they had
    drifted by 0.04 in 8 steps with strategy="replicated")."""
    hd.launch(_batchnorm_worker, 2, (str(tmp_path),), timeout=60, join_timeout=240, start_method=START)
    res = torch.load(tmp_path / "batchnorm.pt")
    assert res == {"replicated": 0.0, "sharded": 0.0}


def test_a_layer_frozen_during_data_parallel_training_is_refused_by_name(one_process_group):
    """Data-parallel training does not follow a frozen layer (DDP fixes the parameters): a named error
    before the step's forward, nothing changed, and the run goes on once the layer is back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    X, y = torch.randn(32, 6, dtype=F64), torch.randint(0, 3, (32,))
    opt = ho.Newton(model, nn.CrossEntropyLoss(), seed=0, mode="precondition")
    hd.distribute(opt)
    opt.step(X, y)
    model[0].bias.requires_grad_(False)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(InvalidArgumentError, match="data-parallel"):
        opt.step(X, y)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
    model[0].bias.requires_grad_(True)
    opt.step(X, y)


def test_a_batch_refused_on_one_rank_is_refused_on_every_rank(probe_results):
    """A class out of range in rank 1's shard: rank 1 raised its named error before the backward pass,
    and rank 0 waited in DDP's all-reduce until the collective timeout, then got gloo's bare error -- a
    loop that skips a refused batch hung. Every rank refuses that step now (rank 0's: a DistributedError
    that points to the other rank's), and the loop goes on in step."""
    assert probe_results["bad-label"] == [(1, "DistributedError")]


def test_a_trust_region_checkpoint_is_refused_by_a_data_parallel_optimizer(one_process_group):
    """distribute() pins "precondition"; loading a single-process run's checkpoint taken in its trust
    region brought the trust region back on every rank, where each rank's own shard then decided whether
    it left it (a fourth review: one rank stayed, the other entered the sharded collectives). Refused by
    name now; a checkpoint still in "auto" is pinned as distribute() pins it."""
    X, y = _data(1)
    model = _model()
    single = ho.Newton(model, nn.CrossEntropyLoss())
    for _ in range(2):
        single.step(X[:12], y[:12])
    assert single.mode == "trust-region"
    model2 = _model()
    opt = hd.distribute(_newton(model2, mode="auto"))
    with pytest.raises(InvalidArgumentError, match="not data-parallel"):
        opt.load_state_dict(single.state_dict())
    fresh = ho.Newton(_model(), nn.CrossEntropyLoss())  # never stepped: "auto"
    opt.load_state_dict(fresh.state_dict())
    assert opt.mode == "precondition"


def _drift_worker(rank: int, world: int, out: str) -> None:
    """The cases a probe found silently drifting apart or hanging (2026-12-05)."""
    res: dict = {}
    lf = nn.CrossEntropyLoss()
    X, y = _data(2)
    Bg = 2 * LOCAL_BATCH
    # a loss not finite on rank 1's shard alone (a huge target, float32 MSE), in a loop that skips a
    # refused batch: rank 1 raised, rank 0 waited in the all-reduce until gloo's timeout
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    Xf, yf = X.float(), torch.randn(len(X), 2)
    yf[Bg + LOCAL_BATCH + 1] = 3e19  # rank 1's rows of the second global batch
    mse = nn.MSELoss()
    dp = hd.DataParallel(_newton(model, mse, **IDENTITY), model, mse, "sharded")
    refused = []
    for t in range(3):
        try:
            dp.step(Xf[t * Bg : (t + 1) * Bg], yf[t * Bg : (t + 1) * Bg])
        except HessinvError as e:
            refused.append((t, type(e).__name__))
    res["nonfinite"] = (refused, _flat(model).clone())
    # a checkpoint loaded on rank 0 alone after DataParallel was built: the states differ, silently
    model = _model()
    dp = hd.DataParallel(_newton(model, **IDENTITY), model, lf, "sharded")
    dp.step(X[:Bg], y[:Bg])
    other = _model()
    ref = _newton(other, **IDENTITY)
    ref.step(X[Bg : 2 * Bg], y[Bg : 2 * Bg])
    if rank == 0:
        dp.load_state_dict(ref.state_dict())
    res["state/loaded"] = _error(partial(dp.step, X[Bg : 2 * Bg], y[Bg : 2 * Bg]))
    # each rank stepped alone (its own shard) before DataParallel
    model = _model()
    newton = _newton(model, **IDENTITY)
    newton.step(
        X[rank * LOCAL_BATCH : (rank + 1) * LOCAL_BATCH], y[rank * LOCAL_BATCH : (rank + 1) * LOCAL_BATCH]
    )
    res["state/warm-up"] = _error(partial(hd.DataParallel, newton, model, lf, "sharded"))
    # max_relative_step set on rank 1 alone ("read at every step": compared at every step now)
    model = _model()
    dp = hd.DataParallel(_newton(model, **IDENTITY), model, lf, "sharded")
    dp.step(X[:Bg], y[:Bg])
    if rank == 1:
        dp.opt.max_relative_step = 0.01
    res["max_relative_step"] = _error(partial(dp.step, X[Bg : 2 * Bg], y[Bg : 2 * Bg]))
    if rank == 0:
        torch.save(res, f"{out}/drift.pt")


@pytest.fixture(scope="module")
def drift_results(tmp_path_factory) -> dict:
    return _two_process_job(_drift_worker, tmp_path_factory, "drift")


def test_a_loss_not_finite_on_one_rank_is_refused_on_every_rank(drift_results):
    """Every rank raises NonFiniteError at that step (the CLI takes it as a divergence), and the loop goes
    on in step."""
    refused, _ = drift_results["nonfinite"]
    assert refused == [(1, "NonFiniteError")]


def test_optimizer_states_that_differ_between_ranks_are_refused(drift_results):
    for key in ("state/loaded", "state/warm-up"):
        msg = drift_results[key]
        assert (
            msg is not None and "state (momentum and second moments)" in msg or "state (its momentum" in msg
        )


def test_a_budget_changed_on_one_rank_is_refused(drift_results):
    msg = drift_results["max_relative_step"]
    assert msg is not None and "max_relative_step differs between ranks" in msg


def test_data_parallel_s_loss_must_be_the_optimizer_s(one_process_group):
    """A Huber loss in DataParallel and MSE in Newton: the gradient from one, the curvature and weights from
    the other, silently (a probe); an equal loss (another instance, the same settings) is fine."""
    model = _model()
    with pytest.raises(InvalidArgumentError, match="is not the optimizer's"):
        hd.DataParallel(_newton(model, nn.MSELoss()), model, nn.HuberLoss(delta=0.5))
    with pytest.raises(InvalidArgumentError, match="is not the optimizer's"):
        hd.DataParallel(_newton(model, nn.CrossEntropyLoss(ignore_index=-1)), model, nn.CrossEntropyLoss())
    hd.DataParallel(
        _newton(model, nn.CrossEntropyLoss(label_smoothing=0.1)),
        model,
        nn.CrossEntropyLoss(label_smoothing=0.1),
    )


def _sleeping_worker(rank: int, world: int, out: str) -> None:
    Path(out, f"rank{rank}.pid").write_text(str(__import__("os").getpid()))
    end = time.monotonic() + 120
    while time.monotonic() < end:
        try:
            time.sleep(0.2)
        except KeyboardInterrupt:  # (torch's SIGINT at the parent's death: the CLI records it and goes on)
            pass


def test_ranks_die_with_their_launcher(tmp_path):
    """A launcher killed by a signal runs no finally: its ranks waited in their collectives until the
    timeout, then (the CLI) wrote outputs over a newer job's. They are killed with it now (Linux)."""
    import os
    import signal
    import subprocess

    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    here, out = str(Path(__file__).parent), str(tmp_path)
    code = (
        f"import sys; sys.path.insert(0, {here!r}); import test_distributed as t; "
        f"import hessinv.optim.distributed as hd; "
        f"hd.launch(t._sleeping_worker, 2, ({out!r},), timeout=30, start_method='fork')"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    pids: list[int] = []
    for _ in range(600):
        pids = [int(p.read_text()) for p in tmp_path.glob("rank*.pid") if p.read_text()]
        if len(pids) == 2:
            break
        time.sleep(0.1)
    assert len(pids) == 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") < 0  # (a zombie is dead)

    for _ in range(50):
        if not any(alive(p) for p in pids):
            break
        time.sleep(0.1)
    assert not any(alive(p) for p in pids)


def _noop_worker(rank: int, world: int) -> None:
    torch.distributed.barrier()


def test_a_forkserver_launch_runs():
    """A forkserver's children are the server's, not the launcher's: the parent-death link is not set up
    there (a review: every rank exited at once, taking its parent for dead)."""
    if "forkserver" not in __import__("multiprocessing").get_all_start_methods():
        pytest.skip("no forkserver here")
    hd.launch(_noop_worker, 2, timeout=30, join_timeout=120, start_method="forkserver")


def test_equal_losses_are_the_optimizer_s(one_process_group):
    """Equal ``functools.partial`` objects and a loss module in another train / eval mode are the same loss
    (a review: refused); a wrapper whose inner loss differs is another."""

    class Wrapped(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, out, y):
            return self.inner(out, y)

    model = _model()
    partial_ce = functools.partial(F.cross_entropy, label_smoothing=0.1)
    hd.DataParallel(
        _newton(model, partial_ce), model, functools.partial(F.cross_entropy, label_smoothing=0.1)
    )
    hd.DataParallel(_newton(model, nn.CrossEntropyLoss()), model, nn.CrossEntropyLoss().eval())
    with pytest.raises(InvalidArgumentError, match="is not the optimizer's"):
        hd.DataParallel(
            _newton(model, Wrapped(nn.CrossEntropyLoss())),
            model,
            Wrapped(nn.CrossEntropyLoss(label_smoothing=0.2)),
        )
    with pytest.raises(InvalidArgumentError, match="is not the optimizer's"):
        hd.DataParallel(
            _newton(model, partial_ce), model, functools.partial(F.cross_entropy, label_smoothing=0.2)
        )
    # (named by what differs: the message read "(CrossEntropyLoss()) is not the optimizer's
    # (CrossEntropyLoss())", a docs probe)
    differ = r"\(CrossEntropyLoss\(label_smoothing=0.1\)\) is not the optimizer's \(.*label_smoothing=0.0\)"
    with pytest.raises(InvalidArgumentError, match=differ):
        hd.DataParallel(
            _newton(model, nn.CrossEntropyLoss()), model, nn.CrossEntropyLoss(label_smoothing=0.1)
        )
    pw = torch.rand(3, dtype=torch.float64)  # (equal tensors are not named: a review)
    ours, theirs = nn.BCEWithLogitsLoss(pos_weight=pw), nn.BCEWithLogitsLoss(pos_weight=pw.clone())
    theirs.weight = torch.ones(3, dtype=torch.float64)
    with pytest.raises(
        InvalidArgumentError,
        match=r"\(BCEWithLogitsLoss\(weight=<tensor>\)\) is not the optimizer's \(BCEWithLogitsLoss\(\)\)",
    ):
        hd.DataParallel(_newton(model, ours), model, theirs)


def test_cli_nproc_full_batch_newton_warns_nothing_false(tmp_path, monkeypatch, capfd):
    """``--nproc 2 --batch-size full``: newton steps on the same global batch on every rank (replicated,
    the replicas identical), yet each rank printed the library's raw warning that its curvature came
    from its own batch and the replicas drift apart, with advice about library internals (a probe)."""
    from hessinv.cli import distributed as hcd
    from hessinv.cli import main

    monkeypatch.setattr(hcd, "START_METHOD", START)
    args = ["train", "--steps", "2", "--optimizers", "newton", "--depth", "2", "--width", "4", "--samples",
            "64", "--batch-size", "full", "--no-tune", "--quiet", "--nproc", "2"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path)]) == 0
    err = capfd.readouterr().err
    assert "process group" not in err and "UserWarning" not in err, err


def test_distributed_influence_scores_checks_its_pairs_as_influence_scores_does():
    """``train=(X, y, w)``, a DataLoader, ``test=X`` alone: ValueError / AttributeError / TypeError (the last
    after the whole fit) where ``influence_scores`` names the argument (a probe)."""
    from hessinv.errors import InvalidArgumentError
    from hessinv.influence import distributed_influence_scores

    model, lf, (X, y), test, _ = _influence_problem()
    hd.init_process_group(0, 1, hd.free_port(), timeout=30)
    try:
        for train, tst, what in (((X, y, y), test, "train"), ([(X, y)], test, "train"), ((X, y), X, "test")):
            with pytest.raises(InvalidArgumentError, match=rf"{what} must be an \(inputs, targets\) pair"):
                distributed_influence_scores(model, lf, train, tst, "gauss_newton", 1e-2)
    finally:
        torch.distributed.destroy_process_group()
