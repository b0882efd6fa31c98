"""Fixes of a new user's findings on the command line: interrupts (Ctrl-C with --nproc, SIGTERM) keep
the summary; the full-batch note only where it is true; a class the random split puts in the test split
only; install hints that work from a checkout; where a NaN is; the skipped header named; the README's
``.grad`` warning; ``--out`` a file, ``--data -d9.csv``, optimizers not run in the table."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import hessinv
import hessinv.cli as cli
from hessinv.cli import main
from hessinv.cli.data import DataError, load_dataset

ROOT = Path(__file__).resolve().parents[1]
SRC = Path(hessinv.__file__).resolve().parents[1]  # (the hessinv these tests import: the subprocesses too)
SMALL = ["--depth", "3", "--width", "4", "--no-tune"]


def _run(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["train", *args])
    out, err = capsys.readouterr()
    return rc, out, err


# -- 1, 2. Ctrl-C with --nproc, and SIGTERM: the summary of what was measured ------------------------
def _start(out: Path, *args: str) -> subprocess.Popen:
    """``hessinv train`` in its own session (process group), logging into ``out``."""
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "hessinv", "train", "--data", "regression", "--samples", "400", *SMALL]
    cmd += ["--optimizers", "adam,sgd", "--steps", "none", "--budget", "60s", "--out", str(out), *args]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def _wait_for_steps(p: subprocess.Popen, out: Path, lines: int = 20, timeout: float = 60) -> None:
    """Until a ``.jsonl`` log in ``out`` has ``lines`` lines (the job is training)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.poll() is not None:
            pytest.fail(f"hessinv exited early ({p.returncode}): {p.communicate()[1][-2000:]}")
        for log in out.glob("*.jsonl"):
            if len(log.read_text().splitlines()) >= lines:
                return
        time.sleep(0.1)
    os.killpg(p.pid, signal.SIGKILL)
    pytest.fail("no log lines within the timeout")


def _wait_until_caught(p: subprocess.Popen, signum: int, timeout: float = 120) -> None:
    """Until the process has a handler for ``signum`` (Linux: ``SigCgt`` of ``/proc/<pid>/status``;
    elsewhere a fixed 5 s)."""
    status = Path(f"/proc/{p.pid}/status")
    if not status.exists():
        time.sleep(5.0)
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and p.poll() is None:
        caught = next((ln for ln in status.read_text().splitlines() if ln.startswith("SigCgt:")), "SigCgt: 0")
        if int(caught.split()[1], 16) >> (signum - 1) & 1:
            return
        time.sleep(0.05)
    if p.poll() is None:
        p.kill()
    pytest.fail(f"no handler for signal {signum} within {timeout} s: {p.communicate()[1][-2000:]}")


def _stopped(p: subprocess.Popen, timeout: float = 60) -> tuple[int, str, str]:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"still running {timeout} s after the signal: {err[-2000:]}")
    return p.returncode, out, err


def _check_interrupted_summary(out: Path, by: str, distributed: bool) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["interrupted_by"] == by
    assert summary["runs"]["adam"]["status"] == "interrupted" and summary["runs"]["adam"]["steps"] > 0
    assert summary["not_run"] == ["sgd"] and ("distributed" in summary) == distributed
    table = (out / "table.md").read_text()
    assert "| adam |" in table and "interrupted" in table and "| sgd | — | not run |" in table
    assert (out / "loss.png").stat().st_size > 0
    return summary


def _dist_available() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


@pytest.mark.skipif(not _dist_available(), reason="torch.distributed with gloo is not available")
def test_ctrl_c_to_the_process_group_of_a_data_parallel_run_keeps_the_summary(tmp_path):
    """SIGINT to the whole group (a terminal's Ctrl-C) stopped the launcher, which killed the ranks at
    once: exit 130, nothing printed, only the first log (no summary.json, table.md, loss.png)."""
    out = tmp_path / "cc"
    p = _start(out, "--nproc", "2", "--batch-size", "32")
    _wait_for_steps(p, out)
    os.killpg(p.pid, signal.SIGINT)
    rc, stdout, stderr = _stopped(p)
    assert rc == 130, stderr[-2000:]
    summary = _check_interrupted_summary(out, "SIGINT", distributed=True)
    assert summary["distributed"]["processes"] == 2
    assert "adam: interrupted: interrupted by the user after" in stderr and "Traceback" not in stderr
    assert "| adam" in stdout or "adam" in stdout  # the table


@pytest.mark.skipif(not _dist_available(), reason="torch.distributed with gloo is not available")
def test_sigterm_to_the_launcher_only_reaches_the_ranks(tmp_path):
    """``kill PID`` of the launcher: it passes the stop on to its ranks, rank 0 writes the summary."""
    out = tmp_path / "term"
    p = _start(out, "--nproc", "2", "--batch-size", "32", "--quiet")
    _wait_for_steps(p, out)
    p.send_signal(signal.SIGTERM)  # (the launcher only, not its group)
    rc, _, stderr = _stopped(p)
    assert rc == 143, stderr[-2000:]
    _check_interrupted_summary(out, "SIGTERM", distributed=True)
    assert "stopped by SIGTERM" in stderr and "Traceback" not in stderr


def test_sigterm_keeps_the_summary_like_ctrl_c(tmp_path):
    """SIGTERM (kill, timeout, a scheduler) ended the process silently: exit 143, only the first log."""
    out = tmp_path / "one"
    p = _start(out, "--quiet")
    _wait_for_steps(p, out)
    p.send_signal(signal.SIGTERM)
    rc, _, stderr = _stopped(p)
    assert rc == 143, stderr[-2000:]
    summary = _check_interrupted_summary(out, "SIGTERM", distributed=False)
    assert summary["runs"]["adam"]["message"].startswith("stopped by SIGTERM after")
    assert "adam: interrupted: stopped by SIGTERM" in stderr and "Traceback" not in stderr


# -- 9c. optimizers that never started: "not run" in the table ------------------------------------------
def test_an_interrupt_lists_the_optimizers_not_run(tmp_path, capsys, interrupt_at):
    interrupt_at(3)
    args = ["--data", "regression", "--samples", "100", *SMALL, "--steps", "10", "--quiet"]
    rc, out, err = _run(capsys, *args, "--optimizers", "adam,sgd,lbfgs", "--out", str(tmp_path))
    assert rc == 130
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["runs"]) == ["adam"] and summary["not_run"] == ["sgd", "lbfgs"]
    rows = {r["optimizer"]: r for r in summary["table"]}
    assert rows["sgd"]["status"] == rows["lbfgs"]["status"] == "not run" and rows["sgd"]["lr"] == "—"
    assert "| lbfgs | — | not run |" in (tmp_path / "table.md").read_text()
    assert "not run" in out and "sgd: not run" in err


# -- 3. the full-batch note: only where an optimizer factors the whole training set every step ----------
def test_full_batch_note_only_where_the_curvature_is_factored_every_step(tmp_path, capsys):
    """It said that full-batch newton factors the whole training set at every step: on digits with the
    default chain newton preconditions (one factorization of 8 examples, refreshed)."""
    rc, _, err = _run(
        capsys, "--batch-size", "full", "--optimizers", "newton", "--steps", "2", "--no-tune", "--quiet",
        "--out", str(tmp_path / "d"),
    )  # fmt: skip
    assert rc == 0 and "factor" not in err
    modes = {json.loads(line).get("stats", {}).get("mode") for line in open(tmp_path / "d" / "newton.jsonl")}
    assert modes - {None} == {"precondition"}
    # a small chain on 800 examples: newton takes its trust region (a factorization below 3e8 flops)
    rc, _, err = _run(
        capsys, "--data", "regression", "--samples", "1000", *SMALL, "--batch-size", "full", "--quiet",
        "--optimizers", "newton,newton-tr,adam", "--steps", "3", "--out", str(tmp_path / "r"),
    )  # fmt: skip
    assert rc == 0 and "note: full-batch newton, newton-tr on 800 examples factor the exact curvature" in err
    modes = [json.loads(line).get("stats", {}).get("mode") for line in open(tmp_path / "r" / "newton.jsonl")]
    assert modes[-1] == "trust-region"
    from hessinv.cli.train import TrainConfig, exact_factorizations

    ds = load_dataset("digits")
    cfg = TrainConfig(optimizers=["newton", "newton-tr", "gauss-newton", "adam"], batch_size=None)
    names, flops, covered = exact_factorizations(cfg, ds)
    assert names == ["newton-tr", "gauss-newton"] and flops > 3e8 and covered == len(ds.X_train)


def test_a_costly_mini_batch_factorization_is_noted_before_the_run(tmp_path, capsys, monkeypatch):
    """Wide layers on mini-batches: one newton-tr step took 48 s against a 3 s --budget (7 factorizations)
    and one gauss-newton step 78 s and 6.9 GB at width 128, with no word (a probe): the note the full-batch
    case has, for any batch whose factorization is above COSTLY_FACTORIZATION_FLOPS."""
    from hessinv.cli.train import TrainConfig, exact_factorizations

    ds = load_dataset("digits")
    cfg = TrainConfig(optimizers=["newton", "gauss-newton", "newton-tr"], width=64, depth=4)
    names, flops, covered = exact_factorizations(cfg, ds)
    assert names == ["gauss-newton", "newton-tr"] and covered == 64 and flops > cli.COSTLY_FACTORIZATION_FLOPS
    monkeypatch.setattr(cli, "COSTLY_FACTORIZATION_FLOPS", 1e3)  # (the note on a run cheap enough for a test)
    rc, _, err = _run(
        capsys, "--optimizers", "gauss-newton", "--steps", "1", "--no-tune", "--quiet", "--out", str(tmp_path)
    )
    assert rc == 0 and "gauss-newton factors the exact curvature of 64 examples at every step" in err


# -- 4. a class that the random split puts in the test split only ------------------------------------------
def _rare(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """200 rows, 3 classes; class 2 has one example (the user's rare.csv): the seed-0 split tested it."""
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(200, 4)), rng.integers(0, 2, 200)
    y[0] = 2
    path = tmp_path / "rare.csv"
    path.write_text("".join(",".join(f"{v:.4f}" for v in x) + f",{c}\n" for x, c in zip(X, y, strict=True)))
    return path, y


def test_a_class_the_split_tests_only_is_stratified_into_training(tmp_path, capsys):
    """It was an error advising 'more examples (--samples)', which cannot help (more rows than the file has
    is an error): now the split is stratified by class there, and the run's header says so."""
    path, y = _rare(tmp_path)
    args = ["--optimizers", "adam", "--steps", "2", *SMALL, "--out", str(tmp_path / "o")]
    rc, _, err = _run(capsys, "--data", str(path), *args)
    assert rc == 0, err
    err = " ".join(err.split())  # (rich wraps the header's lines)
    assert "split: stratified by class (a random split put class 2 (1 example) in the test split only)" in err
    assert "class 2 (1 example) is in the training split only (not tested)" in err
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["dataset"]["classes"] == 3 and summary["dataset"]["test"] == 40
    ds = load_dataset(str(path), standardize=False)
    assert int((ds.y_train == 2).sum()) == 1 and len(ds.y_test) == 40
    for c in (0, 1):  # each class holds out about a fifth of its examples
        assert abs(int((ds.y_test == c).sum()) - 0.2 * int((y == c).sum())) <= 1


def test_a_split_that_tests_every_class_is_unchanged(tmp_path):
    """The stratified split replaces only a split that would fail: others keep their rows."""
    from hessinv.cli.data import _split

    rng = np.random.default_rng(1)
    X = np.column_stack([np.arange(300.0), rng.normal(size=300)])
    np.savez(tmp_path / "d.npz", X=X, y=np.arange(300) % 3)
    for seed in (0, 5):
        ds = load_dataset(str(tmp_path / "d.npz"), seed=seed, standardize=False)
        tr, te = _split(300, 0.2, seed)
        assert (
            ds.X_train[:, 0].long().tolist() == tr.tolist() and ds.X_test[:, 0].long().tolist() == te.tolist()
        )
        assert not ds.notes


def test_unseen_test_classes_are_named_with_their_counts(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "own.npz", X=rng.normal(size=(20, 2)), y=np.arange(20) % 2,
        X_test=rng.normal(size=(5, 2)), y_test=np.array([0, 1, 7, 7, 9]),
    )  # fmt: skip
    with pytest.raises(DataError) as e:
        load_dataset(str(tmp_path / "own.npz"))
    assert "y_test holds classes 7 (2 examples), 9 (1 example)" in str(e.value)
    assert "drop those rows of X_test and y_test, or add examples of them to X and y" in str(e.value)
    assert "--samples" not in str(e.value)
    (tmp_path / "single.csv").write_text("0.5,0\n1.5,1\n2.5,2\n")  # no split can train and test a class
    with pytest.raises(DataError) as e:
        load_dataset(str(tmp_path / "single.csv"))
    assert "every class has a single example (classes 0 (1 example), 1 (1 example), 2 (1 example))" in str(
        e.value
    )
    assert "--samples" not in str(e.value)


# -- 5. install hints that work from the checkout the README installs from ----------------------------------
def test_install_hints_name_the_checkout_install(tmp_path, capsys, monkeypatch):
    """They said pip install 'hessinv[cli]', a package the README never publishes: it installs '.[cli]'."""
    import importlib.util

    from hessinv.cli import train as cli_train

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "rich" else real(name, *a)
    )
    rc = main(["train", "--steps", "1", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "pip install '.[cli]' in the hessinv checkout" in err and "'hessinv[cli]'" in err
    monkeypatch.setattr(importlib.util, "find_spec", real)
    monkeypatch.setattr(cli_train, "peer_available", lambda name: False)
    rc, _, err = _run(capsys, "--optimizers", "soap", "--steps", "1", "--out", str(tmp_path))
    assert (
        rc == 2 and "pip install '.[bench]' in the hessinv checkout" in err and "pip install heavyball" in err
    )


# -- 6. NaN or infinity in the features: where, how many, what to do --------------------------------------
def test_non_finite_features_are_located(tmp_path, capsys):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(30, 5)), np.arange(30) % 2
    X[4, 2] = np.nan  # line 5 of the file, column 3
    X[17, 2] = np.inf
    path = tmp_path / "nan.csv"
    path.write_text(
        "".join(",".join(repr(float(v)) for v in x) + f",{c}\n" for x, c in zip(X, y, strict=True))
    )
    rc, _, err = _run(
        capsys, "--data", str(path), "--optimizers", "adam", "--steps", "1", "--out", str(tmp_path)
    )
    assert rc == 2
    assert "nan.csv: line 5, column 3 is 'nan': features must be finite numbers (2 rows have NaN or " in err
    assert "drop them, or impute the values" in err
    X2 = rng.normal(size=(30, 4))
    X2[3, 1] = np.nan
    np.savez(tmp_path / "nan.npz", X=X2, y=y)
    with pytest.raises(DataError, match=r"nan\.npz: X\[3, 1\] is nan \(0-based row, column\).*drop it"):
        load_dataset(str(tmp_path / "nan.npz"))


# -- 7. a first row taken as a header is named in the run's header ------------------------------------------
def test_a_skipped_header_row_is_named(tmp_path, capsys):
    """``0,1,2,3,4,9`` above 300 rows of 3 classes was dropped as a header without a word."""
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(300, 5)), np.arange(300) % 3
    rows = "".join(",".join(f"{v:.6f}" for v in x) + f",{c}\n" for x, c in zip(X, y, strict=True))
    (tmp_path / "guess.csv").write_text("0,1,2,3,4,9\n" + rows)
    (tmp_path / "named.csv").write_text("a,b,c,d,e,label\n" + rows)
    (tmp_path / "plain.csv").write_text(rows)
    args = ["--optimizers", "adam", "--steps", "1", *SMALL]
    for name, note in (
        ("guess", "header: line 1, 0,1,2,3,4,9 (skipped)"),
        ("named", "header: line 1, a,b,c,d,e,label (skipped)"),
    ):
        rc, _, err = _run(
            capsys, "--data", str(tmp_path / f"{name}.csv"), *args, "--out", str(tmp_path / name)
        )
        assert rc == 0 and note in " ".join(err.split())
    rc, _, err = _run(capsys, "--data", str(tmp_path / "plain.csv"), *args, "--out", str(tmp_path / "p"))
    assert rc == 0 and "header:" not in err


# -- 8. the README on a .grad set before step(xb, yb) --------------------------------------------------------
def test_readme_says_when_the_grad_warning_fires():
    """README: 'a .grad set before it ... is not used, and a warning says so' -- not at the first step."""
    from hessinv.optim import Newton

    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "is not used, and a warning says so" not in readme
    assert "A warning says so (once) from the second step on" in readme
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    X, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,))
    opt, loss_fn = Newton(net, torch.nn.CrossEntropyLoss()), torch.nn.CrossEntropyLoss()
    seen = []
    for _ in range(2):
        loss_fn(net(X), y).backward()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            opt.step(X, y)
        seen.append(any(".grad set or changed" in str(m.message) for m in w))
    assert seen == [False, True]


# -- 9. --out a file; a --data value that starts with '-' --------------------------------------------------
def test_out_that_is_a_file_is_named_as_such(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    for out, what in (
        (tmp_path / "afile", "afile: it is a file"),
        (tmp_path / "afile" / "sub", "sub: " + str(tmp_path / "afile") + ", in its path, is a file"),
    ):
        rc, _, err = _run(capsys, "--optimizers", "adam", "--steps", "1", "--out", str(out))
        assert rc == 2 and f"{what}, not a directory" in err and "File exists" not in err


def test_a_data_value_starting_with_a_dash_gets_the_equals_hint(capsys):
    rc, _, err = _run(capsys, "--data", "-d9.csv", "--steps", "1")
    assert rc == 2 and "expected one argument; a value that starts with '-' needs '=': --data=-d9.csv" in err
    rc, _, err = _run(capsys, "--out", "--quiet")  # (a missing value, not one that starts with '-')
    assert rc == 2 and "needs '='" not in err


def test_sigterm_stops_hessinv_spectrum_with_a_message(tmp_path):
    """``hessinv spectrum`` under SIGTERM (kill, timeout, a scheduler) died silently; it now stops as on
    Ctrl-C: exit 143, ``stopped by SIGTERM`` said, no traceback, nothing half-written."""
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1")
    out = tmp_path / "spec"
    cmd = [sys.executable, "-m", "hessinv", "spectrum", "--data", "regression", "--samples", "400"]
    # (n = 7.6k: a factorization per bin edge, 400 of them -- about 20 s, far beyond the signal)
    cmd += ["--depth", "8", "--width", "32", "--bins", "400", "--out", str(out)]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # (a fixed 3 s sleep sent the signal before torch's import ended on a loaded machine: the default
    # action killed it, -15; wait until the process catches SIGTERM, then let it compute a little)
    _wait_until_caught(p, signal.SIGTERM)
    time.sleep(1.0)
    assert p.poll() is None, p.communicate()[1][-2000:]
    p.send_signal(signal.SIGTERM)
    rc, _, stderr = _stopped(p)
    assert rc == 143, stderr[-2000:]
    assert "stopped by SIGTERM" in stderr and "Traceback" not in stderr
    assert not (out / "spectrum.json").exists()


# -- a researcher's own files (a probe, 2026-12-06) ----------------------------------------------------
def test_quiet_still_says_how_the_data_was_read(tmp_path, capsys):
    """``--quiet`` (no live progress) dropped the data notes too: a headerless file's first row, the only
    example of its class, taken as a header and dropped without a word."""
    rng = np.random.default_rng(1)
    rows = [
        f"{a:.3f},{b:.3f},{c}"
        for (a, b), c in zip(rng.normal(size=(30, 2)), ["rare"] + ["x", "y"] * 14 + ["x"], strict=True)
    ]
    (tmp_path / "noheader.csv").write_text("\n".join(rows) + "\n")
    rc, out, err = _run(
        capsys, "--data", str(tmp_path / "noheader.csv"), "--steps", "1", "--optimizers", "adam",
        "--out", str(tmp_path / "o"), "--quiet", *SMALL,
    )  # fmt: skip
    assert rc == 0 and "header: line 1" in err


def test_numeric_labels_with_many_missing_values_are_named_missing(tmp_path, capsys):
    """A regression file with 10% ``NA`` targets was told its label column mixes class names and numbers
    ('NA' read as a class, as 'NA' for North America among names is); among numbers it is a missing value."""
    rng = np.random.default_rng(5)
    X = rng.normal(size=(100, 3))
    rows = [
        ",".join(f"{v:.4f}" for v in r) + "," + ("NA" if i % 10 == 3 else f"{float(r.sum()):.4f}")
        for i, r in enumerate(X)
    ]
    (tmp_path / "na.csv").write_text("a,b,c,price\n" + "\n".join(rows) + "\n")
    rc, out, err = _run(
        capsys, "--data", str(tmp_path / "na.csv"), "--steps", "1", "--optimizers", "adam", *SMALL
    )
    assert rc == 2 and "a missing value (10 rows in all); remove those rows" in err


def test_an_npz_with_sklearns_split_names_reads_them_and_names_arrays_not_read(tmp_path):
    """``X_train``/``y_train`` (sklearn's split names) were refused; a validation split ``X_val`` was
    ignored without a word."""
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, 3)), rng.integers(0, 2, 60)
    np.savez(tmp_path / "tt.npz", X_train=X[:40], y_train=y[:40], X_test=X[40:], y_test=y[40:])
    ds = load_dataset(str(tmp_path / "tt.npz"))
    assert (len(ds.X_train), len(ds.X_test)) == (40, 20)
    assert torch.equal(ds.y_test.long().cpu(), torch.as_tensor(y[40:]))
    np.savez(tmp_path / "val.npz", X=X[:40], y=y[:40], X_val=X[40:], y_val=y[40:])
    ds = load_dataset(str(tmp_path / "val.npz"))
    assert any("X_val, y_val" in note for note in ds.notes)


def test_unreadable_cells_and_files_get_advice(tmp_path):
    """An empty cell, a decimal comma and an .npz named .csv: a message with what to do (the last was a
    raw codec error; a probe)."""
    (tmp_path / "empty.csv").write_text("a,b,y\n1,2,0\n3,,1\n5,6,0\n7,8,1\n")
    with pytest.raises(DataError, match=r"is empty \(a missing value\): drop the row, or fill it in"):
        load_dataset(str(tmp_path / "empty.csv"))
    # (a ';' file's decimal commas are read as points now: test_a_semicolon_file_with_decimal_commas_...)
    (tmp_path / "euro.csv").write_text('a,b,y\n"0,34",1,0\n"0,5",2,1\n"1,5",3,0\n"2,5",4,1\n')
    with pytest.raises(DataError, match="a decimal comma"):
        load_dataset(str(tmp_path / "euro.csv"))
    np.savez(tmp_path / "arrays.npz", X=np.zeros((4, 2)), y=np.arange(4))
    (tmp_path / "arrays.csv").write_bytes((tmp_path / "arrays.npz").read_bytes())
    with pytest.raises(DataError, match=r"zip archive -- an \.npz\?"):
        load_dataset(str(tmp_path / "arrays.csv"))


def test_a_header_naming_another_column_the_label_gets_a_note(tmp_path):
    """A header ``a,label,b,c`` (or numpy.savetxt's ``# label a b c`` above ``np.c_[y, X]``) ran as a
    regression on the last feature without a word (the last column is the target, as documented): a note
    says so and how to pick the named column -- and that advice works."""
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(40, 3)), rng.integers(0, 2, 40)
    rows = [f"{a:.3f},{c},{b:.3f},{d:.3f}" for (a, b, d), c in zip(X, y, strict=True)]
    (tmp_path / "mid.csv").write_text("a,label,b,c\n" + "\n".join(rows) + "\n")
    np.savetxt(tmp_path / "sp.txt", np.c_[y, X], header="label a b c")
    for name, k in (("mid.csv", 2), ("sp.txt", 1)):
        ds = load_dataset(str(tmp_path / name))
        note = [n for n in ds.notes if n.startswith("target:")]
        assert note and f"--target-column {k} " in note[0], ds.notes
        ds = load_dataset(str(tmp_path / name), target=str(k))
        assert not [n for n in ds.notes if n.startswith("target:")]
        assert sorted(set(ds.y_train.tolist()) | set(ds.y_test.tolist())) == [0, 1]


def test_a_semicolon_file_with_decimal_commas_is_read_as_written(tmp_path):
    """A European spreadsheet's export, ``;``-separated with decimal commas and no header (``20,4;0;1``):
    where some columns were integers the sniffer said ``,``, and each row became feature ``20`` and class
    ``"4;0;1"`` -- 78 classes of one feature, trained without a word (a probe); where all were decimals,
    an error. The file is read as written, and the notes say how."""
    rng = np.random.default_rng(0)
    temp = np.round(rng.normal(20, 2, 300), 1)
    count = rng.integers(0, 4, 300)
    label = (temp > 20).astype(int)
    lines = [f"{t:.1f}".replace(".", ",") + f";{c};{k}" for t, c, k in zip(temp, count, label, strict=True)]
    (tmp_path / "eu.csv").write_text("\n".join(lines) + "\n")
    ds = load_dataset(str(tmp_path / "eu.csv"), standardize=False, test_fraction=0.2)
    X = torch.cat([ds.X_train, ds.X_test])
    assert X.shape == (300, 2) and ds.n_classes == 2
    assert sorted(X[:, 0].tolist()) == sorted(temp.tolist())
    assert any("decimal commas read as decimal points" in n for n in ds.notes)
    # a comma file whose text labels hold a ';' keeps its commas
    rows = zip(temp, count, label, strict=True)
    (tmp_path / "c.csv").write_text("".join(f"{t:.1f},{c},a;{k}\n" for t, c, k in rows))
    ds = load_dataset(str(tmp_path / "c.csv"), standardize=False, test_fraction=0.2)
    assert ds.X_train.shape[1] == 2 and ds.n_classes == 2


def test_an_npz_reads_only_the_arrays_it_uses(tmp_path):
    """``np.savez(p, X=X, y=y, feature_names=df.columns.values)`` -- an object array beside them -- was
    refused whole ("Object arrays cannot be loaded when allow_pickle=False", no advice); and the note on
    unread arrays said the test split came from X_test where the file had none (a probe)."""
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(50, 3)), rng.integers(0, 2, 50)
    np.savez(tmp_path / "d.npz", X=X, y=y, feature_names=np.array(["a", "b", None], dtype=object))
    ds = load_dataset(str(tmp_path / "d.npz"), standardize=False)
    assert len(ds.X_train) + len(ds.X_test) == 50
    assert any("arrays not read: feature_names (the test split is drawn from X and y)" in n for n in ds.notes)
    np.savez(tmp_path / "o.npz", X=X.astype(object), y=y)
    with pytest.raises(DataError, match=r"array 'X' .*save it as a numeric array"):
        load_dataset(str(tmp_path / "o.npz"))


def test_spreadsheet_habits_are_read_or_named(tmp_path, capsys):
    """From a probe of own files: Excel's ``sep=;`` first line was read as a header of the wrong width;
    ``"52,300"`` was told "a decimal comma?" (following it turns 52300 into 52.3) and ``"1,204,000"`` got
    no hint; a UTF-16 / Latin-1 file got no advice; NaN targets of an .npz were named with no count or
    advice; float16 targets printed numpy's "overflow encountered in cast"; ``hessinv spectrum
    --range=-1e308,1e308`` overflowed into numpy warnings and a NaN bin edge."""
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(40, 2)), rng.integers(0, 2, 40)
    body = "".join(f"{a:.3f};{b:.3f};{k}\n" for a, b, k in zip(X[:, 0], X[:, 1], y, strict=True))
    (tmp_path / "sep.csv").write_text("sep=;\na;b;label\n" + body)
    ds = load_dataset(str(tmp_path / "sep.csv"), standardize=False, test_fraction=0.2)
    assert ds.X_train.shape[1] == 2 and len(ds.X_train) + len(ds.X_test) == 40
    for cell in ('"52,300"', '"1,204,000"'):
        (tmp_path / "t.csv").write_text(
            f"a,b,label\n{cell},1,0\n" + "".join(f"{k},2,{k % 2}\n" for k in range(30))
        )
        with pytest.raises(DataError, match="a thousands separator or a decimal comma"):
            load_dataset(str(tmp_path / "t.csv"))
    (tmp_path / "u.csv").write_bytes("a,b,label\n1,2,0\n".encode("utf-16"))
    with pytest.raises(DataError, match="save it as UTF-8"):
        load_dataset(str(tmp_path / "u.csv"))
    yr = rng.normal(size=40)
    yr[[3, 7]] = np.nan
    np.savez(tmp_path / "nan.npz", X=X, y=yr)
    with pytest.raises(DataError, match=r"NaN or infinity \(2 examples\): drop those examples"):
        load_dataset(str(tmp_path / "nan.npz"))
    np.savez(tmp_path / "f16.npz", X=X, y=X[:, 0].astype(np.float16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_dataset(str(tmp_path / "f16.npz"))
    capsys.readouterr()
    rc = main(["spectrum", "--range=-1e308,1e308", "--out", str(tmp_path / "s")])
    assert rc == 2 and "within +-1e150" in capsys.readouterr().err
