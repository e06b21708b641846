"""Recipe schema: what to calibrate on, which compression stages to run, what to evaluate.

A recipe is YAML validated by pydantic; any problem becomes one RecipeError naming the field.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import safe_yaml
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


class Speed(_Strict):
    """Prefill/decode throughput of the dense and the compressed model, interleaved repeat by repeat."""
    prefill_tokens: int = Field(512, gt=0, description="prompt length of the prefill measurement")
    decode_prompt: int = Field(64, gt=0, description="prompt before the decode steps")
    decode_tokens: int = Field(64, gt=0, description="greedy steps with the KV cache")
    repeats: int = Field(5, gt=0, description="the median of this many repeats is reported")
    warmup: int = Field(1, ge=0, description="unreported repeats first")


class Evaluation(_Strict):
    ppl: list[str] = Field(default_factory=list, description="datasets to report perplexity on")
    seqlen: int | None = Field(None, gt=0, description="default: the calibration seqlen")
    batch_size: int = Field(4, gt=0)
    limit: int | None = Field(None, gt=0, description="evaluate at most this many chunks")
    before: bool = Field(True, description="also evaluate the uncompressed model")
    tasks: list[str] = Field(default_factory=list, description="lm-eval tasks (names, 'suite' for the papers' "
                             "eight, or task YAML files): accuracy before/after")
    task_paths: list[str] = Field(default_factory=list, description="folders of lm-eval task YAMLs (include_path)")
    task_limit: int | None = Field(None, gt=0, description="at most this many examples per task")
    num_fewshot: int | None = Field(0, ge=0, description="few-shot examples (null: each task's default)")
    task_batch_size: int = Field(8, gt=0, description="lm-eval batch size")
    speed: Speed | None = Field(None, description="measure prefill/decode tokens/s of dense vs compressed "
                                "(true for the defaults)")

    @field_validator("ppl")
    @classmethod
    def _sources(cls, v: list[str]) -> list[str]:
        return [_check_data_source(s) for s in v]

    @field_validator("speed", mode="before")
    @classmethod
    def _speed_flag(cls, v):
        return {} if v is True else None if v is False else v


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


class MaskLLMLearn(_Strict):
    """Learn N:M masks end to end with the weights frozen (Fang et al., 2024)."""
    method: Literal["maskllm"]
    pattern: str = Field("2:4", description='"N:M" (N zeros in every M inputs); one logit per admissible pattern')
    prior: Literal["sparsegpt", "wanda", "magnitude", "none"] = Field(
        "sparsegpt", description="one-shot mask the logits start from (SparseGPT without its weight update)")
    prior_strength: float = Field(3.0, ge=0.0, description="logit bonus of the prior's pattern, in units of init_std")
    init_std: float = Field(0.01, gt=0.0, description="std of the random initial logits")
    steps: int = Field(100, ge=0, description="optimizer steps")
    batch_size: int = Field(1, gt=0, description="windows per micro-batch (per process)")
    accumulate: int = Field(1, gt=0, description="micro-batches per optimizer step")
    dataset: str | None = Field(None, description="training text; default: the calibration dataset")
    nsamples: int | None = Field(None, gt=0, description="training windows drawn (cycled); default: one per "
                                 "micro-batch entry, steps × batch_size × accumulate")
    seqlen: int | None = Field(None, gt=0, description="tokens per training window; default: the calibration seqlen")
    lr: float = Field(5e-4, gt=0.0, description="peak learning rate of the logits (cosine decay to min_lr)")
    min_lr: float = Field(5e-5, ge=0.0)
    tau: tuple[float, float] = Field((4.0, 0.05), description="Gumbel-softmax temperature, first → last step")
    kappa: tuple[float, float] = Field((100.0, 500.0), description="logit scale, first → last step")
    weight_reg: float = Field(1e-5, ge=0.0, description="weight of −‖W ⊙ mask‖² (keeps kept weights large), "
                              "fading linearly to 0")
    grad_clip: float = Field(1.0, ge=0.0, description="max gradient norm of the logits (0: off)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward (less memory)")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field("auto", description="auto: bf16 autocast on CUDA, none on CPU")
    checkpoint_every: int = Field(50, ge=0, description="save the logits every N steps with --checkpoint-dir (0: never)")
    log_every: int = Field(10, gt=0, description="record loss, τ, κ and the share of changed patterns every N steps")
    targets: list[str] = Field(default_factory=list, description="glob (or re:REGEX) on module names; default: every Linear in the decoder layers")
    ignore: list[str] = Field(default_factory=list, description="glob (or re:REGEX) on module names to leave dense")

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        m = _PATTERN.match(v)
        if not m or not 0 < int(m[1]) < int(m[2]):
            raise ValueError('must be "N:M" with 0 < N < M, like "2:4"')
        if math.comb(int(m[2]), int(m[1])) > 256:
            raise ValueError("too many patterns per group (C(M, N) > 256); use 2:4 or 4:8")
        return v

    @field_validator("dataset")
    @classmethod
    def _source(cls, v: str | None) -> str | None:
        return v if v is None else _check_data_source(v)

    @model_validator(mode="after")
    def _ranges(self):
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} exceeds lr {self.lr}")
        if min(self.tau) <= 0 or min(self.kappa) <= 0:
            raise ValueError("tau and kappa must be positive")
        return self

    @property
    def nm(self) -> tuple[int, int]:
        n, m = self.pattern.split(":")
        return int(n), int(m)


LearnSpec = Annotated[Union[MaskLLMLearn], Field(discriminator="method")]
class _StructureBase(_Strict):
    ffn: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of FFN intermediate channels (= FFN parameters) to remove")
    heads: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of attention heads to remove, in whole KV groups "
                         "(GQA: a key/value head with all the query heads that share it)")
    round_to: int = Field(8, gt=0, description="kept FFN widths are multiples of this (e.g. 8, 64, 128 for fast kernels)")
    uniform: bool = Field(False, description="one width for every layer: a stock architecture that transformers loads "
                          "without custom code (otherwise per-layer widths need the modeling file in the output folder)")

    @model_validator(mode="after")
    def _something(self):
        if self.ffn == 0 and self.heads == 0:
            raise ValueError("nothing to remove: set ffn and/or heads to a fraction in (0, 1)")
        return self


class CFSPStructure(_StructureBase):
    """Coarse-to-fine structured pruning (Wang et al., COLING 2025): per-block budgets from how much each block
    changes its input, then channels by a score from the FFN weights and activations."""
    method: Literal["cfsp"]
    a: float = Field(25.0, ge=0.0, description="slope of the sigmoid over the blocks' mean angular distance "
                     "(0: same budget for every block)")
    b: float = Field(1.0, ge=0.0, description="exponent of the activation norm inside the down-projection term")
    c: float = Field(1.0, ge=0.0, description="exponent of the activation norm multiplying the summed weight terms")
    max_keep: float = Field(1.0, gt=0.0, le=1.0, description="no block keeps more than this fraction of its channels")
    block_distance: list[float] | None = Field(None, description="per-block angular distances from an earlier run's "
                                               "report.json (stages[].details.block_distance): skips the dense pass, "
                                               "e.g. to try other targets")


class WandaSPStructure(_StructureBase):
    """Structured Wanda (as in the FLAP paper): channel score Σ_k |W_kj|·‖x_j‖ over the channel's output weights."""
    method: Literal["wanda-sp"]


class MagnitudeStructure(_StructureBase):
    """Channel score from weight norms only (no calibration data)."""
    method: Literal["magnitude"]


StructureSpec = Annotated[Union[CFSPStructure, WandaSPStructure, MagnitudeStructure], Field(discriminator="method")]


class LoRARecover(_Strict):
    """Recovery fine-tuning with LoRA on the calibration text, merged into the weights at the end."""
    method: Literal["lora"]
    steps: int = Field(100, gt=0, description="optimizer steps")
    batch_size: int = Field(2, gt=0, description="calibration windows per step (per process)")
    lr: float = Field(2e-4, gt=0.0, description="peak learning rate (linear warm-up over 10 % of the steps, cosine decay)")
    rank: int = Field(8, gt=0, description="LoRA rank (the mean over blocks when importance_guided)")
    alpha: float = Field(16.0, gt=0.0, description="LoRA scale numerator: the update is (alpha / rank)·B·A")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    importance_guided: bool = Field(True, description="after CFSP: each block's rank in proportion to its coarse "
                                    "importance (the paper's IG-LoRA); otherwise the same rank everywhere")


RecoverSpec = Annotated[Union[LoRARecover], Field(discriminator="method")]


class Stage(_Strict):
    slice: SliceSpec | None = None
    learn: LearnSpec | None = None
    structure: StructureSpec | None = None
    recover: RecoverSpec | None = None
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
            if st.kind in ("prune", "learn") and st.spec.nm:
                m = st.spec.nm[1]
                for j, prev in enumerate(self.stages[:i]):
                    if prev.kind == "slice" and prev.spec.round_to % m:
                        raise ValueError(f"stages.{j}: round_to {prev.spec.round_to} must be a multiple of M={m} "
                                         f"for the {st.spec.pattern} stage after it")
            if st.kind == "learn" and any(prev.kind in ("prune", "refine", "learn") for prev in self.stages[:i]):
                raise ValueError(f"stages.{i}: a learn stage needs the dense weights; put it before any prune stage "
                                 "(it computes its prior mask itself: prior: sparsegpt)")
            if st.kind == "recover":
                if not any(k in ("structure", "slice") for k in kinds[:i]):
                    raise ValueError(f"stages.{i}: a recover stage fine-tunes a structurally pruned model: put a "
                                     "structure (or slice) stage before it")
                if "prune" in kinds[:i] or "learn" in kinds[:i]:
                    raise ValueError(f"stages.{i}: a recover stage cannot follow a prune stage (merging LoRA would "
                                     "fill in the pruned zeros); prune after recovering")
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
        data = safe_yaml.load(text)  # refuses alias bombs and over-deep nesting (bounded memory)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"recipe {path} is not valid YAML{where}: {getattr(e, 'problem', e)}; fix the syntax there") from None
    return recipe_from_dict(data, str(path))
