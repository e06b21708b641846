"""The one interface every layer-wise compression method implements."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from torch import nn

from ..calibrate.stats import InputStats


class LayerwiseMethod(ABC):
    """Compresses Linear layers one at a time from statistics of their inputs.

    The engine collects the statistics named in `needs` ("sq_norm", "hessian", "mean") for every
    targeted Linear of a decoder layer with forward hooks, then calls `compress` for each."""

    needs: ClassVar[frozenset[str]] = frozenset()
    true_sequential: bool = False

    @abstractmethod
    def compress(self, name: str, linear: nn.Linear, stats: InputStats | None) -> None:
        """Modify linear.weight in place."""
