"""OWL, outlier-weighted layer-wise sparsity (Yin et al., ICML 2024).

A dense calibration pass scores every weight as Wanda does, |W_ij|·‖X_j‖; a layer's outlier ratio is
the share of its scores above M times the layer's mean score. Layers with more outliers are pruned
less: sparsity = target − outlier ratio min-max normalized to [0, 2λ], re-centered on the target."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import ConfigDict, Field

from ..calibrate import run_layerwise
from ..calibrate.engine import MIN_EXPERT_TOKENS
from ..compress.base import LayerwiseMethod, Target
from ..compress.wanda import wanda_scores
from ..stage import register
from .base import AllocateSpec, owl_sparsities


class OWLAllocate(AllocateSpec):
    """Outlier-weighted layer-wise sparsity (Yin et al., 2024)."""
    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)
    method: Literal["owl"]
    lam: float = Field(0.08, alias="lambda", ge=0.0, lt=1.0, description="layer sparsities span target ± lambda")
    M: float = Field(5.0, gt=0.0, description="a score is an outlier above M times its layer's mean score")


class OutlierRatios(LayerwiseMethod):
    """Measures, never modifies: per decoder layer, the share of Wanda scores above M x their mean."""

    needs = frozenset({"sq_norm"})

    def __init__(self, M: float):
        self.M = M
        self.ratios: dict[int, float] = {}
        self._scores: list[torch.Tensor] = []

    @torch.no_grad()
    def compress(self, t: Target) -> None:
        self._scores.append(wanda_scores(t.linear.weight, t.stats.sq_norm).flatten())

    def finish_layer(self, layer: int) -> None:
        if self._scores:
            s = torch.cat(self._scores)
            self.ratios[layer] = float((s > self.M * s.double().mean()).double().mean())
        self._scores = []


def owl_allocate(model, adapter, windows, select, device, batch_size, target: float, lam: float, M: float,
                 io=None, min_expert_tokens: int = MIN_EXPERT_TOKENS) -> tuple[list[float], dict]:
    probe = OutlierRatios(M)
    run_layerwise(model, adapter, windows, [probe], select, device, batch_size, desc="owl outliers", io=io,
                  min_expert_tokens=min_expert_tokens)
    n = len(adapter.layers(model))
    ratios = [probe.ratios.get(i, 0.0) for i in range(n)]
    return owl_sparsities(ratios, target, lam), {"outlier_ratio": ratios}


def owl_allocation(spec, *, model, adapter, windows, select, device, batch_size, seed, target, hi, sizes, io,
                   min_expert_tokens=MIN_EXPERT_TOKENS):
    return owl_allocate(model, adapter, windows, select, device, batch_size, target, spec.lam, spec.M, io,
                        min_expert_tokens)


register("allocate", OWLAllocate, owl_allocation)
