"""``hessinv train`` / ``hessinv bench`` end to end on small budgets, and their failure paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import hessinv.cli as cli
from hessinv.cli import main, parse_duration
from hessinv.cli.train import OPTIMIZERS

SMALL = ["--samples", "200", "--depth", "3", "--width", "4", "--quiet", "--no-tune"]


def newton_available() -> bool:
    try:
        from hessinv.optim import Newton  # noqa: F401
    except Exception:
        return False
    return True


def run(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["train", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_writes_logs_summary_table_and_plot(tmp_path, capsys):
    opts = ["adam", "sgd", "lbfgs", "hessian-free"] + (
        ["newton", "gauss-newton"] if newton_available() else []
    )
    rc, out, err = run(
        capsys,
        "--data",
        "digits",
        "--steps",
        "6",
        "--optimizers",
        ",".join(opts),
        "--out",
        str(tmp_path),
        "--target-loss",
        "100",
        *SMALL,
    )
    assert rc == 0, err
    assert "time to train loss" in out and "Traceback" not in out + err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["runs"]) == opts
    assert summary["dataset"]["name"] == "digits" and summary["model"]["depth"] == 3
    for name in opts:
        r = summary["runs"][name]
        assert r["status"] == "ok", (name, r["message"])
        assert r["steps"] == 6
        assert r["time_to_target"] == 0.0 and r["steps_to_target"] == 0  # target 100 is met at the start
        log = read_jsonl(tmp_path / f"{name}.jsonl")
        assert [e["step"] for e in log] == list(range(7))
        assert "train_loss" in log[0] and "test_acc" in log[0]
        assert all(np.isfinite(e["batch_loss"]) for e in log[1:])
        assert all(e["time"] >= 0 for e in log) and log[-1]["time"] == pytest.approx(r["train_time"])
        assert "train_loss" in log[-1]  # the last step is always evaluated
    table = (tmp_path / "table.md").read_text()
    assert "| optimizer |" in table and all(f"| {name} |" in table for name in opts)
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_initialization_for_every_optimizer(tmp_path, capsys):
    rc, _, _ = run(
        capsys,
        "--data",
        "regression",
        "--steps",
        "2",
        "--optimizers",
        "sgd,adam,hessian-free",
        "--out",
        str(tmp_path),
        *SMALL,
    )
    assert rc == 0
    first = [read_jsonl(tmp_path / f"{n}.jsonl")[0]["train_loss"] for n in ("sgd", "adam", "hessian-free")]
    assert first[0] == first[1] == first[2]
    # the same seed gives the same numbers again
    rc, _, _ = run(
        capsys,
        "--data",
        "regression",
        "--steps",
        "2",
        "--optimizers",
        "sgd",
        "--out",
        str(tmp_path / "again"),
        *SMALL,
    )
    a, b = read_jsonl(tmp_path / "sgd.jsonl"), read_jsonl(tmp_path / "again" / "sgd.jsonl")
    assert [e["batch_loss"] for e in a[1:]] == [e["batch_loss"] for e in b[1:]]


def test_wall_clock_budget(tmp_path, capsys):
    rc, out, err = run(
        capsys,
        "--data",
        "regression",
        "--budget",
        "0.4s",
        "--optimizers",
        "adam",
        "--out",
        str(tmp_path),
        *SMALL,
    )
    assert rc == 0, err
    r = json.loads((tmp_path / "summary.json").read_text())["runs"]["adam"]
    assert 0.4 <= r["train_time"] < 5 and r["steps"] > 1


def test_tune_picks_an_lr_from_the_grid(tmp_path, capsys):
    rc, out, _ = run(
        capsys,
        "--data",
        "regression",
        "--steps",
        "20",
        "--optimizers",
        "sgd,adam",
        "--out",
        str(tmp_path),
        *SMALL,
        "--tune",
    )
    assert rc == 0
    from hessinv.cli.train import LR_GRID

    runs = json.loads((tmp_path / "summary.json").read_text())["runs"]
    for name in ("sgd", "adam"):
        assert runs[name]["lr"] in LR_GRID[name]
        assert set(runs[name]["tuning"]) == {f"{lr:g}" for lr in LR_GRID[name]}
        best = min(runs[name]["tuning"].values(), key=lambda v: float(v))
        assert float(runs[name]["tuning"][f"{runs[name]['lr']:g}"]) == float(best)
    assert "chosen from the grid" in out


def test_lr_override_and_float32_and_residual(tmp_path, capsys):
    opts = "adam,hessian-free" + (",newton" if newton_available() else "")
    rc, _, err = run(
        capsys,
        "--data",
        "digits",
        "--steps",
        "3",
        "--optimizers",
        opts,
        "--lr",
        "adam=0.02",
        "--dtype",
        "float32",
        "--residual",
        "--out",
        str(tmp_path),
        *SMALL,
    )
    assert rc == 0, err
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["runs"]["adam"]["lr"] == 0.02 and s["model"]["dtype"] == "float32" and s["model"]["residual"]
    assert all(r["status"] == "ok" for r in s["runs"].values()), s["runs"]


def test_user_file(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "mine.npz", X=rng.normal(size=(60, 5)), y=rng.integers(0, 3, 60))
    rc, _, err = run(
        capsys,
        "--data",
        str(tmp_path / "mine.npz"),
        "--steps",
        "3",
        "--optimizers",
        "adam",
        "--out",
        str(tmp_path / "o"),
        "--quiet",
    )
    assert rc == 0, err
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["dataset"]["classes"] == 3 and s["dataset"]["features"] == 5


# -- failure paths -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "imagenet"], "unknown dataset 'imagenet'"),
        (["--optimizers", "adam,rmsprop"], "unknown optimizer 'rmsprop'"),
        (["--data", "/nonexistent/file.csv"], "does not exist"),
        (["--lr", "adam"], "NAME=LR"),
        (["--lr", "foo=1"], "unknown optimizer 'foo'"),
        (["--budget", "soon"], "invalid duration"),
        (["--depth", "0"], "positive integer"),
        (["--activation", "swish"], "invalid choice"),
        (["--optimizers", "adam,adam"], "twice"),
    ],
)
def test_user_errors_exit_2_with_one_line(tmp_path, capsys, args, message):
    rc, out, err = run(capsys, *args, "--steps", "1", "--out", str(tmp_path), "--quiet")
    assert rc == 2
    assert message in err and "Traceback" not in err + out
    assert len(err.strip().splitlines()) == 1, err


def test_unreadable_data_file_exits_2(tmp_path, capsys):
    bad = tmp_path / "broken.npz"
    bad.write_bytes(b"not an npz at all")
    rc, out, err = run(capsys, "--data", str(bad), "--steps", "1", "--out", str(tmp_path), "--quiet")
    assert rc == 2 and "cannot read" in err and str(bad) in err and "Traceback" not in err


def test_cuda_requested_without_cuda(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, _, err = run(capsys, "--device", "cuda", "--steps", "1", "--out", str(tmp_path), "--quiet")
    assert rc == 2 and "CUDA is not available" in err


def test_divergence_is_marked_and_the_others_continue(tmp_path, capsys):
    rc, out, err = run(
        capsys,
        "--data",
        "regression",
        "--steps",
        "60",
        "--optimizers",
        "sgd,adam",
        "--lr",
        "sgd=1e30",
        "--out",
        str(tmp_path),
        *SMALL,
    )
    assert rc == 0
    runs = json.loads((tmp_path / "summary.json").read_text())["runs"]
    assert runs["sgd"]["status"] == "diverged" and runs["sgd"]["steps"] < 60
    assert "nan" in runs["sgd"]["message"].lower() or "inf" in runs["sgd"]["message"].lower()
    assert runs["adam"]["status"] == "ok" and runs["adam"]["steps"] == 60
    assert "sgd: diverged" in err and "Traceback" not in out + err
    assert (tmp_path / "loss.png").exists() and "diverged" in (tmp_path / "table.md").read_text()


def test_all_runs_failing_exits_1(tmp_path, capsys):
    rc, _, err = run(
        capsys,
        "--data",
        "regression",
        "--steps",
        "60",
        "--optimizers",
        "sgd",
        "--lr",
        "sgd=1e30",
        "--out",
        str(tmp_path),
        *SMALL,
    )
    assert rc == 1 and "diverged" in err
    assert json.loads((tmp_path / "summary.json").read_text())["runs"]["sgd"]["status"] == "diverged"


def test_missing_newton_optimizer_fails_that_run_only(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "hessinv.optim", None)  # import hessinv.optim -> ImportError
    rc, _, err = run(
        capsys,
        "--data",
        "regression",
        "--steps",
        "2",
        "--optimizers",
        "newton,adam",
        "--out",
        str(tmp_path),
        *SMALL,
    )
    assert rc == 0
    runs = json.loads((tmp_path / "summary.json").read_text())["runs"]
    assert (
        runs["newton"]["status"] == "failed"
        and "hessinv.optim.Newton is not available" in runs["newton"]["message"]
    )
    assert runs["adam"]["status"] == "ok"


def test_parse_duration():
    assert parse_duration("90") == 90.0 and parse_duration("1.5m") == 90.0 and parse_duration("2min") == 120.0
    for bad in ("", "-3s", "0s", "3 parsecs"):
        with pytest.raises(Exception):  # noqa: B017
            parse_duration(bad)


def test_optimizer_names():
    assert OPTIMIZERS[:6] == ("newton", "gauss-newton", "adam", "sgd", "lbfgs", "hessian-free")
    assert OPTIMIZERS[6:] == ("soap", "psgd", "adahessian", "sophiah")  # the bench extra's peers


# -- bench -----------------------------------------------------------------------------------------------
def test_bench_solve_forwards_arguments(tmp_path, capsys, monkeypatch):
    script = tmp_path / "bench" / "solve.py"
    script.parent.mkdir()
    script.write_text("import sys\nprint('ARGS', sys.argv[1:])\nsys.exit(3 if '--fail' in sys.argv else 0)\n")
    monkeypatch.setattr(cli, "_find_bench", lambda name: script)
    assert main(["bench", "solve", "--depth", "4", "--quick"]) == 0
    assert "ARGS ['--depth', '4', '--quick']" in capsys.readouterr().out
    assert main(["bench", "solve", "--fail"]) == 3


def test_bench_solve_missing(capsys, monkeypatch):
    monkeypatch.setattr(cli, "_find_bench", lambda name: None)
    assert main(["bench", "solve"]) == 2
    assert "bench/solve.py was not found" in capsys.readouterr().err


def test_console_script_reports_without_traceback(tmp_path):
    exe = Path(sys.executable).with_name("hessinv")
    cmd = (
        [str(exe)]
        if exe.exists()
        else [sys.executable, "-c", "import sys, hessinv.cli as c; sys.exit(c.main())"]
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    p = subprocess.run(
        [*cmd, "train", "--data", "nope", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode == 2
    assert p.stderr.strip() == (
        "hessinv: error: unknown dataset 'nope'; "
        "choose one of digits, mnist1d, regression or a .npz/.csv file"
    )


def test_interrupt_keeps_the_partial_run(tmp_path, capsys, monkeypatch):
    from hessinv.cli import baselines

    real_step = baselines.FirstOrder.step
    calls = {"n": 0}

    def step(self, inputs, targets):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_step(self, inputs, targets)

    monkeypatch.setattr(baselines.FirstOrder, "step", step)
    rc, _, _ = run(
        capsys,
        "--data",
        "regression",
        "--steps",
        "10",
        "--optimizers",
        "adam,sgd",
        "--out",
        str(tmp_path),
        *SMALL,
    )
    assert rc == 130
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["interrupted"] and list(s["runs"]) == ["adam"]  # sgd never started
    assert s["runs"]["adam"]["status"] == "interrupted" and s["runs"]["adam"]["steps"] == 3
    assert (tmp_path / "loss.png").exists()


def test_an_optimizer_error_fails_that_run_only(tmp_path, capsys, monkeypatch):
    from hessinv.cli import baselines

    def boom(self, inputs, targets):
        raise RuntimeError("boom")

    monkeypatch.setattr(baselines.HessianFree, "step", boom)
    rc, out, err = run(
        capsys,
        "--data",
        "regression",
        "--steps",
        "3",
        "--optimizers",
        "hessian-free,adam",
        "--out",
        str(tmp_path),
        *SMALL,
    )
    assert rc == 0 and "Traceback" not in out + err
    runs = json.loads((tmp_path / "summary.json").read_text())["runs"]
    assert (
        runs["hessian-free"]["status"] == "failed" and "RuntimeError: boom" in runs["hessian-free"]["message"]
    )
    assert runs["adam"]["status"] == "ok"
    assert "hessian-free: failed" in err
