"""The Python API: `oneshot` compresses a model object (or a model path / hub id) with a recipe, in memory,
the same way `sparsellm prune` does; the command line is a thin layer over the same `run_recipe`."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .errors import RecipeError


def _recipe(recipe):
    from .recipe import load_recipe, recipe_from_dict

    if isinstance(recipe, (str, Path)):
        return load_recipe(recipe)
    if isinstance(recipe, dict):
        return recipe_from_dict(recipe, "oneshot recipe")
    if hasattr(recipe, "stages") and hasattr(recipe, "model_dump"):  # a validated recipe object
        return recipe
    raise RecipeError(f"recipe must be a recipe object, a dict or a YAML path, not {type(recipe).__name__}")


def oneshot(model, recipe, dataset: str | None = None, output_dir: str | Path | None = None, *, tokenizer=None,
            **options):
    """Compress `model` with `recipe` and return the compressed model.

    model: a transformers causal LM object (compressed in place), or a hub id, local folder, .gguf file
    or `smollm2-135m` (loaded as `sparsellm prune --model` loads it). recipe: a recipe object, a dict in
    the YAML schema, or a YAML file path. dataset: calibration data (overrides the recipe's):
    wikitext2, c4, a local file, or a hub dataset. output_dir: also write the output folder (weights,
    report, card), exactly as the CLI writes it. tokenizer: for a model object (default: loaded from its
    name_or_path). options: RunOptions fields (device, dtype, overwrite, checkpoint_dir, resume,
    low_memory, device_map, offload_folder, trust_remote_code, allow_pickle).

        import sparsellm
        model = sparsellm.oneshot(model, {"stages": [{"prune": {"method": "wanda", "pattern": "2:4"}}]},
                                  dataset="data/lee_calib.txt")
    """
    from .pipeline import RunOptions, model_handle, open_model, run_recipe

    fields = {f.name for f in dataclasses.fields(RunOptions)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise RecipeError(f"oneshot: unknown option {unknown[0]!r}; use one of {', '.join(sorted(fields))}")
    run_options = RunOptions(**{"device": "auto", **options})
    recipe = _recipe(recipe)
    if dataset is not None:
        from .recipe import recipe_from_dict

        data = recipe.model_dump(mode="json", exclude_none=True, by_alias=True)
        data.setdefault("calibration", {})["dataset"] = dataset
        recipe = recipe_from_dict(data, "oneshot recipe")
    if isinstance(model, (str, Path)) or model is None:
        handle = open_model(None if model is None else str(model), recipe, run_options)
    else:
        if tokenizer is None:
            from transformers import AutoTokenizer

            name = getattr(model.config, "_name_or_path", None)
            if not name:
                raise RecipeError("oneshot: give tokenizer= for a model object that has no name_or_path")
            tokenizer = AutoTokenizer.from_pretrained(name)
        handle = model_handle(model.eval().requires_grad_(False), tokenizer)
    run_recipe(recipe, output_dir, run_options, handle=handle)
    return handle.model
