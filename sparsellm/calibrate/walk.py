"""The one layer walk: every pass that goes through the decoder layers in order (compression,
allocation, slicing, structured pruning, perplexity) captures the first layer's inputs once and then
brings each layer in, uses it and releases it.

`capture` runs the model up to its decoder layers with every layer swapped for a recording stub, so
each layer's own keyword arguments are kept (attention mask of its kind, sliding or full; its
position embeddings), as the model itself would pass them, without running any layer. `walk_layers`
yields the layers one at a time on the compute device, with their weights brought in by an `io`
(a model streamed from disk or offloaded by accelerate) and released after the caller's body."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import NumericalError
from ..loading.adapters import Adapter, _get

# keyword arguments of a layer call that concern generation, not the computation of one forward
_DROPPED = ("cache", "past_key_values", "past_key_value", "use_cache", "output_attentions")


class _Captured(Exception):
    pass


@dataclass
class Activations:
    """Hidden states of the calibration windows entering decoder layer `index`, in batches, with the
    keyword arguments the model passes to each layer for each batch (`per_layer[layer][batch]`)."""

    hidden: list[torch.Tensor]
    per_layer: list[list[dict]] = field(default_factory=list)
    index: int = 0

    @property
    def kwargs(self) -> list[dict]:
        """The keyword arguments of layer `index`, per batch."""
        return self.per_layer[self.index]

    def outputs(self, layer: nn.Module, index: int | None = None) -> list[torch.Tensor]:
        """What decoder layer `index` (default: the current one) makes of the current hidden states."""
        kw = self.per_layer[self.index if index is None else index]
        return [layer_forward(layer, h, k) for h, k in zip(self.hidden, kw)]

    def advance(self, layer: nn.Module, outputs: list[torch.Tensor] | None = None) -> None:
        """Move to the next layer: its inputs are the current layer's `outputs`; when not given, they are
        computed batch by batch in place (one batch of activations more at a time, not a second copy)."""
        if outputs is None:
            for b, kw in enumerate(self.kwargs):
                self.hidden[b] = layer_forward(layer, self.hidden[b], kw)
        else:
            self.hidden = outputs
        check_finite(self.hidden, f"leaving decoder layer {self.index}", layer)
        self.index += 1


def module_device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def layer_forward(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, use_cache=False, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _overflow_hint(module: nn.Module) -> str:
    p = next(module.parameters(), None)
    if p is not None and p.dtype in (torch.float16, torch.bfloat16):
        return f"the model overflows in {str(p.dtype).removeprefix('torch.')}: load it in float32 (--dtype float32)"
    return "the model's weights may contain NaN/inf: check or re-download the checkpoint"


def check_finite(hidden: list[torch.Tensor], where: str, module: nn.Module) -> None:
    if not all(bool(torch.isfinite(h).all()) for h in hidden):
        raise NumericalError(f"non-finite values (NaN/inf) in the calibration activations {where}; {_overflow_hint(module)}")


class _Recorder(nn.Module):
    """Stands in for decoder layer `index` during a capture: records what the model passes to it and hands
    its input on unchanged (what it passes on is never used); the last one stops the forward. The layer's
    own hooks do not fire, and its weights are never touched (a streamed layer may not even be loaded)."""

    def __init__(self, layer: nn.Module, index: int, last: int, hidden_out: list, kwargs_out: list[dict]):
        super().__init__()
        self.index, self.last, self.hidden_out, self.kwargs_out = index, last, hidden_out, kwargs_out
        if hasattr(layer, "attention_type"):  # some models key the layer's mask by it
            self.attention_type = layer.attention_type

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.kwargs_out.append({k: v for k, v in kwargs.items() if k not in _DROPPED})
        if self.index == 0:
            self.hidden_out.append(hidden)
        if self.index == self.last:
            raise _Captured
        return hidden


@torch.no_grad()
def capture(model: nn.Module, adapter: Adapter, windows: torch.Tensor, device, batch_size: int) -> Activations:
    """The first decoder layer's inputs for `windows` in batches of `batch_size`, and every layer's own
    keyword arguments. Only the modules before the layers run (on `device`); no layer computes."""
    device = torch.device(device)
    container = adapter.layers(model)
    layers = list(container)
    # accelerate places a dispatched module itself (an offloaded one has no weights to move)
    pre = [m for m in adapter.pre_layer_modules(model) if getattr(m, "_hf_hook", None) is None]
    homes = [module_device(m) for m in pre]
    acts = Activations(hidden=[], per_layer=[[] for _ in layers])
    try:
        for m in pre:
            m.to(device)
        for i, layer in enumerate(layers):
            container[i] = _Recorder(layer, i, len(layers) - 1, acts.hidden, acts.per_layer[i])
        for batch in windows.split(batch_size):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _Captured:
                pass
            else:
                raise RuntimeError("the last decoder layer was never called")
    finally:
        for i, layer in enumerate(layers):
            container[i] = layer
        for m, home in zip(pre, homes):
            m.to(home)
    return acts


def walk_layers(model: nn.Module, adapter: Adapter, device, io=None, desc: str = "layers", start: int = 0,
                leave: bool = True) -> Iterator[tuple[int, nn.Module]]:
    """Yield (index, layer) for the decoder layers from `start`, each with its weights present (`io.load`)
    and on `device` while the caller's loop body runs; then the layer goes back where it was and `io`
    releases it (writes it out and frees it, for a streamed model). A body that raises leaves the layer
    unreleased: nothing half-done is written."""
    device = torch.device(device)
    layers = adapter.layers(model)
    indices = range(start, len(layers))
    for index in tqdm(indices, desc=desc, unit="layer", initial=start, total=len(layers), leave=leave):
        layer = layers[index]
        if io is not None:
            io.load(index, layer)
        home = module_device(layer)
        layer.to(device)
        yield index, layer
        layer.to(home)
        if io is not None:
            io.release(index, layer)


@contextmanager
def modules_in(model: nn.Module, paths: list[str], io=None, device=None):
    """The modules at `paths` outside the decoder layers (embeddings, final norm, head) with their weights
    for the block, and on `device` when given. An io that holds weights elsewhere (streamed from disk,
    offloaded by accelerate) brings them in and takes them back afterwards; one that writes keeps what
    the block changed (new tensors, shapes, untied parameters). A block that raises releases nothing."""
    paths = [p for p in paths if _get(model, p) is not None]
    held = hasattr(io, "load_module")
    if held:
        for p in paths:
            io.load_module(p)
    modules = [_get(model, p) for p in paths]
    homes = [module_device(m) for m in modules]
    moved = device is not None
    try:
        for m in modules:
            if moved and getattr(m, "_hf_hook", None) is None:  # accelerate places a dispatched module itself
                m.to(device)
        yield modules
    finally:
        for m, home in zip(modules, homes):
            if moved and getattr(m, "_hf_hook", None) is None:
                m.to(home)
    if held:
        for p in paths:
            io.release_module(p)


def head_on(model: nn.Module, adapter: Adapter, device, io=None):
    """The modules after the decoder layers (final norm, head) with their weights and on `device` for the
    block (see modules_in)."""
    return modules_in(model, list(adapter.head_paths), io, device)
