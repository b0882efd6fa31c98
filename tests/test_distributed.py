"""Data-parallel Newton over torch.distributed: 2 processes, gloo, CPU (hessinv.optim.distributed).

One spawned 2-process job runs every strategy and the checkpoint round trip (a spawn costs seconds);
the rank-0 results come back through files and are compared here with a single-process run.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import hessinv.optim as ho
from hessinv.errors import DistributedError
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


def _newton(model: nn.Module) -> ho.Newton:
    # max_rank = CURV: one output direction per example of the 3 (a budgeted root, whose examples the
    # sharded strategy forms on different ranks)
    return ho.Newton(
        model, nn.CrossEntropyLoss(), mode="precondition", seed=0, lr=0.5, curvature_batch_size=CURV,
        refresh=REFRESH, diagonal_damping=50.0, max_rank=CURV,
    )  # fmt: skip


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


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("dist")
    hd.launch(_worker, 2, (str(out),), timeout=60, join_timeout=240, start_method=START)
    return torch.load(Path(out) / "results.pt", weights_only=False)


def _single_process(strategy: str) -> torch.Tensor:
    """One process, global batch 2B, the same curvature schedule."""
    X, y = _data(1)
    model = _model()
    opt = _newton(model)
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
    from hessinv.influence import distributed_influence_scores

    model, lf, train, test, cases = _influence_problem()
    got = {k: distributed_influence_scores(model, lf, train, test, **kw) for k, kw in cases.items()}
    torch.save(got, f"{out}/influence{rank}.pt")


def test_distributed_influence_scores_match_one_process(tmp_path):
    from hessinv.influence import influence_scores

    hd.launch(_influence_worker, 2, (str(tmp_path),), timeout=30, join_timeout=120, start_method=START)
    model, lf, train, test, cases = _influence_problem()
    ranks = [torch.load(tmp_path / f"influence{r}.pt", weights_only=False) for r in range(2)]
    for name, kw in cases.items():
        want = influence_scores(model, lf, train, test, **kw)
        assert want.shape == (3, 11) and want.dtype == F64
        for r in range(2):
            torch.testing.assert_close(ranks[r][name], want, rtol=0, atol=1e-10)
        assert torch.equal(ranks[0][name], ranks[1][name])  # every rank returns the same gathered matrix
