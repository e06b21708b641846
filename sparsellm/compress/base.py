"""The one interface every layer-wise compression method implements."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from ..calibrate.stats import Target
from ..specs import PruneSpec

__all__ = ["Target", "PruneSpec", "LayerwiseMethod", "PruneMethod"]


class LayerwiseMethod(ABC):
    """Compresses Linear layers one at a time from statistics of their inputs.

    The engine collects the statistics named in `needs` ("sq_norm", "hessian", "mean") for every
    targeted Linear of a decoder layer with forward hooks, then calls `compress` for each; several
    methods can share one pass (a prune stage and the refine stage after it)."""

    needs: ClassVar[frozenset[str]] = frozenset()
    needs_dense: ClassVar[bool] = False
    true_sequential: bool = False

    @abstractmethod
    def compress(self, t: Target) -> None:
        """Modify t.linear.weight in place."""

    def finish_layer(self, layer: int) -> None:
        """Called after every Linear of decoder layer `layer` went through `compress`."""

    def state(self) -> dict:
        """Running state kept across layers (JSON-serializable), saved with each layer's checkpoint."""
        return {}

    def load_state(self, state: dict) -> None:
        """Restore what `state` returned, when a run resumes from a checkpoint."""


class PruneMethod(LayerwiseMethod):
    """A method with a target sparsity, optionally varied per decoder layer by an allocate stage."""

    def __init__(self, spec):
        self.spec = spec
        self.layer_sparsity: list[float] | None = None
        self.true_sequential = bool(getattr(spec, "true_sequential", False))  # an option of Wanda and SparseGPT

    def sparsity_at(self, layer: int) -> float:
        return self.spec.sparsity if self.layer_sparsity is None else self.layer_sparsity[layer]

    def nm_at(self, layer: int) -> tuple[int, int] | None:
        """N:M of a layer; an allocation gives layers different N (multiples of 1/M of sparsity)."""
        if not self.spec.nm:
            return None
        m = self.spec.nm[1]
        return round(self.sparsity_at(layer) * m), m
