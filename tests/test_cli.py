"""``hessinv train`` / ``hessinv bench`` end to end on small budgets, and their failure paths."""

from __future__ import annotations

import json
import os
import re
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


@pytest.mark.parametrize("command,missing", [("train", "rich"), ("spectrum", "matplotlib")])
def test_a_missing_cli_extra_is_a_one_line_error(monkeypatch, capsys, command, missing):
    """Without the ``cli`` extra a command stopped on a ModuleNotFoundError traceback (train: rich, after
    loading the data; spectrum: matplotlib, after the whole computation)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a)
    )
    rc = main([command, "--data", "digits", "--out", "unused"])
    _, err = capsys.readouterr()
    assert rc == 2 and f"missing: {missing}" in err and "hessinv[cli]" in err and "Traceback" not in err


def test_a_failed_plot_is_not_announced(tmp_path, capsys, monkeypatch):
    """The closing line listed loss.png even when the plot could not be drawn."""
    import hessinv.cli.plots as plots

    def broken(*a, **k):
        raise RuntimeError("no backend")

    monkeypatch.setattr(plots, "plot_runs", broken)
    args = ["--steps", "2", "--optimizers", "adam", "--out", str(tmp_path), "--quiet"]
    rc, out, err = run(capsys, "--data", "digits", *args, *SMALL[:-2], "--no-tune")
    assert rc == 0 and "loss.png" not in out and "could not be drawn" in err
    assert not (tmp_path / "loss.png").exists()


def test_paths_with_brackets_are_printed_as_written(tmp_path, capsys):
    """rich read '[/y]' in --out as a closing markup tag: a traceback after the work (exit 1)."""
    out = tmp_path / "out[/y]"
    rc, o, err = run(capsys, "--data", "digits", "--steps", "2", "--optimizers", "adam", "--out", str(out),
                     "--samples", "200", "--depth", "3", "--width", "4", "--no-tune")  # fmt: skip
    assert rc == 0 and "Traceback" not in err and str(out) in o.replace("\n", "")


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
        "1s",
        "--optimizers",
        "adam",
        "--out",
        str(tmp_path),
        *SMALL,
    )
    assert rc == 0, err
    r = json.loads((tmp_path / "summary.json").read_text())["runs"]["adam"]
    assert 1 <= r["train_time"] < 6 and r["steps"] > 1  # (the first Adam step imports torch modules)


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
        (["--optimizers", "adam,,sgd"], "--optimizers has an empty name"),  # (it was dropped silently)
        (["--optimizers", "adam,sgd", "--lr", "adam=0.1", "--lr", "adam=0.2"], "--lr gives adam twice"),
        (["--optimizers", "adam", "--steps", "adam=3,adam=4"], "--steps gives adam twice"),
        (["--seed", "-1"], "argument --seed: expected an integer >= 0"),
        (["--dist-strategy", "foo"], "--dist-strategy must be one of sharded"),  # checked with --nproc 1 too
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
    assert rc == 3  # (one run failed with an error, another finished)
    runs = json.loads((tmp_path / "summary.json").read_text())["runs"]
    assert (
        runs["newton"]["status"] == "failed"
        and "hessinv.optim.Newton is not available" in runs["newton"]["message"]
    )
    assert runs["adam"]["status"] == "ok"


def test_parse_duration():
    assert parse_duration("90") == 90.0 and parse_duration("1.5m") == 90.0 and parse_duration("2min") == 120.0
    # (compound durations and upper-case units were refused as invalid, a probe)
    assert (
        parse_duration("1m30s") == 90.0 and parse_duration("1h 30m") == 5400.0 and parse_duration("2S") == 2.0
    )
    for bad in (
        "",
        "-3s",
        "0s",
        "3 parsecs",
        "1e400",
        "1e306h",
        "30s1m",
        "1m1m",
    ):  # (1e400, 1e306h: not finite)
        with pytest.raises(Exception):  # noqa: B017
            parse_duration(bad)


def test_optimizer_names():
    assert OPTIMIZERS[:7] == ("newton", "newton-tr", "gauss-newton", "adam", "sgd", "lbfgs", "hessian-free")
    assert OPTIMIZERS[7:] == ("soap", "psgd", "adahessian", "sophiah")  # the bench extra's peers


# -- bench -----------------------------------------------------------------------------------------------
def test_bench_solve_forwards_arguments(tmp_path, capsys, monkeypatch):
    script = tmp_path / "bench" / "solve.py"
    script.parent.mkdir()
    script.write_text("import sys\nprint('ARGS', sys.argv[1:])\nsys.exit(3 if '--fail' in sys.argv else 0)\n")
    monkeypatch.setattr(cli, "_find_bench", lambda name: script)
    assert main(["bench", "solve", "--depth", "4", "--quick"]) == 0
    assert "ARGS ['--depth', '4', '--quick']" in capsys.readouterr().out
    assert main(["bench", "solve", "--fail"]) == 3


def test_bench_solve_a_message_exit_is_said_and_a_missing_json_refused(tmp_path, capsys, monkeypatch):
    """A benchmark's ``sys.exit("message")`` was dropped (exit 1, nothing printed); and ``--render-only
    --json`` of a file that does not exist rendered the recorded results instead, exit 0 (a new user)."""
    script = tmp_path / "bench" / "solve.py"
    script.parent.mkdir()
    script.write_text("import sys\nsys.exit('no such file to render')\n")
    monkeypatch.setattr(cli, "_find_bench", lambda name: script)
    assert main(["bench", "solve"]) == 2
    assert "hessinv bench solve: error: no such file to render" in capsys.readouterr().err
    monkeypatch.undo()
    if cli._find_bench("solve") is not None:  # (a checkout: the real script)
        missing = tmp_path / "none.json"
        assert main(["bench", "solve", "--render-only", "--json", str(missing), "--out", str(tmp_path)]) == 2
        assert "no such file to render" in capsys.readouterr().err
        # a file that is not a record of the benchmark: one line (it printed a KeyError's traceback)
        for name, text in (("x.json", '{"a": 1}'), ("z.json", "zz")):
            (tmp_path / name).write_text(text)
            args = ["bench", "solve", "--render-only", "--json", str(tmp_path / name), "--out", str(tmp_path)]
            assert main(args) == 2
            err = capsys.readouterr().err
            assert "not a record of bench/solve.py" in err and "Traceback" not in err


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


def test_interrupt_keeps_the_partial_run(tmp_path, capsys, interrupt_at):
    interrupt_at(4)
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
    assert rc == 3 and "Traceback" not in out + err
    runs = json.loads((tmp_path / "summary.json").read_text())["runs"]
    assert (
        runs["hessian-free"]["status"] == "failed" and "RuntimeError: boom" in runs["hessian-free"]["message"]
    )
    assert runs["adam"]["status"] == "ok"
    assert "hessian-free: failed" in err


# -- help, version, names, budgets (issue 13) ----------------------------------------------------------
def _option_helps(text: str) -> dict[str, str]:
    """``--option`` -> its help text, from argparse's help output."""
    out: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        stripped = line.strip()
        if line.startswith("  -") and not line.startswith("   "):
            current = stripped.split()[0].rstrip(",")
            out[current] = stripped
        elif current is not None and line.startswith("    ") and stripped:
            out[current] += " " + stripped
        else:
            current = None
    return out


def _helps_with_defaults(capsys, command: str) -> tuple[str, dict[str, str]]:
    """``hessinv COMMAND --help`` and its options' helps, each checked to state one default."""
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    helps = _option_helps(text)
    for opt, h in helps.items():
        if opt in ("-h", "--help"):
            continue
        assert "(default: " in h, f"{opt} states no default: {h}"
        assert "(default: None)" not in h and h.count("(default:") == 1, h
    return text, helps


def test_every_spectrum_option_states_its_default(capsys):
    _, helps = _helps_with_defaults(capsys, "spectrum")
    assert len(helps) >= 14, sorted(helps)
    args = cli.build_parser().parse_args(["spectrum"])
    for opt in ("--width", "--bins", "--seed", "--batch", "--depth", "--train-steps", "--out"):
        assert f"(default: {getattr(args, opt[2:].replace('-', '_'))})" in helps[opt], helps[opt]
    assert f"(default: {args.damping:g})" in helps["--damping"]
    assert "(default: all of them; digits 1797" in helps["--samples"]
    assert "--range=-0.1,0.1" in helps["--range"]


def test_every_train_option_states_its_default(capsys):
    text, helps = _helps_with_defaults(capsys, "train")
    assert len(helps) >= 25, sorted(helps)
    # the stated defaults are the ones the parser uses
    args = cli.build_parser().parse_args(["train"])
    assert (
        f"(default: {args.depth})" in helps["--depth"]
        and f"(default: {args.batch_size})" in helps["--batch-size"]
    )
    assert f"(default: {args.budget:g}s)" in helps["--budget"]
    assert "newton 250" in helps["--steps"] and "digits 1" in helps["--target-loss"]
    # the data-file format is in --help
    assert "X_test" in text and "LAST column" in text and ".csv" in text


def test_version(capsys):
    import hessinv

    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"hessinv {hessinv.__version__} (torch ")


def test_help_does_not_import_torch():
    code = (
        "import sys, hessinv.cli as c; c.build_parser().format_help(); "
        "mods = ('torch', 'numpy', 'matplotlib', 'sklearn', 'rich', 'mnist1d'); "
        "print(sorted(m for m in mods if m in sys.modules))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


def test_names_in_either_spelling(tmp_path, capsys):
    args = cli.build_parser().parse_args(
        ["train", "--newton-damping", "levenberg_marquardt", "--activation", "TANH", "--task", "Regression"]
    )
    assert (args.newton_damping, args.activation, args.task) == ("levenberg-marquardt", "tanh", "regression")
    rc, _, err = run(
        capsys,
        "--data",
        "regression",
        "--steps",
        "2",
        "--optimizers",
        "Hessian_Free,adam",
        "--lr",
        "hessian_free=0.5",
        "--out",
        str(tmp_path),
        *SMALL,
    )
    assert rc == 0, err
    runs = json.loads((tmp_path / "summary.json").read_text())["runs"]
    assert list(runs) == ["hessian-free", "adam"] and runs["hessian-free"]["lr"] == 0.5


def test_step_budget_per_optimizer_and_whichever_comes_first(tmp_path, capsys):
    from hessinv.cli.choices import DEFAULT_STEPS

    assert cli._parse_steps([], ["newton", "adam"]) == {
        "newton": DEFAULT_STEPS["newton"],
        "adam": DEFAULT_STEPS["adam"],
    }
    assert cli._parse_steps(["7", "adam=3"], ["newton", "adam"]) == {"newton": 7, "adam": 3}
    assert cli._parse_steps(["none"], ["sgd"]) == {"sgd": None}
    rc, _, err = run(
        capsys,
        "--data",
        "regression",
        "--steps",
        "adam=3,sgd=5",
        "--optimizers",
        "adam,sgd",
        "--out",
        str(tmp_path / "a"),
        *SMALL,
    )
    assert rc == 0, err
    s = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert (s["runs"]["adam"]["steps"], s["runs"]["sgd"]["steps"]) == (3, 5)
    assert s["runs"]["adam"]["stopped_by"] == s["runs"]["sgd"]["stopped_by"] == "steps"
    assert "whichever comes first" in (tmp_path / "a" / "table.md").read_text()
    # a time budget that runs out first
    rc, _, err = run(
        capsys,
        "--data",
        "regression",
        "--steps",
        "1000000",
        "--budget",
        "0.3s",
        "--optimizers",
        "adam",
        "--out",
        str(tmp_path / "b"),
        *SMALL,
    )
    assert rc == 0, err
    r = json.loads((tmp_path / "b" / "summary.json").read_text())["runs"]["adam"]
    assert r["stopped_by"] == "time" and 1 <= r["steps"] < 1000000


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "none", "--budget", "none"], "would never stop"),
        (["--steps", "adam=0"], "positive integer"),
        (["--steps", "rmsprop=3"], "unknown optimizer 'rmsprop'"),
        (["--test-fraction", "1.5"], "(0, 1)"),
        (["--threads", "-1"], "integer >= 0"),
    ],
)
def test_budget_errors_exit_2(tmp_path, capsys, args, message):
    rc, out, err = run(capsys, "--optimizers", "adam", *args, "--out", str(tmp_path), "--quiet")
    assert rc == 2 and message in err and "Traceback" not in err + out
    assert len(err.strip().splitlines()) == 1, err


def test_bench_solve_cuda_without_cuda_is_one_line(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "solve", "--device", "cuda", "--quick"]) == 2
    out, err = capsys.readouterr()
    assert err.strip() == (
        "hessinv bench solve: error: --device cuda: CUDA is not available on this machine (use --device cpu)"
    )
    assert "Traceback" not in out + err


def test_bench_solve_writes_to_its_output_directory(tmp_path, capsys):
    root = Path(__file__).resolve().parent.parent
    doc = root / "docs" / "benchmarks.md"
    before = doc.read_bytes()
    assert main(["bench", "solve", "--render-only", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "benchmarks.md").read_text().startswith("# Benchmarks")
    assert doc.read_bytes() == before  # the tracked file is rewritten only with --update-repo


def test_chance_level_is_the_most_frequent_test_class():
    import torch

    from hessinv.cli.data import Dataset
    from hessinv.cli.train import chance_level

    X = torch.zeros(6, 2, dtype=torch.float64)
    ds = Dataset(
        "t", "classification", X, torch.tensor([0, 1, 2, 2, 2, 2]), X[:5], torch.tensor([1, 1, 1, 0, 2]), 3
    )
    assert chance_level(ds) == pytest.approx(0.6)
    assert chance_level(Dataset("r", "regression", X, X[:, :1], X, X[:, :1])) is None


# -- the probe of 2027-01 (/tmp/probe_cli/FINDINGS.md): one-line errors, never a traceback ---------
SPECTRUM = ["spectrum", "--samples", "120", "--batch", "16", "--depth", "3", "--width", "4", "--bins", "4"]


def one_line_error(capsys, rc: int, message: str) -> None:
    out, err = capsys.readouterr()
    assert rc == 2, err
    assert message in err and "Traceback" not in err + out
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--damping", "nan"], "argument --damping: expected a finite number"),
        (["--damping", "inf"], "argument --damping: expected a finite number"),
        (["--range=-1,inf"], "argument --range: expected a finite number, got 'inf'"),
        (["--range=-inf,inf"], "argument --range: expected a finite number, got '-inf'"),
        (["--samples", "0"], "argument --samples: expected a positive integer"),
        (["--samples", "-5", "--data", "regression"], "argument --samples: expected a positive integer"),
        (["--seed", "-1"], "argument --seed: expected an integer >= 0"),
    ],
)
def test_spectrum_errors_exit_2_with_one_line(tmp_path, capsys, args, message):
    one_line_error(capsys, main([*SPECTRUM, *args, "--out", str(tmp_path / "spec")]), message)


def test_spectrum_of_a_singular_matrix_writes_the_histogram(tmp_path, capsys):
    """--damping 0 on a Gauss-Newton matrix with a null space: only log|det| has no finite value; the run
    exited 2 and wrote no histogram. Now -inf, said, with the library's reason in the record."""
    out = tmp_path / "spec"
    assert main([*SPECTRUM, "--damping", "0", "--curvature", "gauss-newton", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "= -inf (singular to working precision)" in printed
    rec = json.loads((out / "spectrum.json").read_text())
    assert rec["logabsdet"] is None and "singular" in rec["logdet_singular"]
    assert sum(rec["counts"]) + rec["below"] + rec["above"] == rec["n_params"]
    assert (out / "spectrum.png").exists()


def test_spectrum_with_missing_data_leaves_no_output_folder(tmp_path, capsys):
    out = tmp_path / "never"
    one_line_error(
        capsys,
        main(["spectrum", "--data", str(tmp_path / "nosuch.csv"), "--out", str(out)]),
        "does not exist",
    )
    assert not out.exists()


def test_spectrum_reports_zero_negative_eigenvalues_of_a_gauss_newton_matrix(tmp_path, capsys):
    """A Gauss-Newton matrix is PSD: its eigenvalues zero up to rounding (here 45 parameters, 16
    examples with one output: a null space of dimension >= 29) count as >= 0, in the count and in
    the histogram, as in hessinv.spectrum.num_negative_eigenvalues."""
    out = tmp_path / "spec"
    args = ["--data", "regression", "--curvature", "gauss-newton", "--out", str(out)]
    assert main([*SPECTRUM, *args]) == 0
    printed = capsys.readouterr().out
    assert ": 0 eigenvalues < 0" in printed
    assert "log|det(G + 0.001 I)|" in printed  # (it said H, a review)
    rec = json.loads((out / "spectrum.json").read_text())
    assert rec["eigenvalues_below_zero"] == 0 and rec["zero_tolerance"] > 0
    edges, counts = rec["edges"], rec["counts"]
    below_zero = rec["below"] + sum(c for c, hi in zip(counts, edges[1:], strict=True) if hi <= 0)
    assert below_zero == 0 and sum(counts) + rec["above"] == rec["n_params"]


def test_library_errors_are_one_line_without_traceback(capsys, monkeypatch):
    from hessinv.errors import SingularError

    def fail(args):
        raise SingularError("H + eps I is singular\nto working precision")

    monkeypatch.setattr("hessinv.cli.spectrum.run", fail)
    one_line_error(
        capsys, main(["spectrum"]), "hessinv: error: SingularError: H + eps I is singular to working"
    )


def _unwritable(tmp_path: Path, kind: str) -> Path:
    if kind == "file":
        (tmp_path / "a.csv").write_text("1,2\n")
        return tmp_path / "a.csv"
    if os.geteuid() != 0:  # a directory without write permission stops everyone but root
        (tmp_path / "ro").mkdir(mode=0o500)
        return tmp_path / "ro"
    if not Path("/proc/self").is_dir():
        pytest.skip("no unwritable directory for root here")
    return Path("/proc")  # exists, and no file can be created in it


@pytest.mark.parametrize("kind", ["file", "unwritable directory"])
@pytest.mark.parametrize("command", ["train", "spectrum"])
def test_output_directory_that_cannot_be_written(tmp_path, capsys, command, kind):
    out = _unwritable(tmp_path, kind)
    args = ["train", "--optimizers", "adam", "--steps", "1", *SMALL] if command == "train" else SPECTRUM
    one_line_error(capsys, main([*args, "--out", str(out)]), f"cannot write to the output directory {out}")


def test_table_without_a_target_loss_says_it_is_not_measured(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "mine.npz", X=rng.normal(size=(40, 3)), y=rng.integers(0, 2, 40))
    out = tmp_path / "o"
    args = ["--data", str(tmp_path / "mine.npz"), "--optimizers", "adam", "--steps", "2", "--out", str(out)]
    rc, stdout, err = run(capsys, *args, *SMALL[2:])
    assert rc == 0, err
    table = (out / "table.md").read_text()
    assert "<= none" not in stdout + table
    assert "time to target not measured: no --target-loss given" in stdout
    assert "Time to target not measured: no --target-loss given; each optimizer stops" in table


# -- the probe of /tmp/probe_apps: one-line errors, no option silently ignored ---------------------------
@pytest.mark.parametrize(
    "args, message",
    [
        (["--seed", "99999999999999999999"], "argument --seed: expected an integer from 0 to 4294967295"),
        (["--threads", "99999999999999999999"], "argument --threads: this machine has"),
        (["--budget", "-5s"], "argument --budget: the budget must be positive, got '-5s'"),
        (["--tune-budget", "-1s"], "argument --tune-budget: the budget must be positive"),
        (["--lr", "sgd=0.1"], "--lr sgd=0.1: sgd is not selected (--optimizers adam)"),
        (["--steps", "sgd=7"], "--steps sgd=7: sgd is not selected (--optimizers adam)"),
        (
            ["--newton-damping", "levenberg-marquardt"],
            "--newton-damping applies to newton-tr, gauss-newton only",
        ),
        (
            ["--curvature-batch-size", "8"],
            "--curvature-batch-size applies to newton, newton-tr, gauss-newton",
        ),
        (["--dist-strategy", "sharded"], "--dist-strategy applies with --nproc > 1 only"),
        (["--tune-budget", "1s", "--no-tune"], "--tune-budget applies only when a learning rate is tuned"),
        (["--tune-budget", "1s", "--lr", "adam=0.01"], "--tune-budget applies only when"),
        (
            ["--bogus", "1"],
            "hessinv train: error: unrecognized arguments: --bogus 1 (see hessinv train --help)",
        ),
    ],
)
def test_unused_or_bad_options_exit_2_with_one_line(tmp_path, capsys, args, message):
    rc = main(["train", "--optimizers", "adam", *args, "--steps", "1", "--out", str(tmp_path), "--quiet"])
    one_line_error(capsys, rc, message)


def test_newton_damping_refused_for_newton_alone_and_recorded(tmp_path, capsys):
    rc = main(["train", "--optimizers", "newton", "--newton-damping", "lm", "--out", str(tmp_path)])
    one_line_error(capsys, rc, "invalid choice: 'lm'")
    args = ["--optimizers", "newton", "--newton-damping", "levenberg-marquardt", "--out", str(tmp_path)]
    one_line_error(capsys, main(["train", *args]), "and --optimizers newton has none of them")
    rc, _, err = run(
        capsys, "--data", "regression", "--optimizers", "adam", "--steps", "1", "--out", str(tmp_path), *SMALL
    )
    assert rc == 0, err
    config = json.loads((tmp_path / "summary.json").read_text())["config"]
    assert config["newton_damping"] == "trust-region" and config["curvature_batch_size"] is None


def _npz(tmp_path: Path, **arrays) -> str:
    np.savez(tmp_path / "d.npz", **arrays)
    return str(tmp_path / "d.npz")


@pytest.mark.parametrize("command", ["train", "spectrum"])
@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"X": np.zeros((0, 4)), "y": np.zeros(0)}, "d.npz: no examples"),
        ({"X": np.array(3.0), "y": np.array(1)}, "d.npz: the features are a single number"),
        ({"X": np.zeros((120, 0)), "y": np.arange(120) % 2}, "d.npz: no feature columns"),
    ],
)
def test_malformed_arrays_are_data_errors(tmp_path, capsys, command, arrays, message):
    args = ["--optimizers", "adam", "--steps", "1", "--quiet"] if command == "train" else ["--bins", "2"]
    rc = main([command, "--data", _npz(tmp_path, **arrays), *args, "--out", str(tmp_path / "o")])
    one_line_error(capsys, rc, message)


def test_samples_with_a_test_split_or_beyond_the_data_refused(tmp_path, capsys):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(100, 3)), np.arange(100) % 2
    data = _npz(tmp_path, X=X, y=y, X_test=X[:10], y_test=y[:10])
    for extra, message in (
        (["--samples", "10"], "own test split (X_test, y_test), so --samples cannot apply"),
        (["--test-fraction", "0.5"], "so --test-fraction cannot apply"),
        (["--samples", "100000", "--data", "digits"], "digits has 1797 examples, fewer than the 100000"),
    ):
        rc = main(["train", "--data", data, "--optimizers", "adam", *extra, "--out", str(tmp_path / "o")])
        one_line_error(capsys, rc, message)


def test_test_labels_outside_the_training_classes_exit_2(tmp_path, capsys):
    rng = np.random.default_rng(0)
    data = _npz(
        tmp_path,
        X=rng.normal(size=(40, 3)),
        y=np.arange(40) % 2,
        X_test=rng.normal(size=(6, 3)),
        y_test=np.array([5, 6, 7] * 2),
    )
    rc = main(["train", "--data", data, "--optimizers", "adam", "--steps", "1", "--out", str(tmp_path / "o")])
    one_line_error(capsys, rc, "d.npz: the test labels have classes the training labels do not (5, 6, 7)")


def test_table_follows_the_optimizers_order_with_short_times():
    from hessinv.cli.train import RunResult, time_to_target_table

    slow = RunResult("sgd", 0.1, train_time=2.345, time_to_target=None)
    fast = RunResult("adam", 0.01, train_time=0.0042, time_to_target=0.0031)
    head, rows = time_to_target_table([slow, fast], 1.0, "regression")
    assert [r[0] for r in rows] == ["sgd", "adam"]
    col = head.index("train time (s)")
    assert (rows[0][col], rows[1][col]) == ("2.35", "0.0042")
    assert rows[1][head.index("time to target (s)")] == "0.0031"


@pytest.mark.parametrize("args", [["--range", "-1,1"], ["--range=-1,1"]])
def test_spectrum_negative_range_as_written(tmp_path, capsys, args):
    out = tmp_path / "spec"
    assert main([*SPECTRUM, "--data", "regression", *args, "--out", str(out)]) == 0, capsys.readouterr().err
    rec = json.loads((out / "spectrum.json").read_text())
    assert (rec["edges"][0], rec["edges"][-1]) == (-1.0, 1.0)


def test_spectrum_bad_range_and_typo_point_to_the_spectrum_help(tmp_path, capsys):
    rc = main([*SPECTRUM, "--range", "-1", "--out", str(tmp_path)])
    one_line_error(capsys, rc, "expected LO,HI (e.g. --range -0.1,0.1 or --range=-0.1,0.1), got '-1'")
    rc = main([*SPECTRUM, "--bogus", "--out", str(tmp_path)])
    one_line_error(
        capsys, rc, "hessinv spectrum: error: unrecognized arguments: --bogus (see hessinv spectrum --help)"
    )
    rc = main([*SPECTRUM, "--seed", "99999999999999999999", "--out", str(tmp_path)])
    one_line_error(capsys, rc, "argument --seed: expected an integer from 0 to 4294967295")


def test_spectrum_says_the_batch_it_used(tmp_path, capsys):
    assert main([*SPECTRUM, "--data", "regression", "--batch", "100000", "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "--batch 100000 is more than the 96 training examples: the curvature is built on all 96" in err
    assert "hessian of regression (batch 96)" in out
    assert json.loads((tmp_path / "spectrum.json").read_text())["batch"] == 96


def test_bench_solve_help_and_bad_threads_name_the_command(capsys):
    assert main(["bench", "solve", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: hessinv bench solve ")
    rc = main(["bench", "solve", "--threads", "-1"])
    one_line_error(
        capsys, rc, "hessinv bench solve: error: argument --threads: expected an integer >= 0, got '-1'"
    )


# -- a probe's findings (2026-12-03) ----------------------------------------------------------------
def test_an_empty_out_is_refused(tmp_path, capsys, monkeypatch):
    """--out "" (an unset variable) wrote summary.json, table.md and loss.png into the current directory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "summary.json").write_text("precious")
    rc, _, err = run(
        capsys, "--data", "digits", "--optimizers", "adam", "--steps", "2", "--no-tune", "--out", ""
    )
    assert rc == 2 and "--out is empty" in err and (tmp_path / "summary.json").read_text() == "precious"


def test_a_reused_out_loses_the_previous_jobs_logs(tmp_path, capsys):
    out = tmp_path / "job"
    common = ("--data", "digits", "--steps", "2", "--no-tune", "--quiet", "--depth", "2", "--out", str(out))
    assert run(capsys, "--optimizers", "adam,sgd", *common)[0] == 0
    assert (out / "sgd.jsonl").exists()
    assert run(capsys, "--optimizers", "adam", *common)[0] == 0
    assert not (out / "sgd.jsonl").exists() and (out / "adam.jsonl").exists()


def test_a_diverged_run_reports_no_accuracy(tmp_path, capsys):
    """A run whose loss is NaN reported the share of one class as its test accuracy ('25.0%')."""
    out = tmp_path / "d"
    rc, *_ = run(
        capsys, "--data", "digits", "--optimizers", "sgd", "--lr", "sgd=1e30", "--activation", "relu",
        "--steps", "20", "--no-tune", "--quiet", "--depth", "3", "--out", str(out),
    )  # fmt: skip
    row = (out / "table.md").read_text().strip().splitlines()[-1]
    assert "diverged" in row and row.rstrip(" |").endswith("—"), row


def test_every_optimizer_has_its_own_colour():
    from hessinv.cli.choices import OPTIMIZERS
    from hessinv.cli.plots import _colors

    colors = _colors([*OPTIMIZERS, "mine", "yours"])
    assert len(set(colors.values())) == len(colors)


def test_stale_logs_of_a_foreign_summary_are_left_alone(tmp_path, capsys):
    out = tmp_path / "job"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"runs": {"notes": {}, "sgd": {}}}))
    (out / "notes.jsonl").write_text("mine")
    (out / "sgd.jsonl").write_text("mine too")
    common = ("--data", "digits", "--steps", "2", "--no-tune", "--quiet", "--depth", "2", "--out", str(out))
    assert run(capsys, "--optimizers", "adam", *common)[0] == 0
    assert (out / "notes.jsonl").read_text() == "mine" and (out / "sgd.jsonl").read_text() == "mine too"


def test_evaluation_runs_without_autograd():
    import torch

    from hessinv.cli.data import load_dataset
    from hessinv.cli.models import build_model
    from hessinv.cli.train import evaluate

    ds = load_dataset("digits", seed=0).to(dtype=torch.float32)
    model = build_model(ds.input_dim, ds.output_dim, depth=2, width=8, dtype=torch.float32)
    modes = []
    model.register_forward_hook(lambda *_: modes.append(torch.is_grad_enabled()))
    evaluate(model, torch.nn.CrossEntropyLoss(), ds)
    assert modes and not any(modes)


def test_a_plot_of_runs_with_no_finite_value_is_written(tmp_path):
    """Every loss and accuracy NaN (a run that diverged at its first evaluation): the log step axes
    had no finite data and matplotlib raised at savefig."""
    from hessinv.cli.plots import plot_runs
    from hessinv.cli.train import RunResult

    nan = float("nan")
    hist = [
        {"step": s, "time": 0.1 * s, "train_loss": nan, "test_loss": nan, "test_acc": nan} for s in (0, 1)
    ]
    run_ = RunResult("adam", 1e-3, status="diverged", steps=2, history=hist)
    path = plot_runs([run_], tmp_path / "loss.png", target=0.5, chance=0.1)
    assert path.stat().st_size > 0


def test_probe_findings_of_the_thirtieth_session(tmp_path, capsys):
    """A probe's CLI findings: bench solve's unwritable --out / --md exited 1 with errno text; --steps took
    one optimizer twice (the later silently, where --lr refuses); spectrum had no --threads; its
    too-large refusal gave the Python API's advice (curvature_batch_size) instead of --batch."""
    afile = tmp_path / "afile"
    afile.write_text("")
    if cli._find_bench("solve") is not None:  # (a checkout: the real script)
        assert main(["bench", "solve", "--render-only", "--out", str(afile)]) == 2
        assert "cannot write to the output directory" in capsys.readouterr().err
        assert main(["bench", "solve", "--render-only", "--md", str(afile / "b.md")]) == 2
        assert "cannot write to the output directory" in capsys.readouterr().err
    args = ["train", "--optimizers", "adam", "--steps", "adam=3", "--steps", "adam=4", "--out", str(tmp_path)]
    assert main(args) == 2
    assert "--steps gives adam twice" in capsys.readouterr().err
    out = tmp_path / "sp"
    common = ["spectrum", "--depth", "2", "--width", "4", "--samples", "100", "--bins", "4"]
    common += ["--out", str(out)]
    assert main([*common, "--threads", "1"]) == 0
    capsys.readouterr()
    assert main(["spectrum", "--depth", "2", "--width", "1000", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert re.search(r"at most \d+ examples \(--batch \d+\)", err) and "curvature_batch_size" not in err


def test_batch_size_with_full_batch_optimizers_only_says_full_batch(tmp_path, capsys):
    """--batch-size 32 with lbfgs alone: the header and summary said 'batch 32' while lbfgs trains on the
    full batch (a probe)."""
    rc, _, err = run(
        capsys,
        "--optimizers",
        "lbfgs",
        "--batch-size",
        "32",
        "--steps",
        "1",
        "--no-tune",
        "--out",
        str(tmp_path),
    )
    assert rc == 0 and "full batch" in err and "batch 32" not in err
    assert json.loads((tmp_path / "summary.json").read_text())["config"]["batch_size"] is None


def test_spectrum_says_a_count_doubt_in_its_own_terms(tmp_path, capsys, monkeypatch):
    """A count whose sweep had a pivot conditioned below sqrt(u) (n above the dense recount): the library's
    advice "move the shift" was printed as is, though no option of ``hessinv spectrum`` moves the count's
    shift (a probe); it is one note naming what does move the edges."""
    import hessinv.curvature as hc

    monkeypatch.setattr(hc, "DENSE_RECOUNT_N", 0)
    args = ["spectrum", "--samples", "120", "--batch", "16", "--depth", "3", "--width", "6", "--bins", "4"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "move the shift" not in err and err.count("--range and --bins move the edges") == 1, err
