"""Sequential layer-wise calibration.

The inputs of the first decoder layer are captured once; then for each layer in turn: collect the
statistics the method needs with forward hooks, compress, and re-run the (now compressed) layer to
produce the next layer's inputs. Only one decoder layer and the activations live on the compute
device at a time; the rest of the model stays where it was loaded."""
from __future__ import annotations

import fnmatch
import logging
import re
import time

import torch
from torch import nn

from ..errors import CompressionError, NumericalError
from ..faults import fault_point
from ..loading.adapters import Adapter
from .stats import InputStats, Target
from .walk import Activations, _overflow_hint, capture, check_finite, layer_forward, walk_layers

log = logging.getLogger(__name__)


def make_selector(targets: list[str], ignore: list[str]):
    """Module-name predicate from glob patterns ('re:' prefix for a regular expression)."""

    def match(name: str, pat: str) -> bool:
        return re.search(pat[3:], name) is not None if pat.startswith("re:") else fnmatch.fnmatchcase(name, pat)

    def select(name: str) -> bool:
        if targets and not any(match(name, p) for p in targets):
            return False
        return not any(match(name, p) for p in ignore)

    return select


def target_linears(layer: nn.Module, prefix: str, select) -> dict[str, nn.Linear]:
    return {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear) and select(f"{prefix}.{n}")}


class _Collected(Exception):
    pass


@torch.no_grad()
def collect_stats(layer: nn.Module, linears: dict[str, nn.Linear], needs: dict[str, frozenset[str]], acts: Activations) -> dict[str, InputStats]:
    """Accumulate the statistics `needs[name]` of the inputs of `linears` over all calibration batches
    (Linears that need none are skipped). The layer's outputs are
    not needed here, so each forward stops as soon as every hooked Linear has seen its input
    (this skips e.g. down_proj's own matmul, or the rest of the layer in true-sequential groups)."""
    linears = {n: m for n, m in linears.items() if needs[n]}
    stats = {n: InputStats(m.in_features, needs[n], m.weight.device) for n, m in linears.items()}
    if not stats:
        return stats
    seen: set[str] = set()

    def hook(name):
        def record(module, args):
            stats[name].update(args[0])
            seen.add(name)
            if len(seen) == len(stats):
                raise _Collected

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        for hidden, kw in zip(acts.hidden, acts.kwargs):
            seen.clear()
            try:
                layer_forward(layer, hidden, kw)
            except _Collected:
                pass
    finally:
        for h in handles:
            h.remove()
    return stats


def run_layerwise(model: nn.Module, adapter: Adapter, windows: torch.Tensor, methods: list, select,
                  device="cpu", batch_size: int = 8, desc: str = "compress", checkpoint=None,
                  pass_key: str = "compress", io=None) -> list[float]:
    """Apply `methods` (LayerwiseMethod, in order, sharing one calibration pass) to the selected Linear
    layers, layer by layer. `select`: one module-name predicate for all methods, or one per method.
    With a `checkpoint` (sparsellm.checkpoint.Checkpoint), the layers it holds for `pass_key` are
    restored instead of recomputed and every finished layer is saved to it.
    With an `io` (lowmem.stream.LayerStream, lowmem.offload.OffloadedLayers), the decoder layers' weights
    are elsewhere (on disk, or offloaded by accelerate):
    `io.load(index, layer)` gives a layer its weights before it is used and `io.release(index, layer)`
    writes out and frees it afterwards, so only one layer is ever in memory.
    Returns the seconds each method spent in `compress` (the shared calibration forwards excluded)."""
    selects = list(select) if isinstance(select, (list, tuple)) else [select] * len(methods)
    needs = frozenset().union(*(m.needs for m in methods))
    true_seq = any(m.true_sequential for m in methods)
    keep_dense = any(m.needs_dense for m in methods)
    layers = adapter.layers(model)
    start = checkpoint.restore(pass_key, layers, methods, io) if checkpoint is not None else 0
    acts = None
    if needs and start < len(layers):  # data-free methods (magnitude) need no activations at all
        # the captured keyword arguments (masks, positions) are recomputed; a resumed pass takes the
        # hidden states its last finished layer produced
        acts = capture(model, adapter, windows, device, batch_size)
        if start:
            acts.hidden, acts.index = checkpoint.inputs(pass_key, start, device), start
        check_finite(acts.hidden, f"entering decoder layer {start}", layers[start])
    seconds = [0.0] * len(methods)
    for index, layer in walk_layers(model, adapter, device, io, desc, start):
        prefix = adapter.layer_prefix(index)
        linears = target_linears(layer, prefix, lambda n: any(sel(n) for sel in selects))
        groups = adapter.groups_for(list(linears)) if true_seq else [list(linears)]
        for group in groups:
            chosen = {n: linears[n] for n in group}
            # each Linear gets only what the methods that touch it need (no XᵀX for a layer DSnoT skips)
            own_needs = {n: frozenset().union(*(m.needs for m, sel in zip(methods, selects) if sel(f"{prefix}.{n}")))
                         for n in chosen}
            stats = collect_stats(layer, chosen, own_needs, acts) if needs else {}
            fault_point(f"stats:{index}")
            for name, linear in chosen.items():
                full = f"{prefix}.{name}"
                if name in stats and not stats[name].finite():
                    raise NumericalError(f"non-finite values (NaN/inf) in the calibration inputs of {full}; "
                                         f"{_overflow_hint(layer)}")
                dense = linear.weight.detach().clone() if keep_dense else None
                for i, (method, sel) in enumerate(zip(methods, selects)):
                    if not sel(full):
                        continue
                    t = time.perf_counter()
                    try:
                        method.compress(Target(full, index, linear, stats.get(name), dense))
                    except torch.linalg.LinAlgError as e:
                        raise NumericalError(f"{full}: {str(e).splitlines()[0]}; raise the damping (percdamp, e.g. "
                                             "0.1) or calibrate on more data") from None
                    except ValueError as e:
                        raise CompressionError(f"{full}: {e}") from None
                    seconds[i] += time.perf_counter() - t
                del dense
        for method in methods:
            method.finish_layer(index)
        last = index + 1 == len(layers)
        if acts is not None and not last:  # the last layer's outputs feed nothing
            acts.advance(layer)
        if checkpoint is not None:
            checkpoint.save_layer(pass_key, index, layer, None if acts is None or last else acts.hidden, methods)
        fault_point(f"layer:{index}")
    del acts
    return seconds
