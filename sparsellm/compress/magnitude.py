from __future__ import annotations

import torch
from torch import nn

from ..recipe import MagnitudePrune
from .base import LayerwiseMethod
from .masks import layer_mask, nm_mask, row_mask


def magnitude_mask(weight: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, scope: str) -> torch.Tensor:
    scores = weight.abs().float()
    if nm:
        return nm_mask(scores, *nm)
    return row_mask(scores, sparsity) if scope == "row" else layer_mask(scores, sparsity)


class Magnitude(LayerwiseMethod):
    def __init__(self, spec: MagnitudePrune):
        self.spec = spec

    @torch.no_grad()
    def compress(self, name: str, linear: nn.Linear, stats) -> None:
        mask = magnitude_mask(linear.weight, self.spec.sparsity, self.spec.nm, self.spec.scope)
        linear.weight.masked_fill_(mask, 0)
