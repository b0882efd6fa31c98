import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest
from hypothesis import HealthCheck, settings

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# CI: the same pseudo-random search every run (reproducible); developers: a fresh search each run.
settings.register_profile("ci", derandomize=True, print_blob=True, **_common)
settings.register_profile("dev", **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(autouse=True)
def _sweep_counts(monkeypatch):
    """Spectrum counts by Riccati sweeps, also where one dense eigvalsh would be cheaper (the small chains of
    the tests): the sweep's counts are what the tests check; ``test_spectrum_fixes`` turns the dense
    shortcut back on where it tests it."""
    import hessinv.curvature

    monkeypatch.setattr(hessinv.curvature, "DENSE_COUNTS", False)


@pytest.fixture
def interrupt_at(monkeypatch):
    """``interrupt_at(n)``: the first-order baselines' ``n``-th step raises ``KeyboardInterrupt`` (a Ctrl-C
    in the middle of a run)."""
    from hessinv.cli import baselines

    def arm(n: int) -> None:
        real_step, calls = baselines.FirstOrder.step, {"n": 0}

        def step(self, inputs, targets):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt
            return real_step(self, inputs, targets)

        monkeypatch.setattr(baselines.FirstOrder, "step", step)

    return arm
