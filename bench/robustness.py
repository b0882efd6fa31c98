# ruff: noqa: E501
"""Robustness grid of the solver (issue 11): no refusal of a nonsingular system, accuracy, speed.

Bias-free tanh chains (``L - 1`` hidden ``Linear(w, w, bias=False) + Tanh``, a last ``Linear(w, 10)``,
cross-entropy, batch ``B``) with kaiming-normal (tanh gain) or PyTorch's default init; float64 and
float32; ``eps`` in {1e-3, 1}. Per case: time (derivatives, factor, refined solve; end to end as a new operator's first solve),
relative residual ``|g - (H + eps I) x| / |g|`` with the float64 O(L) product, the unrefined residual,
error against a dense solve and inertia against dense ``eigvalsh`` (where ``n <= DENSE_MAX_N``),
perturbed pivots, and refusals (``SingularError``). Plus, per shape, the factorization time of an
indefinite ``H + eps I`` (eps=1e-3) beside a positive definite one (eps = 1.1 ||H||), and lambda_min:
``min_eigenvalue`` vs ``eigsh`` on the linear operator vs the bisection it replaces (smallest shapes).

Run under the shared lock, one thread:
``flock /tmp/hessinv-bench.lock env OMP_NUM_THREADS=1 PYTHONPATH=$PWD/src python bench/robustness.py``
Writes ``bench/results/robustness.json`` and prints markdown for ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from common import best_of, load_average, machine_info  # noqa: E402

import hessinv  # noqa: E402

SHAPES = [(16, 16, 16), (16, 16, 32), (16, 16, 64), (8, 16, 64), (32, 8, 32)]
EPSS = [1e-3, 1.0]
DENSE_MAX_N = int(os.environ.get("ROBUST_DENSE_MAX_N", "4200"))  # dense eigh of n ~ 4k: ~20 s on one core
REPEAT = int(os.environ.get("ROBUST_REPEAT", "2"))
BISECT_MAX_N = 4200


def chain(w: int, B: int, L: int, init: str, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for _ in range(L - 1):
        mods += [nn.Linear(w, w, bias=False), nn.Tanh()]
    mods.append(nn.Linear(w, 10, bias=False))
    model = nn.Sequential(*mods)
    if init == "kaiming":
        for m in model:
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="tanh")
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(B, w, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (B,), generator=g)
    return model.to(dtype), nn.CrossEntropyLoss(), X.to(dtype), y


def cpu_timed(fn, *args):
    c, t = time.process_time(), time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, time.process_time() - c, out


def run_case(w, B, L, init, dtype, eps, dense, precision: str = "working") -> dict:
    """One case; ``precision="mixed"`` (float64 only): ``H.factor(eps, precision="mixed")``, whose
    float32 copy's derivatives are inside the factor time."""
    model, loss_fn, X, y = chain(w, B, L, init, dtype)
    t_der, H = best_of(lambda: hessinv.hessian(model, loss_fn, X, y), REPEAT, 0)
    n = H.shape[0]
    H._residual_operator()  # float64 twin (its derivatives are counted in the end-to-end time below)
    twin_der = (
        best_of(lambda: hessinv.hessian(model.double(), loss_fn, X.double(), y), 1, 0)[0]
        if dtype == torch.float32
        else 0.0
    )
    model.to(dtype)
    label = str(dtype).split(".")[-1] + ("-mixed" if precision == "mixed" else "")
    out = {"w": w, "B": B, "L": L, "init": init, "dtype": label, "eps": eps, "n": n}
    try:
        t_fac, F = best_of(lambda: H.factor(eps, precision=precision), REPEAT, 0)
    except hessinv.SingularError as e:
        out.update(refused=True, message=str(e)[:200])
        return out
    g = H.gradient
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hessinv.AccuracyWarning)
        t_sol, (x, info) = best_of(lambda: F.solve(g, return_info=True), REPEAT, 0)
        x_raw = F.solve(g, refine=False)
    op64 = H._residual_operator()
    g64 = g.double()

    def resid(v):
        r = g64 - op64._apply(v.double()[:, None])[:, 0] - eps * v.double()
        return float(r.norm() / g64.norm())

    out.update(
        refused=False,
        derivatives_s=t_der + twin_der,
        factor_s=t_fac,
        solve_s=t_sol,
        end_to_end_parts_s=t_der + twin_der + t_fac + t_sol,
        end_to_end_s=_fresh_pipeline(model, loss_fn, X, y, eps, precision),
        residual=resid(x),
        residual_refined=info.residual,
        float64_fallback=F._f64 is not None or getattr(F, "_low", 0) is None,
        unrefined_residual=resid(x_raw),
        refinement_steps=info.refinement_steps,
        krylov_iterations=info.krylov_iterations,
        perturbed=sum(F.perturbed.values()),
        inertia=list(F.inertia),
        inertia_certified=F.inertia_certified,
        positive_definite=F.positive_definite,
    )
    if dense is not None:
        lam, V = dense
        xd = V @ ((V.T @ g64) / (lam + eps))
        out["error_vs_dense"] = float((x.double() - xd).norm() / xd.norm())
        s = lam + eps
        out["inertia_dense"] = [int((s < 0).sum()), 0, int((s > 0).sum())]
        out["inertia_matches"] = out["inertia"] == out["inertia_dense"]
        out["cond"] = float(s.abs().max() / s.abs().min())
    return out


def _fresh_pipeline(model, loss_fn, X, y, eps: float, precision: str) -> float:
    """Median wall seconds of what a user's first solve costs: ``hessinv.hessian(...)``, ``H.factor(eps)``,
    ``F.solve(g)`` on a new operator each time -- the float64 twin of a float32 operator (a model copy and
    its derivatives), the norm estimate of a stalled refinement and the like included, which the parts'
    timings (repeated on one operator) amortize. Medians of ``REPEAT + 1`` runs."""
    times = []
    for _ in range(REPEAT + 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", hessinv.AccuracyWarning)
            t = time.perf_counter()
            H = hessinv.hessian(model, loss_fn, X, y)
            H.factor(eps, precision=precision).solve(H.gradient)
            times.append(time.perf_counter() - t)
    return _median(times)


def pd_vs_indefinite(w, B, L, init) -> dict:
    model, loss_fn, X, y = chain(w, B, L, init, torch.float64)
    H = hessinv.hessian(model, loss_fn, X, y)
    big = 1.1 * H.norm_estimate() + 1.0
    t_ind, F1 = best_of(lambda: H.factor(1e-3), REPEAT + 1, 1)
    t_pd, F2 = best_of(lambda: H.factor(big), REPEAT + 1, 1)
    return {
        "w": w,
        "B": B,
        "L": L,
        "init": init,
        "indefinite_s": t_ind,
        "pd_s": t_pd,
        "ratio": t_ind / t_pd,
        "negative": F1.inertia.negative,
        "pd_eps": big,
        "pd_is_pd": F2.positive_definite,
    }


LMIN_REPEAT = 5


def _median(xs) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def lambda_min_run(w, B, L, init, bisect: bool) -> dict:
    from scipy.sparse.linalg import eigsh

    model, loss_fn, X, y = chain(w, B, L, init, torch.float64)

    def fresh() -> hessinv.CurvatureOperator:
        # a new operator per call, as a user's first call meets it (nothing cached: a warm operator
        # keeps its norm estimate, 30 products, between calls); its construction is not timed
        return hessinv.hessian(model, loss_fn, X, y)

    # alternating repeats, medians: single shots on this shared machine scatter by +-30%
    ours, theirs = [], []
    for _ in range(LMIN_REPEAT):
        ours.append(cpu_timed(fresh().min_eigenvalue, 1e-8))
        lin = fresh().as_linear_operator()
        theirs.append(cpu_timed(lambda lin=lin: float(eigsh(lin, k=1, which="SA")[0][0])))
    wall, cpu = _median(r[0] for r in ours), _median(r[1] for r in ours)
    ew, ec = _median(r[0] for r in theirs), _median(r[1] for r in theirs)
    lam, ev = ours[0][2], theirs[0][2]
    out = {
        "w": w,
        "B": B,
        "L": L,
        "n": sum(p.numel() for p in model.parameters()),
        "init": init,
        "min_eigenvalue_s": wall,
        "min_eigenvalue_cpu_s": cpu,
        "lambda": lam,
        "eigsh_s": ew,
        "eigsh_cpu_s": ec,
        "eigsh_lambda": ev,
        "repeats": LMIN_REPEAT,
    }
    if bisect:
        bw, bc, bl = cpu_timed(fresh()._min_eigenvalue_bisection, 1e-8)
        out.update(bisection_s=bw, bisection_cpu_s=bc, bisection_lambda=bl)
    return out


#: the zero-cluster rows: over-parameterized tanh MLPs (widths, batch) on a few examples, whose Hessian
#: has a cluster of zero eigenvalues larger than the rest of its spectrum, above the dense fallback's n
ZERO_CLUSTER = [([20, 60, 60, 10], 8), ([16, 48, 48, 48, 10], 4)]
ZERO_CLUSTER_EPS = [1e-8, 1e-10, 1e-12]  # relative to ||H||


def zero_cluster_run(widths: list[int], B: int) -> list[dict]:
    """Solves of ``(H + eps I) x = b`` at ``eps`` = :data:`ZERO_CLUSTER_EPS` ``||H||`` (cond 1e8-1e12):
    hessinv's refined solve (factor + solve) against a dense float64 LU of the same matrix (its
    ``n`` products not timed), residuals measured with the dense matrix, inertia against ``eigvalsh``."""
    torch.manual_seed(1)
    mods: list[nn.Module] = []
    for i in range(len(widths) - 1):
        mods += [nn.Linear(widths[i], widths[i + 1]), nn.Tanh()]
    model = nn.Sequential(*mods[:-1]).double()
    g = torch.Generator().manual_seed(0)
    X = torch.randn(B, widths[0], generator=g, dtype=torch.float64)
    y = torch.randint(0, widths[-1], (B,), generator=g)
    H = hessinv.hessian(model, nn.CrossEntropyLoss(), X, y)
    Hd = H.to_dense()
    n = Hd.shape[0]
    ev = torch.linalg.eigvalsh(Hd)
    norm = float(ev.abs().max())
    b = torch.randn(n, generator=g, dtype=torch.float64)
    rows = []
    for rel_eps in ZERO_CLUSTER_EPS:
        eps = rel_eps * norm
        A = Hd + eps * torch.eye(n, dtype=torch.float64)
        s = ev + eps
        lu_s, lu_cpu, x_lu = cpu_timed(torch.linalg.solve, A, b)
        row = {
            "widths": widths,
            "B": B,
            "n": n,
            "zero_eigenvalues": int((ev.abs() < 1e-12 * norm).sum()),
            "eps_rel": rel_eps,
            "cond": float(s.abs().max() / s.abs().min()),
            "lu_s": lu_s,
            "lu_cpu_s": lu_cpu,
            "lu_residual": float((b - A @ x_lu).norm() / b.norm()),
        }

        def factor_solve(eps=eps):
            F = H.factor(eps)
            return F, *F.solve(b, return_info=True)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", hessinv.AccuracyWarning)
            try:
                t, c, (F, x, info) = cpu_timed(factor_solve)
            except hessinv.SingularError as e:
                row.update(refused=True, message=str(e)[:200])
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
        row.update(
            refused=False,
            hessinv_s=t,
            hessinv_cpu_s=c,
            residual=float((b - A @ x).norm() / b.norm()),
            residual_reported=info.residual,
            error_vs_lu=float((x - x_lu).norm() / x_lu.norm()),
            krylov_iterations=info.krylov_iterations,
            perturbed=sum(F.perturbed.values()),
            inertia_matches=list(F.inertia) == [int((s < 0).sum()), 0, int((s > 0).sum())],
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def render_zero_cluster(rows: list[dict]) -> str:
    lines = [
        "| widths, B | n (zero eigenvalues) | eps / norm H | cond | refused | hessinv factor + solve | residual "
        "(reported) | GMRES iterations | perturbed | inertia ok | dense LU | LU residual | error vs LU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['widths']}, {r['B']} | {r['n']} ({r['zero_eigenvalues']}) | {r['eps_rel']:g} | {r['cond']:.1e} "
        lu = f"{r['lu_s']:.2f} s | {r['lu_residual']:.1e}"
        if r["refused"]:
            lines.append(head + f"| **yes** | - | - | - | - | - | {lu} | - |")
            continue
        lines.append(
            head + f"| no | {r['hessinv_s']:.2f} s ({r['hessinv_cpu_s']:.2f} s CPU) | {r['residual']:.1e} "
            f"({r['residual_reported']:.1e}) | {r['krylov_iterations']} | {r['perturbed']} | "
            f"{'yes' if r['inertia_matches'] else 'NO'} | {lu} | {r['error_vs_lu']:.1e} |"
        )
    return "\n".join(lines)


def _record_path() -> str:
    """The recorded file only when asked (HESSINV_UPDATE_REPO=1); else runs/bench/ (outside the records)."""
    if os.environ.get("HESSINV_UPDATE_REPO") == "1":
        return os.path.join(os.path.dirname(__file__), "results", "robustness.json")
    os.makedirs(os.path.join("runs", "bench"), exist_ok=True)
    return os.path.join("runs", "bench", "robustness.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--only-lambda-min",
        action="store_true",
        help="re-run only the lambda_min rows, into a copy of bench/results/robustness.json's other rows",
    )
    ap.add_argument(
        "--only-zero-cluster",
        action="store_true",
        help="run only the zero-cluster rows (over-parameterized MLPs on a few examples, n above the dense "
        "fallback), into bench/results/robustness_zero_cluster.json with HESSINV_UPDATE_REPO=1",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.only_zero_cluster:
        rows = [r for widths, B in ZERO_CLUSTER for r in zero_cluster_run(widths, B)]
        out = {"machine": machine_info("cpu") | {"load_average_end": load_average()}, "rows": rows}
        path = _record_path().replace("robustness.json", "robustness_zero_cluster.json")
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
        print(render_zero_cluster(rows))
        return
    res = {"machine": machine_info("cpu"), "cases": [], "pd_vs_indefinite": [], "lambda_min": []}
    t0 = time.perf_counter()
    if args.only_lambda_min:
        with open(os.path.join(os.path.dirname(__file__), "results", "robustness.json")) as f:
            old = json.load(f)
        res["cases"], res["pd_vs_indefinite"] = old["cases"], old["pd_vs_indefinite"]
        res["grid_machine"] = old.get("grid_machine", old["machine"])  # where the grid rows ran
    for init in ("kaiming", "default") if not args.only_lambda_min else ():
        for w, B, L in SHAPES:
            dense = None
            model, loss_fn, X, y = chain(w, B, L, init, torch.float64)
            n = sum(p.numel() for p in model.parameters())
            if n <= DENSE_MAX_N:
                Hd = hessinv.hessian(model, loss_fn, X, y).to_dense()
                dense = torch.linalg.eigh(0.5 * (Hd + Hd.T))
                del Hd
            for dtype, precision in (
                (torch.float64, "working"),
                (torch.float32, "working"),
                (torch.float64, "mixed"),
            ):
                for eps in EPSS:
                    r = run_case(w, B, L, init, dtype, eps, dense, precision)
                    res["cases"].append(r)
                    print(json.dumps(r), flush=True)
            r = pd_vs_indefinite(w, B, L, init)
            res["pd_vs_indefinite"].append(r)
            print(json.dumps(r), flush=True)
    for w, B, L in [(16, 16, 6), (16, 16, 8), (16, 16, 16)]:
        r = lambda_min_run(w, B, L, "default", bisect=True)
        res["lambda_min"].append(r)
        print(json.dumps(r), flush=True)
    res["machine"]["load_average_end"] = load_average()
    res["total_s"] = time.perf_counter() - t0
    path = _record_path()
    print(f"writing {path}", flush=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(render(res))


def _f(x, spec=".1e"):
    return "-" if x is None else format(x, spec)


def render(res: dict) -> str:
    m = res["machine"]
    lines = [
        "## Robustness grid (bench/robustness.py)",
        "",
        f"Run {m['date']}, torch {m['torch']}, one thread; load average at start {m['load_average_start']}, "
        f"at end {m.get('load_average_end')}; total {res.get('total_s', 0):.0f} s.",
        "",
        "Bias-free tanh chains (kaiming-normal with tanh gain, or PyTorch's default init), CE loss, `g` the "
        "gradient; `H.factor(eps)` then `F.solve(g)` (refined). *residual (refined iterate)*: "
        "`SolveInfo.residual`, of the float64 iterate; *residual (returned x)*: of the solution as returned, "
        "in the model's dtype (for float32 this includes rounding `x` to float32, ~u32 cond); "
        "*unrefined*: `F.solve(g, refine=False)`; both with the float64 O(L) product. *perturbed*: pivot "
        "eigenvalues perturbed statically (then the inertia is not certified); *float64 fallback*: the "
        "float32 sweep could not precondition (cond u32 >~ 1), so the float64 twin was factored. Dense "
        "references (eigh of `H.to_dense()`) only for n <= 4200 to keep the run short. *factor*, *solve*: best "
        f"of {REPEAT} on one operator (a float32 operator's twin, and the norm estimate a stalled refinement "
        "takes, are made at the first call and reused); *end to end*: the median of "
        f"{REPEAT + 1} fresh runs of `hessinv.hessian` + `H.factor` + `F.solve`, everything included. One "
        "thread, on a shared 2-core machine (load average below).",
        "",
        "| init | w, B, L | n | dtype | eps | refused | factor | solve | end to end | residual (refined iterate) | "
        "residual (returned x) | unrefined | steps / GMRES | perturbed | float64 fallback | inertia ok | "
        "error vs dense | cond |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in res["cases"]:
        if c["refused"]:
            lines.append(
                f"| {c['init']} | {c['w']}, {c['B']}, {c['L']} | {c['n']} | {c['dtype']} | {c['eps']:g} | **yes** |"
                + " - |" * 12
            )
            continue
        ok = c.get("inertia_matches")
        ok_s = (
            "-"
            if ok is None
            else ("yes" if ok else ("no (uncertified)" if not c["inertia_certified"] else "**NO**"))
        )
        lines.append(
            f"| {c['init']} | {c['w']}, {c['B']}, {c['L']} | {c['n']} | {c['dtype']} | {c['eps']:g} | no | "
            f"{c['factor_s'] * 1e3:.0f} ms | {c['solve_s'] * 1e3:.0f} ms | {c['end_to_end_s'] * 1e3:.0f} ms | "
            f"{_f(c['residual_refined'])} | {_f(c['residual'])} | {_f(c['unrefined_residual'])} | "
            f"{c['refinement_steps']} / {c['krylov_iterations']} | {c['perturbed']} | "
            f"{'yes' if c['float64_fallback'] else 'no'} | {ok_s} | {_f(c.get('error_vs_dense'))} | {_f(c.get('cond'))} |"
        )
    lines += [
        "",
        "Indefinite (eps=1e-3) vs positive definite (eps = 1.1 ||H|| + 1) factorization, float64:",
        "",
        "| init | w, B, L | negative eigenvalues | indefinite | positive definite | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["pd_vs_indefinite"]:
        lines.append(
            f"| {r['init']} | {r['w']}, {r['B']}, {r['L']} | {r['negative']} | {r['indefinite_s'] * 1e3:.0f} ms | "
            f"{r['pd_s'] * 1e3:.0f} ms | **{r['ratio']:.2f}x** |"
        )
    lines += [
        "",
        "float32 (factor + float64 refinement) vs float64, end to end: a new operator's derivatives, factor and solve, the float64 twin's copy and derivatives included (medians of fresh runs; the grid's *end to end* column likewise):",
        "",
        "| init | w, B, L | eps | float64 | float32 | speed-up | float64, precision='mixed' | speed-up (residual) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by = {
        (c["init"], c["w"], c["B"], c["L"], c["eps"], c["dtype"]): c for c in res["cases"] if not c["refused"]
    }
    for (init, w, B, L, eps, dt), c in by.items():
        if dt != "float64" or (init, w, B, L, eps, "float32") not in by:
            continue
        c32 = by[(init, w, B, L, eps, "float32")]
        cm = by.get((init, w, B, L, eps, "float64-mixed"))
        mixed = (
            f"{cm['end_to_end_s'] * 1e3:.0f} ms{' (float64 fallback)' if cm['float64_fallback'] else ''} | "
            f"{c['end_to_end_s'] / cm['end_to_end_s']:.2f}x ({cm['residual']:.0e}) |"
            if cm
            else "— | — |"
        )
        lines.append(
            f"| {init} | {w}, {B}, {L} | {eps:g} | {c['end_to_end_s'] * 1e3:.0f} ms | "
            f"{c32['end_to_end_s'] * 1e3:.0f} ms | {c['end_to_end_s'] / c32['end_to_end_s']:.2f}x | {mixed}"
        )
    lines += [
        "",
        "lambda_min (default init, float64; wall / CPU seconds, medians of 5 alternating runs; eigsh at its defaults):",
        "",
        "| w, B, L | n | min_eigenvalue | eigsh on H.as_linear_operator() | bisection (before) | speed-up vs bisection | lambda |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["lambda_min"]:
        b = r.get("bisection_s")
        lines.append(
            f"| {r['w']}, {r['B']}, {r['L']} | {r['n']} | {r['min_eigenvalue_s']:.3f} / {r['min_eigenvalue_cpu_s']:.3f} | "
            f"{r['eigsh_s']:.3f} / {r['eigsh_cpu_s']:.3f} | {_f(b, '.2f')} | {_f(None if b is None else b / r['min_eigenvalue_s'], '.1f')}x | "
            f"{r['lambda']:.10g} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "render":
        with open(os.path.join(os.path.dirname(__file__), "results", "robustness.json")) as f:
            print(render(json.load(f)))
    else:
        main()
