"""Recipe schema: what to calibrate on, which compression stages to run, what to evaluate.

A recipe is YAML validated by pydantic; any problem becomes one RecipeError naming the field. The
stage specs come from the stage registry (stage.py): each method's spec lives beside its code, and
the schema is rebuilt when a method registers after it was first built.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import yaml
from pydantic import Field, ValidationError, create_model, field_validator, model_validator

from . import stage as registry
from . import safe_yaml
from .errors import RecipeError
from .specs import EXPORT_DTYPES, EXPORT_FORMATS, HUB_DATASETS, Strict as _Strict, check_data_source as _check_data_source

__all__ = ["EXPORT_FORMATS", "HUB_DATASETS", "recipe_from_dict", "load_recipe", "recipe_model"]

class Calibration(_Strict):
    """The text the stages calibrate on: nsamples windows of seqlen tokens."""

    dataset: str = Field("wikitext2", description="wikitext2, c4, hf:ORG/NAME[:CONFIG[:SPLIT[:FIELD]]] (a text field or "
                         "chat messages) or a local .txt / .jsonl / .json / .parquet file (see data.md)")
    nsamples: int = Field(128, gt=0, description="calibration windows drawn at random (seeded) from the text")
    seqlen: int | None = Field(None, gt=0, description="default: min(2048, model context)")
    batch_size: int = Field(8, gt=0, description="windows per layer forward")
    min_expert_tokens: int = Field(128, gt=0, description="mixture of experts: an expert the router sends fewer "
                                   "calibration tokens is pruned by a data-free score (magnitude), with a warning")

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
    """What is measured before and after the stages and written to the report."""

    ppl: list[str] = Field(default_factory=list, description="datasets to report perplexity on")
    seqlen: int | None = Field(None, gt=0, description="default: the calibration seqlen")
    batch_size: int = Field(4, gt=0, description="chunks per forward pass of the perplexity")
    limit: int | None = Field(None, gt=0, description="evaluate at most this many chunks")
    before: bool = Field(True, description="also evaluate the uncompressed model")
    tasks: list[str] = Field(default_factory=list, description="lm-eval tasks (names, 'suite' for the papers' "
                             "eight, or task YAML files): accuracy before/after")
    task_paths: list[str] = Field(default_factory=list, description="folders of lm-eval task YAMLs (include_path)")
    task_limit: int | None = Field(None, gt=0, description="at most this many examples per task")
    num_fewshot: int | None = Field(0, ge=0, description="few-shot examples (null: each task's default)")
    task_batch_size: int = Field(8, gt=0, description="lm-eval batch size")
    apply_chat_template: bool = Field(False, description="render the lm-eval tasks' prompts with the tokenizer's chat "
                                      "template (instruct models), as lm-eval's --apply_chat_template")
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

    @model_validator(mode="after")
    def _chat_template_needs_tasks(self):
        if self.apply_chat_template and not self.tasks:
            raise ValueError("apply_chat_template renders the prompts of lm-eval tasks, but no tasks are given; "
                             "add tasks (--tasks) or drop it")
        return self


class _StageBase(_Strict):
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


def _union(kind: str):
    specs = registry.specs(kind)
    return Annotated[Union[tuple(specs)], Field(discriminator="method")]




class Export(_Strict):
    """How the compressed weights are written to the output folder."""

    format: Literal[EXPORT_FORMATS] = Field(
        "dense", description="on-disk weights: dense (zeros stored; loads anywhere, servable by vLLM), or the "
        "compressed-tensors bitmask formats for storage and transfer (sparse-24-bitmask: 2:4 weights only)")
    dtype: Literal[EXPORT_DTYPES] = Field(
        "auto", description="dtype of the written weights, cast when they are saved (calibration and evaluation run "
        "in the dtype the model was loaded in); auto: bfloat16 for a GGUF source dequantized to float32, else the "
        "model's dtype")


# fields added to a section after recipes were first written, with their defaults (see _RecipeBase.dump)
LATER_FIELDS = {("export", "dtype"): "auto", ("evaluation", "apply_chat_template"): False,
                ("calibration", "min_expert_tokens"): 128}


class _RecipeBase(_Strict):
    model: str | None = Field(None, description="hub id, local folder, .gguf file or smollm2-135m")
    seed: int = Field(0, description="seed of the window sampling and of anything random in the stages")
    calibration: Calibration = Field(default_factory=Calibration, description="the calibration data (below)")
    evaluation: Evaluation = Field(default_factory=Evaluation, description="what is measured before and after (below)")

    @model_validator(mode="after")
    def _stage_order(self):
        problem = registry.order_problem(self.stages)
        if problem:
            raise ValueError(problem)
        fmt, prunes = self.export.format, [(i, st.spec) for i, st in enumerate(self.stages) if st.kind == "prune"]
        if fmt != "dense" and not prunes:
            raise ValueError(f"export format {fmt} stores pruned weights, but no stage prunes; add a prune stage "
                             "or export as dense")
        for i, spec in prunes:
            if fmt == "sparse-24-bitmask" and spec.pattern != "2:4":
                raise ValueError(f"export format sparse-24-bitmask needs 2:4 weights, but stages.{i} prunes with "
                                 f"pattern {spec.pattern}; use pattern 2:4 or export as sparse-bitmask")
        return self

    def dump(self, **options) -> dict:
        """model_dump(mode="json", **options) without the fields added later (LATER_FIELDS) where they hold
        their defaults: recipe.yaml, the report's recipe and the card of a recipe that does not use them
        stay as they were before those fields existed."""
        data = self.model_dump(mode="json", **options)
        for (section, key), default in LATER_FIELDS.items():
            if key in data[section] and data[section][key] == default:
                del data[section][key]
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.dump(exclude_none=True, by_alias=True), sort_keys=False)


_built: tuple[int, type, type] | None = None


def recipe_model() -> type:
    """The Recipe class for the methods registered now (built again after a new registration)."""
    global _built
    if _built is None or _built[0] != registry.version:
        registry.load_builtin()
        stage = create_model("Stage", __base__=_StageBase, __module__=__name__,
                             **{k: (Optional[_union(k)], None) for k in registry.KINDS})
        recipe = create_model("Recipe", __base__=_RecipeBase, __module__=__name__,
                              stages=(list[stage], Field(min_length=1, description="the compression stages, run "
                                                         "in the order written (below)")),
                              export=(Export, Field(default_factory=Export, description="how the weights are "
                                                    "written (below)")))
        _built = (registry.version, stage, recipe)
    return _built[2]


def __getattr__(name: str):
    """`Recipe`, `Stage` and every registered spec class by name (e.g. SliceGPTSlice), built on demand."""
    if name.startswith("__"):
        raise AttributeError(name)
    if name in ("Recipe", "Stage"):
        recipe_model()
        return _built[2] if name == "Recipe" else _built[1]
    for kind in registry.KINDS:
        for spec in registry.specs(kind):
            if spec.__name__ == name:
                return spec
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def recipe_from_dict(data: object, origin: str = "recipe"):
    if not isinstance(data, dict):
        raise RecipeError(f"invalid recipe ({origin}): expected a mapping at the top level; "
                          "a recipe is a YAML mapping with a stages list (see recipes/)")
    try:
        return recipe_model().model_validate(data)
    except ValidationError as e:
        raise RecipeError(_format_error(e, origin)) from None


def load_recipe(path: str | Path):
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
