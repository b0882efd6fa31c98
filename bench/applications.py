"""Applications of the exact inverse against the libraries people use today (issue 14).

* influence: exact scores ``-g_test^T (H + lambda I)^{-1} g_i`` (hessinv) vs a dense float64 truth (plain
  autograd double backward, ``torch.linalg.solve``) and dattri's LiSSA / CG / Arnoldi / EK-FAC and
  explicit-Hessian attributors at their default settings: Pearson / Spearman correlation with the truth,
  wall and process time.
* laplace: ``log_marginal_likelihood`` error against dense, time and peak memory, hessinv vs
  laplace-torch ``full`` / ``kron`` / ``diag`` (GGN); model selection by evidence over widths on digits,
  test NLL / ECE of the probit predictive.
* spectrum: exact eigenvalue counts vs dense ``eigvalsh``; the exact histogram vs a stochastic Lanczos
  quadrature density (curvlinops) at similar time.
* diagonal: the exact Hessian diagonal and trace (one sweep) vs the dense autograd Hessian's and
  curvlinops' Hutchinson / XDiag / Hutch++ / XTrace estimators: time and relative error.

Run under the shared lock, one thread::

    flock /tmp/hessinv-bench.lock env OMP_NUM_THREADS=1 PYTHONPATH=$PWD/src python bench/applications.py

Writes ``bench/results/applications.json``. Libraries that do not import are reported as skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr
from torch import nn

os.environ.setdefault("TQDM_DISABLE", "1")  # the libraries' progress bars
sys.path.insert(0, os.path.dirname(__file__))
from common import load_average, machine_info  # noqa: E402

from hessinv.cli.data import load_dataset  # noqa: E402
from hessinv.influence import InfluenceFunction  # noqa: E402
from hessinv.laplace import Laplace  # noqa: E402


def timed(fn):
    """(result, wall seconds, process CPU seconds) of one call."""
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def mlp(d_in: int, d_out: int, depth: int, width: int, seed: int, dtype=torch.float64) -> nn.Sequential:
    torch.manual_seed(seed)
    mods: list[nn.Module] = [nn.Linear(d_in, width), nn.Tanh()]
    for _ in range(depth - 2):
        mods += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*mods, nn.Linear(width, d_out)).to(dtype)


def train(net: nn.Module, loss_fn: nn.Module, X, y, steps: int, lr: float = 1e-2, wd: float = 0.0) -> None:
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=wd)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(net(X), y).backward()
        opt.step()


def autograd_hessian(net: nn.Module, loss_fn: nn.Module, X, y) -> torch.Tensor:
    """The dense Hessian by plain autograd double backward (rows in batches via is_grads_batched)."""
    params = [p for p in net.parameters()]
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss_fn(net(X), y), params, create_graph=True)])
    n = g.numel()
    rows = []
    eye = torch.eye(n, dtype=g.dtype)
    for i in range(0, n, 256):
        hs = torch.autograd.grad(
            g, params, grad_outputs=eye[i : i + 256], retain_graph=True, is_grads_batched=True
        )
        rows.append(torch.cat([h.reshape(h.shape[0], -1) for h in hs], 1))
    return torch.cat(rows).detach()


def corr(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.reshape(-1).double().numpy(), b.reshape(-1).double().numpy()
    return {
        "pearson": float(pearsonr(a, b)[0]),
        "spearman": float(spearmanr(a, b)[0]),
        "max_rel_err": float(np.abs(a - b).max() / np.abs(b).max()),
    }


# -- influence --------------------------------------------------------------------------------
def bench_influence(quick: bool) -> dict:
    """A deep narrow tanh MLP on digits; curvature (mean-loss Hessian) on a batch of ``B`` training
    examples; scores for ``T`` test points x ``N`` training examples; damping ``lambda`` loose
    (``0.1 lambda_max``) and tight (``1e-3 lambda_max``), each plus ``1.01 |lambda_min|`` when ``H`` is
    indefinite so that ``H + lambda I`` is positive definite and every method applies."""
    ds = load_dataset("digits", seed=0)
    N, T, B = (200, 5, 32) if quick else (400, 10, 64)
    depth, width = (8, 8) if quick else (24, 12)
    X, y, Xt, yt = ds.X_train[:N], ds.y_train[:N], ds.X_test[:T], ds.y_test[:T]
    Xc, yc = X[:B], y[:B]
    net = mlp(64, 10, depth, width, seed=0)
    loss_fn = nn.CrossEntropyLoss()
    train(net, loss_fn, X, y, 300)
    n = sum(p.numel() for p in net.parameters())
    rec: dict = {
        "data": f"digits: N={N} training examples scored, T={T} test points, curvature batch B={B}",
        "model": f"tanh MLP depth {depth} width {width}",
        "n": n,
        "train_loss": float(loss_fn(net(X), y).detach()),
    }
    (H, t_h, c_h) = timed(lambda: autograd_hessian(net, loss_fn, Xc, yc))
    lam = torch.linalg.eigvalsh(H)
    lmin, lmax = float(lam[0]), float(lam[-1])
    rec.update(lambda_min=lmin, lambda_max=lmax, dense_hessian_wall_s=t_h, dense_hessian_cpu_s=c_h)
    Gtr = torch.stack([_grad(net, loss_fn, X[i : i + 1], y[i : i + 1]) for i in range(N)])
    Gte = torch.stack([_grad(net, loss_fn, Xt[i : i + 1], yt[i : i + 1]) for i in range(T)])
    for setting, rel in (("loose", 1e-1), ("tight", 1e-3)):
        damping = rel * lmax + max(0.0, -1.01 * lmin)
        r: dict = {"damping": damping, "condition": (lmax + damping) / (lmin + damping)}

        def dense(damping=damping):
            return -Gte @ torch.linalg.solve(H + damping * torch.eye(n, dtype=H.dtype), Gtr.T)

        truth, t, c = timed(dense)
        r["dense_solve"] = {"wall_s": t, "cpu_s": c, "plus_dense_hessian_wall_s": t + t_h}

        for key, precision in (("hessinv", "working"), ("hessinv_mixed", "mixed")):

            def ours(damping=damping, precision=precision):
                inf = InfluenceFunction(
                    net, loss_fn, curvature="hessian", damping=damping, precision=precision
                )
                return inf.fit(X, y, Xc, yc).influences(Xt, yt)

            runs = [timed(ours) for _ in range(3)]  # median of 3 (a fraction of a second each)
            s = runs[0][0]
            t, c = statistics.median(u[1] for u in runs), statistics.median(u[2] for u in runs)
            r[key] = {"wall_s": t, "cpu_s": c, "precision": precision, "repeats": 3, **corr(s, truth)}
            h = r[key]
            dense_s = t_h + r["dense_solve"]["wall_s"]
            print(
                f"influence {setting}: n={n} lambda={damping:.3g} dense {dense_s:.2f}s {key} {t:.2f}s "
                f"(CPU {c:.2f}s) 1-pearson {1 - h['pearson']:.1e} max rel err {h['max_rel_err']:.1e}"
            )
        r.update(_dattri(net, loss_fn, (X, y), (Xt, yt), (Xc, yc), damping, lmax, truth))
        rec[setting] = r
    return rec


def _grad(net, loss_fn, x, t) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss_fn(net(x), t), list(net.parameters()))])


def _dattri(net, loss_fn, train_set, test_set, curv_set, damping, lmax, truth) -> dict:
    try:
        from dattri.algorithm.influence_function import (
            IFAttributorArnoldi,
            IFAttributorCG,
            IFAttributorEKFAC,
            IFAttributorExplicit,
            IFAttributorLiSSA,
        )
        from dattri.task import AttributionTask
    except Exception as e:  # pragma: no cover - optional dependency
        return {"dattri": {"skipped": repr(e)}}
    import copy

    from torch.utils.data import DataLoader, TensorDataset

    # dattri's LiSSA and Arnoldi work in float32 (its collate / projector): every dattri method gets the
    # same float32 copy of the model and data, the library's usual setting
    net = copy.deepcopy(net).float()
    (X, y), (Xt, yt), (Xc, yc) = ((a.float(), b) for a, b in (train_set, test_set, curv_set))

    def f(params, data):
        xx, tt = data
        return nn.functional.cross_entropy(torch.func.functional_call(net, params, xx), tt.long())

    task = AttributionTask(loss_func=f, model=net, checkpoints=net.state_dict())
    full = DataLoader(TensorDataset(Xc, yc), batch_size=len(Xc))  # the curvature batch
    tr = DataLoader(TensorDataset(X, y), batch_size=100)
    te = DataLoader(TensorDataset(Xt, yt), batch_size=len(Xt))
    out = {}
    methods = {
        "dattri_explicit": lambda: IFAttributorExplicit(task, regularization=damping),
        "dattri_cg": lambda: IFAttributorCG(task, regularization=damping),
        # LiSSA: its default scaling 50 diverges once lambda_max(H) > 50, and 5000 recursions per test
        # point take minutes: scaling 1.1 (lambda_max + lambda), 300 recursions
        "dattri_lissa": lambda: IFAttributorLiSSA(
            task, damping=damping, recursion_depth=300, scaling=max(50.0, 1.1 * (lmax + damping))
        ),
        "dattri_arnoldi": lambda: IFAttributorArnoldi(task, regularization=damping),
        "dattri_ekfac": lambda: IFAttributorEKFAC(task, damping=damping),
    }
    for name, make in methods.items():
        try:
            caught: list = []

            def run(make=make, caught=caught):
                att = make()
                with warnings.catch_warnings(record=True) as w:
                    warnings.simplefilter("always")
                    att.cache(full)
                    out = att.attribute(tr, te)
                caught += sorted({str(x.message)[:160] for x in w if "NOT cached" not in str(x.message)})
                return out

            s, t, c = timed(run)
            repeats = 1
            if t < 2.0:  # the fast ones (CG, Arnoldi, EK-FAC): median of 3, as hessinv's rows
                more = [timed(run) for _ in range(2)]
                t = statistics.median([t] + [m[1] for m in more])
                c = statistics.median([c] + [m[2] for m in more])
                repeats = 3
            out[name] = {"wall_s": t, "cpu_s": c, "repeats": repeats, **corr(-s.detach().T, truth)}
            if caught:
                out[name]["warnings"] = sorted(set(caught))
            print(
                f"  {name}: {t:.2f}s pearson {out[name]['pearson']:.4f} spearman {out[name]['spearman']:.4f}"
            )
        except Exception as e:
            out[name] = {"skipped": repr(e)[:300]}
            print(f"  {name}: skipped ({e!r})"[:200])
    return out


# -- laplace ----------------------------------------------------------------------------------
def dense_ggn_lml(net: nn.Module, X, y, delta: float) -> float:
    """The Laplace evidence with the dense GGN ``sum_i J_i^T (diag p_i - p_i p_i^T) J_i`` (summed CE)."""
    from hessinv.influence import output_jacobians

    J = output_jacobians(net, X)  # (N, C, n)
    with torch.no_grad():
        logits = net(X)
        p = torch.softmax(logits, -1)
        nll = float(nn.functional.cross_entropy(logits, y, reduction="sum"))
    Lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    G = torch.einsum("icn,icd,idm->nm", J, Lam, J)
    n = G.shape[0]
    theta = torch.cat([q.detach().reshape(-1) for q in net.parameters()])
    logdet = torch.linalg.slogdet(G + delta * torch.eye(n, dtype=G.dtype))[1]
    return -nll - 0.5 * (float(logdet) - n * math.log(delta) + delta * float(theta @ theta))


def nll_ece(probs: torch.Tensor, y: torch.Tensor, bins: int = 10) -> tuple[float, float]:
    probs = probs.double().clamp_min(1e-300)
    nll = float(-probs[torch.arange(len(y)), y].log().mean())
    conf, pred = probs.max(1)
    acc = (pred == y).double()
    ece = 0.0
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        m = (conf > a) & (conf <= b)
        if m.any():
            ece += float(m.double().mean() * (acc[m].mean() - conf[m].mean()).abs())
    return nll, ece


def bench_laplace(quick: bool) -> dict:
    """Digits, N training examples (the whole set is one curvature batch: hessinv's sweep costs
    ``(N width)^2`` memory per stage, so N stays small), summed CE, GGN."""
    ds = load_dataset("digits", seed=0)
    N = 150 if quick else 300
    X, y, Xt, yt = ds.X_train[:N], ds.y_train[:N], ds.X_test, ds.y_test
    depth, width, delta0 = (4, 8, 1.0) if quick else (6, 8, 1.0)
    net = mlp(64, 10, depth, width, seed=0)
    # MAP: summed CE + delta0/2 |theta|^2 (weight decay delta0 / N on the mean loss)
    train(net, nn.CrossEntropyLoss(), X, y, 400, lr=1e-2, wd=delta0 / N)
    n = sum(p.numel() for p in net.parameters())
    rec: dict = {
        "data": f"digits N={N} train, {len(Xt)} test",
        "model": f"tanh MLP depth {depth} width {width}",
        "n": n,
    }
    lml_dense, t_d, c_d = timed(lambda: dense_ggn_lml(net, X, y, delta0))
    rec["dense"] = {"lml": lml_dense, "wall_s": t_d, "cpu_s": c_d}
    with torch.no_grad():
        rec["map"] = dict(zip(("test_nll", "test_ece"), nll_ece(torch.softmax(net(Xt), -1), yt), strict=True))

    def ours():
        la = Laplace(net, "classification", prior_precision=delta0).fit(X, y)
        return la, la.log_marginal_likelihood()

    (la, lml), t, c = timed(ours)
    (delta, t_o, c_o) = timed(la.optimize_prior_precision)
    probs = la(Xt, link_approx="probit")
    rec["hessinv"] = {
        "lml": lml,
        "lml_rel_err": abs(lml - lml_dense) / abs(lml_dense),
        "fit_and_lml_wall_s": t,
        "fit_and_lml_cpu_s": c,
        "optimize_wall_s": t_o,
        "optimize_cpu_s": c_o,
        "prior_precision": delta,
        "lml_at_optimum": la.log_marginal_likelihood(),
        **dict(zip(("test_nll", "test_ece"), nll_ece(probs, yt), strict=True)),
    }
    print(
        f"laplace: n={n} dense lml {lml_dense:.6f} hessinv {lml:.6f} ({t:.2f}s) optimized delta {delta:.3g}"
    )
    rec.update(_laplace_torch(net, X, y, Xt, yt, delta0, lml_dense))
    rec["model_selection"] = _model_selection(ds, N, quick)
    return rec


def _laplace_torch_fitted(net: nn.Module, structure: str, delta: float, loader):
    """laplace-torch's Laplace approximation of the whole classification network, fitted."""
    from laplace import Laplace as LT

    la = LT(
        net, "classification", subset_of_weights="all", hessian_structure=structure, prior_precision=delta
    )
    la.fit(loader)
    return la


def _laplace_torch(net, X, y, Xt, yt, delta0, lml_dense) -> dict:
    try:
        import laplace  # noqa: F401  (the optional dependency)
    except Exception as e:  # pragma: no cover - optional dependency
        return {"laplace_torch": {"skipped": repr(e)}}
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(X, y), batch_size=100)
    out = {}
    for structure in ("full", "kron", "diag"):
        try:

            def fit(structure=structure):
                la = _laplace_torch_fitted(net, structure, delta0, loader)
                return la, float(la.log_marginal_likelihood())

            (la, lml), t, c = timed(fit)

            def opt(la=la):
                la.optimize_prior_precision(pred_type="glm", method="marglik")
                return float(la.prior_precision)

            delta, t_o, c_o = timed(opt)
            with torch.no_grad():
                probs = la(Xt, pred_type="glm", link_approx="probit")
            out[f"laplace_torch_{structure}"] = {
                "lml": lml,
                "lml_rel_err": abs(lml - lml_dense) / abs(lml_dense),
                "fit_and_lml_wall_s": t,
                "fit_and_lml_cpu_s": c,
                "optimize_wall_s": t_o,
                "optimize_cpu_s": c_o,
                "prior_precision": delta,
                **dict(zip(("test_nll", "test_ece"), nll_ece(probs, yt), strict=True)),
            }
            print(f"  laplace-torch {structure}: lml {lml:.6f} ({t:.2f}s) delta {delta:.3g}")
        except Exception as e:
            out[f"laplace_torch_{structure}"] = {"skipped": repr(e)[:300]}
            print(f"  laplace-torch {structure}: skipped {e!r}"[:200])
    return out


def _model_selection(ds, N: int, quick: bool) -> list[dict]:
    """Evidence (optimized prior precision) vs test NLL over architectures: does the evidence pick the
    model with the best test NLL?"""
    X, y, Xt, yt = ds.X_train[:N], ds.y_train[:N], ds.X_test, ds.y_test
    rows = []
    archs = [(2, 4), (3, 8), (4, 8)] if quick else [(2, 4), (2, 8), (4, 8), (6, 8), (4, 12)]
    for depth, width in archs:
        net = mlp(64, 10, depth, width, seed=0)
        train(net, nn.CrossEntropyLoss(), X, y, 400, lr=1e-2, wd=1.0 / N)
        la = Laplace(net, "classification").fit(X, y)
        la.optimize_prior_precision()
        nll, ece = nll_ece(la(Xt), yt)
        rows.append({"depth": depth, "width": width, "n": la.n_params, "lml": la.log_marginal_likelihood(),
                     "prior_precision": la.prior_precision, "test_nll": nll, "test_ece": ece})  # fmt: skip
        print(f"  selection depth {depth} width {width}: lml {rows[-1]['lml']:.2f} test nll {nll:.4f}")
    return rows


# -- spectrum ---------------------------------------------------------------------------------
def bench_spectrum(quick: bool) -> dict:
    """Exact counts (hessinv) vs dense ``eigvalsh`` of the autograd Hessian; the exact histogram vs a
    stochastic Lanczos quadrature density (curvlinops, Papyan 2020) integrated over the same bins."""
    import hessinv
    from hessinv import spectrum

    ds = load_dataset("digits", seed=0)
    B = 32 if quick else 64
    depth, width = (8, 8) if quick else (24, 12)
    X, y = ds.X_train[:B], ds.y_train[:B]
    net = mlp(64, 10, depth, width, seed=0)
    loss_fn = nn.CrossEntropyLoss()
    train(net, loss_fn, ds.X_train[:400], ds.y_train[:400], 300)
    n = sum(p.numel() for p in net.parameters())
    rec: dict = {
        "data": f"digits, Hessian on B={B}",
        "model": f"tanh MLP depth {depth} width {width}",
        "n": n,
    }

    def dense():
        return torch.linalg.eigvalsh(autograd_hessian(net, loss_fn, X, y))

    lam, t_d, c_d = timed(dense)
    bins = 40
    lo, hi = float(lam[0]), float(lam[-1])
    pad = 0.01 * (hi - lo)
    edges = np.linspace(lo - pad, hi + pad, bins + 1)

    def ours():
        H = hessinv.hessian(net, loss_fn, X, y)
        return spectrum.spectral_histogram(H, bins=edges), spectrum.logdet(H, 1e-3)

    (hist, (sign, logdet)), t, c = timed(ours)
    want = np.histogram(lam.numpy(), edges)[0]
    sign_d, logdet_d = torch.linalg.slogdet(
        autograd_hessian(net, loss_fn, X, y) + 1e-3 * torch.eye(n, dtype=lam.dtype)
    )
    rec["dense_eigvalsh"] = {"wall_s": t_d, "cpu_s": c_d}
    rec["hessinv"] = {
        "wall_s": t,
        "cpu_s": c,
        "factorizations": bins + 2,
        "counts_equal_dense": bool((hist.counts == want).all()),
        "max_count_diff": int(np.abs(hist.counts - want).max()),
        "logdet_rel_err": abs(logdet - float(logdet_d)) / abs(float(logdet_d)),
        "logdet_sign_ok": sign == float(sign_d),
        "negative_eigenvalues": int(
            spectrum.eigenvalue_counts(hessinv.hessian(net, loss_fn, X, y), [0.0])[0]
        ),
        "dense_negative_eigenvalues": int((lam < 0).sum()),
    }
    print(f"spectrum: n={n} dense {t_d:.2f}s hessinv {t:.2f}s ({bins + 2} factorizations) counts equal "
          f"{rec['hessinv']['counts_equal_dense']}")  # fmt: skip
    rec["edges"], rec["counts"] = edges.tolist(), hist.counts.tolist()
    try:
        from curvlinops import HessianLinearOperator
        from curvlinops.papyan2020traces.spectrum import lanczos_approximate_spectrum
    except Exception as e:  # pragma: no cover - optional dependency
        rec["slq"] = {"skipped": repr(e)}
        return rec
    for ncv in (32, 128):

        def slq(ncv=ncv):
            A = HessianLinearOperator(net, loss_fn, list(net.parameters()), [(X, y)])
            torch.manual_seed(0)
            return lanczos_approximate_spectrum(A, ncv, num_points=4096, boundaries=(lo, hi), margin=0.0)

        (grid, dens), t_s, c_s = timed(slq)
        g, d = grid.double().numpy(), dens.double().numpy()
        mass = np.array(
            [
                np.trapezoid(d[(g >= a) & (g < b)], g[(g >= a) & (g < b)])
                for a, b in zip(edges[:-1], edges[1:], strict=True)
            ]
        )
        mass = mass / mass.sum()
        l1 = float(np.abs(mass - hist.counts / n).sum())
        rec[f"slq_ncv{ncv}"] = {"wall_s": t_s, "cpu_s": c_s, "l1_error_of_bin_fractions": l1}
        print(f"  SLQ ncv={ncv}: {t_s:.2f}s, L1 error of the bin fractions {l1:.3f}")
    return rec


def bench_diagonal(quick: bool) -> dict:
    """The exact Hessian diagonal and trace (``H.diagonal()``, one sweep) against the dense autograd
    Hessian's (where it fits) and curvlinops' stochastic estimators (Hutchinson, XDiag; Hutchinson,
    Hutch++, XTrace for the trace) at 12 / 120 / 1200 products; and the posterior variances
    ``diag((G + delta I)^{-1})`` (``Laplace.posterior_variance``: selected inversion by one forward
    sweep) against the dense inverse and laplace-torch's ``full`` / ``kron`` / ``diag``."""
    ds = load_dataset("digits", seed=0)

    def trained(depth: int, width: int, act: type[nn.Module]) -> nn.Module:
        net = mlp(64, 10, depth, width, seed=0)
        for i, m in enumerate(net):
            if isinstance(m, nn.Tanh):
                net[i] = act()
        train(net, nn.CrossEntropyLoss(), ds.X_train[:400], ds.y_train[:400], 300)
        return net

    out: dict = {"diagonal": {}, "posterior_variance": {}}
    # the diagonal of H on 64 examples: a deep narrow chain, a wide ReLU MLP
    for name, depth, width, act in (
        [("tanh", 8, 8, nn.Tanh)]
        if quick
        else [
            ("tanh", 24, 12, nn.Tanh),
            ("relu-wide", 3, 100, nn.ReLU),
        ]
    ):
        rec = _diagonal_case(
            trained(depth, width, act), nn.CrossEntropyLoss(), ds.X_train[:64], ds.y_train[:64], quick
        )
        out["diagonal"][name] = {"model": f"{act.__name__} MLP depth {depth} width {width}, digits", **rec}
    # posterior variances of models whose Laplace posterior the data move (a deep narrow chain's vanishing
    # gradients leave nearly all of its variances at the prior's): the GGN on the N training examples
    for name, depth, width, act, N in (
        [("tanh", 3, 8, nn.Tanh, 100)]
        if quick
        else [
            ("tanh", 3, 16, nn.Tanh, 300),
            ("relu", 3, 32, nn.ReLU, 150),
        ]
    ):
        rec = _inverse_diagonal_case(trained(depth, width, act), ds.X_train[:N], ds.y_train[:N], quick)
        out["posterior_variance"][name] = {
            "model": f"{act.__name__} MLP depth {depth} width {width}, digits",
            **rec,
        }
    return out


def _diagonal_case(net: nn.Module, loss_fn: nn.Module, X, y, quick: bool) -> dict:
    import hessinv

    n = sum(p.numel() for p in net.parameters())

    def ours():
        return hessinv.hessian(net, loss_fn, X, y).diagonal()

    ours()  # (warm: first-call imports)
    d, t, c = timed(ours)
    rec: dict = {"B": len(X), "n": n, "hessinv": {"wall_s": t, "cpu_s": c, "trace": float(d.sum())}}
    if n <= 5000:
        Hd, t_d, c_d = timed(lambda: autograd_hessian(net, loss_fn, X, y).diagonal())
        rec["dense_autograd"] = {"wall_s": t_d, "cpu_s": c_d}
        rec["hessinv"]["max_rel_err_vs_dense"] = float((d - Hd).abs().max() / Hd.abs().max())
    else:  # entries against e_i^T H e_i by autograd products at 64 random indices
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:64]
        params = list(net.parameters())
        grads = torch.autograd.grad(loss_fn(net(X), y), params, create_graph=True)
        g = torch.cat([t.reshape(-1) for t in grads])
        E = torch.zeros(64, n, dtype=g.dtype)
        E[torch.arange(64), idx] = 1.0
        hs = torch.autograd.grad(g, params, grad_outputs=E, retain_graph=True, is_grads_batched=True)
        ref = torch.cat([h.reshape(64, -1) for h in hs], 1)[torch.arange(64), idx]
        rec["hessinv"]["max_rel_err_vs_autograd_entries"] = float(
            (d[idx] - ref).abs().max() / ref.abs().max()
        )
    dense = f", dense autograd {rec['dense_autograd']['wall_s']:.2f}s" if "dense_autograd" in rec else ""
    print(f"diagonal: n={n} hessinv {t:.3f}s{dense}")
    try:
        import curvlinops
    except Exception as e:  # pragma: no cover - optional dependency
        rec["curvlinops"] = {"skipped": repr(e)}
        return rec
    A = curvlinops.HessianLinearOperator(net, loss_fn, list(net.parameters()), [(X, y)])
    tr = float(d.sum())
    for k in (12, 120) if quick else (12, 120, 1200):  # (Hutch++ needs multiples of 3, XDiag of 2)
        row: dict = {}
        for est in ("hutchinson_diag", "xdiag", "hutchinson_trace", "hutchpp_trace", "xtrace"):
            torch.manual_seed(0)
            e, t_e, c_e = timed(lambda est=est, k=k: getattr(curvlinops, est)(A, k))
            err = (
                float((e.reshape(-1).to(d) - d).norm() / d.norm())
                if "diag" in est
                else abs(float(e) - tr) / abs(tr)
            )
            row[est] = {"wall_s": t_e, "cpu_s": c_e, "rel_err": err}
        rec[f"curvlinops_{k}_products"] = row
        print(
            f"  {k} products: "
            + ", ".join(f"{e} {v['wall_s']:.2f}s err {v['rel_err']:.2g}" for e, v in row.items())
        )
    return rec


def _inverse_diagonal_case(net: nn.Module, X, y, quick: bool) -> dict:
    """Posterior variances of the GGN Laplace approximation (summed CE) at the prior precision the
    evidence chooses (hessinv's ``optimize_prior_precision``; a fixed ``delta = 1`` left most variances at
    the prior's ``1 / delta``, where any approximation is right): time of ``fit`` + ``posterior_variance``
    at that ``delta``, and the approximations' relative errors per parameter."""
    n = sum(p.numel() for p in net.parameters())
    la = Laplace(net, "classification", prior_precision=1.0).fit(X, y)
    delta = la.optimize_prior_precision()

    def ours():
        return Laplace(net, "classification", prior_precision=delta).fit(X, y).posterior_variance()

    v, t, c = timed(ours)
    moved = float(((v * delta - 1).abs() > 0.01).double().mean())  # variances the data moved (> 1%)
    rec: dict = {"N": len(X), "prior_precision": delta, "fraction_moved_from_prior": moved}
    rec["hessinv"] = {"wall_s": t, "cpu_s": c}
    if n <= 5000:

        def dense():
            from hessinv.influence import output_jacobians

            J = output_jacobians(net, X)
            with torch.no_grad():
                p = torch.softmax(net(X), -1)
            Lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
            G = torch.einsum("icn,icd,idm->nm", J, Lam, J)
            return torch.linalg.inv(G + delta * torch.eye(n, dtype=G.dtype)).diagonal()

        ref, t_d, c_d = timed(dense)
        rec["dense_inverse"] = {"wall_s": t_d, "cpu_s": c_d}
        rec["hessinv"]["max_rel_err_vs_dense"] = float((v - ref).abs().max() / ref.abs().max())
    print(
        f"posterior variance: n={n}, delta {delta:.3g} ({moved:.0%} moved from the prior) hessinv {t:.3f}s"
        + (f", dense {rec['dense_inverse']['wall_s']:.2f}s" if n <= 5000 else "")
    )
    try:
        import laplace  # noqa: F401  (the optional dependency)
    except Exception as e:  # pragma: no cover - optional dependency
        rec["laplace_torch"] = {"skipped": repr(e)}
        return rec
    from torch.utils.data import DataLoader, TensorDataset

    for structure in ("kron", "diag") if n > 5000 else ("full", "kron", "diag"):  # (full: n x n)

        def fit(structure=structure):
            la = _laplace_torch_fitted(net, structure, delta, DataLoader(TensorDataset(X, y), batch_size=100))
            if structure == "full":
                return la.posterior_covariance.diagonal()
            if structure == "kron":  # (its posterior precision's eigendecomposition, raised to -1)
                return la.posterior_precision.diag(exponent=-1)
            return la.posterior_variance.reshape(-1)

        try:
            w, t_l, c_l = timed(fit)
        except Exception as e:
            rec[f"laplace_torch_{structure}"] = {"skipped": repr(e)[:300]}
            continue
        w = w.to(v)
        rel = (w - v).abs() / v
        rec[f"laplace_torch_{structure}"] = {
            "wall_s": t_l,
            "cpu_s": c_l,
            "median_rel_err": float(rel.median()),
            "p90_rel_err": float(rel.quantile(0.9)),
            "max_rel_err": float(rel.max()),
        }
        print(
            f"  laplace-torch {structure}: {t_l:.2f}s, relative error median {float(rel.median()):.2g}, "
            f"90th percentile {float(rel.quantile(0.9)):.2g}, max {float(rel.max()):.2g}"
        )
    return rec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="influence,laplace,spectrum,diagonal")
    ap.add_argument(
        "--out",
        default="runs/bench/applications.json",
        help="JSON output (default: runs/bench/applications.json; "
        "the record is bench/results/applications.json)",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    rec: dict = {"machine": machine_info("cpu")}
    for part in args.only.split(","):
        rec[part] = globals()[f"bench_{part}"](args.quick)
    rec["load_average_end"] = load_average()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rec, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
