"""Recipe schema: what to calibrate on, which compression stages to run, what to evaluate.

A recipe is YAML validated by pydantic; any problem becomes one RecipeError naming the field.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RecipeError

HUB_DATASETS = ("wikitext2", "c4")


def _check_data_source(value: str) -> str:
    if value in HUB_DATASETS:
        return value
    if not Path(value).is_file():
        raise ValueError(f"not {' or '.join(HUB_DATASETS)}, and no such file")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Calibration(_Strict):
    dataset: str = "wikitext2"
    nsamples: int = Field(128, gt=0)
    seqlen: int | None = Field(None, gt=0, description="default: min(2048, model context)")
    batch_size: int = Field(8, gt=0, description="windows per layer forward")

    @field_validator("dataset")
    @classmethod
    def _source(cls, v: str) -> str:
        return _check_data_source(v)


class Evaluation(_Strict):
    ppl: list[str] = Field(default_factory=list, description="datasets to report perplexity on")
    seqlen: int | None = Field(None, gt=0, description="default: the calibration seqlen")
    batch_size: int = Field(4, gt=0)
    limit: int | None = Field(None, gt=0, description="evaluate at most this many chunks")
    before: bool = Field(True, description="also evaluate the uncompressed model")

    @field_validator("ppl")
    @classmethod
    def _sources(cls, v: list[str]) -> list[str]:
        return [_check_data_source(s) for s in v]


_PATTERN = re.compile(r"^(\d+):(\d+)$")


class _PruneBase(_Strict):
    sparsity: float | None = Field(None, ge=0.0, lt=1.0, description="fraction of weights set to zero")
    pattern: str = Field("unstructured", description='"unstructured" or "N:M" (N zeros in every M inputs)')
    targets: list[str] = Field(default_factory=list, description="glob (or re:REGEX) on module names; default: every Linear in the decoder layers")
    ignore: list[str] = Field(default_factory=list, description="glob (or re:REGEX) on module names to leave untouched")

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        if v == "unstructured":
            return v
        m = _PATTERN.match(v)
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


class MagnitudePrune(_PruneBase):
    method: Literal["magnitude"]
    scope: Literal["layer", "row"] = Field("layer", description="compare |W| across the whole matrix (classic) or per output row")


class WandaPrune(_PruneBase):
    method: Literal["wanda"]


class SparseGPTPrune(_PruneBase):
    method: Literal["sparsegpt"]
    blocksize: int = Field(128, gt=0, description="columns per lazy-update block")
    percdamp: float = Field(0.01, ge=0.0, description="Hessian damping, fraction of its mean diagonal")
    true_sequential: bool = Field(False, description="prune q/k/v, then o, then gate/up, then down, re-collecting inputs between")
    scope: Literal["block", "row"] = Field("block", description="unstructured mask chosen per column block across all rows (paper) or per row within each block")


PruneSpec = Annotated[Union[MagnitudePrune, WandaPrune, SparseGPTPrune], Field(discriminator="method")]


class _AllocateBase(_Strict):
    sparsity: float | None = Field(None, ge=0.0, lt=1.0, description="overall target; default and must-match: the next prune stage's sparsity")
    min_sparsity: float = Field(0.0, ge=0.0, lt=1.0, description="no layer is pruned less than this")
    max_sparsity: float | None = Field(None, gt=0.0, lt=1.0, description="no layer is pruned more than this "
                                       "(default: 0.99 for owl, target + 0.1 for ecoflap as in its scripts)")


class OWLAllocate(_AllocateBase):
    """Outlier-weighted layer-wise sparsity (Yin et al., 2024)."""
    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)
    method: Literal["owl"]
    lam: float = Field(0.08, alias="lambda", ge=0.0, lt=1.0, description="layer sparsities span target ± lambda")
    M: float = Field(5.0, gt=0.0, description="a score is an outlier above M times its layer's mean score")


class ECoFLaPAllocate(_AllocateBase):
    """Layer sparsity from a zeroth-order (forward-only) estimate of each layer's global importance (Sung et al., 2024)."""
    method: Literal["ecoflap"]
    nsamples: int = Field(8, gt=0, description="calibration windows used for the estimate (the first ones)")
    num_noise: int = Field(2, gt=0, description="random directions per window and layer")
    eps: float = Field(1e-3, gt=0.0, description="finite-difference step along each direction")
    aggregate: Literal["sum", "avg"] = Field("sum", description="layer score: summed, or divided by the layer's parameter count")
    importance: list[float] | None = Field(None, description="per-layer importance from an earlier run's report.json "
                                           "(allocation.importance): skips the estimate, e.g. to try other targets")


AllocateSpec = Annotated[Union[OWLAllocate, ECoFLaPAllocate], Field(discriminator="method")]


class DSnoTRefine(_Strict):
    """Training-free prune-and-grow on the mask of the prune stage just before it (Zhang et al., 2024)."""
    method: Literal["dsnot"]
    max_cycles: int = Field(50, gt=0, description="at most this many swaps per row")
    update_threshold: float = Field(0.1, ge=0.0, description="a row stops once |its error| is at most this "
                                    "(unit: the error summed over one calibration window, as in the reference)")
    pow_of_var: float = Field(1.0, ge=0.0, description="grow the weight of largest contribution / Var[x]^p")
    same_sign: bool = Field(False, description="also reject swaps that flip the sign of the row's error")
    criterion: Literal["mean", "mse"] = Field("mse", description="take a swap when it shrinks |mean error| (the paper), "
                                              "or only when it also lowers the row's expected squared error (default: "
                                              "measured better, see README)")
    verify: bool = Field(True, description="keep a row's new mask only if its exact output error on the calibration "
                         "inputs, E[((W_dense − W) x)²], is lower than with the starting mask (needs XᵀX per layer)")
    modules: Literal["attention", "mlp", "all"] = Field("all", description="which pruned Linear layers to refine "
                                                         "(default all: measured best with verify; see README)")
    targets: list[str] = Field(default_factory=list, description="glob (or re:REGEX) on module names, within `modules`")
    ignore: list[str] = Field(default_factory=list, description="glob (or re:REGEX) on module names to leave as pruned")


RefineSpec = Annotated[Union[DSnoTRefine], Field(discriminator="method")]


class SliceGPTSlice(_Strict):
    """Rotate the residual stream into its principal directions and delete the weakest ones (Ashkboos et al., 2024)."""
    method: Literal["slicegpt"]
    slicing: float = Field(ge=0.0, lt=1.0, description="fraction of the hidden (embedding) dimension to remove")
    rotation: Literal["per-layer", "uniform"] = Field("per-layer", description="a PCA basis per signal with shortcut "
                                                      "matrices on the residual (the paper; output needs "
                                                      "trust_remote_code), or one basis for the whole residual stream "
                                                      "(RMSNorm models: a stock architecture with a smaller hidden size)")
    round_to: int = Field(8, gt=0, description="round the kept width down to a multiple of this (fast kernels)")
    slice_head: bool = Field(False, description="per-layer: also slice the last layer's output and the head's input "
                             "(the reference's default keeps them full); uniform always slices it")
    damp: float = Field(0.01, ge=0.0, description="PCA damping, fraction of the covariance's mean diagonal")
    keep_tied: bool = Field(False, description="uniform, tied embeddings: keep the head tied to the embeddings (smaller) "
                            "with the final norm scale fitted by least squares in the rotated basis; only exact when "
                            "that scale is constant, measured costly on SmolLM2 (see README). Default: a separate head")


SliceSpec = Annotated[Union[SliceGPTSlice], Field(discriminator="method")]


class Stage(_Strict):
    slice: SliceSpec | None = None
    allocate: AllocateSpec | None = None
    prune: PruneSpec | None = None
    refine: RefineSpec | None = None

    @model_validator(mode="after")
    def _one_kind(self):
        kinds = [k for k in type(self).model_fields if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"a stage has exactly one of: {', '.join(type(self).model_fields)}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in type(self).model_fields if getattr(self, k) is not None)

    @property
    def spec(self):
        return getattr(self, self.kind)


EXPORT_FORMATS = ("dense", "sparse-bitmask", "sparse-24-bitmask")


class Export(_Strict):
    format: Literal[EXPORT_FORMATS] = Field(
        "dense", description="on-disk weights: dense (zeros stored; loads anywhere, servable by vLLM), or the "
        "compressed-tensors bitmask formats for storage and transfer (sparse-24-bitmask: 2:4 weights only)")


class Recipe(_Strict):
    model: str | None = Field(None, description="hub id, local folder, .gguf file or smollm2-135m")
    seed: int = 0
    calibration: Calibration = Field(default_factory=Calibration)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    stages: list[Stage] = Field(min_length=1)
    export: Export = Field(default_factory=Export)

    @model_validator(mode="after")
    def _stage_order(self):
        kinds = [st.kind for st in self.stages]
        for i, st in enumerate(self.stages):
            nxt = self.stages[i + 1] if i + 1 < len(kinds) else None
            if st.kind == "allocate":
                if nxt is None or nxt.kind != "prune":
                    raise ValueError(f"stages.{i}: an allocate stage must be followed by a prune stage")
                a, p = st.spec, nxt.spec
                if a.sparsity is not None and abs(a.sparsity - p.sparsity) > 1e-9:
                    raise ValueError(f"stages.{i}: allocate sparsity {a.sparsity} differs from the prune stage's {p.sparsity}")
                if not a.min_sparsity <= p.sparsity <= (a.max_sparsity or 1.0):
                    raise ValueError(f"stages.{i}: target sparsity {p.sparsity} is outside [min_sparsity, max_sparsity]")
            if st.kind == "prune" and st.spec.nm:
                m = st.spec.nm[1]
                for j, prev in enumerate(self.stages[:i]):
                    if prev.kind == "slice" and prev.spec.round_to % m:
                        raise ValueError(f"stages.{j}: round_to {prev.spec.round_to} must be a multiple of M={m} "
                                         f"for the {st.spec.pattern} stage after it")
            if st.kind == "refine" and (i == 0 or kinds[i - 1] not in ("prune", "refine")):
                raise ValueError(f"stages.{i}: a refine stage must come right after a prune (or refine) stage, "
                                 "whose dense weights it needs")
        fmt, prunes = self.export.format, [(i, st.spec) for i, st in enumerate(self.stages) if st.kind == "prune"]
        if fmt != "dense" and not prunes:
            raise ValueError(f"export format {fmt} stores pruned weights, but no stage prunes; add a prune stage "
                             "or export as dense")
        for i, spec in prunes:
            if fmt == "sparse-24-bitmask" and spec.pattern != "2:4":
                raise ValueError(f"export format sparse-24-bitmask needs 2:4 weights, but stages.{i} prunes with "
                                 f"pattern {spec.pattern}; use pattern 2:4 or export as sparse-bitmask")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True, by_alias=True), sort_keys=False)


def _format_error(err: ValidationError, origin: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        got = e.get("input")
        tail = f" (got {got!r})" if isinstance(got, (int, float, str)) and e["type"] != "extra_forbidden" else ""
        parts.append(f"{loc}: {msg}{tail}" if loc else f"{msg}{tail}")
    fix = "fix that option (see sparsellm prune --help)" if origin == "command line" else \
        f"fix {'that field' if len(parts) == 1 else 'those fields'} (see 'Recipe reference' in README.md)"
    return f"invalid recipe ({origin}): " + "; ".join(parts) + "; " + fix


def recipe_from_dict(data: object, origin: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"invalid recipe ({origin}): expected a mapping at the top level; "
                          "a recipe is a YAML mapping with a stages list (see recipes/)")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_format_error(e, origin)) from None


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {path}; check the path (ready recipes are in recipes/)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"cannot read recipe {path}: {e}; give a readable UTF-8 YAML file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"recipe {path} is not valid YAML{where}: {getattr(e, 'problem', e)}; fix the syntax there") from None
    return recipe_from_dict(data, str(path))
