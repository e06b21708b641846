"""Compression methods, one module each, behind LayerwiseMethod."""
from __future__ import annotations

from .base import LayerwiseMethod, PruneMethod, Target
from .dsnot import DSnoT
from .magnitude import Magnitude
from .sparsegpt import SparseGPT
from .wanda import Wanda

METHODS: dict[str, type[LayerwiseMethod]] = {"magnitude": Magnitude, "wanda": Wanda, "sparsegpt": SparseGPT, "dsnot": DSnoT}


def build_method(spec) -> LayerwiseMethod:
    return METHODS[spec.method](spec)


__all__ = ["LayerwiseMethod", "PruneMethod", "Target", "METHODS", "build_method"]
