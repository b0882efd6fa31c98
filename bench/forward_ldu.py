"""Baseline: the published order -- the lifted block-tridiagonal system solved input -> loss by block LDU.

The seed and the paper (arXiv 2601.06096) lift ``(H + eps I) x = g`` with auxiliary variables: the
tangents ``t_l = T_l x`` (the seed's ``y = M^{-1} D_x x``) and their adjoints. Written as the KKT
system of ``min 1/2 x^T (H + eps I) x - g^T x`` with the chain as constraints (math.md §1), the
unknowns of stage ``l`` are ``u_l = (x_l, t_l, lambda_l)`` (``p_l + 2 a_l`` of them) and

    x_l:       (Hxx_l + eps I) x_l + Hxz_l t_{l-1}                     - Jx_l^T lambda_l = g_l
    t_l:       Hzz_{l+1} t_l + Hxz_{l+1}^T x_{l+1} + lambda_l - Jz_{l+1}^T lambda_{l+1} = 0
    lambda_l:  t_l - Jz_l t_{l-1} - Jx_l x_l                                              = 0

(``t_{-1} = 0``; the loss stage contributes ``Hzz`` = Lambda to the last ``t`` equation). The
multipliers are ``lambda_l = -s_l`` of the Hessian-vector product's backward sweep, so eliminating
``t`` and ``lambda`` gives back ``(H + eps I) x = g``. Ordered stage by stage the matrix is symmetric
block-tridiagonal: diagonal blocks

    D_l = [[Hxx_l + eps I, 0, -Jx_l^T], [0, Hzz_{l+1}, I], [-Jx_l, I, 0]]

and the stages couple only through ``t_{l-1}``: ``C_l = c_l e_t^T`` with
``c_l = [Hxz_l; 0; -Jz_l]`` (rows of stage ``l``, columns ``t_{l-1}``), ``U_{l-1} = C_l^T``.

Forward block LDU (the published order, no pivoting across blocks, dense LU with partial pivoting
within a block): ``S_0 = D_0``, ``S_l = D_l - c_l Z_{l-1} c_l^T`` with ``Z = (S^{-1})_{tt}`` -- the
coupling's sparsity is used, so a stage costs one LU of size ``N = p + 2a`` and a solve with ``a``
columns (``~ 2/3 N^3 + 2 N^2 a``), not a dense ``N x N`` block product. Back substitution
``u_l = S_l^{-1}(w_l - e_t c_{l+1}^T u_{l+1})``.

``pivot=False`` eliminates each ``S_l`` by block Schur complements in the fixed order ``x_l``,
``lambda_l``, ``t_l`` (partial pivoting only inside each of the three sub-blocks, none across them):

    P_x = S_xx,   P_lam = S_ll - S_lx P_x^{-1} S_xl,   P_t = Hzz_{l+1} - P_lam^{-1}

(``S_tx = 0``, ``S_tl = I``). ``P_lam = -(Jx' P_x^{-1} Jx'^T + Jz Z_{l-1} Jz^T)`` (``Jx'`` the coupled
``Jx``) is a Gram matrix of the stage Jacobians that ``eps`` does not shift: it is exactly singular
at the first stage when ``B d_out > p`` (``B > d_in + 1``) and wherever a ReLU unit is dead, and
otherwise its smallest singular value decays geometrically with depth (measured: 4e-2 at l=0 to
2e-14 at l=15); ``P_t`` then grows like ``||P_lam^{-1}||``. This is
the order whose error the design notes report (w=4, B=4, L=16, tanh/CE, eps=1: cond 6.75, error
1.1e-3); the block pivots ``S_l`` themselves stay well conditioned (cond <= ~200 there), so the
default, LU with partial pivoting over the whole ``S_l``, is accurate to ~1e-15. (The other natural
order ``x, t, lambda`` has the pivot ``Hzz_{l+1}``, exactly singular for a Linear without
activation, ReLU, or the CE loss.)

The blocks are densified from hessinv's per-stage :class:`~hessinv.stages.Blocks` (``jx``, ``jz``,
``hxx``, ``hxz``, ``hzz`` applied to identities), so both solvers see the same derivatives.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class StageBlocks:
    """Dense blocks of one model stage: ``Jx`` (a, p), ``Jz`` (a, a_in), ``Hxx`` (p, p), ``Hxz`` (p, a_in),
    ``Hzz`` (a_in, a_in) -- the last three from the stage itself, ``Hzz_next`` from the stage after it."""

    Jx: Tensor
    Jz: Tensor
    Hxx: Tensor
    Hxz: Tensor
    Hzz: Tensor


def densify(H) -> list[StageBlocks]:
    """Dense blocks of every model stage of a hessinv operator (``H.blocks[:-1]``), plus the loss's
    ``Hzz`` carried by a final entry with empty Jacobians."""
    out: list[StageBlocks] = []
    dtype, device = H.dtype, H.device
    for blk in H.blocks:
        B, d_in, d_out, p = blk.batch, blk.d_in, blk.d_out, blk.p
        a_in, a_out = B * d_in, B * d_out
        Ip = torch.eye(p, dtype=dtype, device=device)
        Ia = torch.eye(a_in, dtype=dtype, device=device).view(B, d_in, a_in)
        Jx = blk.jx(Ip).reshape(a_out, p) if p else torch.zeros(a_out, 0, dtype=dtype, device=device)
        Jz = blk.jz(Ia).reshape(-1, a_in)
        Hxx = blk.hxx(Ip) if p else torch.zeros(0, 0, dtype=dtype, device=device)
        Hxz = blk.hxz(Ia) if p else torch.zeros(0, a_in, dtype=dtype, device=device)
        Hzz = blk.hzz(Ia).reshape(a_in, a_in)
        out.append(StageBlocks(Jx, Jz, Hxx, Hxz, Hzz))
    return out


def _grouped_lu(S: Tensor, sizes: list[int]) -> list[tuple[tuple[Tensor, Tensor], Tensor, Tensor]]:
    """Block LU of ``S`` over consecutive groups of unknowns of the given sizes, no pivoting across
    groups: group ``i``'s pivot ``P_i`` is the Schur complement of the groups before it, factored by
    LU with partial pivoting inside the group. Returns per group ``(lu(P_i), P_i^{-1} S_{i,>i},
    S_{>i,i})`` (the last two as updated by the earlier groups); empty groups are skipped."""
    S = S.clone()
    out: list[tuple[tuple[Tensor, Tensor], Tensor, Tensor]] = []
    o = 0
    for m in sizes:
        if m == 0:
            continue
        e = o + m
        lu = torch.linalg.lu_factor(S[o:e, o:e])
        U = torch.linalg.lu_solve(*lu, S[o:e, e:])
        Lc = S[e:, o:e].clone()
        S[e:, e:] -= Lc @ U
        out.append((lu, U, Lc))
        o = e
    return out


def _grouped_solve(F: list[tuple[tuple[Tensor, Tensor], Tensor, Tensor]], R: Tensor) -> Tensor:
    """``S^{-1} R`` from :func:`_grouped_lu`: block forward substitution, then block back substitution."""
    Z = R.clone()
    spans: list[tuple[int, int]] = []
    o = 0
    for lu, _, Lc in F:
        e = o + lu[0].shape[0]
        Z[o:e] = torch.linalg.lu_solve(*lu, Z[o:e])
        Z[e:] -= Lc @ Z[o:e]
        spans.append((o, e))
        o = e
    for (o, e), (_, U, _) in zip(reversed(spans), reversed(F), strict=True):
        Z[o:e] -= U @ Z[e:]
    return Z


def _stage_solver(D: Tensor, p: int, a: int, pivot: bool) -> Callable[[Tensor], Tensor]:
    """Factor a stage's block pivot ``S_l`` (unknowns ordered ``x, t, lambda``); returns ``R -> S_l^{-1} R``.

    ``pivot``: LU with partial pivoting over all of ``S_l``; otherwise block elimination in the order
    ``x, lambda, t`` (:func:`_grouped_lu`).
    """
    if pivot:
        LU, piv = torch.linalg.lu_factor(D)
        return lambda R: torch.linalg.lu_solve(LU, piv, R)
    N = D.shape[0]
    perm = torch.cat([torch.arange(p), torch.arange(p + a, N), torch.arange(p, p + a)]).to(D.device)
    F = _grouped_lu(D[perm][:, perm], [p, a, a])

    def solve(R: Tensor) -> Tensor:
        out = torch.empty_like(R)
        out[perm] = _grouped_solve(F, R[perm])
        return out

    return solve


def forward_ldu_solve(
    stages: list[StageBlocks], g: Tensor, eps: float, timings: dict | None = None, pivot: bool = True
) -> Tensor:
    """``(H + eps I)^{-1} g`` by forward block LDU on the lifted system (``g`` of shape (n,) or (n, k)).

    ``stages``: :func:`densify` output (model stages, then the loss stage, whose ``Hzz`` is Lambda).
    ``pivot=False``: no pivoting across the ``x, lambda, t`` sub-blocks of a stage (module docstring);
    it reproduces the published order's breakdown and raises if a sub-pivot is exactly singular.
    """
    vec = g.dim() == 1
    G = g[:, None] if vec else g
    k = G.shape[1]
    model = stages[:-1]
    n_st = len(model)
    sizes = [s.Jx.shape[1] for s in model]
    gs = list(torch.split(G, sizes, dim=0))
    dtype, device = G.dtype, G.device
    t0 = time.perf_counter()
    solvers: list[Callable[[Tensor], Tensor]] = []
    ws: list[Tensor] = []
    cs: list[Tensor | None] = []  # c_l = [Hxz_l; 0; -Jz_l] (N_l x a_{l-1}); None for l = 0
    Zprev: Tensor | None = None
    yprev: Tensor | None = None  # (S_{l-1}^{-1} w_{l-1})_t
    for l, st in enumerate(model):
        p, a = st.Jx.shape[1], st.Jx.shape[0]
        N = p + 2 * a
        Hzz_next = stages[l + 1].Hzz
        D = torch.zeros(N, N, dtype=dtype, device=device)
        D[:p, :p] = st.Hxx + eps * torch.eye(p, dtype=dtype, device=device)
        D[:p, p + a :] = -st.Jx.T
        D[p + a :, :p] = -st.Jx
        D[p : p + a, p : p + a] = Hzz_next
        eye_a = torch.eye(a, dtype=dtype, device=device)
        D[p : p + a, p + a :] = eye_a
        D[p + a :, p : p + a] = eye_a
        w = torch.zeros(N, k, dtype=dtype, device=device)
        w[:p] = gs[l]
        if l == 0:
            cs.append(None)
        else:
            a_in = st.Jz.shape[1]
            c = torch.zeros(N, a_in, dtype=dtype, device=device)
            c[:p] = st.Hxz
            c[p + a :] = -st.Jz
            cs.append(c)
            D -= c @ Zprev @ c.T
            w -= c @ yprev
        solve = _stage_solver(D, p, a, pivot)
        solvers.append(solve)
        ws.append(w)
        if l + 1 < n_st:
            # Z_l = (S_l^{-1})_{tt}, y_l = (S_l^{-1} w_l)_t
            E = torch.zeros(N, a + k, dtype=dtype, device=device)
            E[p : p + a, :a] = eye_a
            E[:, a:] = w
            Y = solve(E)[p : p + a]
            Zprev, yprev = Y[:, :a], Y[:, a:]
    t1 = time.perf_counter()
    xs: list[Tensor] = [torch.empty(0)] * n_st
    u_next: Tensor | None = None
    for l in range(n_st - 1, -1, -1):
        st = model[l]
        p, a = st.Jx.shape[1], st.Jx.shape[0]
        rhs = ws[l]
        if u_next is not None:
            rhs = rhs.clone()
            rhs[p : p + a] -= cs[l + 1].T @ u_next
        u = solvers[l](rhs)
        xs[l] = u[:p]
        u_next = u
    t2 = time.perf_counter()
    if timings is not None:
        timings["factor"] = t1 - t0
        timings["solve"] = t2 - t1
    x = torch.cat(xs, dim=0)
    return x[:, 0] if vec else x


def _check() -> None:
    """Small chain: the lifted forward LDU reproduces the dense solve where its pivots are regular;
    without pivoting across the ``x, lambda, t`` sub-blocks it loses accuracy with depth."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import tanh_mlp

    import hessinv

    torch.manual_seed(0)
    for L, eps in [(3, 1.0), (4, 0.3), (6, 1.0)]:
        P = tanh_mlp(4, 3, L, C=3)
        H = hessinv.hessian(P.model, P.loss_fn, P.inputs, P.targets)
        Hd = H.to_dense()
        n = Hd.shape[0]
        g = torch.randn(n, 2, dtype=torch.float64)
        ref = torch.linalg.solve(Hd + eps * torch.eye(n, dtype=torch.float64), g)
        x = forward_ldu_solve(densify(H), g, eps)
        print(f"L={L} eps={eps}: n={n}, relative error {float((x - ref).norm() / ref.norm()):.2e}")
    P = tanh_mlp(4, 4, 16)
    H = hessinv.hessian(P.model, P.loss_fn, P.inputs, P.targets)
    Hd = H.to_dense()
    n = Hd.shape[0]
    g = torch.randn(n, dtype=torch.float64)
    ref = torch.linalg.solve(Hd + torch.eye(n, dtype=torch.float64), g)
    for pivot in (True, False):
        x = forward_ldu_solve(densify(H), g, 1.0, pivot=pivot)
        print(f"w=4 B=4 L=16 eps=1 pivot={pivot}: relative error {float((x - ref).norm() / ref.norm()):.2e}")


if __name__ == "__main__":
    _check()
