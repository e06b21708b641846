"""GGUF input: the header read without trusting it, and the file converted tensor by tensor into a safetensors folder.

Every GGUF load goes through that folder, in memory and streamed alike: transformers would dequantize the whole
file into one state dict before building the model (the model's float32 size twice, plus its parse of the
metadata), while here at most one decoder layer's tensors (or one embedding) are dequantized at once, and the
model is then loaded from the folder like any other checkpoint."""
from __future__ import annotations

import logging
import math
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import memory
from ..errors import ModelLoadError, UnsupportedArchitectureError
from ..optional import require
from .adapters import SUPPORTED_MODEL_TYPES, gguf_model_type

log = logging.getLogger(__name__)


class GGUFTensor(NamedTuple):
    name: str
    dims: tuple[int, ...]  # GGUF order: the fastest-varying dimension first
    kind: int  # GGMLQuantizationType
    start: int  # absolute offset of the data in the file
    nbytes: int


# GGUF metadata value types and their sizes in bytes (8 = string, 9 = array)
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_UINT32 = 4
_GGUF_MAX_DIMS = 4  # GGML_MAX_DIMS
_GGUF_MAX_NESTING = 4  # arrays of arrays: a real file has none; bounds the recursion on a crafted one


class _GGUFReader:
    """Reads a GGUF header without trusting it: every length and count is checked against the bytes left
    in the file before anything is read, skipped or allocated (a 2^40-byte key length is an error, not a
    MemoryError). Raises ValueError naming what is wrong."""

    def __init__(self, f, size: int):
        self.f, self.size = f, size

    def left(self) -> int:
        return self.size - self.f.tell()

    def take(self, n: int, what: str) -> bytes:
        if n > self.left():
            raise ValueError(f"{what} of {n:,} bytes runs past the end of the file")
        return self.f.read(n)

    def skip(self, n: int, what: str) -> None:
        if n > self.left():
            raise ValueError(f"{what} of {n:,} bytes runs past the end of the file")
        self.f.seek(n, 1)

    def num(self, fmt: str):
        n = struct.calcsize(fmt)
        data = self.f.read(n)
        if len(data) < n:
            raise ValueError("file ends inside the header")
        return struct.unpack("<" + fmt, data)[0]

    def string(self, what: str = "string") -> bytes:
        return self.take(self.num("Q"), what)

    def value(self, kind: int, depth: int = 0, keep: bool = False):
        """Read (keep) or skip one metadata value of type `kind`."""
        if kind == 8:
            if keep:
                return self.string()
            self.skip(self.num("Q"), "string")
        elif kind == 9:
            if depth >= _GGUF_MAX_NESTING:
                raise ValueError("metadata arrays nested too deep")
            item, count = self.num("I"), self.num("Q")
            if item in _GGUF_SIZES:
                self.skip(_GGUF_SIZES[item] * count, "array")
            elif item in (8, 9):
                if count * 8 > self.left():  # every item starts with an 8-byte length or a 12-byte array head
                    raise ValueError(f"array of {count:,} items runs past the end of the file")
                for _ in range(count):
                    self.value(item, depth + 1)
            else:
                raise ValueError(f"unknown metadata type {item}")
        elif kind in _GGUF_SIZES:
            data = self.take(_GGUF_SIZES[kind], "value")
            return data if keep else None
        else:
            raise ValueError(f"unknown metadata type {kind}")
        return None


def gguf_header(path: Path, keys: tuple[bytes, ...] = (b"general.architecture",), stop_at_first: bool = False) -> dict:
    """String values of metadata `keys` from a GGUF header. Unless `stop_at_first` (stop at the first
    key found), the whole header is checked: every metadata entry, and every tensor's shape, type and
    data range against the size of the file, so that a file accepted here cannot make a reader allocate
    more than the file holds. Read by hand: gguf.GGUFReader parses every tensor and the vocabulary into
    numpy objects first (seconds, and ~0.7 GB for a 262k vocabulary), and trusts the lengths it reads.
    Raises ValueError."""
    return _parse(path, keys, stop_at_first)[0]


def gguf_tensors(path: Path) -> list[GGUFTensor]:
    """The tensor table of a GGUF file, its whole header checked as gguf_header does."""
    return _parse(path, (), False)[1]


def _parse(path: Path, keys: tuple[bytes, ...], stop_at_first: bool) -> tuple[dict, list[GGUFTensor]]:
    from gguf import GGML_QUANT_SIZES

    found = {}
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        r = _GGUFReader(f, size)
        if f.read(4) != b"GGUF":
            raise ValueError("no GGUF magic number")
        version = r.num("I")
        if version < 2:
            raise ValueError("GGUF version 1 is not supported")
        if version > 3:
            raise ValueError(f"unknown GGUF version {version}")
        n_tensors, n_kv = r.num("Q"), r.num("Q")
        # a metadata entry takes at least 8 (key length) + 4 (type) + 1 bytes, a tensor entry 8 + 4 + 4 + 8
        if n_kv * 13 > r.left() or n_tensors * 24 > r.left():
            raise ValueError(f"{n_kv:,} metadata entries and {n_tensors:,} tensors cannot fit in {size:,} bytes")
        alignment = 32
        for _ in range(n_kv):
            key, kind = r.string("key"), r.num("I")
            if key == b"general.alignment" and kind == _GGUF_UINT32:
                alignment = struct.unpack("<I", r.value(kind, keep=True))[0]
                if alignment == 0 or alignment & (alignment - 1):
                    raise ValueError(f"general.alignment {alignment} is not a power of two")
            elif key.endswith(b".block_count") and kind in (4, 10):  # uint32 / uint64: the decoder layer count
                block_count = struct.unpack("<I" if kind == 4 else "<Q", r.value(kind, keep=True))[0]
                # transformers would build that many layers before finding they have no weights (a real file has
                # several tensors per layer; a tiny test file may declare a few layers it does not hold)
                if block_count > max(n_tensors, 1024):
                    raise ValueError(f"{key.decode('utf-8', 'replace')} is {block_count:,} but the file holds "
                                     f"{n_tensors:,} tensors")
            elif key in keys and kind == 8:
                found[key.decode("utf-8", "replace")] = r.value(kind, keep=True).decode("utf-8", "replace")
                if stop_at_first:
                    return found, []
            else:
                r.value(kind)
        tensors, names = [], set()
        for _ in range(n_tensors):
            name = r.string("tensor name").decode("utf-8", "replace")
            n_dims = r.num("I")
            if not 1 <= n_dims <= _GGUF_MAX_DIMS:
                raise ValueError(f"tensor {name} has {n_dims} dimensions")
            dims = [r.num("Q") for _ in range(n_dims)]
            kind, offset = r.num("I"), r.num("Q")
            try:
                block, type_bytes = GGML_QUANT_SIZES[kind]
            except (KeyError, ValueError):
                raise ValueError(f"tensor {name} has an unknown type {kind}") from None
            if dims[0] % block:
                raise ValueError(f"tensor {name}: first dimension {dims[0]} is not a multiple of its block size {block}")
            if name in names:
                raise ValueError(f"tensor {name} is listed twice")
            names.add(name)
            tensors.append(GGUFTensor(name, tuple(dims), kind, offset, math.prod(dims) // block * type_bytes))
        data_start = -(-f.tell() // alignment) * alignment
        for t in tensors:
            if t.start % alignment or data_start + t.start + t.nbytes > size:
                raise ValueError(f"tensor {t.name}'s data ({t.nbytes:,} bytes at offset {t.start:,}) lies outside the file")
    return found, [t._replace(start=data_start + t.start) for t in tensors]


def gguf_strings(path: Path, keys: tuple[bytes, ...] = (b"general.architecture",), stop_at_first: bool = True) -> dict:
    """String values of metadata `keys` from a GGUF header (stops at the first key found unless told
    to read on, then checks the whole header as gguf_header does)."""
    return gguf_header(path, keys, stop_at_first)


def gguf_architecture(path: Path) -> str:
    """The architecture of a GGUF file whose whole header was checked (see gguf_header)."""
    arch = gguf_header(path).get("general.architecture")
    if arch is None:
        raise ValueError("no general.architecture key")
    return arch


def check_gguf(path: Path, spec: str) -> None:
    """Fail fast, before transformers dequantizes anything, on a GGUF we could not read or compress anyway."""
    _checked(path, spec)


def _checked(path: Path, spec: str) -> tuple[str, list[GGUFTensor]]:
    """check_gguf's one read of the header: the architecture and the checked tensor table."""
    try:
        found, tensors = _parse(path, (b"general.architecture",), False)
        if "general.architecture" not in found:
            raise ValueError("no general.architecture key")
    except (OSError, ValueError, struct.error, OverflowError) as e:
        raise ModelLoadError(f"{spec} is not a valid GGUF file ({e}); re-download or re-convert it") from None
    arch = found["general.architecture"]
    if gguf_model_type(arch) is None:
        raise UnsupportedArchitectureError(
            f"GGUF file {spec} holds a {arch!r} model, an architecture sparsellm does not support; "
            f"use a model of a supported architecture: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return arch, tensors


_LAYER = re.compile(r"\.layers\.(\d+)\.")
_PLAIN = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64, 28: np.float64}


def tensor_array(data: np.ndarray, t: GGUFTensor) -> np.ndarray:
    """`t`'s bytes in `data` (the file as a uint8 memmap) shaped as gguf.GGUFReader shapes them: dimensions
    reversed, quantized types as rows of block bytes. A read-only view: nothing is read until it is used."""
    from gguf.quants import quant_shape_to_byte_shape

    shape = tuple(reversed(t.dims))
    raw = data[t.start:t.start + t.nbytes]
    if t.kind in _PLAIN:
        return raw.view(_PLAIN[t.kind]).reshape(shape)
    return raw.reshape(quant_shape_to_byte_shape(shape, t.kind))


def dequantized(raw: np.ndarray, t: GGUFTensor, chunk: int = 1 << 24) -> np.ndarray:
    """`t` (its bytes `raw`, as tensor_array shapes them) in float32, dequantized about `chunk` elements at a time
    into one output array: numpy's whole-tensor dequantization holds several temporaries of the tensor's float32
    size (converting Gemma 3 270M, whose embedding is 262,144 x 640, peaked at 1.85 GiB with it, 1.36 GiB in
    slices). Blocks never span rows, so the values are the same."""
    from gguf import dequantize

    if t.kind == 0:
        return raw  # float32 already: a view of the file
    shape = tuple(reversed(t.dims))
    out = np.empty(shape, dtype=np.float32)
    rows_in, rows_out = raw.reshape(-1, raw.shape[-1]), out.reshape(-1, shape[-1])
    step = max(1, chunk // shape[-1])
    for i in range(0, rows_in.shape[0], step):
        rows_out[i:i + step] = dequantize(rows_in[i:i + step], t.kind)
    return out


def gguf_to_folder(path: Path, folder: Path, architecture: str, tensors: list[GGUFTensor],
                   trust_remote_code: bool = False) -> Path:
    """Write `path` (a checked GGUF file: its `architecture` and tensor table, as check_gguf read them) into
    `folder` as float32 safetensors shards (one per decoder layer,
    one per other tensor), config.json, the generation config and the tokenizer; returns `folder`. Each tensor
    is dequantized, renamed and reshaped as transformers does it (its per-architecture TensorProcessor and
    GGUF -> HF name map, applied one tensor at a time)."""
    require("gguf", ModelLoadError)
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    from ..lowmem.tensors import ShardWriter
    from ..measure import parameter_aliases

    kw = dict(gguf_file=path.name, trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(path.parent, **kw)
    AutoTokenizer.from_pretrained(path.parent, **kw).save_pretrained(folder)
    memory.release_freed()  # what parsing the metadata twice left in the heap (a 262k vocabulary: ~1 GB)
    # the processors read config values (head counts) under the names the config carries them: the config
    # itself serves, instead of a third parse of the metadata (load_gguf_checkpoint) for the same values
    parsed = {"config": config.to_dict(), "tensors": {}}
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    skeleton.tie_weights()  # a tied head shares the embedding: the file holds it once
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed["config"])
    names = get_gguf_hf_weights_map(skeleton, processor)
    expected = set(skeleton.state_dict())

    group: dict[str, torch.Tensor] = {}  # the tensors of the shard being filled: one decoder layer, or one tensor
    written: list[str] = []
    writer = ShardWriter(folder, 0)  # a private folder: the shard count in the names does not matter
    shards, current = 0, None

    def flush():
        nonlocal group, shards
        # tensors a processor assembles from several GGUF tensors (stacked experts) land in parsed["tensors"]
        for name in [n for n in parsed["tensors"] if _key(n) == current]:
            group[name] = parsed["tensors"].pop(name).to(torch.float32)
            written.append(name)
        if group:
            shards += 1
            writer.write(shards, group)
            group = {}

    data = np.memmap(path, dtype=np.uint8, mode="r")
    for t in tqdm(tensors, desc="converting GGUF tensors", unit="tensor", leave=False):
        result = processor.process(weights=dequantized(tensor_array(data, t), t), name=t.name,
                                   tensor_key_mapping=names, parsed_parameters=parsed)
        if result.name is None or result.name not in names:
            continue
        name = names[result.name]
        if _key(name) != current:
            flush()
            current = _key(name)
        w = result.weights  # a new array when dequantized; a read-only view of the file when stored as float32
        group[name] = torch.from_numpy(w if w.flags.writeable else np.array(w)).to(torch.float32)
        del w, result
        written.append(name)
    flush()
    for name, tensor in parsed["tensors"].items():  # assembled tensors of no decoder layer seen last
        writer.write(shards := shards + 1, {name: tensor.to(torch.float32)})
        written.append(name)
    del data
    tied = {n for n, first in parameter_aliases(skeleton).items() if n != first}  # the file holds them once
    missing = sorted(expected - set(written) - tied)
    if missing:
        raise ModelLoadError(f"tensor {missing[0]} is missing from {path.name}; the GGUF file is incomplete: "
                             "re-download it")
    writer.finish(written)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32  # what a GGUF model is computed in unless --dtype says otherwise
    config.save_pretrained(folder)
    if skeleton.can_generate():
        skeleton.generation_config.save_pretrained(folder)
    return folder


def _key(name: str) -> str:
    """The shard a tensor goes to: its decoder layer, or itself."""
    return m.group(1) if (m := _LAYER.search(name)) else name


def convert(path: Path, spec: str, trust_remote_code: bool) -> Path:
    """`path` checked and converted into a new temporary folder (under TMPDIR); the caller removes it
    (`remove`). Nothing is left behind when the conversion fails."""
    architecture, tensors = _checked(path, spec)
    check_room(tensors, spec)
    folder = Path(tempfile.mkdtemp(prefix="sparsellm-gguf-"))
    log.info("converting %s into float32 safetensors shards in %s, one tensor at a time", spec, folder)
    try:
        return gguf_to_folder(path, folder, architecture, tensors, trust_remote_code)
    except BaseException:
        remove(folder)
        raise


def check_room(tensors: list[GGUFTensor], spec: str) -> None:
    """Refuse, before writing anything, a conversion the temporary folder has no room for: every tensor of the
    file's table in float32 (the tied head once, as the file holds it)."""
    need = sum(math.prod(t.dims) for t in tensors) * 4
    where = tempfile.gettempdir()
    free = shutil.disk_usage(where).free
    if need > free:
        raise ModelLoadError(f"{spec} is converted into {need / 2**30:.2f} GiB of float32 safetensors in the temporary "
                             f"folder {where}, which has {free / 2**30:.2f} GiB free; set TMPDIR to a folder with room")


def remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
