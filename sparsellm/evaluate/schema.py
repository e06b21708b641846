"""The schema of report.json (version 3), as pydantic models: the documentation of every field, the
validator the tests run on real reports, and the source of report.schema.json (JSON Schema, shipped
beside this file; regenerate with `python -m sparsellm.evaluate.schema > sparsellm/evaluate/report.schema.json`).

Fractions are in [0, 1]; *_bytes are bytes; seconds are wall-clock seconds. Dicts keyed by dataset use
the source exactly as given (wikitext2, c4, or the file path); dicts keyed by task use lm-eval's task name."""
from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 3


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Versions(_M):
    sparsellm: str
    torch: str
    transformers: str
    python: str
    lm_eval: str | None = Field(None, description="set when lm-eval tasks were evaluated")


class ModelInfo(_M):
    spec: str = Field(description="the --model given (hub id, folder, .gguf, or demo alias)")
    kind: Literal["demo", "gguf", "local", "hub"]
    model_type: str
    dtype: str
    parameters_before: int = Field(description="all parameters of the dense model")
    parameters: int = Field(description="all parameters of the compressed model (SliceGPT changes it)")
    nonzero_parameters_before: int | None = Field(description="null where the weights were never all in memory (low-memory, offload)")
    nonzero_parameters: int | None
    hidden_size: int
    sliced: bool
    per_layer_widths: bool = Field(description="structured pruning left different widths per layer (needs the runtime file)")
    disk_bytes: int | None = Field(None, description="safetensors written to the output folder (zeros are stored: "
                                   "pruning alone does not shrink it)")
    source_disk_bytes: int | None = Field(None, description="the files loaded (GGUF or safetensors); null for hub models")
    license: str | None = Field(None, description="the base model's license, carried to the model card")
    base_model: str | None = Field(None, description="hub id of the base model, when known")


class Calibration(_M):
    dataset: str
    nsamples: int
    seqlen: int
    seed: int
    tokens: int
    bos: bool | None = Field(None, description="true: each window starts with the BOS token, then seqlen - 1 drawn "
                             "tokens (models that always run after it, e.g. Gemma); absent: plain text windows")


class StageReport(_M):
    kind: Literal["slice", "structure", "recover", "learn", "allocate", "prune", "refine", "reconstruct"]
    method: str
    settings: dict[str, Any]
    seconds: float
    compute_seconds: float | None
    peak_rss_bytes: int
    peak_cuda_bytes: int | None
    details: dict[str, Any] | None = Field(description="method-specific (SliceGPT: hidden_size [before, after], parameters, ...; "
                                           "MaskLLM: steps, tokens, seconds_per_step, history of loss / tau / kappa / changed)")


class LayerSparsity(_M):
    layer: int
    sparsity: float = Field(description="zeros / weights of the layer's Linear modules as they are now")
    params: int = Field(description="weights of the layer's Linear modules now")
    params_before: int | None = Field(None, description="the same count in the dense model")
    removed: float | None = Field(None, description="1 - nonzero now / weights before: sparsity for pruning, "
                                  "also counts what slicing deleted")


class Sparsity(_M):
    overall: float = Field(description="achieved sparsity of the decoder Linear weights")
    params: int
    per_layer: list[LayerSparsity]
    per_module: dict[str, float]
    params_before: int | None = None
    overall_before: float | None = Field(None, description="exact zeros already in the dense model")
    removed: float | None = Field(None, description="1 - nonzero decoder Linear weights now / before")


class Perplexity(_M):
    seqlen: int = Field(description="tokens per evaluation chunk")
    limit: int | None = None
    chunks: dict[str, int] = Field(default_factory=dict, description="chunks evaluated per dataset")
    bos: bool | None = Field(None, description="true: each chunk starts with the BOS token, then seqlen - 1 tokens "
                             "of text (models that expect it, e.g. Gemma, as lm-eval does); absent: plain text chunks")
    before: dict[str, float]
    after: dict[str, float]


class TaskResult(BaseModel):
    model_config = ConfigDict(extra="allow")  # every metric lm-eval reports (acc, acc_norm, their stderr, ...)
    samples: int
    dataset: dict[str, str | None]
    num_fewshot: int | None = None
    acc: float | None = None
    acc_stderr: float | None = None


class ZeroShot(_M):
    tasks: list[str]
    limit: int | None
    num_fewshot: int | None
    batch_size: int
    apply_chat_template: bool = Field(False, description="prompts rendered with the tokenizer's chat template")
    before: dict[str, TaskResult]
    after: dict[str, TaskResult]
    mean_acc_before: float | None
    mean_acc_after: float | None


class SpeedResult(_M):
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    prefill_runs: list[float]
    decode_runs: list[float]
    prefill_tokens: int
    decode_prompt: int
    decode_tokens: int
    repeats: int
    device: str
    threads: int


class Speed(_M):
    interleaved: bool = Field(description="dense and compressed measured alternately, repeat by repeat, same process")
    dense: SpeedResult
    compressed: SpeedResult


class Memory(_M):
    rss_after_load_bytes: int
    peak_rss_load_bytes: int
    peak_rss_bytes: int = Field(description="the whole process's peak resident memory: loading, stages, perplexity "
                                "and export (each stage's own peak is in its entry)")


class Export(_M):
    format: Literal["dense", "sparse-bitmask", "sparse-24-bitmask"] = Field(description="on-disk weight format")
    weights_bytes: int = Field(description="bytes of the safetensors files written")
    dtype: str | None = Field(None, description="dtype of the written weights (export.dtype: auto is bfloat16 for a "
                              "GGUF source dequantized to float32, else model.dtype, the dtype the run computed in)")
    dense_bytes: int | None = Field(None, description="bytes a dense export in the same dtype takes (equal to "
                                    "weights_bytes for the dense format); null where not measured")


class Report(_M):
    schema_version: Literal[3]
    versions: Versions
    model: ModelInfo
    recipe: dict[str, Any] = Field(description="the resolved recipe (recipe.yaml)")
    calibration: Calibration | None = Field(description="null for data-free recipes")
    device: str
    stages: list[StageReport]
    allocation: dict[str, Any] | None = Field(description="per-layer sparsity of an allocate stage, with its scores")
    sparsity: Sparsity
    perplexity: Perplexity | None
    zeroshot: ZeroShot | None = None
    speed: Speed | None = None
    timings: dict[str, float]
    memory: Memory
    resumed: dict[str, Any] | None
    export: Export | None = None
    low_memory: dict[str, Any] | None = Field(None, description="set when the model was read and written layer by layer: "
                                              "reason, checkpoint_bytes, shards")


def validate(report: dict) -> Report:
    return Report.model_validate(report)


def json_schema() -> dict:
    return Report.model_json_schema()


if __name__ == "__main__":
    print(json.dumps(json_schema(), indent=2))
