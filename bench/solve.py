"""Side-by-side benchmark of ``(H + eps I)^{-1} g``: hessinv's backward Riccati sweep against a dense
solve, MINRES, and the published forward block-LDU order (issue 3).

Everything runs in one process on the same chain, batch and right-hand side (the gradient), in
float64 unless stated; times are best-of-N wall times after a warm-up, with one torch thread on CPU
(``--threads``; the JSON records a 1- vs 2-thread comparison). Progress goes to stderr and each
section's results to stdout as soon as they are measured.

Results go to ``--out`` (default ``runs/bench``): ``solve_<device>.json`` (rewritten after every
section, so an interrupted run keeps what it measured) and ``benchmarks.md`` rendered from it. The
repository's recorded results (``bench/results/solve_<device>.json``, and ``docs/benchmarks.md``
regenerated from every ``bench/results/solve_*.json`` so CPU and GPU figures sit side by side) are
rewritten only with ``--update-repo``.

    .venv/bin/python bench/solve.py                  # full run (~4-6 min on the 2-core CPU box)
    .venv/bin/python bench/solve.py --quick          # ~1-2 min (writes solve_<device>_quick.json)
    .venv/bin/python bench/solve.py --device cuda    # the same on a GPU (same sizes; GPU memory peaks)
    .venv/bin/python bench/solve.py --update-repo    # re-record bench/results/ and docs/benchmarks.md
    .venv/bin/python bench/solve.py --render-only --update-repo   # docs/benchmarks.md from the JSON

A ``_quick`` file is rendered only for a device without a full run.

The chain: tanh MLP, width ``w``, ``L`` Linear layers, cross-entropy over 10 classes, batch ``B``
(``bench/common.py``). ``L`` counts Linear layers.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "src"))

from common import Problem, best_of, load_average, machine_info, sync, tanh_mlp  # noqa: E402
from forward_ldu import densify, forward_ldu_solve  # noqa: E402

import hessinv  # noqa: E402

RESULTS = HERE / "results"  # the recorded results (--update-repo)
DOC = ROOT / "docs" / "benchmarks.md"
DEFAULT_OUT = Path("runs/bench")
EPS = 1.0  # damping of the main runs: H + I is positive definite on these chains (checked, reported)


# ----------------------------------------------------------------------------------------- pieces
def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def residual(H, x: torch.Tensor, g: torch.Tensor, eps: float) -> float:
    """``|g - (H + eps I) x| / |g|`` with hessinv's O(L) product, in float64."""
    return rel(H @ x + eps * x, g)


def hessinv_run(P: Problem, eps: float, device: str, repeat: int) -> dict:
    """Derivatives (building the operator), factorization, refined solve of the gradient: best times."""
    H = hessinv.hessian(P.model, P.loss_fn, P.inputs, P.targets)
    g = H.gradient
    t_der, H = best_of(lambda: hessinv.hessian(P.model, P.loss_fn, P.inputs, P.targets), repeat, 1, device)
    t_fac, F = best_of(lambda: H.factor(eps), repeat, 1, device)
    t_sol, (x, info) = best_of(lambda: F.solve(g, return_info=True), repeat, 1, device)
    # the bare solve (no residual check, no refinement): the same work as the forward LDU's solve
    t_raw, _ = best_of(lambda: F.solve(g, refine=False), repeat, 1, device)
    # the same three steps back to back, as a user would run them
    t_all, _ = best_of(
        lambda: hessinv.hessian(P.model, P.loss_fn, P.inputs, P.targets).factor(eps).solve(g),
        repeat,
        0,
        device,
    )
    return {
        "derivatives_s": t_der,
        "factor_s": t_fac,
        "solve_s": t_sol,
        "factor_solve_s": t_fac + t_sol,
        "solve_unrefined_s": t_raw,
        "factor_solve_unrefined_s": t_fac + t_raw,
        "total_s": t_all,
        "residual": info.residual,
        "refinement_steps": info.refinement_steps,
        "positive_definite": bool(F.positive_definite),
        "inertia": list(F.inertia),
        "_x": x,
        "_H": H,
    }


def flat_loss(P: Problem):
    names = [n for n, _ in P.model.named_parameters()]
    shapes = [p.shape for _, p in P.model.named_parameters()]
    x0 = torch.cat([p.detach().reshape(-1) for p in P.model.parameters()])

    def loss(x: torch.Tensor) -> torch.Tensor:
        params, i = {}, 0
        for name, s in zip(names, shapes, strict=True):
            params[name] = x[i : i + s.numel()].view(s)
            i += s.numel()
        return P.loss_fn(torch.func.functional_call(P.model, params, (P.inputs,)), P.targets)

    return loss, x0


def dense_hessian(P: Problem, device: str) -> tuple[torch.Tensor, float]:
    """``torch.func.hessian`` of the loss in the flat parameters, and its time."""
    loss, x0 = flat_loss(P)
    sync(device)
    t0 = time.perf_counter()
    Hd = torch.func.hessian(loss)(x0)
    sync(device)
    return Hd, time.perf_counter() - t0


def dense_solve(Hd: torch.Tensor, eps: float, g: torch.Tensor, device: str) -> tuple[torch.Tensor, float]:
    """``torch.linalg.solve(H + eps I, g)`` (the shift is added outside the timing) and its time."""
    A = Hd.clone()
    A.diagonal().add_(eps)
    sync(device)
    t0 = time.perf_counter()
    x = torch.linalg.solve(A, g)
    sync(device)
    return x, time.perf_counter() - t0


def ldu_run(H, eps: float, g: torch.Tensor, device: str, repeat: int) -> dict:
    sync(device)
    t0 = time.perf_counter()
    stages = densify(H)
    sync(device)
    t_dens = time.perf_counter() - t0
    t, x = best_of(lambda: forward_ldu_solve(stages, g, eps), repeat, 0, device)
    return {"densify_s": t_dens, "factor_solve_s": t, "residual": residual(H, x, g, eps), "_x": x}


class _Stop(Exception):
    pass


def minres_run(H, eps: float, g: torch.Tensor, rtol: float, budget_s: float) -> dict:
    """SciPy MINRES on ``H.as_linear_operator()`` shifted by ``eps``, counting products."""
    from scipy.sparse.linalg import LinearOperator, minres

    A = H.as_linear_operator()
    count = [0]

    def mv(v: np.ndarray) -> np.ndarray:
        count[0] += 1
        return A.matvec(v)

    op = LinearOperator(A.shape, matvec=mv, rmatvec=mv, dtype=np.float64)
    b = g.double().cpu().numpy()
    start = time.perf_counter()
    iters = [0]

    def cb(_xk: np.ndarray) -> None:
        iters[0] += 1
        if time.perf_counter() - start > budget_s:
            raise _Stop

    converged = True
    try:
        xk, info = minres(op, b, shift=-eps, rtol=rtol, maxiter=20 * A.shape[0], callback=cb)
        converged = info == 0
    except _Stop:
        xk, converged = None, False
    t = time.perf_counter() - start
    out = {"hvps": count[0], "iterations": iters[0], "time_s": t, "rtol": rtol, "converged": converged}
    if xk is not None:
        x = torch.from_numpy(xk).to(g.dtype).to(g.device)
        out["residual"] = residual(H, x, g, eps)
        out["_x"] = x
    return out


def peak_memory(w: int, B: int, L: int, eps: float, device: str) -> dict:
    """Peak memory of derivatives + factor + solve: in a fresh subprocess (RSS high-water mark) on
    CPU, or ``torch.cuda.max_memory_allocated`` on a GPU."""
    if torch.device(device).type == "cuda":
        P = tanh_mlp(w, B, L, device=device)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        hessinv.hessian(P.model, P.loss_fn, P.inputs, P.targets).factor(eps).solve(
            hessinv.hessian(P.model, P.loss_fn, P.inputs, P.targets).gradient
        )
        return {
            "peak_bytes": torch.cuda.max_memory_allocated() - base,
            "how": "torch.cuda.max_memory_allocated",
        }
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memprobe", f"{w},{B},{L},{eps}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ))
    return json.loads(out.stdout.strip().splitlines()[-1])


def _peak_rss() -> int:
    """This process's resident-set high-water mark in bytes: ``VmHWM`` (reset by ``exec``; ``ru_maxrss``
    is not: a child inherits its parent's), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _memprobe(spec: str) -> None:
    w, B, L = (int(v) for v in spec.split(",")[:3])
    eps = float(spec.split(",")[3])
    # warm up allocator and kernels on a tiny chain, then take the baseline
    Q = tanh_mlp(w, B, 2)
    hessinv.hessian(Q.model, Q.loss_fn, Q.inputs, Q.targets).factor(eps).solve(
        hessinv.hessian(Q.model, Q.loss_fn, Q.inputs, Q.targets).gradient
    )
    P = tanh_mlp(w, B, L)
    gc.collect()
    base = _peak_rss()
    H = hessinv.hessian(P.model, P.loss_fn, P.inputs, P.targets)
    H.factor(eps).solve(H.gradient)
    peak = _peak_rss()
    print(
        json.dumps({"peak_bytes": peak - base, "how": "increase of the peak RSS (VmHWM) in a fresh process"})
    )


def steady_allocator() -> str:
    """Keep freed memory mapped (glibc ``mallopt``), so that a timed run reuses the pages of the run
    before it, as in a loop of factorizations. With glibc's defaults every run of a factorization pays
    first-touch page faults for all the memory it keeps (1 page fault per 4 KiB)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-1, 1 << 30) == 1 and libc.mallopt(-3, 32 << 20) == 1  # M_TRIM_, M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        ok = False
    return "glibc mallopt(M_TRIM_THRESHOLD=1 GiB, M_MMAP_THRESHOLD=32 MiB)" if ok else "default"


def cold_run(w: int, B: int, L: int, eps: float) -> dict:
    """hessinv factor+solve and the forward LDU with glibc's default allocator (fresh process)."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--default-allocator",
        "--coldprobe",
        f"{w},{B},{L},{eps}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ))
    return json.loads(out.stdout.strip().splitlines()[-1])


def _coldprobe(spec: str) -> None:
    w, B, L = (int(v) for v in spec.split(",")[:3])
    eps = float(spec.split(",")[3])
    P = tanh_mlp(w, B, L)
    H = hessinv.hessian(P.model, P.loss_fn, P.inputs, P.targets)
    g = H.gradient
    fault0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t_h, _ = best_of(lambda: H.factor(eps).solve(g, refine=False), 5, 1)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - fault0) / 6
    stages = densify(H)
    t_l, _ = best_of(lambda: forward_ldu_solve(stages, g, eps), 2, 0)
    res = {
        "w": w,
        "B": B,
        "L": L,
        "hessinv_factor_solve_s": t_h,
        "forward_ldu_s": t_l,
        "ratio": t_l / t_h,
        "hessinv_page_faults_per_run": faults,
    }
    print(json.dumps(res))


def factor_flops(H) -> float:
    """Flops the factorization executes (dense Linear+activation stages; other stages ignored):
    the five products forming ``Qxx0, Qxz, Qzz`` from ``Sigma``, Cholesky ``p^3/3``, the triangular
    solve ``p^2 a_in`` and the Schur update ``2 p a_in^2``."""
    total = 0.0
    for l, blk in enumerate(H.blocks):
        if not blk.p or not hasattr(blk, "zt"):
            continue
        B, d, m, m1, p = blk.batch, blk.d_out, blk.d_in, blk.zt.shape[1], blk.p
        a_out, a_in = B * d, B * m
        total += 2 * m1 * B * d * a_out + 2 * p * m1 * B * d + 2 * a_out * B * d * m + 2 * m1 * B * d * B * m
        if l > 0:
            total += 2 * B * m * d * B * m + p * p * a_in + 2 * p * a_in * a_in
        total += p**3 / 3
    return total


def model_flops(H) -> float:
    """math.md §2's count per stage: ``p^3/3 + 2 p^2 a + p a^2`` (no ``Q`` products)."""
    return sum(
        b.p**3 / 3 + 2 * b.p**2 * b.batch * b.d_in + b.p * (b.batch * b.d_in) ** 2 for b in H.blocks if b.p
    )


def cholesky_rate(n: int, device: str, dtype=torch.float64) -> float:
    g = torch.Generator().manual_seed(n)
    A = torch.randn(n, n, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    S = A @ A.T + n * torch.eye(n, dtype=dtype, device=device)
    t, _ = best_of(lambda: torch.linalg.cholesky(S), 20, 3, device, budget_s=2.0)
    return n**3 / 3 / t / 1e9


def gemm_rate(n: int, device: str) -> float:
    A = torch.randn(n, n, dtype=torch.float64, device=device)
    t, _ = best_of(lambda: A @ A, 20, 3, device, budget_s=2.0)
    return 2 * n**3 / t / 1e9


def fit_slope(Ls: list[int], ts: list[float]) -> float:
    x, y = np.log(np.asarray(Ls, float)), np.log(np.asarray(ts, float))
    return float(np.polyfit(x, y, 1)[0])


def strip(d):
    if isinstance(d, dict):
        return {k: strip(v) for k, v in d.items() if not k.startswith("_")}
    if isinstance(d, list):
        return [strip(v) for v in d]
    return d


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def say(*a) -> None:
    """A result, on stdout, as soon as it is measured."""
    print(*a, flush=True)


# --------------------------------------------------------------------------------------- sections
def run_config(w: int, B: int, L: int, device: str, dense_max_n: int, repeat: int, hard: bool) -> list[dict]:
    """One chain: hessinv, dense, forward LDU, MINRES at eps = 1 (and at a hard eps, if asked)."""
    P = tanh_mlp(w, B, L, device=device)
    rows = []
    H0 = hessinv.hessian(P.model, P.loss_fn, P.inputs, P.targets)
    epss = [("eps=1", EPS)]
    if hard:
        # positive definite, condition number ~1e3: eps = -lambda_min + 1e-3 ||H||
        lam, nrm = H0.min_eigenvalue(tol=1e-10), H0.norm_estimate()
        epss.append(("eps=-lmin+1e-3|H|", -lam + 1e-3 * nrm))
    Hd, t_hess = (None, 0.0)
    if P.n <= dense_max_n:
        log(f"  {P.label}: dense Hessian (n={P.n})")
        Hd, t_hess = dense_hessian(P, device)
    for kind, eps in epss:
        log(f"  {P.label} {kind}: hessinv")
        hi = hessinv_run(P, eps, device, repeat)
        H, g, x = hi["_H"], hi["_H"].gradient, hi["_x"]
        row = {"w": w, "B": B, "L": L, "n": P.n, "eps_kind": kind, "eps": eps, "hessinv": hi}
        if Hd is not None:
            xd, t_sol = dense_solve(Hd, eps, g, device)
            dn = {
                "hessian_s": t_hess,
                "solve_s": t_sol,
                "total_s": t_hess + t_sol,
                "matrix_bytes": 8 * P.n**2,
            }
            dn["ratio"] = dn["total_s"] / hi["total_s"]
            dn["residual"] = residual(H, xd, g, eps)
            row["dense"] = dn
            hi["error_vs_dense"] = rel(x, xd)
            ref, ref_name = xd, "dense"
        else:
            ref, ref_name = x, "hessinv"
        row["reference"] = ref_name
        log(f"  {P.label} {kind}: forward LDU")
        fl = ldu_run(H, eps, g, device, 3 if repeat > 3 else 1)
        fl["error"] = rel(fl["_x"], ref)
        # like for like: one factorization and one bare solve each; both residuals are reported
        fl["ratio"] = fl["factor_solve_s"] / hi["factor_solve_unrefined_s"]
        fl["ratio_vs_checked"] = fl["factor_solve_s"] / hi["factor_solve_s"]
        row["forward_ldu"] = fl
        log(f"  {P.label} {kind}: MINRES")
        mr = minres_run(H, eps, g, rtol=max(hi["residual"], 1e-14), budget_s=120.0)
        if "_x" in mr:
            mr["error"] = rel(mr["_x"], ref)
        mr["ratio"] = mr["time_s"] / hi["factor_solve_s"]
        row["minres"] = mr
        rows.append(row)
        del H
        gc.collect()
    del Hd
    gc.collect()
    return rows


def depth_sweep(w: int, B: int, Ls: list[int], device: str) -> dict:
    out: dict = {
        "w": w,
        "B": B,
        "eps": EPS,
        "L": [],
        "n": [],
        "derivatives_s": [],
        "factor_s": [],
        "solve_s": [],
        "factor_solve_s": [],
        "positive_definite": [],
        "residual": [],
    }
    for L in Ls:
        log(f"  depth sweep L={L}")
        P = tanh_mlp(w, B, L, device=device)
        rep = 7 if L <= 128 else 4 if L <= 512 else 3
        hi = hessinv_run(P, EPS, device, rep)
        out["L"].append(L)
        out["n"].append(P.n)
        for k in ("derivatives_s", "factor_s", "solve_s", "factor_solve_s", "residual"):
            out[k].append(hi[k])
        out["positive_definite"].append(hi["positive_definite"])
        say(
            f"  L={L} n={P.n}: derivatives {_t(hi['derivatives_s'])}, factor {_t(hi['factor_s'])}, "
            f"solve {_t(hi['solve_s'])} (unrefined {_t(hi['solve_unrefined_s'])})"
        )
        del hi
        gc.collect()
    out["slope_factor_solve"] = fit_slope(out["L"], out["factor_solve_s"])
    tot = [a + b for a, b in zip(out["derivatives_s"], out["factor_solve_s"], strict=True)]
    out["slope_total"] = fit_slope(out["L"], tot)
    return out


def float32_run(w: int, B: int, L: int, device: str, repeat: int) -> dict:
    out = {"w": w, "B": B, "L": L, "eps": EPS}
    for name, dt in (("float64", torch.float64), ("float32", torch.float32)):
        P = tanh_mlp(w, B, L, dtype=dt, device=device)
        H = hessinv.hessian(P.model, P.loss_fn, P.inputs, P.targets)
        g = H.gradient
        H._residual_operator()  # build the float64 twin once (outside the timings)
        t_fac, F = best_of(lambda H=H: H.factor(EPS), repeat, 1, device)
        t_sol, (x, info) = best_of(lambda F=F, g=g: F.solve(g, return_info=True), repeat, 1, device)
        t_raw, x_raw = best_of(lambda F=F, g=g: F.solve(g, refine=False), repeat, 1, device)
        out[name] = {
            "factor_s": t_fac,
            "solve_s": t_sol,
            "factor_solve_s": t_fac + t_sol,
            "solve_unrefined_s": t_raw,
            "factor_solve_unrefined_s": t_fac + t_raw,
            "residual": info.residual,
            "refinement_steps": info.refinement_steps,
            "unrefined_solve_s": t_raw,
            "_x": x.double(),
            "_x_raw": x_raw.double(),
            "_g": g.double(),
        }
    ref = out["float64"]["_x"]
    P64 = tanh_mlp(w, B, L, device=device)
    H64 = hessinv.hessian(P64.model, P64.loss_fn, P64.inputs, P64.targets)
    for name in ("float64", "float32"):
        o = out[name]
        o["error_vs_float64"] = rel(o["_x"], ref)
        o["unrefined_residual"] = residual(H64, o["_x_raw"], H64.gradient, EPS)
    out["speedup_factor"] = out["float64"]["factor_s"] / out["float32"]["factor_s"]
    out["speedup_factor_solve"] = out["float64"]["factor_solve_s"] / out["float32"]["factor_solve_s"]
    return out


def flops_run(w: int, B: int, L: int, device: str, repeat: int) -> dict:
    P = tanh_mlp(w, B, L, device=device)
    H = hessinv.hessian(P.model, P.loss_fn, P.inputs, P.targets)
    t, _ = best_of(lambda: H.factor(EPS), repeat, 1, device)
    blk = H.blocks[1]
    p, a = blk.p, blk.batch * blk.d_in
    fl, mf = factor_flops(H), model_flops(H)
    return {
        "w": w,
        "B": B,
        "L": L,
        "p": p,
        "a": a,
        "factor_s": t,
        "flops": fl,
        "gflops": fl / t / 1e9,
        "model_flops": mf,
        "model_gflops": mf / t / 1e9,
        "cholesky_gflops_p": cholesky_rate(p, device),
        "cholesky_gflops_p_plus_a": cholesky_rate(p + a, device),
        "gemm_gflops_p": gemm_rate(p, device),
    }


def lowrank_run(configs: list[tuple[int, int, int]], device: str, repeat: int) -> list[dict]:
    """The Woodbury pivot (``LowRankPivot``) against the dense ``p x p`` pivot, forced either way."""
    from hessinv.stages.dense import DenseLayerBlocks

    default = DenseLayerBlocks.LOWRANK_RATIO
    rows = []
    try:
        for w, B, L in configs:
            log(f"  low-rank pivot w={w} B={B} L={L}")
            P = tanh_mlp(w, B, L, device=device)
            H = hessinv.hessian(P.model, P.loss_fn, P.inputs, P.targets)
            g = H.gradient
            m1 = w + 1
            row: dict = {
                "w": w,
                "B": B,
                "L": L,
                "n": P.n,
                "p": w * m1,
                "r": B * w,
                "m1_over_B": m1 / B,
                "default": "low-rank" if m1 >= default * B else "dense",
            }
            xs = {}
            for name, ratio in (("dense", math.inf), ("low-rank", 0.0)):
                DenseLayerBlocks.LOWRANK_RATIO = ratio
                rep = repeat if w * m1 <= 1100 else 1
                t, F = best_of(lambda H=H: H.factor(EPS), rep, 1 if rep > 1 else 0, device)
                x = F.solve(g, refine=False)
                xs[name] = x
                row[name] = {
                    "factor_s": t,
                    "residual_unrefined": residual(H, x, g, EPS),
                    "inertia": list(F.inertia),
                }
            row["speedup"] = row["dense"]["factor_s"] / row["low-rank"]["factor_s"]
            row["difference"] = rel(xs["low-rank"], xs["dense"])
            rows.append(row)
    finally:
        DenseLayerBlocks.LOWRANK_RATIO = default
    return rows


def threads_run(w: int, B: int, L: int) -> dict:
    """hessinv factor+solve with 1 and 2 torch threads (CPU): small blocks gain little from threads,
    and on a shared machine a busy core stalls every parallel region."""
    out: dict = {"w": w, "B": B, "L": L, "load_average": load_average()}
    before = torch.get_num_threads()
    P = tanh_mlp(w, B, L)
    H = hessinv.hessian(P.model, P.loss_fn, P.inputs, P.targets)
    g = H.gradient
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            t, _ = best_of(lambda: H.factor(EPS).solve(g), 3, 1, budget_s=20.0)
            out[f"threads_{n}_s"] = t
    finally:
        torch.set_num_threads(before)
    return out


def check_targets(res: dict) -> list[dict]:
    t = []
    by = {(r["w"], r["B"], r["L"], r["eps_kind"]): r for r in res["configs"]}
    r = by.get((16, 16, 24, "eps=1"))
    if r and "dense" in r:
        ok = r["dense"]["ratio"] >= 30 and r["hessinv"]["error_vs_dense"] < 1e-8
        t.append(
            {
                "target": ">= 30x faster than dense at (16,16,24), rel. error < 1e-8",
                "figure": f"{r['dense']['ratio']:.0f}x, error {r['hessinv']['error_vs_dense']:.1e}",
                "met": ok,
            }
        )
    r = by.get((16, 16, 64, "eps=1"))
    if r:
        x = r["forward_ldu"]["ratio"]
        t.append(
            {
                "target": ">= 10x faster than forward block LDU at (16,16,64)",
                "figure": f"{x:.1f}x",
                "met": x >= 10,
            }
        )
    ds = res.get("depth_sweep")
    if ds:
        s = ds["slope_factor_solve"]
        t.append(
            {
                "target": f"slope 1.00 +- 0.15, L={ds['L'][0]}..{ds['L'][-1]}",
                "figure": f"{s:.3f}",
                "met": abs(s - 1) <= 0.15,
            }
        )
        if 1024 in ds["L"]:
            i = ds["L"].index(1024)
            tot = ds["derivatives_s"][i] + ds["factor_solve_s"][i]
            t.append(
                {
                    "target": "L=1024 factor+solve < 20 s",
                    "figure": f"{ds['factor_solve_s'][i]:.2f} s ({tot:.2f} s with derivatives)",
                    "met": ds["factor_solve_s"][i] < 20,
                }
            )
    f = res.get("flops")
    if f:
        frac = f["gflops"] / f["cholesky_gflops_p"]
        t.append(
            {
                "target": "factorization flop rate >= 50% of dense Cholesky (block size p)",
                "figure": f"{f['gflops']:.1f} vs {f['cholesky_gflops_p']:.1f} GFlop/s ({100 * frac:.0f}%)",
                "met": frac >= 0.5,
            }
        )
    m = [r for r in res["configs"] if (r["w"], r["B"], r["L"]) == (16, 16, 64) and "memory" in r["hessinv"]]
    if m:
        b = m[0]["hessinv"]["memory"]["peak_bytes"]
        t.append(
            {"target": "peak memory at (16,16,64) < 1 GB", "figure": f"{b / 2**20:.0f} MiB", "met": b < 2**30}
        )
    return t


# ---------------------------------------------------------------------------------------- markdown
def _t(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 10:
        return f"{s:.1f} s"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} us"


def _e(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1e}"


def render(results: list[dict]) -> str:
    lines = [
        "# Benchmarks: solving with the Hessian of a deep chain",
        "",
        "Generated by `bench/solve.py --update-repo` (`make bench-record`) from "
        "`bench/results/solve_*.json`; do not edit. To reproduce a figure: `bench/solve.py` (`make bench`, "
        "results in `runs/bench/`; `--quick` for the smaller run).",
        "",
        "Problem: `(H + eps I) x = g` with `H` the exact Hessian of the mean cross-entropy of a tanh",
        "MLP (input width `w`, `L` Linear layers of width `w`, the last to 10 classes), batch `B`, random",
        "seeded data, `g` the gradient, float64. All methods run in one process on the same chain and",
        "right-hand side.",
        "",
        "- **hessinv**: `hessinv.hessian(...)` (derivatives: forward + backward pass and per-stage blocks), "
        "`.factor(eps)` (backward Riccati sweep), `.solve(g)` (sweeps + float64 iterative refinement); "
        "*total* = the three back to back.",
        "- **dense**: `torch.func.hessian` of the loss in the flat parameters, then `torch.linalg.solve` "
        "(only where the `n x n` matrix is affordable).",
        "- **forward LDU**: the published order -- the lifted block-tridiagonal KKT system "
        "(unknowns `x_l, t_l, lambda_l` per stage) eliminated input -> loss by block LDU with dense LU "
        "inside each block (`bench/forward_ldu.py`); its blocks are densified from hessinv's per-stage "
        "blocks "
        "(densify time listed separately, not in the ratio). Its error: with LU pivoting over each "
        "whole stage block it is as accurate as the backward sweep (below). The breakdown the design "
        "notes report (w=4, B=4, L=16, eps=1: cond 6.8, error 1.1e-3) comes from eliminating a stage's "
        "unknowns in the fixed order x, lambda, t without pivoting across them "
        "(`forward_ldu_solve(..., pivot=False)` reproduces it exactly): the lambda pivot is a Gram "
        "matrix of the stage Jacobians that eps does not shift, singular when B d_out > p or a ReLU unit "
        "is dead, and losing rank geometrically with depth (every L=64 tanh chain tried fails).",
        "- **MINRES**: `scipy.sparse.linalg.minres` on `H.as_linear_operator()` (shift `-eps`), "
        "stopped at hessinv's achieved relative residual (floored at 1e-14); HVPs counted.",
        "- hessinv's solve refines until the residual stops improving (about 1e-14 at the hard eps, one "
        "extra sweep); the forward LDU is not refined. *LDU / hessinv* compares like with like: one "
        "factorization and one bare solve each (hessinv `solve(g, refine=False)`: no residual check, no "
        "refinement); both errors are measured outside the timings. The checked solve is in the "
        "*factor / solve* column (ratio against it in the JSON, `ratio_vs_checked`).",
        "- *error*: relative 2-norm error against the dense solve where it exists, else against hessinv's "
        "refined solution; *residual*: `|g - (H + eps I) x| / |g|` with the O(L) product.",
        "- How hessinv gets there (math.md §2-3): per Linear+activation stage the Riccati blocks come from "
        "one `a x a` matrix `M = diag(s') Sigma diag(s') + diag(b s'')` by five matrix products (no `Jx`); "
        "the pivot is factored by Cholesky, the Schur update is `Qzz - W^T W` with `W = L^{-1} Qxz` "
        "(one triangular solve; half of the product, mirrored); when the inputs are wider than the batch "
        "(`w + 1 >= 1.5 B`) the pivot is factored through its rank-`B d` part (Woodbury); subnormal "
        "numbers are kept out of deep chains. Hessian-vector products use fused per-stage steps.",
        "- eps = 1 makes `H + eps I` positive definite with condition number ~3 on these chains (`H` is very "
        "indefinite: about half its eigenvalues are negative, `lambda_min ~ -0.4 |H|`). The *hard* rows use "
        "`eps = -lambda_min + 1e-3 |H|` (condition number ~1e3), with `lambda_min` from hessinv's bisection.",
        "",
    ]
    for res in results:
        lines += _render_one(res)
    return "\n".join(lines) + "\n"


def _render_one(res: dict) -> list[str]:
    m = res["machine"]
    dev = m["device"] if m["device"] == "cpu" else f"{m['device']} ({m.get('gpu', '')})"
    head = f"## {dev}: {m['processor']}, {m['cpu_count']} cores, {m['torch_threads']} torch threads"
    L = [
        head,
        "",
        f"Run {m['date']}, torch {m['torch']}, python {m['python']}, mode `{res['settings']['mode']}`, "
        f"allocator: {m.get('allocator', 'default')}. "
        f"Load average (1/5/15 min) at start {m['load_average_start']}, at end {m.get('load_average_end')} "
        "(other processes share this machine).",
        "",
        "### Targets",
        "",
        "| target | figure | met |",
        "|---|---|---|",
    ]
    for t in res.get("targets", []):
        L.append(f"| {t['target']} | {t['figure']} | {'yes' if t['met'] else '**no**'} |")
    L += [
        "",
        "### Same chain, same right-hand side",
        "",
        "| w, B, L | n | eps | hessinv total | derivatives / factor / solve | peak mem "
        "| dense (hessian + solve) | dense / hessinv | error vs dense | fwd LDU factor+solve "
        "| LDU / hessinv (factor + bare solve) | LDU error | MINRES HVPs | MINRES time "
        "| MINRES / hessinv (factor+solve) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["configs"]:
        h, d, f, mr = r["hessinv"], r.get("dense"), r["forward_ldu"], r["minres"]
        mem = h.get("memory", {}).get("peak_bytes")
        eps = "1" if r["eps_kind"] == "eps=1" else f"{r['eps']:.3g} (hard)"
        pd = "" if h["positive_definite"] else " (indef.)"
        dense = f"{_t(d['total_s'])} ({_t(d['hessian_s'])} + {_t(d['solve_s'])})" if d else "-"
        dratio = f"**{d['ratio']:.0f}x**" if d else "-"
        mems = "-" if mem is None else f"{mem / 2**20:.0f} MiB"
        mrs = f"{mr['hvps']}" + ("" if mr["converged"] else " (not converged)")
        L.append(
            f"| {r['w']}, {r['B']}, {r['L']} | {r['n']} | {eps}{pd} | **{_t(h['total_s'])}** "
            f"| {_t(h['derivatives_s'])} / {_t(h['factor_s'])} / {_t(h['solve_s'])} "
            f"| {mems} | {dense} "
            f"| {dratio} | {_e(h.get('error_vs_dense'))} "
            f"| {_t(f['factor_solve_s'])} | **{f['ratio']:.1f}x** | {_e(f['error'])} "
            f"| {mrs} | {_t(mr['time_s'])} | {mr['ratio']:.1f}x |"
        )
    L += [
        "",
        "Residuals `|g - (H + eps I) x| / |g|`: "
        + "; ".join(
            f"L={r['L']} {'' if r['eps_kind'] == 'eps=1' else 'hard '}hessinv {_e(r['hessinv']['residual'])} "
            f"({r['hessinv']['refinement_steps']} refinement steps), "
            f"forward LDU {_e(r['forward_ldu']['residual'])}, "
            f"MINRES {_e(r['minres'].get('residual'))}"
            for r in res["configs"]
        )
        + ". The forward LDU's densify step took "
        + ", ".join(
            f"{_t(r['forward_ldu']['densify_s'])} (L={r['L']})"
            for r in res["configs"]
            if r["eps_kind"] == "eps=1"
        )
        + ".",
        "",
    ]
    ds = res.get("depth_sweep")
    if ds:
        L += [
            f"### Depth sweep (w={ds['w']}, B={ds['B']}, eps={ds['eps']:g})",
            "",
            f"Fitted slope of log(factor+solve time) vs log(L): **{ds['slope_factor_solve']:.3f}** "
            f"(with derivatives: {ds['slope_total']:.3f}).",
            "",
            "| L | n | derivatives | factor | solve | factor+solve | per layer | PD | residual |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for i, Lv in enumerate(ds["L"]):
            L.append(
                f"| {Lv} | {ds['n'][i]} | {_t(ds['derivatives_s'][i])} | {_t(ds['factor_s'][i])} "
                f"| {_t(ds['solve_s'][i])} | **{_t(ds['factor_solve_s'][i])}** "
                f"| {_t(ds['factor_solve_s'][i] / Lv)} | {'yes' if ds['positive_definite'][i] else 'no'} "
                f"| {_e(ds['residual'][i])} |"
            )
        L.append("")
    f32 = res.get("float32")
    if f32:
        a, b = f32["float64"], f32["float32"]
        L += [
            f"### float32 factorization + float64 refinement vs float64 (w={f32['w']}, B={f32['B']}, "
            f"L={f32['L']}, eps={f32['eps']:g})",
            "",
            "| | factor | solve (refined) | factor+solve | unrefined residual | refined residual | steps "
            "| error vs float64 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, o in (("float64", a), ("float32", b)):
            L.append(
                f"| {name} | {_t(o['factor_s'])} | {_t(o['solve_s'])} | {_t(o['factor_solve_s'])} "
                f"| {_e(o['unrefined_residual'])} | {_e(o['residual'])} | {o['refinement_steps']} "
                f"| {_e(o['error_vs_float64'])} |"
            )
        L += [
            "",
            f"float32 factor speed-up {f32['speedup_factor']:.2f}x, factor+solve "
            f"{f32['speedup_factor_solve']:.2f}x (the refined float32 solve evaluates its residuals with a "
            "float64 copy of the chain).",
            "",
        ]
    fl = res.get("flops")
    if fl:
        L += [
            f"### Flop rate of the factorization (w={fl['w']}, B={fl['B']}, L={fl['L']}: p={fl['p']}, "
            f"a={fl['a']} per stage)",
            "",
            "| | GFlop/s |",
            "|---|---|",
            f"| hessinv factorization, executed flops ({fl['flops'] / 1e9:.2f} GFlop "
            f"in {_t(fl['factor_s'])}) "
            f"| **{fl['gflops']:.1f}** |",
            f"| hessinv factorization, math.md count p^3/3 + 2p^2a + pa^2 "
            f"({fl['model_flops'] / 1e9:.2f} GFlop) "
            f"| {fl['model_gflops']:.1f} |",
            f"| `torch.linalg.cholesky`, dense SPD n = p = {fl['p']} | {fl['cholesky_gflops_p']:.1f} |",
            f"| `torch.linalg.cholesky`, dense SPD n = p + a = {fl['p'] + fl['a']} "
            f"| {fl['cholesky_gflops_p_plus_a']:.1f} |",
            f"| matrix product n = p = {fl['p']} (reference) | {fl['gemm_gflops_p']:.1f} |",
            "",
            "Executed flops per stage: the five products that form `Qxx0, Qxz, Qzz` from `Sigma`, "
            "Cholesky `p^3/3`, the triangular solve `p^2 a` and the Schur update `2 p a^2`.",
            "",
        ]
    cold = res.get("cold")
    if cold:
        L += [
            "Allocator: the timings keep freed memory mapped (`mallopt`), so a repeated run reuses the "
            "pages of the one before (the steady state of a loop of factorizations). With glibc's defaults "
            "each run faults in all the memory it keeps (4 KiB at a time; "
            f"{cold['hessinv_page_faults_per_run']:.0f} page faults per factor+solve at "
            f"w={cold['w']}, B={cold['B']}, L={cold['L']}): hessinv "
            f"factor+solve {_t(cold['hessinv_factor_solve_s'])}, forward LDU {_t(cold['forward_ldu_s'])}, "
            f"ratio **{cold['ratio']:.1f}x** (fresh process, same machine).",
            "",
        ]
    th = res.get("threads")
    if th:
        L += [
            f"Threads (w={th['w']}, B={th['B']}, L={th['L']}, factor+solve): 1 thread "
            f"{_t(th['threads_1_s'])}, 2 threads {_t(th['threads_2_s'])} (load average "
            f"{th['load_average']}). All other figures use one thread: the per-stage blocks (a few hundred "
            "rows) gain little from a second one, and while another process holds a core every parallel "
            "region waits for it (on this shared machine 2 threads were up to 50x slower during "
            "development). The baselines run with the same setting.",
            "",
        ]
    lr = res.get("lowrank")
    if lr:
        L += [
            "### Wide inputs (p > B d): the low-rank (Woodbury) pivot",
            "",
            "A Linear+activation stage has `Qxx = eps I + (Qz (x) I) A (Qz (x) I)^T` with `A` of size "
            "`r = B d` (`Z^T = Qz Rz`, math.md §3), so the sweep can factor `eps I_r + A` instead of the "
            "`p x p` pivot (`hessinv.riccati.LowRankPivot`). hessinv uses it when `m1 = w + 1 >= 1.5 B`. "
            f"Factorization times with the pivot forced either way (eps={res['settings']['eps']:g}); "
            "residuals of the unrefined solve.",
            "",
            "| w, B, L | p | r = B d | m1 / B | default | dense pivot | low-rank pivot | speed-up "
            "| residual dense / low-rank | solutions differ by | same inertia |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in lr:
            d, q = r["dense"], r["low-rank"]
            L.append(
                f"| {r['w']}, {r['B']}, {r['L']} | {r['p']} | {r['r']} | {r['m1_over_B']:.2f} "
                f"| {r['default']} "
                f"| {_t(d['factor_s'])} | {_t(q['factor_s'])} | **{r['speedup']:.1f}x** "
                f"| {_e(d['residual_unrefined'])} / {_e(q['residual_unrefined'])} | {_e(r['difference'])} "
                f"| {'yes' if d['inertia'] == q['inertia'] else '**no**'} |"
            )
        L.append("")
    return L


# ---------------------------------------------------------------------------------------------- main
def result_files() -> list[Path]:
    """``bench/results/solve_<device>.json``, CPU first; a ``_quick`` file only where no full one exists."""
    files = sorted(RESULTS.glob("solve_*.json"))
    full = {f.stem for f in files if not f.stem.endswith("_quick")}
    keep = [f for f in files if not (f.stem.endswith("_quick") and f.stem[: -len("_quick")] in full)]
    return sorted(keep, key=lambda f: (not f.stem.startswith("solve_cpu"), f.stem))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="a ~1-2 minute run with fewer sizes (default: the full run)"
    )
    ap.add_argument(
        "--device", default="cpu", help="cpu | cuda | cuda:N | auto (cuda if available) (default: cpu)"
    )
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: 1 on CPU, torch's choice on CUDA)"
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"output directory for solve_<device>[_quick].json and benchmarks.md (default: {DEFAULT_OUT})",
    )
    ap.add_argument(
        "--update-repo",
        action="store_true",
        help="write the recorded results instead: bench/results/solve_<device>[_quick].json and "
        "docs/benchmarks.md from every bench/results/solve_*.json (default: off)",
    )
    ap.add_argument(
        "--json",
        type=Path,
        default=None,
        help="JSON output file (default: <out>/solve_<device>[_quick].json)",
    )
    ap.add_argument(
        "--md", type=Path, default=None, help="markdown output file (default: <out>/benchmarks.md)"
    )
    ap.add_argument("--no-md", action="store_true", help="do not render the markdown (default: render it)")
    ap.add_argument(
        "--render-only",
        action="store_true",
        help="measure nothing; render the markdown from bench/results/ (default: off)",
    )
    ap.add_argument(
        "--default-allocator",
        action="store_true",
        help="do not call mallopt (see docs/benchmarks.md) (default: keep freed memory mapped)",
    )
    ap.add_argument("--memprobe", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--coldprobe", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    from hessinv.cli.choices import UserError, resolve_device

    try:
        args.device = resolve_device(args.device)
    except UserError as e:  # e.g. --device cuda without CUDA: one line, exit status 2
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.threads or torch.device(args.device).type == "cpu":
        torch.set_num_threads(args.threads or 1)
    if args.memprobe:
        _memprobe(args.memprobe)
        return
    if args.coldprobe:
        _coldprobe(args.coldprobe)
        return
    results_dir = RESULTS if args.update_repo else args.out
    if args.md is None:
        args.md = DOC if args.update_repo else args.out / "benchmarks.md"
    if args.json is None:
        quick = "_quick" if args.quick else ""
        args.json = results_dir / f"solve_{torch.device(args.device).type}{quick}.json"
    elif args.render_only and not args.json.exists():  # (it rendered the recorded results instead, exit 0)
        raise SystemExit(f"--json {args.json}: no such file to render")
    # an output path that cannot be written: one line and exit status 2 (hessinv bench), not an errno trace
    from hessinv.cli.choices import UserError, output_directory

    try:
        if not args.render_only:
            output_directory(args.json.parent)
        if not args.no_md:
            output_directory(args.md.parent)
    except UserError as e:
        raise SystemExit(str(e)) from None
    if not args.render_only:
        args.allocator = "default" if args.default_allocator else steady_allocator()
        run(args)
    if not args.no_md:
        if args.update_repo or args.render_only:
            files = result_files()
            if args.json.exists() and args.json.resolve() not in [f.resolve() for f in files]:
                files.append(args.json)
        else:
            files = [args.json]
        try:  # (a file that is not a record of this benchmark: one line, exit status 2, not a traceback)
            results = [json.loads(f.read_text()) for f in files]
            text = render(results)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            what = f"{type(e).__name__}: {e}" if not isinstance(e, KeyError) else f"no field {e}"
            raise SystemExit(f"--json {args.json}: not a record of bench/solve.py ({what})") from None
        args.md.parent.mkdir(parents=True, exist_ok=True)
        rob = ROOT / "bench" / "results" / "robustness.json"
        if rob.exists():  # the robustness grid of bench/robustness.py (issue 11), rendered by it
            from robustness import render as render_robustness

            text += "\n" + render_robustness(json.loads(rob.read_text())) + "\n"
        args.md.write_text(text)
        log(f"wrote {args.md}")


def _say_config(r: dict) -> None:
    h, d, f, mr = r["hessinv"], r.get("dense"), r["forward_ldu"], r["minres"]
    line = (
        f"w={r['w']} B={r['B']} L={r['L']} n={r['n']} {r['eps_kind']}: hessinv total {_t(h['total_s'])} "
        f"(derivatives {_t(h['derivatives_s'])}, factor {_t(h['factor_s'])}, solve {_t(h['solve_s'])}), "
        f"residual {_e(h['residual'])}"
    )
    if d:
        line += (
            f"; dense {_t(d['total_s'])} ({d['ratio']:.0f}x), error vs dense {_e(h.get('error_vs_dense'))}"
        )
    line += f"; forward LDU {_t(f['factor_solve_s'])} ({f['ratio']:.1f}x)"
    line += f"; MINRES {mr['hvps']} HVPs {_t(mr['time_s'])}" + ("" if mr["converged"] else " (not converged)")
    say(line)


def run(args) -> None:
    device = args.device
    quick = args.quick
    cuda = torch.device(device).type == "cuda"
    repeat = 3 if quick else 9
    res: dict = {
        "machine": machine_info(device),
        "settings": {"mode": "quick" if quick else "full", "eps": EPS, "repeat": repeat},
    }
    res["machine"]["allocator"] = args.allocator
    out = args.json
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every section: an interrupted run keeps what it measured
        out.write_text(json.dumps(strip(res), indent=1))

    log(f"machine: {res['machine']}")
    log(f"results: {out} (rewritten after every section)")
    configs = [(16, 16, 8), (16, 16, 24), (16, 16, 64)] if not quick else [(16, 16, 8), (16, 16, 64)]
    dense_max_n = 7000 if not quick else 2500
    res["configs"] = []
    for w, B, Lc in configs:
        log(f"config w={w} B={B} L={Lc}")
        rows = run_config(w, B, Lc, device, dense_max_n, repeat, hard=not quick)
        mem = peak_memory(w, B, Lc, EPS, device)
        rows[0]["hessinv"]["memory"] = mem
        res["configs"] += rows
        for r in rows:
            _say_config(r)
        say(f"w={w} B={B} L={Lc}: peak memory {mem['peak_bytes'] / 2**20:.0f} MiB ({mem['how']})")
        save()
    Ls = [16, 32, 64, 128, 256, 512, 1024] if not quick else [16, 32, 64, 128, 256]
    log("depth sweep")
    ds = res["depth_sweep"] = depth_sweep(16, 16, Ls, device)
    say(
        "depth sweep w=16 B=16: factor+solve "
        + ", ".join(f"L={L} {_t(t)}" for L, t in zip(ds["L"], ds["factor_solve_s"], strict=True))
        + f"; slope {ds['slope_factor_solve']:.3f}"
    )
    save()
    log("float32")
    f32 = res["float32"] = float32_run(16, 16, 64, device, repeat)
    say(
        f"float32 factor at w=16 B=16 L=64: {f32['speedup_factor']:.2f}x faster than float64, refined "
        f"residual {_e(f32['float32']['residual'])} in {f32['float32']['refinement_steps']} steps"
    )
    save()
    log("flops")
    fl = res["flops"] = flops_run(16, 16, 64, device, repeat)
    say(
        f"factorization {fl['gflops']:.1f} GFlop/s, "
        f"dense Cholesky (n=p) {fl['cholesky_gflops_p']:.1f} GFlop/s"
    )
    save()
    if not cuda and (os.cpu_count() or 1) >= 2:
        log("threads")
        th = res["threads"] = threads_run(16, 16, 64)
        say(f"threads: factor+solve 1 thread {_t(th['threads_1_s'])}, 2 threads {_t(th['threads_2_s'])}")
        save()
    if not cuda and args.allocator != "default":
        log("default allocator")
        cold = res["cold"] = cold_run(16, 16, 64, EPS)
        say(f"default allocator: forward LDU / hessinv {cold['ratio']:.1f}x")
        save()
    log("low-rank pivot")
    lr = [(16, 4, 16), (32, 8, 8)] if quick else [(16, 16, 16), (16, 4, 16), (32, 8, 16), (64, 16, 4)]
    res["lowrank"] = lowrank_run(lr, device, repeat)
    for r in res["lowrank"]:
        say(
            f"low-rank pivot w={r['w']} B={r['B']} L={r['L']} (default {r['default']}): dense pivot "
            f"{_t(r['dense']['factor_s'])}, low-rank {_t(r['low-rank']['factor_s'])} ({r['speedup']:.1f}x)"
        )
    res["machine"]["load_average_end"] = load_average()
    if cuda:
        res["machine"]["note"] = "MINRES runs on the CPU (scipy) with each product on the GPU"
    res["targets"] = check_targets(res)
    save()
    log(f"wrote {out}")
    for t in res["targets"]:
        say(f"  {'MET ' if t['met'] else 'MISS'} {t['target']}: {t['figure']}")


if __name__ == "__main__":
    main()
