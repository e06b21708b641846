"""Compression methods, one module each, behind LayerwiseMethod."""
from __future__ import annotations

from .base import LayerwiseMethod, PruneMethod, Target
from .cfsp import CFSP
from .dsnot import DSnoT
from .magnitude import Magnitude
from .sparsegpt import SparseGPT
from .structured import MagnitudeSP, StructuredMethod, WandaSP
from .wanda import Wanda

METHODS: dict[str, type[LayerwiseMethod]] = {"magnitude": Magnitude, "wanda": Wanda, "sparsegpt": SparseGPT, "dsnot": DSnoT}


STRUCTURED: dict[str, type[StructuredMethod]] = {"cfsp": CFSP, "wanda-sp": WandaSP, "magnitude": MagnitudeSP}


def build_method(spec) -> LayerwiseMethod:
    return METHODS[spec.method](spec)


def build_structured(spec) -> StructuredMethod:
    return STRUCTURED[spec.method](spec)


__all__ = ["LayerwiseMethod", "PruneMethod", "Target", "METHODS", "build_method", "StructuredMethod", "STRUCTURED",
           "build_structured"]
