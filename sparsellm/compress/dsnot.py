"""DSnoT, Dynamic Sparse No Training (Zhang et al., ICLR 2024): training-free prune-and-grow.

For each output row i the expected reconstruction error against the dense layer is
    e_i = Σ_j (W_dense − W_sparse)_ij · E[x_j].
One cycle swaps, in every row still active, one pruned weight back in and one kept weight out:
grow the pruned weight whose contribution has the sign of e_i and the largest |W_ij E[x_j]| / Var[x_j]^p,
prune, inside the same comparison group (the row, or the N:M group of the grown weight), the kept
weight of lowest Wanda score whose contribution has the opposite sign. The mask changes, never the
values: a grown weight gets its dense value back. Every weight moves at most once.

Where the reference code differs on purpose: a swap that would not shrink |e_i| is rejected (that
candidate is dropped and the row continues) instead of being applied, so no row's error ever grows;
candidates of the wrong sign are never taken when the right-signed ones run out; the same-sign rule
is a working option; and the error is measured against the dense weights, so a SparseGPT start (whose
kept weights were updated) is refined against the layer it approximates.

criterion "exact" (dsnot_exact, the default): instead of the mean-error heuristic, each swap is scored by
the exact change of the row's calibration output error (w0 − w)ᵀ H (w0 − w), computed from XᵀX and a
running residual; the best improving swap per row is taken each cycle (see the formulas below). The
default scores with H = XᵀX/n shrunk halfway toward its diagonal (`shrink: 0.5`): with the full matrix
(shrink 0) the mask fits the calibration text's input correlations and got worse on text of another
domain; halfway it kept most of the gain on the benchmark text (all nine starts better) and was better
on eight of nine starts on a second pair of texts (worse: Wanda 70 %; docs/benchmarks.md). The default refines
the MLP Linears only (`modules: mlp`): with the attention Linears too, Wanda 70 % calibrated on one domain got worse
on another, the attention swaps alone made it far worse, the MLP swaps alone better; MLP-only keeps most of the gain
on the calibration domain and ends better than its start on every start of the benchmark text and all but one
(SparseGPT 70 %, +2 %) of a second pair of texts (docs/benchmarks.md).
A row whose true calibration error (unshrunk XᵀX) did not fall keeps its starting mask."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from ..specs import Strict
from ..stage import register
from .base import LayerwiseMethod, Target

log = logging.getLogger(__name__)


class DSnoTRefine(Strict):
    """Training-free prune-and-grow on the mask of the prune stage just before it (Zhang et al., 2024)."""
    method: Literal["dsnot"]
    max_cycles: int = Field(50, gt=0, description="at most this many swaps per row")
    update_threshold: float = Field(0.1, ge=0.0, description="mean/mse: a row stops once |its error| is at most this "
                                    "(unit: the error summed over one calibration window, as in the reference)")
    pow_of_var: float = Field(1.0, ge=0.0, description="mean/mse: grow the weight of largest contribution / Var[x]^p")
    same_sign: bool = Field(False, description="mean/mse: also reject swaps that flip the sign of the row's error")
    criterion: Literal["mean", "mse", "exact"] = Field("exact", description="exact (default): the swap that lowers the "
                                                       "row's output error on the calibration inputs the most, scored "
                                                       "from XᵀX (see shrink; no row's calibration error ends worse "
                                                       "than its start); mean: take a swap when it shrinks |mean error| "
                                                       "(the paper); mse: only when it also lowers the row's expected "
                                                       "squared error (issue 3's default; see docs/methods.md)")
    shrink: float = Field(0.5, ge=0.0, le=1.0, description="criterion exact: score swaps with (1 − shrink)·XᵀX + "
                          "shrink·diag(XᵀX), trusting the calibration text's input correlations less (0: the full "
                          "matrix, best on text like the calibration's but worse on other domains; 1: only the "
                          "diagonal, which Wanda's mask already minimises; default 0.5, measured on two pairs of texts)")
    verify: bool = Field(True, description="mean/mse: keep a row's new mask only if its exact output error on the calibration "
                         "inputs, E[((W_dense − W) x)²], is lower than with the starting mask (needs XᵀX per layer)")
    modules: Literal["attention", "mlp", "all"] = Field("mlp", description="which pruned Linear layers to refine "
                                                         "(default mlp: the attention swaps fit the calibration text's "
                                                         "domain and made text of another domain worse; see methods.md)")
    targets: list[str] = Field(default_factory=list, description="glob (or re:REGEX) on module names, within `modules`")
    ignore: list[str] = Field(default_factory=list, description="glob (or re:REGEX) on module names to leave as pruned")


@dataclass
class DSnoTResult:
    weight: torch.Tensor  # refined weights
    error_before: torch.Tensor  # e_i per row, float64
    error_after: torch.Tensor
    cycles: int
    swaps: int


def row_error(dense: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """e_i = Σ_j (dense − weight)_ij · mean_j in float64."""
    return ((dense.double() - weight.double()) * mean.double()[None, :]).sum(1)


def _lowest(key: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the k lowest entries along the last dim, sorted, and how many of them are finite."""
    k = min(k, key.shape[-1])
    vals, idx = torch.topk(key, k, dim=-1, largest=False, sorted=True)
    return idx, torch.isfinite(vals).sum(-1)


@torch.no_grad()
def dsnot_refine(
    dense: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    sq_norm: torch.Tensor,
    group: int | None = None,
    max_cycles: int = 50,
    threshold: float = 0.1,
    pow_of_var: float = 1.0,
    same_sign: bool = False,
    criterion: str = "mean",
    window: float = 1.0,
) -> DSnoTResult:
    """Refine the mask of `weight` (zeros = pruned) against `dense`. `group`: M for N:M (swaps stay
    inside each group of M inputs), None for unstructured (swaps anywhere in the row).
    `mean`, `var`, `sq_norm`: per input channel E[x], Var[x], E[x²], with `mean` scaled by `window`
    (the reference sums the error over a calibration window; that scale is the unit of `threshold`).
    criterion "mean": take a swap when it shrinks |e| (the paper). "mse": also require that it lowers
    the row's expected squared output error E[(ΔW x)²] ≈ (e/window)² + Σ_j ΔW_j² Var[x_j] (ΔW = D − W), i.e.
    the error under H ≈ diag(Var x) + E[x]E[x]ᵀ, so that cancelling the mean never costs more variance.

    Candidate sets never change (a weight moves at most once), so each row's candidates are ranked
    once; a cycle then costs O(rows): sign s of the row's error picks the grow list (s>0: pruned
    weights of positive contribution, largest rank first) and the partner lists (kept weights of
    contribution −s, lowest Wanda score first, per group)."""
    if criterion not in ("mean", "mse"):
        raise ValueError(f"unknown DSnoT criterion {criterion!r}")
    rows, cols = weight.shape
    g = group or cols
    if cols % g:
        raise ValueError(f"N:M pattern with M={g} does not divide the input width {cols}")
    ngroups, dev, inf = cols // g, weight.device, float("inf")
    W = weight.detach().float().clone()
    D = dense.detach().to(dev).float()
    mu = mean.to(dev).float()
    pruned = W == 0
    grow_c, prune_c = D * mu, W * mu  # error removed by growing j / added by pruning k
    rank = grow_c / var.to(dev).double().clamp_min(1e-12).pow(pow_of_var).float()
    wanda = W.abs() * sq_norm.to(dev).float().sqrt()
    K = max_cycles

    # partner lists, index 1 for rows with e > 0 (prune a negative contribution), 0 for e <= 0
    partner_idx, partner_cnt = [], []
    for sign in (1.0, -1.0):  # e<=0 wants a kept weight of positive contribution
        key = torch.where(~pruned & (prune_c * sign > 0), wanda, inf).view(rows, ngroups, g)
        idx, cnt = _lowest(key, K if group is None else g)
        partner_idx.append(idx + torch.arange(ngroups, device=dev)[None, :, None] * g)
        partner_cnt.append(cnt)
    partner_idx, partner_cnt = torch.stack(partner_idx), torch.stack(partner_cnt)  # (2, rows, ngroups, L), (2, rows, ngroups)
    # grow lists: only weights whose group has a partner to swap with
    grow_idx, grow_ok = [], []
    for si, sign in ((0, -1.0), (1, 1.0)):
        has = (partner_cnt[si] > 0).repeat_interleave(g, dim=1)
        key = torch.where(pruned & (grow_c * sign > 0) & has, -rank * sign, inf)
        idx, cnt = _lowest(key, K)
        grow_idx.append(idx)
        grow_ok.append(torch.arange(idx.shape[1], device=dev)[None, :] < cnt[:, None])
    grow_idx, grow_ok = torch.stack(grow_idx), torch.stack(grow_ok)  # (2, rows, K)
    del grow_c, prune_c, rank, wanda, pruned

    e = row_error(D, W, mu)
    before = e.clone()
    mu64, var64 = mu.double(), var.to(dev).double()
    rix = torch.arange(rows, device=dev)
    ptr_g = torch.zeros(2, rows, dtype=torch.long, device=dev)
    ptr_p = torch.zeros(2, rows, ngroups, dtype=torch.long, device=dev)
    active = e.abs() > threshold
    cycles = swaps = 0
    while cycles < max_cycles and bool(active.any()):
        cycles += 1
        si = (e > 0).long()
        pg = ptr_g[si, rix]
        pgc = pg.clamp(max=grow_idx.shape[2] - 1)
        active &= (pg < grow_idx.shape[2]) & grow_ok[si, rix, pgc]
        j = grow_idx[si, rix, pgc]
        gi = j // g
        pp = ptr_p[si, rix, gi]
        has = pp < partner_cnt[si, rix, gi]
        k = partner_idx[si, rix, gi, pp.clamp(max=partner_idx.shape[3] - 1)]
        dj, wk = D[rix, j].double(), W[rix, k].double()
        e_new = e - dj * mu64[j] + wk * mu64[k]
        ok = active & has & (e_new.abs() < e.abs())
        if criterion == "mse":
            # Σ (D − W)² Var: pruning k turns (D_k − W_k)² into D_k², growing j turns D_j² into 0
            dk = D[rix, k].double()
            ok &= (e_new ** 2 - e ** 2) / window ** 2 + (dk ** 2 - (dk - wk) ** 2) * var64[k] - dj ** 2 * var64[j] < 0
        if same_sign:
            ok &= torch.sign(e_new) * torch.sign(e) >= 0
        ptr_g[si, rix] += active.long()  # the grow candidate is used up, accepted or not
        ptr_p[si, rix, gi] += ok.long()
        r = rix[ok]
        W[r, j[ok]] = D[r, j[ok]]
        W[r, k[ok]] = 0
        e = torch.where(ok, e_new, e)
        swaps += int(ok.sum())
        active &= e.abs() > threshold
    return DSnoTResult(W, before, e, cycles, swaps)


# ---------------------------------------------------------------------------------------------------
# Exact swap scores (criterion "exact")
#
# For one row with dense weights w0 and current weights w, the calibration output error is
#     e(w) = dᵀ H d,   d = w0 − w,   H = XᵀX / tokens,
# and r = H d is kept up to date. Swapping (prune a kept weight i, grow a pruned weight j back to its
# dense value) changes d by a·e_i + b·e_j with a = w_i (d_i goes from w0_i − w_i to w0_i) and
# b = −w0_j (d_j goes from w0_j to 0), so exactly
#     Δe(i, j) = P_i + G_j + 2·a·b·H_ij,   P_i = 2·a·r_i + a²·H_ii,   G_j = 2·b·r_j + b²·H_jj,
# where P_i (G_j) is the change for pruning i (growing j) alone; afterwards r += a·H[:, i] + b·H[:, j].
# Each cycle takes, in every row, the swap of lowest Δe if it is negative, so e falls strictly and no
# row can end worse than it started. N:M: every (kept, pruned) pair of every group is scored.
# Unstructured: the pairs among the `candidates` best single prunes × best single grows of the row
# (P and G exact; with candidates ≥ the row width that is every pair).

# unstructured: pairs scored per row and cycle = EXACT_CANDIDATES² (best single prunes × best single grows)
EXACT_CANDIDATES = 16  # measured on SmolLM2 (scripts/bench_dsnot_exact.py): 8-64 within 1 % of each other
# at most this many entries in one scoring tensor (rows are scored in chunks)
_CHUNK_ELEMENTS = 1 << 22


def exact_row_error(dense: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """e = (w0 − w)ᵀ H (w0 − w) per row, in float64."""
    d = dense.double() - weight.double()
    return ((d @ hessian.double()) * d).sum(1)


def swap_delta(a, b, r_i, r_j, h_ii, h_jj, h_ij):
    """Exact Δe of pruning i (current value a) and growing j (b = −w0_j), elementwise (broadcasts)."""
    return 2 * a * r_i + a * a * h_ii + 2 * b * r_j + b * b * h_jj + 2 * a * b * h_ij


def _pair_h(H: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """H[i, j] for broadcast index tensors i, j (a flat gather: much faster than 2-D advanced indexing)."""
    flat = i * H.shape[1] + j
    return H.reshape(-1).index_select(0, flat.reshape(-1)).view(flat.shape)


def _chunks(rows: int, per_row: int):
    step = max(1, _CHUNK_ELEMENTS // max(per_row, 1))
    return [slice(s, min(s + step, rows)) for s in range(0, rows, step)]


class _Groups:
    """N:M bookkeeping for exact swaps: per row and group of m columns, the positions of its kept
    weights (ks slots) and of its pruned ones (ps slots), and the cross term 2·a·b·H_ij of every
    (kept, pruned) slot pair (+inf for padding slots, where a group has fewer kept or pruned weights
    than the most of any group). A swap exchanges the two positions between their slots."""

    def __init__(self, V: torch.Tensor, pruned: torch.Tensor, H: torch.Tensor, m: int):
        rows, cols = V.shape
        g, dev = cols // m, V.device
        p = pruned.view(rows, g, m)
        order = torch.sort(p.to(torch.int8), dim=2, stable=True).indices + torch.arange(g, device=dev)[None, :, None] * m
        nk = (~p).sum(2)
        self.ks, self.ps = int(nk.max()), m - int(nk.min())
        self.kpos = order[..., :self.ks].contiguous()
        self.ppos = order[..., m - self.ps:].contiguous()
        kbad = torch.arange(self.ks, device=dev) >= nk[..., None]  # slot past the group's kept count
        pbad = torch.arange(self.ps, device=dev) < (self.ps - (m - nk))[..., None]  # slot before its pruned ones
        self.invalid = kbad[..., :, None] | pbad[..., None, :]
        self.cross = torch.empty(rows, g, self.ks, self.ps, device=dev)
        for c in _chunks(rows, g * self.ks * self.ps):
            n = V[c].shape[0]
            a = V[c].gather(1, self.kpos[c].reshape(n, -1)).view(self.kpos[c].shape)
            b = V[c].gather(1, self.ppos[c].reshape(n, -1)).view(self.ppos[c].shape)
            cross = 2 * a[..., :, None] * b[..., None, :] * _pair_h(H, self.kpos[c][..., :, None], self.ppos[c][..., None, :])
            self.cross[c] = cross.masked_fill_(self.invalid[c], float("inf"))

    def best(self, rows: torch.Tensor, S: torch.Tensor):
        """Lowest Δe per row over all (kept, pruned) pairs of each group, from the single-move changes S
        (P at kept, G at pruned positions): (Δe, i, j, (group, kslot, pslot))."""
        ks, ps = self.ks, self.ps
        g = self.kpos.shape[1]
        out = []
        everyone = rows.numel() == self.kpos.shape[0]  # rows is a sorted subset: all of them, slices suffice
        for c in _chunks(rows.numel(), g * ks * ps):
            rr = c if everyone else rows[c]
            n = S[c].shape[0]
            Pk = S[c].gather(1, self.kpos[rr].view(n, -1)).view(n, g, ks)
            Gp = S[c].gather(1, self.ppos[rr].view(n, -1)).view(n, g, ps)
            delta = (Pk[..., :, None] + Gp[..., None, :]).add_(self.cross[rr])
            out.append(delta.view(n, -1).min(1))
        v, k = torch.cat([o.values for o in out]), torch.cat([o.indices for o in out])
        gi, p, q = k // (ks * ps), (k // ps) % ks, k % ps
        return v, self.kpos[rows, gi, p], self.ppos[rows, gi, q], (gi, p, q)

    def swap(self, rows, where, i, j, V, H):
        gi, p, q = where
        self.kpos[rows, gi, p] = j
        self.ppos[rows, gi, q] = i
        kp, pp = self.kpos[rows, gi], self.ppos[rows, gi]  # (n, ks), (n, ps)
        a, b = V[rows[:, None], kp], V[rows[:, None], pp]
        cross = 2 * a[:, :, None] * b[:, None, :] * _pair_h(H, kp[:, :, None], pp[:, None, :])
        self.cross[rows, gi] = cross.masked_fill_(self.invalid[rows, gi], float("inf"))


def _best_row_swaps(V, S, pruned, H, candidates):
    """Unstructured: lowest Δe per row over the pairs of its `candidates` lowest P_i and lowest G_j
    (S: P at kept, G at pruned positions; V: a at kept, b at pruned positions)."""
    rows, cols = V.shape
    k = min(candidates, cols)
    inf = float("inf")
    vs, bis, bjs = [], [], []
    for c in _chunks(rows, max(k * k, cols)):
        v, pr = V[c], pruned[c]
        P = S[c].masked_fill(pr, inf)
        G = S[c].masked_fill(~pr, inf)
        I = torch.topk(P, k, dim=1, largest=False).indices
        J = torch.topk(G, k, dim=1, largest=False).indices
        delta = (P.gather(1, I)[:, :, None] + G.gather(1, J)[:, None, :]
                 + 2 * v.gather(1, I)[:, :, None] * v.gather(1, J)[:, None, :] * _pair_h(H, I[:, :, None], J[:, None, :]))
        v, kk = delta.view(delta.shape[0], -1).min(1)
        vs.append(v)
        bis.append(I.gather(1, (kk // k)[:, None])[:, 0])
        bjs.append(J.gather(1, (kk % k)[:, None])[:, 0])
    return torch.cat(vs), torch.cat(bis), torch.cat(bjs)


@torch.no_grad()
def dsnot_exact(
    dense: torch.Tensor,
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group: int | None = None,
    max_cycles: int = 50,
    candidates: int = EXACT_CANDIDATES,
    rtol: float = 1e-9,
    check: torch.Tensor | None = None,
) -> DSnoTResult:
    """Greedy exact-score prune-and-grow on the mask of `weight` (zeros = pruned) against `dense`:
    per cycle and row, the swap of lowest Δe = change of (w0 − w)ᵀ H (w0 − w) (formula above), applied
    if it lowers the row's error by more than `rtol` of it. `group`: M of N:M (swaps stay inside each
    group of M inputs, every (kept, pruned) pair scored); None: swaps anywhere in the row, among the
    `candidates` best single prunes × best single grows. Pairs are ranked in float32; the chosen swap's
    Δe, the residual r = H(w0 − w) and e are float64. The mask is tracked explicitly, so the per-row
    and per-group counts of pruned weights stay exact; grown weights take their dense value. Errors are
    recomputed from scratch at the end, and a row whose error is not below its start (rounding) keeps
    its starting weights: no row ends worse than it started. `check`: measure that final error (and
    report it) with this matrix instead of `hessian`, e.g. the true XᵀX when the swaps were scored with a
    shrunk one. Stops when no row improves or after max_cycles."""
    rows, cols = weight.shape
    if group is not None and cols % group:
        raise ValueError(f"N:M pattern with M={group} does not divide the input width {cols}")
    if candidates < 1:
        raise ValueError(f"candidates must be at least 1, got {candidates}")
    dev = weight.device
    H = hessian.to(dev).double()
    H32 = H.float()
    D = dense.detach().to(dev).double()
    D32 = D.float()
    W0 = weight.detach().double()
    W = W0.clone()
    pruned = W0 == 0
    # one signed value per weight: a = w_i where kept (the change if pruned is +a), b = −w0_j where
    # pruned (the change if grown); then the single-move changes are S = 2·V·r + V²·diag(H) everywhere
    V32 = torch.where(pruned, -D, W).float()
    r = (D - W) @ H  # H is symmetric: r = H d for every row
    e = ((D - W) * r).sum(1)
    before = e.clone()
    hdiag, hdiag32 = torch.diagonal(H).clone(), torch.diagonal(H32).clone()
    groups = _Groups(V32, pruned, H32, group) if group else None
    active = torch.arange(rows, device=dev)
    if groups is not None and (groups.ks == 0 or groups.ps == 0):
        active = active[:0]
    cycles = swaps = 0
    while cycles < max_cycles and active.numel():
        cycles += 1
        everyone = active.numel() == rows  # plain views instead of index copies while every row is active
        v = V32 if everyone else V32[active]
        rr = r.float() if everyone else r[active].float()
        S = torch.addcmul(v * v * hdiag32, v, rr, value=2.0)
        if groups is not None:  # padding slots carry +inf in the cross terms
            _, i, j, where = groups.best(active, S)
        else:
            _, i, j = _best_row_swaps(v, S, pruned if everyone else pruned[active], H32, candidates)
        # the chosen swap's exact Δe, in float64
        ai, bj = W[active, i], -D[active, j]
        delta = swap_delta(ai, bj, r[active, i], r[active, j], hdiag[i], hdiag[j], H[i, j])
        ok = ~pruned[active, i] & pruned[active, j] & (delta < -rtol * e[active])
        active, i, j, ai, bj, delta = active[ok], i[ok], j[ok], ai[ok], bj[ok], delta[ok]
        if not active.numel():
            break
        r.index_add_(0, active, torch.addcmul(ai[:, None] * H[i], bj[:, None], H[j]))
        e.index_add_(0, active, delta)
        W[active, i] = 0
        W[active, j] = D[active, j]
        V32[active, i] = -D32[active, i]
        V32[active, j] = D32[active, j]
        pruned[active, i] = True
        pruned[active, j] = False
        if groups is not None:
            groups.swap(active, tuple(x[ok] for x in where), i, j, V32, H32)
        swaps += int(active.numel())
    if check is not None:
        H = check.to(dev).double()
        before = exact_row_error(D, W0, H)
    after = exact_row_error(D, W, H)
    worse = (after >= before) & (W != W0).any(1)  # unchanged rows are equal by definition
    if bool(worse.any()):
        W[worse], after[worse] = W0[worse], before[worse]
    return DSnoTResult(W.to(torch.float32), before, after, cycles, swaps)


def shrunk(xtx: torch.Tensor, shrink: float) -> torch.Tensor:
    """(1 − shrink)·XᵀX + shrink·diag(XᵀX): the correlations between inputs scaled down, the diagonal kept."""
    if not shrink:
        return xtx
    out = xtx * (1.0 - shrink)
    out.diagonal().copy_(xtx.diagonal())
    return out


def row_output_error(dense: torch.Tensor, weight: torch.Tensor, xtx: torch.Tensor) -> torch.Tensor:
    """Per row, E[((W_dense − W) x)²] over the calibration inputs, from E[x xᵀ]."""
    dw = dense.float() - weight.float()
    return ((dw @ xtx.float()) * dw).sum(1)


def keep_better_rows(dense: torch.Tensor, start: torch.Tensor, refined: torch.Tensor, xtx: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Refined rows whose exact output error on the calibration inputs is lower than the starting
    mask's, the starting rows elsewhere; and how many rows were kept as they started."""
    better = row_output_error(dense, refined, xtx) < row_output_error(dense, start, xtx)
    return torch.where(better[:, None], refined, start.float()), int((~better).sum())


class DSnoT(LayerwiseMethod):
    """Refines the mask the preceding prune stage left in each Linear (needs its dense weights).
    With criterion "exact" (the default) only XᵀX is collected and max_cycles and shrink are the only
    settings used (the threshold, pow_of_var, same_sign and verify belong to the mean-error criteria;
    exact swaps end no row worse than its start on the true XᵀX, so verify has nothing to do)."""

    needs_dense = True

    def __init__(self, spec: DSnoTRefine):
        self.spec = spec
        if spec.criterion == "exact":  # exact swap scores need XᵀX only, and end no row worse than its start
            self.needs = frozenset({"hessian"})
        else:
            self.needs = frozenset({"sq_norm", "mean"} | ({"hessian"} if spec.verify else set()))
        self.nm: tuple[int, int] | None = None  # set by the pipeline from the prune stage it refines
        self.rows = self.reverted = 0

    @torch.no_grad()
    def compress(self, t: Target) -> None:
        s, st, w = self.spec, t.stats, t.linear.weight
        if s.criterion == "exact":
            res = dsnot_exact(t.dense, w, shrunk(st.hessian, s.shrink), self.nm[1] if self.nm else None, s.max_cycles,
                              EXACT_CANDIDATES, check=st.hessian if s.shrink else None)
            self.reverted += int((res.error_after >= res.error_before).sum())
            self.rows += w.shape[0]
            w.copy_(res.weight.to(w.dtype))
            return
        # the reference's unit: error summed over one calibration window (tokens per window × E[x])
        window = st.tokens / max(st.sequences, 1)
        res = dsnot_refine(t.dense, w, st.mean * window, st.var, st.sq_norm, self.nm[1] if self.nm else None,
                           s.max_cycles, s.update_threshold, s.pow_of_var, s.same_sign, s.criterion, window)
        new = res.weight
        if s.verify:
            new, reverted = keep_better_rows(t.dense.to(w.device), w, new, st.hessian.to(w.device))
            self.reverted += reverted
        self.rows += w.shape[0]
        w.copy_(new.to(w.dtype))

    def state(self) -> dict:
        return {"rows": self.rows, "reverted": self.reverted}

    def load_state(self, state: dict) -> None:
        self.rows, self.reverted = state["rows"], state["reverted"]

    def finish_layer(self, layer: int) -> None:
        log.debug("dsnot: %d of %d rows so far kept their starting mask (output error not lower)", self.reverted, self.rows)


register("refine", DSnoTRefine, DSnoT)
