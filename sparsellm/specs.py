"""What every recipe spec shares: strict models (unknown keys are errors), data sources, N:M patterns.

The specs themselves live beside the code that runs them (compress/, allocate/, recover/) and register
there (stage.py); recipe.py assembles the schema from that registry."""
from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

HUB_DATASETS = ("wikitext2", "c4")
EXPORT_FORMATS = ("dense", "sparse-bitmask", "sparse-24-bitmask")
EXPORT_DTYPES = ("auto", "float32", "float16", "bfloat16")


def check_data_source(value: str) -> str:
    """wikitext2, c4, hf:ORG/NAME[:CONFIG[:SPLIT[:FIELD]]] or an existing file (ValueError: pydantic names
    the field)."""
    from .data import check_source

    return check_source(value)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


PATTERN = re.compile(r"^(\d+):(\d+)$")


class PruneSpec(Strict):
    """What every prune method's spec has: a sparsity or N:M pattern, and which Linears."""

    sparsity: float | None = Field(None, ge=0.0, lt=1.0, description="fraction of weights set to zero; required unless an N:M pattern implies it")
    pattern: str = Field("unstructured", description='"unstructured" or "N:M" (N zeros in every M inputs)')
    targets: list[str] = Field(default_factory=list, description="glob (or re:REGEX) on module names; default: every Linear in the decoder layers")
    ignore: list[str] = Field(default_factory=list, description="glob (or re:REGEX) on module names to leave untouched")

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        if v == "unstructured":
            return v
        m = PATTERN.match(v)
        if not m:
            raise ValueError('must be "unstructured" or "N:M" like "2:4"')
        n, mm = int(m[1]), int(m[2])
        if not 0 < n < mm:
            raise ValueError("N:M needs 0 < N < M")
        return v

    @model_validator(mode="after")
    def _sparsity_matches_pattern(self):
        nm = self.nm
        if nm is None:
            if self.sparsity is None:
                raise ValueError("sparsity is required for unstructured pruning")
        else:
            implied = nm[0] / nm[1]
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise ValueError(f"sparsity {self.sparsity} contradicts pattern {self.pattern} (= {implied})")
            self.sparsity = implied
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        if self.pattern == "unstructured":
            return None
        n, m = self.pattern.split(":")
        return int(n), int(m)
