"""The model being compressed, in one of three memory modes behind the same few operations.

- `ModelHandle`: whole in memory.
- `OffloadedHandle`: dispatched by accelerate (`--device-map`, offload to CPU or disk); the layer walk
  puts each layer's weights in and writes the compressed ones back where accelerate keeps them.
- `StreamedHandle`: an empty skeleton whose decoder layers are read from the safetensors shards one at
  a time (`--low-memory`); every layer a stage finishes is written to its own output shard.

Each offers: the io of the layer walk (`io()` for passes that change the layers, `reading()` for
passes that only measure), perplexity, the sparsity count, and saving into the output folder."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from . import measure
from .evaluate.perplexity import perplexity
from .export import declare_runtime, disk_bytes, export_dtype, make_readable, save_model
from .formats import cast_folder, compress_folder, is_pruned

log = logging.getLogger(__name__)


class ModelHandle:
    """Every weight in memory."""

    kind = "memory"
    whole = True  # every weight is in memory at once: whole-model stages, nonzero counts, lm-eval, speed

    def __init__(self, model, tokenizer, adapter, source, loaded=None):
        self.model, self.tokenizer, self.adapter, self.source = model, tokenizer, adapter, source
        self.loaded = loaded  # loading.LoadedModel (reloaded for the speed comparison)
        self.dense: dict | None = None

    def io(self):
        """The layer walk's io for passes that change the layers (None: the layers are in memory)."""
        return None

    def reading(self):
        """The layer walk's io for passes that only read the layers."""
        return None

    def to_device(self, device) -> None:
        self.model.to(device)

    def to_home(self) -> None:
        self.model.to("cpu")

    def perplexity(self, chunks: torch.Tensor, batch_size: int, device, desc: str) -> float:
        return perplexity(self.model, chunks, batch_size, device, desc=desc, adapter=self.adapter)

    def count_dense(self) -> None:
        """Zeros before any stage (a walking handle counts them as it first loads each layer)."""
        self.dense = measure.sparsity_summary(self.model, self.adapter)

    def nonzero(self) -> int | None:
        """Nonzero parameters of the whole model; None where the weights are never all in memory."""
        return measure.nonzero(self.model)

    def _layer_zeros(self) -> tuple[list | None, list | None]:
        return None, None

    def sparsity(self) -> dict:
        """The sparsity report after the stages, with the `removed` figures against the dense model."""
        now, before = self._layer_zeros()
        summary = measure.sparsity_summary(self.model, self.adapter, now)
        dense = self.dense if before is None else measure.sparsity_summary(self.model, self.adapter, before)
        measure.removed(summary, dense)
        return summary

    def begin(self, folder: Path) -> None:
        """The output folder (its temporary name) is ready: a streamed model writes its layers there."""

    def export_dtype(self, name: str):
        """The dtype the weights are written in for the recipe's export.dtype `name` (see export.export_dtype)."""
        return export_dtype(name, self.model.dtype, bool(getattr(self.source, "gguf_file", None)))

    def save(self, folder: Path, fmt: str, dtype=None) -> int:
        """Write the model into `folder` in format `fmt`, its weights cast to `dtype` (None: as they are);
        returns the bytes a dense export of that dtype takes."""
        return save_model(self.model, self.tokenizer, folder, fmt, dtype)

    def report_block(self) -> dict | None:
        """What the report says of a run that read and wrote the model layer by layer (None otherwise)."""
        return None

    def weights(self):
        """(name, tensor) of every weight as loaded, in a fixed order (what a checkpoint's fingerprint hashes)."""
        return iter(sorted(self.model.state_dict().items()))


class OffloadedHandle(ModelHandle):
    """A model dispatched by accelerate: decoder layers offloaded to CPU memory or disk."""

    kind = "offload"
    whole = False

    def __init__(self, model, tokenizer, adapter, source, loaded=None):
        from .lowmem.offload import OffloadedLayers

        super().__init__(model, tokenizer, adapter, source, loaded)
        self._io = OffloadedLayers(model, adapter)

    def io(self):
        return self._io

    def reading(self):
        return self._io.reading()

    def to_device(self, device) -> None:  # accelerate's hooks place every module
        pass

    def to_home(self) -> None:
        pass

    def count_dense(self) -> None:  # counted as the walk first loads each layer
        pass

    def nonzero(self) -> int | None:
        return None

    def save(self, folder: Path, fmt: str, dtype=None) -> int:
        self._tie_again()
        return super().save(folder, fmt, dtype)

    def _tie_again(self) -> None:
        """accelerate's hooks give an offloaded parameter a new object each time they bring it in or take it
        out, so a tied pair kept on disk (input embeddings and head) no longer looks tied to save_pretrained,
        which would write it twice: the head shares the embeddings' parameter again, as the config says."""
        inp, out = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        if (out is not None and getattr(self.model.config.get_text_config(), "tie_word_embeddings", False)
                and inp.weight is not out.weight and inp.weight.is_meta and out.weight.is_meta):
            out.weight = inp.weight

    def _layer_zeros(self):
        n = range(len(self.adapter.layers(self.model)))
        return [self._io.zeros[i] for i in n], [self._io.dense_zeros[i] for i in n]


class StreamedHandle(OffloadedHandle):
    """Decoder layers read from the safetensors shards one at a time and written to the output's shards."""

    kind = "stream"

    def __init__(self, stream, tokenizer, source, reason: str):
        from . import memory

        memory.map_large_allocations()  # a streamed run's peak is one layer: keep freed layers out of the heap
        ModelHandle.__init__(self, stream.model, tokenizer, stream.adapter, source)
        self.stream, self._io, self.reason = stream, stream, reason
        self.n_layers = len(self.adapter.layers(self.model))
        self.size = stream.source.size_bytes()

    def perplexity(self, chunks, batch_size, device, desc) -> float:
        from .lowmem.stream import streamed_perplexity

        return streamed_perplexity(self.stream.reading(), chunks, batch_size, device, desc)

    def begin(self, folder: Path) -> None:
        from .lowmem.tensors import ShardWriter

        # the passes that change layers write each finished one to its shard; later passes read it from there
        self.stream.writer = ShardWriter(folder, self.n_layers + 1)

    def save(self, folder: Path, fmt: str, dtype=None) -> int:
        model = self.model
        self.stream.copy_rest()
        model.config.architectures = [type(model).__name__]  # as save_pretrained records it
        model.config.save_pretrained(folder)
        if model.can_generate():
            model.generation_config.save_pretrained(folder)
        if any(getattr(model.config, k, None) is not None for k in ("sparsellm_slicing", "sparsellm_structure")):
            declare_runtime(folder)  # per-layer shapes: the runtime modeling file, as save_model writes it
        self.tokenizer.save_pretrained(folder)
        if dtype is not None:  # the shards were written in the model's dtype, which the passes read back
            cast_folder(folder, model.dtype, dtype)
        dense = disk_bytes(folder)
        make_readable(folder)
        if fmt != "dense":
            compress_folder(folder, model, fmt, self.pruned_linears())
        return dense

    def pruned_linears(self) -> set[str]:
        """The decoder Linears that the bitmask formats compress, from the zero counts taken as each layer
        was written (formats.sparse_linears' rule)."""
        return {f"{self.adapter.layer_prefix(i)}.{self.adapter.stored_module(name)}" for i in range(self.n_layers)
                for name, (z, n) in self.stream.zeros[i].items() if is_pruned(z, n)}

    def report_block(self) -> dict:
        return {"reason": self.reason, "checkpoint_bytes": self.size, "shards": self.n_layers + 1}

    def weights(self):
        """Read from the source shards one decoder layer at a time (the tensors outside the layers first)."""
        prefixes = [self.adapter.layer_prefix(i) + "." for i in range(self.n_layers)]
        saved = self.stream.saved()
        groups = [[n for n in saved if not n.startswith(self.adapter.layers_path + ".")]]
        groups += [[n for n in saved if n.startswith(p)] for p in prefixes]
        for names in groups:  # as stored on disk (a fused experts parameter as its 2-D parts)
            yield from sorted(self.stream.source.get([d for n in names for d in self.stream._stored(n)]).items())
