"""Wanda (Sun et al., 2024): prune by |W_ij|·‖X_j‖ within each output row (or N:M group)."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..stage import register
from .base import PruneMethod, PruneSpec, Target
from .masks import nm_mask, row_mask


class WandaPrune(PruneSpec):
    """Zero the weights of smallest |W|·‖x‖ in each output row (or N:M group), x the calibration inputs (Sun et al., 2024)."""

    method: Literal["wanda"]
    true_sequential: bool = Field(False, description="prune q/k/v, then o, then gate/up, then down, each from the inputs the already "
                                  "pruned ones give; in one forward per layer when the layer fits in memory for all windows at once")


def wanda_scores(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 (input-channel norm over calibration tokens; any constant scale is irrelevant)."""
    return weight.abs().float() * sq_norm.float().sqrt().to(weight.device)[None, :]


def wanda_mask(weight: torch.Tensor, sq_norm: torch.Tensor, sparsity: float, nm: tuple[int, int] | None) -> torch.Tensor:
    scores = wanda_scores(weight, sq_norm)
    return nm_mask(scores, *nm) if nm else row_mask(scores, sparsity)


class Wanda(PruneMethod):
    needs = frozenset({"sq_norm"})
    spec: WandaPrune

    @torch.no_grad()
    def compress(self, t: Target) -> None:
        mask = wanda_mask(t.linear.weight, t.stats.sq_norm, self.sparsity_at(t.layer), self.nm_at(t.layer))
        t.linear.weight.masked_fill_(mask, 0)


register("prune", WandaPrune, Wanda)
