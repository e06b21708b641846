from __future__ import annotations

import torch
from torch import nn

from ..recipe import WandaPrune
from .base import LayerwiseMethod
from .masks import nm_mask, row_mask


def wanda_scores(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 (input-channel norm over calibration tokens; any constant scale is irrelevant)."""
    return weight.abs().float() * sq_norm.float().sqrt().to(weight.device)[None, :]


def wanda_mask(weight: torch.Tensor, sq_norm: torch.Tensor, sparsity: float, nm: tuple[int, int] | None) -> torch.Tensor:
    scores = wanda_scores(weight, sq_norm)
    return nm_mask(scores, *nm) if nm else row_mask(scores, sparsity)


class Wanda(LayerwiseMethod):
    needs = frozenset({"sq_norm"})

    def __init__(self, spec: WandaPrune):
        self.spec = spec

    @torch.no_grad()
    def compress(self, name: str, linear: nn.Linear, stats) -> None:
        mask = wanda_mask(linear.weight, stats.sq_norm, self.spec.sparsity, self.spec.nm)
        linear.weight.masked_fill_(mask, 0)
