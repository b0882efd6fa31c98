"""Fixes of a new user's findings on the command line: interrupts (Ctrl-C with --nproc, SIGTERM) keep
the summary; the full-batch note only where it is true; a class the random split puts in the test split
only; install hints that work from a checkout; where a NaN is; the skipped header named; the README's
``.grad`` warning; ``--out`` a file, ``--data -d9.csv``, optimizers not run in the table."""

from __future__ import annotations

from pathlib import Path

import hessinv
from hessinv.cli import main

ROOT = Path(__file__).resolve().parents[1]
SRC = Path(hessinv.__file__).resolve().parents[1]  # (the hessinv these tests import: the subprocesses too)
SMALL = ["--depth", "3", "--width", "4", "--no-tune"]


def _run(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["train", *args])
    out, err = capsys.readouterr()
    return rc, out, err


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
