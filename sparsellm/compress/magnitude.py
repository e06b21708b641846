"""Magnitude pruning: the smallest |W| go, per matrix (classic) or per output row; needs no data."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..stage import register
from .base import PruneMethod, PruneSpec, Target
from .masks import layer_mask, nm_mask, row_mask


class MagnitudePrune(PruneSpec):
    """Zero the weights of smallest magnitude |W| (the data-free baseline)."""

    method: Literal["magnitude"]
    scope: Literal["layer", "row"] = Field("layer", description="compare |W| across the whole matrix (classic) or per output row")


def magnitude_mask(weight: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, scope: str) -> torch.Tensor:
    scores = weight.abs().float()
    if nm:
        return nm_mask(scores, *nm)
    return row_mask(scores, sparsity) if scope == "row" else layer_mask(scores, sparsity)


class Magnitude(PruneMethod):
    spec: MagnitudePrune

    @torch.no_grad()
    def compress(self, t: Target) -> None:
        mask = magnitude_mask(t.linear.weight, self.sparsity_at(t.layer), self.nm_at(t.layer), self.spec.scope)
        t.linear.weight.masked_fill_(mask, 0)


register("prune", MagnitudePrune, Magnitude)
