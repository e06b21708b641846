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
from ..loading.adapters import Adapter, _get
from ..loading.experts import ExpertMatrix, expert_matrices
from .experts import ExpertStats
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


# experts the router sends fewer calibration tokens get data-free scores (calibration.min_expert_tokens)
MIN_EXPERT_TOKENS = 128


def target_linears(layer: nn.Module, prefix: str, select) -> dict[str, nn.Linear]:
    return {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear) and select(f"{prefix}.{n}")}


def layer_targets(adapter: Adapter, layer: nn.Module, prefix: str, select) -> dict[str, nn.Linear | ExpertMatrix]:
    """What the per-Linear methods compress in a decoder layer, by layer-relative name: its selected Linears
    but those the adapter keeps dense (a shared-expert gate), and each expert's matrices as 2-D views of the
    experts' 3-D parameters (`mlp.experts.<e>.gate_proj`, ...: the names the checkpoint stores them under)."""
    out = {n: m for n, m in target_linears(layer, prefix, select).items() if n not in adapter.dense_linears}
    for path, experts in adapter.expert_modules(layer).items():
        out.update({n: v for n, v in expert_matrices(experts, path).items() if select(f"{prefix}.{n}")})
    return out


def _experts_of(name: str) -> str:
    """The experts module's layer-relative path of an expert matrix name (mlp.experts.3.up_proj -> mlp.experts)."""
    return name.rsplit(".", 2)[0]


class _Collected(Exception):
    pass


@torch.no_grad()
def collect_stats(layer: nn.Module, linears: dict[str, nn.Linear], needs: dict[str, frozenset[str]], acts: Activations,
                  min_expert_tokens: int = MIN_EXPERT_TOKENS, routing: dict | None = None,
                  prefix: str = "") -> dict[str, InputStats]:
    """Accumulate the statistics `needs[name]` of the inputs of `linears` over all calibration batches
    (Linears that need none are skipped). The layer's outputs are
    not needed here, so each forward stops as soon as every hooked Linear has seen its input
    (this skips e.g. down_proj's own matmul, or the rest of the layer in true-sequential groups).
    Expert matrices (ExpertMatrix) get the statistics of the tokens the router sends to their expert, from
    one hook on their experts module (calibrate/experts.py); an expert with fewer than `min_expert_tokens`
    gets data-free ones, with a warning. `routing` receives {experts path: ExpertStats} of those modules."""
    linears = {n: m for n, m in linears.items() if needs[n]}
    plain = {n: m for n, m in linears.items() if not isinstance(m, ExpertMatrix)}
    stats = {n: InputStats(m.in_features, needs[n], m.weight.device) for n, m in plain.items()}
    routed: dict[str, list[str]] = {}
    for n, m in linears.items():
        if isinstance(m, ExpertMatrix):
            routed.setdefault(_experts_of(n), []).append(n)
    if not linears:
        return stats
    modules = {path: _get(layer, path) for path in routed}
    experts = {path: ExpertStats(modules[path], frozenset().union(*(needs[n] for n in names)), linears[names[0]].weight.device,
                                 inner=any(linears[n].part == "down_proj" for n in names),
                                 inputs=any(linears[n].part != "down_proj" for n in names),
                                 only={linears[n].expert for n in names})
               for path, names in routed.items()}
    seen: set[str] = set()
    expected = len(plain) + len(experts)

    def hook(name, update):
        def record(module, args, kwargs):
            update(module, args, kwargs)
            seen.add(name)
            if len(seen) == expected:
                raise _Collected

        return record

    handles = [m.register_forward_pre_hook(hook(n, lambda mod, a, kw, n=n: stats[n].update(a[0])), with_kwargs=True)
               for n, m in plain.items()]
    handles += [modules[p].register_forward_pre_hook(hook(p, es.record), with_kwargs=True) for p, es in experts.items()]
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
    for path, es in experts.items():
        if routing is not None:
            routing[path] = es
        for n in routed[path]:
            m = linears[n]
            stats[n] = es.for_matrix(m.expert, m.part, min_expert_tokens, f"{prefix}.{path}" if prefix else path)
    return stats


def _note_experts(out: dict, prefix: str, routing: dict, chosen: dict, min_tokens: int) -> None:
    for path, es in routing.items():
        tokens = out.setdefault("expert_tokens", {}).setdefault(f"{prefix}.{path}", [0] * es.count)
        for e in es.only:  # a pass that collected a few experts only (expert_chunks) reports those
            tokens[e] = es.tokens[e]
        starved = [f"{prefix}.{n}" for n, m in chosen.items()
                   if isinstance(m, ExpertMatrix) and n.startswith(path + ".") and es.tokens[m.expert] < max(min_tokens, 1)]
        if starved:
            out.setdefault("experts_data_free", []).extend(starved)


def run_layerwise(model: nn.Module, adapter: Adapter, windows: torch.Tensor, methods: list, select,
                  device="cpu", batch_size: int = 8, desc: str = "compress", checkpoint=None,
                  pass_key: str = "compress", io=None, min_expert_tokens: int = MIN_EXPERT_TOKENS,
                  experts: dict | None = None) -> list[float]:
    """Apply `methods` (LayerwiseMethod, in order, sharing one calibration pass) to the selected Linear
    layers, layer by layer. `select`: one module-name predicate for all methods, or one per method.
    With a `checkpoint` (sparsellm.checkpoint.Checkpoint), the layers it holds for `pass_key` are
    restored instead of recomputed and every finished layer is saved to it.
    With an `io` (lowmem.stream.LayerStream, lowmem.offload.OffloadedLayers), the decoder layers' weights
    are elsewhere (on disk, or offloaded by accelerate):
    `io.load(index, layer)` gives a layer its weights before it is used and `io.release(index, layer)`
    writes out and frees it afterwards, so only one layer is ever in memory.
    Each expert of a mixture-of-experts layer is compressed from the tokens routed to it (collect_stats);
    `experts` receives what the report says of them: `expert_tokens` {experts module: [tokens per expert]} and
    `experts_data_free` (the matrices of experts that saw fewer than `min_expert_tokens`).
    A true-sequential pass (a method with `true_sequential`) whose layers fit ONE_PASS_BYTES with every window
    in one batch runs one forward per layer (_one_pass_layer); otherwise each layer takes one statistics
    forward per sequential group, then one to propagate.
    Returns the seconds each method spent in `compress` (the shared calibration forwards excluded)."""
    selects = list(select) if isinstance(select, (list, tuple)) else [select] * len(methods)
    needs = frozenset().union(*(m.needs for m in methods))
    true_seq = any(m.true_sequential for m in methods)
    keep_dense = any(m.needs_dense for m in methods)
    layers = adapter.layers(model)
    one_pass = bool(needs) and true_seq and one_pass_fits(model, adapter, windows)
    start = checkpoint.restore(pass_key, layers, methods, io) if checkpoint is not None else 0
    acts = None
    if needs and start < len(layers):  # data-free methods (magnitude) need no activations at all
        # the captured keyword arguments (masks, positions) are recomputed; a resumed pass takes the
        # hidden states its last finished layer produced
        acts = capture(model, adapter, windows, device, len(windows) if one_pass else batch_size)
        if start:
            acts.hidden, acts.index = checkpoint.inputs(pass_key, start, device), start
        check_finite(acts.hidden, f"entering decoder layer {start}", layers[start])
    seconds = [0.0] * len(methods)

    def compress_one(index: int, prefix: str, name: str, linear, stats) -> None:
        full = f"{prefix}.{name}"
        if stats is not None and not stats.finite():
            raise NumericalError(f"non-finite values (NaN/inf) in the calibration inputs of {full}; "
                                 f"{_overflow_hint(layers[index])}")
        dense = linear.weight.detach().clone() if keep_dense else None
        for i, (method, sel) in enumerate(zip(methods, selects)):
            if not sel(full):
                continue
            t = time.perf_counter()
            try:
                method.compress(Target(full, index, linear, stats, dense))
            except torch.linalg.LinAlgError as e:
                raise NumericalError(f"{full}: {str(e).splitlines()[0]}; raise the damping (percdamp, e.g. "
                                     "0.1) or calibrate on more data") from None
            except ValueError as e:
                raise CompressionError(f"{full}: {e}") from None
            seconds[i] += time.perf_counter() - t

    for index, layer in walk_layers(model, adapter, device, io, desc, start):
        prefix = adapter.layer_prefix(index)
        linears = layer_targets(adapter, layer, prefix, lambda n: any(sel(n) for sel in selects))
        # each Linear gets only what the methods that touch it need (no XᵀX for a layer DSnoT skips)
        own_needs = {n: frozenset().union(*(m.needs for m, sel in zip(methods, selects) if sel(f"{prefix}.{n}")))
                     for n in linears}
        last = index + 1 == len(layers)
        outputs = None
        if one_pass and not adapter.expert_modules(layer):
            outputs = _one_pass_layer(layer, linears, own_needs, acts, last,
                                      lambda n, m, st: compress_one(index, prefix, n, m, st))
            fault_point(f"stats:{index}")
        else:
            groups = adapter.groups_for(list(linears)) if true_seq else [list(linears)]
            for group in (part for g in groups for part in expert_chunks(g, linears, own_needs)):
                chosen = {n: linears[n] for n in group}
                routing: dict[str, ExpertStats] = {}
                stats = collect_stats(layer, chosen, own_needs, acts, min_expert_tokens, routing, prefix) if needs else {}
                if experts is not None:
                    _note_experts(experts, prefix, routing, chosen, min_expert_tokens)
                fault_point(f"stats:{index}")
                for name, linear in chosen.items():
                    compress_one(index, prefix, name, linear, stats.get(name))
        for method in methods:
            method.finish_layer(index)
        if acts is not None and not last:  # the last layer's outputs feed nothing
            acts.advance(layer, outputs)
        if checkpoint is not None:
            checkpoint.save_layer(pass_key, index, layer, None if acts is None or last else acts.hidden, methods)
        fault_point(f"layer:{index}")
    del acts
    return seconds


# XᵀX of the experts' inputs, float64, held at once for one statistics pass: a group needing more is collected a few
# experts at a time (one forward of the layer per chunk). Bit-identical to one pass: an expert's inputs depend on
# the router and what runs before the experts, never on another expert's weights (and the group's other Linears
# are compressed with the last chunk).
EXPERT_STATS_BYTES = 4 << 30


def expert_chunks(group: list[str], linears: dict, needs: dict[str, frozenset[str]]) -> list[list[str]]:
    """Split a group of names into statistics passes whose experts' XᵀX fit EXPERT_STATS_BYTES: consecutive
    experts together, every non-expert name in the last pass."""
    per_expert: dict[int, int] = {}
    for n in group:
        m = linears[n]
        if isinstance(m, ExpertMatrix) and "hessian" in needs[n]:
            per_expert[m.expert] = per_expert.get(m.expert, 0) + m.in_features ** 2 * 8
    if sum(per_expert.values()) <= EXPERT_STATS_BYTES:
        return [group]
    chunks: list[set[int]] = [set()]
    held = 0
    for e in sorted(per_expert):  # gate and up of one expert read the same inputs: counted twice, a safe bound
        if chunks[-1] and held + per_expert[e] > EXPERT_STATS_BYTES:
            chunks.append(set())
            held = 0
        chunks[-1].add(e)
        held += per_expert[e]
    parts = [[n for n in group if isinstance(linears[n], ExpertMatrix) and linears[n].expert in c] for c in chunks]
    parts[-1] += [n for n in group if not (isinstance(linears[n], ExpertMatrix) and linears[n].expert in per_expert)]
    return parts


# one-pass layers (true-sequential passes): the layer's whole working set for all calibration tokens at once
# must stay under this. A fixed bound, not the free memory: the choice changes the bits of the result, so it
# depends only on the model's shapes and the calibration windows (same recipe and input, same output).
ONE_PASS_BYTES = 2 << 30


def one_pass_fits(model: nn.Module, adapter: Adapter, windows: torch.Tensor) -> bool:
    """Whether a decoder layer can run on every calibration window in one batch: an fp32 upper bound of its
    activations (every Linear's outputs, a few hidden-size temporaries and one attention score per head
    and key) over all tokens, against ONE_PASS_BYTES."""
    layers = adapter.layers(model)
    if not len(layers) or windows.dim() != 2:
        return False
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    hidden = int(getattr(cfg, "hidden_size", 0) or 0)
    heads = int(getattr(cfg, "num_attention_heads", 0) or 0)
    outs = max(sum(m.out_features for m in layer.modules() if isinstance(m, nn.Linear)) for layer in layers)
    per_token = outs + 4 * hidden + heads * windows.shape[1]
    return windows.numel() * per_token * 4 <= ONE_PASS_BYTES


@torch.no_grad()
def _one_pass_layer(layer: nn.Module, linears: dict, needs: dict[str, frozenset[str]], acts: Activations,
                    last: bool, compress) -> list[torch.Tensor] | None:
    """True-sequential compression in one forward over every calibration window at once (acts holds one
    batch): each target Linear is compressed inside its forward pre-hook, from the statistics of the very
    input it is about to multiply, so later Linears see the outputs of the compressed earlier ones (q/k/v,
    then o, then gate/up, then down) and the forward's output is already the next layer's input. A Linear the
    forward never reached is compressed afterwards from empty statistics, as the grouped passes would.
    Returns the layer's outputs (None for the last layer, whose forward stops after its last Linear)."""
    (hidden,), (kw,) = acts.hidden, acts.kwargs
    pending = dict(linears)

    def empty(name: str) -> InputStats | None:
        m = linears[name]
        return InputStats(m.in_features, needs[name], m.weight.device) if needs[name] else None

    def hook(name):
        def pre(module, args):
            if name not in pending:  # a Linear called twice in one forward: compressed at its first call
                return
            stats = empty(name)
            if stats is not None:
                stats.update(args[0])
            compress(name, pending.pop(name), stats)
            if last and not pending:
                raise _Collected

        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    out = None
    try:
        out = layer_forward(layer, hidden, kw)
    except _Collected:
        pass
    finally:
        for h in handles:
            h.remove()
    for name, m in list(pending.items()):
        compress(name, m, empty(name))
    return None if last else [out]
