"""Smoke test of ``bench/train_suite.py --quick``: one tiny task, two optimizers, a failing variant."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("heavyball")
pytest.importorskip("pytorch_optimizer")

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "train_suite.py"


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("train_suite", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is made
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


def test_quick_run_writes_record_table_and_plot(suite, tmp_path, monkeypatch):
    # a hessinv variant whose construction fails must be recorded, not stop the suite
    monkeypatch.setitem(suite.HESSINV_VARIANTS, "hessinv-bogus", {"no_such_option": 1})
    args = ["--quick", "--budget", "0.4", "--tasks", "digits", "--optimizers", "adam,soap,hessinv-bogus"]
    assert suite.main([*args, "--out", str(tmp_path), "--name", "smoke"]) == 0

    rec = json.loads((tmp_path / "smoke.json").read_text())
    runs = {r["optimizer"]: r for r in rec["runs"]}
    assert set(runs) == {"adam", "soap", "hessinv-bogus"}
    for name in ("adam", "soap"):
        r = runs[name]
        assert r["status"] == "ok", r["message"]
        assert r["steps"] > 0 and 0.4 <= r["train_time_s"] < 5
        assert r["curve"][0][0] == 0.0 and r["curve"][-1][2] == r["steps"]
        assert 0.0 <= r["best_metric"] <= 1.0 and r["cpu_time_s"] > 0
        assert r["lr"] in suite.LR_GRIDS[name]  # --quick: the middle point of the grid only
    bad = runs["hessinv-bogus"]
    assert bad["status"] == "failed" and "no_such_option" in bad["message"]
    assert set(rec["summary"]["digits"]) == {"adam", "soap", "hessinv-bogus"}
    assert set(rec["summary"]["digits"]["adam"]["targets"]) == {"0.8", "0.9"}

    md = (tmp_path / "smoke.md").read_text()
    assert "| adam | 0.003 |" in md and "| soap |" in md and "failed" in md
    assert (tmp_path / "smoke_digits.png").stat().st_size > 1000


def test_unknown_optimizer_is_a_usage_error(suite, tmp_path):
    with pytest.raises(SystemExit) as e:
        suite.main(["--quick", "--optimizers", "nope", "--out", str(tmp_path)])
    assert e.value.code == 2
