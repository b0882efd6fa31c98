"""The sweep's dense kernels (``hessinv.linalg``: scipy's LAPACK on CPU) against torch's, in every memory
layout the sweep hands them, and a sweep whose blocks are large enough to use them against dense."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import autograd_gradient_hessian
from torch import nn

import hessinv
from hessinv import linalg


def _layout(X: torch.Tensor, fortran: bool) -> torch.Tensor:
    return X.mT.contiguous().mT if fortran else X.contiguous()


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 70),
    m=st.integers(1, 70),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    upper=st.booleans(),
    left=st.booleans(),
    unit=st.booleans(),
    fa=st.booleans(),
    fb=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_solve_triangular_matches_torch(n, m, dtype, upper, left, unit, fa, fb, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = A + (3 + n**0.5) * torch.eye(n, dtype=torch.float64)  # well conditioned triangles
    # the other triangle holds garbage: neither kernel may read it
    A = A.to(dtype)
    B = torch.randn(*((n, m) if left else (m, n)), generator=g, dtype=dtype)
    A, B = _layout(A, fa), _layout(B, fb)
    want = torch.linalg.solve_triangular(A.double(), B.double(), upper=upper, left=left, unitriangular=unit)
    # scipy's kernel and its layout handling whatever this machine's processor (on Intel processors the
    # library keeps torch's: linalg._torch_trsm_preferred)
    with mock.patch.object(linalg, "_torch_trsm_preferred", lambda: False):
        got = linalg.solve_triangular(A, B, upper=upper, left=left, unitriangular=unit)
    assert got.shape == want.shape and got.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 1e-11
    assert float((got.double() - want).norm() / want.norm()) < tol


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 90),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    fortran=st.booleans(),
    definite=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_cholesky_matches_torch_and_refuses_indefinite(n, dtype, fortran, definite, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, n, generator=g, dtype=torch.float64)
    Q = X @ X.T + n * torch.eye(n, dtype=torch.float64)
    if not definite:
        Q[n // 2, n // 2] = -1.0 - Q[n // 2].abs().sum()  # a negative diagonal entry: indefinite
    Q = _layout(Q.to(dtype), fortran)
    before = Q.clone()
    L = linalg.cholesky(Q)
    assert torch.equal(Q, before)  # the input is not modified
    if not definite:
        assert L is None
        return
    assert L is not None and L.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-13
    Lt = L.tril().double()
    assert float((Lt @ Lt.T - Q.double()).norm() / Q.double().norm()) < tol
    # only the lower triangle is meaningful, and the consumers read only that
    R = torch.randn(n, 3, generator=g, dtype=dtype)
    x = linalg.solve_triangular(L.mT, linalg.solve_triangular(L, R, upper=False), upper=True)
    assert float((Q.double() @ x.double() - R.double()).norm() / R.double().norm()) < 100 * tol


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_cholesky_of_non_finite_is_refused(bad):
    Q = 20 * torch.eye(20, dtype=torch.float64)
    Q[5, 3] = bad
    assert linalg.cholesky(Q) is None


def test_kernels_follow_torch_thread_count():
    ctl = linalg._scipy_blas()
    if ctl is None:
        pytest.skip("scipy's BLAS threads are not controllable here: torch's kernels are used")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        linalg.cholesky(20 * torch.eye(20, dtype=torch.float64))
        assert ctl[0].get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("damping", [1e-3, 10.0])
def test_sweep_with_large_blocks_against_dense(damping):
    """Stages of 8 x 8 + 8 parameters and 24-row batch activations: the pivots and the solves go
    through scipy's kernels (indefinite pivots at the small damping, Cholesky at the large one)."""
    torch.manual_seed(0)
    layers = []
    for _ in range(3):
        layers += [nn.Linear(8, 8), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(8, 3)).double()
    loss_fn = nn.CrossEntropyLoss()
    X = torch.randn(24, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (24,))
    g, Hd = autograd_gradient_hessian(model, loss_fn, X, y)
    H = hessinv.hessian(model, loss_fn, X, y)
    F = H.factor(damping)
    A = Hd + damping * torch.eye(Hd.shape[0], dtype=torch.float64)
    x = F.solve(g)
    assert float((A @ x - g).norm() / g.norm()) < 1e-10
    ev = torch.linalg.eigvalsh(A)
    assert F.inertia.negative == int((ev < 0).sum())
    assert F.logdet() == pytest.approx(float(ev.abs().log().sum()), rel=1e-9, abs=1e-9)


def test_sweeps_flush_subnormals_and_restore_the_setting():
    """Sweeps run with subnormal numbers flushed (Intel CPUs compute them ~100x slower; a float32
    factorization of a depth-64 chain took 700 ms instead of 90) and leave the thread's setting as it
    was, on or off."""
    from hessinv.linalg import _subnormals_flushed, flush_subnormals

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    H = hessinv.hessian(net, torch.nn.CrossEntropyLoss(), torch.randn(6, 3), torch.randint(0, 2, (6,)))
    assert not _subnormals_flushed()
    with flush_subnormals():
        inside = _subnormals_flushed()
    assert not _subnormals_flushed()
    if not inside:
        pytest.skip("this CPU cannot flush subnormal numbers")
    H.factor(1.0).solve(H.gradient)
    assert not _subnormals_flushed()
    torch.set_flush_denormal(True)
    try:
        H.factor(1.0)
        assert _subnormals_flushed()
    finally:
        torch.set_flush_denormal(False)


def test_one_large_head_keeps_a_sweep_of_small_stages_on_one_thread():
    """The thread rule of sweeps weighs blocks by their work: a 10-class head at batch 64 (a = 640) sent
    the 63 small stages before it to two threads (2.4x slower beside a busy process); a chain whose
    work is on large blocks keeps torch's count."""
    from hessinv.riccati import _small_sweep

    def blocks(width: int, depth: int, batch: int, classes: int) -> list:
        torch.manual_seed(0)
        layers = [m for _ in range(depth) for m in (nn.Linear(width, width), nn.Tanh())]
        layers.append(nn.Linear(width, classes))
        net = nn.Sequential(*layers).double()
        X, y = torch.randn(batch, width, dtype=torch.float64), torch.randint(0, classes, (batch,))
        return hessinv.hessian(net, nn.CrossEntropyLoss(), X, y).blocks

    assert _small_sweep(blocks(8, 32, 64, 10))
    assert not _small_sweep(blocks(8, 2, 128, 10))
    assert not _small_sweep(blocks(40, 3, 16, 10))


def test_one_thread_when_the_machine_is_busy(monkeypatch):
    """Blocks above SMALL_BLOCKS keep torch's threads on an idle machine, and run on one where other work
    holds the cores (two threads beside a busy process: a factorization 32-41 s against 1.9 s)."""
    import hessinv.linalg as hl

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for busy, inside in ((False, 2), (True, 1)):
            monkeypatch.setattr(hl, "machine_busy", lambda busy=busy: busy)
            with hl.one_thread_if(False):
                assert torch.get_num_threads() == inside
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert isinstance(hl.machine_busy(), bool)


def test_deterministic_algorithms_keep_the_thread_count_whatever_the_load(monkeypatch):
    """Under ``torch.use_deterministic_algorithms(True)`` only the problem's size decides the thread count:
    a seeded float32 run ended 6% of its travel apart between an idle and a busy machine (a probe)."""
    import hessinv.linalg as hl

    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(2)
    monkeypatch.setattr(hl, "machine_busy", lambda: True)
    try:
        torch.use_deterministic_algorithms(True)
        with hl.one_thread_if(False):
            assert torch.get_num_threads() == 2
        with hl.one_thread_if(True):  # (small work: one thread, load or not)
            assert torch.get_num_threads() == 1
    finally:
        torch.use_deterministic_algorithms(det)
        torch.set_num_threads(threads)


def test_every_entry_point_runs_on_one_thread_when_the_machine_is_busy(monkeypatch):
    """Only the sweeps and the optimizers' steps dropped to one thread on a busy machine; products,
    refinement, an operator's construction and the applications ran on torch's threads (beside a busy
    process on 2 cores: ``H @ V`` 66x, ``hessian()`` 41x, ``F.solve`` 40x slower than on one; a probe).
    The outermost call into the library decides now, and the count is restored after it."""
    import hessinv.curvature as hc
    from hessinv.influence import per_example_gradients
    from hessinv.laplace import Laplace

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    X, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    seen: list[int] = []
    model.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    apply = hc.CurvatureOperator._apply

    def recorded(self, V):
        seen.append(torch.get_num_threads())
        return apply(self, V)

    monkeypatch.setattr(hc.CurvatureOperator, "_apply", recorded)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for busy, inside in ((True, 1), (False, 2)):
            monkeypatch.setattr(linalg, "machine_busy", lambda busy=busy: busy)
            seen.clear()
            H = hessinv.hessian(model, nn.CrossEntropyLoss(), X, y)
            H @ torch.randn(H.shape[0], dtype=torch.float64)
            H.factor(1.0).solve(H.gradient)
            Laplace(model, "classification").fit(X, y)
            per_example_gradients(model, nn.CrossEntropyLoss(), X, y)
            assert seen and set(seen) == {inside}, (busy, seen)
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_a_factorization_leaves_the_process_environment_as_it_was():
    """The first factorization imported threadpoolctl (scipy's BLAS threads), whose import sets
    ``KMP_DUPLICATE_LIB_OK=True`` in ``os.environ``: Intel OpenMP's duplicate-runtime abort silenced for
    the user's later code too (a probe). A fresh process: the variable is as it was after the first
    factorization."""
    import subprocess
    import sys

    code = (
        "import os, torch, hessinv\n"
        "from torch import nn\n"
        "m = nn.Sequential(nn.Linear(20, 20), nn.Tanh(), nn.Linear(20, 3)).double()\n"
        "X, y = torch.randn(32, 20, dtype=torch.float64), torch.randint(0, 3, (32,))\n"
        "hessinv.hessian(m, nn.CrossEntropyLoss(), X, y).factor(1e-3)\n"
        "assert hessinv.linalg._scipy_blas() is not None\n"
        "print(os.environ.get('KMP_DUPLICATE_LIB_OK'))\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "KMP_DUPLICATE_LIB_OK"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "None", out.stdout
