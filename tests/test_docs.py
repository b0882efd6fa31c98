"""The documentation's code runs as written: README's examples in order (one namespace, as a reader
would paste them) and docs/applications.md's API sketch as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_readme_examples_run(capsys):
    code = blocks(ROOT / "README.md")
    assert len(code) >= 3
    torch.manual_seed(0)
    ns: dict = {}
    for block in code:
        exec(compile(block, "README.md", "exec"), ns)  # noqa: S102 - our own documentation
    out = capsys.readouterr().out
    assert "Inertia(" in out and ("True" in out or "False" in out)


def test_applications_sketch_runs():
    """As written, with its own data (it assumed ``net``, ``X``, ... and ``import hessinv`` from the
    reader before: a new user's NameError)."""
    (code,) = blocks(ROOT / "docs" / "applications.md")
    ns: dict = {}
    exec(compile(code, "docs/applications.md", "exec"), ns)  # noqa: S102
    assert ns["la"].log_marginal_likelihood() < 0
