"""Models dispatched by accelerate (from_pretrained(device_map=..., offload_folder=...)) through the same
layer-wise engine.

An offloaded Linear keeps its weight on the meta device; accelerate's hook puts the stored weight in
before each forward and takes it out after. The methods change weights between forwards, so for the
layer being compressed the hooks' offloading is suspended: `load` puts the stored weights in for good,
and `release` writes the changed ones back where the hook reads them from (its offload folder, or its
CPU copy), so that later forwards, perplexity and save_pretrained see the compressed weights."""
from __future__ import annotations

import copy
import json
import os

from torch import nn

from ..errors import RecipeError
from ..measure import layer_zeros


def parse_device_map(text: str | None, offload_folder: str | None = None):
    """--device-map: "auto" (or another accelerate strategy name) or a JSON object of module -> device."""
    if text is None or text in ("auto", "balanced", "balanced_low_0", "sequential"):
        return text
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict) or not all(isinstance(v, (str, int)) for v in value.values()):
        raise RecipeError(f"--device-map {text!r} is neither auto nor a JSON object of module name -> device; give e.g. "
                          '\'{"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", ...}\'')
    if "disk" in value.values() and not offload_folder:
        raise RecipeError("--device-map puts modules on disk: give --offload-folder DIR for their weights")
    return value


def unhooked_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module` without accelerate's hooks (a hook holds the whole offload map: copying it would
    copy every weight offloaded to CPU); the copy's weights are where the module's are now."""
    held = []
    for m in module.modules():
        if "_hf_hook" in m.__dict__:
            held.append((m, {k: m.__dict__.pop(k) for k in ("_hf_hook", "_old_forward", "forward") if k in m.__dict__}))
    try:
        return copy.deepcopy(module)
    finally:
        for m, attrs in held:
            m.__dict__.update(attrs)


def offload_folder(model: nn.Module) -> str | None:
    """The folder accelerate offloads this model's weights to (disk), or None."""
    for _, hook in _offload_hooks(model):
        folder = getattr(hook.weights_map.dataset, "save_folder", None)
        if folder:
            return folder
    return None


def is_dispatched(model: nn.Module) -> bool:
    return bool(getattr(model, "hf_device_map", None)) and any(
        getattr(m, "_hf_hook", None) is not None for m in model.modules())


def _offload_hooks(module: nn.Module):
    """(module, AlignDevicesHook) for every module of `module` whose weights accelerate offloads."""
    for m in module.modules():
        hook = getattr(m, "_hf_hook", None)
        for h in getattr(hook, "hooks", [hook]):  # a SequentialHook holds several
            if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None:
                yield m, h


class OffloadedLayers:
    """The engine's io (calibrate/engine.py: run_layerwise) for a dispatched model; `load_module` and
    `release_module` do the same for a module outside the decoder layers (embeddings, head)."""

    def __init__(self, model: nn.Module, adapter, write: bool = True):
        self.model, self.adapter, self.write = model, adapter, write
        self.zeros: dict[int, dict[str, tuple[int, int]]] = {}
        self.dense_zeros: dict[int, dict[str, tuple[int, int]]] = {}  # as first loaded (before any stage)
        self._held: dict[str | int, list] = {}  # per loaded module (a probe pass holds one while it walks the later ones)

    def reading(self) -> "OffloadedLayers":
        return OffloadedLayers(self.model, self.adapter, write=False)

    def load(self, index: int, layer: nn.Module) -> None:
        self._bring_in(index, layer)
        if self.write and index not in self.dense_zeros:
            self.dense_zeros[index] = layer_zeros(layer, self.adapter)

    def release(self, index: int, layer: nn.Module) -> None:
        if self.write:
            self.zeros[index] = layer_zeros(layer, self.adapter)
        self._take_out(index)

    def load_module(self, path: str) -> None:
        self._bring_in(path, self.model.get_submodule(path))

    def release_module(self, path: str) -> None:
        self._take_out(path)

    def _bring_in(self, key, module: nn.Module) -> None:
        from accelerate.utils import set_module_tensor_to_device

        self._held[key] = list(_offload_hooks(module))
        for m, hook in self._held[key]:
            for name in [n for n, p in m._parameters.items() if p is not None]:
                set_module_tensor_to_device(m, name, hook.execution_device, value=hook.weights_map[name])
            hook.offload = False  # until release: the weights stay in, the methods change them in place

    def _take_out(self, key) -> None:
        from accelerate.utils import offload_weight, set_module_tensor_to_device

        for m, hook in self._held.pop(key, []):
            stored = hook.weights_map.dataset  # accelerate's OffloadedWeightsLoader
            for name, p in [(n, p) for n, p in m._parameters.items() if p is not None]:
                full = hook.weights_map.prefix + name
                if self.write:
                    value = p.detach().cpu()
                    if full in stored.state_dict:  # offloaded to CPU memory
                        stored.state_dict[full] = value.clone()
                    else:  # to disk: a new .dat file that the index now points to instead of the checkpoint
                        os.makedirs(stored.save_folder, exist_ok=True)
                        offload_weight(value, full, stored.save_folder, index=stored.index)
                set_module_tensor_to_device(m, name, "meta")
            hook.offload = True
