"""On-disk formats of the exported weights: `dense` (zeros stored; loads anywhere) and the two sparse
formats that compressed-tensors defined (`sparse-bitmask`, `sparse-24-bitmask`), written and read here
because recent compressed-tensors releases dropped those compressors. The layout follows
compressed-tensors 0.13.0 exactly, so that its readers load our files and ours load theirs.

Per compressed Linear `P` (`P.weight` is replaced by):
  sparse-bitmask:     P.shape int64 [2]; P.compressed: the nonzeros, row-major, 1-D, weight dtype;
                      P.bitmask uint8 [rows, ceil(cols/8)] (numpy packbits, little bit order);
                      P.row_offsets int64 [rows]: where each row starts in P.compressed
  sparse-24-bitmask:  P.shape int64 [2, 1]; P.compressed [rows, cols/2]: the two kept values of every
                      group of 4 inputs; P.bitmask as above, exactly 2 bits set per group of 4
config.json gets `quantization_config: {quant_method: compressed-tensors, sparsity_config: {...}}`;
the default `dense` export writes no such block (recent vLLM refuses a sparsity_config)."""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import CompressionError, ModelLoadError
from .specs import EXPORT_FORMATS as FORMATS

log = logging.getLogger(__name__)

FORMAT_VERSION = "0.13.0"  # the compressed-tensors release whose layout and config block this writes
QUANT_METHOD = "compressed-tensors"
# A weight that was never pruned has few exact zeros (a dequantized GGUF: about 1 %), a pruned one its
# target fraction; and below about 1/16 zeros a bitmask costs more than it saves in 16-bit dtypes.
MIN_SPARSITY = 0.1
_PARTS = {"sparse-bitmask": ("shape", "compressed", "bitmask", "row_offsets"),
          "sparse-24-bitmask": ("shape", "compressed", "bitmask")}


# ---- one tensor ----------------------------------------------------------------------------------

def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """bool [rows, cols] -> uint8 [rows, ceil(cols/8)]; bit j of byte b is column 8b + j."""
    return torch.from_numpy(np.packbits(mask.cpu().numpy(), axis=-1, bitorder="little"))


def unpack_bitmask(packed: torch.Tensor, shape) -> torch.Tensor:
    """uint8 [rows, ceil(cols/8)] -> bool [rows, cols]; ValueError when `packed` does not have exactly
    the bytes `shape` needs (a shape read from a file never makes this allocate more than 8 per byte)."""
    rows, cols = (int(s) for s in shape)
    if packed.dtype != torch.uint8 or rows < 0 or cols < 0 or tuple(packed.shape) != (rows, -(-cols // 8)):
        raise ValueError(f"bitmask is {packed.dtype} {tuple(packed.shape)}, expected uint8 {(rows, -(-cols // 8))} "
                         f"for shape {rows}x{cols}")
    bits = np.unpackbits(packed.cpu().numpy(), axis=-1, count=cols, bitorder="little")
    return torch.from_numpy(bits.reshape(rows, cols).astype(bool))


def bitmask_compress(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    keep = weight != 0
    counts = keep.sum(-1)
    return {"shape": torch.tensor(list(weight.shape)), "compressed": weight[keep], "bitmask": pack_bitmask(keep),
            "row_offsets": torch.cumsum(counts, 0) - counts}


def _dense_shape(parts: dict[str, torch.Tensor]) -> tuple[int, int]:
    """rows, cols of a compressed weight, checked against its bitmask before anything is allocated: the
    dense tensor is then at most 8 weights per stored mask byte (a file cannot ask for more memory
    than its size allows). Raises ValueError."""
    shape, bitmask = parts["shape"], parts["bitmask"]
    if shape.dtype.is_floating_point or shape.dtype == torch.bool or shape.numel() != 2:
        raise ValueError(f"shape should hold 2 integers, holds {shape.numel()} of type {shape.dtype}")
    rows, cols = (int(v) for v in shape.flatten().tolist())
    if rows < 1 or cols < 1:
        raise ValueError(f"shape {rows}x{cols} is not a matrix shape")
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (rows, -(-cols // 8)):
        raise ValueError(f"bitmask is {bitmask.dtype} {tuple(bitmask.shape)}, expected uint8 {(rows, -(-cols // 8))} "
                         f"for shape {rows}x{cols}")
    return rows, cols


def bitmask_decompress(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    shape = _dense_shape(parts)
    mask = unpack_bitmask(parts["bitmask"], shape)
    values = parts["compressed"].flatten()
    if not (values.is_floating_point() or values.is_complex()):
        raise ValueError(f"compressed values are {values.dtype}, not floating point")
    if int(mask.sum()) != values.numel():
        raise ValueError(f"bitmask marks {int(mask.sum())} values but {values.numel()} are stored")
    if "row_offsets" in parts:
        counts = mask.sum(-1)
        offsets = parts["row_offsets"]
        if tuple(offsets.shape) != (shape[0],) or not torch.equal(offsets.long(), torch.cumsum(counts, 0) - counts):
            raise ValueError("row_offsets do not match the bitmask")
    out = torch.zeros(shape, dtype=values.dtype)
    out[mask] = values
    return out


def is_24(weight: torch.Tensor) -> bool:
    """At most 2 nonzeros in every group of 4 consecutive inputs of each row."""
    cols = weight.shape[-1]
    return weight.dim() == 2 and cols % 4 == 0 and bool(((weight != 0).view(-1, 4).sum(-1) <= 2).all())


def mask_24(weight: torch.Tensor) -> torch.Tensor:
    """Exactly 2 marked positions per group of 4: the nonzeros, topped up with the group's first zeros
    where a group has fewer than 2 (the compressed tensor has a fixed [rows, cols/2] shape)."""
    groups = (weight != 0).view(-1, 4)
    missing = 2 - groups.sum(-1, keepdim=True)
    zero_rank = torch.cumsum(~groups, -1)  # 1 for the group's first zero, 2 for its second, ...
    return (groups | (~groups & (zero_rank <= missing))).view(weight.shape)


def sparse24_compress(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    if not is_24(weight):
        raise ValueError("not 2:4 sparse along the input dimension")
    keep = mask_24(weight)
    rows, cols = weight.shape
    return {"shape": torch.tensor([rows, cols]).reshape(-1, 1), "compressed": weight[keep].reshape(rows, cols // 2),
            "bitmask": pack_bitmask(keep)}


def sparse24_decompress(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    rows, cols = _dense_shape(parts)
    if cols % 4 or tuple(parts["compressed"].shape) != (rows, cols // 2):
        raise ValueError(f"compressed is {tuple(parts['compressed'].shape)}, expected {(rows, cols // 2)} for 2:4 "
                         f"of shape {rows}x{cols}")
    return bitmask_decompress(parts)  # same scatter; compressed is [rows, cols/2] instead of 1-D


COMPRESS = {"sparse-bitmask": bitmask_compress, "sparse-24-bitmask": sparse24_compress}
DECOMPRESS = {"sparse-bitmask": bitmask_decompress, "sparse-24-bitmask": sparse24_decompress}


# ---- one model folder ----------------------------------------------------------------------------

def is_pruned(zeros: int, total: int) -> bool:
    """Whether a Linear weight with `zeros` exact zeros out of `total` is stored compressed."""
    return total > 0 and zeros >= MIN_SPARSITY * total


def sparse_linears(model) -> dict[str, torch.Tensor]:
    """Module name -> weight of the pruned Linear layers (is_pruned), and of the pruned expert matrices of a
    mixture of experts, named as the checkpoint stores them (2-D on disk: model.layers.0.mlp.experts.3.up_proj,
    Mixtral's model.layers.0.block_sparse_moe.experts.3.w3).
    The head is never pruned (it is often the embedding matrix itself)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weights = {name: mod.weight for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear) and mod is not head}
    weights.update(_expert_weights(model))
    return {name: w for name, w in weights.items() if is_pruned(int((w == 0).sum()), w.numel())}


def _expert_weights(model) -> dict[str, torch.Tensor]:
    from .loading.experts import expert_matrices
    from .errors import UnsupportedArchitectureError
    from .loading.adapters import get_adapter

    try:
        adapter = get_adapter(model)
    except UnsupportedArchitectureError:
        return {}
    out = {}
    for i, layer in enumerate(adapter.layers(model)):
        for path, experts in adapter.expert_modules(layer).items():
            out.update({f"{adapter.layer_prefix(i)}.{adapter.stored_module(n)}": v.weight
                        for n, v in expert_matrices(experts, path).items()})
    return out


def _not_24(name: str) -> CompressionError:
    return CompressionError(f"format sparse-24-bitmask needs 2:4-sparse weights, but {name} is not 2:4 along its inputs; "
                            "prune with pattern 2:4, or export as sparse-bitmask or dense")


def _none_pruned(fmt: str) -> CompressionError:
    return CompressionError(f"format {fmt}: the model has no pruned Linear layer to compress; export it as dense")


def check_format(fmt: str, sparse: dict[str, torch.Tensor]) -> None:
    if fmt == "sparse-24-bitmask":
        bad = next((n for n, w in sparse.items() if not is_24(w)), None)
        if bad is not None:
            raise _not_24(bad)
    if fmt != "dense" and not sparse:
        raise _none_pruned(fmt)


def sparsity_config(fmt: str, structure: str, ignore: list[str], global_sparsity: float) -> dict:
    """The block compressed-tensors' ModelCompressor.update_config writes (its BitmaskConfig /
    Sparse24BitMaskConfig dumped, registry field included): targets every Linear but those ignored."""
    return {"format": fmt, "global_sparsity": global_sparsity, "ignore": ignore, "registry_requires_subclass": False,
            "sparsity_structure": structure, "targets": ["Linear"]}


def compress_folder(folder: Path, model, fmt: str, sparse: set[str] | None = None) -> None:
    """Rewrite the dense safetensors in `folder` into `fmt`, one shard in memory at a time, and declare
    the format in config.json. `sparse`: the names of the Linears to compress when `model` holds no
    weights (a low-memory run's skeleton; their 2:4 shape is then checked as each shard is rewritten);
    by default the pruned Linears of `model`. Tensors are written in sorted order, so the same weights
    give the same bytes."""
    if fmt == "dense":
        return
    if sparse is None:
        weights = sparse_linears(model)
        check_format(fmt, weights)
        sparse = set(weights)
    elif not sparse:
        raise _none_pruned(fmt)
    folder = Path(folder)
    index_path, index, shards = _shards(folder)
    compress, zeros, total, weight_map, nbytes, all_24 = COMPRESS[fmt], 0, 0, {}, 0, True
    for shard in shards:
        with safe_open(folder / shard, framework="pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        out = {}
        for key, t in sorted(tensors.items()):
            zeros += int((t == 0).sum()) if t.is_floating_point() else 0
            total += t.numel()
            module = key.removesuffix(".weight")
            if key.endswith(".weight") and module in sparse:
                all_24 = all_24 and is_24(t)
                if fmt == "sparse-24-bitmask" and not all_24:
                    raise _not_24(module)
                out.update({f"{module}.{part}": v.contiguous() for part, v in compress(t).items()})
            else:
                out[key] = t
        del tensors
        save_file(out, folder / shard, metadata=metadata)
        weight_map.update({k: shard for k in out})
        nbytes += sum(v.nbytes for v in out.values())
        del out
    if index:
        index["weight_map"] = dict(sorted(weight_map.items()))
        index.setdefault("metadata", {})["total_size"] = nbytes
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    ignore = sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in sparse)
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["quantization_config"] = {"quant_method": QUANT_METHOD, "version": FORMAT_VERSION, "transform_config": {},
                                  "sparsity_config": sparsity_config(fmt, "2:4" if all_24 else "unstructured", ignore,
                                                                     round(zeros / total, 6))}
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    log.info("wrote %d Linear weights as %s", len(sparse), fmt)


def _shards(folder: Path) -> tuple[Path, dict | None, list[str]]:
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text(encoding="utf-8")) if index_path.exists() else None
    return index_path, index, sorted(set(index["weight_map"].values())) if index else ["model.safetensors"]


def _cast_rows(path: Path, key: str, shape: list[int], dtype: torch.dtype, chunk: int = 1 << 24) -> torch.Tensor:
    """Tensor `key` of the safetensors file `path`, cast to `dtype` about `chunk` values at a time: the file is
    mapped only while a chunk is read, so neither a whole float32 copy nor the file's mapped pages stay resident
    beside the cast tensor (a 262,144 x 640 embedding: 0.67 GB of each)."""
    out = torch.empty(shape, dtype=dtype)
    rows = shape[0] if shape else 1
    step = max(1, chunk // max(1, math.prod(shape[1:])))
    for i in range(0, rows, step):
        with safe_open(path, framework="pt") as f:
            if shape:
                out[i:i + step] = f.get_slice(key)[i:i + step]
            else:
                out.copy_(f.get_tensor(key))
    return out


# safetensors dtype names of the tensors a model folder holds
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
           "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def cast_folder(folder: Path, source: torch.dtype, dtype: torch.dtype) -> None:
    """Rewrite the dense safetensors in `folder` with every tensor of dtype `source` cast to `dtype` (tensors
    kept in another dtype stay as they are), one shard in memory at a time, and record `dtype` in
    config.json: the export dtype is applied to the files, never to the model being measured."""
    if source == dtype:
        return
    folder = Path(folder)
    index_path, index, shards = _shards(folder)
    nbytes = 0
    for shard in shards:
        with safe_open(folder / shard, framework="pt") as f:  # one tensor at a time in the source dtype
            metadata = f.metadata()
            kinds = {k: _DTYPES.get(f.get_slice(k).get_dtype()) for k in f.keys()}
            shapes = {k: f.get_slice(k).get_shape() for k in kinds}
            if None not in kinds.values() and source not in kinds.values():  # save_model wrote it in `dtype`
                nbytes += sum(math.prod(shapes[k]) * kinds[k].itemsize for k in kinds)
                continue
            kept = {k: f.get_tensor(k) for k, kind in kinds.items() if kind != source}
        out = {k: kept[k] if k in kept else _cast_rows(folder / shard, k, shapes[k], dtype) for k in kinds}
        del kept
        tmp = folder / f".{shard}.tmp"
        save_file(out, tmp, metadata=metadata)
        os.replace(tmp, folder / shard)
        nbytes += sum(v.nbytes for v in out.values())
        del out
    if index:
        index.setdefault("metadata", {})["total_size"] = nbytes
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    name = str(dtype).removeprefix("torch.")
    for key in ("dtype", "torch_dtype"):
        if key in cfg or key == "dtype":
            cfg[key] = name
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    log.info("weights written in %s (the model ran in %s)", name, str(source).removeprefix("torch."))


def folder_format(config: dict) -> str:
    """Which format a model folder's config.json declares ("dense" when none)."""
    qc = config.get("quantization_config") or config.get("compression_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        return "dense"
    sc = qc.get("sparsity_config") or {}
    if not isinstance(sc, dict):
        raise ModelLoadError(f"sparsity_config in config.json should be a mapping, not {type(sc).__name__}; "
                             "fix or re-export the model")
    fmt = sc.get("format", "dense")
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise ModelLoadError(f"sparsity format {fmt!r} in config.json is not supported; sparsellm reads "
                             f"{', '.join(FORMATS)}")
    if fmt != "dense" and (qc.get("config_groups") or qc.get("transform_config")):
        raise ModelLoadError("this folder's compressed-tensors config also quantizes or transforms weights; "
                             "sparsellm reads only the dense and sparse (bitmask) formats")
    return fmt


def read_state_dict(folder: Path, fmt: str) -> dict[str, torch.Tensor]:
    """The dense state dict of a folder written in `fmt` (all its safetensors files)."""
    parts_of = _PARTS[fmt]
    dense, grouped = {}, {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                module, _, part = key.rpartition(".")
                if part in parts_of:
                    grouped.setdefault(module, {})[part] = f.get_tensor(key)
                else:
                    dense[key] = f.get_tensor(key)
    for module, parts in grouped.items():
        missing = [p for p in parts_of if p not in parts]
        if missing:
            raise ModelLoadError(f"{folder}: compressed weight {module} lacks {', '.join(missing)}; the file is "
                                 "incomplete, re-export the model")
        try:
            dense[f"{module}.weight"] = DECOMPRESS[fmt](parts)
        except (ValueError, RuntimeError) as e:
            raise ModelLoadError(f"{folder}: compressed weight {module} is corrupt ({e}); re-export the model") from None
    return dense
