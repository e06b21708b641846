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
kept weights were updated) is refined against the layer it approximates."""
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
    update_threshold: float = Field(0.1, ge=0.0, description="a row stops once |its error| is at most this "
                                    "(unit: the error summed over one calibration window, as in the reference)")
    pow_of_var: float = Field(1.0, ge=0.0, description="grow the weight of largest contribution / Var[x]^p")
    same_sign: bool = Field(False, description="also reject swaps that flip the sign of the row's error")
    criterion: Literal["mean", "mse"] = Field("mse", description="take a swap when it shrinks |mean error| (the paper), "
                                              "or only when it also lowers the row's expected squared error (default: "
                                              "measured better, see methods.md)")
    verify: bool = Field(True, description="keep a row's new mask only if its exact output error on the calibration "
                         "inputs, E[((W_dense − W) x)²], is lower than with the starting mask (needs XᵀX per layer)")
    modules: Literal["attention", "mlp", "all"] = Field("all", description="which pruned Linear layers to refine "
                                                         "(default all: measured best with verify; see methods.md)")
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
    """Refines the mask the preceding prune stage left in each Linear (needs its dense weights)."""

    needs_dense = True

    def __init__(self, spec: DSnoTRefine):
        self.spec = spec
        self.needs = frozenset({"sq_norm", "mean"} | ({"hessian"} if spec.verify else set()))
        self.nm: tuple[int, int] | None = None  # set by the pipeline from the prune stage it refines
        self.rows = self.reverted = 0

    @torch.no_grad()
    def compress(self, t: Target) -> None:
        s, st, w = self.spec, t.stats, t.linear.weight
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
