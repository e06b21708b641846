"""A GGUF file as a safetensors folder, converted tensor by tensor, for the streamed (--low-memory) mode.

transformers dequantizes a whole GGUF file into one state dict before it builds the model, so loading
takes the model's float32 size twice. Here each tensor is dequantized, renamed and reshaped as transformers
does it (its per-architecture TensorProcessor and GGUF -> HF name map, applied one tensor at a time), and
written to a shard of its own decoder layer; the config and tokenizer are saved beside them. At most
one layer's tensors (or one embedding) are in memory at once."""
from __future__ import annotations

import logging
import re
import shutil
import tempfile
import weakref
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import memory
from ..errors import ModelLoadError
from ..loading.models import check_gguf
from ..optional import require
from .tensors import ShardWriter

log = logging.getLogger(__name__)

_LAYER = re.compile(r"\.layers\.(\d+)\.")


def gguf_to_folder(path: Path, folder: Path, trust_remote_code: bool = False) -> Path:
    """Write `path` (a checked GGUF file) into `folder` as float32 safetensors shards (one per decoder layer,
    one per other tensor), config.json, the generation config and the tokenizer; returns `folder`."""
    require("gguf", ModelLoadError)
    from accelerate import init_empty_weights
    from gguf import GGUFReader, dequantize
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map,
                                                          load_gguf_checkpoint, read_field)

    kw = dict(gguf_file=path.name, trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(path.parent, **kw)
    AutoTokenizer.from_pretrained(path.parent, **kw).save_pretrained(folder)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    skeleton.tie_weights()  # a tied head shares the embedding: the file holds it once
    parsed = load_gguf_checkpoint(str(path), return_tensors=False)  # the metadata the processors read
    parsed.pop("tokenizer", None)  # (saved above; a 262k vocabulary is hundreds of MB of Python strings)
    memory.release_freed()  # what parsing the metadata three times left in the heap
    reader = GGUFReader(str(path))
    architecture = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed.get("config", {}))
    names = get_gguf_hf_weights_map(skeleton, processor)
    expected = set(skeleton.state_dict())

    group: dict[str, torch.Tensor] = {}  # the tensors of the shard being filled: one decoder layer, or one tensor
    written: list[str] = []
    writer = ShardWriter(folder, 0)  # a private folder: the shard count in the names does not matter
    shards, current = 0, None

    def flush():
        nonlocal group, shards
        if group:
            shards += 1
            writer.write(shards, group)
            group = {}

    for tensor in tqdm(reader.tensors, desc="converting GGUF tensors", unit="tensor", leave=False):
        result = processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name,
                                   tensor_key_mapping=names, parsed_parameters=parsed)
        if result.name not in names:
            continue
        name = names[result.name]
        key = m.group(1) if (m := _LAYER.search(name)) else name
        if key != current:
            flush()
            current = key
        w = result.weights  # a new array when dequantized; a read-only view of the file when stored as float32
        group[name] = torch.from_numpy(w if w.flags.writeable else np.array(w)).to(torch.float32)
        del w, result
        written.append(name)
    flush()
    missing = sorted(expected - set(written) - _tied(skeleton))
    if missing:
        raise ModelLoadError(f"tensor {missing[0]} is missing from {path.name}; the GGUF file is incomplete: "
                             "re-download it")
    writer.finish(written)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32  # what the in-memory load computes a GGUF model in
    config.save_pretrained(folder)
    if skeleton.can_generate():
        skeleton.generation_config.save_pretrained(folder)
    return folder


def _tied(model) -> set[str]:
    """Parameter names that share another's tensor (a tied head), which the file need not hold."""
    seen, tied = {}, set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.setdefault(id(p), name)
    return tied


def converted(path: Path, spec: str, trust_remote_code: bool, owner) -> Path:
    """`path` converted into a temporary folder (TMPDIR), removed when `owner` is garbage-collected or the
    process exits."""
    check_gguf(path, spec)
    folder = Path(tempfile.mkdtemp(prefix="sparsellm-gguf-"))
    weakref.finalize(owner, shutil.rmtree, folder, True)
    log.info("converting %s into float32 safetensors shards in %s, one tensor at a time", spec, folder)
    return gguf_to_folder(path, folder, trust_remote_code)
