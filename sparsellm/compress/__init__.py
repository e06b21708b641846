"""Compression methods, one module each: a pure tensor function plus a thin class behind LayerwiseMethod
(or StructuredMethod), with its recipe spec, registered as a stage method (stage.py)."""
from __future__ import annotations

from ..stage import implementation
from .base import LayerwiseMethod, PruneMethod, Target
from .prune import build_method
from .structured import StructuredMethod


def build_structured(spec) -> StructuredMethod:
    return implementation("structure", spec.method)(spec)


__all__ = ["LayerwiseMethod", "PruneMethod", "Target", "build_method", "StructuredMethod", "build_structured"]
