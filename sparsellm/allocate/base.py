"""Turning per-layer scores into per-layer sparsities that keep the overall target.

Pure functions over lists; `sizes[l]` are the (rows, cols) of the pruned Linear layers of decoder
layer l. Row-wise pruning removes floor(s * cols) weights per row, so the overall sparsity a set of
layer ratios achieves is computed with that rounding, and the allocation is shifted until it meets
the target (within one row's weights), not merely on paper."""
from __future__ import annotations

import math

from pydantic import Field

from ..specs import Strict


class AllocateSpec(Strict):
    """What every allocation spec has: the overall target and the bounds of a layer's sparsity."""

    sparsity: float | None = Field(None, ge=0.0, lt=1.0, description="overall target; default and must-match: the next prune stage's sparsity")
    min_sparsity: float = Field(0.0, ge=0.0, lt=1.0, description="no layer is pruned less than this")
    max_sparsity: float | None = Field(None, gt=0.0, lt=1.0, description="no layer is pruned more than this "
                                       "(default: 0.99 for owl, target + 0.1 for ecoflap as in its scripts)")

    def max_at(self, target: float) -> float:
        """The highest sparsity of any layer: max_sparsity, or the method's default (OWL only needs room below 1)."""
        return self.max_sparsity if self.max_sparsity is not None else 0.99



def realized(sparsities: list[float], sizes: list[list[tuple[int, int]]]) -> float:
    """Overall fraction of weights row-wise pruning removes with these per-layer sparsities."""
    zeros = total = 0
    for s, shapes in zip(sparsities, sizes):
        for rows, cols in shapes:
            zeros += rows * int(cols * s)
            total += rows * cols
    return zeros / total if total else 0.0


def fit_mean(raw: list[float], sizes, target: float, lo: float = 0.0, hi: float = 0.99) -> list[float]:
    """Shift `raw` by one constant (clipping to [lo, hi]) so that the realized overall sparsity is as
    close to `target` as the per-row rounding allows."""
    def shifted(d):
        return [min(hi, max(lo, r + d)) for r in raw]

    a, b = -1.0 - max(raw), 1.0 - min(raw)  # realized(a) = lo-everywhere <= target <= realized(b)
    for _ in range(100):
        mid = (a + b) / 2
        if realized(shifted(mid), sizes) >= target:
            b = mid
        else:
            a = mid
    below, above = shifted(a), shifted(b)
    return below if target - realized(below, sizes) < realized(above, sizes) - target else above


def round_nm(sparsities: list[float], sizes, target: float, m: int) -> list[float]:
    """Per-layer sparsities as multiples of 1/m (mixed N:M) whose parameter-weighted mean is as close
    to `target` as whole layers allow: floor, then add 1/m to the layers with the largest remainders."""
    weights = [sum(r * c for r, c in shapes) for shapes in sizes]
    total = sum(weights)
    n = [min(m - 1, max(0, math.floor(s * m))) for s in sparsities]
    order = sorted(range(len(n)), key=lambda i: (sparsities[i] * m - n[i]), reverse=True)
    for i in order:
        deficit = target * m * total - sum(w * k for w, k in zip(weights, n))
        if deficit >= weights[i] / 2 and n[i] < m - 1:
            n[i] += 1
    return [k / m for k in n]


def water_fill(scores: list[float], params: list[int], target: float, max_sparsity: float) -> list[float]:
    """ECoFLaP's allocation: every layer keeps at least (1 - max_sparsity) of its weights, the rest of
    the keep budget goes to layers in proportion to their scores, never more than a layer has."""
    keep_total = (1 - target) * sum(params)
    keep = [(1 - max_sparsity) * p for p in params]
    free = [i for i, s in enumerate(scores) if s > 0]
    for _ in range(len(params) + 1):
        rest = keep_total - sum(keep)
        if rest <= 1e-9 * keep_total or not free:
            break
        z = sum(scores[i] for i in free)
        for i in free:
            keep[i] = min(params[i], keep[i] + rest * scores[i] / z)
        free = [i for i in free if keep[i] < params[i]]
    return [1 - k / p for k, p in zip(keep, params)]


def owl_sparsities(outlier_ratios: list[float], target: float, lam: float) -> list[float]:
    """OWL: layer sparsity = target − (outlier ratio min-max normalized to [0, 2λ]), before re-centering."""
    lo, hi = min(outlier_ratios), max(outlier_ratios)
    if hi - lo <= 0:
        return [target] * len(outlier_ratios)
    return [target - 2 * lam * (r - lo) / (hi - lo) for r in outlier_ratios]
