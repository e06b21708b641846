"""Reading and writing safetensors one group of tensors at a time.

`TensorSource` knows which shard file holds each tensor and hands out memory-mapped tensors
(safetensors maps files privately: an in-place change never reaches the file, and a page costs
memory only once touched and only while a tensor still refers to it). `ShardWriter` writes one
shard per call and the index at the end, in the layout `save_pretrained` uses for sharded models."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import ModelLoadError

INDEX = "model.safetensors.index.json"


class TensorSource:
    def __init__(self, folder: str | Path, spec: str):
        self.folder, self.spec = Path(folder), spec
        self.files: dict[str, Path] = {}
        try:
            index = self.folder / INDEX
            if index.is_file():
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                self.files = {name: self.folder / f for name, f in weight_map.items()}
            else:
                for f in sorted(self.folder.glob("*.safetensors")):
                    with safe_open(f, "pt") as st:
                        self.files.update((name, f) for name in st.keys())
        except (OSError, ValueError, KeyError, SafetensorError) as e:
            raise ModelLoadError(f"model weights of {spec} are corrupt or truncated ({e}); "
                                 "re-download or re-export the model") from None
        if not self.files:
            raise ModelLoadError(f"model folder {spec} has no safetensors weights; low-memory mode reads only "
                                 "safetensors: convert the model, or run without --low-memory")

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in set(self.files.values()))

    def first_dtype(self) -> torch.dtype:
        name, f = next(iter(self.files.items()))
        with safe_open(f, "pt") as st:
            return st.get_tensor(name).dtype  # a mapping: nothing is read

    def get(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Memory-mapped tensors, opening each shard once."""
        missing = [n for n in names if n not in self.files]
        if missing:
            raise ModelLoadError(f"tensor {missing[0]} is missing from the safetensors of {self.spec}; "
                                 "the checkpoint is incomplete: re-download or re-export it")
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        out = {}
        try:
            for f, group in by_file.items():
                with safe_open(f, "pt") as st:
                    out.update((n, st.get_tensor(n)) for n in group)
        except (OSError, SafetensorError) as e:
            raise ModelLoadError(f"model weights of {self.spec} are corrupt or truncated ({f.name}: {e}); "
                                 "re-download or re-export the model") from None
        return out

    def redirect(self, names, file: Path) -> None:
        """Later reads of `names` come from `file` (a layer this run has already written)."""
        self.files.update((n, Path(file)) for n in names)


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    # a new file, renamed over the old one: a later pass may still have the old one memory-mapped
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({n: t.detach().cpu().contiguous() for n, t in tensors.items()}, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)


class ShardWriter:
    """Shard k of n goes to model-0000k-of-0000n.safetensors; `finish` writes the index."""

    def __init__(self, folder: Path, shards: int):
        self.folder, self.shards = Path(folder), shards
        self.weight_map: dict[str, str] = {}
        self.sizes: dict[str, tuple[int, int]] = {}  # name -> (parameters, bytes)

    def path(self, shard: int) -> Path:
        return self.folder / f"model-{shard:05d}-of-{self.shards:05d}.safetensors"

    def write(self, shard: int, tensors: dict[str, torch.Tensor]) -> Path:
        """Shard `shard` holds `tensors` now (a rewritten shard: what it held before no longer counts)."""
        path = self.path(shard)
        _save(tensors, path)
        for n in [n for n, f in self.weight_map.items() if f == path.name]:
            del self.weight_map[n], self.sizes[n]
        for n, t in tensors.items():
            self.weight_map[n] = path.name
            self.sizes[n] = (t.numel(), t.numel() * t.element_size())
        return path

    def stash(self, key: str, tensors: dict[str, torch.Tensor]) -> Path:
        """Tensors outside the decoder layers that a stage changed (embeddings, head), kept in a hidden file of
        the folder until `unstash`: shard 1, which holds them, is written once, when the model is saved."""
        path = self.folder / f".sparsellm-stash-{key}.tmp"
        _save(tensors, path)
        return path

    def unstash(self) -> None:
        for f in self.folder.glob(".sparsellm-stash-*.tmp"):
            f.unlink()

    def finish(self, order: list[str]) -> None:
        """The index, tensors listed in `order` (the model's state_dict order)."""
        absent = [n for n in order if n not in self.weight_map]
        if absent:
            raise RuntimeError(f"low-memory export: {len(absent)} tensors were never written, e.g. {absent[0]}")
        index = {"metadata": {"total_parameters": sum(p for p, _ in self.sizes.values()),
                              "total_size": sum(b for _, b in self.sizes.values())},
                 "weight_map": {n: self.weight_map[n] for n in order}}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
