"""A model whose weights stay on disk: an empty skeleton (meta device) built from config.json, whose
modules get their tensors from the safetensors shards only while they are used."""
from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import memory
from ..errors import ModelLoadError
from ..loading import get_adapter
from ..loading.gguf import convert, remove
from ..loading.models import _load_error, resolve_model
from ..loading.experts import expert_shapes, fuse_stored, split_stored, stored_parts
from ..calibrate.walk import capture, head_on, walk_layers
from ..evaluate.perplexity import nll_from_hidden
from ..measure import layer_zeros, parameter_aliases
from ..loading.adapters import Adapter, _get
from ..loading.models import DTYPES
from . import source_problem
from .tensors import ShardWriter, TensorSource

log = logging.getLogger(__name__)


@dataclass
class Skeleton:
    model: nn.Module  # every parameter on the meta device until a stream loads it
    aliases: dict[str, str]  # parameter name -> the name it is stored under (tied weights share one)


def empty_model(folder: str | Path, dtype: str, trust_remote_code: bool, tensors: TensorSource) -> Skeleton:
    """The model of config.json with no memory behind its parameters, in the dtype from_pretrained
    would give it (`auto`: the config's dtype, else the checkpoint's)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    cfg = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if dtype == "auto":
        found = getattr(cfg, "dtype", None)
        torch_dtype = getattr(torch, str(found).removeprefix("torch.")) if found else tensors.first_dtype()
    else:
        torch_dtype = DTYPES[dtype]
    with init_empty_weights():  # buffers (rotary tables) are real: they are computed, not loaded
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    try:
        model.generation_config = GenerationConfig.from_pretrained(folder)
    except OSError:  # no generation_config.json: from_pretrained derives it from the config too
        pass
    model.tie_weights()  # init_empty_weights re-creates every parameter it registers, undoing the tying
    model.eval().requires_grad_(False)
    return Skeleton(model, parameter_aliases(model))


def disk_names(model: nn.Module, adapter: Adapter) -> dict[str, list[str]]:
    """{parameter: the checkpoint tensors it is stored as} for the decoder layers' parameters stored otherwise
    than under their own name: a fused experts parameter (mixture of experts) as one 2-D tensor per expert and
    matrix, in fuse_stored's order; a module the family renames on disk (adapter.stored_module)."""
    out = {}
    for i, layer in enumerate(adapter.layers(model)):
        prefix = adapter.layer_prefix(i)
        for n, _ in layer.named_parameters():
            if (stored := adapter.stored_module(n)) != n:
                out[f"{prefix}.{n}"] = [f"{prefix}.{stored}"]
        for path, experts in adapter.expert_modules(layer).items():
            count = expert_shapes(experts)[0]
            for leaf in ("gate_up_proj", "down_proj"):
                out[f"{prefix}.{path}.{leaf}"] = [f"{prefix}.{adapter.stored_module(f'{path}.{e}.{part}')}.weight"
                                                  for e in range(count) for part in stored_parts(leaf)]
    return out


def _split(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return root.get_submodule(path) if path else root, leaf


class LayerStream:
    """Gives modules of a skeleton their weights from `source` on `load` and takes them back on
    `release`. With a `writer` (a pass that changes the model), a released decoder layer is first written
    to its own shard (shard index + 2: shard 1 holds the tensors outside the decoder layers), whatever
    its shapes and parameters are now, and later reads of it come from there; a released module outside
    the layers (a stage changed the embeddings or the head) is stashed until shard 1 is written at save.
    Tied parameters share one tensor while loaded; a stage may untie them (a new parameter) or tie them."""

    def __init__(self, skeleton: Skeleton, adapter: Adapter, source: TensorSource, writer: ShardWriter | None = None):
        self.skeleton, self.adapter, self.source, self.writer = skeleton, adapter, source, writer
        self.model = skeleton.model
        self.live: dict[str, nn.Parameter] = {}  # stored name -> loaded parameter
        self.zeros: dict[int, dict[str, tuple[int, int]]] = {}  # per written layer: Linear -> (zeros, total)
        self.dense_zeros: dict[int, dict[str, tuple[int, int]]] = {}  # the same, as first read (before any stage)
        self.disk = disk_names(self.model, adapter)

    def _stored(self, name: str) -> list[str]:
        """The checkpoint tensors of a (stored) parameter name: itself, renamed, or a fused experts parameter's
        2-D parts."""
        return self.disk.get(name, [name])

    def reading(self) -> "LayerStream":
        """The same weights, never written: for passes that only measure (OWL, perplexity)."""
        other = LayerStream(self.skeleton, self.adapter, self.source)
        other.live = self.live
        return other

    def _params(self, prefix: str) -> list[str]:
        module = self.model.get_submodule(prefix)
        return [f"{prefix}.{n}" for n, _ in module.named_parameters(remove_duplicate=False)]

    def _alias(self, name: str) -> str:
        return self.skeleton.aliases.get(name, name)  # a parameter a stage added is stored under its own name

    def read(self, stored_names: list[str], source: TensorSource | None = None) -> dict[str, torch.Tensor]:
        """Stored parameter names -> their tensors as the model holds them, read from `source` (default: the
        stream's own, which follows what the stages wrote): a fused experts parameter from its 2-D parts."""
        source = source or self.source
        found = source.get([s for n in stored_names for s in self._stored(n)])
        out = {}
        for stored in stored_names:
            parts = [found[s] for s in self._stored(stored)]
            t = fuse_stored(stored.rpartition(".")[2], parts) if len(parts) > 1 else parts[0]
            out[stored] = t.to(self.model.get_parameter(stored).dtype)  # from_pretrained casts to the model's dtype
        return out

    def load_module(self, prefix: str) -> None:
        names = self._params(prefix)
        need = sorted({self._alias(n) for n in names} - set(self.live))
        for stored, t in self.read(need).items():
            self.live[stored] = nn.Parameter(t, requires_grad=False)
        for n in names:
            mod, leaf = _split(self.model, n)
            mod._parameters[leaf] = self.live[self._alias(n)]
        self._share(need)

    def _share(self, stored_names) -> None:
        """Parameters tied to `stored_names` elsewhere in the model (a tied head) are the loaded tensors too,
        as in a model held whole (the parameter count sees one tensor)."""
        stored_names = set(stored_names)
        for n, stored in self.skeleton.aliases.items():
            if stored != n and stored in stored_names and stored in self.live:
                mod, leaf = _split(self.model, n)
                mod._parameters[leaf] = self.live[stored]

    def release_module(self, prefix: str) -> None:
        """Take the module's weights out (the modules before the layers stay loaded: every pass starts
        there); with a writer, its tensors as the stage left them are stashed first."""
        if self.writer is not None and not prefix.startswith(self.adapter.layers_path + "."):
            self._stash(prefix)
        keep = prefix in self.adapter.pre_layer_paths
        for n in self._params(prefix):
            mod, leaf = _split(self.model, n)
            p, stored = mod._parameters[leaf], self._alias(n)
            if keep:
                self.live[stored] = p
                self._share([stored])
            elif stored != n and stored in self.live:  # a tied head: the embedding it shares stays loaded
                mod._parameters[leaf] = self.live[stored]
            else:
                mod._parameters[leaf] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
                self.live.pop(n, None)
        if not keep:  # also what a stage took out of the module (a norm replaced by one without weights): a
            # loaded tensor kept here would keep its whole shard's mapped pages resident
            for stored in [s for s in self.live if s.startswith(prefix + ".")]:
                del self.live[stored]

    def _stash(self, prefix: str) -> None:
        """Write a changed module outside the layers; a parameter that is no longer the loaded tensor it was
        tied to is stored under its own name from now on, one that is now a loaded tensor of another name
        is tied to it."""
        own = {}
        for n in self._params(prefix):
            mod, leaf = _split(self.model, n)
            p = mod._parameters[leaf]
            other = next((s for s, q in self.live.items() if q is p and s != n), None)
            self.skeleton.aliases[n] = other or n
            if other is None:
                own[n] = p
        if own:
            path = self.writer.stash(prefix, own)
            self.source.redirect(own, path)

    # the engine's io interface (calibrate/engine.py: run_layerwise)
    def load(self, index: int, layer: nn.Module) -> None:
        self.load_module(self.adapter.layer_prefix(index))
        if self.writer is not None and index not in self.dense_zeros:
            self.dense_zeros[index] = layer_zeros(layer, self.adapter)

    def release(self, index: int, layer: nn.Module) -> None:
        prefix = self.adapter.layer_prefix(index)
        if self.writer is not None:
            tensors = {}
            for n, t in layer.state_dict().items():  # fused experts go back to their 2-D checkpoint tensors
                names = self._stored(f"{prefix}.{n}")
                tensors.update(zip(names, split_stored(n.rpartition(".")[2], t)) if len(names) > 1 else {names[0]: t})
            path = self.writer.write(index + 2, tensors)
            self.source.redirect(tensors, path)
            self.zeros[index] = layer_zeros(layer, self.adapter)
        self.release_module(prefix)
        memory.release_freed()
        log.debug("decoder layer %d released (%s); resident %.0f MiB (anonymous %s KiB, file %s KiB), peak %.0f MiB",
                  index, "written" if self.writer is not None else "read", memory.current_rss_bytes() / 2**20,
                  memory._status_kib("RssAnon"), memory._status_kib("RssFile"), memory.peak_rss_bytes() / 2**20)

    def saved(self) -> list[str]:
        """The tensor names save_pretrained would write for the model as it is now, in state_dict order
        (a tied parameter once, under the name it is stored under)."""
        return [n for n in self.model.state_dict() if self._alias(n) == n]

    def copy_rest(self) -> None:
        """Shard 1: every saved tensor outside the decoder layers (embeddings, final norm, head), as read or
        as a stage changed it; then the index."""
        layers = self.adapter.layers_path + "."
        saved = self.saved()
        rest = [n for n in saved if not n.startswith(layers)]
        # what the skeleton holds (the embeddings, the head) is written from there: read from the source again,
        # a 262k-token embedding would be mapped a second time (its pages counted twice in resident memory)
        state = self.model.state_dict()
        here = {n: state[n] for n in rest if not state[n].is_meta}
        self.writer.write(1, {**self.source.get([n for n in rest if n not in here]), **here})
        self.writer.unstash()
        self.writer.finish([s for n in saved for s in self._stored(n)])


@torch.no_grad()
def streamed_perplexity(stream: LayerStream, chunks: torch.Tensor, batch_size: int, device, desc: str) -> float:
    """exp(mean next-token NLL), as evaluate.perplexity computes it on the whole model, with the decoder
    layers read one at a time: the chunks' hidden states go through each layer in turn, then the head."""
    model, adapter = stream.model, stream.adapter
    acts = capture(model, adapter, chunks, device, batch_size)
    for index, layer in walk_layers(model, adapter, device, stream, desc, leave=False):
        acts.hidden = acts.outputs(layer)  # no finiteness check: perplexity reports what the model computes
        acts.index += 1
    nll, count = 0.0, 0
    with head_on(model, adapter, device, stream):
        for hidden, batch in zip(acts.hidden, chunks.split(batch_size)):
            n, c = nll_from_hidden(model, adapter, hidden, batch.to(device))
            nll, count = nll + n, count + c
    return math.exp(nll / count)


class _Owner:
    """Keeps a converted GGUF's temporary folder alive (removed when this is collected)."""


def open_stream(spec: str | None, dtype: str, trust_remote_code: bool):
    """A LayerStream over a local safetensors folder (the empty skeleton with the embeddings loaded: every
    pass starts there), its source and its tokenizer."""
    from safetensors import SafetensorError
    from transformers import AutoTokenizer

    source = resolve_model(spec)
    if problem := source_problem(source):
        raise ModelLoadError(f"--low-memory: {problem}")
    folder = source.path
    owner = _Owner()
    try:
        if source.gguf_file:  # converted tensor by tensor into a temporary folder, removed with the stream
            folder = convert(Path(source.path) / source.gguf_file, source.spec, trust_remote_code)
            weakref.finalize(owner, remove, folder)
        tensors = TensorSource(folder, source.spec)
        skeleton = empty_model(folder, dtype, trust_remote_code, tensors)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        raise _load_error(e, source) from e
    stream = LayerStream(skeleton, get_adapter(skeleton.model), tensors)
    if source.gguf_file:
        stream.converted = owner  # the temporary folder lives as long as the stream
    for path in stream.adapter.pre_layer_paths:
        if _get(skeleton.model, path) is not None:
            stream.load_module(path)
    return source, stream, tokenizer


def streamed_evaluator(spec: str | None, dtype: str, trust_remote_code: bool, device, batch_size: int):
    """`sparsellm eval --low-memory`: (spec, empty model, tokenizer, measure(chunks, desc) -> perplexity)."""
    source, stream, tokenizer = open_stream(spec, dtype, trust_remote_code)
    return source.spec, stream.model, tokenizer, lambda chunks, desc: streamed_perplexity(
        stream.reading(), chunks, batch_size, device, desc)
