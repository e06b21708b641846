from __future__ import annotations

import torch
from ..recipe import MagnitudePrune
from .base import PruneMethod, Target
from .masks import layer_mask, nm_mask, row_mask


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
