"""Larger than memory: prune a model read from its safetensors shards one decoder layer at a time.

The model is an empty skeleton (meta device) built from config.json; the embeddings are loaded, then
every pass of the recipe (OWL's scoring pass, each prune pass, perplexity) loads a decoder layer from
the shards (memory-mapped), runs the same engine code as the in-memory path, writes the compressed
layer to its own output shard and frees it before the next. Peak memory is about one layer plus the
calibration activations. `low_memory_reason` decides whether a run goes this way (run.py)."""
from __future__ import annotations

import logging
from pathlib import Path

from .. import memory
from ..errors import ModelLoadError, RecipeError
from ..loading.models import resolve_model

log = logging.getLogger(__name__)


def recipe_problem(recipe, options, flag: str = "--low-memory") -> str | None:
    """Why this recipe/option set cannot run layer by layer (from disk, or offloaded by `flag`), and what to
    do; or None."""
    from ..stage import build_stages

    for stage in build_stages(recipe):
        reason = stage.whole_model_reason(flag)
        if reason:  # named at the stage's first entry (an allocation owned by a prune stage comes first)
            return f"stages.{min(e.index for e in stage.entries)}: {reason}"
    ev = recipe.evaluation
    if ev.tasks or ev.speed is not None:
        return f"lm-eval tasks and speed need the whole model in memory; drop them, or run without {flag}"
    if options.checkpoint_dir or options.resume:
        return ("--checkpoint-dir/--resume restore layers into a model held in memory; drop them (an interrupted "
                f"run leaves no output), or run without {flag}")
    return None


def source_problem(source) -> str | None:
    """Why this model cannot be read layer by layer, or None (a local folder of safetensors)."""
    if source.kind in ("gguf", "demo"):
        return (f"{source.spec} is a GGUF file, which is dequantized whole; convert it to a safetensors folder "
                "first, or run without --low-memory")
    if source.kind == "hub":
        return (f"low-memory mode reads a local folder: download {source.spec} first (hf download {source.spec} "
                "--local-dir DIR) and give --model DIR")
    folder = Path(source.path)
    if not any(folder.glob("*.safetensors")):
        return (f"model folder {source.spec} has no safetensors weights (pickle files are loaded whole); convert them "
                "to safetensors, or run without --low-memory")
    if '"sparsellm_sliced_' in (folder / "config.json").read_text(encoding="utf-8", errors="replace"):
        return f"{source.spec} is a SliceGPT output with per-layer shapes; run without --low-memory"
    return None


def _gib(b: int) -> str:
    return f"{b / 2**30:.2f} GiB"


def low_memory_reason(spec: str | None, recipe, options) -> str | None:
    """Why this run reads the model layer by layer (explicit --low-memory, or a checkpoint larger than the
    available memory), None to load it whole. An explicit request that cannot be met is an error."""
    if options.low_memory is False or (options.low_memory is None and options.device_map is not None):
        return None
    source = resolve_model(spec)
    if options.low_memory:
        if options.device_map is not None:
            raise RecipeError("--low-memory reads the layers from disk itself: give it or --device-map, not both")
        problem = recipe_problem(recipe, options)
        if problem:
            raise RecipeError(f"--low-memory: {problem}")
        problem = source_problem(source)
        if problem:
            raise ModelLoadError(f"--low-memory: {problem}")
        return "requested (--low-memory)"
    if source.kind != "local":
        return None
    size = sum(f.stat().st_size for f in Path(source.path).glob("*.safetensors"))
    available = memory.available_bytes()
    if not size or available is None or size <= available:
        return None
    problem = recipe_problem(recipe, options) or source_problem(source)
    if problem:
        log.warning("the checkpoint (%s) is larger than the available memory (%s), but it cannot be pruned layer by "
                    "layer: %s; loading it whole", _gib(size), _gib(available), problem)
        return None
    reason = f"automatic: the checkpoint ({_gib(size)}) is larger than the available memory ({_gib(available)})"
    log.warning("%s: pruning it layer by layer from disk (--in-memory to load it whole)", reason)
    return reason
